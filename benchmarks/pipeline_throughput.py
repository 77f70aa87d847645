"""Log events per CPU second: the full clicklens pipeline vs a bare Beam parse + CombinePerKey.

    .venv/bin/python benchmarks/pipeline_throughput.py --workdir /tmp/clicklens-bench [Beam options...]
    .venv/bin/python benchmarks/pipeline_throughput.py --workdir /tmp/clicklens-bench --sessions 50000 500000

Generates the demo world (configs/demo.yaml, or --config / --set overrides)
into the work dir if it has no logs yet (with --sessions: one world per size, in
W/sessions-N), then, in the same process and on the same runner, times
  1. the whole pipeline (`clicklens pipeline`), and
  2. a bare pipeline over the same log files: read lines, parse, key by query,
     CombinePerKey(count) -- the floor any Beam job over these logs pays,
and prints both rates, their ratio, the full pipeline's time per stage (Beam's
own sampled per-transform wall times, summed over each top-level stage; "outside the stages" is
the runner's grouping and encoding between stages, DoFn set-up such as TensorFlow's
import, and pipeline construction) and a digest of the outputs (tests/pipeline_digest.py),
which is equal for equal outputs.  With several --sessions, the CPU per event of
each size and each size's ratio to the first.
"""

import argparse
import collections
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apache_beam as beam  # noqa: E402
from apache_beam.metrics import monitoring_infos  # noqa: E402

from beam_pipelines import parse, pipeline  # noqa: E402
from clicklens.config import DEFAULT_CONFIG, load_config  # noqa: E402
from clicklens.workdir import Workdir  # noqa: E402
from tests.pipeline_digest import output_digests  # noqa: E402


def bare_parse_and_count(logs_glob: str, options) -> None:
    """Read + parse + CombinePerKey over the same events, nothing else."""
    with beam.Pipeline(runner=pipeline.local_runner(options), options=options) as p:
        (p
         | "ReadLogs" >> parse.ReadLines(logs_glob)
         | "ParseLogs" >> parse.ParseLogs()
         ).records | "KeyByQuery" >> beam.Map(lambda r: (r.query or r.query_image_id, 1)) | (
            "CountPerQuery" >> beam.CombinePerKey(sum))


def seconds_per_stage(result) -> dict:
    """{top-level stage name: seconds} from Beam's per-transform execution times (start + process + finish)."""
    stages = collections.Counter()
    for info in result.monitoring_infos():
        if info.urn == monitoring_infos.TOTAL_MSECS_URN:
            transform = info.labels.get("PTRANSFORM", "")
            stages[transform.split("/")[0]] += monitoring_infos.extract_counter_value(info) / 1000.0
    return stages


def timed(fn):
    """(fn's result, wall seconds, CPU seconds of this process)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu_start


def ensure_world(config, workdir: Workdir) -> None:
    """Generates the demo world into workdir unless it already has logs."""
    if not beam.io.filesystems.FileSystems.match([workdir.logs_glob])[0].metadata_list:
        from clicklens.demo_data import generate

        print(f"generating the demo world into {workdir.raw} ...", flush=True)
        generate.run(config, workdir, argparse.Namespace(extra_args=[]))


def measure(config, workdir: Workdir, beam_args) -> dict:
    """Runs the full and the bare pipeline once each on workdir's world; prints and returns the figures."""
    paths = pipeline.input_paths(config, workdir)
    options = pipeline.pipeline_options(beam_args)
    result, full_seconds, full_cpu = timed(lambda: pipeline.run_pipeline(config, workdir, beam_args))
    events = pipeline.read_report(workdir)["log_records"]["read"]
    _, bare_seconds, bare_cpu = timed(lambda: bare_parse_and_count(paths["logs"], options))

    full_rate, bare_rate = events / full_cpu, events / bare_cpu
    print(f"log events:                   {events}")
    print(f"runner options:               {' '.join(beam_args) or '(default: in-process FnApiRunner)'}")
    # CPU seconds of this process: steadier than wall time on a shared machine (in-process runner only).
    print(f"full pipeline:                {full_seconds:8.1f} s  {events / full_seconds:10.0f} events/s"
          f"   ({full_cpu:.1f} CPU s, {full_rate:.0f} events/CPU-s, {1e6 * full_cpu / events:.0f} CPU us/event)")
    print(f"bare parse + CombinePerKey:   {bare_seconds:8.1f} s  {events / bare_seconds:10.0f} events/s"
          f"   ({bare_cpu:.1f} CPU s, {bare_rate:.0f} events/CPU-s)")
    print(f"full / bare (events per CPU-s): {full_rate / bare_rate:6.3f}   (wall: {bare_seconds / full_seconds:.3f})")
    stages = seconds_per_stage(result)
    # Beam samples which transform runs (wall time): on a loaded machine the figures exceed the CPU time.
    print("full pipeline, wall seconds per stage (Beam's sampled per-transform timings):")
    for name, seconds in stages.most_common():
        if seconds >= 0.05:
            print(f"  {name:32s} {seconds:7.2f}")
    print(f"  {'(outside the stages)':32s} {full_seconds - sum(stages.values()):7.2f}")
    print(f"output digest:                {output_digests(workdir.examples)}")
    return {"events": events, "cpu_per_event": full_cpu / events, "ratio": full_rate / bare_rate}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/clicklens-bench")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--sessions", type=int, nargs="*", default=[],
                        help="demo_data.num_sessions of each world to measure (default: the config's)")
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"load average before: {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs", flush=True)
    figures = []
    for sessions in args.sessions or [None]:
        overrides = list(args.overrides) + ([f"demo_data.num_sessions={sessions}"] if sessions else [])
        config = load_config(args.config, overrides)
        root = os.path.join(args.workdir, f"sessions-{sessions}") if sessions else args.workdir
        workdir = Workdir(root)
        ensure_world(config, workdir)
        print(f"--- {config.demo_data.num_sessions} sessions ({root})", flush=True)
        figures.append(measure(config, workdir, beam_args))
    if len(figures) > 1:
        first = figures[0]
        print("CPU per event by size (x the first):")
        for f in figures:
            print(f"  {f['events']:9d} events  {1e6 * f['cpu_per_event']:8.1f} CPU us/event  "
                  f"{f['cpu_per_event'] / first['cpu_per_event']:5.2f} x   full/bare {f['ratio']:.3f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
