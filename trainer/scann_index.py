"""The ScaNN index that `retrieval_scann` serves: built with scann's builder, searched by ScaNN's TF ops.

    params = ScannParams(num_leaves=1000, num_leaves_to_search=40, quantization="ah",
                         dimensions_per_block=2, num_reordering_candidates=100)
    searcher = build_searcher(embeddings, k, params)      # scann_ops.ScannSearcher (eager TF ops)
    indices, scores = search(searcher, queries, k, params)
    index = ScannIndex.from_searcher(searcher, ids, k, params)  # a tf.Module: index(queries) -> (scores, ids)
    release(searcher)                                       # the build's copy, once serialized

Why not `tfrs.layers.factorized_top_k.ScaNN`, which retrieval_scann used before:
its call searches with the depth the index was built with (-1 for every
search-time parameter), so trying another number of leaves searched or
re-scoring depth means building the index again, while ScaNN's search op takes
both per call: `ScannIndex` passes the tuned depth as op inputs
(trainer/scann_tuning.py measures many depths on one build).  It also offers
the exact brute-force layout small corpora want, and pads a short result to k
columns with empty ids instead of ScaNN's index 0.

The searcher is stored as ScaNN's own tensors (`SearcherState` variables: config,
partitioner, codes, the float32 corpus when re-scoring).  A loaded model
recreates the searcher from them on its first call (`Scann>TensorsToScann`:
about 2 s for 1M x 128; the warmup request pays it, and the benchmark before
issue 12 counted it in its batched timing, which made the SavedModel look 20x
slower than scann); later calls find it built and only search.  The op copies
the tensors into the searcher, so a server holds the index twice
(docs/SCALING.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import uuid
from typing import Dict, Optional, Tuple

import numpy as np

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from scann.scann_ops.py import scann_ops

logger = logging.getLogger(__name__)

AH = "ah"
NO_QUANTIZATION = "none"
# ScaNN's value for its anisotropic loss on dot-product search (its README's example): quantization
# error parallel to a datapoint costs more than orthogonal error, which is what ranks by dot product.
ANISOTROPIC_THRESHOLD = 0.2
TREE_TRAINING_ITERATIONS = 12
# k-means on a sample: ScaNN's default 100k points, or 50 per leaf for larger trees (10M images: ~3,200 leaves).
MIN_TRAINING_SAMPLE, TRAINING_POINTS_PER_LEAF = 100_000, 50
# ScaNN's serialized searcher, in the order of scann_to_tensors (and of scann_ops.ScannState's attributes).
STATE_FIELDS = ("scann_config", "serialized_partitioner", "datapoint_to_token", "ah_codebook", "hashed_dataset",
                "int8_dataset", "int8_multipliers", "dp_norms", "dataset")


@dataclasses.dataclass(frozen=True)
class ScannParams:
    """One ScaNN setting: the layout an index is built with and how deep a query searches it.

    `num_leaves` = 1 means no partitioning (every query scores the whole corpus),
    `quantization` "none" scores the searched points exactly in float32, "ah"
    scores their 4-bit anisotropic-hashing codes and re-scores the best
    `num_reordering_candidates` exactly (0: no re-scoring).
    """

    num_leaves: int
    num_leaves_to_search: int
    quantization: str
    dimensions_per_block: int = 0
    num_reordering_candidates: int = 0

    def __post_init__(self):
        if self.quantization not in (AH, NO_QUANTIZATION):
            raise ValueError(f"quantization must be {AH!r} or {NO_QUANTIZATION!r}, got {self.quantization!r}")
        if not 1 <= self.num_leaves_to_search <= self.num_leaves:
            raise ValueError(f"num_leaves_to_search must be in [1, num_leaves={self.num_leaves}], "
                             f"got {self.num_leaves_to_search}")
        if self.quantization == AH and self.dimensions_per_block < 1:
            raise ValueError("quantization 'ah' needs dimensions_per_block >= 1")

    @property
    def is_exact(self) -> bool:
        """True for brute force over float32 scores: the exact top-k."""
        return self.num_leaves == 1 and self.quantization == NO_QUANTIZATION

    def as_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """A short human-readable form, e.g. for logs and benchmark tables."""
        if self.is_exact:
            return "brute force (exact)"
        text = f"{self.num_leaves_to_search}/{self.num_leaves} leaves" if self.num_leaves > 1 else "all points"
        if self.quantization == AH:
            text += f", AH {self.dimensions_per_block} dims/block"
            reorder = self.num_reordering_candidates
            text += f", re-score {reorder}" if reorder else ", no re-scoring"
        else:
            text += ", float32 scores"
        return text


def configure(builder, params: ScannParams, max_reordering_candidates: Optional[int] = None):
    """Applies `params` to a scann builder (`scann_ops.builder` or `scann_ops_pybind.builder`).

    The index is built for re-scoring up to `max_reordering_candidates` (default:
    the params' own depth); a search may then ask for any depth up to it.
    """
    if params.num_leaves > 1:
        builder = builder.tree(
            num_leaves=params.num_leaves, num_leaves_to_search=params.num_leaves_to_search,
            training_iterations=TREE_TRAINING_ITERATIONS,
            training_sample_size=max(MIN_TRAINING_SAMPLE, TRAINING_POINTS_PER_LEAF * params.num_leaves))
    if params.quantization == AH:
        builder = builder.score_ah(params.dimensions_per_block,
                                   anisotropic_quantization_threshold=ANISOTROPIC_THRESHOLD)
        reorder = params.num_reordering_candidates if max_reordering_candidates is None else max_reordering_candidates
        if reorder:
            builder = builder.reorder(reorder)
    else:
        builder = builder.score_brute_force()
    return builder


def build_searcher(embeddings: np.ndarray, k: int, params: ScannParams,
                   max_reordering_candidates: Optional[int] = None) -> scann_ops.ScannSearcher:
    """A dot-product ScaNN searcher over float32 [N, D] embeddings (ScaNN's TF ops, eager).

    It lives in TensorFlow's resource manager until `release`d.
    """
    builder = configure(scann_ops.builder(embeddings, k, "dot_product"), params, max_reordering_candidates)
    with native_stderr_to_log("scann"):
        return builder.build()


def release(searcher: scann_ops.ScannSearcher) -> None:
    """Frees a searcher built by `build_searcher` (an index serialized from it keeps its own copy)."""
    tf.raw_ops.DestroyResourceOp(resource=searcher.searcher_handle, ignore_lookup_error=True)


def search_depth(params: ScannParams) -> Tuple[int, int]:
    """(leaves_to_search, pre_reordering_num_neighbors) as ScaNN's search ops take them; -1: not applicable."""
    leaves = params.num_leaves_to_search if params.num_leaves > 1 else -1
    reorder = params.num_reordering_candidates if params.quantization == AH and params.num_reordering_candidates else -1
    return leaves, reorder


def search(searcher, queries: np.ndarray, k: int, params: ScannParams) -> Tuple[np.ndarray, np.ndarray]:
    """(indices int32 [Q, k], scores float32 [Q, k]) of a batch of queries, searched as deep as `params` says.

    `searcher`: ScaNN's TF-op `scann_ops.ScannSearcher`, or a pybind `scann_ops_pybind.ScannSearcher` without
    docids (scann_update's check), whose results are point positions as well."""
    leaves, reorder = search_depth(params)
    indices, distances = searcher.search_batched_parallel(queries, final_num_neighbors=k,
                                                          pre_reorder_num_neighbors=reorder, leaves_to_search=leaves)
    return np.asarray(indices), np.asarray(distances)


class SearcherState(tf.Module):
    """ScaNN's serialized searcher (its tensors, STATE_FIELDS) as variables named as scann_ops.ScannState names
    them, so checkpoints have the same keys, but of unknown shape: ScannState's record the shapes they were made
    with, which would tie a saved graph to one corpus size (trainer/saved_graphs.py reuses a graph for the next
    version of the corpus)."""

    def __init__(self, tensors):
        super().__init__(name="scann_state")
        for field, value in zip(STATE_FIELDS, tensors, strict=True):
            setattr(self, field, tf.Variable(value, trainable=False, shape=tf.TensorShape(None), name=field))


class ScannIndex(tf.Module):
    """Top-k by dot product over a serialized ScaNN searcher: `index(queries) -> (scores, ids)`.

    Called like a tfrs.layers.factorized_top_k layer (queries float32 [B, D],
    optional k); returns scores float32 [B, k] and the ids of the images, searched
    as deep as `params` says.  A query whose searched leaves hold fewer than k
    images (possible only with a very shallow search of a small corpus) gets empty
    ids and NaN scores in the places ScaNN could not fill, never another image's id.
    """

    def __init__(self, state: SearcherState, identifiers: np.ndarray, k: int, params: ScannParams,
                 name: str = "scann"):
        """`state`: the searcher's tensors; `identifiers`: the image id of each of its points."""
        super().__init__(name=name)
        self.state = state
        # Of unknown length, as the state's variables are, so the traced graph is the same for any corpus.
        self.identifiers = tf.Variable(identifiers, trainable=False, shape=tf.TensorShape([None]), name="identifiers")
        self.k = k
        self.params = params
        self._leaves, self._reorder = search_depth(params)
        self._fewest_searched = len(identifiers)  # the fewest images a query can search
        if params.num_leaves > 1:  # its searched leaves may be the smallest ones
            leaf_sizes = np.bincount(self.state.datapoint_to_token.numpy(), minlength=params.num_leaves)
            self._fewest_searched = int(np.sort(leaf_sizes)[:params.num_leaves_to_search].sum())
        # The op's searcher is found by name: without a name of its own, eager calls of two indexes would
        # share one cached kernel and so one searcher.  Loading a SavedModel appends a suffix unique to
        # that load (TF's function_deserialization), so two loaded versions never share either.
        self._shared_name = f"scann-{uuid.uuid4().hex}"

    @classmethod
    def from_searcher(cls, searcher: scann_ops.ScannSearcher, identifiers: np.ndarray, k: int,
                      params: ScannParams, name: str = "scann") -> "ScannIndex":
        """The index over a searcher built by `build_searcher` (which may then be `release`d)."""
        return cls(SearcherState(scann_ops.scann_to_tensors(searcher.searcher_handle)), identifiers, k, params,
                   name=name)

    @classmethod
    def from_tensors(cls, tensors: Dict[str, np.ndarray], identifiers: np.ndarray, k: int, params: ScannParams,
                     name: str = "scann") -> "ScannIndex":
        """The index over a searcher's tensors ({STATE_FIELDS name: array}, e.g. from trainer/scann_update.py)."""
        return cls(SearcherState([tensors[f] for f in STATE_FIELDS]), identifiers, k, params, name=name)

    def graph_key(self) -> Tuple:
        """What the traced graph reads as Python values (trainer/saved_graphs.py); the searcher's layout and
        data are in `state`."""
        return ("scann", self.k, self._leaves, self._reorder, self._fewest_searched >= self.k)

    def _handle(self) -> tf.Tensor:
        """The searcher: built from the state on a loaded model's first call; afterwards returned at once."""
        s = self.state
        return scann_ops.tensors_to_scann(s.dataset, s.scann_config, s.serialized_partitioner,
                                          s.datapoint_to_token, s.ah_codebook, s.hashed_dataset,
                                          s.int8_dataset, s.int8_multipliers, s.dp_norms,
                                          shared_name=self._shared_name)

    @tf.function(input_signature=[], autograph=False)
    def searcher_handle(self) -> tf.Tensor:
        """The searcher's resource handle, saved with the model (servables.SEARCHER_HANDLE_FUNCTION).

        The searcher lives in TensorFlow's resource manager under its shared name, not in the model's
        Python objects, so dropping a loaded model does not free it (a whole index per retired version);
        a server destroys it with this handle (serving/saved_models.py, `searcher_handles`)."""
        return self._handle()

    def __call__(self, queries: tf.Tensor, k: Optional[int] = None) -> Tuple[tf.Tensor, tf.Tensor]:
        k = self.k if k is None else k
        result = scann_ops.scann_search_batched(self._handle(), queries, k, self._reorder, self._leaves, True)
        scores, ids = result.distances, tf.gather(self.identifiers, result.indices)
        if self._fewest_searched >= k:
            return scores, ids
        # Short results: ScaNN returns as many columns as the longest one holds, the others padded with
        # index 0 and a NaN score.  Blank those ids, then pad to k columns (and cut the k we added).
        ids = tf.where(tf.math.is_nan(scores), tf.zeros_like(ids), ids)
        scores = tf.pad(scores, [[0, 0], [0, k]], constant_values=float("nan"))[:, :k]
        ids = tf.pad(ids, [[0, 0], [0, k]])[:, :k]
        scores.set_shape([None, k])
        ids.set_shape([None, k])
        return scores, ids


@contextlib.contextmanager
def native_stderr_to_log(source: str):
    """Routes what C++ code writes to stderr meanwhile into this module's log.

    ScaNN's index builder logs through absl straight to file descriptor 2
    (partition sizes, timings), which TF_CPP_MIN_LOG_LEVEL does not reach.
    Its warning and error lines ("W..."/"E...") are logged as warnings, the
    rest at debug level (`clicklens -v` shows them).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    # absl's own notice "WARNING: All log messages before absl::InitializeLog() ..." is not one.
                    warning = line[:1] in ("W", "E", "F") and "absl::InitializeLog" not in line
                    logger.log(logging.WARNING if warning else logging.DEBUG, "%s: %s", source, line)
