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
4. index: retrieval_bruteforce needs none: it is published first, so a server loads it meanwhile (and it is
   published even when this step fails).  The replaced ScaNN index is updated in place (scann's upsert /
   delete) while a rebuild would choose the same layout and little has changed since its build
   (trainer/scann_update.py); else the layout derived for the new corpus size is built, with the replaced
   index's search depth kept when it still meets export.min_recall (trainer/scann_tuning.py).
5. write: retrieval_scann, then (at a lower CPU priority: trainer/lower_priority.py) the corpus embeddings, the
   dead letters and the report.  Each model is written under a temporary name and renamed into place; under
   a watch, a model whose graph is the one the watch saved last is written as that graph plus a checkpoint of
   its new variables (trainer/saved_graphs.py).  Both models get the same new version number.

A running server polls the model folders and hot-loads the new versions (serving/model_registry.py:
loaded and warmed up before they take traffic); the search page's /images/ route re-reads the catalog.
The encoders are not rewritten: their newest version stays what export wrote.

`clicklens reindex --watch` stays up and runs a pass whenever the catalog file changes (checked every
--poll-seconds), keeping between passes what a one-off run loads each time (`WarmState`): TensorFlow,
the encoders (loaded again when a newer export appears), the newest corpus rows (those it wrote last,
not read back), the embedded tuning queries and the catalog's parse (a catalog that only grew has only
its new lines parsed); its first pass warms up what the first new images run.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import corpus_embeddings
from clicklens import servables as S
from clicklens.catalog import catalog_path, resolve_uri, unusable_image
from clicklens.corpus_embeddings import content_hash
from clicklens.dead_letters import image_dead_letter, write_dead_letters
from clicklens.errors import BadRecord, ClicklensError
from clicklens.shutdown import stop_on_signals
from clicklens.workdir import Workdir, join, write_text_atomically
from trainer import export, scann_tuning, scann_update
from trainer.catalog_scan import (READ_THREADS, CatalogScan, ParsedCatalog, ScannedImage, changed_files, read_input,
                                  scan_catalog)
from trainer.corpus import Corpus
from trainer.lower_priority import run_at_lower_priority
from trainer.ranking import exact_top_k
from trainer.saved_encoders import SavedEncoders, load_saved_encoders
from trainer.saved_graphs import SavedGraphs
from trainer.scann_index import ScannIndex, ScannParams

logger = logging.getLogger(__name__)

EMBED_CHUNK = 256  # images read, prepared and embedded at a time
LOG_EVERY = 5_000


class KeptRows:
    """The corpus rows of one retrieval version (clicklens/corpus_embeddings.py) and the lookups a pass makes
    in them, each built once (a watch keeps them from one pass to the next)."""

    def __init__(self, version: int, rows: corpus_embeddings.CorpusEmbeddings,
                 decoded: Optional[Tuple[List[str], List[str], List[str]]] = None):
        """`decoded`: the rows' (ids, hashes, stats) as str, when the caller has them."""
        self.version, self.rows = version, rows
        if decoded is not None:
            self.ids, self.hashes, self.stats = decoded

    @functools.cached_property
    def ids(self) -> List[str]:
        return [i.decode("utf-8") for i in self.rows.ids]

    @functools.cached_property
    def hashes(self) -> List[str]:
        return [h.decode("ascii") for h in self.rows.hashes]

    @functools.cached_property
    def stats(self) -> List[str]:
        return [s.decode("utf-8") for s in self.rows.stats]

    @functools.cached_property
    def hash_by_stat(self) -> Dict[str, str]:
        """{file stat: content hash} of the rows whose stat and hash were recorded."""
        return {stat: content for stat, content in zip(self.stats, self.hashes) if stat and content}

    @functools.cached_property
    def row_by_hash(self) -> Dict[str, int]:
        """{content hash: a row with it}."""
        return {content: row for row, content in enumerate(self.hashes) if content}

    @functools.cached_property
    def hash_by_id(self) -> Dict[str, str]:
        return dict(zip(self.ids, self.hashes))


class Plan:
    """Which catalog images reuse a kept embedding (found by content hash, under any id) and which are embedded."""

    def __init__(self, scan: CatalogScan, previous: Optional[KeptRows], reuse: bool):
        by_hash = previous.row_by_hash if previous is not None and reuse else {}
        self.reused: Dict[str, int] = {}  # image id -> row of the previous embeddings
        self.to_embed: List[ScannedImage] = []
        for image in scan.images:
            row = by_hash.get(image.hash)
            if row is not None:
                self.reused[image.entry.image_id] = row
            else:
                self.to_embed.append(image)


def diff_counts(previous: Optional[Dict[str, str]], ids: List[str], hashes: List[str]) -> Dict[str, int]:
    """added / changed (other bytes) / unchanged / removed image ids of the new rows against the previous
    ones ({id: content hash}, "" unknown)."""
    old = previous or {}
    counts = collections.Counter(added=0, changed=0, unchanged=0)
    for image_id, content in zip(ids, hashes):
        if image_id not in old:
            counts["added"] += 1
        elif old[image_id] and old[image_id] == content:
            counts["unchanged"] += 1
        else:
            counts["changed"] += 1
    counts["removed"] = len(old) - (len(ids) - counts["added"])
    return dict(counts)


def embed_new(scan: CatalogScan, images: List[ScannedImage], encoders: SavedEncoders, image_size: int,
              max_pixels: int,
              dead_letters: List[dict]) -> Tuple[Dict[str, np.ndarray], Dict[str, str], Optional[object]]:
    """({id: embedding}, {id: content hash of the bytes embedded}, one prepared input) of `images`.

    Each is read again (READ_THREADS at a time: a remote catalog is latency-bound), prepared as the
    pipeline stores it (EMBED_CHUNK images a call) and embedded by the exported image_encoder; what cannot
    be read or decoded is dead-lettered.  The next chunk is read and prepared while one is embedded: both
    are TensorFlow calls outside the GIL, so they share two cores.
    """
    preparer = None
    if scan.image_source != "features":
        from clicklens.images import png_preparer

        preparer = png_preparer(image_size, max_pixels)

    def read(image: ScannedImage):
        try:
            return read_input(scan, image)
        except BadRecord as err:
            return err

    def read_and_prepare(chunk: List[ScannedImage]):
        raws = list(readers.map(read, chunk))
        readable = [(image, raw) for image, raw in zip(chunk, raws) if not isinstance(raw, BadRecord)]
        if preparer is None:
            values = [np.asarray(raw, np.float32) for _, raw in readable]
        else:
            values = preparer.many([raw for _, raw in readable])
        return chunk, raws, readable, values

    embeddings: Dict[str, np.ndarray] = {}
    hashes: Dict[str, str] = {}
    sample = None
    done = 0
    chunks = [images[start:start + EMBED_CHUNK] for start in range(0, len(images), EMBED_CHUNK)]
    with ThreadPoolExecutor(max_workers=READ_THREADS) as readers, ThreadPoolExecutor(max_workers=1) as ahead:
        next_chunk = ahead.submit(read_and_prepare, chunks[0]) if chunks else None
        for position in range(len(chunks)):
            chunk, raws, readable, values = next_chunk.result()
            if position + 1 < len(chunks):
                next_chunk = ahead.submit(read_and_prepare, chunks[position + 1])
            ids, kept = [], []
            for (image, raw), value in zip(readable, values):
                if isinstance(value, Exception):
                    where = resolve_uri(image.entry.uri, scan.path) if image.entry.uri else ""
                    value = unusable_image(value, where)
                    dead_letters.append(image_dead_letter(image.entry, value.reason, value.detail))
                    continue
                ids.append(image.entry.image_id)
                kept.append(value)
                hashes[image.entry.image_id] = content_hash(raw)  # of the bytes embedded, should the file change
            for image, raw in zip(chunk, raws):
                if isinstance(raw, BadRecord):
                    dead_letters.append(image_dead_letter(image.entry, raw.reason, raw.detail))
            if sample is None and kept:
                sample = kept[0]
            embeddings.update(zip(ids, encoders.embed_image_values(kept)))
            done += len(chunk)
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

    (prepared,) = png_preparer(image_size, max_pixels).many([raw])  # the call embed_new makes: its graph is built
    if isinstance(prepared, Exception):
        raise unusable_image(prepared, image.entry.uri)
    return prepared


def query_embeddings(config, workdir: Workdir, encoders: SavedEncoders) -> np.ndarray:
    """The held-out eval queries export tunes ScaNN on, embedded by the exported query_encoder ([0, D] if none)."""
    queries = export.distinct_eval_queries(config, workdir)
    return encoders.embed_query_texts(queries) if queries else np.zeros((0, encoders.dim), np.float32)


def check_image_source(config, encoders: SavedEncoders) -> None:
    """ClicklensError unless pipeline.image_source is what the exported image_encoder takes."""
    if config.pipeline.image_source != encoders.image_source:
        raise ClicklensError(f"pipeline.image_source is {config.pipeline.image_source!r} but the exported "
                             f"{S.IMAGE_ENCODER} takes {encoders.image_input!r}: use the config it was exported with")


class WarmState:
    """What a reindex pass loads, kept for the next pass of the same process (`--watch`): the newest
    encoders, the newest corpus rows, the embedded tuning queries, the catalog's parse and scan, and the ScaNN
    index the pass updated (scann's pybind searcher and the exact top k of its check).  Each is loaded
    again when a newer version is on disk (a new export, or a version written by someone else), and the
    catalog is parsed whole again when it changed other than by growing."""

    def __init__(self):
        self._encoders: Optional[SavedEncoders] = None
        self._queries: Optional[np.ndarray] = None
        self._kept: Optional[KeptRows] = None
        self._scann: Optional[Tuple[int, scann_update.SavedIndex]] = None
        self._warmed_up = False
        self.graphs = SavedGraphs()  # the retrieval models' graphs, written again with new variables
        self._scan: Optional[CatalogScan] = None  # the previous pass's
        self._trusting = False  # whether its images may be trusted (catalog_scan.scan_catalog's `trusted`)

    def _last_scan(self, path: str) -> Optional[CatalogScan]:
        return self._scan if self._scan is not None and self._scan.path == path else None

    def parsed_catalog(self, path: str) -> Optional[ParsedCatalog]:
        """The previous pass's parse of the catalog at `path` (only appended lines are parsed again)."""
        scan = self._last_scan(path)
        return scan.parsed if scan is not None else None

    def trusted_images(self, path: str) -> Optional[Dict[str, ScannedImage]]:
        """The previous pass's images of the catalog at `path`, by id: an image whose line is unchanged keeps
        its hash without a stat (catalog_scan.scan_catalog's `trusted`), until `stale_images` says otherwise."""
        scan = self._last_scan(path)
        if scan is None or not self._trusting:
            return None
        return {image.entry.image_id: image for image in scan.images}

    def keep_scan(self, scan: CatalogScan) -> None:
        self._scan, self._trusting = scan, True

    def stale_images(self, path: str) -> List[str]:
        """Ids of the last scan's images whose file changed since it was stat'ed (catalog_scan.changed_files);
        when there are any, the next pass stats every file again."""
        scan = self._last_scan(path)
        changed = changed_files(scan) if scan is not None and scan.files_trusted else []
        if changed:
            self.distrust()
        return changed

    def distrust(self) -> None:
        """The next pass stats every file (the parse is kept)."""
        self._trusting = False

    def encoders(self, workdir: Workdir) -> SavedEncoders:
        """The newest exported encoders; ClicklensError naming the folder when nothing is exported."""
        if self._encoders is None or S.latest_version(workdir.export_model(S.IMAGE_ENCODER))[0] != \
                self._encoders.version:
            self._encoders, self._queries, self._warmed_up = load_saved_encoders(workdir), None, False
            self.graphs.clear()
        return self._encoders

    def warm_up(self, config, workdir: Workdir, sample) -> None:
        """Once per encoders: embeds the tuning queries and one prepared image, and takes an exact top-k as the
        index check does.  The first call of each builds what it runs (a graph, TensorFlow's thread pools),
        which a watch's first new images should not wait for."""
        if not self._warmed_up:
            self.query_embeddings(config, workdir)
            embedding = self._encoders.embed_image_values([sample])
            exact_top_k(embedding, embedding, 1)
            self._warmed_up = True

    def query_embeddings(self, config, workdir: Workdir) -> np.ndarray:
        """The eval queries ScaNN is tuned on, embedded by the newest query_encoder."""
        if self._queries is None:
            self._queries = query_embeddings(config, workdir, self.encoders(workdir))
        return self._queries

    def latest_corpus(self, workdir: Workdir) -> Optional[KeptRows]:
        """The rows of the newest complete corpus_embeddings version, or None."""
        found = corpus_embeddings.versions(workdir.corpus_embeddings)
        if not found:
            self._kept = None
        elif self._kept is None or self._kept.version != max(found):
            self._kept = KeptRows(max(found), corpus_embeddings.read(found[max(found)]))
        return self._kept

    def keep_written(self, kept: KeptRows, scann: Optional[scann_update.SavedIndex] = None) -> None:
        """The rows this process just wrote, and the ScaNN index it updated for them: the next pass starts from
        them without reading them back."""
        self._kept = kept
        self._scann = (kept.version, scann) if scann is not None else None

    def preload_scann_index(self, config, workdir: Workdir) -> None:
        """Reads the newest version's ScaNN index ahead of a change (scann_update.load_saved_index), when it is
        one an update could change in place, so that the first pass with new images does not."""
        kept = self._kept
        if kept is None or (self._scann is not None and self._scann[0] == kept.version) or not kept.rows.scann:
            return
        if not scann_update.updatable(ScannParams(**kept.rows.scann)):
            return
        queries, _ = scann_tuning.tuning_queries(self.query_embeddings(config, workdir), kept.rows.embeddings)
        folder = join(workdir.export_model(S.RETRIEVAL_SCANN), str(kept.version))
        try:
            saved = scann_update.load_saved_index(folder, queries, export.effective_k(config.export.k, len(kept.rows.ids)))
        except (tf.errors.OpError, ValueError, OSError) as err:  # the pass that needs it reads it (or rebuilds)
            logger.info("reindex: could not read the ScaNN index of version %d ahead: %s", kept.version,
                        str(err).splitlines()[0])
            return
        self._scann = (kept.version, saved)

    def prepare_graphs(self, config, corpus: Corpus) -> None:
        """Traces and saves (to a scratch folder) both retrieval models over the unchanged `corpus`, so that the
        next pass writes their variables only (trainer/saved_graphs.py); ScaNN's when its index was read ahead."""
        encoders = self._encoders
        self.graphs.prepare(export.bruteforce_retrieval(config, encoders, corpus), corpus.sample_image)
        kept = self._kept
        if self._scann is None or kept is None or self._scann[0] != kept.version or not kept.rows.scann:
            return
        saved = self._scann[1]
        index = ScannIndex.from_tensors(saved.tensors, saved.ids, export.effective_k(config.export.k, len(saved.ids)),
                                        ScannParams(**kept.rows.scann))
        self.graphs.prepare(export.scann_retrieval(config, encoders, corpus, index), corpus.sample_image)

    def take_scann_index(self, version: int) -> Optional[scann_update.SavedIndex]:
        """The ScaNN index this process wrote as `version` (its pybind searcher and the exact reference of its
        check), handed over once: the update changes the searcher in place."""
        kept, self._scann = self._scann, None
        return kept[1] if kept is not None and kept[0] == version else None


def reindex(config, workdir: Workdir, rehash: bool = False,
            warm: Optional[WarmState] = None) -> Tuple[Optional[int], Dict[str, object]]:
    """Builds the next version of both retrieval models over the catalog as it is now (module docstring).

    With `rehash`, every catalog file is read and hashed, whatever its stat.
    `warm` keeps what this pass loads for the next one, and warms up what the next one runs (`watch`).
    Returns (the version written, the report); the version is None when the
    catalog and the image_encoder are what the newest version was built from.
    """
    t0 = time.perf_counter()
    seconds: Dict[str, float] = {}
    watching = warm is not None
    warm = warm or WarmState()
    encoders = warm.encoders(workdir)  # fails naming W/export/image_encoder when nothing is exported
    check_image_source(config, encoders)
    p = config.pipeline
    kept = warm.latest_corpus(workdir)
    previous_version, previous = (kept.version, kept.rows) if kept is not None else (None, None)
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
    known = None if rehash or kept is None else kept.hash_by_stat
    scan = scan_catalog(path, p.image_source, p.feature_dim, known=known,
                        log_prefix="reindex", allow_outside_uris=p.allow_outside_uris,
                        previous=warm.parsed_catalog(path), trusted=None if rehash else warm.trusted_images(path))
    warm.keep_scan(scan)
    dead = list(scan.dead_letters)
    seconds["scan"] = time.perf_counter() - t
    plan = Plan(scan, kept, reuse)
    logger.info("reindex: catalog %s: %d lines, %d images readable, %d dead-lettered; %d reuse an embedding of "
                "corpus_embeddings/%s, %d to embed", path, scan.lines, len(scan.images), len(dead), len(plan.reused),
                previous_version if previous is not None else "-", len(plan.to_embed))
    report: Dict[str, object] = {
        "previous_version": previous_version, "catalog": path, "catalog_lines": scan.lines,
        "image_encoder_version": encoders.version, "reembedded_all": not reuse, "files_read": scan.files_read,
        "files_trusted": scan.files_trusted}
    t = time.perf_counter()
    new_embeddings, new_hashes, sample = embed_new(scan, plan.to_embed, encoders, p.image_size, p.max_image_pixels,
                                                   dead)
    seconds["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    ids, embeddings, hashes, stats = assemble(scan, plan, previous, new_embeddings, new_hashes, encoders.dim)
    if not ids:
        reasons = ", ".join(f"{n} {reason}" for reason, n in _count_reasons(dead)["by_reason"].items())
        raise ClicklensError(f"reindex: no usable image in {path} ({len(dead)} dead-lettered{': ' if dead else ''}"
                             f"{reasons}); nothing to index: the served versions stay as they are")
    if sample is None:
        sample = sample_input(scan, next(i for i in scan.images if i.entry.image_id in plan.reused), p.image_size,
                              p.max_image_pixels)
        if watching:
            warm.warm_up(config, workdir, sample)
    corpus = Corpus(np.array([i.encode("utf-8") for i in ids], dtype=object), embeddings, sample)
    export.check_corpus(corpus.ids, corpus.embeddings)
    counts = diff_counts(kept.hash_by_id if kept is not None else None, ids, hashes)
    report.update(images=len(ids), **counts, reused=len(plan.reused), embedded=len(new_embeddings),
                  dead_lettered=_count_reasons(dead))
    logger.info("reindex: %d images: %d added, %d changed, %d unchanged, %d removed; %d embeddings reused, "
                "%d embedded, %d dead-lettered", len(ids), counts["added"], counts["changed"], counts["unchanged"],
                counts["removed"], len(plan.reused), len(new_embeddings), len(dead))
    seconds["assemble"] = time.perf_counter() - t
    if reuse and not new_embeddings and not (counts["added"] or counts["changed"] or counts["removed"]):
        report.update(version=None, unchanged_since=previous_version)
        logger.info("reindex: the usable images are exactly those of version %d: no new version written",
                    previous_version)
        if watching:
            warm.preload_scann_index(config, workdir)
            warm.prepare_graphs(config, corpus)
        _write_report(workdir, report)
        return None, report

    # retrieval_bruteforce needs no index, so it is published first: a server loads it while the ScaNN index
    # is updated, and it stays published when the ScaNN step fails.
    version = export.choose_version(workdir, config.export.version)
    graphs: Dict[str, str] = {}  # model -> "reused" (the graph of the last version this process saved) / "traced"

    def publish(module) -> Dict[str, str]:
        name = module.name
        staged, reused = warm.graphs.stage(module, workdir.export_model(name), version, corpus.sample_image)
        graphs[name] = "reused" if reused else "traced"
        return export.publish_staged({name: staged})

    t = time.perf_counter()
    paths = publish(export.bruteforce_retrieval(config, encoders, corpus))
    seconds["exact"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        previous_params = ScannParams(**previous.scann) if previous is not None and previous.scann else None
        queries = warm.query_embeddings(config, workdir)
        seconds["queries"] = time.perf_counter() - t
        t = time.perf_counter()
        scann, scann_report, rows_since_build, updated = None, {}, 0, None
        if reuse and previous_params is not None:
            scann, scann_report, rows_since_build, updated = updated_scann_index(
                config, workdir, previous_version, previous, previous_params, corpus, queries,
                warm.take_scann_index(previous_version))
        if scann is None:
            scann, scann_report = export.scann_retrieval_index(config, corpus, queries, previous=previous_params)
        seconds["index"] = time.perf_counter() - t
        t = time.perf_counter()
        paths.update(publish(export.scann_retrieval(config, encoders, corpus, scann)))
        seconds["scann"] = time.perf_counter() - t
    except Exception:
        logger.error("reindex: %s version %d is published, but %s failed and stays at its previous version "
                     "(the next pass writes both again)", S.RETRIEVAL_BRUTEFORCE, version, S.RETRIEVAL_SCANN)
        raise
    # Both models are published: the rest waits for a server loading them on the same cores.
    t = time.perf_counter()
    rows_written = corpus_embeddings.CorpusEmbeddings(
        corpus.ids, np.array([h.encode("ascii") for h in hashes], dtype=bytes), corpus.embeddings, encoders.version,
        encoders.image_source, "reindex", scann_report["params"], np.array([s.encode("utf-8") for s in stats],
                                                                           dtype=bytes), rows_since_build)
    paths["corpus_embeddings"] = run_at_lower_priority(corpus_embeddings.write, workdir.corpus_embeddings, version,
                                                       rows_written)
    warm.keep_written(KeptRows(version, rows_written, (ids, hashes, stats)), updated)
    if dead:
        report["dead_letters_file"] = workdir.reindex_dead_letters(version)
        write_dead_letters(report["dead_letters_file"], dead)
    seconds["write"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    report.update(version=version, k=export.effective_k(config.export.k, len(ids)), scann=scann_report,
                  paths=paths, graphs=graphs, seconds={k: round(v, 2) for k, v in seconds.items()})
    _write_report(workdir, report)
    logger.info("reindex: version %d of %s and %s over %d images in %.1f s (graphs %s); ScaNN %s", version,
                S.RETRIEVAL_SCANN, S.RETRIEVAL_BRUTEFORCE, len(ids), seconds["total"],
                ", ".join(f"{name} {how}" for name, how in graphs.items()),
                ScannParams(**scann_report["params"]).describe())
    return version, report


def updated_scann_index(config, workdir: Workdir, previous_version: int,
                        previous: corpus_embeddings.CorpusEmbeddings, params: ScannParams, corpus: Corpus,
                        queries: np.ndarray, kept: Optional[scann_update.SavedIndex] = None
                        ) -> Tuple[Optional[ScannIndex], Dict[str, object], int, Optional[scann_update.SavedIndex]]:
    """(index, report, rows changed since its build, the updated index to keep for a next pass) of the replaced
    version's ScaNN index updated to hold `corpus` (trainer/scann_update.py), or (None, {}, 0, None) when it must
    be rebuilt (the log says why).  `kept`: that version's index as the pass that wrote it left it (a watch),
    instead of reading it back from its checkpoint."""
    folder = join(workdir.export_model(S.RETRIEVAL_SCANN), str(previous_version))
    k = export.effective_k(config.export.k, len(corpus.ids))
    tuning_queries, derived = scann_tuning.tuning_queries(queries, corpus.embeddings)
    try:
        saved = kept or scann_update.read_saved_index(folder)
    except (tf.errors.OpError, ValueError) as err:
        logger.info("reindex: rebuilding the ScaNN index: cannot read the one of version %d (%s)", previous_version,
                    str(err).splitlines()[0])
        return None, {}, 0, None
    update = scann_update.update_index(saved, previous.ids, previous.embeddings, corpus.ids, corpus.embeddings, k,
                                       tuning_queries, params, config.export, previous.scann_rows_since_build)
    if update.why:
        logger.info("reindex: rebuilding the ScaNN index: %s", update.why)
        return None, {}, 0, None
    logger.info("reindex: ScaNN index of version %d updated (%s) in %.1f s, %s: recall@%d %.4f (min_recall %.2f); "
                "%d rows changed since it was built", previous_version,
                ", ".join(f"{n} {what}" for what, n in update.counts.items()), update.seconds["update"],
                update.params.describe(), k, update.trial.recall, config.export.min_recall, update.rows_since_build)
    index = ScannIndex.from_tensors(update.index_tensors, update.ids, k, update.params)
    report = {**update.report(config.export.min_recall, len(tuning_queries)), "corpus_derived_queries": derived}
    return index, report, update.rows_since_build, update.saved


def assemble(scan: CatalogScan, plan: Plan, previous: Optional[corpus_embeddings.CorpusEmbeddings],
             new_embeddings: Dict[str, np.ndarray], new_hashes: Dict[str, str], dim: int):
    """(ids, embeddings float32 [N, dim], content hashes, file stats) of the new corpus, in catalog order: each
    image's kept row or new embedding; images dead-lettered while embedding are left out."""
    ids, hashes, stats, kept_rows, new_rows = [], [], [], [], []
    for image in scan.images:
        image_id = image.entry.image_id
        row = plan.reused.get(image_id)
        if row is not None:
            kept_rows.append(row)
            new_rows.append(None)
            hashes.append(image.hash)
        elif image_id in new_embeddings:
            kept_rows.append(-1)
            new_rows.append(new_embeddings[image_id])
            hashes.append(new_hashes[image_id])
        else:
            continue
        ids.append(image_id)
        stats.append(image.stat)  # taken before the file was read: a change after it shows next time
    embeddings = np.zeros((len(ids), dim), np.float32)
    kept_rows = np.asarray(kept_rows, np.int64)
    is_kept = kept_rows >= 0
    if is_kept.any():
        embeddings[is_kept] = previous.embeddings[kept_rows[is_kept]]  # one gather, not a row at a time
    for position in np.flatnonzero(~is_kept):
        embeddings[position] = new_rows[position]
    return ids, embeddings, hashes, stats


def _count_reasons(dead: List[dict]) -> Dict[str, object]:
    by_reason = collections.Counter(f"{d['source']}/{d['reason']}" for d in dead)
    return {"total": len(dead), "by_reason": dict(sorted(by_reason.items()))}


def _write_report(workdir: Workdir, report: Dict[str, object]) -> None:
    tf.io.gfile.makedirs(workdir.export)
    write_text_atomically(workdir.reindex_report, json.dumps(report, indent=2))  # a reader never sees half of it
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

    Only the catalog file is watched.  A pass after the catalog grew does not stat the files of unchanged
    lines (a stat each is most of a pass over a large catalog); it stats them once the new version is
    published, and when a file was replaced under an unchanged line, the next pass stats them all again."""
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
                stale = run_at_lower_priority(warm.stale_images, path)  # a server may be loading the new version
                if stale:
                    logger.info("reindex: %d files changed under unchanged catalog lines (e.g. %s): another pass",
                                len(stale), stale[0])
                    seen = ()
                    continue
            except ClicklensError as err:
                warm.distrust()
                logger.error("reindex: pass %d failed: %s; watching on", passes, err)
            except Exception:  # noqa: BLE001  (a long-running watch outlives one bad pass)
                warm.distrust()
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
