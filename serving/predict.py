"""Running one Predict call on a loaded model version, with TF Serving's checks.

Both front ends (gRPC in grpc_service.py, REST in rest.py) turn their request
into named numpy arrays and call `predict`; errors are `ServingError`s carrying
the canonical status code TF Serving would return.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional

import grpc
import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens.servables import DEFAULT_SIGNATURE


class ServingError(Exception):
    """A request that fails with a canonical status code (grpc.StatusCode)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


_TF_ERROR_CODES = {code.value[0]: code for code in grpc.StatusCode}


def signature_function(model, signature_name: str):
    """The concrete function of a signature; FAILED_PRECONDITION if there is none (as TF Serving)."""
    name = signature_name or DEFAULT_SIGNATURE
    signatures = model.signatures
    if name not in signatures:
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                           f'Serving signature key "{name}" not found. Known: {sorted(signatures)}')
    return signatures[name]


def input_specs(function) -> Dict[str, tf.TensorSpec]:
    """Input name -> TensorSpec of a signature function."""
    return dict(function.structured_input_signature[1])


def numpy_dtype(array: np.ndarray) -> tf.DType:
    """The TF dtype of a numpy array (bytes, str and object arrays are tf.string)."""
    if array.dtype.kind in "SUO":
        return tf.string
    return tf.as_dtype(array.dtype)


def check_inputs(specs: Mapping[str, tf.TensorSpec], dtypes: Mapping[str, tf.DType],
                 shapes: Mapping[str, Iterable[int]], max_batch: int) -> None:
    """INVALID_ARGUMENT unless inputs match the signature's names, dtypes and shapes."""
    if set(dtypes) != set(specs):
        missing = sorted(set(specs) - set(dtypes))
        extra = sorted(set(dtypes) - set(specs))
        raise invalid(f"input names do not match the signature: missing {missing}, unexpected {extra}; "
                      f"expected exactly {sorted(specs)}")
    for name, spec in specs.items():
        if dtypes[name] != spec.dtype:
            raise invalid(f"input {name!r}: expects dtype {spec.dtype.name}, got {dtypes[name].name}")
        shape = tf.TensorShape(list(shapes[name]))
        if not spec.shape.is_compatible_with(shape):
            raise invalid(f"input {name!r}: expects shape {spec.shape}, got {shape}")
        if shape.rank and shape[0] is not None and shape[0] > max_batch:
            raise invalid(f"input {name!r}: batch of {shape[0]} exceeds serving.max_batch={max_batch}")
        if shape.rank and shape[0] == 0:
            raise invalid(f"input {name!r}: empty batch")


def predict(model, signature_name: str, inputs: Mapping[str, np.ndarray], max_batch: int,
            output_filter: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """Runs a signature on checked numpy inputs; returns the (filtered) outputs as numpy."""
    function = signature_function(model, signature_name)
    specs = input_specs(function)
    check_inputs(specs, {k: numpy_dtype(v) for k, v in inputs.items()}, {k: v.shape for k, v in inputs.items()},
                 max_batch)
    wanted = list(output_filter or [])
    outputs_known = set(function.structured_outputs)
    unknown = [name for name in wanted if name not in outputs_known]
    if unknown:
        raise invalid(f"output_filter names unknown outputs {unknown}; known: {sorted(outputs_known)}")
    batch_sizes = {v.shape[0] for v in inputs.values() if v.ndim}
    if len(batch_sizes) > 1:
        raise invalid(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
    try:
        outputs = function(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in inputs.items()})
    except tf.errors.OpError as err:
        raise ServingError(_TF_ERROR_CODES.get(err.error_code, grpc.StatusCode.INTERNAL), err.message) from None
    except (TypeError, ValueError) as err:
        raise invalid(str(err)) from None
    names = wanted or list(outputs)
    return {name: outputs[name].numpy() for name in names}


# ---------------------------------------------------------------------------
# TensorProto <-> numpy (gRPC requests and the warmup records).


def proto_inputs(request, function) -> Dict[str, np.ndarray]:
    """A PredictRequest's inputs as numpy, with dtypes checked against the signature first."""
    specs = input_specs(function)
    for name, proto in request.inputs.items():
        if name in specs and proto.dtype != specs[name].dtype.as_datatype_enum:
            got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "DT_INVALID"
            raise invalid(f"input {name!r}: expects dtype {specs[name].dtype.name}, got {got}")
    arrays = {}
    for name, proto in request.inputs.items():
        try:
            arrays[name] = tf.make_ndarray(proto)
        except (TypeError, ValueError) as err:
            raise invalid(f"input {name!r}: malformed TensorProto: {err}") from None
    return arrays


def predict_proto(model, request, max_batch: int) -> Dict[str, np.ndarray]:
    """Runs a PredictRequest on a loaded model; returns the outputs as numpy."""
    function = signature_function(model, request.model_spec.signature_name)
    return predict(model, request.model_spec.signature_name, proto_inputs(request, function), max_batch,
                   output_filter=request.output_filter)
