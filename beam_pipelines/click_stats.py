"""Stage 2: click statistics per (query, image), the category of each query, and its number of events.

All of it is one CombinePerKey by query over one element per text-query event
(`QueryClickStats`): Beam lifts the combiner, so each worker sums its events per
query before anything is shuffled, and the selection rules (selection.py) get
each query's statistics in one piece, with no join.
"""


from typing import Dict, Iterable, NamedTuple, Tuple

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


class QueryStats(NamedTuple):
    """Everything the logs say about one text query."""

    category: str                      # the most frequent non-empty category logged for it ("" when none)
    events: int                        # search events
    images: Dict[str, PairStats]       # per image shown for it


# One text-query event as QueryClickStats takes it: (category, ((image_id, clicked, position), ...)).
QueryEvent = Tuple[str, Tuple[Tuple[str, int, int], ...]]


def query_event(record: LogRecord) -> Iterable[Tuple[str, QueryEvent]]:
    """(query, QueryEvent) for a text-query record; nothing for a query-by-image record."""
    if record.query is not None:
        yield record.query, (record.category, tuple((imp.image_id, int(imp.clicked), imp.position)
                                                    for imp in record.impressions))


def category_rank(category: str, n: int):
    """Most events first; ties go to the smaller name; "" loses to any name."""
    return (category != "", n, tuple(-ord(c) for c in category))


class QueryStatsFn(beam.CombineFn):
    """QueryEvents of one query -> QueryStats.

    Accumulator: [events, {category: events}, {image_id: [impressions, clicks, position_sum]}].
    """

    def create_accumulator(self):
        return [0, {}, {}]

    def add_input(self, acc, event: QueryEvent):
        category, impressions = event
        acc[0] += 1
        categories = acc[1]
        categories[category] = categories.get(category, 0) + 1
        images = acc[2]
        for image_id, clicked, position in impressions:
            counts = images.get(image_id)
            if counts is None:
                images[image_id] = [1, clicked, position]
            else:
                counts[0] += 1
                counts[1] += clicked
                counts[2] += position
        return acc

    def merge_accumulators(self, accumulators):
        merged = None
        for acc in accumulators:
            if merged is None:
                merged = acc
                continue
            merged[0] += acc[0]
            for category, n in acc[1].items():
                merged[1][category] = merged[1].get(category, 0) + n
            images = merged[2]
            for image_id, (impressions, clicks, positions) in acc[2].items():
                counts = images.get(image_id)
                if counts is None:
                    images[image_id] = [impressions, clicks, positions]
                else:
                    counts[0] += impressions
                    counts[1] += clicks
                    counts[2] += positions
        return merged if merged is not None else self.create_accumulator()

    def extract_output(self, acc) -> QueryStats:
        category = max(acc[1].items(), key=lambda cn: category_rank(*cn))[0] if acc[1] else ""
        return QueryStats(category, acc[0], {image_id: PairStats(*counts) for image_id, counts in acc[2].items()})


class QueryClickStats(beam.PTransform):
    """LogRecords -> (query, QueryStats) for every text query."""

    def expand(self, records):
        return (
            records
            | "QueryEvents" >> beam.FlatMap(query_event)
            | "SumPerQuery" >> beam.CombinePerKey(QueryStatsFn())
        )
