"""Hostile but fair input against `clicklens serve` and `clicklens pipeline`, with the targets it must meet.

    nice -n 10 .venv/bin/python benchmarks/hostile_input.py --workdir demo_workdir

Needs an exported work directory (`make demo`, or `clicklens export`).  Every
part runs real processes on 127.0.0.1 and prints what it measured:

1. Decompression bombs: PNGs and a GIF of up to 40000 x 40000 pixels (a few
   hundred KB each) sent to by_image over gRPC and REST and to the image
   encoder, one at a time and then two at once beside a normal text query.
   Target: each refused (INVALID_ARGUMENT / HTTP 400) in < 0.5 s, and the
   server's peak RSS grows by < 100 MB.
2. 200 concurrent REST clients and 200 concurrent gRPC clients, each on its
   own connection.  Target: 0 errors; p50 / p99 printed.
3. SIGTERM under mixed REST + gRPC load.  Target: every request the server
   accepted is answered (no reset connection, no cut-off response) and the
   server exits 0.
4. Corrupt compressed log shards (a truncated .gz and a plain-text file named
   .gz) in a small generated world.  Target: the run fails naming the file, or
   with pipeline.skip_corrupt_files dead-letters it with its name and the
   number of lines read before the fault; never exit 0 silently.

The clients share the machine with the server, so latencies include their
competition for the CPUs.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import glob
import gzip
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from clicklens import compat  # noqa: E402,F401  (must precede TensorFlow)
import grpc  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from clicklens import servables as S  # noqa: E402

READY = re.compile(r"gRPC on [\d.]+:(\d+), REST on http://[\d.]+:(\d+)")
BOMB_SIDES = (10_000, 20_000, 40_000)
TARGET_BOMB_SECONDS = 0.5
TARGET_BOMB_RSS_MB = 100.0
CONCURRENT_CLIENTS = 200
QUERIES = ["红色 圆形", "blue square", "绿色 三角形", "yellow star", "小 蓝色 圆形"]


# -- the server ------------------------------------------------------------------


class Server:
    """`clicklens serve` in a subprocess on free ports."""

    def __init__(self, workdir: str, config: str, overrides: Sequence[str] = ()):
        command = [sys.executable, "-m", "clicklens", "serve", "--config", config, "--workdir", workdir,
                   "--set", "serving.grpc_port=0", "--set", "serving.http_port=0"]
        for override in overrides:
            command += ["--set", override]
        self.process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
        self.log: List[str] = []
        for line in self.process.stderr:
            self.log.append(line)
            match = READY.search(line)
            if match:
                self.grpc_port, self.http_port = int(match[1]), int(match[2])
                threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()
                return
        raise SystemExit("the server exited before it was ready:\n" + "".join(self.log[-20:]))

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory (VmRSS) or its peak since the last reset_peak (VmHWM), MB."""
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def reset_peak(self) -> None:
        """Resets VmHWM to the current RSS (Linux clear_refs 5)."""
        with open(f"/proc/{self.process.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


# -- requests ----------------------------------------------------------------------


def predict_request(model: str, signature: str, name: str, value: bytes) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.inputs[name].CopyFrom(tf.make_tensor_proto([value], dtype=tf.string))
    return request


def text_request(query: str) -> predict_pb2.PredictRequest:
    return predict_request(S.RETRIEVAL_SCANN, S.TEXT_SIGNATURE, S.QUERY, query.encode("utf-8"))


def rest_predict(port: int, model: str, body: Dict, timeout: float = 60) -> Tuple[int, bytes]:
    """(HTTP status, body) of one :predict call on its own connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", f"/v1/models/{model}:predict", json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def grpc_code(stub, request, timeout: float = 60) -> grpc.StatusCode:
    try:
        stub.Predict(request, timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def percentile_ms(seconds: List[float], q: float) -> float:
    return float(np.percentile(np.array(seconds) * 1000, q)) if seconds else float("nan")


# -- 1. decompression bombs --------------------------------------------------------


def bombs() -> Dict[str, bytes]:
    """name -> image bytes declaring side x side pixels (tiny on the wire)."""
    out = {}
    for side in BOMB_SIDES:
        buffer = io.BytesIO()
        Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
        out[f"png {side}x{side} ({len(buffer.getvalue()) // 1024} KB)"] = buffer.getvalue()
    # A GIF whose logical screen and one frame declare 40000 x 40000 (a 1x1 image stretched in the header).
    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, format="GIF")
    gif = bytearray(buffer.getvalue())
    side = BOMB_SIDES[-1].to_bytes(2, "little")
    gif[6:8] = gif[8:10] = side
    descriptor = gif.index(b"\x2c")
    gif[descriptor + 5:descriptor + 7] = gif[descriptor + 7:descriptor + 9] = side
    out[f"gif {BOMB_SIDES[-1]}x{BOMB_SIDES[-1]} ({len(gif)} B)"] = bytes(gif)
    return out


def bomb_part(server: Server) -> bool:
    print("\n1. decompression bombs")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    assert grpc_code(stub, text_request("red circle")) == grpc.StatusCode.OK, "the server does not answer queries"
    routes = [
        ("gRPC by_image", lambda data: grpc_code(stub, predict_request(S.RETRIEVAL_SCANN, S.IMAGE_SIGNATURE,
                                                                       S.IMAGE_BYTES, data)).name),
        ("gRPC image_encoder", lambda data: grpc_code(stub, predict_request(S.IMAGE_ENCODER, "",
                                                                            S.IMAGE_BYTES, data)).name),
        ("REST by_image", lambda data: str(rest_predict(server.http_port, S.RETRIEVAL_SCANN, {
            "signature_name": S.IMAGE_SIGNATURE,
            "instances": [{S.IMAGE_BYTES: {"b64": base64.b64encode(data).decode()}}]})[0])),
    ]
    ok = True
    base_rss = server.rss_mb()
    server.reset_peak()
    print(f"   server RSS before: {base_rss:.0f} MB")
    print(f"   {'image':<28} {'route':<20} {'answer':<18} {'seconds':>8}")
    for name, data in bombs().items():
        for route, send in routes:
            start = time.perf_counter()
            answer = send(data)
            seconds = time.perf_counter() - start
            refused = answer in ("INVALID_ARGUMENT", "400")
            ok &= refused and seconds < TARGET_BOMB_SECONDS
            print(f"   {name:<28} {route:<20} {answer:<18} {seconds:8.3f}")
    # Two bombs at once beside a normal query.
    largest = list(bombs().values())[len(BOMB_SIDES) - 1]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        bomb_calls = [pool.submit(routes[0][1], largest) for _ in range(2)]
        start = time.perf_counter()
        query = grpc_code(stub, text_request("蓝色 方形"))
        query_seconds = time.perf_counter() - start
        answers = [c.result() for c in bomb_calls]
    growth = server.rss_mb("VmHWM") - base_rss
    ok &= query == grpc.StatusCode.OK and all(a == "INVALID_ARGUMENT" for a in answers)
    ok &= growth < TARGET_BOMB_RSS_MB
    print(f"   two {BOMB_SIDES[-1]}² bombs at once: {answers}; a text query beside them: {query.name} "
          f"in {query_seconds * 1000:.0f} ms")
    print(f"   server peak RSS growth over all bombs: {growth:.1f} MB (target < {TARGET_BOMB_RSS_MB:.0f} MB)")
    channel.close()
    print(f"   target (refused in < {TARGET_BOMB_SECONDS} s each, RSS growth < {TARGET_BOMB_RSS_MB:.0f} MB): "
          f"{'met' if ok else 'NOT met'}")
    return ok


# -- 2. 200 concurrent clients ------------------------------------------------------


def concurrent_part(server: Server, clients: int, requests_each: int) -> bool:
    print(f"\n2. {clients} concurrent REST clients, then {clients} concurrent gRPC clients, "
          f"{requests_each} requests each")
    start_line = threading.Barrier(clients)

    def rest_client(i: int):
        latencies, errors = [], []
        start_line.wait()
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
        body = json.dumps({"instances": [QUERIES[i % len(QUERIES)]]})
        for _ in range(requests_each):
            start = time.perf_counter()
            try:
                connection.request("POST", f"/v1/models/{S.RETRIEVAL_SCANN}:predict", body,
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    errors.append(f"HTTP {response.status}")
            except (OSError, http.client.HTTPException) as err:
                errors.append(type(err).__name__)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
            latencies.append(time.perf_counter() - start)
        connection.close()
        return latencies, errors

    def grpc_client(i: int):
        latencies, errors = [], []
        # A channel option makes each channel its own connection (gRPC would share one otherwise).
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = text_request(QUERIES[i % len(QUERIES)])
        start_line.wait()
        for _ in range(requests_each):
            start = time.perf_counter()
            code = grpc_code(stub, request, timeout=120)
            if code != grpc.StatusCode.OK:
                errors.append(code.name)
            latencies.append(time.perf_counter() - start)
        channel.close()
        return latencies, errors

    ok = True
    for name, client in (("REST", rest_client), ("gRPC", grpc_client)):
        start_line.reset()
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(client, range(clients)))
        seconds = time.perf_counter() - start
        latencies = [x for r in results for x in r[0]]
        errors = [x for r in results for x in r[1]]
        ok &= not errors
        kinds = {e: errors.count(e) for e in sorted(set(errors))}
        print(f"   {name}: {len(latencies)} requests in {seconds:.1f} s ({len(latencies) / seconds:.0f} req/s), "
              f"errors {len(errors)} {kinds or ''}, p50 {percentile_ms(latencies, 50):.0f} ms, "
              f"p99 {percentile_ms(latencies, 99):.0f} ms")
    print(f"   target (0 errors): {'met' if ok else 'NOT met'}")
    return ok


# -- 3. SIGTERM under load ---------------------------------------------------------------


def sigterm_part(workdir: str, config: str, clients: int, load_seconds: float) -> bool:
    print(f"\n3. SIGTERM under mixed load ({clients} REST + {clients} gRPC clients)")
    server = Server(workdir, config)
    stop = threading.Event()
    outcomes: Dict[str, int] = {}
    lock = threading.Lock()

    def count(outcome: str) -> None:
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    def rest_client(i: int):
        body = json.dumps({"instances": [QUERIES[i % len(QUERIES)]]})
        while not stop.is_set():
            connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
            try:
                connection.connect()
            except OSError:
                count("REST refused before accepting (not a loss)")
                time.sleep(0.05)
                continue
            try:
                connection.request("POST", f"/v1/models/{S.RETRIEVAL_SCANN}:predict", body)
                response = connection.getresponse()
                response.read()
                count(f"REST answered {response.status}")
            except (OSError, http.client.HTTPException) as err:
                count(f"REST LOST after connecting ({type(err).__name__})")
            finally:
                connection.close()

    def grpc_client(i: int):
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = text_request(QUERIES[i % len(QUERIES)])
        while not stop.is_set():
            code = grpc_code(stub, request, timeout=60)
            # UNAVAILABLE is gRPC's answer for a call the server never took (it refuses new calls when draining).
            count("gRPC answered OK" if code == grpc.StatusCode.OK else f"gRPC {code.name}")
            if code == grpc.StatusCode.UNAVAILABLE:
                time.sleep(0.05)
        channel.close()

    threads = [threading.Thread(target=f, args=(i,)) for i in range(clients) for f in (rest_client, grpc_client)]
    for t in threads:
        t.start()
    time.sleep(load_seconds)
    before = dict(outcomes)
    signalled = time.perf_counter()
    exit_code = server.stop()
    drain_seconds = time.perf_counter() - signalled
    stop.set()
    for t in threads:
        t.join()
    lost = sum(n for k, n in outcomes.items() if "LOST" in k or k.startswith("REST answered 5")
               or k in ("gRPC INTERNAL", "gRPC CANCELLED", "gRPC DEADLINE_EXCEEDED", "gRPC UNKNOWN"))
    print(f"   answered before SIGTERM: {sum(before.values())}; server exit {exit_code} after {drain_seconds:.1f} s")
    for key in sorted(outcomes):
        print(f"   {key}: {outcomes[key]}")
    cut = [line.strip() for line in server.log if "cut off" in line or "drain" in line.lower()]
    for line in cut[-3:]:
        print(f"   server: {line}")
    ok = lost == 0 and exit_code == 0
    print(f"   target (every accepted request answered, exit 0): {'met' if ok else 'NOT met'} ({lost} lost)")
    return ok


# -- 4. corrupt compressed shards -------------------------------------------------------


def shards_part(config: str) -> bool:
    print("\n4. corrupt compressed log shards")
    root = tempfile.mkdtemp(prefix="clicklens-hostile-")
    world = os.path.join(root, "w")
    small = ["--set", "demo_data.num_images=60", "--set", "demo_data.num_sessions=400",
             "--set", "demo_data.num_log_shards=2", "--set", "pipeline.content_graph.source=none"]
    clicklens = [sys.executable, "-m", "clicklens"]
    subprocess.run(clicklens + ["generate-demo-data", "--config", config, "--workdir", world] + small,
                   cwd=REPO, check=True, capture_output=True)
    logs = sorted(glob.glob(os.path.join(world, "raw", "logs", "*")))
    with open(logs[0], "rb") as f:
        text = f.read()
    if logs[0].endswith(".gz"):
        text = gzip.decompress(text)
    lines = text.count(b"\n")
    whole = gzip.compress(text)
    truncated = os.path.join(root, "truncated.gz")
    with open(truncated, "wb") as f:
        f.write(whole[:len(whole) * 3 // 4])
    fake = os.path.join(root, "fake.gz")
    with open(fake, "wb") as f:
        f.write(text)
    ok = True
    for label, bad in (("truncated .gz", truncated), ("plain text named .gz", fake)):
        for skip in (False, True):
            w = os.path.join(root, f"run-{os.path.basename(bad)}-{skip}")
            shutil.copytree(world, w)
            shard = os.path.join(w, "raw", "logs", "part-bad.jsonl.gz")
            shutil.copy(bad, shard)
            run = subprocess.run(clicklens + ["pipeline", "--config", config, "--workdir", w] + small +
                                 ["--set", f"pipeline.skip_corrupt_files={str(skip).lower()}"],
                                 cwd=REPO, capture_output=True, text=True)
            letters = ""
            for path in glob.glob(os.path.join(w, "examples", "dead_letter*")):
                with open(path, encoding="utf-8", errors="replace") as f:
                    letters += "".join(line for line in f if "part-bad" in line)
            named = "part-bad.jsonl.gz" in run.stderr.splitlines()[-1] if run.stderr.strip() else False
            if skip:
                good = run.returncode == 0 and "part-bad" in letters
                detail = f"dead letter: {letters.strip()[:160]}"
            else:
                good = run.returncode != 0 and named
                detail = f"last line: {run.stderr.strip().splitlines()[-1][:160] if run.stderr.strip() else ''}"
            ok &= good
            print(f"   {label}, skip_corrupt_files={str(skip).lower()}: exit {run.returncode}, "
                  f"{'ok' if good else 'WRONG'}; {detail}")
    print(f"   (the shard's {lines} lines; the truncated copy keeps 3/4 of the compressed bytes)")
    shutil.rmtree(root, ignore_errors=True)
    print(f"   target (fails naming the file, or dead-letters it when skipping; never a silent exit 0): "
          f"{'met' if ok else 'NOT met'}")
    return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="an exported work directory (make demo)")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--clients", type=int, default=CONCURRENT_CLIENTS)
    parser.add_argument("--requests-each", type=int, default=5)
    parser.add_argument("--sigterm-clients", type=int, default=50)
    parser.add_argument("--load-seconds", type=float, default=3.0)
    parser.add_argument("--parts", default="1234", help="which parts to run, e.g. 12")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    if not os.path.isfile(os.path.join(workdir, "export", "models.config")):
        raise SystemExit(f"{workdir}/export/models.config not found: run `make demo` or `clicklens export` first")
    results = {}
    if "1" in args.parts or "2" in args.parts:
        server = Server(workdir, args.config)
        try:
            if "1" in args.parts:
                results["bombs"] = bomb_part(server)
            if "2" in args.parts:
                results["concurrent clients"] = concurrent_part(server, args.clients, args.requests_each)
        finally:
            server.stop()
    if "3" in args.parts:
        results["SIGTERM drain"] = sigterm_part(workdir, args.config, args.sigterm_clients, args.load_seconds)
    if "4" in args.parts:
        results["corrupt shards"] = shards_part(args.config)
    print("\nsummary: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
