"""TF Serving's gRPC services (tensorflow_serving.apis) over a ModelRegistry.

`PredictionService`: Predict, GetModelMetadata, and Classify, Regress and
MultiInference over tf.Example inputs (serving/inference.py).
`ModelService`: GetModelStatus, and HandleReloadConfigRequest when the server
was given a reload function (ModelServer.reload_config: the new
ModelServerConfig replaces the old, as in tensorflow_model_server); without
one it answers UNIMPLEMENTED.

Requests are registered with a raw-bytes deserializer so their size is checked
before parsing: a request over serving.max_request_bytes gets
INVALID_ARGUMENT, like any other request the server will not run.

A ModelSpec may name a version by number or by one of the model's
`version_labels`; Predict runs through serving/runner.py (batched when
batching is on) and records TF Serving's request metrics.  The server also
carries `grpc.health.v1.Health` (serving/health.py).

Without batching the server is a grpc.Server whose `serving.workers` threads
run each request whole.  With batching it is a `grpc.aio` server on its own
event loop (serving/grpc_loop.py) where Predict is a coroutine: a text request
waits for its batch without holding a thread, so it costs the front end little
more than gRPC's own handling, which is what lets batching pay on a small
machine (README.md, "Serving latency").  Image Predicts and the other methods
still run on the worker threads.  Each mode got the front end that measured
faster for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent import futures
from typing import Callable, Optional, Sequence, Tuple

import grpc

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)
from tensorflow_serving.apis import status_pb2
from grpc_health.v1 import health_pb2_grpc

from serving import inference
from serving.grpc_loop import GrpcLoopServer
from serving.metrics import Metrics
from serving.model_registry import ModelRegistry
from serving.predict import ServingError, invalid, prepare_proto, status_message, tensor_proto
from serving.runner import PREDICT_API, Runner
from clicklens.errors import ClicklensError

logger = logging.getLogger(__name__)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
SIGNATURE_DEF_FIELD = "signature_def"
# The transport limit sits well above max_request_bytes, so oversized requests
# reach the handler and get TF Serving's INVALID_ARGUMENT rather than gRPC's
# own RESOURCE_EXHAUSTED.
TRANSPORT_LIMIT_FACTOR = 4


GRPC_ENTRYPOINT = "GRPC"
CLASSIFY_API, REGRESS_API, MULTI_INFERENCE_API = "Classify", "Regress", "MultiInference"


def requested_version(model_spec) -> Tuple[Optional[int], Optional[str]]:
    """(version, label) a ModelSpec names; (None, None) for the latest."""
    which = model_spec.WhichOneof("version_choice")
    if which == "version_label":
        return None, model_spec.version_label
    return (model_spec.version.value if which == "version" else None), None


class Handlers:
    """The RPC bodies: parse, size-check, run against the registry, map errors to status codes."""

    def __init__(self, registry: ModelRegistry, max_request_bytes: int, max_batch: int,
                 runner: Optional[Runner] = None, metrics: Optional[Metrics] = None,
                 reload_config: Optional[Callable] = None, workers: int = 8):
        """`reload_config(ModelServerConfig)` carries out HandleReloadConfigRequest, raising ServingError.
        `workers` (serving.workers) threads run the blocking methods and unbatched model calls, and at most
        that many Predicts are in flight at once."""
        self.registry = registry
        self.reload_config = reload_config
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.metrics = metrics or Metrics()
        self.runner = runner or Runner(metrics=self.metrics)
        self.executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc")
        self._predicts_in_flight = asyncio.Semaphore(workers)

    def _parse(self, raw: bytes, message_type):
        if len(raw) > self.max_request_bytes:
            raise invalid(f"request of {len(raw)} bytes exceeds serving.max_request_bytes={self.max_request_bytes}")
        try:
            return message_type.FromString(raw)
        except Exception as err:  # protobuf DecodeError
            raise invalid(f"malformed {message_type.DESCRIPTOR.name}: {err}") from None

    def _measured(self, api: str, model_name: str, body: Callable, request):
        """body(request), recorded in the request metrics under `api` with its outcome."""
        start = time.perf_counter()
        code = grpc.StatusCode.INTERNAL
        try:
            response = body(request)
            code = grpc.StatusCode.OK
            return response
        except ServingError as err:
            code = err.code
            raise
        finally:
            self.metrics.request(self.registry.metric_label(model_name), api, GRPC_ENTRYPOINT, code,
                                 time.perf_counter() - start)

    def predict(self, raw: bytes, context) -> predict_pb2.PredictResponse:
        """Predict on a worker thread, the model call included (the server without batching)."""
        request = self._parse(raw, predict_pb2.PredictRequest)
        return self._measured(PREDICT_API, request.model_spec.name, self._predict, request)

    def _predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        loaded = self.registry.get(request.model_spec.name, *requested_version(request.model_spec))
        outputs = self.runner.run(loaded, prepare_proto(loaded.model, request, self.max_batch))
        return predict_response(loaded, request, outputs)

    async def predict_async(self, raw: bytes, context) -> predict_pb2.PredictResponse:
        """Predict on the event loop (the server with batching); the model call is awaited
        (serving/runner.py, Runner.run_async)."""
        async with self._predicts_in_flight:
            return await self._predict_async(raw)

    async def _predict_async(self, raw: bytes) -> predict_pb2.PredictResponse:
        start = time.perf_counter()
        request = self._parse(raw, predict_pb2.PredictRequest)
        code = grpc.StatusCode.INTERNAL
        try:
            loaded = self.registry.get(request.model_spec.name, *requested_version(request.model_spec))
            call = prepare_proto(loaded.model, request, self.max_batch)
            outputs = await self.runner.run_async(loaded, call, self.executor)
            response = predict_response(loaded, request, outputs)
            code = grpc.StatusCode.OK
            return response
        except ServingError as err:
            code = err.code
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.metrics.request(self.registry.metric_label(request.model_spec.name), PREDICT_API,
                                 GRPC_ENTRYPOINT, code, time.perf_counter() - start)

    def classify(self, raw: bytes, context) -> classification_pb2.ClassificationResponse:
        request = self._parse(raw, classification_pb2.ClassificationRequest)
        return self._measured(CLASSIFY_API, request.model_spec.name, self._classify, request)

    def regress(self, raw: bytes, context) -> regression_pb2.RegressionResponse:
        request = self._parse(raw, regression_pb2.RegressionRequest)
        return self._measured(REGRESS_API, request.model_spec.name, self._regress, request)

    def multi_inference(self, raw: bytes, context) -> inference_pb2.MultiInferenceResponse:
        request = self._parse(raw, inference_pb2.MultiInferenceRequest)
        name = request.tasks[0].model_spec.name if request.tasks else ""
        return self._measured(MULTI_INFERENCE_API, name, lambda r: inference.multi_inference(
            self.registry, r, self.max_batch, self.runner, requested_version), request)

    def _classify(self, request) -> classification_pb2.ClassificationResponse:
        loaded = self.registry.get(request.model_spec.name, *requested_version(request.model_spec))
        response = classification_pb2.ClassificationResponse()
        response.result.CopyFrom(inference.classify(loaded, request.model_spec.signature_name, request.input,
                                                    self.max_batch, self.runner))
        inference.set_model_spec(response.model_spec, loaded, request.model_spec.signature_name)
        return response

    def _regress(self, request) -> regression_pb2.RegressionResponse:
        loaded = self.registry.get(request.model_spec.name, *requested_version(request.model_spec))
        response = regression_pb2.RegressionResponse()
        response.result.CopyFrom(inference.regress(loaded, request.model_spec.signature_name, request.input,
                                                   self.max_batch, self.runner))
        inference.set_model_spec(response.model_spec, loaded, request.model_spec.signature_name)
        return response

    def handle_reload_config_request(self, raw: bytes, context) -> model_management_pb2.ReloadConfigResponse:
        request = self._parse(raw, model_management_pb2.ReloadConfigRequest)
        if self.reload_config is None:
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "HandleReloadConfigRequest is not enabled")
        self.reload_config(request.config)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = 0
        return response

    def get_model_metadata(self, raw: bytes, context) -> get_model_metadata_pb2.GetModelMetadataResponse:
        request = self._parse(raw, get_model_metadata_pb2.GetModelMetadataRequest)
        fields = list(request.metadata_field)
        if not fields:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        unsupported = [f for f in fields if f != SIGNATURE_DEF_FIELD]
        if unsupported:
            raise invalid(f"Metadata field {unsupported[0]} is not supported")
        loaded = self.registry.get(request.model_spec.name, *requested_version(request.model_spec))
        return metadata_response(loaded)

    def get_model_status(self, raw: bytes, context) -> get_model_status_pb2.GetModelStatusResponse:
        request = self._parse(raw, get_model_status_pb2.GetModelStatusRequest)
        return status_response(self.registry, request.model_spec.name, *requested_version(request.model_spec))


def predict_response(loaded, request: predict_pb2.PredictRequest, outputs) -> predict_pb2.PredictResponse:
    """The PredictResponse of a request's outputs (numpy), naming the version that ran."""
    response = predict_pb2.PredictResponse()
    inference.set_model_spec(response.model_spec, loaded, request.model_spec.signature_name)
    for name, value in outputs.items():
        response.outputs[name].CopyFrom(tensor_proto(value))
    return response


def metadata_response(loaded) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """GetModelMetadataResponse with the version's SignatureDefMap."""
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = loaded.name
    response.model_spec.version.value = loaded.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in loaded.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response


def status_response(registry: ModelRegistry, name: str, version: Optional[int], label: Optional[str] = None):
    """GetModelStatusResponse for a model (all versions it knows) or one version (by number or label)."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, st in registry.status(name, version, label):
        entry = response.model_version_status.add()
        entry.version = number
        entry.state = st.state
        entry.status.CopyFrom(status_pb2.StatusProto(error_code=st.error_code.value[0], error_message=st.error_message))
    return response


def _unary(body: Callable, response_type) -> grpc.RpcMethodHandler:
    """A blocking method body (run on the worker threads), its errors mapped to status codes."""
    def handler(raw: bytes, context):
        try:
            return body(raw, context)
        except ServingError as err:
            context.abort(err.code, status_message(err.message))
        except Exception as err:  # an unexpected failure is INTERNAL, never a dropped connection
            logger.exception("request failed")
            context.abort(grpc.StatusCode.INTERNAL, status_message(f"{type(err).__name__}: {err}"))

    return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=None,
                                               response_serializer=response_type.SerializeToString)


def _unary_coroutine(body: Callable, response_type) -> grpc.RpcMethodHandler:
    """`_unary` for a coroutine body (run on the event loop)."""
    async def handler(raw: bytes, context):
        try:
            return await body(raw, context)
        except ServingError as err:
            await context.abort(err.code, status_message(err.message))
        except Exception as err:  # an unexpected failure is INTERNAL, never a dropped connection
            logger.exception("request failed")
            await context.abort(grpc.StatusCode.INTERNAL, status_message(f"{type(err).__name__}: {err}"))

    return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=None,
                                               response_serializer=response_type.SerializeToString)


def build_grpc_server(handlers: Handlers, host: str, port: Optional[int],
                      health_servicer=None, socket_path: str = "",
                      channel_arguments: Sequence[Tuple[str, object]] = ()):
    """A gRPC server with both services (and grpc.health.v1.Health if given) on host:port (0 picks a free port;
    None: no TCP port) and on the Unix domain socket `socket_path` if given; returns it and the bound port.

    `channel_arguments` are extra gRPC server options (tensorflow_model_server's --grpc_channel_arguments).
    With batching on it is a GrpcLoopServer (Predict a coroutine that waits for its batch without a thread),
    without it a grpc.Server running every request on a worker thread: each measured the faster for its
    mode (README.md, "Serving latency"); both have the same start / stop."""
    limit = handlers.max_request_bytes * TRANSPORT_LIMIT_FACTOR
    options = {"grpc.max_receive_message_length": limit, "grpc.max_send_message_length": -1,
               "grpc.so_reuseport": 0}
    options.update(dict(channel_arguments))
    if handlers.runner.batcher is not None:
        server = GrpcLoopServer(handlers.executor, list(options.items()))
        predict = _unary_coroutine(handlers.predict_async, predict_pb2.PredictResponse)
    else:
        server = grpc.server(handlers.executor, options=list(options.items()))
        predict = _unary(handlers.predict, predict_pb2.PredictResponse)
    prediction = {
        "Predict": predict,
        "GetModelMetadata": _unary(handlers.get_model_metadata, get_model_metadata_pb2.GetModelMetadataResponse),
        "Classify": _unary(handlers.classify, classification_pb2.ClassificationResponse),
        "Regress": _unary(handlers.regress, regression_pb2.RegressionResponse),
        "MultiInference": _unary(handlers.multi_inference, inference_pb2.MultiInferenceResponse),
    }
    models = {
        "GetModelStatus": _unary(handlers.get_model_status, get_model_status_pb2.GetModelStatusResponse),
        "HandleReloadConfigRequest": _unary(handlers.handle_reload_config_request,
                                            model_management_pb2.ReloadConfigResponse),
    }
    # The stub modules name the full method set; fail loudly if a proto update adds one.
    assert set(prediction) == _methods(prediction_service_pb2_grpc.PredictionServiceServicer)
    assert set(models) == _methods(model_service_pb2_grpc.ModelServiceServicer)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(PREDICTION_SERVICE, prediction),
                                     grpc.method_handlers_generic_handler(MODEL_SERVICE, models)])
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = _listen(server, f"{host}:{port}") if port is not None else 0
        if socket_path:
            _listen(server, f"unix:{socket_path}")
    except ClicklensError:
        server.stop(0)
        raise
    return server, bound


def _listen(server, address: str) -> int:
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:
        bound, reason = 0, str(err)
    else:
        reason = "address in use or not available"
    if not bound:
        raise ClicklensError(f"cannot listen for gRPC on {address}: {reason}")
    return bound


def _methods(servicer_class) -> set:
    return {name for name in vars(servicer_class) if not name.startswith("_")}
