"""Serving in production: batching, Prometheus metrics, health, version labels (TF Serving's behaviour).

Fast and in-process like tests/test_serving_unit.py: one tiny hand-built
SavedModel (saved once per module, copied into version folders), real gRPC
and HTTP over 127.0.0.1 sockets on free ports, metrics read back with
prometheus_client's own text parser.  Batching tests are deterministic: calls
are queued before the batch threads start (or a batch is formed only once it
is full), so which calls share a run never depends on timing.
"""

import dataclasses
import http.client
import json
import shutil
import socket
import threading
import time
import types

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clicklens import compat  # noqa: F401  (before TensorFlow)
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from clicklens import models_config, servables
from clicklens.config import ConfigError, ServingConfig, config_from_dict
from clicklens.errors import ClicklensError
from serving import batching_options, metrics as metrics_module, saved_models
from serving.batcher import Batcher
from serving.batching_options import BatchingOptions
from serving.metrics import Metrics
from serving.model_registry import LoadedVersion
from serving.predict import ServingError, prepare, tensor_proto
from serving.server import ModelServer
from tests.test_serving_unit import _top_two, _write_warmup, expected_top_two

MODEL = "tiny"
PARSE_SIGNATURE = "parse"  # query -> to_number(query): fails for text that is not a number
MATRIX_SIGNATURE = "matrix"  # x [batch, n] -> row sums: for pad_variable_length_inputs
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
METRICS_PATH = "/monitoring/prometheus/metrics"
PREFIX = ":tensorflow:serving:"
WAIT_SECONDS = 60  # upper bound of any wait below: a broken batcher fails the test instead of hanging it


def _save_model(path: str) -> None:
    module = tf.Module()
    query = tf.TensorSpec([None], tf.string, name=servables.QUERY)
    matrix = tf.TensorSpec([None, None], tf.float32, name="x")
    tf.saved_model.save(module, path, signatures={
        servables.TEXT_SIGNATURE: tf.function(_top_two).get_concrete_function(query),
        PARSE_SIGNATURE: tf.function(lambda q: {"value": tf.strings.to_number(q)}).get_concrete_function(query),
        MATRIX_SIGNATURE: tf.function(lambda x: {"row_sum": tf.reduce_sum(x, axis=1)}).get_concrete_function(matrix),
    })


def _text_request(values, signature=servables.TEXT_SIGNATURE, version=None, label=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs[servables.QUERY].CopyFrom(tf.make_tensor_proto(list(values), dtype=tf.string))
    return request


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("production")
    path = root / "saved"
    _save_model(str(path))
    _write_warmup(str(path), [_text_request([b"warm"])])
    return types.SimpleNamespace(root=root, path=path)


def _export(saved, root, versions=(1, 2), labels=None, num_versions=2) -> str:
    """Copies the model into version folders under root; returns a models.config path (with labels if given)."""
    base = root / MODEL
    base.mkdir(parents=True, exist_ok=True)
    for version in versions:
        shutil.copytree(saved.path, base / str(version))
    config = models_config.build({MODEL: str(base)}, num_versions)
    for label, version in (labels or {}).items():
        config.model_config_list.config[0].version_labels[label] = version
    path = root / "models.config"
    models_config.write(str(path), config)
    return str(path)


@pytest.fixture(scope="module")
def loaded(saved):
    return LoadedVersion(MODEL, 1, str(saved.path), saved_models.load(str(saved.path)), {})


def _strings(values):
    return np.array(values, dtype=object)


def _families(text: str) -> dict:
    """Metric families by name, parsed by prometheus_client (samples as (name, labels, value))."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(family, **labels):
    return [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]


def _value(family, suffix="", **labels) -> float:
    """The one sample of `family` named name+suffix with these labels."""
    (sample,) = [s for s in _samples(family, **labels) if s.name == family.name + suffix]
    return sample.value


# ---------------------------------------------------------------------------
# Batching parameters: serving.batching and TF Serving's batching_parameters_file.

TF_SERVING_BATCHING_FILE = """\
max_batch_size { value: 32 }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 3 }
thread_pool_name { value: "clicklens_pool" }
allowed_batch_sizes: 8
allowed_batch_sizes: 16
allowed_batch_sizes: 32
pad_variable_length_inputs: true
"""


def test_batching_file_in_tf_serving_text_format(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text(TF_SERVING_BATCHING_FILE)
    assert batching_options.read_file(str(path)) == BatchingOptions(
        max_batch_size=32, batch_timeout_micros=2000, max_enqueued_batches=100, num_batch_threads=3,
        allowed_batch_sizes=(8, 16, 32), pad_variable_length_inputs=True, thread_pool_name="clicklens_pool")
    # Fields left out take TF Serving's defaults.
    path.write_text("max_batch_size { value: 4 }\n")
    options = batching_options.read_file(str(path))
    assert (options.max_batch_size, options.batch_timeout_micros, options.max_enqueued_batches) == (4, 0, 10)
    assert options.allowed_batch_sizes == () and options.num_batch_threads >= 1


@pytest.mark.parametrize("text, field", [
    ("max_batch_size { value: 8 }\nmax_batch_szie { value: 8 }\n", "max_batch_szie"),
    ("max_batch_size { value: 8 }\nallowed_batch_sizes: [4, 2, 8]\n", "allowed_batch_sizes"),
    ("max_batch_size { value: 8 }\nallowed_batch_sizes: [2, 4]\n", "allowed_batch_sizes"),
    ("max_batch_size { value: 0 }\n", "max_batch_size"),
    ("num_batch_threads { value: 0 }\n", "num_batch_threads"),
    ("batch_timeout_micros { value: -1 }\n", "batch_timeout_micros"),
    ("enable_large_batch_splitting { value: true }\n", "enable_large_batch_splitting"),
    ("max_batch_size: 8\n", "max_batch_size"),  # a wrapper field written as a scalar
], ids=["unknown field", "not increasing", "last != max", "zero batch", "zero threads", "negative timeout",
        "large batch splitting", "scalar for wrapper"])
def test_a_bad_batching_file_is_refused_at_start_naming_the_field(tmp_path, saved, text, field):
    path = tmp_path / "batching.config"
    path.write_text(text)
    with pytest.raises(ClicklensError, match=field):
        batching_options.read_file(str(path))
    serving = ServingConfig(host="127.0.0.1", grpc_port=0, http_port=0)
    serving.batching = dataclasses.replace(serving.batching, enabled=True, batching_parameters_file=str(path))
    with pytest.raises(ClicklensError, match=field):  # before any model loads or any port opens
        ModelServer(serving, _export(saved, tmp_path / "export", versions=(1,)))


@pytest.mark.parametrize("batching, key", [
    ({"enabled": True, "max_batch_size": 8, "allowed_batch_sizes": [4, 2, 8]}, "serving.batching.allowed_batch_sizes"),
    ({"enabled": True, "max_batch_size": 8, "allowed_batch_sizes": [2, 4]}, "serving.batching.allowed_batch_sizes"),
    ({"enabled": True, "max_batch_size": 0}, "serving.batching.max_batch_size"),
    ({"batching_parameters_file": "b.config"}, "serving.batching.batching_parameters_file"),
    ({"enabled": True, "batching_parameters_file": "b.config", "max_batch_size": 8}, "serving.batching.max_batch_size"),
    ({"enabled": True, "max_batch_sise": 8}, "serving.batching.max_batch_sise"),
], ids=["not increasing", "last != max", "zero", "file without enabled", "file and a key", "unknown key"])
def test_a_bad_batching_config_is_refused_at_load_naming_the_key(batching, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({"serving": {"batching": batching}})


def test_batching_config_and_monitoring_file(tmp_path):
    config = config_from_dict({"serving": {"batching": {"enabled": True, "max_batch_size": 8,
                                                        "allowed_batch_sizes": [2, 8], "num_batch_threads": 2}}})
    assert batching_options.from_config(config.serving.batching) == BatchingOptions(
        max_batch_size=8, num_batch_threads=2, allowed_batch_sizes=(2, 8))
    assert batching_options.from_config(ServingConfig().batching) is None  # off by default, as in TF Serving

    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/metrics" }\n')
    config = config_from_dict({"serving": {"monitoring": {"monitoring_config_file": str(monitoring)}}})
    metrics = metrics_module.from_config(config.serving.monitoring)
    assert (metrics.enabled, metrics.path) == (True, "/metrics")
    monitoring.write_text("prometheus_config { enable: true, port: 9 }\n")
    with pytest.raises(ClicklensError, match="port"):
        metrics_module.from_config(config.serving.monitoring)
    assert not metrics_module.from_config(ServingConfig().monitoring).enabled
    with pytest.raises(ConfigError, match=r"serving\.monitoring\.enabled"):
        config_from_dict({"serving": {"monitoring": {"enabled": True, "monitoring_config_file": "m.config"}}})


# ---------------------------------------------------------------------------
# The batcher, in-process.


def _run_queued_then_start(batcher: Batcher, loaded, calls):
    """Queues every call (each from its own thread), starts the batch threads, returns outputs or errors in order."""
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = batcher.run(loaded, calls[i])
        except Exception as err:  # noqa: BLE001  (checked by the caller)
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    rows = sum(c.batch_size for c in calls)
    deadline = time.monotonic() + WAIT_SECONDS
    while batcher.queued_rows() < rows:
        assert time.monotonic() < deadline, "calls were not queued"
        time.sleep(0.01)
    batcher.start()
    for thread in threads:
        thread.join(WAIT_SECONDS)
    batcher.stop()
    return results


def _query_call(loaded, values, signature=servables.TEXT_SIGNATURE):
    return prepare(loaded.model, signature, {servables.QUERY: _strings(values)}, max_batch=64)


def test_queued_calls_run_as_one_batch_and_get_their_own_rows(loaded):
    metrics = Metrics(enabled=True)
    batcher = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1), metrics)
    queries = [[b"a"], [b"bb", b"ccc"], ["红色".encode()], [b"dddd"]]
    results = _run_queued_then_start(batcher, loaded, [_query_call(loaded, q) for q in queries])
    for query, outputs in zip(queries, results):
        assert outputs[servables.IMAGE_IDS].tolist() == [expected_top_two(q)[0] for q in query]
        assert outputs[servables.SCORES].tolist() == [expected_top_two(q)[1] for q in query]
    families = _families(metrics.exposition())
    assert _value(families[PREFIX + "batching_session:wrapped_run_count"], "_total") == 1
    processed = families[PREFIX + "batching_session:processed_batch_size"]
    assert _value(processed, "_count") == 1 and _value(processed, "_sum") == 5
    assert _value(families[PREFIX + "batching_session:input_batch_size"], "_count") == 4
    queuing = families[PREFIX + "batching_session:queuing_latency"]
    assert _value(queuing, "_count", thread_pool_name="model_server_batch_threads") == 4


def test_batches_are_padded_to_the_allowed_sizes_and_split_at_max(loaded):
    metrics = Metrics(enabled=True)
    batcher = Batcher(BatchingOptions(max_batch_size=4, allowed_batch_sizes=(2, 4), num_batch_threads=1), metrics)
    # 2 + 1 rows fill one batch padded to 4; the next call does not fit (3 + 2 > 4) and runs as 2 rows.
    queries = [[b"a", b"bb"], [b"ccc"], [b"dd", b"e"]]
    results = _run_queued_then_start(batcher, loaded, [_query_call(loaded, q) for q in queries])
    for query, outputs in zip(queries, results):
        assert outputs[servables.SCORES].tolist() == [expected_top_two(q)[1] for q in query]
    families = _families(metrics.exposition())
    assert _value(families[PREFIX + "batching_session:wrapped_run_count"], "_total") == 2
    padding = families[PREFIX + "batching_session:padding_size"]
    assert _value(padding, "_sum", execution_batch_size="4") == 1
    assert _value(padding, "_sum", execution_batch_size="2") == 0


def test_one_bad_call_in_a_batch_fails_only_itself(loaded):
    batcher = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1))
    values = [[b"1.5"], [b"not a number"], [b"2", b"-3"]]
    results = _run_queued_then_start(batcher, loaded, [_query_call(loaded, v, PARSE_SIGNATURE) for v in values])
    assert results[0]["value"].tolist() == [1.5]
    assert isinstance(results[1], ServingError) and results[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert results[2]["value"].tolist() == [2.0, -3.0]


def test_calls_of_different_signatures_or_shapes_are_not_merged(loaded):
    metrics = Metrics(enabled=True)
    batcher = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1), metrics)

    def matrix(rows):
        return prepare(loaded.model, MATRIX_SIGNATURE, {"x": np.array(rows, np.float32)}, max_batch=64)

    calls = [_query_call(loaded, [b"ab"]), _query_call(loaded, [b"7"], PARSE_SIGNATURE),
             matrix([[1, 2]]), matrix([[1, 2, 3]])]
    results = _run_queued_then_start(batcher, loaded, calls)
    assert results[1]["value"].tolist() == [7.0]
    assert results[2]["row_sum"].tolist() == [3.0] and results[3]["row_sum"].tolist() == [6.0]
    assert _value(_families(metrics.exposition())[PREFIX + "batching_session:wrapped_run_count"], "_total") == 4


def test_pad_variable_length_inputs_merges_different_shapes(loaded):
    metrics = Metrics(enabled=True)
    batcher = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1, pad_variable_length_inputs=True),
                      metrics)
    calls = [prepare(loaded.model, MATRIX_SIGNATURE, {"x": np.array(rows, np.float32)}, max_batch=64)
             for rows in ([[5, 1]], [[1, 2, 3], [4, 5, 6]])]
    results = _run_queued_then_start(batcher, loaded, calls)
    # [[5, 1]] is padded to [[5, 1, 5]] with its first element, as TF Serving pads.
    assert results[0]["row_sum"].tolist() == [11.0]
    assert results[1]["row_sum"].tolist() == [6.0, 15.0]
    assert _value(_families(metrics.exposition())[PREFIX + "batching_session:wrapped_run_count"], "_total") == 1


def test_too_large_call_and_full_queue_get_tf_servings_errors(loaded):
    batcher = Batcher(BatchingOptions(max_batch_size=2, max_enqueued_batches=1, num_batch_threads=1))
    with pytest.raises(ServingError, match="Task size 3 is larger than maximum input batch size 2") as err:
        batcher.run(loaded, _query_call(loaded, [b"a", b"b", b"c"]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    waiting = threading.Thread(target=batcher.run, args=(loaded, _query_call(loaded, [b"a", b"b"])))
    waiting.start()  # fills the one batch the queue may hold (the batch threads are not started yet)
    deadline = time.monotonic() + WAIT_SECONDS
    while batcher.queued_rows() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(ServingError, match="queue to which this task was submitted is full") as err:
        batcher.run(loaded, _query_call(loaded, [b"c"]))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    batcher.start()
    waiting.join(WAIT_SECONDS)
    batcher.stop()
    assert not waiting.is_alive()


@pytest.mark.parametrize("array", [
    np.array([[1.5, 2.0]], np.float32), np.arange(6, dtype=np.int64).reshape(2, 3), np.array([7], np.int32),
    np.array([[b"a", b"\xff"]], dtype=object), np.array([b"x", b"yz"]), np.array([], dtype=object),
    np.array(3.0, np.float32), np.zeros((0, 2), np.float32), np.array([True, False]), np.array([1, 2], np.float16),
], ids=["float32", "int64", "one int32", "strings", "fixed bytes", "no strings", "scalar", "empty", "bool",
        "float16 (fallback)"])
def test_response_tensors_equal_tf_make_tensor_proto(array):
    assert tensor_proto(array) == tf.make_tensor_proto(array)


# ---------------------------------------------------------------------------
# Metrics: TF Serving's names, labels and text format.


def test_metrics_page_has_tf_servings_names_labels_and_buckets():
    metrics = Metrics(enabled=True)
    metrics.request("m", "Predict", "GRPC", grpc.StatusCode.OK, 0.002)
    metrics.request("m", "Predict", "GRPC", grpc.StatusCode.OK, 50.0)
    metrics.request("m", "predict", "REST", grpc.StatusCode.INVALID_ARGUMENT, 0.001)
    metrics.runtime("m", "Predict", 0.001)
    metrics.warmup('/models/m/1"quoted"', grpc.StatusCode.OK, 0.5, 3)
    text = metrics.exposition()
    assert ':tensorflow:serving:request_count{model_name="m",status="OK"} 2\n' in text  # no _total, as TF Serving
    assert 'le="10"' in text and 'le="18"' in text and 'le="32.4"' in text and 'le="+Inf"' in text
    families = _families(text)
    count = families[PREFIX + "request_count"]
    assert count.type == "counter"
    assert _value(count, "_total", model_name="m", status="OK") == 2
    assert _value(count, "_total", model_name="m", status="INVALID_ARGUMENT") == 1
    latency = families[PREFIX + "request_latency"]
    assert latency.type == "histogram"
    assert _value(latency, "_count", model_name="m", API="Predict", entrypoint="GRPC") == 2
    assert _value(latency, "_sum", model_name="m", API="Predict", entrypoint="GRPC") == 2000 + 50_000_000
    assert not _samples(latency, entrypoint="REST")  # failed requests are counted, not timed (as TF Serving)
    buckets = [s for s in _samples(latency, entrypoint="GRPC") if s.name.endswith("_bucket")]
    assert len(buckets) == 34 and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 2
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)  # cumulative
    assert _value(families[PREFIX + "runtime_latency"], "_count", model_name="m", API="Predict", runtime="TF2") == 1
    warmup = families[PREFIX + "model_warmup_latency"]
    assert _value(warmup, "_count", model_path='/models/m/1"quoted"', status="OK") == 1
    assert _value(families[PREFIX + "model_warmup_records_read"], "_total", status="OK") == 3
    assert not Metrics(enabled=False).exposition().count("} ")  # off: nothing recorded


# ---------------------------------------------------------------------------
# A whole server on free ports: batching and metrics on, version labels configured.


def _http(port: int, method: str, path: str, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_SECONDS)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body))
        response = connection.getresponse()
        data = response.read()
        return response.status, data
    finally:
        connection.close()


def _json(port: int, method: str, path: str, body=None):
    status, data = _http(port, method, path, body)
    return status, json.loads(data) if data else None


def _start(serving: ServingConfig, config_path: str) -> ModelServer:
    server = ModelServer(serving, config_path)
    server.start()
    return server


def _serving_config(**changes) -> ServingConfig:
    config = ServingConfig(host="127.0.0.1", grpc_port=0, http_port=0, poll_seconds=3600)
    config.monitoring = dataclasses.replace(config.monitoring, enabled=True)
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def server(saved, tmp_path_factory):
    """Versions 1 and 2, labels stable=1 and canary=2, batching and metrics on."""
    config_path = _export(saved, tmp_path_factory.mktemp("server"), labels={"stable": 1, "canary": 2})
    serving = _serving_config()
    serving.batching = dataclasses.replace(serving.batching, enabled=True, max_batch_size=8, num_batch_threads=2)
    server = _start(serving, config_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield types.SimpleNamespace(server=server, http=server.http_port, channel=channel,
                                predict=prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict,
                                status=model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus,
                                health=health_pb2_grpc.HealthStub(channel).Check)
    channel.close()
    server.stop(grace=1.0)


def _scrape(port: int) -> dict:
    status, data = _http(port, "GET", METRICS_PATH)
    assert status == 200
    return _families(data.decode("utf-8"))


def test_version_labels_on_grpc_and_rest(server):
    for label, version in (("stable", 1), ("canary", 2)):
        response = server.predict(_text_request([b"abc"], label=label), timeout=WAIT_SECONDS)
        assert response.model_spec.version.value == version
        assert tf.make_ndarray(response.outputs[servables.SCORES]).tolist() == [expected_top_two(b"abc")[1]]
        status, body = _json(server.http, "POST", f"/v1/models/{MODEL}/labels/{label}:predict",
                             {"instances": ["abc"]})
        assert status == 200 and body["predictions"][0][servables.SCORES] == expected_top_two(b"abc")[1]
        status, body = _json(server.http, "GET", f"/v1/models/{MODEL}/labels/{label}")
        assert status == 200 and [v["version"] for v in body["model_version_status"]] == [str(version)]
        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name, status_request.model_spec.version_label = MODEL, label
        assert [s.version for s in server.status(status_request, timeout=WAIT_SECONDS).model_version_status] \
            == [version]
    with pytest.raises(grpc.RpcError) as err:
        server.predict(_text_request([b"abc"], label="nightly"), timeout=WAIT_SECONDS)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "Unrecognized servable version label: nightly"
    status, body = _json(server.http, "POST", f"/v1/models/{MODEL}/labels/nightly:predict", {"instances": ["a"]})
    assert (status, body) == (400, {"error": "Unrecognized servable version label: nightly"})


def test_grpc_and_rest_requests_are_counted_and_timed(server):
    before = _scrape(server.http)
    count = before[PREFIX + "request_count"]

    def ok_count():
        return sum(s.value for s in _samples(count, model_name=MODEL, status="OK"))

    base_ok = ok_count()
    base_invalid = sum(s.value for s in _samples(count, model_name=MODEL, status="INVALID_ARGUMENT"))
    server.predict(_text_request([b"x"]), timeout=WAIT_SECONDS)
    assert _json(server.http, "POST", f"/v1/models/{MODEL}:predict", {"instances": ["x"]})[0] == 200
    with pytest.raises(grpc.RpcError):
        server.predict(_text_request([b"x"], signature=PARSE_SIGNATURE), timeout=WAIT_SECONDS)  # not a number
    families = _scrape(server.http)
    count = families[PREFIX + "request_count"]
    assert ok_count() == base_ok + 2
    assert sum(s.value for s in _samples(count, model_name=MODEL, status="INVALID_ARGUMENT")) == base_invalid + 1
    latency = families[PREFIX + "request_latency"]
    assert _value(latency, "_count", model_name=MODEL, API="Predict", entrypoint="GRPC") >= 1
    assert _value(latency, "_count", model_name=MODEL, API="predict", entrypoint="REST") >= 1
    assert _value(families[PREFIX + "runtime_latency"], "_count", model_name=MODEL, API="Predict",
                  runtime="TF2") >= 2
    assert _value(families[PREFIX + "batching_session:wrapped_run_count"], "_total") >= 2  # through the batcher
    warmups = families[PREFIX + "model_warmup_latency"]
    assert {s.labels["status"] for s in warmups.samples} == {"OK"}
    assert len({s.labels["model_path"] for s in warmups.samples}) == 2  # both versions replayed their warmup


def test_a_stuck_scrape_does_not_hold_up_requests(server):
    stuck = socket.create_connection(("127.0.0.1", server.http), timeout=WAIT_SECONDS)
    try:
        stuck.sendall(f"GET {METRICS_PATH} HTTP/1.1\r\nHost: x\r\n".encode())  # headers never finished
        response = server.predict(_text_request([b"abcd"]), timeout=WAIT_SECONDS)
        assert tf.make_ndarray(response.outputs[servables.SCORES]).tolist() == [expected_top_two(b"abcd")[1]]
        assert _json(server.http, "POST", f"/v1/models/{MODEL}:predict", {"instances": ["ab"]})[0] == 200
        assert PREFIX + "request_count" in _scrape(server.http)  # and another scrape is answered meanwhile
        stuck.sendall(b"Connection: close\r\n\r\n")  # the stuck scrape, finished, is answered too
        reply = b"".join(iter(lambda: stuck.recv(65536), b""))
        assert reply.startswith(b"HTTP/1.1 200") and PREFIX.encode() + b"request_count" in reply
    finally:
        stuck.close()


def test_health_and_readiness_when_every_model_is_available(server):
    for service in ("", MODEL, "tensorflow.serving.PredictionService", "PredictionService", "ModelService"):
        response = server.health(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_SECONDS)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        server.health(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=WAIT_SECONDS)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert _json(server.http, "GET", "/ready") == (200, {"status": "SERVING", "models": {MODEL: "AVAILABLE"}})
    assert _http(server.http, "HEAD", "/ready") == (200, b"")


def _batching_server(saved, tmp_path, workers: int = 8, **batching) -> ModelServer:
    """A started server over version 1 with batching on (`batching`: serving.batching fields)."""
    serving = _serving_config(workers=workers)
    serving.batching = dataclasses.replace(serving.batching, enabled=True, num_batch_threads=1, **batching)
    return _start(serving, _export(saved, tmp_path, versions=(1,)))


def test_grpc_and_rest_requests_share_one_batch(saved, tmp_path):
    # Two rows fill a batch; the long timeout means a batch forms only when both requests are queued.
    server = _batching_server(saved, tmp_path, max_batch_size=2, batch_timeout_micros=WAIT_SECONDS * 1_000_000)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            by_grpc = predict.future(_text_request([b"abc"]), timeout=WAIT_SECONDS)
            status, body = _json(server.http_port, "POST", f"/v1/models/{MODEL}:predict", {"instances": ["de"]})
            assert status == 200 and body["predictions"][0][servables.SCORES] == expected_top_two(b"de")[1]
            response = by_grpc.result()
            assert tf.make_ndarray(response.outputs[servables.SCORES]).tolist() == [expected_top_two(b"abc")[1]]
        families = _scrape(server.http_port)
        assert _value(families[PREFIX + "batching_session:wrapped_run_count"], "_total") == 1
        assert _value(families[PREFIX + "batching_session:processed_batch_size"], "_sum") == 2
    finally:
        server.stop(grace=1.0)


def test_batched_predicts_waiting_for_their_batch_hold_no_worker_thread(saved, tmp_path):
    # Two worker threads, two gRPC Predicts waiting for a batch that only a third row fills: the status
    # call must still be answered at once (a thread-per-request server would have no thread left for it).
    server = _batching_server(saved, tmp_path, workers=2, max_batch_size=3,
                              batch_timeout_micros=WAIT_SECONDS * 1_000_000)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            waiting = [predict.future(_text_request([text]), timeout=WAIT_SECONDS) for text in (b"abc", b"de")]
            deadline = time.monotonic() + WAIT_SECONDS
            while server.batcher.queued_rows() < 2:
                assert time.monotonic() < deadline, "the Predicts were not queued"
                time.sleep(0.01)
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
                get_model_status_pb2.GetModelStatusRequest(model_spec={"name": MODEL}), timeout=5)
            assert [v.state for v in status.model_version_status] == [
                get_model_status_pb2.ModelVersionStatus.AVAILABLE]
            assert not any(f.done() for f in waiting)
            # A REST request (its own thread) brings the third row; all three get their own rows.
            status, body = _json(server.http_port, "POST", f"/v1/models/{MODEL}:predict", {"instances": ["f"]})
            assert status == 200 and body["predictions"][0][servables.SCORES] == expected_top_two(b"f")[1]
            for text, future in zip((b"abc", b"de"), waiting):
                scores = tf.make_ndarray(future.result().outputs[servables.SCORES]).tolist()
                assert scores == [expected_top_two(text)[1]]
        families = _scrape(server.http_port)
        assert _value(families[PREFIX + "batching_session:processed_batch_size"], "_sum") == 3
    finally:
        server.stop(grace=1.0)


def test_a_predict_cancelled_while_its_batch_waits_leaves_the_others_served(saved, tmp_path):
    server = _batching_server(saved, tmp_path, max_batch_size=8, batch_timeout_micros=1_000_000)
    try:
        before = _scrape(server.http_port)[PREFIX + "request_count"]
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            with pytest.raises(grpc.RpcError) as err:  # the client gives up before the 1 s batch timeout
                predict(_text_request([b"abc"]), timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            response = predict(_text_request([b"de"]), timeout=WAIT_SECONDS)
            assert tf.make_ndarray(response.outputs[servables.SCORES]).tolist() == [expected_top_two(b"de")[1]]
        after = _scrape(server.http_port)[PREFIX + "request_count"]

        def added(status):
            return sum(s.value for s in _samples(after, status=status)) - sum(
                s.value for s in _samples(before, status=status))

        assert (added("OK"), added("CANCELLED")) == (1, 1)
    finally:
        server.stop(grace=1.0)


def test_not_serving_until_every_model_has_an_available_version(saved, tmp_path):
    config_path = _export(saved, tmp_path, versions=())  # the model's base path is empty at start
    server = _start(_serving_config(), config_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for service in ("", MODEL):
                assert check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_SECONDS).status \
                    == health_pb2.HealthCheckResponse.NOT_SERVING
            assert _json(server.http_port, "GET", "/ready") == (
                503, {"status": "NOT_SERVING", "models": {MODEL: "NOT_AVAILABLE"}})
            shutil.copytree(saved.path, tmp_path / MODEL / "3")
            server.registry.poll()  # what the poller thread does every serving.poll_seconds
            assert check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_SECONDS).status \
                == health_pb2.HealthCheckResponse.SERVING
            assert _json(server.http_port, "GET", "/ready")[0] == 200
            server.health.shutdown()  # what stop() does first
            assert check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_SECONDS).status \
                == health_pb2.HealthCheckResponse.NOT_SERVING
            assert _json(server.http_port, "GET", "/ready")[0] == 503
    finally:
        server.stop(grace=1.0)


def test_a_label_on_a_version_that_is_not_available_is_refused(saved, tmp_path):
    # Latest 1 serves only version 2; "stable" names version 1, on disk but not loaded.
    config_path = _export(saved, tmp_path, labels={"stable": 1}, num_versions=1)
    with pytest.raises(ClicklensError, match="Request to assign label to version 1 of model tiny, which is not "
                                             "currently available for inference"):
        _start(_serving_config(), config_path)
    server = _start(_serving_config(allow_version_labels_for_unavailable_models=True), config_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            with pytest.raises(grpc.RpcError) as err:
                predict(_text_request([b"a"], label="stable"), timeout=WAIT_SECONDS)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "Specific(tiny, 1)" in err.value.details()
    finally:
        server.stop(grace=1.0)


def test_no_metrics_page_when_monitoring_is_off(saved, tmp_path):
    server = _start(_serving_config(monitoring=ServingConfig().monitoring), _export(saved, tmp_path, versions=(1,)))
    try:
        assert _http(server.http_port, "GET", METRICS_PATH)[0] == 404
        assert _http(server.http_port, "GET", "/ready")[0] == 200
    finally:
        server.stop(grace=1.0)


def test_polls_keep_their_cadence_when_a_load_outlasts_the_interval(monkeypatch):
    from serving.model_registry import ModelRegistry

    registry = ModelRegistry([], poll_seconds=1.0)
    starts, ends = [], []

    def poll(wait=False):
        starts.append(time.monotonic())
        if len(starts) == 2:
            time.sleep(1.5)  # a version that takes longer to load than the interval
        ends.append(time.monotonic())

    monkeypatch.setattr(registry, "poll", poll)
    registry.start()
    deadline = time.monotonic() + 30
    while len(ends) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    registry.stop()
    assert len(ends) >= 3
    assert starts[1] - ends[0] > 0.7  # a quick poll is followed by the interval
    assert starts[2] - ends[1] < 0.5  # a long one by the next poll at once: what appeared meanwhile loads now


def test_load_threads_load_a_version_while_another_is_still_loading(saved, tmp_path, monkeypatch):
    from serving import model_registry
    from serving.model_registry import ModelRegistry, State

    bases = {}
    for name in ("slow", "quick"):
        bases[name] = tmp_path / name
        shutil.copytree(saved.path, bases[name] / "1")
    config_path = str(tmp_path / "models.config")
    models_config.write(config_path, models_config.build({n: str(b) for n, b in bases.items()}, 1))
    configs = models_config.read(config_path)
    release = threading.Event()
    real_load = saved_models.load

    def load(path):
        if path.endswith("slow/2"):
            assert release.wait(WAIT_SECONDS), "the slow load was never released"
        return real_load(path)

    monkeypatch.setattr(model_registry.saved_models, "load", load)
    registry = ModelRegistry(configs, poll_seconds=3600, num_load_threads=2)
    registry.start()  # waits for version 1 of both
    try:
        assert registry.get("slow").version == registry.get("quick").version == 1
        shutil.copytree(saved.path, bases["slow"] / "2")
        registry.poll()  # hands slow/2 to a loader thread and returns: it waits for `release`
        assert registry.status("slow", 2)[0][1].state == State.LOADING
        shutil.copytree(saved.path, bases["quick"] / "2")
        registry.poll(wait=True)  # quick/2 loads on the other thread, not after slow/2
        assert registry.get("quick").version == 2
        assert registry.get("slow").version == 1 and registry.status("slow", 2)[0][1].state == State.LOADING
        registry.poll(wait=True)  # a poll while slow/2 loads does not start it again
        release.set()
        deadline = time.monotonic() + WAIT_SECONDS
        while registry.get("slow").version != 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        registry.poll(wait=True)  # retires the versions the new ones replace
        assert [v for v, _ in registry.status("slow") if _.state == State.AVAILABLE] == [2]
        assert [v for v, _ in registry.status("quick") if _.state == State.AVAILABLE] == [2]
    finally:
        release.set()
        registry.stop()


def test_warmup_threads_replay_a_versions_requests_side_by_side(saved, tmp_path, monkeypatch):
    from serving import model_registry

    folder = tmp_path / "m" / "1"
    shutil.copytree(saved.path, folder)
    _write_warmup(str(folder), [_text_request([b"warm"]), _text_request([b"warmer", b"warmest"])])
    loaded = LoadedVersion(MODEL, 1, str(folder), saved_models.load(str(folder)), {})
    both_running = threading.Barrier(2, timeout=WAIT_SECONDS)
    real_predict, threads = model_registry.predict_proto, set()

    def predict_side_by_side(model, request, max_batch):
        threads.add(threading.current_thread().name)
        both_running.wait()  # broken (and the test failed) unless the other request runs meanwhile
        return real_predict(model, request, max_batch)

    monkeypatch.setattr(model_registry, "predict_proto", predict_side_by_side)
    assert model_registry.replay_warmup(loaded, 16, num_threads=2) == 2
    assert len(threads) == 2 and all(name.startswith("model-warmup") for name in threads)

    one_at_a_time = []
    monkeypatch.setattr(model_registry, "predict_proto",
                        lambda model, request, max_batch: one_at_a_time.append(threading.current_thread().name)
                        or real_predict(model, request, max_batch))
    assert model_registry.replay_warmup(loaded, 16) == 2  # TF Serving's default: one thread, the loader's own
    assert one_at_a_time == [threading.current_thread().name] * 2
    with pytest.raises(ConfigError, match="serving.num_warmup_threads"):
        config_from_dict({"serving": {"num_warmup_threads": 0}})
