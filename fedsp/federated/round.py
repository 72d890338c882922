"""One federated round as a function: ``run_round(state, hooks=...) -> (state, record)``.

A `RunState` is a `fedsp.checkpoint.RoundState` (what a checkpoint holds: the round,
server adapters and optimizer state, client baselines, the player pool's index, the
metrics history) plus `Run`, the run's fixed context (validated config, frozen base and
tokenizer, task and data, client algorithm, mapped local training, server step, player
pool). `fedsp.init_run` builds one; `fedsp.run` loops over `run_round` with logging and
checkpoints. One round, as data flows (docs/design.md):

  1. ``sample_clients(num_clients, clients_per_round, seed, round)``;
  2. each sampled client draws ``rollout.prompts_per_client`` prompts from its shard,
     deterministically from (seed, round, client) (`client_prompts`);
  3. ``algorithm.collect`` runs ONE batched rollout over all those prompts with θ_r,
     gets feedback on the host and packs the traces into a `ClientBatch` [C, ...]: text
     stays inside ``collect``;
  4. the mapped ``local_train`` trains every client from θ_r (base and θ_r frozen,
     batch and key stacked); the clients' adapters and scalar stats are their
     `ClientUploads`, which ``hooks.on_uploads`` sees;
  5. the server step (`server_step_from_config`, or what ``hooks.server_step`` makes
     of it): clients whose update holds NaN/inf are rejected (logged, weight 0), the
     rest are weighted by `client_weights` (pruned clients send nothing: their bytes
     are logged as saved), and the server optimizer steps, or the step is skipped when
     no client is kept;
  6. evaluation when ``eval.every`` (or the last round) says so, and the new global
     adapters enter the player pool of an algorithm that keeps one.

Client advantage (advantage-weighted federation): the round owns each client's reward
baseline b_k (an EMA of its past rewards, NaN before its first round). It passes the
sampled clients' b_k to ``collect(..., baselines=...)``, which computes the advantages
r − b_k of the round's rollouts; ``local_train`` reports their mean
(``stats["mean_advantage"]``, the client advantage that `client_weights` uses) and the
updated baseline (``stats["baseline"]``), which the state keeps for the next round.

Every random draw is a function of (seed, round[, client]): client sampling, prompt
choice, the collect key and the per-client training keys; nothing is taken from a
mutable host RNG, so a resumed run continues with the numbers of an uninterrupted one.

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
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedsp import data as data_lib
from fedsp import progress
from fedsp.checkpoint import PlayerPool, RoundState, RunCheckpointer
from fedsp.compilation_cache import compile_clock
from fedsp.core.aggregation import server_optimizer
from fedsp.core.privacy import epsilon
from fedsp.distributed import check_agreement, to_host
from fedsp.eval import evaluate as evaluate_examples
from fedsp.federated.faults import attack_uploads, byzantine_clients, returns
from fedsp.federated.server import DpSettings, RobustSettings, server_step
from fedsp.model.sharding import replicate
from fedsp.selfplay.base import Algorithm, Policy, PoolAlgorithm, RoundContext

__all__ = [
    "ClientUploads",
    "RoundHooks",
    "Run",
    "RunState",
    "ServerStep",
    "client_prompts",
    "client_updates",
    "evaluate",
    "privacy_spent",
    "round_keys",
    "run_round",
    "server_step_from_config",
]

_log = logging.getLogger(__name__)
PyTree = Any

# The DP noise's key stream, apart from the rollout and training keys of a round.
_DP_STREAM = 0x4450
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
        local training) and is called with its arguments; `fedsp.flower`'s server asks
        the federation's nodes instead. Its uploads may hold fewer clients than were
        sampled (nodes that did not answer): the round goes on with those, and the
        record's ``dropped`` names the others.
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


def server_step_from_config(
    fl: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    *,
    dp: DpSettings | None = None,
    seed: int = 0,
) -> ServerStep:
    """The server step ``config.fl`` describes: `fedsp.federated.server.server_step`
    with the configured client weighting, pruning and aggregator, and DP-FedAvg with
    ``dp`` (`DpSettings.from_config(config)`; its noise is drawn from (``seed``, the
    uploads' round), so a resumed run adds the same noise)."""

    def step(params: PyTree, opt_state: optax.OptState, uploads: ClientUploads):
        noise_key = None
        if dp is not None:
            noise_key = jax.random.fold_in(
                jax.random.fold_in(jax.random.key(seed), uploads.round), _DP_STREAM
            )
        return server_step(
            params,
            opt_state,
            uploads.params,
            np.asarray(uploads.stats["num_examples"]).astype(np.float32),
            np.asarray(uploads.stats["mean_advantage"]).astype(np.float32),
            optimizer=optimizer,
            mode=fl.client_weighting,
            temperature=fl.weight_temperature,
            threshold=fl.prune_threshold,
            robust=RobustSettings.from_config(fl),
            dp=dp,
            noise_key=noise_key,
        )

    return step


def privacy_spent(config: ml_collections.ConfigDict, rounds: int) -> float | None:
    """ε (at ``fl.dp.delta``) of the run's adapters after ``rounds`` DP-FedAvg rounds
    (`fedsp.core.privacy.epsilon`, clients sampled without replacement), or None
    without DP."""
    dp = DpSettings.from_config(config)
    if dp is None:
        return None
    return epsilon(
        rounds,
        num_clients=config.data.num_clients,
        clients_per_round=config.fl.clients_per_round,
        noise_multiplier=dp.noise_multiplier,
        delta=config.fl.dp.delta,
    )


def default_optimizer(fl: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The server optimizer ``config.fl`` names."""
    return server_optimizer(fl.server_optimizer, fl.server_lr, fl.b1, fl.b2, fl.tau, fl.v0)


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

    `run_round` calls it for every sampled client at once; a `fedsp.flower` node calls
    it for its own client alone, with ``slots=[its position among the sampled
    clients]``, so it draws the prompts and keys the simulator draws for that client.

    Args:
      run: the run's context (`fedsp.init_run`).
      params: θ_r, the round's global adapters.
      rng: the run's key (``RunState.rng``); with ``round`` it fixes every draw.
      round: the round, 1-based.
      clients: [C] global ids of the clients to update.
      baselines: [C] their reward baselines (NaN: none yet).
      slots: [C] their positions among the round's sampled clients; None: 0..C-1.
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
    client_lora, stats = run.train_clients(run.policy.base_state, params, batch, keys)
    uploads = ClientUploads(
        clients=np.asarray(clients),
        params=jax.block_until_ready(client_lora),
        stats=to_host(dict(stats)),
        round=round,
    )
    del batch  # the rollout's rows are not needed past training
    progress.report("training clients", len(clients), len(clients))
    times = {"rollout_s": rollout_end - start, "train_s": time.perf_counter() - rollout_end}
    return uploads, dict(collect_metrics), times


def run_round(
    state: RunState, *, hooks: RoundHooks | None = None
) -> tuple[RunState, dict[str, Any]]:
    """Runs round ``state.round + 1`` (see the module docstring).

    Returns:
      ``(state', record)``: the state after the round (its ``metrics_history`` ends with
      the record) and the round's record: clients, weights, advantages, rejected,
      pruned and dropped (sampled but without an update, `RoundHooks.client_updates`)
      clients, bytes sent and saved, the mean loss of the kept clients,
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
    clients = data_lib.sample_clients(
        config.data.num_clients, fl.clients_per_round, config.seed, rnd
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
    update = hooks.client_updates or client_updates
    uploads, collect_metrics, times = update(
        run, state.params, state.rng, rnd, clients, baselines[clients], **extra
    )
    uploads, attackers = _simulate_faults(
        config, state.params, dataclasses.replace(uploads, round=rnd)
    )
    train_end = time.perf_counter()
    rollout_end = train_end - times["train_s"]
    returned = set(np.asarray(uploads.clients).tolist())
    dropped = [int(k) for k in clients if int(k) not in returned]
    clients = np.asarray(uploads.clients)
    if hooks.on_uploads is not None:
        hooks.on_uploads(rnd, uploads)
    step = run.server_step if hooks.server_step is None else hooks.server_step(run.server_step)
    if len(clients) < fl.min_clients:
        _log.warning(
            "round %d: %d client(s) returned, fewer than fl.min_clients = %d: server step skipped",
            rnd,
            len(clients),
            fl.min_clients,
        )
        step = _skip_step
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


def _simulate_faults(
    config: ml_collections.ConfigDict, params: PyTree, uploads: ClientUploads
) -> tuple[ClientUploads, list[int]]:
    """``uploads`` after ``config.fl``'s simulated faults (`fedsp.federated.faults`):
    the Byzantine clients' adapters poisoned, the clients that drop out removed; and the
    attackers among the uploads."""
    fl, rnd = config.fl, uploads.round
    clients = np.asarray(uploads.clients)
    attackers: list[int] = []
    if fl.byzantine.fraction > 0:
        bad = np.isin(
            clients, byzantine_clients(config.data.num_clients, fl.byzantine.fraction, config.seed)
        )
        attackers = [int(k) for k in clients[bad]]
        if attackers:
            key = jax.random.fold_in(jax.random.key(config.seed), rnd)
            poisoned = attack_uploads(
                params, uploads.params, bad, fl.byzantine.attack, fl.byzantine.scale, key
            )
            uploads = dataclasses.replace(uploads, params=poisoned)
    if fl.dropout > 0:
        back = returns(clients, fl.dropout, config.seed, rnd)
        if not back.all():
            idx = np.flatnonzero(back)
            uploads = dataclasses.replace(
                uploads,
                clients=clients[idx],
                params=jax.tree.map(lambda x: x[idx], uploads.params),
                stats={k: np.asarray(v)[idx] for k, v in uploads.stats.items()},
            )
            attackers = [k for k in attackers if k in set(clients[idx].tolist())]
    return uploads, attackers


def _skip_step(params: PyTree, opt_state: optax.OptState, uploads: ClientUploads):
    """The server step of a round with too few updates: nothing changes."""
    c = len(uploads.clients)
    zero = jnp.float32(0.0)
    return (
        params,
        opt_state,
        {
            "weights": np.zeros(c, np.float32),
            "keep": np.zeros(c, bool),
            "finite": np.ones(c, bool),
            "applied": zero,
            "pseudo_grad_norm": zero,
            "update_norm": zero,
            "total_weight": zero,
        },
    )


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
