"""Training throughput, in examples per second, printed in one run:

1. the project's training step (TwoTowerModel, graph term off),
2. a minimal hand-written TFRS model with the same towers and batch
   (plain tfrs.tasks.Retrieval on query / image embeddings),
3. the project's step with the graph term on (neighbours through the image tower,
   each distinct image of the batch once: trainer/distinct_images.py),
4. both steps with the distinct images in static chunks of `training.image_chunk_size`
   (`training.dynamic_image_batch=false`, the way they always go on TPUs) instead of
   one call of their exact number,
5. the graph-on step with `training.image_chunk_size=0`: every slot through the tower in
   one call (no de-duplication: the step before issue 14),
6. the opt-ins `training.graph_neighbor_gradient=false` (neighbours' forward pass only),
   `training.graph_batches=true` (the graph-on step on batches built from the graph) and
   `training.graph_neighbor_table_steps=N` (neighbours looked up in a table of the corpus's
   embeddings refreshed every N steps: its rate counts each refresh's time spread over N steps),
7. the input pipeline alone (read, parse, tokenize, look up / decode the images), in the
   configured layout (`training.image_table`) and in the other one.

All model figures use batches already in memory, so they measure the step: each
step is timed on its own, the models take turns (`--rounds`), and a rate is the
batch size over the median step time;
(7) shows whether the host keeps up.  Then the ratios the targets are about, the
mean number of distinct images per batch, and the load average.

    .venv/bin/python benchmarks/train_throughput.py --workdir W [--config configs/demo.yaml] [--steps 50]

W must hold the pipeline's examples/ (e.g. after `clicklens generate-demo-data` and `clicklens pipeline`).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clicklens import compat  # noqa: F401,E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402

from trainer import input as model_input  # noqa: E402
from clicklens.config import load_config  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.neighbor_table import NeighborEmbeddingTable  # noqa: E402
from trainer.tokenizer import QueryTokenizer  # noqa: E402
from trainer.task import make_optimizer  # noqa: E402
from clicklens.workdir import Workdir  # noqa: E402


# The graph-on step timed on batches built from the graph (training.graph_batches) instead of shuffled ones.
GRAPH_BUILT = "graph on, graph-built batches"
# The graph-on step with neighbours' embeddings from a refreshed table (training.graph_neighbor_table_steps).
NEIGHBOR_TABLE = "graph on, neighbour table"


class MinimalTfrsModel(tfrs.Model):
    """The TFRS tutorial's two-tower model: in-batch softmax, nothing else."""

    def __init__(self, query_tower, image_tower):
        super().__init__()
        self.query_tower, self.image_tower = query_tower, image_tower
        self.task = tfrs.tasks.Retrieval()

    def compute_loss(self, features, training=False):
        return self.task(self.query_tower(features[model_input.QUERY_TOKENS]),
                         self.image_tower(features[model_input.IMAGE]), compute_metrics=False)


def step_seconds(step, batches, steps: int, first: int = 0) -> list:
    """Wall seconds of each of `steps` calls of a traced train step, over the in-memory batches in turn from `first`."""
    seconds = []
    for i in range(first, first + steps):
        started = time.perf_counter()
        step(batches[i % len(batches)])["loss"].numpy()
        seconds.append(time.perf_counter() - started)
    return seconds


def input_rate(config, workdir, tokenizer, steps: int, batch_size: int) -> float:
    """Examples per second of the training input pipeline alone (after its first batch)."""
    iterator = iter(model_input.make_dataset(config, workdir, "train", batch_size, training=True, tokenizer=tokenizer))
    next(iterator)
    started = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch_size / (time.perf_counter() - started)


def distinct_images_per_batch(batches):
    """(mean number of distinct image keys, slots) over the slots the graph-on step embeds; batches stacked [N, B, ...]."""
    keys = [batches[model_input.IMAGE_KEY], batches[model_input.NEIGHBOR_KEYS]]
    if model_input.NEGATIVE_KEYS in batches:
        keys.append(batches[model_input.NEGATIVE_KEYS])
    flat = tf.concat([tf.reshape(k, [k.shape[0], -1]) for k in keys], axis=1).numpy()
    return sum(len(set(row)) for row in flat) / len(flat), flat.shape[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=32,
                        help="distinct in-memory batches the model steps cycle through (graph-built batches vary "
                             "from about 220 to 400 distinct images, so a few would not represent an epoch)")
    parser.add_argument("--table-steps", type=int, default=100,
                        help="training.graph_neighbor_table_steps of the neighbour-table step (refresh interval)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    config = load_config(args.config, args.overrides)
    workdir = Workdir(args.workdir)
    batch_size = config.training.per_replica_batch_size
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    graph_multiplier = config.training.graph_multiplier or 0.1

    # (7) the input pipeline alone, in both layouts (the configured one is the one the models get).
    layout = "image table" if config.training.image_table else "per-example PNGs"
    other = copy.deepcopy(config)
    other.training.image_table = not config.training.image_table
    rates = {}
    for name, cfg in ((f"input pipeline ({layout})", config),
                      (f"input pipeline ({'per-example PNGs' if config.training.image_table else 'image table'})",
                       other)):
        cfg = copy.deepcopy(cfg)
        cfg.training.graph_multiplier = graph_multiplier
        rates[name] = input_rate(cfg, workdir, tokenizer, args.steps, batch_size)

    # `--batches` distinct in-memory batches for the model measurements, graph term on (neighbours decoded), shuffled
    # and built from the graph (training.graph_batches); the input pipeline is released so its prefetching
    # threads do not compete with the measured steps.
    cached, distinct = {}, {}
    for graph_batches in (False, True):
        on = copy.deepcopy(config)
        on.training.graph_multiplier = graph_multiplier
        on.training.graph_batches = graph_batches
        iterator = iter(model_input.make_dataset(on, workdir, "train", batch_size, training=True,
                                                 tokenizer=tokenizer))
        cached[graph_batches] = [next(iterator) for _ in range(args.batches)]
        del iterator
        batches = {k: tf.stack([b[k] for b in cached[graph_batches]]) for k in cached[graph_batches][0]}
        distinct[graph_batches], slots = distinct_images_per_batch(batches)
    variants = {
        "project step, graph off": ["training.graph_multiplier=0"],
        "project step, graph on": [],
        "graph off, static chunks": ["training.graph_multiplier=0", "training.dynamic_image_batch=false"],
        "graph on, static chunks": ["training.dynamic_image_batch=false"],
        "graph on, no de-duplication": ["training.image_chunk_size=0"],
        "graph on, neighbours no gradient": ["training.graph_neighbor_gradient=false"],
        GRAPH_BUILT: [],
        NEIGHBOR_TABLE: [f"training.graph_neighbor_table_steps={args.table_steps}"],
    }
    models = {}
    for name, overrides in variants.items():
        cfg = load_config(args.config, args.overrides + [f"training.graph_multiplier={graph_multiplier}"] + overrides)
        tf.keras.utils.set_random_seed(cfg.training.seed)
        models[name] = build_model(cfg, tokenizer.vocab_size)
    table = models[NEIGHBOR_TABLE].neighbor_table = NeighborEmbeddingTable(
        model_input.image_table_for(config, workdir), models[NEIGHBOR_TABLE].image_tower.output_shape[-1])
    project = models["project step, graph off"]
    models["minimal TFRS model"] = MinimalTfrsModel(tf.keras.models.clone_model(project.query_tower),
                                                    tf.keras.models.clone_model(project.image_tower))
    for model in models.values():
        model.compile(make_optimizer(config.training), steps_per_execution=config.training.steps_per_execution)
    # Each step timed on its own, the models taking turns; a rate is the batch over the median step.
    # (Timing whole model.fit calls gave rates in steps of 2x on the 2-core EPYC: one stall in a call
    # moved the whole call's figure.)
    steps = {name: tf.function(model.train_step) for name, model in models.items()}
    batches_of = {name: cached[name == GRAPH_BUILT] for name in models}
    table.refresh(models[NEIGHBOR_TABLE].image_tower)  # traced; the rounds below time it warm
    for name, step in steps.items():
        step(batches_of[name][0])  # trace + warm up
    seconds = {name: [] for name in models}
    refresh_seconds = []
    for round_ in range(args.rounds):
        for name, step in steps.items():
            seconds[name] += step_seconds(step, batches_of[name], args.steps, first=round_ * args.steps)
        started = time.perf_counter()
        table.refresh(models[NEIGHBOR_TABLE].image_tower)
        refresh_seconds.append(time.perf_counter() - started)
    refresh = statistics.median(refresh_seconds)
    seconds[NEIGHBOR_TABLE] = [s + refresh / args.table_steps for s in seconds[NEIGHBOR_TABLE]]
    rates = {**{name: batch_size / statistics.median(s) for name, s in seconds.items()}, **rates}

    base = rates["minimal TFRS model"]
    off = rates["project step, graph off"]
    print(f"batch {batch_size}, {args.steps} steps, {tf.config.threading.get_inter_op_parallelism_threads() or 'auto'} "
          f"inter-op threads, {os.cpu_count()} CPUs, image_chunk_size {config.training.image_chunk_size} "
          f"(static chunks only), dynamic_image_batch {config.training.dynamic_image_batch}")
    for name, rate in rates.items():
        print(f"{name:36s} {rate:10.1f} examples/s   ({rate / base:5.2f} x minimal TFRS, {rate / off:5.2f} x graph off)")
    print(f"distinct images per graph-on batch: {distinct[False]:.0f} of {slots} slots "
          f"({distinct[True]:.0f} in graph-built batches)")
    print(f"graph on / graph off:               {rates['project step, graph on'] / off:5.2f}  (target >= 0.45)")
    print(f"  the same, static chunks:          "
          f"{rates['graph on, static chunks'] / rates['graph off, static chunks']:5.2f}")
    print(f"  graph-built batches (opt-in):     {rates[GRAPH_BUILT] / off:5.2f}")
    print(f"  neighbour table (opt-in):         {rates[NEIGHBOR_TABLE] / off:5.2f}  (a refresh of {len(table) - 1} "
          f"images: {refresh * 1e3:.0f} ms, every {args.table_steps} steps)")
    print(f"input pipeline ({layout}) / graph off: {rates[f'input pipeline ({layout})'] / off:5.2f}  (target >= 2)")
    print(f"load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
