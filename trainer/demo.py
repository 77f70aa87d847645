"""`clicklens demo`: the whole path on generated data, ending with a live server.

generate-demo-data -> pipeline -> train (+ evaluate) -> export -> serve -> queries.

Each stage is the same verb a user runs by hand.  A stage whose output already
exists in the work directory is skipped (delete that folder to redo it), so a
second `make demo` goes straight to serving.  The server runs as a child
process (`clicklens serve`), exactly as a user would start it; the demo waits
until TF Serving's ModelService reports the retrieval model AVAILABLE, sends
queries in English and Chinese through the gRPC client, prints the page's
address and keeps serving until Ctrl-C (or stops at once with --no-wait).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import List, Sequence

from trainer import cli
from trainer.errors import ClicklensError
from trainer.workdir import Workdir

logger = logging.getLogger(__name__)

DEMO_QUERIES = ["red circle", "红色 圆形", "large yellow star", "蓝色 正方形", "purple ring", "绿色 三角形"]
RETRIEVAL_MODEL = "retrieval_scann"
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
    stage_args = cli.parse_args([verb] + _common_args(args))
    code = cli.resolve(stage_args._verb)(config, workdir, stage_args)
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


class _GroundTruth:
    """The generated world's attributes and relevance, to show why each result was returned."""

    ATTRIBUTES = ("color", "shape", "size", "pattern", "background")

    def __init__(self, workdir: Workdir):
        import tensorflow as tf

        from beam_pipelines.catalog_schema import read_catalog
        from beam_pipelines.log_schema import normalize_query

        self._normalize = normalize_query
        self.attributes = {e.image_id: " ".join(str(dict(e.extra).get(a, "")) for a in self.ATTRIBUTES).strip()
                           for e in read_catalog(workdir.catalog)}
        self.relevant = {}
        if tf.io.gfile.exists(workdir.ground_truth):
            with tf.io.gfile.GFile(workdir.ground_truth) as f:
                for line in f:
                    row = json.loads(line)
                    self.relevant[row["query"]] = set(row["relevant_image_ids"])

    def annotator(self, text: str = None):
        """annotate(image_id) -> "✓ red circle small solid light" (✓ when relevant to `text`)."""
        relevant = self.relevant.get(self._normalize(text), set()) if text else set()
        return lambda image_id: f"{'✓' if image_id in relevant else ' '} {self.attributes.get(image_id, '')}"

    def summary(self, text: str, image_ids: List[str]) -> str:
        relevant = self.relevant.get(self._normalize(text))
        if relevant is None:
            return ""
        hits = sum(i in relevant for i in image_ids)
        chance = len(relevant) / max(1, len(self.attributes)) * len(image_ids)
        return f"     {hits} of {len(image_ids)} relevant per the generated ground truth (chance: {chance:.1f})"


def _query(address: str, truth: _GroundTruth, text: str = None, image: str = None) -> None:
    """Queries the demo server with TF Serving's gRPC client and prints annotated results."""
    from serving import client

    image_bytes = client.read_query_image(image) if image else None
    response = client.predict(address, client.build_request(RETRIEVAL_MODEL, text=text, image_bytes=image_bytes))
    print(f"\n$ clicklens query {text!r}" if text else f"\n$ clicklens query --image {image}")
    if image:  # demo images are named <image_id>.png
        print(f"     (the query image: {truth.attributes.get(image.rsplit('/', 1)[-1].rsplit('.', 1)[0], '?')})")
    client.print_results(response, repr(text) if text else image, annotate=truth.annotator(text))
    summary = truth.summary(text, [image_id for image_id, _ in client.top_k(response)]) if text else ""
    if summary:
        print(summary)


def _first_catalog_image(workdir: Workdir) -> str:
    import tensorflow as tf

    from beam_pipelines.catalog_schema import read_catalog, resolve_uri

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
    print("\nEvaluation (W/model/metrics.json):")
    print(json.dumps(metrics, indent=2, ensure_ascii=False)[:3000])


def run(config, workdir: Workdir, args) -> int:
    """Runs every stage on generated data, then serves and queries."""
    _run_stage("generate-demo-data", workdir.catalog, args, config, workdir)
    _run_stage("pipeline", workdir.report, args, config, workdir)
    _run_stage("train", workdir.metrics, args, config, workdir)
    _run_stage("export", workdir.models_config, args, config, workdir)
    _print_metrics(workdir)

    s = config.serving
    address = f"{s.host}:{s.grpc_port}"
    logger.info("== serve: starting the TF Serving API server on %s (gRPC) and %s:%d (HTTP)", address, s.host, s.http_port)
    # SIGTERM (e.g. `kill`, or a CI job's timeout) must also stop the child server: raising
    # SystemExit here runs the `finally` below, as Ctrl-C's KeyboardInterrupt does.
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    server = subprocess.Popen([sys.executable, "-m", "trainer.cli", "serve"] + _common_args(args), env=dict(os.environ))
    try:
        _wait_until_available(address, server, SERVER_START_TIMEOUT_S)
        truth = _GroundTruth(workdir)
        for text in DEMO_QUERIES:
            _query(address, truth, text=text)
        image = _first_catalog_image(workdir)
        _query(address, truth, image=image)
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
    """`python -m trainer.demo` is the same as `clicklens demo`."""
    return cli.main(["demo"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
