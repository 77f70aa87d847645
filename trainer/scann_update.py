"""Updating a built ScaNN index instead of rebuilding it: `clicklens reindex` after a small catalog change.

    saved = read_saved_index(W/export/retrieval_scann/<v>)   # the searcher's tensors and image ids
    update = update_index(saved, previous_ids, previous_rows, ids, rows, k, queries, params, config.export,
                          rows_since_build)                  # params: the replaced index's ScannParams
    if not update.why:                                       # else it says why a rebuild is needed
        index = ScannIndex.from_tensors(update.index_tensors, update.ids, k, update.params)

A rebuild trains the partitioner (k-means) and the AH codebook again and
encodes every image: 1.5 s at 100,000 images, half a minute at a million.
Adding 1,000 images needs only their leaf and their codes.  ScaNN's own
mutation API does exactly that (`upsert` / `delete` of scann's pybind
searcher: a new point goes to its nearest leaf and is encoded with the
existing codebook), so the replaced version's searcher is loaded into the
pybind searcher from the tensors saved in its SavedModel, changed, and
serialized back into the tensors `ScannIndex` saves.  The served model is the
same kind of model a rebuild writes; only its point order differs (new points
at the end, a deleted point's place taken by the last one).

An update is made only when a rebuild would choose the same layout (same
quantization and block size; the leaf count derived for the new corpus size
within LEAF_COUNT_TOLERANCE of the kept one), when the rows changed since the
index was last built are at most MAX_SHARE_SINCE_BUILD of the new corpus
(k-means fitted on older images drifts from the catalog as it changes), and it is
kept only when the replaced version's search depth still meets
export.min_recall on the tuning queries against exact search.  Otherwise
`clicklens reindex` rebuilds and tunes as `clicklens export` does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from scann.scann_ops.py import scann_ops_pybind

from clicklens.workdir import join
from trainer import scann_index, scann_tuning
from trainer.ranking import exact_top_k, exact_top_k_grown
from trainer.scann_index import AH, STATE_FIELDS, ScannParams

logger = logging.getLogger(__name__)

LEAF_COUNT_TOLERANCE = 1.25
MAX_SHARE_SINCE_BUILD = 0.2
DEEPER_LEAF_STEPS = 3  # deeper settings tried when the kept depth misses min_recall on the updated index
UPSERT_BATCH = 1024

# Where the searcher sits in a retrieval_scann checkpoint: export_signatures.Retrieval.top_k is the
# ScannIndex, whose `state` holds the searcher's tensors and `identifiers` the image id of each point.
_STATE_KEY = "top_k/state/{}/.ATTRIBUTES/VARIABLE_VALUE"
_IDS_KEY = "top_k/identifiers/.ATTRIBUTES/VARIABLE_VALUE"

# The pybind searcher's files (scann_ops_pybind serialize / load_searcher) for the tensors of a
# partitioned AH index with re-scoring, the only layout that is updated.
_PROTO_FILES = {"scann_config": "scann_config.pb", "serialized_partitioner": "serialized_partitioner.pb",
                "ah_codebook": "ah_codebook.pb"}
_ARRAY_FILES = {"datapoint_to_token": "datapoint_to_token.npy", "hashed_dataset": "hashed_dataset.npy",
                "dataset": "dataset.npy"}
_ASSET_TYPES = {"ah_codebook": "AH_CENTERS", "serialized_partitioner": "PARTITIONER",
                "datapoint_to_token": "TOKENIZATION_NPY", "hashed_dataset": "AH_DATASET_NPY",
                "dataset": "DATASET_NPY"}


@dataclasses.dataclass
class ExactReference:
    """The exact top k of the recall check: positions in a dataset's point order, for `queries`."""

    queries: np.ndarray
    k: int
    top: np.ndarray  # int64 [Q, k]

    def grown(self, previous_dataset: np.ndarray, dataset: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
        """exact_top_k(dataset, queries, k), scoring only the rows added after `previous_dataset` (the one this
        was taken over) when `dataset` starts with it and the queries are the same; else every row."""
        n = len(previous_dataset)
        if (k == self.k and queries.shape == self.queries.shape and np.array_equal(queries, self.queries)
                and len(dataset) >= n and np.array_equal(dataset[:n], previous_dataset)):
            return exact_top_k_grown(dataset, queries, k, self.top, n)
        return exact_top_k(dataset, queries, k)


@dataclasses.dataclass
class SavedIndex:
    """A retrieval_scann version's searcher: its tensors ({STATE_FIELDS name: array}) and each point's image id.

    A watch keeps the one it wrote last with the pybind `searcher` that holds it and the `exact` reference of its
    recall check, so that the next update neither reads it back nor scores the unchanged rows again."""

    tensors: Dict[str, np.ndarray]
    ids: np.ndarray  # bytes [N], in the searcher's point order
    searcher: Optional[scann_ops_pybind.ScannSearcher] = None
    exact: Optional[ExactReference] = None


@dataclasses.dataclass
class Update:
    """The outcome of `update_index`: the updated searcher's tensors and ids, or why a rebuild is needed."""

    why: str = ""  # non-empty: not updated
    index_tensors: Optional[Dict[str, np.ndarray]] = None
    ids: Optional[np.ndarray] = None
    params: Optional[ScannParams] = None
    trial: Optional[scann_tuning.Trial] = None
    counts: Dict[str, int] = dataclasses.field(default_factory=dict)
    rows_since_build: int = 0
    seconds: Dict[str, float] = dataclasses.field(default_factory=dict)
    trials: List[scann_tuning.Trial] = dataclasses.field(default_factory=list)  # the depths checked, in order
    saved: Optional[SavedIndex] = None  # the updated index, its pybind searcher and exact reference (for a watch)

    def report(self, min_recall: float, num_queries: int) -> Dict[str, object]:
        """JSON-ready, in the shape of scann_tuning.Tuning.report, plus what the update changed."""
        trial = self.trial
        return {"params": self.params.as_dict(), "auto_keys": [], "min_recall": min_recall,
                "met_min_recall": trial.meets(min_recall), "recall": round(trial.recall, 4),
                "recall_standard_error": round(trial.recall_standard_error, 4),
                "queries_per_second": round(trial.queries_per_second, 1),
                "queries_per_cpu_second": round(trial.queries_per_cpu_second, 1),
                "tuning_queries": num_queries, "carried_over": True, "updated": dict(self.counts),
                "rows_since_build": self.rows_since_build,
                "build_seconds": round(self.seconds.get("update", 0.0), 2),
                "tuning_seconds": round(self.seconds.get("check", 0.0), 2),
                "tried": [t.as_dict() for t in self.trials or [trial]]}


def read_saved_index(version_dir: str) -> SavedIndex:
    """The searcher tensors and ids of a retrieval_scann version, read from its checkpoint (no graph loaded)."""
    reader = tf.train.load_checkpoint(join(version_dir, "variables", "variables"))
    tensors = {field: reader.get_tensor(_STATE_KEY.format(field)) for field in STATE_FIELDS}
    return SavedIndex(tensors, reader.get_tensor(_IDS_KEY))


def load_saved_index(version_dir: str, queries: np.ndarray, k: int) -> SavedIndex:
    """A retrieval_scann version's index read from its checkpoint, loaded into scann's pybind searcher, with the
    exact top k of `queries` over it: what an update of it needs, made ahead (a watch with nothing to do)."""
    saved = read_saved_index(version_dir)
    with tempfile.TemporaryDirectory(prefix="clicklens-scann-") as folder:
        saved.searcher = load_pybind(saved, os.path.join(folder, "before"))
    saved.exact = ExactReference(queries, k, exact_top_k(saved.tensors["dataset"], queries, k))
    return saved


def updatable(params: ScannParams) -> bool:
    """Whether an index built with `params` can be updated in place: a partitioned AH index."""
    return params.num_leaves > 1 and params.quantization == AH


def layout_mismatch(previous: ScannParams, corpus_size: int, dim: int, k: int, scann_config) -> str:
    """Why the index `previous` describes is not the one a rebuild over `corpus_size` images would choose
    ("" when it is)."""
    if not updatable(previous):
        return f"the index is {previous.describe()}: only a partitioned AH index is updated"
    layout, _ = scann_tuning.choose_layout(corpus_size, dim, k, scann_config)
    if (layout.quantization, layout.dimensions_per_block) != (previous.quantization, previous.dimensions_per_block):
        return f"a rebuild would use {layout.describe()}"
    ratio = max(layout.num_leaves, previous.num_leaves) / min(layout.num_leaves, previous.num_leaves)
    if ratio > LEAF_COUNT_TOLERANCE or (scann_config.num_leaves is not None
                                        and scann_config.num_leaves != previous.num_leaves):
        return f"{corpus_size} images call for {layout.num_leaves} leaves, the index has {previous.num_leaves}"
    for key in ("num_leaves_to_search", "num_reordering_candidates", "dimensions_per_block"):
        pinned = getattr(scann_config, key)
        if pinned not in (None, "auto") and pinned != getattr(previous, key):
            return f"export.scann.{key} is {pinned}, the index was built with {getattr(previous, key)}"
    return ""


def update_index(saved: SavedIndex, previous_ids: np.ndarray, previous_rows: np.ndarray, ids: np.ndarray,
                 rows: np.ndarray, k: int, queries: np.ndarray, previous: ScannParams, export_config,
                 rows_since_build: int) -> Update:
    """The replaced version's searcher (`saved`, built over `previous_ids` / `previous_rows`) changed to hold
    exactly `ids` / `rows` (see the module docstring), checked on `queries`; `rows_since_build`: the rows
    changed by earlier updates since it was built."""
    start = time.perf_counter()
    why = layout_mismatch(previous, len(ids), rows.shape[1], k, export_config.scann)
    if why:
        return Update(why=why)
    if set(saved.ids.tolist()) != set(previous_ids.tolist()) or len(saved.ids) != len(previous_ids):
        return Update(why="the saved index does not hold the kept corpus rows")
    old_row = {image_id: i for i, image_id in enumerate(previous_ids.tolist())}
    upserts = changed_or_new(old_row, previous_rows, ids, rows)
    kept = set(ids.tolist())
    deletes = [image_id for image_id in saved.ids.tolist() if image_id not in kept]
    counts = {"added": sum(1 for i in upserts if ids[i] not in old_row), "removed": len(deletes)}
    counts["changed"] = len(upserts) - counts["added"]
    since_build = rows_since_build + len(upserts) + len(deletes)
    if since_build > MAX_SHARE_SINCE_BUILD * len(ids):
        return Update(why=f"{since_build} rows changed since the index was built, more than "
                          f"{MAX_SHARE_SINCE_BUILD:.0%} of {len(ids)}", counts=counts)

    with tempfile.TemporaryDirectory(prefix="clicklens-scann-") as folder:
        searcher = saved.searcher or load_pybind(saved, os.path.join(folder, "before"))
        with scann_index.native_stderr_to_log("scann"):
            if deletes:
                searcher.delete(deletes)
            for chunk in range(0, len(upserts), UPSERT_BATCH):
                rows_of = upserts[chunk:chunk + UPSERT_BATCH]
                searcher.upsert([ids[i] for i in rows_of], rows[rows_of], batch_size=len(rows_of))
        tensors = serialize_pybind(searcher, saved.tensors, os.path.join(folder, "after"))
        updated_ids = np.array(searcher.docids, dtype=object)
    seconds = {"update": time.perf_counter() - start}

    start = time.perf_counter()
    min_recall = export_config.min_recall
    if saved.exact is not None:
        exact = saved.exact.grown(saved.tensors["dataset"], tensors["dataset"], queries, k)
    else:
        exact = exact_top_k(tensors["dataset"], queries, k)
    trials = check_recall(searcher, deeper_depths(previous, export_config.scann), queries, exact, k, min_recall)
    seconds["check"] = time.perf_counter() - start
    trial = trials[-1]
    if not trial.meets(min_recall):
        return Update(why=f"the kept search depth ({previous.describe()}) and {len(trials) - 1} deeper ones reach at "
                          f"most recall@{k} {max(t.recall for t in trials):.4f} on the updated index (standard error "
                          f"{trial.recall_standard_error:.4f}), short of export.min_recall {min_recall} by "
                          f"{scann_tuning.RECALL_MARGIN_SE:g} standard errors", counts=counts, trials=trials)
    if trial.params != previous:
        logger.info("scann update: the kept depth (%s) reaches recall@%d %.4f on the updated index, short of "
                    "export.min_recall %.2f by %g standard errors: searching %d leaves instead", previous.describe(),
                    k, trials[0].recall, min_recall, scann_tuning.RECALL_MARGIN_SE, trial.params.num_leaves_to_search)
    return Update(index_tensors=tensors, ids=updated_ids, params=trial.params, trial=trial, counts=counts,
                  rows_since_build=since_build, seconds=seconds, trials=trials,
                  saved=SavedIndex(tensors, updated_ids, searcher, ExactReference(queries, k, exact)))


def deeper_depths(params: ScannParams, scann_config) -> List[ScannParams]:
    """`params`, then up to DEEPER_LEAF_STEPS settings that search more leaves (scann_tuning.leaf_steps), unless
    export.scann pins the leaves searched.  An index tuned to just meet min_recall can fall short of it by a hair
    once points are added: searching a little deeper keeps the update instead of rebuilding."""
    depths = [params]
    if scann_config.num_leaves_to_search in (None, "auto"):
        steps = [s for s in scann_tuning.leaf_steps(params.num_leaves) if s > params.num_leaves_to_search]
        depths += [dataclasses.replace(params, num_leaves_to_search=s) for s in steps[:DEEPER_LEAF_STEPS]]
    return depths


def changed_or_new(old_row: Dict[bytes, int], previous_rows: np.ndarray, ids: np.ndarray,
                   rows: np.ndarray) -> List[int]:
    """Positions in `ids` of the images not in the old index or whose embedding differs from their old row."""
    positions = np.array([old_row.get(image_id, -1) for image_id in ids.tolist()])
    known = positions >= 0
    same = np.zeros(len(ids), bool)
    same[known] = (previous_rows[positions[known]] == rows[known]).all(axis=1)
    return np.flatnonzero(~same).tolist()


def load_pybind(saved: SavedIndex, folder: str) -> scann_ops_pybind.ScannSearcher:
    """scann's pybind searcher over the saved tensors (written as the files its `load_searcher` reads)."""
    os.makedirs(folder)
    for field, name in _PROTO_FILES.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(saved.tensors[field].reshape(-1)[0])
    for field, name in _ARRAY_FILES.items():
        np.save(os.path.join(folder, name), saved.tensors[field])
    with open(os.path.join(folder, "scann_assets.pbtxt"), "w") as f:
        for field, asset_type in _ASSET_TYPES.items():
            name = _PROTO_FILES.get(field) or _ARRAY_FILES[field]
            f.write(f'assets {{\n  asset_type: {asset_type}\n  asset_path: "{os.path.join(folder, name)}"\n}}\n')
    with scann_index.native_stderr_to_log("scann"):
        searcher = scann_ops_pybind.load_searcher(folder)
    return scann_ops_pybind.ScannSearcher(searcher.searcher, docids=list(saved.ids.tolist()))


def serialize_pybind(searcher: scann_ops_pybind.ScannSearcher, like: Dict[str, np.ndarray],
                     folder: str) -> Dict[str, np.ndarray]:
    """The tensors of a pybind searcher ({STATE_FIELDS name: array}); the fields it has no file for (its int8
    variant's, unused by this layout) are taken from `like`."""
    os.makedirs(folder)
    searcher.searcher.serialize(folder, False)
    tensors = dict(like)
    for field, name in _PROTO_FILES.items():
        with open(os.path.join(folder, name), "rb") as f:
            tensors[field] = np.array([f.read()], dtype=object)
    for field, name in _ARRAY_FILES.items():
        tensors[field] = np.load(os.path.join(folder, name))
    return tensors


def check_recall(searcher: scann_ops_pybind.ScannSearcher, depths: Sequence[ScannParams], queries: np.ndarray,
                 exact: np.ndarray, k: int, min_recall: float) -> List[scann_tuning.Trial]:
    """The trials (recall@k against `exact`, the exact top k over the same points, and the speed of that one
    pass) of `depths` in order on the updated pybind searcher, up to the first that meets `min_recall`.

    The searcher is searched by point position (its docids left aside), the order of the tensors it was
    serialized to; building ScaNN's TF-op searcher from those tensors only to check them took 0.1 s a pass."""
    by_position = scann_ops_pybind.ScannSearcher(searcher.searcher)
    trials = []
    for params in depths:
        trials.append(scann_tuning.measure(by_position, params, queries, exact, k, repeats=0))
        if trials[-1].meets(min_recall):
            break
    return trials
