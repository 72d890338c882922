"""`make demo`: SPEAR on synthetic arithmetic with SmolLM2-135M-Instruct on a CPU.

Four clients with non-IID operation mixes (Dirichlet α = 0.5 over the operation label),
all four playing every round: each samples one answer per prompt, gets a non-leaking
hint on wrong answers, revises once, and trains its LoRA adapter on wins plus
unlikelihood on confident wrong answers; the server averages the adapters (FedAvg).
Sized for 2 CPU cores and a laptop's memory: two rounds, evaluated before training and
after each round on the same 64 held-out problems (README.md gives the measured time,
memory and accuracies). Local training rematerialises each layer in the backward pass
and trains the four clients one after another inside its program (fl.clients_at_once),
and the sampler takes 16 rows per call: the run stays under 4 GB (BENCHMARKS.md, "make
demo"). The learning
rate is higher than the paper's (few rounds, tiny adapters). Longer runs:
--config.fl.rounds=6.
"""

from __future__ import annotations

from fedsp.config import default_config


def get_config():
    config = default_config()
    config.model.lora.rank = 8
    config.model.lora.alpha = 16.0
    config.model.remat = "full"

    config.task.name = "arithmetic"
    config.data.num_clients = 4
    config.data.partition = "dirichlet"
    config.data.alpha = 0.5
    config.data.limit = 400

    config.algorithm.name = "spear"
    config.algorithm.feedback = "hint"
    config.algorithm.max_revisions = 1

    config.rollout.prompts_per_client = 8
    config.rollout.max_new_tokens = 24
    config.rollout.batch_size = 16

    config.local.steps = 4
    config.local.batch_size = 4
    config.local.lr = 3e-4
    config.local.lr_min = 1e-4
    config.local.warmup_ratio = 0.0
    config.local.max_len = 160

    config.fl.rounds = 2
    config.fl.clients_per_round = 4
    config.fl.backend = "vmap"
    config.fl.clients_at_once = 1

    config.eval.every = 1
    config.eval.examples = 64
    config.eval.max_new_tokens = 24
    config.eval.batch_size = 32
    return config
