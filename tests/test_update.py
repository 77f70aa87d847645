"""`clicklens update`: two days of the loop on a small dated world, warm-started and gated."""

import json

import pytest

from clicklens import training_runs
from clicklens.errors import ClicklensError
from clicklens.update import daily_config, parse_stages, resolve_day
from clicklens.vocabulary import load_vocab
from clicklens.workdir import Workdir
from tests.conftest import run_verb

DAYS = ["2026-01-01", "2026-01-02"]
DATED_WORLD = ["demo_data.days=2", "demo_data.drift_day=2", "demo_data.num_sessions=4000",
               "pipeline.window_days=1", "training.epochs=1", "training.warm_start_epochs=1"]


@pytest.fixture(scope="module")
def two_days(tmp_path_factory):
    """A dated world, then `clicklens update` for day 1 (from random weights) and day 2 (warm)."""
    workdir = Workdir(str(tmp_path_factory.mktemp("update")))
    run_verb("generate-demo-data", workdir.root, overrides=DATED_WORLD)
    snapshots = {}
    for day in DAYS:
        run_verb("update", workdir.root, "--as-of", day, overrides=DATED_WORLD)
        snapshots[day] = {"vocab": load_vocab(workdir.vocab),
                          "report": json.load(open(f"{workdir.root}/updates/{day}.json")),
                          "pipeline": json.load(open(workdir.report))}
    return workdir, snapshots


def test_each_update_reads_only_its_window(two_days):
    _, snapshots = two_days
    for day in DAYS:
        window = snapshots[day]["pipeline"]["window"]
        assert window["as_of"] == day and window["window_days"] == 1
        assert window["first_day"] == window["last_day"] == day


def test_day_two_starts_from_day_one_with_its_vocabulary_ids(two_days):
    workdir, snapshots = two_days
    day1, day2 = snapshots[DAYS[0]], snapshots[DAYS[1]]
    assert day1["report"]["base_vocab"] == "" and day2["report"]["warm_start"] == "latest"
    assert training_runs.read_run_plan(f"{workdir.model}/previous")["started_from"] == ""  # day 1: nothing before
    assert day2["report"]["base_vocab"].endswith("model/checkpoints/vocab.txt")
    assert day2["vocab"][:len(day1["vocab"])] == day1["vocab"]  # old tokens keep their ids
    plan = training_runs.read_run_plan(workdir.checkpoints)
    assert plan["started_from"].startswith(f"{workdir.model}/checkpoints/ckpt-")  # day 1's final checkpoint
    assert training_runs.is_finished(workdir.checkpoints)
    assert load_vocab(f"{workdir.model}/previous/vocab.txt") == day1["vocab"]


def test_every_update_is_gated_and_reported(two_days):
    _, snapshots = two_days
    day1, day2 = snapshots[DAYS[0]]["report"], snapshots[DAYS[1]]["report"]
    assert day1["published_version"] == 1 and day1["gate_report"]["served_version"] is None
    gate = day2["gate_report"]
    assert gate["served_version"] == 1 and gate["decision"] in ("publish", "reject")
    assert (day2["published_version"] == 2) == (gate["decision"] == "publish")
    for report in (day1, day2):
        assert set(report["seconds"]) == {"pipeline", "train", "export", "total"}
        assert 0 < report["fit_seconds"] < report["seconds"]["train"]


def test_day_and_stage_arguments_are_checked():
    import datetime

    assert resolve_day("yesterday", datetime.date(2026, 3, 1)) == "2026-02-28"
    assert resolve_day("2026-02-28") == "2026-02-28"
    with pytest.raises(ClicklensError, match="--as-of"):
        resolve_day("28.02.2026")
    from clicklens.config import config_from_dict

    assert config_from_dict({"pipeline": {"as_of": datetime.date(2026, 2, 28)}}).pipeline.as_of == "2026-02-28"
    assert parse_stages("export,pipeline") == ["pipeline", "export"]
    with pytest.raises(ClicklensError, match="--stages"):
        parse_stages("pipeline,deploy")


def test_explicit_settings_win_over_the_update_defaults(small_config):
    import dataclasses

    config = dataclasses.replace(small_config, pipeline=dataclasses.replace(small_config.pipeline,
                                                                            base_vocab="gs://b/v.txt"))
    daily = daily_config(config, "2026-01-02", "W/model/checkpoints/vocab.txt", warm=True)
    assert daily.pipeline.base_vocab == "gs://b/v.txt" and daily.training.warm_start == "latest"
    assert daily_config(small_config, "2026-01-02", "", warm=False).training.warm_start == "none"


def test_the_base_vocabulary_follows_the_vertex_checkpoint_folder(tmp_path, monkeypatch):
    from clicklens.update import base_vocab_for_warm_start

    workdir = Workdir(str(tmp_path / "w"))
    import tensorflow as tf

    vertex = str(tmp_path / "aip-checkpoints")  # where `train` on Vertex AI keeps its run
    tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), vertex, 1).save(checkpoint_number=3)
    (tmp_path / "aip-checkpoints" / training_runs.RUN_VOCAB).write_text("[PAD]\n[UNK]\nred\n")
    training_runs.mark_finished(vertex)
    assert base_vocab_for_warm_start(workdir) == ""  # W/model/checkpoints has no run
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", vertex)
    assert base_vocab_for_warm_start(workdir) == f"{vertex}/{training_runs.RUN_VOCAB}"
