"""TF Serving conformance: the scenarios of tensorflow_model_server's own integration tests, against our server.

The scenarios follow the public list in TF Serving's
tensorflow_serving/model_servers/tensorflow_model_server_test.py (status,
metadata, Predict / Classify / Regress / MultiInference, good and bad model
configs, a broken model, batching, gRPC channel arguments, the Unix socket,
the Prometheus page, REST predict (rows and columns), classify, regress,
status and metadata), written here from scratch against small models the
tests build themselves at the pinned TF version: half-plus-two and
half-plus-three, each with a predict signature (`x` -> `y`), a classification
signature (`classify_x_to_y`, serialized tf.Examples -> `scores`) and a
regression signature (`regress_x_to_y` -> `outputs`).  TFLite, the profiler and
GPU-only scenarios do not apply (README.md, "A drop-in tensorflow_model_server").

Servers are started exactly as clicklens-model-server starts them (the same
flags, read by serving/model_server_flags.py) but in this process, on free
ports; tests/test_model_server_flags.py runs the console script itself.
"""

import http.client
import json
import os
import shutil
import socket
import tempfile
import time
import types

import grpc
import pytest

from clicklens import compat  # noqa: F401  (before TensorFlow)
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2, inference_pb2,
                                     model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)
from tensorflow_serving.config import model_server_config_pb2

from clicklens import models_config
from clicklens.config import ServingConfig
from serving import model_server_flags
from serving.server import ModelServer

RPC_TIMEOUT = 30.0
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
CLASSIFY = "classify_x_to_y"
REGRESS = "regress_x_to_y"
DEFAULT = "serving_default"
PADDED_VERSION = 123  # TF Serving's examples write half_plus_two/00000123/


# ---------------------------------------------------------------------------
# Test models, built with tf.saved_model.save.


def save_half_plus(path: str, plus: float) -> None:
    """A SavedModel computing y = x / 2 + plus, with predict, classify and regress signatures."""
    features = {"x": tf.io.FixedLenFeature([1], tf.float32)}

    def from_examples(serialized):
        return 0.5 * tf.io.parse_example(serialized, features)["x"] + plus  # [batch, 1]

    examples = tf.TensorSpec([None], tf.string, name="inputs")
    tf.saved_model.save(tf.Module(), path, signatures={
        DEFAULT: tf.function(lambda x: {"y": 0.5 * x + plus}).get_concrete_function(
            tf.TensorSpec([None], tf.float32, name="x")),
        CLASSIFY: tf.function(lambda inputs: {"scores": from_examples(inputs)}).get_concrete_function(examples),
        REGRESS: tf.function(lambda inputs: {"outputs": from_examples(inputs)}).get_concrete_function(examples),
    })


def write_config(path, models) -> str:
    """A ModelServerConfig text file: models is [(name, base_path, policy text or "", {label: version})]."""
    lines = ["model_config_list {"]
    for name, base, policy, labels in models:
        lines += ["  config {", f'    name: "{name}"', f'    base_path: "{base}"', '    model_platform: "tensorflow"']
        if policy:
            lines.append(f"    model_version_policy {{ {policy} }}")
        lines += [f'    version_labels {{ key: "{k}" value: {v} }}' for k, v in labels.items()]
        lines.append("  }")
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("tf_serving"))


def build_models(root):
    """Under `root`: half_plus_two at version 00000123, half_plus_three at 1, `versions` with 1 (two) and
    2 (three), a broken model, the good and bad model config files, a monitoring and a batching file."""
    two, three = root / "saved_two", root / "saved_three"
    save_half_plus(str(two), 2.0)
    save_half_plus(str(three), 3.0)
    shutil.copytree(two, root / "half_plus_two" / "00000123")
    shutil.copytree(three, root / "half_plus_three" / "1")
    shutil.copytree(two, root / "versions" / "1")
    shutil.copytree(three, root / "versions" / "2")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    good = write_config(root / "good_model_config.txt", [
        ("default", root / "half_plus_two", "", {}),
        ("half_plus_two", root / "half_plus_two", "", {}),
        ("half_plus_three", root / "half_plus_three", "", {}),
        ("versions", root / "versions", "all {}", {"stable": 1, "canary": 2}),
    ])
    bad = root / "bad_model_config.txt"
    bad.write_text("improperly formatted file\n")
    monitoring = root / "monitoring_config.txt"
    monitoring.write_text('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }\n')
    batching = root / "batching_config.txt"
    batching.write_text("max_batch_size { value: 128 }\nbatch_timeout_micros { value: 0 }\n"
                        "max_enqueued_batches { value: 100 }\nnum_batch_threads { value: 1 }\n")
    return types.SimpleNamespace(root=root, two=two, three=three, good=good, bad=str(bad),
                                 monitoring=str(monitoring), batching=str(batching))


def pick_unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str) -> ModelServer:
    """A server for a tensorflow_model_server command line, on 127.0.0.1, started (in this process)."""
    found = model_server_flags.settings(list(flags), ServingConfig(host="127.0.0.1"))
    server = ModelServer(found.serving, models=found.models, options=found.options)
    server.start()
    return server


class Client:
    """gRPC stubs over one channel, and REST calls to the server's HTTP port."""

    def __init__(self, target: str, http_port):
        self.channel = grpc.insecure_channel(target)
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.http_port = http_port

    def rest(self, method: str, path: str, body=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=RPC_TIMEOUT)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body))
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def close(self):
        self.channel.close()


@pytest.fixture(scope="module")
def server(models):
    """The good config, REST, a Unix socket, the Prometheus page and gRPC channel arguments, as a deployment
    of tensorflow_model_server would start it."""
    socket_dir = tempfile.mkdtemp(prefix="cl-uds-")  # short: a socket path is limited to ~108 bytes
    socket_path = os.path.join(socket_dir, "grpc.sock")
    server = start_server("--port=0", f"--rest_api_port={pick_unused_port()}", f"--model_config_file={models.good}",
                          f"--grpc_socket_path={socket_path}", f"--monitoring_config_file={models.monitoring}",
                          "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb",
                          "--rest_api_timeout_in_ms=5000", "--file_system_poll_wait_seconds=0")
    clients = {"tcp": Client(f"127.0.0.1:{server.grpc_port}", server.http_port),
               "uds": Client(f"unix:{socket_path}", server.http_port)}
    yield types.SimpleNamespace(server=server, socket_path=socket_path, **clients)
    for client in clients.values():
        client.close()
    server.stop(grace=1.0)
    shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture(params=["tcp", "uds"])
def client(request, server) -> Client:
    """Each gRPC scenario runs over TCP and over the Unix domain socket."""
    return getattr(server, request.param)


def predict_request(model="default", specify_output=True, signature="", version=None, label=None, x=2.0):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if signature:
        request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].float_val.append(x)
    request.inputs["x"].tensor_shape.dim.add().size = 1
    if specify_output:
        request.output_filter.append("y")
    return request


def example_input(target, x=2.0):
    target.example_list.examples.add().features.feature["x"].float_list.value.append(x)


def assert_model_spec(spec, name, signature, version):
    assert (spec.name, spec.signature_name, spec.version.value) == (name, signature, version)


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=RPC_TIMEOUT)
    return err.value


# ---------------------------------------------------------------------------
# gRPC: ModelService and PredictionService (testGetModelStatus, testGetModelMetadata, testPredict*, ...).


def test_get_model_status(client):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "default"
    result = client.models.GetModelStatus(request, timeout=RPC_TIMEOUT)
    assert len(result.model_version_status) == 1
    assert result.model_version_status[0].version == PADDED_VERSION  # read from the folder 00000123
    assert result.model_version_status[0].state == AVAILABLE
    assert result.model_version_status[0].status.error_code == 0


def test_get_model_metadata(client):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "default"
    request.metadata_field.append("signature_def")
    result = client.prediction.GetModelMetadata(request, timeout=RPC_TIMEOUT)
    assert (result.model_spec.name, result.model_spec.version.value) == ("default", PADDED_VERSION)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    result.metadata["signature_def"].Unpack(signatures)
    assert set(signatures.signature_def) == {DEFAULT, CLASSIFY, REGRESS}
    assert signatures.signature_def[DEFAULT].inputs["x"].dtype == types_pb2.DT_FLOAT
    assert signatures.signature_def[DEFAULT].outputs["y"].dtype == types_pb2.DT_FLOAT


@pytest.mark.parametrize("specify_output", [True, False])
def test_predict_saved_model(client, specify_output):
    result = client.prediction.Predict(predict_request(specify_output=specify_output), timeout=RPC_TIMEOUT)
    assert "y" in result.outputs and result.outputs["y"].dtype == types_pb2.DT_FLOAT
    assert list(result.outputs["y"].float_val) == [3.0]
    assert_model_spec(result.model_spec, "default", DEFAULT, PADDED_VERSION)


def test_classify(client):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "default"
    request.model_spec.signature_name = CLASSIFY
    example_input(request.input)
    result = client.prediction.Classify(request, timeout=RPC_TIMEOUT)
    assert len(result.result.classifications) == 1
    assert len(result.result.classifications[0].classes) == 1
    assert result.result.classifications[0].classes[0].score == 3.0
    assert result.result.classifications[0].classes[0].label == ""
    assert_model_spec(result.model_spec, "default", CLASSIFY, PADDED_VERSION)


def test_regress(client):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "default"
    request.model_spec.signature_name = REGRESS
    example_input(request.input)
    result = client.prediction.Regress(request, timeout=RPC_TIMEOUT)
    assert [r.value for r in result.result.regressions] == [3.0]
    assert_model_spec(result.model_spec, "default", REGRESS, PADDED_VERSION)


def test_multi_inference(client):
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in ((REGRESS, "tensorflow/serving/regress"), (CLASSIFY, "tensorflow/serving/classify")):
        task = request.tasks.add()
        task.model_spec.name = "default"
        task.model_spec.signature_name = signature
        task.method_name = method
    example_input(request.input)
    result = client.prediction.MultiInference(request, timeout=RPC_TIMEOUT)
    assert len(result.results) == 2
    assert result.results[0].regression_result.regressions[0].value == 3.0
    assert result.results[1].classification_result.classifications[0].classes[0].score == 3.0
    for task, got in zip(request.tasks, result.results):
        assert_model_spec(got.model_spec, "default", task.model_spec.signature_name, PADDED_VERSION)


def test_classify_with_context_merges_it_into_every_example(client):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "half_plus_three"
    request.model_spec.signature_name = REGRESS
    with_context = request.input.example_list_with_context
    with_context.context.features.feature["x"].float_list.value.append(4.0)
    with_context.examples.add()  # takes x from the context
    with_context.examples.add().features.feature["x"].float_list.value.append(10.0)  # its own x wins
    result = client.prediction.Regress(request, timeout=RPC_TIMEOUT)
    assert [r.value for r in result.result.regressions] == [5.0, 8.0]


def test_inference_errors_have_tf_servings_codes(client):
    empty = classification_pb2.ClassificationRequest()
    empty.model_spec.name = "default"
    empty.model_spec.signature_name = CLASSIFY
    err = rpc_error(client.prediction.Classify, empty)
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")
    wrong = regression_pb2.RegressionRequest()
    wrong.model_spec.name = "default"
    wrong.model_spec.signature_name = CLASSIFY  # has "scores", no "outputs"
    example_input(wrong.input)
    assert rpc_error(client.prediction.Regress, wrong).code() == grpc.StatusCode.INVALID_ARGUMENT
    two_models = inference_pb2.MultiInferenceRequest()
    for name in ("default", "half_plus_three"):
        task = two_models.tasks.add()
        task.model_spec.name = name
        task.model_spec.signature_name = REGRESS
        task.method_name = "tensorflow/serving/regress"
    example_input(two_models.input)
    assert rpc_error(client.prediction.MultiInference, two_models).code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = regression_pb2.RegressionRequest()
    missing.model_spec.name = "default"
    missing.model_spec.signature_name = "no_such_signature"
    example_input(missing.input)
    assert rpc_error(client.prediction.Regress, missing).code() == grpc.StatusCode.FAILED_PRECONDITION


def test_good_model_config(client):
    for name, expected in (("half_plus_two", 3.0), ("half_plus_three", 4.0)):
        for specify_output in (True, False):
            result = client.prediction.Predict(predict_request(name, specify_output), timeout=RPC_TIMEOUT)
            assert list(result.outputs["y"].float_val) == [expected]
    assert client.prediction.Predict(predict_request("half_plus_three"), timeout=RPC_TIMEOUT
                                     ).model_spec.version.value == 1  # a plain folder name


def test_readiness_probe_message_for_an_unknown_model(client):
    """TF Serving's own tests (and many readiness probes) wait for 'Servable' in this error's details."""
    err = rpc_error(client.prediction.Predict, predict_request("intentionally_missing_model"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "Servable not found for request: Latest(intentionally_missing_model)"
    err = rpc_error(client.prediction.Predict, predict_request("versions", version=7))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND,
                                           "Servable not found for request: Specific(versions, 7)")


def test_version_policy_all_specific_versions_and_labels(client):
    """testPredictWithSignatureDefAndVersionLabel: a version by number, by label, and the latest by default."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "versions"
    status = client.models.GetModelStatus(request, timeout=RPC_TIMEOUT)
    assert [(s.version, s.state) for s in status.model_version_status] == [(2, AVAILABLE), (1, AVAILABLE)]
    for kwargs, version, y in (({}, 2, 4.0), ({"version": 1}, 1, 3.0), ({"label": "stable"}, 1, 3.0),
                               ({"label": "canary"}, 2, 4.0)):
        result = client.prediction.Predict(predict_request("versions", signature=DEFAULT, **kwargs),
                                           timeout=RPC_TIMEOUT)
        assert (result.model_spec.version.value, list(result.outputs["y"].float_val)) == (version, [y])
    err = rpc_error(client.prediction.Predict, predict_request("versions", label="nope"))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                           "Unrecognized servable version label: nope")


def test_unknown_signature_is_failed_precondition(client):
    assert rpc_error(client.prediction.Predict, predict_request(signature="nope")).code() == \
        grpc.StatusCode.FAILED_PRECONDITION


def test_get_model_status_of_unknown_models_and_versions(client):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "nope"
    err = rpc_error(client.models.GetModelStatus, request)
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nope")
    request.model_spec.name = "versions"
    request.model_spec.version.value = 9
    err = rpc_error(client.models.GetModelStatus, request)
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "Could not find version 9 of model versions")


# ---------------------------------------------------------------------------
# REST (testPredictREST, testPredictColumnarREST, testClassifyREST, testRegressREST, testGetStatusREST,
# testGetModelMetadataREST, testPrometheusEndpoint).


def test_rest_predict_rows_and_columns(server):
    c = server.tcp
    assert c.rest("POST", "/v1/models/default:predict", {"instances": [2.0, 3.0, 4.0]}) == \
        (200, {"predictions": [3.0, 3.5, 4.0]})
    assert c.rest("POST", "/v1/models/default:predict", {"inputs": [2.0, 3.0, 4.0]}) == \
        (200, {"outputs": [3.0, 3.5, 4.0]})
    assert c.rest("POST", "/v1/models/default:predict", {"inputs": {"x": [2.0]}}) == (200, {"outputs": [3.0]})
    assert c.rest("POST", "/v1/models/default:predict", {"instances": [{"x": 2.0}, {"x": 4.0}]}) == \
        (200, {"predictions": [3.0, 4.0]})
    assert c.rest("POST", "/v1/models/versions/versions/1:predict", {"instances": [2.0]}) == \
        (200, {"predictions": [3.0]})
    assert c.rest("POST", "/v1/models/versions/labels/canary:predict", {"instances": [2.0]}) == \
        (200, {"predictions": [4.0]})


def test_rest_classify_and_regress(server):
    c = server.tcp
    assert c.rest("POST", "/v1/models/default:classify", {"signature_name": CLASSIFY, "examples": [{"x": 2.0}]}) == \
        (200, {"results": [[["", 3.0]]]})
    assert c.rest("POST", "/v1/models/default:regress", {"signature_name": REGRESS, "examples": [{"x": 2.0}]}) == \
        (200, {"results": [3.0]})
    body = {"signature_name": REGRESS, "context": {"x": 4.0}, "examples": [{}, {"x": [10.0]}]}
    assert c.rest("POST", "/v1/models/half_plus_three:regress", body) == (200, {"results": [5.0, 8.0]})
    assert c.rest("POST", "/v1/models/default/versions/123:regress", {"signature_name": REGRESS,
                                                                       "examples": [{"x": 0.1}]}) == \
        (200, {"results": [2.05]})  # float32 written as its shortest decimal, as TF Serving's JSON


def test_rest_get_status_and_metadata(server):
    c = server.tcp
    assert c.rest("GET", "/v1/models/default") == (200, {"model_version_status": [{
        "version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    status, body = c.rest("GET", "/v1/models/default/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "default", "signature_name": "", "version": "123"}
    assert set(body["metadata"]["signature_def"]["signature_def"]) == {DEFAULT, CLASSIFY, REGRESS}


def test_rest_errors_are_tf_servings(server):
    c = server.tcp
    assert c.rest("POST", "/v1/models/nope:predict", {"instances": [1.0]}) == \
        (404, {"error": "Servable not found for request: Latest(nope)"})
    assert c.rest("GET", "/v1/models/nope") == (404, {"error": "Could not find any versions of model nope"})
    status, body = c.rest("POST", "/v1/models/default:predict", {"signature_name": "nope", "instances": [1.0]})
    assert status == 400 and set(body) == {"error"}
    status, body = c.rest("POST", "/v1/models/default:classify", {"signature_name": CLASSIFY, "examples": []})
    assert status == 400 and set(body) == {"error"}
    status, body = c.rest("POST", "/v1/models/default:explode", {"instances": [1.0]})
    assert status == 400 and body["error"].startswith("Malformed request")


def test_prometheus_endpoint(server):
    server.tcp.prediction.Predict(predict_request(), timeout=RPC_TIMEOUT)
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=RPC_TIMEOUT)
    connection.request("GET", "/monitoring/prometheus/metrics")
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.status == 200
    assert ':tensorflow:serving:request_count{model_name="default",status="OK"}' in text


def test_the_unix_socket_serves_the_model_service_too(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "half_plus_three"
    result = server.uds.models.GetModelStatus(request, timeout=RPC_TIMEOUT)
    assert [s.version for s in result.model_version_status] == [1]
    assert os.path.exists(server.socket_path)


# ---------------------------------------------------------------------------
# Batching, a broken model, config reload.


def test_predict_batching(models):
    """testPredictBatching: --enable_batching with a batching_parameters_file."""
    server = start_server("--port=0", f"--model_base_path={models.root / 'half_plus_two'}",
                          "--enable_batching", f"--batching_parameters_file={models.batching}")
    try:
        assert server.batcher is not None and server.batcher.options.max_batch_size == 128
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for specify_output in (True, False):
                result = stub.Predict(predict_request(specify_output=specify_output), timeout=RPC_TIMEOUT)
                assert list(result.outputs["y"].float_val) == [3.0]
                assert_model_spec(result.model_spec, "default", DEFAULT, PADDED_VERSION)
        assert server.http_port is None  # --rest_api_port left at 0: no REST, as tensorflow_model_server
    finally:
        server.stop(grace=1.0)


def test_a_broken_model_stops_the_start_with_tf_servings_message(models):
    with pytest.raises(Exception, match=r"Some models did not become available: \{broken due to error"):
        start_server("--port=0", "--model_name=broken", f"--model_base_path={models.root / 'broken'}",
                     "--max_num_load_retries=1", "--load_retry_interval_micros=1000")


def test_a_broken_version_is_reported_and_never_served(models, tmp_path):
    """A broken version appearing in a running server: END with its error in GetModelStatus, the good
    version keeps serving."""
    base = tmp_path / "model"
    shutil.copytree(models.two, base / "1")
    server = start_server("--port=0", f"--model_base_path={base}", "--max_num_load_retries=0",
                          "--file_system_poll_wait_seconds=0")
    try:
        (base / "2").mkdir()
        (base / "2" / "saved_model.pb").write_bytes(b"garbage")
        server.registry.poll()
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "default"
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=RPC_TIMEOUT)
            by_version = {s.version: s for s in status.model_version_status}
            assert by_version[2].state == END and by_version[2].status.error_code != 0
            assert by_version[2].status.error_message
            assert by_version[1].state == AVAILABLE
            result = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                predict_request(), timeout=RPC_TIMEOUT)
            assert result.model_spec.version.value == 1
    finally:
        server.stop(grace=1.0)


def _reload_request(entries) -> model_management_pb2.ReloadConfigRequest:
    request = model_management_pb2.ReloadConfigRequest()
    for name, base in entries:
        config = request.config.model_config_list.config.add()
        config.name, config.base_path, config.model_platform = name, str(base), "tensorflow"
    return request


def test_model_config_reload(models):
    """HandleReloadConfigRequest: a model that left the config is unloaded, a new one is loaded before the
    answer; a bad config is refused and changes nothing."""
    server = start_server("--port=0", f"--model_config_file={models.good}", "--max_num_load_retries=0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            models_stub = model_service_pb2_grpc.ModelServiceStub(channel)
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            reply = models_stub.HandleReloadConfigRequest(_reload_request([
                ("half_plus_three", models.root / "half_plus_three"), ("renamed", models.root / "versions")]),
                timeout=RPC_TIMEOUT)
            assert reply.status.error_code == 0
            assert list(predict(predict_request("renamed"), timeout=RPC_TIMEOUT).outputs["y"].float_val) == [4.0]
            err = rpc_error(predict, predict_request("default"))
            assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND,
                                                   "Servable not found for request: Latest(default)")
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "default"
            gone = models_stub.GetModelStatus(request, timeout=RPC_TIMEOUT)
            assert [(s.version, s.state) for s in gone.model_version_status] == [(PADDED_VERSION, END)]

            duplicate = _reload_request([("a", models.root / "half_plus_two"), ("a", models.root / "versions")])
            assert rpc_error(models_stub.HandleReloadConfigRequest, duplicate).code() == \
                grpc.StatusCode.INVALID_ARGUMENT
            broken = _reload_request([("half_plus_three", models.root / "half_plus_three"),
                                      ("broken", models.root / "broken")])
            err = rpc_error(models_stub.HandleReloadConfigRequest, broken)
            assert err.code() == grpc.StatusCode.UNKNOWN
            assert err.details().startswith("Some models did not become available: {broken")
            assert list(predict(predict_request("half_plus_three"), timeout=RPC_TIMEOUT).outputs["y"].float_val) \
                == [4.0]
    finally:
        server.stop(grace=1.0)


def test_model_config_file_polling(models, tmp_path):
    """--model_config_file_poll_wait_seconds: a changed file is applied, a malformed one is ignored."""
    path = write_config(tmp_path / "models.config", [("half_plus_two", models.root / "half_plus_two", "", {})])
    server = start_server("--port=0", f"--model_config_file={path}", "--model_config_file_poll_wait_seconds=1")
    try:
        assert server.registry.model_names == ["half_plus_two"]
        write_config(tmp_path / "models.config", [("half_plus_three", models.root / "half_plus_three", "", {})])
        deadline = time.monotonic() + 60
        while not server.registry.is_available("half_plus_three") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.registry.model_names == ["half_plus_three"]
        assert server.registry.is_available("half_plus_three") and not server.registry.is_available("half_plus_two")
        (tmp_path / "models.config").write_text("improperly formatted file\n")
        assert server.config_poller.poll() is False
        assert server.registry.model_names == ["half_plus_three"]
    finally:
        server.stop(grace=1.0)


def test_reload_of_the_same_config_changes_nothing(models):
    server = start_server("--port=0", f"--model_config_file={models.good}")
    try:
        loaded = server.registry.get("default")
        server.reload_config(_parse(models.good))
        assert server.registry.get("default") is loaded
    finally:
        server.stop(grace=1.0)


def _parse(path: str) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.extend(models_config.read(path))
    return config
