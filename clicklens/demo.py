"""`clicklens demo`: the whole path on generated data, ending with a live server.

generate-demo-data -> pipeline -> [pretrain, when the image tower starts from
pretrained weights] -> train (+ evaluate) -> export -> serve -> queries.

Each stage is the same verb a user runs by hand, run through the command
line's verb table (so this core module imports no stage).  A stage whose
output already exists in the work directory is skipped (delete that folder to
redo it), so a second `make demo` goes straight to serving.  The server runs
as a child process (`clicklens serve`), exactly as a user would start it; the
demo waits until TF Serving's ModelService reports the retrieval model
AVAILABLE, sends queries in English and Chinese and one by image with
`clicklens query --explain`, prints the page's address and keeps serving until
Ctrl-C (or stops at once with --no-wait).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import List, Sequence, Tuple

from clicklens import cli, servables
from clicklens.catalog import read_catalog, resolve_uri
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir

logger = logging.getLogger(__name__)

DEMO_QUERIES = ["red circle", "红色 圆形", "large yellow star", "蓝色 正方形", "purple ring", "绿色 三角形"]
RETRIEVAL_MODEL = servables.RETRIEVAL_SCANN
SERVER_START_TIMEOUT_S = 300


def _common_args(args) -> List[str]:
    out = ["--config", args.config, "--workdir", args.workdir]
    for override in args.overrides:
        out += ["--set", override]
    return out


def _run_stage(verb: str, done_marker: str, args, config, workdir: Workdir) -> None:
    """Runs one verb in-process unless its output marker already exists."""
    import tensorflow as tf

    if tf.io.gfile.exists(done_marker):
        logger.info("== %s: skipped, %s exists (delete it to redo this stage)", verb, done_marker)
        return
    logger.info("== %s", verb)
    started = time.time()
    code = cli.run_verb(verb, config, workdir)
    if code:
        raise ClicklensError(f"demo stopped: clicklens {verb} exited {code}")
    logger.info("== %s done in %.0f s", verb, time.time() - started)


def _wait_until_available(address: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Polls TF Serving's ModelService until the retrieval model is AVAILABLE."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = RETRIEVAL_MODEL
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    deadline = time.time() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        while time.time() < deadline:
            if process.poll() is not None:
                raise ClicklensError(f"the server exited with code {process.returncode} before it was ready")
            try:
                status = stub.GetModelStatus(request, timeout=5)
                if any(v.state == available for v in status.model_version_status):
                    return
            except grpc.RpcError:
                pass
            time.sleep(1.0)
    raise ClicklensError(f"the server at {address} was not ready after {timeout_s:.0f} s")


def _query(address: str, config, workdir: Workdir, text: str = None, image: str = None) -> None:
    """`clicklens query --explain` against the demo server, with the command echoed first."""
    print(f"\n$ clicklens query {text!r}" if text else f"\n$ clicklens query --image {image}", flush=True)
    argv = ["--server", address, "--model", RETRIEVAL_MODEL, "--explain"]
    argv += [text] if text else ["--image", image]
    cli.run_verb("query", config, workdir, argv)


def _first_catalog_image(workdir: Workdir) -> str:
    import tensorflow as tf

    for entry in read_catalog(workdir.catalog):
        path = resolve_uri(entry.uri, workdir.catalog) if entry.uri else ""
        if path and tf.io.gfile.exists(path):
            return path
    raise ClicklensError(f"no readable image in {workdir.catalog}")


def _print_metrics(workdir: Workdir) -> None:
    import tensorflow as tf

    if not tf.io.gfile.exists(workdir.metrics):
        return
    with tf.io.gfile.GFile(workdir.metrics) as f:
        metrics = json.load(f)
    print("\nEvaluation (W/model/metrics.json; the cold-start table is printed by `train` above):")
    headline = {key: value for key, value in metrics.items() if key != "cold_start"}
    print(json.dumps(headline, indent=2, ensure_ascii=False)[:3000])


def stages(config, workdir: Workdir) -> List[Tuple[str, str]]:
    """(verb, the output that marks it done) of each stage before serving, in order.

    `pretrain` runs when the image tower starts from pretrained weights that the workdir is to hold
    (model.image_init=pretrained without an image_init_path of its own).
    """
    plan = [("generate-demo-data", workdir.catalog), ("pipeline", workdir.report)]
    if config.model.image_init == "pretrained" and not config.model.image_init_path:
        plan.append(("pretrain", workdir.pretrain_report))
    return plan + [("train", workdir.metrics), ("export", workdir.models_config)]


def run(config, workdir: Workdir, args) -> int:
    """Runs every stage on generated data, then serves and queries."""
    for verb, done_marker in stages(config, workdir):
        _run_stage(verb, done_marker, args, config, workdir)
    _print_metrics(workdir)

    s = config.serving
    address = f"{s.host}:{s.grpc_port}"
    logger.info("== serve: starting the TF Serving API server on %s (gRPC) and %s:%d (HTTP)", address, s.host, s.http_port)
    # SIGTERM (e.g. `kill`, or a CI job's timeout) must also stop the child server: raising
    # SystemExit here runs the `finally` below, as Ctrl-C's KeyboardInterrupt does.
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    server = subprocess.Popen([sys.executable, "-m", "clicklens", "serve"] + _common_args(args), env=dict(os.environ))
    try:
        _wait_until_available(address, server, SERVER_START_TIMEOUT_S)
        for text in DEMO_QUERIES:
            _query(address, config, workdir, text=text)
        _query(address, config, workdir, image=_first_catalog_image(workdir))
        print(f"\nSearch page: http://{s.host}:{s.http_port}/   (gRPC: {address})")
        if getattr(args, "no_wait", False):
            return 0
        print("Serving until Ctrl-C.")
        try:
            server.wait()
        except KeyboardInterrupt:  # Ctrl-C is how a demo is meant to end
            print("\nstopping the server")
            return 0
        return 0 if server.returncode in (0, -signal.SIGTERM) else server.returncode
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def main(argv: Sequence[str] = None) -> int:
    """`python -m clicklens.demo` is the same as `clicklens demo`."""
    return cli.main(["demo"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
