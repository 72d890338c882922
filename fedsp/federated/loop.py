"""The federated round loop: ``run(config, workdir) -> summary``.

One round, as data flows (DESIGN.md "One round, as data flows"):

  1. ``sample_clients(num_clients, clients_per_round, seed, round)``;
  2. each sampled client draws ``rollout.prompts_per_client`` prompts from its shard,
     deterministically from (seed, round, client);
  3. ``algorithm.collect`` runs ONE batched rollout over all those prompts with θ_r,
     gets feedback on the host and packs the traces into a `ClientBatch` [C, ...]: text
     stays inside ``collect``;
  4. ``map_clients(local_train)`` trains every client from θ_r (base and θ_r frozen,
     batch and key stacked);
  5. `fedsp.federated.server.server_step`: clients whose update holds NaN/inf are
     rejected (logged, weight 0), the rest are weighted by `client_weights` (pruned
     clients send nothing: their bytes are logged as saved), and the server optimizer
     steps, or the step is skipped when no client is kept;
  6. evaluation (round 0 is the policy before training), ``metrics.jsonl`` and
     TensorBoard, a checkpoint of the run state.

Client advantage (advantage-weighted federation): the loop owns each client's reward
baseline b_k (an EMA of its past rewards, NaN before its first round). It passes the
sampled clients' b_k to ``collect(..., baselines=...)``, which computes the advantages
r − b_k of the round's rollouts; ``local_train`` reports their mean
(``stats["mean_advantage"]``, the client advantage that `client_weights` uses) and the
updated baseline (``stats["baseline"]``), which the loop stores for the next round.

Exact resume: every random draw is a function of (seed, round[, client]): client
sampling, prompt choice, the collect key and the per-client training keys; nothing is
taken from a mutable host RNG. The checkpoint (`fedsp.checkpoint.RunCheckpointer`)
holds the adapters, the server optimizer state, the client baselines and the metrics
history, so a run killed after round r and restarted in the same ``workdir`` continues
with the numbers of an uninterrupted run. It also holds a fingerprint of the config:
resuming with different settings raises, naming the fields (``log.*`` and
``checkpoint.*`` may change).

Pairwise self-play (SPIN, TPAW, DPO; the optional protocol parts in
`fedsp.selfplay.base`): an algorithm with ``uses_context`` gets a `RoundContext` (the
sampled clients' ids, the round-0 adapters, the pool's players). With ``uses_pool`` the
loop keeps a `fedsp.checkpoint.PlayerPool` in ``<workdir>/pool``: the round-0 adapters
enter it before round 1 and the global adapters after every round (with the round's
accuracy and loss as metadata); its index is part of the run state, so a resumed run
sees exactly the players it saw. A damaged or missing player raises, or with
``pool_on_error = "drop"`` is dropped with a warning naming it and the round goes on
with the others. An algorithm with ``client_state()`` has its client-side data saved
to ``<workdir>/client_state/round_<r>.npz`` with every checkpoint and restored on
resume; it never reaches the server step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fedsp import config as config_lib
from fedsp import data as data_lib
from fedsp.checkpoint import (
    PlayerPool,
    RunCheckpointer,
    RunState,
    config_fingerprint,
    load_client_state,
    prune_client_state,
    save_client_state,
)
from fedsp.core.aggregation import server_optimizer
from fedsp.eval import evaluate
from fedsp.federated.mapping import map_clients
from fedsp.federated.server import server_step, tree_bytes
from fedsp.model import from_pretrained
from fedsp.model.lora import LoRAConfig, apply_lora, split_lora

__all__ = ["client_prompts", "run"]

_log = logging.getLogger(__name__)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def client_prompts(
    shard: np.ndarray, count: int, seed: int, round: int, client: int  # noqa: A002
) -> np.ndarray:
    """Indices of the ``count`` prompts client ``client`` plays in round ``round``.

    Drawn from the client's shard by a generator seeded with (seed, round, client), so
    a resumed run draws the same prompts; without replacement when the shard is large
    enough, else with replacement (a fixed count keeps the batch shapes fixed).
    """
    rng = np.random.default_rng([int(seed), int(round), int(client)])
    return rng.choice(shard, size=count, replace=len(shard) < count)


def _load_model(config: ml_collections.ConfigDict):
    from fedsp.assets import default_model_path

    path = config.model.path or default_model_path()
    model, tokenizer = from_pretrained(path, dtype=_DTYPES[config.model.dtype])
    if tokenizer is None:
        raise ValueError(f"model.path={str(path)!r} has no tokenizer files")
    num_layers = model.config.num_hidden_layers
    layers = tuple(sorted({i % num_layers for i in config.model.lora.layers})) or None
    lora = LoRAConfig(rank=config.model.lora.rank, alpha=float(config.model.lora.alpha),
                      targets=tuple(config.model.lora.targets), layers=layers)
    apply_lora(model, lora, rngs=nnx.Rngs(config.seed))
    return split_lora(model), tokenizer


def _client_shards(config: ml_collections.ConfigDict, train: Sequence[data_lib.Example]):
    num_clients = config.data.num_clients
    if config.data.partition == "iid":
        shards = data_lib.iid_partition(len(train), num_clients, config.seed)
    else:
        shards = data_lib.dirichlet_partition([ex.label for ex in train], num_clients,
                                              config.data.alpha, config.seed)
    cap = config.data.examples_per_client
    if cap:
        shards = [np.sort(np.random.default_rng([config.seed, k]).permutation(s)[:cap])
                  for k, s in enumerate(shards)]
    config_lib.check_partition(shards, config)
    return shards


def _scalars(tree: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.mean(np.asarray(v))) for k, v in tree.items()
            if np.size(np.asarray(v)) >= 1 and np.issubdtype(np.asarray(v).dtype, np.number)}


def _json_number(value: float) -> float | None:
    """JSON has no NaN/inf: they are logged as null."""
    return float(value) if np.isfinite(value) else None


class _Logger:
    def __init__(self, workdir: pathlib.Path, tensorboard: bool):
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def rewrite(self, history: list[dict[str, Any]]) -> None:
        """metrics.jsonl as the checkpoint knows it (drops lines of an unfinished round)."""
        self.path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def write(self, record: dict[str, Any]) -> None:
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


def run(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    algorithm: Any | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) a federated self-play experiment into ``workdir``.

    Args:
      config: an experiment config (`experiments/configs/base.py` schema); validated
        first (`fedsp.config.validate`).
      workdir: the run directory: ``config.json``, ``metrics.jsonl``, ``tensorboard/``,
        ``checkpoints/`` and, at the end, ``summary.json``. If it holds checkpoints the
        run resumes from the latest one.
      algorithm: a client algorithm object (the `fedsp.selfplay.base.Algorithm`
        protocol); None builds ``fedsp.selfplay.get_algorithm(config.algorithm.name,
        config)``.

    Returns:
      The summary: ``initial_accuracy`` (round 0), ``final_accuracy``,
      ``best_accuracy``, ``rounds``, ``bytes_sent``, ``bytes_saved``,
      ``rejected_updates``, ``skipped_rounds``, ``wall_time_s``, ``workdir``.

    Raises:
      ValueError: an invalid config (see `fedsp.config.validate`) or a partition that
        leaves a client without examples.
    """
    config_lib.validate(config)
    from fedsp.selfplay import get_algorithm
    from fedsp.selfplay.base import Policy, RoundContext

    start = time.perf_counter()
    # Orbax requires absolute checkpoint paths; a relative --workdir is the usual case.
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    (graphdef, lora_state, base_state), tokenizer = _load_model(config)
    task = data_lib.get_task(config.task.name, **dict(config.task.options))
    data_dir = config.task.data_dir or None
    train = task.load(config.task.train_split, data_dir, limit=config.data.limit or None,
                      seed=config.seed)
    # eval.task (optional) scores on another benchmark, e.g. chat SFT data evaluated on
    # ARC as in SPIN / TPAW.
    eval_task = data_lib.get_task(config.eval.task) if config.eval.get("task") else task
    eval_set = eval_task.load(config.eval.get("split") or config.task.eval_split, data_dir,
                              limit=config.eval.examples, seed=config.seed)
    shards = _client_shards(config, train)
    feedback = data_lib.get_feedback(config.algorithm.feedback, task)
    algo = algorithm if algorithm is not None else get_algorithm(config.algorithm.name, config)
    policy = Policy(graphdef, base_state, tokenizer)

    fl = config.fl
    optimizer = server_optimizer(fl.server_optimizer, fl.server_lr, fl.b1, fl.b2, fl.tau, fl.v0)
    train_clients = map_clients(functools.partial(algo.local_train, graphdef), fl.backend,
                                in_axes=(None, None, 0, 0))
    adapter_bytes = tree_bytes(lora_state)
    num_clients = config.data.num_clients
    base_key = jax.random.key(config.seed)
    initial_params = lora_state
    state = RunState(round=0, params=lora_state, opt_state=optimizer.init(lora_state),
                     rng=base_key, baselines=jnp.full((num_clients,), jnp.nan, jnp.float32))
    uses_pool = bool(getattr(algo, "uses_pool", False))
    client_state_dir = workdir / "client_state"

    checkpoints = RunCheckpointer(
        workdir / "checkpoints", keep=config.checkpoint.keep,
        fingerprint=config_fingerprint(config, ignore=("log", "checkpoint")))
    logger = _Logger(workdir, config.log.tensorboard)
    if checkpoints.latest_round() is not None:
        state = checkpoints.restore_latest_valid(state)
        _log.info("resumed %s after round %d", workdir, state.round)
    pool = None
    if uses_pool:
        # A fresh run starts from an empty index: entries of an earlier attempt that
        # never reached a checkpoint are deleted.
        pool = PlayerPool.from_state_dict(
            workdir / "pool", state.pool or {"max_players": algo.max_players, "entries": []},
            keep_dropped=config.checkpoint.keep)
        if state.round == 0 and not pool.rounds:
            pool.push(initial_params, round=0, metadata={"initial": True})
        state = dataclasses.replace(state, pool=pool.state_dict())
    if hasattr(algo, "client_state"):
        algo.load_client_state(load_client_state(client_state_dir, state.round)
                               if state.round else None)
    history = [dict(r) for r in state.metrics_history]
    logger.rewrite(history)

    def evaluate_round(lora: nnx.State) -> dict[str, float]:
        result = evaluate(graphdef, (lora, base_state), tokenizer, task, eval_set,
                          multiple_choice=config.eval.multiple_choice,
                          max_new_tokens=config.eval.max_new_tokens,
                          batch_size=config.eval.batch_size)
        return {f"eval/{k}": v for k, v in result.items()}

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        logger.write(record)

    if not history:
        log({"round": 0, **evaluate_round(state.params)})

    from tqdm.auto import tqdm

    bar = tqdm(range(state.round + 1, fl.rounds + 1), initial=state.round, total=fl.rounds,
               desc="rounds", disable=not config.log.progress)
    for rnd in bar:
        round_start = time.perf_counter()
        clients = data_lib.sample_clients(num_clients, fl.clients_per_round, config.seed, rnd)
        client_examples = [
            [train[i] for i in client_prompts(shards[k], config.rollout.prompts_per_client,
                                              config.seed, rnd, k)]
            for k in clients
        ]
        collect_key, train_key = jax.random.split(jax.random.fold_in(base_key, rnd))
        baselines = np.array(state.baselines)
        extra: dict[str, Any] = {}
        pool_dropped: list[int] = []
        if getattr(algo, "uses_context", False):
            players = player_mask = None
            if pool is not None:
                before = pool.rounds
                players, player_mask = pool.stacked(state.params, on_error=algo.pool_on_error)
                pool_dropped = [r for r in before if r not in pool.rounds]
            extra["context"] = RoundContext(
                clients=np.asarray(clients), reference=initial_params, players=players,
                player_mask=player_mask, player_rounds=pool.rounds if pool else ())
        batch, collect_metrics = algo.collect(policy, state.params, client_examples, task,
                                              feedback, collect_key, rnd,
                                              baselines=baselines[clients], **extra)
        keys = jnp.stack([jax.random.fold_in(train_key, int(k)) for k in clients])
        client_lora, stats = train_clients(base_state, state.params, batch, keys)
        stats = {k: np.asarray(v) for k, v in stats.items()}
        client_adv = stats["mean_advantage"].astype(np.float32)
        new_lora, opt_state, server = server_step(
            state.params, state.opt_state, client_lora,
            stats["num_examples"].astype(np.float32), client_adv,
            optimizer=optimizer, mode=fl.client_weighting, temperature=fl.weight_temperature,
            threshold=fl.prune_threshold)
        finite = np.asarray(server.pop("finite"))
        keep = np.asarray(server.pop("keep"))
        weights = np.asarray(server.pop("weights"))
        # The baseline comes from the client's rewards (host side), not from its update,
        # so it is kept even when the update itself is rejected.
        baselines[clients] = stats["baseline"]

        rejected = [int(k) for k, ok in zip(clients, finite) if not ok]
        pruned = [int(k) for k, ok, kept in zip(clients, finite, keep) if ok and not kept]
        if rejected:
            _log.warning("round %d: rejected non-finite update(s) from client(s) %s", rnd, rejected)
        applied = bool(np.asarray(server["applied"]))
        if not applied:
            _log.warning("round %d: no client kept; server step skipped", rnd)
        kept_losses = stats["loss"][finite & keep] if "loss" in stats else np.zeros(0)
        record: dict[str, Any] = {
            "round": rnd,
            "clients": [int(k) for k in clients],
            "weights": [float(w) for w in weights],
            "client_advantage": [_json_number(a) for a in client_adv],
            "rejected": rejected,
            "pruned": pruned,
            "server_step_skipped": not applied,
            "bytes_sent": adapter_bytes * (len(clients) - len(pruned)),
            "bytes_saved": adapter_bytes * len(pruned),
            "loss": _json_number(np.mean(kept_losses)) if kept_losses.size else None,
            **{f"client/{k}": _json_number(np.nanmean(v)) if np.isfinite(v).any() else None
               for k, v in stats.items()},
            **{f"server/{k}": float(np.asarray(v)) for k, v in server.items()},
            **{f"collect/{k}": _json_number(v) for k, v in _scalars(dict(collect_metrics)).items()},
        }
        state = RunState(round=rnd, params=new_lora, opt_state=opt_state, rng=base_key,
                         baselines=jnp.asarray(baselines))
        if rnd == fl.rounds or (config.eval.every and rnd % config.eval.every == 0):
            record.update(evaluate_round(state.params))
        if pool is not None:
            record["pool/rounds"] = list(pool.rounds)
            record["pool/dropped"] = pool_dropped
            pool.push(state.params, round=rnd, score=record.get("eval/accuracy"),
                      metadata={"loss": record["loss"]})
            state = dataclasses.replace(state, pool=pool.state_dict())
        record["time_s"] = time.perf_counter() - round_start
        log(record)
        if rnd % config.checkpoint.every == 0 or rnd == fl.rounds:
            if hasattr(algo, "client_state"):
                save_client_state(client_state_dir, rnd, algo.client_state())
            checkpoints.save(dataclasses.replace(state, metrics_history=tuple(history)))
            if hasattr(algo, "client_state"):
                prune_client_state(client_state_dir, checkpoints.rounds())
        bar.set_postfix(round=rnd, acc=_last(history, "eval/accuracy"), loss=record["loss"])
    bar.close()
    checkpoints.close()
    logger.close()

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
        "wall_time_s": time.perf_counter() - start,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    for record in reversed(history):
        if key in record:
            return record[key]
    return None
