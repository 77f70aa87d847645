"""Embedding tools over the exported encoders: the other uses of a joint query-image space.

    clicklens cluster-queries   k-means over the embeddings of the logged queries
                                -> W/tools/query_clusters.json and .txt (e.g. synonyms across languages)
    clicklens label-images      zero-shot labels: the logged queries each catalog image matches best
                                (scored against the average image, so hub queries do not label everything)
                                -> W/tools/image_labels.json
    clicklens plot-embeddings   2-D PCA of query and image embeddings, a few points labelled
                                -> W/tools/embeddings.png

All three read the newest version of W/export/query_encoder and
W/export/image_encoder (their `serving_default` signature, output
`embedding`), the distinct normalized text queries of W/raw/logs, and the
images of W/raw/catalog.jsonl.  `--output` moves the main output file; the
text report of cluster-queries goes next to it with a .txt suffix.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import logging
import math
import re
import subprocess
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from trainer import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from beam_pipelines.catalog_schema import read_catalog, resolve_uri
from beam_pipelines.log_schema import BadRecord, parse_log_line
from serving import saved_models
from trainer.errors import ClicklensError
from trainer.workdir import Workdir, join

logger = logging.getLogger(__name__)

QUERY_ENCODER = "query_encoder"
IMAGE_ENCODER = "image_encoder"
EMBED_SIGNATURE = "serving_default"
EMBEDDING = "embedding"
EMBED_BATCH = 256
MAX_QUERIES = 5000  # most frequent distinct queries kept from the logs
KMEANS_RESTARTS = 4
KMEANS_MAX_ITERATIONS = 100
LABELS_PER_IMAGE = 5
PLOT_SIZE = (1200, 900)
PLOT_LABELLED_QUERIES = 14
PLOT_LABELLED_IMAGES = 8
CJK = re.compile(r"[\u3000-\u9fff\uac00-\ud7af\uf900-\ufaff]")
CJK_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
)


# ---------------------------------------------------------------------------
# Inputs: encoders, logged queries, catalog images.


class Encoder(NamedTuple):
    """One exported encoder: name, version, its embed signature and that signature's input name."""

    name: str
    version: int
    function: object
    input_name: str
    model: object  # the loaded SavedModel, kept alive: its signatures only hold weak references to it

    def embed(self, values: Sequence) -> np.ndarray:
        """float32 [len(values), dim] embeddings, EMBED_BATCH inputs per call."""
        out = []
        for start in range(0, len(values), EMBED_BATCH):
            batch = tf.constant(values[start:start + EMBED_BATCH])
            out.append(self.function(**{self.input_name: batch})[EMBEDDING].numpy())
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(out).astype(np.float32)


def latest_version(base_path: str) -> int:
    """The highest integer version directory under base_path that holds a SavedModel."""
    versions = []
    if tf.io.gfile.isdir(base_path):
        for entry in tf.io.gfile.listdir(base_path):
            entry = entry.rstrip("/")
            if entry.isdigit() and tf.io.gfile.exists(join(base_path, entry, "saved_model.pb")):
                versions.append(int(entry))
    if not versions:
        raise ClicklensError(f"no exported version under {base_path} (run `clicklens export` first)")
    return max(versions)


def load_encoder(workdir: Workdir, name: str) -> Encoder:
    """The newest exported version of the encoder `name` (query_encoder or image_encoder)."""
    base = workdir.export_model(name)
    version = latest_version(base)
    model = saved_models.load(join(base, str(version)))
    if EMBED_SIGNATURE not in model.signatures:
        raise ClicklensError(f"{base}/{version} has no {EMBED_SIGNATURE!r} signature")
    function = model.signatures[EMBED_SIGNATURE]
    _, kwargs = function.structured_input_signature
    (input_name,) = kwargs
    logger.info("loaded %s version %d (input %s)", name, version, input_name)
    return Encoder(name, version, function, input_name, model)


def logged_queries(workdir: Workdir, limit: int = MAX_QUERIES) -> List[Tuple[str, int]]:
    """The `limit` most frequent distinct normalized text queries of W/raw/logs, with their counts."""
    files = sorted(tf.io.gfile.glob(workdir.logs_glob))
    if not files:
        raise ClicklensError(f"no query logs match {workdir.logs_glob}")
    counts: collections.Counter = collections.Counter()
    bad = 0
    for path in files:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        for line in io.BytesIO(data):
            if not line.strip():
                continue
            try:
                record = parse_log_line(line.rstrip(b"\r\n"))
            except BadRecord:
                bad += 1
                continue
            if record.query:
                counts[record.query] += 1
    if not counts:
        raise ClicklensError(f"no text queries in {workdir.logs_glob}")
    logger.info("%d distinct text queries in %d log files (%d bad lines skipped)", len(counts), len(files), bad)
    return sorted(counts.items(), key=lambda qc: (-qc[1], qc[0]))[:limit]


def catalog_images(workdir: Workdir, encoder: Encoder) -> Tuple[List[str], np.ndarray]:
    """(image ids, embeddings) of the catalog images the image encoder can read; unreadable ones are skipped."""
    ids, inputs = [], []
    for entry in read_catalog(workdir.catalog):
        if encoder.input_name == "image_bytes":
            path = resolve_uri(entry.uri, workdir.catalog) if entry.uri else ""
            if not path or not tf.io.gfile.exists(path):
                continue
            with tf.io.gfile.GFile(path, "rb") as image:
                inputs.append(image.read())
        elif entry.features is not None:
            inputs.append(np.asarray(entry.features, np.float32))
        else:
            continue
        ids.append(entry.image_id)
    if not ids:
        raise ClicklensError(f"no readable images in {workdir.catalog}")
    return _embed_skipping_bad(encoder, ids, inputs)


def _embed_skipping_bad(encoder: Encoder, ids: List[str], inputs: List) -> Tuple[List[str], np.ndarray]:
    """Embeds in batches; a batch that fails (e.g. a corrupt file) is redone one image at a time."""
    kept_ids, out = [], []
    skipped = []
    for start in range(0, len(ids), EMBED_BATCH):
        batch_ids, batch = ids[start:start + EMBED_BATCH], inputs[start:start + EMBED_BATCH]
        try:
            out.append(encoder.embed(batch))
            kept_ids += batch_ids
            continue
        except tf.errors.InvalidArgumentError:
            pass
        for image_id, value in zip(batch_ids, batch):
            try:
                out.append(encoder.embed([value]))
                kept_ids.append(image_id)
            except tf.errors.InvalidArgumentError:
                skipped.append(image_id)
    if skipped:
        logger.warning("%d catalog images could not be decoded and are left out: %s",
                       len(skipped), ", ".join(skipped[:10]))
    return kept_ids, np.concatenate(out)


# ---------------------------------------------------------------------------
# The numerics (numpy): k-means, nearest queries, PCA.


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def squared_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """[n, k] squared Euclidean distances, without an [n, k, d] temporary."""
    d2 = (x ** 2).sum(1)[:, None] - 2.0 * x @ centers.T + (centers ** 2).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = KMEANS_RESTARTS,
           max_iterations: int = KMEANS_MAX_ITERATIONS) -> Tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding; the best of `restarts`.  Returns (labels, centers, inertia)."""
    n = len(x)
    if not 1 <= k <= n:
        raise ClicklensError(f"k-means: k={k} must be between 1 and the number of points ({n})")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        centers = x[[rng.integers(n)]]
        for _ in range(1, k):  # k-means++: next center with probability ~ squared distance
            d2 = squared_distances(x, centers).min(1)
            total = d2.sum()
            centers = np.vstack([centers, x[rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)]])
        labels = np.full(n, -1)
        for _ in range(max_iterations):
            d2 = squared_distances(x, centers)
            new_labels = d2.argmin(1)
            if np.array_equal(new_labels, labels):
                break
            labels = new_labels
            for c in range(k):
                members = x[labels == c]
                # An emptied cluster takes the point farthest from its center.
                centers[c] = members.mean(0) if len(members) else x[d2.min(1).argmax()]
        inertia = float(((x - centers[labels]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (labels, centers.copy(), inertia)
    return best


def default_num_clusters(num_queries: int) -> int:
    """sqrt(n/2), the usual rule of thumb, within [2, 100] and at most n."""
    return max(1, min(num_queries, max(2, min(100, round(math.sqrt(num_queries / 2))))))


def nearest(queries: np.ndarray, candidates: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the k highest dot products of each query row with the candidate rows."""
    scores = queries @ candidates.T
    k = min(k, candidates.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, 1).argsort(1)[:, ::-1]
    top = np.take_along_axis(top, order, 1)
    return top, np.take_along_axis(scores, top, 1)


def standardize(x: np.ndarray) -> np.ndarray:
    """x centred on its mean and scaled to a mean squared row norm of 1."""
    centered = x - x.mean(0)
    return centered / max(float(np.sqrt((centered ** 2).sum(1).mean())), 1e-12)


def pca_2d(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(points [n, 2], explained variance ratio [2]): x projected on its first two principal axes."""
    centered = x - x.mean(0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    variance = s ** 2
    ratio = variance[:2] / max(variance.sum(), 1e-12)
    points = centered @ vt[:2].T
    if points.shape[1] < 2:
        points = np.pad(points, [(0, 0), (0, 2 - points.shape[1])])
        ratio = np.pad(ratio, (0, 2 - len(ratio)))
    return points, ratio


# ---------------------------------------------------------------------------
# Outputs.


def _output(workdir: Workdir, args, default_name: str) -> str:
    path = getattr(args, "output", None) or join(workdir.root, "tools", default_name)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    tf.io.gfile.makedirs(parent)
    return path


def _write_text(path: str, text: str) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def _arg(args, name: str, default):
    value = getattr(args, name, None)
    return default if value is None else value


def query_clusters(queries: List[Tuple[str, int]], embeddings: np.ndarray, k: int, seed: int = 0) -> Dict:
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


def clusters_report(result: Dict, source: str, per_cluster: int = 12) -> str:
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


def image_labels(image_ids: List[str], image_embeddings: np.ndarray, queries: List[Tuple[str, int]],
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
# The plot (Pillow; matplotlib is not part of the stack).


def cjk_font_path() -> Optional[str]:
    """A font file that has Chinese glyphs, or None (install fonts-wqy-zenhei or fonts-noto-cjk)."""
    for path in CJK_FONT_CANDIDATES:
        if tf.io.gfile.exists(path):
            return path
    try:
        found = subprocess.run(["fc-match", "-f", "%{file}", ":lang=zh"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if found and found.lower().endswith((".ttf", ".ttc", ".otf")):
        try:
            from PIL import ImageFont

            font = ImageFont.truetype(found, 14)
            if font.getmask("中").getbbox():  # fc-match falls back to any font when none covers zh
                return found
        except OSError:
            pass
    return None


def _font(size: int, path: Optional[str]):
    from PIL import ImageFont

    if path:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def spread_picks(points: np.ndarray, count: int, weights: Optional[np.ndarray] = None) -> List[int]:
    """Indices of `count` points far apart (greedy farthest-point), starting from the heaviest."""
    if not len(points) or count <= 0:
        return []
    first = int(np.argmax(weights)) if weights is not None else 0
    picks = [first]
    d = np.linalg.norm(points - points[first], axis=1)
    while len(picks) < min(count, len(points)):
        nxt = int(np.argmax(d))
        if d[nxt] <= 0:
            break
        picks.append(nxt)
        d = np.minimum(d, np.linalg.norm(points - points[nxt], axis=1))
    return picks


def _label(draw, xy, text: str, color: str, font, width: int) -> None:
    """Text at xy on a white box, moved left when it would run off the right edge."""
    x, y = xy
    box = draw.textbbox((x, y), text, font=font)
    if box[2] > width - 4:
        x -= box[2] - (width - 4)
        box = draw.textbbox((x, y), text, font=font)
    draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill="white")
    draw.text((x, y), text, fill=color, font=font)


def draw_embeddings(query_points: np.ndarray, queries: List[Tuple[str, int]], image_points: np.ndarray,
                    image_ids: List[str], image_files: Dict[str, bytes], explained: np.ndarray,
                    size: Tuple[int, int] = PLOT_SIZE):
    """The PCA scatter as a Pillow image: queries blue, images orange, a few of each labelled."""
    from PIL import Image, ImageDraw

    font_path = cjk_font_path()
    width, height = size
    margin, top = 60, 70
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    title_font, label_font = _font(20, font_path), _font(14, font_path)
    everything = np.vstack([query_points, image_points])
    low, high = everything.min(0), everything.max(0)
    span = np.maximum(high - low, 1e-9)

    def to_pixel(p):
        x = margin + (p[0] - low[0]) / span[0] * (width - 2 * margin)
        y = height - margin - (p[1] - low[1]) / span[1] * (height - top - margin)
        return int(x), int(y)

    draw.rectangle([margin - 10, top - 10, width - margin + 10, height - margin + 10], outline="#cccccc")
    draw.text((margin, 15), f"clicklens: {len(queries)} queries (blue) and {len(image_ids)} images (orange), "
              f"PCA of the joint embedding space", fill="black", font=title_font)
    note = (f"queries and images each centred and scaled on their own; "
            f"PC1 {explained[0]:.0%} / PC2 {explained[1]:.0%} of the variance")
    if font_path is None:
        note += "; no CJK font installed, so only Latin queries are labelled (apt-get install fonts-wqy-zenhei)"
    draw.text((margin, 42), note, fill="#555555", font=label_font)
    for p in image_points:
        x, y = to_pixel(p)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="#f28e2b")
    for p in query_points:
        x, y = to_pixel(p)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="#4e79a7")

    labelled = []
    for i in spread_picks(image_points, PLOT_LABELLED_IMAGES):
        x, y = to_pixel(image_points[i])
        data = image_files.get(image_ids[i])
        if data:
            try:
                thumb = Image.open(io.BytesIO(data)).convert("RGB").resize((40, 40), Image.NEAREST)
                canvas.paste(thumb, (x + 6, y - 20))
                draw.rectangle([x + 5, y - 21, x + 46, y + 20], outline="#f28e2b")
            except OSError:
                pass
        _label(draw, (x + 6, y + 22), image_ids[i], "#b85c00", label_font, width)
        labelled.append(image_ids[i])
    latin = np.array([font_path is not None or not CJK.search(q) for q, _ in queries])
    candidates = np.flatnonzero(latin)
    counts = np.array([c for _, c in queries], float)
    for j in spread_picks(query_points[candidates], PLOT_LABELLED_QUERIES, counts[candidates]):
        i = int(candidates[j])
        x, y = to_pixel(query_points[i])
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline="#1f3b63", width=2)
        _label(draw, (x + 8, y - 8), queries[i][0], "#1f3b63", label_font, width)
        labelled.append(queries[i][0])
    return canvas, labelled


# ---------------------------------------------------------------------------
# The verbs.


def _read_images_for_thumbnails(workdir: Workdir, ids: List[str]) -> Dict[str, bytes]:
    from serving.catalog_images import CatalogImages, ImageRequestError

    images = CatalogImages(workdir.catalog)
    out = {}
    for image_id in ids:
        try:
            out[image_id] = images.read(image_id)[0]
        except ImageRequestError:
            pass
    return out


def cluster_queries(config, workdir: Workdir, args) -> int:
    """`clicklens cluster-queries`: k-means over the logged queries' embeddings -> JSON + text report."""
    encoder = load_encoder(workdir, QUERY_ENCODER)
    queries = logged_queries(workdir, _arg(args, "max_queries", MAX_QUERIES))
    embeddings = encoder.embed([q.encode("utf-8") for q, _ in queries])
    k = _arg(args, "num_clusters", default_num_clusters(len(queries)))
    result = query_clusters(queries, embeddings, min(k, len(queries)), seed=_arg(args, "seed", 0))
    result["model"] = {"name": encoder.name, "version": encoder.version}
    path = _output(workdir, args, "query_clusters.json")
    _write_text(path, json.dumps(result, ensure_ascii=False, indent=1))
    report_path = re.sub(r"\.json$", "", path) + ".txt"
    _write_text(report_path, clusters_report(result, f"{encoder.name} v{encoder.version}"))
    logger.info("wrote %s and %s (%d clusters of %d queries)", path, report_path,
                result["num_clusters"], result["num_queries"])
    print(f"{result['num_clusters']} clusters of {result['num_queries']} queries: {path}\nreport: {report_path}")
    return 0


def _queries_and_images(workdir: Workdir, args):
    """Both encoders, the logged queries, and the embeddings of those queries and of the catalog images."""
    query_encoder = load_encoder(workdir, QUERY_ENCODER)
    image_encoder = load_encoder(workdir, IMAGE_ENCODER)
    queries = logged_queries(workdir, _arg(args, "max_queries", MAX_QUERIES))
    query_embeddings = query_encoder.embed([q.encode("utf-8") for q, _ in queries])
    image_ids, image_embeddings = catalog_images(workdir, image_encoder)
    return (query_encoder, image_encoder), queries, query_embeddings, image_ids, image_embeddings


def label_images(config, workdir: Workdir, args) -> int:
    """`clicklens label-images`: each catalog image's nearest logged queries as zero-shot labels -> JSON."""
    encoders, queries, query_embeddings, image_ids, image_embeddings = _queries_and_images(workdir, args)
    labels = image_labels(image_ids, image_embeddings, queries, query_embeddings,
                          _arg(args, "labels_per_image", LABELS_PER_IMAGE))
    result = {"models": {e.name: e.version for e in encoders},
              "num_queries": len(queries), "num_images": len(labels), "images": labels}
    path = _output(workdir, args, "image_labels.json")
    _write_text(path, json.dumps(result, ensure_ascii=False, indent=1))
    logger.info("wrote %s (%d images labelled from %d queries)", path, len(labels), len(queries))
    print(f"labels for {len(labels)} images: {path}")
    return 0


def plot_embeddings(config, workdir: Workdir, args) -> int:
    """`clicklens plot-embeddings`: a PCA plot of query and image embeddings -> PNG."""
    _, queries, query_embeddings, image_ids, image_embeddings = _queries_and_images(workdir, args)
    query_embeddings, image_embeddings = unit_rows(query_embeddings), unit_rows(image_embeddings)
    # Two-tower spaces have a "modality gap" (all images sit on one side of all queries, often with a
    # different spread), which would make PC1 just "query or image"; standardizing each side keeps the
    # structure they share.
    points, explained = pca_2d(np.vstack([standardize(query_embeddings), standardize(image_embeddings)]))
    query_points, image_points = points[:len(queries)], points[len(queries):]
    thumbnails = _read_images_for_thumbnails(
        workdir, [image_ids[i] for i in spread_picks(image_points, PLOT_LABELLED_IMAGES)])
    canvas, labelled = draw_embeddings(query_points, queries, image_points, image_ids, thumbnails, explained)
    path = _output(workdir, args, "embeddings.png")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    logger.info("wrote %s (%d queries, %d images, labelled: %s)", path, len(queries), len(image_ids),
                ", ".join(labelled))
    print(f"plot of {len(queries)} queries and {len(image_ids)} images: {path}")
    return 0
