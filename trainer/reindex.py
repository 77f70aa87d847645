"""`clicklens reindex`: the catalog changed; the next version of both retrieval models, without retraining.

    catalog (pipeline.catalog, default W/raw/catalog.jsonl)
    + W/export/{query,image}_encoder/<newest>/      the towers (trainer/saved_encoders.py)
    + W/export/corpus_embeddings/<newest>/          the rows the served index holds (clicklens/corpus_embeddings.py)
      -> W/export/retrieval_bruteforce/<v>/, retrieval_scann/<v>/, corpus_embeddings/<v>/   (v: the next version)
      -> W/export/reindex_report.json, W/examples/dead_letter-reindex-<v>.jsonl

1. scan: parse the catalog and hash every image's raw input (trainer/catalog_scan.py); a file whose
   path, size and modification time are those recorded with the kept rows keeps its recorded hash
   unread (`--rehash` reads them all); bad lines, duplicate ids and missing files are dead-lettered,
   as the pipeline does.
2. plan: an image whose hash is among the kept rows (and those rows were embedded by the newest
   image_encoder) reuses its embedding; the others are embedded; ids no longer in the catalog are
   dropped.  When the newest image_encoder is not the one that embedded the kept rows, every image is
   embedded again (and the log says so).
3. embed: prepared as the pipeline stores them (clicklens/images.py PngPreparer) and embedded by the
   exported image_encoder's graph; an image that does not decode is dead-lettered (`corrupt_image`).
4. index: the ScaNN layout derived for the new corpus size, built, with the replaced index's search
   depth kept when it still meets export.min_recall (trainer/scann_tuning.py); brute force over all rows.
5. write: both retrieval models as one new version (each under a temporary name, renamed into place:
   trainer/export.py:save_version), then the corpus embeddings, the dead letters and the report.

A running server polls the model folders and hot-loads the new versions (serving/model_registry.py:
loaded and warmed up before they take traffic); the search page's /images/ route re-reads the catalog.
The encoders are not rewritten: their newest version stays what export wrote.

`clicklens reindex --watch` stays up and runs a pass whenever the catalog file changes (checked every
--poll-seconds), keeping between passes what a one-off run loads each time (`WarmState`): TensorFlow,
the encoders (loaded again when a newer export appears), the newest corpus rows and the embedded
tuning queries.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import corpus_embeddings
from clicklens import servables as S
from clicklens.catalog import catalog_path, prepare_image_input, resolve_uri
from clicklens.corpus_embeddings import content_hash
from clicklens.dead_letters import image_dead_letter, write_dead_letters
from clicklens.errors import BadRecord, ClicklensError
from clicklens.shutdown import stop_on_signals
from clicklens.workdir import Workdir
from trainer import export
from trainer.catalog_scan import CatalogScan, ScannedImage, read_input, scan_catalog
from trainer.corpus import Corpus
from trainer.saved_encoders import SavedEncoders, load_saved_encoders
from trainer.scann_index import ScannParams

logger = logging.getLogger(__name__)

EMBED_CHUNK = 256  # images read, prepared and embedded at a time
LOG_EVERY = 5_000


class Plan:
    """Which catalog images reuse a kept embedding (found by content hash, under any id) and which are embedded."""

    def __init__(self, scan: CatalogScan, previous: Optional[corpus_embeddings.CorpusEmbeddings], reuse: bool):
        by_hash = {} if previous is None or not reuse else {
            h.decode("ascii"): row for row, h in enumerate(previous.hashes) if h}
        self.reused: Dict[str, int] = {}  # image id -> row of the previous embeddings
        self.to_embed: List[ScannedImage] = []
        for image in scan.images:
            row = by_hash.get(image.hash)
            if row is not None:
                self.reused[image.entry.image_id] = row
            else:
                self.to_embed.append(image)


def diff_counts(previous: Optional[corpus_embeddings.CorpusEmbeddings], ids: List[str],
                hashes: List[str]) -> Dict[str, int]:
    """added / changed (other bytes) / unchanged / removed image ids of the new rows against the previous ones."""
    old = {} if previous is None else {
        i.decode("utf-8"): h.decode("ascii") for i, h in zip(previous.ids, previous.hashes)}
    counts = collections.Counter(added=0, changed=0, unchanged=0)
    for image_id, content in zip(ids, hashes):
        if image_id not in old:
            counts["added"] += 1
        elif old[image_id] and old[image_id] == content:
            counts["unchanged"] += 1
        else:
            counts["changed"] += 1
    counts["removed"] = len(set(old) - set(ids))
    return dict(counts)


def embed_new(scan: CatalogScan, images: List[ScannedImage], encoders: SavedEncoders, image_size: int,
              max_pixels: int,
              dead_letters: List[dict]) -> Tuple[Dict[str, np.ndarray], Dict[str, str], Optional[object]]:
    """({id: embedding}, {id: content hash of the bytes embedded}, one prepared input) of `images`.

    Each is read again, prepared as the pipeline stores it and embedded by the
    exported image_encoder; what cannot be read or decoded is dead-lettered.
    """
    preparer = None
    if scan.image_source != "features":
        from clicklens.images import png_preparer

        preparer = png_preparer(image_size, max_pixels)
    embeddings: Dict[str, np.ndarray] = {}
    hashes: Dict[str, str] = {}
    sample = None
    done = 0
    for start in range(0, len(images), EMBED_CHUNK):
        ids, values = [], []
        for image in images[start:start + EMBED_CHUNK]:
            entry = image.entry
            try:
                raw = read_input(scan, image)
                where = resolve_uri(entry.uri, scan.path) if entry.uri else ""
                value = prepare_image_input(raw, scan.image_source, preparer, where)
            except BadRecord as err:
                dead_letters.append(image_dead_letter(entry, err.reason, err.detail))
                continue
            ids.append(entry.image_id)
            values.append(np.asarray(value, np.float32) if scan.image_source == "features" else value)
            hashes[entry.image_id] = content_hash(raw)  # of the bytes embedded, should the file change meanwhile
        if sample is None and values:
            sample = values[0]
        embeddings.update(zip(ids, encoders.embed_image_values(values)))
        done += len(images[start:start + EMBED_CHUNK])
        if done % LOG_EVERY < EMBED_CHUNK or done == len(images):
            logger.info("reindex: embedded %d / %d images (%d could not be used)", len(embeddings), len(images),
                        done - len(embeddings))
    return embeddings, hashes, sample


def sample_input(scan: CatalogScan, image: ScannedImage, image_size: int, max_pixels: int):
    """One image as the models' warmup requests send it (prepared PNG bytes, or a feature vector)."""
    raw = read_input(scan, image)
    if scan.image_source == "features":
        return np.asarray(raw, np.float32)
    from clicklens.images import png_preparer

    return prepare_image_input(raw, scan.image_source, png_preparer(image_size, max_pixels), image.entry.uri)


def query_embeddings(config, workdir: Workdir, encoders: SavedEncoders) -> np.ndarray:
    """The held-out eval queries export tunes ScaNN on, embedded by the exported query_encoder ([0, D] if none)."""
    queries = export.distinct_eval_queries(config, workdir)
    return encoders.embed_query_texts(queries) if queries else np.zeros((0, encoders.dim), np.float32)


def check_image_source(config, encoders: SavedEncoders) -> None:
    """ClicklensError unless pipeline.image_source is what the exported image_encoder takes."""
    if config.pipeline.image_source != encoders.image_source:
        raise ClicklensError(f"pipeline.image_source is {config.pipeline.image_source!r} but the exported "
                             f"{S.IMAGE_ENCODER} takes {encoders.image_input!r}: use the config it was exported with")


def known_stats(previous: Optional[corpus_embeddings.CorpusEmbeddings]) -> Dict[str, str]:
    """{file stat: content hash} of the kept rows whose stat and hash were recorded."""
    if previous is None:
        return {}
    return {stat.decode("utf-8"): content.decode("ascii")
            for stat, content in zip(previous.stats, previous.hashes) if stat and content}


class WarmState:
    """What a reindex pass loads, kept for the next pass of the same process (`--watch`): the newest
    encoders, the newest corpus rows and the embedded tuning queries.  Each is loaded again when a newer
    version is on disk (a new export, or a version written by someone else)."""

    def __init__(self):
        self._encoders: Optional[SavedEncoders] = None
        self._queries: Optional[np.ndarray] = None
        self._corpus: Optional[Tuple[int, corpus_embeddings.CorpusEmbeddings]] = None

    def encoders(self, workdir: Workdir) -> SavedEncoders:
        """The newest exported encoders; ClicklensError naming the folder when nothing is exported."""
        if self._encoders is None or S.latest_version(workdir.export_model(S.IMAGE_ENCODER))[0] != \
                self._encoders.version:
            self._encoders, self._queries = load_saved_encoders(workdir), None
        return self._encoders

    def query_embeddings(self, config, workdir: Workdir) -> np.ndarray:
        """The eval queries ScaNN is tuned on, embedded by the newest query_encoder."""
        if self._queries is None:
            self._queries = query_embeddings(config, workdir, self.encoders(workdir))
        return self._queries

    def latest_corpus(self, workdir: Workdir) -> Optional[Tuple[int, corpus_embeddings.CorpusEmbeddings]]:
        """(version, rows) of the newest complete corpus_embeddings version, or None."""
        found = corpus_embeddings.versions(workdir.corpus_embeddings)
        if not found:
            self._corpus = None
        elif self._corpus is None or self._corpus[0] != max(found):
            self._corpus = max(found), corpus_embeddings.read(found[max(found)])
        return self._corpus


def reindex(config, workdir: Workdir, rehash: bool = False,
            warm: Optional[WarmState] = None) -> Tuple[Optional[int], Dict[str, object]]:
    """Builds the next version of both retrieval models over the catalog as it is now (module docstring).

    With `rehash`, every catalog file is read and hashed, whatever its stat.
    `warm` keeps what this pass loads for the next one (`watch`).
    Returns (the version written, the report); the version is None when the
    catalog and the image_encoder are what the newest version was built from.
    """
    t0 = time.perf_counter()
    seconds: Dict[str, float] = {}
    warm = warm or WarmState()
    encoders = warm.encoders(workdir)  # fails naming W/export/image_encoder when nothing is exported
    check_image_source(config, encoders)
    p = config.pipeline
    latest = warm.latest_corpus(workdir)
    previous_version, previous = latest if latest is not None else (None, None)
    reuse = previous is not None and (previous.image_encoder_version == encoders.version
                                      and previous.image_source == encoders.image_source
                                      and previous.embeddings.shape[1] == encoders.dim)
    if previous is None:
        logger.warning("reindex: no corpus embeddings under %s (an export from before reindex existed): "
                       "embedding every image", workdir.corpus_embeddings)
    elif not reuse:
        logger.warning("reindex: the newest %s is version %d, but corpus_embeddings/%d were embedded by version "
                       "%d: re-embedding every image", S.IMAGE_ENCODER, encoders.version, previous_version,
                       previous.image_encoder_version)

    seconds["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    path = catalog_path(config, workdir)
    scan = scan_catalog(path, p.image_source, p.feature_dim, known=None if rehash else known_stats(previous),
                        log_prefix="reindex", allow_outside_uris=p.allow_outside_uris)
    dead = list(scan.dead_letters)
    seconds["scan"] = time.perf_counter() - t
    plan = Plan(scan, previous, reuse)
    logger.info("reindex: catalog %s: %d lines, %d images readable, %d dead-lettered; %d reuse an embedding of "
                "corpus_embeddings/%s, %d to embed", path, scan.lines, len(scan.images), len(dead), len(plan.reused),
                previous_version if previous is not None else "-", len(plan.to_embed))
    report: Dict[str, object] = {
        "previous_version": previous_version, "catalog": path, "catalog_lines": scan.lines,
        "image_encoder_version": encoders.version, "reembedded_all": not reuse, "files_read": scan.files_read}
    t = time.perf_counter()
    new_embeddings, new_hashes, sample = embed_new(scan, plan.to_embed, encoders, p.image_size, p.max_image_pixels,
                                                   dead)
    seconds["embed"] = time.perf_counter() - t
    ids, rows, hashes, stats = assemble(scan, plan, previous, new_embeddings, new_hashes)
    if not ids:
        raise ClicklensError(f"reindex: no usable image in {path} ({len(dead)} dead-lettered); nothing to index")
    if sample is None:
        sample = sample_input(scan, next(i for i in scan.images if i.entry.image_id in plan.reused), p.image_size,
                              p.max_image_pixels)
    corpus = Corpus(np.array([i.encode("utf-8") for i in ids], dtype=object), np.stack(rows).astype(np.float32),
                    sample)
    export.check_corpus(corpus.ids, corpus.embeddings)
    counts = diff_counts(previous, ids, hashes)
    report.update(images=len(ids), **counts, reused=len(plan.reused), embedded=len(new_embeddings),
                  dead_lettered=_count_reasons(dead))
    logger.info("reindex: %d images: %d added, %d changed, %d unchanged, %d removed; %d embeddings reused, "
                "%d embedded, %d dead-lettered", len(ids), counts["added"], counts["changed"], counts["unchanged"],
                counts["removed"], len(plan.reused), len(new_embeddings), len(dead))
    if reuse and not new_embeddings and not (counts["added"] or counts["changed"] or counts["removed"]):
        report.update(version=None, unchanged_since=previous_version)
        logger.info("reindex: the usable images are exactly those of version %d: no new version written",
                    previous_version)
        _write_report(workdir, report)
        return None, report

    t = time.perf_counter()
    previous_params = ScannParams(**previous.scann) if previous is not None and previous.scann else None
    scann, scann_report = export.scann_retrieval_index(config, corpus, warm.query_embeddings(config, workdir),
                                                      previous=previous_params)
    servables = export.retrieval_servables(config, encoders, corpus, scann)
    seconds["index"] = time.perf_counter() - t

    t = time.perf_counter()
    version = export.choose_version(workdir, config.export.version)
    paths = write_version(workdir, version, servables, corpus, hashes, stats, encoders, scann_report["params"])
    if dead:
        report["dead_letters_file"] = workdir.reindex_dead_letters(version)
        write_dead_letters(report["dead_letters_file"], dead)
    seconds["write"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    report.update(version=version, k=export.effective_k(config.export.k, len(ids)), scann=scann_report,
                  paths=paths, seconds={k: round(v, 2) for k, v in seconds.items()})
    _write_report(workdir, report)
    logger.info("reindex: version %d of %s and %s over %d images in %.1f s; ScaNN %s", version,
                S.RETRIEVAL_SCANN, S.RETRIEVAL_BRUTEFORCE, len(ids), seconds["total"],
                ScannParams(**scann_report["params"]).describe())
    return version, report


def assemble(scan: CatalogScan, plan: Plan, previous: Optional[corpus_embeddings.CorpusEmbeddings],
             new_embeddings: Dict[str, np.ndarray], new_hashes: Dict[str, str]):
    """(ids, embedding rows, content hashes, file stats) of the new corpus, in catalog order: each image's
    kept row or new embedding; images dead-lettered while embedding are left out."""
    ids, rows, hashes, stats = [], [], [], []
    for image in scan.images:
        image_id = image.entry.image_id
        if image_id in plan.reused:
            rows.append(previous.embeddings[plan.reused[image_id]])
            hashes.append(image.hash)
        elif image_id in new_embeddings:
            rows.append(new_embeddings[image_id])
            hashes.append(new_hashes[image_id])
        else:
            continue
        ids.append(image_id)
        stats.append(image.stat)  # taken before the file was read: a change after it shows next time
    return ids, rows, hashes, stats


def write_version(workdir: Workdir, version: int, servables: Dict[str, export.Servable], corpus: Corpus,
                  hashes: List[str], stats: List[str], encoders: SavedEncoders,
                  scann_params: Dict[str, object]) -> Dict[str, str]:
    """Both retrieval models as `version` (each renamed into place when complete), then the corpus
    embeddings of that version; returns the paths written."""
    paths = {}
    for name in (S.RETRIEVAL_BRUTEFORCE, S.RETRIEVAL_SCANN):
        servable = servables[name]
        paths[name] = export.save_version(servable, workdir.export_model(name), version,
                                          export.warmup_logs(name, servable, corpus.sample_image))
        logger.info("reindex: wrote %s", paths[name])
    paths["corpus_embeddings"] = export.write_corpus_embeddings(
        workdir, version, corpus, np.array([h.encode("ascii") for h in hashes], dtype=bytes),
        np.array([s.encode("utf-8") for s in stats], dtype=bytes), encoders.version, encoders.image_source,
        scann_params, "reindex")
    return paths


def _count_reasons(dead: List[dict]) -> Dict[str, object]:
    by_reason = collections.Counter(f"{d['source']}/{d['reason']}" for d in dead)
    return {"total": len(dead), "by_reason": dict(sorted(by_reason.items()))}


def _write_report(workdir: Workdir, report: Dict[str, object]) -> None:
    tf.io.gfile.makedirs(workdir.export)
    with tf.io.gfile.GFile(workdir.reindex_report, "w") as f:
        json.dump(report, f, indent=2)
    logger.info("reindex: wrote %s", workdir.reindex_report)


def catalog_signature(path: str) -> Optional[Tuple[int, int]]:
    """(size, modification time in ns) of the catalog file, or None while it does not exist."""
    try:
        stat = tf.io.gfile.stat(path)
    except tf.errors.NotFoundError:
        return None
    return stat.length, stat.mtime_nsec


def watch(config, workdir: Workdir, rehash: bool, poll_seconds: float, stop: threading.Event) -> int:
    """Runs a reindex pass at start and then whenever the catalog file changes, until `stop` is set; returns
    the number of passes.  A pass that fails (a bad catalog, no export yet) is logged and the watch goes on.

    Only the catalog file is watched: an image file replaced in place under an unchanged catalog line is
    found by the next pass the catalog triggers (or a one-off `clicklens reindex`)."""
    warm = WarmState()
    path = catalog_path(config, workdir)
    seen: object = ()  # never a signature: the first check runs a pass
    passes = 0
    logger.info("reindex: watching %s every %.1f s (Ctrl-C or SIGTERM stops)", path, poll_seconds)
    while not stop.is_set():
        current = catalog_signature(path)
        if current != seen:
            seen = current
            passes += 1
            try:
                reindex(config, workdir, rehash=rehash, warm=warm)
            except ClicklensError as err:
                logger.error("reindex: pass %d failed: %s; watching on", passes, err)
            except Exception:  # noqa: BLE001  (a long-running watch outlives one bad pass)
                logger.exception("reindex: pass %d failed; watching on", passes)
        stop.wait(poll_seconds)
    logger.info("reindex: stopped watching after %d passes", passes)
    return passes


def run(config, workdir: Workdir, args) -> int:
    """The `reindex` verb (`--watch`: until SIGTERM or Ctrl-C)."""
    rehash = bool(getattr(args, "rehash", False))
    if not getattr(args, "watch", False):
        reindex(config, workdir, rehash=rehash)
        return 0
    watch(config, workdir, rehash, args.poll_seconds, stop_on_signals())
    return 0
