"""Approximate nearest neighbours by cosine similarity: random-hyperplane LSH, in plain numpy.

The content graph's Beam transforms (content_graph.py) and benchmarks/content_graph_ann.py
run these same functions, so the benchmark measures the code the pipeline runs.

One round of LSH, as in neural_structured_learning's graph builder:

  1. `round_planes`: random hyperplanes through the mean of all vectors, the same on
     every worker (drawn from (seed, round)).  Through the mean, not the origin: content
     descriptors such as histograms are all positive and fill a cone, which hyperplanes
     through the origin cut unevenly.
  2. `signatures`: which side of each of the first `bits` planes a unit vector lies on,
     as an integer: the bucket.  Vectors at a small angle agree on most sides, so they
     share a bucket far more often than unrelated ones.
  3. `bucket_neighbors`: exact cosine similarity (one matmul) between the vectors of a
     bucket, each one's top k above a minimum.

A pair that one round splits is often together in another, so each vector's
neighbours are merged over several rounds (`merge_neighbors`).  The work per
vector is the size of its bucket; `num_bits` picks the bits from the number of
vectors so that a bucket holds about `bucket_size` of them whatever the catalog
size, and `bucket_chunks` cuts a bucket larger than `max_bucket` (clustered data
make some buckets much larger than the average) into pieces of vectors that agree
on further planes, so no bucket's work is quadratic in the catalog.  With
max_bucket = bucket_size every bucket is cut to at most bucket_size, and the
vectors each one is compared with stay about the same from 10k to 1M vectors
(benchmarks/content_graph_ann.py).
"""

import math
from typing import Iterable, List, Sequence, Tuple

import numpy as np

# Planes beyond the bucket bits that order the vectors of an oversized bucket before it is cut.
SPLIT_BITS = 16


def num_bits(num_vectors: int, bucket_size: int) -> int:
    """Hyperplanes per round: the most that leave `bucket_size` vectors or more per bucket on average (at most 47).

    The 2**bits buckets then hold between bucket_size and 2 * bucket_size vectors
    on average, whatever the number of vectors; `bucket_chunks` cuts each one that
    is larger than max_bucket.
    """
    if num_vectors < 2 * bucket_size:
        return 0
    return min(47, int(math.floor(math.log2(num_vectors / bucket_size))))  # + SPLIT_BITS fit an int64


def round_planes(seed: int, round_index: int, bits: int, dim: int) -> np.ndarray:
    """float32 [bits + SPLIT_BITS, dim]: round `round_index`'s hyperplanes, the same for the same arguments."""
    rng = np.random.default_rng([seed, round_index, bits, dim])
    return rng.standard_normal((bits + SPLIT_BITS, dim)).astype(np.float32)


def signatures(vectors: np.ndarray, planes: np.ndarray, center: np.ndarray) -> np.ndarray:
    """float [n, dim], planes [p, dim], center [dim] -> int64 [n]: bit i (most significant first) is 1 where
    the vector lies on the positive side of plane i through `center`."""
    planes = np.asarray(planes, np.float64)  # float64: see `similarities`
    sides = (np.asarray(vectors, np.float64) @ planes.T) > (planes @ np.asarray(center, np.float64))
    weights = np.left_shift(np.int64(1), np.arange(planes.shape[0] - 1, -1, -1, dtype=np.int64))
    return sides.astype(np.int64) @ weights


def mean_vector(vectors: np.ndarray) -> np.ndarray:
    """float32 [dim]: the mean of the vectors (accumulated in float64), where the hyperplanes pass."""
    return np.asarray(vectors, np.float64).mean(axis=0).astype(np.float32)


def bucket_chunks(split_codes: np.ndarray, max_bucket: int) -> List[np.ndarray]:
    """Row indices of one bucket cut into pieces of at most `max_bucket`, each of rows with close split codes.

    The rows are ordered by their code on the split planes (rows that agree on the
    first planes are adjacent; equal codes keep their input order) and cut into equal pieces.
    """
    order = np.argsort(split_codes, kind="stable")
    return np.array_split(order, max(1, math.ceil(len(order) / max_bucket)))


def similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 [len(a), len(b)]: the dot products of a's rows with b's, the same on every machine.

    A float32 matmul's last bits depend on the BLAS kernel the CPU selects (AVX2 and
    AVX-512 kernels add in different orders), which would make the graph's neighbours
    and weights, and so the pipeline's output files, differ between two Dataflow
    workers.  The products are taken in float64 and rounded to float32: two kernels'
    float64 results differ by far less than a float32 step.
    """
    return (np.asarray(a, np.float64) @ np.asarray(b, np.float64).T).astype(np.float32)


def top_k_within(vectors: np.ndarray, k: int, min_similarity: float) -> Tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows by dot product (cosine for unit vectors).

    Returns (indices int64 [n, k], similarities float32 [n, k]), most similar first
    (ties: the smaller index); slots below `min_similarity` (or beyond n - 1 rows) hold index -1.
    """
    vectors = np.asarray(vectors, np.float32)
    n = len(vectors)
    k_here = min(k, n - 1)
    indices = np.full((n, k), -1, np.int64)
    sims = np.full((n, k), -np.inf, np.float32)
    if k_here <= 0:
        return indices, sims
    scores = similarities(vectors, vectors)
    np.fill_diagonal(scores, -np.inf)  # never its own neighbour
    candidates = np.argpartition(scores, n - k_here, axis=1)[:, n - k_here:]
    candidate_sims = np.take_along_axis(scores, candidates, axis=1)
    order = np.lexsort((candidates, -candidate_sims), axis=1)
    top = np.take_along_axis(candidates, order, axis=1)
    top_sims = np.take_along_axis(candidate_sims, order, axis=1)
    keep = top_sims >= min_similarity
    indices[:, :k_here] = np.where(keep, top, -1)
    sims[:, :k_here] = np.where(keep, top_sims, -np.inf)
    return indices, sims


def bucket_neighbors(ids: Sequence[str], vectors: np.ndarray, split_codes: np.ndarray, k: int,
                     min_similarity: float, max_bucket: int) -> Iterable[Tuple[str, List[Tuple[str, float]]]]:
    """(id, [(neighbour id, cosine)], most similar first) for every vector of one bucket that has a neighbour.

    `vectors` are unit vectors; a bucket larger than `max_bucket` is first cut by `bucket_chunks`.
    """
    for rows in bucket_chunks(split_codes, max_bucket):
        indices, sims = top_k_within(vectors[rows], k, min_similarity)
        for row, (found, found_sims) in zip(rows, zip(indices, sims)):
            neighbors = [(ids[rows[j]], float(s)) for j, s in zip(found, found_sims) if j >= 0]
            if neighbors:
                yield ids[row], neighbors


def merge_neighbors(lists: Iterable[Sequence[Tuple[str, float]]], k: int) -> List[Tuple[str, float]]:
    """The k most similar distinct neighbours of several rounds' lists (ties: the smaller id)."""
    best = {}
    for neighbors in lists:
        for neighbor, sim in neighbors:
            # The largest, not the last one seen, so the result never depends on the order of the rounds.
            best[neighbor] = max(best.get(neighbor, sim), sim)
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def approximate_neighbors(vectors: np.ndarray, k: int, min_similarity: float, rounds: int, bucket_size: int,
                          max_bucket: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """The whole LSH search in memory: every row's k most similar other rows found by `rounds` rounds.

    `vectors` are unit vectors.  Returns (indices int64 [n, k], similarities float32 [n, k]) as
    `top_k_within` does.  The same rounds, planes, buckets and chunks as the Beam transform
    (content_graph.LshNeighbors), with the per-image merge done on arrays.
    """
    vectors = np.asarray(vectors, np.float32)
    n, dim = vectors.shape
    bits = num_bits(n, bucket_size)
    center = mean_vector(vectors)
    best_idx = np.full((n, k), -1, np.int64)
    best_sim = np.full((n, k), -np.inf, np.float32)
    for round_index in range(rounds):
        codes = signatures(vectors, round_planes(seed, round_index, bits, dim), center)
        buckets, split_codes = codes >> SPLIT_BITS, codes & ((1 << SPLIT_BITS) - 1)
        order = np.argsort(buckets, kind="stable")
        starts = np.flatnonzero(np.r_[True, buckets[order][1:] != buckets[order][:-1]])
        for members in np.split(order, starts[1:]):
            for chunk in bucket_chunks(split_codes[members], max_bucket):
                rows = members[chunk]
                found, sims = top_k_within(vectors[rows], k, min_similarity)
                found = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
                best_idx[rows], best_sim[rows] = merge_top_k(best_idx[rows], best_sim[rows], found, sims, k)
    return best_idx, best_sim


def merge_top_k(idx_a: np.ndarray, sim_a: np.ndarray, idx_b: np.ndarray, sim_b: np.ndarray,
                k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Row-wise merge of two top-k lists (index -1 = empty slot), each index once: `merge_neighbors` on arrays."""
    idx = np.concatenate([idx_a, idx_b], axis=1)
    sim = np.concatenate([sim_a, sim_b], axis=1)
    by_index = np.argsort(idx, axis=1, kind="stable")
    idx, sim = np.take_along_axis(idx, by_index, axis=1), np.take_along_axis(sim, by_index, axis=1)
    repeated = np.zeros_like(idx, bool)
    repeated[:, 1:] = idx[:, 1:] == idx[:, :-1]
    sim = np.where(repeated | (idx < 0), -np.inf, sim)
    order = np.lexsort((idx, -sim), axis=1)[:, :k]
    idx, sim = np.take_along_axis(idx, order, axis=1), np.take_along_axis(sim, order, axis=1)
    return np.where(np.isfinite(sim), idx, -1), sim


def exact_neighbors(vectors: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool = True) -> np.ndarray:
    """int64 [len(queries), k]: the exact top k rows of `vectors` by dot product for rows `queries` (brute force)."""
    out = []
    for start in range(0, len(queries), 64):
        rows = queries[start:start + 64]
        scores = vectors[rows] @ vectors.T
        if exclude_self:
            scores[np.arange(len(rows)), rows] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)
