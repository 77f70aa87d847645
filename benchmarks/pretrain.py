"""Pretraining on the demo world: wall time, the seeing table, and cold start from random vs pretrained init.

    .venv/bin/python benchmarks/pretrain.py [--workdir /tmp/clicklens-pretrain-bench] [--seeds 1 2 3]
        [--variants graph_off content_pixels] [--inits random pretrained] [--reuse /tmp/clicklens-cold-start]
        [--set section.key=value ...] [--summarize]

One demo world (configs/demo.yaml) and its two pipelines as benchmarks/cold_start.py
makes them (click graph only, and click + pixel content graph), or those of
an earlier cold_start.py run with `--reuse DIR` (its world/ and pipeline-*/
are linked, never written).  Then, each verb a fresh process:

1. `clicklens pretrain` on the content pipeline's examples (its corpus-* is
   every decodable catalog image): wall time, and the seeing table (image ->
   image recall@10 on similar_images.jsonl for raw pixels, the random tower,
   the pretrained tower, and with --click-trained RUN that run's click-trained
   tower) from W/pretrain/report.json;
2. `clicklens train` per variant (graph_off: click pipeline, graph term off;
   content_pixels: the demo's click + content graph) x init (random,
   pretrained: model.image_init=pretrained) x seed, with the cold-start
   figures of each run's metrics.json (warm = logged images, cold = never
   logged, train-split queries).

Finished runs are kept in <workdir>/results.json and not run again, so an
interrupted benchmark resumes; `--summarize` only prints the tables and the
issue's targets from it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cold_start import PIPELINE_OF, REPO, clicklens, figures, link, run_pipeline, summary  # noqa: E402

VARIANTS = ("graph_off", "content_pixels")
INITS = ("random", "pretrained")


def prepare_world(base: pathlib.Path, reuse: str, config: str, extra) -> dict:
    """{pipeline kind: examples root}: linked from `reuse`, or generated and run here."""
    roots = {}
    if reuse:
        source = pathlib.Path(reuse)
        link(source / "world", base / "world")
        for kind in ("click", "pixels"):
            link(source / f"pipeline-{kind}", base / f"pipeline-{kind}")
            roots[kind] = base / f"pipeline-{kind}"
        return roots
    clicklens("generate-demo-data", base / "world", config, extra, base / "generate.log")
    for kind in ("click", "pixels"):
        roots[kind], _ = run_pipeline(kind, base, config, extra)
    return roots


def run_pretrain(base: pathlib.Path, examples_root: pathlib.Path, config: str, extra, click_trained: str = "") -> dict:
    """`clicklens pretrain` in base/pretrain-run: its wall time and W/pretrain/report.json.

    With `click_trained` (a `clicklens train` run's workdir on the same examples), its model/ is linked
    into the run, so the seeing table also has the click-trained tower.
    """
    run = base / "pretrain-run"
    run.mkdir(parents=True, exist_ok=True)
    link(base / "world" / "raw", run / "raw")
    link(examples_root / "examples", run / "examples")
    if click_trained:
        link(pathlib.Path(click_trained).resolve() / "model", run / "model")
    subprocess.call(["rm", "-rf", str(run / "pretrain")])
    seconds = clicklens("pretrain", run, config, extra, base / "pretrain.log")
    report = json.loads((run / "pretrain" / "report.json").read_text())
    return {"seconds": seconds, "weights": report["weights"], "seeing": report["seeing"]}


def train(variant: str, init: str, seed: int, examples_root: pathlib.Path, base: pathlib.Path, config: str, extra,
          weights: str) -> dict:
    """One `clicklens train` run: its cold-start figures, wall time and epochs."""
    name = f"{variant}-{init}-seed{seed}"
    run = base / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    link(base / "world" / "raw", run / "raw")
    link(examples_root / "examples", run / "examples")
    subprocess.call(["rm", "-rf", str(run / "model")])
    overrides = list(extra) + [f"training.seed={seed}", f"model.image_init={init}"]
    if init == "pretrained":
        overrides.append(f"model.image_init_path={weights}")
    if variant == "graph_off":
        overrides.append("training.graph_multiplier=0")
    log = base / "runs" / f"{name}.log"
    seconds = clicklens("train", run, config, overrides, log)
    metrics = json.loads((run / "model" / "metrics.json").read_text())
    return {"seed": seed, "seconds": seconds, "epochs": log.read_text().count(": eval ndcg@10"), **figures(metrics)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/clicklens-pretrain-bench")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--inits", nargs="*", default=list(INITS), choices=INITS)
    parser.add_argument("--reuse", default="", help="a benchmarks/cold_start.py workdir whose world and pipelines "
                                                    "are linked instead of made again")
    parser.add_argument("--import-random", default="",
                        help="a benchmarks/cold_start.py results.json: its graph_off and content_pixels runs (same "
                             "world, code and seeds) stand for the random-init runs not made here")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="section.key=value for every verb (e.g. pretrain.epochs=40)")
    parser.add_argument("--click-trained", default="",
                        help="a `clicklens train` run's workdir on the content pipeline's examples (e.g. a "
                             "cold_start.py runs/content_pixels-seed1): the seeing table gets its click-trained tower")
    parser.add_argument("--pretrain-again", action="store_true",
                        help="pretrain again even if results.json has a pretraining run (and drop the runs that "
                             "started from its weights)")
    parser.add_argument("--summarize", action="store_true", help="only print <workdir>/results.json's tables")
    args = parser.parse_args(argv)
    base = pathlib.Path(args.workdir)
    results_path = base / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.summarize:
        print_summary(results, base)
        return 0
    (base / "runs").mkdir(parents=True, exist_ok=True)
    print(f"pretraining benchmark in {base}: variants {args.variants} x inits {args.inits}, seeds {args.seeds}",
          flush=True)
    roots = prepare_world(base, args.reuse, args.config, args.overrides)
    if "pretrained" in args.inits and ("pretrain" not in results or args.pretrain_again):
        results["pretrain"] = run_pretrain(base, roots["pixels"], args.config, args.overrides, args.click_trained)
        results.get("runs", {}).pop("graph_off/pretrained", None)  # made from other weights
        results.get("runs", {}).pop("content_pixels/pretrained", None)
        results_path.write_text(json.dumps(results, indent=2))
    if "pretrain" in results:
        print(format_seeing(results["pretrain"]), flush=True)
    runs = results.setdefault("runs", {})
    if args.import_random:
        earlier = json.loads(pathlib.Path(args.import_random).read_text())
        for variant in VARIANTS:
            have = {r["seed"] for r in runs.get(f"{variant}/random", [])}
            for r in earlier.get(variant, {}).get("runs", []):
                if r["seed"] not in have:
                    runs.setdefault(f"{variant}/random", []).append(dict(r, imported=args.import_random))
    for variant in args.variants:
        for init in args.inits:
            key = f"{variant}/{init}"
            done = {r["seed"] for r in runs.get(key, [])}
            for seed in args.seeds:
                if seed in done:
                    continue
                result = train(variant, init, seed, roots[PIPELINE_OF[variant]], base, args.config, args.overrides,
                               results.get("pretrain", {}).get("weights", ""))
                runs.setdefault(key, []).append(result)
                print(f"    {key} seed {seed}: warm {result['warm']:.3f}, cold {result['cold']:.3f}, "
                      f"{result['epochs']} epochs, {result['seconds']:.0f} s", flush=True)
                results_path.write_text(json.dumps(results, indent=2))
    print_summary(results, base)
    return 0


def format_seeing(pretrain: dict) -> str:
    """Pretraining's wall time and seeing table."""
    seeing = pretrain["seeing"]
    lines = [f"\npretrain: {pretrain['seconds']:.0f} s wall time (fresh process, pipeline outputs in place)",
             "seeing: image -> image recall@10 / NDCG@10 on similar_images.jsonl "
             f"({seeing['num_queries']['all']} query images, {seeing['num_queries'].get('cold', 0)} never logged)"]
    for space in ("raw_pixels", "random", "pretrained", "click_trained"):
        if space in seeing:
            cold = seeing[space].get("cold")
            ratio = seeing.get(f"{space}_vs_raw_pixels")
            lines.append(f"  {space:<14} all {seeing[space]['all']['recall@10']:.3f} / "
                         f"{seeing[space]['all']['ndcg@10']:.3f}" +
                         (f"   cold {cold['recall@10']:.3f} / {cold['ndcg@10']:.3f}" if cold else "") +
                         (f"   {ratio:.2f}x raw pixels" if ratio else ""))
    return "\n".join(lines)


def print_summary(results: dict, base: pathlib.Path) -> None:
    """The seeing table, the cold-start table (mean +/- spread over seeds) and the issue's targets."""
    if "pretrain" in results:
        print(format_seeing(results["pretrain"]))
    runs = results.get("runs", {})
    if runs:
        print("\ncold start, recall@10 of train-split (seen) queries; mean +/- spread (max - min) over seeds")
        header = ("variant / init", "warm (logged)", "cold (never logged)", "cold / pixel-kNN", "train s", "epochs")
        rows = []
        for key, rs in runs.items():
            def cell(name, fmt="{:.3f}"):
                mean, spread = summary([r[name] for r in rs])
                return f"{fmt.format(mean)} +/- {fmt.format(spread)}"
            imported = " (imported)" if any(r.get("imported") for r in rs) else ""
            rows.append((f"{key} ({len(rs)} seeds){imported}", cell("warm"), cell("cold"), cell("cold_vs_pixel_knn", "{:.2f}"),
                         f"{summary([r['seconds'] for r in rs])[0]:.0f}", "/".join(str(r["epochs"]) for r in rs)))
        widths = [max(len(str(row[c])) for row in (header, *rows)) for c in range(len(header))]
        for row in (header, *rows):
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))

    print("\ntargets:")
    if "pretrain" in results:
        seeing, seconds = results["pretrain"]["seeing"], results["pretrain"]["seconds"]
        ratio = seeing.get("pretrained_vs_raw_pixels") or 0.0
        print(f"  pretrained tower recall@10 / raw pixels = {ratio:.2f} (target >= 1.5): "
              f"{'met' if ratio >= 1.5 else 'NOT met'}")
        print(f"  pretrain wall time {seconds:.0f} s (target <= 600 s): {'met' if seconds <= 600 else 'NOT met'}")
    for variant in VARIANTS:
        pre, rand = runs.get(f"{variant}/pretrained"), runs.get(f"{variant}/random")
        if not (pre and rand):
            continue
        cold_pre, spread_pre = summary([r["cold"] for r in pre])
        cold_rand, spread_rand = summary([r["cold"] for r in rand])
        warm_pre, _ = summary([r["warm"] for r in pre])
        warm_rand, warm_spread = summary([r["warm"] for r in rand])
        spread = max(spread_pre, spread_rand)
        seeds = min(len(pre), len(rand))
        met = cold_pre - cold_rand > 3 * spread and warm_pre >= warm_rand and seeds >= 3
        print(f"  {variant}: pretrained vs random init: cold {cold_pre:.3f} vs {cold_rand:.3f} (gain "
              f"{cold_pre - cold_rand:+.3f}, 3 x spread {3 * spread:.3f}); warm {warm_pre:.3f} vs {warm_rand:.3f}"
              f"{'' if seeds >= 3 else f' ({seeds} seed(s): the spread needs 3)'}: {'met' if met else 'NOT met'}")
    print(f"\nresults: {base / 'results.json'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    sys.exit(main())
