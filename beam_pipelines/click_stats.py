"""Stage 2: click statistics per (query, image) and the category of each query."""


from typing import Iterable, NamedTuple, Tuple

import apache_beam as beam

from clicklens.log_schema import LogRecord


class PairStats(NamedTuple):
    """Impressions, clicks and summed positions of one image for one query."""

    impressions: int = 0
    clicks: int = 0
    position_sum: int = 0

    @property
    def mean_position(self) -> float:
        return self.position_sum / self.impressions if self.impressions else 0.0

    def smoothed_ctr(self, prior: float, prior_impressions: float) -> float:
        """CTR under a Beta prior: (clicks + prior * n0) / (impressions + n0)."""
        denominator = self.impressions + prior_impressions
        if denominator <= 0:
            return 0.0
        return (self.clicks + prior * prior_impressions) / denominator


class SumPairStats(beam.CombineFn):
    """Adds PairStats field by field (associative, so Beam can combine partial sums on workers)."""

    def create_accumulator(self):
        return (0, 0, 0)

    def add_input(self, acc, stats):
        return (acc[0] + stats[0], acc[1] + stats[1], acc[2] + stats[2])

    def merge_accumulators(self, accumulators):
        impressions = clicks = positions = 0
        for a in accumulators:
            impressions += a[0]
            clicks += a[1]
            positions += a[2]
        return (impressions, clicks, positions)

    def extract_output(self, acc):
        return PairStats(*acc)


def pair_events(record: LogRecord) -> Iterable[Tuple[Tuple[str, str], PairStats]]:
    """((query, image_id), PairStats of one impression) for each impression of a text query."""
    if record.query is None:
        return
    for imp in record.impressions:
        yield (record.query, imp.image_id), PairStats(1, int(imp.clicked), imp.position)


class ComputeClickStats(beam.PTransform):
    """LogRecords -> ((query, image_id), PairStats) summed over all text-query events."""

    def expand(self, records):
        return (
            records
            | "PairEvents" >> beam.FlatMap(pair_events)
            | "SumPerPair" >> beam.CombinePerKey(SumPairStats())
        )


class QueryCategory(beam.PTransform):
    """LogRecords -> (query, category): the most frequent non-empty category logged for each query."""

    def expand(self, records):
        return (
            records
            | "QueryCategoryEvents" >> beam.FlatMap(
                lambda r: [((r.query, r.category), 1)] if r.query is not None else [])
            | "CountPerCategory" >> beam.CombinePerKey(sum)
            | "ByQuery" >> beam.MapTuple(lambda qc, n: (qc[0], (qc[1], n)))
            | "MostFrequent" >> beam.CombinePerKey(MostFrequentCategory())
        )


class MostFrequentCategory(beam.CombineFn):
    """(category, events) -> the category with most events; ties go to the smaller name; "" loses to any name."""

    @staticmethod
    def _rank(category: str, n: int):
        return (category != "", n, tuple(-ord(c) for c in category))

    def create_accumulator(self):
        return None

    def add_input(self, best, candidate):
        category, n = candidate
        if best is None or self._rank(category, n) > self._rank(*best):
            return (category, n)
        return best

    def merge_accumulators(self, accumulators):
        best = None
        for acc in accumulators:
            if acc is not None:
                best = self.add_input(best, acc)
        return best

    def extract_output(self, best):
        return best[0] if best else ""
