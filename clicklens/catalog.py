"""The image catalog: one JSON object per line, image id -> image file and/or features.

    {"image_id": "img_00017", "uri": "images/img_00017.png"}
    {"image_id": "img_00018", "uri": "gs://bucket/images/a.jpg", "features": [0.1, 0.7, ...]}

`uri` is a local path or any Beam/TF filesystem path; a relative path is
resolved against the folder holding the catalog file.  `features` is an
optional precomputed feature vector (used when pipeline.image_source is
`features`).  Other keys (e.g. the demo generator's attributes) are kept in
`extra` and ignored by the pipeline.

Reading an entry's image is defined here once, for the pipeline's
ReadCatalogImages and for `clicklens reindex`: `read_image_input` (the file's
bytes, or the feature vector, raising BadRecord with the dead-letter reason:
`no_uri`, `missing_image`, `no_features`, `bad_feature_dim`) and
`unusable_image` (the BadRecord of bytes that clicklens.images.PngPreparer
could not prepare: `corrupt_image`, `image_too_large`);
`first_entry` is the rule that picks one entry when an id is listed twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import math
import posixpath
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from clicklens.errors import BadRecord, ClicklensError, parse_json_line


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """One image of the catalog."""

    image_id: str
    uri: str = ""
    features: Optional[Tuple[float, ...]] = None
    extra: Tuple[Tuple[str, Any], ...] = ()

    def to_json(self) -> str:
        data: Dict[str, Any] = {"image_id": self.image_id}
        if self.uri:
            data["uri"] = self.uri
        if self.features is not None:
            data["features"] = list(self.features)
        data.update(dict(self.extra))
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def catalog_path(config, workdir) -> str:
    """The catalog every stage reads (pipeline, export, reindex, the server's thumbnails): pipeline.catalog,
    or <workdir>/raw/catalog.jsonl when it is empty."""
    return config.pipeline.catalog or workdir.catalog


def resolve_uri(uri: str, catalog_path: str) -> str:
    """Resolves a catalog uri against the catalog file's folder."""
    if "://" in uri or uri.startswith("/"):
        return uri
    base = catalog_path.rsplit("/", 1)[0] if "/" in catalog_path else "."
    return posixpath.normpath(posixpath.join(base, uri)) if "://" not in base else f"{base}/{uri}"


def uri_resolver(catalog_path: str) -> Callable[[str], str]:
    """resolve_uri for one catalog, for many uris: the folder is normalised once, and a plain relative uri
    (no ".", ".." or empty parts) is appended to it without normalising the whole path each time."""
    base = catalog_path.rsplit("/", 1)[0] if "/" in catalog_path else "."
    if "://" in base:
        return lambda uri: resolve_uri(uri, catalog_path)
    folder = posixpath.normpath(base)
    prefix = "" if folder == "." else folder.rstrip("/") + "/"

    def resolve(uri: str) -> str:
        if "://" in uri or uri.startswith("/"):
            return uri
        if not uri or "/." in "/" + uri or "//" in uri or uri.endswith("/"):
            return resolve_uri(uri, catalog_path)
        return prefix + uri

    return resolve


def parse_catalog_line(line: bytes | str) -> CatalogEntry:
    """Parses one catalog line.  Raises BadRecord with the reason."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRecord("not_utf8", str(err)) from None
    data = parse_json_line(line)
    if not isinstance(data, dict):
        raise BadRecord("not_an_object")
    image_id = data.pop("image_id", None)
    if not isinstance(image_id, str) or not image_id.strip():
        raise BadRecord("bad_image_id", repr(image_id)[:200])
    uri = data.pop("uri", "") or ""
    if not isinstance(uri, str):
        raise BadRecord("bad_uri", repr(uri)[:200])
    features = data.pop("features", None)
    if features is not None:
        if not isinstance(features, list) or not features or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in features
        ):
            raise BadRecord("bad_features", "features must be a non-empty list of finite numbers")
        features = tuple(float(v) for v in features)
    if not uri and features is None:
        raise BadRecord("no_image", "a catalog entry needs a uri or features")
    return CatalogEntry(image_id=image_id.strip(), uri=uri, features=features, extra=tuple(sorted(data.items())))


def read_catalog(path: str, on_bad: Optional[Callable[[bytes, BadRecord], None]] = None) -> Iterator[CatalogEntry]:
    """Yields the entries of a catalog file (local or any TF filesystem), skipping blank lines.

    A line that does not parse goes to `on_bad(line, error)`, or is skipped when
    `on_bad` is None.  This is for tools and the server, which read a catalog
    whole; the Beam pipeline reads it with Beam and dead-letters bad lines.
    """
    for line in read_catalog_bytes(path).splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            yield parse_catalog_line(line)
        except BadRecord as err:
            if on_bad is not None:
                on_bad(line, err)


def read_catalog_bytes(path: str) -> bytes:
    """The whole catalog file (local or any TF filesystem), read at once (GFile's line iterator costs more than
    the parsing); ClicklensError when it is missing, a folder or cannot be read."""
    import tensorflow as tf  # here, not at the top: the pipeline parses catalog lines without TensorFlow

    if not tf.io.gfile.exists(path):
        raise ClicklensError(f"image catalog {path} not found (`clicklens generate-demo-data` writes the demo's; "
                             "for your own catalog set pipeline.catalog)")
    if tf.io.gfile.isdir(path):
        raise ClicklensError(f"image catalog {path} is a directory: pipeline.catalog names a JSON-lines file")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except (tf.errors.OpError, OSError) as err:
        raise ClicklensError(f"cannot read image catalog {path}: {getattr(err, 'message', err)}") from None


def first_entry(entries: Iterable[CatalogEntry]) -> Tuple[CatalogEntry, List[CatalogEntry]]:
    """(the entry kept, the duplicates dropped) of the entries sharing one image id.

    The first in a stable order (by their JSON), so every run keeps the same one.
    """
    entries = list(entries)
    if len(entries) == 1:  # the usual case: no JSON to build
        return entries[0], []
    ordered = sorted(entries, key=lambda e: e.to_json())
    return ordered[0], ordered[1:]


ImageInput = Union[bytes, Tuple[float, ...]]


def inside_catalog(path: str, catalog_path: str) -> bool:
    """True when `path` is in the catalog file's folder or below it (the same bucket for gs:// and the like)."""
    if "://" in path or "://" in catalog_path:
        bucket = lambda p: p.split("://", 1)[0] + "://" + p.split("://", 1)[-1].split("/", 1)[0]  # noqa: E731
        return "://" in path and "://" in catalog_path and bucket(path) == bucket(catalog_path)
    folder = os.path.realpath(os.path.dirname(catalog_path) or ".")
    return os.path.realpath(path).startswith(folder.rstrip(os.sep) + os.sep)


def read_image_input(entry: CatalogEntry, catalog_path: str, image_source: str, feature_dim: int,
                     read_file: Callable[[str], bytes], allow_outside: bool = False) -> ImageInput:
    """An entry's raw image input: its file's bytes (`read_file(resolved uri)`), or its feature vector.

    Raises BadRecord: `no_features` / `bad_feature_dim` (image_source features),
    `no_uri` / `missing_image` (pixels; any error of `read_file` is a missing image), `uri_outside_catalog`
    (a file outside the catalog's folder, not read unless `allow_outside`: pipeline.allow_outside_uris).
    """
    if image_source == "features":
        if entry.features is None:
            raise BadRecord("no_features")
        if len(entry.features) != feature_dim:
            raise BadRecord("bad_feature_dim", f"{len(entry.features)} != {feature_dim}")
        return tuple(entry.features)
    if not entry.uri:
        raise BadRecord("no_uri")
    path = resolve_uri(entry.uri, catalog_path)
    if not allow_outside and not inside_catalog(path, catalog_path):
        raise BadRecord("uri_outside_catalog", f"{path} (pipeline.allow_outside_uris lets catalogs name such files)")
    try:
        return read_file(path)
    except Exception as err:  # noqa: BLE001  (any filesystem's not-found / permission error)
        raise BadRecord("missing_image", f"{path}: {type(err).__name__}") from None


def unusable_image(err: Exception, where: str = "") -> BadRecord:
    """The BadRecord of an image that preparing raised `err` for: `image_too_large` or `corrupt_image`."""
    summary = error_summary(err)
    reason = "image_too_large" if "image too large to decode" in summary else "corrupt_image"
    return BadRecord(reason, f"{where}: {type(err).__name__}: {summary}"[:300])


def error_summary(err: Exception) -> str:
    """The line of an error's message that says what was wrong.

    TensorFlow puts it after the Python traceback of the graph's ops and
    before the op's name ("[[{{node ...}}]]"); other errors have one line.
    """
    lines = [line.strip() for line in str(getattr(err, "message", err)).splitlines()]
    lines = [line for line in lines if line and not line.startswith("[[")]
    return lines[-1] if lines else ""
