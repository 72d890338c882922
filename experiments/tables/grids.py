"""The table grids as data: which runs, rows, datasets and seeds each table has, and the
config of every cell.

A `Table` is a grid of `Run`s (trained methods) × datasets × seeds; each (run, dataset,
seed) is a `Cell`, one `fedsp.run` with its own config, and each `Row` is
read off a run's learning curve. `cells` builds a table's cells at a scale (``cpu``: the
`cpu_config` family; ``tiny``: `tiny_scale` on a `tiny_model`; ``full``:
`experiments.configs.tables_full`) and applies ``--set`` overrides; `cell_dirs` gives
each cell its run directory, one directory for cells that several tables share.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from experiments.configs import selfplay_reference, tables_full
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
_EVAL_TOKENS = {"arithmetic": 16, "gsm8k": 128, "arc_challenge": 32}
_MAX_LEN = {"arithmetic": 160, "gsm8k": 256, "arc_challenge": 320}
# Train examples loaded before partitioning (0 = the whole split).
_LIMIT = {"arithmetic": 400, "gsm8k": 800, "arc_challenge": 0}
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

# ----------------------------------------------------------------- robustness table
#
# Issue "Privacy and robustness in the server step", item 6. Every choice below is
# restated in the table's notes (what its .md prints).
#
# Clients: 20 on the Dirichlet(α = 1) split, 8 sampled per round. The attackers are a
# fixed ⌊fraction · 20⌋ of the clients (`fedsp.federated.faults.byzantine_clients`):
# 10% → 2 and 25% → 5, both exactly realised (8 clients would give ⌊0.8⌋ = 0 and 2, 10
# clients ⌊1⌋ = 1 and ⌊2.5⌋ = 2 = 20%). A round samples 8 of the 20 without replacement,
# so it meets 0.8 (10%) or 2.0 (25%) attackers on average, and more in some rounds (with
# 5 attackers, 3 or more in 30% of rounds): the table reports the counts the records name.
ROBUST_NUM_CLIENTS = 20
ROBUST_CLIENTS_PER_ROUND = 8
BYZANTINE_FRACTIONS = (0.0, 0.1, 0.25)
# Gold SFT, not SPEAR: every sampled client trains on its gold answers and uploads a
# real update every round, so the aggregators always see 8 updates, attackers among
# them. With SPEAR at this scale about two thirds of the sampled clients get no correct
# answer and send nothing (the aggregation table's FedAvg cells kept 0 to 3 of 4 updates
# a round, 1.4 on average), and an order statistic over one or two updates defends
# nothing. (The attack leaves a
# client's reported example count alone, so an attacker with nothing to train on is not
# kept either.) `--set algorithm.name=spear --set local.max_len=160` runs the grid with
# SPEAR (at the other tables' length: its revisions are longer than SFT's sequences).
_ROBUST_ALGORITHM = "sft"
# SFT's sequences on arithmetic are 56-60 tokens with SmolLM2's chat template (all 400
# training examples), packed to 64 whatever the cap (`fedsp.selfplay.packing.pack`):
# cpu_config's 160 (sized for SPEAR's revisions) would change nothing but the cost
# model's estimate.
_ROBUST_MAX_LEN = 64
# sign_flip × 10: an attacker uploads θ_r − 10·Δ_k, its honest change reversed and ten
# times as long. The server is FedAvg with learning rate 1, so a round's step is the
# example-weighted mean of the 8 changes: with a attackers of roughly honest-sized
# changes it is about (8 − a − 10a)/8 of an honest step, (7 − 10)/8 = −0.4 with one
# attacker, (6 − 20)/8 = −1.75 with two; over the rounds' expected 0.8 or 2 attackers,
# −0.1 and −1.75. A scale below 3 would only slow the mean down at 25% ((6 − 2s)/8 > 0),
# and below 9 at 10%.
BYZANTINE_ATTACK = "sign_flip"
BYZANTINE_SCALE = 10.0
# The defender does not know the attack: every cell uses the same defences, sized for
# the table's largest fraction, the expected 2 attackers of a round's 8. Trimmed mean
# β = 0.25 drops ⌊0.25 · 8⌋ = 2 values at each end per coordinate; Krum f = 2 (its
# guarantee needs n ≥ 2f + 3 = 7 kept updates; n = 8) scores each update by its
# n − f − 2 = 4 nearest neighbours. At 0% the rows measure what the defence costs.
ROBUST_TRIM_FRACTION = 0.25
ROBUST_KRUM_BYZANTINE = 2
_AGGREGATORS = (
    ("mean", "mean", "mean (FedAvg)"),
    ("trimmed", "trimmed_mean", f"trimmed mean (β = {ROBUST_TRIM_FRACTION:g})"),
    ("krum", "krum", f"Krum (f = {ROBUST_KRUM_BYZANTINE})"),
)
# DP-FedAvg (`fedsp.core.privacy`) on the clean mean run: z = 0 is that run (no
# clipping, no noise: the mean row at 0%); z = 0.5 and 1.0 clip every client's change to
# C, add N(0, (z·C)²) per coordinate to the sum of the 8 and divide by 8. C = 0.65 is the
# median round-1 client update norm of the clean run at CPU scale, rounded: measured with
# `running.update_norms(robustness_config("arithmetic", seed))` for seeds 0-2 on
# 2026-12-07 (24 clients: median 0.655, range 0.636-0.659). The norms hardly vary (two
# AdamW steps move every coordinate by about the learning rate, whatever the data), so
# clipping changes little and what the DP rows measure is the noise: it adds a vector of
# norm ≈ z·C·√d / 8 to the mean change, with d = 2.44 M adapter parameters (9.77 MB of
# float32), i.e. ≈ 63 (z = 0.5) and 127 (z = 1.0), against a mean change of norm ≤ C.
# δ = 1e-5 (fedsp's default; far below 1/20). ε is read off the cells' records
# (`dp/epsilon`: RDP, 8 of 20 sampled without replacement): after 6 rounds 27.6
# (z = 0.5) and 10.3 (z = 1.0).
DP_NOISE_MULTIPLIERS = (0.0, 0.5, 1.0)
DP_CLIP_NORM = 0.65
DP_DELTA = 1e-5
DP_GROUP = "DP-FedAvg"


def robustness_config(
    dataset: str,
    seed: int,
    *,
    aggregator: str = "mean",
    byzantine: float = 0.0,
    noise: float = 0.0,
) -> ml_collections.ConfigDict:
    """A robustness-table cell: `cpu_config`'s with gold SFT, 20 clients and 8 a round,
    the attack and both defences' parameters set in every cell (inert unless the cell's
    aggregator or fraction uses them), so cells differ only in ``fl.aggregator``,
    ``fl.byzantine.fraction`` and, for ``noise`` > 0, ``fl.dp.clip_norm`` and
    ``fl.dp.noise_multiplier``."""
    config = cpu_config(dataset, seed, _ROBUST_ALGORITHM, rounds=6)
    config.data.num_clients = ROBUST_NUM_CLIENTS
    config.fl.clients_per_round = ROBUST_CLIENTS_PER_ROUND
    config.local.max_len = _ROBUST_MAX_LEN
    config.fl.byzantine.attack = BYZANTINE_ATTACK
    config.fl.byzantine.scale = BYZANTINE_SCALE
    config.fl.trim_fraction = ROBUST_TRIM_FRACTION
    config.fl.krum_byzantine = ROBUST_KRUM_BYZANTINE
    config.fl.dp.delta = DP_DELTA
    config.fl.aggregator = aggregator
    config.fl.byzantine.fraction = byzantine
    if noise:
        config.fl.dp.clip_norm = DP_CLIP_NORM
        config.fl.dp.noise_multiplier = noise
    return config


def _robustness_run(**kwargs: Any) -> Callable[[str, int], ml_collections.ConfigDict]:
    return lambda dataset, seed: robustness_config(dataset, seed, **kwargs)


def _byzantine_key(short: str, fraction: float) -> str:
    return f"{short}_byz{round(100 * fraction)}"


def _dp_key(noise: float) -> str:
    return f"dp_z{noise:g}"


_ROBUSTNESS_RUNS = (
    *(
        Run(
            _byzantine_key(short, fraction),
            f"{label}, {fraction:.0%} Byzantine",
            _robustness_run(aggregator=name, byzantine=fraction),
        )
        for short, name, label in _AGGREGATORS
        for fraction in BYZANTINE_FRACTIONS
    ),
    *(
        Run(_dp_key(z), f"DP-FedAvg z = {z:g}", _robustness_run(noise=z))
        for z in DP_NOISE_MULTIPLIERS
        if z
    ),
)
_ROBUSTNESS_ROWS = (
    *(
        Row(
            _byzantine_key(short, fraction),
            f"{fraction:.0%}",
            _byzantine_key(short, fraction),
            group=label,
        )
        for short, _, label in _AGGREGATORS
        for fraction in BYZANTINE_FRACTIONS
    ),
    *(
        Row(
            _dp_key(z),
            f"z = {z:g}" + ("" if z else " (no DP: the mean row at 0%)"),
            _dp_key(z) if z else _byzantine_key("mean", 0.0),
            group=DP_GROUP,
        )
        for z in DP_NOISE_MULTIPLIERS
    ),
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
    "robustness": Table(
        name="robustness",
        title=(
            "Byzantine clients under mean, trimmed mean and Krum; DP-FedAvg utility "
            "(federated gold SFT, 20 clients, 8 a round)"
        ),
        runs=_ROBUSTNESS_RUNS,
        rows=_ROBUSTNESS_ROWS,
        datasets=("arithmetic",),
        cpu_budget_h=3.3,
        kind="robustness",
        target_run=_byzantine_key("mean", 0.0),
        notes=(
            f"Federated gold SFT (every sampled client uploads a real update every "
            f"round; with SPEAR at this scale most send nothing, see the aggregation "
            f"table) on {ROBUST_NUM_CLIENTS} Dirichlet(α = 1) clients, "
            f"{ROBUST_CLIENTS_PER_ROUND} sampled per round, 6 rounds, otherwise the "
            f"other tables' CPU cell (local.max_len 64: the SFT sequences are 56-60 "
            f"tokens). Byzantine clients: a fixed ⌊fraction · {ROBUST_NUM_CLIENTS}⌋ of "
            f"the clients, so 10% and 25% are exactly 2 and 5 attackers; a round meets "
            f"0.8 and 2.0 of them on average (the last column counts them from the "
            f"records). Attack: {BYZANTINE_ATTACK} × {BYZANTINE_SCALE:g} (an attacker "
            f"uploads θ_r − {BYZANTINE_SCALE:g}·Δ_k; with the FedAvg server at "
            f"learning rate 1 the mean's expected step is about −0.1 (10%) and −1.75 "
            f"(25%) of an honest step). Defences, the same in every column (the defender does "
            f"not know the fraction), sized for the expected 2 attackers of a round's "
            f"8: trimmed mean β = {ROBUST_TRIM_FRACTION:g} (2 values dropped at each "
            f"end per coordinate), Krum f = {ROBUST_KRUM_BYZANTINE} (best score over "
            f"the 4 nearest neighbours); the 0% rows are what a defence costs without "
            f"attackers. DP-FedAvg (0% Byzantine, mean): each client change clipped to "
            f"C = {DP_CLIP_NORM:g} (the median round-1 client update norm of the clean "
            f"run, measured with experiments.tables.running.update_norms on seeds "
            f"0-2: 0.636-0.659, so clipping changes little), N(0, (z·C)²) added to the "
            f"sum of the 8, which is divided by 8: noise of norm ≈ z·C·√d / 8 ≈ 63 "
            f"(z = 0.5) and 127 (z = 1) with d = 2.44 M adapter parameters, against a "
            f"mean change of norm ≤ C. δ = {DP_DELTA:g}; ε from the records' "
            f"dp/epsilon (RDP accountant, 8 of {ROBUST_NUM_CLIENTS} sampled without "
            f"replacement). z = 0 is the clean mean run itself (no clipping, clients "
            f"weighted by examples). The target is the other tables': round-0 "
            f"accuracy + 0.5 × (best − round-0) of the clean mean run. Produced by "
            f"`python -m experiments.tables --table robustness --workdir runs/tables` "
            f"(33 cells, none shared with another table)."
        ),
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

    hf = dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        rope_theta=1e5,
        tie_word_embeddings=True,
    )
    model = Transformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
    return save_pretrained(model, directory, tokenizer=Tokenizer.from_gguf(default_model_path()))


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Sets dotted fields (``fl.rounds``); an unknown field raises naming it."""
    for key, value in overrides.items():
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(f"--set {key}: config has no field {'.'.join(parts[: i + 1])!r}")
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


# --------------------------------------------------------------------------- cells

# Tables share cells: a cell whose config equals (up to `log`/`checkpoint`) a cell of a
# table earlier in this order runs once, in that table's directory, and both tables read
# it. The settings table's federated SPEAR cells are the aggregation table's FedAvg cells,
# and the spear table's SPEAR and gold-SFT cells on arithmetic are those two tables' cells;
# the robustness table's cells (20 clients) are its own.
SHARING_ORDER = ("aggregation", "settings", "spear", "tpaw", "robustness")

# Fields added after some cells ran that change how a cell is computed, not what it
# computes (the samples are the same up to float rounding), with the value that a saved
# config without them is taken to have.
_EXECUTION_FIELDS = {("rollout", "reuse_cache"): True}


def _comparable(config_json: dict[str, Any]) -> dict[str, Any]:
    """What makes two cells the same cell: the config without ``log``/``checkpoint`` and
    without `_EXECUTION_FIELDS` at their default. Cells equal under it share a run
    directory (`cell_dirs`), and a finished cell's saved config must equal its own under
    it (`experiments.tables.running.run_cell`)."""
    out = {k: v for k, v in config_json.items() if k not in ("log", "checkpoint")}
    for (section, field), default in _EXECUTION_FIELDS.items():
        part = out.get(section)
        if isinstance(part, dict) and part.get(field, default) == default:
            out[section] = {k: v for k, v in part.items() if k != field}
    return out


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


def cells(
    table: Table,
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    scale: str = "cpu",
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] = (),
    tiny_model_path: str = "",
) -> list[Cell]:
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
