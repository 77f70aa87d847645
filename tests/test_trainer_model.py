"""The towers, the traced training step (TPU-ready: numeric, static shapes) and mixed precision."""

import numpy as np
import pytest

from clicklens import compat  # noqa: F401
import tensorflow as tf

from tests import trainer_synthetic as synth
from trainer import input as I
from clicklens.errors import ClicklensError
from trainer.model import build_model, restore_model
from trainer.tokenizer import QueryTokenizer
from trainer.task import make_optimizer
from clicklens.workdir import Workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return synth.write_workdir(tmp_path_factory.mktemp("trainer_model"))


@pytest.fixture(scope="module")
def dataset(workdir):
    config = synth.trainer_config()
    tokenizer = QueryTokenizer(workdir.vocab, config.model.max_query_tokens)
    return I.make_dataset(config, workdir, "train", 8, training=True, tokenizer=tokenizer)


def check_unit_float32(embeddings, batch, dim):
    assert embeddings.dtype == tf.float32 and embeddings.shape == (batch, dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings.numpy(), axis=-1), 1.0, rtol=1e-3)


@pytest.mark.parametrize("overrides", [[], ["model.query_tower=transformer", "model.transformer_layers=2"]])
def test_query_tower_masks_padding(overrides):
    config = synth.trainer_config(overrides)
    model = build_model(config, 30)
    tokens = tf.constant([[5, 6, 0, 0, 0, 0], [5, 6, 0, 0, 0, 0], [0] * 6], tf.int32)
    out = model.query_tower(tokens)
    check_unit_float32(out[:2], 2, 8)
    # Padding does not change the embedding: same tokens, same vector, whatever the padding length.
    more_padding = model.query_tower(tf.constant([[5, 6, 0, 0, 0, 0]], tf.int32))
    np.testing.assert_allclose(out[0].numpy(), more_padding[0].numpy(), rtol=1e-5)


@pytest.mark.parametrize("overrides,shape", [
    ([], (3, 16, 16, 3)),
    (["pipeline.image_source=features", "pipeline.feature_dim=12", "model.image_tower=features"], (3, 12)),
    # A real tf.keras.applications backbone, weights=None (never downloaded); 32 px is its minimum.
    (["model.image_tower=backbone", "model.backbone=MobileNetV3Small", "pipeline.image_size=32"], (3, 32, 32, 3)),
])
def test_image_towers(overrides, shape):
    model = build_model(synth.trainer_config(overrides), 30)
    check_unit_float32(model.image_tower(tf.random.uniform(shape)), 3, 8)


def test_missing_backbone_weights_file_is_a_clear_error(tmp_path):
    config = synth.trainer_config(["model.image_tower=backbone", "pipeline.image_size=32",
                                   f"model.backbone_weights={tmp_path}/none.h5"])
    with pytest.raises(ClicklensError, match="backbone_weights"):
        build_model(config, 30)


def test_traced_train_step_has_no_string_ops_and_static_shapes(dataset):
    # The step as TPUStrategy builds it (elsewhere the distinct images go in one call of their varying number).
    config = synth.trainer_config(["training.dynamic_image_batch=false"])
    model = build_model(config, len(synth.vocab_tokens()))
    model.compile(make_optimizer(config.training))
    graph = tf.function(model.train_step).get_concrete_function(dataset.element_spec).graph
    ops = graph.get_operations()
    assert len(ops) > 100
    for op in ops:
        for t in list(op.inputs) + list(op.outputs):
            assert t.dtype != tf.string, f"string tensor in the train step: {op.type} {op.name}"
            if t.dtype not in (tf.resource, tf.variant):
                assert t.shape.is_fully_defined(), f"dynamic shape in the train step: {op.type} {op.name} {t.shape}"
    assert not [op for op in ops if "Image" in op.type or op.type.startswith(("String", "Regex", "Unicode"))]


def test_one_train_step_under_mixed_bfloat16(dataset):
    config = synth.trainer_config(["training.precision=mixed_bfloat16"])
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_model(config, len(synth.vocab_tokens()))
        model.compile(make_optimizer(config.training))
        batch = next(iter(dataset))
        before = [v.numpy().copy() for v in model.trainable_variables]
        logs = model.train_on_batch(batch, return_dict=True)
        conv = model.image_tower.get_layer("conv_0")
        assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == tf.float32
        assert model.query_tower(batch[I.QUERY_TOKENS]).dtype == tf.float32
        assert np.isfinite(logs["loss"]) and logs["loss"] > 0
        assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_one_train_step_under_mixed_float16_scales_the_loss(dataset):
    config = synth.trainer_config(["training.precision=mixed_float16"])
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model(config, len(synth.vocab_tokens()))
        model.compile(make_optimizer(config.training))
        assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        logs = model.train_on_batch(next(iter(dataset)), return_dict=True)
        assert np.isfinite(logs["loss"])
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_restore_model_without_checkpoint_is_a_clear_error(workdir, tmp_path):
    empty = Workdir(str(tmp_path))
    with pytest.raises(ClicklensError, match="no checkpoint"):
        restore_model(synth.trainer_config(), empty)


def test_restore_model_refuses_a_checkpoint_of_another_model(workdir, tmp_path):
    """A checkpoint holding only an image tower (as pretraining writes) is not taken for a two-tower model."""
    import shutil

    from clicklens.training_runs import checkpoint_dir

    other = Workdir(str(tmp_path))
    shutil.copytree(workdir.examples, other.examples)  # restore_model reads the vocabulary from there
    config = synth.trainer_config()
    tower_only = build_model(config, len(synth.vocab_tokens())).image_tower
    tf.train.Checkpoint(model=tf.train.Checkpoint(image_tower=tower_only)).save(f"{checkpoint_dir(other)}/ckpt")
    with pytest.raises(ClicklensError, match="not a checkpoint of this two-tower model"):
        restore_model(config, other)
