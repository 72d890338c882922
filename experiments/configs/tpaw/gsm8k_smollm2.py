"""TPAW on GSM8K with SmolLM2-135M-Instruct on a CPU, centralized (one client).

Three rounds of 8 prompts: the team is the round-0 model, then the global model after
each round (1, 2, 3 players); opponent data of the last three rounds; evaluated on the
same 32 GSM8K test problems before and after training. See
`experiments.configs.selfplay_reference.smollm2_config`.
"""

from __future__ import annotations

from experiments.configs import selfplay_reference


def get_config():
    return selfplay_reference.smollm2_config("tpaw")
