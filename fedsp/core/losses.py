"""Training objectives of fedsp's client algorithms, as pure functions of log-probs.

Every loss takes log-probabilities (from `fedsp.core.logprobs`), explicit masks and
hyper-parameters, and returns ``(loss, metrics)``: a float32 scalar and a dict of
float32 scalars. Metrics that must be combined across micro-batches or devices come
with their (sum, count) parts, e.g. ``nll_sum`` and ``num_tokens``.

- `sft_loss`: token-mean negative log-likelihood, optionally AWR-weighted per sequence.
- `unlikelihood_loss`, `spear_loss`: SPEAR (arXiv 2605.07977): likelihood on correct
  completions plus confidence-weighted unlikelihood (Welleck et al. 2020,
  arXiv 1908.04319) on confidently wrong tokens.
- `spin_loss` (Chen et al. 2024, arXiv 2401.01335), `dpo_loss` (Rafailov et al. 2023,
  arXiv 2305.18290): the pairwise logistic loss on implicit reward margins.
- `tpaw_loss`: TPAW (arXiv 2605.09922): SPIN against a team of players with response
  and player weights (`fedsp.core.weighting`).
- `grpo_loss`: GRPO (Shao et al. 2024, arXiv 2402.03300): PPO-clipped surrogate with
  group advantages and a k3 KL penalty to a reference policy.

Pairwise losses report ``reward_pos``/``reward_neg`` (chosen/rejected for DPO),
``margin`` and ``accuracy`` (fraction of pairs with margin > 0), and accept an optional
per-pair ``mask`` [B] so fixed-shape batches can carry padding rows.

Shapes: B batch, T tokens, J players.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsp.core import checks, weighting

Metrics = dict[str, jax.Array]

# SPEAR's clamp p ≤ 1 − 1e-7 written as 1 − p ≥ 1e-7: −log(1 − p) then stays ≤ 16.1.
_UNLIKELIHOOD_MIN_ONE_MINUS_P = 1e-7


def _count(valid: jax.Array) -> jax.Array:
    return jnp.sum(valid).astype(jnp.float32)


def _safe_divide(numerator: jax.Array, count: jax.Array) -> jax.Array:
    """numerator / count, with 0 (not NaN) when count is 0."""
    return numerator / jnp.maximum(count, 1.0)


def _pair_mask(mask: jax.Array | None, batch: int) -> jax.Array:
    if mask is None:
        return jnp.ones((batch,), bool)
    checks.check_shape("mask", mask, "B", (batch,))
    return checks.as_bool_mask("mask", mask)


def _check_token_inputs(logps_name: str, logps: jax.Array, mask_name: str, mask: jax.Array) -> None:
    checks.check_rank(logps_name, logps, 2, "B, T")
    checks.check_shape(mask_name, mask, "B, T", jnp.shape(logps))


def sft_loss(
    token_logps: jax.Array, mask: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """Token-mean negative log-likelihood: L = Σ_{b,t} w_b·m_{b,t}·(−log p_{b,t}) / Σ m.

    The denominator is the number of masked tokens, not Σ w·m: with AWR weights
    (`fedsp.core.advantage.awr_weights`) this is the AWR objective E[w·(−log π)], so the
    weights' overall scale acts as a learning-rate factor, as in Peng et al. (2019).
    Weights are used as given; pass constants (advantages carry no gradient).

    Args:
      token_logps: [B, T] log-probs of the target tokens.
      mask: [B, T] 0/1 float or bool; nonzero marks tokens to train on.
      weights: optional [B] per-sequence weights multiplying each sequence's tokens.

    Returns:
      (loss, metrics) with metrics ``loss``, ``nll`` (unweighted token-mean NLL),
      ``nll_sum`` and ``num_tokens``. An all-zero mask gives loss 0.

    Raises:
      ValueError: on wrong ranks or mismatched shapes.
    """
    _check_token_inputs("token_logps", token_logps, "mask", mask)
    batch = jnp.shape(token_logps)[0]
    valid = checks.as_bool_mask("mask", mask)
    # where() before the arithmetic: padding may hold -inf/NaN log-probs, and a NaN
    # multiplied by a zero mask is still NaN in the value and the gradient.
    nll = jnp.where(valid, -checks.upcast_float(token_logps), 0.0)
    num_tokens = _count(valid)
    nll_sum = jnp.sum(nll)
    if weights is None:
        weighted_sum = nll_sum
    else:
        checks.check_shape("weights", weights, "B", (batch,))
        weighted_sum = jnp.sum(nll * checks.upcast_float(weights)[:, None])
    loss = _safe_divide(weighted_sum, num_tokens)
    metrics = {
        "loss": loss,
        "nll": _safe_divide(nll_sum, num_tokens),
        "nll_sum": nll_sum,
        "num_tokens": num_tokens,
    }
    return loss, metrics


def unlikelihood_loss(
    token_logps: jax.Array, mask: jax.Array, margin: float, confidence: jax.Array
) -> tuple[jax.Array, Metrics]:
    """SPEAR's confidence-weighted unlikelihood on the tokens of wrong answers.

    With p = exp(log p) per token,

        ul_{b,t} = −log(1 − p_{b,t})   if mask_{b,t} and p_{b,t} > margin, else 0,
        L = (Σ_{b,t} ul_{b,t} / Σ_{b,t} mask_{b,t}) · mean_b confidence_b.

    Only tokens the model was confident in (p > margin) are pushed down. The
    denominator counts *all* masked tokens, including those at or below the margin, as
    the SPEAR reference does, so the loss shrinks as fewer tokens stay confident. The
    confidence mean runs over rows with at least one masked token (all rows, as in the
    reference, unless padding rows are present; they must not dilute it).

    1 − p is computed as −expm1(log p) and clamped to ≥ 1e-7 (the reference's clamp
    p ≤ 1 − 1e-7): values and gradients stay finite as log p → 0, and, like the
    reference's clamp, a token beyond it contributes the constant 16.1 with zero gradient.

    Args:
      token_logps: [B, T] log-probs of the wrong answer's tokens.
      mask: [B, T] 0/1 float or bool; nonzero marks the tokens to push down (SPEAR:
        the tail of a confidently wrong answer).
      margin: probability threshold in [0, 1); tokens with p ≤ margin are ignored.
      confidence: [B] per-answer confidence (`fedsp.core.weighting.spear_confidence`).

    Returns:
      (loss, metrics) with ``loss``, ``ul_sum``, ``num_tokens``, ``active_frac``
      (fraction of masked tokens with p > margin) and ``confidence_mean``. An all-zero
      mask gives loss 0.

    Raises:
      ValueError: on wrong ranks, mismatched shapes or ``margin`` outside [0, 1).
    """
    _check_token_inputs("token_logps", token_logps, "mask", mask)
    batch = jnp.shape(token_logps)[0]
    checks.check_shape("confidence", confidence, "B", (batch,))
    checks.check_interval("margin", margin, 0.0, 1.0, high_open=True)
    valid = checks.as_bool_mask("mask", mask)
    logps = jnp.where(valid, checks.upcast_float(token_logps), -1.0)
    active = valid & (jnp.exp(logps) > margin)
    one_minus_p = jnp.maximum(-jnp.expm1(logps), _UNLIKELIHOOD_MIN_ONE_MINUS_P)
    ul = jnp.where(active, -jnp.log(one_minus_p), 0.0)

    num_tokens = _count(valid)
    rows = jnp.any(valid, axis=-1)
    confidence = jnp.where(rows, checks.upcast_float(confidence), 0.0)
    confidence_mean = _safe_divide(jnp.sum(confidence), _count(rows))
    ul_sum = jnp.sum(ul)
    loss = _safe_divide(ul_sum, num_tokens) * confidence_mean
    metrics = {
        "loss": loss,
        "ul_sum": ul_sum,
        "num_tokens": num_tokens,
        "active_frac": _safe_divide(_count(active), num_tokens),
        "confidence_mean": confidence_mean,
    }
    return loss, metrics


def spear_loss(
    win_logps: jax.Array,
    win_mask: jax.Array,
    lose_logps: jax.Array,
    lose_mask: jax.Array,
    confidence: jax.Array,
    lambda_win: float,
    lambda_lose: float,
    margin: float,
    win_weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """SPEAR client objective: L = lambda_win·L_sft(win) + lambda_lose·L_ul(lose).

    Correct completions (first answers judged right and successful revisions) are
    trained by likelihood; confidently wrong answers by `unlikelihood_loss`. The two
    batches have independent shapes [B_w, T_w] and [B_l, T_l]. A lose batch with an
    all-zero mask (no wrong answer this step) contributes exactly 0, and so does an
    empty win batch.

    Args:
      win_logps: [B_w, T_w] token log-probs of correct completions.
      win_mask: [B_w, T_w] completion-token mask.
      lose_logps: [B_l, T_l] token log-probs of wrong answers.
      lose_mask: [B_l, T_l] mask of the tokens to push down.
      confidence: [B_l] per-answer confidence.
      lambda_win: weight of the likelihood term.
      lambda_lose: weight of the unlikelihood term.
      margin: probability threshold of the unlikelihood term, in [0, 1).
      win_weights: optional [B_w] per-sequence (AWR) weights of the likelihood term.

    Returns:
      (loss, metrics): ``loss``, ``sft_loss``, ``ul_loss``, ``win_tokens``,
      ``lose_tokens``, ``ul_active_frac``, ``confidence_mean``.

    Raises:
      ValueError: on wrong ranks or mismatched shapes.
    """
    _check_token_inputs("win_logps", win_logps, "win_mask", win_mask)
    _check_token_inputs("lose_logps", lose_logps, "lose_mask", lose_mask)
    win_loss, win_metrics = sft_loss(win_logps, win_mask, win_weights)
    lose_loss, lose_metrics = unlikelihood_loss(lose_logps, lose_mask, margin, confidence)
    loss = lambda_win * win_loss + lambda_lose * lose_loss
    metrics = {
        "loss": loss,
        "sft_loss": win_loss,
        "ul_loss": lose_loss,
        "win_tokens": win_metrics["num_tokens"],
        "lose_tokens": lose_metrics["num_tokens"],
        "ul_active_frac": lose_metrics["active_frac"],
        "confidence_mean": lose_metrics["confidence_mean"],
    }
    return loss, metrics


def _pairwise_logistic(
    rewards_pos: jax.Array,
    rewards_neg: jax.Array,
    label_smoothing: float,
    valid: jax.Array,
) -> tuple[jax.Array, Metrics]:
    """Mean over valid pairs of (1−ε)·softplus(−Δ) + ε·softplus(Δ), Δ = r⁺ − r⁻."""
    margin = rewards_pos - rewards_neg
    per_pair = (1.0 - label_smoothing) * jax.nn.softplus(-margin) + label_smoothing * (
        jax.nn.softplus(margin)
    )
    count = _count(valid)

    def mean(x: jax.Array) -> jax.Array:
        return _safe_divide(jnp.sum(jnp.where(valid, x, 0.0)), count)

    loss = mean(per_pair)
    metrics = {
        "loss": loss,
        "reward_pos": mean(rewards_pos),
        "reward_neg": mean(rewards_neg),
        "margin": mean(margin),
        "accuracy": mean((margin > 0).astype(margin.dtype)),
        "num_pairs": count,
    }
    return loss, metrics


def _check_pair_inputs(names: tuple[str, ...], *xs: jax.Array) -> int:
    checks.check_rank(names[0], xs[0], 1, "B")
    (batch,) = jnp.shape(xs[0])
    for name, x in zip(names[1:], xs[1:]):
        checks.check_shape(name, x, "B", (batch,))
    return batch


def spin_loss(
    pol_pos: jax.Array,
    pol_neg: jax.Array,
    ref_pos: jax.Array,
    ref_neg: jax.Array,
    lam: float,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """SPIN loss (Chen et al. 2024, eq. 4.7 with the logistic loss ℓ(t) = log(1 + e^{−t})).

        r(y) = lam·(log π_θ(y) − log π_ref(y)),
        L = mean_B softplus(−[r(y⁺) − r(y⁻)]) = mean_B log(1 + exp(−[r(y⁺) − r(y⁻)])).

    y⁺ is the gold response, y⁻ the previous iterate's (the opponent's) own generation.
    softplus keeps it finite for any margin.

    Args:
      pol_pos, pol_neg: [B] sequence log-probs of y⁺ and y⁻ under the trained policy.
      ref_pos, ref_neg: [B] the same under the opponent (previous iterate), constants.
      lam: λ > 0, the reward scale.
      mask: optional [B] bool/0-1; zero marks padding pairs, excluded from every mean.

    Returns:
      (loss, metrics) with ``reward_pos`` = lam·(pol_pos − ref_pos), ``reward_neg``,
      ``margin``, ``accuracy`` (margin > 0) and ``num_pairs``, all means over pairs.

    Raises:
      ValueError: if the inputs are not all [B].
    """
    batch = _check_pair_inputs(
        ("pol_pos", "pol_neg", "ref_pos", "ref_neg"), pol_pos, pol_neg, ref_pos, ref_neg
    )
    valid = _pair_mask(mask, batch)
    rewards_pos = weighting.implicit_rewards(pol_pos, ref_pos, lam)
    rewards_neg = weighting.implicit_rewards(pol_neg, ref_neg, lam)
    return _pairwise_logistic(rewards_pos, rewards_neg, 0.0, valid)


def dpo_loss(
    pol_chosen: jax.Array,
    pol_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """DPO loss (Rafailov et al. 2023, eq. 7), with conservative-DPO label smoothing.

    With Δ = beta·[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))],

        L = mean_B (1 − ε)·softplus(−Δ) + ε·softplus(Δ),

    where ε = ``label_smoothing`` is the assumed probability that a preference label is
    flipped (cDPO, Mitchell 2023); ε = 0 is plain DPO, which is `spin_loss` with
    lam = beta and a frozen reference.

    Args:
      pol_chosen, pol_rejected: [B] sequence log-probs under the trained policy.
      ref_chosen, ref_rejected: [B] the same under the frozen reference.
      beta: β > 0, the KL-regularisation strength.
      label_smoothing: ε in [0, 0.5].
      mask: optional [B] bool/0-1; zero marks padding pairs.

    Returns:
      (loss, metrics) as `spin_loss` (``reward_pos`` is the chosen response's reward).

    Raises:
      ValueError: if the inputs are not all [B] or ``label_smoothing`` is outside [0, 0.5].
    """
    batch = _check_pair_inputs(
        ("pol_chosen", "pol_rejected", "ref_chosen", "ref_rejected"),
        pol_chosen,
        pol_rejected,
        ref_chosen,
        ref_rejected,
    )
    checks.check_interval("label_smoothing", label_smoothing, 0.0, 0.5)
    valid = _pair_mask(mask, batch)
    rewards_pos = weighting.implicit_rewards(pol_chosen, ref_chosen, beta)
    rewards_neg = weighting.implicit_rewards(pol_rejected, ref_rejected, beta)
    return _pairwise_logistic(rewards_pos, rewards_neg, label_smoothing, valid)


def tpaw_loss(
    pol_pos: jax.Array,
    pol_neg: jax.Array,
    players_pos: jax.Array,
    players_neg: jax.Array,
    player_mask: jax.Array,
    lam: float,
    eta: float,
    gamma: float,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """TPAW loss: SPIN against a team of J players with dual adaptive weighting.

    With P_j(y) = lam·(log π_θ(y|x) − log π_j(y|x)) (`weighting.implicit_rewards`),
    α_j = eta if P_j(y⁺) ≤ 0 else 1 (`weighting.response_weights`), margins
    m_j = P_j(y⁺) − P_j(y⁻) and β_j = softmax_j(−gamma·m_j) over unmasked players
    (`weighting.player_weights`),

        L = mean_B Σ_j β_j · softplus(−(α_j·P_j(y⁺) − P_j(y⁻))).

    α and β are constants (stop-gradient), so the gradient is that of a β-weighted sum
    of SPIN losses. With J = 1 and eta = 1 this is exactly `spin_loss`.

    Masked player slots (a pool that is not full yet) may hold any values, NaN
    included; they contribute nothing to the value or the gradient. If every player is
    masked the loss is 0 with zero gradient (no error: this runs under jit); the caller
    guarantees at least one player.

    Args:
      pol_pos, pol_neg: [B] sequence log-probs of y⁺ (gold) and y⁻ under the policy.
      players_pos, players_neg: [J, B] the same under each player, constants.
      player_mask: [J] bool/0-1, nonzero for real players.
      lam: λ > 0, the reward scale.
      eta: η, the response weight of gold responses with P_j(y⁺) ≤ 0.
      gamma: γ ≥ 0, the player-weight sharpness.
      mask: optional [B] bool/0-1; zero marks padding pairs.

    Returns:
      (loss, metrics): ``loss``; β-weighted means over players, then means over pairs,
      of ``reward_pos``, ``reward_neg``, ``margin``, ``accuracy``; ``eta_frac`` (share of
      unmasked (player, pair) entries given eta); ``num_pairs``; ``num_players``.

    Raises:
      ValueError: if ``pol_*`` are not [B], ``players_*`` not [J, B] or
        ``player_mask`` not [J].
    """
    batch = _check_pair_inputs(("pol_pos", "pol_neg"), pol_pos, pol_neg)
    checks.check_rank("players_pos", players_pos, 2, "J, B")
    num_players = jnp.shape(players_pos)[0]
    checks.check_shape("players_pos", players_pos, "J, B", (num_players, batch))
    checks.check_shape("players_neg", players_neg, "J, B", (num_players, batch))
    checks.check_shape("player_mask", player_mask, "J", (num_players,))
    valid = _pair_mask(mask, batch)
    players = checks.as_bool_mask("player_mask", player_mask)[:, None]
    entries = players & valid[None, :]

    # Sanitise masked slots before any arithmetic so their NaN/inf cannot reach the
    # gradient through the zero weights.
    players_pos = jnp.where(players, checks.upcast_float(players_pos), 0.0)
    players_neg = jnp.where(players, checks.upcast_float(players_neg), 0.0)
    rewards_pos = weighting.implicit_rewards(pol_pos, players_pos, lam)
    rewards_neg = weighting.implicit_rewards(pol_neg, players_neg, lam)
    alpha = weighting.response_weights(rewards_pos, eta)
    margins = rewards_pos - rewards_neg
    beta = weighting.player_weights(margins, gamma, player_mask)
    per_entry = jax.nn.softplus(-(alpha * rewards_pos - rewards_neg))

    num_pairs = _count(valid)

    def team_mean(x: jax.Array) -> jax.Array:
        per_pair = jnp.sum(jnp.where(entries, beta * x, 0.0), axis=0)
        return _safe_divide(jnp.sum(per_pair), num_pairs)

    loss = team_mean(per_entry)
    metrics = {
        "loss": loss,
        "reward_pos": team_mean(rewards_pos),
        "reward_neg": team_mean(rewards_neg),
        "margin": team_mean(margins),
        "accuracy": team_mean((margins > 0).astype(margins.dtype)),
        "eta_frac": _safe_divide(_count(entries & (rewards_pos <= 0.0)), _count(entries)),
        "num_pairs": num_pairs,
        "num_players": _count(players),
    }
    return loss, metrics


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    ref_logps: jax.Array,
    adv: jax.Array,
    mask: jax.Array,
    clip_eps: float,
    kl_coef: float,
) -> tuple[jax.Array, Metrics]:
    """GRPO loss (Shao et al. 2024, eq. 3): clipped surrogate minus a k3 KL penalty.

    Per token, with ratio ρ = exp(log π_θ − log π_old) and sequence advantage A_b,

        s_{b,t}  = min(ρ·A_b, clip(ρ, 1 − clip_eps, 1 + clip_eps)·A_b),
        kl_{b,t} = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1   (k3, ≥ 0),
        L = −mean_b [ (1/|o_b|) Σ_t mask_{b,t}·(s_{b,t} − kl_coef·kl_{b,t}) ].

    The mean is the GRPO paper's: over each sequence's own tokens first, then over the
    batch (not one mean over all tokens as in DAPO/Dr. GRPO, which weights long
    sequences more). Rows with an empty mask (padding) are left out of the batch mean.

    Args:
      logps: [B, T] token log-probs under the trained policy.
      old_logps: [B, T] token log-probs under the sampling policy (constants).
      ref_logps: [B, T] token log-probs under the reference policy (constants).
      adv: [B] per-sequence advantages (`fedsp.core.advantage.group_advantages`).
      mask: [B, T] completion-token mask.
      clip_eps: ε ≥ 0 of the clipped ratio.
      kl_coef: β ≥ 0 of the KL penalty.

    Returns:
      (loss, metrics): ``loss``; token means of ``kl``, ``ratio`` and ``clip_frac``
      (share of tokens whose clipped branch was taken, i.e. got no gradient);
      ``surrogate`` (the batch mean of sequence-mean surrogates); ``num_tokens``;
      ``num_sequences``.

    Raises:
      ValueError: on wrong ranks, mismatched shapes or negative ``clip_eps``/``kl_coef``.
    """
    _check_token_inputs("logps", logps, "mask", mask)
    batch, length = jnp.shape(logps)
    checks.check_shape("old_logps", old_logps, "B, T", (batch, length))
    checks.check_shape("ref_logps", ref_logps, "B, T", (batch, length))
    checks.check_shape("adv", adv, "B", (batch,))
    checks.check_interval("clip_eps", clip_eps, 0.0)
    checks.check_interval("kl_coef", kl_coef, 0.0)
    valid = checks.as_bool_mask("mask", mask)
    # Zero log-ratios on padding keep exp() from overflowing there.
    logps = jnp.where(valid, checks.upcast_float(logps), 0.0)
    old_logps = jnp.where(valid, checks.upcast_float(old_logps), 0.0)
    ref_logps = jnp.where(valid, checks.upcast_float(ref_logps), 0.0)
    adv = checks.upcast_float(adv)[:, None]

    ratio = jnp.exp(logps - old_logps)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    surrogate = jnp.minimum(unclipped, clipped)
    log_ref_ratio = ref_logps - logps
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
    objective = surrogate - kl_coef * kl

    tokens_per_seq = jnp.sum(valid, axis=-1).astype(objective.dtype)
    rows = tokens_per_seq > 0

    def seq_then_batch_mean(x: jax.Array) -> jax.Array:
        per_seq = jnp.sum(jnp.where(valid, x, 0.0), axis=-1) / jnp.maximum(tokens_per_seq, 1.0)
        return _safe_divide(jnp.sum(jnp.where(rows, per_seq, 0.0)), _count(rows))

    num_tokens = _count(valid)

    def token_mean(x: jax.Array) -> jax.Array:
        return _safe_divide(jnp.sum(jnp.where(valid, x, 0.0)), num_tokens)

    loss = -seq_then_batch_mean(objective)
    metrics = {
        "loss": loss,
        "surrogate": seq_then_batch_mean(surrogate),
        "kl": token_mean(kl),
        "ratio": token_mean(ratio),
        "clip_frac": token_mean((clipped < unclipped).astype(objective.dtype)),
        "num_tokens": num_tokens,
        "num_sequences": _count(rows),
    }
    return loss, metrics
