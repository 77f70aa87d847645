"""`clicklens pipeline`: query logs + image catalog -> training examples, on any Beam runner.

    clicklens pipeline --config configs/demo.yaml --workdir W [Beam options...]

Options the clicklens command line does not know are Beam pipeline options, so
`--runner DataflowRunner --project P --region R --temp_location gs://B/tmp
--setup_file ./setup.py` runs the same pipeline on Dataflow, and
`--direct_num_workers 2 --direct_running_mode multi_processing` uses two local
processes.  The stages, each a named composite PTransform in the module of its stage:

    ReadLogs (parse; corrupt .gz shards too, under skip_corrupt_files) -> dead letters
      (with pipeline.as_of, window: dt= partitions outside the window never opened,
       records kept by the UTC day of their time, the others counted; an empty window fails)
    CapSessionClicks (sessions: robot sessions over a click cap dropped whole) -> dead letters
      |-- SelectTrainingPairs (selection: click stats, time-decayed under half_life_days,
      |                        query category, selection rules)
      |-- ClickGraph (graph: co-click + similar-image-click edges; not decayed)
      |-- LoggedImages (cold_images: every image id the logs show) -> logged_images-*
      `-- LearnAndWriteVocabulary (vocab: training queries only, from the click stats;
                                   appended to pipeline.base_vocab when set) -> vocab.txt
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

The daily loop (clicklens update) sets pipeline.as_of, window_days and
half_life_days: the run reads the window of dated logs ending on as_of, and
weighs each record's impressions and clicks by 0.5 ** (age / half-life) in the
click statistics (window.py); pipeline.base_vocab keeps the token ids of an
earlier run's vocab.txt and appends the new tokens (vocab.py).  report.json
then gets a `window` and a `base_vocab` object.  Without these settings every
output is what it was before them, byte for byte.

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
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult

from beam_pipelines import (cold_images, content_graph, graph, images, neighbors, outputs, parse, position_bias,
                            propensity_plot, report, selection, sessions, vocab, window)
from beam_pipelines.dead_letters import DEAD_LETTER
from clicklens import servables
from clicklens.catalog import catalog_path
from clicklens.config import Config
from clicklens.errors import ClicklensError
from clicklens.vocabulary import load_vocab
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
            "catalog": catalog_path(config, workdir)}


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


def window_files(config: Config, workdir: Workdir) -> Tuple[List[str], List[str]]:
    """(log files the run reads, log files it skips: in dt= partitions outside the pipeline.as_of window)."""
    matched = [m.path for m in FileSystems.match([input_paths(config, workdir)["logs"]])[0].metadata_list]
    return window.split_files(window.LogWindow.from_config(config.pipeline), matched)


def base_vocabulary(config: Config) -> Optional[vocab.BaseVocabulary]:
    """pipeline.base_vocab read and checked (clicklens.vocabulary.load_vocab); None when it is not set."""
    cfg = config.pipeline
    if not cfg.base_vocab:
        return None
    try:
        tokens = load_vocab(cfg.base_vocab)
    except ClicklensError as err:
        raise ClicklensError(f"pipeline.base_vocab: {err}") from None
    except Exception as err:  # noqa: BLE001  (an unreadable file: TensorFlow's own errors)
        raise ClicklensError(f"pipeline.base_vocab: {cfg.base_vocab}: cannot read it: {err}") from None
    return vocab.BaseVocabulary(cfg.base_vocab, tuple(tokens), cfg.vocab_capacity or 2 * cfg.vocab_size)


def check_inputs(config: Config, workdir: Workdir) -> None:
    """Fails early, with a clear message, on inputs or settings the pipeline cannot use."""
    paths = input_paths(config, workdir)
    for key in ("window_days", "half_life_days"):
        if getattr(config.pipeline, key) and not config.pipeline.as_of:
            raise ClicklensError(f"pipeline.{key}: needs pipeline.as_of, the day the window ends (`clicklens "
                                 "update --as-of DAY` sets it)")
    read, skipped = window_files(config, workdir)
    if not read and not skipped:
        raise ClicklensError(f"pipeline: no log files match {paths['logs']} (`clicklens generate-demo-data` writes "
                             "the demo's; for your own logs set pipeline.logs)")
    if not read:
        described = window.LogWindow.from_config(config.pipeline).describe()
        raise ClicklensError(f"pipeline: no log file in the window {described}: the {len(skipped)} log files "
                             f"matching {paths['logs']} are all in dt= partitions outside it; set pipeline.as_of "
                             "to a day the logs cover, or widen pipeline.window_days")
    if not FileSystems.exists(paths["catalog"]):
        raise ClicklensError(f"pipeline: image catalog {paths['catalog']} not found (`clicklens generate-demo-data` "
                             "writes the demo's; for your own catalog set pipeline.catalog)")
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
    base_vocabulary(config)  # raises, naming pipeline.base_vocab, on a missing or bad vocab.txt


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
    log_window = window.LogWindow.from_config(cfg)

    logs = p | "ReadLogs" >> parse.ReadLogs(paths["logs"], cfg.skip_corrupt_files, log_window)
    # Every stage that reads the logs reads them after the session click cap.
    capped = logs[parse.RECORDS] | "CapSessionClicks" >> sessions.CapSessionClicks(
        cfg.max_clicks_per_session, cfg.max_clicks_per_session_query)
    records = capped[sessions.RECORDS]
    rules = selection.SelectionRules.from_config(cfg)
    pairs = records | "SelectTrainingPairs" >> selection.SelectTrainingPairs(
        rules, position_bias.PbmSettings.from_config(cfg), log_window)
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
    learned = pairs[selection.QUERY_STATS] | "LearnAndWriteVocabulary" >> vocab.LearnAndWriteVocabulary(
        cfg.vocab_size, cfg.eval_fraction, workdir.vocab, base_vocabulary(config))
    vocabulary = learned[vocab.TOKENS]
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
    if log_window.active:
        figures["window_files"] = logs[parse.WINDOW_FILES]
        figures["outside_window"] = logs[parse.OUTSIDE_WINDOW]
    if vocab.MERGE in learned:
        figures["base_vocab"] = learned[vocab.MERGE]
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
     | "PipelineReport" >> report.PipelineReport(cfg.max_neighbors, cfg.hard_negatives, bias_settings, log_window)
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
    log_window = window.LogWindow.from_config(config.pipeline)
    if log_window.active:
        read, skipped = window_files(config, workdir)
        logger.info("pipeline: window %s, half-life %s: %d log files matched, %d to read, %d skipped "
                    "(dt= partitions outside the window)", log_window.describe(),
                    f"{log_window.half_life_days:g} days" if log_window.half_life_days else "none",
                    len(read) + len(skipped), len(read), len(skipped))
    staged = staging(workdir)
    p = make_pipeline(options)
    build_pipeline(p, config, staged)
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as err:  # noqa: BLE001  (the runner wraps a worker's error in its own)
        empty = re.search(f"{window.EMPTY_WINDOW}[^\n]*", str(err))
        if empty:
            raise ClicklensError(f"pipeline: {empty.group(0)}; the previous outputs are kept") from None
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
    log_window_figures(summary)
    if cap["sessions_dropped"]:
        logger.warning("pipeline: %d session(s) over the click cap dropped as robots: %d records, %d clicks, "
                       "%d impressions (dead letters with reason session_click_cap)", cap["sessions_dropped"],
                       cap["records_dropped"], cap["clicks_dropped"], cap["impressions_dropped"])
    return 0


def log_window_figures(summary: dict) -> None:
    """One line each for the report's `window` and `base_vocab` objects, when the run had them."""
    w = summary.get("window")
    if w:
        logger.info("pipeline: window as_of %s, window_days %d, half-life %s: %d of %d log files read (%d "
                    "skipped), %d records in the window (days %s .. %s), %d outside it (%d after as_of)",
                    w["as_of"], w["window_days"], f"{w['half_life_days']:g} days" if w["half_life_days"] else "none",
                    w["files_read"], w["files_matched"],
                    w["files_skipped"], w["records_in_window"], w["first_record_day"], w["last_record_day"],
                    w["records_outside"], w["records_after_as_of"])
    base = summary.get("base_vocab")
    if base:
        logger.info("pipeline: vocabulary: the %d tokens of %s keep their ids, %d new tokens added, %d left out "
                    "(capacity %d)", base["base_tokens"], base["path"], base["new_tokens_added"],
                    base["new_tokens_left_out"], base["capacity"])


def read_report(workdir: Workdir) -> dict:
    """The report.json a finished run wrote."""
    with FileSystems.open(workdir.report) as f:
        return json.loads(f.read().decode("utf-8"))
