"""Random views of image batches for self-supervised pretraining (the `pretrain.augment` config section).

Each image of a batch gets its own random resized crop, flip and colour
jitter, all vectorised over the batch (one crop_and_resize, no per-image
loop), so two calls on the same batch give the two views SimCLR contrasts.
What the views may differ in is what the tower learns to ignore: crops teach
it position and size (zooming in, and out with `crop_max_area` above 1), flips
orientation, blur fine texture, colour jitter the exact shades. Without colour
jitter, views of one image share their exact shades and the tower tells images
apart by those alone (the demo: image -> image recall@10 0.035, below raw
pixels); so brightness, contrast and saturation jitter are on by default, and
hue only slightly, since users search by colour (the demo's queries name
colours) and a large hue or grey view would teach the tower to ignore it.
Every jitter is switched off by 0.

Pixels are float32 [B, S, S, 3] in [0, 1], as the image tower takes them, and
stay so.
"""

from __future__ import annotations

import math

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf


def _batch(images):
    # Static sizes where known: with dynamic ones, graph optimisation logs a cost-estimation error per crop op.
    return images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]


def _uniform(batch, low, high):
    # No op seeds: ops given the same one would draw the same numbers; the global seed (training.seed) decides.
    return tf.random.uniform([batch], low, high)


def _border_colour(images):
    """Each image's mean colour over its outermost rows and columns: [B, 1, 1, C]."""
    frame = tf.concat([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    return tf.reduce_mean(frame, axis=1)[:, None, None, :]


def random_resized_crop(images: tf.Tensor, min_area: float, max_aspect: float, max_area: float = 1.0) -> tf.Tensor:
    """A random region per image (area share in [min_area, max_area], aspect in [1/max_aspect, max_aspect]), resized.

    With max_area above 1 a region can reach past the image's edges (zoom out: the object shrinks), and
    what lies beyond them takes the image's border colour, so a view never shows a frame that the image
    has not.
    """
    if min_area >= 1.0 and max_area <= 1.0:
        return images
    batch = _batch(images)
    area = _uniform(batch, min_area, max_area)
    log_aspect = _uniform(batch, -math.log(max_aspect), math.log(max_aspect))
    aspect = tf.exp(log_aspect)
    longest = max(1.0, math.sqrt(max_area))
    height = tf.minimum(tf.sqrt(area / aspect), longest)
    width = tf.minimum(tf.sqrt(area * aspect), longest)
    # Inside the image when the side is under 1; around it (a negative offset) when over.
    top = _uniform(batch, 0.0, 1.0) * (1.0 - height)
    left = _uniform(batch, 0.0, 1.0) * (1.0 - width)
    boxes = tf.stack([top, left, top + height, left + width], axis=1)
    size = list(images.shape[1:3]) if images.shape[1:3].is_fully_defined() else tf.shape(images)[1:3]
    if max_area <= 1.0:
        return tf.image.crop_and_resize(images, boxes, tf.range(batch), size)
    # A channel of ones marks the samples that fell inside the image; the rest get the border colour.
    marked = tf.concat([images, tf.ones_like(images[..., :1])], axis=-1)
    crops = tf.image.crop_and_resize(marked, boxes, tf.range(batch), size, extrapolation_value=0.0)
    inside = crops[..., -1:]
    return crops[..., :-1] + (1.0 - inside) * _border_colour(images)


def flip_where(images: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """The images [B, S, S, C] mirrored left-right where `flip` [B], the others as they are.

    Only the mirrored images are reversed and copied back in place: reversing the whole batch and picking
    per image would be two passes over all of it (on a 2-core CPU, 11 ms for 390 images of 64 x 64 as
    float32, against about 2 ms on their uint8 rows this way).
    """
    rows = tf.range(tf.shape(images)[0])
    flipped, kept = tf.boolean_mask(rows, flip), tf.boolean_mask(rows, ~flip)
    out = tf.dynamic_stitch([flipped, kept], [tf.reverse(tf.gather(images, flipped), axis=[2]),
                                              tf.gather(images, kept)])
    return tf.ensure_shape(out, images.shape)


def random_flip(images: tf.Tensor) -> tf.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    return flip_where(images, _uniform(_batch(images), 0.0, 1.0) < 0.5)


def _per_image(values):
    return values[:, None, None, None]


def _grey(images):
    return tf.image.rgb_to_grayscale(images)  # [B, S, S, 1], broadcasts against RGB


def colour_jitter(images: tf.Tensor, brightness: float, contrast: float, saturation: float,
                  hue: float) -> tf.Tensor:
    """Per-image brightness shift, contrast and saturation factors and hue rotation (each 0 = off)."""
    batch = _batch(images)
    if brightness:
        images = images + _per_image(_uniform(batch, -brightness, brightness))
    if contrast:
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = mean + (images - mean) * _per_image(_uniform(batch, 1.0 - contrast, 1.0 + contrast))
    if saturation:
        grey = _grey(images)
        images = grey + (images - grey) * _per_image(_uniform(batch, 1.0 - saturation, 1.0 + saturation))
    images = tf.clip_by_value(images, 0.0, 1.0)
    if hue:
        hsv = tf.image.rgb_to_hsv(images)
        shifted = tf.math.floormod(hsv[..., 0] + _uniform(batch, -hue, hue)[:, None, None], 1.0)
        images = tf.image.hsv_to_rgb(tf.concat([shifted[..., None], hsv[..., 1:]], axis=-1))
    return images


def gaussian_blur(images: tf.Tensor, sigma: float) -> tf.Tensor:
    """Each image blurred by a separable Gaussian of `sigma` pixels (edges reflected), at a random strength in [0, 1]."""
    radius = max(1, int(math.ceil(2 * sigma)))
    taps = tf.exp(-0.5 * (tf.range(-radius, radius + 1, dtype=tf.float32) / sigma) ** 2)
    taps = taps / tf.reduce_sum(taps)
    channels = images.shape[-1]
    rows = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, channels, 1])
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, tf.transpose(rows, [1, 0, 2, 3]), [1, 1, 1, 1], "VALID")
    return images + (blurred - images) * _per_image(_uniform(_batch(images), 0.0, 1.0))


def _where_drawn(probability: float, changed: tf.Tensor, original: tf.Tensor) -> tf.Tensor:
    """`changed` for a random `probability` share of the images, `original` for the rest."""
    if probability >= 1.0:
        return changed
    drawn = _uniform(_batch(original), 0.0, 1.0) < probability
    return tf.where(drawn[:, None, None, None], changed, original)


def has_colour_jitter(augment) -> bool:
    """Whether any colour jitter of the `pretrain.augment` section is on."""
    return bool(augment.brightness or augment.contrast or augment.saturation or augment.hue)


def random_view(images: tf.Tensor, augment) -> tf.Tensor:
    """One random view of every image in the batch, as the `pretrain.augment` section (AugmentConfig) says."""
    images = random_resized_crop(images, augment.crop_min_area, augment.crop_max_aspect, augment.crop_max_area)
    if augment.flip:
        images = random_flip(images)
    if has_colour_jitter(augment) and augment.jitter_probability > 0:
        jittered = colour_jitter(images, augment.brightness, augment.contrast, augment.saturation, augment.hue)
        images = _where_drawn(augment.jitter_probability, jittered, images)
    if augment.blur_probability > 0:
        images = _where_drawn(augment.blur_probability, gaussian_blur(images, augment.blur_sigma), images)
    if augment.grayscale_probability > 0:
        grey = tf.tile(_grey(images), [1, 1, 1, 3])
        images = _where_drawn(augment.grayscale_probability, grey, images)
    return tf.clip_by_value(images, 0.0, 1.0)
