"""Stage 4: the image graph, from co-clicks and similar-image clicks, merged with the content graph.

Click edges (ClickEdges).  For an unordered image pair {a, b}:
  * co-click rate = (result lists where both were clicked) / (result lists where both were shown);
  * similar-image click rate = (clicks on b in query-by-image sessions of a, and on a in
    sessions of b) / (impressions of b in sessions of a, and of a in sessions of b);
  * weight = coclick_weight * co-click rate + similar_click_weight * similar-image click rate.
Edges of weight >= min_edge_weight (and > 0) are kept.

The graph (BuildImageGraph) merges them with the content edges ((a, b), cosine)
of content_graph.py: a content edge weighs content_weight * cosine, a pair with
both kinds of edge weighs the sum, and each edge is tagged "click", "content"
or "both".  Every edge counts in both directions, and each image keeps its
`max_neighbors` heaviest neighbours (ties: smaller id).  With no content edges
the graph is exactly the click graph.

A pair that was never co-clicked has co-click rate 0 however often it was
shown, so "both shown" is counted only for co-clicked pairs (counting it for
every pair shown together grows with the square of the result-list length).
All counts of a pair {a < b} are gathered at key a, in one GroupByKey: each
result list sends every shown image a the images shown after it (in id order)
and, if a was clicked, the images clicked after it; each query-by-image
impression sends the smaller of its two ids the other one.  Per image, one pass
finds the co-click partners and the similar-image counts, a second counts the
lists that showed a with each partner.  No side input; a worker holds one
image's evidence at a time (the grouped values are re-iterated, not listed).

The click graph is not time-decayed: under pipeline.half_life_days (window.py)
only the click statistics of the training pairs are, and the graph counts every
record of the window once (the rates are ratios, and which images look alike
to users drifts far more slowly than what a query means).
"""


import collections
import itertools
from typing import Iterable, NamedTuple, Tuple

import apache_beam as beam

from beam_pipelines.progress import LogProgress
from clicklens.log_schema import LogRecord

Pair = Tuple[str, str]
# What one search event tells image a (the key) about images b > a:
# (b shown after a, b clicked after a if a was clicked, ((b, clicked), ...) query-by-image impressions of the pair).
Evidence = Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[Tuple[str, int], ...]]


class EdgeStats(NamedTuple):
    """Counts behind one unordered image pair's edge weight.

    `co_shown` is counted only for co-clicked pairs: it is 0 when `co_clicks` is 0.
    """

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


def record_evidence(record: LogRecord) -> Iterable[Tuple[str, Evidence]]:
    """(a, Evidence) for the images a of one search event, each pair {a < b} sent to key a only."""
    shown = sorted({imp.image_id for imp in record.impressions})
    clicked = sorted({imp.image_id for imp in record.impressions if imp.clicked})
    clicked_rank = {image_id: rank for rank, image_id in enumerate(clicked)}
    for i in range(len(shown) - 1):
        a = shown[i]
        rank = clicked_rank.get(a)
        yield a, (tuple(shown[i + 1:]), tuple(clicked[rank + 1:]) if rank is not None else (), ())
    if record.query_image_id is not None:
        source = record.query_image_id
        after_source = []
        for imp in record.impressions:
            if imp.image_id < source:
                yield imp.image_id, ((), (), ((source, int(imp.clicked)),))
            elif imp.image_id > source:
                after_source.append((imp.image_id, int(imp.clicked)))
        if after_source:
            yield source, ((), (), tuple(after_source))


def edge_stats_of_image(image_id: str, evidence: Iterable[Evidence]) -> Iterable[Tuple[Pair, EdgeStats]]:
    """((a, b), EdgeStats) for every b > a that was co-clicked with a or shown in a query-by-image event of the pair.

    `evidence` (key a's grouped values) is iterated more than once, as a GroupByKey result may be.
    """
    co_clicks = collections.Counter(itertools.chain.from_iterable(e[1] for e in evidence))
    similar_shown = collections.Counter()
    similar_clicks = collections.Counter()
    for other, clicked in itertools.chain.from_iterable(e[2] for e in evidence):
        similar_shown[other] += 1
        similar_clicks[other] += clicked
    co_shown = collections.Counter()
    if co_clicks:
        partners = set(co_clicks)
        co_shown.update(itertools.chain.from_iterable(map(partners.intersection, (e[0] for e in evidence))))
    for other in co_clicks.keys() | similar_shown.keys():
        yield (image_id, other), EdgeStats(co_shown[other], co_clicks[other],
                                           similar_shown[other], similar_clicks[other])


class ComputeEdgeStats(beam.PTransform):
    """LogRecords -> ((a, b), EdgeStats), a < b, for every pair co-clicked or shown for the other's image."""

    def expand(self, records):
        return (
            records
            | "Evidence" >> beam.FlatMap(record_evidence)
            | "EvidencePerImage" >> beam.GroupByKey()
            | "CountPerPair" >> beam.FlatMapTuple(edge_stats_of_image)
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


class ClickEdges(beam.PTransform):
    """LogRecords -> ((a, b), weight), a < b: the click graph's edges (weight >= min_weight and > 0)."""

    def __init__(self, coclick_weight: float, similar_click_weight: float, min_weight: float):
        super().__init__()
        self._args = (coclick_weight, similar_click_weight, min_weight)

    def expand(self, records):
        return (
            records
            | "EdgeStats" >> ComputeEdgeStats()
            | "WeightEdges" >> WeightEdges(*self._args)
            | "LogEdges" >> LogProgress("ClickGraph", "click edges")
        )


# The source tag of a merged edge.
CLICK, CONTENT, BOTH = "click", "content", "both"
SOURCES = (CLICK, CONTENT, BOTH)


class MergeEdges(beam.PTransform):
    """{"click": ((a, b), weight), "content": ((a, b), cosine)} -> ((a, b), (weight, source)) for weight > 0.

    weight = click weight + content_weight * cosine (either term absent when the pair
    has no edge of that kind); source is CLICK, CONTENT or BOTH.
    """

    def __init__(self, content_weight: float):
        super().__init__()
        self._content_weight = content_weight

    def expand(self, edges):
        content_weight = self._content_weight
        return (
            {CLICK: edges[CLICK], CONTENT: edges[CONTENT]}
            | "JoinPerPair" >> beam.CoGroupByKey()
            | "Weigh" >> beam.MapTuple(lambda pair, grouped: (pair, merged_weight(grouped, content_weight)))
            | "Positive" >> beam.Filter(lambda kv: kv[1][0] > 0)
        )


def merged_weight(grouped, content_weight: float) -> Tuple[float, str]:
    """(weight, source) of one pair from its grouped {"click": [weight], "content": [cosine]}."""
    click, content = list(grouped[CLICK]), list(grouped[CONTENT])
    weights = click + [content_weight * cosine for cosine in content]
    source = BOTH if click and content else (CLICK if click else CONTENT)
    return sum(weights), source


class TopNeighbors(beam.PTransform):
    """Undirected weighted edges ((a, b), weight) -> (image_id, [(neighbour_id, weight)], heaviest first, at most k)."""

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
    """{"click": click edges, "content": content edges} -> {"edges": ((a, b), (weight, source)),
    "neighbors": (image_id, [(nbr, weight)])}: the merged graph and each image's top neighbours."""

    def __init__(self, content_weight: float, max_neighbors: int):
        super().__init__()
        self._content_weight = content_weight
        self._k = max_neighbors

    def expand(self, edges):
        merged = (
            edges
            | "MergeEdges" >> MergeEdges(self._content_weight)
            | "LogEdges" >> LogProgress("ImageGraph", "graph edges")
        )
        if self._k == 0:
            neighbors = merged | "NoNeighbors" >> beam.Filter(lambda _: False)
        else:
            neighbors = (
                merged
                | "Weights" >> beam.MapTuple(lambda pair, weight_source: (pair, weight_source[0]))
                | "TopNeighbors" >> TopNeighbors(self._k)
            )
        return {"edges": merged, "neighbors": neighbors}
