"""Running one Predict call on a loaded model version, with TF Serving's checks.

Both front ends (gRPC in grpc_service.py, REST in rest.py) turn their request
into named numpy arrays and `prepare` a call (every check TF Serving makes
before running); `execute` runs it, alone or merged with others by the batcher
(serving/batcher.py).  Errors are `ServingError`s carrying the canonical status
code TF Serving would return.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional

import grpc
import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from clicklens.servables import DEFAULT_SIGNATURE


class ServingError(Exception):
    """A request that fails with a canonical status code (grpc.StatusCode)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# The most characters of a status message sent back over gRPC.  It travels as a percent-encoded trailer, and
# clients drop a response whose metadata passes 16 KiB: a request's own 100 KB model name, echoed whole in
# "Servable not found", would turn NOT_FOUND into RESOURCE_EXHAUSTED.  512 CJK characters encode to 4.6 KB.
MAX_STATUS_MESSAGE_CHARS = 512


def status_message(message: str) -> str:
    """`message` cut to MAX_STATUS_MESSAGE_CHARS for a gRPC status, saying how long it was."""
    if len(message) <= MAX_STATUS_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_STATUS_MESSAGE_CHARS - 40]}... ({len(message)} characters in all)"


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


@dataclasses.dataclass
class PreparedCall:
    """A checked Predict call: the signature function, its input specs, the inputs and the outputs wanted."""

    signature_name: str
    function: object
    specs: Dict[str, tf.TensorSpec]
    inputs: Dict[str, np.ndarray]
    output_names: List[str]
    batch_size: Optional[int]  # rows of the inputs; None when no input has a batch dimension

    @property
    def batchable(self) -> bool:
        """True when every input's first dimension is a free batch dimension (so calls can be merged)."""
        return self.batch_size is not None and all(
            spec.shape.rank and spec.shape[0] is None for spec in self.specs.values())


def prepare(model, signature_name: str, inputs: Mapping[str, np.ndarray], max_batch: int,
            output_filter: Optional[Iterable[str]] = None) -> PreparedCall:
    """Checks a Predict call on numpy inputs against the signature (INVALID_ARGUMENT / FAILED_PRECONDITION)."""
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
    return PreparedCall(signature_name or DEFAULT_SIGNATURE, function, specs, dict(inputs),
                        wanted or list(function.structured_outputs), next(iter(batch_sizes)) if batch_sizes else None)


def execute(call: PreparedCall, inputs: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Runs a prepared call (on `inputs` instead of its own, for a merged batch); outputs as numpy."""
    inputs = call.inputs if inputs is None else inputs
    try:
        outputs = call.function(**{k: tf.constant(v, dtype=call.specs[k].dtype) for k, v in inputs.items()})
    except tf.errors.OpError as err:
        raise ServingError(_TF_ERROR_CODES.get(err.error_code, grpc.StatusCode.INTERNAL), err.message) from None
    except (TypeError, ValueError) as err:
        raise invalid(str(err)) from None
    return {name: outputs[name].numpy() for name in call.output_names}


def predict(model, signature_name: str, inputs: Mapping[str, np.ndarray], max_batch: int,
            output_filter: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """Runs a signature on checked numpy inputs; returns the (filtered) outputs as numpy."""
    return execute(prepare(model, signature_name, inputs, max_batch, output_filter))


# ---------------------------------------------------------------------------
# TensorProto <-> numpy (gRPC requests and the warmup records).


# The repeated field holding each dtype's values when a TensorProto has no tensor_content, and how many
# entries of that field make one value (complex numbers take two).
_VALUE_FIELDS = {
    types_pb2.DT_STRING: ("string_val", 1), types_pb2.DT_FLOAT: ("float_val", 1),
    types_pb2.DT_DOUBLE: ("double_val", 1), types_pb2.DT_INT64: ("int64_val", 1),
    types_pb2.DT_UINT32: ("uint32_val", 1), types_pb2.DT_UINT64: ("uint64_val", 1),
    types_pb2.DT_BOOL: ("bool_val", 1), types_pb2.DT_HALF: ("half_val", 1), types_pb2.DT_BFLOAT16: ("half_val", 1),
    types_pb2.DT_COMPLEX64: ("scomplex_val", 2), types_pb2.DT_COMPLEX128: ("dcomplex_val", 2),
    **{t: ("int_val", 1) for t in (types_pb2.DT_INT32, types_pb2.DT_INT16, types_pb2.DT_INT8, types_pb2.DT_UINT8,
                                   types_pb2.DT_UINT16)},
}


def dtype_name(enum: int) -> str:
    """The name of a TensorProto's dtype enum, also for values outside TF's DataType (a hostile request's)."""
    if not enum:
        return "DT_INVALID"
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"DataType {enum}"


def values_present(proto: tensor_pb2.TensorProto) -> int:
    """How many values a TensorProto actually carries (in tensor_content or its dtype's repeated field)."""
    if proto.tensor_content:
        try:
            itemsize = tf.dtypes.as_dtype(proto.dtype).size if proto.dtype != types_pb2.DT_STRING else 0
        except TypeError:
            raise invalid(f"unsupported dtype {dtype_name(proto.dtype)}") from None
        if not itemsize or len(proto.tensor_content) % itemsize:
            raise invalid(f"tensor_content of {len(proto.tensor_content)} bytes does not hold whole "
                          f"{dtype_name(proto.dtype)} values")
        return len(proto.tensor_content) // itemsize
    field, per_value = _VALUE_FIELDS.get(proto.dtype, (None, 1))
    if field is None:
        raise invalid(f"unsupported dtype {dtype_name(proto.dtype)}")
    return len(getattr(proto, field)) // per_value


def check_declared_shape(name: str, proto: tensor_pb2.TensorProto) -> None:
    """INVALID_ARGUMENT unless a TensorProto's declared shape holds exactly the values it carries.

    Checked before anything is allocated: a 52-byte request may declare a shape of 2^28 strings, and
    tf.make_ndarray would build all of them (repeating the last value, TensorProto's compression) before
    any batch-size check could refuse it."""
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"input {name!r}: the shape must be known")
    present = values_present(proto)
    sizes = [dim.size for dim in proto.tensor_shape.dim]
    if any(size < 0 for size in sizes):
        raise invalid(f"input {name!r}: negative dimension in the shape {sizes}")
    declared = 0 if 0 in sizes else 1
    for size in sizes if declared else ():
        declared *= size
        if declared > present:  # stop early: the product of huge dims is never needed
            break
    if declared != present:
        shape = sizes
        declares = f"more than {present}" if declared > present else f"{declared}"
        raise invalid(f"input {name!r}: shape {shape} declares {declares} values, the tensor holds {present}")


def proto_inputs(request, function) -> Dict[str, np.ndarray]:
    """A PredictRequest's inputs as numpy, with dtypes checked against the signature first."""
    specs = input_specs(function)
    for name, proto in request.inputs.items():
        if name in specs and proto.dtype != specs[name].dtype.as_datatype_enum:
            raise invalid(f"input {name!r}: expects dtype {specs[name].dtype.name}, got {dtype_name(proto.dtype)}")
    arrays = {}
    for name, proto in request.inputs.items():
        check_declared_shape(name, proto)
        try:
            arrays[name] = tf.make_ndarray(proto)
        except (TypeError, ValueError) as err:
            raise invalid(f"input {name!r}: malformed TensorProto: {err}") from None
    return arrays


_FAST_DTYPES = {np.dtype(t): tf.as_dtype(t).as_datatype_enum for t in (np.float32, np.float64, np.int32, np.int64)}


def tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """An output as a TensorProto, equal to tf.make_tensor_proto's for strings and float/int 32/64 (built
    directly: tf.make_tensor_proto's per-call checks cost more than a small model's whole response)."""
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape])
    if array.dtype.kind == "S" or (array.dtype.kind == "O" and all(isinstance(v, bytes) for v in array.flat)):
        return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=array.ravel().tolist())
    if array.dtype in _FAST_DTYPES and array.size > 1:  # (TF writes one-value tensors as float_val etc.)
        return tensor_pb2.TensorProto(dtype=_FAST_DTYPES[array.dtype], tensor_shape=shape,
                                      tensor_content=np.ascontiguousarray(array).tobytes())
    return tf.make_tensor_proto(array)


def prepare_proto(model, request, max_batch: int) -> PreparedCall:
    """A PredictRequest, checked and ready to execute."""
    function = signature_function(model, request.model_spec.signature_name)
    return prepare(model, request.model_spec.signature_name, proto_inputs(request, function), max_batch,
                   output_filter=request.output_filter)


def predict_proto(model, request, max_batch: int) -> Dict[str, np.ndarray]:
    """Runs a PredictRequest on a loaded model; returns the outputs as numpy."""
    return execute(prepare_proto(model, request, max_batch))
