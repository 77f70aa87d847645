"""Self-supervised pretraining of the image tower: loss, augmentations, `clicklens pretrain` and image_init."""

import argparse
import json
import math

import numpy as np
import pytest

from clicklens import compat  # noqa: F401
import tensorflow as tf

from clicklens.config import ConfigError
from clicklens.errors import ClicklensError
from tests import trainer_synthetic as synth
from trainer import augment, losses, pretrain, task
from trainer.model import build_image_tower, with_image_init_path

# 24 synthetic images, 8 per step: 3 steps per epoch.
PRETRAIN = ["pretrain.per_replica_batch_size=8", "pretrain.epochs=1", "pretrain.projection_dim=8",
            "pretrain.projection_hidden=16", "training.checkpoint_every_steps=2", "training.log_every_steps=1"]

COLOUR_OFF = ["pretrain.augment.brightness=0", "pretrain.augment.contrast=0", "pretrain.augment.saturation=0",
              "pretrain.augment.hue=0"]


def config(extra=()):
    return synth.trainer_config(PRETRAIN + list(extra))


# ---------------------------------------------------------------------------
# NT-Xent.


def test_nt_xent_matches_a_hand_computed_value():
    # Image 1's view a scores 1 with its other view, 0 with image 2's two views, itself not at all:
    # -log(e / (e + 2)) for each of the four views.
    views = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    loss = losses.nt_xent_loss(views, views, temperature=1.0).numpy()
    np.testing.assert_allclose(loss, [math.log(1 + 2 / math.e)] * 4, rtol=1e-6)
    # Temperature divides the scores; projections are normalised first.
    loss = losses.nt_xent_loss(3 * views, views, temperature=0.5).numpy()
    np.testing.assert_allclose(loss, [math.log(1 + 2 / math.e ** 2)] * 4, rtol=1e-6)


def test_nt_xent_is_lowest_when_the_views_of_each_image_match():
    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=(16, 8)), tf.float32)
    noisy = a + 0.1 * tf.constant(rng.normal(size=(16, 8)), tf.float32)
    shuffled = tf.gather(a, rng.permutation(16))
    matched, near, wrong = (float(tf.reduce_mean(losses.nt_xent_loss(a, b, 0.1))) for b in (a, noisy, shuffled))
    assert matched < near < wrong
    # Gradient descent on the loss pulls a view towards its own pair.
    b = tf.Variable(shuffled)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(losses.nt_xent_loss(a, b, 0.1))
    stepped = b - 0.5 * tape.gradient(loss, b)
    assert float(tf.reduce_mean(losses.nt_xent_loss(a, stepped, 0.1))) < float(loss)


def test_projection_dim_0_contrasts_the_towers_own_embeddings():
    settings = config(["pretrain.projection_dim=0"])
    model = pretrain.ContrastivePretrainer(build_image_tower(settings), settings.pretrain)
    images = _images(4)
    np.testing.assert_array_equal(model(images).numpy(), model.image_tower(images).numpy())
    assert len(model.trainable_variables) == len(model.image_tower.trainable_variables)


# ---------------------------------------------------------------------------
# Augmentations.


def _images(n=6, size=16, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(size=(n, size, size, 3)), tf.float32)


def test_views_keep_shape_and_range_and_differ():
    images = _images()
    settings = config(["pretrain.augment.brightness=0.4", "pretrain.augment.contrast=0.4",
                       "pretrain.augment.saturation=0.4", "pretrain.augment.hue=0.1",
                       "pretrain.augment.grayscale_probability=0.2", "pretrain.augment.blur_probability=0.5"]
                      ).pretrain.augment
    a, b = augment.random_view(images, settings), augment.random_view(images, settings)
    for view in (a, b):
        assert view.shape == images.shape and view.dtype == tf.float32
        assert float(tf.reduce_min(view)) >= 0.0 and float(tf.reduce_max(view)) <= 1.0
    assert not np.allclose(a.numpy(), b.numpy())


def test_every_switch_off_is_the_identity():
    off = config(COLOUR_OFF + ["pretrain.augment.crop_min_area=1", "pretrain.augment.flip=false"]).pretrain.augment
    images = _images()
    np.testing.assert_array_equal(augment.random_view(images, off).numpy(), images.numpy())


def test_colour_jitter_switched_off_keeps_colour_and_each_switch_changes_it():
    red = tf.tile(tf.constant([[[[0.8, 0.1, 0.1]]]]), [8, 16, 16, 1])
    off = config(COLOUR_OFF).pretrain.augment
    assert not augment.has_colour_jitter(off) and off.grayscale_probability == 0
    np.testing.assert_allclose(augment.random_view(red, off).numpy(), red.numpy(), atol=1e-6)
    for name, strength in (("brightness", 0.4), ("contrast", 0.4), ("saturation", 0.4), ("hue", 0.5)):
        one = config(COLOUR_OFF + [f"pretrain.augment.{name}={strength}", "pretrain.augment.jitter_probability=1"])
        views = augment.random_view(red, one.pretrain.augment).numpy()
        assert not np.allclose(views, red.numpy(), atol=1e-2), name
        if name != "hue":  # a small hue change keeps red red: channel order is kept
            assert np.all(views[..., 0] >= views[..., 1] - 1e-6), name


def test_default_jitter_keeps_hue_close():
    red = tf.tile(tf.constant([[[[0.8, 0.1, 0.1]]]]), [64, 16, 16, 1])
    hue = tf.image.rgb_to_hsv(augment.random_view(red, config().pretrain.augment))[..., 0].numpy()
    distance = np.minimum(hue, 1 - hue)  # red is hue 0 on the wheel
    assert distance.max() <= config().pretrain.augment.hue + 1e-3


def test_crops_and_flips_move_pixels():
    images = _images()
    crop = config(["pretrain.augment.flip=false", "pretrain.augment.crop_min_area=0.2"]).pretrain.augment
    assert not np.allclose(augment.random_view(images, crop).numpy(), images.numpy())
    flipped = augment.random_flip(tf.tile(images[:1], [64, 1, 1, 1])).numpy()
    mirrored = np.all(np.isclose(flipped, images[:1].numpy()[:, :, ::-1]), axis=(1, 2, 3))
    same = np.all(np.isclose(flipped, images[:1].numpy()), axis=(1, 2, 3))
    assert np.all(mirrored | same) and mirrored.any() and same.any()


def test_blur_smooths_texture_and_keeps_flat_colour():
    flat = tf.fill([4, 16, 16, 3], 0.3)
    np.testing.assert_allclose(augment.gaussian_blur(flat, 1.5).numpy(), flat.numpy(), atol=1e-6)
    stripes = tf.tile(tf.constant([0.0, 1.0])[None, None, :, None], [64, 16, 8, 3])
    blurred = augment.gaussian_blur(stripes, 1.5)
    assert blurred.shape == stripes.shape
    assert float(tf.math.reduce_std(blurred)) < float(tf.math.reduce_std(stripes))


# ---------------------------------------------------------------------------
# `clicklens pretrain` and model.image_init.


def _similar_images(workdir):
    """similar_images.jsonl for the synthetic world: same colour and shape."""
    catalog = synth.images()
    with tf.io.gfile.GFile(workdir.similar_images, "w") as f:
        for i, (colour, shape, _) in catalog.items():
            similar = [j for j, (c, s, _) in catalog.items() if (c, s) == (colour, shape) and j != i]
            f.write(json.dumps({"image_id": i, "similar_image_ids": similar}) + "\n")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A synthetic workdir after a 1-epoch `clicklens pretrain` (the verb's function, in process)."""
    workdir = synth.write_workdir(tmp_path_factory.mktemp("pretrain"), config())
    _similar_images(workdir)
    assert pretrain.run(config(), workdir, argparse.Namespace()) == 0
    return workdir


def _tower_weights(path):
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if name.startswith("layer_with_weights") and "OPTIMIZER" not in name}


def test_pretrain_writes_tower_encoder_report_and_checkpoints(pretrained):
    assert tf.io.gfile.exists(pretrained.pretrained_tower + ".index")
    assert json.loads(open(pretrained.pretrained_tower + ".json").read())["model.cnn_filters"] == [4, 8]
    assert tf.train.latest_checkpoint(pretrain.pretrain_checkpoints(pretrained)).endswith("-3")
    assert tf.io.gfile.glob(pretrained.pretrain + "/tensorboard/*")
    report = json.loads(open(pretrained.pretrain + "/report.json").read())
    seeing = report["seeing"]
    assert seeing["num_queries"] == {"all": 24, "cold": 3}
    for space in ("raw_pixels", "random", "pretrained"):
        assert 0.0 <= seeing[space]["all"]["recall@10"] <= 1.0
    assert "pretrained_vs_raw_pixels" in seeing
    # The image_encoder SavedModel embeds raw PNG bytes as the tower does.
    encoder = tf.saved_model.load(report["image_encoder"])
    png = synth.images()["red-circle-0"][2]
    embedding = encoder.signatures["serving_default"](image_bytes=tf.constant([png]))["embedding"]
    assert embedding.shape == (1, 8)


def test_pretrain_resumes_and_does_not_redo_finished_steps(pretrained, caplog):
    with caplog.at_level("INFO"):
        pretrain.pretrain(config(), pretrained)
    assert "all 3 pretraining steps already done" in caplog.text
    with caplog.at_level("INFO"):
        pretrain.pretrain(config(["pretrain.epochs=2", "pretrain.learning_rate=0.001"]), pretrained)
    assert "resuming from" in caplog.text and "at step 3 of 6" in caplog.text


def test_train_starts_the_image_tower_from_the_pretrained_weights(pretrained, tmp_path):
    saved = _tower_weights(pretrained.pretrained_tower)
    # Pretrained weights live in the pretraining workdir; train elsewhere, with image_init_path naming them.
    workdir = synth.write_workdir(tmp_path, config())
    settings = config(["model.image_init=pretrained", f"model.image_init_path={pretrained.pretrained_tower}",
                       "training.learning_rate=0", "training.steps_per_epoch=1", "training.augment=false"])
    model = task.train(settings, workdir)  # a zero learning rate: the weights after step 1 are those at step 0
    tower = build_image_tower(settings)
    for built, trained in zip(tower.weights, model.image_tower.weights):
        np.testing.assert_array_equal(built.numpy(), trained.numpy())
    assert sorted(np.concatenate([w.ravel() for w in saved.values()])) == pytest.approx(
        sorted(np.concatenate([w.numpy().ravel() for w in tower.weights])))
    random = build_image_tower(config())
    assert not np.allclose(random.weights[0].numpy(), tower.weights[0].numpy())


def test_image_init_path_defaults_to_the_workdir(pretrained):
    settings = with_image_init_path(config(["model.image_init=pretrained"]), pretrained)
    assert settings.model.image_init_path == pretrained.pretrained_tower
    build_image_tower(settings)  # loads
    assert with_image_init_path(config(), pretrained).model.image_init_path == ""


def test_pretrained_without_weights_is_a_clear_error(tmp_path):
    workdir = synth.write_workdir(tmp_path, config())
    with pytest.raises(ClicklensError, match="no pretrained image tower at .*run `clicklens pretrain` first"):
        task.train(config(["model.image_init=pretrained"]), workdir)


def test_a_tower_of_another_shape_is_a_clear_error(pretrained):
    settings = config(["model.image_init=pretrained", f"model.image_init_path={pretrained.pretrained_tower}",
                       "model.cnn_filters=[4, 16]"])
    with pytest.raises(ClicklensError, match=r"model.cnn_filters \[4, 8\] there, \[4, 16\] here"):
        build_image_tower(settings)


@pytest.mark.parametrize("override, key", [
    ("model.image_init=imagenet", "model.image_init"),
    ("pretrain.temperature=0", "pretrain.temperature"),
    ("pretrain.augment.hue=0.9", "pretrain.augment.hue"),
    ("pretrain.augment.crop_min_area=0", "pretrain.augment.crop_min_area"),
    ("pretrain.augment.colour=1", "pretrain.augment.colour"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config([override])


def test_pretrain_needs_pixels(tmp_path):
    settings = synth.trainer_config(["pipeline.image_source=features", "pipeline.feature_dim=4",
                                     "model.image_tower=features"])
    with pytest.raises(ClicklensError, match="pipeline.image_source=pixels"):
        pretrain.corpus_pixels(settings, synth.write_workdir(tmp_path, config()))
