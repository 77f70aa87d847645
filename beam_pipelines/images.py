"""Stage 7: the image catalog and the images themselves.

Images are read through Beam's filesystems (local paths, gs://, ...) and
prepared by the one image preparation function in clicklens/images.py, shared
with training and the exported graphs (decode, centre-crop to a square, resize
to `pipeline.image_size`), and stored as PNG (`clicklens.images.PngPreparer`).
With `image_source: features` the catalog's feature vector is used instead.
A bad catalog line, a duplicate image id, a missing file or an undecodable
image becomes a dead-letter record; the image is then absent from the
good-image output, and the joins downstream drop what needs it.
"""


from typing import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipelines.dead_letters import DEAD_LETTER, METRICS_NAMESPACE, dead_letter
from beam_pipelines.parse import ReadLines
from beam_pipelines.progress import LogProgress
from clicklens.catalog import (CatalogEntry, first_entry, parse_catalog_line, read_image_input, resolve_uri,
                               unusable_image)
from clicklens.dead_letters import image_dead_letter  # noqa: F401  (defined in the core, shared with reindex)
from clicklens.config import PipelineConfig
from clicklens.errors import BadRecord

# Output tags: catalog entries, good images, and the (image_id, reason) of each catalog image that is not good.
ENTRIES = "entries"
IMAGES = "images"
MAX_IMAGE_PIXELS = PipelineConfig().max_image_pixels
BAD_IMAGE_IDS = "bad_image_ids"
# Catalog images read and prepared per TensorFlow call (at most; Beam sizes the batches).
LOAD_BATCH = 64


def read_file(path: str) -> bytes:
    """Reads a whole file from any Beam filesystem."""
    with FileSystems.open(path) as f:
        return f.read()


class ParseCatalogFn(beam.DoFn):
    """Catalog line -> (image_id, CatalogEntry); bad lines to DEAD_LETTER."""

    def process(self, line: bytes):
        try:
            entry = parse_catalog_line(line)
        except BadRecord as err:
            Metrics.counter(METRICS_NAMESPACE, f"bad_catalog_{err.reason}").inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter("catalog", err.reason, line, err.detail))
            return
        except Exception as err:  # noqa: BLE001  (a bad line must never crash the run)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter("catalog", "internal_error", line, repr(err)[:200]))
            return
        yield entry.image_id, entry


class FirstEntryFn(beam.DoFn):
    """Keeps one catalog entry per image id (the first in a stable order); dead-letters the others."""

    def process(self, element):
        image_id, entries = element
        kept, duplicates = first_entry(entries)
        yield kept
        for duplicate in duplicates:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter("catalog", "duplicate_image_id", duplicate.to_json()))


class ReadCatalog(beam.PTransform):
    """Catalog lines -> {ENTRIES: CatalogEntry (one per id), DEAD_LETTER: dead letters}."""

    def expand(self, lines):
        parsed = lines | "Parse" >> beam.ParDo(ParseCatalogFn()).with_outputs(DEAD_LETTER, main=ENTRIES)
        unique = (
            parsed[ENTRIES]
            | "GroupById" >> beam.GroupByKey()
            | "FirstPerId" >> beam.ParDo(FirstEntryFn()).with_outputs(DEAD_LETTER, main=ENTRIES)
        )
        dead = (parsed[DEAD_LETTER], unique[DEAD_LETTER]) | "FlattenDeadLetters" >> beam.Flatten()
        return {ENTRIES: unique.entries, DEAD_LETTER: dead}


class LoadImageFn(beam.DoFn):
    """A batch of CatalogEntry -> (image_id, PNG bytes or feature tuple) for each; bad images to DEAD_LETTER.

    The readable images of a batch are prepared in one TensorFlow call
    (PngPreparer.many: about twice the speed of a call per image); each comes
    out byte for byte as a call of its own would give it.
    """

    def __init__(self, catalog_path: str, image_source: str, image_size: int, feature_dim: int,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, allow_outside_uris: bool = False):
        self._catalog_path = catalog_path
        self._allow_outside = allow_outside_uris
        self._source = image_source
        self._size = image_size
        self._dim = feature_dim
        self._max_pixels = max_image_pixels
        self._preparer = None

    def setup(self):
        if self._source != "features":
            # Imports TensorFlow: here, on the worker, not when the pipeline is built.
            from clicklens.images import png_preparer

            self._preparer = png_preparer(self._size, self._max_pixels)

    def _bad(self, entry: CatalogEntry, reason: str, detail: str = ""):
        Metrics.counter(METRICS_NAMESPACE, f"bad_image_{reason}").inc()
        return beam.pvalue.TaggedOutput(DEAD_LETTER, image_dead_letter(entry, reason, detail))

    def _where(self, entry: CatalogEntry) -> str:
        return resolve_uri(entry.uri, self._catalog_path) if entry.uri else ""

    def process(self, entries: Sequence[CatalogEntry]):
        # The one way of reading a catalog image (clicklens/catalog.py), shared with `clicklens reindex`.
        readable = []
        for entry in entries:
            try:
                readable.append((entry, read_image_input(entry, self._catalog_path, self._source, self._dim,
                                                         read_file, self._allow_outside)))
            except BadRecord as err:
                yield self._bad(entry, err.reason, err.detail)
        if self._source == "features":
            for entry, raw in readable:
                yield entry.image_id, raw
            return
        prepared = self._preparer.many([raw for _, raw in readable])
        for (entry, _), value in zip(readable, prepared):
            if isinstance(value, Exception):
                err = unusable_image(value, self._where(entry))
                yield self._bad(entry, err.reason, err.detail)
                continue
            Metrics.counter(METRICS_NAMESPACE, "images_ok").inc()
            yield entry.image_id, value


class LoadImages(beam.PTransform):
    """CatalogEntry -> {IMAGES: (image_id, image value), DEAD_LETTER: dead letters}."""

    def __init__(self, catalog_path: str, image_source: str, image_size: int, feature_dim: int = 0,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, allow_outside_uris: bool = False):
        super().__init__()
        self._fn = LoadImageFn(catalog_path, image_source, image_size, feature_dim, max_image_pixels,
                               allow_outside_uris)

    def expand(self, entries):
        loaded = (
            entries
            | "Reshuffle" >> beam.Reshuffle()  # spread file reads over workers
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=LOAD_BATCH)
            | "Load" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER, main=IMAGES)
        )
        return {IMAGES: loaded[IMAGES], DEAD_LETTER: loaded[DEAD_LETTER]}


class ReadCatalogImages(beam.PTransform):
    """PBegin -> {ENTRIES, IMAGES, BAD_IMAGE_IDS, DEAD_LETTER} of the image catalog at `catalog_path`.

    ENTRIES are the catalog entries (one per id), IMAGES the good images as
    (image_id, PNG bytes or feature tuple), BAD_IMAGE_IDS (image_id, reason)
    for each entry whose image could not be loaded, DEAD_LETTER the bad
    catalog lines and images.
    """

    def __init__(self, catalog_path: str, image_source: str, image_size: int, feature_dim: int = 0,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, allow_outside_uris: bool = False):
        super().__init__()
        self._catalog_path = catalog_path
        self._load = (image_source, image_size, feature_dim, max_image_pixels, allow_outside_uris)

    def expand(self, pbegin):
        catalog = (
            pbegin
            | "ReadLines" >> ReadLines(self._catalog_path)
            | "ParseCatalog" >> ReadCatalog()
        )
        loaded = catalog[ENTRIES] | "LoadImages" >> LoadImages(self._catalog_path, *self._load)
        good = loaded[IMAGES] | "LogImages" >> LogProgress("LoadImages", "images loaded")
        bad_ids = loaded[DEAD_LETTER] | "BadImageIds" >> beam.Map(lambda r: (r["image_id"], r["reason"]))
        dead = (catalog[DEAD_LETTER], loaded[DEAD_LETTER]) | "FlattenDeadLetters" >> beam.Flatten()
        return {ENTRIES: catalog[ENTRIES], IMAGES: good, BAD_IMAGE_IDS: bad_ids, DEAD_LETTER: dead}
