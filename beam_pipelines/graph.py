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
shown, so "both shown" is kept only for co-clicked pairs (an edge per pair
shown together would grow with the square of the result-list length).
All counts of a pair {a < b} end up at key a, in one CombinePerKey
(PairCountsFn).  Each bundle first counts its records' pairs itself
(CountPairsInBundleFn: every pair of images a result list showed, counted in
numpy, every pair it had clicked, and each query-by-image impression with its
query image), then sends each image a its counts per partner b, so one counter
per pair and bundle crosses the shuffle, never one element per event.  The
"both shown" counts are kept for the co-clicked partners at the end.  No side
input.

The click graph is not time-decayed: under pipeline.half_life_days (window.py)
only the click statistics of the training pairs are, and the graph counts every
record of the window once (the rates are ratios, and which images look alike
to users drifts far more slowly than what a query means).
"""


import collections
import functools
from typing import Dict, List, NamedTuple, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindows

from beam_pipelines.progress import LogProgress
from clicklens.log_schema import LogRecord

Pair = Tuple[str, str]
# What the logs say about image a's pairs (a, b), b > a, one {b: count} per pair table (SHOWN, CO_CLICKED,
# SIMILAR_SHOWN, SIMILAR_CLICKED below).
PairCounts = Tuple[Dict[str, int], Dict[str, int], Dict[str, int], Dict[str, int]]


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


# The four tables of PairCounts: lists that showed a and b, lists where both were clicked, and b's
# impressions and clicks in query-by-image events of a (or a's in events of b).
SHOWN, CO_CLICKED, SIMILAR_SHOWN, SIMILAR_CLICKED = range(4)


def new_pair_counts() -> PairCounts:
    """Empty counts of one image's pairs."""
    return collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter()


def _counts_of(counts: Dict[str, PairCounts], a: str) -> PairCounts:
    image_counts = counts.get(a)
    if image_counts is None:
        image_counts = counts[a] = new_pair_counts()
    return image_counts


def add_click_pairs(counts: Dict[str, PairCounts], record: LogRecord) -> int:
    """Adds one search event's co-clicked pairs {a < b} and its query-by-image impressions to counts[a];
    the number of counters it added."""
    added = 0
    clicked = sorted({imp.image_id for imp in record.impressions if imp.clicked})
    for i, a in enumerate(clicked[:-1]):
        partners = _counts_of(counts, a)[CO_CLICKED]
        before = len(partners)
        partners.update(clicked[i + 1:])
        added += len(partners) - before
    source = record.query_image_id
    if source is not None:
        for imp in record.impressions:
            if imp.image_id != source:
                a, b = (imp.image_id, source) if imp.image_id < source else (source, imp.image_id)
                image_counts = _counts_of(counts, a)
                added += b not in image_counts[SIMILAR_SHOWN]
                image_counts[SIMILAR_SHOWN][b] += 1
                image_counts[SIMILAR_CLICKED][b] += int(imp.clicked)
    return added


def shown_images(record: LogRecord) -> List[str]:
    """The distinct images a result list showed, in id order."""
    return sorted({imp.image_id for imp in record.impressions})


class ShownPairs:
    """Counts the image pairs {a < b} shown in the same result list, over many lists, in numpy.

    A list of n images holds n (n - 1) / 2 pairs (105 for 15 images), and most pairs recur from list to
    list.  Counting them in dicts costs a random memory access per pair; here each list only appends its
    images' indices (into the images seen so far) to the lists of its length, and `counts_by_image`
    turns each length's lists into pair codes (two 32-bit indices in an int64) in one numpy step and
    counts the codes with one np.unique.
    """

    def __init__(self):
        self._index: Dict[str, int] = {}
        self._names: List[str] = []
        self._lists: Dict[int, List[int]] = collections.defaultdict(list)  # n -> indices of every n-image list
        self.size = 0  # pairs held

    def add(self, shown: Sequence[str]) -> None:
        """Adds the pairs of one list of distinct images in id order (shown_images)."""
        n = len(shown)
        if n < 2:
            return
        index, names = self._index, self._names
        ids = self._lists[n]
        for image_id in shown:
            i = index.get(image_id)
            if i is None:
                i = index[image_id] = len(names)
                names.append(image_id)
            ids.append(i)
        self.size += n * (n - 1) // 2

    def _codes(self) -> np.ndarray:
        """Every pair added, as (index of a) << 32 | (index of b)."""
        codes = []
        for n, ids in self._lists.items():
            lists = np.array(ids, dtype=np.int64).reshape(-1, n)
            first, second = _upper_pairs(n)
            codes.append(((lists[:, first] << 32) | lists[:, second]).ravel())
        return np.concatenate(codes)

    def counts_by_image(self) -> Dict[str, Dict[str, int]]:
        """{a: {b: lists that showed a and b}} of every pair added, a < b."""
        if not self._lists:
            return {}
        codes, counts = np.unique(self._codes(), return_counts=True)
        first, second = codes >> 32, codes & 0xFFFFFFFF
        names = np.array(self._names, dtype=object)
        starts = np.flatnonzero(np.diff(first, prepend=-1))  # codes sorted: each a's pairs are one run
        ends = np.append(starts[1:], len(codes))
        return {self._names[first[start]]: dict(zip(names[second[start:end]].tolist(), counts[start:end].tolist()))
                for start, end in zip(starts, ends)}


@functools.lru_cache(maxsize=None)
def _upper_pairs(n: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


class CountPairsInBundleFn(beam.DoFn):
    """LogRecords -> (a, PairCounts) per image a, the pair counts of the records of a bundle.

    Combining inside the DoFn ("in-mapper combining") rather than a CombinePerKey over one element per
    (record, image): a record shows ~15 images, so ~105 pairs, and Beam's cost of moving ~15 elements
    per record was more than the counting, which is in numpy here (ShownPairs).  The counts are flushed
    whenever they hold MAX_PAIRS pairs, so a worker's memory stays bounded however large the bundle.
    """

    MAX_PAIRS = 8_000_000  # 64 MB of pair codes

    def start_bundle(self):
        self._reset()

    def _reset(self):
        self._shown, self._clicks, self._click_pairs = ShownPairs(), {}, 0

    def process(self, record: LogRecord):
        self._shown.add(shown_images(record))
        self._click_pairs += add_click_pairs(self._clicks, record)
        if self._shown.size + self._click_pairs >= self.MAX_PAIRS:
            yield from self._flush()

    def finish_bundle(self):
        for image_counts in self._flush():
            yield GlobalWindows.windowed_value(image_counts)

    def _flush(self):
        shown, clicks = self._shown.counts_by_image(), self._clicks
        self._reset()
        empty = new_pair_counts()
        return [(a, (shown.get(a, {}),) + tuple(dict(table) for table in clicks.get(a, empty)[1:]))
                for a in shown.keys() | clicks.keys()]


class PairCountsFn(beam.CombineFn):
    """PairCounts of one image a (from each bundle) -> [(b, EdgeStats)] for every b > a co-clicked with a or
    shown for a's image.

    A list showing a with b counts towards b only if the pair is co-clicked somewhere, which is known at
    the end: the SHOWN counts are kept for every partner until then (one counter per pair, never one
    element per event and pair), and extract_output keeps the co-clicked ones.
    """

    def create_accumulator(self):
        return new_pair_counts()

    def add_input(self, accumulator, counts: PairCounts):
        for total, more in zip(accumulator, counts):
            total.update(more)
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for accumulator in accumulators:
            self.add_input(merged, accumulator)
        return merged

    def compact(self, accumulator):
        # Plain dicts cross the shuffle in Beam's own fast encoding; a Counter would be pickled.
        return tuple(dict(counts) for counts in accumulator)

    def extract_output(self, accumulator) -> List[Tuple[str, EdgeStats]]:
        shown, co_clicks, similar_shown, similar_clicks = accumulator
        return [(other, EdgeStats(shown.get(other, 0) if other in co_clicks else 0, co_clicks.get(other, 0),
                                  similar_shown.get(other, 0), similar_clicks.get(other, 0)))
                for other in co_clicks.keys() | similar_shown.keys()]


class ComputeEdgeStats(beam.PTransform):
    """LogRecords -> ((a, b), EdgeStats), a < b, for every pair co-clicked or shown for the other's image."""

    def expand(self, records):
        return (
            records
            | "CountInBundle" >> beam.ParDo(CountPairsInBundleFn())
            | "CountPerImage" >> beam.CombinePerKey(PairCountsFn())
            | "PerPair" >> beam.FlatMapTuple(lambda a, stats: [((a, b), s) for b, s in stats])
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
