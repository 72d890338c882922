"""Client algorithms of federated self-play: SPEAR, feedback-SFT, SFT, GRPO, and the
pairwise SPIN, TPAW and DPO, behind one interface (`fedsp.selfplay.base`) and an open
registry (`fedsp.selfplay.registry`).

    algo = get_algorithm("spear", config)
    batch, metrics = algo.collect(policy, lora_state, client_examples, task, feedback,
                                  key, round, baselines=baselines)
    adapters, stats = map_clients(functools.partial(algo.local_train, graphdef), backend,
                                  in_axes=(None, None, 0, 0))(base_state, lora_state,
                                                               batch, keys)
"""

from __future__ import annotations

from fedsp.selfplay.base import (
    Algorithm,
    ClientBatch,
    Collector,
    PackedSequences,
    PlayerLogps,
    Policy,
    RoundContext,
    RoundInputs,
    client_batch,
)
from fedsp.selfplay.hparams import HParams
from fedsp.selfplay.registry import algorithm_names, get_algorithm, register_algorithm
from fedsp.selfplay.rollout import Rollout, SamplingParams
from fedsp.selfplay.train import LocalTraining, LossContext

__all__ = [
    "Algorithm",
    "ClientBatch",
    "Collector",
    "HParams",
    "LocalTraining",
    "LossContext",
    "PackedSequences",
    "PlayerLogps",
    "Policy",
    "Rollout",
    "RoundContext",
    "RoundInputs",
    "SamplingParams",
    "algorithm_names",
    "client_batch",
    "get_algorithm",
    "register_algorithm",
]
