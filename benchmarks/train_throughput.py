"""Training throughput, in examples per second, printed in one run:

1. the project's training step (TwoTowerModel, graph term off),
2. a minimal hand-written TFRS model with the same towers and batch
   (plain tfrs.tasks.Retrieval on query / image embeddings),
3. the project's step with the graph term on (neighbours through the image tower),
4. the input pipeline alone (read, parse, tokenize, decode the TFRecords).

All model figures use batches already in memory, so they measure the step;
(4) shows whether the host keeps up.

    .venv/bin/python benchmarks/train_throughput.py --workdir W [--config configs/demo.yaml] [--steps 50]

W must hold the pipeline's examples/ (e.g. after `clicklens generate-demo-data` and `clicklens pipeline`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clicklens import compat  # noqa: F401,E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402

from trainer import input as model_input  # noqa: E402
from clicklens.config import load_config  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.tokenizer import QueryTokenizer  # noqa: E402
from trainer.task import make_optimizer  # noqa: E402
from clicklens.workdir import Workdir  # noqa: E402


class MinimalTfrsModel(tfrs.Model):
    """The TFRS tutorial's two-tower model: in-batch softmax, nothing else."""

    def __init__(self, query_tower, image_tower):
        super().__init__()
        self.query_tower, self.image_tower = query_tower, image_tower
        self.task = tfrs.tasks.Retrieval()

    def compute_loss(self, features, training=False):
        return self.task(self.query_tower(features[model_input.QUERY_TOKENS]),
                         self.image_tower(features[model_input.IMAGE]), compute_metrics=False)


def examples_per_second(model, batches, steps: int, batch_size: int) -> float:
    """Trains `steps` steps on in-memory batches (after one warm-up execution)."""
    data = tf.data.Dataset.from_tensor_slices(batches).repeat()
    model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # trace + warm up
    started = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch_size / (time.perf_counter() - started)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    workdir = Workdir(args.workdir)
    batch_size = config.training.per_replica_batch_size
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    dataset = model_input.make_dataset(config, workdir, "train", batch_size, training=True, tokenizer=tokenizer)

    # (4) the input pipeline alone
    iterator = iter(dataset)
    next(iterator)
    started = time.perf_counter()
    for _ in range(args.steps):
        next(iterator)
    input_rate = args.steps * batch_size / (time.perf_counter() - started)

    # Eight distinct in-memory batches for the model measurements; the input pipeline is then
    # released so its prefetching threads do not compete with the measured steps.
    cached = [next(iterator) for _ in range(8)]
    del iterator, dataset
    batches = {k: tf.stack([b[k] for b in cached]) for k in cached[0]}
    models = {}
    for name, multiplier in (("project step, graph off", 0.0),
                             ("project step, graph on", config.training.graph_multiplier or 0.1)):
        config.training.graph_multiplier = multiplier
        tf.keras.utils.set_random_seed(config.training.seed)
        models[name] = build_model(config, tokenizer.vocab_size)
    project = models["project step, graph off"]
    models["minimal TFRS model"] = MinimalTfrsModel(tf.keras.models.clone_model(project.query_tower),
                                                    tf.keras.models.clone_model(project.image_tower))
    for model in models.values():
        model.compile(make_optimizer(config.training), steps_per_execution=config.training.steps_per_execution)
    # Alternating rounds, best of each: the figures are less at the mercy of other load on the machine.
    rates = {name: 0.0 for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            rates[name] = max(rates[name], examples_per_second(model, batches, args.steps, batch_size))
    rates["input pipeline alone"] = input_rate

    base = rates["minimal TFRS model"]
    print(f"batch {batch_size}, {args.steps} steps, {tf.config.threading.get_inter_op_parallelism_threads() or 'auto'} "
          f"inter-op threads, {os.cpu_count()} CPUs")
    for name, rate in rates.items():
        print(f"{name:28s} {rate:10.1f} examples/s   ({rate / base:5.2f} x minimal TFRS)")


if __name__ == "__main__":
    main()
