"""SPEAR on arc_challenge with qwen2p5_1p5b: the paper's setting (see `experiments.configs.reference`,
source lee3296/SPEAR configs/arc_challenge_qwen1.5b_spear.yaml).

FedAvg is the reference's server; FedAdam / FedYogi / FedAvgM variants:
``--config.fl.server_optimizer=fedadam --config.fl.server_lr=1e-2``.
"""

from __future__ import annotations

from experiments.configs import reference

# Fitted for a TPU v5e-8 (mesh, remat, micro-batch, rollout and eval batches:
# reference.FITTED); `python -m experiments.plan --config=<this file>` checks it.
PLAN_TARGET = reference.PLAN_TARGET


def get_config():
    return reference.spear_config("arc_challenge", "qwen2p5_1p5b")
