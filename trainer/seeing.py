"""How well an image tower sees: image -> image recall@10 against the demo world's similar_images.jsonl.

W/raw/similar_images.jsonl lists, per catalog image, the images that look
like it (demo world: same shape and colour).  Each corpus image is a query;
every other corpus image is a candidate, ranked by cosine similarity in one
space; the ranking's recall@10 and NDCG@10 (trainer.ranking.ranking_metrics:
the share of the image's similar images found in the top 10, so at most
10 / |similar|) are averaged over query images, for all of them and for the
never-logged ("cold") ones.  The spaces compared: the prepared pixels
flattened (`raw_pixels`), a freshly initialised tower (`random`), the
pretrained tower (`pretrained`) and the click-trained tower of W/model
(`click_trained`) when there is one.
"""

from __future__ import annotations

import json
import logging
from typing import Dict, Mapping, Optional, Set

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from trainer.cold_start import pixel_vectors, read_logged_images
from trainer.corpus import embed_corpus
from trainer.ranking import exact_top_k, ranking_metrics

logger = logging.getLogger(__name__)

K = 10
SPACES = ("raw_pixels", "random", "pretrained", "click_trained")
NAMES = {"raw_pixels": "raw pixels", "random": "random tower", "pretrained": "pretrained tower",
         "click_trained": "click-trained tower"}


def read_similar_images(path: str) -> Dict[str, Set[str]]:
    """{image id: ids of the images that look like it} ({} when the file does not exist)."""
    if not tf.io.gfile.exists(path):
        return {}
    out = {}
    with tf.io.gfile.GFile(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[row["image_id"]] = set(row["similar_image_ids"])
    return out


def image_to_image(vectors: np.ndarray, ids, truth: Mapping[str, Set[str]], query_rows: np.ndarray) -> Dict[str, float]:
    """recall@10 / NDCG@10 of ranking all rows by cosine to each query row (itself left out)."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    top = exact_top_k(unit, unit[query_rows], K + 1)
    rankings = [[ids[c] for c in row if c != q][:K] for q, row in zip(query_rows, top)]
    metrics = ranking_metrics(rankings, [{i: 1.0 for i in truth[ids[q]]} for q in query_rows])
    return {"recall@10": metrics["recall@10"], "ndcg@10": metrics["ndcg@10"]}


def evaluate(config, workdir, towers: Mapping[str, Optional[tf.keras.Model]]) -> Dict[str, object]:
    """The seeing report: metrics per space (raw_pixels plus each of `towers`) and query set (all, cold)."""
    truth = read_similar_images(workdir.similar_images)
    if not truth:
        return {"skipped": f"no {workdir.similar_images} (a generated demo world has one)"}
    embedded = {name: embed_corpus(config, workdir, tower, log=False) for name, tower in towers.items() if tower}
    first = next(iter(embedded.values()))
    ids = [i.decode("utf-8") for i in first.ids]
    in_corpus = set(ids)
    truth = {i: similar & in_corpus for i, similar in truth.items() if i in in_corpus}
    rows = np.array([r for r, i in enumerate(ids) if truth.get(i)])
    subsets = {"all": rows}
    logged = read_logged_images(workdir)
    if logged is not None:
        subsets["cold"] = np.array([r for r in rows if ids[r] not in logged], dtype=np.int64)
    spaces = {"raw_pixels": pixel_vectors(config, workdir, ids)}
    spaces.update({name: corpus.embeddings for name, corpus in embedded.items()})
    report: Dict[str, object] = {"k": K, "truth": "similar_images.jsonl",
                                 "num_queries": {name: int(len(r)) for name, r in subsets.items()},
                                 "mean_similar_per_image": float(np.mean([len(truth[ids[r]]) for r in rows]))}
    for name, vectors in spaces.items():
        if vectors is None:
            continue
        report[name] = {subset: image_to_image(vectors, ids, truth, r) for subset, r in subsets.items() if len(r)}
    for name in ("pretrained", "click_trained", "random"):
        if name in report and "raw_pixels" in report:
            report[f"{name}_vs_raw_pixels"] = (report[name]["all"]["recall@10"] /
                                               max(report["raw_pixels"]["all"]["recall@10"], 1e-12))
    return report


def format_table(report: Mapping[str, object]) -> str:
    """The seeing report as a text table: recall@10 / NDCG@10 per space, all and cold query images."""
    if "skipped" in report:
        return f"seeing: skipped ({report['skipped']})"
    subsets = list(report["num_queries"])
    header = ["space", *(f"{s} ({report['num_queries'][s]} query images)" for s in subsets), "recall@10 / pixels"]
    lines = []
    for name in SPACES:
        if name not in report:
            continue
        cells = [f"{report[name][s]['recall@10']:.3f} / {report[name][s]['ndcg@10']:.3f}" if s in report[name]
                 else "n/a" for s in subsets]
        ratio = report.get(f"{name}_vs_raw_pixels")
        lines.append([NAMES[name], *cells, "" if ratio is None else f"{ratio:.2f}x"])
    widths = [max(len(row[c]) for row in [header, *lines]) for c in range(len(header))]
    text = [f"seeing: image -> image recall@10 / NDCG@10 against similar_images.jsonl (about "
            f"{report['mean_similar_per_image']:.0f} similar images each, so recall@10 <= "
            f"{min(1.0, K / report['mean_similar_per_image']):.2f} on average); 'cold' = never-logged query images",
            "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    text += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in lines]
    return "\n".join(text)
