"""Retrieval throughput and recall@10 on a synthetic 1,000,000 x 128 corpus, in one run.

    .venv/bin/python benchmarks/retrieval.py [--n 1000000] [--dim 128] [--queries 1000]

Compares, against exact top-10 (numpy): the ScaNN SavedModel and the
brute-force SavedModel that `clicklens export` writes (the same
tfrs.layers.factorized_top_k layers and config.export.scann parameters, here
indexed over the synthetic corpus and taking query embeddings), and raw
`scann` through its pybind API with the same parameters; each batched
(--batch queries per call) and single (one query per call).

The corpus imitates trained embeddings: 1,000 Gaussian clusters whose
within-cluster noise has the same norm as the cluster centres, L2-normalised.
`--clusters 0` gives isotropic Gaussian vectors (no structure: the worst case
for any partitioning index).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clicklens import compat  # noqa: E402,F401
import tensorflow as tf  # noqa: E402

from clicklens import servables  # noqa: E402
from clicklens.config import config_from_dict, load_config  # noqa: E402
from serving import saved_models  # noqa: E402
from trainer import export, export_signatures as sigs  # noqa: E402

logger = logging.getLogger("benchmarks.retrieval")


def synthetic(rng, n: int, dim: int, centers) -> np.ndarray:
    """Unit vectors: cluster centre + same-norm noise, or plain Gaussian when centers is None."""
    if centers is None:
        x = rng.normal(size=(n, dim))
    else:
        x = centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top_k(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for i in range(0, len(queries), 50):
        scores = queries[i:i + 50] @ corpus.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(found, exact)]))


def timed(search, queries: np.ndarray, batch: int):
    """(queries/s, indices) for search(batch of queries) -> indices [b, k]."""
    found = []
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        found.append(search(queries[i:i + batch]))
    return len(queries) / (time.perf_counter() - start), np.concatenate(found)


def saved_model_searcher(layer, dim: int, k: int, path: str, options):
    """Saves a Retrieval module over query embeddings, reloads it, returns a search function."""
    module = sigs.Retrieval(None, layer, k)
    spec = tf.TensorSpec([None, dim], tf.float32, name="embedding")
    signature = tf.function(module.search_embeddings).get_concrete_function(spec)
    tf.saved_model.save(module, path, signatures={servables.TEXT_SIGNATURE: signature}, options=options)
    function = saved_models.load(path).signatures[servables.TEXT_SIGNATURE]
    return lambda q: function(embedding=tf.constant(q))[servables.IMAGE_IDS].numpy().astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--config", default="", help="take export.scann from this config (default: the defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    k = 10
    config = load_config(args.config, args.overrides) if args.config else config_from_dict({}, "defaults", args.overrides)
    params = config.export.scann
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(args.clusters, args.dim)) / np.sqrt(args.dim) if args.clusters else None
    corpus = synthetic(rng, args.n, args.dim, centers)
    queries = synthetic(rng, args.queries, args.dim, centers)
    ids = np.array([str(i).encode() for i in range(args.n)])
    logger.info("exact top-%d for %d queries over %d x %d", k, args.queries, args.n, args.dim)
    exact = exact_top_k(corpus, queries, k)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def add(name, search, build_seconds):
            for mode, batch, q in [("batched", args.batch, queries), ("single", 1, queries[:args.single])]:
                qps, found = timed(search, q, batch)
                rows.append((name, mode, qps, recall(found, exact[:len(q)]), build_seconds))
                logger.info("%s %s: %.0f queries/s, recall@%d %.4f", name, mode, qps, k, rows[-1][3])

        start = time.perf_counter()
        scann_layer = export.scann_layer(corpus, ids, k, params)
        build = time.perf_counter() - start
        add("ScaNN SavedModel", saved_model_searcher(scann_layer, args.dim, k, f"{tmp}/scann",
                                                     export.SCANN_SAVE_OPTIONS), build)
        del scann_layer
        brute_layer = export.bruteforce_layer(corpus, ids, k)
        add("BruteForce SavedModel", saved_model_searcher(brute_layer, args.dim, k, f"{tmp}/brute", None), 0.0)
        del brute_layer

        import scann

        start = time.perf_counter()
        builder = scann.scann_ops_pybind.builder(corpus, k, "dot_product").tree(
            num_leaves=min(params.num_leaves, args.n), num_leaves_to_search=params.num_leaves_to_search,
            training_iterations=12).score_ah(params.dimensions_per_block)
        if params.num_reordering_candidates:
            builder = builder.reorder(params.num_reordering_candidates)
        searcher = builder.build()
        build = time.perf_counter() - start
        add("scann pybind", lambda q: searcher.search_batched_parallel(q)[0] if len(q) > 1
            else searcher.search(q[0])[0][None], build)

    print(f"\nRetrieval, {args.n:,} x {args.dim} candidates "
          f"({'%d clusters' % args.clusters if args.clusters else 'isotropic Gaussian'}), top-{k}, "
          f"ScaNN num_leaves={params.num_leaves} num_leaves_to_search={params.num_leaves_to_search} "
          f"reorder={params.num_reordering_candidates} dims_per_block={params.dimensions_per_block}; "
          f"{os.cpu_count()} CPUs")
    print(f"{'method':<24}{'mode':<10}{'queries/s':>12}{f'recall@{k}':>12}{'build s':>10}")
    for name, mode, qps, r, build in rows:
        print(f"{name:<24}{mode:<10}{qps:>12.1f}{r:>12.4f}{build:>10.1f}")


if __name__ == "__main__":
    main()
