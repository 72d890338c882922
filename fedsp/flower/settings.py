"""What a Flower run is told: the fedsp config (run config), a node's own paths (node
config) and the server's waiting limits.

Flower run config (``[tool.flwr.app.config]`` of the app's pyproject, or ``flwr run
--run-config``), read by the server and by every node:

  config          path of a fedsp experiment config file (a module with ``get_config()``);
                  every machine resolves it itself, so it must exist on each;
  overrides       space-separated ``section.field=value`` changes of that config, as
                  ``--config.section.field=value`` on ``experiments.run``'s command line
                  (values parsed as Python literals, else kept as strings);
  workdir         the server's run directory (metrics, checkpoints, resume);
  min-clients     a round needs updates from at least this many sampled clients, else
                  it fails naming the missing ones (the last checkpoint stays; rerunning
                  resumes after it); default 1;
  reply-timeout   seconds the server waits for a round's replies; default 600;
  node-timeout    seconds the server waits for the sampled clients' nodes to connect;
                  default 120.

Node config (``flower-supernode --node-config``), read by that node only:

  partition-id    the client this node is (0 .. data.num_clients - 1);
  num-partitions  optional; must equal ``data.num_clients``;
  data-dir        optional; this node's data folder (``task.data_dir``);
  model-path      optional; this node's copy of the base model (``model.path``).

Both sides compare config fingerprints (`fedsp.checkpoint.config_fingerprint`, without
the node-local and logging fields) before a node trains, so a node started with another
config says which fields differ instead of training something else.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections

from fedsp.checkpoint import config_fingerprint

__all__ = [
    "NODE_LOCAL_FIELDS",
    "FederationSettings",
    "apply_overrides",
    "fingerprint",
    "load_config",
    "node_client",
    "node_config_overrides",
]

# Fields a node may set for itself; they do not change the numbers.
NODE_LOCAL_FIELDS = ("task.data_dir", "model.path", "log", "checkpoint", "distributed")


def load_config(path: str | pathlib.Path, overrides: str = "") -> ml_collections.ConfigDict:
    """``get_config()`` of the config file ``path``, with ``overrides`` applied.

    Raises:
      ValueError: the file is missing or has no ``get_config``, or an override names no
        field (the message names the file or the field).
    """
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"run config 'config': no config file at {file}")
    spec = importlib.util.spec_from_file_location(f"fedsp_flower_config_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise ValueError(f"run config 'config': cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"run config 'config': {file} defines no get_config()")
    config = module.get_config()
    apply_overrides(config, overrides)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: str) -> None:
    """Applies ``"section.field=value ..."`` to ``config`` in place."""
    for item in overrides.split():
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"run config 'overrides': {item!r} is not field=value")
        try:
            value: Any = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise ValueError(f"run config 'overrides': no config field {name!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"run config 'overrides': no config field {name!r}")
        node[leaf] = value


def node_config_overrides(
    config: ml_collections.ConfigDict, node_config: Mapping[str, Any]
) -> None:
    """Applies a node's own ``data-dir`` / ``model-path`` (node config) to ``config``."""
    if "data-dir" in node_config:
        config.task.data_dir = str(node_config["data-dir"])
    if "model-path" in node_config:
        config.model.path = str(node_config["model-path"])


def node_client(config: ml_collections.ConfigDict, node_config: Mapping[str, Any]) -> int:
    """The client id a node's ``partition-id`` names, checked against ``config.data``.

    Raises:
      ValueError: no ``partition-id``, one out of range, or a ``num-partitions`` other
        than ``data.num_clients``.
    """
    if "partition-id" not in node_config:
        raise ValueError("node config needs partition-id (the client this node is)")
    client = int(node_config["partition-id"])
    num_clients = config.data.num_clients
    if not 0 <= client < num_clients:
        raise ValueError(
            f"node config partition-id={client} is not a client of data.num_clients={num_clients}"
        )
    parts = node_config.get("num-partitions")
    if parts is not None and int(parts) != num_clients:
        raise ValueError(
            f"node config num-partitions={parts} differs from data.num_clients={num_clients}"
        )
    return client


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config's fields that fix a round's numbers (node-local fields left out)."""
    return config_fingerprint(config, ignore=NODE_LOCAL_FIELDS)


@dataclasses.dataclass(frozen=True)
class FederationSettings:
    """The server's limits (run config ``min-clients``, ``reply-timeout``,
    ``node-timeout``; see the module docstring)."""

    min_clients: int = 1
    reply_timeout: float = 600.0
    node_timeout: float = 120.0

    def __post_init__(self):
        if self.min_clients < 1:
            raise ValueError(f"run config min-clients must be >= 1, got {self.min_clients}")
        for name in ("reply_timeout", "node_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"run config {name.replace('_', '-')} must be > 0, got {getattr(self, name)}"
                )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationSettings:
        default = cls()
        return cls(
            min_clients=int(run_config.get("min-clients", default.min_clients)),
            reply_timeout=float(run_config.get("reply-timeout", default.reply_timeout)),
            node_timeout=float(run_config.get("node-timeout", default.node_timeout)),
        )
