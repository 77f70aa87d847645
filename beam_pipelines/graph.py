"""Stage 4: the image-image graph from co-clicks and similar-image clicks.

For an unordered image pair {a, b}:
  * co-click rate = (result lists where both were clicked) / (result lists where both were shown);
  * similar-image click rate = (clicks on b in query-by-image sessions of a, and on a in
    sessions of b) / (impressions of b in sessions of a, and of a in sessions of b);
  * weight = coclick_weight * co-click rate + similar_click_weight * similar-image click rate.
Edges of weight >= min_edge_weight (and > 0) are kept, in both directions, and
each image keeps its `max_neighbors` heaviest neighbours (ties: smaller id).

Co-shown pairs grow with the square of the result-list length, so the pair
counts are pre-summed inside each bundle (in-mapper combining, flushed at a
fixed dictionary size so memory stays bounded) before the keyed CombinePerKey.
"""


from typing import Dict, Iterable, List, NamedTuple, Tuple

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from beam_pipelines.log_schema import LogRecord

# Distinct pairs held per bundle before the partial sums are flushed downstream.
MAX_PAIRS_IN_MEMORY = 200_000


class EdgeStats(NamedTuple):
    """Counts behind one unordered image pair's edge weight."""

    co_shown: int = 0
    co_clicks: int = 0
    similar_shown: int = 0
    similar_clicks: int = 0

    @property
    def coclick_rate(self) -> float:
        return self.co_clicks / self.co_shown if self.co_shown else 0.0

    @property
    def similar_click_rate(self) -> float:
        return self.similar_clicks / self.similar_shown if self.similar_shown else 0.0

    def weight(self, coclick_weight: float, similar_click_weight: float) -> float:
        """The configured linear combination of the two rates."""
        return coclick_weight * self.coclick_rate + similar_click_weight * self.similar_click_rate


def _ordered(a: str, b: str) -> Tuple[str, str]:
    return (a, b) if a < b else (b, a)


def record_pair_counts(record: LogRecord) -> Iterable[Tuple[Tuple[str, str], Tuple[int, int, int, int]]]:
    """The EdgeStats increments one search event contributes, per unordered image pair."""
    shown = sorted({imp.image_id for imp in record.impressions})
    clicked = {imp.image_id for imp in record.impressions if imp.clicked}
    for i, a in enumerate(shown):
        a_clicked = a in clicked
        for b in shown[i + 1:]:
            yield (a, b), (1, int(a_clicked and b in clicked), 0, 0)
    if record.query_image_id is not None:
        source = record.query_image_id
        for imp in record.impressions:
            if imp.image_id != source:
                yield _ordered(source, imp.image_id), (0, 0, 1, int(imp.clicked))


class PairCountsFn(beam.DoFn):
    """LogRecord -> ((a, b), counts), pre-summed per bundle (in-mapper combining)."""

    def __init__(self, max_pairs: int = MAX_PAIRS_IN_MEMORY):
        self._max_pairs = max_pairs
        self._sums: Dict[Tuple[str, str], List[int]] = {}

    def start_bundle(self):
        self._sums = {}

    def process(self, record: LogRecord):
        sums = self._sums
        for pair, inc in record_pair_counts(record):
            acc = sums.get(pair)
            if acc is None:
                sums[pair] = list(inc)
            else:
                acc[0] += inc[0]
                acc[1] += inc[1]
                acc[2] += inc[2]
                acc[3] += inc[3]
        if len(sums) >= self._max_pairs:
            yield from self._flush()

    def _flush(self):
        sums, self._sums = self._sums, {}
        for pair, acc in sums.items():
            yield pair, tuple(acc)

    def finish_bundle(self):
        for pair, acc in self._flush():
            yield GlobalWindows.windowed_value((pair, acc))


def _sum_counts(values: Iterable[Tuple[int, int, int, int]]) -> Tuple[int, int, int, int]:
    a = b = c = d = 0
    for v in values:
        a += v[0]
        b += v[1]
        c += v[2]
        d += v[3]
    return (a, b, c, d)


class ComputeEdgeStats(beam.PTransform):
    """LogRecords -> ((a, b), EdgeStats) for every unordered pair shown together or similar-clicked."""

    def expand(self, records):
        return (
            records
            | "PairCounts" >> beam.ParDo(PairCountsFn())
            | "SumPerPair" >> beam.CombinePerKey(_sum_counts)
            | "ToEdgeStats" >> beam.MapTuple(lambda pair, counts: (pair, EdgeStats(*counts)))
        )


class WeightEdges(beam.PTransform):
    """((a, b), EdgeStats) -> ((a, b), weight) for edges with weight >= min_weight and > 0."""

    def __init__(self, coclick_weight: float, similar_click_weight: float, min_weight: float):
        super().__init__()
        self._weights = (coclick_weight, similar_click_weight)
        self._min_weight = min_weight

    def expand(self, edge_stats):
        cw, sw = self._weights
        min_weight = self._min_weight
        return (
            edge_stats
            | "Weight" >> beam.MapTuple(lambda pair, stats: (pair, EdgeStats(*stats).weight(cw, sw)))
            | "AboveMin" >> beam.Filter(lambda kv: kv[1] > 0 and kv[1] >= min_weight)
        )


class TopNeighbors(beam.PTransform):
    """Undirected weighted edges -> (image_id, [(neighbour_id, weight)], heaviest first, at most k)."""

    def __init__(self, k: int):
        super().__init__()
        self._k = k

    def expand(self, edges):
        # Rank by weight, then by the smaller neighbour id, so ties are deterministic.
        return (
            edges
            | "BothDirections" >> beam.FlatMapTuple(lambda pair, w: [(pair[0], (pair[1], w)), (pair[1], (pair[0], w))])
            | "TopK" >> beam.combiners.Top.PerKey(self._k, key=_neighbor_rank)
        )


def _neighbor_rank(neighbor: Tuple[str, float]):
    return (neighbor[1], tuple(-ord(c) for c in neighbor[0]))


class BuildImageGraph(beam.PTransform):
    """LogRecords -> {"edges": ((a, b), weight), "neighbors": (image_id, [(nbr, weight)])}."""

    def __init__(self, coclick_weight: float, similar_click_weight: float, min_weight: float, max_neighbors: int):
        super().__init__()
        self._args = (coclick_weight, similar_click_weight, min_weight)
        self._k = max_neighbors

    def expand(self, records):
        edges = records | "EdgeStats" >> ComputeEdgeStats() | "WeightEdges" >> WeightEdges(*self._args)
        if self._k == 0:
            neighbors = edges | "NoNeighbors" >> beam.Filter(lambda _: False)
        else:
            neighbors = edges | "TopNeighbors" >> TopNeighbors(self._k)
        return {"edges": edges, "neighbors": neighbors}
