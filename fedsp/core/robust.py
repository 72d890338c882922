"""Robust aggregation of client updates over the kept clients of a round.

Every aggregator takes the clients' parameters stacked [C, ...], their weights [C] and a
``keep`` mask [C] (clients rejected or pruned by the server step are False) and returns
one tree like a client's, which the server optimizer then steps towards. They are pure
and jit-able: the number of kept clients n is a traced value, so no shape depends on it.

  mean               Σ_k w_k θ_k / Σ_k w_k (FedAvg; the weights carry advantage weighting).
  norm_bounded_mean  the same mean of θ_r + clip(θ_k − θ_r, bound): each client moves the
                     mean by at most bound · w_k / Σ w (Sun et al. 2019).
  trimmed_mean       per coordinate, drop the ⌊β·n⌋ largest and smallest kept values and
                     average the rest, unweighted (Yin et al. 2018).
  median             per coordinate, the median of the kept values, unweighted (Yin et
                     al. 2018); the mean of the middle two for even n, as ``np.median``.
  krum / multi_krum  score each kept client by the summed squared distances to its
                     n − f − 2 nearest kept neighbours (at least 1); Krum returns the
                     best-scored client, Multi-Krum the weighted mean of the m best
                     (Blanchard et al. 2017).

Advantage weights compose with mean, norm_bounded_mean and multi_krum (weighted means);
trimmed_mean, median and krum are order statistics that ignore the weights, so there the
weights only decide who is kept (advantage pruning).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedsp.core import checks
from fedsp.core.aggregation import clip_update

__all__ = [
    "AGGREGATORS",
    "clipped_changes",
    "krum",
    "krum_scores",
    "masked_median",
    "masked_trimmed_mean",
    "norm_bounded_mean",
    "robust_aggregate",
    "weighted_mean_of",
]

PyTree = Any
AGGREGATORS = ("mean", "norm_bounded_mean", "trimmed_mean", "median", "krum", "multi_krum")


def _mask(keep: jax.Array, leaf: jax.Array) -> jax.Array:
    return keep.reshape((-1,) + (1,) * (leaf.ndim - 1))


def weighted_mean_of(stacked: PyTree, weights: jax.Array) -> PyTree:
    """Σ_k w_k x_k / Σ_k w_k per leaf, in float32 (0 where Σ w = 0), in the leaves' dtypes."""
    total = jnp.sum(weights)
    safe = jnp.where(total > 0, total, 1.0)

    def leaf(x):
        w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        mean = jnp.sum(w * checks.upcast_float(x), axis=0) / safe
        return mean.astype(x.dtype)

    return jax.tree.map(leaf, stacked)


def norm_bounded_mean(
    server_params: PyTree, stacked: PyTree, weights: jax.Array, bound: float
) -> PyTree:
    """The weighted mean of θ_r + clip(θ_k − θ_r) with each delta's global L2 norm
    clipped to ``bound``."""
    clipped = jax.tree.map(
        lambda d, s: (checks.upcast_float(s)[None] + d).astype(s.dtype),
        clipped_changes(server_params, stacked, bound),
        server_params,
    )
    return weighted_mean_of(clipped, weights)


def clipped_changes(server_params: PyTree, stacked: PyTree, bound: float) -> PyTree:
    """[C, ...] float32: each client's θ_k − θ_r clipped to global L2 norm ``bound``
    (`fedsp.core.aggregation.clip_update` per client)."""
    deltas = jax.tree.map(
        lambda c, s: checks.upcast_float(c) - checks.upcast_float(s)[None], stacked, server_params
    )
    clipped, _ = jax.vmap(clip_update, in_axes=(0, None))(deltas, bound)
    return clipped


def masked_trimmed_mean(stacked: PyTree, keep: jax.Array, fraction: float) -> PyTree:
    """Per coordinate, the mean of the kept values without the ⌊fraction·n⌋ largest and
    smallest (n kept clients), unweighted; ``fraction`` in [0, 0.5)."""
    n = jnp.sum(keep)
    trim = jnp.floor(fraction * n).astype(jnp.int32)

    def leaf(x):
        values = jnp.where(_mask(keep, x), checks.upcast_float(x), jnp.inf)
        ordered = jnp.sort(values, axis=0)  # the dropped clients' +inf sort last
        rank = jnp.arange(x.shape[0]).reshape(_mask(keep, x).shape)
        inside = (rank >= trim) & (rank < n - trim)
        count = jnp.maximum(n - 2 * trim, 1)
        mean = jnp.sum(jnp.where(inside, ordered, 0.0), axis=0) / count
        return mean.astype(x.dtype)

    return jax.tree.map(leaf, stacked)


def masked_median(stacked: PyTree, keep: jax.Array) -> PyTree:
    """Per coordinate, the median of the kept values (``np.median`` of them)."""

    def leaf(x):
        values = jnp.where(_mask(keep, x), checks.upcast_float(x), jnp.nan)
        return jnp.nanmedian(values, axis=0).astype(x.dtype)

    return jax.tree.map(leaf, stacked)


def krum_scores(stacked: PyTree, keep: jax.Array, num_byzantine: int) -> jax.Array:
    """[C] Krum scores: for a kept client, the sum of squared distances to its
    max(1, n − f − 2) nearest kept clients; +inf for the others."""
    flat = jnp.concatenate(
        [checks.upcast_float(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(stacked)], axis=1
    )
    sq = jnp.sum(flat**2, axis=1)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    c = flat.shape[0]
    valid = keep[:, None] & keep[None, :] & ~jnp.eye(c, dtype=bool)
    ordered = jnp.sort(jnp.where(valid, dist, jnp.inf), axis=1)
    n = jnp.sum(keep)
    closest = jnp.maximum(n - num_byzantine - 2, 1)
    take = jnp.arange(c)[None, :] < closest
    scores = jnp.sum(jnp.where(take, ordered, 0.0), axis=1)
    return jnp.where(keep, scores, jnp.inf)


def krum(
    stacked: PyTree,
    keep: jax.Array,
    weights: jax.Array,
    num_byzantine: int,
    num_selected: int = 1,
) -> PyTree:
    """Krum (``num_selected`` = 1: the best-scored client's parameters) or Multi-Krum (the
    ``weights``-weighted mean of the ``num_selected`` best-scored kept clients)."""
    scores = krum_scores(stacked, keep, num_byzantine)
    order = jnp.argsort(scores)
    chosen = jnp.zeros_like(keep).at[order[:num_selected]].set(True) & keep
    if num_selected == 1:
        return jax.tree.map(lambda x: x[order[0]], stacked)
    return weighted_mean_of(stacked, jnp.where(chosen, weights, 0.0))


def robust_aggregate(
    name: str,
    server_params: PyTree,
    stacked: PyTree,
    weights: jax.Array,
    keep: jax.Array,
    *,
    trim_fraction: float = 0.1,
    num_byzantine: int = 0,
    num_selected: int = 1,
    norm_bound: float = 1.0,
) -> PyTree:
    """The aggregate ``name`` (one of `AGGREGATORS`) of the kept clients' parameters."""
    if name == "mean":
        return weighted_mean_of(stacked, weights)
    if name == "norm_bounded_mean":
        return norm_bounded_mean(server_params, stacked, weights, norm_bound)
    if name == "trimmed_mean":
        return masked_trimmed_mean(stacked, keep, trim_fraction)
    if name == "median":
        return masked_median(stacked, keep)
    if name == "krum":
        return krum(stacked, keep, weights, num_byzantine, 1)
    if name == "multi_krum":
        return krum(stacked, keep, weights, num_byzantine, num_selected)
    raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {name!r}")
