"""Typed configuration: every shipped config loads; every kind of bad value names its key."""

import pathlib

import pytest

from clicklens.config import Config, ConfigError, config_from_dict, load_config

CONFIGS = sorted(pathlib.Path(__file__).resolve().parent.parent.glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(str(path))
    assert isinstance(config, Config)


def test_shipped_configs_cover_the_targets():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "tpu.yaml", "gpu.yaml", "dataflow.yaml"}


def test_missing_keys_keep_defaults():
    config = config_from_dict({"training": {"epochs": 9}})
    assert config.training.epochs == 9
    assert config.training.loss == Config().training.loss


def test_int_is_accepted_for_float():
    config = config_from_dict({"training": {"learning_rate": 1}})
    assert config.training.learning_rate == 1.0 and isinstance(config.training.learning_rate, float)


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"training": {"epochz": 3}}, "training.epochz", "unknown key"),
        ({"trainin": {}}, "trainin", "unknown key"),
        ({"training": {"epochs": "three"}}, "training.epochs", "an integer"),
        ({"training": {"epochs": 2.5}}, "training.epochs", "an integer"),
        ({"training": {"logq_correction": "yes"}}, "training.logq_correction", "true or false"),
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate", "a finite number"),
        # NaN defeats min/max comparisons: an idle server would spin, a pipeline would write no eval split.
        ({"serving": {"poll_seconds": float("nan")}}, "serving.poll_seconds", "a finite number"),
        ({"pipeline": {"eval_fraction": float("nan")}}, "pipeline.eval_fraction", "a finite number"),
        ({"training": {"learning_rate": float("inf")}}, "training.learning_rate", "a finite number"),
        ({"training": {"epochs": 0}}, "training.epochs", ">= 1"),
        ({"pipeline": {"eval_fraction": 0.95}}, "pipeline.eval_fraction", "<= 0.9"),
        ({"training": {"loss": "hinge"}}, "training.loss", "one of"),
        ({"pipeline": {"entity_patterns": "bob"}}, "pipeline.entity_patterns", "a list"),
        ({"pipeline": {"ctr_threshold_by_category": {"color": 2.0}}}, "pipeline.ctr_threshold_by_category.color", "<= 1.0"),
        ({"pipeline": {"ctr_threshold_by_category": {"color": "x"}}}, "pipeline.ctr_threshold_by_category.color", "a finite number"),
        ({"export": {"scann": {"num_leaves": -1}}}, "export.scann.num_leaves", ">= 1"),
        ({"export": {"scann": 5}}, "export.scann", "a mapping"),
        ({"demo_data": {"min_impressions": 30, "max_impressions": 20}}, "demo_data.min_impressions", "<="),
        ({"model": {"image_tower": "features"}}, "model.image_tower", "does not fit"),
    ],
)
def test_bad_values_name_the_key(data, key, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, source="bad.yaml")
    message = str(err.value)
    assert message.startswith("bad.yaml: ")
    assert key in message
    assert words in message


def test_bad_value_in_a_file_names_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  per_replica_batch_size: -4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run\.yaml: training\.per_replica_batch_size: must be >= 1"):
        load_config(str(path))


def test_not_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("training: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_overrides_are_typed_and_validated():
    config = config_from_dict({}, overrides=["training.epochs=7", "pipeline.entity_patterns=[a, b]",
                                             "export.scann.num_leaves=300", "training.logq_correction=false"])
    assert config.training.epochs == 7
    assert config.pipeline.entity_patterns == ["a", "b"]
    assert config.export.scann.num_leaves == 300
    assert config.training.logq_correction is False
    with pytest.raises(ConfigError, match="training.epochs: expected an integer"):
        config_from_dict({}, overrides=["training.epochs=many"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        config_from_dict({}, overrides=["epochs"])
    with pytest.raises(ConfigError, match="training.nope: unknown key"):
        config_from_dict({}, overrides=["training.nope=1"])


def test_chinese_values_round_trip():
    config = config_from_dict({"pipeline": {"entity_patterns": ["周杰伦"], "ctr_threshold_by_category": {"颜色": 0.1}}})
    assert config.pipeline.entity_patterns == ["周杰伦"]
    assert config.pipeline.ctr_threshold_by_category == {"颜色": 0.1}


def test_nan_in_an_override_names_the_key():
    with pytest.raises(ConfigError, match="serving.poll_seconds: expected a finite number"):
        config_from_dict({}, "defaults", ["serving.poll_seconds=.nan"])


def test_hostile_input_keys():
    from clicklens.config import describe_config

    p = Config().pipeline
    # Generous caps: a demo session has at most demo_data.max_impressions (20) clicks.
    assert (p.max_clicks_per_session, p.max_clicks_per_session_query, p.skip_corrupt_files) == (100, 50, False)
    config = config_from_dict({}, overrides=["pipeline.max_clicks_per_session=0", "pipeline.max_clicks_per_session_query=7",
                                             "pipeline.skip_corrupt_files=true"])
    assert (config.pipeline.max_clicks_per_session, config.pipeline.max_clicks_per_session_query) == (0, 7)
    assert config.pipeline.skip_corrupt_files is True
    for override, words in [("pipeline.max_clicks_per_session=-1", "pipeline.max_clicks_per_session: must be >= 0"),
                            ("pipeline.max_clicks_per_session_query=-5",
                             "pipeline.max_clicks_per_session_query: must be >= 0"),
                            ("pipeline.max_clicks_per_session=.nan", "pipeline.max_clicks_per_session: expected an integer"),
                            ("pipeline.max_clicks_per_session_query=2.5",
                             "pipeline.max_clicks_per_session_query: expected an integer"),
                            ("pipeline.skip_corrupt_files=sometimes", "pipeline.skip_corrupt_files: expected true or false"),
                            ("pipeline.skip_corrupt_files=1", "pipeline.skip_corrupt_files: expected true or false")]:
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            config_from_dict({}, "defaults", [override])
    described = describe_config(Config())
    assert "max_clicks_per_session: 100" in described and "0 = no cap" in described
    assert "skip_corrupt_files: false" in described
