"""Evaluation that separates new images from old: the `cold_start` section of metrics.json.

An image search engine gets new images every day; what clicks teach must
reach images nobody has clicked yet.  This scores the trained model on three
candidate sets, each ranked on its own (the top 10 among those images only):

- `all`: every corpus image;
- `logged`: images some valid log record showed (W/examples/logged_images-*);
- `cold`: catalog images no log record showed (new uploads).

for two query groups: `train_queries` (queries the model was trained on: a
seen query meeting new images) and `eval_queries` (held-out queries).
Relevance is W/raw/ground_truth.jsonl (clicks cannot judge an image nobody
was shown).  Two baselines from the same logs, in the same run:

- `random`: a seeded random ranking of the candidate set;
- `pixel_knn`: rank by pixel-space cosine to the images clicked for that
  query in the training split, click-weighted (the pipeline's prepared
  pixels, or the feature vectors for `image_source: features`).  Eval-split
  queries have no training clicks, so the baseline is undefined for them.

Each trained figure is also given as a ratio to each baseline:
`<metric>_vs_<baseline>` (`recall@10_vs_pixel_knn`, `ndcg@10_vs_random`, ...), None
where the baseline is undefined or scored 0.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import features
from clicklens.ground_truth import read_ground_truth
from trainer import input as model_input
from trainer.corpus import Corpus, embed_queries
from trainer.ranking import click_relevance, exact_top_k, ranking_metrics

logger = logging.getLogger(__name__)

SUBSETS = ("all", "logged", "cold")
GROUPS = ("train_queries", "eval_queries")
MODELS = ("trained", "pixel_knn", "random")
BASELINES = ("pixel_knn", "random")
K = 10
REPORTED = ("recall@10", "ndcg@10")
# Pixel vectors for the baseline are held in memory; above this many floats the baseline is skipped.
MAX_PIXEL_FLOATS = 400_000_000
RANDOM_SEED = 20261123


def read_logged_images(workdir) -> Optional[set]:
    """Every image id the pipeline saw in a valid log record, or None when the pipeline wrote no list."""
    files = tf.io.gfile.glob(workdir.logged_images_glob)
    if not files:
        return None
    logged = set()
    for path in files:
        with tf.io.gfile.GFile(path, "r") as f:
            logged.update(line.strip() for line in f if line.strip())
    return logged


def pixel_vectors(config, workdir, ids: Sequence[str]) -> Optional[np.ndarray]:
    """float32 [N, D] unit vectors of the corpus images as prepared (pixels flattened, or features), in `ids` order.

    None when they would not fit the memory budget (MAX_PIXEL_FLOATS).
    """
    p = config.pipeline
    per_image = p.feature_dim if p.image_source == "features" else p.image_size * p.image_size * 3
    if per_image * len(ids) > MAX_PIXEL_FLOATS:
        logger.warning("pixel-kNN baseline skipped: %d images x %d values exceed the memory budget", len(ids), per_image)
        return None
    image = features.image_key(p.image_source)
    spec = features.corpus_feature_spec(p.image_source, p.feature_dim)
    rows: Dict[str, np.ndarray] = {}
    for batch in model_input.raw_examples(config, workdir.split_glob("corpus"), spec).map(
            lambda b: (b[features.IMAGE_ID], tf.reshape(model_input.image_batch(config, b[image]),
                                                        [tf.shape(b[image])[0], -1]))):
        for image_id, vector in zip(batch[0].numpy(), batch[1].numpy()):
            rows.setdefault(image_id.decode("utf-8"), vector)
    vectors = np.stack([rows[i] for i in ids]).astype(np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def click_profiles(queries: Sequence[str], clicks: Mapping[str, Mapping[str, float]], row_of: Mapping[str, int],
                   vectors: np.ndarray) -> np.ndarray:
    """[Q, D]: per query, the click-weighted sum of its clicked images' unit vectors.

    Dot product with a unit image vector = the click-weighted sum of cosines to
    the clicked images, the pixel-kNN-over-clicks score (the scale of the sum
    does not change the ranking).
    """
    profiles = np.zeros((len(queries), vectors.shape[1]), np.float32)
    for q, query in enumerate(queries):
        for image_id, weight in clicks.get(query, {}).items():
            if image_id in row_of:
                profiles[q] += weight * vectors[row_of[image_id]]
    return profiles


def _metrics(rankings: Sequence[Sequence[str]], relevance: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    metrics = ranking_metrics(rankings, relevance)
    return {name: metrics[name] for name in REPORTED}


def _ratio(value: float, base: Optional[float]) -> Optional[float]:
    return value / base if base else None


def rank_subset(candidates: np.ndarray, query_vectors: np.ndarray, rows: np.ndarray, ids: Sequence[str],
                k: int = K) -> List[List[str]]:
    """Per query vector, the ids of the top `k` among the candidate rows `rows` only (exact dot product, best first)."""
    top = exact_top_k(candidates[rows], query_vectors, k)
    return [[ids[rows[c]] for c in row] for row in top]


def ratios(cell: Mapping[str, object]) -> Dict[str, Optional[float]]:
    """`<metric>_vs_<baseline>`: each REPORTED trained figure over the same figure of each baseline."""
    return {f"{metric}_vs_{base}": _ratio(cell["trained"][metric], cell[base][metric] if cell[base] else None)
            for metric in REPORTED for base in BASELINES}


def evaluate(config, workdir, model, corpus: Corpus, tokenizer, eval_clicks: Mapping[str, Mapping[str, float]]):
    """The `cold_start` section: metrics per query group x candidate set x model (see the module docstring)."""
    logged = read_logged_images(workdir)
    if logged is None:
        return {"skipped": f"no {workdir.logged_images_glob} (re-run `clicklens pipeline`)"}
    ids = [i.decode("utf-8") for i in corpus.ids]
    in_logs = np.array([i in logged for i in ids])
    members = {"all": np.arange(len(ids)), "logged": np.flatnonzero(in_logs), "cold": np.flatnonzero(~in_logs)}
    train_clicks = click_relevance(config, workdir, "train")
    pixels = pixel_vectors(config, workdir, ids)
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    rng = np.random.default_rng(RANDOM_SEED)

    section: Dict[str, object] = {
        "relevance": "ground_truth", "k": K,
        "num_images": {name: int(len(rows)) for name, rows in members.items()},
    }
    for group, clicks in (("train_queries", train_clicks), ("eval_queries", eval_clicks)):
        truth = read_ground_truth(workdir.ground_truth, sorted(clicks))
        queries = sorted(truth)
        query_vectors = embed_queries(tokenizer, model.query_tower, queries) if queries else None
        profiles = (click_profiles(queries, train_clicks, row_of, pixels)
                    if pixels is not None and group == "train_queries" and queries else None)
        out: Dict[str, object] = {"num_queries": len(queries)}
        for subset, rows in members.items():
            subset_ids = set(ids[r] for r in rows)
            relevant = [(q, {i: 1.0 for i in truth[queries[q]] if i in subset_ids}) for q in range(len(queries))]
            relevant = [(q, r) for q, r in relevant if r]
            if not relevant or not len(rows):
                out[subset] = {"num_queries": 0}
                continue
            picked = np.array([q for q, _ in relevant])
            gains = [r for _, r in relevant]

            cell: Dict[str, object] = {"num_queries": len(picked)}
            cell["trained"] = _metrics(rank_subset(corpus.embeddings, query_vectors[picked], rows, ids), gains)
            cell["pixel_knn"] = (_metrics(rank_subset(pixels, profiles[picked], rows, ids), gains)
                                 if profiles is not None else None)
            cell["random"] = _metrics([[ids[rows[c]] for c in rng.permutation(len(rows))[:K]] for _ in picked], gains)
            cell.update(ratios(cell))
            out[subset] = cell
        section[group] = out
    return section


def _cell(cell, model: str) -> str:
    values = cell.get(model) if cell.get("num_queries") else None
    return f"{values['recall@10']:.3f} / {values['ndcg@10']:.3f}" if values else "n/a"


def _ratio_cell(cell, base: str) -> str:
    values = [cell.get(f"{metric}_vs_{base}") for metric in REPORTED]
    if all(r is None for r in values):
        return "n/a"
    return " / ".join("n/a" if r is None else f"{r:.2f}x" for r in values)


def format_table(section: Mapping[str, object]) -> str:
    """The cold-start section as a text table: recall@10 / NDCG@10 per query group, model and candidate set,
    and the trained model's recall@10 / NDCG@10 as ratios to each baseline."""
    if "skipped" in section:
        return f"cold start: skipped ({section['skipped']})"
    sizes = section["num_images"]
    header = ["", *(f"{s} ({sizes[s]} images)" for s in SUBSETS)]
    lines: List[List[str]] = []
    names = {"trained": "trained", "pixel_knn": "pixel-kNN over clicks", "random": "random"}
    for group in GROUPS:
        cells = section[group]
        lines.append([f"{group.replace('_', ' ')} ({cells['num_queries']})", "", "", ""])
        for model in MODELS:
            lines.append([f"  {names[model]}", *(_cell(cells[s], model) for s in SUBSETS)])
        for base in BASELINES:
            lines.append([f"  trained / {names[base]}", *(_ratio_cell(cells[s], base) for s in SUBSETS)])
    widths = [max(len(row[c]) for row in [header, *lines]) for c in range(4)]
    text = ["cold start: recall@10 / NDCG@10 against W/raw/ground_truth.jsonl; each candidate set ranked on its own "
            "('cold' = never in the logs)",
            "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    text += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in lines]
    return "\n".join(text)
