"""The exported encoders of a work directory, loaded in-process to embed queries and catalog images.

Each tool loads the newest version of W/export/query_encoder or
W/export/image_encoder and calls its embed signature, with the names the
servables contract (clicklens/servables.py) gives them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import servables
from clicklens.batching import map_batches
from clicklens.catalog import CatalogEntry, first_entry, read_catalog, read_image_input
from clicklens.errors import BadRecord, ClicklensError
from clicklens.workdir import Workdir
from serving import saved_models

logger = logging.getLogger(__name__)

EMBED_SIGNATURE = servables.DEFAULT_SIGNATURE  # both encoders embed through their default signature
EMBED_BATCH = 256
# The input names the contract allows per encoder (the image input depends on pipeline.image_source).
ENCODER_INPUTS = {
    servables.QUERY_ENCODER: (servables.QUERY,),
    servables.IMAGE_ENCODER: (servables.IMAGE_BYTES, servables.IMAGE_FEATURES),
}


@dataclasses.dataclass(frozen=True)
class Encoder:
    """One loaded encoder version: its embed signature and that signature's input name."""

    name: str
    version: int
    function: object
    input_name: str
    model: object  # the loaded SavedModel, kept alive: its signatures only hold weak references to it

    def embed_batch(self, values: Sequence) -> np.ndarray:
        """float32 [len(values), dim] embeddings in one call of the signature."""
        outputs = self.function(**{self.input_name: tf.constant(values)})
        return outputs[servables.EMBEDDING].numpy().astype(np.float32)

    def embed(self, values: Sequence) -> np.ndarray:
        """float32 [len(values), dim] embeddings, EMBED_BATCH inputs per call."""
        return map_batches(self.embed_batch, values, EMBED_BATCH).astype(np.float32)


def load_encoder(workdir: Workdir, name: str) -> Encoder:
    """The newest exported version of the encoder `name` (servables.QUERY_ENCODER or IMAGE_ENCODER)."""
    base = workdir.export_model(name)
    version, folder = servables.latest_version(base)
    model = saved_models.load(folder)
    if EMBED_SIGNATURE not in model.signatures:
        raise ClicklensError(f"{folder} has no {EMBED_SIGNATURE!r} signature")
    function = model.signatures[EMBED_SIGNATURE]
    _, kwargs = function.structured_input_signature
    inputs = sorted(kwargs)
    if len(inputs) != 1 or inputs[0] not in ENCODER_INPUTS[name]:
        raise ClicklensError(f"{folder}: signature {EMBED_SIGNATURE!r} takes {inputs}, "
                             f"expected one of {list(ENCODER_INPUTS[name])}")
    embedding = function.structured_outputs.get(servables.EMBEDDING)
    if embedding is None or embedding.shape.rank != 2 or embedding.shape[-1] is None:
        raise ClicklensError(f"{folder}: signature {EMBED_SIGNATURE!r} has no {servables.EMBEDDING!r} "
                             f"output of shape [batch, dim]")
    logger.info("loaded %s version %d (input %s)", name, version, inputs[0])
    return Encoder(name, version, function, inputs[0], model)


def catalog_images(workdir: Workdir, encoder: Encoder,
                   allow_outside_uris: bool = False) -> Tuple[List[str], np.ndarray]:
    """(image ids, embeddings) of the catalog images the image encoder can read, one per id.

    What the pipeline would dead-letter is left out, and counted by reason in a warning: lines that do
    not parse, duplicate ids (the entry kept is the pipeline's: clicklens.catalog.first_entry), entries
    without a readable file (or without features, for a features encoder), files outside the catalog's
    folder (unless `allow_outside_uris`: pipeline.allow_outside_uris), and files the encoder cannot decode.
    """
    skipped: collections.Counter = collections.Counter()
    by_id: Dict[str, List[CatalogEntry]] = {}
    for entry in read_catalog(workdir.catalog, lambda line, err: skipped.update([err.reason])):
        by_id.setdefault(entry.image_id, []).append(entry)
    source = "pixels" if encoder.input_name == servables.IMAGE_BYTES else "features"
    ids, inputs = [], []
    for image_id, same_id in by_id.items():
        entry, duplicates = first_entry(same_id)
        skipped["duplicate_image_id"] += len(duplicates)
        try:
            value = read_image_input(entry, workdir.catalog, source, 0, _read_file, allow_outside_uris)
        except BadRecord as err:
            if err.reason != "bad_feature_dim":  # the encoder's own feature size is checked when it embeds
                skipped[err.reason] += 1
                continue
            value = entry.features
        inputs.append(np.asarray(value, np.float32) if source == "features" else value)
        ids.append(image_id)
    if skipped:
        logger.warning("%s: %d catalog lines or images left out (%s)", workdir.catalog, sum(skipped.values()),
                       ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
    if not ids:
        raise ClicklensError(f"no readable images in {workdir.catalog}")
    return embed_skipping_undecodable(encoder, ids, inputs)


def _read_file(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def embed_skipping_undecodable(encoder: Encoder, ids: Sequence[str], inputs: Sequence) -> Tuple[List[str], np.ndarray]:
    """(kept ids, their embeddings): inputs the encoder rejects (e.g. a corrupt image file) are left out.

    One bad input fails its whole batch, so a failed batch is redone one input at a time.
    """
    kept, rows, skipped = [], [], []
    for start in range(0, len(ids), EMBED_BATCH):
        batch_ids, batch = ids[start:start + EMBED_BATCH], inputs[start:start + EMBED_BATCH]
        try:
            rows.append(encoder.embed_batch(batch))
            kept.extend(batch_ids)
            continue
        except tf.errors.InvalidArgumentError:
            pass
        for image_id, value in zip(batch_ids, batch):
            try:
                rows.append(encoder.embed_batch([value]))
                kept.append(image_id)
            except tf.errors.InvalidArgumentError:
                skipped.append(image_id)
    if skipped:
        logger.warning("%d catalog images could not be decoded and are left out: %s",
                       len(skipped), ", ".join(skipped[:10]))
    return kept, np.concatenate(rows)
