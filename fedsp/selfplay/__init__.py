"""Client algorithms of federated self-play: SPEAR, feedback-SFT, SFT, GRPO, and the
pairwise SPIN, TPAW and DPO.

    algo = get_algorithm("spear", config)
    batch, metrics = algo.collect(policy, lora_state, client_examples, task, feedback,
                                  key, round, baselines=baselines)
    adapters, stats = map_clients(functools.partial(algo.local_train, graphdef), backend,
                                  in_axes=(None, None, 0, 0))(base_state, lora_state,
                                                               batch, keys)
"""

from __future__ import annotations

from fedsp.selfplay.base import (
    ALGORITHMS,
    Algorithm,
    ClientBatch,
    PlayerLogps,
    Policy,
    RoundContext,
    Sequences,
    get_algorithm,
)

__all__ = ["ALGORITHMS", "Algorithm", "ClientBatch", "PlayerLogps", "Policy", "RoundContext",
           "Sequences", "get_algorithm"]
