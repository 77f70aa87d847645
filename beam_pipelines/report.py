"""The run report (`W/examples/report.json`), computed inside the pipeline.

Each figure is a small global aggregate of one PCollection (a count, a sum or
a per-reason count), combined into one JSON document by a Map over side
inputs, so the report is the same on every runner and matches the files.
"""


import json
from typing import Dict

import apache_beam as beam


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
