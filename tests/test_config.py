"""Typed configuration: every shipped config loads; every kind of bad value names its key."""

import dataclasses
import pathlib
import re
import typing

import pytest
import yaml

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
        ({"pipeline": {"as_of": "2026-02-30"}}, "pipeline.as_of", "day is out of range"),
        ({"pipeline": {"as_of": "2026-2-3"}}, "pipeline.as_of", "expected a day as YYYY-MM-DD"),
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
    path.write_text("pipeline:\n  as_of: 2026-02-30\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.yaml: pipeline.as_of: day is out of range for month"):
        load_config(str(path))
    path.write_bytes(b"training:\n  epochs: \xff\xfe\n")
    with pytest.raises(ConfigError, match="broken.yaml: not UTF-8 text"):
        load_config(str(path))
    # YAML hands a 5,000-digit integer to int(), which refuses more than 4,300 digits.
    path.write_text("training:\n  learning_rate: " + "9" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="--set training.learning_rate: value is not valid YAML"):
        config_from_dict({}, overrides=["training.learning_rate=" + "9" * 5000])


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
    # YAML would read an unquoted day as a date, and an impossible one as a parser error without a key.
    assert config_from_dict({}, overrides=["pipeline.as_of=2026-02-28"]).pipeline.as_of == "2026-02-28"
    with pytest.raises(ConfigError, match="pipeline.as_of: month must be in 1..12"):
        config_from_dict({}, overrides=["pipeline.as_of=2026-13-01"])
    with pytest.raises(ConfigError, match="training.epochs: expected an integer, got '2026-01-01'"):
        config_from_dict({}, overrides=["training.epochs=2026-01-01"])


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


def _leaf_fields(cls=Config, prefix=""):
    """(dotted key, type, default) of every leaf field of the Config tree, nested sections walked into."""
    hints = typing.get_type_hints(cls)
    default = cls()
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}" if prefix else field.name
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _leaf_fields(hints[field.name], key)
        else:
            yield key, hints[field.name], getattr(default, field.name)


def _wrong_values(tp):
    """Values no field of annotation `tp` may accept (as plain YAML would give them)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]: null is a value; everything X refuses stays refused
        (inner,) = [t for t in typing.get_args(tp) if t is not type(None)]
        return [v for v in _wrong_values(inner) if v is not None]
    if tp is bool:
        return ["not-a-bool", "true", 1, 0.0, [True], None]
    if tp is int:
        return ["not-a-number", "3", 2.5, True, [1], {"a": 1}, None]
    if tp is float:
        return ["not-a-number", "0.5", True, [0.5], {"a": 0.5}, float("nan"), float("-inf"), 10**400, None]
    if tp is str:
        return [["not", "a", "string"], {"a": "b"}, 5, 0.5, True, None]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        return ["not-a-list", {"a": 1}, None, [_wrong_values(item_tp)[0]]]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        assert key_tp is str, f"extend _wrong_values for {tp}"
        return ["not-a-mapping", ["a"], None, {"a": _wrong_values(value_tp)[0]}, {1: _wrong_values(value_tp)[0]}]
    raise AssertionError(f"no wrong values for a field of type {tp}: extend _wrong_values")


def _nested(key, value):
    """{"export": {"scann": {"num_leaves": value}}} for key "export.scann.num_leaves"."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


LEAF_FIELDS = list(_leaf_fields())


@pytest.mark.parametrize("key, tp, default", LEAF_FIELDS, ids=[key for key, _, _ in LEAF_FIELDS])
def test_every_field_refuses_the_wrong_kind_by_name_and_keeps_its_default(key, tp, default):
    # A value of the wrong kind: an error that names the file, then this very key (or one of its items).
    names_the_key = re.compile(rf"bad\.yaml: {re.escape(key)}(: |\[\d+\]: |\.\w+: | \(a key\): )")
    for value in _wrong_values(tp):
        with pytest.raises(ConfigError) as err:
            config_from_dict(_nested(key, value), source="bad.yaml")
        assert names_the_key.match(str(err.value)), (value, str(err.value))
    # The default, fed back in as data and as the `--set` text `clicklens config` would print, changes nothing.
    config = config_from_dict(_nested(key, default), source="bad.yaml")
    assert config == Config()
    loaded = config
    for part in key.split("."):
        loaded = getattr(loaded, part)
    assert loaded == default and type(loaded) is type(default)
    text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...").strip()
    assert config_from_dict({}, source="bad.yaml", overrides=[f"{key}={text}"]) == Config()
