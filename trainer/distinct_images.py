"""Each distinct image of a batch through the image tower once, with static shapes.

A training batch holds the same image in several slots: as the positive of
several examples, as a graph neighbour of others, as a hard negative.  Every
slot carries its image's key (a hash of its id, `trainer.input.image_id_key`),
and equal keys mean equal pixels: the input pipeline prepares (and augments)
each distinct image of a batch once.  So the tower runs on one representative
slot per distinct key and every slot takes its group's embedding: the same
embeddings, losses and gradients as running every slot, with less work.

The groups are found by sorting the keys, with static shapes.  The number of
distinct images varies from batch to batch, and the representatives go
through the tower in one of two ways:

- in one call of exactly that many images (`static=False`, the default on
  CPUs and GPUs): a batch dimension that changes from step to step, which
  TensorFlow's CPU and GPU kernels take as it comes;
- `chunk_size` at a time in a `tf.while_loop` that stops after the last
  chunk holding a real representative (`static=True`): every tensor has a
  static shape, as XLA on TPUs requires.

Which is faster on a CPU depends on the CPU: on one 2-core machine chunks of
32 ran 1.3x faster than one call (the activations stayed in its caches); on
another (an AMD EPYC), one call made the training step 1.4-1.6x faster than
the loop (benchmarks/train_throughput.py prints both).

Layers that mix images in a batch (BatchNormalization in training mode) would
see other statistics in chunks, or over the distinct images alone;
`mixes_batch` tells the model to send every slot in one call for such towers.
"""

from __future__ import annotations

from typing import Optional

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf


def mixes_batch(tower: tf.keras.Model) -> bool:
    """True when a layer of `tower` computes across the images of a batch (batch normalisation)."""
    return any(isinstance(layer, tf.keras.layers.BatchNormalization) for layer in (tower, *tower.submodules))


def distinct_groups(keys: tf.Tensor, needs_gradient: Optional[tf.Tensor] = None):
    """Groups the slots of int64 `keys` [N] by equal key, with static shapes.

    Returns (group [N] int32: the group of each slot, first_slot [N] int32: a
    slot of group g at index g (0 for g >= count), count: the number of
    groups, count_with_gradient).  With `needs_gradient` (bool [N]), the groups
    holding at least one such slot come first (0 .. count_with_gradient - 1);
    without it every group counts as needing gradients.
    """
    n = keys.shape[0]
    order = tf.argsort(keys, stable=True)
    sorted_keys = tf.gather(keys, order)
    starts = tf.concat([[True], tf.not_equal(sorted_keys[1:], sorted_keys[:-1])], axis=0)
    sorted_group = tf.cumsum(tf.cast(starts, tf.int32)) - 1
    group = tf.scatter_nd(order[:, tf.newaxis], sorted_group, [n])
    count = sorted_group[-1] + 1
    count_with_gradient = count
    if needs_gradient is not None:
        # (empty segments, the groups from `count` on, give the lowest int32: clipped to 0)
        group_needs = tf.maximum(tf.math.unsorted_segment_max(tf.cast(needs_gradient, tf.int32), group, n), 0)
        # Renumber the groups: those needing gradients first, each part in the old order.
        rank = tf.argsort((1 - group_needs) * n + tf.range(n), stable=True)
        new_number = tf.scatter_nd(rank[:, tf.newaxis], tf.range(n), [n])
        group = tf.gather(new_number, group)
        count_with_gradient = tf.reduce_sum(group_needs)
    slots = tf.range(n)
    first_slot = tf.math.unsorted_segment_min(slots, group, n)
    first_slot = tf.where(slots < count, first_slot, 0)
    return group, first_slot, count, count_with_gradient


def _output_dim(tower: tf.keras.layers.Layer, images: tf.Tensor) -> int:
    try:
        return tower.output_shape[-1]  # a functional model (every tower build_image_tower makes)
    except AttributeError:  # a bare layer that was never called
        return tower.compute_output_shape(images.shape)[-1]


def embed_in_chunks(tower: tf.keras.Model, images: tf.Tensor, slots: tf.Tensor, count: tf.Tensor,
                    chunk_size: int, training) -> tf.Tensor:
    """tower(images[slots[j]]) for j < count, `chunk_size` images per call -> [ceil(N / chunk) * chunk, D].

    Rows from `count` on are whatever the last chunk's padding gave (never used).
    """
    n = slots.shape[0]
    steps = -(-n // chunk_size)
    padded = tf.concat([slots, tf.zeros([steps * chunk_size - n], slots.dtype)], axis=0)
    dim = _output_dim(tower, images)

    def body(i, out):
        chunk = tf.slice(padded, [i * chunk_size], [chunk_size])
        return i + 1, out.write(i, tower(tf.gather(images, chunk), training=training))

    used = (count + chunk_size - 1) // chunk_size
    _, out = tf.while_loop(lambda i, _: i < used, body,
                           (tf.constant(0), tf.TensorArray(tf.float32, size=steps,
                                                           element_shape=[chunk_size, dim])),
                           maximum_iterations=steps)
    return tf.reshape(out.stack(), [steps * chunk_size, dim])


def embed_in_one_call(tower: tf.keras.Model, images: tf.Tensor, slots: tf.Tensor, count: tf.Tensor,
                      training) -> tf.Tensor:
    """tower(images[slots[j]]) for j < count, in one call of `count` images -> [N, D].

    Rows from `count` on are unused (zeros, or the image of slots[0] when
    count is 0: oneDNN's convolutions fail on an empty batch).  The call's
    batch size is known only when the step runs: not for XLA on TPUs (use
    embed_in_chunks).
    """
    n = slots.shape[0]
    calls = tf.maximum(count, 1)
    embeddings = tower(tf.gather(images, slots[:calls]), training=training)
    padded = tf.pad(embeddings, [[0, n - calls], [0, 0]])
    return tf.ensure_shape(padded, [n, embeddings.shape[-1]])


def embed_distinct(tower: tf.keras.Model, images: tf.Tensor, keys: tf.Tensor, chunk_size: int, training,
                   needs_gradient: Optional[tf.Tensor] = None, static: bool = True) -> tf.Tensor:
    """tower(images) [N, D] for images [N, ...] with int64 `keys` [N], each distinct key embedded once.

    With `static`, the distinct images go `chunk_size` per call in a loop of
    static shapes (TPUs); otherwise in one call of their exact number.  With
    `needs_gradient` (bool [N]), the groups with no such slot are embedded
    without gradient (a forward pass only; their embeddings are constants to
    the optimizer).
    """
    def embed(slots, count):
        if static:
            return embed_in_chunks(tower, images, slots, count, chunk_size, training)
        return embed_in_one_call(tower, images, slots, count, training)

    group, first_slot, count, with_gradient = distinct_groups(keys, needs_gradient)
    table = embed(first_slot, with_gradient)
    if needs_gradient is not None:
        # The groups from with_gradient on, renumbered from 0, in a forward-only pass.
        rest = tf.gather(first_slot, tf.minimum(tf.range(first_slot.shape[0]) + with_gradient,
                                                first_slot.shape[0] - 1))
        frozen = tf.stop_gradient(embed(rest, count - with_gradient))
        rows = table.shape[0]
        in_table = group < with_gradient
        return tf.where(in_table[:, tf.newaxis],
                        tf.gather(table, tf.minimum(group, rows - 1)),
                        tf.gather(frozen, tf.clip_by_value(group - with_gradient, 0, rows - 1)))
    return tf.gather(table, group)
