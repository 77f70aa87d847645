"""Log events per second: the full clicklens pipeline vs a bare Beam parse + CombinePerKey.

    .venv/bin/python benchmarks/pipeline_throughput.py --workdir /tmp/clicklens-bench [Beam options...]

Generates the demo world (configs/demo.yaml, or --config / --set overrides)
into the work dir if it has no logs yet, then, in the same process and on the
same runner, times
  1. the whole pipeline (`clicklens pipeline`), and
  2. a bare pipeline over the same log files: read lines, parse, key by query,
     CombinePerKey(count) -- the floor any Beam job over these logs pays,
and prints both rates and their ratio.
"""

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apache_beam as beam  # noqa: E402

from beam_pipelines import parse, pipeline  # noqa: E402
from clicklens.config import DEFAULT_CONFIG, load_config  # noqa: E402
from clicklens.workdir import Workdir  # noqa: E402


def bare_parse_and_count(logs_glob: str, options) -> None:
    """Read + parse + CombinePerKey over the same events, nothing else."""
    with beam.Pipeline(runner=pipeline.local_runner(options), options=options) as p:
        (p
         | "ReadLogs" >> parse.ReadLines(logs_glob)
         | "ParseLogs" >> parse.ParseLogs()
         ).records | "KeyByQuery" >> beam.Map(lambda r: (r.query or r.query_image_id, 1)) | (
            "CountPerQuery" >> beam.CombinePerKey(sum))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/clicklens-bench")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = load_config(args.config, args.overrides)
    workdir = Workdir(args.workdir)
    if not beam.io.filesystems.FileSystems.match([workdir.logs_glob])[0].metadata_list:
        from clicklens.demo_data import generate

        print(f"generating the demo world into {workdir.raw} ...", flush=True)
        generate.run(config, workdir, argparse.Namespace(extra_args=[]))
    paths = pipeline.input_paths(config, workdir)
    options = pipeline.pipeline_options(beam_args)

    start, cpu_start = time.perf_counter(), time.process_time()
    pipeline.run(config, workdir, argparse.Namespace(extra_args=beam_args))
    full_seconds, full_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    events = pipeline.read_report(workdir)["log_records"]["read"]

    start, cpu_start = time.perf_counter(), time.process_time()
    bare_parse_and_count(paths["logs"], options)
    bare_seconds, bare_cpu = time.perf_counter() - start, time.process_time() - cpu_start

    full_rate, bare_rate = events / full_seconds, events / bare_seconds
    print(f"log events:                   {events}")
    print(f"runner options:               {' '.join(beam_args) or '(default: in-process FnApiRunner)'}")
    # CPU seconds of this process: steadier than wall time on a shared machine (in-process runner only).
    print(f"full pipeline:                {full_seconds:8.1f} s  {full_rate:10.0f} events/s"
          f"   ({full_cpu:.1f} CPU s, {events / full_cpu:.0f} events/CPU-s)")
    print(f"bare parse + CombinePerKey:   {bare_seconds:8.1f} s  {bare_rate:10.0f} events/s"
          f"   ({bare_cpu:.1f} CPU s, {events / bare_cpu:.0f} events/CPU-s)")
    print(f"full / bare throughput ratio: {full_rate / bare_rate:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
