"""Stage 3 (and 6): selection of query-image training pairs, and hard negatives.

For each query, among the images shown for it, an image is a positive when
  * it has at least `min_clicks` clicks,
  * its smoothed CTR is strictly above the threshold of the query's category
    (`ctr_threshold_by_category`, else `ctr_threshold_default`),
  * it is among the `top_n_per_query` images by clicks (ties: higher CTR, then image id),
  * and, for a query matching any `entity_patterns` regex, among the first `entity_cap`.
Its click weight, used in the loss, is log(1 + clicks).

With pipeline.position_bias=pbm (or pipeline.min_dwell_ms > 0) every figure
above is the debiased one (position_bias.DebiasedStats): clicks are
dwell-weighted for min_clicks, the CTR is clicks over expected examinations
(same Beta prior), top-N orders by inverse-propensity clicks and the click
weight is log(1 + inverse-propensity clicks).  The raw selection is made too,
and how the two differ goes to the report (COMPARISON).

Hard negatives of a query are the images shown for it that were never clicked
for it, most impressions first (the Sogou patent's "shown but not clicked").

With pipeline.half_life_days every impression and click is time-decayed
(click_stats.py), so min_clicks, the CTR, top-N and the click weight all read
decayed figures (floats): a pair clicked on old days only weighs less than
one clicked as often lately, and min_clicks compares the decayed sum (each
click weighs a little under 1, even on as_of itself).  Hard negatives are still
the pairs with no click at all.
"""


import dataclasses
import math
import re
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam

from beam_pipelines import position_bias
from beam_pipelines.click_stats import PairStats, QueryClickStats
from beam_pipelines.progress import LogProgress
from beam_pipelines.window import LogWindow

# Outputs of SelectTrainingPairs.
QUERY_STATS = "query_stats"
SELECTED = "selected"
# Debiased selection only: the position-bias fit (pbm) and one SelectionComparison per query.
PROPENSITIES = "propensities"
COMPARISON = "comparison"


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
    position_bias: str = "none"
    propensity_clip: float = 0.1
    min_dwell_ms: float = 0.0

    @property
    def debiased(self) -> bool:
        """True when selection uses the debiased figures (position bias fitted, or dwell weighting on)."""
        return self.position_bias != "none" or self.min_dwell_ms > 0

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
            position_bias=p.position_bias,
            propensity_clip=p.propensity_clip,
            min_dwell_ms=p.min_dwell_ms,
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


class Figures(NamedTuple):
    """What the rules read of one pair: clicks for min_clicks, clicks for top-N, CTR, and the click weight."""

    clicks: float
    rank_clicks: float
    ctr: float
    weight: float


def raw_figures(stats: PairStats, rules: SelectionRules) -> Figures:
    """The raw figures: clicks, smoothed CTR, log(1 + clicks)."""
    return Figures(stats.clicks, stats.clicks, stats.smoothed_ctr(rules.ctr_prior, rules.ctr_prior_impressions),
                   click_weight(stats))


def debiased_figures(stats: PairStats, rules: SelectionRules, propensities: Optional[Dict]) -> Figures:
    """The debiased figures (position_bias.debias): weighted clicks, IPS clicks, debiased CTR, log(1 + IPS clicks)."""
    return _figures_of(position_bias.debias(stats.by_slot, propensities, rules.propensity_clip), rules)


def _figures_of(d: position_bias.DebiasedStats, rules: SelectionRules) -> Figures:
    return Figures(d.clicks, d.ips_clicks, d.smoothed_ctr(rules.ctr_prior, rules.ctr_prior_impressions),
                   math.log1p(d.ips_clicks))


def _select(image_figures: Sequence[Tuple[str, Figures]], threshold: float, min_clicks: int,
            limit: int) -> List[Tuple[str, Figures]]:
    """The pairs over min_clicks and the CTR threshold, the `limit` with most clicks (ties: CTR, then id)."""
    candidates = sorted((-f.rank_clicks, -f.ctr, image_id, f) for image_id, f in image_figures
                        if f.clicks >= min_clicks and f.ctr > threshold)
    return [(image_id, f) for _, _, image_id, f in candidates[:limit]]


class SelectionComparison(NamedTuple):
    """How the debiased selection of one query differs from the raw one (summed for the report)."""

    pairs: int                # images shown for the query
    clicked_pairs: int        # ... with at least one click
    rank_changed: int         # clicked images whose rank by CTR within the query differs, raw vs debiased
    clicked_image_pairs: int  # pairs of clicked images of the query
    discordant_image_pairs: int  # ... that raw and debiased CTR order differently
    selected_raw: int
    selected_debiased: int
    selected_both: int


def _ctr_ranks(figures: Sequence[Tuple[str, Figures]]) -> Dict[str, int]:
    return {image_id: r for r, (_, image_id) in enumerate(sorted((-f.ctr, image_id) for image_id, f in figures))}


def inversions(values: List[int]) -> int:
    """Pairs i < j with values[i] > values[j] (merge sort, O(n log n))."""
    if len(values) < 2:
        return 0
    middle = len(values) // 2
    left, right = values[:middle], values[middle:]
    count = inversions(left) + inversions(right)
    left.sort()
    right.sort()
    j = 0
    for value in left:  # for each left value, the right values smaller than it
        while j < len(right) and right[j] < value:
            j += 1
        count += j
    return count


def select_for_query(query: str, category: str, image_stats: Iterable[Tuple[str, PairStats]],
                     rules: SelectionRules, entity_regexes: Sequence[re.Pattern] = None,
                     propensities: Optional[Dict] = None,
                     comparison: Optional[list] = None) -> List[SelectedPair]:
    """Applies the selection rules to every image shown for one query.

    Under `rules.debiased` the figures are the debiased ones, with `propensities` ({slot: theta}, None for
    dwell weighting alone; position_bias.propensity_table); a SelectionComparison is appended to `comparison` when it is a list.
    """
    if entity_regexes is None:
        entity_regexes = rules.compile_patterns()
    image_stats = [(image_id, PairStats(*stats)) for image_id, stats in image_stats]
    threshold = rules.threshold(category)
    limit = rules.top_n_per_query
    if rules.is_entity(query, entity_regexes):
        limit = min(limit, rules.entity_cap)
    # A pair never clicked has 0 clicks, raw or weighted: with min_clicks >= 1 it can never be selected.
    candidates = [(i, s) for i, s in image_stats if s.clicks] if rules.min_clicks > 0 else image_stats
    raw = [(image_id, raw_figures(stats, rules)) for image_id, stats in candidates]
    figures = raw
    if rules.debiased:
        clip = rules.propensity_clip
        figures = [(image_id, _figures_of(position_bias.debias(stats.by_slot, propensities, clip), rules))
                   for image_id, stats in candidates]
    selected = _select(figures, threshold, rules.min_clicks, limit)

    if rules.debiased and comparison is not None:
        chosen_raw = {image_id for image_id, _ in _select(raw, threshold, rules.min_clicks, limit)}
        clicked = {image_id for image_id, stats in candidates if stats.clicks}
        raw_ranks = _ctr_ranks([(i, f) for i, f in raw if i in clicked])
        debiased_ranks = _ctr_ranks([(i, f) for i, f in figures if i in clicked])
        by_raw_rank = sorted(clicked, key=raw_ranks.get)
        comparison.append(SelectionComparison(
            len(image_stats), len(clicked), sum(raw_ranks[i] != debiased_ranks[i] for i in clicked),
            len(clicked) * (len(clicked) - 1) // 2, inversions([debiased_ranks[i] for i in by_raw_rank]),
            len(chosen_raw), len(selected), len(chosen_raw & {image_id for image_id, _ in selected})))

    negatives: Tuple[str, ...] = ()
    if rules.hard_negatives and selected:
        chosen = {image_id for image_id, _ in selected}
        unclicked = sorted((-s.impressions, image_id) for image_id, s in image_stats
                           if s.clicks == 0 and image_id not in chosen)
        negatives = tuple(image_id for _, image_id in unclicked[:rules.hard_negatives])
    return [SelectedPair(query, category, image_id, f.weight, negatives) for image_id, f in selected]


class SelectPairsFn(beam.DoFn):
    """(query, QueryStats) -> SelectedPair for each selected image."""

    def __init__(self, rules: SelectionRules):
        self._rules = rules
        self._regexes = None
        self._table = None  # {slot: propensity}, from the fit side input on the first element

    def setup(self):
        self._regexes = self._rules.compile_patterns()

    def process(self, element, fit=None):
        query, stats = element
        if not self._rules.debiased:
            yield from select_for_query(query, stats.category, stats.images.items(), self._rules, self._regexes)
            return
        if fit is not None and self._table is None:
            self._table = position_bias.propensity_table(fit)
        comparison: list = []
        yield from select_for_query(query, stats.category, stats.images.items(), self._rules, self._regexes,
                                    self._table, comparison)
        yield beam.pvalue.TaggedOutput(COMPARISON, comparison[0])


class SelectTrainingPairs(beam.PTransform):
    """LogRecords -> {QUERY_STATS: (query, QueryStats), SELECTED: SelectedPair}, and under debiased rules
    also {COMPARISON: SelectionComparison per query}, and with position_bias=pbm {PROPENSITIES: the fit}.

    Stages 2 and 3: each query's click statistics and category (one combiner), the position-bias fit on
    them (pbm), then the selection rules.  `decay`: the window whose half-life weighs the records (None: 1).
    """

    def __init__(self, rules: SelectionRules, pbm: Optional[position_bias.PbmSettings] = None,
                 decay: Optional[LogWindow] = None):
        super().__init__()
        self._rules = rules
        self._pbm = pbm or position_bias.PbmSettings()
        self._decay = decay

    def expand(self, records):
        rules = self._rules
        query_stats = (
            records
            | "ClickStats" >> QueryClickStats(rules.debiased, rules.min_dwell_ms, self._pbm.by, self._decay)
            | "LogQueryStats" >> LogProgress("ClickStats", "text queries")
        )
        if not rules.debiased:
            selected = (
                query_stats
                | "SelectPairs" >> beam.ParDo(SelectPairsFn(rules))
                | "LogSelected" >> LogProgress("SelectPairs", "selected pairs")
            )
            return {QUERY_STATS: query_stats, SELECTED: selected}
        out = {QUERY_STATS: query_stats}
        side = {}
        if rules.position_bias == "pbm":
            out[PROPENSITIES] = query_stats | "FitPropensities" >> position_bias.FitPropensities(self._pbm)
            side["fit"] = beam.pvalue.AsSingleton(out[PROPENSITIES])
        selected = query_stats | "SelectPairs" >> beam.ParDo(SelectPairsFn(rules), **side).with_outputs(
            COMPARISON, main=SELECTED)
        out[SELECTED] = selected[SELECTED] | "LogSelected" >> LogProgress("SelectPairs", "selected pairs")
        out[COMPARISON] = selected[COMPARISON]
        return out
