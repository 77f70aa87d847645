"""A corpus split over shards returns the same top-k as one index over all of it, merged by score.

    .venv/bin/python benchmarks/sharded_retrieval.py [--n 200000] [--dim 64] [--shards 2]

What a deployment too big for one server does (docs/SCALING.md): each server
holds the retrieval SavedModels of one shard of the images, the caller sends
the query to every shard with the same k and keeps the k best by score
(`merge_top_k`).  Here on one machine: the synthetic corpus of
benchmarks/retrieval.py is split by a stable hash of the image id, each shard
and the whole corpus are exported as `clicklens export` builds them
(BruteForceIndex; ScannIndex with auto parameters tuned on held-out queries),
loaded back as the server loads them and queried.

- Brute force: exact, so the merged top-k must be the single index's top-k
  (ids and scores; a tie at the k-th score may pick either image).
- ScaNN: each shard is its own approximate index, so the merged top-k and the
  single index's are two approximations of the exact top-k; both recalls are
  printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from clicklens import compat  # noqa: E402,F401
import tensorflow as tf  # noqa: E402

from clicklens import servables  # noqa: E402
from clicklens.config import config_from_dict  # noqa: E402
from serving import saved_models  # noqa: E402
from trainer import export, export_signatures as sigs, ranking, scann_index, scann_tuning  # noqa: E402
from trainer.corpus import Corpus  # noqa: E402

logger = logging.getLogger("benchmarks.sharded_retrieval")
K = 10
BATCH = 100


def synthetic(rng, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    """Unit vectors: cluster centre + same-norm noise (as benchmarks/retrieval.py)."""
    x = centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def shard_of(image_id: bytes, shards: int) -> int:
    """A stable shard number for an image id (the same on every machine and run)."""
    return zlib.crc32(image_id) % shards


def merge_top_k(results, k: int):
    """(ids [Q, k], scores [Q, k]): the k best by score of several shards' (ids, scores), best first."""
    ids = np.concatenate([r[0] for r in results], axis=1)
    scores = np.concatenate([r[1] for r in results], axis=1)
    scores = np.where(np.isnan(scores), -np.inf, scores)  # a short ScaNN result's padding never wins
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, best, axis=1), np.take_along_axis(scores, best, axis=1)


def export_and_load(top_k, dim: int, path: str, options=None):
    """Saves a Retrieval module over query embeddings, loads it as the server does: queries -> (ids, scores)."""
    module = sigs.Retrieval(None, top_k, K)
    spec = tf.TensorSpec([None, dim], tf.float32, name="embedding")
    tf.saved_model.save(module, path, options=options, signatures={
        servables.TEXT_SIGNATURE: tf.function(module.search_embeddings).get_concrete_function(spec)})
    function = saved_models.load(path).signatures[servables.TEXT_SIGNATURE]

    def search(queries):
        out = [function(embedding=tf.constant(queries[i:i + BATCH])) for i in range(0, len(queries), BATCH)]
        return (np.concatenate([o[servables.IMAGE_IDS].numpy() for o in out]),
                np.concatenate([o[servables.SCORES].numpy() for o in out]))
    return search


def scann_for(corpus: Corpus, held_out: np.ndarray, config, path: str, dim: int):
    """The ScaNN SavedModel export would write for `corpus` (auto parameters), loaded back."""
    index, report = export.scann_retrieval_index(config, corpus, held_out)
    logger.info("%s: %d images, %s", os.path.basename(path), len(corpus.ids),
                scann_index.ScannParams(**report["params"]).describe())
    return export_and_load(index, dim, path, export.SCANN_SAVE_OPTIONS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    config = config_from_dict({})
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(args.clusters, args.dim)) / np.sqrt(args.dim)
    embeddings = synthetic(rng, args.n, args.dim, centers)
    queries, held_out = synthetic(rng, args.queries, args.dim, centers), synthetic(rng, 500, args.dim, centers)
    ids = np.char.encode(np.arange(args.n).astype(str))
    whole = Corpus(ids, embeddings, None)
    shard = np.array([shard_of(i, args.shards) for i in ids])
    parts = [Corpus(ids[shard == s], embeddings[shard == s], None) for s in range(args.shards)]
    exact = ids[ranking.exact_top_k(embeddings, queries, K)]

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        one = export_and_load(sigs.BruteForceIndex(embeddings, ids, K), args.dim, f"{tmp}/brute_all")(queries)
        merged = merge_top_k([export_and_load(sigs.BruteForceIndex(p.embeddings, p.ids, K), args.dim,
                                              f"{tmp}/brute_{s}")(queries) for s, p in enumerate(parts)], K)
        brute_s = time.perf_counter() - start
        same_ids = np.mean([(a == b).all() for a, b in zip(merged[0], one[0])])
        same_set = np.mean([set(a) == set(b) for a, b in zip(merged[0], one[0])])
        max_score_diff = float(np.abs(merged[1] - one[1]).max())

        start = time.perf_counter()
        one_scann = scann_for(whole, held_out, config, f"{tmp}/scann_all", args.dim)(queries)
        merged_scann = merge_top_k([scann_for(p, held_out, config, f"{tmp}/scann_{s}", args.dim)(queries)
                                    for s, p in enumerate(parts)], K)
        scann_s = time.perf_counter() - start

    print(f"\n{args.n:,} x {args.dim} images ({args.clusters} clusters) in {args.shards} shards of "
          f"{', '.join(f'{len(p.ids):,}' for p in parts)} (crc32(image id) mod {args.shards}); "
          f"{args.queries} queries, top-{K}; each shard and the whole corpus exported and loaded as "
          f"SavedModels; merged by score")
    print(f"BruteForce: merged shards == one index: same ids in the same order for {same_ids:.1%} of queries, "
          f"same set for {same_set:.1%}; largest score difference {max_score_diff:.2g} "
          f"({brute_s:.0f} s)")
    print(f"ScaNN (auto): recall@{K} vs exact: one index {scann_tuning.recall_at_k(one_scann[0], exact):.4f}, "
          f"merged shards {scann_tuning.recall_at_k(merged_scann[0], exact):.4f}; the two top-{K}s share "
          f"{scann_tuning.recall_at_k(merged_scann[0], one_scann[0]):.1%} of their ids ({scann_s:.0f} s)")
    if same_set < 1.0:
        print("NOT the same: exact search over the shards, merged by score, must give one index's top-k")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
