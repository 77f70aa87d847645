"""The REST front end under hostile but fair use: many clients, SIGTERM, slow or lying clients, malformed input.

Each test drives a real ModelServer (serving/server.py) over a real socket on
127.0.0.1 (free ports), serving a tiny hand-built SavedModel the way
tests/test_serving_production.py does.  Drain tests hold model calls at the
runner (`Gate`) so which requests are in flight when stop() starts never
depends on timing; the SIGTERM test runs `clicklens serve` in a subprocess on
a model whose call sleeps.
"""

import contextlib
import http.client
import json
import logging
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from clicklens import compat  # noqa: F401  (before TensorFlow)
import tensorflow as tf
from tensorflow.python.data.experimental.ops import testing as tf_data_testing
from tensorflow_serving.apis import prediction_service_pb2_grpc

from clicklens import servables
from clicklens.config import ConfigError, ServingConfig, config_from_dict
from clicklens.workdir import Workdir
from tests.conftest import DEMO_CONFIG, REPO
from tests.test_serving_production import (MODEL, WAIT_SECONDS, _export, _serving_config, _start,
                                           _text_request)
from tests.test_serving_unit import _top_two, expected_top_two

MATRIX_SIGNATURE = "matrix"  # x [batch, n] float32 -> row sums: for inputs of the wrong type
SLEEP_SIGNATURE = "sleep"  # micros [batch] int64 -> sleeps max(micros) microseconds: a slow call in a subprocess
PREDICT = f"/v1/models/{MODEL}:predict"
READY_LINE = re.compile(r"gRPC on [\d.]+:(\d+), REST on http://[\d.]+:(\d+)")


def _sleep(micros):
    # A tf.data op: it survives saving, runs in another process and holds no GIL while it sleeps.
    sleep = tf_data_testing.sleep(tf.reduce_max(micros))
    return {"micros": tf.data.Dataset.from_tensors(micros).apply(sleep).get_single_element()}


def _save_model(path: str) -> None:
    tf.saved_model.save(tf.Module(), path, signatures={
        servables.TEXT_SIGNATURE: tf.function(_top_two).get_concrete_function(
            tf.TensorSpec([None], tf.string, name=servables.QUERY)),
        MATRIX_SIGNATURE: tf.function(lambda x: {"row_sum": tf.reduce_sum(x, axis=1)}).get_concrete_function(
            tf.TensorSpec([None, None], tf.float32, name="x")),
        SLEEP_SIGNATURE: tf.function(_sleep).get_concrete_function(tf.TensorSpec([None], tf.int64, name="micros")),
    })


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("rest_front_end") / "saved"
    _save_model(str(path))
    return types.SimpleNamespace(path=path)


@contextlib.contextmanager
def _server(saved, root, **changes):
    """A started ModelServer on free ports serving version 1 of the tiny model; stopped on exit."""
    server = _start(_serving_config(**changes), _export(saved, root, versions=(1,)))
    try:
        yield server
    finally:
        server.stop(grace=1.0)


@pytest.fixture(scope="module")
def server(saved, tmp_path_factory):
    """Default REST settings."""
    with _server(saved, tmp_path_factory.mktemp("default")) as server:
        yield server


def _body(values=("abc",)) -> bytes:
    return json.dumps({"instances": list(values)}).encode()


def _request(port: int, method: str, path: str, body=None, headers=None):
    """One request on its own connection: (status, headers, body bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_SECONDS)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def _exchange(port: int, data: bytes, timeout: float = WAIT_SECONDS, method: str = "POST"):
    """Raw bytes sent on a new connection (the write side left open): the server's (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return response.status, response.headers, response.read()


def _error(body: bytes) -> str:
    payload = json.loads(body)
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"]
    return payload["error"]


def _eventually(predicate, timeout: float = WAIT_SECONDS, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _closed_by_server(sock: socket.socket, timeout: float = WAIT_SECONDS) -> bool:
    """True once the server has closed `sock` (EOF or reset), False if it stays open for `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _assert_still_serving(port: int) -> None:
    status, _, body = _request(port, "POST", PREDICT, _body(["abcd"]))
    assert status == 200 and json.loads(body)["predictions"][0][servables.SCORES] == expected_top_two(b"abcd")[1]


# ---------------------------------------------------------------------------
# Config


def test_rest_limits_are_config_keys_with_bounds():
    serving = ServingConfig()
    assert (serving.http_backlog, serving.http_max_connections) == (1024, 1000)
    assert (serving.http_timeout_seconds, serving.http_idle_timeout_seconds) == (30.0, 75.0)
    for key, value in (("http_backlog", 0), ("http_max_connections", 0), ("http_timeout_seconds", 0),
                       ("http_idle_timeout_seconds", -1)):
        with pytest.raises(ConfigError, match=f"serving.{key}"):
            config_from_dict({"serving": {key: value}})


# ---------------------------------------------------------------------------
# 1. Backlog: many clients connecting at once are all answered.


def test_200_simultaneous_clients_are_all_answered(server):
    clients = 200
    start_together = threading.Barrier(clients)

    def client(i: int):
        query = "q" * (i % 9 + 1)
        start_together.wait(WAIT_SECONDS)
        started = time.perf_counter()
        try:
            status, _, body = _request(server.http_port, "POST", PREDICT, _body([query]))
        except OSError as err:  # reset, refused, timed out
            return f"client {i}: {err!r}", None
        if status != 200 or json.loads(body)["predictions"][0][servables.SCORES] != \
                expected_top_two(query.encode())[1]:
            return f"client {i}: HTTP {status} {body[:200]!r}", None
        return None, time.perf_counter() - started

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    assert [error for error, _ in results if error] == []
    latencies = sorted(seconds for _, seconds in results)
    logging.getLogger(__name__).info("%d simultaneous REST clients: p50 %.0f ms, p99 %.0f ms", clients,
                                     1000 * latencies[clients // 2], 1000 * latencies[int(clients * 0.99) - 1])


# ---------------------------------------------------------------------------
# 2. Graceful drain on stop() and on SIGTERM.


class Gate:
    """Holds every model call (gRPC and REST) at the server's runner until opened; counts the calls held."""

    def __init__(self, runner):
        self.open = threading.Event()
        self._held = 0
        self._changed = threading.Condition()
        run = runner.run

        def held_run(loaded, call):
            with self._changed:
                self._held += 1
                self._changed.notify_all()
            self.open.wait(WAIT_SECONDS)
            return run(loaded, call)

        runner.run = held_run

    def wait_for(self, calls: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self._held >= calls, WAIT_SECONDS), f"{self._held} of {calls}"


def _predict_in_thread(port: int, query: str, results: list) -> threading.Thread:
    def call():
        try:
            status, headers, body = _request(port, "POST", PREDICT, _body([query]))
            results.append((query, status, headers.get("Connection"), json.loads(body)))
        except Exception as err:  # noqa: BLE001  (recorded for the assertion)
            results.append((query, err))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_stop_answers_every_rest_request_in_flight_and_drains_grpc_at_the_same_time(saved, tmp_path):
    server = _start(_serving_config(), _export(saved, tmp_path, versions=(1,)))
    port = server.http_port
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_SECONDS)
    stopper = None
    gate = Gate(server.runner)
    try:
        idle.request("GET", "/ready")  # a keep-alive connection, idle when the drain starts
        assert idle.getresponse().read()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        by_grpc = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict.future(
            _text_request([b"grpc"]), timeout=WAIT_SECONDS)
        results = []
        queries = [f"in-flight-{i}" for i in range(16)]
        threads = [_predict_in_thread(port, query, results) for query in queries]
        gate.wait_for(len(queries) + 1)  # every request is running its model call

        stopper = threading.Thread(target=server.stop, kwargs={"grace": WAIT_SECONDS})
        stopper.start()
        # REST stops taking connections while the gRPC call is still held: the two drain at the same time.
        assert _eventually(lambda: _refuses_connections(port))
        assert not by_grpc.done()
        assert _closed_by_server(idle.sock), "the idle keep-alive connection was left open"
        assert stopper.is_alive() and not results  # stop() waits for the requests in flight

        gate.open.set()
        stopper.join(WAIT_SECONDS)
        assert not stopper.is_alive()
        for thread in threads:
            thread.join(WAIT_SECONDS)
        assert sorted(results) == sorted(
            (query, 200, "close", {"predictions": [{servables.IMAGE_IDS: [id.decode() for id in ids],
                                                    servables.SCORES: scores}]})
            for query in queries for ids, scores in [expected_top_two(query.encode())])
        assert tf.make_ndarray(by_grpc.result().outputs[servables.SCORES]).tolist() == [expected_top_two(b"grpc")[1]]
        channel.close()
    finally:
        gate.open.set()
        idle.close()
        if stopper is None:
            server.stop(grace=1.0)


def test_requests_still_running_when_the_grace_ends_are_cut_off_and_counted(saved, tmp_path, caplog):
    server = _start(_serving_config(), _export(saved, tmp_path, versions=(1,)))
    gate = Gate(server.runner)
    results = []
    try:
        threads = [_predict_in_thread(server.http_port, f"late-{i}", results) for i in range(3)]
        gate.wait_for(3)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="serving.rest"):
            server.stop(grace=0.5)
        assert time.monotonic() - started < 5
        assert "3 REST requests were still running" in caplog.text
    finally:
        gate.open.set()
    for thread in threads:
        thread.join(WAIT_SECONDS)
    assert len(results) == 3 and all(len(result) == 2 for result in results)  # each got an error, not an answer


def test_sigterm_drains_rest_requests_in_flight_in_a_served_workdir(saved, tmp_path):
    """`clicklens serve` in a subprocess: SIGTERM while four slow REST calls run; all are answered, exit 0."""
    workdir = Workdir(str(tmp_path / "work"))
    _export(saved, tmp_path / "work" / "export", versions=(1,))
    process = subprocess.Popen(
        [sys.executable, "-m", "clicklens", "serve", "--config", DEMO_CONFIG, "--workdir", workdir.root,
         "--set", "serving.grpc_port=0", "--set", "serving.http_port=0"],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    log = []
    try:
        match = None
        while match is None:
            line = process.stderr.readline()
            assert line, "server exited before it was ready:\n" + "".join(log[-40:])
            log.append(line)
            match = READY_LINE.search(line)
        port = int(match[2])
        reader = threading.Thread(target=lambda: log.extend(process.stderr), daemon=True)
        reader.start()
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_SECONDS) for _ in range(4)]
        for connection in connections:
            connection.connect()  # connected before SIGTERM: each request is in flight
        results = []

        def slow_call(connection):
            body = json.dumps({"signature_name": SLEEP_SIGNATURE, "instances": [2_000_000]})
            connection.request("POST", PREDICT, body=body)
            response = connection.getresponse()
            results.append((response.status, response.getheader("Connection"), json.loads(response.read())))

        threads = [threading.Thread(target=slow_call, args=(c,), daemon=True) for c in connections]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # the requests arrive; their 2 s calls are running
        process.send_signal(signal.SIGTERM)
        assert _eventually(lambda: _refuses_connections(port) or len(results) == 4)
        assert len(results) < 4, "the calls ended before the drain could be seen"
        for thread in threads:
            thread.join(WAIT_SECONDS)
        assert results == [(200, "close", {"predictions": [2_000_000]})] * 4
        assert process.wait(WAIT_SECONDS) == 0
        reader.join(WAIT_SECONDS)
        text = "".join(log)
        assert "server stopped" in text and "still running" not in text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------
# 3. Timeouts: a body that never arrives, a silent connection.


@pytest.fixture(scope="module")
def impatient(saved, tmp_path_factory):
    """Half-second read and idle timeouts."""
    with _server(saved, tmp_path_factory.mktemp("impatient"), http_timeout_seconds=0.5,
                 http_idle_timeout_seconds=0.5) as server:
        yield server


def test_a_body_shorter_than_its_content_length_gets_408_and_the_connection_closes(impatient):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", impatient.http_port), timeout=WAIT_SECONDS) as sock:
        sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode() + b'{"inst')
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        assert response.status == 408 and "0.5" in _error(response.read())
        assert _closed_by_server(sock)
    assert time.monotonic() - started < 5
    _assert_still_serving(impatient.http_port)


def test_a_body_dribbled_slower_than_the_timeout_allows_gets_408(impatient):
    body = _body(["x" * 40])
    with socket.create_connection(("127.0.0.1", impatient.http_port), timeout=WAIT_SECONDS) as sock:
        sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        try:
            for byte in body:  # every byte well within the timeout, the whole body not
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        assert response.status == 408


def test_silent_and_idle_connections_are_closed(impatient):
    with socket.create_connection(("127.0.0.1", impatient.http_port)) as silent:
        assert _closed_by_server(silent, timeout=5)  # connected, never sent anything
    with socket.create_connection(("127.0.0.1", impatient.http_port)) as unfinished:
        unfinished.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        assert _closed_by_server(unfinished, timeout=5)
    connection = http.client.HTTPConnection("127.0.0.1", impatient.http_port, timeout=WAIT_SECONDS)
    try:
        connection.request("GET", "/ready")
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Connection") is None  # kept alive...
        response.read()
        assert _closed_by_server(connection.sock, timeout=5)  # ...until idle for 0.5 s
    finally:
        connection.close()


# ---------------------------------------------------------------------------
# 4. Content-Length and Transfer-Encoding.

_HEAD = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("headers, status", [
    ("Content-Length: -1\r\n", 400),
    ("Content-Length: abc\r\n", 400),
    ("Content-Length: +21\r\n", 400),
    ("Content-Length: 0x15\r\n", 400),
    ("Content-Length: 21\r\nContent-Length: 22\r\n", 400),
    ("Content-Length: " + "9" * 5000 + "\r\n", 400),
    (f"Content-Length: {4 * 1024 * 1024 + 1}\r\n", 400),  # beyond serving.max_request_bytes
    ("", 411),
    ("Transfer-Encoding: chunked\r\n", 411),
    ("Transfer-Encoding: chunked\r\nContent-Length: 21\r\n", 411),
], ids=["negative", "not a number", "signed", "hex", "two values", "5000 digits", "over the limit", "missing",
        "chunked", "chunked and length"])
def test_bad_content_length_is_a_clear_error_without_reading_the_body(server, headers, status):
    # The body is sent but the write side stays open: a server reading to EOF, or waiting for
    # more bytes than were sent, would never answer.
    reply_status, reply_headers, body = _exchange(server.http_port, (_HEAD + headers + "\r\n").encode() + _body(),
                                                  timeout=10)
    assert reply_status == status
    assert reply_headers["Connection"] == "close"
    assert re.search("Content-Length|Transfer-Encoding|max_request_bytes", _error(body))
    _assert_still_serving(server.http_port)


def test_a_body_over_the_limit_is_refused_and_the_answer_reaches_a_client_still_sending_it(server):
    # http.client sends the whole 16 MB before it reads: the server answers after the headers, then discards
    # the rest instead of resetting the connection (which could lose the answer).
    status, headers, body = _request(server.http_port, "POST", PREDICT, b"x" * (16 << 20))
    assert status == 400 and headers["Connection"] == "close" and "max_request_bytes" in _error(body)
    # curl asks first (Expect: 100-continue): refused before the body is sent.
    status, _, body = _exchange(server.http_port, (_HEAD + f"Content-Length: {16 << 20}\r\n"
                                                   "Expect: 100-continue\r\n\r\n").encode(), timeout=10)
    assert status == 400 and "max_request_bytes" in _error(body)
    _assert_still_serving(server.http_port)


def test_a_refused_body_that_starts_only_after_the_answer_is_still_read_and_dropped(server):
    # A client descheduled between its headers and its body (a busy machine): when the server answers, none of
    # the body has arrived.  Closing then would reset the connection under the client's body; the server reads
    # and drops it instead, until the client is done.
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=WAIT_SECONDS) as sock:
        sock.sendall((_HEAD + f"Content-Length: {16 << 20}\r\n\r\n").encode())
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        assert response.status == 400 and "max_request_bytes" in _error(response.read())
        time.sleep(0.3)
        sock.sendall(b"x" * (16 << 20))  # BrokenPipeError / ConnectionResetError had the server closed
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # the server closes once the body has ended
    _assert_still_serving(server.http_port)


def test_a_body_within_the_limit_is_read_exactly(server):
    body = _body(["exact"])
    status, _, reply = _exchange(server.http_port, (_HEAD + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    assert status == 200 and json.loads(reply)["predictions"][0][servables.SCORES] == expected_top_two(b"exact")[1]


# ---------------------------------------------------------------------------
# 5. Malformed requests are 400 (404 for unknown models and versions), never 500.

_DEEP = 100_000
_MALFORMED = {
    "json nested 100k deep": ("POST", PREDICT, b'{"instances": ' + b"[" * _DEEP + b"]" * _DEEP + b"}", 400),
    "json nested 990 deep": ("POST", PREDICT, b'{"instances": ' + b"[" * 990 + b'"a"' + b"]" * 990 + b"}", 400),
    "signature_name a list": ("POST", PREDICT, b'{"signature_name": ["a"], "instances": ["a"]}', 400),
    "signature_name a number": ("POST", PREDICT, b'{"signature_name": 7, "instances": ["a"]}', 400),
    "signature_name an object": ("POST", PREDICT, b'{"signature_name": {}, "instances": ["a"]}', 400),
    "signature_name unknown": ("POST", PREDICT, b'{"signature_name": "nope", "instances": ["a"]}', 400),
    "signature_name a lone surrogate": ("POST", PREDICT, b'{"signature_name": "\\udcff", "instances": ["a"]}', 400),
    "5000-digit version": ("POST", f"/v1/models/{MODEL}/versions/{'9' * 5000}:predict", _body(), 400),
    "version beyond int64": ("POST", f"/v1/models/{MODEL}/versions/{2 ** 63}:predict", _body(), 400),
    "5000-digit version status": ("GET", f"/v1/models/{MODEL}/versions/{'1' * 5000}", None, 400),
    "5000-digit version metadata": ("GET", f"/v1/models/{MODEL}/versions/{'1' * 5000}/metadata", None, 400),
    "unknown version": ("POST", f"/v1/models/{MODEL}/versions/99:predict", _body(), 404),
    "unknown model": ("POST", "/v1/models/nope:predict", _body(), 404),
    "unknown model status": ("GET", "/v1/models/nope", None, 404),
    "latin-1 body": ("POST", PREDICT, '{"instances": ["caf\xe9"]}'.encode("latin-1"), 400),
    "utf-16 body": ("POST", PREDICT, _body().decode().encode("utf-16"), 400),
    "lone surrogate in a string input": ("POST", PREDICT, b'{"instances": ["\\ud800"]}', 400),
    "empty body": ("POST", PREDICT, b"", 400),
    "body a list": ("POST", PREDICT, b'["a"]', 400),
    "body null": ("POST", PREDICT, b"null", 400),
    "instances a number": ("POST", PREDICT, b'{"instances": 5}', 400),
    "instances empty": ("POST", PREDICT, b'{"instances": []}', 400),
    "instances mixed types": ("POST", PREDICT, b'{"instances": [1, "a"]}', 400),
    "instances object then number": ("POST", PREDICT, b'{"instances": [{"query": "a"}, 5]}', 400),
    "instance value an object": ("POST", PREDICT, b'{"instances": [{"query": {"x": 1}}]}', 400),
    "b64 not a string": ("POST", PREDICT, b'{"instances": [{"b64": 5}]}', 400),
    "null instance": ("POST", PREDICT, b'{"instances": [null]}', 400),
    "nested instance": ("POST", PREDICT, b'{"instances": [["a", ["b"]]]}', 400),
    "float input a string": ("POST", PREDICT, b'{"signature_name": "matrix", "instances": [[1, "a"]]}', 400),
    "float input null": ("POST", PREDICT, b'{"signature_name": "matrix", "instances": [[null]]}', 400),
    "float input a huge integer": ("POST", PREDICT,
                                   b'{"signature_name": "matrix", "instances": [[1' + b"0" * 400 + b"]]}", 400),
    "a 5000-digit number": ("POST", PREDICT, b'{"signature_name": "matrix", "instances": [[' + b"7" * 5000 + b"]]}",
                            400),
    "float input ragged": ("POST", PREDICT, b'{"signature_name": "matrix", "instances": [[1, [2]]]}', 400),
    "inputs and instances": ("POST", PREDICT, b'{"inputs": ["a"], "instances": ["a"]}', 400),
    "inputs an object of the wrong name": ("POST", PREDICT, b'{"inputs": {"nope": ["a"]}}', 400),
}


@pytest.mark.parametrize("method, path, body, status", list(_MALFORMED.values()), ids=list(_MALFORMED))
def test_malformed_requests_get_tf_servings_4xx_and_the_server_keeps_serving(server, method, path, body, status):
    reply_status, _, reply = _request(server.http_port, method, path, body)
    assert reply_status == status, reply[:300]
    _error(reply)
    _assert_still_serving(server.http_port)


def test_raw_request_lines_with_control_bytes_are_refused(server):
    for target in (b"/\x00", b"/v1/models/\x00:predict", b"/index.html\x00.png", b"/%00", b"/images/\x00", b"/\xff",
                   b"/v1/models/\xc3\xa9", b"/v1/models/tiny/versions/\xb2"):
        status, _, _ = _exchange(server.http_port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10,
                                 method="GET")
        assert status in (400, 404), target
    _assert_still_serving(server.http_port)


def _fuzzed_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["int", "float", "str", "bool", "null", "list", "dict"] if depth < 4 else ["int", "str"])
    if kind == "list":
        return [_fuzzed_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        keys = ["instances", "inputs", "signature_name", "query", "x", "b64", "serving_default", MATRIX_SIGNATURE]
        return {rng.choice(keys): _fuzzed_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return {"int": lambda: rng.choice([0, -1, 2 ** 70, rng.randint(-9, 9)]), "float": lambda: rng.uniform(-1e9, 1e9),
            "str": lambda: rng.choice(["", "a", "\udcff", "\x00", "serving_default", "matrix", "é" * 3]),
            "bool": lambda: rng.random() < 0.5, "null": lambda: None}[kind]()


def _fuzzed_request(rng: random.Random):
    """(method, path, body): a mutated valid predict, or random JSON, on a path built from route fragments."""
    path = rng.choice([PREDICT, PREDICT, f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/metadata"])
    if rng.random() < 0.4:
        name = rng.choice([MODEL, "nope", "%00", "a%20b", "..", "%C3%A9", MODEL * 50])
        version = rng.choice(["", "/versions/1", "/versions/0", f"/versions/{'7' * rng.choice([19, 20, 400])}",
                              "/labels/stable", "/labels/", "/versions/-1"])
        path = f"/v1/models/{name}{version}" + rng.choice([":predict", ":classify", "/metadata", "", ":", "/x"])
    method = "POST" if ":" in path.rsplit("/", 1)[-1] else "GET"
    valid = json.dumps({"signature_name": rng.choice(["", "serving_default", MATRIX_SIGNATURE]),
                        "instances": [rng.choice(["a", "bc", [1.0, 2.0]])]}).encode()
    choice = rng.random()
    if choice < 0.3:
        cut = rng.randrange(len(valid))
        body = valid[:cut] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 4))) + valid[cut + 1:]
    elif choice < 0.5:
        body = valid[:rng.randrange(len(valid))]
    else:
        body = json.dumps(_fuzzed_value(rng)).encode("utf-8", "surrogatepass")
    return method, path, body if method == "POST" else None


def test_fuzzed_requests_never_get_a_500(server):
    rng = random.Random(20261123)
    seen = {}
    for _ in range(300):
        method, path, body = _fuzzed_request(rng)
        status, _, reply = _request(server.http_port, method, path, body)
        assert status in (200, 400, 404, 501), (method, path[:100], body[:200], status, reply[:300])
        seen[status] = seen.get(status, 0) + 1
        if status != 200:
            _error(reply)
    assert seen.get(400, 0) > 50 and seen.get(404, 0) > 10  # the fuzzing reached the checks
    _assert_still_serving(server.http_port)


# ---------------------------------------------------------------------------
# 6. At most serving.http_max_connections connections; further ones wait in the backlog.


def test_connections_beyond_the_cap_wait_in_the_backlog_until_one_closes(saved, tmp_path):
    with _server(saved, tmp_path, http_max_connections=3) as server:
        port = server.http_port
        threads_before = threading.active_count()
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_SECONDS) for _ in range(3)]
        for connection in held:
            connection.request("GET", "/ready")
            assert connection.getresponse().read()  # accepted and kept alive
        waiting = socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS)
        try:
            waiting.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            waiting.settimeout(1.0)
            with pytest.raises(TimeoutError):
                waiting.recv(1)  # connected (the kernel's backlog) but not served while 3 are open
            assert threading.active_count() <= threads_before + 3
            held.pop().close()
            waiting.settimeout(WAIT_SECONDS)
            response = http.client.HTTPResponse(waiting, method="GET")
            response.begin()
            assert response.status == 200
        finally:
            waiting.close()
            for connection in held:
                connection.close()
