"""SPIN (Chen et al. 2024, arXiv 2401.01335) as a federated client algorithm.

Self-play fine-tuning on (prompt, gold response) data: in iteration t the opponent is
the previous iterate θ_t, which generates y⁻ for each prompt; the new player is trained
from θ_t to tell the gold y⁺ from y⁻ with the logistic loss on the implicit reward
margin (`fedsp.core.losses.spin_loss`), the opponent θ_t also being the reference:

    L = mean log(1 + exp(−lam·[(log π_θ(y⁺) − log π_t(y⁺)) − (log π_θ(y⁻) − log π_t(y⁻))])).

Here an iteration is a federated round: θ_t is the round-start (server) adapter, each
client samples one y⁻ per prompt with it, and its log-probs of every y⁺ and y⁻ are
computed once per round without gradient (``ClientBatch.players`` with J = 1). As in
the SPIN reference (uclaml/SPIN ``configs/config_iter1.yaml`` mixes ``SPIN_iter0`` and
``SPIN_iter1``), a round trains on the opponent data of the last two iterations,
D_t ∪ D_{t−1}: each client keeps its previous round's pairs (token ids, client side) and
scores them again under the new opponent. ``algorithm.opponent_rounds`` changes how many
rounds are kept. Shared machinery: `fedsp.selfplay.pairs`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from fedsp.selfplay.base import RoundContext
from fedsp.selfplay.pairs import PairwiseSelfPlay
from fedsp.selfplay.players import stack_players
from fedsp.selfplay.registry import register_algorithm


class Spin(PairwiseSelfPlay):
    """SPIN client; see the module docstring."""

    kind = "spin"
    default_opponent_rounds = 2

    def players(
        self, lora_state: nnx.State, context: RoundContext | None
    ) -> tuple[Any, np.ndarray]:
        """The opponent: the round-start adapters (J = 1)."""
        del context
        return stack_players(lora_state)


register_algorithm("spin", lambda config: Spin("spin", config))
