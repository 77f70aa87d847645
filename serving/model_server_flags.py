"""tensorflow_model_server's command line: its flags, read into a ServingConfig, ServerOptions and models.

    clicklens-model-server --port=8500 --rest_api_port=8501 --model_name=NAME --model_base_path=/models/NAME
    clicklens-model-server --port=8500 --model_config_file=/models/models.config \
        --model_config_file_poll_wait_seconds=60
    clicklens serve --workdir W --port=8500 --rest_api_port=8501      (the same flags)

Flags are written as TF Serving's parser takes them (`--name=value`; `-name`
works too; a bool may be given bare, `--enable_batching`), and also as
`--name value` for non-bool flags.  Defaults are tensorflow_model_server's
(REST off until --rest_api_port is set, one load attempt plus 5 retries a
minute apart, ...).  A TF Serving flag this server does not carry out is
refused at start, with the reason and the list of supported flags, rather than
silently ignored: a deployment must never believe it runs with a setting it
does not have.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from clicklens.errors import ClicklensError
from serving.server_options import ServerOptions

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default"


@dataclasses.dataclass(frozen=True)
class Flag:
    """One supported flag: its type ("int", "str", "bool"), tensorflow_model_server's default and meaning."""

    kind: str
    default: object
    help: str


FLAGS: Dict[str, Flag] = {
    "port": Flag("int", 8500, "gRPC port (0 picks a free one)"),
    "grpc_socket_path": Flag("str", "", "also serve gRPC on this Unix domain socket"),
    "rest_api_port": Flag("int", 0, "REST port; 0 turns REST off"),
    "rest_api_timeout_in_ms": Flag("int", 30000, "REST: the longest a request may take to arrive"),
    "rest_api_num_threads": Flag("int", 0, "accepted; every REST connection has its own thread here"),
    "grpc_channel_arguments": Flag("str", "", "gRPC server arguments, key=value[,key=value...]"),
    "grpc_max_threads": Flag("int", 0, "gRPC worker threads (0: serving.workers)"),
    "enable_grpc_healthcheck_service": Flag("bool", False, "accepted; grpc.health.v1.Health is always on"),
    "model_name": Flag("str", DEFAULT_MODEL_NAME, "name of the one model of --model_base_path"),
    "model_base_path": Flag("str", "", "folder of the one model's integer version folders"),
    "model_config_file": Flag("str", "", "a ModelServerConfig text proto (takes precedence over --model_base_path)"),
    "model_config_file_poll_wait_seconds": Flag("int", 0, "re-read --model_config_file this often; 0: never"),
    "file_system_poll_wait_seconds": Flag("int", 1, "look for new versions this often; 0: only at start"),
    "max_num_load_retries": Flag("int", 5, "retries after a failed load"),
    "num_load_threads": Flag("int", 0, "versions loaded at once while polling goes on; 0: one after another"),
    "load_retry_interval_micros": Flag("int", 60_000_000, "wait between load retries"),
    "enable_model_warmup": Flag("bool", True, "replay assets.extra/tf_serving_warmup_requests before serving"),
    "enable_batching": Flag("bool", False, "merge concurrent requests into batches"),
    "batching_parameters_file": Flag("str", "", "a BatchingParameters text proto (with --enable_batching)"),
    "monitoring_config_file": Flag("str", "", "a MonitoringConfig text proto (the Prometheus page)"),
    "allow_version_labels_for_unavailable_models": Flag("bool", False, "labels may name versions not yet loaded"),
    "saved_model_tags": Flag("str", "serve", "meta graph tags; only serve"),
    "enable_signature_method_name_check": Flag("bool", False, "only false: signatures are judged by their tensors"),
}

# tensorflow_model_server flags that are refused, and why.
REFUSED: Dict[str, str] = {
    "ssl_config_file": "TLS is not built in; terminate TLS in front of the server (an ingress or a sidecar)",
    "platform_config_file": "only the TensorFlow SavedModel platform, with its default session options, is served",
    "use_tflite_model": "TensorFlow Lite models are not served",
    "prefer_tflite_model": "TensorFlow Lite models are not served",
    "num_tflite_pools": "TensorFlow Lite models are not served",
    "num_tflite_interpreters_per_pool": "TensorFlow Lite models are not served",
    "enable_profiler": "the TensorFlow profiler service is not served",
    "per_process_gpu_memory_fraction": "GPU settings: this server runs on CPUs",
    "tensorflow_session_parallelism": "a TF1 session option with no TF2 equivalent",
    "tensorflow_intra_op_parallelism": "TensorFlow's thread pools keep their defaults (one per CPU)",
    "tensorflow_inter_op_parallelism": "TensorFlow's thread pools keep their defaults (one per CPU)",
    "rest_api_enable_cors_support": "CORS headers are not sent",
    "xla_cpu_compilation_enabled": "XLA compilation is not switched on per server",
    "enable_session_metadata": "session metadata is not passed to models",
    "mixed_precision": "models run in the precision they were saved in",
    "remove_unused_fields_from_bundle_metagraph": "the meta graph is kept whole",
    "flush_filesystem_caches": "file system caches are left to the file system",
}

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class FlagError(ClicklensError):
    """A command line tensorflow_model_server would not run, or this server does not support."""


def usage() -> str:
    """The supported flags, one a line, with TF Serving's defaults."""
    width = max(map(len, FLAGS)) + 2
    lines = ["supported tensorflow_model_server flags:"]
    for name, flag in FLAGS.items():
        default = str(flag.default).lower() if flag.kind == "bool" else repr(flag.default)
        lines.append(f"  --{name.ljust(width)} {flag.kind}, default {default}: {flag.help}")
    return "\n".join(lines)


def _refuse(name: str, reason: str) -> FlagError:
    return FlagError(f"--{name}: {reason}\n{usage()}")


def _value(name: str, flag: Flag, text: Optional[str]):
    if flag.kind == "bool":
        lowered = "true" if text is None else text.lower()
        if lowered not in _TRUE + _FALSE:
            raise FlagError(f"--{name}: expects true or false, got {text!r}")
        return lowered in _TRUE
    if text is None:
        raise FlagError(f"--{name}: needs a value (--{name}=...)")
    if flag.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise FlagError(f"--{name}: expects an integer, got {text!r}") from None
    return text


def parse_flags(argv: Sequence[str]) -> Dict[str, object]:
    """{flag: value} of the flags given (defaults not filled in); FlagError for anything else."""
    given: Dict[str, object] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-") or token in ("-", "--"):
            raise _refuse(token, "not a flag (tensorflow_model_server takes no positional arguments)")
        name, sep, text = token.lstrip("-").partition("=")
        value_text: Optional[str] = text if sep else None
        if name not in FLAGS:
            raise _refuse(name, REFUSED.get(name, "not a tensorflow_model_server flag this server supports"))
        flag = FLAGS[name]
        if value_text is None and flag.kind != "bool" and i < len(args) and not args[i].startswith("--"):
            value_text = args[i]
            i += 1
        given[name] = _value(name, flag, value_text)
    return given


def value(given: Dict[str, object], name: str):
    """A flag's value: as given, or tensorflow_model_server's default."""
    return given.get(name, FLAGS[name].default)


def channel_arguments(text: str) -> Tuple[Tuple[str, object], ...]:
    """--grpc_channel_arguments "key=value,key=value": integer values as integers, as TF Serving passes them."""
    pairs: List[Tuple[str, object]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FlagError(f"--grpc_channel_arguments: {item!r} is not key=value")
        try:
            pairs.append((key, int(raw)))
        except ValueError:
            pairs.append((key, raw))
    return tuple(pairs)


def _checked(given: Dict[str, object]) -> None:
    for name in ("port", "rest_api_port"):
        if not 0 <= value(given, name) <= 65535:
            raise FlagError(f"--{name}: must be a port number (0-65535), got {value(given, name)}")
    for name in ("rest_api_timeout_in_ms", "max_num_load_retries", "load_retry_interval_micros",
                 "model_config_file_poll_wait_seconds", "grpc_max_threads", "rest_api_num_threads", "num_load_threads"):
        if value(given, name) < 0:
            raise FlagError(f"--{name}: must not be negative, got {value(given, name)}")
    if value(given, "saved_model_tags") != "serve":
        raise _refuse("saved_model_tags", "only the 'serve' meta graph is served")
    if value(given, "enable_signature_method_name_check"):
        raise _refuse("enable_signature_method_name_check",
                      "signatures are judged by their inputs and outputs (TF Serving's default, false)")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What a command line asks for: the serving config, the server options, and the models (None: the
    caller's default, e.g. `clicklens serve`'s W/export/models.config)."""

    serving: object  # clicklens.config.ServingConfig
    options: ServerOptions
    models: Optional[list]


def settings(argv: Sequence[str], serving, standalone: bool = True,
             read_models: Optional[Callable] = None) -> ServerSettings:
    """Applies a tensorflow_model_server command line to `serving` (a ServingConfig).

    `standalone` (clicklens-model-server): every flag not given takes tensorflow_model_server's default, and a
    command line naming neither --model_base_path nor --model_config_file is refused, as there.  Otherwise
    (`clicklens serve`) only the flags given change the config, and the models default to the caller's.
    `read_models(path)` reads a models config file (default: clicklens.models_config.read)."""
    from clicklens import models_config  # (imports TensorFlow: only once flags are being applied)

    given = parse_flags(argv)
    _checked(given)
    read_models = read_models or models_config.read

    def wanted(name: str) -> bool:
        return standalone or name in given

    changes: Dict[str, object] = {}
    if wanted("port"):
        changes["grpc_port"] = value(given, "port")
    if value(given, "rest_api_port"):
        changes["http_port"] = value(given, "rest_api_port")
    if wanted("rest_api_timeout_in_ms"):
        changes["http_timeout_seconds"] = min(3600.0, max(0.05, value(given, "rest_api_timeout_in_ms") / 1000.0))
    if value(given, "grpc_max_threads"):
        changes["workers"] = min(256, value(given, "grpc_max_threads"))
    if wanted("num_load_threads"):
        changes["num_load_threads"] = min(64, value(given, "num_load_threads"))
    if wanted("file_system_poll_wait_seconds"):
        changes["poll_seconds"] = float(value(given, "file_system_poll_wait_seconds"))
    labels_flag = "allow_version_labels_for_unavailable_models"
    if wanted(labels_flag):
        changes[labels_flag] = value(given, labels_flag)
    batching = serving.batching
    if wanted("enable_batching"):
        batching = dataclasses.replace(batching, enabled=value(given, "enable_batching"))
    if value(given, "batching_parameters_file"):
        if batching.enabled:
            batching = dataclasses.replace(batching, batching_parameters_file=value(given, "batching_parameters_file"))
        else:  # as tensorflow_model_server: the file only matters with --enable_batching
            logger.warning("--batching_parameters_file is ignored without --enable_batching")
    changes["batching"] = batching
    if value(given, "monitoring_config_file"):
        changes["monitoring"] = dataclasses.replace(serving.monitoring, enabled=False,
                                                    monitoring_config_file=value(given, "monitoring_config_file"))
    serving = dataclasses.replace(serving, **changes)

    config_file = value(given, "model_config_file")
    base_path = value(given, "model_base_path")
    if config_file:
        models = read_models(config_file)
    elif base_path:
        models = models_config.single_model(value(given, "model_name"), base_path)
    elif standalone:
        raise FlagError("Both server_options.model_base_path and server_options.model_config_file are empty! "
                        "(give --model_base_path, with --model_name, or --model_config_file)")
    else:
        models = None
    retries = standalone or "max_num_load_retries" in given or "load_retry_interval_micros" in given
    defaults = ServerOptions()
    options = ServerOptions(
        model_config_file=config_file,
        model_config_poll_seconds=float(value(given, "model_config_file_poll_wait_seconds")) if config_file else 0.0,
        rest_enabled=bool(value(given, "rest_api_port")) if wanted("rest_api_port") else True,
        grpc_socket_path=value(given, "grpc_socket_path"),
        grpc_channel_arguments=channel_arguments(value(given, "grpc_channel_arguments")),
        enable_model_warmup=value(given, "enable_model_warmup"),
        max_load_attempts=1 + value(given, "max_num_load_retries") if retries else defaults.max_load_attempts,
        load_retry_seconds=value(given, "load_retry_interval_micros") / 1e6 if retries else None,
        fail_when_models_fail_to_load=standalone)
    return ServerSettings(serving, options, models)
