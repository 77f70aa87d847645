"""Classify, Regress and MultiInference over tf.Example inputs, as TF Serving runs them on SavedModels.

A classification or regression signature takes one input, a batch of
serialized tf.Examples (tf.string [batch]).  Classify reads its outputs
`classes` (tf.string [batch, n]) and/or `scores` (float [batch, n]); Regress
reads `outputs` (float [batch] or [batch, 1]).  As tensorflow_model_server does
by default since signature method names stopped being written by TF2
(--enable_signature_method_name_check=false), a signature is judged by those
inputs and outputs, not by its method_name, so models saved with
tf.saved_model.save work.

An Input is an ExampleList, or an ExampleListWithContext whose context is
merged into every example (each example's own features win): the context's
serialized bytes followed by the example's, which is protobuf's merge.

Both front ends (gRPC here, REST in serving/rest.py through `examples_from_json`)
build the same Input proto and call `classify` / `regress`.
"""

from __future__ import annotations

import base64
from typing import Any, Dict, List, Mapping, Optional

import grpc
import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, inference_pb2, input_pb2, regression_pb2

from clicklens.servables import DEFAULT_SIGNATURE
from serving.predict import ServingError, execute, input_specs, invalid, prepare, signature_function

CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
CLASSES = "classes"
SCORES = "scores"
OUTPUTS = "outputs"


def serialized_examples(request_input: input_pb2.Input) -> List[bytes]:
    """The Input's examples, serialized, each with the context merged in; INVALID_ARGUMENT when there are none."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = [e.SerializeToString() for e in request_input.example_list.examples]
    elif kind == "example_list_with_context":
        with_context = request_input.example_list_with_context
        context = with_context.context.SerializeToString()
        examples = [context + e.SerializeToString() for e in with_context.examples]
    else:
        examples = []
    if not examples:
        raise invalid("Input is empty.")
    return examples


def _run(loaded, signature_name: str, request_input: input_pb2.Input, max_batch: int, runner=None
         ) -> Dict[str, np.ndarray]:
    """Runs a one-input signature on the serialized examples of `request_input`."""
    function = signature_function(loaded.model, signature_name)
    specs = input_specs(function)
    if len(specs) != 1:
        raise invalid(f"Expected one input Tensor, signature {signature_name or DEFAULT_SIGNATURE!r} has "
                      f"{len(specs)}: {sorted(specs)}")
    (name,) = specs
    if specs[name].dtype != tf.string:
        raise invalid(f"Expected the input Tensor to be serialized tf.Examples (string), "
                      f"signature input {name!r} is {specs[name].dtype.name}")
    examples = np.array(serialized_examples(request_input), dtype=object)
    call = prepare(loaded.model, signature_name, {name: examples}, max_batch)
    return runner.run(loaded, call) if runner is not None else execute(call)


def _batch_rows(array: np.ndarray, rows: int, output: str, rank: int) -> np.ndarray:
    if array.ndim != rank or array.shape[0] != rows:
        expected = "[batch_size num_classes]" if rank == 2 else "[batch_size]"
        raise invalid(f"Expected Tensor shape: {expected} but got {list(array.shape)} for output {output!r}")
    return array


def classification_result(outputs: Mapping[str, np.ndarray], rows: int) -> classification_pb2.ClassificationResult:
    """The classes / scores outputs of a classification signature as a ClassificationResult."""
    if CLASSES not in outputs and SCORES not in outputs:
        raise invalid(f"Expected classification signature outputs to contain {CLASSES!r} and/or {SCORES!r}, "
                      f"got {sorted(outputs)}")
    classes = _batch_rows(outputs[CLASSES], rows, CLASSES, 2) if CLASSES in outputs else None
    scores = _batch_rows(outputs[SCORES], rows, SCORES, 2) if SCORES in outputs else None
    if classes is not None and classes.dtype.kind not in "SO":
        raise invalid(f"Expected classes Tensor of DT_STRING, got {classes.dtype}")
    if scores is not None and scores.dtype.kind != "f":
        raise invalid(f"Expected scores Tensor of DT_FLOAT, got {scores.dtype}")
    if classes is not None and scores is not None and classes.shape != scores.shape:
        raise invalid(f"Tensors class and score should match in shape: {list(classes.shape)} vs "
                      f"{list(scores.shape)}")
    width = (classes if classes is not None else scores).shape[1]
    result = classification_pb2.ClassificationResult()
    for row in range(rows):
        classifications = result.classifications.add()
        for column in range(width):
            entry = classifications.classes.add()
            if classes is not None:
                entry.label = classes[row, column].decode("utf-8", "replace")
            if scores is not None:
                entry.score = float(scores[row, column])
    return result


def regression_result(outputs: Mapping[str, np.ndarray], rows: int) -> regression_pb2.RegressionResult:
    """The `outputs` output of a regression signature as a RegressionResult."""
    if OUTPUTS not in outputs:
        raise invalid(f"Expected regression signature output {OUTPUTS!r}, got {sorted(outputs)}")
    values = outputs[OUTPUTS]
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    values = _batch_rows(values, rows, OUTPUTS, 1)
    if values.dtype.kind != "f":
        raise invalid(f"Expected output Tensor of DT_FLOAT, got {values.dtype}")
    result = regression_pb2.RegressionResult()
    for value in values:
        result.regressions.add().value = float(value)
    return result


def classify(loaded, signature_name: str, request_input: input_pb2.Input, max_batch: int, runner=None
             ) -> classification_pb2.ClassificationResult:
    """Runs a classification signature on tf.Examples."""
    outputs = _run(loaded, signature_name, request_input, max_batch, runner)
    return classification_result(outputs, _rows(request_input))


def regress(loaded, signature_name: str, request_input: input_pb2.Input, max_batch: int, runner=None
            ) -> regression_pb2.RegressionResult:
    """Runs a regression signature on tf.Examples."""
    outputs = _run(loaded, signature_name, request_input, max_batch, runner)
    return regression_result(outputs, _rows(request_input))


def _rows(request_input: input_pb2.Input) -> int:
    return len(serialized_examples(request_input))


def set_model_spec(spec, loaded, signature_name: str) -> None:
    """A response's model_spec: the model, the version that ran, the signature (serving_default if unnamed)."""
    spec.name = loaded.name
    spec.version.value = loaded.version
    spec.signature_name = signature_name or DEFAULT_SIGNATURE


def multi_inference(registry, request: inference_pb2.MultiInferenceRequest, max_batch: int, runner=None,
                    version_of=None) -> inference_pb2.MultiInferenceResponse:
    """Runs every task of a MultiInferenceRequest on one model version and the request's one Input.

    `version_of(model_spec)` gives the (version, label) a spec asks for."""
    tasks = list(request.tasks)
    if not tasks:
        raise invalid("Found no tasks in the MultiInferenceRequest.")
    names = {task.model_spec.name for task in tasks}
    if len(names) > 1:
        raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
    signatures = [task.model_spec.signature_name or DEFAULT_SIGNATURE for task in tasks]
    for i, signature in enumerate(signatures):
        if signature in signatures[:i]:
            raise invalid(f"Duplicate evaluation of signature: {signature}")
    for task in tasks:
        if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported signature method_name: {task.method_name}")
    loaded = registry.get(tasks[0].model_spec.name, *version_of(tasks[0].model_spec))
    response = inference_pb2.MultiInferenceResponse()
    for task in tasks:
        result = response.results.add()
        set_model_spec(result.model_spec, loaded, task.model_spec.signature_name)
        if task.method_name == CLASSIFY_METHOD:
            result.classification_result.CopyFrom(
                classify(loaded, task.model_spec.signature_name, request.input, max_batch, runner))
        else:
            result.regression_result.CopyFrom(
                regress(loaded, task.model_spec.signature_name, request.input, max_batch, runner))
    return response


# -- REST: JSON examples -> Input --------------------------------------------------


def _feature(value: Any, name: str) -> tf.train.Feature:
    """One JSON feature value (a scalar or a list of one kind) as a tf.train.Feature, typed as TF Serving's REST
    API types it: strings and {"b64": ...} are bytes, integers int64, other numbers float."""
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, str) or (isinstance(v, dict) and set(v) == {"b64"}) for v in values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[_bytes(v, name) for v in values]))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    raise invalid(f"feature {name!r}: values must all be numbers or all strings, got {value!r}"[:300])


def _bytes(value: Any, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (TypeError, ValueError):
        raise invalid(f"feature {name!r}: invalid base64") from None


def _float32(value: float) -> float:
    """A float32 as TF Serving's JSON writes it: the shortest decimal that reads back as the same float32."""
    return float(str(np.float32(value)))


def _example(obj: Any, where: str) -> tf.train.Example:
    if not isinstance(obj, dict):
        raise invalid(f"{where} must be a JSON object of features")
    example = tf.train.Example()
    for name, value in obj.items():
        example.features.feature[name].CopyFrom(_feature(value, name))
    return example


def input_from_json(body: Mapping[str, Any]) -> input_pb2.Input:
    """The Input of a REST :classify / :regress body: "examples" (a list of objects) and an optional "context"."""
    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise invalid('"examples" must be a non-empty list of JSON objects')
    request_input = input_pb2.Input()
    context: Optional[Any] = body.get("context")
    if context is not None:
        with_context = request_input.example_list_with_context
        with_context.context.CopyFrom(_example(context, '"context"'))
        target = with_context.examples
    else:
        target = request_input.example_list.examples
    for i, obj in enumerate(examples):
        target.add().CopyFrom(_example(obj, f'"examples"[{i}]'))
    return request_input


def classification_json(result: classification_pb2.ClassificationResult) -> Dict[str, Any]:
    """TF Serving's :classify body: {"results": [[[label, score], ...] per example]}."""
    return {"results": [[[c.label, _float32(c.score)] for c in row.classes] for row in result.classifications]}


def regression_json(result: regression_pb2.RegressionResult) -> Dict[str, Any]:
    """TF Serving's :regress body: {"results": [value per example]}."""
    return {"results": [_float32(r.value) for r in result.regressions]}
