"""The daily loop over simulated days with drift: warm-started updates vs daily retraining vs never updating.

    nice -n 10 .venv/bin/python benchmarks/daily_loop.py --workdir /tmp/clicklens-daily

1. One generated world (configs/demo.yaml's, smaller: --images images, --sessions-per-day sessions a day)
   with --days days of dated logs; from --drift-day on, a share of the text queries mean another intent
   (demo_data.drift_day / drift_fraction): their clicks and ground truth move to other images.
2. For every training seed (--seeds), two work directories over the same raw data, each run one
   `clicklens update --as-of DAY` a day with training.seed=SEED (a child process, as a user or the scheduled
   cloud build runs it):
   - warm:    training.warm_start=latest, training.warm_start_epochs=--warm-epochs, pipeline.base_vocab
              kept (what `update` does by default);
   - scratch: `update --from-scratch`: a fresh vocabulary and random weights, --epochs epochs.
   Both read the same window (--window-days, --half-life) and pass the same gate (export --gate).
   On day 1 there is nothing to start from, so both arms train from random weights, each its own run.
3. (c) never updated: the warm arm's day-1 export (version 1), scored on every later day.
4. After each update, the version each arm serves is scored on that day's ground truth
   (W/raw/ground_truth/dt=DAY.jsonl: every distinct text query, and the drifted ones alone) with the same
   code as the export gate (trainer/gate.py: each model's own exported encoders on the stored corpus
   images, exact top 10): recall@10.
5. A `clicklens serve` on the warm arm's export from the end of day 1, and client threads sending gRPC
   Predicts until the last update is published: every failed request is counted.

Prints one row per day: recall@10 of the three (mean ± spread over the seeds), the training time of both
arms (the training steps, as `train` records them in finished.json: without start-up and the evaluation it
ends with) and the largest warm / scratch ratio over the seeds; then the server's request / failure count
and the issue's checks (warm >= scratch - spread and ratio <= 0.5 on every day after the first, both beat
the never-updated model on drifted queries from the drift day, no failed request). Everything, with each
update's wall time and gate decision, goes to W/daily_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The same child-process runner, config, server and gRPC clients as the reindex benchmark.
from benchmarks.reindex import CONFIG, Clients, Server, clicklens, log  # noqa: E402  (after the path is set)


def world_sets(args) -> List[str]:
    """The world, pipeline and training settings every run of this benchmark shares."""
    return [f"demo_data.num_images={args.images}", f"demo_data.num_sessions={args.sessions_per_day * args.days}",
            f"demo_data.days={args.days}", f"demo_data.drift_day={args.drift_day}",
            f"demo_data.drift_fraction={args.drift_fraction}", "demo_data.malformed_lines=50",
            f"pipeline.window_days={args.window_days}", f"pipeline.half_life_days={args.half_life}",
            f"training.epochs={args.epochs}", f"training.warm_start_epochs={args.warm_epochs}",
            "training.early_stopping_patience=0"]


def make_world(args, root: str) -> Dict[str, object]:
    """Generates the world once (root/world); every seed's arms copy its raw data."""
    world = os.path.join(root, "world")
    manifest_path = os.path.join(world, "raw", "manifest.json")
    if not os.path.exists(manifest_path):
        clicklens("generate-demo-data", world, *world_sets(args), log_path=os.path.join(root, "generate.log"))
    return json.load(open(manifest_path))


def fresh_arms(root: str, seed_root: str) -> Dict[str, str]:
    """Two work directories (warm, scratch) under seed_root, each with a copy of the world's raw data."""
    arms = {}
    for arm in ("warm", "scratch"):
        target = os.path.join(seed_root, arm)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(root, "world", "raw"), os.path.join(target, "raw"))
        arms[arm] = target
    return arms


def use_day_truth(arm_dir: str, day: str) -> None:
    """The evaluation inside train and the gate score against the day's ground truth."""
    raw = os.path.join(arm_dir, "raw")
    shutil.copyfile(os.path.join(raw, "ground_truth", f"dt={day}.jsonl"), os.path.join(raw, "ground_truth.jsonl"))


def read_truth(path: str) -> Dict[str, Dict[str, float]]:
    truth = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["relevant_image_ids"]:
                truth[row["query"]] = {i: 1.0 for i in row["relevant_image_ids"]}
    return truth


def score_version(config, workdir, version: int, truth, drifted) -> Dict[str, float]:
    """recall@10 of an exported version on all of the day's queries and on the drifted ones (trainer/gate.py)."""
    from trainer import gate

    ids, images = gate.corpus_images(config, workdir)
    sources = {"all": truth, "drifted": {q: r for q, r in truth.items() if q in drifted}}
    scores = gate.score(gate.load_served_encoders(workdir, version), ids, images, sources)
    return {source: scores[source]["recall@10"] for source in sources}


def run_seed(args, root: str, seed: int, config, days: List[str], drifted) -> Dict[str, object]:
    """Both arms over every day with training.seed=seed, a server on the warm arm from the end of day 1 and
    client threads against it; returns the per-day rows and the server's request / failure counts."""
    from clicklens import servables as S
    from clicklens.workdir import Workdir

    seed_root = os.path.join(root, f"seed-{seed}")
    sets = world_sets(args) + [f"training.seed={seed}"]
    arms = {arm: Workdir(path) for arm, path in fresh_arms(root, seed_root).items()}
    rows, server, clients = [], None, None
    try:
        for n, day in enumerate(days, start=1):
            row: Dict[str, object] = {"day": day}
            for arm, workdir in arms.items():
                use_day_truth(workdir.root, day)
                flags = ["--as-of", day] + (["--from-scratch"] if arm == "scratch" else [])
                row[f"{arm}_update_s"] = round(clicklens("update", workdir.root, *sets, args=flags,
                                                         log_path=os.path.join(seed_root, f"{arm}.log")), 1)
                report = json.load(open(os.path.join(workdir.root, "updates", f"{day}.json")))
                row[f"{arm}_train_stage_s"] = report["seconds"]["train"]
                row[f"{arm}_train_s"] = report["fit_seconds"]  # the training steps alone
                row[f"{arm}_gate"] = (report.get("gate_report") or {}).get("decision", "publish")
            if server is None:
                server = Server(arms["warm"].root, os.path.join(seed_root, "server.log"))
                probe = open(os.path.join(arms["warm"].images, sorted(os.listdir(arms["warm"].images))[0]),
                             "rb").read()
                clients = Clients(server.grpc_port, probe, args.client_interval)
            truth = read_truth(os.path.join(arms["warm"].raw, "ground_truth", f"dt={day}.jsonl"))
            for arm, workdir in arms.items():
                version = max(S.version_dirs(workdir.export_model(S.QUERY_ENCODER)))
                row[arm] = score_version(config, workdir, version, truth, drifted)
            row["never"] = score_version(config, arms["warm"], 1, truth, drifted)
            row["ratio"] = row["warm_train_s"] / row["scratch_train_s"] if row["scratch_train_s"] else float("nan")
            rows.append(row)
            log(f"seed {seed} day {n} {day}: recall@10 all / drifted: warm {row['warm']['all']:.3f} / "
                f"{row['warm']['drifted']:.3f}, scratch {row['scratch']['all']:.3f} / "
                f"{row['scratch']['drifted']:.3f}, never updated {row['never']['all']:.3f} / "
                f"{row['never']['drifted']:.3f}; train s warm {row['warm_train_s']} scratch "
                f"{row['scratch_train_s']} ({row['ratio']:.2f}x); gate warm {row['warm_gate']} "
                f"scratch {row['scratch_gate']}")
        time.sleep(3 * config.serving.poll_seconds)  # the last version is picked up under load
    finally:
        if clients is not None:
            clients.stop()
        if server is not None:
            server.stop()
    served = {"requests": clients.requests if clients else 0, "failed": len(clients.failures) if clients else 0,
              "versions_seen": {m: sorted(v) for m, v in (clients.versions if clients else {}).items()},
              "first_failures": clients.failures[:5] if clients else []}
    return {"seed": seed, "days": rows, "serving": served}


def mean_spread(values: List[float]) -> Tuple[float, float]:
    """The mean and the spread (max - min) of one figure over the seeds."""
    return sum(values) / len(values), max(values) - min(values)


def summarize(args, runs: List[Dict[str, object]], days: List[str], drifted) -> Dict[str, object]:
    """Prints the per-day table (mean ± spread over seeds) and the issue's four checks; returns them."""
    print(f"\nDaily loop: {args.days} days, drift from day {args.drift_day} ({len(drifted)} query texts), "
          f"window {args.window_days} days, half-life {args.half_life or 'none'}; scratch {args.epochs} epochs, "
          f"warm {args.warm_epochs}; training seeds {args.seeds} (± is max - min over seeds)")
    print(f"{'day':<12}{'warm all':>15}{'scratch':>15}{'never':>8}{'warm drift':>15}{'scratch':>15}{'never':>8}"
          f"{'train s warm':>14}{'scratch':>9}{'max ratio':>10}")
    checks = {"warm_matches_scratch": True, "time_ratio_at_most_half": True, "both_beat_never_on_drifted": True}
    table = []
    for n, day in enumerate(days):
        rows = [run["days"][n] for run in runs]
        figure = {key: mean_spread([row[arm][source] for row in rows])
                  for arm in ("warm", "scratch", "never") for source in ("all", "drifted")
                  for key in [f"{arm}_{source}"]}
        warm_s = mean_spread([row["warm_train_s"] for row in rows])[0]
        scratch_s = mean_spread([row["scratch_train_s"] for row in rows])[0]
        max_ratio = max(row["ratio"] for row in rows)
        if n > 0:  # day 1: both arms train from random weights
            spread = max(figure["warm_all"][1], figure["scratch_all"][1])
            checks["warm_matches_scratch"] &= figure["warm_all"][0] >= figure["scratch_all"][0] - spread
            checks["time_ratio_at_most_half"] &= max_ratio <= 0.5
        if n + 1 >= args.drift_day:
            for arm in ("warm", "scratch"):
                checks["both_beat_never_on_drifted"] &= figure[f"{arm}_drifted"][0] > figure["never_drifted"][0]
        show = lambda key: f"{figure[key][0]:.3f}±{figure[key][1]:.3f}"  # noqa: E731
        print(f"{day:<12}{show('warm_all'):>15}{show('scratch_all'):>15}{figure['never_all'][0]:>8.3f}"
              f"{show('warm_drifted'):>15}{show('scratch_drifted'):>15}{figure['never_drifted'][0]:>8.3f}"
              f"{warm_s:>14.1f}{scratch_s:>9.1f}{max_ratio if n else float('nan'):>10.2f}")
        table.append({"day": day, **{k: list(v) for k, v in figure.items()}, "warm_train_s": warm_s,
                      "scratch_train_s": scratch_s, "max_ratio": max_ratio})
    requests = sum(run["serving"]["requests"] for run in runs)
    failed = sum(run["serving"]["failed"] for run in runs)
    checks["no_failed_requests"] = failed == 0 and requests > 0
    print(f"server on the warm arm, days 2-{args.days}, every seed: {requests} requests, {failed} failed")
    for name, ok in checks.items():
        print(f"  {name}: {'met' if ok else 'NOT met'}")
    return {"table": table, "checks": checks, "requests": requests, "failed": failed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/clicklens-daily")
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--drift-day", type=int, default=3)
    parser.add_argument("--drift-fraction", type=float, default=0.15)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--sessions-per-day", type=int, default=8000)
    parser.add_argument("--window-days", type=int, default=3)
    parser.add_argument("--half-life", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of a run from scratch")
    parser.add_argument("--warm-epochs", type=int, default=1, help="epochs of a warm-started run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="training seeds; every seed runs both arms over every day on the same world")
    parser.add_argument("--client-interval", type=float, default=0.05)
    args = parser.parse_args(argv)

    from clicklens import compat  # noqa: F401
    from clicklens.config import load_config

    root = os.path.abspath(args.workdir)
    os.makedirs(root, exist_ok=True)
    manifest = make_world(args, root)
    days: List[str] = manifest["dates"]
    drifted = set(manifest["drifted_queries"])
    config = load_config(CONFIG, world_sets(args))
    log(f"world: {args.images} images, {args.sessions_per_day} sessions a day over {args.days} days, "
        f"{len(drifted)} drifted query texts from day {args.drift_day}; window {args.window_days} days; "
        f"seeds {args.seeds}")
    runs = [run_seed(args, root, seed, config, days, drifted) for seed in args.seeds]
    summary = summarize(args, runs, days, drifted)
    with open(os.path.join(root, "daily_loop.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
