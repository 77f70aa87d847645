"""`clicklens-model-server`: a drop-in tensorflow_model_server (same flags, same APIs, ScaNN ops included).

    clicklens-model-server --port=8500 --rest_api_port=8501 --model_name=half_plus_two \
        --model_base_path=/models/half_plus_two

It needs no clicklens config or work directory, so it runs from any folder:
the serving settings are ServingConfig's defaults with tensorflow_model_server's
(listening on every interface, REST off until --rest_api_port) and the flags
(serving/model_server_flags.py).  Exit codes: 0 after a clean shutdown, 1 when
the server cannot start (a bad model config, a model that fails to load), 2
for a command line it does not take.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

from clicklens.errors import ClicklensError

PROG = "clicklens-model-server"
ALL_INTERFACES = "0.0.0.0"  # tensorflow_model_server binds gRPC and REST on every interface
EXIT_START_FAILED = 1
EXIT_USAGE = 2


def version_text() -> str:
    """What --version prints, in tensorflow_model_server's two lines."""
    from clicklens import compat  # noqa: F401  (must precede TensorFlow)
    import tensorflow as tf

    return f"TensorFlow ModelServer: clicklens-model-server\nTensorFlow Library: {tf.__version__}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `clicklens-model-server` console script."""
    from clicklens.cli import setup_logging

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-help", "--helpfull", "-h") for a in args):
        from serving.model_server_flags import usage
        print(f"usage: {PROG} --model_base_path=PATH [--model_name=NAME] | --model_config_file=FILE  [flags]\n"
              + usage())
        return 0
    if "--version" in args or "-version" in args:
        print(version_text())
        return 0
    from serving import model_server_flags

    setup_logging(verbose=False)
    try:
        model_server_flags.parse_flags(args)  # refused before TensorFlow is imported: a typo fails at once
        from clicklens.config import ServingConfig
        from serving.server import ModelServer, serve_until_signal

        found = model_server_flags.settings(args, dataclasses.replace(ServingConfig(), host=ALL_INTERFACES))
    except model_server_flags.FlagError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ClicklensError as err:
        print(f"{PROG}: Failed to start server. Error: {err}", file=sys.stderr)
        return EXIT_START_FAILED
    try:
        server = ModelServer(found.serving, models=found.models, options=found.options)
        return serve_until_signal(server)
    except ClicklensError as err:
        print(f"{PROG}: Failed to start server. Error: {err}", file=sys.stderr)
        return EXIT_START_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
