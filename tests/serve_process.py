"""`clicklens serve` in a subprocess for the tests that talk to it over real sockets.

A request that crashes or pins the server cannot take the test process with it,
and the tests see the server's log as a user would.
"""

import re
import signal
import subprocess
import sys
import threading
import time

import grpc

from clicklens import compat  # noqa: F401  (before TensorFlow, which the stubs import)
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from tests.conftest import DEMO_CONFIG, REPO

READY = re.compile(r"gRPC on [\d.]+:(\d+), REST on http://[\d.]+:(\d+)")
READY_SECONDS = 180  # a fresh process imports TF, loads four models and replays their warmup requests


class ServeProcess:
    """`clicklens serve` on `workdir` with the demo config and `--set` overrides `sets`, on free ports."""

    def __init__(self, workdir, *sets: str):
        self.log = []
        overrides = [a for s in ("serving.grpc_port=0", "serving.http_port=0", *sets) for a in ("--set", s)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "clicklens", "serve", "--config", DEMO_CONFIG, "--workdir", workdir.root,
             *overrides], cwd=REPO, stderr=subprocess.PIPE, text=True, errors="replace")
        deadline = time.monotonic() + READY_SECONDS
        match = None
        while match is None:
            line = self.process.stderr.readline()
            if not line:
                raise AssertionError("server exited before it was ready:\n" + self.tail(40))
            self.log.append(line)
            match = READY.search(line)
            assert time.monotonic() < deadline, "server not ready in time"
        self.grpc_port, self.http_port = int(match[1]), int(match[2])
        self.address = f"127.0.0.1:{self.grpc_port}"
        threading.Thread(target=lambda: [self.log.append(x) for x in self.process.stderr], daemon=True).start()
        self.channel = grpc.insecure_channel(self.address)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the server's log."""
        return "".join(self.log[-lines:])

    def stop(self) -> int:
        """SIGTERM, as a user's Ctrl-C: the server drains and exits; its exit code."""
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: for a server that may still be computing a request nobody waits for."""
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=60)
