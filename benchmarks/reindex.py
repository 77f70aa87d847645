"""`clicklens reindex` vs a full `clicklens export`: 1,000 new images into a 100,000-image index.

    nice -n 10 .venv/bin/python benchmarks/reindex.py --workdir /tmp/clicklens-reindex

1. A trained model with configs/demo.yaml's architecture (32 px CNN [16, 32, 64], 64-d embeddings), from
   a short run of the real verbs on a small generated world (generate-demo-data, pipeline, train: one
   epoch, no graph term), cached under W/base; or `--trained DIR`, a work directory after `clicklens
   train` whose model/ and examples/{vocab.txt,eval-*} are used.
2. A synthetic catalog (W/bench/raw) of --images images drawn by the demo-world generator
   (clicklens/demo_data/images.py: one shape on a plain background, jittered) at the pipeline's image
   size, and the corpus-* records the pipeline writes for them (the stored image is the prepared PNG;
   at that size the preparation leaves the pixels as drawn, which is checked on a sample).
3. `clicklens export` over the --images images (timed): version 1 of the four models.
4. `clicklens serve` in a child process, and two client threads sending gRPC Predicts (text queries to
   retrieval_scann, image queries to retrieval_bruteforce, one every --client-interval s each) until the
   end: every failed request is counted.
5. --new images are drawn and appended to the catalog; `clicklens reindex` is timed, and so is the time
   until they are searchable (with --watch: a `clicklens reindex --watch` started before the images are
   appended, its first pass done, so TensorFlow and the encoders are already loaded and the retrieval
   models' graphs kept (trainer/saved_graphs.py); its time is from
   the append until the pass has written the new version): both retrieval models answer at the new
   version, and a by-image query of --probes of them finds each one first from retrieval_bruteforce
   (exact), and retrieval_scann returns at least one of them in its top k (the old index holds none of
   them; the share it finds is printed: among near-duplicates an approximate index may rank others above
   an image's own copy).
6. The same images are added to the corpus records (what a pipeline run would do) and a full `clicklens
   export` of all images is timed the same way, against the same running server.

Searchability is checked every 0.1 s from the moment each command starts, so "until searchable" is when the
server first answers with the new images, also when that is before the command exits (a full export publishes
its models, then hashes the catalog for its corpus embeddings).

Every command runs as a child process, as a user runs it (TensorFlow's import included in each).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIG = os.path.join(REPO, "configs", "demo.yaml")
# The training world: small, one epoch, no graph term; only the towers' architecture matters for the timing.
BASE_WORLD = ["demo_data.num_sessions=20000", "pipeline.content_graph.source=none", "training.epochs=1",
              "training.graph_multiplier=0", "training.early_stopping_patience=0"]
READY = re.compile(r"gRPC on [\d.]+:(\d+)")
TEXT_QUERIES = ["红色 圆形", "blue square", "large green star", "小 黄色 三角形"]
CORPUS_SHARDS = 4


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def clicklens(verb: str, workdir: str, *sets: str, log_path: str, args: Sequence[str] = ()) -> float:
    """Runs `clicklens VERB [args] --set ...` as a child process; returns its wall time (raises on a non-zero
    exit)."""
    command = [sys.executable, "-m", "clicklens", verb, "--config", CONFIG, "--workdir", workdir, *args]
    for value in sets:
        command += ["--set", value]
    start = time.perf_counter()
    with open(log_path, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.call(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"clicklens {verb} exited {code}; see {log_path}")
    return seconds


# -- 1. the trained model ------------------------------------------------------------


def trained_base(args) -> str:
    """A work directory with model/checkpoints, examples/vocab.txt and examples/eval-*."""
    if args.trained:
        return args.trained
    base = os.path.join(args.workdir, "base")
    if glob.glob(os.path.join(base, "model", "checkpoints", "*.index")):
        log(f"trained model: reusing {base}")
        return base
    log_path = os.path.join(args.workdir, "base.log")
    for verb in ("generate-demo-data", "pipeline", "train"):
        log(f"trained model: clicklens {verb} ...")
        seconds = clicklens(verb, base, *BASE_WORLD, log_path=log_path)
        log(f"trained model: clicklens {verb}: {seconds:.0f} s")
    return base


# -- 2. the synthetic catalog ----------------------------------------------------------


def draw_world(total: int, image_size: int, seed: int, folder: str = ""):
    """(image ids, attribute dicts, PNG bytes) of `total` demo-world images drawn at `image_size`.

    With `folder`, the PNGs are read from there (an earlier run drew them with the same arguments)."""
    from clicklens.demo_data import images, world

    rng = np.random.default_rng(seed)
    catalog = world.make_catalog(total, rng)
    attributes = [catalog.attributes(i) for i in range(total)]
    if folder:
        pngs = []
        for image_id in catalog.image_ids:
            with open(os.path.join(folder, f"{image_id}.png"), "rb") as f:
                pngs.append(f.read())
        return list(catalog.image_ids), attributes, pngs
    pngs = []
    for i, attrs in enumerate(attributes):
        pngs.append(images.encode_png(images.draw_image(attrs, image_size, rng)))
        if (i + 1) % 20000 == 0:
            log(f"synthetic catalog: drawn {i + 1:,} / {total:,} images")
    return list(catalog.image_ids), attributes, pngs


def check_prepared_is_drawn(pngs: Sequence[bytes], image_size: int, sample: int = 200) -> None:
    """The pipeline's image preparation leaves an image drawn at the pipeline's size pixel for pixel."""
    from clicklens import compat  # noqa: F401
    import tensorflow as tf
    from clicklens.images import PngPreparer

    prepare = PngPreparer(image_size)
    for png in pngs[:sample]:
        drawn = tf.io.decode_png(png, channels=3).numpy()
        prepared = tf.io.decode_png(prepare(png), channels=3).numpy()
        if not np.array_equal(drawn, prepared):
            raise SystemExit("the prepared image differs from the drawn one: store PngPreparer's output instead")


def catalog_line(image_id: str, attributes: Dict[str, str]) -> str:
    from clicklens.catalog import CatalogEntry

    return CatalogEntry(image_id, f"images/{image_id}.png", extra=tuple(sorted(attributes.items()))).to_json()


def write_corpus(paths: Sequence[str], ids: Sequence[str], pngs: Sequence[bytes]) -> None:
    """Corpus records (clicklens/features.py: image_id and the prepared image) spread over `paths`."""
    from clicklens import compat  # noqa: F401
    import tensorflow as tf
    from clicklens import features

    options = tf.io.TFRecordOptions(compression_type="GZIP")
    writers = [tf.io.TFRecordWriter(p, options) for p in paths]
    for i, (image_id, png) in enumerate(zip(ids, pngs)):
        example = tf.train.Example(features=tf.train.Features(feature={
            features.IMAGE_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode()])),
            features.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[png]))}))
        writers[i % len(writers)].write(example.SerializeToString())
    for writer in writers:
        writer.close()


def build_bench(args, base: str, image_size: int):
    """W/bench: raw/catalog.jsonl with --images images, raw/images/, examples/ (corpus, eval, vocab), model/.

    Returns (bench dir, the new images' ids, their catalog lines, their PNGs)."""
    bench = os.path.join(args.workdir, "bench")
    raw = os.path.join(bench, "raw")
    examples = os.path.join(bench, "examples")
    total = args.images + args.new
    stamp_path = os.path.join(bench, "world.json")
    stamp = {"images": args.images, "new": args.new, "seed": args.seed, "image_size": image_size}
    reuse = os.path.exists(stamp_path) and json.load(open(stamp_path)) == stamp
    log(f"synthetic catalog: {'reading' if reuse else 'drawing'} {total:,} images at {image_size} px "
        "(demo-world generator) ...")
    start = time.perf_counter()
    ids, attributes, pngs = draw_world(total, image_size, args.seed, os.path.join(raw, "images") if reuse else "")
    log(f"synthetic catalog: done in {time.perf_counter() - start:.0f} s")
    check_prepared_is_drawn(pngs, image_size)
    for stale in ("export", "examples", "model"):
        shutil.rmtree(os.path.join(bench, stale), ignore_errors=True)
    os.makedirs(os.path.join(raw, "images"), exist_ok=True)
    if not reuse:
        for image_id, png in zip(ids, pngs):
            with open(os.path.join(raw, "images", f"{image_id}.png"), "wb") as f:
                f.write(png)
    lines = [catalog_line(i, a) for i, a in zip(ids, attributes)]
    with open(os.path.join(raw, "catalog.jsonl"), "w") as f:
        f.write("".join(line + "\n" for line in lines[:args.images]))
    os.makedirs(examples)
    write_corpus([os.path.join(examples, f"corpus-{s:05d}-of-{CORPUS_SHARDS:05d}.tfrecord.gz")
                  for s in range(CORPUS_SHARDS)], ids[:args.images], pngs[:args.images])
    for path in glob.glob(os.path.join(base, "examples", "eval-*")) + [os.path.join(base, "examples", "vocab.txt")]:
        shutil.copy(path, examples)
    shutil.copytree(os.path.join(base, "model"), os.path.join(bench, "model"))
    json.dump(stamp, open(stamp_path, "w"))
    log(f"synthetic catalog: {bench}: {args.images:,} images in the catalog and the corpus records, "
        f"{args.new:,} more to add")
    return bench, ids[args.images:], lines[args.images:], pngs[args.images:]


# -- 4. the server and its clients -------------------------------------------------------


class Server:
    """`clicklens serve` as a child process on free ports, its log in a file."""

    def __init__(self, bench: str, log_path: str, poll_seconds: float, load_threads: int, warmup_threads: int):
        command = [sys.executable, "-m", "clicklens", "serve", "--config", CONFIG, "--workdir", bench,
                   "--set", "serving.grpc_port=0", "--set", "serving.http_port=0",
                   "--set", f"serving.poll_seconds={poll_seconds}", "--set", f"serving.num_load_threads={load_threads}",
                   "--set", f"serving.num_warmup_threads={warmup_threads}"]
        self.process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
        self.log = open(log_path, "w")
        match = None
        while match is None:
            line = self.process.stderr.readline()
            if not line:
                raise SystemExit(f"the server exited before it was ready; see {log_path}")
            self.log.write(line)
            match = READY.search(line)
        self.grpc_port = int(match[1])
        threading.Thread(target=self._copy_log, daemon=True).start()

    def _copy_log(self):
        for line in self.process.stderr:
            self.log.write(line)
            self.log.flush()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


class Clients:
    """Threads sending Predicts until stopped; counts requests and failures."""

    def __init__(self, port: int, probe_png: bytes, interval: float, threads: int = 2):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_service = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.interval = interval
        self.probe_png = probe_png
        self.requests = 0
        self.failures: List[str] = []
        self.versions: Dict[str, set] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _loop(self, index: int):
        import grpc
        from clicklens import servables as S

        i = 0
        while not self._stop.is_set():
            if (i + index) % 2 == 0:
                model, signature, inputs = S.RETRIEVAL_SCANN, S.TEXT_SIGNATURE, {
                    S.QUERY: [TEXT_QUERIES[i % len(TEXT_QUERIES)].encode()]}
            else:
                model, signature, inputs = S.RETRIEVAL_BRUTEFORCE, S.IMAGE_SIGNATURE, {S.IMAGE_BYTES: [self.probe_png]}
            try:
                response = predict(self.stub, model, signature, inputs)
                with self._lock:
                    self.requests += 1
                    self.versions.setdefault(model, set()).add(response.model_spec.version.value)
            except grpc.RpcError as err:
                with self._lock:
                    self.requests += 1
                    self.failures.append(f"{model}: {err.code()}: {err.details()}")
            i += 1
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join()
        self.channel.close()


def predict(stub, model: str, signature: str, inputs, timeout: float = 60):
    from clicklens import compat  # noqa: F401
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return stub.Predict(request, timeout=timeout)


def by_image(stub, model: str, probes: Dict[str, bytes]) -> Tuple[int, List[List[str]]]:
    """(the version that answered, each probe's top k ids) of a by-image query of every probe to `model`."""
    from clicklens import compat  # noqa: F401
    import tensorflow as tf
    from clicklens import servables as S

    response = predict(stub, model, S.IMAGE_SIGNATURE, {S.IMAGE_BYTES: list(probes.values())})
    rows = [[x.decode() for x in row] for row in tf.make_ndarray(response.outputs[S.IMAGE_IDS])]
    return response.model_spec.version.value, rows


def scann_probe_share(stub, probes: Dict[str, bytes]) -> float:
    """The share of probes that retrieval_scann returns in their own top k, by image."""
    from clicklens import servables as S

    _, rows = by_image(stub, S.RETRIEVAL_SCANN, probes)
    return float(np.mean([i in row for i, row in zip(probes, rows)]))


def newest_available(model_service, model: str) -> int:
    """The newest AVAILABLE version of `model` (GetModelStatus), 0 when none."""
    from tensorflow_serving.apis import get_model_status_pb2

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    response = model_service.GetModelStatus(request, timeout=60)
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return max((v.version for v in response.model_version_status if v.state == available), default=0)


def searchable(clients: "Clients", probes: Dict[str, bytes], version: int) -> bool:
    """Both retrieval models answer at `version` or later; by image, retrieval_bruteforce (exact) ranks every
    probe first, and retrieval_scann has at least one of them in its top k (no old version holds any).  The
    probes are sent only once both report such a version AVAILABLE, so that checking adds little load."""
    from clicklens import servables as S

    if any(newest_available(clients.model_service, m) < version for m in S.RETRIEVAL_MODELS):
        return False
    stub, ids = clients.stub, list(probes)
    for model in (S.RETRIEVAL_BRUTEFORCE, S.RETRIEVAL_SCANN):
        answered, rows = by_image(stub, model, probes)
        if answered < version:
            return False
        if model == S.RETRIEVAL_BRUTEFORCE and [row[0] for row in rows] != ids:
            return False
        if model == S.RETRIEVAL_SCANN and not any(i in row for i, row in zip(ids, rows)):
            return False
    return True


def time_until_searchable(command, clients: "Clients", probes: Dict[str, bytes], version: int,
                          timeout: float = 3600):
    """(command seconds, seconds from the command's start until `searchable`).  Searchability is checked while
    the command runs, not only after it: a full export publishes the models before it hashes the catalog for
    its corpus embeddings, and the new images are searchable from then on."""
    start = time.perf_counter()
    outcome: Dict[str, object] = {}

    def run() -> None:
        try:
            outcome["seconds"] = command()
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
            outcome["error"] = err

    runner = threading.Thread(target=run, name="command")
    runner.start()
    searchable_after = None
    while searchable_after is None:
        if "error" in outcome:
            break
        if searchable(clients, probes, version):
            searchable_after = time.perf_counter() - start
        elif time.perf_counter() - start > timeout:
            raise SystemExit(f"version {version} not searchable after {timeout:.0f} s")
        else:
            time.sleep(0.1)
    runner.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["seconds"], searchable_after


def new_and_old_recall(bench: str, version: int, new_ids: Sequence[str], sample: int = 1000) -> Tuple[float, float]:
    """recall@k against exact search of retrieval_scann `version`, searched as it is served, with the embeddings
    of the new images as queries and with as many kept images' (by image: each finds itself and its
    near-duplicates): an index updated in place must find new points as well as old ones."""
    from clicklens import compat  # noqa: F401
    import tensorflow as tf
    from clicklens import corpus_embeddings
    from trainer import scann_update
    from trainer.ranking import exact_top_k
    from trainer.scann_index import ScannIndex, ScannParams
    from trainer.scann_tuning import recall_at_k

    folder = os.path.join(bench, "export")
    rows = corpus_embeddings.read(os.path.join(folder, "corpus_embeddings", str(version)))
    saved = scann_update.read_saved_index(os.path.join(folder, "retrieval_scann", str(version)))
    k = 10
    index = ScannIndex.from_tensors(saved.tensors, saved.ids, k, ScannParams(**rows.scann))
    dataset = saved.tensors["dataset"]
    position = {image_id: i for i, image_id in enumerate(saved.ids.tolist())}
    new = {i.encode() for i in new_ids}
    old = [i for i in saved.ids.tolist() if i not in new]
    picked = np.random.default_rng(0).choice(len(old), min(sample, len(old)), replace=False)
    recalls = []
    for ids in ([i.encode() for i in new_ids], [old[i] for i in picked]):
        queries = dataset[[position[i] for i in ids]]
        exact = saved.ids[exact_top_k(dataset, queries, k)]
        recalls.append(recall_at_k(index(tf.constant(queries))[1].numpy(), exact))
    return recalls[0], recalls[1]


class Watcher:
    """`clicklens reindex --watch` as a child process, its log appended to the benchmark's."""

    def __init__(self, bench: str, log_path: str, poll_seconds: float):
        self.report = os.path.join(bench, "export", "reindex_report.json")
        if os.path.exists(self.report):
            os.remove(self.report)
        command = [sys.executable, "-m", "clicklens", "reindex", "--watch", "--poll-seconds", str(poll_seconds),
                   "--config", CONFIG, "--workdir", bench]
        self.log = open(log_path, "a")
        self.log.write(f"\n$ {' '.join(command)}\n")
        self.log.flush()
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_for_version(None)  # the first pass: the catalog is what the export indexed

    def wait_for_version(self, version, timeout: float = 3600) -> float:
        """Seconds until the report of a pass names `version` (None: a pass that wrote nothing)."""
        start = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"clicklens reindex --watch exited {self.process.returncode}")
            try:
                with open(self.report) as f:
                    report = json.load(f)
                if report.get("version") == version:
                    return time.perf_counter() - start
            except (OSError, ValueError):  # not written yet, or being written
                pass
            if time.perf_counter() - start > timeout:
                raise SystemExit(f"no reindex pass wrote version {version} within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


# -- the run -------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="scratch directory (the trained model is cached there)")
    parser.add_argument("--trained", default="", help="a work directory after `clicklens train` to take the model from")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=1_000)
    parser.add_argument("--probes", type=int, default=10, help="new images queried to decide they are searchable")
    parser.add_argument("--client-interval", type=float, default=0.05, help="seconds between a client's requests")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--watch", action="store_true",
                        help="reindex with a `clicklens reindex --watch` already running instead of a one-off command")
    parser.add_argument("--poll-seconds", type=float, default=0.1, help="--watch: how often it checks the catalog")
    parser.add_argument("--server-poll-seconds", type=float, default=0.5,
                        help="serving.poll_seconds: how often the server looks for new versions (TF Serving's "
                             "--file_system_poll_wait_seconds; both sides of the comparison wait for it)")
    parser.add_argument("--server-load-threads", type=int, default=2,
                        help="serving.num_load_threads (TF Serving's --num_load_threads): versions the server loads at "
                             "once while it goes on polling; 0 loads them one after another")
    parser.add_argument("--server-warmup-threads", type=int, default=2,
                        help="serving.num_warmup_threads (TF Serving's num_model_warmup_threads): a version's warmup "
                             "requests replayed at once; 1 replays them one after another")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    from clicklens import compat  # noqa: F401
    from clicklens.config import load_config
    from clicklens.images import PngPreparer

    config = load_config(CONFIG, [])
    load_start = os.getloadavg()
    base = trained_base(args)
    bench, new_ids, new_lines, new_pngs = build_bench(args, base, config.pipeline.image_size)
    log_path = os.path.join(args.workdir, "bench.log")
    open(log_path, "w").close()

    log(f"full export of {args.images:,} images ...")
    export_1 = clicklens("export", bench, log_path=log_path)
    log(f"full export of {args.images:,} images: {export_1:.1f} s")

    server = Server(bench, os.path.join(args.workdir, "server.log"), args.server_poll_seconds,
                    args.server_load_threads, args.server_warmup_threads)
    prepare = PngPreparer(config.pipeline.image_size)
    probes = {i: prepare(p) for i, p in list(zip(new_ids, new_pngs))[:args.probes]}
    clients = Clients(server.grpc_port, next(iter(probes.values())), args.client_interval)
    watcher = None
    try:
        if args.watch:
            log("starting clicklens reindex --watch (its first pass finds the catalog unchanged) ...")
            watcher = Watcher(bench, log_path, args.poll_seconds)
            reindex = lambda: watcher.wait_for_version(2)  # noqa: E731
        else:
            reindex = lambda: clicklens("reindex", bench, log_path=log_path)  # noqa: E731
        with open(os.path.join(bench, "raw", "catalog.jsonl"), "a") as f:
            f.write("".join(line + "\n" for line in new_lines))
        log(f"added {args.new:,} images to the catalog; reindex{' (watching)' if args.watch else ''} ...")
        reindex_cmd, reindex_searchable = time_until_searchable(reindex, clients, probes, 2)
        if watcher is not None:
            watcher.stop()
            watcher = None
        reindex_share = scann_probe_share(clients.stub, probes)
        new_recall, old_recall = new_and_old_recall(bench, 2, new_ids)
        report = json.load(open(os.path.join(bench, "export", "reindex_report.json")))
        log(f"reindex: {reindex_cmd:.1f} s, searchable after {reindex_searchable:.1f} s; stages {report['seconds']}")

        write_corpus([os.path.join(bench, "examples", "corpus-new-00000.tfrecord.gz")], new_ids, new_pngs)
        log(f"full export of {args.images + args.new:,} images ...")
        export_cmd, export_searchable = time_until_searchable(
            lambda: clicklens("export", bench, log_path=log_path), clients, probes, 3)
        export_share = scann_probe_share(clients.stub, probes)
        log(f"full export: {export_cmd:.1f} s, searchable after {export_searchable:.1f} s")
        time.sleep(1.0)
    finally:
        if watcher is not None:
            watcher.stop()
        clients.stop()
        server_code = server.stop()
    load_end = os.getloadavg()

    ratio_cmd, ratio = export_cmd / reindex_cmd, export_searchable / reindex_searchable
    scann = report["scann"]
    print()
    print(f"reindex benchmark: {args.images:,} images + {args.new:,} new; configs/demo.yaml model "
          f"({config.model.embedding_dim}-d, {config.pipeline.image_size} px CNN {config.model.cnn_filters}); "
          f"{os.cpu_count()} CPUs; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end; the server "
          f"looks for new versions every {args.server_poll_seconds} s and loads up to {args.server_load_threads} at once, "
          f"warming each up on {args.server_warmup_threads} threads"
          + (f", the watch checks the catalog every {args.poll_seconds} s" if args.watch else ""))
    print(f"{'':40s} {'command s':>10s} {'until searchable s':>19s}")
    print(f"{'full export, ' + format(args.images, ',') + ' images':40s} {export_1:10.1f} {'':>19s}")
    how = "reindex --watch" if args.watch else "reindex"
    print(f"{how + ', +' + format(args.new, ',') + ' images':40s} {reindex_cmd:10.1f} {reindex_searchable:19.1f}")
    print(f"{'full export, ' + format(args.images + args.new, ',') + ' images':40s} {export_cmd:10.1f} "
          f"{export_searchable:19.1f}")
    print(f"full export / reindex: {ratio_cmd:.1f}x (commands), {ratio:.2f}x (until searchable); target >= 10x: "
          f"{'met' if ratio >= 10 else 'NOT met'}")
    print(f"reindex: reused {report['reused']:,}, embedded {report['embedded']:,}, graphs {report.get('graphs')}, "
          f"stages (s) {report['seconds']}; "
          f"ScaNN {scann['params']} ({'updated: ' + str(scann['updated']) if 'updated' in scann else 'rebuilt'}), "
          f"recall@{report['k']} "
          f"{scann['recall']}; by image, retrieval_scann has {reindex_share:.0%} of the {len(probes)} probes in "
          f"their own top {report['k']} after reindex, {export_share:.0%} after the full export")
    print(f"retrieval_scann version 2, by image (each image's embedding as the query), recall@10 against exact "
          f"search: the {args.new:,} new images {new_recall:.4f}, {args.new:,} kept ones {old_recall:.4f}")
    print(f"requests during both swaps: {clients.requests:,}, failed: {len(clients.failures)} "
          f"(versions served: { {m: sorted(v) for m, v in clients.versions.items()} }); target 0: "
          f"{'met' if not clients.failures else 'NOT met'}; server exit {server_code}")
    for failure in clients.failures[:5]:
        print("  ", failure)
    return 0 if not clients.failures else 1


if __name__ == "__main__":
    sys.exit(main())
