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

With `days` > 1 the sessions are spread evenly over that many UTC days from
2026-01-01 (day 1), each day's inside its day, and the logs are dated:

    raw/logs/dt=YYYY-MM-DD/part-K-of-N.jsonl.gz   that day's sessions (N shards per day), malformed lines mixed in
    raw/ground_truth/dt=YYYY-MM-DD.jsonl          the ground truth as it stood that day
    raw/ground_truth.jsonl                        the last day's (what "today" is evaluated against)

(with `days` = 1 the sessions span LOG_SPAN_SECONDS and the layout is the flat
one above, byte for byte as before days existed).  Tastes drift: from
`drift_day` on, a `drift_fraction` share of the attribute values' words mean
another value of the same kind ("red" comes to mean, say, orange), so every
query naming one means another intent of the same category ("red circle" comes
to mean "orange circle").
The words people type stay those of the original intent, but the old ranker
ranks, and users click, by the new meaning, and that day's ground truth lists
the new meaning's images (with "drifted": true).  The manifest names the
drifted intents and queries.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import io
import json
import logging
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from clicklens.catalog import CatalogEntry
from clicklens.config import Config, DemoDataConfig
from clicklens.demo_data import click_model, images, malformed, world
from clicklens.ground_truth import ground_truth_line
from clicklens.log_schema import Impression, LogRecord
from clicklens.queries import normalize_query
from clicklens.workdir import Workdir, join

logger = logging.getLogger(__name__)

START_TIME = 1767225600.0  # 2026-01-01T00:00:00Z, the start of day 1
SECONDS_PER_DAY = 86400.0
LOG_SPAN_SECONDS = 14 * SECONDS_PER_DAY  # what a days=1 world's sessions span
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
    """Names in a folder (sub-folders without a trailing "/"); [] when it does not exist."""
    if _is_remote(path):
        return [name.rstrip("/") for name in _gfile().listdir(path)] if _gfile().exists(path) else []
    return os.listdir(path) if os.path.isdir(path) else []


def _is_dir(path: str) -> bool:
    return _gfile().isdir(path) if _is_remote(path) else os.path.isdir(path)


def _remove_dir_if_empty(path: str) -> None:
    if _is_dir(path) and not _list_dir(path):
        if _is_remote(path):
            _gfile().rmtree(path)
        else:
            os.rmdir(path)


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
# Days and drift.


def day_dates(days: int) -> List[str]:
    """The UTC dates (YYYY-MM-DD) of days 1..days; day 1 is START_TIME's."""
    return [datetime.datetime.fromtimestamp(START_TIME + d * SECONDS_PER_DAY, datetime.timezone.utc)
            .strftime("%Y-%m-%d") for d in range(days)]


def session_days(num_sessions: int, days: int) -> np.ndarray:
    """int [num_sessions]: each session's day, 0-based and ascending; an even split, the first
    num_sessions % days days one session more."""
    per_day = np.full(days, num_sessions // days)
    per_day[: num_sessions % days] += 1
    return np.repeat(np.arange(days), per_day)


def session_times(day_of: np.ndarray, days: int, rng: np.random.Generator) -> np.ndarray:
    """float [sessions], ascending, rounded to ms: a Poisson-like stream of session start times.

    One day: cumulative exponential gaps averaging LOG_SPAN_SECONDS in all (as
    the demo world always had).  Several: each day's sessions get their own
    gaps, one more than sessions, scaled so the gaps fill exactly that UTC day,
    so every time falls inside its day.
    """
    n = len(day_of)
    if days == 1:
        return np.round(START_TIME + np.cumsum(rng.exponential(LOG_SPAN_SECONDS / n, size=n)), 3)
    gaps = rng.exponential(1.0, size=n + days)
    times = np.empty(n)
    counts = np.bincount(day_of, minlength=days)
    first_session = np.concatenate([[0], np.cumsum(counts)])
    for d in range(days):
        day_gaps = gaps[first_session[d] + d: first_session[d + 1] + d + 1]
        start = START_TIME + d * SECONDS_PER_DAY
        offsets = SECONDS_PER_DAY * np.cumsum(day_gaps)[:-1] / day_gaps.sum()
        # Rounding may reach the next midnight; the last millisecond of the day stays inside it.
        times[first_session[d]:first_session[d + 1]] = np.minimum(np.round(start + offsets, 3),
                                                                  start + SECONDS_PER_DAY - 0.001)
    return times


def answerable_intents(catalog: world.Catalog, good: np.ndarray) -> Tuple[List[world.Intent], np.ndarray]:
    """The text intents some good image fully matches, and their match fractions float32 [I, N]."""
    intents = world.all_intents()
    match = np.stack([intent.match_fraction(catalog) for intent in intents])  # [I, N]
    answerable = ((match >= 1.0) & good[None, :]).any(axis=1)
    return [intent for intent, ok in zip(intents, answerable) if ok], match[answerable]


@dataclasses.dataclass(frozen=True)
class Drift:
    """From `day` on (1-based; 0 = never), text intent i means intent `partner[i]`.

    partner[i] == i for an intent that keeps its meaning.
    """

    day: int
    partner: np.ndarray  # int [I]

    @property
    def drifted_intents(self) -> np.ndarray:
        """Indices of the intents that change meaning, ascending."""
        return np.flatnonzero(self.partner != np.arange(len(self.partner)))

    def is_drifted_on(self, day: int) -> bool:
        """Whether 1-based `day` is on or after the drift day."""
        return self.day > 0 and day >= self.day

    def meaning(self, intent_of: np.ndarray, day_of: np.ndarray) -> np.ndarray:
        """int [sessions]: the intent each session's query means on its (0-based) day."""
        if self.day == 0:
            return intent_of
        return np.where(day_of + 1 >= self.day, self.partner[intent_of], intent_of)


def choose_drift(intents: List[world.Intent], match: np.ndarray, shown: np.ndarray, fraction: float,
                 drift_day: int, rng: np.random.Generator) -> Drift:
    """Picks round(fraction x attribute values) values (at least one when fraction > 0) whose words come to
    mean another value of the same kind ("red" comes to mean orange), and so a new meaning for every intent
    that names one of them.

    Drift is by word, not by whole query, so it stays something a model of
    words can learn: every query with "red" moves the same way, and "orange"
    keeps its meaning.  An intent's new meaning is the intent with the drifted
    values replaced; it must have a relevant image that sessions can show
    (`shown`: bool [N], good and not cold), or no click could ever follow the
    drift, and otherwise the intent keeps its meaning.
    """
    partner = np.arange(len(intents))
    if drift_day == 0:
        return Drift(day=0, partner=partner)
    all_values = [(kind, value) for kind in world.KINDS for value in world.values(kind)]
    count = int(round(fraction * len(all_values)))
    if fraction > 0:
        count = max(count, 1)
    chosen = sorted(int(i) for i in rng.choice(len(all_values), size=min(count, len(all_values)), replace=False))
    new_value = {}
    for i in chosen:
        kind, value = all_values[i]
        others = [v for v in world.values(kind) if v != value]
        new_value[(kind, value)] = others[int(rng.integers(len(others)))]
    visible = ((match >= 1.0) & shown[None, :]).any(axis=1)
    index = {intent.attributes: i for i, intent in enumerate(intents)}
    for i, intent in enumerate(intents):
        moved = tuple((kind, new_value.get((kind, value), value)) for kind, value in intent.attributes)
        j = index.get(moved)
        if moved != intent.attributes and j is not None and visible[j]:
            partner[i] = j
    return Drift(day=drift_day, partner=partner)


def intent_json(intent: world.Intent) -> Dict[str, Any]:
    """{"category": ..., "attributes": {kind: value}} of an intent, as the manifest names it."""
    return {"category": intent.category, "attributes": dict(intent.attributes)}


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

    lines: List[str]  # in time order
    day_of: np.ndarray  # int [sessions]: each line's 0-based day
    text_records: List[Dict[str, Any]]  # a sample of records (text queries when there are any) to break
    query_intents: Dict[str, int]  # normalized query -> the intent index its words name (before any drift)
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


def generate_sessions(cfg: DemoDataConfig, catalog: world.Catalog, intents: List[world.Intent], match: np.ndarray,
                      good: np.ndarray, cold: np.ndarray, drift: Drift, world_rng: np.random.Generator,
                      rng: np.random.Generator) -> Sessions:
    """Draws cfg.num_sessions search sessions over cfg.days days, none showing a `cold` image.

    intents, match: answerable_intents(catalog, good).  A text query is typed
    from its intent's words; it is ranked and clicked by what it means that day.
    """
    model = click_model_of(cfg)
    num_images = len(catalog.image_ids)
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
    day_of = session_days(n, cfg.days)
    times = session_times(day_of, cfg.days, rng)
    meaning_of = drift.meaning(intent_of, day_of)

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
        relevance = match[meaning_of[rows]]
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

    return Sessions(lines=lines, day_of=day_of, text_records=text_records, query_intents=query_intents,
                    clicks_by_position=clicks_by_position, impressions_by_position=impressions_by_position,
                    num_image_sessions=int(is_image.sum()), num_zh_sessions=int(is_zh.sum()),
                    multi_click_sessions=multi_click)


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


@dataclasses.dataclass
class LogFile:
    """One log file: its path below raw/logs, its lines, and its malformed lines by reason."""

    name: str
    lines: List[bytes]
    malformed_by_reason: Dict[str, int]


def log_files(sessions: Sessions, bad: List[Tuple[str, bytes]], dates: List[str], num_shards: int,
              rng: np.random.Generator) -> List[LogFile]:
    """The log, cut into files: part-K-of-N.jsonl.gz for one day, else dt=YYYY-MM-DD/part-K-of-N.jsonl.gz.

    Each day gets its own sessions and an even, contiguous share of the
    malformed lines, mixed in by shard_lines (so one day is what it always was).
    """
    valid = [line.encode("utf-8") for line in sessions.lines]
    session_bounds = np.concatenate([[0], np.cumsum(np.bincount(sessions.day_of, minlength=len(dates)))])
    bad_bounds = np.linspace(0, len(bad), len(dates) + 1).round().astype(int)
    files = []
    for d, date in enumerate(dates):
        shards, by_reason = shard_lines(valid[session_bounds[d]:session_bounds[d + 1]],
                                        bad[bad_bounds[d]:bad_bounds[d + 1]], num_shards, rng)
        folder = f"dt={date}/" if len(dates) > 1 else ""
        files += [LogFile(f"{folder}part-{k:05d}-of-{num_shards:05d}.jsonl.gz", lines, counts)
                  for k, (lines, counts) in enumerate(zip(shards, by_reason))]
    return files


def remove_stale_files(folder: str, keep: Set[str]) -> None:
    """Removes the .jsonl* files in `folder` and its dt=* partitions that are not in `keep` (paths below
    `folder`), and partitions left empty: an earlier generation's files would match the pipeline's globs."""
    for name in sorted(_list_dir(folder)):
        path = join(folder, name)
        if name.startswith("dt=") and _is_dir(path):
            remove_stale_files(path, {k[len(name) + 1:] for k in keep if k.startswith(name + "/")})
            _remove_dir_if_empty(path)
        elif ".jsonl" in name and name not in keep:
            logger.warning("removing stale file %s", path)
            _remove_if_exists(path)


# ---------------------------------------------------------------------------
# Ground truth.


def ground_truth_lines(query_intents: Mapping[str, int], intents: List[world.Intent], match: np.ndarray,
                       catalog: world.Catalog, good: np.ndarray, drift: Optional[Drift] = None) -> List[str]:
    """Per distinct normalized text query: the good images with every attribute it names.

    Given a drift (in effect on the day written), a drifted query lists its new
    meaning's images instead, with "drifted": true and the new meaning under "means";
    "category" and "attributes" stay what its words name.
    """
    lines = []
    for query in sorted(query_intents):
        index = query_intents[query]
        meant = index if drift is None else int(drift.partner[index])
        relevant = np.flatnonzero((match[meant] >= 1.0) & good)
        extra: Dict[str, Any] = {"drifted": True, "means": intent_json(intents[meant])} if meant != index else {}
        lines.append(ground_truth_line(query, [catalog.image_ids[i] for i in relevant],
                                       category=intents[index].category,
                                       attributes=dict(intents[index].attributes), **extra))
    return lines


def drifted_queries(query_intents: Mapping[str, int], drift: Drift) -> List[str]:
    """The normalized text queries whose meaning drifts, sorted."""
    return sorted(q for q, i in query_intents.items() if drift.partner[i] != i)


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
    # left the first four, and a sixth (drift) the first five, and so every earlier world, unchanged.
    world_seed, image_seed, log_seed, bad_seed, cold_seed, drift_seed = np.random.SeedSequence(cfg.seed).spawn(6)
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

    intents, match = answerable_intents(catalog, good)
    drift = choose_drift(intents, match, good & ~cold, cfg.drift_fraction, cfg.drift_day,
                         np.random.default_rng(drift_seed))
    dates = day_dates(cfg.days)
    logger.info("drawing %d search sessions over %d day(s)", cfg.num_sessions, cfg.days)
    sessions = generate_sessions(cfg, catalog, intents, match, good, cold, drift, world_rng,
                                 np.random.default_rng(log_seed))
    bad_rng = np.random.default_rng(bad_seed)
    bad = malformed.make_malformed_lines(cfg.malformed_lines, sessions.text_records, bad_rng)
    files = log_files(sessions, bad, dates, cfg.num_log_shards, bad_rng)

    _makedirs(workdir.logs)
    remove_stale_files(workdir.logs, {f.name for f in files})
    for f in files:
        if "/" in f.name:
            _makedirs(join(workdir.logs, f.name.rsplit("/", 1)[0]))
        _write_bytes(join(workdir.logs, f.name), _gzip(b"".join(line + b"\n" for line in f.lines)))

    # The truth as it stands before the drift and from the drift day on; each day gets one of the two.
    truth_before = ground_truth_lines(sessions.query_intents, intents, match, catalog, good)
    truth_after = ground_truth_lines(sessions.query_intents, intents, match, catalog, good, drift) if drift.day else []
    truth_of_day = [truth_after if drift.is_drifted_on(d) else truth_before for d in range(1, cfg.days + 1)]
    daily_truth = [workdir.daily_ground_truth(date) for date in dates] if cfg.days > 1 else []
    truth_folder = workdir.daily_ground_truth(dates[0]).rsplit("/", 1)[0]
    remove_stale_files(truth_folder, {path.rsplit("/", 1)[1] for path in daily_truth})
    _remove_dir_if_empty(truth_folder)
    if daily_truth:
        _makedirs(truth_folder)
    for path, lines in zip(daily_truth, truth_of_day):
        _write_bytes(path, _jsonl(lines))
    gt = truth_of_day[-1]
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
        "malformed_by_file": {f"logs/{f.name}": sum(f.malformed_by_reason.values()) for f in files},
        "broken_images": {
            "missing": [catalog.image_ids[i] for i in broken.missing],
            "corrupt": [catalog.image_ids[i] for i in broken.corrupt],
        },
        "cold_images": [catalog.image_ids[i] for i in np.flatnonzero(cold)],
        # The truth a position-bias fit (pipeline.position_bias=pbm) is measured against.
        "examination_propensities": true_propensities(cfg),
        "log_files": [f"logs/{f.name}" for f in files],
        "num_log_lines": sum(len(f.lines) for f in files),
        # Only a dated or drifting world has these, so a days=1 manifest is what it always was.
        **(calendar_manifest(dates, sessions, daily_truth, workdir) if cfg.days > 1 else {}),
        **(drift_manifest(drift, intents, sessions) if cfg.days > 1 or drift.day else {}),
        "files": {"catalog": "catalog.jsonl", "images": "images", "ground_truth": "ground_truth.jsonl",
                  "similar_images": "similar_images.jsonl"},
        "config": dataclasses.asdict(cfg),
    }
    _write_bytes(join(workdir.raw, "manifest.json"),
                 (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    _print_summary(manifest, sessions, time.perf_counter() - started, workdir)
    return manifest


def calendar_manifest(dates: List[str], sessions: Sessions, daily_truth: List[str],
                      workdir: Workdir) -> Dict[str, Any]:
    """The manifest's days, dates, sessions per date and daily ground truth files (paths below raw/)."""
    counts = np.bincount(sessions.day_of, minlength=len(dates))
    return {
        "days": len(dates),
        "dates": dates,
        "sessions_by_day": {date: int(c) for date, c in zip(dates, counts)},
        "daily_ground_truth": [path[len(workdir.raw) + 1:] for path in daily_truth],
    }


def drift_manifest(drift: Drift, intents: List[world.Intent], sessions: Sessions) -> Dict[str, Any]:
    """The manifest's drift day, drifted intents (from -> to) and the normalized queries that drift."""
    return {
        "drift_day": drift.day,
        "drifted_intents": [{"from": intent_json(intents[i]), "to": intent_json(intents[drift.partner[i]])}
                            for i in drift.drifted_intents],
        "drifted_queries": drifted_queries(sessions.query_intents, drift),
    }


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
    if "dates" in manifest:
        print(f"  days:     {manifest['days']} ({manifest['dates'][0]} .. {manifest['dates'][-1]}),"
              f" logs/dt=YYYY-MM-DD/ and ground_truth/dt=YYYY-MM-DD.jsonl")
    if manifest.get("drift_day"):
        print(f"  drift:    from day {manifest['drift_day']}, {len(manifest['drifted_intents'])} intents"
              f" ({len(manifest['drifted_queries'])} of the distinct queries) mean another intent")


def run(config: Config, workdir: Workdir, args: Optional[argparse.Namespace] = None) -> int:
    """The `generate-demo-data` verb."""
    generate(config.demo_data, workdir)
    return 0
