"""Runs the paper-style table grids and renders them:
``python -m experiments.tables --table NAME [--seeds 0,1,2] [--workdir runs/tables]``.

Tables (issue 6), each a grid of *runs* (one `fedsp.federated.loop.run` per run ×
dataset × seed, a "cell") and *rows* read off the runs' learning curves:

- ``spear``: SPEAR vs feedback-SFT vs GRPO vs gold-SFT FedAvg vs the starting model on
  arithmetic, gsm8k and arc_challenge (multiple-choice log-likelihood evaluation). The
  starting model is not a run: it is round 0 (the evaluation before training) of the
  SPEAR cell, which is the same model on the same evaluation set.
- ``tpaw``: SFT start, SPIN iterations 1..3 and TPAW iterations 1..3 on gsm8k: an
  iteration is a federated round (the global model after round k is iteration k),
  SmolLM2-135M-Instruct's instruct tuning is the SFT start (round 0).
- ``aggregation``: rounds to reach a target accuracy and bytes sent, FedAvg
  (``fl.client_weighting = "examples"``) vs advantage-weighted aggregation, each with
  and without pruning (``fl.prune_threshold = 0``), SPEAR on a non-IID arithmetic split.
- ``settings``: centralized (one client holding all the data) vs federated gold SFT vs
  federated self-play (SPEAR): accuracy, rounds to the target, and whether raw text
  left a client — measured, not assumed: every cell runs with the server step wrapped by
  `ServerAudit`, which records the type of every leaf that reached the server; a
  centralized cell pools the users' text by construction.

CPU scale (the default, ``--scale cpu``): SmolLM2-135M-Instruct with LoRA, 8 clients on a
Dirichlet(α = 1) split, 4 clients per round, seeds 0, 1, 2. Each table states its CPU
budget (`Table.cpu_budget_h`, the sum of `estimate_seconds` over the cells it runs in its
own directory, so that the budgets add up: spear 3.9 h, tpaw 1.9 h, aggregation 1.6 h,
settings 0.7 h, ≈ 8 h for ``--table all`` on 2 cores; tables share identical cells, see
`SHARING_ORDER`) and the results file records the measured wall time beside it. The
committed tables' own cells took 4.4 h for the whole set, all regenerated with the same
code on 2026-12-02: aggregation 0.81 h, settings 0.33 h, tpaw 1.07 h, spear 2.23 h
(0.47-0.57 of their estimates). The cost model's
throughputs come from BENCHMARKS.md; one check against a real cell (spear-arithmetic-s0
cut to 1 round, machine load ≈ 2): estimated 162 s, measured 169 s. ``--scale tiny``
swaps in a 2-layer random model (built once under the workdir) with tiny sizes so the
whole pipeline runs in a minute; its numbers mean nothing and go to
``<workdir>/tiny/results``. ``--scale full`` uses the paper models and sizes
(`experiments.configs.tables_full`); ``--set FIELD=VALUE`` overrides a field of every
cell (e.g. ``--set model.path=/data/Llama-3.2-3B``).

Data: every cell runs offline (``$FEDSP_DATA_DIR``). The offline ARC-Challenge folder
holds only the test file, so arc_challenge cells train on its first 75% (``test[:75%]``,
879 questions) and are evaluated on the disjoint last 25% (``test[75%:]``, 293); the
full-scale configs use the hub's train and test splits, as the paper does. Every cell
is validated before the first one starts, so a missing split fails at once, naming it.

Resumable: every cell has its own run directory ``<workdir>/<scale>/<table>/<cell>``; a
cell with a ``summary.json`` is finished and skipped (after checking that its saved config
matches), a partial one resumes from its latest checkpoint (the loop's exact resume).

Outputs (``--results-dir``, default ``experiments/results``, ``.../results/full`` at full
scale): ``NAME.md`` (mean ± sample
std over seeds, budget, the command), ``NAME.json`` (per-seed numbers and per-round
curves) and ``NAME.png`` (learning curves, mean ± std band over seeds).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import pathlib
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from experiments.configs import base, selfplay_reference, tables_full

SCALES = ("cpu", "tiny", "full")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DEFAULT_SEEDS = (0, 1, 2)
# The federated setting of every CPU table (issue 6).
NUM_CLIENTS = 8
CLIENTS_PER_ROUND = 4
DIRICHLET_ALPHA = 1.0


# --------------------------------------------------------------------------- grid


@dataclasses.dataclass(frozen=True)
class Run:
    """A method that is trained: ``build(dataset, seed)`` gives its CPU-scale config."""

    key: str
    label: str
    build: Callable[[str, int], ml_collections.ConfigDict]


@dataclasses.dataclass(frozen=True)
class Row:
    """A table row: the accuracy of run ``run`` after round ``round`` (None: the last)."""

    key: str
    label: str
    run: str
    round: int | None = None


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    title: str
    runs: tuple[Run, ...]
    rows: tuple[Row, ...]
    datasets: tuple[str, ...]
    cpu_budget_h: float  # estimate_seconds summed over its own (unshared) 3-seed cells
    kind: str = "accuracy"  # "accuracy" | "aggregation" | "settings"
    # aggregation / settings: the target accuracy is the mean round-0 accuracy plus
    # target_fraction of the gap to the mean best accuracy of run target_run (both
    # over seeds), unless --target gives an absolute one.
    target_run: str | None = None
    target_fraction: float = 0.5
    notes: str = ""


@dataclasses.dataclass(frozen=True)
class Cell:
    table: str
    run: str
    dataset: str
    seed: int
    config: ml_collections.ConfigDict

    @property
    def name(self) -> str:
        return f"{self.run}-{self.dataset}-s{self.seed}"


_ROLLOUT_TOKENS = {"arithmetic": 16, "gsm8k": 96, "arc_challenge": 32}
_EVAL_TOKENS = {"arithmetic": 16, "gsm8k": 128, "arc_challenge": 32}
_MAX_LEN = {"arithmetic": 160, "gsm8k": 256, "arc_challenge": 320}
# Train examples loaded before partitioning (0 = the whole split).
_LIMIT = {"arithmetic": 400, "gsm8k": 800, "arc_challenge": 0}
# (train, eval) splits: ARC's train split is hub-only, so its test file is cut in two.
_SPLITS = {"arithmetic": ("train", "test"), "gsm8k": ("train", "test"),
           "arc_challenge": ("test[:75%]", "test[75%:]")}


def cpu_config(dataset: str, seed: int, algorithm: str = "spear", *,
               rounds: int = 4) -> ml_collections.ConfigDict:
    """The shared CPU-scale cell: SmolLM2-135M-Instruct (the default asset), LoRA r8/α16,
    8 clients on a Dirichlet(α = 1) split over the task's label, 4 clients per round
    with 4 prompts each, 2 local AdamW steps of batch 4, FedAvg, evaluation every round
    on 32 held-out problems (greedy; ARC by option log-likelihood). The learning rate is
    demo.py's (few rounds, small adapters), higher than the paper's."""
    config = base.get_config()
    config.seed = seed
    config.model.lora.rank = 8
    config.model.lora.alpha = 16.0
    config.task.name = dataset
    config.task.train_split, config.task.eval_split = _SPLITS[dataset]
    config.data.num_clients = NUM_CLIENTS
    config.data.partition = "dirichlet"
    config.data.alpha = DIRICHLET_ALPHA
    config.data.limit = _LIMIT[dataset]
    config.algorithm.name = algorithm
    config.algorithm.feedback = "hint"
    config.algorithm.max_revisions = 1
    config.rollout.prompts_per_client = 4
    config.rollout.max_new_tokens = _ROLLOUT_TOKENS[dataset]
    config.local.steps = 2
    config.local.batch_size = 4
    config.local.lr = 3e-4
    config.local.lr_min = 1e-4
    config.local.warmup_ratio = 0.0
    config.local.max_len = _MAX_LEN[dataset]
    config.fl.rounds = rounds
    config.fl.clients_per_round = CLIENTS_PER_ROUND
    # One client after the other: vmap over 4 SmolLM2 clients went OOM on gsm8k-sized
    # batches (experiments/configs/selfplay_reference.py); the numbers are the same.
    config.fl.backend = "loop"
    config.eval.every = 1
    config.eval.examples = 32
    config.eval.max_new_tokens = _EVAL_TOKENS[dataset]
    config.eval.batch_size = 32
    config.eval.multiple_choice = "loglik"
    config.log.tensorboard = False
    return config


# Arithmetic runs 6 rounds, as the aggregation and settings tables, so its SPEAR and
# gold-SFT cells are theirs (`SHARING_ORDER`). gsm8k and arc_challenge run 2 rounds and
# are evaluated at round 0 and the end only (the table reports the last round): their
# cells cost 2-3 times an arithmetic round (longer prompts and answers, 32 × 128-token
# greedy gsm8k evaluations), and SmolLM2-135M is near the floor on both at this scale.
_SPEAR_ROUNDS = {"arithmetic": 6, "gsm8k": 2, "arc_challenge": 2}
_SPEAR_EVAL_EVERY = {"arithmetic": 1, "gsm8k": 0, "arc_challenge": 0}


def _spear_run(algorithm: str) -> Callable[[str, int], ml_collections.ConfigDict]:
    def build(dataset: str, seed: int) -> ml_collections.ConfigDict:
        config = cpu_config(dataset, seed, algorithm, rounds=_SPEAR_ROUNDS[dataset])
        config.eval.every = _SPEAR_EVAL_EVERY[dataset]
        if algorithm == "grpo":
            config.algorithm.group_size = 4
        return config
    return build


def _selfplay_run(algorithm: str) -> Callable[[str, int], ml_collections.ConfigDict]:
    def build(dataset: str, seed: int) -> ml_collections.ConfigDict:
        # smollm2_config: TPAW's CPU recipe (η = 6, γ = 0.5, N_max = 3, 3 rounds so the
        # team fills up), made federated as the other tables: 8 Dirichlet clients.
        config = selfplay_reference.smollm2_config(algorithm, federated=True)
        config.seed = seed
        config.task.name = dataset
        config.data.num_clients = NUM_CLIENTS
        config.data.partition = "dirichlet"
        config.data.alpha = DIRICHLET_ALPHA
        config.data.limit = _LIMIT[dataset]
        config.fl.clients_per_round = CLIENTS_PER_ROUND
        config.fl.backend = "loop"
        config.eval.every = 1  # iteration k = the global model after round k
        config.eval.max_new_tokens = _EVAL_TOKENS[dataset]
        config.log.tensorboard = False
        return config
    return build


def _aggregation_run(weighting: str, prune: bool):
    def build(dataset: str, seed: int) -> ml_collections.ConfigDict:
        config = cpu_config(dataset, seed, "spear", rounds=6)
        config.fl.client_weighting = weighting
        # A client whose reward fell below its running baseline sends nothing.
        config.fl.prune_threshold = 0.0 if prune else None
        return config
    return build


def _settings_run(kind: str):
    def build(dataset: str, seed: int) -> ml_collections.ConfigDict:
        config = cpu_config(dataset, seed, "sft" if kind == "fed_sft" else "spear", rounds=6)
        if kind == "centralized":
            # One holder of everyone's data, seeing per round the prompts the 4 sampled
            # clients see together and taking their combined number of steps.
            config.data.num_clients = 1
            config.fl.clients_per_round = 1
            config.rollout.prompts_per_client *= CLIENTS_PER_ROUND
            config.local.steps *= CLIENTS_PER_ROUND
        return config
    return build


def _final_rows(runs: Sequence[Run]) -> tuple[Row, ...]:
    """One row per run: its accuracy after the last round, under the run's label."""
    return tuple(Row(r.key, r.label, r.key) for r in runs)


_AGGREGATION_RUNS = (
    Run("fedavg", "FedAvg", _aggregation_run("examples", False)),
    Run("fedavg_prune", "FedAvg + pruning", _aggregation_run("examples", True)),
    Run("advantage", "advantage-weighted", _aggregation_run("advantage", False)),
    Run("advantage_prune", "advantage-weighted + pruning", _aggregation_run("advantage", True)),
)
_SETTINGS_RUNS = (
    Run("centralized", "centralized (SPEAR, pooled data)", _settings_run("centralized")),
    Run("fed_sft", "federated gold SFT", _settings_run("fed_sft")),
    Run("fed_selfplay", "federated self-play (SPEAR)", _settings_run("fed_selfplay")),
)


TABLES: dict[str, Table] = {
    "spear": Table(
        name="spear",
        title="SPEAR vs baselines (accuracy after the last round)",
        runs=(Run("spear", "SPEAR", _spear_run("spear")),
              Run("feedback_sft", "feedback-SFT", _spear_run("feedback_sft")),
              Run("grpo", "GRPO", _spear_run("grpo")),
              Run("sft", "gold-SFT FedAvg", _spear_run("sft"))),
        rows=(Row("start", "starting model", "spear", 0),
              Row("sft", "gold-SFT FedAvg", "sft"),
              Row("feedback_sft", "feedback-SFT", "feedback_sft"),
              Row("grpo", "GRPO", "grpo"),
              Row("spear", "SPEAR", "spear")),
        datasets=("arithmetic", "gsm8k", "arc_challenge"),
        cpu_budget_h=3.9,
        notes=("The starting model is round 0 of the SPEAR cell (same model, same "
               "evaluation set). The offline data has no ARC train split: arc_challenge "
               "trains on the first 75% of the ARC-Challenge test file and is evaluated on "
               "the disjoint last 25%."),
    ),
    "tpaw": Table(
        name="tpaw",
        title="SPIN vs TPAW iterations on gsm8k",
        runs=(Run("spin", "SPIN", _selfplay_run("spin")),
              Run("tpaw", "TPAW", _selfplay_run("tpaw"))),
        rows=(Row("sft", "SFT start", "spin", 0),
              *(Row(f"spin_{k}", f"SPIN iter {k}", "spin", k) for k in (1, 2, 3)),
              *(Row(f"tpaw_{k}", f"TPAW iter {k}", "tpaw", k) for k in (1, 2, 3))),
        datasets=("gsm8k",),
        cpu_budget_h=1.9,
        notes=("Iteration k is the global model after federated round k; the SFT start "
               "is SmolLM2-135M-Instruct (round 0 of the SPIN cell)."),
    ),
    "aggregation": Table(
        name="aggregation",
        title="FedAvg vs advantage-weighted aggregation, with and without pruning",
        runs=_AGGREGATION_RUNS,
        rows=_final_rows(_AGGREGATION_RUNS),
        datasets=("arithmetic",),
        cpu_budget_h=1.6,
        kind="aggregation",
        target_run="fedavg",
        notes=("Claim tested: advantage weighting reaches the target about 40% faster "
               "than FedAvg. Pruned clients send nothing; bytes are adapter bytes."),
    ),
    "settings": Table(
        name="settings",
        title="Centralized vs federated SFT vs federated self-play",
        runs=_SETTINGS_RUNS,
        rows=_final_rows(_SETTINGS_RUNS),
        datasets=("arithmetic",),
        cpu_budget_h=0.7,
        kind="settings",
        target_run="centralized",
        notes=("'Raw text left a client' is measured: the server step of every cell is "
               "wrapped and every leaf that reached it is typed; a centralized cell pools "
               "the clients' text by construction."),
    ),
}


# --------------------------------------------------------------------------- scales


def tiny_scale(config: ml_collections.ConfigDict, model_path: str) -> None:
    """Shrinks a CPU-scale cell in place to a seconds-long run on a tiny random model,
    keeping its shape: a centralized cell keeps its single client."""
    config.model.path = model_path
    config.model.lora.rank, config.model.lora.alpha = 2, 4.0
    config.data.num_clients = min(config.data.num_clients, 2)
    config.data.limit = 32
    config.fl.clients_per_round = min(config.fl.clients_per_round, 2)
    config.fl.rounds = 2
    config.rollout.prompts_per_client = 2
    config.rollout.max_new_tokens = 4
    config.algorithm.max_revisions = min(config.algorithm.max_revisions, 1)
    config.algorithm.group_size = 2
    config.local.steps, config.local.batch_size, config.local.max_len = 1, 2, 128
    config.eval.examples, config.eval.max_new_tokens, config.eval.batch_size = 4, 4, 4
    config.eval.every = 1
    config.log.tensorboard = config.log.progress = False


def tiny_model(directory: pathlib.Path) -> pathlib.Path:
    """A 2-layer random SmolLM-shaped model with SmolLM2's tokenizer (as the tests'
    `tests.federated.fixtures.save_tiny_model`), saved once into ``directory``."""
    if (directory / "config.json").is_file():
        return directory
    from flax import nnx

    from fedsp.assets import default_model_path
    from fedsp.model import ModelConfig, Tokenizer, Transformer, save_pretrained

    hf = dict(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu",
              bos_token_id=1, eos_token_id=2, rope_theta=1e5, tie_word_embeddings=True)
    model = Transformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
    return save_pretrained(model, directory, tokenizer=Tokenizer.from_gguf(default_model_path()))


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Sets dotted fields (``fl.rounds``); an unknown field raises naming it."""
    for key, value in overrides.items():
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(f"--set {key}: config has no field {'.'.join(parts[:i + 1])!r}")
            if i < len(parts) - 1:
                node = node[part]
        try:
            node[parts[-1]] = value
        except TypeError as err:
            raise ValueError(f"--set {key}={value!r}: {err}") from None


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["fl.rounds=3", "model.path=/x"]`` → ``{"fl.rounds": 3, "model.path": "/x"}``."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


# Tables share cells: a cell whose config equals (up to `log`/`checkpoint`) a cell of a
# table earlier in this order runs once, in that table's directory, and both tables read
# it. The settings table's federated SPEAR cells are the aggregation table's FedAvg cells,
# and the spear table's SPEAR and gold-SFT cells on arithmetic are those two tables' cells.
SHARING_ORDER = ("aggregation", "settings", "spear", "tpaw")


def _config_key(config: ml_collections.ConfigDict) -> str:
    return json.dumps(_comparable(json.loads(config.to_json_best_effort())), sort_keys=True)


def cell_dirs(grid: Sequence[Cell], root: pathlib.Path, **grid_kwargs: Any) -> list[pathlib.Path]:
    """The run directory of each cell of ``grid``: ``root/<table>/<cell>`` of the first
    table in `SHARING_ORDER` with a cell of the same config (its own table's otherwise).

    ``root`` is ``<workdir>/<scale>``; ``grid_kwargs`` are the `cells` arguments the grid
    was built with (seeds, scale, overrides, tiny_model_path), so every table's cells are
    built the same way."""
    grid_kwargs.pop("only", None)
    owner: dict[str, pathlib.Path] = {}
    for name in SHARING_ORDER:
        for cell in cells(TABLES[name], **grid_kwargs):
            owner.setdefault(_config_key(cell.config), root / name / cell.name)
    return [owner.get(_config_key(c.config), root / c.table / c.name) for c in grid]


def cells(table: Table, *, seeds: Sequence[int] = DEFAULT_SEEDS, scale: str = "cpu",
          overrides: dict[str, Any] | None = None, only: Sequence[str] = (),
          tiny_model_path: str = "") -> list[Cell]:
    """Every (run, dataset, seed) cell of ``table``, with its config at ``scale``
    (``tiny`` needs ``tiny_model_path``), then ``overrides`` (dotted field → value).

    ``only`` keeps cells whose name (``run-dataset-sSEED``) contains one of its strings.
    """
    if scale not in SCALES:
        raise ValueError(f"--scale: got {scale!r}; choose one of {SCALES}")
    if scale == "tiny" and not tiny_model_path:
        raise ValueError("--scale tiny: needs a tiny model path (tiny_model_path)")
    out = []
    for run in table.runs:
        for dataset in table.datasets:
            for seed in seeds:
                if scale == "full":
                    config = tables_full.full_config(table.name, run.key, dataset, seed)
                else:
                    config = run.build(dataset, seed)
                    if scale == "tiny":
                        tiny_scale(config, tiny_model_path)
                if overrides:
                    apply_overrides(config, overrides)
                cell = Cell(table.name, run.key, dataset, int(seed), config)
                if not only or any(s in cell.name for s in only):
                    out.append(cell)
    return out


# --------------------------------------------------------------------------- budget

# Throughputs of this 2-core machine class, from BENCHMARKS.md: a SPEAR round of 4
# clients × 4 prompts × 16 new tokens with one revision takes 10.4 s of rollout (≈ 45
# generated tokens/s including prefill); a LoRA train step of 4 × 256 tokens 6.96 s
# (≈ 150 tokens/s); a forward without gradients ≈ 3× that. Start-up (model load and
# compiling the sampler, train step and evaluation) ≈ 90 s per cell.
DECODE_TOKENS_S = 45.0
TRAIN_TOKENS_S = 150.0
FORWARD_TOKENS_S = 450.0
STARTUP_S = 90.0
ROUND_OVERHEAD_S = 5.0
_PAIRWISE = ("spin", "tpaw", "dpo")
_MULTIPLE_CHOICE = ("arc_challenge", "hellaswag")


def estimate_seconds(config: ml_collections.ConfigDict) -> float:
    """CPU seconds one cell is expected to take on 2 cores (a cost model, not a run)."""
    algo = config.algorithm.name
    c, p = config.fl.clients_per_round, config.rollout.prompts_per_client
    if algo == "sft":
        rollout_tokens = 0.0
    elif algo == "grpo":
        rollout_tokens = c * p * config.algorithm.group_size * config.rollout.max_new_tokens
    elif algo in _PAIRWISE:
        rollout_tokens = c * p * config.rollout.max_new_tokens
    else:  # spear / feedback_sft: about 3 in 4 first answers are wrong and revised
        rollout_tokens = c * p * config.rollout.max_new_tokens * (
            1 + 0.75 * config.algorithm.max_revisions)
    rows = config.local.batch_size * (2 if algo in _PAIRWISE else 1)
    train_tokens = c * config.local.steps * rows * config.local.max_len
    forward_tokens = 0.0
    if algo == "tpaw":  # every pair scored once a round under each of N_max players
        forward_tokens = c * p * 3 * 2 * config.local.max_len * config.algorithm.n_max
    round_s = (rollout_tokens / DECODE_TOKENS_S + train_tokens / TRAIN_TOKENS_S
               + forward_tokens / FORWARD_TOKENS_S + ROUND_OVERHEAD_S)
    rounds, every = config.fl.rounds, config.eval.every
    # The loop evaluates round 0, every ``every``-th round and the last one.
    evals = 1 + len({r for r in range(1, rounds + 1) if r == rounds or (every and r % every == 0)})
    eval_task = config.eval.task or config.task.name
    if eval_task in _MULTIPLE_CHOICE and config.eval.multiple_choice == "loglik":
        # ~4 options of ~200 prompt + option tokens each, one forward pass
        eval_s = config.eval.examples * 4 * 200 / FORWARD_TOKENS_S
    else:
        eval_s = config.eval.examples * config.eval.max_new_tokens / DECODE_TOKENS_S
    return STARTUP_S + rounds * round_s + evals * eval_s


# --------------------------------------------------------------------------- audit


class ServerAudit:
    """Wraps `fedsp.federated.loop.server_step` while a cell runs and records, for every
    call, the type of every leaf of what reached the server, and how many of them were
    text (``str``/``bytes``) or any other non-array object."""

    def __init__(self):
        self.calls = 0
        self.leaf_types: dict[str, int] = {}
        self.text_leaves = 0

    def __enter__(self):
        from fedsp.federated import loop

        # Wraps whatever the loop calls, and puts exactly that back on exit.
        self._loop, self._inner = loop, loop.server_step
        loop.server_step = self
        return self

    def __exit__(self, *exc):
        self._loop.server_step = self._inner

    def __call__(self, *args, **kwargs):
        import jax

        self.calls += 1
        for leaf in jax.tree.leaves((args, kwargs.get("threshold"))):
            name = type(leaf).__name__
            self.leaf_types[name] = self.leaf_types.get(name, 0) + 1
            if isinstance(leaf, (str, bytes)) or not hasattr(leaf, "dtype") and not isinstance(
                    leaf, (int, float)):
                self.text_leaves += 1
        return self._inner(*args, **kwargs)

    def merge(self, path: pathlib.Path) -> dict[str, Any]:
        """Adds this audit to the one saved at ``path`` (a resumed cell) and saves it."""
        saved = json.loads(path.read_text()) if path.is_file() else {
            "server_calls": 0, "leaf_types": {}, "text_leaves": 0}
        saved["server_calls"] += self.calls
        saved["text_leaves"] += self.text_leaves
        for k, v in self.leaf_types.items():
            saved["leaf_types"][k] = saved["leaf_types"].get(k, 0) + v
        path.write_text(json.dumps(saved, indent=2) + "\n")
        return saved


# --------------------------------------------------------------------------- running


# Fields added after some cells ran that change how a cell is computed, not what it
# computes (the samples are the same up to float rounding), with the value that a saved
# config without them is taken to have.
_EXECUTION_FIELDS = {("rollout", "reuse_cache"): True}


def _comparable(config_json: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config_json.items() if k not in ("log", "checkpoint")}
    for (section, field), default in _EXECUTION_FIELDS.items():
        part = out.get(section)
        if isinstance(part, dict) and part.get(field, default) == default:
            out[section] = {k: v for k, v in part.items() if k != field}
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


COMMITS_FILE = "commits.txt"


def _record_commit(workdir: pathlib.Path) -> None:
    """Appends the checkout's commit to ``workdir/commits.txt`` when it differs from the
    last one there: the code versions a cell ran on, one line per change (a resumed cell
    can span several)."""
    commit = _git_commit() or "unknown"
    path = workdir / COMMITS_FILE
    seen = path.read_text().split() if path.is_file() else []
    if not seen or seen[-1] != commit:
        workdir.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(commit + "\n")


def cell_commits(workdir: pathlib.Path) -> list[str]:
    """The commits `run_cell` recorded for a cell, oldest first ([] if none were)."""
    path = workdir / COMMITS_FILE
    return path.read_text().split() if path.is_file() else []


def run_cell(cell: Cell, workdir: pathlib.Path) -> dict[str, Any]:
    """Runs (resumes, or skips if finished) one cell; returns its summary."""
    summary_path = workdir / "summary.json"
    if summary_path.is_file():
        saved = json.loads((workdir / "config.json").read_text())
        want = json.loads(cell.config.to_json_best_effort())
        changed = _diff(_comparable(saved), _comparable(want))
        if changed:
            raise ValueError(f"{workdir} finished with a different config (fields {changed}); "
                             "use another --workdir or delete the cell")
        return json.loads(summary_path.read_text())
    from fedsp.federated.loop import run

    _record_commit(workdir)
    audit = ServerAudit()
    try:
        with audit:
            summary = run(cell.config, workdir)
    finally:
        # A cell stopped by an error keeps the audit of the rounds it ran; the resumed
        # process adds its own (server_calls then counts every round once more or less
        # only if a round was repeated after a crash).
        if audit.calls:
            audit.merge(workdir / "server_audit.json")
    return summary


def read_curves(workdir: pathlib.Path) -> dict[str, dict[str, float]]:
    """Per-round curves of a run directory's ``metrics.jsonl``: accuracy (evaluated
    rounds), bytes sent and bytes saved (every round; round 0 sends nothing), and each
    round's wall time (``time_s``: training and evaluation, without start-up), which adds
    up across the processes of a resumed cell."""
    accuracy, sent, saved, seconds = {}, {}, {}, {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        rnd = str(record["round"])
        if "eval/accuracy" in record:
            accuracy[rnd] = record["eval/accuracy"]
        sent[rnd] = record.get("bytes_sent", 0)
        saved[rnd] = record.get("bytes_saved", 0)
        if "time_s" in record:
            seconds[rnd] = record["time_s"]
    return {"accuracy": accuracy, "bytes_sent": sent, "bytes_saved": saved, "time_s": seconds}


def rounds_to_target(accuracy: dict[Any, float], target: float) -> int | None:
    """The first evaluated round whose accuracy is ≥ ``target`` (0: already at round 0);
    None if no round reaches it. Accuracies are fractions k/n and the target is computed
    from them, so "reaches" allows for float rounding (1e-9)."""
    for rnd in sorted(accuracy, key=int):
        if accuracy[rnd] is not None and accuracy[rnd] >= target - 1e-9:
            return int(rnd)
    return None


def bytes_until(bytes_sent: dict[Any, int], last_round: int) -> int:
    """Bytes sent by the clients in rounds 1..``last_round``."""
    return int(sum(v for r, v in bytes_sent.items() if 0 < int(r) <= last_round))


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample std (ddof = 1; NaN for one value), n) over the non-None values."""
    xs = np.asarray([v for v in values if v is not None], np.float64)
    if xs.size == 0:
        return math.nan, math.nan, 0
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else math.nan, int(xs.size)


def _fmt(stat: tuple[float, float, int], digits: int = 3, total: int | None = None) -> str:
    mean, std, n = stat
    if n == 0:
        return "—"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    if total is not None and n < total:
        text += f" ({n}/{total})"
    return text


def accuracy_at(curve: dict[str, float], rnd: int | None) -> float | None:
    if rnd is None:
        return curve[max(curve, key=int)] if curve else None
    return curve.get(str(rnd))


def collect(table: Table, results: list[dict[str, Any]], *,
            target: float | None = None) -> dict[str, Any]:
    """The table's numbers from its cells' results (dicts with ``run``, ``dataset``,
    ``seed``, ``summary``, ``curves``, ``audit``, ``config``): per-seed values and
    mean/std per (row, dataset)."""
    by = {(r["run"], r["dataset"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    out: dict[str, Any] = {"rows": {}, "seeds": seeds}
    for row in table.rows:
        out["rows"][row.key] = {}
        for dataset in table.datasets:
            per_seed = {s: accuracy_at(by[(row.run, dataset, s)]["curves"]["accuracy"], row.round)
                        for s in seeds if (row.run, dataset, s) in by}
            mean, std, n = mean_std(list(per_seed.values()))
            out["rows"][row.key][dataset] = {"per_seed": per_seed, "mean": mean, "std": std,
                                             "n": n}
    if table.kind in ("aggregation", "settings"):
        out["targets"] = {}
        for dataset in table.datasets:
            if target is not None:
                goal, rule = float(target), "absolute (--target)"
            else:
                ref = [r for r in results if r["run"] == table.target_run
                       and r["dataset"] == dataset]
                start = mean_std([accuracy_at(r["curves"]["accuracy"], 0) for r in ref])[0]
                best = mean_std([max(r["curves"]["accuracy"].values()) for r in ref])[0]
                goal = start + table.target_fraction * (best - start)
                rule = (f"round-0 accuracy + {table.target_fraction:g} × (best − round-0) of "
                        f"{table.target_run}, means over seeds" if ref else
                        f"undefined: no {table.target_run} cell ran; pass --target")
            out["targets"][dataset] = {"target": goal, "rule": rule}
            for row in table.rows:
                cell = out["rows"][row.key][dataset]
                reached, sent, total_sent, total_saved, text = {}, {}, {}, {}, {}
                for s in seeds:
                    r = by.get((row.run, dataset, s))
                    if r is None:
                        continue
                    rtt = rounds_to_target(r["curves"]["accuracy"], goal)
                    reached[s] = rtt
                    sent[s] = (None if rtt is None
                               else bytes_until(r["curves"]["bytes_sent"], rtt))
                    total_sent[s] = r["summary"]["bytes_sent"]
                    total_saved[s] = r["summary"]["bytes_saved"]
                    text[s] = raw_text_left_client(r)
                cell.update(rounds_to_target=reached, bytes_to_target=sent,
                            bytes_sent=total_sent, bytes_saved=total_saved,
                            raw_text_left_client=text,
                            rounds_to_target_stat=mean_std(list(reached.values())),
                            bytes_sent_stat=mean_std(list(total_sent.values())),
                            bytes_to_target_stat=mean_std(list(sent.values())),
                            bytes_saved_stat=mean_std(list(total_saved.values())))
    return out


def raw_text_left_client(result: dict[str, Any]) -> bool | None:
    """True if the cell pooled several users' text in one holder (centralized) or any
    non-array leaf reached the server; None when the cell has no audit (it ran without
    `ServerAudit`)."""
    audit = result.get("audit")
    pooled = result["config"]["data"]["num_clients"] == 1
    if audit is None:
        return True if pooled else None
    return bool(pooled or audit["text_leaves"] > 0)


# --------------------------------------------------------------------------- rendering


def render_markdown(table: Table, numbers: dict[str, Any], meta: dict[str, Any]) -> str:
    total = len(numbers["seeds"])
    lines = [f"# {table.title}", "",
             f"Scale: **{meta['scale']}**; seeds {numbers['seeds']}; mean ± sample std "
             f"(ddof = 1) over seeds; `(k/n)`: only k of n seeds have the value.", ""]
    if table.kind == "accuracy":
        lines += ["| method | " + " | ".join(table.datasets) + " |",
                  "|---|" + "---|" * len(table.datasets)]
        for row in table.rows:
            cells_ = [_fmt((v["mean"], v["std"], v["n"]), total=total)
                      for v in (numbers["rows"][row.key][d] for d in table.datasets)]
            lines.append(f"| {row.label} | " + " | ".join(cells_) + " |")
    else:
        for dataset in table.datasets:
            goal = numbers["targets"][dataset]
            lines += [f"{dataset}: target accuracy {goal['target']:.3f} ({goal['rule']}).", ""]
            if table.kind == "aggregation":
                lines += ["| method | final accuracy | rounds to target | MB sent to target "
                          "| MB sent (all rounds) | MB not sent (pruned or empty clients) |",
                          "|---|---|---|---|---|---|"]
            else:
                lines += ["| setting | final accuracy | rounds to target "
                          "| raw text left a client |", "|---|---|---|---|"]
            for row in table.rows:
                v = numbers["rows"][row.key][dataset]
                acc = _fmt((v["mean"], v["std"], v["n"]), total=total)
                rtt = _fmt(v["rounds_to_target_stat"], 1, total)
                if table.kind == "aggregation":
                    mb = [_fmt((v[k][0] / 1e6, v[k][1] / 1e6, v[k][2]), 2, total)
                          for k in ("bytes_to_target_stat", "bytes_sent_stat", "bytes_saved_stat")]
                    lines.append(f"| {row.label} | {acc} | {rtt} | " + " | ".join(mb) + " |")
                else:
                    flags = set(v["raw_text_left_client"].values())
                    text = ("unknown" if None in flags or not flags else "yes" if flags == {True}
                            else "no" if flags == {False} else "mixed")
                    lines.append(f"| {row.label} | {acc} | {rtt} | {text} |")
            if table.kind == "aggregation":
                lines += [_speedup(numbers["rows"], dataset), ""]
            lines.append("")
    shared = [f"{name} = {where}" for name, where in meta.get("shared_cells", {}).items()]
    commits = meta.get("cell_commits", {})
    lines += ["", f"Notes: {table.notes}" if table.notes else "", "",
              "## Budget", "",
              f"Stated CPU budget (2 cores, CPU scale, 3 seeds): {table.cpu_budget_h:g} h"
              + (f" for the cells it runs itself; {len(shared)} of its cells are another "
                 f"table's (same config, run once): {', '.join(shared)}. " if shared else ". ")
              + (f"Cost-model estimate for all its cells: {meta['estimated_s'] / 3600:.2f} h; "
                 if meta["scale"] == "cpu" else "")
              + f"measured wall time of the cells in this invocation: "
              f"{meta['measured_s'] / 3600:.2f} h (finished cells it skipped count as their "
              f"saved summaries say)"
              + (f"; their rounds alone, over every process that ran them: "
                 f"{meta['rounds_s'] / 3600:.2f} h" if "rounds_s" in meta else "")
              + (f". Table written by a process started at commit {meta['commit']}"
                 if meta.get("commit") else "")
              + (f"; its cells ran at {_commit_summary(commits)}." if commits else "."), "",
              "## Command", "", "```", meta["command"], "```", ""]
    return "\n".join(lines)


def _speedup(rows: dict[str, Any], dataset: str) -> str:
    """Advantage weighting vs FedAvg in mean rounds to the target, as measured."""
    fed, adv = (rows[k][dataset]["rounds_to_target_stat"] for k in ("fedavg", "advantage"))
    if fed[2] == 0 or adv[2] == 0 or fed[0] == 0:
        return ("Rounds to target, advantage-weighted vs FedAvg: not comparable (a run did "
                "not reach the target, or FedAvg started at it).")
    fewer = 1 - adv[0] / fed[0]
    return (f"Rounds to target, advantage-weighted vs FedAvg: {adv[0]:.2f} vs {fed[0]:.2f} "
            f"(means over the seeds that reached it): {abs(fewer):.0%} "
            f"{'fewer' if fewer >= 0 else 'more'} rounds (the claim: about 40% fewer).")


def plot_curves(table: Table, results: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Accuracy vs round per dataset (mean over seeds, ± std band); the aggregation
    table adds accuracy vs cumulative MB sent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, "round") for d in table.datasets]
    if table.kind == "aggregation":
        panels += [(d, "MB sent") for d in table.datasets]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (dataset, x_axis) in zip(axes[0], panels):
        for run in table.runs:
            runs = [r["curves"] for r in results
                    if r["run"] == run.key and r["dataset"] == dataset]
            if not runs:
                continue
            rounds = sorted({int(k) for c in runs for k in c["accuracy"]})
            stats = [mean_std([c["accuracy"].get(str(k)) for c in runs]) for k in rounds]
            mean = np.array([s[0] for s in stats])
            std = np.nan_to_num(np.array([s[1] for s in stats]))
            x = np.asarray(rounds, np.float64)
            if x_axis == "MB sent":
                x = np.array([np.mean([bytes_until(c["bytes_sent"], k) for c in runs])
                              for k in rounds]) / 1e6
            ax.plot(x, mean, marker="o", label=run.label)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_title(dataset)
        ax.set_xlabel(x_axis)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    labelled = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if labelled:
        labelled[-1].legend(fontsize=7)
    fig.suptitle(table.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.tables", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, choices=[*sorted(TABLES), "all"],
                   help="a table, or all four in turn")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                   help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--workdir", default="runs/tables", help="root of the cells' run directories")
    p.add_argument("--results-dir", default=None,
                   help="where NAME.md/json/png go (default: experiments/results at cpu "
                        "scale, experiments/results/full at full scale, "
                        "<workdir>/tiny/results at tiny scale)")
    p.add_argument("--scale", default="cpu", choices=SCALES)
    p.add_argument("--cells", default="", help="comma-separated substrings of cell names to keep")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of every cell (repeatable), e.g. fl.rounds=2")
    p.add_argument("--target", type=float, default=None,
                   help="absolute target accuracy (aggregation, settings)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and configs only")
    return p


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds: expected non-negative integers, got {text!r}")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        seeds = _seeds(args.seeds)
        overrides = parse_set(args.set)
    except ValueError as err:
        parser.error(str(err))
    if args.table == "all":
        argv = list(sys.argv[1:] if argv is None else argv)
        at = max(i for i, a in enumerate(argv) if a == "--table" or a.startswith("--table="))
        del argv[at:at + (1 if "=" in argv[at] else 2)]
        for name in TABLES:
            if main([*argv, "--table", name]):
                return 1
        return 0
    table = TABLES[args.table]
    root = pathlib.Path(args.workdir) / args.scale
    tiny_path = ""
    if args.scale == "tiny":
        tiny_path = str(overrides.get("model.path") or tiny_model(
            pathlib.Path(args.workdir).absolute() / "tiny" / "_model"))
    grid_kwargs = dict(seeds=seeds, scale=args.scale, overrides=overrides,
                       tiny_model_path=tiny_path)
    try:
        grid = cells(table, only=[s for s in args.cells.split(",") if s], **grid_kwargs)
        dirs = cell_dirs(grid, root, **grid_kwargs)
    except ValueError as err:
        parser.error(str(err))
    if not grid:
        parser.error(f"--cells {args.cells!r} matches no cell of table {table.name!r}")
    estimated = sum(estimate_seconds(c.config) for c in grid)
    problems = validation_problems(grid)
    if args.dry_run:
        print(f"table {table.name}: {len(grid)} cells, scale {args.scale}, "
              f"estimated {estimated / 3600:.2f} h on 2 CPU cores"
              + (" (the cost model is for CPU scale)" if args.scale != "cpu" else "")
              + f"; stated CPU budget {table.cpu_budget_h:g} h")
        for cell, workdir in zip(grid, dirs):
            print(f"\n== {cell.name}  ->  {workdir}  "
                  f"(~{estimate_seconds(cell.config) / 60:.1f} min)")
            print(cell.config.to_json_best_effort(indent=1))
        if problems:
            print("\ninvalid cells (fix before running):\n  " + "\n  ".join(problems))
        return 0
    if problems:
        parser.error("invalid cell config(s):\n  " + "\n  ".join(problems))

    started_at = _git_commit()
    shared = {c.name: f"{d.parent.name}/{d.name}" for c, d in zip(grid, dirs)
              if d != root / table.name / c.name}
    results, measured = [], 0.0
    for i, (cell, workdir) in enumerate(zip(grid, dirs)):
        note = " (shared)" if cell.name in shared else ""
        print(f"[{i + 1}/{len(grid)}] {cell.name} -> {workdir}{note}", flush=True)
        start = time.perf_counter()
        summary = run_cell(cell, workdir)
        measured += summary.get("wall_time_s", time.perf_counter() - start)
        audit_path = workdir / "server_audit.json"
        results.append({
            "run": cell.run, "dataset": cell.dataset, "seed": cell.seed,
            "workdir": str(workdir), "summary": summary, "curves": read_curves(workdir),
            "audit": json.loads(audit_path.read_text()) if audit_path.is_file() else None,
            "config": json.loads(cell.config.to_json_best_effort()),
            "estimated_s": estimate_seconds(cell.config),
            "commits": cell_commits(workdir),
        })
    numbers = collect(table, results, target=args.target)
    command = "python -m experiments.tables " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = {"scale": args.scale, "estimated_s": estimated, "measured_s": measured,
            "rounds_s": sum(sum(r["curves"]["time_s"].values()) for r in results),
            "command": command, "cpu_budget_h": table.cpu_budget_h, "commit": started_at,
            "shared_cells": shared,
            "cell_commits": {c.name: r["commits"] for c, r in zip(grid, results)}}
    out_dir = pathlib.Path(args.results_dir) if args.results_dir else {
        "cpu": RESULTS, "full": RESULTS / "full",
        "tiny": pathlib.Path(args.workdir) / "tiny" / "results"}[args.scale]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{table.name}.md").write_text(render_markdown(table, numbers, meta))
    (out_dir / f"{table.name}.json").write_text(json.dumps(_jsonable(
        {"table": table.name, "meta": meta, "numbers": numbers, "cells": results}),
        indent=1, allow_nan=False) + "\n")
    plot_curves(table, results, out_dir / f"{table.name}.png")
    print(f"wrote {out_dir / table.name}.{{md,json,png}}")
    return 0


def _commit_summary(cell_commits: dict[str, list[str]]) -> str:
    """"commit X (all 6 cells)" or "commits X (4 cells), Y (2 cells), unrecorded (1 cell)":
    how many cells ran (in part) at each commit; a cell resumed across commits counts
    under each."""
    counts: dict[str, int] = {}
    for commits in cell_commits.values():
        for commit in dict.fromkeys(commits or ["unrecorded"]):
            counts[commit] = counts.get(commit, 0) + 1
    if len(counts) == 1:
        (commit, n), = counts.items()
        return f"commit {commit} (all {n} cells)" if commit != "unrecorded" else \
            f"commits that were not recorded (all {n} cells)"
    return "commits " + ", ".join(
        f"{c} ({n} cell{'s' * (n != 1)})" for c, n in counts.items())


def _git_commit() -> str | None:
    """The checkout's commit (with "+dirty" for uncommitted changes), None outside git."""
    import subprocess

    here = pathlib.Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def _jsonable(value: Any) -> Any:
    """NaN/inf become null (JSON has none); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def validation_problems(grid: Sequence[Cell]) -> list[str]:
    """`fedsp.config.validate` of every cell, one line per bad cell (naming the fields)."""
    from fedsp import config as config_lib

    problems = []
    for cell in grid:
        try:
            config_lib.validate(cell.config)
        except ValueError as err:
            problems.append(f"{cell.name}: " + "; ".join(str(err).splitlines()[1:]).strip())
    return problems


if __name__ == "__main__":
    from fedsp import hostalloc

    hostalloc.reexec_with_tunables()  # before any work: see fedsp/hostalloc.py
    sys.exit(main())
