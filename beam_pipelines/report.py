"""The run report (`W/examples/report.json`), computed inside the pipeline.

Each figure is a small global aggregate of one PCollection (a count, a sum or
a per-reason count), combined into one JSON document by a Map over side
inputs, so the report is the same on every runner and matches the files.
`PipelineReport` names every figure.  The plain totals (counts and sums whose
names are known when the pipeline is built) are all computed by one combine
(`Totals`): a Beam CombineGlobally per figure would add ~10 transforms each,
and every transform costs the runner set-up time on every run, however small
the data.

Objects present only with their setting: `position_bias` (pipeline.position_bias=pbm
or min_dwell_ms > 0), `window` (pipeline.as_of: window.window_report) and
`base_vocab` (pipeline.base_vocab: vocab.merge_figures); without those settings the
report is exactly what it was before them.
"""


import json
from typing import Dict

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from beam_pipelines.graph import SOURCES
from beam_pipelines.selection import SelectionComparison
from beam_pipelines.split import SPLITS
from beam_pipelines.window import LogWindow, WindowFigures


def count(_) -> int:
    """The value of an element in a count."""
    return 1


class SumInBundleFn(beam.DoFn):
    """Elements -> (label, the sum of each value function over them), once per bundle.

    Summing inside the DoFn ("in-mapper combining"): the report counts every log line and record, and
    one element per line and figure through Beam's combiner lifting made the report the third costliest
    stage (12.8 of 147 CPU s at 500k events).
    """

    def __init__(self, label: str, values):
        self._label = label
        self._values = tuple(values)
        self._sums = []

    def start_bundle(self):
        self._sums = [0] * len(self._values)

    def process(self, element):
        sums = self._sums
        for i, value in enumerate(self._values):
            sums[i] += value(element)

    def finish_bundle(self):
        yield GlobalWindows.windowed_value((self._label, tuple(self._sums)))


class TupleSumFn(beam.CombineFn):
    """Equal-length tuples of numbers -> their element-wise sum."""

    def create_accumulator(self):
        return None

    def add_input(self, total, sums):
        return tuple(sums) if total is None else tuple(a + b for a, b in zip(total, sums))

    def merge_accumulators(self, totals):
        merged = None
        for total in totals:
            if total is not None:
                merged = self.add_input(merged, total)
        return merged

    def extract_output(self, total):
        return total


class Totals(beam.PTransform):
    """{label: PCollection} -> one {figure name: total} dict, given {label: {figure name: value of an element}}.

    Each figure is the sum of its values over the elements of its PCollection (0 when empty); a name
    given for several PCollections adds up over all of them.  One summing step per PCollection, and one
    CombinePerKey (by label) for every figure.
    """

    def __init__(self, values):
        super().__init__()
        self._values = {label: tuple(named.items()) for label, named in values.items()}

    def expand(self, pcolls):
        sums = [pcolls[label] | f"Sum[{label}]" >> beam.ParDo(SumInBundleFn(label, [value for _, value in named]))
                for label, named in self._values.items()]
        return (
            sums
            | "All" >> beam.Flatten()
            | "SumPerLabel" >> beam.CombinePerKey(TupleSumFn())
            | "AsDict" >> beam.combiners.ToDict()
            | "ByName" >> beam.Map(totals_by_name, self._values)
        )


def totals_by_name(sums_by_label, values) -> Dict[str, int]:
    """{label: sums} -> {figure name: total}, every name of `values` ({label: ((name, value), ...)}) present."""
    totals = {name: 0 for named in values.values() for name, _ in named}
    for label, sums in sums_by_label.items():
        for (name, _), total in zip(values[label], sums):
            totals[name] += total
    return totals


class Histogram(beam.PTransform):
    """Elements -> {str(value): count} (a few distinct values only, e.g. neighbours per example)."""

    def expand(self, pcoll):
        return (
            pcoll
            | "CountPerValue" >> beam.combiners.Count.PerElement()
            | "AsDict" >> beam.combiners.ToDict()
            | "StrKeys" >> beam.Map(lambda d: {str(k): v for k, v in sorted(d.items())})
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


def assemble_report(_, totals=None, **figures) -> str:
    """The report JSON from the named figures and totals (dotted names become nested objects)."""
    figures = {**(totals or {}), **figures}
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
        totals = {  # PipelineReport input: {figure name: value of each element}, summed by Totals
            "lines": {"log_records.read": count},
            "records": {"log_records.ok": count},
            "dead_letters": {"dead_letter_records": count},
            # Corrupt .gz shards skipped under pipeline.skip_corrupt_files (the lines read before the
            # fault are kept, and in log_records.read).
            "corrupt_files": {"log_files.corrupt": count, "log_files.corrupt_lines_kept": lambda d: d["lines_read"]},
            # Sessions dropped whole by pipeline.max_clicks_per_session(_query).
            "robot_sessions": {"session_click_cap.sessions_dropped": count,
                               "session_click_cap.records_dropped": lambda kv: kv[1][0],
                               "session_click_cap.impressions_dropped": lambda kv: kv[1][1],
                               "session_click_cap.clicks_dropped": lambda kv: kv[1][2]},
            "query_stats": {"pairs": lambda kv: len(kv[1].images)},
            "selected": {"selected_pairs": count},
            "graph_edges": {"graph.edges": count, **{
                f"graph.edges_by_source.{source}": (lambda edge, source=source: int(edge[1][1] == source))
                for source in SOURCES}},
            "cold_images": {"graph.cold_images": count},
            "cold_reached": {"graph.cold_images_reached": count},
            "content_embeddings": {"content_embeddings.computed": count},
            "content_dropped": {"content_embeddings.dropped": count},
            "graph_neighbors": {"graph.nodes": count, "graph.neighbor_links": lambda kv: len(kv[1])},
            "catalog_entries": {"catalog_entries": count},
            "images": {"images.ok": count, "examples.corpus": count},
            "bad_image_ids": {"images.bad": count},
            "examples": {"examples.image_only": lambda r: int(r["query"] == "")},
            "dropped": {"examples.dropped_bad_image": lambda n: n},
            **{name: {f"examples.{name}": count} for name in SPLITS},
        }
        if self._window is not None:  # log_records.ok: the good records in the window and outside it
            totals["outside_window"] = {"log_records.ok": count}
        if self._position_bias is not None:  # position_bias.selection: raw vs debiased, summed over queries
            totals["selection_comparison"] = {f"position_bias.selection.{name}": (lambda c, i=i: int(c[i]))
                                              for i, name in enumerate(SelectionComparison._fields)}
        figures = {
            "totals": {label: pcolls[label] for label in totals} | "Totals" >> Totals(totals),
            "bad_records": pcolls["dead_letters"] | "BadByReason" >> CountByReason(),
            "neighbors_per_example": examples
            | "NeighborCounts" >> beam.Map(lambda r, k: min(len(r["neighbors"]), k), self._max_neighbors)
            | "NeighborHistogram" >> Histogram(),
            "vocab_size": pcolls["vocabulary"] | "VocabSize" >> beam.Map(len),
        }
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

    def _window_figures(self, pcolls):
        """window: window.window_report."""
        window = ({"files": pcolls["window_files"], "outside": pcolls["outside_window"],
                   "records": pcolls["records"]}
                  | "Window" >> WindowFigures(self._window))
        return {"window": window}

    def _position_bias_figures(self, pcolls):
        """position_bias.settings and .fit (pbm); .selection is among the totals."""
        figures = {
            "position_bias.settings": pcolls["lines"].pipeline | "PositionBiasSettings" >> beam.Create(
                [dict(self._position_bias)]),
        }
        if "position_bias" in pcolls:
            figures["position_bias.fit"] = pcolls["position_bias"]
        return figures
