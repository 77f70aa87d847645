"""Embedding tools over the exported encoders: the other uses of a joint query-image space.

    clicklens cluster-queries   k-means over the embeddings of the logged queries
                                -> W/tools/query_clusters.json and .txt (e.g. synonyms across languages)
    clicklens label-images      zero-shot labels: the logged queries each catalog image matches best
                                (scored against the average image, so hub queries do not label everything)
                                -> W/tools/image_labels.json
    clicklens plot-embeddings   2-D PCA of query and image embeddings, a few points labelled
                                -> W/tools/embeddings.png

All three read the newest versions of the exported query and image encoders
(serving/exported_encoders.py), the distinct normalized text queries of
W/raw/logs (serving/logged_queries.py) and the images of W/raw/catalog.jsonl.
`--output` moves the main output file; the text report of cluster-queries goes
next to it with a .txt suffix.  The numerics are in serving/embedding_math.py,
the drawing in serving/embedding_plot.py.
"""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import servables
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir, join
from serving.catalog_images import CatalogImages, ImageRequestError
from serving.embedding_math import default_num_clusters, kmeans, nearest, pca_2d, standardize, unit_rows
from serving.embedding_plot import draw_embeddings, thumbnail_picks
from serving.exported_encoders import catalog_images, load_encoder
from serving.logged_queries import logged_queries

logger = logging.getLogger(__name__)

KMEANS_SEED = 0
LABELS_PER_IMAGE = 5
REPORT_QUERIES_PER_CLUSTER = 12


# ---------------------------------------------------------------------------
# What the verbs compute.


def query_clusters(queries: Sequence[Tuple[str, int]], embeddings: np.ndarray, k: int,
                   seed: int = KMEANS_SEED) -> Dict:
    """Clusters of similar queries: each with its size, total count and queries nearest the center first."""
    x = unit_rows(embeddings)
    labels, centers, inertia = kmeans(x, k, seed=seed)
    clusters = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if not len(members):
            continue
        closeness = x[members] @ unit_rows(centers[c:c + 1])[0]
        ranked = members[np.argsort(-closeness)]
        clusters.append({
            "size": int(len(members)),
            "log_count": int(sum(queries[i][1] for i in members)),
            "queries": [{"query": queries[i][0], "count": int(queries[i][1]),
                         "similarity_to_center": round(float(x[i] @ unit_rows(centers[c:c + 1])[0]), 4)}
                        for i in ranked],
        })
    clusters.sort(key=lambda cl: -cl["log_count"])
    for number, cluster in enumerate(clusters):
        cluster["cluster"] = number
    return {"num_queries": len(queries), "num_clusters": len(clusters), "inertia": round(inertia, 4),
            "clusters": clusters}


def clusters_report(result: Dict, source: str, per_cluster: int = REPORT_QUERIES_PER_CLUSTER) -> str:
    """The readable text report of query_clusters()."""
    lines = [f"{result['num_queries']} distinct queries in {result['num_clusters']} clusters ({source})", ""]
    for cluster in result["clusters"]:
        lines.append(f"cluster {cluster['cluster']}: {cluster['size']} queries, {cluster['log_count']} searches")
        for q in cluster["queries"][:per_cluster]:
            lines.append(f"    {q['query']}  ({q['count']}×, {q['similarity_to_center']:.2f})")
        if cluster["size"] > per_cluster:
            lines.append(f"    … and {cluster['size'] - per_cluster} more")
        lines.append("")
    return "\n".join(lines)


def image_labels(image_ids: Sequence[str], image_embeddings: np.ndarray, queries: Sequence[Tuple[str, int]],
                 query_embeddings: np.ndarray, per_image: int = LABELS_PER_IMAGE) -> List[Dict]:
    """Each image's `per_image` best queries, by lift: score(image, q) - score(average image, q).

    Raw dot products would give every image the same few "hub" queries (those
    aligned with the average image: a two-tower model is trained to rank
    images for a query, not queries for an image); the lift ranks the queries
    this image matches better than the rest of the catalog does.  `score` is
    the raw retrieval score.
    """
    lifts = image_embeddings - image_embeddings.mean(0)
    top, lift = nearest(lifts, query_embeddings, per_image)
    scores = np.take_along_axis(image_embeddings @ query_embeddings.T, top, 1)
    return [{"image_id": image_id,
             "labels": [{"query": queries[j][0], "lift": round(float(lf), 4), "score": round(float(s), 4)}
                        for j, lf, s in zip(row, row_lifts, row_scores)]}
            for image_id, row, row_lifts, row_scores in zip(image_ids, top, lift, scores)]


# ---------------------------------------------------------------------------
# Inputs and outputs of the verbs.


def _output_path(workdir: Workdir, args, default_name: str) -> str:
    """--output, or W/tools/<default_name>; ClicklensError when it is a folder (checked before the work)."""
    path = getattr(args, "output", None) or join(workdir.root, "tools", default_name)
    if tf.io.gfile.isdir(path):
        raise ClicklensError(f"--output {path} is a directory: give a file name (default {default_name})")
    return path


def _write(path: str, data, mode: str = "w") -> None:
    """Writes `data` (str as UTF-8), creating its folder; ClicklensError when that fails."""
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    try:
        tf.io.gfile.makedirs(parent or "/")
        with tf.io.gfile.GFile(path, mode) as f:
            f.write(data)
    except (tf.errors.OpError, OSError) as err:
        raise ClicklensError(f"cannot write {path}: {getattr(err, 'message', err)}") from None


def _queries_and_images(config, workdir: Workdir):
    """Both encoders, the logged queries, and the embeddings of those queries and of the catalog images."""
    query_encoder = load_encoder(workdir, servables.QUERY_ENCODER)
    image_encoder = load_encoder(workdir, servables.IMAGE_ENCODER)
    queries = logged_queries(workdir)
    query_embeddings = query_encoder.embed([q.encode("utf-8") for q, _ in queries])
    image_ids, image_embeddings = catalog_images(workdir, image_encoder, config.pipeline.allow_outside_uris)
    return (query_encoder, image_encoder), queries, query_embeddings, image_ids, image_embeddings


def _read_images_for_thumbnails(workdir: Workdir, ids: Sequence[str], allow_outside_uris: bool) -> Dict[str, bytes]:
    """{image id: file bytes} of the catalog images among `ids` that can be served (others are left out)."""
    images = CatalogImages(workdir.catalog, allow_outside_uris)
    out = {}
    for image_id in ids:
        try:
            out[image_id] = images.read(image_id)[0]
        except ImageRequestError:
            pass
    return out


# ---------------------------------------------------------------------------
# The verbs (clicklens/cli.py names them "serving.tools:<function>").


def cluster_queries(config, workdir: Workdir, args) -> int:
    """`clicklens cluster-queries`: k-means over the logged queries' embeddings -> JSON + text report."""
    path = _output_path(workdir, args, "query_clusters.json")  # a bad --output fails before the work
    encoder = load_encoder(workdir, servables.QUERY_ENCODER)
    queries = logged_queries(workdir)
    embeddings = encoder.embed([q.encode("utf-8") for q, _ in queries])
    result = query_clusters(queries, embeddings, default_num_clusters(len(queries)))
    result["model"] = {"name": encoder.name, "version": encoder.version}
    _write(path, json.dumps(result, ensure_ascii=False, indent=1))
    report_path = re.sub(r"\.json$", "", path) + ".txt"
    _write(report_path, clusters_report(result, f"{encoder.name} v{encoder.version}"))
    logger.info("wrote %s and %s (%d clusters of %d queries)", path, report_path,
                result["num_clusters"], result["num_queries"])
    print(f"{result['num_clusters']} clusters of {result['num_queries']} queries: {path}\nreport: {report_path}")
    return 0


def label_images(config, workdir: Workdir, args) -> int:
    """`clicklens label-images`: each catalog image's nearest logged queries as zero-shot labels -> JSON."""
    path = _output_path(workdir, args, "image_labels.json")  # a bad --output fails before the work
    encoders, queries, query_embeddings, image_ids, image_embeddings = _queries_and_images(config, workdir)
    labels = image_labels(image_ids, image_embeddings, queries, query_embeddings)
    result = {"models": {e.name: e.version for e in encoders},
              "num_queries": len(queries), "num_images": len(labels), "images": labels}
    _write(path, json.dumps(result, ensure_ascii=False, indent=1))
    logger.info("wrote %s (%d images labelled from %d queries)", path, len(labels), len(queries))
    print(f"labels for {len(labels)} images: {path}")
    return 0


def plot_embeddings(config, workdir: Workdir, args) -> int:
    """`clicklens plot-embeddings`: a PCA plot of query and image embeddings -> PNG."""
    path = _output_path(workdir, args, "embeddings.png")  # a bad --output fails before the work
    _, queries, query_embeddings, image_ids, image_embeddings = _queries_and_images(config, workdir)
    query_embeddings, image_embeddings = unit_rows(query_embeddings), unit_rows(image_embeddings)
    # Two-tower spaces have a "modality gap" (all images sit on one side of all queries, often with a
    # different spread), which would make PC1 just "query or image"; standardizing each side keeps the
    # structure they share.
    points, explained = pca_2d(np.vstack([standardize(query_embeddings), standardize(image_embeddings)]))
    query_points, image_points = points[:len(queries)], points[len(queries):]
    thumbnails = _read_images_for_thumbnails(workdir, [image_ids[i] for i in thumbnail_picks(image_points)],
                                             config.pipeline.allow_outside_uris)
    canvas, labelled = draw_embeddings(query_points, queries, image_points, image_ids, thumbnails, explained)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    _write(path, buffer.getvalue(), "wb")
    logger.info("wrote %s (%d queries, %d images, labelled: %s)", path, len(queries), len(image_ids),
                ", ".join(labelled))
    print(f"plot of {len(queries)} queries and {len(image_ids)} images: {path}")
    return 0
