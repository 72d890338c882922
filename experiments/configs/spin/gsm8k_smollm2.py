"""SPIN on GSM8K with SmolLM2-135M-Instruct on a CPU, centralized: the counterpart of
`experiments/configs/tpaw/gsm8k_smollm2.py` (same data, rounds and evaluation; opponent =
the round-start model, opponent data of the last two rounds)."""

from __future__ import annotations

from experiments.configs import selfplay_reference


def get_config():
    return selfplay_reference.smollm2_config("spin")
