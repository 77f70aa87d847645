"""Cold start on the demo world: graph off vs click graph vs click + content graph, over several seeds.

    .venv/bin/python benchmarks/cold_start.py [--workdir /tmp/clicklens-cold-start] [--seeds 1 2 3]
        [--variants graph_off click_graph content_pixels content_table content_model] [--set section.key=value ...]

One demo world (configs/demo.yaml, so cold_fraction 0.2 of its images are
never shown in any session), then for each variant one pipeline run and one
`clicklens train` (evaluation included) per seed, each a fresh process running
the real verbs:

- graph_off: the click-only pipeline, trained with training.graph_multiplier=0;
- click_graph: the same examples with the graph term on (co-click edges only);
- content_pixels: pipeline.content_graph.source=pixels (click + content graph);
- content_nograd: the content_pixels examples, trained with the opt-in
  training.graph_neighbor_gradient=false (neighbours' forward pass only);
- content_table: the content_pixels examples, trained with the opt-in
  training.graph_neighbor_table_steps=--table-steps (default 100: neighbours'
  embeddings from a table refreshed every 100 steps, without gradient:
  trainer/neighbor_table.py);
- content_model: source=model, the content graph built by RunInference from the
  image_encoder that `clicklens export` wrote after the content_pixels run of the
  first seed (the "second round");
- pbm: the content_pixels pipeline with pipeline.position_bias=pbm (pairs
  selected and weighted by position-debiased clicks), trained like content_pixels.

It prints, per variant, recall@10 for train-split (seen) queries over logged
images ("warm") and over never-logged images ("cold"), the same run's
pixel-kNN-over-clicks baseline on the cold images and the ratio, as mean and
spread (max - min) over the seeds, the training time and epochs, and checks the
issue's targets.  Everything is also written to <workdir>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = ("graph_off", "click_graph", "content_pixels", "content_nograd", "content_table", "content_model", "pbm")
PIPELINE_OF = {"graph_off": "click", "click_graph": "click", "content_pixels": "pixels", "content_nograd": "pixels",
               "content_table": "pixels", "content_model": "model", "pbm": "pbm"}
# What each pipeline kind sets (the content graph's source; "model" adds its model_dir).
PIPELINE_OVERRIDES = {"click": ["pipeline.content_graph.source=none"],
                      "pixels": ["pipeline.content_graph.source=pixels"],
                      "model": ["pipeline.content_graph.source=model"],
                      "pbm": ["pipeline.content_graph.source=pixels", "pipeline.position_bias=pbm"]}
# What a variant's training runs set besides training.seed ({table_steps}: --table-steps).
TRAINING_OF = {"graph_off": ["training.graph_multiplier=0"],
               "content_nograd": ["training.graph_neighbor_gradient=false"],
               "content_table": ["training.graph_neighbor_table_steps={table_steps}"]}


def clicklens(verb: str, workdir: pathlib.Path, config: str, overrides, log: pathlib.Path) -> float:
    """Runs `python -m clicklens <verb>` in a fresh process (output to `log`); returns its wall time in seconds."""
    argv = [sys.executable, "-m", "clicklens", verb, "--config", config, "--workdir", str(workdir)]
    for override in overrides:
        argv += ["--set", override]
    started = time.time()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.time() - started
    if code:
        sys.exit(f"`{' '.join(argv[2:])}` failed with exit code {code}; see {log}")
    print(f"  {verb:<20} {seconds:7.1f} s   ({workdir.name})", flush=True)
    return seconds


def link(target: pathlib.Path, name: pathlib.Path) -> None:
    """`name` -> `target` (a run's work directory shares the world and examples of its pipeline)."""
    if name.is_symlink() or name.exists():
        name.unlink()
    name.symlink_to(target, target_is_directory=True)


def run_pipeline(kind: str, base: pathlib.Path, config: str, extra, model_dir: str = "") -> pathlib.Path:
    """The examples of one pipeline variant under base/pipeline-<kind>."""
    root = base / f"pipeline-{kind}"
    root.mkdir(parents=True, exist_ok=True)
    link(base / "world" / "raw", root / "raw")
    overrides = list(extra) + PIPELINE_OVERRIDES[kind]
    if model_dir:
        overrides.append(f"pipeline.content_graph.model_dir={model_dir}")
    seconds = clicklens("pipeline", root, config, overrides, base / f"pipeline-{kind}.log")
    report = json.loads((root / "examples" / "report.json").read_text())
    print(f"    graph {json.dumps(report.get('graph', {}))}; examples {json.dumps(report['examples'])}", flush=True)
    return root, seconds


def train(variant: str, seed: int, examples_root: pathlib.Path, base: pathlib.Path, config: str, extra,
          table_steps: int = 100):
    """One training run (evaluation included) of `variant` with training.seed=seed; its metrics.json and time."""
    run = base / "runs" / f"{variant}-seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    link(base / "world" / "raw", run / "raw")
    link(examples_root / "examples", run / "examples")
    if (run / "model").exists():
        subprocess.call(["rm", "-rf", str(run / "model")])
    overrides = list(extra) + [f"training.seed={seed}"] + [o.format(table_steps=table_steps)
                                                              for o in TRAINING_OF.get(variant, [])]
    seconds = clicklens("train", run, config, overrides, base / "runs" / f"{variant}-seed{seed}.log")
    metrics = json.loads((run / "model" / "metrics.json").read_text())
    log_text = (base / "runs" / f"{variant}-seed{seed}.log").read_text()
    epochs = log_text.count(": eval ndcg@10")
    return run, metrics, seconds, epochs


def figures(metrics) -> dict:
    """The cold-start figures the table shows, from one run's metrics.json."""
    cold = metrics["cold_start"]
    seen = cold["train_queries"]
    held_out = cold["eval_queries"]
    return {
        "warm": seen["logged"]["trained"]["recall@10"],
        "cold": seen["cold"]["trained"]["recall@10"],
        "cold_pixel_knn": seen["cold"]["pixel_knn"]["recall@10"],
        "cold_random": seen["cold"]["random"]["recall@10"],
        "cold_vs_pixel_knn": seen["cold"]["recall@10_vs_pixel_knn"],
        "warm_pixel_knn": seen["logged"]["pixel_knn"]["recall@10"],
        "warm_vs_pixel_knn": seen["logged"]["recall@10_vs_pixel_knn"],
        "eval_all": held_out["all"]["trained"]["recall@10"],
        "eval_cold": held_out["cold"]["trained"]["recall@10"],
    }


def summary(values):
    return statistics.mean(values), max(values) - min(values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/clicklens-cold-start")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="section.key=value for every verb (e.g. training.epochs=4)")
    parser.add_argument("--table-steps", type=int, default=100,
                        help="content_table's training.graph_neighbor_table_steps (refresh interval)")
    parser.add_argument("--summarize", action="store_true",
                        help="only print the table and targets of <workdir>/results.json (an earlier, maybe partial, run)")
    args = parser.parse_args(argv)
    base = pathlib.Path(args.workdir)
    if args.summarize:
        print_summary(json.loads((base / "results.json").read_text()), base)
        return 0
    (base / "runs").mkdir(parents=True, exist_ok=True)
    print(f"cold-start benchmark in {base}: variants {args.variants}, seeds {args.seeds}", flush=True)

    clicklens("generate-demo-data", base / "world", args.config, args.overrides, base / "generate.log")
    pipelines, results = {}, {}
    for variant in args.variants:
        kind = PIPELINE_OF[variant]
        first_run = base / "runs" / f"content_pixels-seed{args.seeds[0]}"
        if kind == "model" and not (first_run / "model" / "metrics.json").exists():
            sys.exit("content_model needs the content_pixels variant first (its image_encoder builds the graph)")
        if kind not in pipelines:
            model_dir = ""
            if kind == "model":
                clicklens("export", first_run, args.config, args.overrides, base / "export-round1.log")
                model_dir = str(first_run / "export" / "image_encoder")
            pipelines[kind] = run_pipeline(kind, base, args.config, args.overrides, model_dir)
        root, pipeline_seconds = pipelines[kind]
        runs = []
        results[variant] = {"pipeline_seconds": pipeline_seconds, "runs": runs}
        for seed in args.seeds:
            _, metrics, seconds, epochs = train(variant, seed, root, base, args.config, args.overrides,
                                                args.table_steps)
            runs.append({"seed": seed, "seconds": seconds, "epochs": epochs, **figures(metrics)})
            print(f"    seed {seed}: warm {runs[-1]['warm']:.3f}, cold {runs[-1]['cold']:.3f} "
                  f"(pixel-kNN {runs[-1]['cold_pixel_knn']:.3f}), {epochs} epochs", flush=True)
            (base / "results.json").write_text(json.dumps(results, indent=2))

    print_summary(results, base)
    return 0


def print_summary(results, base: pathlib.Path) -> None:
    """The table (mean +/- spread over each variant's seeds) and the issue's targets."""
    print("\nrecall@10, train-split (seen) queries; mean +/- spread (max - min) over each variant's seeds")
    header = ("variant", "warm (logged)", "warm / pixel-kNN", "cold (never logged)", "pixel-kNN cold",
              "cold / pixel-kNN", "eval q. cold", "train s", "epochs")
    rows = []
    for variant, result in results.items():
        runs = result["runs"]

        def cell(key, fmt="{:.3f}"):
            if any(key not in r for r in runs):  # results.json of a run before the figure existed
                return "-"
            mean, spread = summary([r[key] for r in runs])
            return f"{fmt.format(mean)} +/- {fmt.format(spread)}"

        rows.append((f"{variant} ({len(runs)} seeds)", cell("warm"), cell("warm_vs_pixel_knn", "{:.2f}"),
                     cell("cold"), cell("cold_pixel_knn"), cell("cold_vs_pixel_knn", "{:.2f}"),
                     cell("eval_cold"), f"{statistics.mean(r['seconds'] for r in runs):.0f}",
                     "/".join(str(r["epochs"]) for r in runs)))
    widths = [max(len(str(row[c])) for row in (header, *rows)) for c in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))

    print("\ntargets:")
    for variant, result in results.items():
        ratio, _ = summary([r["cold_vs_pixel_knn"] for r in result["runs"]])
        print(f"  {variant}: cold recall@10 / pixel-kNN = {ratio:.2f} (target >= 2): {'met' if ratio >= 2 else 'NOT met'}")
    for content in ("content_pixels", "content_nograd", "content_table", "content_model", "pbm"):
        if content in results and "graph_off" in results:
            on, off = results[content]["runs"], results["graph_off"]["runs"]
            cold_on, spread_on = summary([r["cold"] for r in on])
            cold_off, spread_off = summary([r["cold"] for r in off])
            warm_on, _ = summary([r["warm"] for r in on])
            warm_off, _ = summary([r["warm"] for r in off])
            spread = max(spread_on, spread_off)
            gain = cold_on - cold_off
            met = gain > 3 * spread and warm_on >= warm_off - spread
            print(f"  {content} vs graph_off: cold {cold_on:.3f} vs {cold_off:.3f} (gain {gain:+.3f}, 3 x spread "
                  f"{3 * spread:.3f}); warm {warm_on:.3f} vs {warm_off:.3f}: {'met' if met else 'NOT met'}")
    print(f"\nresults: {base / 'results.json'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    sys.exit(main())
