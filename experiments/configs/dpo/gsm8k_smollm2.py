"""DPO on GSM8K with SmolLM2-135M-Instruct on a CPU, centralized: (gold, wrong own
sample) pairs against the frozen round-0 model; the counterpart of
`experiments/configs/tpaw/gsm8k_smollm2.py`."""

from __future__ import annotations

from experiments.configs import selfplay_reference


def get_config():
    return selfplay_reference.smollm2_config("dpo")
