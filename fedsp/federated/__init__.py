"""Federated execution: one round as a function, the server step, and mapping per-client
functions over a stacked client axis."""

from fedsp.federated.clients import client_prompts, client_updates, round_keys
from fedsp.federated.mapping import BACKENDS, CLIENTS_AXIS, client_mesh, map_clients
from fedsp.federated.round import evaluate, run_round
from fedsp.federated.server import check_arrays_only, server_step, tree_bytes
from fedsp.federated.state import ClientUploads, RoundHooks, Run, RunState, ServerStep
from fedsp.federated.steps import default_optimizer, server_step_from_config

__all__ = [
    "BACKENDS",
    "CLIENTS_AXIS",
    "ClientUploads",
    "RoundHooks",
    "Run",
    "RunState",
    "ServerStep",
    "check_arrays_only",
    "client_mesh",
    "client_prompts",
    "client_updates",
    "default_optimizer",
    "evaluate",
    "map_clients",
    "round_keys",
    "run_round",
    "server_step",
    "server_step_from_config",
    "tree_bytes",
]
