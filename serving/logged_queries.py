"""The distinct text queries of a work directory's query logs (W/raw/logs), most frequent first."""

from __future__ import annotations

import collections
import gzip
import io
import logging
import zlib
from typing import List, Tuple

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from clicklens.errors import BadRecord, ClicklensError
from clicklens.log_schema import parse_log_line
from clicklens.workdir import Workdir

logger = logging.getLogger(__name__)

MAX_QUERIES = 5000  # most frequent distinct queries kept from the logs


def logged_queries(workdir: Workdir, limit: int = MAX_QUERIES) -> List[Tuple[str, int]]:
    """The `limit` most frequent distinct normalized text queries of W/raw/logs, with their counts.

    Lines that are not valid log records are skipped (and counted in the log);
    ClicklensError when there are no log files or no text queries in them.
    """
    files = sorted(tf.io.gfile.glob(workdir.logs_glob))
    if not files:
        raise ClicklensError(f"no query logs match {workdir.logs_glob}")
    counts: collections.Counter = collections.Counter()
    bad = 0
    for path in files:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
        if path.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as err:  # not gzip, or cut short
                raise ClicklensError(f"{path}: damaged gzip file ({err}): remove or replace it") from None
        for line in io.BytesIO(data):
            if not line.strip():
                continue
            try:
                record = parse_log_line(line.rstrip(b"\r\n"))
            except BadRecord:
                bad += 1
                continue
            if record.query:
                counts[record.query] += 1
    if not counts:
        raise ClicklensError(f"no text queries in {workdir.logs_glob}")
    logger.info("%d distinct text queries in %d log files (%d bad lines skipped)", len(counts), len(files), bad)
    return sorted(counts.items(), key=lambda qc: (-qc[1], qc[0]))[:limit]
