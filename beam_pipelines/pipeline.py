"""`clicklens pipeline`: query logs + image catalog -> training examples, on any Beam runner.

    clicklens pipeline --config configs/demo.yaml --workdir W [Beam options...]

Options the clicklens command line does not know are Beam pipeline options, so
`--runner DataflowRunner --project P --region R --temp_location gs://B/tmp
--setup_file ./setup.py` runs the same pipeline on Dataflow, and
`--direct_num_workers 2 --direct_running_mode multi_processing` uses two local
processes.  The stages (each a named composite PTransform in its own module):

    ReadLogs / ParseLogs ---------> dead letters
      |-- ComputeClickStats + QueryCategory -> SelectPairs
      |-- BuildImageGraph (co-click + similar-image-click edges, top-k neighbours)
      `-- LearnVocabulary (training queries only)
    ReadCatalog / LoadImages -----> dead letters; corpus
    AttachNeighborImages, JoinExamplesPerImage, AttachHardNegatives, AddCandidateProbability
    split by query hash -> train-*, eval-*; report.json
"""


import json
import logging
import re
from typing import Dict, List, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_pipelines import graph, images, neighbors, outputs, parse, report, selection, split, vocab
from beam_pipelines.click_stats import ComputeClickStats, QueryCategory
from trainer.config import Config
from trainer.errors import ClicklensError
from trainer.workdir import Workdir, join

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
    out = workdir.examples

    # Stage 1: logs.
    lines = p | "ReadLogs" >> parse.ReadLines(paths["logs"])
    parsed = lines | "ParseLogs" >> parse.ParseLogs()
    records = parsed[parse.RECORDS]

    # Stages 2-3 (and 6's negative ids): click statistics and pair selection.
    pair_stats = records | "ClickStats" >> ComputeClickStats()
    categories = records | "QueryCategory" >> QueryCategory()
    selected = {"stats": pair_stats, "category": categories} | "SelectPairs" >> selection.SelectPairs(
        selection.SelectionRules.from_config(cfg))

    # Stage 4: the image graph.
    image_graph = records | "ImageGraph" >> graph.BuildImageGraph(
        cfg.coclick_weight, cfg.similar_click_weight, cfg.min_edge_weight, cfg.max_neighbors)

    # Stage 7: catalog and images.
    catalog = p | "ReadCatalog" >> parse.ReadLines(paths["catalog"]) | "ParseCatalog" >> images.ReadCatalog()
    loaded = catalog["entries"] | "LoadImages" >> images.LoadImages(
        paths["catalog"], cfg.image_source, cfg.image_size, cfg.feature_dim)
    good_images = loaded[images.IMAGES]
    bad_image_ids = loaded[parse.DEAD_LETTER] | "BadImageIds" >> beam.Map(lambda r: (r["image_id"], r["reason"]))

    # Stages 5-6: joins.
    neighbor_links = {"neighbors": image_graph["neighbors"], "images": good_images} | (
        "AttachNeighborImages" >> neighbors.AttachNeighborImages())
    joined = {"pairs": selected, "images": good_images, "neighbors": neighbor_links, "bad": bad_image_ids} | (
        "JoinExamplesPerImage" >> neighbors.JoinExamplesPerImage(cfg.eval_fraction))
    examples = joined[neighbors.EXAMPLES]
    if cfg.hard_negatives:
        examples = {"examples": examples, "images": good_images} | (
            "AttachHardNegatives" >> neighbors.AttachHardNegatives())
    examples = {neighbors.EXAMPLES: examples, neighbors.TRAIN_COUNTS: joined[neighbors.TRAIN_COUNTS]} | (
        "AddCandidateProbability" >> neighbors.AddCandidateProbability())

    # Stage 8: split, write.
    by_split = examples | "SplitByQuery" >> beam.Partition(
        lambda r, _: split.SPLITS.index(r["split"]), len(split.SPLITS))
    counts = {}
    for index, name in enumerate(split.SPLITS):
        part = by_split[index]
        (part
         | f"Serialize{name.title()}" >> beam.ParDo(outputs.ToSerializedExample(config))
         | f"Write{name.title()}" >> outputs.WriteTFRecords(join(out, name), cfg.num_shards))
        counts[f"examples.{name}"] = part | f"Count{name.title()}" >> report.Count()
    (good_images
     | "SerializeCorpus" >> beam.ParDo(outputs.ToSerializedCorpusExample(config))
     | "WriteCorpus" >> outputs.WriteTFRecords(join(out, "corpus"), cfg.num_shards))

    train_queries = (
        records
        | "TextQueries" >> beam.FlatMap(lambda r: [r.query] if r.query is not None else [])
        | "TrainQueries" >> beam.Filter(lambda q, f: split.query_split(q, f) == split.TRAIN, cfg.eval_fraction)
    )
    vocabulary = train_queries | "LearnVocabulary" >> vocab.LearnVocabulary(cfg.vocab_size)
    vocabulary | "VocabText" >> beam.Map("\n".join) | "WriteVocab" >> outputs.WriteSingleFile(workdir.vocab)

    dead_letters = (
        (parsed[parse.DEAD_LETTER], catalog[parse.DEAD_LETTER], loaded[parse.DEAD_LETTER], joined[parse.DEAD_LETTER])
        | "AllDeadLetters" >> beam.Flatten()
    )
    dead_letters | "WriteDeadLetters" >> outputs.WriteDeadLetters(join(out, "dead_letter"))

    # report.json
    image_only = examples | "ImageOnly" >> beam.Filter(lambda r: r["query"] == "")
    figures = {
        "log_records.read": lines | "CountLines" >> report.Count(),
        "log_records.ok": records | "CountRecords" >> report.Count(),
        "bad_records": dead_letters | "BadByReason" >> report.CountByReason(),
        "dead_letter_records": dead_letters | "CountDeadLetters" >> report.Count(),
        "pairs": pair_stats | "CountPairs" >> report.Count(),
        "selected_pairs": selected | "CountSelected" >> report.Count(),
        "graph.edges": image_graph["edges"] | "CountEdges" >> report.Count(),
        "graph.nodes": image_graph["neighbors"] | "CountNodes" >> report.Count(),
        "graph.neighbor_links": image_graph["neighbors"]
        | "LinkSizes" >> beam.MapTuple(lambda _, nbrs: len(nbrs)) | "SumLinks" >> report.Sum(),
        "examples.image_only": image_only | "CountImageOnly" >> report.Count(),
        "examples.dropped_bad_image": joined[neighbors.DROPPED] | "SumDropped" >> report.Sum(),
        "examples.corpus": good_images | "CountCorpus" >> report.Count(),
        "neighbors_per_example": examples
        | "NeighborCounts" >> beam.Map(lambda r, k: min(len(r["neighbors"]), k), cfg.max_neighbors)
        | "NeighborHistogram" >> report.Histogram(),
        "images.ok": good_images | "CountGoodImages" >> report.Count(),
        "images.bad": loaded[parse.DEAD_LETTER] | "BadImages" >> report.Count(),
        "catalog_entries": catalog["entries"] | "CountCatalog" >> report.Count(),
        "vocab_size": vocabulary | "VocabSize" >> beam.Map(len),
        **counts,
    }
    if cfg.hard_negatives:
        figures["negatives_per_example"] = (
            examples
            | "NegativeCounts" >> beam.Map(lambda r, m: min(len(r["negatives"]), m), cfg.hard_negatives)
            | "NegativeHistogram" >> report.Histogram())
    (figures | "BuildReport" >> report.BuildReport()) | "WriteReport" >> outputs.WriteSingleFile(workdir.report)


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
