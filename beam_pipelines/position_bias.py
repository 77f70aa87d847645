"""Stage 2b (pipeline.position_bias=pbm): examination propensities fitted on the logs, and debiased clicks.

Users look at the top of a result page far more than at the rest, so a raw
click count or CTR mostly says where the old ranker put an image.  The
position-based model (PBM; Craswell et al. 2008, Chuklin et al., "Click Models
for Web Search", 2015) explains a click as examination x attractiveness:

    P(click | query q, image d, position p) = theta[p] * alpha[q, d]

with theta shared by every query and alpha per (query, image).  Once theta is
known, a pair's clicks divided by its expected examinations sum(n_p * theta[p])
estimate alpha, whatever positions it was shown at.

How it is fitted, and why this way:

* Sufficient statistics, not impressions.  The text-query click-stats combiner
  (click_stats.PositionQueryStatsFn, one lifted CombinePerKey by query, the
  same pass the raw statistics take) also counts each pair's impressions and
  clicks per slot (position, or (locale or category, position) under
  pipeline.position_bias_by).  The EM needs nothing else, so no extra
  shuffle of impressions is paid.
* Only informative pairs.  With alpha free per pair, a pair seen at a single
  position says nothing about theta except alpha <= 1, i.e. theta[p] >= its
  CTR, which for a pair seen once and clicked pulls theta[p] to 1; sparse
  pairs bias the fit the same way, more weakly.  The fit therefore takes the
  pairs with at least pipeline.position_bias_min_impressions impressions at 2+
  positions (the "interventions" the noisy ranker makes for free, as in
  intervention harvesting, Agarwal et al. 2019).  On the default demo world
  the largest error at positions 1-20 falls from 0.12 (all pairs at 2+
  positions) to 0.015 (10+ impressions), at ~100 k (pair, position) rows.
* EM in memory, on one worker.  Those rows are gathered by one CombineGlobally
  (`PbmDataFn`) and the standard PBM EM (Chuklin et al., ch. 4) runs on them
  as numpy arrays: each iteration is two bincounts over the rows, ~1 ms per
  10 k rows, and it converges in a few hundred iterations.  One Beam pass per
  EM iteration (or regression-EM's per-iteration model fit) would cost a
  shuffle each; the rows are the size of the distinct (pair, position)
  combinations with enough traffic, not of the logs (a larger log needs a
  larger min_impressions, which also makes the fit more accurate).
* Loud failure.  EM that has not moved every relative propensity by less
  than pipeline.position_bias_tolerance within
  pipeline.position_bias_iterations raises NotConverged, and so does a log
  with no informative pair: the run stops, no default propensity is made up.

Propensities are reported relative to position 1 (theta[1] = 1, what the demo
generator's truth is), and absolute.  A position never shown in the logs gets
no propensity (the report lists it); an impression at a position shown but
without a fitted propensity is not reweighted (propensity 1) and counted.

The debiased figures of a pair (selection.py uses them), with propensities
clipped below at pipeline.propensity_clip and each click weighted by its dwell
(`dwell_weight`):

    clicks     = sum of weighted clicks
    ips_clicks = sum over slots of weighted clicks / max(theta, clip)
    ctr        = (clicks + prior * n0) / (sum over slots of n * max(theta, clip) + n0)

With pipeline.half_life_days the slot counts are time-decayed (click_stats.py):
the EM then fits a weighted likelihood (recent days count more), a pair is
informative when its decayed impressions reach min_impressions, and the
report's impression figures are decayed sums (rounded to 3 decimals).
"""


import dataclasses
import math
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np

from clicklens.errors import ClicklensError

# A propensity's key: (segment, position); segment is "" unless pipeline.position_bias_by names one.
Slot = Tuple[str, int]
# Found in the runner's error by run_pipeline, which reports that line alone.
NOT_CONVERGED = "position bias EM failed"
# The EM keeps theta and alpha inside (0, 1): at exactly 1 the E step divides 0 by 0.
_EPS = 1e-9


class NotConverged(ClicklensError):
    """The PBM fit did not converge within its iterations, or had nothing to fit."""


@dataclasses.dataclass(frozen=True)
class PbmSettings:
    """The pipeline.position_bias* settings of the fit."""

    by: str = "none"
    iterations: int = 1000
    tolerance: float = 1e-5
    min_impressions: int = 10

    @classmethod
    def from_config(cls, p) -> "PbmSettings":
        return cls(p.position_bias_by, p.position_bias_iterations, p.position_bias_tolerance,
                   p.position_bias_min_impressions)


def slot_key(segment: str, position: int):
    """A slot's key in PairStats.by_slot and propensity tables: the position alone when there is no segment."""
    return (segment, position) if segment else position


def as_slot(key) -> Slot:
    """A slot key -> (segment, position)."""
    return key if isinstance(key, tuple) else ("", key)


def slot_rows(by_slot: Sequence) -> Iterable[Tuple[Any, int, int, float]]:
    """PairStats.by_slot (flat) -> (slot key, impressions, clicks, weighted clicks) per slot."""
    for i in range(0, len(by_slot), 4):
        yield by_slot[i], by_slot[i + 1], by_slot[i + 2], by_slot[i + 3]


def dwell_weight(dwell_ms: Optional[float], min_dwell_ms: float) -> float:
    """How much one click counts: dwell / min_dwell_ms below min_dwell_ms, else 1 (also when off or not logged)."""
    if not min_dwell_ms or dwell_ms is None or dwell_ms >= min_dwell_ms:
        return 1.0
    return dwell_ms / min_dwell_ms


# ---------------------------------------------------------------------------
# The fit's input: per-slot totals and the informative pairs' rows.


class PbmData(NamedTuple):
    """What the EM reads: {slot: [impressions, clicks]} over all text impressions, and one tuple of
    (slot, impressions, clicks) per informative pair (PbmDataFn's accumulator keys totals by slot key)."""

    totals: Dict[Slot, List[int]]
    pairs: List[Tuple[Tuple[Slot, int, int], ...]]


def fit_input(element, min_impressions: int) -> Tuple[Dict[Any, List[int]], List[tuple]]:
    """(query, QueryStats with by_slot) -> (its {slot key: [impressions, clicks]}, one flat tuple
    (slot key, impressions, clicks, slot key, ...) per informative pair)."""
    _, stats = element
    totals: Dict[Any, List[int]] = {}
    pairs = []
    for pair in stats.images.values():
        by_slot = pair.by_slot
        for i in range(0, len(by_slot), 4):
            t = totals.get(by_slot[i])
            if t is None:
                totals[by_slot[i]] = [by_slot[i + 1], by_slot[i + 2]]
            else:
                t[0] += by_slot[i + 1]
                t[1] += by_slot[i + 2]
        if pair.impressions >= min_impressions and len(by_slot) >= 8:
            pairs.append(tuple(v for k in range(0, len(by_slot), 4) for v in by_slot[k:k + 3]))
    return totals, pairs


class PbmDataFn(beam.CombineFn):
    """fit_input outputs -> PbmData (sums the totals, concatenates the pairs)."""

    def create_accumulator(self):
        return [{}, []]

    def add_input(self, acc, item):
        totals, pairs = item
        for slot, (n, c) in totals.items():
            t = acc[0].setdefault(slot, [0, 0])
            t[0] += n
            t[1] += c
        acc[1].extend(pairs)
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            self.add_input(merged, acc)
        return merged

    def extract_output(self, acc) -> PbmData:
        pairs = [tuple((as_slot(flat[k]), flat[k + 1], flat[k + 2]) for k in range(0, len(flat), 3))
                 for flat in acc[1]]
        # Sorted, so the fit (and the report) do not depend on the order Beam delivered the queries in.
        return PbmData({as_slot(key): t for key, t in acc[0].items()}, sorted(pairs))


# ---------------------------------------------------------------------------
# The EM.


def fit_pbm(data: PbmData, iterations: int, tolerance: float) -> Dict[str, Any]:
    """Fits the position-based model by EM; the fit as a JSON-ready dict (see `fit_report`).

    Raises NotConverged when no pair is informative, or when the relative propensities still move by
    tolerance or more after `iterations` iterations.
    """
    if not data.pairs:
        raise NotConverged(f"{NOT_CONVERGED}: no (query, image) pair was shown at 2+ positions with enough "
                           "impressions to fit; lower pipeline.position_bias_min_impressions or set "
                           "pipeline.position_bias=none")
    slots = sorted({slot for pair in data.pairs for slot, _, _ in pair})
    index = {slot: i for i, slot in enumerate(slots)}
    rows = [(k, index[slot], n, c) for k, pair in enumerate(data.pairs) for slot, n, c in pair]
    pair_of, slot_of, n, c = (np.array(col) for col in zip(*rows))
    n, c = n.astype(np.float64), c.astype(np.float64)
    unclicked = n - c
    num_slots, num_pairs = len(slots), len(data.pairs)
    n_slot = np.bincount(slot_of, n, num_slots)
    n_pair = np.bincount(pair_of, n, num_pairs)
    reference = _reference_slots(slots)

    theta = np.full(num_slots, 0.5)
    alpha = np.full(num_pairs, 0.5)
    relative = theta / theta[reference]
    change = math.inf
    for iteration in range(1, iterations + 1):
        t, a = theta[slot_of], alpha[pair_of]
        not_clicked = 1.0 - t * a
        # E step: P(examined | no click) and P(attractive | no click); a click means both.
        examined = c + unclicked * t * (1.0 - a) / not_clicked
        attractive = c + unclicked * a * (1.0 - t) / not_clicked
        # M step.
        theta = np.clip(np.bincount(slot_of, examined, num_slots) / n_slot, _EPS, 1.0 - _EPS)
        alpha = np.clip(np.bincount(pair_of, attractive, num_pairs) / n_pair, _EPS, 1.0 - _EPS)
        new_relative = theta / theta[reference]
        change = float(np.max(np.abs(new_relative - relative)))
        relative = new_relative
        if change < tolerance:
            break
    else:
        raise NotConverged(f"{NOT_CONVERGED}: not converged after {iterations} iterations (a relative propensity "
                           f"still moved {change:.3g} >= pipeline.position_bias_tolerance={tolerance:g}); raise "
                           "pipeline.position_bias_iterations or the tolerance")
    return fit_report(data, slots, theta, relative, iteration, change, tolerance, n)


def _reference_slots(slots: Sequence[Slot]) -> np.ndarray:
    """Per slot, the index of its segment's reference slot: position 1, or the smallest position fitted."""
    first: Dict[str, int] = {}
    for i, (segment, position) in enumerate(slots):
        if segment not in first or position < slots[first[segment]][1]:
            first[segment] = i
    return np.array([first[segment] for segment, _ in slots])


def _by_segment(values: Dict[Slot, Any], segmented: bool) -> Dict[str, Any]:
    """{slot: v} -> {"position": v}, or {segment: {"position": v}} when segmented."""
    out: Dict[str, Any] = {}
    for (segment, position), v in sorted(values.items()):
        (out.setdefault(segment, {}) if segmented else out)[str(position)] = v
    return out


def fit_report(data: PbmData, slots: Sequence[Slot], theta: np.ndarray, relative: np.ndarray, iterations: int,
               change: float, tolerance: float, n: np.ndarray) -> Dict[str, Any]:
    """The fit as report.json shows it.

    propensities: relative to the segment's position 1 (or smallest position fitted: relative_to);
    absolute_propensities: theta itself; positions_without_propensity: positions up to the deepest one shown
    that no log impression has; positions_not_fitted: shown, but in no informative pair (not reweighted).
    """
    segmented = any(segment for segment, _ in data.totals) or any(segment for segment, _ in slots)
    fitted = set(slots)
    shown = {slot for slot, (count, _) in data.totals.items() if count}
    deepest: Dict[str, int] = {}
    for segment, position in shown:
        deepest[segment] = max(deepest.get(segment, 0), position)
    never = {(s, p): None for s, top in deepest.items() for p in range(1, top + 1) if (s, p) not in shown}
    reference = _reference_slots(slots)
    return {
        "propensities": _by_segment({s: round(float(r), 6) for s, r in zip(slots, relative)}, segmented),
        "absolute_propensities": _by_segment({s: round(float(t), 6) for s, t in zip(slots, theta)}, segmented),
        "relative_to": _by_segment({s: slots[reference[i]][1] for i, s in enumerate(slots)
                                    if reference[i] == i}, segmented),
        "ctr_by_position": _by_segment({s: round(c / count, 6) for s, (count, c) in data.totals.items() if count},
                                       segmented),
        "impressions_by_position": _by_segment({s: _count(count) for s, (count, _) in data.totals.items() if count},
                                               segmented),
        "positions_without_propensity": _listed(never, segmented),
        "positions_not_fitted": _listed({s: None for s in shown - fitted}, segmented),
        "iterations": iterations,
        "last_change": float(f"{change:.3g}"),
        "tolerance": tolerance,
        "pairs_fitted": len(data.pairs),
        "rows_fitted": len(n),
        "impressions_fitted": _count(sum(count for pair in data.pairs for _, count, _ in pair)),
        # Debiasing takes these as examined (propensity 1): shown at a position with no fitted propensity.
        "impressions_not_reweighted": _count(sum(data.totals[s][0] for s in shown - fitted)),
    }


def _count(n):
    """An impression count for the report: an int as it is, a decayed (float) sum rounded to 3 decimals."""
    return n if isinstance(n, int) else round(float(n), 3)


def _listed(slots: Dict[Slot, Any], segmented: bool):
    """Slots -> sorted positions, or {segment: sorted positions} when segmented."""
    out: Dict[str, List[int]] = {}
    for segment, position in sorted(slots):
        out.setdefault(segment, []).append(position)
    return out if segmented else out.get("", [])


def propensity_table(fit: Dict[str, Any]) -> Dict[Any, float]:
    """The fit's relative propensities as {slot key: theta} (slot_key; the inverse of _by_segment)."""
    props = fit["propensities"]
    if props and isinstance(next(iter(props.values())), dict):
        return {slot_key(segment, int(p)): v for segment, by_pos in props.items() for p, v in by_pos.items()}
    return {int(p): v for p, v in props.items()}


# ---------------------------------------------------------------------------
# Debiased figures of one pair.


class DebiasedStats(NamedTuple):
    """A pair's figures with clicks weighted by dwell and impressions by their propensity."""

    clicks: float           # dwell-weighted clicks
    ips_clicks: float       # dwell-weighted clicks, each divided by its (clipped) propensity
    examinations: float     # expected examinations: impressions times their (clipped) propensity
    not_reweighted: int     # impressions at a slot without a propensity (taken as examined)

    def smoothed_ctr(self, prior: float, prior_impressions: float) -> float:
        """Debiased CTR under the same Beta prior as the raw one."""
        denominator = self.examinations + prior_impressions
        if denominator <= 0:
            return 0.0
        return (self.clicks + prior * prior_impressions) / denominator


def debias(by_slot: Sequence, table: Optional[Dict[Any, float]], clip: float) -> DebiasedStats:
    """A pair's PairStats.by_slot -> DebiasedStats, with propensities {slot key: theta} (propensity_table).

    table None: no propensities (dwell weighting alone); a slot missing from the table counts as examined.
    """
    clicks = ips = examinations = 0.0
    missing = 0
    for i in range(0, len(by_slot), 4):
        n, weighted = by_slot[i + 1], by_slot[i + 3]
        theta = 1.0
        if table is not None:
            found = table.get(by_slot[i])
            if found is None:
                missing += n
            elif found > clip:
                theta = found
            else:
                theta = clip
        clicks += weighted
        if weighted:
            ips += weighted / theta
        examinations += n * theta
    return DebiasedStats(clicks, ips, examinations, missing)


# ---------------------------------------------------------------------------
# The Beam transform.


class FitPropensities(beam.PTransform):
    """(query, QueryStats with by_slot) -> one fit dict (fit_report), or the run fails (NotConverged)."""

    def __init__(self, settings: PbmSettings):
        super().__init__()
        self._settings = settings

    def expand(self, query_stats):
        s = self._settings
        return (
            query_stats
            | "FitInput" >> beam.Map(fit_input, s.min_impressions)
            | "GatherFitInput" >> beam.CombineGlobally(PbmDataFn())
            | "EM" >> beam.Map(lambda data: dict(fit_pbm(data, s.iterations, s.tolerance), model="pbm", by=s.by,
                                                 min_impressions=s.min_impressions))
        )
