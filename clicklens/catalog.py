"""The image catalog: one JSON object per line, image id -> image file and/or features.

    {"image_id": "img_00017", "uri": "images/img_00017.png"}
    {"image_id": "img_00018", "uri": "gs://bucket/images/a.jpg", "features": [0.1, 0.7, ...]}

`uri` is a local path or any Beam/TF filesystem path; a relative path is
resolved against the folder holding the catalog file.  `features` is an
optional precomputed feature vector (used when pipeline.image_source is
`features`).  Other keys (e.g. the demo generator's attributes) are kept in
`extra` and ignored by the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from clicklens.errors import BadRecord


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


def resolve_uri(uri: str, catalog_path: str) -> str:
    """Resolves a catalog uri against the catalog file's folder."""
    if "://" in uri or uri.startswith("/"):
        return uri
    base = catalog_path.rsplit("/", 1)[0] if "/" in catalog_path else "."
    return posixpath.normpath(posixpath.join(base, uri)) if "://" not in base else f"{base}/{uri}"


def parse_catalog_line(line: bytes | str) -> CatalogEntry:
    """Parses one catalog line.  Raises BadRecord with the reason."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRecord("not_utf8", str(err)) from None
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRecord("bad_json", str(err)[:200]) from None
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
    import tensorflow as tf  # here, not at the top: the pipeline parses catalog lines without TensorFlow

    with tf.io.gfile.GFile(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield parse_catalog_line(line)
            except BadRecord as err:
                if on_bad is not None:
                    on_bad(line, err)
