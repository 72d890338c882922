"""Orbax checkpoints: the run state for exact resume, and TPAW's player pool; the
client-side state of algorithms that keep data across rounds."""

from fedsp.checkpoint.client_state import (
    client_state_path,
    load_client_state,
    prune_client_state,
    save_client_state,
)
from fedsp.checkpoint.pool import PlayerPool, PoolEntry, with_adapters
from fedsp.checkpoint.run_state import RoundState, RunCheckpointer, config_fingerprint
from fedsp.checkpoint.trees import (
    CorruptCheckpointError,
    load_meta,
    load_tree,
    quarantine,
    save_tree,
)

__all__ = [
    "CorruptCheckpointError",
    "PlayerPool",
    "PoolEntry",
    "RoundState",
    "RunCheckpointer",
    "client_state_path",
    "config_fingerprint",
    "load_client_state",
    "load_meta",
    "load_tree",
    "prune_client_state",
    "quarantine",
    "save_client_state",
    "save_tree",
    "with_adapters",
]
