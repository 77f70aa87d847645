"""`clicklens pipeline`: query logs + image catalog -> training examples, on any Beam runner.

    clicklens pipeline --config configs/demo.yaml --workdir W [Beam options...]

Options the clicklens command line does not know are Beam pipeline options, so
`--runner DataflowRunner --project P --region R --temp_location gs://B/tmp
--setup_file ./setup.py` runs the same pipeline on Dataflow, and
`--direct_num_workers 2 --direct_running_mode multi_processing` uses two local
processes.  The stages, each a named composite PTransform in the module of its stage:

    ReadLogs (parse; corrupt .gz shards too, under skip_corrupt_files) -> dead letters
    CapSessionClicks (sessions: robot sessions over a click cap dropped whole) -> dead letters
      |-- SelectTrainingPairs (selection: click stats, query category, selection rules)
      |-- ClickGraph (graph: co-click + similar-image-click edges)
      |-- LoggedImages (cold_images: every image id the logs show) -> logged_images-*
      `-- LearnAndWriteVocabulary (vocab: training queries only, from the click stats) -> vocab.txt
    ReadCatalogImages (images: catalog, image loading) --------> dead letters
      `-- ContentGraph (content_graph: content embedding per good image, LSH top-k
                        neighbours by cosine; source pixels / features / model / none)
    BuildImageGraph (graph: click + content edges merged, top-k neighbours)
    ColdImages (cold_images: good images not logged, and those the graph reaches)
    JoinTrainingExamples (neighbors: neighbour images, per-image join, hard negatives,
                          candidate probability) --------------> dead letters
    WriteExamples (outputs: split by query hash) --------------> train-*, eval-*, corpus-*
    WriteDeadLetters (outputs) --------------------------------> dead_letter-*
    PipelineReport (report: every figure) ---------------------> report.json
    WritePropensityPlot (propensity_plot; position_bias=pbm) --> position_bias.png

Under pipeline.position_bias=pbm, SelectTrainingPairs fits examination
propensities by EM on the click statistics (position_bias.py) and selects and
weights pairs by debiased clicks and CTR; report.json gets a `position_bias`
object (the fit, and how raw and debiased selection differ).

A catalog image the logs never showed ("cold", a new upload) is in no click
edge; its content neighbours make it a graph node, so it gets an image-only
training example (query "") and the graph term pulls it towards images that look alike.

Each stage logs a progress line with its count ("pipeline: SelectPairs: 12,345
selected pairs"), and `run` logs the report's headline figures at the end.
"""


import dataclasses
import json
import logging
import re
from typing import Dict, List, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult

from beam_pipelines import (cold_images, content_graph, graph, images, neighbors, outputs, parse, position_bias,
                            propensity_plot, report, selection, sessions, vocab)
from beam_pipelines.dead_letters import DEAD_LETTER
from clicklens import servables
from clicklens.config import Config
from clicklens.errors import ClicklensError
from clicklens.workdir import Workdir, join

logger = logging.getLogger(__name__)

# W/examples/logged_images-*.txt (Workdir.logged_images_glob): every image id a valid log record shows.
LOGGED_IMAGES = "logged_images"
# The sharded outputs of a run.
OUTPUT_PREFIXES = ("train", "eval", "corpus", "dead_letter", LOGGED_IMAGES)
# W/examples/position_bias.png: the propensity plot of a pipeline.position_bias=pbm run.
PROPENSITY_PLOT = "position_bias.png"


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
    content = config.pipeline.content_graph
    if content.source == "pixels" and config.pipeline.image_source != "pixels":
        raise ClicklensError("pipeline: pipeline.content_graph.source is 'pixels' but pipeline.image_source is "
                             f"'{config.pipeline.image_source}' (no pixels to describe): set "
                             "pipeline.content_graph.source to features, model or none")
    if content.source == "model":
        content_graph.encoder_dir(content, workdir)  # raises, naming the folder, when nothing is exported
    for pattern in config.pipeline.entity_patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ClicklensError(f"pipeline.entity_patterns: {pattern!r} is not a valid regex: {err}") from None


STAGING_FOLDER = "examples.next"


def previous_outputs(workdir: Workdir) -> List[str]:
    """The files a run writes under workdir.examples (shards of every output, vocab.txt, report.json)."""
    patterns = [join(workdir.examples, f"{prefix}-*") for prefix in OUTPUT_PREFIXES]
    found: List[str] = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    whole = (workdir.vocab, workdir.report, join(workdir.examples, PROPENSITY_PLOT))
    return found + [p for p in whole if FileSystems.exists(p)]


def staging(workdir: Workdir) -> Workdir:
    """The same work directory with the pipeline's outputs going to W/examples.next, emptied first."""
    staged = dataclasses.replace(workdir, examples_folder=STAGING_FOLDER)
    delete_folder(staged.examples)  # what a failed run left
    return staged


def delete_folder(path: str) -> None:
    """Deletes a folder and everything under it, local or remote; nothing when there is none."""
    path = path.rstrip("/")
    if "://" in path:
        path += "/"  # what makes GCS (and the other object stores) delete recursively
    try:
        FileSystems.delete([path])
    except BeamIOError:
        pass  # no such folder


def publish(staged: Workdir, workdir: Workdir) -> None:
    """Replaces the previous run's outputs with the staged ones (a run with fewer shards leaves no stale files)."""
    files = [m.path for m in FileSystems.match([join(staged.examples, "*")])[0].metadata_list]
    stale = previous_outputs(workdir)
    if stale:
        logger.info("replacing %d files of the previous run under %s", len(stale), workdir.examples)
        FileSystems.delete(stale)
    if not FileSystems.exists(workdir.examples):
        FileSystems.mkdirs(workdir.examples)
    FileSystems.rename(files, [join(workdir.examples, f.rsplit("/", 1)[-1]) for f in files])
    delete_folder(staged.examples)


def build_pipeline(p: beam.Pipeline, config: Config, workdir: Workdir) -> None:
    """Adds every stage, from the raw inputs to the written outputs, to pipeline `p`."""
    cfg = config.pipeline
    paths = input_paths(config, workdir)

    logs = p | "ReadLogs" >> parse.ReadLogs(paths["logs"], cfg.skip_corrupt_files)
    # Every stage that reads the logs reads them after the session click cap.
    capped = logs[parse.RECORDS] | "CapSessionClicks" >> sessions.CapSessionClicks(
        cfg.max_clicks_per_session, cfg.max_clicks_per_session_query)
    records = capped[sessions.RECORDS]
    rules = selection.SelectionRules.from_config(cfg)
    pairs = records | "SelectTrainingPairs" >> selection.SelectTrainingPairs(
        rules, position_bias.PbmSettings.from_config(cfg))
    click_edges = records | "ClickGraph" >> graph.ClickEdges(
        cfg.coclick_weight, cfg.similar_click_weight, cfg.min_edge_weight)
    logged = records | "LoggedImages" >> cold_images.LoggedImages()
    logged | "WriteLoggedImages" >> outputs.WriteLines(
        join(workdir.examples, LOGGED_IMAGES), ".txt", cfg.num_shards)
    catalog = p | "ReadCatalogImages" >> images.ReadCatalogImages(
        paths["catalog"], cfg.image_source, cfg.image_size, cfg.feature_dim, cfg.max_image_pixels,
        cfg.allow_outside_uris)
    content = add_content_graph(p, config, workdir, catalog[images.IMAGES])
    image_graph = {graph.CLICK: click_edges, graph.CONTENT: content[content_graph.EDGES]} | (
        "BuildImageGraph" >> graph.BuildImageGraph(cfg.content_graph.weight, cfg.max_neighbors))
    cold = {"images": catalog[images.IMAGES], "logged": logged, "neighbors": image_graph["neighbors"]} | (
        "ColdImages" >> cold_images.ColdImages())

    joined = {"selected": pairs[selection.SELECTED], "images": catalog[images.IMAGES],
              "neighbors": image_graph["neighbors"], "bad_image_ids": catalog[images.BAD_IMAGE_IDS]} | (
        "JoinTrainingExamples" >> neighbors.JoinTrainingExamples(cfg.eval_fraction, cfg.hard_negatives))
    by_split = {"examples": joined[neighbors.EXAMPLES], "images": catalog[images.IMAGES]} | (
        "WriteExamples" >> outputs.WriteExamples(config, workdir.examples))
    vocabulary = pairs[selection.QUERY_STATS] | "LearnAndWriteVocabulary" >> vocab.LearnAndWriteVocabulary(
        cfg.vocab_size, cfg.eval_fraction, workdir.vocab)
    dead_letters = (logs[DEAD_LETTER], capped[DEAD_LETTER], catalog[DEAD_LETTER], joined[DEAD_LETTER]) | (
        "WriteDeadLetters" >> outputs.WriteDeadLetters(join(workdir.examples, "dead_letter")))

    figures = {
        "lines": logs[parse.LINES], "records": logs[parse.RECORDS], "dead_letters": dead_letters,
        "corrupt_files": logs[parse.CORRUPT_FILES], "robot_sessions": capped[sessions.ROBOTS],
        "query_stats": pairs[selection.QUERY_STATS], "selected": pairs[selection.SELECTED],
        "graph_edges": image_graph["edges"], "graph_neighbors": image_graph["neighbors"],
        "content_embeddings": content[content_graph.EMBEDDINGS], "content_dropped": content[content_graph.DROPPED],
        "cold_images": cold[cold_images.COLD], "cold_reached": cold[cold_images.REACHED],
        "catalog_entries": catalog[images.ENTRIES], "images": catalog[images.IMAGES],
        "bad_image_ids": catalog[images.BAD_IMAGE_IDS], "examples": joined[neighbors.EXAMPLES],
        "dropped": joined[neighbors.DROPPED], "vocabulary": vocabulary, **by_split,
    }
    bias_settings = None
    if rules.debiased:
        figures["selection_comparison"] = pairs[selection.COMPARISON]
        bias_settings = {"model": cfg.position_bias, "by": cfg.position_bias_by,
                         "propensity_clip": cfg.propensity_clip, "min_dwell_ms": cfg.min_dwell_ms}
    if selection.PROPENSITIES in pairs:
        figures["position_bias"] = pairs[selection.PROPENSITIES]
        pairs[selection.PROPENSITIES] | "WritePropensityPlot" >> propensity_plot.WritePropensityPlot(
            join(workdir.examples, PROPENSITY_PLOT))
    (figures
     | "PipelineReport" >> report.PipelineReport(cfg.max_neighbors, cfg.hard_negatives, bias_settings)
     | "WriteReport" >> outputs.WriteSingleFile(workdir.report))


def add_content_graph(p: beam.Pipeline, config: Config, workdir: Workdir, good_images) -> Dict[str, beam.PCollection]:
    """The ContentGraph stage on the good images, or empty outputs when pipeline.content_graph.source is none."""
    cfg = config.pipeline
    source = cfg.content_graph.source
    if source == "none":
        return {name: p | f"No{name.title()}" >> beam.Create([])
                for name in (content_graph.EMBEDDINGS, content_graph.DROPPED, content_graph.EDGES)}
    model_dir, image_input = "", ""
    if source == "model":
        model_dir = content_graph.encoder_dir(cfg.content_graph, workdir)
        image_input = servables.image_input(cfg.image_source)
        logger.info("pipeline: content graph from the image encoder %s", model_dir)
    return good_images | "ContentGraph" >> content_graph.BuildContentGraph(
        cfg.content_graph, cfg.image_size, model_dir, image_input)


def run_pipeline(config: Config, workdir: Workdir, extra_args: Sequence[str] = ()) -> PipelineResult:
    """Checks the inputs, runs the pipeline to the end, then replaces the previous run's outputs; its PipelineResult.

    The run writes into W/examples.next; only a run that finished moves its files into W/examples, so a
    failed run leaves the last good outputs as they were.

    The result's metrics hold Beam's per-transform timings (benchmarks/pipeline_throughput.py
    prints them per stage).
    """
    check_inputs(config, workdir)
    options = pipeline_options(extra_args)
    paths = input_paths(config, workdir)
    logger.info("pipeline: logs %s, catalog %s -> %s", paths["logs"], paths["catalog"], workdir.examples)
    staged = staging(workdir)
    p = make_pipeline(options)
    build_pipeline(p, config, staged)
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as err:  # noqa: BLE001  (the runner wraps a worker's error in its own)
        unreadable = re.search(f"{parse.UNREADABLE_FILE} [^\n]*", str(err))
        if unreadable:
            raise ClicklensError(f"pipeline: {unreadable.group(0)}; the previous outputs are kept (set "
                                 "pipeline.skip_corrupt_files=true to dead-letter such shards and go on)") from None
        not_converged = re.search(f"{position_bias.NOT_CONVERGED}[^\n]*", str(err))
        if not_converged:
            raise ClicklensError(f"pipeline: {not_converged.group(0)}; the previous outputs are kept") from None
        raise
    publish(staged, workdir)
    return result


def run(config: Config, workdir: Workdir, args) -> int:
    """The `clicklens pipeline` verb: checks inputs, runs the pipeline, logs the report's headline figures."""
    run_pipeline(config, workdir, getattr(args, "extra_args", None) or [])
    summary = read_report(workdir)
    graph_figures = summary["graph"]
    logger.info("pipeline: %d log records (%d bad), %d selected pairs, %d graph edges %s, examples %s",
                summary["log_records"]["read"], summary["dead_letter_records"], summary["selected_pairs"],
                graph_figures["edges"], graph_figures["edges_by_source"], summary["examples"])
    logger.info("pipeline: content graph (%s): %d content embeddings, %d dropped; cold images %d, %d of them "
                "reached by the graph", config.pipeline.content_graph.source,
                summary["content_embeddings"]["computed"], summary["content_embeddings"]["dropped"],
                graph_figures["cold_images"], graph_figures["cold_images_reached"])
    corrupt, cap = summary["log_files"], summary["session_click_cap"]
    if corrupt["corrupt"]:
        logger.warning("pipeline: %d corrupt log file(s) skipped (pipeline.skip_corrupt_files), %d lines read from "
                       "them before the fault kept; their dead letters (reason corrupt_file) name them",
                       corrupt["corrupt"], corrupt["corrupt_lines_kept"])
    if cap["sessions_dropped"]:
        logger.warning("pipeline: %d session(s) over the click cap dropped as robots: %d records, %d clicks, "
                       "%d impressions (dead letters with reason session_click_cap)", cap["sessions_dropped"],
                       cap["records_dropped"], cap["clicks_dropped"], cap["impressions_dropped"])
    return 0


def read_report(workdir: Workdir) -> dict:
    """The report.json a finished run wrote."""
    with FileSystems.open(workdir.report) as f:
        return json.loads(f.read().decode("utf-8"))
