"""The open registry of client algorithms: ``register_algorithm`` / ``get_algorithm``.

A client algorithm is registered under a name with a factory ``factory(config) ->
Algorithm`` (`fedsp.selfplay.base.Algorithm`); ``config.algorithm.name`` then selects it
for `fedsp.run`, the tables and the config validation, which asks this registry for the
names it accepts. The built-in algorithms are registered by name here and their modules
are imported on first use, so importing the registry does not import every algorithm.

    fedsp.register_algorithm("my_sft", MySft)        # MySft(config) builds it
    config.algorithm.name = "my_sft"
    fedsp.run(config, "runs/my_sft")

Re-registering a user name replaces it (a notebook cell run twice); replacing a built-in
needs ``override=True``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

AlgorithmFactory = Callable[[Any], Any]

# name -> module that registers it when imported.
_BUILTIN = {
    "spear": "fedsp.selfplay.spear",
    "feedback_sft": "fedsp.selfplay.spear",
    "sft": "fedsp.selfplay.sft",
    "grpo": "fedsp.selfplay.grpo",
    "spin": "fedsp.selfplay.spin",
    "tpaw": "fedsp.selfplay.tpaw",
    "dpo": "fedsp.selfplay.dpo",
}
_FACTORIES: dict[str, AlgorithmFactory] = {}


def register_algorithm(
    name: str, factory: AlgorithmFactory | None = None, *, override: bool = False
) -> Any:
    """Makes ``factory(config)`` the client algorithm ``name``.

    Usable as a call, ``register_algorithm("mine", Mine)``, or as a class decorator,
    ``@register_algorithm("mine")``. Returns the factory.

    Raises:
      ValueError: ``name`` is empty or not a string, or is a built-in algorithm's name
        and ``override`` is False.
      TypeError: ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"algorithm name must be a non-empty string, got {name!r}")
    if factory is None:
        return lambda f: register_algorithm(name, f, override=override)
    if not callable(factory):
        raise TypeError(
            f"factory for {name!r} must be callable (config -> algorithm), "
            f"got {type(factory).__name__}"
        )
    builtin = _BUILTIN.get(name)
    if builtin is not None and not override and getattr(factory, "__module__", None) != builtin:
        raise ValueError(
            f"{name!r} is a built-in algorithm ({builtin}); pass override=True to replace it"
        )
    _FACTORIES[name] = factory
    return factory


def algorithm_names() -> tuple[str, ...]:
    """Every name `get_algorithm` accepts: the built-ins, then the user's, in order."""
    return tuple(dict.fromkeys([*_BUILTIN, *_FACTORIES]))


def get_algorithm(name: str, config: Any) -> Any:
    """The client algorithm ``name`` built from a validated config
    (`fedsp.config.default_config` schema).

    Raises:
      ValueError: unknown ``name`` (the message lists the choices).
    """
    if name not in _FACTORIES and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown algorithm {name!r}; choose one of: {', '.join(algorithm_names())}"
        )
    return _FACTORIES[name](config)
