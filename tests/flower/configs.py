"""Config files for the federation tests: a tiny model, two clients, two rounds."""

from __future__ import annotations

import pathlib
from typing import Any

# Dotted config fields of the tests' federation (see tests/federated/fixtures.tiny_config).
TINY = {
    "model.lora.rank": 2,
    "data.num_clients": 2,
    "data.limit": 32,
    "rollout.prompts_per_client": 2,
    "rollout.max_new_tokens": 4,
    "fl.rounds": 2,
    "fl.clients_per_round": 2,
    "fl.backend": "loop",
    "fl.server_optimizer": "fedadam",
    "fl.server_lr": 0.1,
    "fl.client_weighting": "advantage",
    "algorithm.name": "grpo",
    "local.steps": 2,
    "local.batch_size": 2,
    "local.max_len": 128,
    "local.lr": 1e-2,
    "local.warmup_ratio": 0.0,
    "eval.every": 1,
    "eval.examples": 4,
    "eval.max_new_tokens": 4,
    "eval.batch_size": 4,
    "log.tensorboard": False,
    "log.progress": False,
}


def write_config(directory: pathlib.Path, fields: dict[str, Any]) -> pathlib.Path:
    """A config file (``get_config()``) setting ``fields`` on the default config."""
    lines = [
        "from fedsp.config import default_config",
        "",
        "",
        "def get_config():",
        "    config = default_config()",
        *(f"    config.{name} = {value!r}" for name, value in fields.items()),
        "    return config",
        "",
    ]
    path = directory / "federation_config.py"
    path.write_text("\n".join(lines))
    return path
