"""Choosing the next token from logits: greedy, tempered, or from the top-p nucleus.

Sampling cost matters on CPU, where a full-vocabulary sort or argmax costs more than a
decode step's matmuls: greedy uses max + a masked min over indices; nucleus sampling
(Holtzman et al. 2020) takes the top ``TOP_K_CANDIDATES`` tokens and inverts their CDF
with one uniform per row, and only when the nucleus is larger than that falls back to an
exact bisection for the probability threshold plus a blocked inverse CDF over the whole
vocabulary. Both paths draw from exactly the nucleus distribution (HF's top-p: the
smallest set of most likely tokens whose tempered mass reaches top_p).

Every row draws from its own key ([B] keys), so a row's token does not depend on the
other rows of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TOP_K_CANDIDATES = 64
_CDF_BLOCK = 256


def select_tokens(logits, key, *, temperature, top_p, greedy, use_top_p):
    """Picks one token per row of logits [B, V] f32; returns (tokens [B], log π(token) [B])."""
    v = logits.shape[-1]
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    shifted = logits - row_max
    # XLA:CPU's variadic argmax reduce is much slower than max; take the first max index.
    if greedy:
        iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        tok = jnp.min(jnp.where(shifted == 0.0, iota, v), axis=-1)
        log_z = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    else:
        tok, log_z = sample_nucleus(shifted, key, temperature, top_p, use_top_p)
    lp = jnp.take_along_axis(shifted, tok[:, None], axis=-1)[:, 0] - log_z
    return tok.astype(jnp.int32), lp


def sample_nucleus(shifted, key, temperature, top_p, use_top_p):
    """Draws from softmax(shifted / T) restricted to the top-p nucleus.

    Returns the tokens [B] and log Σ exp(shifted) [B] (the untempered normaliser).
    """
    v = shifted.shape[-1]
    u = _uniform(key)
    weights = jnp.exp(shifted / temperature)  # tempered, unnormalised; max is 1
    total = jnp.sum(weights, axis=-1)
    log_z = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    if not use_top_p:
        return blocked_inverse_cdf(weights, u * total), log_z

    k = min(TOP_K_CANDIDATES, v)
    top_w, top_idx = jax.lax.top_k(weights, k)  # descending
    top_p_mass = top_w / total[:, None]
    cum = jnp.cumsum(top_p_mass, axis=-1)
    keep = (cum - top_p_mass) < top_p  # mass strictly above the token is below top_p
    kept = jnp.where(keep, top_w, 0.0)
    kept_cum = jnp.cumsum(kept, axis=-1)
    j = jnp.sum(kept_cum <= (u * kept_cum[:, -1])[:, None], axis=-1)
    tok_k = jnp.take_along_axis(top_idx, jnp.minimum(j, k - 1)[:, None], axis=-1)[:, 0]
    covered = cum[:, -1] >= top_p

    def full_vocab(_):
        probs = weights / total[:, None]
        threshold = nucleus_threshold(probs, top_p)
        nucleus = jnp.where(probs >= threshold[:, None], weights, 0.0)
        tok = blocked_inverse_cdf(nucleus, u * jnp.sum(nucleus, axis=-1))
        return jnp.where(covered, tok_k, tok)

    tok = jax.lax.cond(jnp.all(covered), lambda _: tok_k, full_vocab, None)
    return tok, log_z


def nucleus_threshold(probs, top_p):
    """Largest τ with Σ_{p ≥ τ} p ≥ top_p, per row of probs [B, V] (exact in float32).

    Bisection over the int32 bit patterns of non-negative floats, which are ordered like
    the floats themselves, so 31 halvings pin τ to a single float.
    """
    b = probs.shape[0]
    lo = jnp.zeros((b,), jnp.int32)  # bits of 0.0: always feasible
    hi = jnp.full((b,), np.float32(1.0).view(np.int32), jnp.int32)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        tau = jax.lax.bitcast_convert_type(mid, jnp.float32)
        mass = jnp.sum(jnp.where(probs >= tau[:, None], probs, 0.0), axis=-1)
        ok = mass >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 31, step, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def blocked_inverse_cdf(weights, target):
    """First index whose running sum of weights [B, V] exceeds target [B].

    Two levels (block sums, then one block) instead of a V-long cumsum, which XLA:CPU
    runs slowly.
    """
    b, v = weights.shape
    block = min(_CDF_BLOCK, v)
    n_blocks = -(-v // block)
    padded = jnp.pad(weights, ((0, 0), (0, n_blocks * block - v))).reshape(b, n_blocks, block)
    block_cum = jnp.cumsum(jnp.sum(padded, axis=-1), axis=-1)
    bi = jnp.minimum(jnp.sum(block_cum <= target[:, None], axis=-1), n_blocks - 1)
    before = jnp.where(
        bi > 0, jnp.take_along_axis(block_cum, jnp.maximum(bi - 1, 0)[:, None], axis=-1)[:, 0], 0.0
    )
    inner = jnp.take_along_axis(padded, bi[:, None, None], axis=1)[:, 0]
    wi = jnp.sum(jnp.cumsum(inner, axis=-1) + before[:, None] <= target[:, None], axis=-1)
    # Rounding between the two levels can overshoot the block; fall back to its last
    # token with positive weight so a zero-weight (filtered) token is never drawn.
    iota = jax.lax.broadcasted_iota(jnp.int32, inner.shape, 1)
    last = jnp.max(jnp.where(inner > 0, iota, 0), axis=-1)
    return bi * block + jnp.minimum(wi, last)


def _uniform(keys: jax.Array) -> jax.Array:
    """[B] uniforms in [0, 1), one from each row's key."""
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
