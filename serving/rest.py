"""TF Serving's REST API over a ModelRegistry, plus the static files of the search page.

    POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict   {"signature_name": ..., "instances": [...]}
                                                                or {"inputs": ...}
    GET  /v1/models/<name>[/versions/<v>|/labels/<l>]           model version status
    GET  /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata  signature defs
    GET  /monitoring/prometheus/metrics             TF Serving's metrics (serving.monitoring; serving/metrics.py)
    GET  /ready                                     200 when every model has an AVAILABLE version, else 503
    GET  /clicklens/page.json                       model names, signatures and limits for the search page
    GET  /images/<image_id>                         catalog images (serving/catalog_images.py)
    GET  /<file>                                    serving/static/ (the search page; index.html at /)

JSON follows TF Serving's REST conventions: binary strings travel as
{"b64": "..."}; "instances" gives row format in and "predictions" out,
"inputs" gives columnar format in and "outputs" out.  Errors are
{"error": message} with the HTTP status TF Serving uses for the code.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import mimetypes
import os
import re
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
from serving.grpc_service import SIGNATURE_DEF_FIELD, metadata_response, status_response
from serving.health import READY_PATH, Health
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from serving.model_registry import ModelRegistry
from serving.predict import ServingError, input_specs, invalid, prepare, signature_function
from serving.runner import Runner

logger = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PAGE_SETTINGS_PATH = "/clicklens/page.json"
MODEL_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                        r"(?:(?P<verb>:[a-zA-Z]+)|(?P<metadata>/metadata))?/?$")
REST_ENTRYPOINT = "REST"
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
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


def json_to_array(value: Any, spec: tf.TensorSpec, name: str) -> np.ndarray:
    """One input's JSON value as a numpy array of the signature's dtype."""
    try:
        if spec.dtype == tf.string:
            return np.array(_decode_strings(value, name), dtype=object)
        return np.array(value, dtype=spec.dtype.as_numpy_dtype)
    except ServingError:
        raise
    except (TypeError, ValueError) as err:
        raise invalid(f"input {name!r}: cannot be read as {spec.dtype.name}: {err}") from None


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


class RestHandler(http.server.BaseHTTPRequestHandler):
    """Routes /v1/models/... to the registry and everything else to serving/static/."""

    server_version = "clicklens-serving"
    protocol_version = "HTTP/1.1"
    registry: ModelRegistry  # set on the subclass built by build_rest_server
    max_request_bytes: int
    max_batch: int
    page_json: bytes
    images: Optional[CatalogImages] = None  # GET /images/<id>: the catalog's images (the search page's thumbnails)
    runner: Runner
    metrics: Metrics
    health: Optional[Health] = None

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (BaseHTTPRequestHandler's name)
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json")

    def _send_error(self, err: ServingError) -> None:
        self._send_json(HTTP_STATUS.get(err.code, 500), {"error": err.message})

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
        except Exception as err:  # unexpected: report it, keep serving
            logger.exception("REST request failed")
            self._send_json(500, {"error": f"{type(err).__name__}: {err}"})
        finally:
            self.metrics.request(match["name"], method, REST_ENTRYPOINT, code, time.perf_counter() - start)

    @staticmethod
    def _version(match: re.Match) -> Tuple[Optional[int], Optional[str]]:
        return (int(match["version"]) if match["version"] else None), match["label"]

    def _model_get(self, match: re.Match) -> Any:
        if match["verb"]:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"{match['verb']} needs POST")
        if match["metadata"]:
            return metadata_json(metadata_response(self.registry.get(match["name"], *self._version(match))))
        return _message_json(status_response(self.registry, match["name"], *self._version(match)))

    def _model_post(self, match: re.Match) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.max_request_bytes:
            self.close_connection = True  # the body is left unread
            raise invalid(f"request of {length} bytes exceeds serving.max_request_bytes={self.max_request_bytes}")
        raw = self.rfile.read(length)
        if match["verb"] != ":predict":
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{match['verb'][1:]} is not implemented")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise invalid(f"request body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        loaded = self.registry.get(match["name"], *self._version(match))
        signature_name = body.get("signature_name") or ""
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
        path = os.path.realpath(os.path.join(STATIC_DIR, relative))
        if not path.startswith(STATIC_DIR + os.sep) or not os.path.isfile(path):
            return self._send_json(404, {"error": f"not found: {self.path}"})
        with open(path, "rb") as f:  # a file inside the package, always local
            body = f.read()
        self._send(200, body, mimetypes.guess_type(path)[0] or "application/octet-stream")


def build_rest_server(registry: ModelRegistry, serving_config, images: Optional[CatalogImages] = None,
                      runner: Optional[Runner] = None, metrics: Optional[Metrics] = None,
                      health: Optional[Health] = None) -> http.server.ThreadingHTTPServer:
    """A ThreadingHTTPServer on serving.host:serving.http_port (0 picks a free port); `.server_port` is the bound port.

    Without `runner` requests run unbatched; without `metrics` there is no metrics page."""
    c = serving_config
    metrics = metrics or Metrics()
    handler = type("BoundRestHandler", (RestHandler,), {
        "registry": registry, "max_request_bytes": c.max_request_bytes, "max_batch": c.max_batch, "images": images,
        "runner": runner or Runner(metrics=metrics), "metrics": metrics, "health": health,
        "page_json": json.dumps(page_settings(c.max_request_bytes)).encode("utf-8")})
    server = http.server.ThreadingHTTPServer((c.host, c.http_port), handler)
    server.daemon_threads = True
    return server
