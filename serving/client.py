"""`clicklens query`: top-k images for a text or an image from a TF Serving gRPC server.

Uses only tensorflow-serving-api's stubs, so it works the same against
`clicklens serve` and a real tensorflow_model_server.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import grpc

from trainer import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from trainer.errors import ClicklensError

TEXT_SIGNATURE, TEXT_INPUT = "serving_default", "query"
IMAGE_SIGNATURE, IMAGE_INPUT = "by_image", "image_bytes"
TIMEOUT_SECONDS = 30.0


def build_request(model: str, *, text: Optional[str] = None, image_bytes: Optional[bytes] = None,
                  version: Optional[int] = None) -> predict_pb2.PredictRequest:
    """A PredictRequest for one text query or one image (exactly one of them)."""
    if (text is None) == (image_bytes is None):
        raise ValueError("give exactly one of text or image_bytes")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if text is not None:
        request.model_spec.signature_name = TEXT_SIGNATURE
        request.inputs[TEXT_INPUT].CopyFrom(tf.make_tensor_proto([text.encode("utf-8")], dtype=tf.string))
    else:
        request.model_spec.signature_name = IMAGE_SIGNATURE
        request.inputs[IMAGE_INPUT].CopyFrom(tf.make_tensor_proto([image_bytes], dtype=tf.string))
    return request


def top_k(response: predict_pb2.PredictResponse) -> List[Tuple[str, float]]:
    """(image id, score) pairs of the first query in a retrieval response."""
    ids = tf.make_ndarray(response.outputs["image_ids"])[0]
    scores = tf.make_ndarray(response.outputs["scores"])[0]
    return [(i.decode("utf-8"), float(s)) for i, s in zip(ids, scores)]


def predict(address: str, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Sends one Predict request over gRPC; a failure is a ClicklensError naming the status code."""
    with grpc.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            return stub.Predict(request, timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as err:
            raise ClicklensError(f"query: {address}: {err.code().name}: {err.details()}") from None


def print_results(response: predict_pb2.PredictResponse, what: str,
                  annotate: Optional[Callable[[str], str]] = None) -> None:
    """Prints the model that answered and its ranked image ids and scores (plus `annotate(id)` if given)."""
    results = top_k(response)
    print(f"{response.model_spec.name} v{response.model_spec.version.value}: top {len(results)} for {what}")
    for rank, (image_id, score) in enumerate(results, 1):
        note = f"  {annotate(image_id)}" if annotate else ""
        print(f"{rank:3d}  {image_id}  {score:.4f}{note}")


def read_query_image(path: str) -> bytes:
    """The bytes of an image file to query by (local or any TF filesystem)."""
    if not tf.io.gfile.exists(path):
        raise ClicklensError(f"query: {path}: no such file")
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def run(config, workdir, args) -> int:
    """Sends args.text or args.image to args.server and prints the ranked image ids."""
    if (args.text is None) == (args.image is None):
        raise ClicklensError("query: give a query text or --image FILE (one of them)")
    image_bytes = read_query_image(args.image) if args.image is not None else None
    address = args.server or f"{config.serving.host}:{config.serving.grpc_port}"
    request = build_request(args.model, text=args.text, image_bytes=image_bytes, version=args.version)
    response = predict(address, request)
    print_results(response, repr(args.text) if args.text is not None else args.image)
    return 0
