"""training.warm_start: day 2 starts from day 1's weights, token rows carried over by token."""

import json

import numpy as np
import pytest

from clicklens import compat  # noqa: F401
import tensorflow as tf

from clicklens import training_runs
from clicklens.errors import ClicklensError
from clicklens.training_runs import checkpoint_dir
from clicklens.vocabulary import load_vocab
from tests import trainer_synthetic as synth
from trainer import strategy as strategies
from trainer import task, warm_start
from trainer.model import build_model

NEW_WORD = "teal"


@pytest.fixture(scope="module")
def day_one(tmp_path_factory):
    """A finished day-1 run (6 steps) on the synthetic world."""
    workdir = synth.write_workdir(str(tmp_path_factory.mktemp("warm") / "w"))
    model = task.train(synth.trainer_config(), workdir)
    rows = model.query_tower.get_layer("token_embedding").embeddings.numpy()
    return workdir, rows, load_vocab(workdir.vocab)


def _day_two_vocab(workdir, old_vocab):
    """Day 2's pipeline (pipeline.base_vocab) keeps the old ids and appends a new word."""
    with tf.io.gfile.GFile(workdir.vocab, "w") as f:
        f.write("\n".join(old_vocab + [NEW_WORD]) + "\n")


def test_a_finished_run_is_marked_and_keeps_its_vocabulary(day_one):
    workdir, _, vocab = day_one
    directory = checkpoint_dir(workdir)
    assert training_runs.is_finished(directory)
    assert load_vocab(f"{directory}/{training_runs.RUN_VOCAB}") == vocab


def test_day_two_starts_from_day_one_rows_and_a_new_word_gets_a_row(day_one, tmp_path):
    workdir, day_one_rows, old_vocab = day_one
    # Day 2 in a copy of the work directory: the day-1 fixture stays as it was for the other tests.
    import shutil

    shutil.copytree(workdir.root, tmp_path / "w")
    workdir = type(workdir)(str(tmp_path / "w"))
    _day_two_vocab(workdir, old_vocab)
    config = synth.trainer_config(["training.warm_start=latest"])
    tf.keras.utils.set_random_seed(config.training.seed)
    strategy = strategies.make_strategy(config.training)
    model = build_model(config, len(old_vocab) + 1)
    fresh_new_row = model.query_tower.get_layer("token_embedding").embeddings.numpy()[len(old_vocab)].copy()

    source = warm_start.resolve("latest", checkpoint_dir(workdir))
    assert source.archive  # the finished day-1 run, still in place
    assert task.start_weights(config, workdir, model, strategy, source, 1) is None  # warm-started, not resumed
    rows = model.query_tower.get_layer("token_embedding").embeddings.numpy()
    assert rows.shape[0] == len(old_vocab) + 1
    np.testing.assert_array_equal(rows[:len(old_vocab)], day_one_rows)  # day-1 rows unchanged at restore
    np.testing.assert_array_equal(rows[len(old_vocab)], fresh_new_row)  # the new word has its own (fresh) row
    assert not np.array_equal(rows[len(old_vocab)], np.zeros_like(fresh_new_row))

    # The finished day-1 run moved to W/model/previous; the checkpoint folder is the new run's.
    directory = checkpoint_dir(workdir)
    assert tf.train.latest_checkpoint(directory) is None
    assert tf.train.latest_checkpoint(training_runs.previous_run_dir(directory))
    assert load_vocab(f"{directory}/{training_runs.RUN_VOCAB}") == old_vocab + [NEW_WORD]

    # Training day 2 then moves the new word's row (it is in no query, but the image tower etc. train on).
    trained = task.train(config, workdir)
    assert training_runs.is_finished(directory)
    assert trained.optimizer.iterations.numpy() == config.training.steps_per_epoch


def test_rows_are_carried_by_token_when_ids_move(day_one, tmp_path):
    workdir, day_one_rows, old_vocab = day_one
    config = synth.trainer_config()
    shuffled = old_vocab[:2] + old_vocab[2:][::-1] + [NEW_WORD]  # another learner's order, ids moved
    model = build_model(config, len(shuffled))
    source = warm_start.WarmStart(tf.train.latest_checkpoint(checkpoint_dir(workdir)), old_vocab)
    counts = warm_start.restore_into(model, source, shuffled, build_model, config)
    assert counts == {"tokens_carried": len(old_vocab), "new_tokens": 1, "old_tokens_dropped": 0}
    rows = model.query_tower.get_layer("token_embedding").embeddings.numpy()
    for new_id, token in enumerate(shuffled[:-1]):
        np.testing.assert_array_equal(rows[new_id], day_one_rows[old_vocab.index(token)])


def test_an_interrupted_run_resumes_instead_of_warm_starting(day_one, tmp_path):
    workdir, _, _ = day_one
    import shutil

    shutil.copytree(workdir.root, tmp_path / "w")
    workdir = type(workdir)(str(tmp_path / "w"))
    directory = checkpoint_dir(workdir)
    tf.io.gfile.remove(f"{directory}/{training_runs.FINISHED}")
    assert warm_start.resolve("latest", directory) is None
    assert tf.train.latest_checkpoint(directory)  # nothing archived


def test_a_model_config_change_is_named(day_one):
    workdir, _, old_vocab = day_one
    config = synth.trainer_config(["model.embedding_dim=12"])
    model = build_model(config, len(old_vocab))
    source = warm_start.WarmStart(tf.train.latest_checkpoint(checkpoint_dir(workdir)), old_vocab)
    with pytest.raises(ClicklensError, match="model config changed"):
        warm_start.restore_into(model, source, old_vocab, build_model, config)


def test_a_checkpoint_cut_short_is_named_with_what_to_do(day_one, tmp_path):
    workdir, _, old_vocab = day_one
    latest = tf.train.latest_checkpoint(checkpoint_dir(workdir))
    copy = str(tmp_path / "ckpt")
    for path in tf.io.gfile.glob(latest + ".*"):  # a copy, cut short: day_one stays whole for the other tests
        tf.io.gfile.copy(path, copy + path[len(latest):])
    data, = tf.io.gfile.glob(copy + ".data-*")
    with open(data, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    config = synth.trainer_config()
    with pytest.raises(ClicklensError, match=rf"{copy}: cannot read this checkpoint .*training.warm_start=none"):
        warm_start.restore_into(build_model(config, len(old_vocab)), warm_start.WarmStart(copy, old_vocab),
                                old_vocab, build_model, config)


def test_a_path_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ClicklensError, match="training.warm_start: no checkpoint"):
        warm_start.resolve(str(tmp_path), str(tmp_path / "model" / "checkpoints"))


def test_warm_start_from_another_work_directory(day_one, tmp_path):
    workdir, day_one_rows, old_vocab = day_one
    other = synth.write_workdir(str(tmp_path / "other"))
    source = warm_start.resolve(workdir.root, checkpoint_dir(other))
    assert source.vocab == old_vocab and not source.archive
    assert json.loads(open(f"{checkpoint_dir(workdir)}/{training_runs.FINISHED}").read())["checkpoint"]


def test_a_warm_run_trains_warm_start_epochs_and_keeps_them_when_resumed(tmp_path):
    config = synth.trainer_config(["training.epochs=6", "training.warm_start_epochs=2"]).training
    directory = str(tmp_path / "checkpoints")
    source = warm_start.WarmStart("somewhere/ckpt-1", ["[PAD]", "[UNK]"])
    assert task.run_epochs(config, directory, source) == 2
    assert task.run_epochs(config, directory, None) == 6  # a fresh run from random weights
    training_runs.write_run_plan(directory, 2, source.checkpoint)
    tf.train.Checkpoint(v=tf.Variable(1.0)).write(f"{directory}/ckpt-3")
    with open(f"{directory}/checkpoint", "w") as f:  # what CheckpointManager keeps: the newest checkpoint
        f.write('model_checkpoint_path: "ckpt-3"\n')
    assert task.run_epochs(config, directory, None) == 2  # resumed: still a warm-started run
    training_runs.write_run_plan(directory, 6, "")
    assert task.run_epochs(config, directory, None) == 6  # a resumed run from random weights


def _token_slots(optimizer):
    """{slot name prefix ('m', 'v', ...): the token-embedding rows of that slot}."""
    return {v.name.split("/")[0]: v.numpy() for v in optimizer.variables if "token_embedding" in v.name}


@pytest.mark.parametrize("carry", [True, False])
def test_the_optimizer_slots_are_carried_over_by_token_only_when_asked(day_one, carry):
    workdir, _, old_vocab = day_one
    config = synth.trainer_config([f"training.warm_start_optimizer={str(carry).lower()}"])
    shuffled = old_vocab[:2] + old_vocab[2:][::-1] + [NEW_WORD]
    prefix = tf.train.latest_checkpoint(checkpoint_dir(workdir))
    # Day 1's own slots, read the way train writes them (model and optimizer in one checkpoint).
    old_model = build_model(config, len(old_vocab))
    old_model.compile(optimizer=task.make_optimizer(config.training, 10))
    old_model.optimizer.build(old_model.trainable_variables)
    tf.train.Checkpoint(model=old_model, optimizer=old_model.optimizer).restore(prefix).expect_partial()
    old_slots = _token_slots(old_model.optimizer)
    assert old_slots and all(np.any(rows) for rows in old_slots.values())  # day 1 trained: the moments moved

    model = build_model(config, len(shuffled))
    model.compile(optimizer=task.make_optimizer(config.training, 10))
    model.optimizer.build(model.trainable_variables)
    counts = warm_start.restore_into(model, warm_start.WarmStart(prefix, old_vocab), shuffled, build_model, config)
    new_slots = _token_slots(model.optimizer)
    assert int(model.optimizer.iterations.numpy()) == 0  # the schedule starts again either way
    if not carry:
        assert "optimizer_slots" not in counts and not any(np.any(rows) for rows in new_slots.values())
        return
    assert counts["optimizer_slots"] == len(model.optimizer.variables) - 1
    for name, rows in new_slots.items():
        for new_id, token in enumerate(shuffled[:-1]):
            np.testing.assert_array_equal(rows[new_id], old_slots[name][old_vocab.index(token)])
        assert not np.any(rows[-1])  # the new word's moments start at zero


def test_warm_start_from_an_exported_encoder(demo_exported, small_config, tmp_path):
    """training.warm_start may name an export: the towers and the vocabulary kept beside them."""
    import shutil

    from clicklens import servables as S
    from trainer.model import restore_model

    workdir = demo_exported
    trained = restore_model(small_config, workdir)  # the checkpoint that export wrote out
    base_path = workdir.export_model(S.QUERY_ENCODER)
    source = warm_start.resolve(base_path, str(tmp_path / "checkpoints"))  # the model folder: newest version
    assert source.export and source.vocab == load_vocab(workdir.vocab)
    model = build_model(small_config, len(source.vocab))
    counts = warm_start.restore_into(model, source, source.vocab, build_model, small_config)
    assert counts["tokens_carried"] == len(source.vocab)
    for tower in ("query_tower", "image_tower"):
        for got, want in zip(getattr(model, tower).weights, getattr(trained, tower).weights):
            np.testing.assert_array_equal(got.numpy(), want.numpy())

    optimizer_config = synth.trainer_config(["training.warm_start_optimizer=true"])
    with pytest.raises(ClicklensError, match="no optimizer slots"):
        warm_start.restore_into(model, source, source.vocab, build_model,
                                type(small_config)(**{**vars(small_config), "training": optimizer_config.training}))
    # An export without its vocabulary (made before exports kept it) is named.
    version = max(S.version_dirs(workdir.export_model(S.IMAGE_ENCODER)))
    copy = tmp_path / "image_encoder" / str(version)
    shutil.copytree(f"{workdir.export_model(S.IMAGE_ENCODER)}/{version}", copy)
    (copy / S.EXPORT_VOCAB).unlink()
    with pytest.raises(ClicklensError, match="vocab.txt not found"):
        warm_start.resolve(str(copy), str(tmp_path / "checkpoints"))
