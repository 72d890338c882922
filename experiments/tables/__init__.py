"""The paper-style tables (issue 6): grids of federated runs, run as resumable cells and
rendered as markdown, JSON and plots; ``python -m experiments.tables --table NAME``.

Each table is a grid of *runs* (one `fedsp.run` per run × dataset × seed,
a "cell") and *rows* read off the runs' learning curves:

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
- ``robustness``: final accuracy and rounds to the target with 0 / 10 / 25% Byzantine
  clients (sign_flip × 10) under the mean, trimmed mean (β = 0.25) and Krum (f = 2),
  and DP-FedAvg's utility for noise multipliers z = 0, 0.5, 1.0 with the ε each spent;
  federated gold SFT on arithmetic with 20 clients, 8 a round, so that 10% and 25% are
  2 and 5 attackers (the design and its reasons: `robustness`).

CPU scale (the default): SmolLM2-135M-Instruct with LoRA, 8 clients on a Dirichlet(α = 1)
split, 4 clients per round (robustness: 20 and 8), seeds 0, 1, 2. Each table states its CPU budget
(`Table.cpu_budget_h`, the sum of `estimate_seconds` over the cells it runs in its own
directory, so that the budgets add up; tables share identical cells, see
`SHARING_ORDER`), and its results file records the measured wall time beside it; the
committed tables' measured times are in README.md.

Data: every cell runs offline (``$FEDSP_DATA_DIR``). The offline ARC-Challenge folder
holds only the test file, so arc_challenge cells train on its first 75% (``test[:75%]``,
879 questions) and are evaluated on the disjoint last 25% (``test[75%:]``, 293); the
full-scale configs use the hub's train and test splits, as the paper does.

Modules: `base` (the grid's data types and the shared CPU cell), `grids` (the paper
tables), `robustness` (the robustness and DP table), `expand` (a table's cells at a
scale and their run directories), `cost` (the CPU cost model), `running` (validating, running and auditing cells, reading what they wrote),
`render` (the numbers, markdown, plots and JSON), `cli` (the command line and its
options). This package re-exports their public names.
"""

from __future__ import annotations

from experiments.tables.base import (
    CLIENTS_PER_ROUND,
    DEFAULT_SEEDS,
    DIRICHLET_ALPHA,
    EVAL_TOKENS,
    NUM_CLIENTS,
    SCALES,
    TRAIN_LIMIT,
    Cell,
    Row,
    Run,
    Table,
    cpu_config,
)
from experiments.tables.cli import RESULTS, main
from experiments.tables.cost import (
    DECODE_TOKENS_S,
    FORWARD_TOKENS_S,
    ROUND_OVERHEAD_S,
    STARTUP_S,
    TRAIN_TOKENS_S,
    estimate_seconds,
)
from experiments.tables.expand import (
    SHARING_ORDER,
    apply_overrides,
    cell_dirs,
    cells,
    comparable,
    parse_set,
    tiny_model,
    tiny_scale,
)
from experiments.tables.grids import TABLES
from experiments.tables.render import (
    accuracy_at,
    attackers_per_round,
    bytes_until,
    byzantine_count,
    collect,
    final_epsilon,
    jsonable,
    mean_std,
    plot_curves,
    raw_text_left_client,
    render_markdown,
    rounds_to_target,
)
from experiments.tables.robustness import (
    BYZANTINE_ATTACK,
    BYZANTINE_FRACTIONS,
    BYZANTINE_SCALE,
    DP_CLIP_NORM,
    DP_DELTA,
    DP_GROUP,
    DP_NOISE_MULTIPLIERS,
    ROBUST_CLIENTS_PER_ROUND,
    ROBUST_KRUM_BYZANTINE,
    ROBUST_NUM_CLIENTS,
    ROBUST_TRIM_FRACTION,
    robustness_config,
)
from experiments.tables.running import (
    COMMITS_FILE,
    ServerAudit,
    cell_commits,
    git_commit,
    read_curves,
    run_cell,
    update_norms,
    validation_problems,
)

__all__ = [
    "BYZANTINE_ATTACK",
    "BYZANTINE_FRACTIONS",
    "BYZANTINE_SCALE",
    "CLIENTS_PER_ROUND",
    "COMMITS_FILE",
    "DECODE_TOKENS_S",
    "DEFAULT_SEEDS",
    "DIRICHLET_ALPHA",
    "DP_CLIP_NORM",
    "DP_DELTA",
    "DP_GROUP",
    "DP_NOISE_MULTIPLIERS",
    "EVAL_TOKENS",
    "FORWARD_TOKENS_S",
    "NUM_CLIENTS",
    "RESULTS",
    "ROBUST_CLIENTS_PER_ROUND",
    "ROBUST_KRUM_BYZANTINE",
    "ROBUST_NUM_CLIENTS",
    "ROBUST_TRIM_FRACTION",
    "ROUND_OVERHEAD_S",
    "SCALES",
    "SHARING_ORDER",
    "STARTUP_S",
    "TABLES",
    "TRAIN_LIMIT",
    "TRAIN_TOKENS_S",
    "Cell",
    "Row",
    "Run",
    "ServerAudit",
    "Table",
    "accuracy_at",
    "apply_overrides",
    "attackers_per_round",
    "bytes_until",
    "byzantine_count",
    "cell_commits",
    "cell_dirs",
    "cells",
    "collect",
    "comparable",
    "cpu_config",
    "estimate_seconds",
    "final_epsilon",
    "git_commit",
    "jsonable",
    "main",
    "mean_std",
    "parse_set",
    "plot_curves",
    "raw_text_left_client",
    "read_curves",
    "render_markdown",
    "robustness_config",
    "rounds_to_target",
    "run_cell",
    "tiny_model",
    "tiny_scale",
    "update_norms",
    "validation_problems",
]
