"""Stage 1: read raw log lines and parse them, with a dead-letter output.

Logs are read as bytes lines (gzip by file extension) so that a line that is
not UTF-8 reaches `parse_log_line`, which calls it a bad record, instead of
crashing the text reader.  Every bad line becomes one dead-letter record
`{"source": "log", "reason": ..., "raw": ...}` and increments the Beam counter
named after its reason.  `ReadLogs` is the stage: read, then parse.

A .gz shard that cannot be read to its end (truncated, or not really gzip)
stops the run naming the file, unless `pipeline.skip_corrupt_files`: then the
file becomes one dead letter `{"source": "log_file", "reason": "corrupt_file",
"raw": path, "file": path, "lines_read": n, "detail": ...}` and the run goes on
(see ReadGzipLinesFn for what happens to the n lines read before the fault).

With pipeline.as_of set, `ReadLogs` reads a window of the logs (window.py):
files in dt=YYYY-MM-DD partitions outside it are dropped from the matched files
before they are opened, and the records are kept by the UTC day of their time;
those outside the window are counted, not dead-lettered.  With as_of empty it
reads every log, as before.
"""


import gzip
import zlib
from typing import Any, Dict, Optional, Tuple

import apache_beam as beam
from apache_beam import coders
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from beam_pipelines.dead_letters import DEAD_LETTER, METRICS_NAMESPACE, dead_letter
from beam_pipelines import record_coder  # noqa: F401  (registers the LogRecord coder)
from beam_pipelines.progress import LogProgress
from beam_pipelines.window import MATCHED, OUTSIDE, READ, FilterWindowRecords, LogWindow, RequireRecords, \
    SelectWindowFiles
from clicklens.errors import BadRecord
from clicklens.log_schema import LogRecord, parse_log_line

# The main output of ParseLogs and ReadLogs; their dead letters are tagged DEAD_LETTER.
RECORDS = "records"
# The raw lines ReadLogs read (for the report's count).
LINES = "lines"
# The dead-letter source and reason of a corrupt log file skipped under pipeline.skip_corrupt_files.
LOG_FILE_SOURCE = "log_file"
CORRUPT_FILE = "corrupt_file"
# ReadLogs' output of the corrupt files' dead letters alone.
CORRUPT_FILES = "corrupt_files"
# ReadLogs' outputs with a window (pipeline.as_of): every file matched, and the good records outside the window.
WINDOW_FILES = "window_files"
OUTSIDE_WINDOW = "outside_window"


def parse_or_dead_letter(line: bytes) -> Tuple[Optional[LogRecord], Optional[Dict[str, Any]]]:
    """Parses one raw line: (record, None) when good, (None, dead letter) when bad.

    Any exception is caught: a line can never stop the pipeline.  An error that
    is not a BadRecord is a bug in the schema, reported as `internal_error`.
    """
    try:
        return parse_log_line(line), None
    except BadRecord as err:
        return None, dead_letter("log", err.reason, line, err.detail)
    except Exception as err:  # noqa: BLE001  (a bad line must never crash the run)
        return None, dead_letter("log", "internal_error", line, f"{type(err).__name__}: {err}"[:200])


class ParseLogLineFn(beam.DoFn):
    """Parses log lines; bad ones go to the DEAD_LETTER output."""

    def __init__(self):
        self._read = Metrics.counter(METRICS_NAMESPACE, "log_lines_read")
        self._good = Metrics.counter(METRICS_NAMESPACE, "log_records_ok")

    def process(self, line: bytes):
        self._read.inc()
        record, bad = parse_or_dead_letter(line)
        if record is not None:
            self._good.inc()
            yield record
        else:
            Metrics.counter(METRICS_NAMESPACE, f"bad_log_{bad['reason']}").inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, bad)


# The start of the one-line message of an input file that cannot be read to its end; run_pipeline
# finds it in the runner's error and reports just that line.
UNREADABLE_FILE = "unreadable input file"


class ReadGzipLinesFn(beam.DoFn):
    """A .gz file -> its lines as bytes (newline removed), read to the gzip end-of-stream marker.

    Python's gzip module, not Beam's decompressor: that one stops quietly where a
    truncated file ends, so half a shard would pass for a whole one.  A file that
    is not gzip, or ends early, fails the run naming the file (UNREADABLE_FILE).

    With `skip_corrupt_files`, such a file instead yields one dead letter (tagged
    DEAD_LETTER, source LOG_FILE_SOURCE, reason CORRUPT_FILE) with the file name,
    the error and `lines_read`, and the run goes on.  The lines read before the
    fault are kept: they were already passed on (dropping them would mean holding
    a whole shard in memory, or reading every shard twice), each is a whole line
    (a line is handed out only once its newline is decompressed; a broken stream
    raises instead), and every one of them still goes through the parser, which
    dead-letters any that is damaged.
    The dead letter says how many there were.
    """

    def __init__(self, skip_corrupt_files: bool = False):
        self._skip = skip_corrupt_files
        self._corrupt = Metrics.counter(METRICS_NAMESPACE, "corrupt_log_files")

    def process(self, readable_file):
        path, count = readable_file.metadata.path, 0
        try:
            with readable_file.open(compression_type=CompressionTypes.UNCOMPRESSED) as raw, \
                    gzip.GzipFile(fileobj=raw) as lines:
                for line in lines:
                    count += 1
                    yield line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line
        except (OSError, EOFError, zlib.error) as err:
            error = f"{type(err).__name__}: {err}"
            if not self._skip:
                raise ValueError(f"{UNREADABLE_FILE} {path}: {error} (after {count} lines; "
                                 "a truncated or not really gzip-compressed shard)") from None
            self._corrupt.inc()
            bad = dead_letter(LOG_FILE_SOURCE, CORRUPT_FILE, path,
                              f"{error}; the {count} lines read before the fault are kept"[:300])
            bad.update(file=path, lines_read=count)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, bad)


class ReadMatchedLines(beam.PTransform):
    """Matched FileMetadata -> {LINES: bytes lines, DEAD_LETTER: one dead letter per corrupt .gz file skipped}.

    .gz files go through ReadGzipLinesFn (read whole, checked to their end; a
    corrupt one fails the run unless `skip_corrupt_files`); the others through
    Beam's ReadAllFromText, which splits large files.
    """

    def __init__(self, skip_corrupt_files: bool = False):
        super().__init__()
        self._skip = skip_corrupt_files

    def expand(self, files):
        gzipped, other = files | "ByCompression" >> beam.Partition(
            lambda match, _: 0 if match.path.endswith(".gz") else 1, 2)
        gzip_read = (gzipped
                     | "ReadMatches" >> fileio.ReadMatches()
                     | "ReadGzipLines" >> beam.ParDo(ReadGzipLinesFn(self._skip)).with_outputs(
                         DEAD_LETTER, main=LINES))
        other_lines = (other
                       | "Paths" >> beam.Map(lambda match: match.path)
                       | "ReadText" >> beam.io.ReadAllFromText(coder=coders.BytesCoder(),
                                                               compression_type=CompressionTypes.AUTO))
        lines = (gzip_read[LINES], other_lines) | "Lines" >> beam.Flatten()
        return {LINES: lines, DEAD_LETTER: gzip_read[DEAD_LETTER]}


class ReadLinesAndCorruptFiles(beam.PTransform):
    """Reads every line of the files matching a glob as bytes (gzip by the .gz extension).

    -> {LINES: bytes lines, DEAD_LETTER: one dead letter per corrupt .gz file skipped} (ReadMatchedLines).
    """

    def __init__(self, file_pattern: str, skip_corrupt_files: bool = False):
        super().__init__()
        self._pattern = file_pattern
        self._skip = skip_corrupt_files

    def expand(self, pbegin):
        files = pbegin | "Match" >> fileio.MatchFiles(self._pattern)
        return files | "ReadFiles" >> ReadMatchedLines(self._skip)


class ReadLines(beam.PTransform):
    """Reads every line of the files matching a glob as bytes; a corrupt .gz file fails the run.

    ReadLinesAndCorruptFiles without skipping, its lines only (the catalog is read this way).
    """

    def __init__(self, file_pattern: str):
        super().__init__()
        self._pattern = file_pattern

    def expand(self, pbegin):
        return (pbegin | "Read" >> ReadLinesAndCorruptFiles(self._pattern))[LINES]


class ParseLogs(beam.PTransform):
    """bytes lines -> {RECORDS: LogRecord, DEAD_LETTER: dead-letter dict}."""

    def expand(self, lines):
        # Typed, so that records crossing a stage boundary use record_coder.LogRecordCoder, not pickle.
        return lines | "Parse" >> beam.ParDo(ParseLogLineFn()).with_output_types(LogRecord).with_outputs(
            DEAD_LETTER, main=RECORDS)


class ReadLogs(beam.PTransform):
    """PBegin -> {LINES: raw bytes lines, RECORDS: LogRecord, DEAD_LETTER: dead letters, CORRUPT_FILES: the
    dead letters of the corrupt files skipped} of the logs matching a glob.

    DEAD_LETTER holds the bad lines' dead letters and the corrupt files' (CORRUPT_FILES is those alone,
    for the report); a corrupt .gz shard fails the run unless `skip_corrupt_files`.

    With an active `window` (window.LogWindow, pipeline.as_of) only the files the window reads are opened,
    RECORDS are the records in the window (and the run fails when there is none: window.RequireRecords),
    and there are two more outputs: WINDOW_FILES, (path, read?) per file matched, and OUTSIDE_WINDOW, one
    int per good record outside the window (1 when dated after as_of).
    """

    def __init__(self, file_pattern: str, skip_corrupt_files: bool = False, window: Optional[LogWindow] = None):
        super().__init__()
        self._pattern = file_pattern
        self._skip = skip_corrupt_files
        self._window = window if window is not None and window.active else None

    def expand(self, pbegin):
        window_outputs = {}
        if self._window is None:
            read = pbegin | "ReadLines" >> ReadLinesAndCorruptFiles(self._pattern, self._skip)
        else:
            files = (pbegin
                     | "Match" >> fileio.MatchFiles(self._pattern)
                     | "WindowFiles" >> SelectWindowFiles(self._window))
            window_outputs[WINDOW_FILES] = files[MATCHED]
            read = files[READ] | "ReadLines" >> ReadMatchedLines(self._skip)
        lines = read[LINES]
        parsed = lines | "ParseLogs" >> ParseLogs()
        records = parsed[RECORDS]
        if self._window is not None:
            kept = records | "WindowRecords" >> FilterWindowRecords(self._window)
            window_outputs[OUTSIDE_WINDOW] = kept[OUTSIDE]
            records = kept[RECORDS] | "RequireRecords" >> RequireRecords(self._window)
        what = "log records" if self._window is None else "log records in the window"
        records = records | "LogRecords" >> LogProgress("ParseLogs", what)
        dead = (parsed[DEAD_LETTER], read[DEAD_LETTER]) | "LogDeadLetters" >> beam.Flatten()
        return {LINES: lines, RECORDS: records, DEAD_LETTER: dead, CORRUPT_FILES: read[DEAD_LETTER],
                **window_outputs}
