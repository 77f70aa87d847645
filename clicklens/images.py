"""Image preparation: the one function that turns image bytes into model pixels.

    encoded PNG / JPEG / GIF / BMP / WebP bytes
      -> decode (first frame; greyscale, palette and RGBA become RGB, alpha dropped)
      -> centre-crop to a square
      -> resize to image_size x image_size (bilinear, antialiased)
      -> float32 [S, S, 3] in [0, 1]

The pipeline runs it on every catalog image and stores the result as a PNG
(`prepared_png`); the trainer decodes those PNGs with it again (a no-op crop
and resize of an already prepared square); every exported image signature
runs it on raw uploads.  So training and serving see the same pixels, up to
the 8-bit rounding of the stored PNG, and the pipeline accepts exactly the
image formats that a served model can decode.  All of it is TensorFlow graph
ops, servable by stock TF Serving.
"""

from __future__ import annotations

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf


def prepare_image(image_bytes, image_size: int, allow_empty: bool = False) -> tf.Tensor:
    """Encoded image (tf.string scalar) -> float32 [S, S, 3] in [0, 1], centre-cropped and resized.

    With `allow_empty`, b"" (a padded neighbour or negative slot) gives zeros;
    otherwise empty or undecodable bytes raise InvalidArgumentError.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)

    def prepare():
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.float32)
        shape = tf.shape(image)
        height, width = shape[0], shape[1]
        side = tf.minimum(height, width)
        image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2, side, side)
        image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
        return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), [image_size, image_size, 3])

    if not allow_empty:
        return prepare()
    return tf.cond(tf.strings.length(image_bytes) > 0, prepare,
                   lambda: tf.zeros([image_size, image_size, 3], tf.float32))


def prepare_images(image_bytes, image_size: int, allow_empty: bool = False) -> tf.Tensor:
    """tf.string [B] -> float32 [B, S, S, 3] (see prepare_image)."""
    return tf.map_fn(lambda b: prepare_image(b, image_size, allow_empty), image_bytes,
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


class PngPreparer:
    """Raw image bytes -> the prepared image as PNG bytes (what the pipeline stores), one graph per size."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)
        self._prepare = tf.function(self._png, input_signature=[tf.TensorSpec([], tf.string)])

    def _png(self, image_bytes):
        pixels = prepare_image(image_bytes, self.image_size)
        return tf.io.encode_png(tf.cast(tf.round(pixels * 255.0), tf.uint8))

    def __call__(self, data: bytes) -> bytes:
        """Raises tf.errors.InvalidArgumentError for bytes that are not a decodable image."""
        return self._prepare(tf.constant(data)).numpy()


def prepared_png(data: bytes, image_size: int) -> bytes:
    """The prepared image as PNG bytes (for one-off use; the pipeline keeps a PngPreparer)."""
    return PngPreparer(image_size)(data)
