"""The demo world's ground truth (`W/raw/ground_truth.jsonl`), for evaluation only.

One JSON object per distinct normalised text query:

    {"query": "红色 圆形", "relevant_image_ids": ["img_00017", "img_01203", ...], ...}

(the generator adds what it knows about the query, e.g. its category and attributes).

`clicklens generate-demo-data` writes it; `clicklens evaluate` scores rankings
against it and the demo and `clicklens query --explain` mark relevant results.
Real logs have no such file, and everything that reads it works without it.
"""

from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional, Set


def ground_truth_line(query: str, relevant_image_ids: List[str], **extra) -> str:
    """One line of the file; `extra` keys follow the two the contract names."""
    return json.dumps({"query": query, "relevant_image_ids": list(relevant_image_ids), **extra},
                      ensure_ascii=False, separators=(",", ":"))


def _rows(path: str):
    """The file's JSON objects, in order; none when it does not exist."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path, "r") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_ground_truth(path: str, queries: Optional[Iterable[str]] = None) -> Dict[str, Set[str]]:
    """{normalised query: relevant image ids} (only `queries` when given; queries with none left out).

    {} when the file does not exist.
    """
    wanted = set(queries) if queries is not None else None
    return {row["query"]: set(row["relevant_image_ids"]) for row in _rows(path)
            if row["relevant_image_ids"] and (wanted is None or row["query"] in wanted)}


def read_ground_truth_extra(path: str, name: str) -> Dict[str, object]:
    """{normalised query: what the generator added under `name` (e.g. "category")}, for the queries that have it."""
    return {row["query"]: row[name] for row in _rows(path) if name in row}
