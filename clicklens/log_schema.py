"""The query-log record: one search event per line, as JSON.

This module is the contract between whatever writes logs (a search front end,
or `clicklens generate-demo-data`) and the Beam pipeline that reads them.

A record looks like::

    {"session_id": "s0000042", "time": 1767225600.0,
     "query": "红色 圆形", "category": "color", "locale": "zh",
     "impressions": [{"image_id": "img_00017", "position": 1, "clicked": true, "dwell_ms": 5400},
                     {"image_id": "img_01203", "position": 2, "clicked": false}]}

A query-by-image event has `query_image_id` instead of `query`.  `category`,
`locale` and `dwell_ms` are optional.  Positions start at 1, are at most
MAX_IMPRESSIONS and are distinct within a record: a missing or non-positive
position is a `bad_impression`, one beyond MAX_IMPRESSIONS a
`position_out_of_range`, one shown twice in a list a `duplicate_position`
(the position-bias fit, beam_pipelines/position_bias.py, counts on them).

`parse_log_line` turns raw bytes into a `LogRecord` or raises `BadRecord`
with a short machine-readable reason (used as the dead-letter reason and the
name of the Beam counter).  Text queries are stored normalised
(`clicklens.queries.normalize_query`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Dict, List, Optional, Tuple

from clicklens.errors import BadRecord, parse_json_line
from clicklens.queries import MAX_QUERY_INPUT_BYTES, normalize_query

# Longest query text kept, in characters after normalisation.  Longer queries
# are bad records (reason `query_too_long`), not silently truncated.
MAX_QUERY_CHARS = 512
MAX_IMPRESSIONS = 1000
MAX_LINE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Impression:
    """One image shown in a result list."""

    image_id: str
    position: int
    clicked: bool
    dwell_ms: Optional[float] = None


_IMPRESSION_FIELDS = tuple(field.name for field in dataclasses.fields(Impression))


@dataclasses.dataclass(frozen=True)
class LogRecord:
    """One search event: a text query or a query image, and what was shown."""

    session_id: str
    time: float
    impressions: Tuple[Impression, ...]
    query: Optional[str] = None
    query_image_id: Optional[str] = None
    category: str = ""
    locale: str = ""

    @property
    def is_image_query(self) -> bool:
        return self.query_image_id is not None

    def clicked_image_ids(self) -> List[str]:
        return [imp.image_id for imp in self.impressions if imp.clicked]

    def to_json(self) -> str:
        """The record as one JSON line, in the documented field order."""
        data: Dict[str, Any] = {"session_id": self.session_id, "time": self.time}
        if self.query is not None:
            data["query"] = self.query
        if self.query_image_id is not None:
            data["query_image_id"] = self.query_image_id
        if self.category:
            data["category"] = self.category
        if self.locale:
            data["locale"] = self.locale
        # Plain getattr, not dataclasses.asdict: asdict deep-copies and made this the
        # bottleneck of writing logs (same output).
        data["impressions"] = [
            {k: v for k in _IMPRESSION_FIELDS if (v := getattr(imp, k)) is not None} for imp in self.impressions
        ]
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _require(data: Dict[str, Any], name: str, types, reason_type: str):
    if name not in data or data[name] is None:
        raise BadRecord(f"missing_{name}")
    value = data[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRecord(reason_type, f"{name}={value!r}")
    if not isinstance(value, types):
        raise BadRecord(reason_type, f"{name}={value!r}"[:200])
    return value


def _parse_impression(raw: Any, index: int) -> Impression:
    if not isinstance(raw, dict):
        raise BadRecord("bad_impression", f"impressions[{index}] is not an object")
    image_id = raw.get("image_id")
    if not isinstance(image_id, str) or not image_id.strip():
        raise BadRecord("bad_impression", f"impressions[{index}].image_id={image_id!r}"[:200])
    position = raw.get("position")
    if isinstance(position, bool) or not isinstance(position, int) or position < 1:
        raise BadRecord("bad_impression", f"impressions[{index}].position={position!r}"[:200])
    clicked = raw.get("clicked")
    if not isinstance(clicked, bool):
        raise BadRecord("bad_impression", f"impressions[{index}].clicked={clicked!r}"[:200])
    dwell = raw.get("dwell_ms")
    if dwell is not None:
        if isinstance(dwell, bool) or not isinstance(dwell, (int, float)) or dwell < 0 or not math.isfinite(dwell):
            raise BadRecord("bad_impression", f"impressions[{index}].dwell_ms={dwell!r}"[:200])
        dwell = float(dwell)
    # Interned: the same few ids recur in every record, and the counting downstream (click statistics,
    # the co-click graph) then compares dict keys by identity instead of by content.
    return Impression(image_id=sys.intern(image_id.strip()), position=position, clicked=clicked, dwell_ms=dwell)


def parse_log_line(line: bytes | str) -> LogRecord:
    """Parses and validates one log line.  Raises BadRecord with the reason."""
    if isinstance(line, bytes):
        if len(line) > MAX_LINE_BYTES:
            raise BadRecord("line_too_long", f"{len(line)} bytes")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRecord("not_utf8", str(err)) from None
    if not line.strip():
        raise BadRecord("empty_line")
    data = parse_json_line(line)
    if not isinstance(data, dict):
        raise BadRecord("not_an_object", type(data).__name__)

    session_id = _require(data, "session_id", str, "bad_session_id")
    if not session_id.strip():
        raise BadRecord("bad_session_id", "empty session_id")
    time = _require(data, "time", (int, float), "bad_time")
    if not math.isfinite(time):
        raise BadRecord("bad_time", repr(time))

    query = data.get("query")
    query_image_id = data.get("query_image_id")
    if query is None and query_image_id is None:
        raise BadRecord("missing_query")
    if query is not None and query_image_id is not None:
        raise BadRecord("both_query_and_image", "a record has either query or query_image_id")
    if query is not None:
        if not isinstance(query, str):
            raise BadRecord("bad_query", f"query={query!r}"[:200])
        # Before normalising, whose time can grow with the square of the length.  Characters, never more than
        # the UTF-8 bytes: a query the model's tokenizer reads whole is never refused here.
        if len(query) > MAX_QUERY_INPUT_BYTES:
            raise BadRecord("query_too_long", f"{len(query)} characters before normalisation")
        query = normalize_query(query)
        if not query:
            raise BadRecord("empty_query")
        if len(query) > MAX_QUERY_CHARS:
            raise BadRecord("query_too_long", f"{len(query)} characters")
    if query_image_id is not None:
        if not isinstance(query_image_id, str) or not query_image_id.strip():
            raise BadRecord("bad_query_image_id", f"query_image_id={query_image_id!r}"[:200])
        query_image_id = query_image_id.strip()

    category = data.get("category") or ""
    locale = data.get("locale") or ""
    if not isinstance(category, str):
        raise BadRecord("bad_category", f"category={category!r}"[:200])
    if not isinstance(locale, str):
        raise BadRecord("bad_locale", f"locale={locale!r}"[:200])

    raw_impressions = _require(data, "impressions", list, "bad_impressions")
    if not raw_impressions:
        raise BadRecord("no_impressions")
    if len(raw_impressions) > MAX_IMPRESSIONS:
        raise BadRecord("too_many_impressions", str(len(raw_impressions)))
    impressions = tuple(_parse_impression(raw, i) for i, raw in enumerate(raw_impressions))
    seen = set()
    for i, imp in enumerate(impressions):
        if imp.position > MAX_IMPRESSIONS:
            raise BadRecord("position_out_of_range", f"impressions[{i}].position={imp.position} > {MAX_IMPRESSIONS}")
        if imp.position in seen:
            raise BadRecord("duplicate_position", f"impressions[{i}].position={imp.position} is shown twice")
        seen.add(imp.position)

    return LogRecord(
        session_id=session_id,
        time=float(time),
        impressions=impressions,
        query=query,
        query_image_id=query_image_id,
        category=category.strip().lower(),
        locale=locale.strip(),
    )
