"""Retrieval throughput, recall@10 and footprint of the exported retrieval models, in one run.

    .venv/bin/python benchmarks/retrieval.py                                    # 1M x 128, with the grid
    .venv/bin/python benchmarks/retrieval.py --n 10000000 --dim 64 --no-grid    # the scale figures

A synthetic corpus imitating trained embeddings (1,000 Gaussian clusters whose
within-cluster noise has the norm of the centres, L2-normalised; `--clusters 0`:
isotropic Gaussian, the worst case for any partitioning index) is indexed the
way `clicklens export` does it:

- ScaNN SavedModel: export.scann's auto parameters (or `--set export.scann.KEY=V`),
  tuned by trainer.scann_tuning on 500 held-out queries, served by
  trainer.scann_index.ScannIndex; compared with raw `scann` (pybind) built and
  searched with the same parameters.  `--tfrs` adds the layer export used
  before, tfrs.layers.factorized_top_k.ScaNN, with the same layout.
- "signature call, no search": a SavedModel with the same signature that
  returns fixed ids, the floor under any SavedModel's per-call time.
- BruteForce SavedModel (trainer.export_signatures.BruteForceIndex), compared
  with numpy: matmul + argpartition (over corpus blocks past 1 GB of scores);
  `--tfrs` adds tfrs.layers.factorized_top_k.BruteForce.

Each SavedModel takes query embeddings, is saved, loaded back with
serving.saved_models.load and called as the server calls it, after one warmup
call (which recreates the ScaNN searcher: "1st call s").  Batched = `--batch`
queries a call over `--queries` queries, single = one a call over `--single`
(`--bf-queries` and `--single-bf` for brute force).  The methods compared are
timed in turns, quarter-second slices each until each has run `--min-seconds`,
so they share the same stretch of machine load; the best of `--rounds` rounds
is kept.  A fresh process loads each SavedModel and answers one query to give
the server's RSS, and the memory per image above a server with a tiny model.

The grid (default on up to 2M images): leaves (auto / 2, auto, 2 x auto) x
leaves searched (1-128) x re-scoring depth (4-32 x k), each measured like the
tuning pass does; the best setting meeting the same recall is compared with
the auto one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from clicklens import compat  # noqa: E402,F401
import tensorflow as tf  # noqa: E402

from clicklens import servables  # noqa: E402
from clicklens.config import config_from_dict, load_config  # noqa: E402
from serving import saved_models  # noqa: E402
from trainer import export, export_signatures as sigs, ranking, scann_index, scann_tuning  # noqa: E402
from trainer.scann_index import ScannParams  # noqa: E402

logger = logging.getLogger("benchmarks.retrieval")
K = 10
TUNING_QUERIES = 500
GRID_SEARCHED = (1, 2, 4, 8, 16, 32, 64, 128)  # leaves searched
EMBEDDING = "embedding"
SLICE_SECONDS = 0.25
CALL_FLOOR = "signature call, no search"

SERVER_RSS = """
import json, sys, time
from clicklens import compat
import numpy as np, tensorflow as tf
from serving import saved_models
start = time.perf_counter()
function = saved_models.load(sys.argv[1]).signatures["serving_default"]
loaded = time.perf_counter()
function(embedding=tf.constant(np.ones((1, int(sys.argv[2])), np.float32)))["image_ids"].numpy()
done = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print("RESULT" + json.dumps({"load_s": loaded - start, "first_call_s": done - loaded,
                             "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
                             "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""


@dataclasses.dataclass
class Row:
    method: str
    mode: str
    qps: float = 0.0
    recall: float = float("nan")
    build_s: float = float("nan")
    first_call_s: float = float("nan")
    size_mb: float = float("nan")
    rss_mb: float = float("nan")


def synthetic(rng, n: int, dim: int, centers) -> np.ndarray:
    """Unit vectors: cluster centre + same-norm noise, or plain Gaussian when centers is None."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 1_000_000):  # in slices: float64 temporaries of 10M x 64 would take 10 GB
        m = min(n - start, 1_000_000)
        x = rng.normal(size=(m, dim)) if centers is None else (
            centers[rng.integers(0, len(centers), m)] + rng.normal(size=(m, dim)) / np.sqrt(dim))
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_top_k(corpus: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The numpy baseline: matmul + argpartition + sort of the top k (over corpus blocks past 1 GB of scores)."""
    if len(queries) * len(corpus) > 2**28:
        return ranking.exact_top_k(corpus, queries, K)
    scores = queries @ corpus.T
    top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def one_pass(search, queries: np.ndarray, batch: int) -> np.ndarray:
    """found [Q, k]: every query searched once, `batch` a call."""
    return np.concatenate([search(queries[i:i + batch]) for i in range(0, len(queries), batch)])


def save(top_k, dim: int, path: str, options=None) -> str:
    """Saves a Retrieval module over query embeddings (signature input `embedding`) at `path`."""
    module = sigs.Retrieval(None, top_k, K)
    spec = tf.TensorSpec([None, dim], tf.float32, name=EMBEDDING)
    signature = tf.function(module.search_embeddings).get_concrete_function(spec)
    tf.saved_model.save(module, path, signatures={servables.TEXT_SIGNATURE: signature}, options=options)
    return path


def load(path: str):
    """The signature function of a saved model, loaded as the server loads it."""
    return saved_models.load(path).signatures[servables.TEXT_SIGNATURE]


def saved_model_search(function):
    """A search function over a loaded signature, called as serving/predict.py calls it."""
    def search(q):
        return function(**{EMBEDDING: tf.constant(q)})[servables.IMAGE_IDS].numpy()
    return search


class NoSearch(tf.Module):
    """An "index" that searches nothing: the first k ids for every query, the query's first k values as scores.

    Saved and called like the real indexes, it measures what a signature call
    costs by itself (the floor under any SavedModel's per-call time).
    """

    def __init__(self, ids: np.ndarray):
        super().__init__(name="no_search")
        self.ids = tf.Variable(ids[:K], trainable=False)

    def __call__(self, queries: tf.Tensor, k: int = K):
        return queries[:, :k], tf.tile(self.ids[None, :k], [tf.shape(queries)[0], 1])


def server_footprint(path: str, dim: int) -> dict:
    """Size on disk, and a fresh process's load time, first-call time and RSS for the SavedModel at `path`."""
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    result = subprocess.run([sys.executable, "-c", SERVER_RSS, path, str(dim)], cwd=REPO, capture_output=True,
                            text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return {"size_mb": size / 2**20, **json.loads(result.stdout.split("RESULT", 1)[1])}


def as_indices(found: np.ndarray) -> np.ndarray:
    """Ids (b"123") or indices -> int indices."""
    return found.astype(np.int64) if found.dtype.kind in "SO" else found


def empty_server_rss(tmp: str, dim: int) -> dict:
    """{"scann": MB, "brute": MB}: a server's RSS with a 1,000-image model, the base memory per image adds to."""
    small, small_ids = synthetic(np.random.default_rng(1), 1000, dim, None), np.char.encode(np.arange(1000).astype(str))
    params = ScannParams(1, 1, scann_index.NO_QUANTIZATION)
    searcher = scann_index.build_searcher(small, K, params)
    scann_top_k = scann_index.ScannIndex.from_searcher(searcher, small_ids, K, params)
    scann_index.release(searcher)
    return {"scann": server_footprint(save(scann_top_k, dim, f"{tmp}/small_scann", export.SCANN_SAVE_OPTIONS),
                                      dim)["rss_mb"],
            "brute": server_footprint(save(sigs.BruteForceIndex(small, small_ids, K), dim, f"{tmp}/small_brute"),
                                      dim)["rss_mb"]}


def race(methods, queries, exact, batch: int, rounds: int, min_seconds: float, rows):
    """Times every (name, mode, search, count) in turns; fills `rows` with recall and the best round's q/s.

    Each round gives the methods time slices of about SLICE_SECONDS in turn until
    each has run `min_seconds`, so all are timed over the same stretch of
    machine load (other jobs share it).
    """
    for r in range(rounds):
        spent = {(name, mode): 0.0 for name, mode, _, _ in methods}
        passes = dict.fromkeys(spent, 0)
        while min(spent.values()) < min_seconds:
            for name, mode, search, count in methods:
                key, start = (name, mode), time.perf_counter()
                while passes[key] == 0 or time.perf_counter() - start < SLICE_SECONDS:
                    found = one_pass(search, queries[:count], batch if mode == "batched" else 1)
                    if r == 0 and passes[key] == 0:
                        rows[key].recall = scann_tuning.recall_at_k(as_indices(found), exact[:count])
                    passes[key] += 1
                spent[key] += time.perf_counter() - start
        for name, mode, _, count in methods:
            qps = passes[(name, mode)] * count / spent[(name, mode)]
            rows[(name, mode)].qps = max(rows[(name, mode)].qps, qps)
            logger.info("round %d: %s %s: %.0f queries/s", r + 1, name, mode, qps)


def grid(corpus, queries, exact, auto: ScannParams):
    """(trials, {num_leaves: searcher}) for leaves (auto/2, auto, 2 auto) x searched x re-scoring depth."""
    trials, searchers = [], {}
    reorders = [m * K for m in scann_tuning.REORDER_MULTIPLES]
    for num_leaves in sorted({max(2, auto.num_leaves // 2), auto.num_leaves, 2 * auto.num_leaves}):
        layout = ScannParams(num_leaves, 1, scann_index.AH, auto.dimensions_per_block or 2, max(reorders))
        start = time.perf_counter()
        searchers[num_leaves] = searcher = scann_index.build_searcher(corpus, K, layout)
        logger.info("grid: %d leaves built in %.1f s", num_leaves, time.perf_counter() - start)
        for searched in [s for s in GRID_SEARCHED if s <= num_leaves]:
            for reorder in reorders:
                params = dataclasses.replace(layout, num_leaves_to_search=searched, num_reordering_candidates=reorder)
                trials.append(scann_tuning.measure(searcher, params, queries, exact, K))
                logger.info("grid: %s: recall %.4f, %.0f q/s", params.describe(), trials[-1].recall,
                            trials[-1].queries_per_second)
    return trials, searchers


def bench_scann(args, config, corpus, ids, queries, held_out, exact, tmp: str, rows) -> scann_tuning.Tuning:
    """Tunes (as export does), saves and footprints the ScaNN SavedModel, then races it against raw scann."""
    start = time.perf_counter()
    tuning = scann_tuning.tune(corpus, K, held_out, config.export.scann, config.export.min_recall)
    tune_s = time.perf_counter() - start
    params = tuning.params
    index = scann_index.ScannIndex.from_searcher(tuning.searcher, ids, K, params)
    scann_index.release(tuning.searcher)
    save(index, args.dim, f"{tmp}/scann", export.SCANN_SAVE_OPTIONS)
    del index
    footprint = server_footprint(f"{tmp}/scann", args.dim)
    saved_model = saved_model_search(load(f"{tmp}/scann"))
    saved_model(queries[:1])  # the warmup request: recreates the searcher

    import scann

    start = time.perf_counter()
    raw = scann_index.configure(scann.scann_ops_pybind.builder(corpus, K, "dot_product"), params).build()
    raw_build = time.perf_counter() - start
    leaves, reorder = scann_index.search_depth(params)
    depth = {"final_num_neighbors": K, "pre_reorder_num_neighbors": reorder, "leaves_to_search": leaves}
    methods = [("ScaNN SavedModel", "batched", saved_model, args.queries),
               ("ScaNN SavedModel", "single", saved_model, args.single),
               ("scann pybind", "batched", lambda q: raw.search_batched_parallel(q, **depth)[0], args.queries),
               ("scann pybind", "single", lambda q: raw.search(q[0], **depth)[0][None], args.single)]
    for mode in ("batched", "single"):
        rows[("ScaNN SavedModel", mode)] = Row("ScaNN SavedModel", mode, build_s=tune_s,
                                               first_call_s=footprint["first_call_s"], size_mb=footprint["size_mb"],
                                               rss_mb=footprint["rss_mb"])
    for mode in ("batched", "single"):
        rows[("scann pybind", mode)] = Row("scann pybind", mode, build_s=raw_build)
    floor = saved_model_search(load(save(NoSearch(ids), args.dim, f"{tmp}/no_search")))
    for mode, count in [("batched", args.queries), ("single", args.single)]:
        methods.append((CALL_FLOOR, mode, floor, count))
        rows[(CALL_FLOOR, mode)] = Row(CALL_FLOOR, mode)
    if args.tfrs:
        import tensorflow_recommenders as tfrs

        start = time.perf_counter()
        layer = tfrs.layers.factorized_top_k.ScaNN(
            k=K, num_leaves=params.num_leaves, num_leaves_to_search=params.num_leaves_to_search,
            dimensions_per_block=params.dimensions_per_block,
            num_reordering_candidates=params.num_reordering_candidates or None)
        with scann_index.native_stderr_to_log("scann"):
            layer.index(tf.constant(corpus), tf.constant(ids))
        tfrs_build = time.perf_counter() - start
        tfrs_model = saved_model_search(load(save(layer, args.dim, f"{tmp}/tfrs", export.SCANN_SAVE_OPTIONS)))
        del layer
        start = time.perf_counter()
        tfrs_model(queries[:1])
        for mode, count in [("batched", args.queries), ("single", args.single)]:
            methods.append(("tfrs ScaNN SavedModel", mode, tfrs_model, count))
            rows[("tfrs ScaNN SavedModel", mode)] = Row("tfrs ScaNN SavedModel", mode, build_s=tfrs_build,
                                                        first_call_s=time.perf_counter() - start)
    race(methods, queries, exact, args.batch, args.rounds, args.min_seconds, rows)
    for mode in ("batched", "single"):
        rows[(CALL_FLOOR, mode)].recall = float("nan")  # it returns fixed ids: not a search
    return tuning


def bench_bruteforce(args, corpus, ids, queries, exact, tmp: str, rows) -> None:
    """Saves and footprints the BruteForce SavedModel, then races it against numpy (and tfrs with --tfrs)."""
    start = time.perf_counter()
    brute = sigs.BruteForceIndex(corpus, ids, K)
    build = time.perf_counter() - start
    save(brute, args.dim, f"{tmp}/brute")
    del brute
    footprint = server_footprint(f"{tmp}/brute", args.dim)
    saved_model = saved_model_search(load(f"{tmp}/brute"))
    saved_model(queries[:1])
    batched = min(args.queries, args.bf_queries)
    methods = [("BruteForce SavedModel", "batched", saved_model, batched),
               ("BruteForce SavedModel", "single", saved_model, args.single_bf),
               ("numpy matmul+argpartition", "batched", lambda q: numpy_top_k(corpus, q), batched),
               ("numpy matmul+argpartition", "single", lambda q: numpy_top_k(corpus, q), args.single_bf)]
    if args.tfrs:
        import tensorflow_recommenders as tfrs

        layer = tfrs.layers.factorized_top_k.BruteForce(k=K).index(tf.constant(corpus), tf.constant(ids))
        tfrs_model = saved_model_search(load(save(layer, args.dim, f"{tmp}/tfrs_brute")))
        del layer
        tfrs_model(queries[:1])
        methods += [("tfrs BruteForce SavedModel", "batched", tfrs_model, batched),
                    ("tfrs BruteForce SavedModel", "single", tfrs_model, args.single_bf)]
    for name, mode, _, _ in methods:
        rows[(name, mode)] = Row(name, mode)
        if name == "BruteForce SavedModel":
            rows[(name, mode)] = Row(name, mode, build_s=build, first_call_s=footprint["first_call_s"],
                                     size_mb=footprint["size_mb"], rss_mb=footprint["rss_mb"])
    race(methods, queries, exact, args.batch, args.rounds, args.min_seconds, rows)


def grid_comparison(args, corpus, queries, exact, auto: ScannParams, min_recall: float):
    """{"auto": Trial, "grid best": Trial, "settings": n}, measured alike in alternating rounds; None if no
    grid setting meets min_recall."""
    trials, searchers = grid(corpus, queries, exact, auto)
    try:
        meeting = [t for t in trials if t.recall >= min_recall]
        if not meeting:
            return None
        best = max(meeting, key=lambda t: t.queries_per_cpu_second)
        measured = {"auto": [], "grid best": []}
        for _ in range(args.rounds):
            for name, params in [("auto", auto), ("grid best", best.params)]:
                measured[name].append(scann_tuning.measure(searchers[params.num_leaves], params, queries, exact, K))
        result = {name: max(tries, key=lambda t: t.queries_per_cpu_second) for name, tries in measured.items()}
        return {**result, "settings": len(trials)}
    finally:
        for searcher in searchers.values():
            scann_index.release(searcher)


def print_report(args, min_recall: float, tuning, rows, empty_rss, grid_result, load_before: float) -> None:
    """The table, the memory per image and the targets."""
    fmt = lambda v, spec: "" if isinstance(v, float) and math.isnan(v) else format(v, spec)  # noqa: E731
    print(f"\nRetrieval, {args.n:,} x {args.dim} candidates "
          f"({'%d clusters' % args.clusters if args.clusters else 'isotropic Gaussian'}), top-{K}; "
          f"{args.queries} queries batched {args.batch} a call, {args.single} single (brute force: "
          f"{min(args.queries, args.bf_queries)} / {args.single_bf}); timed in turns, best of {args.rounds} rounds; "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"auto export.scann (min_recall {min_recall}): {tuning.params.describe()}; tuned on {TUNING_QUERIES} "
          f"held-out queries: {len(tuning.trials)} settings, build {tuning.build_seconds:.1f} s + tuning "
          f"{tuning.tuning_seconds:.1f} s, recall@{K} {tuning.chosen.recall:.4f}")
    print(f"\n{'method':<27}{'mode':<9}{'queries/s':>11}{f'recall@{K}':>11}{'build s':>9}{'1st call s':>11}"
          f"{'size MB':>9}{'server RSS MB':>14}")
    for row in rows.values():
        print(f"{row.method:<27}{row.mode:<9}{row.qps:>11.1f}{fmt(row.recall, '.4f'):>11}{fmt(row.build_s, '.1f'):>9}"
              f"{fmt(row.first_call_s, '.2f'):>11}{fmt(row.size_mb, '.0f'):>9}{fmt(row.rss_mb, '.0f'):>14}")
    print("\n(ScaNN SavedModel build s = tuning pass: build + exact reference + sweep; 1st call s: a fresh "
          "process's first query after load, which recreates the searcher; server RSS: that process after it)")
    for name, base in [("ScaNN SavedModel", empty_rss["scann"]), ("BruteForce SavedModel", empty_rss["brute"])]:
        if (name, "batched") in rows:
            per_image = (rows[(name, "batched")].rss_mb - base) * 2**20 / args.n
            print(f"{name}: {per_image:,.0f} bytes of server memory per image above a server with a 1,000-image "
                  f"model ({base:,.0f} MB): {2**30 / per_image / 1e6:,.2f}M images per GiB")

    print("\ntargets:")

    def target(text, value, goal):
        print(f"  {text:<62}{value:>8.2f}  (target >= {goal})  {'met' if value >= goal else 'NOT MET'}")

    for mode in ("batched", "single"):
        target(f"ScaNN SavedModel / scann pybind, {mode}",
               rows[("ScaNN SavedModel", mode)].qps / rows[("scann pybind", mode)].qps, 0.8)
        per_call = {name: (args.batch if mode == "batched" else 1) / rows[(name, mode)].qps * 1e3
                    for name in ("ScaNN SavedModel", "scann pybind", CALL_FLOOR)}
        print(f"    per call of {args.batch if mode == 'batched' else 1}: SavedModel "
              f"{per_call['ScaNN SavedModel']:.3f} ms, raw {per_call['scann pybind']:.3f} ms, "
              f"a signature call that searches nothing {per_call[CALL_FLOOR]:.3f} ms")
    if args.bruteforce:
        for mode in ("batched", "single"):
            target(f"BruteForce SavedModel / numpy, {mode}",
                   rows[("BruteForce SavedModel", mode)].qps / rows[("numpy matmul+argpartition", mode)].qps, 0.8)
    row = rows[("ScaNN SavedModel", "batched")]
    verdict = ("met" if row.qps >= 5000 and row.recall >= 0.95 else "NOT MET") if (args.n, args.dim) == (
        1_000_000, 128) else "(the target is for 1M x 128)"
    print(f"  auto on {args.n:,} x {args.dim}: {row.qps:,.0f} q/s batched at recall@{K} {row.recall:.4f}"
          f"  (target on 1M x 128: >= 5,000 q/s at >= 0.95)  {verdict}")
    if grid_result:
        auto, best = grid_result["auto"], grid_result["grid best"]
        print(f"  grid ({grid_result['settings']} settings) best at recall >= {min_recall}: {best.params.describe()}: "
              f"{best.queries_per_second:,.0f} q/s ({best.queries_per_cpu_second:,.0f} per CPU s), "
              f"recall {best.recall:.4f}")
        print(f"  auto, measured alike: {auto.params.describe()}: {auto.queries_per_second:,.0f} q/s "
              f"({auto.queries_per_cpu_second:,.0f} per CPU s), recall {auto.recall:.4f}")
        target("auto / grid best (queries per CPU second)",
               auto.queries_per_cpu_second / best.queries_per_cpu_second, 0.8)
    elif args.grid:
        print("  grid: no AH setting to compare with, or none met min_recall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time (ScaNN)")
    parser.add_argument("--bf-queries", type=int, default=500, help="queries timed batched (brute force)")
    parser.add_argument("--single-bf", type=int, default=30, help="queries timed one at a time (brute force)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="each timing repeats its queries this long")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--grid", action=argparse.BooleanOptionalAction, default=None,
                        help="auto vs a small grid (default: on up to 2M images)")
    parser.add_argument("--tfrs", action="store_true", help="also the tfrs.layers.factorized_top_k layers")
    parser.add_argument("--no-bruteforce", dest="bruteforce", action="store_false")
    parser.add_argument("--config", default="", help="take export.scann and min_recall from this config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    config = load_config(args.config, args.overrides) if args.config else config_from_dict({}, "defaults",
                                                                                            args.overrides)
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(args.clusters, args.dim)) / np.sqrt(args.dim) if args.clusters else None
    corpus = synthetic(rng, args.n, args.dim, centers)
    queries = synthetic(rng, args.queries, args.dim, centers)
    held_out = synthetic(rng, TUNING_QUERIES, args.dim, centers)
    ids = np.char.encode(np.arange(args.n).astype(str))
    logger.info("exact top-%d for %d queries over %d x %d", K, args.queries, args.n, args.dim)
    exact = numpy_top_k(corpus, queries)

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        empty_rss = empty_server_rss(tmp, args.dim)
        tuning = bench_scann(args, config, corpus, ids, queries, held_out, exact, tmp, rows)
        if args.bruteforce:
            bench_bruteforce(args, corpus, ids, queries, exact, tmp, rows)
    grid_result = None
    if tuning.params.quantization == scann_index.AH and (args.grid or (args.grid is None and args.n <= 2_000_000)):
        grid_result = grid_comparison(args, corpus, queries, exact, tuning.params, config.export.min_recall)
    print_report(args, config.export.min_recall, tuning, rows, empty_rss, grid_result, load_before)


if __name__ == "__main__":
    main()
