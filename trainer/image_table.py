"""The corpus's images, prepared once, in host memory: what training looks examples' images up in.

Every image a training example names (positive, graph neighbour, hard
negative) is a good catalog image, and `corpus-*` holds each good image once
(clicklens.features).  So instead of decoding an example's PNGs at every step,
the trainer prepares every corpus image once with the one image preparation
(`clicklens.images.prepare_images`), keeps it as uint8 (images x S x S x 3
bytes: 6 MB for the 2,000-image demo at 32 px, 3 GB for 1M images), and a
batch gathers its images by image-id key.  The pixels are exactly those of
decoding the example's own PNG: the table is checked to round-trip at load.
"""

from __future__ import annotations

import logging

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens import features
from clicklens.errors import ClicklensError
from clicklens.images import prepare_images

logger = logging.getLogger(__name__)

# Corpus images prepared per call while the table is built.
LOAD_BATCH = 512


def to_pixels(table_rows: tf.Tensor) -> tf.Tensor:
    """uint8 table rows -> the float32 [0, 1] pixels the model takes (exactly prepare_images' values)."""
    return tf.image.convert_image_dtype(table_rows, tf.float32)


class ImageTable:
    """uint8 prepared images, one per corpus image, and their sorted int64 keys; the empty id is a zero image."""

    def __init__(self, keys: tf.Tensor, pixels: tf.Tensor):
        order = tf.argsort(keys)
        self.keys = tf.gather(keys, order)
        self.pixels = tf.gather(pixels, order)
        if tf.reduce_any(self.keys[1:] == self.keys[:-1]):
            raise ClicklensError("image table: two corpus images have the same image id (or id hash)")

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def row_indices(self, keys: tf.Tensor) -> tf.Tensor:
        """int64 keys [N] -> their row numbers [N]; a key that is not in the table is an error."""
        rows = tf.minimum(tf.searchsorted(self.keys, keys), len(self) - 1)
        tf.debugging.assert_equal(tf.gather(self.keys, rows), keys,
                                  message="an example names an image that is not in corpus-* "
                                          "(set training.image_table: false to read examples' own images)")
        return rows

    def rows(self, keys: tf.Tensor) -> tf.Tensor:
        """int64 keys [N] -> their uint8 rows [N, S, S, 3]; a key that is not in the table is an error."""
        return tf.gather(self.pixels, self.row_indices(keys))


def load_image_table(config, corpus_files, key_fn) -> ImageTable:
    """Prepares every image of the corpus files once -> ImageTable (keys by `key_fn` of the image ids)."""
    size = config.pipeline.image_size
    spec = features.corpus_feature_spec("pixels")
    ds = (tf.data.TFRecordDataset(corpus_files, compression_type="GZIP")
          .batch(LOAD_BATCH)
          .map(lambda r: tf.io.parse_example(r, spec), num_parallel_calls=tf.data.AUTOTUNE))
    keys, rows = [key_fn(tf.constant([""]))], [tf.zeros([1, size, size, 3], tf.uint8)]
    for batch in ds:
        pixels = prepare_images(batch[features.IMAGE], size, max_pixels=None)  # the pipeline's own PNGs
        quantized = tf.image.convert_image_dtype(pixels, tf.uint8, saturate=True)
        if not bool(tf.reduce_all(to_pixels(quantized) == pixels)):
            raise ClicklensError(f"image table: corpus images are not prepared {size}x{size} PNGs "
                                 "(set training.image_table: false)")
        keys.append(key_fn(batch[features.IMAGE_ID]))
        rows.append(quantized)
    table = ImageTable(tf.concat(keys, axis=0), tf.concat(rows, axis=0))
    logger.info("image table: %d corpus images prepared once (%.1f MB)", len(table) - 1,
                table.pixels.shape.num_elements() / 2 ** 20)
    return table
