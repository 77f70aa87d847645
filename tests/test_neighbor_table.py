"""Neighbours' embeddings from a refreshed table (opt-in training.graph_neighbor_table_steps, trainer/neighbor_table.py).

Against the exact graph term (every neighbour through the tower): right
after a refresh the losses are the same and the neighbours' share of the
image tower's gradient is gone; a stale table gives another graph loss until
the next refresh.  End to end, `train` refreshes every N steps, the batches
carry no neighbour images, and the table stays out of the checkpoints.
"""

import logging

import numpy as np
import pytest

from clicklens import compat  # noqa: F401
import tensorflow as tf

from clicklens.config import ConfigError
from tests import trainer_synthetic as synth
from trainer import input as I
from trainer.image_table import ImageTable, to_pixels
from trainer.model import TwoTowerModel, build_model
from trainer.neighbor_table import NeighborEmbeddingTable
from trainer.task import train
from clicklens.workdir import Workdir

S = synth.IMAGE_SIZE
NEIGHBOR_KEYS = synth.graph_batch_keys(synth.GRAPH_BATCH_NEIGHBOR_KEYS)


def image_table():
    """An ImageTable of the shared graph batch's images (and the padded key's zero image)."""
    keys = np.unique(np.concatenate([synth.graph_batch_keys(k).reshape(-1) for k in (
        synth.GRAPH_BATCH_IMAGE_KEYS, synth.GRAPH_BATCH_NEIGHBOR_KEYS, synth.GRAPH_BATCH_NEGATIVE_KEYS)]))
    return ImageTable(tf.constant(keys), tf.constant(synth.key_rows(keys)))


def batch():
    """The shared graph batch without neighbour images: the model looks the neighbours up in the table."""
    return {name: value for name, value in synth.graph_batch().items() if name != I.NEIGHBOR_IMAGES}


def config(*overrides):
    return synth.trainer_config(["model.dropout=0", "training.graph_multiplier=0.7",
                                 *overrides])


def loss_and_gradients(model, inputs):
    @tf.function
    def step(inputs):
        with tf.GradientTape() as tape:
            parts = model.loss_parts(inputs, training=True)
            total = parts["retrieval_loss"] + parts["graph_loss"]
        return parts, tape.gradient(total, model.trainable_variables)

    parts, grads = step(inputs)
    return {k: float(v) for k, v in parts.items()}, [tf.convert_to_tensor(g).numpy() for g in grads]


def test_a_fresh_table_gives_the_exact_losses_without_the_neighbours_gradient():
    towers = build_model(config(), 30)
    exact = TwoTowerModel(config(), towers.query_tower, towers.image_tower)
    with_table = TwoTowerModel(config("training.graph_neighbor_table_steps=5"), towers.query_tower,
                               towers.image_tower)
    with_table.neighbor_table = NeighborEmbeddingTable(image_table(), 8)
    with_table.neighbor_table.refresh(towers.image_tower)
    inputs = batch()
    exact_inputs = synth.graph_batch()

    want_parts, want_grads = loss_and_gradients(exact, exact_inputs)
    got_parts, got_grads = loss_and_gradients(with_table, inputs)
    assert want_parts["graph_loss"] > 0
    assert got_parts == pytest.approx(want_parts, rel=1e-4)
    query_vars = len(towers.query_tower.trainable_variables)
    for got, want in zip(got_grads[:query_vars], want_grads[:query_vars]):
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)
    # The image tower no longer gets the neighbours' share of the graph term's gradient.
    assert any(np.linalg.norm(got - want) > 1e-2 * np.linalg.norm(want)
               for got, want in zip(got_grads[query_vars:], want_grads[query_vars:]))
    # The table is not a weight: neither trained nor saved.
    assert not any("neighbor_embeddings" in v.name for v in with_table.variables)


def test_a_stale_table_differs_until_it_is_refreshed():
    towers = build_model(config(), 30)
    model = TwoTowerModel(config("training.graph_neighbor_table_steps=5"), towers.query_tower, towers.image_tower)
    model.neighbor_table = NeighborEmbeddingTable(image_table(), 8)
    model.neighbor_table.refresh(towers.image_tower)
    before = model.neighbor_table.lookup(tf.constant(NEIGHBOR_KEYS, tf.int64)).numpy()
    want = towers.image_tower(to_pixels(synth.key_rows(NEIGHBOR_KEYS).reshape(-1, S, S, 3)), training=False).numpy()
    np.testing.assert_allclose(before.reshape(-1, 8), want, rtol=1e-5, atol=1e-6)

    kernel = towers.image_tower.get_layer("conv_0").kernel
    kernel.assign(kernel + tf.random.stateless_normal(kernel.shape, [1, 2], stddev=0.3))
    stale = model.loss_parts(batch(), training=True)["graph_loss"]
    model.neighbor_table.refresh(towers.image_tower)
    fresh = model.loss_parts(batch(), training=True)["graph_loss"]
    assert float(stale) != pytest.approx(float(fresh), rel=1e-3)
    after = model.neighbor_table.lookup(tf.constant(NEIGHBOR_KEYS, tf.int64)).numpy()
    want = towers.image_tower(to_pixels(synth.key_rows(NEIGHBOR_KEYS).reshape(-1, S, S, 3)), training=False).numpy()
    np.testing.assert_allclose(after.reshape(-1, 8), want, rtol=1e-5, atol=1e-6)


def test_a_key_outside_the_table_is_an_error():
    table = NeighborEmbeddingTable(image_table(), 8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in corpus"):
        table.lookup(tf.constant([[11, 99]], tf.int64))


def test_train_refreshes_every_n_steps_with_no_neighbour_images_in_the_batches(tmp_path, caplog):
    cfg = synth.trainer_config(["training.graph_neighbor_table_steps=4", "training.steps_per_epoch=6",
                                "training.epochs=2"])
    workdir = synth.write_workdir(str(tmp_path), cfg)
    first = next(iter(I.make_dataset(cfg, workdir, "train", 8, training=True)))
    assert I.NEIGHBOR_KEYS in first and I.NEIGHBOR_WEIGHTS in first and I.NEIGHBOR_IMAGES not in first
    with caplog.at_level(logging.INFO, logger="trainer.neighbor_table"):
        model = train(cfg, Workdir(str(tmp_path)))
    assert int(model.optimizer.iterations.numpy()) == 12
    assert model.neighbor_table.refreshed_at == 8  # refreshed before steps 0, 4 and 8
    assert any("neighbours' embeddings from a table of" in line for line in caplog.messages)
    saved = tf.train.list_variables(tf.train.latest_checkpoint(str(tmp_path / "model" / "checkpoints")))
    assert not any("neighbor" in name for name, _ in saved)


def test_the_table_needs_the_image_table():
    with pytest.raises(ConfigError, match="training.graph_neighbor_table_steps: needs training.image_table"):
        synth.trainer_config(["training.graph_neighbor_table_steps=4", "training.image_table=false"])
