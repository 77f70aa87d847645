"""The corpus embeddings an export keeps, so `clicklens reindex` embeds only new or changed images.

    W/export/corpus_embeddings/<version>/embeddings.npz    ids    bytes [N]      image ids
                                                           hashes bytes [N]      content hash per image ("" unknown)
                                                           stats  bytes [N]      the file's path, size and mtime
                                                                                 when it was hashed ("" unknown)
                                                           embeddings float32 [N, D]
    W/export/corpus_embeddings/<version>/manifest.json     image_encoder_version, image_source, count, dim,
                                                           written_by (export | reindex), scann (the index's params),
                                                           scann_rows_since_build (rows reindex changed in that index
                                                           since it was last built: trainer/scann_update.py)

`<version>` is the version of the retrieval models built over exactly these
rows (`clicklens export` writes all four models and this at one version;
`clicklens reindex` the two retrieval models and this).  A row's embedding was
computed by `image_encoder/<image_encoder_version>/`; its content hash is the
SHA-256 (hex) of the image file's bytes, or, with `pipeline.image_source:
features`, of the feature vector as little-endian float32 (`content_hash`).
`stats` (`file_stat`) lets the next reindex take a file whose path, size and
modification time are unchanged at its recorded hash without reading it, as
rsync and git do (`clicklens reindex --rehash` reads every file).
Like a model version, a version folder is written under a temporary name and
renamed into place, and never overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from clicklens import servables
from clicklens.workdir import join

EMBEDDINGS_FILE = "embeddings.npz"
MANIFEST_FILE = "manifest.json"
UNKNOWN_HASH = ""


def file_stat(path: str, size: int, mtime_ns: int) -> str:
    """The stat record of an image file: path, size and modification time (nanoseconds)."""
    return f"{size}:{mtime_ns}:{path}"


def content_hash(raw: Union[bytes, Sequence[float]]) -> str:
    """SHA-256 hex of an image's raw input: file bytes, or a feature vector as little-endian float32."""
    if not isinstance(raw, (bytes, bytearray)):
        raw = np.asarray(raw, dtype="<f4").tobytes()
    return hashlib.sha256(raw).hexdigest()


@dataclasses.dataclass(frozen=True)
class CorpusEmbeddings:
    """Every image of one retrieval version: ids, content hashes and embeddings, and what embedded them."""

    ids: np.ndarray  # bytes [N]
    hashes: np.ndarray  # bytes [N], hex SHA-256 or b"" (unknown: never reused)
    embeddings: np.ndarray  # float32 [N, D]
    image_encoder_version: int
    image_source: str
    written_by: str = "export"
    scann: Optional[Dict[str, Any]] = None  # the ScaNN params of the retrieval_scann version over these rows
    stats: Optional[np.ndarray] = None  # bytes [N], file_stat() when hashed, b"" unknown; None: all unknown
    scann_rows_since_build: int = 0  # rows added, changed or removed by updates of the ScaNN index since its build

    def __post_init__(self):
        if self.stats is None:
            object.__setattr__(self, "stats", np.full(len(self.ids), b"", dtype=bytes))
        if not (len(self.ids) == len(self.hashes) == len(self.stats) == len(self.embeddings)) or \
                np.ndim(self.embeddings) != 2:
            raise ValueError(f"corpus embeddings: ids {np.shape(self.ids)}, hashes {np.shape(self.hashes)}, stats "
                             f"{np.shape(self.stats)} and embeddings {np.shape(self.embeddings)} do not match")

    def manifest(self, version: int) -> Dict[str, Any]:
        return {"version": version, "image_encoder_version": self.image_encoder_version,
                "image_source": self.image_source, "count": int(len(self.ids)),
                "dim": int(self.embeddings.shape[1]), "written_by": self.written_by, "scann": self.scann,
                "scann_rows_since_build": self.scann_rows_since_build}


def versions(base_path: str) -> Dict[int, str]:
    """{version: folder} of the complete versions (those with a manifest) under base_path."""
    import tensorflow as tf  # here, not at the top: numpy users of the hash need no TensorFlow

    if not tf.io.gfile.isdir(base_path):
        return {}
    found = {}
    for entry in tf.io.gfile.listdir(base_path):
        name = entry.rstrip("/")
        if name.isdigit() and tf.io.gfile.exists(join(base_path, name, MANIFEST_FILE)):
            found.setdefault(int(name), join(base_path, name))
    return dict(sorted(found.items()))


def all_version_numbers(base_path: str) -> set:
    """Every integer folder name under base_path, complete or not (an exporter choosing a new number)."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(base_path):
        return set()
    return {int(e.rstrip("/")) for e in tf.io.gfile.listdir(base_path) if e.rstrip("/").isdigit()}


def write(base_path: str, version: int, corpus: CorpusEmbeddings) -> str:
    """Writes <base_path>/<version>/ via a temporary folder renamed into place; returns its path."""
    import tensorflow as tf

    tmp, final = servables.start_version(base_path, version)
    tf.io.gfile.makedirs(tmp)
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.asarray(corpus.ids, dtype=bytes), hashes=np.asarray(corpus.hashes, dtype=bytes),
             stats=np.asarray(corpus.stats, dtype=bytes), embeddings=np.asarray(corpus.embeddings, np.float32))
    with tf.io.gfile.GFile(join(tmp, EMBEDDINGS_FILE), "wb") as f:
        f.write(buffer.getvalue())
    with tf.io.gfile.GFile(join(tmp, MANIFEST_FILE), "w") as f:
        json.dump(corpus.manifest(version), f, indent=2)
    tf.io.gfile.rename(tmp, final)
    return final


def read(folder: str) -> CorpusEmbeddings:
    """The corpus embeddings of one version folder."""
    import tensorflow as tf

    with tf.io.gfile.GFile(join(folder, MANIFEST_FILE), "r") as f:
        manifest = json.load(f)
    with tf.io.gfile.GFile(join(folder, EMBEDDINGS_FILE), "rb") as f:
        arrays = np.load(io.BytesIO(f.read()), allow_pickle=False)
        ids, hashes, embeddings = arrays["ids"], arrays["hashes"], arrays["embeddings"]
        stats = arrays["stats"] if "stats" in arrays.files else None
    return CorpusEmbeddings(ids, hashes, embeddings.astype(np.float32), int(manifest["image_encoder_version"]),
                            manifest["image_source"], manifest.get("written_by", "export"), manifest.get("scann"),
                            stats, int(manifest.get("scann_rows_since_build", 0)))


def read_latest(base_path: str) -> Optional[Tuple[int, CorpusEmbeddings]]:
    """(version, corpus embeddings) of the newest complete version under base_path, or None."""
    found = versions(base_path)
    if not found:
        return None
    version = max(found)
    return version, read(found[version])
