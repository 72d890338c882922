"""Runs from a config: ``init_run`` builds a `RunState`, ``run`` loops over `run_round`.

``init_run(config, model=None, tokenizer=None, workdir=None)`` validates the config,
loads (or takes) the model and attaches fresh LoRA adapters, loads the task's data and
partitions it over the clients, builds the client algorithm, the server optimizer and
step, and the mapped local training. With a ``workdir`` it resumes from the newest
readable checkpoint there and keeps the player pool in ``workdir/pool``; without one
nothing is written (the pool, if any, lives in memory).

``run(config, workdir)`` is ``init_run``, the round-0 evaluation, `run_round` until
``fl.rounds``, and around each round the run directory's files: ``config.json``,
``metrics.jsonl``, TensorBoard events, an Orbax checkpoint of the run state every
``checkpoint.every`` rounds (the algorithm's client-side data beside it, never on the
server) and, at the end, ``summary.json``. A run killed after round r and restarted in
the same ``workdir`` continues with the numbers of an uninterrupted run; resuming with
different settings raises, naming the fields (``log.*``, ``checkpoint.*``,
``distributed.*``, ``fl.mesh`` and the memory levers ``model.remat``,
``local.micro_batch_size`` and ``fl.clients_at_once`` may change).

Nothing is lost on a crash, and the resume is exact. The newest committed checkpoint is
the run's truth: a kill (even mid-write: Orbax commits a round by renaming it into place,
and deletes older rounds only after that), a full disk or a damaged newest checkpoint
(moved aside to ``<round>.corrupt`` with a logged warning) leaves the run resuming after
the newest readable round. A round's ``metrics.jsonl`` record is appended after its
checkpoint is written, so the file never shows a round the checkpoints lack (rounds
between checkpoints, with ``checkpoint.every`` > 1, excepted); the resume rewrites it
from the restored history, so no round is recorded twice. A checkpoint that fails for
lack of space raises OSError (ENOSPC) naming the path and the round to resume from.

Multi-host (`fedsp.distributed`): every process calls `run` with the same config (but
its own ``distributed.process_id``) and the same ``workdir``, which they must all see;
the main process writes ``config.json``, ``metrics.jsonl``, TensorBoard and
``summary.json``, and every process takes part in the checkpoints.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fedsp import compilation_cache, distributed, executables, progress
from fedsp import data as data_lib
from fedsp.checkpoint import (
    PlayerPool,
    RoundState,
    RunCheckpointer,
    config_fingerprint,
    load_client_state,
    prune_client_state,
    save_client_state,
)
from fedsp.config import requested_mesh, validate
from fedsp.federated.mapping import map_clients
from fedsp.federated.round import evaluate, run_round
from fedsp.federated.server import DpSettings, tree_bytes
from fedsp.federated.state import RoundHooks, Run, RunState
from fedsp.federated.steps import default_optimizer, server_step_from_config
from fedsp.model import Tokenizer, Transformer, from_pretrained
from fedsp.model.lora import LoRAConfig, apply_lora, split_lora
from fedsp.model.sharding import make_mesh, mesh_shape, replicate, shard_state
from fedsp.selfplay import Policy, get_algorithm

__all__ = ["init_run", "run", "save_checkpoint"]

_log = logging.getLogger(__name__)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Config fields a resumed run may change: fl.mesh and distributed (other hardware, or
# another host layout, gives the same numbers up to float rounding; every process has its
# own distributed.process_id) and the memory levers, which change what is kept or
# recomputed, not the numbers, so a run that ran out of memory can resume with more.
# Config sections local training never reads (`Algorithm.local_train`, built by
# `get_algorithm` from config.algorithm, config.local, config.model and config.fl): runs
# that differ only in them (other seeds, evaluation settings) share its program.
_OUTSIDE_TRAINING = ("seed", "eval", "log", "checkpoint", "distributed")

_RESUMABLE_CHANGES = (
    "log",
    "checkpoint",
    "distributed",
    "fl.mesh",
    "model.remat",
    "local.micro_batch_size",
    "fl.clients_at_once",
)


def init_run(
    config: ml_collections.ConfigDict,
    *,
    model: Transformer | None = None,
    tokenizer: Tokenizer | None = None,
    workdir: str | pathlib.Path | None = None,
    algorithm: Any | None = None,
    train_data: bool = True,
) -> RunState:
    """The state a run starts (or, with a ``workdir`` that holds checkpoints, resumes) from.

    Args:
      config: an experiment config (`fedsp.config.default_config` schema); validated
        first (`fedsp.config.validate`).
      model: an in-memory model to use instead of loading ``config.model.path`` (then
        ``model.path`` and ``model.dtype`` are not read). One without adapters gets
        ``config.model.lora``'s, and every model ``config.model.remat`` (the model
        itself is not changed); one with adapters must have that configuration.
      tokenizer: the model's tokenizer; required with ``model``.
      workdir: the run directory: checkpoints are restored from (and, by `run` /
        `save_checkpoint`, written to) ``workdir/checkpoints``, the player pool lives in
        ``workdir/pool``. None writes nothing.
      algorithm: a client algorithm object (`fedsp.selfplay.base.Algorithm`) to use
        instead of ``fedsp.get_algorithm(config.algorithm.name, config)``.
      train_data: False for a run whose clients hold the training data elsewhere (the
        server of a `fedsp.flower` federation): the training split is not read, and
        ``Run.train`` and ``Run.shards`` are empty.

    Raises:
      ValueError: an invalid config (see `fedsp.config.validate`), a partition that
        leaves a client without examples, a model without a tokenizer, a model whose
        adapters differ from ``config.model.lora``, or checkpoints of other settings.
    """
    distributed.initialize(config.distributed)  # first: it must precede any JAX work
    compilation_cache.enable()
    validate(config)
    # The programs the last run of this config used load while the model does.
    executables.prefetch(
        repr(sorted(config_fingerprint(config, ignore=_RESUMABLE_CHANGES).items()))
    )
    if workdir is not None:
        # Orbax requires absolute checkpoint paths; a relative --workdir is the usual case.
        workdir = pathlib.Path(workdir).absolute()
        if distributed.is_main_process():
            workdir.mkdir(parents=True, exist_ok=True)
        distributed.sync("fedsp.init_run.workdir")
    fl = config.fl
    (graphdef, lora_state, base_state), tokenizer = _model(config, model, tokenizer)
    mesh = None
    # jax.pmap places clients itself (one per device) and cannot run under a mesh.
    if fl.backend != "pmap":
        shape = mesh_shape(*requested_mesh(fl), fl.clients_per_round, jax.device_count())
        mesh = make_mesh(*shape)
        # The frozen base is sharded over "model" (FSDP over its hidden dimension);
        # adapters and optimizer state are replicated, and the client map stacks them
        # over "clients".
        base_state = shard_state(base_state, mesh)
        lora_state = replicate(lora_state, mesh)
    task = data_lib.get_task(config.task.name, **dict(config.task.options))
    data_dir = config.task.data_dir or None
    train = (
        task.load(
            config.task.train_split, data_dir, limit=config.data.limit or None, seed=config.seed
        )
        if train_data
        else []
    )
    # eval.task (optional) scores on another benchmark, e.g. chat SFT data evaluated on
    # ARC as in SPIN / TPAW.
    eval_task = data_lib.get_task(config.eval.task) if config.eval.task else task
    eval_set = eval_task.load(
        config.eval.split or config.task.eval_split,
        data_dir,
        limit=config.eval.examples,
        seed=config.seed,
    )
    algo = algorithm if algorithm is not None else get_algorithm(config.algorithm.name, config)
    optimizer = default_optimizer(fl)
    # Every array of the round state is placed on the whole mesh, so a multi-host run's
    # processes hold (and Orbax saves) one global array each.
    state = RoundState(
        round=0,
        params=lora_state,
        opt_state=replicate(optimizer.init(lora_state), mesh),
        rng=replicate(jax.random.key(config.seed), mesh),
        baselines=replicate(jnp.full((config.data.num_clients,), jnp.nan, jnp.float32), mesh),
    )
    checkpointer = None
    if workdir is not None:
        checkpointer = RunCheckpointer(
            workdir / "checkpoints",
            keep=config.checkpoint.keep,
            fingerprint=config_fingerprint(config, ignore=_RESUMABLE_CHANGES),
        )
        if checkpointer.latest_round() is not None:
            state = checkpointer.restore_latest_valid(state)
            _log.info("resumed %s after round %d", workdir, state.round)
    pool = None
    if getattr(algo, "uses_pool", False):
        if workdir is None:
            pool = PlayerPool(None, algo.max_players)
        else:
            # A fresh run starts from an empty index: entries of an earlier attempt that
            # never reached a checkpoint are deleted.
            pool = PlayerPool.from_state_dict(
                workdir / "pool",
                state.pool or {"max_players": algo.max_players, "entries": []},
                keep_dropped=config.checkpoint.keep,
            )
        if state.round == 0 and not pool.rounds:
            pool.push(lora_state, round=0, metadata={"initial": True})
        state = dataclasses.replace(state, pool=pool.state_dict())
    if hasattr(algo, "client_state"):
        algo.load_client_state(
            load_client_state(workdir / "client_state", state.round)
            if state.round and workdir is not None
            else None
        )
    context = Run(
        config=config,
        policy=Policy(graphdef, base_state, tokenizer),
        task=task,
        eval_task=eval_task,
        train=train,
        eval_set=eval_set,
        shards=client_shards(config, train) if train_data else [],
        feedback=data_lib.get_feedback(config.algorithm.feedback, task),
        algorithm=algo,
        optimizer=optimizer,
        server_step=server_step_from_config(
            fl, optimizer, dp=DpSettings.from_config(config), seed=config.seed
        ),
        train_clients=map_clients(
            functools.partial(algo.local_train, graphdef),
            fl.backend,
            mesh=mesh,  # read by the vmap backend only
            in_axes=(None, None, 0, 0),
            clients_at_once=fl.clients_at_once,
            # What local training reads besides its arguments: a later run of the same
            # config loads the program without tracing it (`fedsp.executables`).
            static_key=(
                sorted(config_fingerprint(config, ignore=_OUTSIDE_TRAINING).items()),
                graphdef,
                executables.code_key(algo),
            ),
        ),
        mesh=mesh,
        initial_params=lora_state,
        adapter_bytes=tree_bytes(lora_state),
        pool=pool,
        workdir=workdir,
        checkpointer=checkpointer,
        newest_round=[state.round],
    )
    return RunState(
        **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)}, run=context
    )


def save_checkpoint(state: RunState) -> None:
    """Writes ``state`` to its run's ``workdir/checkpoints`` (and the algorithm's
    client-side data to ``workdir/client_state``), keeping ``checkpoint.keep`` rounds.

    Raises:
      ValueError: the run has no workdir.
      OSError: ENOSPC (or EDQUOT) when the disk is full, naming the round's checkpoint
        path and the round a rerun resumes after; the older rounds are intact.
    """
    run = state.run
    if run is None or run.checkpointer is None or run.workdir is None:
        raise ValueError(
            "this run has no workdir to save checkpoints in (fedsp.init_run(config, workdir=...))"
        )
    algo, client_dir = run.algorithm, run.workdir / "client_state"
    saved = run.checkpointer.latest_round()
    # Client state is host data every process holds alike: the main process writes it.
    main = distributed.is_main_process()
    try:
        if hasattr(algo, "client_state") and main:
            save_client_state(client_dir, state.round, algo.client_state())
        run.checkpointer.save(state)  # every process: Orbax writes multi-host checkpoints
        if hasattr(algo, "client_state") and main:
            prune_client_state(client_dir, run.checkpointer.rounds())
    except Exception as e:
        code = _disk_full(e)
        if code is None:
            raise
        # Orbax re-raises its writer threads' errors under screens of traceback; say what
        # happened and what to do. The round is not committed, older ones are kept.
        full = "the disk is full" if code == errno.ENOSPC else "the disk quota is used up"
        resume = f"resume after round {saved}" if saved is not None else "start over"
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        raise OSError(
            code,
            f"{full}: the checkpoint of round {state.round} could not be written to "
            f"{run.checkpointer.path(state.round)} ({type(e).__name__}: {cause}); free "
            f"space in {run.workdir} and rerun the same command to {resume}",
        ) from e
    distributed.sync(f"fedsp.save_checkpoint.{state.round}")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT if ``exc`` or an exception it chains says the disk (or quota) is
    full: an OSError of a Python write, or tensorstore's ValueError ("[os_error_code='28']")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for code in _DISK_FULL:
            if (isinstance(exc, OSError) and exc.errno == code) or (
                f"os_error_code='{code}'" in str(exc)
            ):
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def run(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    hooks: RoundHooks | None = None,
    model: Transformer | None = None,
    tokenizer: Tokenizer | None = None,
    algorithm: Any | None = None,
    train_data: bool = True,
) -> dict[str, Any]:
    """Runs (or resumes) a federated self-play experiment into ``workdir``.

    Args:
      config: an experiment config (`fedsp.config.default_config` schema).
      workdir: the run directory (see the module docstring); if it holds checkpoints
        the run resumes from the newest one.
      hooks: observe the clients' uploads or wrap / replace the server step
        (`fedsp.federated.RoundHooks`).
      model, tokenizer, algorithm, train_data: an in-memory model and its tokenizer, a
        client algorithm object, whether to read the training split (see `init_run`;
        without it, ``hooks.client_updates`` must bring the clients' updates).

    Returns:
      The summary: ``initial_accuracy`` (round 0), ``final_accuracy``,
      ``best_accuracy``, ``accuracy_by_round``, ``rounds``, ``bytes_sent``,
      ``bytes_saved``, ``rejected_updates``, ``skipped_rounds``, ``time_by_round``
      (each round's wall time; round 0's is the first evaluation), ``wall_time_s``,
      ``compile_s`` (of it, tracing and compiling, or loading compiled programs from the
      persistent cache) and ``compile`` (that time split into ``trace_s``, tracing and
      lowering, and ``backend_s``, XLA compiling or loading from the cache, with the
      cache's ``cache_hits`` and ``cache_misses``), ``workdir``.

    Raises:
      ValueError: see `init_run`.

    In a multi-process run (``config.distributed``) an error ends the process instead of
    raising (`fedsp.distributed.stop_all_on_error`).
    """
    start = time.perf_counter()
    distributed.initialize(config.distributed)
    # A failing process of a multi-host run ends at once, so the others stop too.
    with distributed.stop_all_on_error():
        return _run(config, workdir, hooks, model, tokenizer, algorithm, train_data, start)


def _run(
    config, workdir, hooks, model, tokenizer, algorithm, train_data: bool, start: float
) -> dict[str, Any]:
    if not train_data and (hooks is None or hooks.client_updates is None):
        raise ValueError(
            "run(train_data=False) needs hooks.client_updates: without the training data "
            "the clients' updates must come from elsewhere (e.g. fedsp.flower)"
        )
    validate(config)
    # In a multi-host run the main process writes the run files; all write checkpoints.
    main = distributed.is_main_process()
    workdir = pathlib.Path(workdir).absolute()
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    from tqdm.auto import tqdm

    compile_start = compilation_cache.compile_clock()
    fl = config.fl
    # One bar for the whole run: its description says what the run is doing, its
    # postfix how far the current phase is (`fedsp.progress`).
    bar = tqdm(total=fl.rounds, desc="loading model", disable=not (config.log.progress and main))

    def show(phase: str, done: int, total: int) -> None:
        bar.set_postfix_str(f"{phase} {done}/{total}")

    with progress.listening(show):
        state = init_run(
            config,
            model=model,
            tokenizer=tokenizer,
            workdir=workdir,
            algorithm=algorithm,
            train_data=train_data,
        )
        context = state.run
        assert context is not None
        logger = _Logger(workdir if main else None, config.log.tensorboard)
        # metrics.jsonl as the checkpoint knows it (drops lines of an unfinished round).
        logger.rewrite(state.metrics_history)
        bar.update(state.round)
        if not state.metrics_history:
            bar.set_description_str("round 0: evaluating (compiling on first use)")
            eval_start = time.perf_counter()
            record = {"round": 0, **evaluate(state)}
            record["time/eval_s"] = time.perf_counter() - eval_start
            state = dataclasses.replace(state, metrics_history=(record,))
            logger.write(record)
        first = state.round + 1
        for rnd in range(first, fl.rounds + 1):
            note = " (compiling: first round only)" if rnd == first else ""
            bar.set_description_str(f"round {rnd}/{fl.rounds}{note}")
            bar.set_postfix_str("")
            state, record = run_round(state, hooks=hooks)
            if rnd % config.checkpoint.every == 0 or rnd == fl.rounds:
                bar.set_description_str(f"round {rnd}/{fl.rounds}: checkpoint")
                save_checkpoint(state)
            # After the checkpoint: a crash in between leaves no record of a round the
            # resume runs again (see the module docstring).
            logger.write(record)
            bar.update(1)
            line = round_times(record)
            _log.info(line)
            if not bar.disable:
                bar.write(line, file=sys.stderr)  # where the bar is, above it
    bar.close()
    context.close()
    logger.close()

    history = state.metrics_history
    accuracies = [(r["round"], r["eval/accuracy"]) for r in history if "eval/accuracy" in r]
    summary = {
        "workdir": str(workdir),
        "rounds": fl.rounds,
        "initial_accuracy": accuracies[0][1],
        "final_accuracy": accuracies[-1][1],
        "best_accuracy": max(a for _, a in accuracies),
        "accuracy_by_round": {str(r): a for r, a in accuracies},
        "bytes_sent": sum(r.get("bytes_sent", 0) for r in history),
        "bytes_saved": sum(r.get("bytes_saved", 0) for r in history),
        "rejected_updates": sum(len(r.get("rejected", [])) for r in history),
        "skipped_rounds": sum(bool(r.get("server_step_skipped")) for r in history),
        # Round 0 is the evaluation before training.
        "time_by_round": {str(r["round"]): r.get("time_s", r.get("time/eval_s")) for r in history},
        "wall_time_s": time.perf_counter() - start,
    }
    compiled = compilation_cache.compile_clock().since(compile_start)
    summary["compile_s"] = compiled.total_s
    summary["compile"] = {
        "trace_s": compiled.trace_s,
        "backend_s": compiled.backend_s,
        "cache_hits": compiled.cache_hits,
        "cache_misses": compiled.cache_misses,
        "background_s": compiled.background_s,
    }
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def round_times(record: dict[str, Any]) -> str:
    """One line with a round's wall time and its parts (`fedsp.run_round`'s ``time/*``),
    its accuracy and loss when it has them."""
    parts = ", ".join(
        f"{name} {record[f'time/{key}_s']:.1f}"
        for key, name in (
            ("rollout", "rollout"),
            ("train", "training"),
            ("server", "server"),
            ("eval", "evaluation"),
            ("compile", "of which compiling"),
        )
        if f"time/{key}_s" in record
    )
    text = f"round {record['round']}: {record['time_s']:.1f} s ({parts})"
    if record.get("eval/accuracy") is not None:
        text += f", accuracy {record['eval/accuracy']:.3f}"
    if record.get("loss") is not None:
        text += f", loss {record['loss']:.4f}"
    return text


def client_shards(
    config: ml_collections.ConfigDict, train: Sequence[data_lib.Example]
) -> list[np.ndarray]:
    """Per client, the indices of its training examples (``config.data``).

    Raises:
      ValueError: a client got no example (naming the fields that shape the partition).
    """
    num_clients = config.data.num_clients
    if config.data.partition == "iid":
        shards = data_lib.iid_partition(len(train), num_clients, config.seed)
    else:
        shards = data_lib.dirichlet_partition(
            [ex.label for ex in train], num_clients, config.data.alpha, config.seed
        )
    cap = config.data.examples_per_client
    if cap:
        shards = [
            np.sort(np.random.default_rng([config.seed, k]).permutation(s)[:cap])
            for k, s in enumerate(shards)
        ]
    empty = [i for i, shard in enumerate(shards) if len(shard) == 0]
    if empty:
        raise ValueError(
            f"data.partition={config.data.partition!r} left client(s) {empty} of "
            f"data.num_clients={num_clients} without examples; lower data.num_clients, "
            "raise data.alpha or data.limit"
        )
    return list(shards)


def lora_config(config: ml_collections.ConfigDict, num_layers: int) -> LoRAConfig:
    """``config.model.lora`` for a model of ``num_layers`` layers (negative layer
    indices count from the last)."""
    lora = config.model.lora
    layers = tuple(sorted({i % num_layers for i in lora.layers})) or None
    return LoRAConfig(
        rank=lora.rank, alpha=float(lora.alpha), targets=tuple(lora.targets), layers=layers
    )


def _model(config, model, tokenizer):
    """((graphdef, lora_state, base_state), tokenizer) of the run's model."""
    if model is None:
        from fedsp.assets import default_model_path

        path = config.model.path or default_model_path()
        model, loaded = from_pretrained(path, dtype=_DTYPES[config.model.dtype])
        if loaded is None:
            raise ValueError(f"model.path={str(path)!r} has no tokenizer files")
        tokenizer = loaded if tokenizer is None else tokenizer
    elif tokenizer is None:
        raise ValueError("init_run(model=...) needs the model's tokenizer= as well")
    else:
        model = nnx.clone(model)  # the caller's model stays as it is (arrays are shared)
    # A static attribute: the graphdef split below carries it into every jitted forward.
    model.remat = config.model.remat
    wanted = lora_config(config, model.config.num_hidden_layers)
    if model.lora_config is None:
        apply_lora(model, wanted, rngs=nnx.Rngs(config.seed))
    elif model.lora_config != wanted:
        raise ValueError(
            f"the model's adapters {model.lora_config} differ from config.model.lora "
            f"{wanted}; pass a model without adapters or match the config"
        )
    return split_lora(model), tokenizer


class _Logger:
    """``metrics.jsonl`` (one JSON record per line) and optional TensorBoard scalars;
    without a workdir (a multi-host run's other processes) it writes nothing."""

    def __init__(self, workdir: pathlib.Path | None, tensorboard: bool):
        self.path = None if workdir is None else workdir / "metrics.jsonl"
        self.writer = None
        if tensorboard and workdir is not None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def rewrite(self, history: Sequence[Mapping[str, Any]]) -> None:
        if self.path is not None:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "round":
                    self.writer.add_scalar(key, value, record["round"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
