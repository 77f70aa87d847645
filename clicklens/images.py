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

Every image from outside is untrusted (`untrusted_image_bytes`).  Before
decoding, its width and height are read from the header and an image of more
than `max_pixels` pixels (`pipeline.max_image_pixels`) is refused: a 48 KB PNG
can declare 20,000 x 20,000 pixels, gigabytes once decoded.  A GIF is cut
after its first frame, since TensorFlow decodes every frame of a GIF before
keeping the first.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Union

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens.config import PipelineConfig


MAX_PIXELS = PipelineConfig().max_image_pixels
# A GIF's data sub-blocks hold up to 255 bytes; encoders fill them.  Walking a file cut into tiny
# sub-blocks would cost a loop step per byte, so the walk gives up (and the image is refused) after
# this many steps per byte of file, plus a constant.
GIF_STEPS_PER_BYTE, GIF_BASE_STEPS = 1 / 16, 4096
PNG_SIGNATURE, JPEG_SIGNATURE, GIF_SIGNATURE, BMP_SIGNATURE = b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"GIF8", b"BM"


def _header_int(header, offset: int, size: int, big_endian: bool) -> tf.Tensor:
    """An unsigned integer of `size` bytes at `offset` of a uint8-as-int64 header vector."""
    value = tf.constant(0, tf.int64)
    for i in range(size):
        byte = header[offset + (i if big_endian else size - 1 - i)]
        value = value * 256 + byte
    return value


def _starts_with(image_bytes, prefix: bytes) -> tf.Tensor:
    return tf.equal(tf.strings.substr(image_bytes, 0, len(prefix)), prefix)


def _webp_size(header) -> tf.Tensor:
    """(width, height) of a WebP from its first chunk: VP8X (extended), VP8L (lossless) or VP8 (lossy)."""
    chunk = header[15]  # the fourth letter of the chunk name at bytes 12-15: "X", "L" or " "
    vp8x = (_header_int(header, 24, 3, False) + 1, _header_int(header, 27, 3, False) + 1)
    bits = _header_int(header, 21, 4, False)  # VP8L: 14 bits width - 1, 14 bits height - 1
    vp8l = (bits % 16384 + 1, (bits // 16384) % 16384 + 1)
    vp8 = (_header_int(header, 26, 2, False) % 16384, _header_int(header, 28, 2, False) % 16384)
    pick = lambda i: tf.where(tf.equal(chunk, ord("X")), vp8x[i], tf.where(  # noqa: E731
        tf.equal(chunk, ord("L")), vp8l[i], vp8[i]))
    return pick(0), pick(1)


def gif_first_frame(image_bytes) -> tf.Tensor:
    """A GIF cut after its first image (plus the trailer), so that decoding it decodes one frame.

    TensorFlow's GIF decoder decodes every frame before decode_image keeps the
    first, so a small animated GIF could decode to gigabytes; the first frame's
    pixels are the same either way.  The block structure (extension blocks
    0x21 and image descriptors 0x2C, each followed by data sub-blocks) is
    walked one block or sub-block per loop step, decoding nothing.  Bytes that
    end before the first image is complete are returned as they are (the
    decoder refuses them); a file cut into so many tiny sub-blocks that the
    walk would take more than GIF_STEPS_PER_BYTE steps a byte is refused.
    """
    data = tf.io.decode_raw(image_bytes, tf.uint8)
    n = tf.size(data, out_type=tf.int64)  # >= 4: the bytes start with "GIF8"

    def at(i):  # the byte at i, or -1 past the end
        i = tf.cast(i, tf.int64)
        return tf.where(i < n, tf.cast(tf.gather(data, tf.minimum(i, n - 1)), tf.int64), tf.constant(-1, tf.int64))

    table = lambda flags: tf.where(flags >= 128, 3 * tf.bitwise.left_shift(  # noqa: E731
        tf.constant(2, tf.int64), flags % 8), 0)  # a colour table of 2^(bits+1) RGB entries
    max_steps = tf.cast(tf.cast(n, tf.float32) * GIF_STEPS_PER_BYTE, tf.int64) + GIF_BASE_STEPS

    def step(pos, in_image, in_sub_blocks, end, steps):
        byte = at(pos)
        # In the data sub-blocks of a block: skip one (size byte + data); size 0 ends them (and the first image).
        sub_pos = tf.where(byte > 0, pos + byte + 1, pos + 1)
        # At a block: an image descriptor (10 bytes, its colour table, the LZW code size byte) or an extension.
        image = tf.equal(byte, 0x2C)
        block_pos = tf.where(image, pos + 10 + table(at(pos + 9)) + 1, pos + 2)
        is_block = tf.logical_or(image, tf.equal(byte, 0x21))
        end = tf.where(tf.logical_and(in_sub_blocks, tf.logical_and(in_image, tf.equal(byte, 0))), pos + 1, end)
        broken = tf.where(in_sub_blocks, byte < 0, tf.logical_not(is_block))  # trailer, garbage or the end
        end = tf.where(tf.logical_and(broken, end < 0), n, end)
        return (tf.where(in_sub_blocks, sub_pos, block_pos),
                tf.logical_or(in_image, tf.logical_and(tf.logical_not(in_sub_blocks), image)),
                tf.where(in_sub_blocks, byte > 0, is_block), end, steps + 1)

    start = (13 + table(at(10)), tf.constant(False), tf.constant(False), tf.constant(-1, tf.int64),
             tf.constant(0, tf.int64))
    _, _, _, end, steps = tf.while_loop(lambda pos, in_image, in_sub, end, steps: tf.logical_and(
        end < 0, steps < max_steps), step, start)
    with tf.control_dependencies([tf.debugging.Assert(end >= 0, [
            "GIF block structure too fragmented to walk:", steps, "steps for", n, "bytes"])]):
        return tf.cond(end < n, lambda: tf.strings.join([tf.strings.substr(image_bytes, tf.constant(0, tf.int64), end), b";"]),
                       lambda: tf.identity(image_bytes))


def check_image_header(image_bytes, max_pixels: int = MAX_PIXELS) -> tf.Operation:
    """An op raising InvalidArgumentError if `image_bytes` declare more than `max_pixels` pixels (width x height).

    Reads only the header: PNG, JPEG, GIF (its logical screen, which every
    frame is drawn on), BMP and WebP.  Anything else is left to the decoder,
    which refuses it.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    padded = tf.strings.join([image_bytes, b"\0" * 32])  # a short file reads as zeros, never out of range
    header = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, 32), tf.uint8), tf.int64)
    jpeg = _starts_with(image_bytes, JPEG_SIGNATURE)
    jpeg_shape = tf.cond(jpeg, lambda: tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64),
                         lambda: tf.zeros([3], tf.int64))
    webp_width, webp_height = _webp_size(header)
    formats = [  # (is this format, width, height)
        (_starts_with(image_bytes, PNG_SIGNATURE), _header_int(header, 16, 4, True), _header_int(header, 20, 4, True)),
        (jpeg, jpeg_shape[1], jpeg_shape[0]),
        (_starts_with(image_bytes, GIF_SIGNATURE), _header_int(header, 6, 2, False), _header_int(header, 8, 2, False)),
        (_starts_with(image_bytes, BMP_SIGNATURE), _header_int(header, 18, 4, False),
         # a negative height (two's complement) marks a top-down bitmap
         tf.abs(tf.bitwise.bitwise_xor(_header_int(header, 22, 4, False), 2**31) - 2**31)),
        (tf.logical_and(_starts_with(image_bytes, b"RIFF"), tf.equal(tf.strings.substr(padded, 8, 4), b"WEBP")),
         webp_width, webp_height),
    ]
    width, height = tf.constant(0, tf.int64), tf.constant(0, tf.int64)
    for is_format, w, h in formats:
        width, height = tf.where(is_format, w, width), tf.where(is_format, h, height)
    pixels = width * height
    too_large = tf.debugging.Assert(pixels <= max_pixels, [
        "image too large to decode:", width, "x", height, "pixels, over the limit of", max_pixels])
    return too_large


def untrusted_image_bytes(image_bytes, max_pixels: int = MAX_PIXELS) -> tf.Tensor:
    """`image_bytes`, safe to decode: checked against `max_pixels`, a GIF cut to its first frame."""
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    with tf.control_dependencies([check_image_header(image_bytes, max_pixels)]):
        return tf.cond(_starts_with(image_bytes, GIF_SIGNATURE), lambda: gif_first_frame(image_bytes),
                       lambda: tf.identity(image_bytes))


def prepare_image(image_bytes, image_size: int, allow_empty: bool = False,
                  max_pixels: Optional[int] = MAX_PIXELS) -> tf.Tensor:
    """Encoded image (tf.string scalar) -> float32 [S, S, 3] in [0, 1], centre-cropped and resized.

    With `allow_empty`, b"" (a padded neighbour or negative slot) gives zeros;
    otherwise empty or undecodable bytes, or an image of more than `max_pixels`
    pixels, raise InvalidArgumentError.  `max_pixels=None` skips the checks of
    untrusted_image_bytes: only for the pipeline's own prepared PNGs.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)

    def prepare():
        safe = image_bytes if max_pixels is None else untrusted_image_bytes(image_bytes, max_pixels)
        # Decoded as uint8, then scaled: decode_image's own float32 output refuses WebP.
        image = tf.io.decode_image(safe, channels=3, expand_animations=False)
        image = tf.image.convert_image_dtype(image, tf.float32)
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


def prepare_images(image_bytes, image_size: int, allow_empty: bool = False,
                   max_pixels: Optional[int] = MAX_PIXELS) -> tf.Tensor:
    """tf.string [B] -> float32 [B, S, S, 3] (see prepare_image)."""
    return tf.map_fn(lambda b: prepare_image(b, image_size, allow_empty, max_pixels), image_bytes,
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


class PngPreparer:
    """Raw image bytes -> the prepared image as PNG bytes (what the pipeline stores), one graph per size."""

    def __init__(self, image_size: int, max_pixels: int = MAX_PIXELS):
        self.image_size = int(image_size)
        self.max_pixels = int(max_pixels)
        self._prepare = tf.function(self._png, input_signature=[tf.TensorSpec([], tf.string)])
        self._prepare_many = tf.function(
            lambda images: tf.map_fn(self._png, images, fn_output_signature=tf.string),
            input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)

    def _png(self, image_bytes):
        pixels = prepare_image(image_bytes, self.image_size, max_pixels=self.max_pixels)
        return tf.io.encode_png(tf.cast(tf.round(pixels * 255.0), tf.uint8))

    def __call__(self, data: bytes) -> bytes:
        """Raises tf.errors.InvalidArgumentError for bytes that are not a decodable image."""
        return self._prepare(tf.constant(data)).numpy()

    def many(self, data: Sequence[bytes]) -> List[Union[bytes, Exception]]:
        """Each image prepared as `__call__` prepares it, or the error it raised, in order.

        One call for the whole list (three times faster than a call per image);
        when an image in it fails, the list is prepared again one image at a time.
        """
        if not len(data):
            return []
        try:
            return list(self._prepare_many(tf.constant(list(data), tf.string)).numpy())
        except tf.errors.InvalidArgumentError:
            results: List[Union[bytes, Exception]] = []
            for one in data:
                try:
                    results.append(self(one))
                except Exception as err:  # noqa: BLE001  (the caller dead-letters it)
                    results.append(err)
            return results


@functools.lru_cache(maxsize=None)
def png_preparer(image_size: int, max_pixels: int = MAX_PIXELS) -> PngPreparer:
    """The process's PngPreparer for a size and pixel limit: its graph is traced once (about a second),
    however many pipeline runs, DoFns or reindexes use it."""
    return PngPreparer(image_size, max_pixels)


def prepared_png(data: bytes, image_size: int) -> bytes:
    """The prepared image as PNG bytes (for one-off use)."""
    return png_preparer(int(image_size))(data)
