"""tensorflow_model_server's command line: clicklens-model-server and `clicklens serve` take the same flags.

Flag parsing runs in-process; the console script itself is started as a
process, from a folder that is not the repository (it needs no config there),
for what only a process shows: its exit codes, its stderr, SIGTERM.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest

from clicklens.config import DEFAULT_CONFIG, PACKAGED_DEFAULT_CONFIG, ServingConfig, load_config
from serving import model_server_flags
from serving.model_server_flags import FlagError, channel_arguments, parse_flags, settings
from tests.test_tf_serving_conformance import RPC_TIMEOUT, build_models, pick_unused_port, predict_request

REPO = pathlib.Path(__file__).resolve().parent.parent
START_SECONDS = 180  # upper bound for a process to import TensorFlow and load a tiny model on a busy machine


def test_flags_are_read_as_tensorflow_model_server_reads_them():
    given = parse_flags(["--port=9000", "--rest_api_port", "9001", "--enable_batching", "-model_name=m",
                         "--enable_model_warmup=false", "--model_base_path=/models/m"])
    assert given == {"port": 9000, "rest_api_port": 9001, "enable_batching": True, "model_name": "m",
                     "enable_model_warmup": False, "model_base_path": "/models/m"}
    assert model_server_flags.value(given, "max_num_load_retries") == 5  # TF Serving's default


def test_settings_follow_tensorflow_model_servers_defaults(tmp_path):
    found = settings([f"--model_base_path={tmp_path}", "--port=9000"], ServingConfig())
    assert found.serving.grpc_port == 9000
    assert not found.options.rest_enabled  # --rest_api_port defaults to 0: no REST
    assert [(m.name, m.base_path) for m in found.models] == [("default", str(tmp_path))]
    assert found.options.max_load_attempts == 6 and found.options.load_retry_seconds == 60.0
    assert found.options.enable_model_warmup and found.options.fail_when_models_fail_to_load
    assert found.serving.poll_seconds == 1.0 and found.serving.http_timeout_seconds == 30.0
    assert not found.serving.batching.enabled


def test_clicklens_serve_changes_only_what_the_flags_say(tmp_path):
    base = ServingConfig(grpc_port=1234, http_port=5678, poll_seconds=7.0)
    found = settings([], base, standalone=False)
    assert found.models is None and found.serving == base and found.options.rest_enabled
    assert found.options.load_retry_seconds is None  # clicklens serve's one attempt per poll
    found = settings(["--port=9000", "--enable_batching", f"--model_base_path={tmp_path}", "--model_name=m"],
                     base, standalone=False)
    assert (found.serving.grpc_port, found.serving.http_port, found.serving.poll_seconds) == (9000, 5678, 7.0)
    assert found.serving.batching.enabled and [m.name for m in found.models] == ["m"]
    assert not settings(["--rest_api_port=0"], base, standalone=False).options.rest_enabled


def test_batching_monitoring_and_grpc_flags(tmp_path):
    found = settings([f"--model_base_path={tmp_path}", "--enable_batching", "--batching_parameters_file=/b.txt",
                      "--monitoring_config_file=/m.txt", "--grpc_socket_path=/tmp/s.sock", "--grpc_max_threads=16",
                      "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb",
                      "--max_num_load_retries=0", "--load_retry_interval_micros=1000",
                      "--file_system_poll_wait_seconds=0", "--rest_api_timeout_in_ms=5000", "--num_load_threads=2"],
                     ServingConfig())
    s, o = found.serving, found.options
    assert s.batching.enabled and s.batching.batching_parameters_file == "/b.txt"
    assert s.monitoring.monitoring_config_file == "/m.txt" and s.workers == 16
    assert o.grpc_socket_path == "/tmp/s.sock"
    assert o.grpc_channel_arguments == (("grpc.max_connection_age_ms", 2000), ("grpc.lb_policy_name", "grpclb"))
    assert (o.max_load_attempts, o.load_retry_seconds) == (1, 0.001)
    assert s.poll_seconds == 0.0 and s.http_timeout_seconds == 5.0 and s.num_load_threads == 2
    # As tensorflow_model_server: the batching file only counts with --enable_batching.
    assert not settings([f"--model_base_path={tmp_path}", "--batching_parameters_file=/b.txt"],
                        ServingConfig()).serving.batching.batching_parameters_file


@pytest.mark.parametrize("argv, reason", [
    (["--ssl_config_file=/ssl.txt"], "TLS"),
    (["--use_tflite_model"], "TensorFlow Lite"),
    (["--enable_profiler"], "profiler"),
    (["--per_process_gpu_memory_fraction=0.5"], "GPU"),
    (["--platform_config_file=/p.txt"], "platform"),
    (["--no_such_flag=1"], "not a tensorflow_model_server flag"),
    (["positional"], "not a flag"),
    (["--saved_model_tags=serve,gpu", "--model_base_path=/m"], "serve"),
])
def test_unsupported_flags_are_refused_with_the_supported_list(argv, reason):
    with pytest.raises(FlagError) as err:
        settings(argv, ServingConfig())
    message = str(err.value)
    assert reason in message
    assert "supported tensorflow_model_server flags:" in message
    for flag in ("--port", "--rest_api_port", "--model_config_file", "--grpc_socket_path"):
        assert flag in message


@pytest.mark.parametrize("argv, message", [
    (["--port=x"], "expects an integer"),
    (["--port=70000", "--model_base_path=/m"], "port number"),
    (["--enable_batching=maybe"], "true or false"),
    (["--model_name"], "needs a value"),
    ([], "Both server_options.model_base_path and server_options.model_config_file are empty!"),
])
def test_malformed_command_lines_are_refused(argv, message):
    with pytest.raises(FlagError, match=message):
        settings(argv, ServingConfig())


def test_channel_arguments():
    assert channel_arguments("") == ()
    assert channel_arguments("a=1, b=x") == (("a", 1), ("b", "x"))
    with pytest.raises(FlagError):
        channel_arguments("novalue")


def test_the_default_config_is_found_from_any_directory(tmp_path, monkeypatch):
    """An installed clicklens finds its default config outside the repository (the packaged copy)."""
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists(DEFAULT_CONFIG) and os.path.exists(PACKAGED_DEFAULT_CONFIG)
    assert load_config() == load_config(str(REPO / DEFAULT_CONFIG))


def test_setup_declares_the_console_script_and_packages_the_default_config():
    text = (REPO / "setup.py").read_text()
    assert '"clicklens-model-server=serving.model_server_main:main"' in text
    assert '"clicklens": ["default_config.yaml"]' in text


# ---------------------------------------------------------------------------
# The console script as a process, started outside the repository.


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("flags"))


def _command(*flags):
    return [sys.executable, "-m", "serving.model_server_main", *flags]


def _run(tmp_path, *flags, timeout=START_SECONDS):
    return subprocess.run(_command(*flags), cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_refused_flag_exits_2_before_loading_anything(tmp_path):
    done = _run(tmp_path, "--port=0", "--ssl_config_file=/x", timeout=60)
    assert done.returncode == 2
    assert "--ssl_config_file: TLS" in done.stderr and "--rest_api_port" in done.stderr


def test_bad_model_config_file(tmp_path, models):
    """testBadModelConfig: the server does not start and says "Invalid protobuf file: '<path>'"."""
    done = _run(tmp_path, "--port=0", f"--model_config_file={models.bad}")
    assert done.returncode == 1
    assert f"Invalid protobuf file: '{models.bad}'" in done.stderr


def _wait_until_ready(port: int, process: subprocess.Popen) -> None:
    """TF Serving's WaitForServerReady: a Predict for a missing model answers 'Servable ...' once serving."""
    deadline = time.monotonic() + START_SECONDS
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()
            try:
                stub.Predict(predict_request("intentionally_missing_model"), timeout=2)
            except grpc.RpcError as err:
                if "Servable" in (err.details() or ""):
                    return
            time.sleep(0.5)
    raise AssertionError("the server did not become ready")


def test_the_console_script_serves_from_any_directory_and_stops_on_sigterm(tmp_path, models):
    import http.client
    import json

    grpc_port, rest_port = pick_unused_port(), pick_unused_port()
    base_path = models.root / "half_plus_two"
    process = subprocess.Popen(_command(f"--port={grpc_port}", f"--rest_api_port={rest_port}",
                                        "--model_name=half_plus_two", f"--model_base_path={base_path}"),
                               cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _wait_until_ready(grpc_port, process)
        connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=RPC_TIMEOUT)
        connection.request("POST", "/v1/models/half_plus_two:predict", body=json.dumps({"instances": [2.0]}))
        assert json.loads(connection.getresponse().read()) == {"predictions": [3.0]}
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "server stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_model_that_cannot_load_stops_the_start(tmp_path, models):
    done = _run(tmp_path, "--port=0", "--model_name=broken", f"--model_base_path={models.root / 'broken'}",
                "--max_num_load_retries=0")
    assert done.returncode == 1
    assert "Failed to start server. Error: Some models did not become available: {broken" in done.stderr


def test_clicklens_serve_takes_the_same_flags_from_any_directory(tmp_path, models):
    grpc_port = pick_unused_port()
    process = subprocess.Popen([sys.executable, "-m", "clicklens", "serve", "--workdir", str(tmp_path / "w"),
                                f"--port={grpc_port}", "--rest_api_port=0", "--model_name=half_plus_two",
                                f"--model_base_path={models.root / 'half_plus_two'}"],
                               cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _wait_until_ready(grpc_port, process)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            result = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                predict_request("half_plus_two"), timeout=RPC_TIMEOUT)
            assert list(result.outputs["y"].float_val) == [3.0]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
