"""Dead letters: the record every stage writes for an input it cannot use.

A dead letter is `{"source": ..., "reason": ..., "raw": ...}` (plus `detail`,
and `image_id` for images), written one JSON object per line to
`W/examples/dead_letter-*.jsonl`.  Each stage sends its dead letters to the
output tagged DEAD_LETTER, and counts them in METRICS_NAMESPACE.
"""


import base64
import json
from typing import Any, Dict, Union

# The output tag of every stage's dead letters.
DEAD_LETTER = "dead_letter"

# The namespace of the pipeline's Beam counters.
METRICS_NAMESPACE = "clicklens"


def dead_letter(source: str, reason: str, raw: Union[bytes, str], detail: str = "") -> Dict[str, Any]:
    """A dead-letter record: where it came from, why it was rejected, and the raw input.

    Raw bytes that are not UTF-8 are stored base64-encoded, with
    `"raw_encoding": "base64"`, so the record is always one valid JSON line.
    """
    record: Dict[str, Any] = {"source": source, "reason": reason}
    if isinstance(raw, bytes):
        try:
            record["raw"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            record["raw"] = base64.b64encode(raw).decode("ascii")
            record["raw_encoding"] = "base64"
    else:
        record["raw"] = raw
    if detail:
        record["detail"] = detail
    return record


def dead_letter_json(record: Dict[str, Any]) -> str:
    """One dead-letter record as a JSON line (non-ASCII kept readable)."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True)
