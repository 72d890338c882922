"""DPO (Rafailov et al. 2023, arXiv 2305.18290) with a frozen reference, as a client algorithm.

The reference is the run's round-0 adapters (the SFT starting point: with freshly
initialised LoRA, the base model itself), passed by the loop in the `RoundContext`;
its log-probs of every pair are computed once per round without gradient
(``ClientBatch.players`` with J = 1). Loss: `fedsp.core.losses.dpo_loss` with
``algorithm.beta`` and ``algorithm.label_smoothing`` (cDPO).

Preference pairs (x, chosen, rejected): an example's ``meta["chosen"]`` /
``meta["rejected"]`` texts when it has them (true preference data). Otherwise, for
(prompt, gold response) data such as GSM8K, the pair is (gold response, a sample of the
round-start policy) — the same pairs SPIN builds — and **only samples the task judges
wrong are kept** as rejected: a correct self-generated solution is not a dispreferred
answer, and pushing it down would teach the model against correct reasoning. Tasks that
cannot judge a reply (open-ended chat) keep every sample. Each round uses its own fresh
pairs only (``opponent_rounds`` 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from fedsp.data.base import Example, Task
from fedsp.selfplay.base import RoundContext
from fedsp.selfplay.pairs import PairwiseSelfPlay
from fedsp.selfplay.players import stack_players
from fedsp.selfplay.registry import register_algorithm


class Dpo(PairwiseSelfPlay):
    """DPO client; see the module docstring."""

    kind = "dpo"
    default_opponent_rounds = 1

    def players(
        self, lora_state: nnx.State, context: RoundContext | None
    ) -> tuple[Any, np.ndarray]:
        """The frozen reference (J = 1)."""
        del lora_state
        if context is None or context.reference is None:
            raise ValueError(
                "DPO needs its frozen reference: pass context=RoundContext(clients=..., "
                "reference=<the round-0 adapters>) to collect (the round loop does)"
            )
        return stack_players(context.reference)

    def chosen_text(self, task: Task, example: Example) -> str:
        chosen = example.meta.get("chosen") if example.meta else None
        return chosen or super().chosen_text(task, example)

    def rejected_text(self, example: Example) -> str | None:
        return example.meta.get("rejected") if example.meta else None

    def keep_pair(self, sample_correct: bool | None) -> bool:
        return sample_correct is not True


register_algorithm("dpo", lambda config: Dpo("dpo", config))
