"""Baselines, advantages and advantage-weighted-regression (AWR) weights.

Advantage-weighted federation scores every sample, and every client, by how much
better than expected it did: A = r − b, with b a running expectation of the reward
(`ema_baseline`) or the mean of a group of samples for the same prompt
(`group_advantages`, GRPO). Inside a client, `awr_weights` turns advantages into
per-sequence weights for the SFT loss (Peng et al. 2019, "Advantage-Weighted
Regression", arXiv 1910.00177); at the server, `fedsp.core.weighting.client_weights`
turns client mean advantages into aggregation weights.

Shapes: B batch, G samples per prompt (group).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsp.core import checks

# exp(80) ≈ 5.5e34 is finite in float32 (whose exp overflows just above 88.7), so capping
# the exponent here keeps AWR weights and their gradients finite even for max_weight=inf.
_MAX_EXPONENT = 80.0


def advantages(rewards: jax.Array, baseline: jax.Array | float) -> jax.Array:
    """A = r − b for each sample.

    Args:
      rewards: [B] rewards.
      baseline: a scalar (e.g. from `ema_baseline`) or [B] per-sample baselines.

    Returns:
      [B] float32 advantages.

    Raises:
      ValueError: if ``rewards`` is not rank 1 or ``baseline`` is neither a scalar nor [B].
    """
    checks.check_rank("rewards", rewards, 1, "B")
    (batch,) = jnp.shape(rewards)
    if jnp.ndim(baseline) != 0:
        checks.check_shape("baseline", baseline, "B", (batch,))
    return checks.upcast_float(rewards) - checks.upcast_float(baseline)


def group_advantages(rewards: jax.Array, normalize: bool = True, eps: float = 1e-6) -> jax.Array:
    """GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, §4.1.2).

    With G samples per prompt, Â_{b,g} = (r_{b,g} − mean_g r_b) / (std_g r_b + eps) when
    ``normalize``, else r_{b,g} − mean_g r_b. The standard deviation is the unbiased one
    (ddof = 1), as in TRL's and tunix's GRPO; a group whose rewards are all equal gets
    advantage 0 everywhere. With G = 1 the advantages are 0 (a lone sample has no peer to
    be compared with) rather than NaN.

    Args:
      rewards: [B, G] rewards, one row per prompt.
      normalize: divide by the group standard deviation.
      eps: added to the standard deviation; bounds the scale of near-constant groups.

    Returns:
      [B, G] float32 advantages; each row sums to 0.

    Raises:
      ValueError: if ``rewards`` is not rank 2 or ``eps`` is negative.
    """
    checks.check_rank("rewards", rewards, 2, "B, G")
    checks.check_interval("eps", eps, 0.0)
    rewards = checks.upcast_float(rewards)
    group_size = jnp.shape(rewards)[-1]
    if normalize and group_size < 2:
        return jnp.zeros_like(rewards)
    # Rounding in the mean leaves ~1e-7·|r| in a constant group, which the division by
    # (std + eps) would blow up to O(1) advantages: such groups carry no signal, so pin
    # them to 0 exactly.
    constant = jnp.all(rewards == rewards[:, :1], axis=-1, keepdims=True)
    deviations = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
    centered = jnp.where(constant, 0.0, deviations)
    if not normalize:
        return centered
    variance = jnp.sum(jnp.square(deviations), axis=-1, keepdims=True) / (group_size - 1)
    # sqrt has an infinite derivative at 0; constant groups take sqrt(1) instead so their
    # (zero) advantages also have finite, zero gradients.
    std = jnp.sqrt(jnp.where(constant, 1.0, variance))
    return centered / (std + eps)


def ema_baseline(prev: jax.Array | float | None, rewards: jax.Array, decay: float) -> jax.Array:
    """Exponential moving average of the mean reward: b ← decay·b + (1 − decay)·mean(r).

    First round: pass ``prev=None`` and the baseline starts at mean(rewards) (no bias
    toward an arbitrary initial value, hence no bias correction is needed). Rewards
    with zero elements leave the baseline unchanged (0 when ``prev`` is None too), so a
    client that collected no samples this round does not poison its baseline with NaN.

    Args:
      prev: the previous baseline (scalar) or None for the first round.
      rewards: rewards of any shape; all elements are averaged.
      decay: weight of the past in [0, 1]; 0 tracks the latest batch only.

    Returns:
      The new baseline, a float32 scalar.

    Raises:
      ValueError: if ``decay`` is outside [0, 1] or ``prev`` is not a scalar.
    """
    checks.check_interval("decay", decay, 0.0, 1.0)
    if prev is not None and jnp.ndim(prev) != 0:
        raise ValueError(f"prev must be a scalar or None, got shape {tuple(jnp.shape(prev))}")
    rewards = checks.upcast_float(rewards)
    if rewards.size == 0:
        return jnp.zeros((), rewards.dtype) if prev is None else checks.upcast_float(prev)
    batch_mean = jnp.mean(rewards)
    if prev is None:
        return batch_mean
    return decay * checks.upcast_float(prev) + (1.0 - decay) * batch_mean


def awr_weights(adv: jax.Array, temperature: float, max_weight: float) -> jax.Array:
    """AWR sample weights w = min(exp(A / temperature), max_weight) (Peng et al. 2019, eq. 7).

    The exponent is clipped at log(max_weight) *before* exponentiating, which gives the
    same value as the formula, never overflows to inf, and has the formula's gradient
    (0 on the capped side) without an inf·0 = NaN in the backward pass.

    Args:
      adv: [B] advantages.
      temperature: β in the AWR paper, > 0; smaller is greedier.
      max_weight: cap on each weight, > 0 (AWR uses 20); ``jnp.inf`` disables it.

    Returns:
      [B] float32 weights in (0, max_weight].

    Raises:
      ValueError: if ``adv`` is not rank 1, ``temperature`` ≤ 0 or ``max_weight`` ≤ 0.
    """
    checks.check_rank("adv", adv, 1, "B")
    checks.check_interval("temperature", temperature, 0.0, low_open=True)
    checks.check_interval("max_weight", max_weight, 0.0, low_open=True)
    adv = checks.upcast_float(adv)
    cap = jnp.minimum(jnp.log(jnp.asarray(max_weight, adv.dtype)), _MAX_EXPONENT)
    return jnp.exp(jnp.minimum(adv / temperature, cap))
