"""One pass over an image catalog: each image's content hash, and the dead letters of what cannot be used.

    scan = scan_catalog(path, image_source, feature_dim)
    scan.images        # ScannedImage(entry, hash) per usable image id, in catalog order
    scan.dead_letters  # bad lines, duplicate ids, missing files / features (clicklens/dead_letters.py records)
    read_input(scan, image)   # the image's raw input again (file bytes or feature vector)

`clicklens export` records the hashes next to the corpus embeddings and
`clicklens reindex` compares them, so an image is re-embedded only when its
bytes changed.  Given the recorded file stats (`known`: path, size and
modification time -> hash), a file whose stat is unchanged takes its recorded
hash without being read.  Lines are parsed, duplicate ids resolved and files read by the
same functions as the pipeline's ReadCatalogImages (clicklens/catalog.py);
files are read by a few threads at once (a remote catalog is latency-bound)
and only their hashes are kept, so a catalog of large photos is not held in
memory.  Whether the bytes decode is checked later, only for the images that
are embedded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens.catalog import (CatalogEntry, ImageInput, first_entry, parse_catalog_line, read_catalog_bytes,
                               read_image_input, uri_resolver)
from clicklens.corpus_embeddings import content_hash, file_stat
from clicklens.dead_letters import dead_letter, image_dead_letter
from clicklens.errors import BadRecord

logger = logging.getLogger(__name__)

READ_THREADS = 8
READ_CHUNK = 512  # images per thread task: one future per image would cost more than reading a small file
LOG_EVERY = 25_000


@dataclasses.dataclass(frozen=True)
class ScannedImage:
    """A catalog image whose raw input could be read, and the content hash of that input."""

    entry: CatalogEntry
    hash: str
    stat: str = ""  # file_stat() taken before the file was read; "" for feature vectors


@dataclasses.dataclass
class CatalogScan:
    """The outcome of `scan_catalog`."""

    path: str
    image_source: str
    feature_dim: int
    images: List[ScannedImage]
    dead_letters: List[Dict[str, object]]
    lines: int
    files_read: int = 0  # files read and hashed (the others' stat matched `known`)
    files_trusted: int = 0  # local files not stat'ed: their catalog line is unchanged since `trusted` (below)
    allow_outside_uris: bool = False  # pipeline.allow_outside_uris
    parsed: Optional["ParsedCatalog"] = None  # the catalog's parse, for the next scan of the same file


def read_file(path: str) -> bytes:
    """A whole file from any TensorFlow filesystem (gs://, ...); local files with Python's own (faster) reads."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def stat_file(path: str) -> str:
    """file_stat() of a file, or "" when it cannot be stat'ed (reading it then says why)."""
    try:
        if "://" not in path:
            st = os.stat(path)
            return file_stat(path, st.st_size, st.st_mtime_ns)
        st = tf.io.gfile.stat(path)
        return file_stat(path, st.length, st.mtime_nsec)
    except Exception:  # noqa: BLE001  (missing, permissions, ...: left to read_image_input's dead letter)
        return ""


def read_input(scan: CatalogScan, image: ScannedImage) -> ImageInput:
    """The raw input of a scanned image, read again (raises BadRecord if it has gone since)."""
    return read_image_input(image.entry, scan.path, scan.image_source, scan.feature_dim, read_file,
                            scan.allow_outside_uris)


@dataclasses.dataclass
class ParsedCatalog:
    """The parsed whole lines of a catalog file's first `size` bytes; a later pass over the same file parses
    only what was appended after them (`parse_entries(..., previous=)`), as `clicklens reindex --watch` does."""

    size: int = 0
    digest: bytes = b""  # of those bytes: the file must still start with them
    by_id: Dict[str, List[CatalogEntry]] = dataclasses.field(default_factory=dict)  # in order of first appearance
    dead: List[Dict[str, object]] = dataclasses.field(default_factory=list)  # lines that did not parse
    lines: int = 0  # non-blank lines

    def extended(self, data: bytes) -> "ParsedCatalog":
        """A copy with the lines of `data` parsed and added (this one is left as it was)."""
        by_id, dead, lines = dict(self.by_id), list(self.dead), self.lines
        for line in data.split(b"\n"):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            lines += 1
            try:
                entry = parse_catalog_line(line)
            except BadRecord as err:
                dead.append(dead_letter("catalog", err.reason, line, err.detail))
                continue
            except Exception as err:  # noqa: BLE001  (a bad line must never stop the run)
                dead.append(dead_letter("catalog", "internal_error", line, repr(err)[:200]))
                continue
            by_id[entry.image_id] = by_id.get(entry.image_id, []) + [entry]  # a new list: self's stay unchanged
        return ParsedCatalog(self.size + len(data), b"", by_id, dead, lines)

    def resolved(self) -> Tuple[List[CatalogEntry], List[Dict[str, object]]]:
        """(one entry per image id, in the order ids first appear; dead letters, duplicate ids included)."""
        entries, dead = [], list(self.dead)
        for same_id in self.by_id.values():
            if len(same_id) == 1:  # nearly every id: no sort, no dead letter to add
                entries.append(same_id[0])
                continue
            kept, duplicates = first_entry(same_id)
            entries.append(kept)
            dead.extend(dead_letter("catalog", "duplicate_image_id", d.to_json()) for d in duplicates)
        return entries, dead


def _digest(data) -> bytes:
    return hashlib.sha1(data).digest()


def parse_entries(path: str, previous: Optional[ParsedCatalog] = None
                  ) -> Tuple[List[CatalogEntry], List[Dict[str, object]], int, ParsedCatalog]:
    """(one entry per image id in the order ids first appear, dead letters, non-blank lines, the parse to pass
    as `previous` next time) of a catalog file.

    With `previous` (an earlier parse of the same file), a file that still starts with the bytes it parsed
    has only the rest parsed; any other change is parsed whole.
    """
    data = read_catalog_bytes(path)
    view = memoryview(data)
    base = ParsedCatalog()
    if previous is not None and 0 < previous.size <= len(data) and _digest(view[:previous.size]) == previous.digest:
        base = previous
    whole = data.rfind(b"\n") + 1  # a last line without its newline may still be being written: not kept
    parsed = base.extended(data[base.size:whole]) if whole > base.size else base
    if parsed is not base:
        parsed.digest = _digest(view[:whole])
    everything = parsed.extended(data[whole:]) if whole < len(data) else parsed
    entries, dead = everything.resolved()
    return entries, dead, everything.lines, parsed


def scan_catalog(path: str, image_source: str, feature_dim: int, known: Optional[Dict[str, str]] = None,
                 threads: int = READ_THREADS, log_prefix: Optional[str] = None,
                 allow_outside_uris: bool = False, previous: Optional[ParsedCatalog] = None,
                 trusted: Optional[Dict[str, ScannedImage]] = None) -> CatalogScan:
    """Parses the catalog at `path` and hashes every image's raw input (see the module docstring).

    `known` maps file_stat() records to the hashes taken with them: a file whose
    stat is there is not read again.  `previous`: the `parsed` of an earlier
    scan of the same file (parse_entries).  `trusted`: that scan's images by id;
    a local image whose entry is the very one parsed then (its line unchanged)
    keeps that scan's hash and stat without a stat now, and `changed_files`
    must check them afterwards (`clicklens reindex --watch` does, after
    publishing).
    """
    entries, dead, lines, parsed = parse_entries(path, previous)
    scan = CatalogScan(path, image_source, feature_dim, [], dead, lines, allow_outside_uris=allow_outside_uris,
                       parsed=parsed)
    known = known or {}
    resolve = uri_resolver(path)

    def stat_of(entry: CatalogEntry) -> str:
        return stat_file(resolve(entry.uri)) if image_source != "features" and entry.uri else ""

    def hash_chunk(chunk: List[Tuple[CatalogEntry, Optional[str]]]):
        results = []
        for entry, stat in chunk:
            stat = stat_of(entry) if stat is None else stat
            if stat and stat in known:
                results.append((known[stat], stat, False))
                continue
            try:
                raw = read_image_input(entry, path, image_source, feature_dim, read_file, allow_outside_uris)
                results.append((content_hash(raw), stat, True))
            except BadRecord as err:
                results.append(err)
        return results

    # Local files are stat'ed here, in one loop (a thread pool costs more than a local stat); the files to
    # read, and every remote file (latency-bound), go to the threads.
    results: List[object] = [None] * len(entries)
    pending: List[Tuple[int, CatalogEntry, Optional[str]]] = []
    remote = "://" in path
    trusted = trusted or {}
    for i, entry in enumerate(entries):
        if remote or "://" in entry.uri:
            pending.append((i, entry, None))
            continue
        before = trusted.get(entry.image_id)
        if before is not None and before.entry is entry:
            results[i] = before
            scan.files_trusted += 1
            continue
        stat = stat_of(entry)
        if stat and stat in known:
            results[i] = (known[stat], stat, False)
        else:
            pending.append((i, entry, stat))
    chunks = [pending[i:i + READ_CHUNK] for i in range(0, len(pending), READ_CHUNK)]
    done = len(entries) - len(pending)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for chunk, chunk_results in zip(chunks, pool.map(hash_chunk, [[(e, s) for _, e, s in c] for c in chunks])):
            for (i, _, _), result in zip(chunk, chunk_results):
                results[i] = result
                scan.files_read += isinstance(result, tuple) and result[2]
            done += len(chunk)
            if log_prefix and (done % LOG_EVERY < READ_CHUNK or done == len(entries)):
                logger.info("%s: %d / %d catalog images hashed (%d files read, the others' size and "
                            "modification time unchanged)", log_prefix, done, len(entries), scan.files_read)
    for entry, result in zip(entries, results):
        if isinstance(result, ScannedImage):
            scan.images.append(result)
        elif isinstance(result, BadRecord):
            scan.dead_letters.append(image_dead_letter(entry, result.reason, result.detail))
        else:
            content, stat, _ = result
            scan.images.append(ScannedImage(entry, content, stat))
    return scan


def changed_files(scan: CatalogScan) -> List[str]:
    """Ids of the scan's local images whose file no longer has the stat (path, size, modification time) the
    scan recorded: replaced, touched or gone since."""
    if "://" in scan.path:
        return []
    resolve = uri_resolver(scan.path)
    return [image.entry.image_id for image in scan.images
            if image.stat and "://" not in image.entry.uri and stat_file(resolve(image.entry.uri)) != image.stat]
