"""Ranking primitives shared by evaluation: exact top-k, ranking metrics, relevance from clicks."""

from __future__ import annotations

import collections
import math
from typing import Dict, Mapping, Sequence

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import features
from trainer import input as model_input

RECALL_AT = (1, 5, 10, 50)
NDCG_AT = 10
EXACT_BLOCK_SCORES = 2 ** 25  # the exact reference scores the corpus in blocks of <= 128 MB of scores


def click_relevance(config, workdir, split: str = "eval") -> Dict[str, Dict[str, float]]:
    """{query: {image id: summed click weight}} of one split's examples that carry a query."""
    relevance: Dict[str, Dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    spec = {key: value for key, value in features.spec_from_config(config).items()
            if key in (features.QUERY, features.IMAGE_ID, features.CLICK_WEIGHT)}
    for batch in model_input.raw_examples(config, workdir.split_glob(split), spec, batch_size=4096):
        for query, image_id, weight in zip(batch[features.QUERY].numpy(), batch[features.IMAGE_ID].numpy(),
                                           batch[features.CLICK_WEIGHT].numpy()):
            if query and weight > 0:
                relevance[query.decode("utf-8")][image_id.decode("utf-8")] += float(weight)
    return {q: dict(r) for q, r in relevance.items()}




def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """int64 [Q, k]: indices of the k largest dot products, best first, the lower index first among equal
    scores (corpus read in blocks; tf.math.top_k, several times faster than numpy's argpartition)."""
    k = min(k, len(embeddings))
    block_rows = max(1024, EXACT_BLOCK_SCORES // max(1, len(queries)))
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(embeddings), block_rows):
        scores = queries @ embeddings[start:start + block_rows].T
        top_scores, top = tf.math.top_k(scores, min(k, scores.shape[1]))
        best_scores = np.concatenate([best_scores, top_scores.numpy()], axis=1)
        best_ids = np.concatenate([best_ids, top.numpy().astype(np.int64) + start], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, keep, axis=1)
        best_ids = np.take_along_axis(best_ids, keep, axis=1)
    return best_ids


def exact_top_k_grown(embeddings: np.ndarray, queries: np.ndarray, k: int, previous_top: np.ndarray,
                      previous_rows: int) -> np.ndarray:
    """exact_top_k(embeddings, queries, k), given `previous_top`: exact_top_k over `embeddings[:previous_rows]`
    (rows that have not changed since).  Only the rows after them are scored; a new row ties after an old one."""
    k = min(k, len(embeddings))
    if len(embeddings) == previous_rows:
        return previous_top
    new_top = exact_top_k(embeddings[previous_rows:], queries, k) + previous_rows
    candidates = np.concatenate([previous_top, new_top], axis=1)
    scores = np.einsum("qd,qcd->qc", queries, embeddings[candidates])
    keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, keep, axis=1)


def ranking_metrics(rankings: Sequence[Sequence[str]], relevance: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    """recall@K, MRR and graded NDCG@10 averaged over queries (rankings[i] scored by relevance[i])."""
    sums = collections.Counter()
    for ranked, gains in zip(rankings, relevance):
        hits = [ranked_id in gains for ranked_id in ranked]
        for k in RECALL_AT:
            sums[f"recall@{k}"] += sum(hits[:k]) / len(gains)
        first = next((rank for rank, hit in enumerate(hits, start=1) if hit), None)
        sums["mrr"] += 1.0 / first if first else 0.0
        dcg = sum(gains.get(i, 0.0) / math.log2(r + 2) for r, i in enumerate(ranked[:NDCG_AT]))
        ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(gains.values(), reverse=True)[:NDCG_AT]))
        sums[f"ndcg@{NDCG_AT}"] += dcg / ideal if ideal > 0 else 0.0
    n = max(len(rankings), 1)
    names = [f"recall@{k}" for k in RECALL_AT] + ["mrr", f"ndcg@{NDCG_AT}"]
    return {name: sums[name] / n for name in names}
