"""Each distinct image of a batch through the image tower once: the same losses and gradients as every slot.

A real CNN tower (the trainer tests' config) on a batch where images repeat as
positives, graph neighbours and hard negatives; the reference is the same model
with `training.image_chunk_size=0` (every slot through the tower in one call, the
step before de-duplication), against both ways of embedding the distinct
images: one call of their exact number, and static chunks (TPUs).
"""

import numpy as np
import pytest

from clicklens import compat  # noqa: F401
import tensorflow as tf

from tests import trainer_synthetic as synth
from trainer import distinct_images
from trainer import input as I
from trainer.image_table import to_pixels
from trainer.model import TwoTowerModel, build_model

S = synth.IMAGE_SIZE
E = int(I.empty_key().numpy())
batch = synth.graph_batch  # 6 examples, 2 neighbour and 1 negative slots: 24 slots, 7 distinct images


def pixels_of(keys):
    """The image table's pixels for int64 keys (the same random image for the same key, zeros for the padded key)."""
    return to_pixels(synth.key_rows(keys))


@pytest.fixture(scope="module")
def towers():
    """One set of towers shared by every variant, so only the embedding path differs."""
    model = build_model(synth.trainer_config(["model.dropout=0"]), 30)
    return model.query_tower, model.image_tower


def model_with(towers, *overrides):
    config = synth.trainer_config(["training.graph_multiplier=0.7", *overrides])
    return TwoTowerModel(config, *towers)


def loss_and_gradients(model, inputs, graph_mode):
    def step(inputs):
        with tf.GradientTape() as tape:
            parts = model.loss_parts(inputs, training=True)
            total = parts["retrieval_loss"] + parts["graph_loss"]
        return parts, tape.gradient(total, model.trainable_variables)

    parts, grads = (tf.function(step) if graph_mode else step)(inputs)
    return {k: float(v) for k, v in parts.items()}, [tf.convert_to_tensor(g).numpy() for g in grads]


def test_distinct_groups_share_a_group_exactly_when_keys_are_equal():
    keys = tf.constant([7, 3, 7, 9, 3, 3, 1], tf.int64)
    group, first, count, with_gradient = distinct_images.distinct_groups(keys)
    group, first = group.numpy(), first.numpy()
    assert int(count) == int(with_gradient) == 4
    for a in range(7):
        assert keys[first[group[a]]] == keys[a]
        for b in range(7):
            assert (group[a] == group[b]) == (keys[a] == keys[b])
    # Groups with a slot that needs gradients come first.
    needs = tf.constant([False, False, False, True, False, True, False])
    group, _, count, with_gradient = distinct_images.distinct_groups(keys, needs)
    assert int(count) == 4 and int(with_gradient) == 2
    assert sorted({int(group[i]) for i in (3, 1, 4, 5)}) == [0, 1]


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("graph_mode", [False, True])
@pytest.mark.parametrize("dynamic", [True, False], ids=["one_call", "static_chunks"])
def test_losses_and_gradients_equal_every_slot_through_the_tower(towers, distance, graph_mode, dynamic):
    inputs = batch()
    reference = model_with(towers, f"training.graph_distance={distance}", "training.image_chunk_size=0")
    # One call of the 8 distinct images, or chunks of 4: two chunks of the six the 24 slots could need.
    deduplicated = model_with(towers, f"training.graph_distance={distance}", "training.image_chunk_size=4",
                              f"training.dynamic_image_batch={str(dynamic).lower()}")
    assert deduplicated.static_image_batch is not dynamic
    want_parts, want_grads = loss_and_gradients(reference, inputs, graph_mode)
    got_parts, got_grads = loss_and_gradients(deduplicated, inputs, graph_mode)
    assert want_parts["graph_loss"] > 0 and want_parts["retrieval_loss"] > 0
    assert got_parts == pytest.approx(want_parts, rel=1e-4)  # float32 sums in another order
    for got, want in zip(got_grads, want_grads):
        # Float32 convolutions and sums in other batch sizes and orders differ by rounding (~1e-5 of the
        # gradient's norm here); a gradient that missed or doubled a slot would differ by far more.
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


@pytest.mark.parametrize("dynamic", [True, False], ids=["one_call", "static_chunks"])
def test_neighbours_without_gradient_keep_the_loss_and_drop_their_gradient_share(towers, dynamic):
    inputs = batch()
    exact_parts, exact_grads = loss_and_gradients(model_with(towers), inputs, graph_mode=True)
    frozen = model_with(towers, "training.graph_neighbor_gradient=false",
                        f"training.dynamic_image_batch={str(dynamic).lower()}")
    frozen_parts, frozen_grads = loss_and_gradients(frozen, inputs, graph_mode=True)
    assert frozen_parts == pytest.approx(exact_parts, rel=1e-4)
    image_tower_grads = len(frozen.query_tower.trainable_variables)
    assert any(not np.allclose(a, b, rtol=1e-4) for a, b in zip(frozen_grads[image_tower_grads:],
                                                               exact_grads[image_tower_grads:]))


@pytest.mark.parametrize("dynamic", [True, False], ids=["one_call", "static_chunks"])
def test_neighbours_without_gradient_when_every_neighbour_is_also_a_positive(towers, dynamic):
    # Nothing is left for the forward-only pass: an empty batch, which oneDNN's convolutions refuse.
    inputs = dict(batch())
    keys = np.array([[12, 13], [11, E], [12, 11], [14, 11], [11, 12], [13, E]], np.int64)
    inputs[I.NEIGHBOR_KEYS], inputs[I.NEIGHBOR_IMAGES] = tf.constant(keys), tf.constant(pixels_of(keys))
    exact_parts, exact_grads = loss_and_gradients(model_with(towers), inputs, graph_mode=True)
    frozen = model_with(towers, "training.graph_neighbor_gradient=false",
                        f"training.dynamic_image_batch={str(dynamic).lower()}")
    frozen_parts, frozen_grads = loss_and_gradients(frozen, inputs, graph_mode=True)
    assert frozen_parts == pytest.approx(exact_parts, rel=1e-4)
    for got, want in zip(frozen_grads, exact_grads):  # every neighbour is embedded with its gradient
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


def test_augmentation_gives_equal_keys_equal_pixels_and_keeps_padding_zero():
    inputs = {k: v for k, v in batch().items()}
    out = I.augment_each_distinct_image(inputs, seed=3)
    slots = [(I.IMAGE, I.IMAGE_KEY), (I.NEIGHBOR_IMAGES, I.NEIGHBOR_KEYS), (I.NEGATIVE_IMAGES, I.NEGATIVE_KEYS)]
    keys = np.concatenate([inputs[k].numpy().reshape(-1) for _, k in slots])
    pixels = np.concatenate([out[i].numpy().reshape(-1, S, S, 3) for i, _ in slots])
    before = np.concatenate([inputs[i].numpy().reshape(-1, S, S, 3) for i, _ in slots])
    assert not np.allclose(pixels[keys != E], before[keys != E])
    for key in set(keys):
        same = pixels[keys == key]
        assert np.all(same == same[0])
    assert np.all(pixels[keys == E] == 0)


def test_augmentation_is_tf_image_flip_brightness_contrast_and_clip():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, size=(4, S, S, 3), dtype=np.uint8)
    flip, brightness, contrast = np.array([True, False, True, False]), 0.07, 1.08
    keep = np.array([True, True, False, True])
    got = I._augmented(tf.constant(rows), tf.constant(keep), tf.constant(flip), tf.constant(brightness, tf.float32),
                       tf.constant(contrast, tf.float32)).numpy()
    for row in range(len(rows)):
        want = tf.image.convert_image_dtype(rows[row], tf.float32)
        if flip[row]:
            want = tf.image.flip_left_right(want)
        want = tf.image.adjust_contrast(tf.image.adjust_brightness(want, brightness), contrast)
        want = tf.clip_by_value(want, 0.0, 1.0).numpy() * keep[row]
        np.testing.assert_allclose(got[row], want, atol=1e-5)
    assert np.all(got[2] == 0)


def test_training_batches_from_the_image_table_augment_each_distinct_image_once(tmp_path):
    workdir = synth.write_workdir(tmp_path)
    slots = [(I.IMAGE, I.IMAGE_KEY), (I.NEIGHBOR_IMAGES, I.NEIGHBOR_KEYS), (I.NEGATIVE_IMAGES, I.NEGATIVE_KEYS)]
    batches = {}
    for augment in (True, False):
        config = synth.trainer_config([f"training.augment={str(augment).lower()}", "training.image_table=true"])
        out = next(iter(I.make_dataset(config, workdir, "train", 8, training=True)))
        batches[augment] = out
        slots = [(i, k) for i, k in slots if k in out]
        for images, _ in slots:
            assert out[images].shape.is_fully_defined(), images  # static, as the model needs
        keys = np.concatenate([out[k].numpy().reshape(-1) for _, k in slots])
        pixels = np.concatenate([out[i].numpy().reshape(-1, S, S, 3) for i, _ in slots])
        assert len(set(keys)) < len(keys)  # the batch repeats images, so the check below means something
        for key in set(keys):
            same = pixels[keys == key]
            assert np.all(same == same[0])
        assert np.all(pixels[keys == E] == 0)
    # The same examples (same seed): augmentation changed the looked-up pixels.
    np.testing.assert_array_equal(batches[True][I.IMAGE_KEY].numpy(), batches[False][I.IMAGE_KEY].numpy())
    assert not np.allclose(batches[True][I.IMAGE].numpy(), batches[False][I.IMAGE].numpy())


def test_graph_built_training_batches_hold_each_example_once_per_epoch(tmp_path):
    workdir = synth.write_workdir(tmp_path)

    def rows(config, batch_size, training):
        out = []
        for b in I.make_dataset(config, workdir, "train", batch_size, training=training, repeat=False):
            assert all(v.shape.is_fully_defined() and v.shape[0] == batch_size for v in b.values())
            out += [(int(k), tuple(t)) for k, t in zip(b[I.IMAGE_KEY].numpy(), b[I.QUERY_TOKENS].numpy().tolist())]
        return out

    every = rows(synth.trainer_config(["training.image_table=true"]), 1, training=False)
    built = rows(synth.trainer_config(["training.image_table=true", "training.graph_batches=true"]), 8, True)
    assert len(built) == len(every) // 8 * 8
    assert len(set(built)) == len(built) and set(built) <= set(every)


def test_image_table_gives_the_pixels_of_decoding_each_example(tmp_path):
    workdir = synth.write_workdir(tmp_path)
    batches = {}
    for table in (True, False):
        config = synth.trainer_config([f"training.image_table={str(table).lower()}"])
        batches[table] = next(iter(I.make_dataset(config, workdir, "eval", 8, training=False)))
    assert set(batches[True]) == set(batches[False])
    for name in batches[True]:
        np.testing.assert_array_equal(batches[True][name].numpy(), batches[False][name].numpy(), err_msg=name)
