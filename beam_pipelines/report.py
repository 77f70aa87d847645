"""The run report (`W/examples/report.json`), computed inside the pipeline.

Each figure is a small global aggregate of one PCollection (a count, a sum or
a per-reason count), combined into one JSON document by a Map over side
inputs, so the report is the same on every runner and matches the files.
`PipelineReport` names every figure.

Objects present only with their setting: `position_bias` (pipeline.position_bias=pbm
or min_dwell_ms > 0), `window` (pipeline.as_of: window.window_report) and
`base_vocab` (pipeline.base_vocab: vocab.merge_figures); without those settings the
report is exactly what it was before them.
"""


import json
from typing import Dict

import apache_beam as beam

from beam_pipelines.graph import SOURCES
from beam_pipelines.selection import SelectionComparison
from beam_pipelines.split import SPLITS
from beam_pipelines.window import LogWindow, WindowFigures


class Count(beam.PTransform):
    """Number of elements (0 for an empty PCollection)."""

    def expand(self, pcoll):
        return pcoll | "Count" >> beam.combiners.Count.Globally()


class Sum(beam.PTransform):
    """Sum of numeric elements (0 when empty)."""

    def expand(self, pcoll):
        return pcoll | "Sum" >> beam.CombineGlobally(sum)


class Histogram(beam.PTransform):
    """Elements -> {str(value): count} (a few distinct values only, e.g. neighbours per example)."""

    def expand(self, pcoll):
        return (
            pcoll
            | "CountPerValue" >> beam.combiners.Count.PerElement()
            | "AsDict" >> beam.combiners.ToDict()
            | "StrKeys" >> beam.Map(lambda d: {str(k): v for k, v in sorted(d.items())})
        )


class SumFields(beam.PTransform):
    """Elements -> {name: sum of field(element)} for every (name, field) given (every sum 0 when empty)."""

    def __init__(self, fields):
        super().__init__()
        self._fields = tuple(fields.items())

    def expand(self, pcoll):
        fields = self._fields
        return (
            pcoll
            | "Fields" >> beam.Map(lambda e: tuple(field(e) for _, field in fields))
            | "SumEach" >> beam.CombineGlobally(beam.combiners.TupleCombineFn(*[sum] * len(fields)))
            | "AsDict" >> beam.Map(lambda sums: {name: int(n) for (name, _), n in zip(fields, sums)})
        )


class CountBySource(beam.PTransform):
    """Merged graph edges ((a, b), (weight, source)) -> {source: count} with every source named (0 when none)."""

    def expand(self, edges):
        return (
            edges
            | "Source" >> beam.MapTuple(lambda _, weight_source: weight_source[1])
            | "CountPerSource" >> beam.combiners.Count.PerElement()
            | "AsDict" >> beam.combiners.ToDict()
            | "EverySource" >> beam.Map(lambda counts: {source: counts.get(source, 0) for source in SOURCES})
        )


class CountByReason(beam.PTransform):
    """Dead-letter dicts -> {source: {reason: count}}."""

    def expand(self, dead_letters):
        return (
            dead_letters
            | "SourceReason" >> beam.Map(lambda r: (r["source"], r["reason"]))
            | "CountPerReason" >> beam.combiners.Count.PerElement()
            | "AllReasons" >> beam.combiners.ToList()
            | "Nest" >> beam.Map(_nest)
        )


def _nest(counts) -> Dict[str, Dict[str, int]]:
    out: Dict[str, Dict[str, int]] = {}
    for (source, reason), n in sorted(counts):
        out.setdefault(source, {})[reason] = n
    return out


def assemble_report(_, **figures) -> str:
    """The report JSON from the named figures (dotted names become nested objects)."""
    report: Dict = {}
    for name in sorted(figures):
        node = report
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = figures[name]
    return json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False)


class BuildReport(beam.PTransform):
    """{figure name: singleton PCollection} -> one JSON string."""

    def expand(self, figures):
        side = {name: beam.pvalue.AsSingleton(pcoll) for name, pcoll in figures.items()}
        return (
            figures[next(iter(figures))].pipeline
            | "Start" >> beam.Create([None])
            | "Assemble" >> beam.Map(assemble_report, **side)
        )


class PipelineReport(beam.PTransform):
    """The stages' named PCollections -> the report JSON (one string).

    Inputs: "lines" (raw log lines), "records" (LogRecords parsed), "dead_letters"
    (all of them), "corrupt_files" (the dead letters of the corrupt log files skipped),
    "robot_sessions" ((session_id, SessionTally) of the sessions dropped by the click cap), "query_stats", "selected", "graph_edges" (merged, with their
    source), "graph_neighbors", "content_embeddings", "content_dropped" (ids
    whose embedding was zero or not finite), "cold_images" and "cold_reached"
    (ids), "catalog_entries", "images" (good images), "bad_image_ids",
    "examples" (finished records), one per split name ("train", "eval"),
    "dropped" (selected pairs dropped per bad image) and "vocabulary".  Under debiased selection
    (pipeline.position_bias=pbm or min_dwell_ms > 0) also "selection_comparison" (SelectionComparison per
    query), and with pbm "position_bias" (the fit); they make the report's `position_bias` object, which
    is absent otherwise.

    With an active `window` (pipeline.as_of) "records" are the records in the window, and "window_files"
    ((path, read?) per log file matched) and "outside_window" (parse.ReadLogs' OUTSIDE_WINDOW) make the
    `window` object; log_records.ok then counts the good records in and outside the window.  With
    pipeline.base_vocab, "base_vocab" (vocab.LearnAndWriteVocabulary's MERGE) is the `base_vocab` object.
    """

    def __init__(self, max_neighbors: int, hard_negatives: int, position_bias_settings=None,
                 window: LogWindow = None):
        super().__init__()
        self._max_neighbors = max_neighbors
        self._hard_negatives = hard_negatives
        self._position_bias = position_bias_settings
        self._window = window if window is not None and window.active else None

    def expand(self, pcolls):
        examples = pcolls["examples"]
        figures = {
            "log_records.read": pcolls["lines"] | "CountLines" >> Count(),
            "log_records.ok": self._good_records(pcolls),
            "bad_records": pcolls["dead_letters"] | "BadByReason" >> CountByReason(),
            "dead_letter_records": pcolls["dead_letters"] | "CountDeadLetters" >> Count(),
            # Corrupt .gz shards skipped under pipeline.skip_corrupt_files (the lines read before the
            # fault are kept, and in log_records.read).
            "log_files": pcolls["corrupt_files"] | "CorruptFiles" >> SumFields(
                {"corrupt": lambda _: 1, "corrupt_lines_kept": lambda d: d["lines_read"]}),
            # Sessions dropped whole by pipeline.max_clicks_per_session(_query).
            "session_click_cap": pcolls["robot_sessions"] | "RobotSessions" >> SumFields(
                {"sessions_dropped": lambda _: 1, "records_dropped": lambda kv: kv[1][0],
                 "impressions_dropped": lambda kv: kv[1][1], "clicks_dropped": lambda kv: kv[1][2]}),
            "pairs": pcolls["query_stats"]
            | "PairsPerQuery" >> beam.MapTuple(lambda _, stats: len(stats.images)) | "SumPairs" >> Sum(),
            "selected_pairs": pcolls["selected"] | "CountSelected" >> Count(),
            "graph.edges": pcolls["graph_edges"] | "CountEdges" >> Count(),
            "graph.edges_by_source": pcolls["graph_edges"] | "EdgesBySource" >> CountBySource(),
            "graph.cold_images": pcolls["cold_images"] | "CountCold" >> Count(),
            "graph.cold_images_reached": pcolls["cold_reached"] | "CountColdReached" >> Count(),
            "content_embeddings.computed": pcolls["content_embeddings"] | "CountEmbeddings" >> Count(),
            "content_embeddings.dropped": pcolls["content_dropped"] | "CountDroppedEmbeddings" >> Count(),
            "graph.nodes": pcolls["graph_neighbors"] | "CountNodes" >> Count(),
            "graph.neighbor_links": pcolls["graph_neighbors"]
            | "LinkSizes" >> beam.MapTuple(lambda _, nbrs: len(nbrs)) | "SumLinks" >> Sum(),
            "catalog_entries": pcolls["catalog_entries"] | "CountCatalog" >> Count(),
            "images.ok": pcolls["images"] | "CountGoodImages" >> Count(),
            "images.bad": pcolls["bad_image_ids"] | "CountBadImages" >> Count(),
            "examples.corpus": pcolls["images"] | "CountCorpus" >> Count(),
            "examples.image_only": examples
            | "ImageOnly" >> beam.Filter(lambda r: r["query"] == "") | "CountImageOnly" >> Count(),
            "examples.dropped_bad_image": pcolls["dropped"] | "SumDropped" >> Sum(),
            "neighbors_per_example": examples
            | "NeighborCounts" >> beam.Map(lambda r, k: min(len(r["neighbors"]), k), self._max_neighbors)
            | "NeighborHistogram" >> Histogram(),
            "vocab_size": pcolls["vocabulary"] | "VocabSize" >> beam.Map(len),
        }
        for name in SPLITS:
            figures[f"examples.{name}"] = pcolls[name] | f"Count{name.title()}" >> Count()
        if self._hard_negatives:
            figures["negatives_per_example"] = (
                examples
                | "NegativeCounts" >> beam.Map(lambda r, m: min(len(r["negatives"]), m), self._hard_negatives)
                | "NegativeHistogram" >> Histogram())
        if self._position_bias is not None:
            figures.update(self._position_bias_figures(pcolls))
        if self._window is not None:
            figures.update(self._window_figures(pcolls))
        if "base_vocab" in pcolls:
            figures["base_vocab"] = pcolls["base_vocab"]
        return figures | "BuildReport" >> BuildReport()

    def _good_records(self, pcolls):
        """log_records.ok: the records parsed, in the window and outside it when there is a window."""
        if self._window is None:
            return pcolls["records"] | "CountRecords" >> Count()
        return ((pcolls["records"] | "CountRecords" >> Count(),
                 pcolls["outside_window"] | "CountOutside" >> Count())
                | "GoodCounts" >> beam.Flatten() | "SumGood" >> Sum())

    def _window_figures(self, pcolls):
        """window: window.window_report."""
        window = ({"files": pcolls["window_files"], "outside": pcolls["outside_window"],
                   "records": pcolls["records"]}
                  | "Window" >> WindowFigures(self._window))
        return {"window": window}

    def _position_bias_figures(self, pcolls):
        """position_bias.settings, .selection (raw vs debiased, summed over queries) and .fit (pbm)."""
        names = SelectionComparison._fields
        figures = {
            "position_bias.settings": pcolls["lines"].pipeline | "PositionBiasSettings" >> beam.Create(
                [dict(self._position_bias)]),
            "position_bias.selection": pcolls["selection_comparison"] | "SelectionComparison" >> SumFields(
                {name: (lambda c, i=i: c[i]) for i, name in enumerate(names)}),
        }
        if "position_bias" in pcolls:
            figures["position_bias.fit"] = pcolls["position_bias"]
        return figures
