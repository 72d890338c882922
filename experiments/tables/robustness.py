"""The robustness table: Byzantine clients under mean, trimmed mean and Krum, and the
utility of DP-FedAvg with its ε (issue "Privacy and robustness in the server step",
item 6). Every choice below is restated in the table's notes (what its .md prints).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from experiments.tables.base import Row, Run, Table, cpu_config

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


ROBUSTNESS = Table(
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
)
