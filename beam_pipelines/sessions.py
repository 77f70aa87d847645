"""Stage 1b: the click cap per session, against robots and scrapers (pipeline.max_clicks_per_session*).

A session whose clicks exceed `pipeline.max_clicks_per_session`, or whose
clicks for any one query (a text query, or a query image) exceed
`pipeline.max_clicks_per_session_query`, is taken for a robot and dropped
whole: every record of it, clicks and impressions alike, before anything
counts them.  0 turns a cap off.

Why the whole session, not its first N clicks: log studies set aside the
sessions of suspected agents whole, found by an activity threshold (the
"preparation" stage of B. J. Jansen, "Search log analysis: What it is, what's
been done, how to do it", 2006), because nothing a robot does is evidence of
relevance.  Its first N clicks are as fake as the rest, and so are its
impressions: kept, they would still lower the CTR of every image it skipped
and add to the co-shown counts of the graph.  Dropping the session makes the
outputs exactly those of the logs without it, whatever the robot clicked, so
a robot inflates neither the training examples nor the co-click graph; the
dead letters and the report say what was dropped.  (A human session is
touched only if it passes a cap: the defaults are far above what a person
clicks, and the demo world's sessions have at most demo_data.max_impressions
= 20 clicks.)

How: one small element per record, (session_id, tally), is summed per session
with a lifted CombinePerKey (a session's records may sit in different shards);
the sessions over a cap are a side input of the filter that every later stage
reads from (click statistics, the co-click graph, the logged images), so the
cap is applied once.  Each dropped session is one dead letter
`{"source": "session", "reason": "session_click_cap", "raw": session_id,
"session_id", "records", "clicks", "impressions", "max_query_clicks", "detail"}`.
The side input holds the ids of the dropped sessions only: a few in normal
logs (a cap low enough to drop millions of sessions is no robot filter).
"""


from typing import Dict, Iterable, NamedTuple, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_pipelines.dead_letters import DEAD_LETTER, METRICS_NAMESPACE, dead_letter
from clicklens.log_schema import LogRecord

# Outputs of CapSessionClicks.
RECORDS = "records"
ROBOTS = "robots"
# The dead-letter source and reason of a dropped session.
SESSION_SOURCE = "session"
SESSION_CLICK_CAP = "session_click_cap"


class SessionTally(NamedTuple):
    """What one session (all its records) did."""

    records: int
    impressions: int
    clicks: int
    max_query_clicks: int  # the most clicks for one query (text or image) in the session
    max_query: str         # that query: "q:<text>" or "i:<query image id>" ("" when no click)


def query_key(record: LogRecord) -> str:
    """The query of a record as a key: text and image queries never collide."""
    return f"i:{record.query_image_id}" if record.query_image_id is not None else f"q:{record.query}"


def record_tally(record: LogRecord) -> Tuple[str, Tuple[int, int, int, Dict[str, int]]]:
    """(session_id, (1 record, impressions, clicks, {query: clicks})) of one record."""
    clicks = sum(1 for imp in record.impressions if imp.clicked)
    return record.session_id, (1, len(record.impressions), clicks, {query_key(record): clicks} if clicks else {})


class SessionTallyFn(beam.CombineFn):
    """Record tallies of one session -> SessionTally.  Accumulator: [records, impressions, clicks, {query: clicks}]."""

    def create_accumulator(self):
        return [0, 0, 0, {}]

    def add_input(self, acc, tally):
        records, impressions, clicks, per_query = tally
        acc[0] += records
        acc[1] += impressions
        acc[2] += clicks
        for query, n in per_query.items():
            acc[3][query] = acc[3].get(query, 0) + n
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            self.add_input(merged, acc)
        return merged

    def extract_output(self, acc) -> SessionTally:
        # Most clicks first; ties go to the smaller query key (deterministic).
        query, most = min(acc[3].items(), key=lambda qn: (-qn[1], qn[0])) if acc[3] else ("", 0)
        return SessionTally(acc[0], acc[1], acc[2], most, query)


def is_robot(tally: SessionTally, max_clicks_per_session: int, max_clicks_per_session_query: int) -> bool:
    """True when the session's clicks exceed a cap (a cap of 0 is off)."""
    return bool((max_clicks_per_session and tally.clicks > max_clicks_per_session)
                or (max_clicks_per_session_query and tally.max_query_clicks > max_clicks_per_session_query))


def robot_dead_letter(session_id: str, tally: SessionTally, max_clicks_per_session: int,
                      max_clicks_per_session_query: int) -> Dict:
    """The dead letter of one dropped session: its id, its counts and the caps it exceeded."""
    tally = SessionTally(*tally)
    record = dead_letter(
        SESSION_SOURCE, SESSION_CLICK_CAP, session_id,
        f"{tally.clicks} clicks on {tally.impressions} impressions in {tally.records} records, at most "
        f"{tally.max_query_clicks} for one query ({tally.max_query[:100]}); caps: pipeline.max_clicks_per_session="
        f"{max_clicks_per_session}, pipeline.max_clicks_per_session_query={max_clicks_per_session_query} "
        "(0 = off); every record of the session is dropped")
    record.update(session_id=session_id, records=tally.records, impressions=tally.impressions, clicks=tally.clicks,
                  max_query_clicks=tally.max_query_clicks)
    return record


class DropRobotSessionsFn(beam.DoFn):
    """LogRecords -> those whose session is not in the side input of dropped sessions."""

    def __init__(self):
        self._dropped = Metrics.counter(METRICS_NAMESPACE, "session_cap_records_dropped")

    def process(self, record: LogRecord, robots) -> Iterable[LogRecord]:
        if record.session_id in robots:
            self._dropped.inc()
        else:
            yield record


class CapSessionClicks(beam.PTransform):
    """LogRecords -> {RECORDS: the records of sessions within the caps, ROBOTS: (session_id, SessionTally) of
    each session dropped, DEAD_LETTER: one dead letter per session dropped}.

    With both caps 0 the records pass through untouched (no tally, no side input).
    """

    def __init__(self, max_clicks_per_session: int, max_clicks_per_session_query: int):
        super().__init__()
        self._caps = (max_clicks_per_session, max_clicks_per_session_query)

    def expand(self, records):
        caps = self._caps
        if not any(caps):
            robots = records.pipeline | "NoRobots" >> beam.Create([])
            return {RECORDS: records, ROBOTS: robots,
                    DEAD_LETTER: robots | "NoDeadLetters" >> beam.Map(lambda kv: kv)}
        robots = (
            records
            | "Tally" >> beam.Map(record_tally)
            | "TallyPerSession" >> beam.CombinePerKey(SessionTallyFn())
            | "OverCap" >> beam.Filter(lambda kv: is_robot(kv[1], *caps))
        )
        robot_ids = robots | "Ids" >> beam.MapTuple(lambda session_id, _: (session_id, None))
        kept = records | "DropRobotSessions" >> beam.ParDo(DropRobotSessionsFn(),
                                                           robots=beam.pvalue.AsDict(robot_ids))
        dead = robots | "DeadLetters" >> beam.Map(lambda kv: robot_dead_letter(kv[0], kv[1], *caps))
        return {RECORDS: kept, ROBOTS: robots, DEAD_LETTER: dead}
