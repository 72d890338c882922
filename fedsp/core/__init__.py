"""Pure jnp functions fedsp's algorithms are made of: no I/O, no Python state.

Every function here is jit/vmap/grad-safe. Modules:
  logprobs     token and sequence log-probs from logits and masks
  advantage    baselines, advantages, GRPO group advantages, AWR weights
  weighting    TPAW response/player weights, SPEAR confidence, client weights
  losses       sft, unlikelihood, spear, spin, dpo, tpaw, grpo
  aggregation  weighted means over a stacked client axis, server optimizers, robust
               aggregation and DP noise
  checks       the shape and argument validation above, ValueErrors naming the argument
"""

from fedsp.core import advantage, aggregation, checks, logprobs, losses, weighting
from fedsp.core.advantage import advantages, awr_weights, ema_baseline, group_advantages
from fedsp.core.aggregation import (
    SERVER_OPTIMIZERS,
    clip_update,
    dp_noise,
    fedavg,
    pseudo_gradient,
    server_optimizer,
    server_update,
    trimmed_mean,
    weighted_mean,
)
from fedsp.core.logprobs import sequence_logprobs, token_logprobs
from fedsp.core.losses import (
    dpo_loss,
    grpo_loss,
    sft_loss,
    spear_loss,
    spin_loss,
    tpaw_loss,
    unlikelihood_loss,
)
from fedsp.core.weighting import (
    CLIENT_WEIGHT_MODES,
    client_weights,
    implicit_rewards,
    player_weights,
    response_weights,
    spear_confidence,
)

__all__ = [
    "CLIENT_WEIGHT_MODES",
    "SERVER_OPTIMIZERS",
    "advantage",
    "advantages",
    "aggregation",
    "awr_weights",
    "checks",
    "client_weights",
    "clip_update",
    "dp_noise",
    "dpo_loss",
    "ema_baseline",
    "fedavg",
    "group_advantages",
    "grpo_loss",
    "implicit_rewards",
    "logprobs",
    "losses",
    "player_weights",
    "pseudo_gradient",
    "response_weights",
    "sequence_logprobs",
    "server_optimizer",
    "server_update",
    "sft_loss",
    "spear_confidence",
    "spear_loss",
    "spin_loss",
    "token_logprobs",
    "tpaw_loss",
    "trimmed_mean",
    "unlikelihood_loss",
    "weighted_mean",
    "weighting",
]
