"""`clicklens query`: top-k images for a text or an image from a TF Serving gRPC server.

Uses only tensorflow-serving-api's stubs and the servables contract's names,
so it works the same against `clicklens serve` and a real
tensorflow_model_server.  `--explain` shows what each result is (its catalog
entry's extra keys, e.g. the demo world's attributes) and marks the results
that W/raw/ground_truth.jsonl calls relevant.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Set, Tuple

import grpc

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from clicklens import servables as S
from clicklens.catalog import read_catalog, resolve_uri
from clicklens.errors import ClicklensError
from clicklens.ground_truth import read_ground_truth
from clicklens.queries import MAX_QUERY_INPUT_BYTES, normalize_query

TIMEOUT_SECONDS = 30.0
# What to do about the status codes a user meets first: no server yet, or a server without the model.
RPC_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is `clicklens serve` running there? start it, or give its address with --server; "
                                 "a running server also answers UNAVAILABLE while it shuts down or when its batch "
                                 "queue is full",
    grpc.StatusCode.NOT_FOUND: "the server has no such model or version loaded: check --model and --version, and "
                               "that `clicklens export` wrote <workdir>/export/<model>/ for the workdir it serves",
}


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
        try:
            # A command line's bytes that are not UTF-8 arrive as lone surrogates (PEP 383).
            encoded = text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ClicklensError(f"query: the text is not valid UTF-8 (character {err.start + 1} of "
                                 f"{len(text)}: {err.reason})") from None
        request.model_spec.signature_name = S.TEXT_SIGNATURE
        request.inputs[S.QUERY].CopyFrom(tf.make_tensor_proto([encoded], dtype=tf.string))
    else:
        request.model_spec.signature_name = S.IMAGE_SIGNATURE
        request.inputs[S.IMAGE_BYTES].CopyFrom(tf.make_tensor_proto([image_bytes], dtype=tf.string))
    return request


def top_k(response: predict_pb2.PredictResponse) -> List[Tuple[str, float]]:
    """(image id, score) pairs of the first query in a retrieval response."""
    missing = [name for name in (S.IMAGE_IDS, S.SCORES) if name not in response.outputs]
    if missing:
        raise ClicklensError(
            f"query: {response.model_spec.name} answered without {' and '.join(missing)}: it is not a "
            f"retrieval model (ask {' or '.join(S.RETRIEVAL_MODELS)} with --model)")
    ids = tf.make_ndarray(response.outputs[S.IMAGE_IDS])[0]
    scores = tf.make_ndarray(response.outputs[S.SCORES])[0]
    return [(i.decode("utf-8"), float(s)) for i, s in zip(ids, scores)]


def predict(address: str, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Sends one Predict request over gRPC; a failure is a ClicklensError naming the status code."""
    with grpc.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            return stub.Predict(request, timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as err:
            hint = RPC_HINTS.get(err.code())
            raise ClicklensError(f"query: {address}: {err.code().name}: {err.details()}"
                                 + (f" ({hint})" if hint else "")) from None


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


class Explainer:
    """What each result is: its catalog entry's extra keys, and ✓ where the ground truth calls it relevant."""

    def __init__(self, workdir):
        import tensorflow as tf

        entries = list(read_catalog(workdir.catalog)) if tf.io.gfile.exists(workdir.catalog) else []
        self.descriptions: Dict[str, str] = {
            e.image_id: " ".join(str(v) for _, v in e.extra) for e in entries}
        self.paths: Dict[str, str] = {
            os.path.abspath(resolve_uri(e.uri, workdir.catalog)): e.image_id for e in entries if e.uri}
        self.relevant: Dict[str, Set[str]] = read_ground_truth(workdir.ground_truth)

    def annotator(self, text: Optional[str]) -> Callable[[str], str]:
        """annotate(image_id) -> "✓ red circle small solid light" (✓ when relevant to `text`)."""
        relevant = self.relevant.get(normalize_query(text), set()) if text else set()
        return lambda image_id: f"{'✓' if image_id in relevant else ' '} {self.descriptions.get(image_id, '')}"

    def query_image(self, path: str) -> str:
        """The catalog description of a query image file, when the file is a catalog image."""
        image_id = self.paths.get(os.path.abspath(path))
        return f"{image_id}: {self.descriptions.get(image_id, '')}" if image_id else ""

    def summary(self, text: str, image_ids: List[str]) -> str:
        """"7 of 10 relevant per the ground truth (chance: 0.1)", or "" without ground truth for `text`."""
        relevant = self.relevant.get(normalize_query(text))
        if relevant is None:
            return ""
        hits = sum(i in relevant for i in image_ids)
        chance = len(relevant) / max(1, len(self.descriptions)) * len(image_ids)
        return f"     {hits} of {len(image_ids)} relevant per the ground truth (chance: {chance:.1f})"


def run(config, workdir, args) -> int:
    """Sends args.text or args.image to args.server and prints the ranked image ids."""
    if (args.text is None) == (args.image is None):
        raise ClicklensError("query: give a query text or --image FILE (one of them)")
    if args.text is not None and not normalize_query(args.text[:MAX_QUERY_INPUT_BYTES]):
        # The model would answer with the images nearest the empty query's embedding: noise.
        raise ClicklensError(f"query: {args.text!r} is empty once normalised (only spaces or invisible characters)")
    image_bytes = read_query_image(args.image) if args.image is not None else None
    address = args.server or f"{config.serving.host}:{config.serving.grpc_port}"
    request = build_request(args.model, text=args.text, image_bytes=image_bytes, version=args.version)
    response = predict(address, request)
    explainer = Explainer(workdir) if args.explain else None
    query_image = explainer.query_image(args.image) if explainer and args.image is not None else ""
    if query_image:
        print(f"     (the query image is {query_image})")
    print_results(response, repr(args.text) if args.text is not None else args.image,
                  annotate=explainer.annotator(args.text) if explainer else None)
    if explainer and args.text is not None:
        summary = explainer.summary(args.text, [image_id for image_id, _ in top_k(response)])
        if summary:
            print(summary)
    return 0
