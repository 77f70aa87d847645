"""The clicklens command line: verbs, shared options, Beam pass-through, clear errors."""

import subprocess
import sys

import pytest

from trainer import cli

DESIGN_VERBS = {"generate-demo-data", "pipeline", "train", "evaluate", "export", "serve", "query", "demo"}


def test_every_design_verb_exists():
    assert DESIGN_VERBS <= {verb.name for verb in cli.VERBS}


def test_shared_options_on_every_verb():
    for verb in cli.VERBS:
        args = cli.parse_args([verb.name, "--config", "configs/gpu.yaml", "--workdir", "gs://b/w",
                               "--set", "training.epochs=2", "--set", "model.embedding_dim=8"])
        assert args.config == "configs/gpu.yaml"
        assert args.workdir == "gs://b/w"
        assert args.overrides == ["training.epochs=2", "model.embedding_dim=8"]


def test_unknown_options_go_to_beam_only_for_pipeline():
    args = cli.parse_args(["pipeline", "--runner", "DataflowRunner", "--project", "p", "--region=europe-west4"])
    assert args.extra_args == ["--runner", "DataflowRunner", "--project", "p", "--region=europe-west4"]
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--runner", "DataflowRunner"])


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    code = cli.main(["train", "--workdir", str(tmp_path), "--set", "training.epochs=-1"])
    assert code == 2
    assert "training.epochs" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for verb in DESIGN_VERBS:
        assert verb in result.stdout


def test_unbuilt_verb_says_not_available(monkeypatch, capsys):
    fake = cli.Verb("later", "serving.does_not_exist_yet:run", "a stage of a later issue")
    monkeypatch.setattr(cli, "VERBS", cli.VERBS + [fake])
    code = cli.main(["later"])
    assert code == 2
    assert "not available yet" in capsys.readouterr().err
