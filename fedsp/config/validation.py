"""``validate(config)``: checks every field a run reads against the schema, at once.

It runs before anything heavy (model load, compilation) and raises one ``ValueError``
listing every problem, each naming the field (``fl.backend``), the value it got and what it
accepts. The algorithm and task names it accepts come from the open registries
(`fedsp.register_algorithm`, `fedsp.register_task`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from fedsp.config.schema import (
    DTYPES,
    MULTIPLE_CHOICE_EVALS,
    PARTITIONS,
    POOL_ON_ERROR,
    default_config,
    requested_mesh,
)
from fedsp.core.aggregation import SERVER_OPTIMIZERS
from fedsp.core.robust import AGGREGATORS
from fedsp.core.weighting import CLIENT_WEIGHT_MODES
from fedsp.data import CLIENT_SAMPLINGS, DATA_DIR_ENV, FEEDBACK_PROVIDERS, get_task, task_names
from fedsp.data.base import FileTask, parse_split
from fedsp.distributed import distributed_problems
from fedsp.federated.faults import ATTACKS
from fedsp.federated.mapping import BACKENDS
from fedsp.model.lora import LORA_TARGETS
from fedsp.model.sharding import mesh_problem
from fedsp.model.transformer import REMAT_POLICIES
from fedsp.selfplay.hparams import REWARDS
from fedsp.selfplay.registry import algorithm_names

__all__ = ["validate"]


class _Errors:
    """Collects one message per bad field, so a user fixes them all in one go."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.messages: list[str] = []

    def get(self, field: str) -> Any:
        node: Any = self.config
        for part in field.split("."):
            node = node[part]
        return node

    def add(self, field: str, message: str) -> None:
        self.messages.append(f"{field}: {message}")

    def boolean(self, field: str) -> None:
        if not isinstance(self.get(field), bool):
            self.add(field, f"must be True or False, got {self.get(field)!r}")

    def choice(self, field: str, choices: Sequence[str]) -> None:
        value = self.get(field)
        if value not in choices:
            self.add(field, f"got {value!r}; choose one of {tuple(choices)}")

    def integer(self, field: str, low: int, high: int | None = None) -> None:
        value = self.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            self.add(field, f"must be an integer, got {value!r}")
        elif value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            self.add(field, f"must be {bound}, got {value}")

    def number(
        self,
        field: str,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        value = self.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            self.add(field, f"must be a number, got {value!r}")
            return
        bad = not math.isfinite(value)
        if low is not None:
            bad |= bool(value <= low if low_open else value < low)
        if high is not None:
            bad |= bool(value >= high if high_open else value > high)
        if bad:
            left = "(" if low_open else "["
            right = ")" if high_open or high is None else "]"
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            self.add(field, f"must be a finite number in {left}{lo}, {hi}{right}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks ``config`` against the experiment schema before a run starts.

    Raises:
      ValueError: listing every bad field as ``section.field: got ...; expected ...``:
        unknown task / split / algorithm / feedback / partition / backend / server
        optimizer / client weighting / dtype / LoRA target (with the choices); a model
        path or data directory that does not exist (naming the path and
        ``task.data_dir`` / ``$FEDSP_DATA_DIR``); rounds, steps, sizes or learning rates
        out of range; ``fl.clients_per_round`` > ``data.num_clients``; more clients per
        round than the pmap backend can place on the devices (or pmap in a multi-process
        run); an ``fl.mesh`` that does not divide the round's clients or fit the devices;
        bad ``distributed.*`` fields.
    """
    missing = _missing_fields(config, default_config())
    if missing:
        raise ValueError(
            f"config lacks the field(s) {missing}; start from "
            "fedsp.default_config() (experiment files change only what differs)"
        )
    e = _Errors(config)
    e.integer("seed", 0)
    _check_model(e)
    _check_task(e)
    _check_data(e)

    e.choice("algorithm.name", algorithm_names())
    e.choice("algorithm.feedback", tuple(FEEDBACK_PROVIDERS))
    e.integer("algorithm.max_revisions", 0)
    e.integer("algorithm.tail_tokens", 0)
    e.integer("algorithm.group_size", 1)
    for field in ("lambda_win", "lambda_lose", "kl_coef"):
        e.number(f"algorithm.{field}", 0.0)
    e.number("algorithm.margin", 0.0, 1.0, high_open=True)
    e.number("algorithm.rho", 0.0, low_open=True)
    e.number("algorithm.clip_eps", 0.0, low_open=True)
    e.number("algorithm.awr_temperature", 0.0)
    e.choice("algorithm.reward", REWARDS)
    strings = e.get("algorithm.protected_strings")
    if isinstance(strings, str) or not all(isinstance(x, str) for x in strings or ()):
        e.add("algorithm.protected_strings", f"must be a tuple of strings, got {strings!r}")
    e.number("algorithm.awr_max_weight", 0.0, low_open=True)
    e.number("algorithm.baseline_decay", 0.0, 1.0)
    _check_pairwise(e)

    e.integer("rollout.prompts_per_client", 1)
    e.integer("rollout.max_new_tokens", 1)
    e.number("rollout.temperature", 0.0)
    e.number("rollout.top_p", 0.0, 1.0, low_open=True)
    e.integer("rollout.batch_size", 1)

    e.integer("local.steps", 1)
    e.integer("local.batch_size", 1)
    _check_micro_batch_size(e)
    e.integer("local.max_len", 2)
    e.number("local.lr", 0.0, low_open=True)
    e.number("local.lr_min", 0.0)
    e.number("local.warmup_ratio", 0.0, 1.0, high_open=True)
    e.number("local.weight_decay", 0.0)
    e.number("local.max_grad_norm", 0.0)
    if not e.messages and config.local.lr_min > config.local.lr:
        e.add("local.lr_min", f"must be <= local.lr = {config.local.lr}, got {config.local.lr_min}")

    _check_fl(e)

    _check_eval_task(e)
    e.integer("eval.every", 0)
    e.integer("eval.examples", 1)
    e.integer("eval.max_new_tokens", 1)
    e.integer("eval.batch_size", 1)
    e.choice("eval.multiple_choice", MULTIPLE_CHOICE_EVALS)
    e.integer("checkpoint.every", 1)
    e.integer("checkpoint.keep", 1)
    for field, message in distributed_problems(config.distributed):
        e.add(f"distributed.{field}", message)
    for field in (
        "rollout.reuse_cache",
        "rollout.split_by_length",
        "log.tensorboard",
        "log.progress",
    ):
        e.boolean(field)
    if e.messages:
        raise ValueError("invalid config:\n  " + "\n  ".join(e.messages))


def _missing_fields(config: Any, schema: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted names of the schema's fields that ``config`` lacks (``task.options`` is
    free-form: the task's own keyword arguments)."""
    out = []
    for key, value in schema.items():
        name = f"{prefix}{key}"
        if not hasattr(config, "keys") or key not in config:
            out.append(name)
        elif isinstance(value, ml_collections.ConfigDict) and name != "task.options":
            out += _missing_fields(config[key], value, name + ".")
    return out


def _check_micro_batch_size(e: _Errors) -> None:
    """``local.micro_batch_size``: 0 (no accumulation) or a divisor of ``local.batch_size``."""
    before = len(e.messages)
    e.integer("local.micro_batch_size", 0)
    micro, batch = e.get("local.micro_batch_size"), e.get("local.batch_size")
    checked = len(e.messages) == before and isinstance(batch, int) and batch >= 1
    if checked and micro and batch % micro:
        e.add(
            "local.micro_batch_size",
            f"{micro} does not divide local.batch_size = {batch} (0 = no accumulation)",
        )


def _check_pairwise(e: _Errors) -> None:
    """SPIN / TPAW / DPO fields (`fedsp.selfplay.pairs`)."""
    e.number("algorithm.lam", 0.0, low_open=True)
    e.number("algorithm.eta", 0.0, low_open=True)
    e.number("algorithm.gamma", 0.0)
    e.number("algorithm.beta", 0.0, low_open=True)
    e.number("algorithm.label_smoothing", 0.0, 0.5)
    e.integer("algorithm.n_max", 1)
    if e.get("algorithm.opponent_rounds") is not None:
        e.integer("algorithm.opponent_rounds", 1)
    e.choice("algorithm.pool_on_error", POOL_ON_ERROR)


def _check_eval_task(e: _Errors) -> None:
    """``eval.task`` ("" = the training task) and ``eval.split`` ("" = task.eval_split)."""
    name, split = e.get("eval.task"), e.get("eval.split")
    if not name:
        if split and e.get("task.name") in task_names():
            task = get_task(e.get("task.name"), **dict(e.get("task.options")))
            if not task.has_split(split):
                e.add(
                    "eval.split",
                    f"got {split!r}; task {task.name!r} has splits {task.splits_help()}",
                )
        return
    if name not in task_names():
        e.add("eval.task", f'got {name!r}; choose one of {task_names()} (or "": task.name)')
        return
    task = get_task(name)
    if not task.has_split(split or e.get("task.eval_split")):
        field = "eval.split" if split else "task.eval_split"
        e.add(
            field,
            f"got {split or e.get('task.eval_split')!r}; eval.task {name!r} has "
            f"splits {task.splits_help()}",
        )


def _check_model(e: _Errors) -> None:
    path = e.get("model.path")
    if path and not pathlib.Path(path).expanduser().exists():
        e.add("model.path", f'{path} does not exist ("" uses the default SmolLM2 asset)')
    e.choice("model.dtype", DTYPES)
    e.choice("model.remat", REMAT_POLICIES)
    e.integer("model.lora.rank", 1)
    e.number("model.lora.alpha", 0.0, low_open=True)
    targets = e.get("model.lora.targets")
    if isinstance(targets, str) or not targets:
        e.add("model.lora.targets", f"must be a non-empty tuple of names, got {targets!r}")
    else:
        unknown = [t for t in targets if t not in LORA_TARGETS and f"{t}_proj" not in LORA_TARGETS]
        if unknown:
            e.add("model.lora.targets", f"unknown {unknown}; choose from {tuple(LORA_TARGETS)}")
    layers = e.get("model.lora.layers")
    if isinstance(layers, str) or not all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in (layers or ())
    ):
        e.add("model.lora.layers", f"must be a tuple of layer indices (() = all), got {layers!r}")


def _check_task(e: _Errors) -> None:
    name = e.get("task.name")
    if name not in task_names():
        e.add("task.name", f"got {name!r}; choose one of {task_names()}")
        return
    try:
        task = get_task(name, **dict(e.get("task.options")))
    except (TypeError, ValueError) as err:
        e.add("task.options", str(err))
        return
    ok = True
    for field in ("task.train_split", "task.eval_split"):
        if not task.has_split(e.get(field)):
            e.add(field, f"got {e.get(field)!r}; task {name!r} has splits {task.splits_help()}")
            ok = False
    if ok and isinstance(task, FileTask):
        _check_data_files(e, task)


def _check_data_files(e: _Errors, task: FileTask) -> None:
    """A file-backed task needs its split files under the data directory, unless the
    hub can be used (``datasets`` installed and the task's source allows it)."""
    configured = e.get("task.data_dir")
    root_text = configured or os.environ.get(DATA_DIR_ENV, "")
    hub_ok = task.source != "local" and importlib.util.find_spec("datasets") is not None
    if task.source == "hub":
        return
    for field in ("task.train_split", "task.eval_split"):
        split = e.get(field)
        relpath = task.files.get((parse_split(split) or (split,))[0])
        if not root_text:
            if not hub_ok:
                e.add(
                    "task.data_dir",
                    f"no data directory: set task.data_dir or ${DATA_DIR_ENV} to the folder "
                    f"holding {relpath or task.name + ' files'} (or pip install 'fedsp[data]' "
                    "to read the hub)",
                )
                return
            continue
        root = pathlib.Path(root_text).expanduser()
        origin = "task.data_dir" if configured else f"${DATA_DIR_ENV}"
        if not root.is_dir():
            e.add("task.data_dir", f"the data directory {root} (from {origin}) does not exist")
            return
        if (relpath is None or not (root / relpath).is_file()) and not hub_ok:
            where = root / relpath if relpath else f"{root} (no local file for this split)"
            e.add(
                field,
                f"split {split!r} of {task.name!r} is not on disk: {where} (data "
                f"directory from {origin}); pip install 'fedsp[data]' to read the hub",
            )


def _check_data(e: _Errors) -> None:
    e.integer("data.num_clients", 1)
    e.choice("data.partition", PARTITIONS)
    e.number("data.alpha", 0.0, low_open=True)
    e.integer("data.examples_per_client", 0)
    e.integer("data.limit", 0)
    limit, clients = e.get("data.limit"), e.get("data.num_clients")
    if isinstance(limit, int) and isinstance(clients, int) and 0 < limit < clients:
        e.add("data.limit", f"{limit} examples cannot give {clients} clients one example each")


def _check_fl(e: _Errors) -> None:
    e.integer("fl.rounds", 1)
    clients = e.get("data.num_clients")
    upper = clients if isinstance(clients, int) and clients >= 1 else None
    per_round = e.get("fl.clients_per_round")
    if upper is not None and isinstance(per_round, int) and per_round > upper:
        e.add("fl.clients_per_round", f"{per_round} > data.num_clients = {upper}")
    else:
        e.integer("fl.clients_per_round", 1)
    e.choice("fl.sampling", CLIENT_SAMPLINGS)
    e.choice("fl.backend", BACKENDS)
    e.integer("fl.clients_at_once", 0)
    at_once = e.get("fl.clients_at_once")
    if isinstance(at_once, int) and at_once > 0 and e.get("fl.backend") == "pmap":
        e.add("fl.clients_at_once", "the pmap backend places clients itself; leave it 0")
    if e.get("fl.backend") == "pmap" and jax.process_count() > 1:
        e.add("fl.backend", "'pmap' places clients on one host's devices; use 'vmap' on several")
    elif e.get("fl.backend") == "pmap" and isinstance(per_round, int) and per_round >= 1:
        devices = jax.local_device_count()
        if per_round > devices and per_round % devices:
            e.add(
                "fl.clients_per_round",
                f"{per_round} clients cannot be split over {devices} devices by the pmap backend",
            )
    if isinstance(per_round, int) and per_round >= 1 and e.get("fl.backend") in BACKENDS:
        fl = e.get("fl")
        clients, model = requested_mesh(fl)
        if fl.backend == "pmap" and (clients != 1 or model != 1):
            e.add("fl.mesh", f"the pmap backend places clients itself; got ({clients}, {model})")
        else:
            problem = mesh_problem(clients, model, per_round, jax.device_count())
            if problem is not None:
                e.add(f"fl.mesh.{problem[0]}", problem[1])
    e.choice("fl.server_optimizer", SERVER_OPTIMIZERS)
    e.number("fl.server_lr", 0.0, low_open=True)
    e.number("fl.b1", 0.0, 1.0)
    e.number("fl.b2", 0.0, 1.0)
    e.number("fl.tau", 0.0, low_open=True)
    if e.get("fl.v0") is not None:
        e.number("fl.v0", 0.0)
    e.choice("fl.client_weighting", CLIENT_WEIGHT_MODES)
    e.number("fl.weight_temperature", 0.0, low_open=True)
    if e.get("fl.prune_threshold") is not None:
        e.number("fl.prune_threshold")
    e.choice("fl.aggregator", AGGREGATORS)
    e.number("fl.trim_fraction", 0.0, 0.5, high_open=True)
    e.integer("fl.krum_byzantine", 0)
    e.integer("fl.multi_krum_keep", 1)
    e.number("fl.norm_bound", 0.0, low_open=True)
    e.number("fl.dropout", 0.0, 1.0, high_open=True)
    for field in ("deadline", "speed_spread", "jitter"):
        e.number(f"fl.straggler.{field}", 0.0)
    e.integer("fl.min_clients", 1)
    e.number("fl.byzantine.fraction", 0.0, 1.0)
    e.choice("fl.byzantine.attack", ATTACKS)
    e.number("fl.byzantine.scale", 0.0)
    e.number("fl.dp.clip_norm", 0.0)
    e.number("fl.dp.noise_multiplier", 0.0)
    e.number("fl.dp.delta", 0.0, 1.0, low_open=True, high_open=True)
    for name in ("fl.dp.target_epsilon", "fl.dp.max_epsilon"):
        if e.get(name) is not None:
            e.number(name, 0.0, low_open=True)
    if e.get("fl.dp.clip_norm") and e.get("fl.aggregator") != "mean":
        e.add("fl.aggregator", "DP-FedAvg (fl.dp.clip_norm > 0) takes the 'mean' aggregator")
