"""Trainer run-time features: Vertex AI directories, early stopping, local backbone weights."""

import json
import logging
import pathlib

import numpy as np
import pytest

from clicklens import compat  # noqa: F401
import tensorflow as tf

from tests import trainer_synthetic as synth
from clicklens import cli
from trainer import task
from trainer.callbacks import RetrievalEarlyStopping
from clicklens.errors import ClicklensError
from clicklens.training_runs import checkpoint_dir
from trainer.model import build_image_tower, build_model, restore_model
from clicklens.workdir import Workdir

AIP_VARIABLES = ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "AIP_TENSORBOARD_LOG_DIR")


def _weights_equal(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# Vertex AI environment.


def test_unset_vertex_variables_mean_the_workdir_layout(monkeypatch, tmp_path):
    workdir = Workdir(str(tmp_path))
    for name in AIP_VARIABLES:
        monkeypatch.setenv(name, "")  # set but empty counts as unset
    assert checkpoint_dir(workdir) == workdir.checkpoints
    assert task.tensorboard_dir(workdir) == workdir.tensorboard


def test_only_a_new_run_reads_the_pretrained_tower(tmp_path):
    """A resumed or warm-started run takes every weight from a checkpoint, so the pretrained tower's file
    (model.image_init=pretrained) is neither needed nor read; a run from scratch fails without it."""
    root = tmp_path / "work"
    synth.write_workdir(root)
    config_path = synth.write_config_yaml(str(tmp_path / "config.yaml"))
    train = ["train", "--config", config_path, "--workdir", str(root), "--set", "training.steps_per_epoch=2"]
    pretrained = ["--set", "model.image_init=pretrained", "--set", f"model.image_init_path={tmp_path}/no/tower"]
    assert cli.main(train + pretrained + ["--set", "training.epochs=1"]) == 2  # a new run: no tower there
    assert cli.main(train + ["--set", "training.epochs=1"]) == 0  # from random weights
    # The same run continued for a second epoch, and a new run warm-started from the first.
    assert cli.main(train + pretrained + ["--set", "training.epochs=2"]) == 0
    assert cli.main(train + pretrained + ["--set", "training.warm_start=latest"]) == 0


def test_vertex_ai_directories_receive_checkpoints_tensorboard_and_model(monkeypatch, tmp_path):
    # ~15 s (2 busy cores): a real 2-step `clicklens train` run, evaluation included (metrics.json).
    root = tmp_path / "work"
    workdir = synth.write_workdir(root)
    config_path = synth.write_config_yaml(str(tmp_path / "config.yaml"))
    aip = {name: tmp_path / name.lower() for name in AIP_VARIABLES}
    for name, path in aip.items():
        monkeypatch.setenv(name, str(path))

    code = cli.main(["train", "--config", config_path, "--workdir", str(root),
                     "--set", "training.steps_per_epoch=2", "--set", "training.epochs=1"])
    assert code == 0

    latest = tf.train.latest_checkpoint(str(aip["AIP_CHECKPOINT_DIR"]))
    assert latest and latest.endswith("ckpt-2")
    assert list(aip["AIP_TENSORBOARD_LOG_DIR"].rglob("events.out.tfevents*"))
    # Nothing in the places the workdir layout would have used instead.
    assert not pathlib.Path(workdir.checkpoints).exists()
    assert not pathlib.Path(workdir.tensorboard).exists()

    # AIP_MODEL_DIR: metrics.json (same as the workdir's) and the final weights, which restore.
    model_dir = aip["AIP_MODEL_DIR"]
    assert json.loads((model_dir / "metrics.json").read_text()) == json.loads(pathlib.Path(workdir.metrics)
                                                                              .read_text())
    config = synth.trainer_config()
    restored = restore_model(config, workdir)  # evaluate/export read AIP_CHECKPOINT_DIR too
    exported = build_model(config, len(synth.vocab_tokens()))
    fresh = exported.get_weights()
    tf.train.Checkpoint(model=exported).read(str(model_dir / "checkpoint" / "model")) \
        .assert_existing_objects_matched()
    assert _weights_equal(exported.get_weights(), restored.get_weights())
    assert not _weights_equal(exported.get_weights(), fresh)


# ---------------------------------------------------------------------------
# Early stopping.


def test_early_stopping_ends_the_run_when_eval_loss_stops_improving(tmp_path, caplog):
    # ~15 s (2 busy cores): traces the train and eval steps of a real run.
    workdir = synth.write_workdir(tmp_path)
    # learning_rate 0: the weights never change, so the eval loss is the same every epoch and
    # patience 1 must stop the run after its second epoch instead of the planned five.
    config = synth.trainer_config(["training.learning_rate=0.0", "training.early_stopping_patience=1",
                                   "training.early_stopping_metric=loss", "training.epochs=5",
                                   "training.steps_per_epoch=1", "training.early_stopping_start_epoch=0"])
    with caplog.at_level(logging.INFO, logger="trainer.task"), caplog.at_level(logging.INFO, logger="trainer.callbacks"):
        model = task.train(config, workdir)
    assert int(model.optimizer.iterations.numpy()) == 2
    assert tf.train.latest_checkpoint(workdir.checkpoints).endswith("ckpt-2")
    assert "stopped after epoch 2 of 5" in caplog.text
    assert model.history.history["val_loss"][0] == model.history.history["val_loss"][1]
    # Each epoch's eval loss is in the progress output, the figure early stopping decided on.
    val_loss = model.history.history["val_loss"][1]
    assert "epoch 2: val_graph_loss" in caplog.text and f"val_loss {val_loss:.4f}" in caplog.text


def test_early_stopping_on_the_eval_loss_needs_a_whole_eval_batch(tmp_path):
    workdir = synth.write_workdir(tmp_path)  # 24 eval examples
    config = synth.trainer_config(["training.early_stopping_patience=1", "training.early_stopping_metric=loss",
                                   "training.per_replica_batch_size=32"])
    with pytest.raises(ClicklensError, match="early_stopping_metric=loss"):
        task.train(config, workdir)


def test_early_stopping_on_eval_recall_stops_when_retrieval_stops_improving(tmp_path, caplog):
    workdir = synth.write_workdir(tmp_path)
    # learning_rate 0: retrieval never changes, so patience 1 stops after the second epoch.
    config = synth.trainer_config(["training.learning_rate=0.0", "training.early_stopping_patience=1",
                                   "training.epochs=5", "training.steps_per_epoch=1",
                                   "training.early_stopping_start_epoch=0"])
    assert config.training.early_stopping_metric == "recall@10"
    with caplog.at_level(logging.INFO, logger="trainer.task"), caplog.at_level(logging.INFO, logger="trainer.callbacks"):
        model = task.train(config, workdir)
    assert int(model.optimizer.iterations.numpy()) == 2
    assert "stopped after epoch 2 of 5" in caplog.text
    recalls = model.history.history["val_recall@10"]
    assert len(recalls) == 2 and recalls[0] == recalls[1] and 0.0 <= recalls[0] <= 1.0
    assert "epoch 2: eval ndcg@10" in caplog.text
    # Running `train` again does not train past the stopping point.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer.task"):
        again = task.train(config, workdir)
    assert int(again.optimizer.iterations.numpy()) == 2 and "training stopped early at step 2" in caplog.text


def test_a_one_epoch_run_skips_the_early_stopping_evaluation(tmp_path, caplog):
    # A warm-started daily update is often one epoch: there is nothing to choose between, so no corpus pass.
    workdir = synth.write_workdir(tmp_path)
    config = synth.trainer_config(["training.early_stopping_patience=1", "training.epochs=1",
                                   "training.steps_per_epoch=1"])
    with caplog.at_level(logging.INFO, logger="trainer.callbacks"):
        model = task.train(config, workdir)
    assert int(model.optimizer.iterations.numpy()) == 1
    assert "val_recall@10" not in model.history.history and "epoch 1: eval" not in caplog.text


def test_retrieval_early_stopping_restores_the_best_epoch():
    # The callback's own logic on a scripted metric sequence: best at epoch 2, then two worse epochs.
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    figures = iter([0.2, 0.5, 0.4, 0.3])
    weights_seen = []

    def measure(m):
        weights_seen.append([w.copy() for w in m.get_weights()])
        return {"recall@10": next(figures)}

    stopper = RetrievalEarlyStopping(measure, "recall@10", patience=2)
    stopper.set_model(model)
    for epoch in range(4):
        model.set_weights([w + 1.0 for w in model.get_weights()])
        stopper.on_epoch_end(epoch, {})
        if model.stop_training:
            break
    assert stopper.stopped_epoch == 3 and stopper.best_epoch == 1
    assert stopper.restore_best()
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights_seen[1]))


def test_epochs_before_the_start_epoch_do_not_count_toward_patience():
    # A dip at epoch 3 (0-based 2) before start_epoch 3 does not count; epochs 4 and 5 do.
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    figures = iter([0.2, 0.5, 0.4, 0.3, 0.35, 0.3])
    stopper = RetrievalEarlyStopping(lambda m: {"recall@10": next(figures)}, "recall@10", patience=2, start_epoch=3)
    stopper.set_model(model)
    for epoch in range(6):
        stopper.on_epoch_end(epoch, {})
        if model.stop_training:
            break
    assert stopper.stopped_epoch == 4 and stopper.best_epoch == 1


def test_early_stopping_counts_from_half_the_epochs_unless_configured():
    assert task.early_stopping_start(synth.trainer_config(["training.epochs=6"]).training, 6) == 3
    assert task.early_stopping_start(synth.trainer_config(["training.epochs=30"]).training, 30) == 15
    # A warm-started run's own epoch count decides, not training.epochs.
    assert task.early_stopping_start(synth.trainer_config(["training.epochs=30"]).training, 4) == 2
    explicit = synth.trainer_config(["training.early_stopping_start_epoch=0"]).training
    assert task.early_stopping_start(explicit, 30) == 0


def test_learning_rate_warms_up_then_decays_to_zero():
    config = synth.trainer_config(["training.learning_rate=0.01", "training.warmup_fraction=0.1"])
    schedule = task.learning_rate(config.training, total_steps=100)
    rates = [float(schedule(step)) for step in (0, 5, 10, 55, 100)]
    assert rates[0] == pytest.approx(0.0) and rates[1] == pytest.approx(0.005)
    assert rates[2] == pytest.approx(0.01) and 0.0 < rates[3] < 0.01 and rates[4] == pytest.approx(0.0, abs=1e-9)
    constant = synth.trainer_config(["training.lr_schedule=constant", "training.learning_rate=0.01"])
    assert task.learning_rate(constant.training, total_steps=100) == 0.01


# ---------------------------------------------------------------------------
# Local backbone weights.  MobileNetV3Small at 32 px (its minimum); weights=None, nothing downloaded.

BACKBONE = ["model.image_tower=backbone", "model.backbone=MobileNetV3Small", "pipeline.image_size=32"]


def _backbone(image_tower):
    (inner,) = [layer for layer in image_tower.layers if isinstance(layer, tf.keras.Model)]
    return inner


@pytest.fixture(scope="module")
def saved_backbone(tmp_path_factory):
    """(path of an .h5 file, path of a TF checkpoint prefix, their weights, the fresh init they replaced)."""
    directory = tmp_path_factory.mktemp("backbone")
    tf.keras.utils.set_random_seed(1)
    backbone = tf.keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3),
                                                      pooling="avg")
    fresh = backbone.get_weights()
    # Values no initializer produces (small noise on every weight, zeros and ones included):
    # equal weights after loading can only come from the file.
    rng = np.random.default_rng(0)
    saved = [(w + rng.normal(0.0, 0.01, w.shape)).astype(w.dtype) for w in fresh]
    backbone.set_weights(saved)
    backbone.save_weights(str(directory / "backbone.h5"))
    backbone.save_weights(str(directory / "backbone_ckpt"))
    return str(directory / "backbone.h5"), str(directory / "backbone_ckpt"), saved, fresh


@pytest.mark.parametrize("file_format", ["h5", "tf_checkpoint"])
def test_backbone_weights_load_from_a_local_file(saved_backbone, file_format):
    h5, prefix, saved, fresh = saved_backbone
    path = h5 if file_format == "h5" else prefix
    tf.keras.utils.set_random_seed(1)  # the same seed as the saved backbone's own fresh init
    tower = build_image_tower(synth.trainer_config(BACKBONE + [f"model.backbone_weights={path}"]))
    loaded = _backbone(tower).get_weights()
    assert _weights_equal(loaded, saved)
    assert not any(np.array_equal(a, b) for a, b in zip(loaded, fresh))
    embedding = tower(tf.random.uniform((2, 32, 32, 3)))
    assert embedding.shape == (2, 8) and np.all(np.isfinite(embedding.numpy()))


def _first_conv_only():
    """A model holding just a copy of MobileNetV3Small's first convolution (same shape, same checkpoint key)."""
    return tf.keras.Sequential([tf.keras.Input((32, 32, 3)),
                                tf.keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)])


def test_backbone_weights_of_another_model_are_a_clear_error(tmp_path):
    # The checkpoint matches the backbone's first variable only: Keras alone would load that one
    # and leave the other 205 at their initial values without complaint.
    path = str(tmp_path / "other_ckpt")
    _first_conv_only().save_weights(path)
    with pytest.raises(ClicklensError, match="does not fit"):
        build_image_tower(synth.trainer_config(BACKBONE + [f"model.backbone_weights={path}"]))


def test_restoring_a_trained_backbone_model_does_not_need_the_starting_weights(saved_backbone, tmp_path):
    """The checkpoint holds every weight: export / evaluate work where the starting file is absent."""
    import shutil

    h5, _, _, _ = saved_backbone
    starting = str(tmp_path / "start.h5")
    shutil.copy(h5, starting)
    config = synth.trainer_config(BACKBONE + [f"model.backbone_weights={starting}"])
    workdir = synth.write_workdir(str(tmp_path / "w"), config)
    model = build_model(config, len(synth.vocab_tokens()))
    tf.train.Checkpoint(model=model).save(checkpoint_dir(workdir) + "/ckpt")
    pathlib.Path(starting).unlink()
    restored = restore_model(config, workdir)
    assert _weights_equal(restored.image_tower.get_weights(), model.image_tower.get_weights())
