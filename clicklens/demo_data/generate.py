"""`clicklens generate-demo-data`: a seeded, realistic small image search world under <workdir>/raw.

Writes (all byte-identical for the same demo_data config):

    raw/images/<image_id>.png     procedurally drawn images (plus a few broken entries)
    raw/catalog.jsonl             CatalogEntry per image, with its attributes as extra keys
    raw/logs/part-K-of-N.jsonl.gz search sessions (LogRecord lines) and known malformed lines
    raw/ground_truth.jsonl        per distinct normalized text query: the relevant image ids
    raw/similar_images.jsonl      per image: the images that look like it (query-by-image truth)
    raw/manifest.json             seed, counts, malformed lines by reason, broken and cold images, files,
                                  and the click model's true examination propensity per position

Ground truth lists only images whose file is good: a broken image can be shown
and clicked in the logs but can never be retrieved.  A `cold_fraction` share of
the good images are new uploads: never shown in any session (so never clicked),
yet relevant in the ground truth like any other image.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from clicklens.catalog import CatalogEntry
from clicklens.config import Config, DemoDataConfig
from clicklens.demo_data import click_model, images, malformed, world
from clicklens.ground_truth import ground_truth_line
from clicklens.log_schema import Impression, LogRecord
from clicklens.queries import normalize_query
from clicklens.workdir import Workdir, join

logger = logging.getLogger(__name__)

START_TIME = 1767225600.0  # 2026-01-01T00:00:00Z
LOG_SPAN_SECONDS = 14 * 86400.0
QUERY_ZIPF_EXPONENT = 1.0
QUERY_IMAGE_ZIPF_EXPONENT = 0.8
SESSION_BATCH = 1024


# ---------------------------------------------------------------------------
# Files: local paths with the standard library, anything with "://" via tf.io.gfile.


def _is_remote(path: str) -> bool:
    return "://" in path


def _gfile():
    from clicklens import compat  # noqa: F401  (TF must be set up before import)
    import tensorflow as tf

    return tf.io.gfile


def _makedirs(path: str) -> None:
    if _is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def _write_bytes(path: str, data: bytes) -> None:
    if _is_remote(path):
        with _gfile().GFile(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def _remove_if_exists(path: str) -> None:
    if _is_remote(path):
        if _gfile().exists(path):
            _gfile().remove(path)
    elif os.path.exists(path):
        os.remove(path)


def _list_dir(path: str) -> List[str]:
    if _is_remote(path):
        return _gfile().listdir(path) if _gfile().exists(path) else []
    return os.listdir(path) if os.path.isdir(path) else []


def _jsonl(rows: Sequence[str]) -> bytes:
    return "".join(row + "\n" for row in rows).encode("utf-8")


def _gzip(data: bytes) -> bytes:
    """gzip with no file name and mtime 0, so equal data gives equal bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=6, mtime=0) as f:
        f.write(data)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# The world: images and catalog.


@dataclasses.dataclass
class BrokenImages:
    """Catalog entries whose file is missing or not a decodable image."""

    missing: List[int]
    corrupt: List[int]


def _choose_broken(total: int, count: int, rng: np.random.Generator) -> BrokenImages:
    chosen = sorted(int(i) for i in rng.choice(total, size=count, replace=False)) if count else []
    order = rng.permutation(len(chosen))
    # About half missing, half corrupt; with one, it is missing.
    missing = sorted(chosen[i] for i in order[: (count + 1) // 2])
    corrupt = sorted(chosen[i] for i in order[(count + 1) // 2:])
    return BrokenImages(missing=missing, corrupt=corrupt)


def write_images(catalog: world.Catalog, broken: BrokenImages, size: int, folder: str,
                 rng: np.random.Generator) -> None:
    """Draws every image and writes its PNG; broken ones are left out or written corrupt."""
    _makedirs(folder)
    missing, corrupt = set(broken.missing), set(broken.corrupt)
    for i, image_id in enumerate(catalog.image_ids):
        png = images.encode_png(images.draw_image(catalog.attributes(i), size, rng))
        path = join(folder, f"{image_id}.png")
        if i in missing:
            _remove_if_exists(path)  # left over from an earlier run with other broken images
        elif i in corrupt:
            kind = "truncated" if broken.corrupt.index(i) % 2 == 0 else "not_an_image"
            _write_bytes(path, images.corrupt_bytes(kind, png))
        else:
            _write_bytes(path, png)
        if (i + 1) % 500 == 0 or i + 1 == len(catalog.image_ids):
            logger.info("images: %d / %d drawn", i + 1, len(catalog.image_ids))


def catalog_lines(catalog: world.Catalog) -> List[str]:
    """One CatalogEntry JSON line per image; uris relative to the catalog's folder."""
    return [
        CatalogEntry(image_id=image_id, uri=f"images/{image_id}.png",
                     extra=tuple(catalog.attributes(i).items())).to_json()
        for i, image_id in enumerate(catalog.image_ids)
    ]


# ---------------------------------------------------------------------------
# Sessions.


def _zipf_weights(n: int, exponent: float, order: np.ndarray) -> np.ndarray:
    """Probabilities with item order[r] at popularity rank r (Zipf)."""
    weights = np.empty(n)
    weights[order] = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


@dataclasses.dataclass
class Sessions:
    """Generated sessions as JSON lines, plus what evaluation and the summary need."""

    lines: List[str]
    text_records: List[Dict[str, Any]]  # a sample of records (text queries when there are any) to break
    query_intents: Dict[str, int]  # normalized query -> intent index
    clicks_by_position: np.ndarray
    impressions_by_position: np.ndarray
    num_image_sessions: int
    num_zh_sessions: int
    multi_click_sessions: int


def choose_cold(good: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """bool [N]: a `fraction` share of the good images, the new uploads no session shows."""
    good_ids = np.flatnonzero(good)
    cold = np.zeros(len(good), bool)
    cold[rng.choice(good_ids, size=int(round(fraction * len(good_ids))), replace=False)] = True
    return cold


def click_model_of(cfg: DemoDataConfig) -> click_model.ClickModel:
    """The ranker and user model of the demo world (demo_data.ranker_quality_weight, the rest fixed)."""
    return click_model.ClickModel(quality_weight=cfg.ranker_quality_weight)


def true_propensities(cfg: DemoDataConfig) -> Dict[str, float]:
    """{position: P(examined)} of the demo users at positions 1..max_impressions (1.0 at position 1)."""
    positions = np.arange(1, cfg.max_impressions + 1)
    return {str(p): round(float(e), 6)
            for p, e in zip(positions, click_model.examination_probability(positions, click_model_of(cfg)))}


def generate_sessions(cfg: DemoDataConfig, catalog: world.Catalog, good: np.ndarray, cold: np.ndarray,
                      world_rng: np.random.Generator, rng: np.random.Generator) -> Tuple[Sessions, List[world.Intent], np.ndarray]:
    """Draws cfg.num_sessions search sessions, none showing a `cold` image; returns them, the intents and
    their match fractions."""
    model = click_model_of(cfg)
    num_images = len(catalog.image_ids)
    intents = world.all_intents()
    match = np.stack([intent.match_fraction(catalog) for intent in intents])  # [I, N]
    answerable = ((match >= 1.0) & good[None, :]).any(axis=1)
    intents = [intent for intent, ok in zip(intents, answerable) if ok]
    match = match[answerable]

    # Popularity: short queries tend to be head queries, long ones the tail.
    popularity_key = np.array([len(i.attributes) for i in intents]) + world_rng.uniform(0, 2.5, len(intents))
    intent_p = _zipf_weights(len(intents), QUERY_ZIPF_EXPONENT, np.argsort(popularity_key, kind="stable"))
    good_ids = np.flatnonzero(good & ~cold)  # a query image was itself shown once: never a cold one
    query_image_p = _zipf_weights(len(good_ids), QUERY_IMAGE_ZIPF_EXPONENT, world_rng.permutation(len(good_ids)))
    quality = (world_rng.standard_normal(num_images) * 0.5).astype(np.float32)
    appeal = np.exp(world_rng.standard_normal(num_images) * 0.25)

    n = cfg.num_sessions
    is_image = rng.random(n) < cfg.query_by_image_fraction
    is_zh = rng.random(n) < cfg.chinese_fraction
    intent_of = rng.choice(len(intents), size=n, p=intent_p)
    query_image_of = good_ids[rng.choice(len(good_ids), size=n, p=query_image_p)]
    depth = min(cfg.max_impressions, int((~cold).sum()) - 1)
    lengths = np.minimum(rng.integers(cfg.min_impressions, cfg.max_impressions + 1, size=n), depth)
    times = np.round(START_TIME + np.cumsum(rng.exponential(LOG_SPAN_SECONDS / n, size=n)), 3)

    width = max(7, len(str(n - 1)))
    lines: List[str] = []
    text_records: List[Dict[str, Any]] = []
    query_intents: Dict[str, int] = {}
    clicks_by_position = np.zeros(depth + 1, np.int64)
    impressions_by_position = np.zeros(depth + 1, np.int64)
    multi_click = 0
    for start in range(0, n, SESSION_BATCH):
        rows = np.arange(start, min(start + SESSION_BATCH, n))
        image_rows = is_image[rows]
        relevance = match[intent_of[rows]]
        if image_rows.any():
            q = query_image_of[rows[image_rows]]
            similarity = catalog.similarity_to(q)
            similarity[np.arange(len(q)), q] = -np.inf  # the query image itself is not a result
            relevance[image_rows] = similarity
        relevance[:, cold] = -np.inf  # new uploads are in no result list
        top = click_model.rank(relevance, quality, depth, model, rng)
        shown = np.take_along_axis(relevance, top, axis=1)
        probability = np.where(image_rows[:, None],
                               click_model.image_click_probability(np.maximum(shown, 0), appeal[top], model),
                               click_model.text_click_probability(shown, appeal[top], model))
        in_list = np.arange(depth)[None, :] < lengths[rows][:, None]
        clicked = click_model.sample_clicks(probability, rng, model) & in_list
        relevant = np.where(image_rows[:, None], shown >= world.SIMILAR_THRESHOLD, shown >= 1.0)
        dwell = click_model.sample_dwell_ms(relevant, rng, model)

        for b, s in enumerate(rows):
            length = int(lengths[s])
            impressions = tuple(
                Impression(image_id=catalog.image_ids[top[b, p]], position=p + 1, clicked=bool(clicked[b, p]),
                           dwell_ms=float(dwell[b, p]) if clicked[b, p] else None)
                for p in range(length)
            )
            locale = "zh" if is_zh[s] else "en"
            if image_rows[b]:
                record = LogRecord(session_id=f"s{s:0{width}d}", time=float(times[s]), impressions=impressions,
                                   query_image_id=catalog.image_ids[query_image_of[s]],
                                   category=world.IMAGE_QUERY_CATEGORY, locale=locale)
            else:
                intent = intents[intent_of[s]]
                text = world.query_text(intent, locale, rng)
                query_intents.setdefault(normalize_query(text), int(intent_of[s]))
                record = LogRecord(session_id=f"s{s:0{width}d}", time=float(times[s]), impressions=impressions,
                                   query=text, category=intent.category, locale=locale)
            line = record.to_json()
            lines.append(line)
            if len(text_records) < 256 and (not image_rows[b] or s >= n - 256):
                text_records.append(json.loads(line))
        clicks_by_position[1:] += clicked.sum(axis=0)
        impressions_by_position[1:] += in_list.sum(axis=0)
        multi_click += int((clicked.sum(axis=1) >= 2).sum())
        if (rows[-1] + 1) % 10240 < SESSION_BATCH or rows[-1] + 1 == n:
            logger.info("sessions: %d / %d", rows[-1] + 1, n)

    sessions = Sessions(lines=lines, text_records=text_records, query_intents=query_intents,
                        clicks_by_position=clicks_by_position, impressions_by_position=impressions_by_position,
                        num_image_sessions=int(is_image.sum()), num_zh_sessions=int(is_zh.sum()),
                        multi_click_sessions=multi_click)
    return sessions, intents, match


def shard_lines(valid: List[bytes], bad: List[Tuple[str, bytes]], num_shards: int,
                rng: np.random.Generator) -> Tuple[List[List[bytes]], List[Dict[str, int]]]:
    """Mixes the malformed lines in at random places and cuts the log into contiguous shards.

    Returns the shards' lines and, per shard, its malformed-line count by reason.
    """
    total = len(valid) + len(bad)
    bad_at = np.zeros(total, bool)
    bad_at[rng.choice(total, size=len(bad), replace=False)] = True
    valid_iter, bad_iter = iter(valid), iter(bad)
    bounds = np.linspace(0, total, num_shards + 1).round().astype(int)
    shards: List[List[bytes]] = []
    by_reason: List[Dict[str, int]] = []
    for k in range(num_shards):
        lines, counts = [], {}
        for i in range(bounds[k], bounds[k + 1]):
            if bad_at[i]:
                reason, line = next(bad_iter)
                counts[reason] = counts.get(reason, 0) + 1
                lines.append(line)
            else:
                lines.append(next(valid_iter))
        shards.append(lines)
        by_reason.append(counts)
    return shards, by_reason


# ---------------------------------------------------------------------------
# Ground truth.


def ground_truth_lines(sessions: Sessions, intents: List[world.Intent], match: np.ndarray,
                       catalog: world.Catalog, good: np.ndarray) -> List[str]:
    """Per distinct normalized text query: the good images with every attribute it names."""
    lines = []
    for query in sorted(sessions.query_intents):
        index = sessions.query_intents[query]
        relevant = np.flatnonzero((match[index] >= 1.0) & good)
        lines.append(ground_truth_line(query, [catalog.image_ids[i] for i in relevant],
                                       category=intents[index].category,
                                       attributes=dict(intents[index].attributes)))
    return lines


def similar_image_lines(catalog: world.Catalog, good: np.ndarray) -> List[str]:
    """Per good image: the other good images at least world.SIMILAR_THRESHOLD alike."""
    lines = []
    good_ids = np.flatnonzero(good)
    for start in range(0, len(good_ids), 256):
        batch = good_ids[start:start + 256]
        similar = (catalog.similarity_to(batch) >= world.SIMILAR_THRESHOLD - 1e-6) & good[None, :]
        similar[np.arange(len(batch)), batch] = False
        for row, i in enumerate(batch):
            lines.append(json.dumps({"image_id": catalog.image_ids[i],
                                     "similar_image_ids": [catalog.image_ids[j] for j in np.flatnonzero(similar[row])]},
                                    separators=(",", ":")))
    return lines


# ---------------------------------------------------------------------------
# The verb.


def generate(cfg: DemoDataConfig, workdir: Workdir) -> Dict[str, Any]:
    """Writes the whole demo world under workdir.raw; returns the manifest."""
    started = time.perf_counter()
    # Spawned children are independent of how many are spawned: a fifth stream (cold images)
    # leaves the first four, and so every earlier world, unchanged.
    world_seed, image_seed, log_seed, bad_seed, cold_seed = np.random.SeedSequence(cfg.seed).spawn(5)
    world_rng = np.random.default_rng(world_seed)

    total_images = cfg.num_images + cfg.broken_images
    catalog = world.make_catalog(total_images, world_rng)
    broken = _choose_broken(total_images, cfg.broken_images, world_rng)
    good = np.ones(total_images, bool)
    good[broken.missing + broken.corrupt] = False
    cold = choose_cold(good, cfg.cold_fraction, np.random.default_rng(cold_seed))

    _makedirs(workdir.raw)
    logger.info("drawing %d images (%dx%d) into %s", total_images, cfg.image_size, cfg.image_size, workdir.images)
    write_images(catalog, broken, cfg.image_size, workdir.images, np.random.default_rng(image_seed))
    _write_bytes(workdir.catalog, _jsonl(catalog_lines(catalog)))

    logger.info("drawing %d search sessions", cfg.num_sessions)
    sessions, intents, match = generate_sessions(cfg, catalog, good, cold, world_rng, np.random.default_rng(log_seed))
    bad_rng = np.random.default_rng(bad_seed)
    bad = malformed.make_malformed_lines(cfg.malformed_lines, sessions.text_records, bad_rng)
    shards, bad_by_shard = shard_lines([line.encode("utf-8") for line in sessions.lines], bad,
                                       cfg.num_log_shards, bad_rng)

    _makedirs(workdir.logs)
    names = [f"part-{k:05d}-of-{cfg.num_log_shards:05d}.jsonl.gz" for k in range(cfg.num_log_shards)]
    for stale in sorted(set(_list_dir(workdir.logs)) - set(names)):
        if ".jsonl" in stale:  # would match the pipeline's logs glob
            logger.warning("removing stale log file %s", join(workdir.logs, stale))
            _remove_if_exists(join(workdir.logs, stale))
    for name, lines in zip(names, shards):
        _write_bytes(join(workdir.logs, name), _gzip(b"".join(line + b"\n" for line in lines)))

    gt = ground_truth_lines(sessions, intents, match, catalog, good)
    _write_bytes(workdir.ground_truth, _jsonl(gt))
    _write_bytes(join(workdir.raw, "similar_images.jsonl"), _jsonl(similar_image_lines(catalog, good)))

    malformed_by_kind: Dict[str, int] = {}
    for reason, _ in bad:
        malformed_by_kind[reason] = malformed_by_kind.get(reason, 0) + 1
    manifest = {
        "seed": cfg.seed,
        "num_images": cfg.num_images,
        "num_catalog_entries": total_images,
        "image_size": cfg.image_size,
        "num_sessions": cfg.num_sessions,
        "num_text_sessions": cfg.num_sessions - sessions.num_image_sessions,
        "num_image_sessions": sessions.num_image_sessions,
        "num_zh_sessions": sessions.num_zh_sessions,
        "num_distinct_queries": len(gt),
        "malformed_lines": len(bad),
        "malformed_by_kind": dict(sorted(malformed_by_kind.items())),
        "malformed_by_file": {f"logs/{name}": sum(c.values()) for name, c in zip(names, bad_by_shard)},
        "broken_images": {
            "missing": [catalog.image_ids[i] for i in broken.missing],
            "corrupt": [catalog.image_ids[i] for i in broken.corrupt],
        },
        "cold_images": [catalog.image_ids[i] for i in np.flatnonzero(cold)],
        # The truth a position-bias fit (pipeline.position_bias=pbm) is measured against.
        "examination_propensities": true_propensities(cfg),
        "log_files": [f"logs/{name}" for name in names],
        "num_log_lines": sum(len(lines) for lines in shards),
        "files": {"catalog": "catalog.jsonl", "images": "images", "ground_truth": "ground_truth.jsonl",
                  "similar_images": "similar_images.jsonl"},
        "config": dataclasses.asdict(cfg),
    }
    _write_bytes(join(workdir.raw, "manifest.json"),
                 (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    _print_summary(manifest, sessions, time.perf_counter() - started, workdir)
    return manifest


def _print_summary(manifest: Dict[str, Any], sessions: Sessions, seconds: float, workdir: Workdir) -> None:
    ctr = sessions.clicks_by_position[1:] / np.maximum(sessions.impressions_by_position[1:], 1)
    n = manifest["num_sessions"]
    shown = ", ".join(f"{p}: {ctr[p - 1]:.3f}" for p in (1, 2, 5, 10, len(ctr)) if p <= len(ctr))
    print(f"demo world written to {workdir.raw} in {seconds:.1f} s\n"
          f"  images:   {manifest['num_images']} PNGs + {len(manifest['broken_images']['missing'])} missing"
          f" + {len(manifest['broken_images']['corrupt'])} corrupt catalog entries;"
          f" {len(manifest['cold_images'])} never shown (cold)\n"
          f"  sessions: {n} ({manifest['num_image_sessions']} by image, {manifest['num_zh_sessions']} zh),"
          f" {manifest['num_distinct_queries']} distinct queries,"
          f" {sessions.multi_click_sessions / n:.0%} with 2+ clicks\n"
          f"  CTR by position ({shown})\n"
          f"  logs:     {len(manifest['log_files'])} files, {manifest['num_log_lines']} lines,"
          f" {manifest['malformed_lines']} malformed")


def run(config: Config, workdir: Workdir, args: Optional[argparse.Namespace] = None) -> int:
    """The `generate-demo-data` verb."""
    generate(config.demo_data, workdir)
    return 0
