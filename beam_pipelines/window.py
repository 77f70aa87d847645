"""Stage 1a (pipeline.as_of): the window of dated logs a run reads, and the time decay of its records.

The daily loop runs the pipeline on the logs up to a day, `pipeline.as_of`
(YYYY-MM-DD, UTC), over `pipeline.window_days` days ending with it (0: every
day up to it).  A log file in a `dt=YYYY-MM-DD/` folder outside the window is
dropped from the matched files before anything opens it (`SelectWindowFiles`);
any other file is read.  Then every record is kept or not by the UTC day of
its `time` (`FilterWindowRecords`), wherever it is stored: a flat file's
records, and also a record of a dt= partition dated another day (a partition
is trusted to say which files cannot hold records of the window, not to date
its records).  A record dated after the end of as_of is outside the window
too.  Records outside the window are good data, not dead letters: they are
counted (Beam counter `log_records_outside_window`, report.json's `window`).

`RequireRecords` fails the run when no record is in the window, naming
pipeline.as_of and pipeline.window_days (EMPTY_WINDOW; `run_pipeline` turns it
into a ClicklensError).  The records wait for that check (their count is a
side input of the step that passes them on), so no later stage ever runs on
an empty window and fails first with a less clear error; the price is one
materialisation of the window's records, and only when as_of is set.

With `pipeline.half_life_days` each record weighs 0.5 ** (age / half_life),
its age in whole days before as_of (0 on as_of itself, so a click of the last
day counts 1 and a single click still passes pipeline.min_clicks = 1);
`LogWindow.weight` gives it to the click statistics (click_stats.py), which
weigh each impression and click by it.  Without decay the weight is the int 1,
so every count stays an int.

With pipeline.as_of empty none of this runs: the pipeline reads every log.
"""


import dataclasses
import datetime
import math
import re
from typing import Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_pipelines.dead_letters import METRICS_NAMESPACE
from beam_pipelines.progress import LogProgress
from clicklens.config import parse_day
from clicklens.log_schema import LogRecord

DAY_SECONDS = 86400.0
# Outputs of SelectWindowFiles and FilterWindowRecords.
READ = "read"
MATCHED = "matched"
RECORDS = "records"
OUTSIDE = "outside"
# The start of the error an empty window raises in the run; run_pipeline reports that line alone.
EMPTY_WINDOW = "empty log window"
# A dt=YYYY-MM-DD folder in a file's path (the last one counts).
_PARTITION = re.compile(r"(?:^|[/\\])dt=(\d{4}-\d{2}-\d{2})(?=[/\\])")

_EPOCH = datetime.date(1970, 1, 1)


def day_start(day: datetime.date) -> float:
    """Seconds since the epoch of 00:00 UTC on `day`."""
    return (day - _EPOCH).days * DAY_SECONDS


def utc_day(time: float) -> datetime.date:
    """The UTC day of a time in seconds since the epoch."""
    return _EPOCH + datetime.timedelta(days=math.floor(time / DAY_SECONDS))


def partition_day(path: str) -> Optional[datetime.date]:
    """The day of the last `dt=YYYY-MM-DD` folder in a file path; None when there is none (or it is no date)."""
    found = _PARTITION.findall(path)
    if not found:
        return None
    try:
        return parse_day(found[-1])
    except ValueError:  # dt=2024-13-40: not a partition day, so the file is read and its records dated
        return None


@dataclasses.dataclass(frozen=True)
class LogWindow:
    """The pipeline.as_of / window_days / half_life_days settings, and what follows from them."""

    as_of: str = ""
    window_days: int = 0
    half_life_days: float = 0.0

    @classmethod
    def from_config(cls, pipeline_config) -> "LogWindow":
        p = pipeline_config
        return cls(p.as_of, p.window_days, p.half_life_days)

    @property
    def active(self) -> bool:
        """Whether a window is set at all (pipeline.as_of); without one every log is read, each record weighs 1."""
        return bool(self.as_of)

    @property
    def last_day(self) -> datetime.date:
        return parse_day(self.as_of)

    @property
    def first_day(self) -> Optional[datetime.date]:
        """The window's first day; None when it has none (window_days 0)."""
        if not self.window_days:
            return None
        return self.last_day - datetime.timedelta(days=self.window_days - 1)

    @property
    def end_time(self) -> float:
        """The end of as_of: as_of + 1 day, 00:00 UTC, in seconds since the epoch (excluded)."""
        return day_start(self.last_day) + DAY_SECONDS

    @property
    def start_time(self) -> float:
        """00:00 UTC of the first day (included); -inf when the window has no first day."""
        first = self.first_day
        return -math.inf if first is None else day_start(first)

    def contains_day(self, day: datetime.date) -> bool:
        first = self.first_day
        return (first is None or first <= day) and day <= self.last_day

    def contains_time(self, time: float) -> bool:
        """Whether a record at `time` (seconds since the epoch) is in the window, by its UTC day."""
        return self.start_time <= time < self.end_time

    def reads_file(self, path: str) -> bool:
        """False only for a file in a dt=YYYY-MM-DD folder outside the window (always True without a window)."""
        if not self.active:
            return True
        day = partition_day(path)
        return day is None or self.contains_day(day)

    def weight(self, time: float):
        """A record's weight: 0.5 ** (age / half_life_days), age in whole days before as_of (the UTC day of
        `time`); the int 1 without decay."""
        if not self.half_life_days:
            return 1
        age = (self.last_day - utc_day(time)).days
        return 0.5 ** (age / self.half_life_days)

    def describe(self) -> str:
        """"pipeline.as_of=2024-03-10, pipeline.window_days=7 (2024-03-04 .. 2024-03-10)", for messages."""
        first = self.first_day
        days = f"{first.isoformat()} .. {self.as_of}" if first else f"every day up to {self.as_of}"
        return f"pipeline.as_of={self.as_of}, pipeline.window_days={self.window_days} ({days})"


def split_files(window: LogWindow, paths: Iterable[str]) -> Tuple[List[str], List[str]]:
    """(files read, files skipped: in a dt= partition outside the window), each in the given order."""
    read: List[str] = []
    skipped: List[str] = []
    for path in paths:
        (read if window.reads_file(path) else skipped).append(path)
    return read, skipped


# ---------------------------------------------------------------------------
# Beam transforms.


class _TagFilesFn(beam.DoFn):
    """FileMetadata -> itself (main) when the window reads it; always (path, read) on MATCHED."""

    def __init__(self, window: LogWindow):
        self._window = window
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "log_files_outside_window")

    def process(self, metadata):
        read = self._window.reads_file(metadata.path)
        yield beam.pvalue.TaggedOutput(MATCHED, (metadata.path, read))
        if read:
            yield metadata
        else:
            self._skipped.inc()


class SelectWindowFiles(beam.PTransform):
    """Matched FileMetadata -> {READ: those to read, MATCHED: (path, read?) for every file matched}.

    Files in a dt= partition outside the window are left out here, so they are never opened.
    """

    def __init__(self, window: LogWindow):
        super().__init__()
        self._window = window

    def expand(self, files):
        tagged = files | "TagFiles" >> beam.ParDo(_TagFilesFn(self._window)).with_outputs(MATCHED, main=READ)
        matched = tagged[MATCHED]
        (matched
         | "Skipped" >> beam.Filter(lambda path_read: not path_read[1])
         | "LogSkipped" >> LogProgress("WindowFiles", "log files skipped (dt= partitions outside the window)"))
        read = tagged[READ] | "LogRead" >> LogProgress("WindowFiles", "log files to read")
        return {READ: read, MATCHED: matched}


class _FilterRecordsFn(beam.DoFn):
    """LogRecords -> those in the window; one int per record outside it on OUTSIDE (1: dated after as_of)."""

    def __init__(self, window: LogWindow):
        self._window = window
        self._outside = Metrics.counter(METRICS_NAMESPACE, "log_records_outside_window")

    def setup(self):
        self._start, self._end = self._window.start_time, self._window.end_time

    def process(self, record: LogRecord):
        if self._start <= record.time < self._end:
            yield record
        else:
            self._outside.inc()
            yield beam.pvalue.TaggedOutput(OUTSIDE, int(record.time >= self._end))


class FilterWindowRecords(beam.PTransform):
    """LogRecords -> {RECORDS: those whose UTC day is in the window, OUTSIDE: 0 or 1 per record outside it
    (1 when dated after as_of)}."""

    def __init__(self, window: LogWindow):
        super().__init__()
        self._window = window

    def expand(self, records):
        out = records | "ByDay" >> beam.ParDo(_FilterRecordsFn(self._window)).with_output_types(
            records.element_type).with_outputs(OUTSIDE, main=RECORDS)
        return {RECORDS: out[RECORDS], OUTSIDE: out[OUTSIDE]}


def check_not_empty(count: int, window: LogWindow) -> int:
    """Raises (EMPTY_WINDOW) when the window holds no record; else the count."""
    if not count:
        raise ValueError(f"{EMPTY_WINDOW}: {window.describe()} holds no log record (no file in it, or no record "
                         "dated in it); set pipeline.as_of to a day the logs cover, or widen pipeline.window_days")
    return count


class RequireRecords(beam.PTransform):
    """LogRecords -> the same records, once their count is known not to be 0 (else the run fails: EMPTY_WINDOW)."""

    def __init__(self, window: LogWindow):
        super().__init__()
        self._window = window

    def expand(self, records):
        checked = (records
                   | "Count" >> beam.combiners.Count.Globally()
                   | "NotEmpty" >> beam.Map(check_not_empty, self._window))
        return records | "AfterCheck" >> beam.Map(
            lambda record, _: record, beam.pvalue.AsSingleton(checked)).with_output_types(records.element_type)


class DayRangeFn(beam.CombineFn):
    """Record times -> (first UTC day, last UTC day) as YYYY-MM-DD, (None, None) when there is none."""

    def create_accumulator(self):
        return (math.inf, -math.inf)

    def add_input(self, acc, time: float):
        return (min(acc[0], time), max(acc[1], time))

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return (min(a[0] for a in accumulators), max(a[1] for a in accumulators))

    def extract_output(self, acc) -> Tuple[Optional[str], Optional[str]]:
        if acc[0] > acc[1]:
            return None, None
        return utc_day(acc[0]).isoformat(), utc_day(acc[1]).isoformat()


def window_report(_, window: LogWindow, files: Sequence[int], records: Sequence[int], in_window: int,
                  days: Tuple[Optional[str], Optional[str]]) -> dict:
    """The report's `window` object from the summed figures (see report.PipelineReport)."""
    first = window.first_day
    return {
        "as_of": window.as_of,
        "window_days": window.window_days,
        "half_life_days": window.half_life_days,
        "first_day": first.isoformat() if first else None,  # the window's days (first_day None: unbounded)
        "last_day": window.as_of,
        "files_matched": files[0],
        "files_read": files[1],
        "files_skipped": files[0] - files[1],
        "records_in_window": in_window,
        "records_outside": records[0],
        "records_after_as_of": records[1],
        "first_record_day": days[0],
        "last_record_day": days[1],
    }


class WindowFigures(beam.PTransform):
    """{"files": (path, read?) per matched file, "outside": FilterWindowRecords' OUTSIDE, "records": the records
    kept} -> the report's `window` object (one dict, `window_report`)."""

    def __init__(self, window: LogWindow):
        super().__init__()
        self._window = window

    def expand(self, pcolls):
        files = (pcolls["files"]
                 | "FileCounts" >> beam.Map(lambda path_read: (1, int(path_read[1])))
                 | "SumFiles" >> beam.CombineGlobally(beam.combiners.TupleCombineFn(sum, sum)))
        outside = (pcolls["outside"]
                   | "OutsideCounts" >> beam.Map(lambda after: (1, after))
                   | "SumOutside" >> beam.CombineGlobally(beam.combiners.TupleCombineFn(sum, sum)))
        records = pcolls["records"]
        in_window = records | "CountInWindow" >> beam.combiners.Count.Globally()
        days = (records
                | "Times" >> beam.Map(lambda record: record.time)
                | "DayRange" >> beam.CombineGlobally(DayRangeFn()))
        return (records.pipeline
                | "Start" >> beam.Create([None])
                | "Assemble" >> beam.Map(window_report, self._window, beam.pvalue.AsSingleton(files),
                                         beam.pvalue.AsSingleton(outside), beam.pvalue.AsSingleton(in_window),
                                         beam.pvalue.AsSingleton(days)))
