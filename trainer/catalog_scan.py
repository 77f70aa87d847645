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
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens.catalog import CatalogEntry, ImageInput, first_entry, parse_catalog_line, read_image_input, resolve_uri
from clicklens.corpus_embeddings import content_hash, file_stat
from clicklens.dead_letters import dead_letter, image_dead_letter
from clicklens.errors import BadRecord, ClicklensError

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
    allow_outside_uris: bool = False  # pipeline.allow_outside_uris


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


def parse_entries(path: str) -> Tuple[List[CatalogEntry], List[Dict[str, object]], int]:
    """(one entry per image id in the order ids first appear, dead letters, non-blank lines) of a catalog file."""
    if not tf.io.gfile.exists(path):
        raise ClicklensError(f"image catalog {path} not found (set pipeline.catalog)")
    by_id: Dict[str, List[CatalogEntry]] = {}
    dead: List[Dict[str, object]] = []
    lines = 0
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()  # at once: GFile's line iterator costs more than the parsing
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
        by_id.setdefault(entry.image_id, []).append(entry)
    entries = []
    for same_id in by_id.values():
        kept, duplicates = first_entry(same_id)
        entries.append(kept)
        dead.extend(dead_letter("catalog", "duplicate_image_id", d.to_json()) for d in duplicates)
    return entries, dead, lines


def scan_catalog(path: str, image_source: str, feature_dim: int, known: Optional[Dict[str, str]] = None,
                 threads: int = READ_THREADS, log_prefix: Optional[str] = None,
                 allow_outside_uris: bool = False) -> CatalogScan:
    """Parses the catalog at `path` and hashes every image's raw input (see the module docstring).

    `known` maps file_stat() records to the hashes taken with them: a file whose
    stat is there is not read again.
    """
    entries, dead, lines = parse_entries(path)
    scan = CatalogScan(path, image_source, feature_dim, [], dead, lines, allow_outside_uris=allow_outside_uris)
    known = known or {}

    def hash_chunk(chunk: List[CatalogEntry]):
        results = []
        for entry in chunk:
            stat = stat_file(resolve_uri(entry.uri, path)) if image_source != "features" and entry.uri else ""
            if stat and stat in known:
                results.append((known[stat], stat, False))
                continue
            try:
                raw = read_image_input(entry, path, image_source, feature_dim, read_file, allow_outside_uris)
                results.append((content_hash(raw), stat, True))
            except BadRecord as err:
                results.append(err)
        return results

    chunks = [entries[i:i + READ_CHUNK] for i in range(0, len(entries), READ_CHUNK)]
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for chunk, results in zip(chunks, pool.map(hash_chunk, chunks)):
            for entry, result in zip(chunk, results):
                if isinstance(result, BadRecord):
                    scan.dead_letters.append(image_dead_letter(entry, result.reason, result.detail))
                else:
                    content, stat, was_read = result
                    scan.images.append(ScannedImage(entry, content, stat))
                    scan.files_read += was_read
            done += len(chunk)
            if log_prefix and (done % LOG_EVERY < READ_CHUNK or done == len(entries)):
                logger.info("%s: %d / %d catalog images hashed (%d files read, the others' size and "
                            "modification time unchanged)", log_prefix, done, len(entries), scan.files_read)
    return scan
