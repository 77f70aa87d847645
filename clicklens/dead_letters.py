"""Dead letters: the record every stage writes for an input it cannot use.

A dead letter is `{"source": ..., "reason": ..., "raw": ...}` (plus `detail`,
and `image_id` for images), one JSON object per line, under
`W/examples/dead_letter-*.jsonl`: the pipeline's shards
(beam_pipelines/outputs.py) and `clicklens reindex`'s
`dead_letter-reindex-<version>.jsonl` (Workdir.reindex_dead_letters).
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, Iterable, Union

from clicklens.catalog import CatalogEntry


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


def image_dead_letter(entry: CatalogEntry, reason: str, detail: str = "") -> Dict[str, Any]:
    """A dead-letter record for a catalog image that cannot be used (`raw` is its catalog entry)."""
    record = dead_letter("image", reason, entry.to_json(), detail)
    record["image_id"] = entry.image_id
    return record


def dead_letter_json(record: Dict[str, Any]) -> str:
    """One dead-letter record as a JSON line (non-ASCII kept readable)."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


def write_dead_letters(path: str, records: Iterable[Dict[str, Any]]) -> int:
    """Writes the records to `path` (local or any TF filesystem), one JSON line each; returns how many.

    For stages that are not Beam pipelines; the pipeline writes its shards with Beam.
    """
    import tensorflow as tf  # here, not at the top: the pipeline builds dead letters without TensorFlow

    lines = [dead_letter_json(r) + "\n" for r in records]
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(lines))
    return len(lines)
