"""Latency and throughput of gRPC Predict against `clicklens serve`.

    .venv/bin/python benchmarks/serving_latency.py --workdir demo_workdir [--model retrieval_scann]

Starts the server on free ports over W/export (run `make demo` or
`clicklens export` first), then sends --requests text queries (a mix of
Chinese and English) through tensorflow-serving-api's PredictionServiceStub at
each --concurrency (client threads sharing one channel), and prints p50/p99
latency, throughput and the error count per level.  The client runs on the
same machine as the server, so on a small box the two compete for the CPUs.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import grpc  # noqa: E402

from clicklens import compat  # noqa: E402,F401
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from clicklens import servables  # noqa: E402

QUERIES = ["红色 圆形", "蓝色 方形", "绿色 三角形", "red circle", "blue square", "green triangle", "yellow star",
           "黄色 星形", "large red square", "小 蓝色 圆形"]
READY = re.compile(r"gRPC on [\d.]+:(\d+), REST")


def start_server(workdir: str, config: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "clicklens", "serve", "--config", config, "--workdir", workdir,
         "--set", "serving.grpc_port=0", "--set", "serving.http_port=0"],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        match = READY.search(line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, int(match[1])
    raise SystemExit(f"the server exited with code {process.wait()} before it was ready")


def requests_for(model: str):
    out = []
    for text in QUERIES:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.inputs[servables.QUERY].CopyFrom(tf.make_tensor_proto([text.encode("utf-8")], dtype=tf.string))
        out.append(request)
    return out


def run_level(stub, requests, total: int, concurrency: int):
    """Sends `total` requests from `concurrency` threads; returns latencies (s), errors, wall time."""
    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(total))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                stub.Predict(requests[i % len(requests)], timeout=60)
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
            except grpc.RpcError as err:
                with lock:
                    errors.append(err.code())

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return np.array(latencies), errors, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="demo_workdir")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--model", default=servables.RETRIEVAL_SCANN)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--server", default=None, help="use a running server at host:port instead of starting one")
    args = parser.parse_args()
    process = None
    if args.server:
        address = args.server
    else:
        process, port = start_server(args.workdir, args.config)
        address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            requests = requests_for(args.model)
            run_level(stub, requests, 200, 4)  # warm the channel and the server's thread pool
            print(f"\ngRPC Predict, {args.model} (text queries, batch 1), {args.requests:,} requests per level, "
                  f"{os.cpu_count()} CPUs shared by client and server")
            print(f"{'concurrency':>12}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}{'errors':>8}")
            for concurrency in args.concurrency:
                latencies, errors, wall = run_level(stub, requests, args.requests, concurrency)
                p50, p99 = (np.percentile(latencies, [50, 99]) * 1000) if len(latencies) else (float("nan"),) * 2
                print(f"{concurrency:>12}{p50:>10.2f}{p99:>10.2f}{len(latencies) / wall:>10.1f}{len(errors):>8}")
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
