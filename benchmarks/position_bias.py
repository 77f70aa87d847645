"""Position bias (issue 16): the PBM fit against the demo world's truth, raw vs debiased CTR, and what it costs.

    .venv/bin/python benchmarks/position_bias.py --workdir /tmp/clicklens-position-bias [--repeats 2]
        [--set demo_data.ranker_quality_weight=1.0] [--set pipeline.min_dwell_ms=4000] [Beam options...]

Generates the demo world (configs/demo.yaml plus --set overrides) into the work
dir if it has no logs, then, in this process and on the same runner, runs the
whole pipeline with pipeline.position_bias=none and =pbm (alternating, --repeats
times each; the smallest CPU time of each counts) and prints

  1. the fitted propensity per position next to the generator's truth
     (raw/manifest.json) and the largest absolute error (target: <= 0.05);
  2. how raw and debiased CTR disagree (the pbm report's position_bias.selection):
     the share of clicked image pairs of a query that they order differently, and
     the pairs one selection keeps and the other does not;
  3. ground truth, without training: NDCG@10 of each query's shown images ranked
     by raw vs debiased CTR, the precision of the top K clicked pairs by each CTR
     (what a CTR threshold keeps), what CTR thresholds keep (pairs, share relevant, share of the
     relevant pairs), and the share of the training examples' click
     weight (train + eval outputs) that goes to relevant pairs, none vs pbm;
  4. the pipeline's CPU seconds with none and pbm (median over --repeats: a shared machine is noisy), the
     extra share (target: <= 15 %), and Beam's own time in the SelectTrainingPairs stage, where the
     extra work is (click statistics by position, the fit, debiased selection);
  5. with --train-seeds, the trained models: for each arm of --arms (`none`, `pbm`, or either with
     `:<min_dwell_ms>`, e.g. `pbm:5000`), one pipeline run into <workdir>/arms/<arm>/ and one
     `clicklens train` per seed, each a fresh process; ground-truth NDCG@10 and recall@10 of the eval
     queries (metrics.json's `ground_truth`), mean and spread (max - min) over the seeds, and the
     target: pbm's NDCG@10 above none's by more than 3x the larger spread.  The arm `oracle` is `none`
     with the training examples cut to the pairs the ground truth calls relevant: clicks denoised
     perfectly, the most any debiasing of which pairs to learn from could reach.

    .venv/bin/python benchmarks/position_bias.py --workdir /tmp/clicklens-position-bias \
        --train-seeds 1 2 3 --arms none pbm none:5000 pbm:5000 oracle
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import pathlib
import shutil
import statistics
import sys
import time
from typing import Dict, List, Set, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apache_beam.io.filesystems import FileSystems  # noqa: E402

from beam_pipelines import pipeline, position_bias, selection  # noqa: E402
from beam_pipelines.click_stats import PositionQueryStatsFn, slot_event  # noqa: E402
from clicklens.config import DEFAULT_CONFIG, load_config  # noqa: E402
from clicklens.errors import BadRecord  # noqa: E402
from clicklens.log_schema import parse_log_line  # noqa: E402
from clicklens.workdir import Workdir  # noqa: E402
from benchmarks.cold_start import clicklens, link  # noqa: E402
from benchmarks.pipeline_throughput import seconds_per_stage  # noqa: E402
from tests.pipeline_digest import tfrecords  # noqa: E402


def ensure_world(config, workdir: Workdir) -> None:
    """Generates the demo world into workdir unless it already has logs."""
    if not FileSystems.match([workdir.logs_glob])[0].metadata_list:
        from clicklens.demo_data import generate

        print(f"generating the demo world into {workdir.raw} ...", flush=True)
        generate.generate(config.demo_data, workdir)


def run_variant(config, workdir: Workdir, variant: str, beam_args) -> Tuple[float, float, dict, List]:
    """One pipeline run with pipeline.position_bias=variant: (CPU seconds, Beam's seconds in the
    SelectTrainingPairs stage, report, training pairs)."""
    run_config = dataclasses.replace(config, pipeline=dataclasses.replace(config.pipeline, position_bias=variant))
    start = time.process_time()
    result = pipeline.run_pipeline(run_config, workdir, beam_args)
    cpu = time.process_time() - start
    stage = seconds_per_stage(result).get("SelectTrainingPairs", 0.0)
    return cpu, stage, pipeline.read_report(workdir), training_pairs(workdir)


def training_pairs(workdir: Workdir) -> List[Tuple[str, str, float]]:
    """(query, image_id, click_weight) of every text-query example in train and eval."""
    import tensorflow as tf

    out = []
    for split in ("train", "eval"):
        for path in sorted(glob.glob(os.path.join(workdir.examples, f"{split}-*.tfrecord.gz"))):
            for record in tfrecords(path):
                f = tf.train.Example.FromString(record).features.feature
                query = f["query"].bytes_list.value[0].decode("utf-8")
                if query:
                    out.append((query, f["image_id"].bytes_list.value[0].decode("utf-8"),
                                f["click_weight"].float_list.value[0]))
    return out


def ground_truth(workdir: Workdir) -> Dict[str, Set[str]]:
    with open(workdir.ground_truth, encoding="utf-8") as f:
        return {row["query"]: set(row["relevant_image_ids"]) for row in map(json.loads, f) if row["relevant_image_ids"]}


def query_stats(workdir: Workdir, min_dwell_ms: float):
    """{query: QueryStats with by_slot} from the logs, as the pipeline's combiner makes them (no session cap)."""
    fn = PositionQueryStatsFn()
    accs = {}
    # The pipeline's own log glob (dt= partitions included), read the way Beam reads it (.gz or plain).
    paths = sorted(m.path for m in FileSystems.match([workdir.logs_glob])[0].metadata_list)
    for path in paths:
        with FileSystems.open(path) as f:
            for line in f.read().splitlines():
                try:
                    record = parse_log_line(line)
                except BadRecord:
                    continue
                for query, event in slot_event(record, min_dwell_ms, "none"):
                    accs[query] = fn.add_input(accs.get(query) or fn.create_accumulator(), event)
    return {query: fn.extract_output(acc) for query, acc in accs.items()}


def ndcg_at_10(ranked: List[str], relevant: Set[str]) -> float:
    dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(ranked[:10]) if i in relevant)
    ideal = sum(1 / math.log2(r + 2) for r in range(min(10, len(relevant))))
    return dcg / ideal if ideal else 0.0


def ctr_rankings(stats, truth, rules, table) -> Dict[str, float]:
    """Mean NDCG@10 over the ground-truth queries of their shown images ranked by raw and by debiased CTR."""
    sums = {"raw": 0.0, "debiased": 0.0}
    n = 0
    for query, qs in stats.items():
        if query not in truth:
            continue
        items = list(qs.images.items())
        raw = sorted(items, key=lambda kv: (-selection.raw_figures(kv[1], rules).ctr, kv[0]))
        debiased = sorted(items, key=lambda kv: (-selection.debiased_figures(kv[1], rules, table).ctr, kv[0]))
        sums["raw"] += ndcg_at_10([i for i, _ in raw], truth[query])
        sums["debiased"] += ndcg_at_10([i for i, _ in debiased], truth[query])
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()} | {"queries": n}


def clicked_pair_ctrs(stats, truth, rules, table) -> List[Tuple[bool, float, float]]:
    """(relevant?, raw CTR, debiased CTR) of every clicked (query, image) pair of the ground-truth queries."""
    return [(image_id in truth[query], selection.raw_figures(s, rules).ctr,
             selection.debiased_figures(s, rules, table).ctr)
            for query, qs in stats.items() if query in truth for image_id, s in qs.images.items() if s.clicks]


def precision_at(rows, ks=(2000, 5000, 10000, 15000)) -> Dict[int, Tuple[float, float]]:
    """{K: (raw, debiased)}: the share relevant among the K clicked pairs (`clicked_pair_ctrs` rows) with the
    highest raw / debiased CTR (which CTR is the better relevance estimate)."""
    out = {}
    for k in ks:
        raw = sorted(rows, key=lambda r: -r[1])[:k]
        debiased = sorted(rows, key=lambda r: -r[2])[:k]
        out[k] = (sum(r[0] for r in raw) / max(len(raw), 1), sum(r[0] for r in debiased) / max(len(debiased), 1))
    return out


def thresholds_kept(rows, thresholds=(0.1, 0.15, 0.2, 0.25)):
    """{threshold: ((n, precision, recall) by raw CTR, the same by debiased CTR)}: what a CTR threshold keeps
    of the clicked pairs (`clicked_pair_ctrs` rows; recall: the share of the relevant clicked pairs kept)."""
    relevant = max(sum(r[0] for r in rows), 1)
    out = {}
    for t in thresholds:
        kept = [[r[0] for r in rows if r[column] > t] for column in (1, 2)]
        out[t] = tuple((len(k), sum(k) / max(len(k), 1), sum(k) / relevant) for k in kept)
    return out


def weight_on_relevant(pairs, truth) -> Tuple[float, float]:
    """(share of training pairs that are relevant, share of their click weight on relevant pairs)."""
    known = [(q, i, w) for q, i, w in pairs if q in truth]
    relevant = [(i in truth[q], w) for q, i, w in known]
    return (sum(r for r, _ in relevant) / max(len(relevant), 1),
            sum(w for r, w in relevant if r) / max(sum(w for _, w in relevant), 1e-12))


ORACLE = "oracle"


def arm_overrides(arm: str) -> List[str]:
    """`none`, `pbm`, `none:5000`, `pbm:5000` -> the --set overrides of that arm (`oracle`: none's)."""
    variant, _, dwell = arm.partition(":")
    if variant == ORACLE and not dwell:
        variant = "none"
    elif variant not in ("none", "pbm"):
        raise SystemExit(f"--arms: {arm!r} is not none, pbm (optionally with :<min_dwell_ms>) or {ORACLE}")
    return [f"pipeline.position_bias={variant}"] + ([f"pipeline.min_dwell_ms={float(dwell)}"] if dwell else [])


def keep_relevant_pairs(examples: pathlib.Path, truth: Dict[str, Set[str]]) -> Tuple[int, int]:
    """Rewrites the train files under `examples` keeping only the examples whose (query, image) the ground
    truth calls relevant (the `oracle` arm: clicks denoised perfectly); (kept, total)."""
    import tensorflow as tf

    kept = total = 0
    for path in sorted(examples.glob("train-*.tfrecord.gz")):
        records = list(tfrecords(str(path)))
        with tf.io.TFRecordWriter(str(path), options="GZIP") as out:
            for record in records:
                f = tf.train.Example.FromString(record).features.feature
                query = f["query"].bytes_list.value[0].decode("utf-8")
                total += 1
                if f["image_id"].bytes_list.value[0].decode("utf-8") in truth.get(query, ()):
                    kept += 1
                    out.write(record)
    return kept, total


def train_arms(args, workdir: Workdir) -> Dict[str, List[dict]]:
    """Section 5: per arm one pipeline run and one training per seed, each `clicklens` verb a fresh process
    (benchmarks/cold_start.py's runner); {arm: [metrics of each seed]}."""
    results: Dict[str, List[dict]] = {}
    raw = pathlib.Path(workdir.raw).resolve()
    results_path = pathlib.Path(workdir.root, "arms", "results.json")
    for arm in args.arms:
        root = pathlib.Path(workdir.root, "arms", arm.replace(":", "-dwell"))
        root.mkdir(parents=True, exist_ok=True)
        link(raw, root / "raw")
        overrides = args.overrides + arm_overrides(arm)
        clicklens("pipeline", root, args.config, overrides, root / "pipeline.log")
        if arm == ORACLE:
            kept, total = keep_relevant_pairs(root / "examples", ground_truth(workdir))
            print(f"   {ORACLE}: kept the {kept} of {total} training examples whose pair is relevant "
                  f"({kept / max(total, 1):.1%})", flush=True)
        results[arm] = []
        for seed in args.train_seeds:
            run = root / f"seed{seed}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir()
            link(raw, run / "raw")
            link(root / "examples", run / "examples")
            seconds = clicklens("train", run, args.config, overrides + [f"training.seed={seed}"],
                                root / f"train-seed{seed}.log")
            metrics = json.loads((run / "model" / "metrics.json").read_text(encoding="utf-8"))
            truth = metrics["ground_truth"]["trained"]
            seen = metrics["cold_start"]["train_queries"]
            results[arm].append({"seed": seed, "seconds": seconds, "ndcg@10": truth["ndcg@10"],
                                 "recall@10": truth["recall@10"],
                                 "warm": seen["logged"]["trained"]["recall@10"],
                                 "cold": seen["cold"]["trained"]["recall@10"]})
            print(f"   {arm} seed {seed}: ground truth NDCG@10 {truth['ndcg@10']:.4f}, recall@10 "
                  f"{truth['recall@10']:.4f}; cold start warm / cold {results[arm][-1]['warm']:.3f} / "
                  f"{results[arm][-1]['cold']:.3f}", flush=True)
            results_path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


def print_arms(results: Dict[str, List[dict]]) -> None:
    """The table of section 5 and the NDCG target for each pbm arm against the none arm of the same dwell."""
    print("\n   arm        seeds  GT NDCG@10 (spread)  GT recall@10 (spread)  warm / cold recall@10  train s")
    spread = {}
    for arm, runs in results.items():
        cells = {}
        for key in ("ndcg@10", "recall@10", "warm", "cold"):
            values = [r[key] for r in runs]
            cells[key] = (statistics.mean(values), max(values) - min(values))
        spread[arm] = cells
        print(f"   {arm:<10} {len(runs):>5}  {cells['ndcg@10'][0]:.4f} ({cells['ndcg@10'][1]:.4f})     "
              f"{cells['recall@10'][0]:.4f} ({cells['recall@10'][1]:.4f})       "
              f"{cells['warm'][0]:.3f} / {cells['cold'][0]:.3f}          "
              f"{statistics.mean(r['seconds'] for r in runs):.0f}")
    for arm in results:
        variant, _, dwell = arm.partition(":")
        if variant != "pbm":
            continue
        for base in dict.fromkeys(("none" + (":" + dwell if dwell else ""), "none")):
            if base not in results:
                continue
            (on, on_spread), (off, off_spread) = spread[arm]["ndcg@10"], spread[base]["ndcg@10"]
            needed = 3 * max(on_spread, off_spread)
            seeds = min(len(results[arm]), len(results[base]))
            verdict = "met" if on - off > needed else "NOT met"
            print(f"   {arm} vs {base}: NDCG@10 {on:.4f} vs {off:.4f}, gain {on - off:+.4f}, 3 x spread {needed:.4f}: "
                  f"{verdict if seeds >= 2 else 'no spread from one seed, no verdict'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/clicklens-position-bias")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--repeats", type=int, default=1, help="Pipeline runs per variant (alternating).")
    parser.add_argument("--train-seeds", type=int, nargs="*", default=[],
                        help="Section 5: train each arm once per seed (none: skip training).")
    parser.add_argument("--arms", nargs="+", default=["none", "pbm"],
                        help="Section 5's arms: none or pbm, optionally :<min_dwell_ms> (e.g. pbm:5000), or "
                             "oracle (none's examples cut to the relevant pairs).")
    args, beam_args = parser.parse_known_args(argv)
    config = load_config(args.config, args.overrides)
    workdir = Workdir(args.workdir)
    ensure_world(config, workdir)

    cpu: Dict[str, List[float]] = {"none": [], "pbm": []}
    stage: Dict[str, List[float]] = {"none": [], "pbm": []}
    results = {}
    for _ in range(args.repeats):
        for variant in ("none", "pbm"):
            seconds, stage_seconds, report, pairs = run_variant(config, workdir, variant, beam_args)
            cpu[variant].append(seconds)
            stage[variant].append(stage_seconds)
            results[variant] = (report, pairs)
            print(f"pipeline position_bias={variant}: {seconds:.1f} CPU s, SelectTrainingPairs stage "
                  f"{stage_seconds:.1f} s", flush=True)

    with open(os.path.join(workdir.raw, "manifest.json"), encoding="utf-8") as f:
        truth_props = json.load(f)["examination_propensities"]
    report = results["pbm"][0]["position_bias"]
    fit, compare = report["fit"], report["selection"]
    print(f"\n1. examination propensity by position (relative to 1), {fit['pairs_fitted']} pairs / "
          f"{fit['rows_fitted']} (pair, position) rows fitted, {fit['iterations']} EM iterations")
    print("   position  fitted   truth   error   raw CTR/CTR@1")
    ctr = fit["ctr_by_position"]
    errors = []
    for p in sorted(truth_props, key=int):
        est = fit["propensities"].get(p)
        if est is None:
            print(f"   {p:>8}  (none)  {truth_props[p]:.3f}")
            continue
        errors.append(abs(est - truth_props[p]))
        print(f"   {p:>8}  {est:.3f}   {truth_props[p]:.3f}  {est - truth_props[p]:+.3f}   {ctr[p] / ctr['1']:.3f}")
    worst = max(errors) if errors else math.inf
    print(f"   max abs error {worst:.4f} (target <= 0.05: {'met' if worst <= 0.05 else 'NOT met'}); "
          f"positions without propensity: {fit['positions_without_propensity']}")

    print("\n2. raw vs debiased CTR (pbm run)")
    print(f"   clicked image pairs of a query ordered differently: {compare['discordant_image_pairs']} / "
          f"{compare['clicked_image_pairs']} = {compare['discordant_image_pairs'] / max(compare['clicked_image_pairs'], 1):.1%}")
    print(f"   clicked images whose CTR rank in their query changes: {compare['rank_changed']} / "
          f"{compare['clicked_pairs']} = {compare['rank_changed'] / max(compare['clicked_pairs'], 1):.1%}")
    changed = compare["selected_raw"] + compare["selected_debiased"] - 2 * compare["selected_both"]
    print(f"   selected pairs: raw {compare['selected_raw']}, debiased {compare['selected_debiased']}, in one only "
          f"{changed} ({changed / max(compare['selected_raw'], 1):.1%})")

    truth = ground_truth(workdir)
    rules = selection.SelectionRules.from_config(config.pipeline)
    rules = dataclasses.replace(rules, position_bias="pbm")
    stats = query_stats(workdir, config.pipeline.min_dwell_ms)
    table = position_bias.propensity_table(fit)
    ranks = ctr_rankings(stats, truth, rules, table)
    print(f"\n3. ground truth, no training ({ranks['queries']} queries)")
    print(f"   NDCG@10 of shown images ranked by CTR: raw {ranks['raw']:.4f}, debiased {ranks['debiased']:.4f}")
    pair_ctrs = clicked_pair_ctrs(stats, truth, rules, table)
    for k, (raw, debiased) in precision_at(pair_ctrs).items():
        print(f"   precision of the top {k} clicked pairs by CTR: raw {raw:.3f}, debiased {debiased:.3f}")
    for t, ((n_raw, p_raw, r_raw), (n_deb, p_deb, r_deb)) in thresholds_kept(pair_ctrs).items():
        print(f"   CTR > {t:.2f} keeps: raw {n_raw} pairs, {p_raw:.3f} relevant, {r_raw:.3f} of the relevant ones; "
              f"debiased {n_deb}, {p_deb:.3f}, {r_deb:.3f}")
    for variant in ("none", "pbm"):
        precision, weighted = weight_on_relevant(results[variant][1], truth)
        print(f"   training pairs ({variant}): {len(results[variant][1])}, relevant {precision:.1%}, "
              f"click weight on relevant pairs {weighted:.1%}")

    none_cpu, pbm_cpu = statistics.median(cpu["none"]), statistics.median(cpu["pbm"])
    extra = pbm_cpu / none_cpu - 1
    stage_extra = statistics.median(stage["pbm"]) - statistics.median(stage["none"])
    print(f"\n4. pipeline CPU seconds (median of {args.repeats}): none {none_cpu:.1f}, pbm {pbm_cpu:.1f}, extra "
          f"{extra:+.1%} (target <= 15 %: {'met' if extra <= 0.15 else 'NOT met'}); all runs "
          f"{ {k: [round(x, 1) for x in v] for k, v in cpu.items()} }")
    print(f"   SelectTrainingPairs stage (Beam's per-transform times, where all the extra work is): "
          f"{ {k: [round(x, 1) for x in v] for k, v in stage.items()} }; median extra {stage_extra:.1f} s = "
          f"{stage_extra / none_cpu:.1%} of the none run's CPU")

    if args.train_seeds:
        for arm in args.arms:
            arm_overrides(arm)  # refuses a bad arm before the first pipeline run
        print(f"\n5. trained models, seeds {args.train_seeds} (configs' training section; eval-split queries "
              f"against raw/ground_truth.jsonl)", flush=True)
        print_arms(train_arms(args, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
