"""fedsp: federated self-play fine-tuning of LLMs in JAX/Flax NNX.

The user API, as a notebook calls it::

    import fedsp

    config = fedsp.default_config()            # the whole schema, with its defaults
    config.fl.rounds = 3
    state = fedsp.init_run(config)             # no workdir: nothing is written
    state, record = fedsp.run_round(state)     # one federated round
    print(record["loss"], fedsp.evaluate(state))

    fedsp.run(config, "runs/demo")             # rounds + evaluation, logs, checkpoints

Client algorithms and tasks are open registries (`register_algorithm`,
`register_task`); the pure array functions live in `fedsp.core`, the model in
`fedsp.model`. Names are imported on first use, so ``import fedsp`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it.
_EXPORTS = {
    "ClientUploads": "fedsp.federated.state",
    "RoundHooks": "fedsp.federated.state",
    "RunState": "fedsp.federated.state",
    "algorithm_names": "fedsp.selfplay.registry",
    "default_config": "fedsp.config",
    "evaluate": "fedsp.federated.round",
    "from_pretrained": "fedsp.model.loading",
    "get_algorithm": "fedsp.selfplay.registry",
    "get_task": "fedsp.data.base",
    "init_run": "fedsp.runner",
    "register_algorithm": "fedsp.selfplay.registry",
    "register_task": "fedsp.data.base",
    "run": "fedsp.runner",
    "run_round": "fedsp.federated.round",
    "save_checkpoint": "fedsp.runner",
    "task_names": "fedsp.data.base",
    "validate_config": "fedsp.config",
}
_RENAMED = {"validate_config": "validate"}

# Spelled out (not sorted(_EXPORTS)) so linters see the re-exports; tests/test_api.py
# checks the two agree.
__all__ = [
    "ClientUploads",
    "RoundHooks",
    "RunState",
    "algorithm_names",
    "default_config",
    "evaluate",
    "from_pretrained",
    "get_algorithm",
    "get_task",
    "init_run",
    "register_algorithm",
    "register_task",
    "run",
    "run_round",
    "save_checkpoint",
    "task_names",
    "validate_config",
]

if TYPE_CHECKING:
    from fedsp.config import default_config
    from fedsp.config import validate as validate_config
    from fedsp.data.base import get_task, register_task, task_names
    from fedsp.federated.round import evaluate, run_round
    from fedsp.federated.state import ClientUploads, RoundHooks, RunState
    from fedsp.model.loading import from_pretrained
    from fedsp.runner import init_run, run, save_checkpoint
    from fedsp.selfplay.registry import algorithm_names, get_algorithm, register_algorithm


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedsp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
