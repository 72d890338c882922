"""SPIN on UltraChat (50k prompts of HuggingFaceH4/ultrachat_200k; online only,
read through Hugging Face `datasets`) from a Qwen2.5-1.5B SFT model, evaluated on
ARC-Challenge: the paper-scale setting, centralized (one client, every prompt each
round). Every value and its source: `experiments.configs.selfplay_reference`.

Opponent and reference: the round-start model; opponent data of the last two
rounds.

Point ``--config.model.path`` at the downloaded SFT checkpoint (config.json +
safetensors).
"""

from __future__ import annotations

from experiments.configs import selfplay_reference

# Fitted for a TPU v5e-8 (mesh, remat, micro-batch, eval batch: selfplay_reference.FITTED);
# `python -m experiments.plan --config=<this file>` checks it.
PLAN_TARGET = selfplay_reference.PLAN_TARGETS["qwen2p5_1p5b"]


def get_config():
    return selfplay_reference.selfplay_config("spin", "ultrachat", "qwen2p5_1p5b")
