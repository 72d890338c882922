"""The tables' data types and the shared CPU-scale cell: a `Table` is a grid of `Run`s
(trained methods) × datasets × seeds; each (run, dataset, seed) is a `Cell`, one
`fedsp.run` with its own config, and each `Row` is read off a run's learning curve.
`cpu_config` is the cell every CPU-scale table starts from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from fedsp.config import default_config

SCALES = ("cpu", "tiny", "full")
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
    """A table row: the accuracy of run ``run`` after round ``round`` (None: the last).

    ``group`` gathers rows shown together (one plot panel each; in the robustness table,
    the aggregator a row uses, or `DP_GROUP`); "" for the tables without groups."""

    key: str
    label: str
    run: str
    round: int | None = None
    group: str = ""


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    title: str
    runs: tuple[Run, ...]
    rows: tuple[Row, ...]
    datasets: tuple[str, ...]
    cpu_budget_h: float  # estimate_seconds summed over its own (unshared) 3-seed cells
    kind: str = "accuracy"  # "accuracy" | "aggregation" | "settings" | "robustness"
    # aggregation / settings / robustness: the target accuracy is the mean round-0
    # accuracy plus target_fraction of the gap to the mean best accuracy of run
    # target_run (both over seeds), unless --target gives an absolute one.
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
EVAL_TOKENS = {"arithmetic": 16, "gsm8k": 128, "arc_challenge": 32}
_MAX_LEN = {"arithmetic": 160, "gsm8k": 256, "arc_challenge": 320}
# Train examples loaded before partitioning (0 = the whole split).
TRAIN_LIMIT = {"arithmetic": 400, "gsm8k": 800, "arc_challenge": 0}
# (train, eval) splits: ARC's train split is hub-only, so its test file is cut in two.
_SPLITS = {
    "arithmetic": ("train", "test"),
    "gsm8k": ("train", "test"),
    "arc_challenge": ("test[:75%]", "test[75%:]"),
}


def cpu_config(
    dataset: str, seed: int, algorithm: str = "spear", *, rounds: int = 4
) -> ml_collections.ConfigDict:
    """The shared CPU-scale cell: SmolLM2-135M-Instruct (the default asset), LoRA r8/α16,
    8 clients on a Dirichlet(α = 1) split over the task's label, 4 clients per round
    with 4 prompts each, 2 local AdamW steps of batch 4, FedAvg, evaluation every round
    on 32 held-out problems (greedy; ARC by option log-likelihood). The learning rate is
    demo.py's (few rounds, small adapters), higher than the paper's."""
    config = default_config()
    config.seed = seed
    config.model.lora.rank = 8
    config.model.lora.alpha = 16.0
    config.task.name = dataset
    config.task.train_split, config.task.eval_split = _SPLITS[dataset]
    config.data.num_clients = NUM_CLIENTS
    config.data.partition = "dirichlet"
    config.data.alpha = DIRICHLET_ALPHA
    config.data.limit = TRAIN_LIMIT[dataset]
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
    config.eval.max_new_tokens = EVAL_TOKENS[dataset]
    config.eval.batch_size = 32
    config.eval.multiple_choice = "loglik"
    config.log.tensorboard = False
    return config
