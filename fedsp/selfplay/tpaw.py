"""TPAW (team-based self-play with dual adaptive weighting, arXiv 2605.09922).

SPIN against a team: the current policy plays with and against the last N_max
historical checkpoints (the players j), with implicit rewards
P_j(y) = lam·(log π_θ(y|x) − log π_j(y|x)) and two adaptive weights
(`fedsp.core.losses.tpaw_loss`):

- response reweighting α_j = eta where P_j(y⁺) ≤ 0 (the gold response has become less
  likely than under player j), else 1;
- player weighting β_j = softmax_j(−gamma·[P_j(y⁺) − P_j(y⁻)]) per sample, stop-gradient:
  players the policy does not yet beat count more.

    L = mean_B Σ_j β_j · log(1 + exp(−(α_j·P_j(y⁺) − P_j(y⁻)))).

Each round samples one y_gen per prompt with the current (round-start) policy and
trains on the opponent data D_t ∪ D_{t−1} ∪ D_{t−2} (each client keeps its previous two
rounds' pairs client side). The players are the round loop's `fedsp.checkpoint.PlayerPool`
(``uses_pool``): the round-0 adapters, then the global adapters after every round, the
newest N_max kept; the round-start policy is always the newest. The first rounds use
the players that exist (``player_mask``); with no pool at all (``collect`` called
without players) the only player is the round-start policy, and TPAW is SPIN with
response reweighting (exactly SPIN with eta = 1). The players' log-probs of every
response are computed once per round, one forward per player per response without
gradient (``ClientBatch.players`` [C, J = N_max, S]), and reused by every local step.

Federated: clients hold disjoint shards of the SFT data; all of them play against the
same team of global checkpoints. Centralized: one client holding all the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from fedsp.selfplay.base import RoundContext
from fedsp.selfplay.pairs import PairwiseSelfPlay
from fedsp.selfplay.players import stack_players
from fedsp.selfplay.registry import register_algorithm


class Tpaw(PairwiseSelfPlay):
    """TPAW client; see the module docstring.

    Attributes:
      uses_pool: True: the loop keeps the player pool and passes its players.
      max_players: the pool size, N_max (``algorithm.n_max``).
      pool_on_error: what the loop does with a damaged pool entry (``algorithm.pool_on_error``).
    """

    kind = "tpaw"
    default_opponent_rounds = 3
    uses_pool = True

    def __init__(self, name: str, config: Any, generate_fn=None):
        super().__init__(name, config, generate_fn)
        self.max_players = self.hp.n_max
        self.pool_on_error = str(config.algorithm.pool_on_error)

    def players(
        self, lora_state: nnx.State, context: RoundContext | None
    ) -> tuple[Any, np.ndarray]:
        """The pool's players ([N_max] slots, oldest first), else the round-start policy."""
        if context is not None and context.players is not None:
            mask = np.asarray(context.player_mask, bool)
            if mask.shape != (self.hp.n_max,):
                raise ValueError(
                    f"context.player_mask must have shape ({self.hp.n_max},) "
                    f"(algorithm.n_max), got {mask.shape}"
                )
            if mask.any():
                return context.players, mask
        return stack_players(lora_state, num_slots=self.hp.n_max)


register_algorithm("tpaw", lambda config: Tpaw("tpaw", config))
