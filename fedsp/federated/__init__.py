"""Federated execution: one round as a function, the server step, and mapping per-client
functions over a stacked client axis."""

from fedsp.federated.mapping import BACKENDS, CLIENTS_AXIS, client_mesh, map_clients
from fedsp.federated.round import (
    ClientUploads,
    RoundHooks,
    Run,
    RunState,
    ServerStep,
    client_prompts,
    client_updates,
    evaluate,
    round_keys,
    run_round,
    server_step_from_config,
)
from fedsp.federated.server import check_arrays_only, server_step, tree_bytes

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
    "evaluate",
    "map_clients",
    "round_keys",
    "run_round",
    "server_step",
    "server_step_from_config",
    "tree_bytes",
]
