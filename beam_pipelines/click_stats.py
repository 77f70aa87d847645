"""Stage 2: click statistics per (query, image), the category of each query, and its number of events.

All of it is one CombinePerKey by query over one element per text-query event
(`QueryClickStats`): Beam lifts the combiner, so each worker sums its events per
query before anything is shuffled, and the selection rules (selection.py) get
each query's statistics in one piece, with no join.

With pipeline.position_bias=pbm (or pipeline.min_dwell_ms > 0) the same
combiner also keeps, per image, its impressions, clicks and dwell-weighted
clicks per slot (position, or (segment, position)): `PositionQueryStatsFn`,
the input of the position-bias fit and of the debiased figures
(position_bias.py).  Otherwise nothing changes.

With pipeline.half_life_days (a window ending on pipeline.as_of, window.py)
each event carries its record's weight, 0.5 ** (age in days / half-life): the
event adds that weight to each image's impressions, clicked * weight to its
clicks and position * weight to its position sum (and the same to the slot
counts), so every figure selection.py and position_bias.py read is a decayed
one.  The events and category counts of a query stay whole (one per event:
they rank categories and weigh the vocabulary's words).  Without decay the
weight is the int 1 and every count an int, exactly as before.
"""


from typing import Dict, Iterable, NamedTuple, Optional, Tuple

import apache_beam as beam

from beam_pipelines.position_bias import as_slot, dwell_weight
from beam_pipelines.window import LogWindow
from clicklens.log_schema import LogRecord


class PairStats(NamedTuple):
    """Impressions, clicks and summed positions of one image for one query (floats when decayed)."""

    impressions: float = 0
    clicks: float = 0
    position_sum: float = 0
    # PositionQueryStatsFn only, flat (one tuple of numbers decodes far faster than nested ones): slot key,
    # impressions, clicks, dwell-weighted clicks, for each slot (position_bias.slot_rows reads it).
    by_slot: Tuple = ()

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


# One text-query event as QueryClickStats takes it: (category, ((image_id, clicked, position), ...), weight).
QueryEvent = Tuple[str, Tuple[Tuple[str, int, int], ...], float]


def record_weight(record: LogRecord, decay: Optional[LogWindow]):
    """How much a record's impressions and clicks count: its time decay (LogWindow.weight), the int 1 without."""
    return 1 if decay is None else decay.weight(record.time)


def query_event(record: LogRecord, decay: Optional[LogWindow] = None) -> Iterable[Tuple[str, QueryEvent]]:
    """(query, QueryEvent) for a text-query record; nothing for a query-by-image record."""
    if record.query is not None:
        yield record.query, (record.category, tuple((imp.image_id, int(imp.clicked), imp.position)
                                                    for imp in record.impressions), record_weight(record, decay))


def category_rank(category: str, n: int):
    """Most events first; ties go to the smaller name; "" loses to any name."""
    return (category != "", n, tuple(-ord(c) for c in category))


class QueryStatsFn(beam.CombineFn):
    """QueryEvents of one query -> QueryStats.

    Accumulator: [events, {category: events}, {image_id: [impressions, clicks, position_sum]}], each
    impression counting the event's weight.
    """

    def create_accumulator(self):
        return [0, {}, {}]

    def add_input(self, acc, event: QueryEvent):
        category, impressions, w = event
        acc[0] += 1
        categories = acc[1]
        categories[category] = categories.get(category, 0) + 1
        images = acc[2]
        for image_id, clicked, position in impressions:
            counts = images.get(image_id)
            if counts is None:
                images[image_id] = [w, clicked * w, position * w]
            else:
                counts[0] += w
                counts[1] += clicked * w
                counts[2] += position * w
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


# A text-query event with slots: (category, segment, ((image_id, clicked, position, click weight), ...), weight);
# the click weight is the dwell's, the last weight the record's time decay.
SlotEvent = Tuple[str, str, Tuple[Tuple[str, int, int, float], ...], float]


def slot_event(record: LogRecord, min_dwell_ms: float, by: str,
               decay: Optional[LogWindow] = None) -> Iterable[Tuple[str, SlotEvent]]:
    """(query, SlotEvent) for a text-query record; the segment is its locale or category under `by`, else ""."""
    if record.query is not None:
        segment = record.locale if by == "locale" else record.category if by == "category" else ""
        if min_dwell_ms:
            impressions = tuple((imp.image_id, int(imp.clicked), imp.position,
                                 dwell_weight(imp.dwell_ms, min_dwell_ms) if imp.clicked else 0.0)
                                for imp in record.impressions)
        else:  # every click counts 1
            impressions = tuple((imp.image_id, int(imp.clicked), imp.position, int(imp.clicked))
                                for imp in record.impressions)
        yield record.query, (record.category, segment, impressions, record_weight(record, decay))


class PositionQueryStatsFn(QueryStatsFn):
    """SlotEvents of one query -> QueryStats whose PairStats have by_slot.

    Accumulator: [events, {category: events}, {image_id: {slot key: [impressions, clicks, weighted clicks]}}]
    (slot keys: position_bias.slot_key; each count times the event's weight); an image's impressions, clicks
    and position sum are its slots' sums.
    """

    def add_input(self, acc, event: SlotEvent):
        category, segment, impressions, w = event
        acc[0] += 1
        categories = acc[1]
        categories[category] = categories.get(category, 0) + 1
        images = acc[2]
        for image_id, clicked, position, weight in impressions:
            slots = images.get(image_id)
            if slots is None:
                slots = images[image_id] = {}
            key = (segment, position) if segment else position
            counts = slots.get(key)
            if counts is None:
                slots[key] = [w, clicked * w, weight * w]
            else:
                counts[0] += w
                counts[1] += clicked * w
                counts[2] += weight * w
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
            for image_id, slots in acc[2].items():
                into = images.get(image_id)
                if into is None:
                    images[image_id] = slots
                    continue
                for key, (n, c, w) in slots.items():
                    counts = into.get(key)
                    if counts is None:
                        into[key] = [n, c, w]
                    else:
                        counts[0] += n
                        counts[1] += c
                        counts[2] += w
        return merged if merged is not None else self.create_accumulator()

    def extract_output(self, acc) -> QueryStats:
        category = max(acc[1].items(), key=lambda cn: category_rank(*cn))[0] if acc[1] else ""
        return QueryStats(category, acc[0], {image_id: pair_stats(slots) for image_id, slots in acc[2].items()})


def pair_stats(slots: Dict) -> PairStats:
    """{slot key: [n, clicks, weighted clicks]} -> PairStats with the flat by_slot (in slot order)."""
    impressions = clicks = position_sum = 0
    flat = []
    try:
        keys = sorted(slots)
    except TypeError:  # positions and (segment, position) keys together (a record without a segment)
        keys = sorted(slots, key=as_slot)
    for key in keys:
        n, c, w = slots[key]
        impressions += n
        clicks += c
        position_sum += n * (key if isinstance(key, int) else key[1])
        flat += (key, n, c, w)
    return PairStats(impressions, clicks, position_sum, tuple(flat))


class QueryClickStats(beam.PTransform):
    """LogRecords -> (query, QueryStats) for every text query (with per-slot counts when `by_slot`).

    `decay`: the window whose half-life weighs each record (LogWindow.weight); None or no half-life: weight 1.
    """

    def __init__(self, by_slot: bool = False, min_dwell_ms: float = 0.0, segment_by: str = "none",
                 decay: Optional[LogWindow] = None):
        super().__init__()
        self._by_slot = by_slot
        self._min_dwell_ms = min_dwell_ms
        self._segment_by = segment_by
        self._decay = decay if decay is not None and decay.half_life_days else None

    def expand(self, records):
        if self._by_slot:
            return (
                records
                | "QueryEvents" >> beam.FlatMap(slot_event, self._min_dwell_ms, self._segment_by, self._decay)
                | "SumPerQuery" >> beam.CombinePerKey(PositionQueryStatsFn())
            )
        return (
            records
            | "QueryEvents" >> beam.FlatMap(query_event, self._decay)
            | "SumPerQuery" >> beam.CombinePerKey(QueryStatsFn())
        )
