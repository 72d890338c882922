"""A round's programs, lowered from shapes: the same jitted functions the run calls, with
the arguments it would pass them, on a target's mesh.

- ``rollout``: the sampler (`fedsp.model.sampling.lower_generate`: prefill and the decode
  loop are one XLA program) for one chunk of the round's rollout rows;
- ``train``: every client's local training, ``algorithm.local_train`` mapped over the
  round's clients by `fedsp.federated.mapping.map_clients` as `fedsp.runner.init_run`
  maps it (with the configured ``model.remat`` and ``local.micro_batch_size``);
- ``server``: `fedsp.federated.server.server_step` with the configured optimizer and
  client weighting;
- ``players`` (SPIN, TPAW, DPO): one chunk of the players' log-probs
  (`fedsp.selfplay.players`);
- ``eval``: one evaluation batch: log-likelihood scoring of multiple-choice options
  (`fedsp.eval.accuracy`) or greedy generation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedsp import data as data_lib
from fedsp.data.multiple_choice import MultipleChoiceTask
from fedsp.eval import accuracy
from fedsp.federated.mapping import map_clients
from fedsp.federated.server import server_step
from fedsp.federated.steps import default_optimizer
from fedsp.model.config import ModelConfig
from fedsp.model.sampling import bucket_length, lower_generate
from fedsp.model.sharding import padded_rows
from fedsp.plan.abstract import (
    AbstractPolicy,
    RoundRows,
    abstract_batch,
    abstract_policy,
    replicated,
    round_rows,
    stacked,
)
from fedsp.selfplay import get_algorithm, players
from fedsp.selfplay.spear import Spear

__all__ = ["Program", "Shapes", "round_programs"]


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Sequence lengths the planner assumes where the config leaves them to the data.

    Attributes:
      seq_len: the longest sequence (prompt + completion) of the round: training rows
        and player scoring rows have ``seq_len`` tokens (capped at ``local.max_len``) and
        the sampler's cache spans ``seq_len`` slots (prompts of ``seq_len`` minus the
        new-token bucket). None: ``local.max_len``, the longest a trained row can be.
      eval_len: tokens of a log-likelihood evaluation row (context + option).
    """

    seq_len: int | None = None
    eval_len: int = 256

    def sequence(self, config: ml_collections.ConfigDict) -> int:
        return int(config.local.max_len if self.seq_len is None else self.seq_len)


@dataclasses.dataclass(frozen=True)
class Program:
    """One of the round's programs, ready to lower.

    Attributes:
      name: "rollout", "train", "server", "players" or "eval".
      shape: its main arguments in words (rows × tokens, clients).
      lower: lowers it (under the target's mesh).
      calls: how many times a round runs it (``None``: once per evaluation).
      held: per-device bytes of other buffers alive while it (or its phase of the
        round) runs, given its compiled form (SPEAR's kept caches, `rollout_held_bytes`).
    """

    name: str
    shape: str
    lower: Callable[[], jax.stages.Lowered]
    calls: int | None = 1
    held: Callable[[jax.stages.Compiled], int] | None = None


def round_programs(
    config: ml_collections.ConfigDict,
    model_config: ModelConfig,
    mesh: Mesh,
    platform: str,
    shapes: Shapes | None = None,
) -> list[Program]:
    """The programs of one round of ``config`` on ``mesh`` (see the module docstring).

    Args:
      config: a validated experiment config.
      model_config: the architecture of ``config.model``.
      mesh: the ("clients", "model") mesh of the target's devices.
      platform: where the run would execute ("cpu", "tpu", "gpu"): the sampler's layer
        loop follows it as ``generate``'s "auto" does (unrolled on CPU, scanned
        elsewhere).
      shapes: the sequence lengths (default `Shapes()`).

    Raises:
      ValueError: ``fl.backend`` "pmap" (it places clients itself, without the mesh), or
        an algorithm the planner does not know the batches of.
    """
    fl = config.fl
    if fl.backend == "pmap":
        raise ValueError("fl.backend: the planner plans the vmap and loop backends, not pmap")
    policy = abstract_policy(model_config, config, mesh)
    algorithm = get_algorithm(config.algorithm.name, config)
    rows = round_rows(config, algorithm)
    shapes = Shapes() if shapes is None else shapes
    seq_len = shapes.sequence(config)
    layer_loop = "unrolled" if platform == "cpu" else "scan"
    programs = []
    if rows.sampled:
        programs.append(_rollout(config, policy, algorithm, rows, seq_len, layer_loop, mesh))
    programs.append(_train(config, policy, algorithm, rows, seq_len, mesh))
    programs.append(_server(config, policy, mesh))
    if rows.players:
        programs.append(_players(config, policy, rows, seq_len, mesh))
    programs.append(_eval(config, policy, shapes, seq_len, layer_loop, mesh))
    return programs


def _on(mesh: Mesh, fn: Callable[..., jax.stages.Lowered], *args: Any) -> jax.stages.Lowered:
    with jax.set_mesh(mesh):
        return fn(*args)


def _rows_per_call(rows: int, batch_size: int, mesh: Mesh) -> int:
    """Rows of one sampler call as `fedsp.selfplay.rollout.sample_completions` pads them:
    a power of two, then a multiple of the clients axis."""
    chunk = min(rows, batch_size)
    with jax.set_mesh(mesh):
        return padded_rows(1 << (chunk - 1).bit_length())


def _rollout(config, policy, algorithm, rows: RoundRows, seq_len, layer_loop, mesh) -> Program:
    r = config.rollout
    total = config.fl.clients_per_round * rows.sampled
    batch = _rows_per_call(total, r.batch_size, mesh)
    new_tokens = bucket_length(r.max_new_tokens)
    prompt_len = max(1, seq_len - new_tokens)
    # SPEAR keeps every first-answer call's keys/values until its revisions are sampled.
    keep = (
        isinstance(algorithm, Spear)
        and algorithm.sampling.reuse_cache
        and algorithm.hp.max_revisions > 0
    )
    calls = -(-total // r.batch_size)
    lower = functools.partial(
        lower_generate,
        policy.graphdef,
        (policy.lora, policy.base),
        batch=batch,
        prompt_len=prompt_len,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        layer_loop=layer_loop,
        return_cache=keep,
        input_sharding=NamedSharding(mesh, PartitionSpec()),
    )
    held = functools.partial(rollout_held_bytes, calls=calls) if keep else None
    return Program(
        "rollout",
        f"{batch} rows × {bucket_length(prompt_len)}+{new_tokens} tokens",
        functools.partial(_on, mesh, lower),
        calls,
        held,
    )


def rollout_held_bytes(compiled: jax.stages.Compiled, calls: int) -> int:
    """Per-device bytes of the keys/values a SPEAR round keeps (``keep_cache``) beside a
    sampler call: the ``calls`` first-answer calls' caches (each the size the compiled
    program returns) and, while a revision call gathers its rows from them
    (`fedsp.model.prefixes.gather_prefix` concatenates every kept cache, eagerly, before
    taking rows), a second copy of them; the call's own cache is its output. So
    (2 · calls − 1) caches: an estimate of the revision phase, whose gather is not a
    compiled program the planner could read."""
    outputs = jax.tree.leaves(compiled.out_info)
    shardings = jax.tree.leaves(compiled.output_shardings)
    # The program returns (SampleOutput: 3 arrays, PrefixCache: k, v, mask).
    per_call = sum(_shard_bytes(out, sharding) for out, sharding in zip(outputs[3:], shardings[3:]))
    return (2 * calls - 1) * per_call


def _shard_bytes(out: Any, sharding: jax.sharding.Sharding) -> int:
    shape = sharding.shard_shape(tuple(out.shape))
    size = 1
    for d in shape:
        size *= d
    return size * jnp.dtype(out.dtype).itemsize


def _train(config, policy: AbstractPolicy, algorithm, rows, seq_len, mesh) -> Program:
    fl = config.fl
    clients = fl.clients_per_round
    local_train = functools.partial(algorithm.local_train, policy.graphdef)
    if fl.backend == "loop":
        # One client at a time: the program is one client's local_train, run C times.
        batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_replicated(mesh)),
            abstract_batch(config, rows, 1, seq_len, mesh),
        )
        key = replicated(jax.eval_shape(lambda: jax.random.key(0)), mesh)
        fn: Callable[..., Any] = local_train
        args, calls, shown = (policy.base, policy.lora, batch, key), clients, 1
    else:
        # As fedsp.runner.init_run maps it: base and θ_r frozen, batch and keys stacked.
        fn = map_clients(
            local_train,
            "vmap",
            mesh=mesh,
            in_axes=(None, None, 0, 0),
            clients_at_once=fl.clients_at_once,
        )
        batch = abstract_batch(config, rows, clients, seq_len, mesh)
        keys = stacked(jax.eval_shape(lambda: jax.random.key(0)), clients, mesh)
        args, calls, shown = (policy.base, policy.lora, batch, keys), 1, clients
    s, t = batch.train.tokens.shape[-2:]
    lower = functools.partial(_on, mesh, jax.jit(fn).lower, *args)
    return Program("train", f"{shown} client(s) × {s} rows × {t} tokens", lower, calls)


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _server(config, policy: AbstractPolicy, mesh) -> Program:
    fl = config.fl
    clients = fl.clients_per_round
    optimizer = default_optimizer(fl)
    opt_state = replicated(jax.eval_shape(optimizer.init, policy.lora), mesh)
    step = functools.partial(
        server_step,
        optimizer=optimizer,
        mode=fl.client_weighting,
        temperature=fl.weight_temperature,
        threshold=fl.prune_threshold,
    )
    per_client = stacked(jax.ShapeDtypeStruct((), jnp.float32), clients, mesh)
    args = (policy.lora, opt_state, stacked(policy.lora, clients, mesh), per_client, per_client)
    lower = functools.partial(_on, mesh, jax.jit(step).lower, *args)
    return Program("server", f"{clients} client(s)", lower)


def _players(config, policy: AbstractPolicy, rows: RoundRows, seq_len, mesh) -> Program:
    clients = config.fl.clients_per_round
    # Every y⁺ and y⁻ of every client, in chunks of 2 · local.batch_size rows
    # (PairwiseSelfPlay.collect_batch → players.score_sequences).
    total = 2 * clients * rows.train
    chunk = _rows_per_call(total, 2 * config.local.batch_size, mesh)
    length = min(config.local.max_len, bucket_length(seq_len))
    team = replicated(
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((rows.players, *x.shape), x.dtype), policy.lora
        ),
        mesh,
    )
    mask = jax.ShapeDtypeStruct((rows.players,), jnp.bool_, sharding=_replicated(mesh))
    seqs = [
        jax.ShapeDtypeStruct((chunk, length), dtype, sharding=_replicated(mesh))
        for dtype in (jnp.int32, jnp.bool_, jnp.float32)
    ]
    # players._score_chunk is the jitted program `score_sequences` calls per chunk.
    lower = functools.partial(
        _on, mesh, players._score_chunk.lower, policy.graphdef, team, mask, policy.base, *seqs
    )
    return Program(
        "players",
        f"{rows.players} player(s) × {chunk} rows × {length} tokens",
        lower,
        -(-total // chunk),
    )


def _eval(config, policy: AbstractPolicy, shapes: Shapes, seq_len, layer_loop, mesh) -> Program:
    e = config.eval
    name = e.task or config.task.name
    options = dict(config.task.options) if not e.task else {}
    task = data_lib.get_task(name, **options)
    states = (policy.lora, policy.base)
    if e.multiple_choice == "loglik" and isinstance(task, MultipleChoiceTask):
        seqs = [
            jax.ShapeDtypeStruct(
                (e.batch_size, bucket_length(shapes.eval_len)),
                jnp.int32,
                sharding=_replicated(mesh),
            )
        ] * 3
        # accuracy._continuation_logprobs is the jitted program `loglik_accuracy` calls
        # per batch.
        lower = functools.partial(
            _on,
            mesh,
            accuracy._continuation_logprobs.lower,
            policy.graphdef,
            states,
            *seqs,
        )
        shape = f"{e.batch_size} rows × {bucket_length(shapes.eval_len)} tokens (log-likelihood)"
        return Program("eval", shape, lower, None)
    new_tokens = bucket_length(e.max_new_tokens)
    prompt_len = max(1, seq_len - new_tokens)
    lower = functools.partial(
        _on,
        mesh,
        functools.partial(
            lower_generate,
            policy.graphdef,
            states,
            batch=e.batch_size,
            prompt_len=prompt_len,
            max_new_tokens=e.max_new_tokens,
            layer_loop=layer_loop,
            input_sharding=_replicated(mesh),
        ),
    )
    shape = f"{e.batch_size} rows × {bucket_length(prompt_len)}+{new_tokens} tokens (greedy)"
    return Program("eval", shape, lower, None)
