"""The TF Serving API server over a real socket on 127.0.0.1, driven with tensorflow-serving-api stubs.

One server process (module-scoped) serves a copy of the demo export; the
hot-load test publishes new versions into that copy while a client loops.
"""

import json
import pathlib
import shutil
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from tests.conftest import DEMO_CONFIG
from tests.serve_process import ServeProcess
from clicklens import compat  # noqa: F401
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from clicklens import models_config, servables
from clicklens.workdir import Workdir

MAX_REQUEST_BYTES = 64 * 1024
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE


@pytest.fixture(scope="module")
def served(demo_exported, tmp_path_factory):
    """A copy of the demo export (so new versions can be published into it) with its own models.config."""
    root = tmp_path_factory.mktemp("served")
    workdir = Workdir(str(root))
    shutil.copytree(demo_exported.export, workdir.export)
    base_paths = {name: workdir.export_model(name) for name in servables.MODEL_NAMES}
    models_config.write(workdir.models_config, models_config.build(base_paths, num_versions=2))
    return workdir


@pytest.fixture(scope="module")
def server(served):
    # 15-45 s: a fresh process imports TF, loads four models and replays their warmup requests.
    server = ServeProcess(served, "serving.poll_seconds=0.3", f"serving.max_request_bytes={MAX_REQUEST_BYTES}")
    yield server
    server.stop()


def request(model, signature="serving_default", version=None, **inputs):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    for name, value in inputs.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return req


def outputs(response):
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def corpus_images(workdir, n=2):
    from clicklens import features

    files = sorted(tf.io.gfile.glob(workdir.split_glob("corpus")))
    rows = tf.data.TFRecordDataset(files, compression_type="GZIP").map(
        lambda r: tf.io.parse_single_example(r, features.corpus_feature_spec())).take(n)
    return [(r["image_id"].numpy(), r["image"].numpy()) for r in rows]


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30)
    return info.value


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["retrieval_scann", "retrieval_bruteforce"])
def test_text_query(server, small_config, model):
    response = server.predictions.Predict(request(model, query=np.array(["红色 圆形", "red circle"], object)),
                                          timeout=30)
    out = outputs(response)
    k = small_config.export.k
    assert out["image_ids"].shape == (2, k) and out["scores"].shape == (2, k)
    assert out["scores"].dtype == np.float32
    assert all(np.all(np.diff(row) <= 1e-6) for row in out["scores"]), "scores must be ranked"
    assert response.model_spec.name == model and response.model_spec.version.value >= 1
    assert response.model_spec.signature_name == "serving_default"


def assert_finds_itself(image_id, self_score, ids, scores):
    """The image is in its own top-k, unless k other images tie with it (near-duplicate demo images)."""
    assert scores[0] == pytest.approx(self_score, abs=1e-3)
    assert image_id in list(ids) or scores[-1] == pytest.approx(self_score, abs=1e-3)


def test_image_query_finds_the_image_itself(server, demo_exported):
    (image_id, image), = corpus_images(demo_exported, 1)
    images = np.array([image], object)
    embedding = outputs(server.predictions.Predict(request("image_encoder", image_bytes=images), timeout=30))
    self_score = float(embedding["embedding"][0] @ embedding["embedding"][0])  # the maximum: embeddings are unit
    for model in ("retrieval_bruteforce", "retrieval_scann"):
        out = outputs(server.predictions.Predict(request(model, "by_image", image_bytes=images), timeout=30))
        assert_finds_itself(image_id, self_score, out["image_ids"][0], out["scores"][0])


def test_encoders_and_hash_codes(server, demo_exported, small_config):
    dim = small_config.model.embedding_dim
    queries = np.array(["红色 圆形", "blue square"], object)
    emb = outputs(server.predictions.Predict(request("query_encoder", query=queries), timeout=30))["embedding"]
    assert emb.shape == (2, dim)
    codes = outputs(server.predictions.Predict(request("query_encoder", "hash_code", query=queries), timeout=30))
    assert list(codes["hash_code"]) == [np.packbits(e > 0).tobytes() for e in emb]
    images = np.array([img for _, img in corpus_images(demo_exported, 2)], object)
    emb = outputs(server.predictions.Predict(request("image_encoder", image_bytes=images), timeout=30))["embedding"]
    assert emb.shape == (2, dim)


def test_explicit_version_and_not_found(server):
    response = server.predictions.Predict(request("retrieval_bruteforce", version=1, query=np.array(["a"], object)),
                                          timeout=30)
    assert response.model_spec.version.value == 1
    err = rpc_error(server.predictions.Predict, request("retrieval_bruteforce", version=99,
                                                        query=np.array(["a"], object)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(server.predictions.Predict, request("no_such_model", query=np.array(["a"], object)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "no_such_model"
    assert rpc_error(server.models.GetModelStatus, status_request).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("bad", [
    request("retrieval_scann", text=np.array(["a"], object)),                       # wrong input name
    request("retrieval_scann", query=np.array([1, 2], np.int32)),                   # wrong dtype
    request("retrieval_scann", query=np.array([["a", "b"]], object)),               # wrong rank
    request("retrieval_scann", query=np.array(["a"], object), extra=np.array([1])),  # extra input
    request("retrieval_scann", "by_image", image_bytes=np.array([b"not an image"], object)),
    request("image_encoder", image_bytes=np.array([b""], object)),
], ids=["name", "dtype", "shape", "extra", "undecodable-image", "empty-image"])
def test_invalid_argument(server, bad):
    err = rpc_error(server.predictions.Predict, bad)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


def _png_bomb(side: int) -> bytes:
    """A PNG of a few KB declaring side x side pixels (gigabytes once decoded)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_decompression_bombs_are_refused_before_decoding(server):
    import base64

    bomb = _png_bomb(20_000)  # 47 KB, 400 M pixels: 28 s and 7.9 GB when it was decoded
    assert len(bomb) < MAX_REQUEST_BYTES
    for model, signature in (("retrieval_scann", "by_image"), ("image_encoder", "serving_default")):
        err = rpc_error(server.predictions.Predict, request(model, signature, image_bytes=np.array([bomb], object)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "too large" in err.details(), err.details()
    status, body = _http(server, "/v1/models/retrieval_scann:predict", {
        "signature_name": "by_image", "instances": [{"image_bytes": {"b64": base64.b64encode(bomb).decode()}}]})
    assert status == 400 and "too large" in body["error"]
    server.predictions.Predict(request("retrieval_scann", query=np.array(["still serving"], object)), timeout=30)


def test_declared_shapes_larger_than_the_values_are_refused(server):
    hostile = request("retrieval_scann", query=np.array(["a"], object))
    hostile.inputs["query"].tensor_shape.dim[0].size = 2 ** 28  # 52 bytes declaring 2^28 strings
    err = rpc_error(server.predictions.Predict, hostile)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "declares more than 1 values" in err.details()


def test_unknown_signature_is_failed_precondition(server):
    err = rpc_error(server.predictions.Predict, request("retrieval_scann", "nope", query=np.array(["a"], object)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_oversized_request_is_invalid_argument(server):
    big = np.array(["x" * (MAX_REQUEST_BYTES + 1)], object)
    err = rpc_error(server.predictions.Predict, request("retrieval_scann", query=big))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_request_bytes" in err.details()
    # ... and the server still serves.
    server.predictions.Predict(request("retrieval_scann", query=np.array(["ok"], object)), timeout=30)


def test_model_metadata_and_status(server):
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "retrieval_scann"
    response = server.predictions.GetModelMetadata(req, timeout=30)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    assert set(signature_map.signature_def) == {"serving_default", "by_image"}
    assert set(signature_map.signature_def["by_image"].inputs) == {"image_bytes"}
    bad = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["nope"])
    bad.model_spec.name = "retrieval_scann"
    assert rpc_error(server.predictions.GetModelMetadata, bad).code() == grpc.StatusCode.INVALID_ARGUMENT
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "retrieval_bruteforce"
    status = server.models.GetModelStatus(status_request, timeout=30)
    assert [(s.version, s.state) for s in status.model_version_status] == [(1, AVAILABLE)]


def _http(server, path, body=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_rest_api(server, demo_exported, small_config):
    import base64

    status, body = _http(server, "/v1/models/retrieval_bruteforce:predict", {"instances": ["红色 圆形", "red"]})
    assert status == 200 and len(body["predictions"]) == 2
    assert len(body["predictions"][0]["image_ids"]) == small_config.export.k
    (image_id, image), = corpus_images(demo_exported, 1)
    status, body = _http(server, "/v1/models/retrieval_scann/versions/1:predict", {
        "signature_name": "by_image", "inputs": {"image_bytes": [{"b64": base64.b64encode(image).decode()}]}})
    assert status == 200
    _, rest_self = _http(server, "/v1/models/image_encoder:predict", {
        "instances": [{"image_bytes": {"b64": base64.b64encode(image).decode()}}]})
    self_score = float(np.dot(rest_self["predictions"][0], rest_self["predictions"][0]))
    assert_finds_itself(image_id.decode(), self_score, body["outputs"]["image_ids"][0], body["outputs"]["scores"][0])
    status, body = _http(server, "/v1/models/retrieval_bruteforce")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    status, body = _http(server, "/v1/models/retrieval_scann/metadata")
    assert status == 200 and "by_image" in body["metadata"]["signature_def"]["signature_def"]
    assert _http(server, "/v1/models/nope:predict", {"instances": ["a"]})[0] == 404
    assert _http(server, "/v1/models/retrieval_scann/versions/99")[0] == 404
    assert _http(server, "/v1/models/retrieval_scann:predict", {"instances": [1, 2]})[0] == 400
    assert _http(server, "/v1/models/retrieval_scann:predict", b"not json")[0] == 400
    assert _http(server, "/v1/models/retrieval_scann:predict", {"instances": ["x" * MAX_REQUEST_BYTES]})[0] == 400


def test_query_cli(server, demo_exported, tmp_path, capsys, small_config):
    from clicklens import cli

    address = f"127.0.0.1:{server.grpc_port}"
    assert cli.main(["query", "红色 圆形", "--server", address, "--config", DEMO_CONFIG]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("retrieval_scann v") and len(lines) == 1 + small_config.export.k
    (image_id, image), = corpus_images(demo_exported, 1)
    path = tmp_path / "q.png"
    path.write_bytes(image)
    assert cli.main(["query", "--image", str(path), "--server", address, "--model", "retrieval_bruteforce",
                     "--config", DEMO_CONFIG]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("retrieval_bruteforce v") and len(lines) == 1 + small_config.export.k
    assert lines[1].split()[0] == "1" and float(lines[1].split()[2]) == pytest.approx(1.0, abs=1e-3)  # itself
    assert cli.main(["query", "x", "--server", address, "--model", "nope", "--config", DEMO_CONFIG]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def _publish(base: pathlib.Path, source: int, version: int) -> None:
    """Publishes a copy of a version the way export does: write under a temporary name, then rename."""
    tmp = base / f".tmp-{version}"
    shutil.copytree(base / str(source), tmp)
    tmp.rename(base / str(version))


def test_hot_load_while_a_client_loops(server, served):
    """New versions appear while a client loops on Predict: zero failed requests; old versions retire."""
    failures, versions_seen, stop = [], set(), threading.Event()
    req = request("retrieval_bruteforce", query=np.array(["红色 圆形"], object))

    def loop():
        while not stop.is_set():
            try:
                versions_seen.add(server.predictions.Predict(req, timeout=30).model_spec.version.value)
            except grpc.RpcError as err:
                failures.append(err)

    clients = [threading.Thread(target=loop) for _ in range(2)]
    for t in clients:
        t.start()
    base = pathlib.Path(served.export_model("retrieval_bruteforce"))
    try:
        for version in (2, 3):
            _publish(base, 1, version)
            deadline = time.time() + 90
            while version not in versions_seen:
                assert time.time() < deadline, f"version {version} never served; log:\n{''.join(server.log[-20:])}"
                time.sleep(0.1)
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert not failures, [f.details() for f in failures[:3]]
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "retrieval_bruteforce"
    states = {s.version: s.state for s in server.models.GetModelStatus(status_request, timeout=30).model_version_status}
    assert states[3] == AVAILABLE and states[2] == AVAILABLE and states[1] != AVAILABLE  # latest 2 kept
    err = rpc_error(server.predictions.Predict, request("retrieval_bruteforce", version=1,
                                                        query=np.array(["a"], object)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_graceful_shutdown_on_sigterm(server):
    assert server.stop() == 0
    assert any("server stopped" in line for line in server.log)
