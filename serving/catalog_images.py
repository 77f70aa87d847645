"""Image id -> image bytes from the work directory's catalog, for the search page's thumbnails.

    GET /images/<image_id>   ->  the bytes of the catalog entry's uri

The request names an image id, never a path: the id is looked up in
W/raw/catalog.jsonl and only a uri that the catalog lists for that id is
read.  Ids that could only be a path trick (`..`, `/`, `\\`, NUL, also when
percent-encoded) are refused before the lookup, and a file is served only
when its bytes are an image of a known type, so even a catalog line pointing
at some other file cannot turn the route into a file reader.  As in the
pipeline, a uri outside the catalog's folder is not even opened unless
`pipeline.allow_outside_uris`, and only regular files are read (a catalog
line naming a FIFO would otherwise hold a request thread forever).  Refusals
name the image id, never the server's paths.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import urllib.parse
from typing import Dict, Optional, Tuple

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens.catalog import inside_catalog, read_catalog, resolve_uri

logger = logging.getLogger(__name__)

ROUTE_PREFIX = "/images/"
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_ID_CHARS = 256
RECHECK_SECONDS = 5.0  # how often the catalog file is checked for changes (a stat; remote on gs://)
# Leading bytes -> content type.  Anything else is not served.
IMAGE_SIGNATURES: Tuple[Tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class ImageRequestError(Exception):
    """A refused image request: `status` is the HTTP status (400 bad id, 404 unknown or unreadable)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def sniff_content_type(data: bytes) -> Optional[str]:
    """The image content type of `data` from its leading bytes, or None when it is not a known image."""
    for magic, content_type in IMAGE_SIGNATURES:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_id_from_path(request_path: str) -> str:
    """The image id of a `/images/<id>` request path (query string ignored); raises ImageRequestError(400)."""
    raw = request_path.split("?", 1)[0].split("#", 1)[0]
    if not raw.startswith(ROUTE_PREFIX):
        raise ImageRequestError(400, f"not an image path: {request_path!r}")
    encoded = raw[len(ROUTE_PREFIX):]
    try:
        image_id = urllib.parse.unquote(encoded, errors="strict")
    except UnicodeDecodeError:
        raise ImageRequestError(400, "an image id must be UTF-8") from None
    if "%" in image_id:  # double encoding ("%252e%252e") is never a real id
        raise ImageRequestError(400, "image ids are not percent-encoded twice")
    if not image_id or len(image_id) > MAX_ID_CHARS:
        raise ImageRequestError(400, "an image id is 1 to %d characters" % MAX_ID_CHARS)
    if any(c in image_id for c in "/\\\x00") or ".." in image_id:
        raise ImageRequestError(400, f"not an image id: {image_id!r} (ids are looked up in the catalog, never paths)")
    if image_id != image_id.strip():
        raise ImageRequestError(400, f"not an image id: {image_id!r}")
    return image_id


def read_image_file(uri: str) -> bytes:
    """The bytes of a catalog image file, at most MAX_IMAGE_BYTES; ValueError for anything else.

    A local path is opened without blocking and must be a regular file: a catalog line naming a FIFO or a
    device would otherwise hold a request thread forever."""
    if "://" in uri:
        if tf.io.gfile.stat(uri).length > MAX_IMAGE_BYTES:
            raise ValueError(f"larger than {MAX_IMAGE_BYTES} bytes")
        with tf.io.gfile.GFile(uri, "rb") as f:
            return f.read()
    fd = os.open(uri, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"larger than {MAX_IMAGE_BYTES} bytes")
        return f.read(MAX_IMAGE_BYTES + 1)[:MAX_IMAGE_BYTES]


class CatalogImages:
    """The images of one catalog file, by id.  The catalog is read on first use and re-read when it changes."""

    def __init__(self, catalog_path: str, allow_outside_uris: bool = False):
        self.catalog_path = catalog_path
        self.allow_outside_uris = allow_outside_uris  # pipeline.allow_outside_uris, as the pipeline reads them
        self._uris: Dict[str, str] = {}
        self._stamp: Optional[Tuple[int, int]] = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()

    def _catalog_stamp(self) -> Optional[Tuple[int, int]]:
        try:
            stat = tf.io.gfile.stat(self.catalog_path)
        except tf.errors.NotFoundError:
            return None
        return (stat.length, stat.mtime_nsec)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < RECHECK_SECONDS:
            return
        self._checked_at = now
        stamp = self._catalog_stamp()
        if stamp == self._stamp:
            return
        uris: Dict[str, str] = {}
        bad = []
        if stamp is not None:
            for entry in read_catalog(self.catalog_path, on_bad=lambda line, err: bad.append(err)):
                if entry.uri and entry.image_id not in uris:
                    uris[entry.image_id] = resolve_uri(entry.uri, self.catalog_path)
            logger.info("catalog %s: %d images with a file%s", self.catalog_path, len(uris),
                        f" ({len(bad)} unreadable lines skipped)" if bad else "")
        else:
            logger.warning("catalog %s does not exist: /images/ serves nothing", self.catalog_path)
        self._uris, self._stamp = uris, stamp

    def read(self, image_id: str) -> Tuple[bytes, str]:
        """(bytes, content type) of a catalog image; raises ImageRequestError(404) when it cannot be served.

        Refusals name the image id, never the file: paths stay in the server's log."""
        with self._lock:
            self._refresh()
            uri = self._uris.get(image_id)
        if uri is None:
            raise ImageRequestError(404, f"no image {image_id!r} in the catalog")
        if not self.allow_outside_uris and not inside_catalog(uri, self.catalog_path):
            logger.warning("image %r: %s is outside the catalog's folder (pipeline.allow_outside_uris)", image_id, uri)
            raise ImageRequestError(404, f"image {image_id!r} is outside the catalog's folder")
        try:
            data = read_image_file(uri)
        except (OSError, tf.errors.OpError, ValueError) as err:
            logger.warning("image %r: %s: %s", image_id, uri, getattr(err, "message", None) or err)
            raise ImageRequestError(404, f"image {image_id!r} cannot be read") from None
        content_type = sniff_content_type(data)
        if content_type is None:
            raise ImageRequestError(404, f"image {image_id!r}: its file is not a PNG, JPEG, GIF, BMP or WebP image")
        return data, content_type

    def serve(self, request_path: str) -> Tuple[bytes, str]:
        """(bytes, content type) for a `/images/<id>` request path; raises ImageRequestError."""
        return self.read(image_id_from_path(request_path))
