"""`clicklens pipeline`: query logs + image catalog -> training examples, on any Beam runner.

    clicklens pipeline --config configs/demo.yaml --workdir W [Beam options...]

Options the clicklens command line does not know are Beam pipeline options, so
`--runner DataflowRunner --project P --region R --temp_location gs://B/tmp
--setup_file ./setup.py` runs the same pipeline on Dataflow, and
`--direct_num_workers 2 --direct_running_mode multi_processing` uses two local
processes.  The stages, each a named composite PTransform in the module of its stage:

    ReadLogs (parse) ------------------------------------------> dead letters
      |-- SelectTrainingPairs (selection: click stats, query category, selection rules)
      |-- BuildImageGraph (graph: co-click + similar-image-click edges, top-k neighbours)
      `-- LearnAndWriteVocabulary (vocab: training queries only) -> vocab.txt
    ReadCatalogImages (images: catalog, image loading) --------> dead letters
    JoinTrainingExamples (neighbors: neighbour images, per-image join, hard negatives,
                          candidate probability) --------------> dead letters
    WriteExamples (outputs: split by query hash) --------------> train-*, eval-*, corpus-*
    WriteDeadLetters (outputs) --------------------------------> dead_letter-*
    PipelineReport (report: every figure) ---------------------> report.json

Each stage logs a progress line with its count ("pipeline: ClickStats: 12,345
(query, image) pairs"), and `run` logs the report's headline figures at the end.
"""


import json
import logging
import re
from typing import Dict, List, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_pipelines import graph, images, neighbors, outputs, parse, report, selection, vocab
from beam_pipelines.dead_letters import DEAD_LETTER
from clicklens.config import Config
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir, join

logger = logging.getLogger(__name__)

OUTPUT_PREFIXES = ("train", "eval", "corpus", "dead_letter")


def input_paths(config: Config, workdir: Workdir) -> Dict[str, str]:
    """The log glob and catalog path: pipeline.logs / .catalog, or the work-dir defaults."""
    return {"logs": config.pipeline.logs or workdir.logs_glob,
            "catalog": config.pipeline.catalog or workdir.catalog}


def pipeline_options(extra_args: Sequence[str]) -> PipelineOptions:
    """Beam PipelineOptions from the command line's unknown options (DirectRunner when none is given).

    Beam itself only warns about options it does not know and drops them, so a
    typo such as `--runnr DataflowRunner` would quietly run locally; here it is
    an error that names the option.
    """
    options = PipelineOptions(list(extra_args or []))
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    if unknown:
        raise ClicklensError("unknown option(s) for `clicklens pipeline` (neither clicklens nor Beam knows them): "
                             + ", ".join(f"--{name}" for name in sorted(unknown)))
    return options


def local_runner(options: PipelineOptions):
    """The runner object for `options`: Beam's FnApiRunner when the direct runner is asked for, else None.

    Beam 2.77's DirectRunner first tries the Prism runner, which downloads a
    binary from GitHub at run time; clicklens never downloads at run time, so
    the direct runner is the FnApiRunner (the fast batch engine behind it, which
    honours --direct_num_workers and --direct_running_mode).  Any other runner
    name (DataflowRunner, FlinkRunner, ...) is left to Beam.
    """
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner", "direct", "FnApiRunner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None


def make_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """The Beam pipeline object `run` fills: the options' runner (local FnApiRunner by default)."""
    return beam.Pipeline(runner=local_runner(options), options=options)


def check_inputs(config: Config, workdir: Workdir) -> None:
    """Fails early, with a clear message, on inputs or settings the pipeline cannot use."""
    paths = input_paths(config, workdir)
    if not FileSystems.match([paths["logs"]])[0].metadata_list:
        raise ClicklensError(f"pipeline: no log files match {paths['logs']} (run generate-demo-data, or set pipeline.logs)")
    if not FileSystems.exists(paths["catalog"]):
        raise ClicklensError(f"pipeline: image catalog {paths['catalog']} not found (set pipeline.catalog)")
    for pattern in config.pipeline.entity_patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ClicklensError(f"pipeline.entity_patterns: {pattern!r} is not a valid regex: {err}") from None


def remove_previous_outputs(workdir: Workdir) -> None:
    """Deletes the shards of an earlier run, so a run with fewer shards leaves no stale files."""
    patterns = [join(workdir.examples, f"{prefix}-*") for prefix in OUTPUT_PREFIXES]
    stale: List[str] = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    stale += [p for p in (workdir.vocab, workdir.report) if FileSystems.exists(p)]
    if stale:
        logger.info("removing %d files of a previous run under %s", len(stale), workdir.examples)
        FileSystems.delete(stale)


def build_pipeline(p: beam.Pipeline, config: Config, workdir: Workdir) -> None:
    """Adds every stage, from the raw inputs to the written outputs, to pipeline `p`."""
    cfg = config.pipeline
    paths = input_paths(config, workdir)

    logs = p | "ReadLogs" >> parse.ReadLogs(paths["logs"])
    records = logs[parse.RECORDS]
    pairs = records | "SelectTrainingPairs" >> selection.SelectTrainingPairs(
        selection.SelectionRules.from_config(cfg))
    image_graph = records | "BuildImageGraph" >> graph.BuildImageGraph(
        cfg.coclick_weight, cfg.similar_click_weight, cfg.min_edge_weight, cfg.max_neighbors)
    catalog = p | "ReadCatalogImages" >> images.ReadCatalogImages(
        paths["catalog"], cfg.image_source, cfg.image_size, cfg.feature_dim)

    joined = {"selected": pairs[selection.SELECTED], "images": catalog[images.IMAGES],
              "neighbors": image_graph["neighbors"], "bad_image_ids": catalog[images.BAD_IMAGE_IDS]} | (
        "JoinTrainingExamples" >> neighbors.JoinTrainingExamples(cfg.eval_fraction, cfg.hard_negatives))
    by_split = {"examples": joined[neighbors.EXAMPLES], "images": catalog[images.IMAGES]} | (
        "WriteExamples" >> outputs.WriteExamples(config, workdir.examples))
    vocabulary = records | "LearnAndWriteVocabulary" >> vocab.LearnAndWriteVocabulary(
        cfg.vocab_size, cfg.eval_fraction, workdir.vocab)
    dead_letters = (logs[DEAD_LETTER], catalog[DEAD_LETTER], joined[DEAD_LETTER]) | (
        "WriteDeadLetters" >> outputs.WriteDeadLetters(join(workdir.examples, "dead_letter")))

    figures = {
        "lines": logs[parse.LINES], "records": records, "dead_letters": dead_letters,
        "pair_stats": pairs[selection.PAIR_STATS], "selected": pairs[selection.SELECTED],
        "graph_edges": image_graph["edges"], "graph_neighbors": image_graph["neighbors"],
        "catalog_entries": catalog[images.ENTRIES], "images": catalog[images.IMAGES],
        "bad_image_ids": catalog[images.BAD_IMAGE_IDS], "examples": joined[neighbors.EXAMPLES],
        "dropped": joined[neighbors.DROPPED], "vocabulary": vocabulary, **by_split,
    }
    (figures
     | "PipelineReport" >> report.PipelineReport(cfg.max_neighbors, cfg.hard_negatives)
     | "WriteReport" >> outputs.WriteSingleFile(workdir.report))


def run(config: Config, workdir: Workdir, args) -> int:
    """The `clicklens pipeline` verb: checks inputs, runs the pipeline, logs the report's headline figures."""
    check_inputs(config, workdir)
    options = pipeline_options(getattr(args, "extra_args", []))
    remove_previous_outputs(workdir)
    paths = input_paths(config, workdir)
    logger.info("pipeline: logs %s, catalog %s -> %s", paths["logs"], paths["catalog"], workdir.examples)
    with make_pipeline(options) as p:
        build_pipeline(p, config, workdir)
    summary = read_report(workdir)
    logger.info("pipeline: %d log records (%d bad), %d selected pairs, %d graph edges, examples %s",
                summary["log_records"]["read"], summary["dead_letter_records"], summary["selected_pairs"],
                summary["graph"]["edges"], summary["examples"])
    return 0


def read_report(workdir: Workdir) -> dict:
    """The report.json a finished run wrote."""
    with FileSystems.open(workdir.report) as f:
        return json.loads(f.read().decode("utf-8"))
