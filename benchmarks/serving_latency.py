"""Latency and throughput of gRPC Predict against `clicklens serve`, batching off and on, in one run.

    nice -n 10 .venv/bin/python benchmarks/serving_latency.py --workdir demo_workdir [--model retrieval_scann]
    ... --servers clicklens-serve clicklens-model-server     (both, side by side)

Starts `clicklens serve` over W/export (run `make demo` or `clicklens export`
first) twice on free ports, once with batching off and once with it on
(--batching parameters), and at each --concurrency drives it from separate
client processes (so the load generator never shares the server's GIL): each
process keeps its share of the concurrency in flight as gRPC futures, sending
pre-serialized one-query PredictRequests (a mix of Chinese and English).  Each
level runs --warmup-seconds unmeasured, then --seconds measured.  Prints p50,
p95 and p99 latency, req/s and errors per level, the on/off ratios, and
whether the targets are met.  With `--servers clicklens-serve clicklens-model-server` the
same levels also run against `clicklens-model-server --model_config_file=W/export/models.config`
(tensorflow_model_server's flags; batching through --enable_batching and a
batching_parameters_file holding the same parameters), and each server's
start-to-ready time (process start to serving) is printed beside its figures;
the two should match, being the same server.  The targets:

- batching on serves at least 2x the req/s of batching off at concurrency 32,
  with a p99 no worse;
- concurrency 1 p99 at most 10 ms.

The clients run on the same machine as the server, so on a small box they
compete with it (and with anything else running) for the CPUs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

QUERIES = ["红色 圆形", "蓝色 方形", "绿色 三角形", "red circle", "blue square", "green triangle", "yellow star",
           "黄色 星形", "large red square", "小 蓝色 圆形"]
READY = re.compile(r"gRPC on [\d.]+:(\d+), REST")
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
LEVELS = (1, 8, 32, 128)
TARGET_CONCURRENCY = 32
TARGET_SPEEDUP = 2.0
TARGET_P99_C1_MS = 10.0
# The batching parameters of the "on" run (serving.batching.*), the best of the settings tried (README.md,
# "Serving latency"): at concurrency 32 a 5 ms timeout served the most requests (0, 1, 2, 5 and 8 ms tried)
# and keeps the concurrency-1 p99 under 10 ms; one batch thread is enough on 2 CPUs.
DEFAULT_BATCHING = ("max_batch_size=64", "batch_timeout_micros=5000", "num_batch_threads=1",
                    "max_enqueued_batches=1000")


# -- the server ------------------------------------------------------------------


SERVERS = ("clicklens-serve", "clicklens-model-server")


def serve_command(workdir: str, config: str, overrides: Sequence[str]) -> List[str]:
    """`clicklens serve` on free ports with `overrides` (--set values)."""
    command = [sys.executable, "-m", "clicklens", "serve", "--config", config, "--workdir", workdir,
               "--set", "serving.grpc_port=0", "--set", "serving.http_port=0"]
    for override in overrides:
        command += ["--set", override]
    return command


def model_server_command(workdir: str, workers: int, batching: Optional[Sequence[str]], scratch: str) -> List[str]:
    """clicklens-model-server over W/export/models.config on a free gRPC port (REST off, its default), with
    `batching` (KEY=VALUE of serving.batching) as a TF Serving batching_parameters_file when given."""
    command = [sys.executable, "-m", "serving.model_server_main", "--port=0",
               f"--model_config_file={os.path.join(workdir, 'export', 'models.config')}",
               f"--grpc_max_threads={workers}"]
    if batching is not None:
        path = os.path.join(scratch, "batching_parameters.txt")
        with open(path, "w") as f:
            for kv in batching:
                key, value = kv.split("=", 1)
                f.write(f"{key}: {value}\n" if key == "allowed_batch_sizes" else f"{key} {{ value: {value} }}\n")
        command += ["--enable_batching", f"--batching_parameters_file={path}"]
    return command


def start_server(command: Sequence[str]) -> tuple[subprocess.Popen, int, float]:
    """Starts a server process; returns it, its gRPC port and its start-to-ready seconds (process start to the
    "serving ..." line, logged once the models are loaded and the ports take traffic)."""
    started = time.monotonic()
    process = subprocess.Popen(list(command), cwd=REPO, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        match = READY.search(line)
        if match:
            ready = time.monotonic() - started
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, int(match[1]), ready
    raise SystemExit(f"the server exited with code {process.wait()} before it was ready")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; nan elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def serialized_requests(model: str) -> List[bytes]:
    """One PredictRequest per query, serialized (the client processes never import TensorFlow)."""
    from clicklens import compat  # noqa: F401  (before TensorFlow)
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from clicklens import servables

    out = []
    for text in QUERIES:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.inputs[servables.QUERY].CopyFrom(tf.make_tensor_proto([text.encode("utf-8")], dtype=tf.string))
        out.append(request.SerializeToString())
    return out


# -- the client processes ---------------------------------------------------------


def measure(address: str, requests: List[bytes], concurrency: int, processes: int, warmup: float, seconds: float,
            server_pid: int):
    """p50/p95/p99 (ms), req/s, errors, and server and client CPU ms per request of one level, counting only
    requests completed in the measured window (after the warm-up)."""
    context = multiprocessing.get_context("spawn")
    count = min(concurrency, processes)
    shares = [concurrency // count + (1 if i < concurrency % count else 0) for i in range(count)]
    pipes, workers = [], []
    for share in shares:
        parent, child = context.Pipe()
        worker = context.Process(target=_client, args=(address, requests, share, child), daemon=True)
        worker.start()
        pipes.append(parent)
        workers.append(worker)
    for pipe in pipes:
        assert pipe.recv() == "ready"
    start_at = time.monotonic() + 0.5
    window = (start_at + warmup, start_at + warmup + seconds)
    for pipe in pipes:
        pipe.send((start_at, window))
    pids = [server_pid] + [w.pid for w in workers]
    time.sleep(max(window[0] - time.monotonic(), 0))
    cpu_start = [cpu_seconds(pid) for pid in pids]
    time.sleep(max(window[1] - time.monotonic(), 0))
    cpu_used = [cpu_seconds(pid) - start for pid, start in zip(pids, cpu_start)]
    latencies, errors = [], {}
    for pipe, worker in zip(pipes, workers):
        worker_latencies, worker_errors = pipe.recv()
        worker.join()
        latencies.append(worker_latencies)
        for code, n in worker_errors.items():
            errors[code] = errors.get(code, 0) + n
    latencies = np.concatenate(latencies)
    p50, p95, p99 = (np.percentile(latencies, [50, 95, 99]) * 1000) if len(latencies) else (float("nan"),) * 3
    n = max(len(latencies), 1)
    return {"p50": p50, "p95": p95, "p99": p99, "rps": len(latencies) / seconds,
            "errors": sum(errors.values()), "error_codes": errors,
            "server_cpu_ms": cpu_used[0] * 1000 / n, "client_cpu_ms": sum(cpu_used[1:]) * 1000 / n}


def _client(address: str, requests: List[bytes], outstanding: int, conn) -> None:
    """One client process: `outstanding` requests in flight from start to the window's end; reports the
    latencies of requests that completed inside the measuring window (start, end)."""
    import grpc

    channel = grpc.insecure_channel(address)
    call = channel.unary_unary(PREDICT_METHOD)  # bytes in, bytes out: no protobuf work in the client
    for request in requests:
        call(request, timeout=120)
    conn.send("ready")
    start_at, (window_start, window_end) = conn.recv()
    while time.monotonic() < start_at:
        time.sleep(max(min(0.01, start_at - time.monotonic()), 0))
    lock = threading.Lock()
    latencies: List[float] = []
    errors: Dict[str, int] = {}
    in_flight = [outstanding]
    finished = threading.Event()

    def issue(i: int) -> None:
        sent = time.monotonic()
        call.future(requests[i % len(requests)], timeout=120).add_done_callback(lambda f: done(f, sent, i))

    def done(future, sent: float, i: int) -> None:
        now = time.monotonic()
        code = future.code()
        with lock:
            if window_start <= now < window_end:
                if code == grpc.StatusCode.OK:
                    latencies.append(now - sent)
                else:
                    errors[code.name] = errors.get(code.name, 0) + 1
            if now >= window_end:
                in_flight[0] -= 1
                if in_flight[0] == 0:
                    finished.set()
                return
        issue(i + outstanding)

    for k in range(outstanding):
        issue(k)
    finished.wait()
    conn.send((np.array(latencies), errors))
    channel.close()


# -- the report -------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report(results: Dict[str, Dict[int, dict]], levels: Sequence[int], server: str = SERVERS[0]) -> None:
    """Ratios of batching on to off per level, then the targets."""
    off, on = results.get("off", {}), results.get("on", {})
    print(f"\n== {server}")
    if off and on:
        print("\nbatching on / off:")
        print(f"{'concurrency':>12}{'req/s x':>10}{'p50 x':>9}{'p99 x':>9}")
        for c in levels:
            if c in off and c in on:
                print(f"{c:>12}{on[c]['rps'] / off[c]['rps']:>10.2f}{on[c]['p50'] / off[c]['p50']:>9.2f}"
                      f"{on[c]['p99'] / off[c]['p99']:>9.2f}")
    print("\ntargets:")
    if TARGET_CONCURRENCY in off and TARGET_CONCURRENCY in on:
        a, b = off[TARGET_CONCURRENCY], on[TARGET_CONCURRENCY]
        speedup = b["rps"] / a["rps"]
        print(f"  batching on >= {TARGET_SPEEDUP:.0f}x the req/s of off at concurrency {TARGET_CONCURRENCY}: "
              f"{speedup:.2f}x ({b['rps']:.0f} vs {a['rps']:.0f} req/s) -> {verdict(speedup >= TARGET_SPEEDUP)}")
        print(f"  ... with p99 no worse: {b['p99']:.1f} ms on vs {a['p99']:.1f} ms off -> "
              f"{verdict(b['p99'] <= a['p99'])}")
    for mode, figures in results.items():
        if 1 in figures:
            p99 = figures[1]["p99"]
            print(f"  concurrency 1 p99 <= {TARGET_P99_C1_MS:.0f} ms, batching {mode}: {p99:.2f} ms -> "
                  f"{verdict(p99 <= TARGET_P99_C1_MS)}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="demo_workdir")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--model", default="retrieval_scann")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level")
    parser.add_argument("--warmup-seconds", type=float, default=3.0, help="unmeasured seconds per level first")
    parser.add_argument("--client-processes", type=int, default=4,
                        help="client processes per level at most (fewer when the concurrency is lower)")
    parser.add_argument("--workers", type=int, default=128, help="serving.workers of both servers")
    parser.add_argument("--batching", nargs="*", default=list(DEFAULT_BATCHING), metavar="KEY=VALUE",
                        help="serving.batching.* of the batching-on server")
    parser.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--servers", nargs="+", default=[SERVERS[0]], choices=SERVERS,
                        help="clicklens serve, and/or clicklens-model-server with tensorflow_model_server's flags")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra config overrides for both servers")
    args = parser.parse_args(argv)
    requests = serialized_requests(args.model)
    print(f"gRPC Predict, {args.model}, one text query per request; {os.cpu_count()} CPUs shared by the server, "
          f"the client processes and anything else on the machine (load average {os.getloadavg()[0]:.2f} "
          f"at the start); {args.warmup_seconds:g} s warm-up + {args.seconds:g} s measured per level; "
          f"serving.workers={args.workers}; batching on: {' '.join(args.batching)}")
    by_server: Dict[str, Dict[str, Dict[int, dict]]] = {}
    print(f"\n{'server':>23}{'batching':>9}{'ready s':>9}{'concurrency':>12}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'req/s':>9}{'errors':>8}{'server CPU ms/req':>19}{'client CPU ms/req':>19}")
    with tempfile.TemporaryDirectory() as scratch:
        for mode in args.modes:
            for server in args.servers:
                if server == "clicklens-serve":
                    overrides = [f"serving.workers={args.workers}", *args.overrides]
                    if mode == "on":
                        overrides += ["serving.batching.enabled=true",
                                      *(f"serving.batching.{kv}" for kv in args.batching)]
                    command = serve_command(args.workdir, args.config, overrides)
                else:
                    command = model_server_command(args.workdir, args.workers,
                                                   args.batching if mode == "on" else None, scratch)
                process, port, ready = start_server(command)
                try:
                    results = by_server.setdefault(server, {}).setdefault(mode, {})
                    for concurrency in args.concurrency:
                        r = measure(f"127.0.0.1:{port}", requests, concurrency, args.client_processes,
                                    args.warmup_seconds, args.seconds, process.pid)
                        results[concurrency] = r
                        print(f"{server:>23}{mode:>9}{ready:>9.2f}{concurrency:>12}{r['p50']:>9.2f}{r['p95']:>9.2f}"
                              f"{r['p99']:>9.2f}{r['rps']:>9.1f}{r['errors']:>8}{r['server_cpu_ms']:>19.3f}"
                              f"{r['client_cpu_ms']:>19.3f}", flush=True)
                finally:
                    stop_server(process)
    for server, results in by_server.items():
        report(results, args.concurrency, server)
    print(f"\n(load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
