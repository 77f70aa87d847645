"""Verbs run out of order, or after a step that stopped half way: exit 2 and one line naming what is missing or
damaged and the command that makes it, never a traceback from TensorFlow (each verb in-process, no training)."""

import dataclasses
import logging
import os

import pytest

from clicklens import cli
from tests.conftest import DEMO_CONFIG, SMALL_WORLD, free_ports


def clicklens(capsys, verb, workdir, *extra):
    """(exit code, the `clicklens: error:` lines) of `clicklens VERB` on the small world."""
    sets = [a for o in SMALL_WORLD for a in ("--set", o)]
    code = cli.main([verb, "--config", DEMO_CONFIG, "--workdir", str(workdir), *sets, *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("clicklens: error:")]


def write_examples(root, splits=("train", "eval", "corpus"), records=64):
    """W/examples with two whole gzip TFRecord shards per split (records of random bytes: the checks only count
    them) and a vocabulary."""
    import tensorflow as tf

    examples = root / "examples"
    examples.mkdir(parents=True, exist_ok=True)
    for split in splits:
        for shard in range(2):
            with tf.io.TFRecordWriter(str(examples / f"{split}-{shard:05d}-of-00002.tfrecord.gz"), "GZIP") as w:
                for _ in range(records):
                    w.write(os.urandom(100))
    (examples / "vocab.txt").write_text("[PAD]\n[UNK]\nred\ncircle\n")
    return examples


@pytest.mark.parametrize("verb, extra, makes_it", [
    ("pipeline", (), "clicklens generate-demo-data"),
    ("update", (), "clicklens generate-demo-data"),
    ("pretrain", (), "clicklens pipeline"),
    ("train", (), "clicklens pipeline"),
    ("evaluate", (), "clicklens pipeline"),  # the earliest step missing
    ("export", (), "clicklens pipeline"),
    ("reindex", (), "clicklens export"),
    ("serve", (), "clicklens export"),
    ("cluster-queries", (), "clicklens export"),
])
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_a_verb_before_its_inputs_exist_names_the_command_that_makes_them(tmp_path, capsys, verb, extra, makes_it,
                                                                          state):
    workdir = tmp_path / "W"
    if state == "empty":
        workdir.mkdir()
    code, errors = clicklens(capsys, verb, workdir, *extra)
    assert code == 2 and len(errors) == 1 and makes_it in errors[0], errors


def test_query_without_a_server_says_to_start_one(tmp_path, capsys):
    port, = free_ports(1)
    code, errors = clicklens(capsys, "query", tmp_path / "W", "red circle", "--server", f"127.0.0.1:{port}")
    assert code == 2 and "UNAVAILABLE" in errors[0] and "`clicklens serve`" in errors[0], errors


@pytest.mark.parametrize("verb", ["evaluate", "export"])
def test_a_verb_after_the_pipeline_but_before_train_says_to_train(tmp_path, capsys, verb):
    write_examples(tmp_path)
    code, errors = clicklens(capsys, verb, tmp_path)
    assert code == 2 and "no checkpoint" in errors[0] and "clicklens train" in errors[0], errors


def test_train_without_the_eval_split_fails_before_training(tmp_path, capsys):
    write_examples(tmp_path, splits=("train", "corpus"))
    code, errors = clicklens(capsys, "train", tmp_path)
    assert code == 2 and "eval-*.tfrecord.gz" in errors[0] and "clicklens pipeline" in errors[0], errors
    assert not (tmp_path / "model").exists()  # the evaluation at the end would have found it missing


def _garbage(path):
    path.write_bytes(b"garbage\x00\x01\x02junk")


def _cut_in_a_record(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _cut_at_a_record_boundary(path):
    """The first 5 records, deflated and flushed, without the gzip trailer: TensorFlow alone reads 5 records and
    no error."""
    import gzip
    import zlib

    records = gzip.decompress(path.read_bytes())
    deflate = zlib.compressobj(wbits=31)
    path.write_bytes(deflate.compress(records[:5 * 116]) + deflate.flush(zlib.Z_SYNC_FLUSH))


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("verb, split, damage, words", [
    ("train", "train", _garbage, "not gzip data"),
    ("train", "train", _cut_at_a_record_boundary, "cut short"),
    ("train", "eval", _cut_in_a_record, "cut short"),
    ("evaluate", "corpus", _empty, "too short"),
    ("export", "corpus", _cut_in_a_record, "cut short"),
    ("pretrain", "corpus", _cut_in_a_record, "cut short"),
], ids=["train garbage", "train cut at a record", "eval cut", "corpus empty file", "export corpus cut",
        "pretrain corpus cut"])
def test_a_damaged_tfrecord_file_is_named_before_any_work(tmp_path, capsys, verb, split, damage, words):
    examples = write_examples(tmp_path)
    damaged = examples / f"{split}-00001-of-00002.tfrecord.gz"
    damage(damaged)
    code, errors = clicklens(capsys, verb, tmp_path)
    assert code == 2 and len(errors) == 1, errors
    assert str(damaged) in errors[0] and words in errors[0] and "run `clicklens pipeline` again" in errors[0]


@pytest.mark.parametrize("verb", ["evaluate", "export"])
@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path, capsys, verb, damage):
    import tensorflow as tf

    write_examples(tmp_path)
    checkpoints = tmp_path / "model" / "checkpoints"
    prefix = tf.train.Checkpoint(step=tf.Variable(7, dtype=tf.int64)).save(str(checkpoints / "ckpt"))
    data, = tf.io.gfile.glob(prefix + ".data-*")
    if damage == "deleted":
        os.remove(data)
    else:
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    code, errors = clicklens(capsys, verb, tmp_path)
    assert code == 2 and len(errors) == 1, errors
    assert f"{prefix}: cannot read this checkpoint" in errors[0] and "run `clicklens train` again" in errors[0]


def test_a_model_without_a_version_is_warned_about_and_queries_for_it_say_why(tmp_path, capsys, caplog):
    from clicklens import models_config
    from clicklens.config import Config
    from serving.server import ModelServer, warn_models_without_version

    export = tmp_path / "W" / "export"
    (export / "retrieval_scann").mkdir(parents=True)  # export stopped before writing a version
    models_config.write(str(export / "models.config"),
                        models_config.build({"retrieval_scann": str(export / "retrieval_scann")}))
    serving = dataclasses.replace(Config().serving, host="127.0.0.1", grpc_port=0, http_port=0)
    server = ModelServer(serving, str(export / "models.config"))
    server.start()
    try:
        with caplog.at_level(logging.WARNING):
            warn_models_without_version(server.registry)
        assert "retrieval_scann: no version loaded" in caplog.text and "clicklens" in caplog.text
        code, errors = clicklens(capsys, "query", tmp_path / "W", "red circle",
                                 "--server", f"127.0.0.1:{server.grpc_port}")
    finally:
        server.stop(grace=1.0)
    assert code == 2 and "NOT_FOUND" in errors[0] and "`clicklens export`" in errors[0], errors
    # tensorflow_model_server's --file_system_poll_wait_seconds=0: versions are looked for only at start.
    from serving.model_registry import ModelRegistry

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_models_without_version(ModelRegistry(models_config.read(str(export / "models.config")), poll_seconds=0))
    assert "until the server is restarted" in caplog.text, caplog.text


def test_a_copied_workdir_that_lost_a_model_folder_says_it_serves_the_originals(tmp_path, caplog):
    from clicklens import models_config

    original = tmp_path / "original" / "export"
    (original / "query_encoder" / "1").mkdir(parents=True)
    copy = tmp_path / "copy" / "export"
    copy.mkdir(parents=True)
    models_config.write(str(copy / "models.config"), models_config.build({"query_encoder": str(original /
                                                                                               "query_encoder")}))
    with caplog.at_level(logging.WARNING):
        models = models_config.served_beside(models_config.read(str(copy / "models.config")),
                                             str(copy / "models.config"))
    assert [m.base_path for m in models] == [str(original / "query_encoder")]
    assert "outside this export folder" in caplog.text and "clicklens export" in caplog.text


def test_a_split_over_the_read_limit_is_only_listed_and_its_damage_named_when_it_is_read(tmp_path, monkeypatch):
    import tensorflow as tf

    from clicklens.errors import ClicklensError
    from clicklens.workdir import Workdir
    from trainer import input as model_input

    examples = write_examples(tmp_path)
    damaged = examples / "corpus-00001-of-00002.tfrecord.gz"
    _cut_in_a_record(damaged)
    workdir = Workdir(str(tmp_path))
    with pytest.raises(ClicklensError, match="cut short"):
        model_input.check_examples(workdir, ("corpus",))
    # A catalog of millions of images is not read through before the work: listed only.
    monkeypatch.setattr(model_input, "CHECK_READ_LIMIT_BYTES", 0)
    model_input.check_examples(workdir, ("corpus",))
    with pytest.raises(ClicklensError, match=r"a damaged TFRecord file under .*examples \(cut short.*clicklens "
                                             r"pipeline` again"):
        with model_input.naming_damaged_examples(workdir):
            tf.data.TFRecordDataset(str(damaged), compression_type="GZIP").reduce(0, lambda n, _: n + 1)


def test_a_shard_set_with_a_shard_missing_is_named(tmp_path, capsys):
    examples = write_examples(tmp_path)
    os.remove(examples / "eval-00001-of-00002.tfrecord.gz")
    code, errors = clicklens(capsys, "train", tmp_path)
    assert code == 2 and len(errors) == 1, errors
    assert "1 of 2 shards missing" in errors[0] and "eval-00001-of-00002.tfrecord.gz" in errors[0], errors
