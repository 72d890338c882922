"""Federated TPAW on GSM8K with SmolLM2-135M-Instruct on a CPU.

Four clients on disjoint IID shards of GSM8K train, 2 prompts each per round, all
playing every round; the global model after each round enters the shared player pool
and every client's TPAW loss plays against it (FedAvg server). See
`experiments.configs.selfplay_reference.smollm2_config`.
"""

from __future__ import annotations

from experiments.configs import selfplay_reference


def get_config():
    return selfplay_reference.smollm2_config("tpaw", federated=True)
