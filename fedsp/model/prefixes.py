"""What a sampler call starts from besides its prompts: shared heads and cached rows.

`generate` (`fedsp.model.sampling`) prefills a prompt batch after either shared prompt
heads (`shared_prefixes`: each distinct head once, rows pointing at theirs) or keys and
values an earlier call computed (`PrefixCache`, assembled for a new batch by
`gather_prefix`). Lengths are rounded up to buckets (`bucket_length`) so the compiled
programs stay few.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedsp.distributed import to_host

__all__ = [
    "PrefixCache",
    "bucket_length",
    "check_left_padded",
    "check_prefix_cache",
    "gather_prefix",
    "shared_prefixes",
]


class PrefixCache(NamedTuple):
    """Keys and values a sampler call computed, per row, to continue from later.

    ``k``/``v``: [L, B, K, S, hd]; ``mask``: [B, S] True for the slots that hold one of
    the row's tokens. A row's real slots, in slot order, hold its prompt (prefix
    included) and then its generated tokens but the last (a token's key/value is
    computed when it is fed, and the last one never is). Passed back as `generate`'s
    ``prefix_cache`` (rows gathered and masked as needed), it stands for those tokens:
    only the rest of a prompt is prefilled.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array


def bucket_length(n: int, multiple: int = 64) -> int:
    """Rounds n up to a power of two below ``multiple`` (min 8), else to a multiple of it."""
    if n <= 0:
        raise ValueError(f"length must be positive, got {n}")
    if n >= multiple:
        return -(-n // multiple) * multiple
    return max(8, 1 << (n - 1).bit_length())


def shared_prefixes(prefix_ids, prefix_mask, prefix_index, batch, pad_id, bucket_multiple):
    """(ids [U, L0], mask [U, L0], index [B]) of `generate`'s shared prefixes, or None;
    L0 is left-padded up to its bucket like the prompts, so it adds no recompilation."""
    if prefix_ids is None:
        if prefix_mask is not None or prefix_index is not None:
            raise ValueError("prefix_mask and prefix_index need prefix_ids")
        return None
    ids = np.asarray(prefix_ids, np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(
            f"prefix_ids must be [L0] or [U, L0] token ids with L0 >= 1, got "
            f"shape {np.shape(prefix_ids)}"
        )
    mask = np.ones(ids.shape, bool) if prefix_mask is None else np.asarray(prefix_mask, bool)
    if mask.shape != ids.shape:
        raise ValueError(
            f"prefix_mask must have the shape of prefix_ids {ids.shape}, got {mask.shape}"
        )
    check_left_padded(mask)
    index = (
        np.zeros((batch,), np.int32) if prefix_index is None else np.asarray(prefix_index, np.int32)
    )
    if index.shape != (batch,) or index.min() < 0 or index.max() >= ids.shape[0]:
        raise ValueError(
            f"prefix_index must hold one prefix in [0, {ids.shape[0]}) per row "
            f"({batch}), got {index.tolist()}"
        )
    left = ((0, 0), (bucket_length(ids.shape[1], bucket_multiple) - ids.shape[1], 0))
    ids = np.pad(np.where(mask, ids, pad_id).astype(np.int32), left, constant_values=pad_id)
    return jnp.asarray(ids), jnp.asarray(np.pad(mask, left)), jnp.asarray(index)


def gather_prefix(
    sources: Sequence[tuple[PrefixCache, int]], keep: Sequence[int], bucket_multiple: int = 64
) -> PrefixCache:
    """A ``prefix_cache`` for a new batch from rows of earlier calls' caches.

    Row r of the result is row ``sources[r][1]`` of cache ``sources[r][0]``, cut to its
    first ``keep[r]`` cached tokens (the tokens it shares with its new prompt; later slots
    are masked out). Caches of different slot counts are right-padded with masked slots
    to a common bucketed width, so the new call's programs stay few.
    """
    if len(sources) != len(keep) or not sources:
        raise ValueError(
            f"need one keep count per source row, got {len(sources)} rows and {len(keep)} counts"
        )
    if min(keep) < 1:
        raise ValueError(f"every row must keep at least one cached token, got {list(keep)}")
    caches = list({id(c): c for c, _ in sources}.values())
    width = bucket_length(max(c.k.shape[3] for c in caches), bucket_multiple)
    offset, start = {}, 0
    for cache in caches:
        offset[id(cache)], start = start, start + cache.k.shape[1]

    index = np.asarray([offset[id(c)] + i for c, i in sources])
    # Every cache's slot axis right-padded to `width` with masked slots, their rows
    # stacked, each new row taken from them.
    mask = np.concatenate(
        [
            np.pad(to_host(c.mask).astype(bool), ((0, 0), (0, width - c.mask.shape[1])))
            for c in caches
        ]
    )[index]
    real = np.cumsum(mask, axis=1)
    short = [r for r in range(len(sources)) if real[r, -1] < keep[r]]
    if short:
        raise ValueError(f"rows {short} keep more tokens than their cache holds")
    mask &= real <= np.asarray(keep)[:, None]

    def rows_of(arrays):
        slots = ((0, 0), (0, 0), (0, 0))
        padded = [jnp.pad(x, (*slots, (0, width - x.shape[3]), (0, 0))) for x in arrays]
        return jnp.take(jnp.concatenate(padded, axis=1), index, axis=1)

    k, v = rows_of([c.k for c in caches]), rows_of([c.v for c in caches])
    return PrefixCache(k, v, jnp.asarray(mask))


def check_prefix_cache(cache: PrefixCache, batch: int) -> PrefixCache:
    """``cache`` checked as a ``prefix_cache`` of a ``batch``-row call (mask as bool)."""
    k, v, mask = cache
    if k.ndim != 5 or k.shape != v.shape or k.shape[1] != batch:
        raise ValueError(
            f"prefix_cache k/v must both be [L, {batch}, K, S, hd], got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if tuple(mask.shape) != (batch, k.shape[3]):
        raise ValueError(
            f"prefix_cache mask must be [{batch}, {k.shape[3]}], got {tuple(mask.shape)}"
        )
    if not isinstance(mask, jax.core.Tracer) and not np.asarray(mask).any(axis=1).all():
        raise ValueError("every row of prefix_cache mask needs at least one real slot")
    return PrefixCache(k, v, jnp.asarray(mask, jnp.bool_))


def check_left_padded(prompt_mask: Any) -> None:
    """Raises unless every row of ``prompt_mask`` is 0s then 1s, ending with a 1."""
    if isinstance(prompt_mask, jax.core.Tracer):
        return
    m = np.asarray(prompt_mask).astype(bool)
    if not m[:, -1].all():
        rows = np.flatnonzero(~m[:, -1]).tolist()
        raise ValueError(
            f"prompt_mask rows {rows} do not end with a real token; prompts must be "
            "left-padded and non-empty"
        )
    if (m[:, :-1] & ~m[:, 1:]).any():
        raise ValueError("prompt_mask has a 1 followed by a 0; prompts must be left-padded")
