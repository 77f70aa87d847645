"""Stage 3 (and 6): selection of query-image training pairs, and hard negatives.

For each query, among the images shown for it, an image is a positive when
  * it has at least `min_clicks` clicks,
  * its smoothed CTR is strictly above the threshold of the query's category
    (`ctr_threshold_by_category`, else `ctr_threshold_default`),
  * it is among the `top_n_per_query` images by clicks (ties: higher CTR, then image id),
  * and, for a query matching any `entity_patterns` regex, among the first `entity_cap`.
Its click weight, used in the loss, is log(1 + clicks).

Hard negatives of a query are the images shown for it that were never clicked
for it, most impressions first (the Sogou patent's "shown but not clicked").
"""


import dataclasses
import math
import re
from typing import Iterable, List, NamedTuple, Sequence, Tuple

import apache_beam as beam

from beam_pipelines.click_stats import PairStats, QueryClickStats
from beam_pipelines.progress import LogProgress

# Outputs of SelectTrainingPairs.
QUERY_STATS = "query_stats"
SELECTED = "selected"


class SelectedPair(NamedTuple):
    """A query-image training pair and what the example needs from the selection."""

    query: str
    category: str
    image_id: str
    click_weight: float
    negatives: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SelectionRules:
    """The pipeline.* settings that decide which pairs become training examples."""

    min_clicks: int = 1
    top_n_per_query: int = 50
    ctr_threshold_default: float = 0.0
    ctr_threshold_by_category: Tuple[Tuple[str, float], ...] = ()
    entity_patterns: Tuple[str, ...] = ()
    entity_cap: int = 5
    ctr_prior: float = 0.05
    ctr_prior_impressions: float = 10.0
    hard_negatives: int = 0

    @classmethod
    def from_config(cls, pipeline_config) -> "SelectionRules":
        p = pipeline_config
        return cls(
            min_clicks=p.min_clicks,
            top_n_per_query=p.top_n_per_query,
            ctr_threshold_default=p.ctr_threshold_default,
            ctr_threshold_by_category=tuple(sorted(p.ctr_threshold_by_category.items())),
            entity_patterns=tuple(p.entity_patterns),
            entity_cap=p.entity_cap,
            ctr_prior=p.ctr_prior,
            ctr_prior_impressions=p.ctr_prior_impressions,
            hard_negatives=p.hard_negatives,
        )

    def threshold(self, category: str) -> float:
        """The CTR threshold of a query category."""
        return dict(self.ctr_threshold_by_category).get(category, self.ctr_threshold_default)

    def is_entity(self, query: str, compiled: Sequence[re.Pattern]) -> bool:
        return any(p.search(query) for p in compiled)

    def compile_patterns(self) -> List[re.Pattern]:
        return [re.compile(p) for p in self.entity_patterns]


def click_weight(stats: PairStats) -> float:
    """The loss weight of a selected pair: log(1 + clicks)."""
    return math.log1p(stats.clicks)


def select_for_query(query: str, category: str, image_stats: Iterable[Tuple[str, PairStats]],
                     rules: SelectionRules, entity_regexes: Sequence[re.Pattern] = None) -> List[SelectedPair]:
    """Applies the selection rules to every image shown for one query."""
    if entity_regexes is None:
        entity_regexes = rules.compile_patterns()
    image_stats = [(image_id, PairStats(*stats)) for image_id, stats in image_stats]
    threshold = rules.threshold(category)
    candidates = []
    for image_id, stats in image_stats:
        ctr = stats.smoothed_ctr(rules.ctr_prior, rules.ctr_prior_impressions)
        if stats.clicks >= rules.min_clicks and ctr > threshold:
            candidates.append((-stats.clicks, -ctr, image_id, stats))
    candidates.sort()
    limit = rules.top_n_per_query
    if rules.is_entity(query, entity_regexes):
        limit = min(limit, rules.entity_cap)
    selected = candidates[:limit]

    negatives: Tuple[str, ...] = ()
    if rules.hard_negatives and selected:
        chosen = {c[2] for c in selected}
        unclicked = sorted((-s.impressions, image_id) for image_id, s in image_stats
                           if s.clicks == 0 and image_id not in chosen)
        negatives = tuple(image_id for _, image_id in unclicked[:rules.hard_negatives])
    return [SelectedPair(query, category, image_id, click_weight(stats), negatives)
            for _, _, image_id, stats in selected]


class SelectPairsFn(beam.DoFn):
    """(query, QueryStats) -> SelectedPair for each selected image."""

    def __init__(self, rules: SelectionRules):
        self._rules = rules
        self._regexes = None

    def setup(self):
        self._regexes = self._rules.compile_patterns()

    def process(self, element):
        query, stats = element
        yield from select_for_query(query, stats.category, stats.images.items(), self._rules, self._regexes)


class SelectTrainingPairs(beam.PTransform):
    """LogRecords -> {QUERY_STATS: (query, QueryStats), SELECTED: SelectedPair}.

    Stages 2 and 3: each query's click statistics and category (one combiner), then the selection rules.
    """

    def __init__(self, rules: SelectionRules):
        super().__init__()
        self._rules = rules

    def expand(self, records):
        query_stats = (
            records
            | "ClickStats" >> QueryClickStats()
            | "LogQueryStats" >> LogProgress("ClickStats", "text queries")
        )
        selected = (
            query_stats
            | "SelectPairs" >> beam.ParDo(SelectPairsFn(self._rules))
            | "LogSelected" >> LogProgress("SelectPairs", "selected pairs")
        )
        return {QUERY_STATS: query_stats, SELECTED: selected}
