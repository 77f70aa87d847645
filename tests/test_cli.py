"""The clicklens command line: verbs, shared options, Beam pass-through, clear errors."""

import subprocess
import sys

import pytest

from clicklens import cli

DOCUMENTED_VERBS = {"generate-demo-data", "pipeline", "train", "evaluate", "export", "serve", "query", "demo"}


def test_every_design_verb_exists():
    assert DOCUMENTED_VERBS <= {verb.name for verb in cli.VERBS}


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


@pytest.mark.parametrize("make_workdir, words", [
    (lambda tmp: "", "--workdir is empty"),
    (lambda tmp: (tmp / "a_file").write_text("x") and str(tmp / "a_file"), "not a directory"),
    (lambda tmp: "/proc/clicklens-workdir", "cannot write there"),  # a read-only mount, even to root
])
def test_unusable_workdir_is_one_line_and_exit_2(tmp_path, capsys, make_workdir, words):
    code = cli.main(["generate-demo-data", "--workdir", make_workdir(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_serve_accepts_a_read_only_workdir_check():
    cli.check_workdir("/proc", writable=False)  # serve and query only read the work directory


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "clicklens", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for verb in DOCUMENTED_VERBS:
        assert verb in result.stdout


def test_a_verb_whose_stage_is_not_installed_says_so(monkeypatch, capsys):
    """A container image installs only its own stage; another stage's verb is a clear error, not a traceback."""
    fake = cli.Verb("rank", "reranking_stage.model:run", "a stage this installation does not have")
    monkeypatch.setattr(cli, "VERBS", cli.VERBS + [fake])
    code = cli.main(["rank"])
    assert code == 2
    assert "needs the `reranking_stage` package" in capsys.readouterr().err


def test_config_verb_prints_every_key_with_its_bounds_and_help(capsys):
    import dataclasses

    from clicklens.config import Config

    assert cli.main(["config", "--set", "training.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "  epochs: 3  # int; >= 1" in out
    assert "log_every_steps: 50  # int; >= 1. A progress line" in out
    assert "  image_source: pixels  # str; one of pixels, features" in out
    config = Config()
    for section in dataclasses.fields(config):
        assert f"{section.name}:" in out
        for key in dataclasses.fields(getattr(config, section.name)):
            assert f" {key.name}:" in out, f"{section.name}.{key.name}"


def test_library_info_chatter_is_hidden_unless_verbose():
    """Beam's runner and BatchElements statistics, TensorFlow's checkpoint timings: WARNING and up only."""
    import logging

    chatty = ["apache_beam.transforms.util", "apache_beam.runners.portability.fn_api_runner", "tensorflow", "absl"]
    try:
        cli.setup_logging(verbose=False)
        assert not any(logging.getLogger(name).isEnabledFor(logging.INFO) for name in chatty)
        for ours in ("beam_pipelines.progress", "trainer.callbacks", "clicklens.demo"):
            assert logging.getLogger(ours).level == logging.NOTSET  # our progress loggers are not silenced
        cli.setup_logging(verbose=True)
        assert all(logging.getLogger(name).isEnabledFor(logging.DEBUG) for name in chatty)
    finally:
        for name in cli.CHATTY_LIBRARIES:
            logging.getLogger(name).setLevel(logging.NOTSET)
