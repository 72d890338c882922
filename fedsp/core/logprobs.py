"""Token and sequence log-probabilities from language-model logits.

Every self-play objective in fedsp (SFT, unlikelihood, SPIN/DPO, TPAW, GRPO) consumes
log π(y_t | x, y_<t) of the tokens actually emitted; this module computes them once,
in float32 whatever the model's dtype (the log-normaliser of a 49k-way softmax loses
several digits in bfloat16).

Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsp.core import checks


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Log-probability of each target token: log softmax(logits)[b, t, targets[b, t]].

    Computed as ``logits[target] - logsumexp(logits)`` in float32 (or float64 under
    x64), which never materialises the full [B, T, V] log-softmax a second time.

    Args:
      logits: [B, T, V] next-token logits, any float dtype. ``logits[:, t]`` must
        already be aligned with ``targets[:, t]`` (the usual shift by one is the
        caller's job).
      targets: [B, T] integer token ids in [0, V). An id outside that range, negative
        ids included, gives NaN at that position: give padded positions a valid id and
        mask them, or use `sequence_logprobs`, which ignores ids under a zero mask.

    Returns:
      [B, T] float32 log-probabilities (≤ 0).

    Raises:
      ValueError: if ``logits`` is not rank 3, ``targets`` is not [B, T] or not integer.
    """
    checks.check_rank("logits", logits, 3, "B, T, V")
    batch, length, _ = jnp.shape(logits)
    checks.check_shape("targets", targets, "B, T", (batch, length))
    checks.check_integer("targets", targets)
    logits = checks.upcast_float(logits)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    # No wrap-around for negative ids: -1 must not silently read the last vocab entry.
    picked = jnp.take_along_axis(
        logits, targets[..., None], axis=-1, mode="fill", wrap_negative_indices=False
    )[..., 0]
    return picked - log_normalizer


def sequence_logprobs(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    average: bool = False,
) -> jax.Array:
    """Log-probability of each masked sequence: Σ_t mask·log p, or its masked mean.

    The sum is log π(y | x) as used by SPIN, DPO and TPAW; ``average=True`` gives the
    length-normalised form (SimPO/IPO-style scoring, multiple-choice ranking).

    Args:
      logits: [B, T, V] next-token logits aligned with ``targets``.
      targets: [B, T] integer token ids. Where ``mask`` is 0 the id is ignored, so
        padding may hold any integer (e.g. -100 as in Hugging Face labels).
      mask: [B, T] 0/1 float or bool; nonzero marks the tokens that belong to y.
      average: divide by the number of masked tokens instead of summing.

    Returns:
      [B] float32. A row whose mask is all zero gives 0 (not NaN) in both modes.

    Raises:
      ValueError: on wrong ranks or mismatched shapes.
    """
    checks.check_rank("logits", logits, 3, "B, T, V")
    batch, length, _ = jnp.shape(logits)
    checks.check_shape("targets", targets, "B, T", (batch, length))
    checks.check_shape("mask", mask, "B, T", (batch, length))
    checks.check_integer("targets", targets)
    valid = checks.as_bool_mask("mask", mask)
    # Out-of-range padding ids would gather NaN, and NaN survives a multiply by 0.
    targets = jnp.where(valid, targets, 0)
    token_lp = jnp.where(valid, token_logprobs(logits, targets), 0.0)
    total = jnp.sum(token_lp, axis=-1)
    if not average:
        return total
    count = jnp.sum(valid, axis=-1).astype(total.dtype)
    return total / jnp.maximum(count, 1.0)
