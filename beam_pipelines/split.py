"""Stage 8: train / eval split by a stable hash of the normalised query.

All examples of a query land in the same split, so no eval query is seen in
training.  The hash is SHA-256 (not Python's salted `hash`), so the split is
the same on every worker, run and machine.  Image-only graph nodes (query "")
always go to train: they only carry the graph term.
"""


import hashlib

TRAIN = "train"
EVAL = "eval"
SPLITS = (TRAIN, EVAL)


def query_bucket(query: str) -> float:
    """A stable number in [0, 1) for a query."""
    digest = hashlib.sha256(query.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def query_split(query: str, eval_fraction: float) -> str:
    """TRAIN or EVAL for a normalised query; "" (an image-only node) is always TRAIN."""
    if not query:
        return TRAIN
    return EVAL if query_bucket(query) < eval_fraction else TRAIN
