"""The server settings that tensorflow_model_server's flags give beyond the `serving.*` config keys.

`ServerOptions()` is how `clicklens serve` has always run (REST on, gRPC on
TCP only, one load attempt per poll, warmup on); serving/model_server_flags.py
builds the options a tensorflow_model_server command line asks for.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from serving.model_registry import MAX_LOAD_ATTEMPTS


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """One ModelServer's TF-Serving-only settings (the flag each comes from in parentheses)."""

    model_config_file: str = ""  # (--model_config_file) re-read every model_config_poll_seconds when > 0
    model_config_poll_seconds: float = 0.0  # (--model_config_file_poll_wait_seconds)
    rest_enabled: bool = True  # (--rest_api_port=0 turns REST off)
    grpc_socket_path: str = ""  # (--grpc_socket_path) gRPC on this Unix domain socket too
    grpc_channel_arguments: Tuple[Tuple[str, object], ...] = ()  # (--grpc_channel_arguments)
    enable_model_warmup: bool = True  # (--enable_model_warmup)
    max_load_attempts: int = MAX_LOAD_ATTEMPTS  # (1 + --max_num_load_retries)
    load_retry_seconds: Optional[float] = None  # (--load_retry_interval_micros); None: one attempt per poll
    fail_when_models_fail_to_load: bool = False  # tensorflow_model_server exits when a model cannot load at start
