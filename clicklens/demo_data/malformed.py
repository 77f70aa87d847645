"""Malformed log lines of the kinds real log collectors produce, each with the reason it must be rejected for.

Every malformed line starts from a genuine record and breaks one thing, so a
reader cannot reject it by accident (e.g. for being short).  The kind is the
`BadRecord.reason` that `clicklens.log_schema.parse_log_line` gives it,
so dead-letter counts by reason can be compared with the manifest.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from clicklens.errors import BadRecord
from clicklens.log_schema import parse_log_line

Record = Dict[str, Any]


def _dump(record: Any) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _without(record: Record, *keys: str) -> bytes:
    return _dump({k: v for k, v in record.items() if k not in keys})


def _with(record: Record, **changes: Any) -> bytes:
    return _dump({**record, **changes})


def _truncated_json(record: Record, rng: np.random.Generator) -> bytes:
    line = _dump(record)
    if rng.random() < 0.5:
        return line[: len(line) // 2].decode("utf-8", "ignore").encode("utf-8")  # cut off mid-write
    return line[:-1] + b",}"  # trailing comma


def _not_utf8(record: Record, rng: np.random.Generator) -> bytes:
    """The query in a legacy encoding (GBK for Chinese, Latin-1 otherwise), as a misconfigured client sends it."""
    query = record["query"]
    encoded_query = json.dumps(query, ensure_ascii=False).encode("utf-8")
    try:
        legacy = json.dumps(query + "\u00e9", ensure_ascii=False).encode("gbk" if rng.random() < 0.5 else "latin-1")
    except UnicodeEncodeError:
        legacy = json.dumps(query, ensure_ascii=False).encode("gbk", "replace") + b"\xff"
    line = _dump(record).replace(encoded_query, legacy, 1)
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return line
    return line.replace(b'"query":"', b'"query":"\xff\xfe', 1)


def _bad_impression(record: Record, rng: np.random.Generator) -> bytes:
    impressions = [dict(imp) for imp in record["impressions"]]
    i = int(rng.integers(len(impressions)))
    breakage = int(rng.integers(5))
    if breakage == 0:
        impressions[i]["position"] = str(impressions[i]["position"])
    elif breakage == 1:
        impressions[i]["clicked"] = "yes"
    elif breakage == 2:
        impressions[i]["image_id"] = ""
    elif breakage == 3:
        impressions[i]["position"] = 0
    else:
        impressions[i]["dwell_ms"] = -1
    return _with(record, impressions=impressions)


# reason -> maker(record, rng) -> line bytes.  Makers get a text-query record as a dict.
MAKERS: Dict[str, Callable[[Record, np.random.Generator], bytes]] = {
    "bad_json": _truncated_json,
    "not_an_object": lambda r, rng: _dump(list(r.values())),
    "not_utf8": _not_utf8,
    "missing_session_id": lambda r, rng: _without(r, "session_id"),
    "bad_session_id": lambda r, rng: _with(r, session_id=int(rng.integers(1, 10**6)) if rng.random() < 0.5 else ""),
    "missing_time": lambda r, rng: _without(r, "time"),
    "bad_time": lambda r, rng: _with(r, time="2026-01-01T08:00:00Z"),
    "missing_query": lambda r, rng: _without(r, "query"),
    "empty_query": lambda r, rng: _with(r, query=" " * int(rng.integers(0, 3)) + ("\u3000" if rng.random() < 0.5 else "")),
    "bad_query": lambda r, rng: _with(r, query=r["query"].split() if rng.random() < 0.5 else 404),
    "both_query_and_image": lambda r, rng: _with(r, query_image_id=r["impressions"][0]["image_id"]),
    "bad_category": lambda r, rng: _with(r, category=7),
    "bad_locale": lambda r, rng: _with(r, locale=["zh", "en"]),
    "missing_impressions": lambda r, rng: _without(r, "impressions"),
    "bad_impressions": lambda r, rng: _with(r, impressions=",".join(i["image_id"] for i in r["impressions"])),
    "no_impressions": lambda r, rng: _with(r, impressions=[]),
    "bad_impression": _bad_impression,
}
KINDS: Tuple[str, ...] = tuple(MAKERS)


def make_malformed_lines(count: int, base_records: List[Record], rng: np.random.Generator) -> List[Tuple[str, bytes]]:
    """`count` malformed lines as (reason, bytes), the kinds in turn.

    base_records: genuine records (dicts) to break; query-by-image ones become text queries.  Each line is
    checked against `parse_log_line`, so the manifest can never promise a
    rejection the schema does not make.
    """
    lines = []
    for i in range(count):
        reason = KINDS[i % len(KINDS)]
        record = dict(base_records[int(rng.integers(len(base_records)))])
        if "query" not in record:  # a query-by-image record: make it a text one first
            record.pop("query_image_id", None)
            record["query"] = "red circle"
        if "session_id" in record and reason != "bad_session_id":
            record["session_id"] = f"bad{i:06d}"
        line = MAKERS[reason](record, rng)
        if b"\n" in line or b"\r" in line:
            raise AssertionError(f"malformed line of kind {reason} contains a line break")
        try:
            parse_log_line(line)
        except BadRecord as err:
            if err.reason != reason:
                raise AssertionError(f"malformed line of kind {reason} was rejected as {err.reason}: {line[:200]!r}")
        else:
            raise AssertionError(f"log_schema accepts a malformed line of kind {reason}: {line[:200]!r}")
        lines.append((reason, line))
    return lines
