"""TPAW on GSM8K from a Llama-3.1-8B SFT model (the TPAW paper's larger model): the
paper-scale setting of `experiments.configs.tpaw.gsm8k_qwen2p5_1p5b` with the 8B model,
centralized (one client, every prompt each round). Every value and its source:
`experiments.configs.selfplay_reference`.

Team: the round-0 model and the global models after each round, the newest 3
(N_max); η = 6, γ = 0.5.

Point ``--config.model.path`` at the downloaded SFT checkpoint (config.json +
safetensors); without it the planner reads the architecture of
meta-llama/Llama-3.1-8B (experiments/model_configs/llama3p1_8b.json).
"""

from __future__ import annotations

from experiments.configs import selfplay_reference

# Fitted for a TPU v5p-8 (4 chips of 95 GiB; mesh, remat, micro-batch, eval batch:
# selfplay_reference.FITTED); `python -m experiments.plan --config=<this file>` checks it.
PLAN_TARGET = selfplay_reference.PLAN_TARGETS["llama3p1_8b"]


def get_config():
    return selfplay_reference.selfplay_config("tpaw", "gsm8k", "llama3p1_8b")
