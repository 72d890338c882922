"""The clients' side of a round (steps 2-4 of `fedsp.federated.round`): which prompts
each client plays, the round's keys, and one batched rollout with local training for any
set of clients."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedsp import progress
from fedsp.distributed import check_agreement, to_host
from fedsp.federated.mapping import CLIENTS_AXIS
from fedsp.federated.state import ClientUploads, Run
from fedsp.selfplay.base import RoundContext

__all__ = ["client_prompts", "client_updates", "placeable_clients", "round_keys"]

PyTree = Any


def client_prompts(
    shard: np.ndarray,
    count: int,
    seed: int,
    round: int,
    client: int,
) -> np.ndarray:
    """Indices of the ``count`` prompts client ``client`` plays in round ``round``.

    Drawn from the client's shard by a generator seeded with (seed, round, client), so
    a resumed run draws the same prompts; without replacement when the shard is large
    enough, else with replacement (a fixed count keeps the batch shapes fixed).
    """
    rng = np.random.default_rng([int(seed), int(round), int(client)])
    return rng.choice(shard, size=count, replace=len(shard) < count)


def round_keys(rng: jax.Array, round: int) -> tuple[jax.Array, jax.Array]:
    """``(collect_key, train_key)`` of round ``round`` from the run's key ``rng``."""
    collect_key, train_key = jax.random.split(jax.random.fold_in(rng, round))
    return collect_key, train_key


def client_updates(
    run: Run,
    params: PyTree,
    rng: jax.Array,
    round: int,
    clients: Sequence[int] | np.ndarray,
    baselines: np.ndarray,
    *,
    slots: Sequence[int] | np.ndarray | None = None,
    context: RoundContext | None = None,
) -> tuple[ClientUploads, dict[str, Any], dict[str, float]]:
    """Steps 2-4 of a round (the module docstring) for ``clients``: their prompts, one
    batched rollout with feedback, and their local training from ``params``.

    `run_round` calls it for the round's clients at once (the sampled ones that will
    deliver in time, `fedsp.federated.faults.arrivals`); a `fedsp.flower` node calls it
    for its own client alone, with ``slots=[its position among them]``, so it draws the
    prompts and keys the simulator draws for that client.

    The number of clients may differ between rounds (Poisson sampling, dropouts,
    stragglers). The mapped training compiles once per count, and a count that the
    backend cannot place (vmap: not a multiple of the mesh's clients axis; pmap: above
    and not a multiple of the local devices) is padded with copies of the first client,
    whose outputs are dropped: training is per client, so the copies do not enter any
    other client's update.

    Args:
      run: the run's context (`fedsp.init_run`).
      params: θ_r, the round's global adapters.
      rng: the run's key (``RunState.rng``); with ``round`` it fixes every draw.
      round: the round, 1-based.
      clients: [C] global ids of the clients to update.
      baselines: [C] their reward baselines (NaN: none yet).
      slots: [C] their positions among the clients `run_round` updates in this round;
        None: 0..C-1.
      context: the `RoundContext` of an algorithm with ``uses_context``.

    Returns:
      ``(uploads, collect_metrics, times)``: the clients' `ClientUploads`, the rollout's
      metrics and the seconds spent in ``rollout_s`` and ``train_s``.
    """
    start = time.perf_counter()
    config = run.config
    client_examples = [
        [
            run.train[i]
            for i in client_prompts(
                run.shards[k], config.rollout.prompts_per_client, config.seed, round, k
            )
        ]
        for k in clients
    ]
    collect_key, train_key = round_keys(rng, round)
    extra: dict[str, Any] = {}
    if context is not None:
        extra["context"] = context
    if slots is not None:
        extra["slots"] = slots
    batch, collect_metrics = run.algorithm.collect(
        run.policy,
        params,
        client_examples,
        run.task,
        run.feedback,
        collect_key,
        round,
        baselines=np.asarray(baselines),
        **extra,
    )
    # Every process packed the batch itself; a multi-host run checks they agree.
    check_agreement(batch, f"client batches in round {round}")
    rollout_end = time.perf_counter()
    progress.report("training clients", 0, len(clients))
    keys = jnp.stack([jax.random.fold_in(train_key, int(k)) for k in clients])
    count = len(clients)
    placed = placeable_clients(run, count)
    if placed != count:
        batch, keys = _padded((batch, keys), placed)
    client_lora, stats = run.train_clients(run.policy.base_state, params, batch, keys)
    stats = to_host(dict(stats))
    if placed != count:
        client_lora = _first(client_lora, count)
        stats = {k: v[:count] for k, v in stats.items()}
    uploads = ClientUploads(
        clients=np.asarray(clients),
        params=jax.block_until_ready(client_lora),
        stats=stats,
        round=round,
    )
    del batch  # the rollout's rows are not needed past training
    progress.report("training clients", len(clients), len(clients))
    times = {"rollout_s": rollout_end - start, "train_s": time.perf_counter() - rollout_end}
    return uploads, dict(collect_metrics), times


def placeable_clients(run: Run, count: int) -> int:
    """The client count the run's mapped training takes for ``count`` clients: the
    smallest count ≥ it that the backend places (`fedsp.federated.map_clients`)."""
    backend = run.config.fl.backend
    if backend == "vmap" and run.mesh is not None:
        devices = int(run.mesh.shape[CLIENTS_AXIS])
    elif backend == "pmap" and count > jax.local_device_count():
        devices = jax.local_device_count()
    else:
        return count
    return -(-count // devices) * devices


def _padded(tree: PyTree, size: int) -> PyTree:
    """``tree``'s leaves [C, ...] grown to [size, ...] with copies of their first row."""

    def pad(x: Any) -> Any:
        return jnp.concatenate([x] + [x[:1]] * (size - x.shape[0]))

    return jax.tree.map(pad, tree)


@functools.partial(jax.jit, static_argnums=1)
def _first(tree: PyTree, count: int) -> PyTree:
    # Under jit: the rows may be sharded over devices (of several hosts).
    return jax.tree.map(lambda x: x[:count], tree)
