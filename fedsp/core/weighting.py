"""Sample, player and client weights: TPAW's dual weighting, SPEAR's confidence,
and the server's client weights for advantage-weighted federation.

TPAW (arXiv 2605.09922) trains the policy π_θ against a team of J historical players
π_j. Its implicit reward of a response y against player j is

    P_j(y) = λ·(log π_θ(y|x) − log π_j(y|x)),

and it adapts SPIN's objective with two weights, both treated as constants (no
gradient flows through them):

- response weights α_j = η where P_j(y⁺) ≤ 0, else 1: gold responses the policy does
  not yet prefer over player j's get an η-times larger push;
- player weights β_j = softmax_j(−γ·m_j), m_j = P_j(y⁺) − P_j(y⁻): players the policy
  separates least (small margin, the hardest opponents) get the most weight.

Shapes: B batch, J players, C clients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedsp.core import checks

CLIENT_WEIGHT_MODES = ("examples", "advantage", "uniform")

# SPEAR's reference weights the unlikelihood term of a wrong answer by how sure we are
# that it is wrong: fully when a feedback-guided revision then succeeded, half otherwise.
SPEAR_CONFIDENCE_REVISED = 1.0
SPEAR_CONFIDENCE_UNREVISED = 0.5


def implicit_rewards(policy_logps: jax.Array, player_logps: jax.Array, lam: float) -> jax.Array:
    """TPAW/SPIN implicit rewards P_j(y) = lam·(log π_θ(y|x) − log π_j(y|x)).

    Args:
      policy_logps: [B] sequence log-probs under the trained policy.
      player_logps: [B] for one opponent, or [J, B] for a team of J players; the policy
        term broadcasts over the leading J axis.
      lam: λ, the reward scale (SPIN's λ, DPO's β).

    Returns:
      An array shaped like ``player_logps``, float32. Differentiable in both inputs.

    Raises:
      ValueError: if ``policy_logps`` is not [B] or ``player_logps`` is not [B] / [J, B].
    """
    checks.check_rank("policy_logps", policy_logps, 1, "B")
    (batch,) = jnp.shape(policy_logps)
    if jnp.ndim(player_logps) == 1:
        checks.check_shape("player_logps", player_logps, "B", (batch,))
    else:
        checks.check_shape("player_logps", player_logps, "J, B", (None, batch))
    policy_logps = checks.upcast_float(policy_logps)
    player_logps = checks.upcast_float(player_logps)
    return lam * (policy_logps - player_logps)


def response_weights(pos_rewards: jax.Array, eta: float) -> jax.Array:
    """TPAW response weights α_j = eta where P_j(y⁺) ≤ 0, else 1 (stop-gradient).

    A reward of exactly 0 (the policy equals the player on y⁺, e.g. at the first step
    when every player is the initial model) counts as "not yet preferred" and gets eta.

    Args:
      pos_rewards: [J, B] implicit rewards of the gold responses, P_j(y⁺).
      eta: η, the weight of not-yet-won gold responses (TPAW uses η > 1).

    Returns:
      [J, B] float32 weights, constants for autodiff.

    Raises:
      ValueError: if ``pos_rewards`` is not rank 2.
    """
    checks.check_rank("pos_rewards", pos_rewards, 2, "J, B")
    pos_rewards = jax.lax.stop_gradient(checks.upcast_float(pos_rewards))
    eta_array = jax.lax.stop_gradient(jnp.asarray(eta, pos_rewards.dtype))
    return jnp.where(pos_rewards <= 0.0, eta_array, jnp.ones_like(pos_rewards))


def player_weights(margins: jax.Array, gamma: float, player_mask: jax.Array) -> jax.Array:
    """TPAW player weights β_j = softmax over unmasked j of (−gamma·m_j), per sample.

    Computed as a masked, max-shifted softmax over the J axis and wrapped in
    `jax.lax.stop_gradient` (TPAW treats β as constants). Masked players (empty slots of
    a player pool that is not full yet) get exactly 0. If every player is masked the
    weights are all 0, not NaN; a loss built on them is then 0 with a zero gradient,
    so callers must guarantee at least one player.

    Args:
      margins: [J, B] margins m_j = P_j(y⁺) − P_j(y⁻).
      gamma: γ ≥ 0, the sharpness; 0 weights the unmasked players uniformly.
      player_mask: [J] bool or 0/1; nonzero marks a real player.

    Returns:
      [J, B] float32 weights; each column sums to 1 over unmasked players.

    Raises:
      ValueError: on wrong ranks or if ``player_mask`` is not [J].
    """
    checks.check_rank("margins", margins, 2, "J, B")
    num_players = jnp.shape(margins)[0]
    checks.check_shape("player_mask", player_mask, "J", (num_players,))
    valid = checks.as_bool_mask("player_mask", player_mask)[:, None]
    margins = jax.lax.stop_gradient(checks.upcast_float(margins))
    gamma_array = jax.lax.stop_gradient(jnp.asarray(gamma, margins.dtype))
    logits = jnp.where(valid, -gamma_array * margins, -jnp.inf)
    shift = jnp.max(logits, axis=0, keepdims=True)
    # All players masked: the max is -inf, and exp(-inf - -inf) would be NaN.
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    unnormalized = jnp.where(valid, jnp.exp(logits - shift), 0.0)
    total = jnp.sum(unnormalized, axis=0, keepdims=True)
    return unnormalized / jnp.where(total > 0.0, total, 1.0)


def client_weights(
    num_examples: jax.Array,
    client_adv: jax.Array,
    mode: str = "examples",
    temperature: float = 1.0,
    threshold: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Server aggregation weights for C clients, with optional advantage pruning.

    Modes (unnormalized weight of a kept client k):
      - "examples": n_k, i.e. FedAvg (McMahan et al. 2017).
      - "advantage": n_k·exp(adv_k / temperature), with adv_k / temperature shifted by
        its maximum over kept clients so it cannot overflow.
      - "uniform": 1.

    A client is kept when n_k > 0 and, if ``threshold`` is given, adv_k ≥ threshold
    (and adv_k is finite, whenever advantages are used). Pruned clients get weight
    exactly 0 and need not send their update. Weights sum to 1 over kept clients.

    If no client is kept, weights and keep are all zero / False (no NaN). The server
    must then skip its update for the round (a weighted mean with zero total weight is
    undefined); the federated loop reports such rounds.

    Args:
      num_examples: [C] number of training examples of each client (int or float).
      client_adv: [C] mean advantage of each client (ignored by "examples"/"uniform"
        unless ``threshold`` is set).
      mode: one of "examples", "advantage", "uniform" (a Python string: static under jit).
      temperature: > 0, the advantage temperature of mode "advantage".
      threshold: prune clients whose advantage is below it; None or -inf keeps all.

    Returns:
      (weights [C] float32, keep [C] bool).

    Raises:
      ValueError: on an unknown ``mode``, temperature ≤ 0, or shapes other than [C].
    """
    checks.check_choice("mode", mode, CLIENT_WEIGHT_MODES)
    checks.check_interval("temperature", temperature, 0.0, low_open=True)
    checks.check_rank("num_examples", num_examples, 1, "C")
    (num_clients,) = jnp.shape(num_examples)
    checks.check_shape("client_adv", client_adv, "C", (num_clients,))
    if threshold is not None and jnp.ndim(threshold) != 0:
        raise ValueError(
            f"threshold must be a scalar or None, got shape {tuple(jnp.shape(threshold))}"
        )
    counts = checks.upcast_float(num_examples)
    adv = checks.upcast_float(client_adv)

    keep = counts > 0
    uses_adv = mode == "advantage" or threshold is not None
    if uses_adv:
        keep = keep & jnp.isfinite(adv)
    if threshold is not None:
        keep = keep & (adv >= threshold)

    if mode == "examples":
        unnormalized = jnp.where(keep, counts, 0.0)
    elif mode == "uniform":
        unnormalized = keep.astype(counts.dtype)
    else:
        # Shifting adv/temperature by its max over kept clients bounds exp() by 1, so
        # n·exp(·) cannot overflow; n stays outside the exponent (exact, no log n).
        logits = jnp.where(keep, adv / temperature, -jnp.inf)
        shift = jnp.max(logits)
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
        unnormalized = jnp.where(keep, counts * jnp.exp(logits - shift), 0.0)
    total = jnp.sum(unnormalized)
    weights = unnormalized / jnp.where(total > 0.0, total, 1.0)
    return weights, keep


def spear_confidence(revision_succeeded: jax.Array) -> jax.Array:
    """SPEAR confidence of a wrong answer: 1.0 if a feedback revision succeeded, else 0.5.

    A successful revision confirms that the first answer was wrong and not merely
    misjudged, so its unlikelihood term counts fully; otherwise it counts half (the
    SPEAR reference's constants, `SPEAR_CONFIDENCE_REVISED` / `_UNREVISED`).

    Args:
      revision_succeeded: [B] bool or 0/1.

    Returns:
      [B] float32 confidences, the ``confidence`` argument of
      `fedsp.core.losses.unlikelihood_loss`.

    Raises:
      ValueError: if ``revision_succeeded`` is not rank 1.
    """
    checks.check_rank("revision_succeeded", revision_succeeded, 1, "B")
    succeeded = checks.as_bool_mask("revision_succeeded", revision_succeeded)
    return jnp.where(succeeded, SPEAR_CONFIDENCE_REVISED, SPEAR_CONFIDENCE_UNREVISED).astype(
        jnp.float32
    )
