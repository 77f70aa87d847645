"""Auto ScaNN parameters: chosen from the corpus size and dimension, then tuned on held-out queries.

    tuning = tune(embeddings, k, queries, config.export.scann, config.export.min_recall)
    tuning.params     # the fastest setting tried meeting min_recall (else the most accurate one)
    tuning.searcher   # built with that layout, for trainer.scann_index.ScannIndex (then release it)
    tuning.report()   # for W/export/report.json: the chosen setting and every setting tried

One rule for every corpus size, from the 300-image test world to 10M images:

- Layout (one build).  Under 20,000 images: brute force, exact float32 scores
  (scanning the corpus costs less than the TF call around it).  From 20,000: a
  k-means tree of about sqrt(N) leaves whose searched leaves are scored by
  4-bit AH codes, 2 dimensions per block, the best candidates re-scored exactly.
- Search depth (no rebuild: ScaNN's search ops take it per call).  For each
  re-scoring depth (4, 8, 16, 32 x k) the number of leaves searched grows by
  about 1.5x a step until recall@k against exact search reaches min_recall (or
  stops improving).  Every setting's speed is measured (batches of 100
  queries) and the fastest one meeting min_recall is kept.  "Meeting" means by
  a margin of two standard errors of the measured recall (about 0.01 for 500
  queries), so that new queries from the same distribution meet it too.

A key set in `export.scann` pins that part of the setting; the rest is tuned around it.
`clicklens reindex` passes the replaced index's params as `previous`: the
layout is still derived from the new corpus's size and built, but the old
search depth (its share of the leaves, its re-scoring depth) is measured first
and kept when it still meets min_recall; only otherwise is the depth swept.
Speeds are ranked by queries per CPU second, which other jobs on the machine
disturb far less than wall time; both are reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from clicklens.errors import ClicklensError
from trainer import scann_index
from trainer.ranking import exact_top_k
from trainer.scann_index import AH, NO_QUANTIZATION, ScannParams

logger = logging.getLogger(__name__)

BRUTE_FORCE_BELOW = 20_000
AUTO_DIMENSIONS_PER_BLOCK = 2
REORDER_MULTIPLES = (4, 8, 16, 32)
MIN_IMAGES_PER_LEAF = 100  # on average, and at least 2k: a leaf or two always hold k candidates
MIN_TUNING_QUERIES = 200
RECALL_MARGIN_SE = 2.0
TIMING_BATCH = 100
FINALIST_REPEATS = 3
MIN_TIMING_SECONDS = 0.25
# A depth whose recall gained less than PLATEAU_GAIN over the last PLATEAU_STEPS leaf steps is capped
# by its re-scoring depth: searching more leaves will not reach min_recall.
PLATEAU_STEPS, PLATEAU_GAIN = 3, 0.005


@dataclasses.dataclass(frozen=True)
class Trial:
    """One setting measured on the tuning queries."""

    params: ScannParams
    recall: float
    recall_standard_error: float
    queries_per_second: float
    queries_per_cpu_second: float

    def meets(self, min_recall: float) -> bool:
        """Recall at least `min_recall` by a margin of two standard errors, so that new queries meet it too."""
        return self.recall - RECALL_MARGIN_SE * self.recall_standard_error >= min_recall

    def as_dict(self) -> Dict[str, object]:
        return {**self.params.as_dict(), "recall": round(self.recall, 4),
                "recall_standard_error": round(self.recall_standard_error, 4),
                "queries_per_second": round(self.queries_per_second, 1),
                "queries_per_cpu_second": round(self.queries_per_cpu_second, 1)}


@dataclasses.dataclass
class Tuning:
    """The outcome of `tune`: the chosen setting, its searcher, and what was tried."""

    params: ScannParams
    searcher: object
    chosen: Trial
    trials: List[Trial]
    min_recall: float
    auto_keys: List[str]
    build_seconds: float
    tuning_seconds: float
    num_queries: int
    carried_over: bool = False  # the previous index's search depth, kept (see carried_depth)

    @property
    def met(self) -> bool:
        return self.chosen.meets(self.min_recall)

    def report(self) -> Dict[str, object]:
        """JSON-ready: the chosen parameters, their recall and speed, and every setting tried."""
        return {"params": self.params.as_dict(), "auto_keys": self.auto_keys, "min_recall": self.min_recall,
                "met_min_recall": self.met, "recall": round(self.chosen.recall, 4),
                "recall_standard_error": round(self.chosen.recall_standard_error, 4),
                "queries_per_second": round(self.chosen.queries_per_second, 1),
                "queries_per_cpu_second": round(self.chosen.queries_per_cpu_second, 1),
                "tuning_queries": self.num_queries, "carried_over": self.carried_over,
                "build_seconds": round(self.build_seconds, 2),
                "tuning_seconds": round(self.tuning_seconds, 2), "tried": [t.as_dict() for t in self.trials]}


# ---------------------------------------------------------------------------
# The layout: chosen from the corpus size and dimension (and the pinned keys).


def auto_num_leaves(n: int, k: int) -> int:
    """About sqrt(n) leaves, with at least max(MIN_IMAGES_PER_LEAF, 2k) images per leaf on average."""
    return max(1, min(round(math.sqrt(n)), n // max(MIN_IMAGES_PER_LEAF, 2 * k)))


def choose_layout(n: int, dim: int, k: int, config) -> Tuple[ScannParams, List[str]]:
    """The index layout for n images of `dim` dimensions, and which export.scann keys were left to auto.

    `config` is an export.scann section (clicklens.config.ScannConfig).  The
    returned params carry the layout (leaves, quantization, block size) with
    the shallowest search; `search_depths` lists the depths to try on it.
    """
    auto_keys = [f.name for f in dataclasses.fields(config)
                 if getattr(config, f.name) is None or getattr(config, f.name) == "auto"]
    quantization = config.quantization
    if quantization == "auto":
        pins_ah = config.dimensions_per_block is not None or config.num_reordering_candidates is not None
        quantization = AH if pins_ah or n >= BRUTE_FORCE_BELOW else NO_QUANTIZATION
    if config.num_leaves is not None:
        num_leaves = config.num_leaves
        if num_leaves > n:
            raise ClicklensError(f"export.scann.num_leaves={num_leaves} exceeds the corpus size ({n} images); "
                                 "use fewer leaves, or null for auto")
    else:
        num_leaves = 1 if n < BRUTE_FORCE_BELOW else auto_num_leaves(n, k)
    if config.num_leaves_to_search is not None and config.num_leaves_to_search > num_leaves:
        raise ClicklensError(f"export.scann.num_leaves_to_search={config.num_leaves_to_search} exceeds the "
                             f"{num_leaves} leaves of this {n}-image corpus; set export.scann.num_leaves too")
    dims_per_block = 0
    if quantization == AH:
        dims_per_block = config.dimensions_per_block or AUTO_DIMENSIONS_PER_BLOCK
        if dims_per_block > dim:
            raise ClicklensError(f"export.scann.dimensions_per_block={dims_per_block} exceeds the embedding "
                                 f"dimension ({dim})")
    layout = ScannParams(num_leaves, config.num_leaves_to_search or 1, quantization, dims_per_block)
    return layout, auto_keys


def leaf_steps(num_leaves: int) -> List[int]:
    """1, 2, 3, 4, 6, 8, 12, ... num_leaves: about 1.5x a step."""
    steps = [1]
    while steps[-1] < num_leaves:
        steps.append(min(num_leaves, max(steps[-1] + 1, round(steps[-1] * 1.5))))
    return steps


def search_depths(layout: ScannParams, config, k: int) -> Tuple[List[int], List[int]]:
    """(leaves-to-search values, re-scoring depths) to try on `layout`, each ascending."""
    leaves = [config.num_leaves_to_search] if config.num_leaves_to_search is not None else leaf_steps(
        layout.num_leaves)
    if layout.quantization != AH:
        reorders = [0]
    elif config.num_reordering_candidates is not None:
        reorders = [config.num_reordering_candidates]
    else:
        reorders = [m * k for m in REORDER_MULTIPLES]
    return leaves, reorders


def carried_depth(previous: Optional[ScannParams], layout: ScannParams, leaves: List[int],
                  reorders: List[int]) -> Optional[ScannParams]:
    """`previous`'s search depth on the new `layout`, or None when there is nothing to carry over.

    The leaves searched keep their share of all leaves (rounded up); the
    re-scoring depth is kept when it is one the tuning would try.  None when
    there is no previous setting, when the layout has only one setting to try,
    or when the quantization or its blocks differ.
    """
    if previous is None or len(leaves) * len(reorders) == 1:
        return None
    if (previous.quantization, previous.dimensions_per_block) != (layout.quantization, layout.dimensions_per_block):
        return None
    if previous.num_reordering_candidates not in reorders:
        return None
    if len(leaves) == 1:
        num_leaves_to_search = leaves[0]
    elif previous.num_leaves > 1 and layout.num_leaves > 1:
        share = previous.num_leaves_to_search / previous.num_leaves
        num_leaves_to_search = min(layout.num_leaves, max(1, math.ceil(share * layout.num_leaves)))
    else:
        return None
    return dataclasses.replace(layout, num_leaves_to_search=num_leaves_to_search,
                               num_reordering_candidates=previous.num_reordering_candidates)


# ---------------------------------------------------------------------------
# Queries and the exact reference.


def corpus_queries(embeddings: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` queries near the corpus: random images plus Gaussian noise of half their norm.

    Near a real image but not on it, so a query's exact top-k is not just the
    image itself and its near-duplicates.
    """
    rng = np.random.default_rng(seed)
    rows = embeddings[rng.integers(0, len(embeddings), count)]
    noise = rng.normal(size=rows.shape) * (0.5 * np.linalg.norm(rows, axis=1, keepdims=True) / np.sqrt(rows.shape[1]))
    return (rows + noise).astype(np.float32)


def tuning_queries(held_out: np.ndarray, embeddings: np.ndarray,
                   minimum: int = MIN_TUNING_QUERIES) -> Tuple[np.ndarray, int]:
    """(queries, how many are corpus-derived): the held-out queries, topped up to `minimum` from the corpus."""
    held_out = np.asarray(held_out, np.float32).reshape(-1, embeddings.shape[1])
    extra = max(0, minimum - len(held_out))
    if extra:
        held_out = np.concatenate([held_out, corpus_queries(embeddings, extra)])
    return held_out, extra


def recalls(approximate_ids: Sequence, exact_ids: Sequence) -> np.ndarray:
    """Per query: |approximate top-k ∩ exact top-k| / k."""
    return np.array([len(set(a) & set(e)) / len(e) for a, e in zip(approximate_ids, exact_ids)])


def recall_at_k(approximate_ids: Sequence, exact_ids: Sequence) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k."""
    return float(np.mean(recalls(approximate_ids, exact_ids)))


# ---------------------------------------------------------------------------
# Measuring and choosing.


def measure(searcher, params: ScannParams, queries: np.ndarray, exact: np.ndarray, k: int,
            repeats: int = 1, min_recall: Optional[float] = None) -> Trial:
    """Recall@k and batched speed of one setting on the tuning queries.

    Speed: the best of `repeats` timings, each of passes over the queries
    (TIMING_BATCH a call) for at least MIN_TIMING_SECONDS; a setting that does
    not meet `min_recall` (when given) is timed by its one recall pass only.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    found = [scann_index.search(searcher, queries[i:i + TIMING_BATCH], k, params)[0]
             for i in range(0, len(queries), TIMING_BATCH)]
    best_wall, best_cpu = time.perf_counter() - wall, time.process_time() - cpu
    per_query = recalls(np.concatenate(found), exact)
    trial = Trial(params, float(per_query.mean()), float(per_query.std() / np.sqrt(len(per_query))), 0.0, 0.0)
    if min_recall is None or trial.meets(min_recall):
        for _ in range(repeats):
            passes, wall, cpu = 0, time.perf_counter(), time.process_time()
            while passes == 0 or time.perf_counter() - wall < MIN_TIMING_SECONDS:
                for i in range(0, len(queries), TIMING_BATCH):
                    scann_index.search(searcher, queries[i:i + TIMING_BATCH], k, params)
                passes += 1
            best_wall = min(best_wall, (time.perf_counter() - wall) / passes)
            best_cpu = min(best_cpu, (time.process_time() - cpu) / passes)
    return dataclasses.replace(trial, queries_per_second=len(queries) / max(best_wall, 1e-9),
                               queries_per_cpu_second=len(queries) / max(best_cpu, 1e-9))


def sweep(searcher, layout: ScannParams, leaves: List[int], reorders: List[int], queries: np.ndarray,
          exact: np.ndarray, k: int, min_recall: float) -> List[Trial]:
    """Every setting tried: per re-scoring depth, leaves searched growing until min_recall (or a plateau)."""
    trials: List[Trial] = []
    enough_leaves = math.inf  # deeper re-scoring never needs more leaves than a shallower one did
    for reorder in reorders:
        history: List[float] = []
        for num_leaves_to_search in leaves:
            if num_leaves_to_search > enough_leaves:
                break
            params = dataclasses.replace(layout, num_leaves_to_search=num_leaves_to_search,
                                         num_reordering_candidates=reorder)
            trial = measure(searcher, params, queries, exact, k, min_recall=min_recall)
            trials.append(trial)
            logger.debug("scann tuning: %s: recall@%d %.4f, %.0f queries/s", params.describe(), k, trial.recall,
                         trial.queries_per_second)
            if trial.meets(min_recall):
                enough_leaves = num_leaves_to_search
                break
            history.append(trial.recall)
            if len(history) > PLATEAU_STEPS and history[-1] - history[-1 - PLATEAU_STEPS] < PLATEAU_GAIN:
                break
    return trials


def choose(searcher, trials: List[Trial], queries: np.ndarray, exact: np.ndarray, k: int,
           min_recall: float) -> Trial:
    """The fastest trial meeting min_recall (speed re-measured), else the most accurate one."""
    passing = [t for t in trials if t.meets(min_recall)]
    if not passing:
        return max(trials, key=lambda t: (t.recall, t.queries_per_cpu_second))
    finalists = [measure(searcher, t.params, queries, exact, k, repeats=FINALIST_REPEATS) for t in passing]
    finalists = [max(a, b, key=lambda t: t.queries_per_cpu_second) for a, b in zip(passing, finalists)]
    return max(finalists, key=lambda t: t.queries_per_cpu_second)


def tune(embeddings: np.ndarray, k: int, queries: np.ndarray, config, min_recall: float,
         previous: Optional[ScannParams] = None) -> Tuning:
    """Builds a ScaNN index over `embeddings` as `config` (export.scann) asks, tuned on `queries` [Q, D].

    Keys of `config` left null / auto are chosen (module docstring); the setting
    returned is the fastest one tried whose recall@k against exact search meets
    `min_recall`, or, when none does (pinned keys can prevent it), the most
    accurate one, with a warning.  With `previous` (the params of the index
    this one replaces), its depth carried onto the new layout (`carried_depth`)
    is measured first and returned when it meets `min_recall`.
    """
    n, dim = embeddings.shape
    layout, auto_keys = choose_layout(n, dim, k, config)
    leaves, reorders = search_depths(layout, config, k)
    start = time.perf_counter()
    searcher = scann_index.build_searcher(embeddings, k, layout, max_reordering_candidates=max(reorders))
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    exact = exact_top_k(embeddings, queries, k)
    scann_index.search(searcher, queries[:TIMING_BATCH], k, layout)  # warm up: first touch of the index memory
    carried = carried_depth(previous, layout, leaves, reorders)
    if carried is not None:
        trial = measure(searcher, carried, queries, exact, k, min_recall=min_recall)
        if trial.meets(min_recall):
            tuning = Tuning(carried, searcher, trial, [trial], min_recall, auto_keys, build_seconds,
                            time.perf_counter() - start, len(queries), carried_over=True)
            logger.info("scann: %s over %d images: recall@%d %.4f (min_recall %.2f), %.0f queries/s; the previous "
                        "index's search depth (%s) kept, build %.1f s, check %.1f s", carried.describe(), n, k,
                        trial.recall, min_recall, trial.queries_per_second, previous.describe(), build_seconds,
                        tuning.tuning_seconds)
            return tuning
        logger.info("scann: the previous index's search depth, %s on the new layout, misses min_recall "
                    "(recall@%d %.4f): tuning it again", carried.describe(), k, trial.recall)
    trials = sweep(searcher, layout, leaves, reorders, queries, exact, k, min_recall)
    chosen = choose(searcher, trials, queries, exact, k, min_recall)
    tuning = Tuning(chosen.params, searcher, chosen, trials, min_recall, auto_keys, build_seconds,
                    time.perf_counter() - start, len(queries))
    log = logger.info if tuning.met else logger.warning
    log("scann: %s over %d images: recall@%d %.4f (min_recall %.2f%s), %.0f queries/s; %d settings tried, "
        "build %.1f s, tuning %.1f s", chosen.params.describe(), n, k, chosen.recall, min_recall,
        "" if tuning.met else ": NOT MET by any setting tried",
        chosen.queries_per_second, len(trials), build_seconds, tuning.tuning_seconds)
    return tuning
