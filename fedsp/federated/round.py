"""One federated round as a function: ``run_round(state, hooks=...) -> (state, record)``.

A `RunState` is a `fedsp.checkpoint.RoundState` (what a checkpoint holds: the round,
server adapters and optimizer state, client baselines, the player pool's index, the
metrics history) plus `Run`, the run's fixed context (validated config, frozen base and
tokenizer, task and data, client algorithm, mapped local training, server step, player
pool). `fedsp.init_run` builds one; `fedsp.run` loops over `run_round` with logging and
checkpoints. One round, as data flows (docs/design.md):

  1. ``sample_clients(num_clients, clients_per_round, seed, round, fl.sampling)``
     ("fixed": that many distinct clients; "poisson": each client with probability
     clients_per_round / num_clients, so possibly none); then the simulated dropouts and
     stragglers of ``fl.dropout`` / ``fl.straggler`` (`fedsp.federated.faults.arrivals`,
     drawn from (seed, round, client)) are left out before any work is done: they
     would not deliver;
  2. each remaining client draws ``rollout.prompts_per_client`` prompts from its shard,
     deterministically from (seed, round, client) (`fedsp.federated.clients`: steps
     2-4 are `client_updates`, which a Flower node runs for its own client);
  3. ``algorithm.collect`` runs ONE batched rollout over all those prompts with θ_r,
     gets feedback on the host and packs the traces into a `ClientBatch` [C, ...]: text
     stays inside ``collect``;
  4. the mapped ``local_train`` trains every client from θ_r (base and θ_r frozen,
     batch and key stacked); the clients' adapters and scalar stats are their
     `ClientUploads`, which ``hooks.on_uploads`` sees;
  5. the Byzantine attacks of ``fl.byzantine`` (`fedsp.federated.faults`), then the
     server step (`fedsp.federated.steps.server_step_from_config`, or what
     ``hooks.server_step`` makes of it): clients whose update holds NaN/inf are
     rejected (logged, weight 0), the rest are weighted by `client_weights` (pruned
     clients send nothing: their bytes are logged as saved), and the server optimizer
     steps, or the step is skipped when no client is kept or fewer than
     ``fl.min_clients`` returned in time (a round without clients skips steps 2-4 too);
  6. evaluation when ``eval.every`` (or the last round) says so, and the new global
     adapters enter the player pool of an algorithm that keeps one.

Client advantage (advantage-weighted federation): the round owns each client's reward
baseline b_k (an EMA of its past rewards, NaN before its first round). It passes the
sampled clients' b_k to ``collect(..., baselines=...)``, which computes the advantages
r − b_k of the round's rollouts; ``local_train`` reports their mean
(``stats["mean_advantage"]``, the client advantage that `client_weights` uses) and the
updated baseline (``stats["baseline"]``), which the state keeps for the next round.

Every random draw is a function of (seed, round[, client]): client sampling, faults,
prompt choice, the collect key and the per-client training keys; nothing is taken from a
mutable host RNG, so a resumed run continues with the numbers of an uninterrupted one.
The number of clients that work in a round varies with Poisson sampling and with
dropouts and stragglers: the mapped training compiles once per count (and pads the
client axis to what the backend places, `fedsp.federated.clients.client_updates`).

Pairwise self-play (SPIN, TPAW, DPO; the optional protocol parts in
`fedsp.selfplay.base`): an algorithm with ``uses_context`` gets a `RoundContext` (the
sampled clients' ids, the round-0 adapters, the pool's players); with ``uses_pool`` the
run keeps a `fedsp.checkpoint.PlayerPool` of the global adapters (round 0, then after
every round). A damaged or missing player raises, or with ``pool_on_error = "drop"`` is
dropped with a warning naming it and the round goes on with the others.

A run whose algorithm keeps host-side state (a player pool, or ``client_state``) moves
that state forward with each round: `run_round` then accepts only the newest state of
its run (an older one raises), so two rounds never start from one state by accident.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from fedsp import data as data_lib
from fedsp.compilation_cache import compile_clock
from fedsp.distributed import to_host
from fedsp.eval import evaluate as evaluate_examples
from fedsp.federated import faults
from fedsp.federated.clients import client_updates
from fedsp.federated.state import SERVER_DIAGNOSTICS, ClientUploads, RoundHooks, Run, RunState
from fedsp.federated.steps import privacy_spent, skipped_step
from fedsp.model.sharding import replicate
from fedsp.selfplay.base import PoolAlgorithm, RoundContext

__all__ = ["evaluate", "run_round"]

_log = logging.getLogger(__name__)
PyTree = Any


def evaluate(state: RunState, params: PyTree | None = None) -> dict[str, float]:
    """``{"eval/accuracy": ..., ...}`` of ``params`` (default: the state's adapters) on
    the run's evaluation set, as configured by ``config.eval``."""
    run = _run_of(state)
    config, policy = run.config, run.policy
    with _on_mesh(run):
        result = evaluate_examples(
            policy.graphdef,
            (state.params if params is None else params, policy.base_state),
            policy.tokenizer,
            run.eval_task,
            run.eval_set,
            multiple_choice=config.eval.multiple_choice,
            max_new_tokens=config.eval.max_new_tokens,
            batch_size=config.eval.batch_size,
        )
    return {f"eval/{k}": v for k, v in result.items()}


def run_round(
    state: RunState, *, hooks: RoundHooks | None = None
) -> tuple[RunState, dict[str, Any]]:
    """Runs round ``state.round + 1`` (see the module docstring).

    Returns:
      ``(state', record)``: the state after the round (its ``metrics_history`` ends with
      the record) and the round's record: clients (those whose update arrived),
      weights, advantages, rejected, pruned and dropped (sampled but without an update
      in time: simulated dropouts and stragglers, nodes that did not answer,
      `RoundHooks.client_updates`) clients, the ``stragglers`` among the dropped and
      their simulated ``straggler_times``, ``sim/round_s`` (the simulated seconds the
      server waited, with an ``fl.straggler.deadline``), bytes sent and saved, the
      mean loss of the kept clients,
      ``client/*`` (means of the clients' stats), ``server/*``, ``collect/*``,
      ``eval/*`` on evaluated rounds, ``pool/*`` with a pool, the round's wall time
      ``time_s`` and its parts ``time/rollout_s`` (sampling, feedback, packing),
      ``time/train_s`` (local training of every client), ``time/server_s`` (the server
      step), ``time/eval_s`` (microseconds on rounds without evaluation) and, of all these,
      ``time/compile_s`` (tracing and compiling programs, or loading them from the
      persistent compilation cache: the first round of a process pays it).

    Raises:
      ValueError: the run has already done ``fl.rounds`` rounds, or ``state`` is not the
        newest state of a run with host-side state.
    """
    run = _run_of(state)
    with _on_mesh(run):
        return _run_round(state, run, hooks or RoundHooks())


def _run_round(state: RunState, run: Run, hooks: RoundHooks) -> tuple[RunState, dict[str, Any]]:
    config, algo, pool = run.config, run.algorithm, run.pool
    fl = config.fl
    rnd = state.round + 1
    if rnd > fl.rounds:
        raise ValueError(f"the run has done its fl.rounds = {fl.rounds} rounds")
    if run.stateful and state.round != run.newest_round[0]:
        raise ValueError(
            f"this state is after round {state.round}, but its run has moved on to round "
            f"{run.newest_round[0]}: run_round consumes its state; continue from the state "
            "it returned (or start again with fedsp.init_run)"
        )
    spent = privacy_spent(config, rnd)
    budget = config.fl.dp.max_epsilon
    if spent is not None and budget is not None and spent > budget:
        raise RuntimeError(
            f"round {rnd} would spend ε = {spent:.3g} (δ = {config.fl.dp.delta:g}), over "
            f"fl.dp.max_epsilon = {budget:g}: the run stops after round {rnd - 1}"
        )
    round_start = time.perf_counter()
    compile_start = compile_clock()
    sampled = data_lib.sample_clients(
        config.data.num_clients, fl.clients_per_round, config.seed, rnd, fl.sampling
    )
    # Dropouts and stragglers are known before the work: they do none of it.
    arrival = faults.arrivals(config, sampled, rnd)
    clients = sampled[arrival.returns]
    if arrival.stragglers:
        _log.info(
            "round %d: client(s) %s would miss the deadline of %g simulated s",
            rnd,
            arrival.stragglers,
            fl.straggler.deadline,
        )
    baselines = np.array(state.baselines)
    extra: dict[str, Any] = {}
    pool_dropped: list[int] = []
    if getattr(algo, "uses_context", False):
        players = player_mask = None
        if pool is not None:
            before = pool.rounds
            # A run has a pool only for an algorithm with uses_pool (`fedsp.runner`), and
            # those carry pool_on_error: a link between two objects mypy cannot follow.
            on_error = cast(PoolAlgorithm, algo).pool_on_error
            players, player_mask = pool.stacked(state.params, on_error=on_error)
            pool_dropped = [r for r in before if r not in pool.rounds]
        extra["context"] = RoundContext(
            clients=np.asarray(clients),
            reference=run.initial_params,
            players=players,
            player_mask=player_mask,
            player_rounds=pool.rounds if pool else (),
        )
    if len(clients):
        update = hooks.client_updates or client_updates
        uploads, collect_metrics, times = update(
            run, state.params, state.rng, rnd, clients, baselines[clients], **extra
        )
    else:
        uploads, collect_metrics = _no_uploads(state.params, rnd), {}
        times = {"rollout_s": 0.0, "train_s": 0.0}
    uploads, attackers = faults.simulate_faults(
        config, state.params, dataclasses.replace(uploads, round=rnd)
    )
    train_end = time.perf_counter()
    rollout_end = train_end - times["train_s"]
    returned = set(np.asarray(uploads.clients).tolist())
    dropped = [int(k) for k in sampled if int(k) not in returned]
    clients = np.asarray(uploads.clients)
    if hooks.on_uploads is not None:
        hooks.on_uploads(rnd, uploads)
    step = run.server_step if hooks.server_step is None else hooks.server_step(run.server_step)
    if not len(sampled):
        _log.warning(
            "round %d: no client sampled (fl.sampling = %r): server step skipped", rnd, fl.sampling
        )
        step = skipped_step
    elif len(clients) < fl.min_clients:
        _log.warning(
            "round %d: %d client(s) returned, fewer than fl.min_clients = %d: server step skipped",
            rnd,
            len(clients),
            fl.min_clients,
        )
        step = skipped_step
    new_lora, opt_state, server = step(state.params, state.opt_state, uploads)
    server = dict(server)
    missing = [k for k in SERVER_DIAGNOSTICS if k not in server]
    if missing:
        raise ValueError(f"the server step's diagnostics lack {missing}")
    server = to_host(server)
    server_end = time.perf_counter()
    finite, keep, weights = (server.pop(k) for k in ("finite", "keep", "weights"))
    stats = uploads.stats
    # The baseline comes from the client's rewards (host side), not from its update, so
    # it is kept even when the update itself is rejected.
    baselines[clients] = stats["baseline"]

    rejected = [int(k) for k, ok in zip(clients, finite) if not ok]
    pruned = [int(k) for k, ok, kept in zip(clients, finite, keep) if ok and not kept]
    if rejected:
        _log.warning("round %d: rejected non-finite update(s) from client(s) %s", rnd, rejected)
    applied = bool(np.asarray(server["applied"]))
    if not applied:
        _log.warning("round %d: no client kept; server step skipped", rnd)
    kept_losses = stats["loss"][finite & keep] if "loss" in stats else np.zeros(0)
    client_adv = stats["mean_advantage"].astype(np.float32)
    record: dict[str, Any] = {
        "round": rnd,
        "clients": [int(k) for k in clients],
        "weights": [float(w) for w in weights],
        "client_advantage": [_json_number(a) for a in client_adv],
        "rejected": rejected,
        "pruned": pruned,
        "dropped": dropped,
        "stragglers": arrival.stragglers,
        "straggler_times": _straggler_times(sampled, arrival),
        **({} if arrival.wait is None else {"sim/round_s": arrival.wait}),
        "byzantine": attackers,
        "server_step_skipped": not applied,
        "bytes_sent": run.adapter_bytes * (len(clients) - len(pruned)),
        "bytes_saved": run.adapter_bytes * len(pruned),
        "loss": _json_number(np.mean(kept_losses)) if kept_losses.size else None,
        # inf (no noise) is logged as null, as every non-finite number.
        **({} if spent is None else {"dp/epsilon": _json_number(spent)}),
        **{
            f"client/{k}": _json_number(np.nanmean(v)) if np.isfinite(v).any() else None
            for k, v in stats.items()
        },
        **{f"server/{k}": float(np.asarray(v)) for k, v in server.items()},
        **{f"collect/{k}": _json_number(v) for k, v in _scalars(dict(collect_metrics)).items()},
    }
    new = dataclasses.replace(
        state,
        round=rnd,
        params=new_lora,
        opt_state=opt_state,
        baselines=replicate(jnp.asarray(baselines), run.mesh),
    )
    eval_start = time.perf_counter()
    if rnd == fl.rounds or (config.eval.every and rnd % config.eval.every == 0):
        record.update(evaluate(new))
    eval_end = time.perf_counter()
    if pool is not None:
        record["pool/rounds"] = list(pool.rounds)
        record["pool/dropped"] = pool_dropped
        pool.push(
            new.params,
            round=rnd,
            score=record.get("eval/accuracy"),
            metadata={"loss": record["loss"]},
        )
        new = dataclasses.replace(new, pool=pool.state_dict())
    record["time_s"] = time.perf_counter() - round_start
    record["time/rollout_s"] = rollout_end - round_start
    record["time/train_s"] = train_end - rollout_end
    record["time/server_s"] = server_end - train_end
    record["time/eval_s"] = eval_end - eval_start
    record["time/compile_s"] = compile_clock().since(compile_start).total_s
    run.newest_round[0] = rnd
    return dataclasses.replace(new, metrics_history=(*state.metrics_history, record)), record


def _no_uploads(params: PyTree, round: int) -> ClientUploads:
    """The uploads of a round in which no client works: no rows, the stats the record
    reads."""
    stats = ("num_examples", "mean_advantage", "baseline", "wins", "wrong", "loss")
    return ClientUploads(
        clients=np.zeros(0, np.int64),
        params=jax.tree.map(lambda x: jnp.zeros((0, *x.shape), x.dtype), params),
        stats={k: np.zeros(0, np.float32) for k in stats},
        round=round,
    )


def _straggler_times(sampled: np.ndarray, arrival: faults.Arrivals) -> list[float]:
    if arrival.times is None:
        return []
    time_of = dict(zip(sampled.tolist(), arrival.times.tolist()))
    return [float(time_of[k]) for k in arrival.stragglers]


def _on_mesh(run: Run) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if run.mesh is None else jax.set_mesh(run.mesh)


def _run_of(state: RunState) -> Run:
    run = getattr(state, "run", None)
    if run is None:
        raise ValueError("state has no run: build it with fedsp.init_run(config, ...)")
    return run


def _scalars(tree: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(np.mean(np.asarray(v)))
        for k, v in tree.items()
        if np.size(np.asarray(v)) >= 1 and np.issubdtype(np.asarray(v).dtype, np.number)
    }


def _json_number(value: float | np.floating) -> float | None:
    """JSON has no NaN/inf: they are logged as null."""
    return float(value) if np.isfinite(value) else None
