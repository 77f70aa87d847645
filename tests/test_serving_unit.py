"""The serving package in-process, fast: predict's checks, the REST JSON conventions, the model registry.

No server, no subprocess, no demo chain: one tiny hand-built SavedModel
(module-scoped, saved once and copied into version folders) whose outputs are
a known function of the input's length.  tests/test_serving.py covers the same
code end to end over real sockets.
"""

import base64
import logging
import shutil
import threading
import types

import grpc
import numpy as np
import pytest

from clicklens import compat  # noqa: F401  (before TensorFlow)
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, predict_pb2, prediction_log_pb2

from clicklens import models_config, servables
from serving import saved_models
from serving.catalog_images import ROUTE_PREFIX
from serving.model_registry import MAX_LOAD_ATTEMPTS, LoadedVersion, ModelRegistry, aspired_versions, replay_warmup
from serving.predict import (ServingError, input_specs, predict, predict_proto, prepare, signature_function,
                             values_present)
from serving.runner import Runner
from serving.rest import page_settings, request_arrays, response_json

MODEL = servables.RETRIEVAL_BRUTEFORCE
TWO_INPUTS_SIGNATURE = "query_and_image"  # only in this test model: for checks that need two inputs
MAX_BATCH = 4
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
WARMUP_QUERIES = (b"warm", b"up")


def expected_top_two(value: bytes):
    """What the tiny model answers for one input: ids and scores from its length in bytes."""
    n = len(value)
    return [f"len{n}".encode(), f"next{n + 1}".encode()], [float(n), n / 2]


def _top_two(values: tf.Tensor):
    n = tf.strings.length(values)
    ids = tf.stack([tf.strings.join(["len", tf.strings.as_string(n)]),
                    tf.strings.join(["next", tf.strings.as_string(n + 1)])], axis=1)
    length = tf.cast(n, tf.float32)
    return {servables.IMAGE_IDS: ids, servables.SCORES: tf.stack([length, length / 2], axis=1)}


def _save_tiny_model(path: str) -> None:
    module = tf.Module()
    text = tf.TensorSpec([None], tf.string, name=servables.QUERY)
    image = tf.TensorSpec([None], tf.string, name=servables.IMAGE_BYTES)
    by_text = tf.function(_top_two).get_concrete_function(text)
    by_image = tf.function(_top_two).get_concrete_function(image)
    both = tf.function(lambda query, image: _top_two(tf.strings.join([query, image]))).get_concrete_function(
        text, image)
    tf.saved_model.save(module, path, signatures={servables.TEXT_SIGNATURE: by_text,
                                                  servables.IMAGE_SIGNATURE: by_image,
                                                  TWO_INPUTS_SIGNATURE: both})


def _write_warmup(version_folder: str, requests) -> None:
    path = f"{version_folder}/{servables.WARMUP_FILE}"
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            writer.write(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())


def _text_request(input_name: str, values) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = servables.TEXT_SIGNATURE
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(list(values), dtype=tf.string))
    return request


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The tiny model as versions 1 and 00000002 (with warmup records) under one base path, plus a
    non-integer folder; models.config files serving the latest 1 and the latest 2 versions."""
    root = tmp_path_factory.mktemp("serving_unit")
    saved = root / "saved"
    _save_tiny_model(str(saved))
    _write_warmup(str(saved), [_text_request(servables.QUERY, WARMUP_QUERIES)] * 2)
    base = root / "export" / MODEL
    for folder in ("1", "00000002", "tmp-export-3"):
        shutil.copytree(saved, base / folder)
    configs = {}
    for num_versions in (1, 2):
        configs[num_versions] = str(root / f"latest{num_versions}.config")
        models_config.write(configs[num_versions], models_config.build({MODEL: str(base)}, num_versions))
    return types.SimpleNamespace(root=root, saved=saved, base=base, configs=configs)


@pytest.fixture(scope="module")
def model(export):
    return saved_models.load(str(export.base / "1"))


def _strings(values):
    return np.array(values, dtype=object)


def _code(call, message: str = "") -> grpc.StatusCode:
    """The status code of the ServingError `call` raises; its message must contain `message`."""
    with pytest.raises(ServingError) as err:
        call()
    assert message in err.value.message
    return err.value.code


# ---------------------------------------------------------------------------
# serving.predict


def test_predict_answers_what_the_signature_computes(model):
    queries = [b"a", "红色".encode()]
    outputs = predict(model, servables.TEXT_SIGNATURE, {servables.QUERY: _strings(queries)}, MAX_BATCH)
    assert sorted(outputs) == sorted([servables.IMAGE_IDS, servables.SCORES])
    assert outputs[servables.IMAGE_IDS].tolist() == [expected_top_two(q)[0] for q in queries]
    assert outputs[servables.SCORES].tolist() == [expected_top_two(q)[1] for q in queries]

    by_image = predict(model, servables.IMAGE_SIGNATURE, {servables.IMAGE_BYTES: _strings([b"\x89PNG"])},
                       MAX_BATCH, output_filter=[servables.SCORES])
    assert list(by_image) == [servables.SCORES] and by_image[servables.SCORES].tolist() == [[4.0, 2.0]]

    default = predict(model, "", {servables.QUERY: _strings([b"abc"])}, MAX_BATCH)  # no name: serving_default
    assert default[servables.SCORES].tolist() == [[3.0, 1.5]]


@pytest.mark.parametrize("signature, inputs, output_filter, message", [
    (servables.TEXT_SIGNATURE, {"q": _strings([b"a"])}, None, "input names do not match"),
    (servables.TEXT_SIGNATURE, {servables.QUERY: _strings([b"a"]), "extra": _strings([b"b"])}, None,
     "unexpected ['extra']"),
    (servables.TEXT_SIGNATURE, {servables.QUERY: np.array([1, 2], np.int64)}, None, "expects dtype string"),
    (servables.TEXT_SIGNATURE, {servables.QUERY: _strings([[b"a"], [b"b"]])}, None, "expects shape"),
    (servables.TEXT_SIGNATURE, {servables.QUERY: _strings([])}, None, "empty batch"),
    (servables.TEXT_SIGNATURE, {servables.QUERY: _strings([b"a"] * (MAX_BATCH + 1))}, None,
     f"exceeds serving.max_batch={MAX_BATCH}"),
    (TWO_INPUTS_SIGNATURE, {servables.QUERY: _strings([b"a", b"b"]), servables.IMAGE_BYTES: _strings([b"c"])},
     None, "disagree on the batch size"),
    (servables.TEXT_SIGNATURE, {servables.QUERY: _strings([b"a"])}, ["no_such_output"], "no_such_output"),
], ids=["input name", "extra input", "dtype", "rank", "empty batch", "batch over max", "batch sizes",
        "output filter"])
def test_predict_invalid_argument(model, signature, inputs, output_filter, message):
    assert _code(lambda: predict(model, signature, inputs, MAX_BATCH, output_filter), message) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_predict_batch_at_max_and_two_inputs_are_fine(model):
    at_max = predict(model, servables.TEXT_SIGNATURE, {servables.QUERY: _strings([b"ab"] * MAX_BATCH)}, MAX_BATCH)
    assert at_max[servables.SCORES].shape == (MAX_BATCH, 2)
    both = predict(model, TWO_INPUTS_SIGNATURE, {servables.QUERY: _strings([b"ab"]),
                                                 servables.IMAGE_BYTES: _strings([b"cde"])}, MAX_BATCH)
    assert both[servables.SCORES].tolist() == [[5.0, 2.5]]


def _declared(proto, dims):
    """`proto` with its shape replaced by `dims` (what a hostile client can send)."""
    del proto.tensor_shape.dim[:]
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    return proto


@pytest.mark.parametrize("make_proto, message", [
    (lambda: _declared(tf.make_tensor_proto([b"a"], dtype=tf.string), [2 ** 28]), "declares more than 1 values"),
    (lambda: _declared(tf.make_tensor_proto([b"a"], dtype=tf.string), [5]), "declares more than 1 values"),
    (lambda: _declared(tf.make_tensor_proto([b"a", b"b", b"c"], dtype=tf.string), [2]), "declares 2 values"),
    (lambda: _declared(tf.make_tensor_proto([b"a"], dtype=tf.string), [2 ** 40, 2 ** 40, 0]), "declares 0 values"),
    (lambda: _declared(tf.make_tensor_proto([b"a"], dtype=tf.string), [-1]), "negative dimension"),
    (lambda: _declared(tf.make_tensor_proto([], dtype=tf.string), [3]), "declares more than 0 values"),
], ids=["2^28 of one", "5 of one", "2 of three", "huge dims times zero", "negative", "none"])
def test_declared_shapes_are_checked_against_the_values_before_allocating(model, make_proto, message):
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = servables.TEXT_SIGNATURE
    request.inputs[servables.QUERY].CopyFrom(make_proto())
    assert _code(lambda: predict_proto(model, request, MAX_BATCH), message) == grpc.StatusCode.INVALID_ARGUMENT


def test_values_present_counts_tensor_content_and_value_fields():
    assert values_present(tf.make_tensor_proto(np.zeros((3, 4), np.float32))) == 12  # tensor_content
    assert values_present(tf.make_tensor_proto([1.5], dtype=tf.float32)) == 1  # float_val
    assert values_present(tf.make_tensor_proto(np.zeros(3, np.complex64))) == 3
    odd = tf.make_tensor_proto(np.zeros(3, np.float32))
    odd.tensor_content = odd.tensor_content[:-1]
    assert _code(lambda: values_present(odd), "whole float32 values") == grpc.StatusCode.INVALID_ARGUMENT


def test_image_calls_wait_for_a_slot_and_text_calls_do_not(model):
    runner = Runner(image_call_slots=1)
    loaded = types.SimpleNamespace(name=MODEL)
    image_call = prepare(model, servables.IMAGE_SIGNATURE, {servables.IMAGE_BYTES: _strings([b"abc"])}, MAX_BATCH)
    text_call = prepare(model, servables.TEXT_SIGNATURE, {servables.QUERY: _strings([b"abc"])}, MAX_BATCH)
    runner._image_slots.acquire()  # another image call holds the only slot
    done = threading.Event()
    worker = threading.Thread(target=lambda: (runner.run(loaded, image_call), done.set()))
    worker.start()
    assert runner.run(loaded, text_call)[servables.SCORES].tolist() == [[3.0, 1.5]]  # text calls need no slot
    assert not done.wait(0.5)
    runner._image_slots.release()
    assert done.wait(30)
    worker.join()


def test_unknown_signature_is_failed_precondition(model):
    code = _code(lambda: predict(model, "no_such_signature", {servables.QUERY: _strings([b"a"])}, MAX_BATCH),
                 "no_such_signature")
    assert code == grpc.StatusCode.FAILED_PRECONDITION


# ---------------------------------------------------------------------------
# serving.rest: TF Serving's JSON conventions


def _specs(model, signature):
    return input_specs(signature_function(model, signature))


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


@pytest.mark.parametrize("signature, body, expected, row_format", [
    (servables.TEXT_SIGNATURE, {"instances": ["a", "红"]}, {servables.QUERY: [b"a", "红".encode()]}, True),
    (servables.TEXT_SIGNATURE, {"instances": [{servables.QUERY: "a"}, {servables.QUERY: "bc"}]},
     {servables.QUERY: [b"a", b"bc"]}, True),
    (servables.IMAGE_SIGNATURE, {"instances": [_b64(b"\x00\xff")]}, {servables.IMAGE_BYTES: [b"\x00\xff"]}, True),
    (servables.IMAGE_SIGNATURE, {"instances": [{servables.IMAGE_BYTES: _b64(b"xyz")}]},
     {servables.IMAGE_BYTES: [b"xyz"]}, True),
    (servables.TEXT_SIGNATURE, {"inputs": ["a", "b"]}, {servables.QUERY: [b"a", b"b"]}, False),
    (servables.TEXT_SIGNATURE, {"inputs": {servables.QUERY: ["a"]}}, {servables.QUERY: [b"a"]}, False),
    (TWO_INPUTS_SIGNATURE, {"inputs": {servables.QUERY: ["a"], servables.IMAGE_BYTES: [_b64(b"b")]}},
     {servables.QUERY: [b"a"], servables.IMAGE_BYTES: [b"b"]}, False),
], ids=["rows of strings", "rows of objects", "rows of b64", "objects with b64", "columns as list",
        "columns as object", "two input columns"])
def test_request_arrays(model, signature, body, expected, row_format):
    arrays, rows = request_arrays(body, _specs(model, signature))
    assert rows is row_format
    assert {k: v.tolist() for k, v in arrays.items()} == expected


@pytest.mark.parametrize("signature, body, message", [
    (servables.TEXT_SIGNATURE, {"instances": ["a"], "inputs": ["a"]}, "exactly one of"),
    (servables.TEXT_SIGNATURE, {"signature_name": servables.TEXT_SIGNATURE}, "exactly one of"),
    (servables.TEXT_SIGNATURE, {"instances": []}, "non-empty list"),
    (servables.TEXT_SIGNATURE, {"instances": "a"}, "non-empty list"),
    (TWO_INPUTS_SIGNATURE, {"instances": [{servables.QUERY: "a", servables.IMAGE_BYTES: _b64(b"b")},
                                          {servables.QUERY: "c"}]}, "same inputs"),
    (TWO_INPUTS_SIGNATURE, {"instances": ["a", "b"]}, "instances must be objects"),
    (TWO_INPUTS_SIGNATURE, {"inputs": ["a"]}, "inputs must be an object"),
    (servables.IMAGE_SIGNATURE, {"instances": [{"b64": "not base64!"}]}, "invalid base64"),
    (servables.IMAGE_SIGNATURE, {"instances": [{"b64": "YQ==", "extra": 1}]}, "binary values must be"),
    (servables.TEXT_SIGNATURE, {"instances": [1, 2]}, "expects strings, got int"),
    (servables.TEXT_SIGNATURE, {"inputs": {"q": ["a"]}}, "unexpected ['q']"),
], ids=["both keys", "neither key", "empty instances", "instances not a list", "objects differ",
        "several inputs, plain rows", "several inputs, plain columns", "bad base64", "b64 with extra key",
        "numbers for strings", "unknown input"])
def test_request_arrays_invalid_argument(model, signature, body, message):
    assert _code(lambda: request_arrays(body, _specs(model, signature)), message) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_response_json_rows_and_columns():
    outputs = {servables.IMAGE_IDS: _strings([[b"a", "红".encode()], [b"c", b"\xff"]]),
               servables.SCORES: np.array([[1.5, 0.5], [2.0, 1.0]], np.float32)}
    not_utf8 = {"b64": base64.b64encode(b"\xff").decode()}
    assert response_json(outputs, row_format=True) == {"predictions": [
        {servables.IMAGE_IDS: ["a", "红"], servables.SCORES: [1.5, 0.5]},
        {servables.IMAGE_IDS: ["c", not_utf8], servables.SCORES: [2.0, 1.0]}]}
    assert response_json(outputs, row_format=False) == {"outputs": {
        servables.IMAGE_IDS: [["a", "红"], ["c", not_utf8]], servables.SCORES: [[1.5, 0.5], [2.0, 1.0]]}}
    # One output: its value directly, no name.
    scores = {servables.SCORES: outputs[servables.SCORES]}
    assert response_json(scores, row_format=True) == {"predictions": [[1.5, 0.5], [2.0, 1.0]]}
    assert response_json(scores, row_format=False) == {"outputs": [[1.5, 0.5], [2.0, 1.0]]}
    # An output named *_bytes is binary even when it happens to be UTF-8.
    image = {servables.IMAGE_BYTES: _strings([b"abc"])}
    assert response_json(image, row_format=True) == {"predictions": [_b64(b"abc")]}


@pytest.mark.parametrize("max_request_bytes", [4 * 1024 * 1024, 1 << 16])
def test_page_settings_follow_the_servables_contract(max_request_bytes):
    settings = page_settings(max_request_bytes)
    assert settings["retrieval_models"] == list(servables.RETRIEVAL_MODELS)
    assert settings["default_model"] in settings["retrieval_models"]
    assert set(settings["model_labels"]) == set(settings["retrieval_models"])
    assert (settings["text_signature"], settings["image_signature"]) == (servables.TEXT_SIGNATURE,
                                                                         servables.IMAGE_SIGNATURE)
    assert (settings["query_input"], settings["image_input"]) == (servables.QUERY, servables.IMAGE_BYTES)
    assert (settings["image_ids_output"], settings["scores_output"]) == (servables.IMAGE_IDS, servables.SCORES)
    assert settings["images_route"] == ROUTE_PREFIX
    # A file of max_upload_bytes, base64-encoded in a JSON body, fits the request limit.
    assert settings["max_upload_bytes"] == servables.max_upload_bytes(max_request_bytes)
    assert 0 < settings["max_upload_bytes"] and 4 * -(-settings["max_upload_bytes"] // 3) < max_request_bytes


# ---------------------------------------------------------------------------
# serving.model_registry


def test_registry_serves_the_latest_version_by_default(export):
    assert sorted(servables.version_dirs(str(export.base))) == [1, 2]  # "tmp-export-3" is not a version
    registry = ModelRegistry(models_config.read(export.configs[1]), max_batch=MAX_BATCH)
    registry.poll()
    latest = registry.get(MODEL)
    assert (latest.name, latest.version) == (MODEL, 2) and latest.path.endswith("/00000002")
    assert set(latest.signature_defs) == {servables.TEXT_SIGNATURE, servables.IMAGE_SIGNATURE, TWO_INPUTS_SIGNATURE}
    assert registry.get(MODEL, 2) is latest
    assert [(v, s.state) for v, s in registry.status(MODEL)] == [(2, AVAILABLE)]
    outputs = predict(latest.model, servables.TEXT_SIGNATURE, {servables.QUERY: _strings([b"xy"])}, MAX_BATCH)
    assert outputs[servables.IMAGE_IDS].tolist() == [expected_top_two(b"xy")[0]]
    assert _code(lambda: registry.get(MODEL, 1), "Specific") == grpc.StatusCode.NOT_FOUND  # on disk, not aspired


def test_registry_serves_the_latest_two_and_reports_unknowns(export):
    registry = ModelRegistry(models_config.read(export.configs[2]), max_batch=MAX_BATCH)
    assert registry.model_names == [MODEL]
    registry.poll()
    assert registry.get(MODEL).version == 2
    assert registry.get(MODEL, 1).version == 1 and registry.get(MODEL, 1).path.endswith("/1")
    assert [(v, s.state) for v, s in registry.status(MODEL)] == [(2, AVAILABLE), (1, AVAILABLE)]
    assert [(v, s.state) for v, s in registry.status(MODEL, 1)] == [(1, AVAILABLE)]
    for call in (lambda: registry.get("no_such_model"), lambda: registry.get(MODEL, 3),
                 lambda: registry.status("no_such_model"), lambda: registry.status(MODEL, 3)):
        assert _code(call) == grpc.StatusCode.NOT_FOUND


def test_a_new_version_folder_takes_over_on_the_next_poll(export, tmp_path):
    base = tmp_path / MODEL
    shutil.copytree(export.saved, base / "1")
    config = tmp_path / "models.config"
    models_config.write(str(config), models_config.build({MODEL: str(base)}))
    registry = ModelRegistry(models_config.read(str(config)), max_batch=MAX_BATCH)
    registry.poll()
    assert registry.get(MODEL).version == 1
    shutil.copytree(export.saved, base / "3")
    registry.poll()
    assert registry.get(MODEL).version == 3
    assert _code(lambda: registry.get(MODEL, 1)) == grpc.StatusCode.NOT_FOUND  # retired
    assert [(v, s.state) for v, s in registry.status(MODEL)] == [(3, AVAILABLE), (1, END)]


def _config_with_policy(policy: str, versions=()) -> models_config.ModelConfig:
    config = models_config.ModelConfig(name=MODEL, base_path="/unused")
    if policy == "all":
        config.model_version_policy.all.SetInParent()
    elif policy == "specific":
        config.model_version_policy.specific.versions.extend(versions)
    elif policy == "latest":
        config.model_version_policy.latest.num_versions = versions[0]
    return config


@pytest.mark.parametrize("policy, versions, expected", [
    ("all", (), [1, 2, 5]),
    ("specific", (1, 5, 9), [1, 5]),
    ("latest", (2,), [2, 5]),
    ("latest", (10,), [1, 2, 5]),
    ("none", (), [5]),  # no policy: TF Serving's default, the latest one
])
def test_aspired_versions(policy, versions, expected):
    assert aspired_versions(_config_with_policy(policy, versions), [1, 2, 5]) == expected


def test_replay_warmup_runs_the_warmup_records(export, model, tmp_path):
    loaded = LoadedVersion(MODEL, 1, str(export.base / "1"), model, {})
    assert replay_warmup(loaded, MAX_BATCH) == 2
    assert replay_warmup(LoadedVersion(MODEL, 1, str(tmp_path), model, {}), MAX_BATCH) == 0  # no warmup file

    # A warmup record the model rejects fails the replay (and so the load) with the request's error.
    bad = tmp_path / "bad"
    _write_warmup(str(bad), [_text_request("not_an_input", [b"x"])])
    failing = LoadedVersion(MODEL, 1, str(bad), model, {})
    assert _code(lambda: replay_warmup(failing, MAX_BATCH), "not_an_input") == grpc.StatusCode.INVALID_ARGUMENT


def test_a_failed_version_is_retried_once_fixed_and_a_deleted_one_forgotten(export, tmp_path, caplog):
    base = tmp_path / MODEL
    shutil.copytree(export.saved, base / "1")
    (base / "2").mkdir()
    (base / "2" / "saved_model.pb").write_bytes(b"truncated")  # a broken version 2
    config = tmp_path / "models.config"
    models_config.write(str(config), models_config.build({MODEL: str(base)}, 2))
    registry = ModelRegistry(models_config.read(str(config)), max_batch=MAX_BATCH)
    with caplog.at_level(logging.WARNING):
        for _ in range(MAX_LOAD_ATTEMPTS + 2):
            registry.poll()
    assert [(v, s.state) for v, s in registry.status(MODEL)] == [(2, END), (1, AVAILABLE)]
    gave_up = [r for r in caplog.records if "gave up" in r.getMessage()]
    assert len(gave_up) == 1 and gave_up[0].levelno == logging.ERROR, caplog.text  # said once, not per poll
    assert f"version 2: gave up after {MAX_LOAD_ATTEMPTS} attempts" in gave_up[0].getMessage()
    assert registry.status(MODEL, 2)[0][1].attempts == MAX_LOAD_ATTEMPTS  # gave up: no retry while unchanged
    shutil.rmtree(base / "2")
    shutil.copytree(export.saved, base / "2")  # fixed on disk
    registry.poll()
    assert registry.get(MODEL).version == 2
    shutil.rmtree(base / "1")
    registry.poll()
    assert [v for v, _ in registry.status(MODEL)] == [2]  # version 1 deleted from disk: not listed any more


def test_a_copied_export_serves_its_own_models_even_with_the_original_gone(export, tmp_path, caplog):
    original = tmp_path / "original"
    shutil.copytree(export.saved, original / MODEL / "1")
    models_config.write(str(original / "models.config"), models_config.build({MODEL: str(original / MODEL)}))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.copytree(export.saved, copy / MODEL / "2")  # the copy has a version the original lacks
    shutil.rmtree(original)
    models = models_config.served_beside(models_config.read(str(copy / "models.config")), str(copy / "models.config"))
    assert [m.base_path for m in models] == [str(copy / MODEL)]
    registry = ModelRegistry(models, max_batch=MAX_BATCH)
    registry.poll()
    assert registry.get(MODEL).version == 2 and registry.get(MODEL).path.startswith(str(copy))
    # neither beside the file nor at its base_path: said at once, not a silent empty server
    models_config.write(str(tmp_path / "lonely.config"), models_config.build({"nowhere": str(tmp_path / "gone")}))
    with caplog.at_level(logging.WARNING):
        models_config.served_beside(models_config.read(str(tmp_path / "lonely.config")), str(tmp_path / "lonely.config"))
    assert "does not exist" in caplog.text
