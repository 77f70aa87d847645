"""The numerics of the embedding tools, numpy only: k-means, nearest neighbours, PCA."""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from clicklens.errors import ClicklensError

KMEANS_RESTARTS = 4
KMEANS_MAX_ITERATIONS = 100


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def squared_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """[n, k] squared Euclidean distances, without an [n, k, d] temporary."""
    d2 = (x ** 2).sum(1)[:, None] - 2.0 * x @ centers.T + (centers ** 2).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = KMEANS_RESTARTS,
           max_iterations: int = KMEANS_MAX_ITERATIONS) -> Tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding; the best of `restarts`.  Returns (labels, centers, inertia)."""
    n = len(x)
    if not 1 <= k <= n:
        raise ClicklensError(f"k-means: k={k} must be between 1 and the number of points ({n})")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        centers = x[[rng.integers(n)]]
        for _ in range(1, k):  # k-means++: next center with probability ~ squared distance
            d2 = squared_distances(x, centers).min(1)
            total = d2.sum()
            centers = np.vstack([centers, x[rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)]])
        labels = np.full(n, -1)
        for _ in range(max_iterations):
            d2 = squared_distances(x, centers)
            new_labels = d2.argmin(1)
            if np.array_equal(new_labels, labels):
                break
            labels = new_labels
            for c in range(k):
                members = x[labels == c]
                # An emptied cluster takes the point farthest from its center.
                centers[c] = members.mean(0) if len(members) else x[d2.min(1).argmax()]
        inertia = float(((x - centers[labels]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (labels, centers.copy(), inertia)
    return best


def default_num_clusters(num_points: int) -> int:
    """sqrt(n/2), the usual rule of thumb, within [2, 100] and at most n."""
    return max(1, min(num_points, max(2, min(100, round(math.sqrt(num_points / 2))))))


def nearest(queries: np.ndarray, candidates: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the k highest dot products of each query row with the candidate rows."""
    scores = queries @ candidates.T
    k = min(k, candidates.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, 1).argsort(1)[:, ::-1]
    top = np.take_along_axis(top, order, 1)
    return top, np.take_along_axis(scores, top, 1)


def standardize(x: np.ndarray) -> np.ndarray:
    """x centred on its mean and scaled to a mean squared row norm of 1."""
    centered = x - x.mean(0)
    return centered / max(float(np.sqrt((centered ** 2).sum(1).mean())), 1e-12)


def pca_2d(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(points [n, 2], explained variance ratio [2]): x projected on its first two principal axes."""
    centered = x - x.mean(0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    variance = s ** 2
    ratio = variance[:2] / max(variance.sum(), 1e-12)
    points = centered @ vt[:2].T
    if points.shape[1] < 2:
        points = np.pad(points, [(0, 0), (0, 2 - points.shape[1])])
        ratio = np.pad(ratio, (0, 2 - len(ratio)))
    return points, ratio
