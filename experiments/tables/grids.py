"""The tables as data: which runs, rows, datasets and seeds each table has (`TABLES`),
built from the shared CPU cell (`experiments.tables.base.cpu_config`); the robustness
table is `experiments.tables.robustness`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_collections

from experiments.configs import selfplay_reference
from experiments.tables.base import (
    CLIENTS_PER_ROUND,
    DIRICHLET_ALPHA,
    EVAL_TOKENS,
    NUM_CLIENTS,
    TRAIN_LIMIT,
    Row,
    Run,
    Table,
    cpu_config,
)
from experiments.tables.robustness import ROBUSTNESS

# Arithmetic runs 6 rounds, as the aggregation and settings tables, so its SPEAR and
# gold-SFT cells are theirs (`SHARING_ORDER`). gsm8k and arc_challenge run 2 rounds and
# are evaluated at round 0 and the end only (the table reports the last round): their
# rounds cost more than an arithmetic round (longer prompts and answers, 32 × 128-token
# greedy gsm8k evaluations; `cost.estimate_seconds`), and SmolLM2-135M is near the floor
# on both at this scale.
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
        config.data.limit = TRAIN_LIMIT[dataset]
        config.fl.clients_per_round = CLIENTS_PER_ROUND
        config.fl.backend = "loop"
        config.eval.every = 1  # iteration k = the global model after round k
        config.eval.max_new_tokens = EVAL_TOKENS[dataset]
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
        runs=(
            Run("spear", "SPEAR", _spear_run("spear")),
            Run("feedback_sft", "feedback-SFT", _spear_run("feedback_sft")),
            Run("grpo", "GRPO", _spear_run("grpo")),
            Run("sft", "gold-SFT FedAvg", _spear_run("sft")),
        ),
        rows=(
            Row("start", "starting model", "spear", 0),
            Row("sft", "gold-SFT FedAvg", "sft"),
            Row("feedback_sft", "feedback-SFT", "feedback_sft"),
            Row("grpo", "GRPO", "grpo"),
            Row("spear", "SPEAR", "spear"),
        ),
        datasets=("arithmetic", "gsm8k", "arc_challenge"),
        cpu_budget_h=3.9,
        notes=(
            "The starting model is round 0 of the SPEAR cell (same model, same "
            "evaluation set). The offline data has no ARC train split: arc_challenge "
            "trains on the first 75% of the ARC-Challenge test file and is evaluated on "
            "the disjoint last 25%."
        ),
    ),
    "tpaw": Table(
        name="tpaw",
        title="SPIN vs TPAW iterations on gsm8k",
        runs=(
            Run("spin", "SPIN", _selfplay_run("spin")),
            Run("tpaw", "TPAW", _selfplay_run("tpaw")),
        ),
        rows=(
            Row("sft", "SFT start", "spin", 0),
            *(Row(f"spin_{k}", f"SPIN iter {k}", "spin", k) for k in (1, 2, 3)),
            *(Row(f"tpaw_{k}", f"TPAW iter {k}", "tpaw", k) for k in (1, 2, 3)),
        ),
        datasets=("gsm8k",),
        cpu_budget_h=1.9,
        notes=(
            "Iteration k is the global model after federated round k; the SFT start "
            "is SmolLM2-135M-Instruct (round 0 of the SPIN cell)."
        ),
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
        notes=(
            "Claim tested: advantage weighting reaches the target about 40% faster "
            "than FedAvg. Pruned clients send nothing; bytes are adapter bytes."
        ),
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
        notes=(
            "'Raw text left a client' is measured: the server step of every cell is "
            "wrapped and every leaf that reached it is typed; a centralized cell pools "
            "the clients' text by construction."
        ),
    ),
    "robustness": ROBUSTNESS,
}
