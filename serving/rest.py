"""TF Serving's REST API over a ModelRegistry, plus the static files of the search page.

    POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict   {"signature_name": ..., "instances": [...]}
                                                                or {"inputs": ...}
    POST /v1/models/<name>[/versions/<v>|/labels/<l>]:classify  {"signature_name": ..., "context": {...},
    POST /v1/models/<name>[/versions/<v>|/labels/<l>]:regress    "examples": [{...}, ...]} -> {"results": ...}
    GET  /v1/models/<name>[/versions/<v>|/labels/<l>]           model version status
    GET  /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata  signature defs
    GET  /monitoring/prometheus/metrics             TF Serving's metrics (serving.monitoring; serving/metrics.py)
    GET  /ready                                     200 when every model has an AVAILABLE version, else 503
    GET  /clicklens/page.json                       model names, signatures and limits for the search page
    GET  /images/<image_id>                         catalog images (serving/catalog_images.py)
    GET  /<file>                                    serving/static/ (the search page; index.html at /)

Limits (serving.http_*, RestServer): a listen backlog; a cap on open
connections, beyond which connections wait in the backlog; a read timeout for
a request's headers and body (a late body gets 408); an idle keep-alive
timeout.  A POST body needs a Content-Length within serving.max_request_bytes
(chunked bodies get 411).  `RestServer.drain` is the graceful shutdown.

JSON follows TF Serving's REST conventions: binary strings travel as
{"b64": "..."}; "instances" gives row format in and "predictions" out,
"inputs" gives columnar format in and "outputs" out.  Errors are
{"error": message} with the HTTP status TF Serving uses for the code.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import logging
import mimetypes
import os
import re
import select
import selectors
import socket
import sys
import threading
import time
from typing import Any, Dict, Optional, Tuple

import grpc
import numpy as np
from google.protobuf import json_format

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2

from clicklens import servables
from serving.catalog_images import ROUTE_PREFIX as IMAGES_PREFIX, CatalogImages, ImageRequestError
from serving import inference
from serving.grpc_service import SIGNATURE_DEF_FIELD, metadata_response, status_response
from serving.health import READY_PATH, Health
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from serving.model_registry import ModelRegistry
from serving.predict import ServingError, input_specs, invalid, prepare, signature_function
from serving.runner import Runner

logger = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PAGE_SETTINGS_PATH = "/clicklens/page.json"
MODEL_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
                        r"(?:(?P<verb>:[a-zA-Z]+)|(?P<metadata>/metadata))?/?$")
REST_ENTRYPOINT = "REST"
INT64_MAX = 2 ** 63 - 1  # TF Serving reads the version in the URL as an int64
# A closing connection discards what the client still sends while it keeps arriving (a pause of
# LINGER_IDLE_SECONDS ends it), for LINGER_MAX_SECONDS at most: nginx's lingering_timeout / lingering_time, at
# nginx's defaults.
LINGER_IDLE_SECONDS = 5.0
LINGER_MAX_SECONDS = 30.0
HTTP_STATUS = {  # tensorflow_model_server's mapping (a code not listed is 500)
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}


# -- JSON <-> numpy --------------------------------------------------------


def _decode_strings(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise invalid(f"input {name!r}: binary values must be {{\"b64\": \"...\"}}")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError:
            raise invalid(f"input {name!r}: invalid base64") from None
    if isinstance(value, list):
        return [_decode_strings(v, name) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    raise invalid(f"input {name!r}: expects strings, got {type(value).__name__}")


def _contains_null(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if item is None:
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False


def json_to_array(value: Any, spec: tf.TensorSpec, name: str) -> np.ndarray:
    """One input's JSON value as a numpy array of the signature's dtype."""
    try:
        if spec.dtype == tf.string:
            return np.array(_decode_strings(value, name), dtype=object)
        array = np.array(value, dtype=spec.dtype.as_numpy_dtype)
    except ServingError:
        raise
    except (TypeError, ValueError, OverflowError) as err:
        raise invalid(f"input {name!r}: cannot be read as {spec.dtype.name}: {err}") from None
    # numpy reads null as NaN for float dtypes; only a NaN can hide one, so only then look.
    if array.dtype.kind == "f" and np.isnan(array).any() and _contains_null(value):
        raise invalid(f"input {name!r}: cannot be read as {spec.dtype.name}: null is not a number")
    return array


def request_arrays(body: Dict[str, Any], specs: Dict[str, tf.TensorSpec]) -> Tuple[Dict[str, np.ndarray], bool]:
    """Named input arrays from a predict body; also whether it was row format ("instances")."""
    if ("instances" in body) == ("inputs" in body):
        raise invalid('request must have exactly one of "instances" (row format) or "inputs" (columnar format)')
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise invalid('"instances" must be a non-empty list')
        if all(isinstance(r, dict) and "b64" not in r for r in rows):
            keys = set(rows[0])
            if any(set(r) != keys for r in rows):
                raise invalid("every instance must name the same inputs")
            columns = {k: [r[k] for r in rows] for k in keys}
        elif len(specs) == 1:
            columns = {next(iter(specs)): rows}
        else:
            raise invalid(f"the signature has several inputs {sorted(specs)}: instances must be objects")
        row_format = True
    else:
        inputs = body["inputs"]
        if isinstance(inputs, dict) and not (set(inputs) == {"b64"}):
            columns = inputs
        elif len(specs) == 1:
            columns = {next(iter(specs)): inputs}
        else:
            raise invalid(f"the signature has several inputs {sorted(specs)}: inputs must be an object")
        row_format = False
    unknown = sorted(set(columns) - set(specs))
    if unknown:
        raise invalid(f"input names do not match the signature: unexpected {unknown}; expected {sorted(specs)}")
    return {k: json_to_array(v, specs[k], k) for k, v in columns.items()}, row_format


def _to_json(array: np.ndarray, name: str) -> Any:
    if array.dtype.kind in "SO":
        def encode(b: bytes):
            if not name.endswith("_bytes"):
                try:
                    return b.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(b).decode("ascii")}
        return np.vectorize(encode, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def response_json(outputs: Dict[str, np.ndarray], row_format: bool) -> Dict[str, Any]:
    """TF Serving's response body: "predictions" (rows) or "outputs" (columns)."""
    values = {k: _to_json(v, k) for k, v in outputs.items()}
    if not row_format:
        return {"outputs": next(iter(values.values())) if len(values) == 1 else values}
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    batch = len(next(iter(values.values())))
    return {"predictions": [{k: v[i] for k, v in values.items()} for i in range(batch)]}


def _message_json(message) -> Dict[str, Any]:
    """A proto as TF Serving's REST API prints it: proto field names, defaults included."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def metadata_json(response) -> Dict[str, Any]:
    """GetModelMetadataResponse as TF Serving's REST API prints it (the Any unpacked)."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata[SIGNATURE_DEF_FIELD].Unpack(signature_map)
    return {"model_spec": _message_json(response.model_spec),
            "metadata": {SIGNATURE_DEF_FIELD: _message_json(signature_map)}}


def page_settings(max_request_bytes: int) -> Dict[str, Any]:
    """What the search page needs to know, derived from the servables contract and this server's limits."""
    return {
        "retrieval_models": list(servables.RETRIEVAL_MODELS),
        "model_labels": {servables.RETRIEVAL_SCANN: "ScaNN", servables.RETRIEVAL_BRUTEFORCE: "Brute force"},
        "default_model": servables.RETRIEVAL_SCANN,
        "text_signature": servables.TEXT_SIGNATURE,
        "image_signature": servables.IMAGE_SIGNATURE,
        "query_input": servables.QUERY,
        "image_input": servables.IMAGE_BYTES,
        "image_ids_output": servables.IMAGE_IDS,
        "scores_output": servables.SCORES,
        "images_route": IMAGES_PREFIX,
        "max_upload_bytes": servables.max_upload_bytes(max_request_bytes),
    }


# -- the HTTP server ---------------------------------------------------------


class RequestError(ServingError):
    """A request refused before it reaches a model, with its own HTTP status (400, 408, 411)."""

    def __init__(self, status: int, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        super().__init__(code, message)
        self.status = status


class ClientGone(Exception):
    """The client closed its connection before its request body arrived: there is no one to answer."""


def _shortened(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class RestHandler(http.server.BaseHTTPRequestHandler):
    """Routes /v1/models/... to the registry and everything else to serving/static/.

    One handler serves one connection (keep-alive: request after request) on
    its own thread.  `timeout` bounds each wait for a request's headers and the
    whole of its body; `idle_timeout` closes a connection that sends no request."""

    server_version = "clicklens-serving"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle would hold the body for the ACK
    timeout = 30.0  # serving.http_timeout_seconds
    idle_timeout = 75.0  # serving.http_idle_timeout_seconds
    registry: ModelRegistry  # set on the subclass built by build_rest_server
    max_request_bytes: int
    max_batch: int
    page_json: bytes
    images: Optional[CatalogImages] = None  # GET /images/<id>: the catalog's images (the search page's thumbnails)
    runner: Runner
    metrics: Metrics
    health: Optional[Health] = None
    server: "RestServer"
    _body_coming = False  # the last request's body is on its way (not asked for with Expect) and not read

    def finish(self) -> None:
        super().finish()
        if self._body_coming:  # refused before its body was read: the client may not have sent it all yet
            _discard_unread_input(self.connection, coming=True)

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (BaseHTTPRequestHandler's name)
        logger.debug("%s %s", self.address_string(), format % args)

    # -- connection state: idle (waiting for a request) or busy, for the drain and the timeouts

    def handle_one_request(self) -> None:
        """Waits for the next request (up to idle_timeout) and answers it; during a drain, closes instead."""
        if not self.server.connection_idle(self.connection):
            self.close_connection = True
            return
        self.connection.settimeout(self.idle_timeout)
        super().handle_one_request()

    def parse_request(self) -> bool:
        """Reads the headers once a request line has arrived: the connection is busy until it is answered."""
        self.server.connection_busy(self.connection)
        self.connection.settimeout(self.timeout)
        self._close_after_response = False
        if not super().parse_request():
            return False
        # A body nobody reads would be taken for the next request: close after answering, unless it is read.
        self._close_after_response = ("Transfer-Encoding" in self.headers
                                      or self.headers.get("Content-Length", "0").strip() not in ("", "0"))
        # A client that asks first (Expect: 100-continue) sends no body after a refusal; any other does.
        self._body_coming = (self._close_after_response
                             and self.headers.get("Expect", "").strip().lower() != "100-continue")
        return True

    def handle_expect_100(self) -> bool:
        """Refuses a body it would not read before the client sends it (curl asks first for bodies over 1 MB)."""
        if self.command == "POST":
            try:
                self._content_length()
            except RequestError as err:
                self._send_error(err)
                return False
        return super().handle_expect_100()

    # -- responses

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self._close_after_response or self.server.draining:
            self.send_header("Connection", "close")  # (this also ends the connection after the response)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any) -> None:
        text = json.dumps(payload, ensure_ascii=False)
        try:
            body = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from the request, echoed in an error: ASCII-escape it
            body = json.dumps(payload).encode("ascii")
        self._send(status, body, "application/json")

    def _send_error(self, err: ServingError) -> None:
        if isinstance(err, RequestError):
            self._close_after_response = True  # the body, if any, is left unread
        self._send_json(getattr(err, "status", None) or HTTP_STATUS.get(err.code, 500), {"error": err.message})

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own refusals (bad request line, too long, unknown method) as {"error": ...}, then close."""
        self.log_error("code %d, message %s", code, message)
        self._close_after_response = True  # what follows on this connection is not read: it closes
        self._send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    # -- routes

    def _route(self) -> Optional[re.Match]:
        return MODEL_PATH.match(self.path.split("?", 1)[0])

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        match = self._route()
        if match is None:
            route = self.path.split("?", 1)[0]
            if self.path.startswith("/v1/"):
                return self._send_error(ServingError(grpc.StatusCode.NOT_FOUND, f"no such endpoint: {self.path}"))
            if self.metrics.enabled and route == self.metrics.path:
                return self._send(200, self.metrics.exposition().encode("utf-8"), METRICS_CONTENT_TYPE)
            if route == READY_PATH:
                return self._ready()
            if self.path.startswith(IMAGES_PREFIX):
                return self._image()
            if route == PAGE_SETTINGS_PATH:
                return self._send(200, self.page_json, "application/json")
            return self._static()
        self._model_request(match, "", self._model_get)

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        match = self._route()
        if match is None or not match["verb"]:
            return self._send_error(ServingError(grpc.StatusCode.NOT_FOUND, f"no such endpoint: POST {self.path}"))
        self._model_request(match, match["verb"][1:], self._model_post)

    def _model_request(self, match: re.Match, method: str, body) -> None:
        """Runs a /v1/models request, answers errors as TF Serving does and records its metrics."""
        start = time.perf_counter()
        code = grpc.StatusCode.INTERNAL
        try:
            payload = body(match)
            code = grpc.StatusCode.OK
            self._send_json(200, payload)
        except ServingError as err:
            code = err.code
            self._send_error(err)
        except (ClientGone, ConnectionError):  # the client, or the end of a drain, closed the connection
            code = grpc.StatusCode.CANCELLED
            self.close_connection = True
        except RecursionError:  # JSON nested deeper than Python's recursion limit, anywhere in the decoding
            code = grpc.StatusCode.INVALID_ARGUMENT
            self._send_json(400, {"error": "request body is nested too deeply"})
        except Exception as err:  # unexpected: report it, keep serving
            logger.exception("REST request failed")
            self._send_json(500, {"error": f"{type(err).__name__}: {err}"})
        finally:
            self.metrics.request(self.registry.metric_label(match["name"]), method, REST_ENTRYPOINT, code,
                                 time.perf_counter() - start)

    @staticmethod
    def _version(match: re.Match) -> Tuple[Optional[int], Optional[str]]:
        text = match["version"]
        if text is None:
            return None, match["label"]
        if len(text) > 19 or int(text) > INT64_MAX:  # (int() refuses more than 4300 digits)
            raise invalid(f"Failed to convert version: {_shortened(text)} to numeric.")
        return int(text), None

    def _model_get(self, match: re.Match) -> Any:
        if match["verb"]:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"{match['verb']} needs POST")
        if match["metadata"]:
            return metadata_json(metadata_response(self.registry.get(match["name"], *self._version(match))))
        return _message_json(status_response(self.registry, match["name"], *self._version(match)))

    def _content_length(self) -> int:
        """The request's Content-Length: 411 without one (or for chunked bodies), 400 unless it is one decimal
        number within serving.max_request_bytes.  The body is not read here."""
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "Transfer-Encoding is not supported: send the body with a Content-Length header")
        values = {v.strip() for v in self.headers.get_all("Content-Length", [])}
        if not values:
            raise RequestError(411, "a POST needs a Content-Length header")
        if len(values) > 1:
            raise RequestError(400, f"conflicting Content-Length headers: {_shortened(', '.join(sorted(values)))}")
        text = values.pop()
        if not re.fullmatch(r"[0-9]+", text):
            raise RequestError(400, f"invalid Content-Length: {_shortened(text)!r} (must be a number of bytes)")
        if len(text) > 18 or int(text) > self.max_request_bytes:
            raise RequestError(400, f"request of {_shortened(text)} bytes exceeds "
                                    f"serving.max_request_bytes={self.max_request_bytes}")
        return int(text)

    def _read_body(self, length: int) -> bytes:
        """Exactly `length` bytes of body, which must all arrive within `timeout` seconds (else 408)."""
        deadline = time.monotonic() + self.timeout
        chunks = []
        try:
            while length:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(length, 1 << 16))
                if not chunk:
                    raise ClientGone()
                chunks.append(chunk)
                length -= len(chunk)
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within serving.http_timeout_seconds="
                                    f"{self.timeout:g}", grpc.StatusCode.DEADLINE_EXCEEDED) from None
        except ConnectionError:
            raise ClientGone() from None
        self.connection.settimeout(self.timeout)
        self._close_after_response = self._body_coming = False
        return b"".join(chunks)

    def _model_post(self, match: re.Match) -> Any:
        raw = self._read_body(self._content_length())
        if match["verb"] not in (":predict", ":classify", ":regress"):
            raise invalid(f"Malformed request: POST {_shortened(self.path, 200)}")  # TF Serving's words
        try:
            body = json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise invalid("request body is not JSON: nested too deeply") from None
        except ValueError as err:  # not UTF-8, not JSON, or a number of more than 4300 digits
            raise invalid(f"request body is not JSON: {_shortened(str(err), 200)}") from None
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        signature_name = body.get("signature_name")
        if signature_name is None:
            signature_name = ""
        if not isinstance(signature_name, str):
            raise invalid("'signature_name' key must be a string value.")
        loaded = self.registry.get(match["name"], *self._version(match))
        if match["verb"] != ":predict":
            request_input = inference.input_from_json(body)
            if match["verb"] == ":classify":
                return inference.classification_json(
                    inference.classify(loaded, signature_name, request_input, self.max_batch, self.runner))
            return inference.regression_json(
                inference.regress(loaded, signature_name, request_input, self.max_batch, self.runner))
        specs = input_specs(signature_function(loaded.model, signature_name))
        arrays, row_format = request_arrays(body, specs)
        outputs = self.runner.run(loaded, prepare(loaded.model, signature_name, arrays, self.max_batch))
        return response_json(outputs, row_format)

    def _ready(self) -> None:
        """GET /ready: 200 while every model has an AVAILABLE version, 503 otherwise (serving/health.py)."""
        health = self.health or Health(self.registry or ModelRegistry([]))
        self._send_json(200 if health.ready() else 503, health.readiness())

    def _image(self) -> None:
        """GET /images/<id>: a catalog image by id (serving/catalog_images.py refuses anything else)."""
        if self.images is None:
            return self._send_json(404, {"error": "this server has no image catalog"})
        try:
            body, content_type = self.images.serve(self.path)
        except ImageRequestError as err:
            return self._send_json(err.status, {"error": err.message})
        self._send(200, body, content_type)

    def _static(self) -> None:
        relative = self.path.split("?", 1)[0].lstrip("/") or "index.html"
        path = "" if "\0" in relative else os.path.realpath(os.path.join(STATIC_DIR, relative))
        if not path.startswith(STATIC_DIR + os.sep) or not os.path.isfile(path):
            return self._send_json(404, {"error": f"not found: {self.path}"})
        with open(path, "rb") as f:  # a file inside the package, always local
            body = f.read()
        self._send(200, body, mimetypes.guess_type(path)[0] or "application/octet-stream")


def _has_input(sock: socket.socket) -> bool:
    """True when bytes (or the client's EOF) wait on `sock`: a request is arriving."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _discard_unread_input(sock: socket.socket, idle_seconds: float = LINGER_IDLE_SECONDS,
                          max_seconds: float = LINGER_MAX_SECONDS, coming: bool = False) -> None:
    """Before closing: if the client is still sending (a body that was refused or cut short; `coming`: one is
    known to be on its way, though none may have arrived yet), ends our side and discards what arrives until it
    pauses for `idle_seconds` or `max_seconds` have passed; closing with unread input would reset the connection,
    and the client could lose the answer it was just sent.  A slow client (a large body on a busy machine) is not
    cut off while its bytes keep coming."""
    if not coming and not _has_input(sock):
        return
    with contextlib.suppress(OSError):  # the idle timeout ends it too (socket.timeout is an OSError)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + max_seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(min(idle_seconds, left))
            if not sock.recv(1 << 16):
                break


def _close_quietly(sock: socket.socket) -> None:
    """Ends a connection another thread is blocked on (it reads EOF); that thread closes the socket."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class RestServer(http.server.ThreadingHTTPServer):
    """A ThreadingHTTPServer with a real backlog, a connection cap and a graceful drain.

    Backlog: the kernel holds up to `backlog` connections until they are
    accepted (socketserver's default is 5, which resets clients under bursts).

    Connection cap: at most `max_connections` connections are open, each on
    its own handler thread.  While the cap is reached the accept loop stops
    accepting, so further connections wait in the backlog and are served as
    soon as a connection closes (idle ones close after the idle timeout); past
    the backlog the kernel refuses them.  A burst is served late, not failed
    with 503s.

    Drain (`drain(grace)`): stop accepting, accept the connections the kernel
    had already completed, close keep-alive connections that are idle, and let
    every request being read or run finish, its response saying
    `Connection: close`, for up to `grace` seconds; connections left at the end
    are closed and counted."""

    daemon_threads = True  # a handler still running after the grace must not keep the process alive
    block_on_close = False  # drain() does the waiting, bounded by the grace

    def __init__(self, address, handler, backlog: int, max_connections: int):
        self.request_queue_size = backlog  # socketserver passes it to listen()
        self.max_connections = max_connections
        self.draining = False
        self._accepting = True
        self._changed = threading.Condition()
        self._connections: Dict[socket.socket, bool] = {}  # open connection -> busy with a request
        self._loop_done = threading.Event()
        self._loop_done.set()
        self._wake_reader, self._wake_writer = socket.socketpair()
        super().__init__(address, handler)

    def server_activate(self) -> None:
        super().server_activate()
        self.socket.setblocking(False)  # accepts happen only when select says one is waiting

    # -- accepting

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accepts connections, one handler thread each, until `shutdown` or `drain` (poll_interval is unused)."""
        self._loop_done.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.socket, selectors.EVENT_READ)
                selector.register(self._wake_reader, selectors.EVENT_READ)
                while self._free_slot():
                    ready = {key.fileobj for key, _ in selector.select()}
                    if self.socket in ready and self._accepting:
                        self._accept()
        finally:
            self._loop_done.set()

    def _free_slot(self) -> bool:
        """Waits while max_connections connections are open; False once accepting has stopped."""
        with self._changed:
            self._changed.wait_for(lambda: not self._accepting or len(self._connections) < self.max_connections)
            return self._accepting

    def _accept(self) -> bool:
        """Accepts one waiting connection and starts its handler thread; False when none was waiting."""
        try:
            sock, address = self.socket.accept()
        except BlockingIOError:
            return False
        except OSError as err:  # out of file descriptors or memory: the connection stays in the backlog
            logger.warning("REST: cannot accept a connection: %s", err)
            time.sleep(0.1)
            return False
        with self._changed:
            self._connections[sock] = False
        try:
            self.process_request(sock, address)
        except Exception:  # no thread could be started
            logger.exception("REST: cannot serve a connection")
            self.shutdown_request(sock)
        return True

    def shutdown(self) -> None:
        """Stops the accept loop and waits for it to end; open connections carry on."""
        with self._changed:
            self._accepting = False
            self._changed.notify_all()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")
        self._loop_done.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    # -- connections (called by the handler threads)

    def connection_idle(self, sock: socket.socket) -> bool:
        """A connection is about to wait for a request; False when it should close instead (draining, and
        no request is arriving)."""
        with self._changed:
            if self.draining and not _has_input(sock):
                return False
            self._connections[sock] = False
            return True

    def connection_busy(self, sock: socket.socket) -> None:
        """A request has started arriving on `sock`: the drain waits for its answer."""
        with self._changed:
            self._connections[sock] = True

    def shutdown_request(self, request: socket.socket) -> None:
        _discard_unread_input(request)
        with self._changed:
            self._connections.pop(request, None)
            self._changed.notify_all()
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A connection failed outside the routes' error handling: quietly when the client (or the drain) closed
        it, with the traceback otherwise."""
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)) or (self.draining and isinstance(err, OSError)):
            logger.debug("REST connection from %s ended: %r", client_address[0], err)
        else:
            logger.exception("REST connection from %s failed", client_address[0])

    # -- draining

    def drain(self, grace: float) -> int:
        """Stops taking connections and lets the requests in flight finish, for up to `grace` seconds.

        Returns how many connections were still busy at the end; those are closed and logged."""
        deadline = time.monotonic() + grace
        with self._changed:
            self.draining = True  # from now on every response says Connection: close
        self.shutdown()
        if self.socket.fileno() >= 0:
            while self._free_slot_now() and self._accept():  # completed before the drain: in flight too
                pass
        self.server_close()  # new connections are refused from here on
        with self._changed:
            idle = [sock for sock, busy in self._connections.items() if not busy and not _has_input(sock)]
            for sock in idle:
                _close_quietly(sock)
            logger.info("REST: draining %d requests in flight, closed %d idle connections",
                        len(self._connections) - len(idle), len(idle))
            self._changed.wait_for(lambda: not self._connections, max(0.0, deadline - time.monotonic()))
            left = list(self._connections)
            for sock in left:
                _close_quietly(sock)
        if left:
            logger.warning("%d REST requests were still running after the %g s grace period; their connections "
                           "were closed", len(left), grace)
        return len(left)

    def _free_slot_now(self) -> bool:
        with self._changed:
            return len(self._connections) < self.max_connections


def build_rest_server(registry: ModelRegistry, serving_config, images: Optional[CatalogImages] = None,
                      runner: Optional[Runner] = None, metrics: Optional[Metrics] = None,
                      health: Optional[Health] = None) -> RestServer:
    """A RestServer on serving.host:serving.http_port (0 picks a free port); `.server_port` is the bound port.

    Its limits come from serving.http_backlog, http_max_connections, http_timeout_seconds and
    http_idle_timeout_seconds.  Without `runner` requests run unbatched; without `metrics` there is no metrics
    page."""
    c = serving_config
    metrics = metrics or Metrics()
    handler = type("BoundRestHandler", (RestHandler,), {
        "registry": registry, "max_request_bytes": c.max_request_bytes, "max_batch": c.max_batch, "images": images,
        "runner": runner or Runner(metrics=metrics), "metrics": metrics, "health": health,
        "timeout": c.http_timeout_seconds, "idle_timeout": c.http_idle_timeout_seconds,
        "page_json": json.dumps(page_settings(c.max_request_bytes)).encode("utf-8")})
    return RestServer((c.host, c.http_port), handler, backlog=c.http_backlog, max_connections=c.http_max_connections)
