"""Residual k-means: item vectors -> unique tuples of L codes, each code in [0, C).

Level t clusters the residual left by levels 0..t-1 (vector minus its assigned centroids).
All L levels are k-means levels; the last one then also disambiguates: inside every group of
items sharing the first L-1 codes, items are matched to distinct last-level codes by an optimal
assignment on their distance to the last-level centroids, so every item's tuple is unique.
Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans, kmeans_plusplus

from atspeed_rec.errors import ConfigError


class CodebookTooSmallError(ConfigError, ValueError):
    """More items share a prefix than the last level's codebook can tell apart."""


def _kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels [n], centroids [k', d]) with k' = min(k, number of distinct rows of x).

    Seeded by plain k-means++ (one candidate per centre): sklearn's greedy default tries
    2 + log(k) candidates per centre and is 20x slower at k = 256 for little gain.
    """
    k = min(k, len(np.unique(x, axis=0)))
    if k <= 1:
        return np.zeros(len(x), dtype=np.int64), x.mean(axis=0, keepdims=True)
    init, _ = kmeans_plusplus(x, k, random_state=seed, n_local_trials=1)
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=100, random_state=seed).fit(x)
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(x.dtype)


def _duplicated_rows(codes: np.ndarray) -> np.ndarray:
    """`[n]` bool: the row's code tuple also belongs to another row."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.ravel()] > 1


def _prefix_groups(codes: np.ndarray) -> np.ndarray:
    """`[n]` id of each row's prefix (all codes but the last); one group when L = 1."""
    if codes.shape[1] == 1:
        return np.zeros(len(codes), dtype=np.int64)
    _, group = np.unique(codes[:, :-1], axis=0, return_inverse=True)
    return group.ravel()


def _assignment_cost(residual: np.ndarray, centroids: np.ndarray, codebook_size: int) -> np.ndarray:
    """`[m, C]` distance of each residual to each last-level centroid.

    A code without a centroid (k < C) costs more than any centroid, so it is taken last.
    """
    dist = np.linalg.norm(residual[:, None, :] - centroids[None, :, :], axis=-1)  # [m, k]
    spare = np.full((len(residual), codebook_size - len(centroids)), dist.max() + 1.0)  # [m, C-k]
    return np.concatenate([dist, spare], axis=1)


def _disambiguate(codes: np.ndarray, residual: np.ndarray, centroids: np.ndarray, codebook_size: int) -> np.ndarray:
    """Give the items of each prefix group distinct last-level codes (changes only the last column).

    codes: `[n, L]`; residual: `[n, d]` input of the last level; centroids: `[k, d]`, k <= C.
    Only groups with a collision are touched; each is solved as an optimal assignment of its
    items to distinct codes, minimising the summed distance to the codes' centroids.
    """
    codes = codes.copy()
    group = _prefix_groups(codes)
    for g in np.unique(group[_duplicated_rows(codes)]):
        members = np.flatnonzero(group == g)
        if len(members) > codebook_size:
            prefix = tuple(codes[members[0], :-1].tolist())
            raise CodebookTooSmallError(
                f"{len(members)} items share the prefix {prefix}, more than the codebook size "
                f"{codebook_size} can tell apart: raise sid_codebook_size or sid_levels; fix: "
                "--sid_codebook_size=256 (the default) or more --sid_levels")
        cost = _assignment_cost(residual[members], centroids, codebook_size)  # [m, C]
        rows, cols = linear_sum_assignment(cost)
        codes[members[rows], -1] = cols
    return codes


def residual_kmeans(x: np.ndarray, levels: int = 4, codebook_size: int = 256, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Quantise `x [n, d]` into unique code tuples.

    Returns:
        codes: `np.int64 [n, levels]`, every row distinct, every code in [0, codebook_size).
        stats: collision_rate_before_resolution (fraction of items whose tuple was shared before
            the last level was disambiguated), codes_used_per_level, distinct_ids, reassigned.
    """
    if levels < 1 or codebook_size < 1:
        raise ValueError(f"need levels >= 1 and codebook_size >= 1, got {levels}, {codebook_size}")
    residual = np.asarray(x, dtype=np.float32)
    codes = np.zeros((len(residual), levels), dtype=np.int64)
    for t in range(levels):
        level_input = residual  # [n, d]; after the loop, what the last level clustered
        codes[:, t], centroids = _kmeans(level_input, codebook_size, seed + t)
        residual = level_input - centroids[codes[:, t]]
    collided = _duplicated_rows(codes)
    resolved = _disambiguate(codes, level_input, centroids, codebook_size)
    stats = {
        "collision_rate_before_resolution": float(collided.mean()) if len(codes) else 0.0,
        "codes_used_per_level": [int(len(np.unique(resolved[:, t]))) for t in range(levels)],
        "distinct_ids": int(len(np.unique(resolved, axis=0))),
        "reassigned": int((resolved[:, -1] != codes[:, -1]).sum()),
    }
    return resolved, stats
