"""What a round reads and writes: the clients' uploads, the round hooks, the run's fixed
context (`Run`) and its state between rounds (`RunState`)."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from fedsp import data as data_lib
from fedsp.checkpoint import PlayerPool, RoundState, RunCheckpointer
from fedsp.selfplay.base import Algorithm, Policy

__all__ = [
    "SERVER_DIAGNOSTICS",
    "ClientUploads",
    "RoundHooks",
    "Run",
    "RunState",
    "ServerStep",
]

PyTree = Any

# Keys every server step's diagnostics must hold, [C] arrays then scalars.
SERVER_DIAGNOSTICS = ("weights", "keep", "finite", "applied")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClientUploads:
    """What the round's C clients send the server, stacked [C, ...]: arrays only.

    Attributes:
      clients: [C] the clients' global ids.
      params: their adapters after local training, leaves [C, ...].
      stats: their scalar statistics, each [C]: ``num_examples`` (FedAvg's weight),
        ``mean_advantage`` (the client advantage), ``baseline``, ``wins``, ``wrong``,
        ``loss`` and the algorithm's own loss metrics.
      round: the round they answer (static; DP noise is drawn from it).
    """

    clients: np.ndarray
    params: PyTree
    stats: dict[str, np.ndarray]
    round: int = dataclasses.field(default=0, metadata={"static": True})


# (θ_r, opt_state, uploads) -> (θ_{r+1}, opt_state', diagnostics with SERVER_DIAGNOSTICS).
ServerStep = Callable[
    [PyTree, optax.OptState, ClientUploads], tuple[PyTree, optax.OptState, dict[str, Any]]
]


@dataclasses.dataclass(frozen=True)
class RoundHooks:
    """What a caller of `run_round` (or `fedsp.run`) may observe or replace.

    Attributes:
      on_uploads: called as ``on_uploads(round, uploads)`` with every round's
        `ClientUploads`, before the server step.
      server_step: ``server_step(default) -> step``: given the config's `ServerStep`, the
        step to use this round; return a wrapper of ``default`` to observe the server's
        inputs and outputs, or another function to replace it. Its diagnostics must hold
        ``weights``, ``keep``, ``finite`` ([C]) and ``applied`` (scalar).
      client_updates: replaces `client_updates` (steps 2-4: the clients' rollouts and
        local training) and is called with its arguments, for the round's sampled
        clients less the simulated dropouts and stragglers (`fedsp.federated.faults`;
        not at all in a round left without clients); `fedsp.flower`'s server asks the
        federation's nodes instead. Its uploads may hold fewer clients than it was
        given (nodes that did not answer): the round goes on with those, and the
        record's ``dropped`` names every sampled client without an update.
    """

    on_uploads: Callable[[int, ClientUploads], None] | None = None
    server_step: Callable[[ServerStep], ServerStep] | None = None
    client_updates: Callable[..., tuple[ClientUploads, dict[str, Any], dict[str, float]]] | None = (
        None
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """The fixed context of a run, built once by `fedsp.init_run`.

    Attributes:
      config: the validated config (`fedsp.config.default_config` schema).
      policy: the graph, frozen base and tokenizer.
      task, eval_task: the training task and the task evaluated on.
      train, eval_set: the training examples and the held-out evaluation examples.
      shards: per client, the indices of its training examples.
      feedback: the simulated user.
      algorithm: the client algorithm.
      optimizer: the server optimizer.
      server_step: the config's server step (`server_step_from_config`).
      train_clients: ``local_train`` mapped over clients (`fedsp.federated.map_clients`).
      initial_params: the round-0 adapters (DPO's reference, the pool's first player).
      adapter_bytes: bytes of one client's upload of adapters.
      mesh: the ("clients", "model") device mesh (``fl.mesh``) the base weights are
        sharded on; rounds and evaluation run under ``jax.set_mesh(mesh)``. None for
        the pmap backend, which places clients itself.
      pool: the player pool of an algorithm with ``uses_pool``, else None.
      workdir: the run directory, or None (a run that writes no files).
      checkpointer: the run-state checkpointer in ``workdir/checkpoints``, or None.
    """

    config: ml_collections.ConfigDict
    policy: Policy
    task: data_lib.Task
    eval_task: data_lib.Task
    train: Sequence[data_lib.Example]
    eval_set: Sequence[data_lib.Example]
    shards: Sequence[np.ndarray]
    feedback: data_lib.FeedbackProvider
    algorithm: Algorithm
    optimizer: optax.GradientTransformation
    server_step: ServerStep
    train_clients: Callable[..., Any]
    initial_params: PyTree
    adapter_bytes: int
    mesh: jax.sharding.Mesh | None = None
    pool: PlayerPool | None = None
    workdir: pathlib.Path | None = None
    checkpointer: RunCheckpointer | None = None
    # The newest round a state of this run has reached (see the module docstring).
    newest_round: list[int] = dataclasses.field(default_factory=lambda: [0])

    @property
    def stateful(self) -> bool:
        """Whether rounds move host-side state forward (a pool, or client state)."""
        return self.pool is not None or hasattr(self.algorithm, "client_state")

    def close(self) -> None:
        """Waits for and closes the checkpointer (if any)."""
        if self.checkpointer is not None:
            self.checkpointer.close()


@dataclasses.dataclass(frozen=True)
class RunState(RoundState):
    """A run's state between rounds: the checkpointed `RoundState` and its `Run`."""

    run: Run | None = dataclasses.field(default=None, compare=False, repr=False)
