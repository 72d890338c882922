"""Builds a run from a config: ``init_run(config, model=None, tokenizer=None,
workdir=None)`` validates the config, loads (or takes) the model and attaches fresh LoRA
adapters, loads the task's data and partitions it over the clients (`client_shards`),
builds the client algorithm, the server optimizer and step, and the mapped local
training. With a ``workdir`` it resumes from the newest readable checkpoint there and
keeps the player pool in ``workdir/pool``; without one nothing is written (the pool, if
any, lives in memory). `fedsp.runner.run` loops over the rounds of what it returns.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fedsp import compilation_cache, distributed, executables
from fedsp import data as data_lib
from fedsp.checkpoint import (
    PlayerPool,
    RoundState,
    RunCheckpointer,
    config_fingerprint,
    load_client_state,
)
from fedsp.config import requested_mesh, validate
from fedsp.federated.mapping import map_clients
from fedsp.federated.server import DpSettings, tree_bytes
from fedsp.federated.state import Run, RunState
from fedsp.federated.steps import default_optimizer, server_step_from_config
from fedsp.model import Tokenizer, Transformer, from_pretrained
from fedsp.model.lora import LoRAConfig, apply_lora, split_lora
from fedsp.model.sharding import make_mesh, mesh_shape, replicate, shard_state
from fedsp.selfplay import Policy, get_algorithm

__all__ = ["RESUMABLE_CHANGES", "client_shards", "init_run", "lora_config"]

_log = logging.getLogger(__name__)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Config sections local training never reads (`Algorithm.local_train`, built by
# `get_algorithm` from config.algorithm, config.local, config.model and config.fl): runs
# that differ only in them (other seeds, evaluation settings) share its program.
_OUTSIDE_TRAINING = ("seed", "eval", "log", "checkpoint", "distributed")
# Config fields a resumed run may change: fl.mesh and distributed (other hardware, or
# another host layout, gives the same numbers up to float rounding; every process has its
# own distributed.process_id) and the memory levers, which change what is kept or
# recomputed, not the numbers, so a run that ran out of memory can resume with more.
RESUMABLE_CHANGES = (
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
    executables.prefetch(repr(sorted(config_fingerprint(config, ignore=RESUMABLE_CHANGES).items())))
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
            fingerprint=config_fingerprint(config, ignore=RESUMABLE_CHANGES),
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
