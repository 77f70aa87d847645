"""The newest exported encoders (W/export/query_encoder, W/export/image_encoder) as the towers of new models.

`SavedEncoders` has what trainer.export_signatures.Retrieval asks of its
encoders (`embed_queries`, `embed_images`, `image_spec`), computed by the
loaded SavedModels' embed signatures, so `clicklens reindex` builds retrieval
models around exactly the towers that were exported (not the checkpoint in
W/model, which may have been trained further since), and embeds new images
with the same graph the `image_encoder` model serves.  Saving a module that
uses them saves their weights, lookup tables and embed graphs (TensorFlow ops
and the tokenizer's tensorflow-text ops only).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import servables as S
from clicklens.batching import map_batches
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir

logger = logging.getLogger(__name__)

EMBED_BATCH = 256


def _embed_signature(model, folder: str):
    """(the embed signature, its one input's name and spec) of a loaded encoder; ClicklensError if it has none."""
    if S.DEFAULT_SIGNATURE not in model.signatures:
        raise ClicklensError(f"{folder} has no {S.DEFAULT_SIGNATURE!r} signature")
    function = model.signatures[S.DEFAULT_SIGNATURE]
    _, kwargs = function.structured_input_signature
    if len(kwargs) != 1 or S.EMBEDDING not in function.structured_outputs:
        raise ClicklensError(f"{folder}: signature {S.DEFAULT_SIGNATURE!r} takes {sorted(kwargs)} and returns "
                             f"{sorted(function.structured_outputs)}; expected one input and {S.EMBEDDING!r}")
    (name, spec), = kwargs.items()
    return function, name, spec


def _captured_state(model, function) -> list:
    """The variables, resources (a lookup table) and assets of a loaded SavedModel that `function` captures."""
    captured = {id(t) for t in function.captured_inputs}

    def tensor_of(obj):
        if isinstance(obj, tf.Variable):
            return obj.handle
        if isinstance(obj, tf.saved_model.experimental.TrackableResource):
            return obj.resource_handle
        return obj.asset_path if isinstance(obj, tf.saved_model.Asset) else None

    return [obj for obj in tf.train.TrackableView(model).descendants() if id(tensor_of(obj)) in captured]


class SavedEncoders(tf.Module):
    """Both exported encoders of one version, loaded; duck-types trainer.export_signatures.Encoders.

    A module saved with it keeps what the two embed signatures capture (the towers' variables, the
    tokenizer's lookup table: tracked here) and their graphs, but not the rest of the loaded models (every
    Keras layer's call function, traced per input shape, and each model's copy of the other tower): saved,
    those doubled the retrieval models' graphs and the time to save them and for a server to load them.
    """

    def __init__(self, query_model, image_model, version: int, folders=("", "")):
        super().__init__(name="encoders")
        self.version = version
        embed_query, query_input, _ = _embed_signature(query_model, folders[0])
        if query_input != S.QUERY:
            raise ClicklensError(f"{folders[0]}: the embed signature takes {query_input!r}, expected {S.QUERY!r}")
        embed_image, self.image_input, spec = _embed_signature(image_model, folders[1])
        self.query_state = _captured_state(query_model, embed_query)
        self.image_state = _captured_state(image_model, embed_image)
        # Not tracked (object.__setattr__): the loaded models and their signatures live with this module
        # but are not saved with it.
        object.__setattr__(self, "_models", (query_model, image_model))
        object.__setattr__(self, "_embed_query", embed_query)
        object.__setattr__(self, "_embed_image", embed_image)
        if self.image_input not in (S.IMAGE_BYTES, S.IMAGE_FEATURES):
            raise ClicklensError(f"{folders[1]}: the embed signature takes {self.image_input!r}, expected "
                                 f"{S.IMAGE_BYTES!r} or {S.IMAGE_FEATURES!r}")
        self.image_source = "pixels" if self.image_input == S.IMAGE_BYTES else "features"
        self._image_shape, self._image_dtype = spec.shape, spec.dtype
        self.dim = int(self._embed_image.structured_outputs[S.EMBEDDING].shape[-1])

    def image_spec(self) -> tf.TensorSpec:
        """The image input of the signatures, as the exported image_encoder takes it."""
        return tf.TensorSpec(self._image_shape, self._image_dtype, name=self.image_input)

    def embed_queries(self, queries: tf.Tensor) -> tf.Tensor:
        """Raw query strings [B] -> float32 [B, D]."""
        return self._embed_query(**{S.QUERY: queries})[S.EMBEDDING]

    def embed_images(self, images: tf.Tensor) -> tf.Tensor:
        """Raw image bytes [B] (or feature vectors [B, F]) -> float32 [B, D]."""
        return self._embed_image(**{self.image_input: images})[S.EMBEDDING]

    def embed_image_values(self, values: Sequence) -> np.ndarray:
        """float32 [len(values), D] for image bytes or feature vectors, EMBED_BATCH per call."""
        if not len(values):
            return np.zeros((0, self.dim), np.float32)

        def batch(rows):
            return self.embed_images(tf.constant(np.stack(rows) if self.image_source == "features" else list(rows),
                                                 self._image_dtype))

        return map_batches(batch, list(values), EMBED_BATCH).astype(np.float32)

    def embed_query_texts(self, queries: Sequence) -> np.ndarray:
        """float32 [len(queries), D] for raw query strings (str or UTF-8 bytes)."""
        queries = [q.encode("utf-8") if isinstance(q, str) else q for q in queries]
        if not queries:
            return np.zeros((0, self.dim), np.float32)
        return map_batches(lambda b: self.embed_queries(tf.constant(b, tf.string)), queries,
                           EMBED_BATCH).astype(np.float32)


def load_saved_encoders(workdir: Workdir) -> SavedEncoders:
    """The newest exported image_encoder and the query_encoder of the same version.

    ClicklensError naming the folder when either has no version (nothing
    exported), or when their newest versions differ (export writes both at
    once, so a retrieval model must not pair towers from two exports).
    """
    image_version, image_folder = S.latest_version(workdir.export_model(S.IMAGE_ENCODER))
    query_version, query_folder = S.latest_version(workdir.export_model(S.QUERY_ENCODER))
    if query_version != image_version:
        raise ClicklensError(f"the newest {S.IMAGE_ENCODER} is version {image_version} but the newest "
                             f"{S.QUERY_ENCODER} is version {query_version} ({workdir.export}); export writes "
                             "both at once: run `clicklens export`")
    encoders = SavedEncoders(tf.saved_model.load(query_folder), tf.saved_model.load(image_folder), image_version,
                             (query_folder, image_folder))
    logger.info("loaded %s and %s version %d (dim %d, %s input)", S.QUERY_ENCODER, S.IMAGE_ENCODER,
                image_version, encoders.dim, encoders.image_input)
    return encoders
