"""TF Serving's BatchingParameters and MonitoringConfig messages, for reading their text-proto files.

The tensorflow-serving-api wheel ships the API and model-config protos but not
`servables/tensorflow/session_bundle_config.proto` or
`config/monitoring_config.proto`.  The two messages are rebuilt here in a
private descriptor pool with TF Serving's package, names, field numbers and
types, so a file written for tensorflow_model_server's
`--batching_parameters_file` or `--monitoring_config_file` parses here exactly
as it does there, and a field TF Serving does not know is refused the same way.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens.errors import ClicklensError

_F = descriptor_pb2.FieldDescriptorProto

# (name, number, wrapper type or scalar type, repeated) as in TF Serving's session_bundle_config.proto.
_BATCHING_FIELDS = [
    ("max_batch_size", 1, ".google.protobuf.Int64Value", False),
    ("batch_timeout_micros", 2, ".google.protobuf.Int64Value", False),
    ("max_enqueued_batches", 3, ".google.protobuf.Int64Value", False),
    ("num_batch_threads", 4, ".google.protobuf.Int64Value", False),
    ("thread_pool_name", 5, ".google.protobuf.StringValue", False),
    ("allowed_batch_sizes", 6, _F.TYPE_INT64, True),
    ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, False),
    ("enable_large_batch_splitting", 8, ".google.protobuf.BoolValue", False),
    ("max_execution_batch_size", 9, ".google.protobuf.Int64Value", False),
]


def _add_field(message: descriptor_pb2.DescriptorProto, name: str, number: int, kind, repeated: bool = False) -> None:
    field = message.field.add(name=name, number=number,
                              label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if isinstance(kind, str):
        field.type, field.type_name = _F.TYPE_MESSAGE, kind
    else:
        field.type = kind


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(name="clicklens/tf_serving_protos.proto", package="tensorflow.serving",
                                              syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    batching = file.message_type.add(name="BatchingParameters")
    for name, number, kind, repeated in _BATCHING_FIELDS:
        _add_field(batching, name, number, kind, repeated)
    prometheus = file.message_type.add(name="PrometheusConfig")
    _add_field(prometheus, "enable", 1, _F.TYPE_BOOL)
    _add_field(prometheus, "path", 2, _F.TYPE_STRING)
    monitoring = file.message_type.add(name="MonitoringConfig")
    _add_field(monitoring, "prometheus_config", 1, ".tensorflow.serving.PrometheusConfig")
    pool.Add(file)
    return pool


_POOL = _build_pool()
BatchingParameters = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
MonitoringConfig = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


def read_text_proto(path: str, message_class):
    """Parses a protobuf text file (local or any TF filesystem); ClicklensError naming the file and the field."""
    if not tf.io.gfile.exists(path):
        raise ClicklensError(f"{path}: file not found")
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    message = message_class()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        raise ClicklensError(f"{path}: not a TF Serving {message_class.DESCRIPTOR.name}: {err}") from None
    return message
