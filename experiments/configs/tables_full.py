"""Full-scale configs (paper models and sizes) for every run of `experiments/tables.py`,
for TPU/GPU users: ``full_config(table, run, dataset, seed)``.

``python -m experiments.tables --table NAME --scale full --dry-run`` lists them; the same
command without ``--dry-run`` runs them (point ``--set model.path=/path/to/weights`` at
the downloaded Hugging Face directory first: the configs name the hub model).

Where each setting comes from:
- spear, aggregation, settings: the SPEAR paper's reference settings
  (`experiments.configs.reference`, lee3296/SPEAR ``configs/*.yaml``) with Llama-3.2-3B,
  50 clients, Dirichlet α = 1. ARC-Challenge uses its own reference yaml. The SPEAR paper
  has no gsm8k or arithmetic run: those use the nearest reference setting, the
  generation-style MATH one (512 new tokens, tail 32, ρ = 4), with the task swapped.
- tpaw: TPAW's GSM8K setting from Qwen2.5-1.5B (`experiments.configs.selfplay_reference`),
  federated as the CPU table is: the 7,473 GSM8K train prompts over 8 Dirichlet(α = 1)
  clients, all playing every round, each generating y_gen for every prompt it holds; the
  SPIN recipe of 3 epochs over a round's pairs at global batch 64 gives ``local.steps``.
- aggregation: the client weighting (``fl.client_weighting`` "examples" = FedAvg or
  "advantage") and pruning (``fl.prune_threshold`` 0.0: a client whose reward fell below
  its running baseline sends nothing) on top of the SPEAR setting, evaluated every
  round so rounds-to-target is measured to the round.
- settings: centralized = `reference.centralized_config` (one client holding the pooled
  data of all 50); federated SFT and SPEAR = `reference.spear_config` with "sft" / "spear".
- robustness: federated gold SFT in the SPEAR setting (50 clients), with
  ``ROBUSTNESS_CLIENTS_PER_ROUND`` = 10 sampled per round (the reference's 3-5 leave an
  order statistic almost nothing to order; 10 lets trimmed mean β = 0.25 drop 2 at each
  end and Krum f = 2 meet n ≥ 2f + 3), evaluated every round; the aggregator, attack,
  defences and DP fields are the CPU cell's (`experiments.tables.robustness`). 10% and 25%
  of 50 are 5 and 12 (24%) attackers, 1.0 and 2.4 a round on average. The DP clip norm
  is the one measured at CPU scale: measure the full model's round-1 update norms
  (`experiments.tables.running.update_norms`) and pass ``--set fl.dp.clip_norm=...``.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import reference, selfplay_reference

SPEAR_MODEL = "llama3p2_3b"  # the SPEAR paper's larger model
TPAW_MODEL = "qwen2p5_1p5b"  # TPAW's GSM8K model
# dataset -> (reference setting, train split, eval split)
_SPEAR_SETTING = {
    "arc_challenge": ("arc_challenge", "train", "test"),
    "gsm8k": ("math", "train", "test"),
    "arithmetic": ("math", "train", "test"),
}
TPAW_CLIENTS = 8
ROBUSTNESS_CLIENTS_PER_ROUND = 10
# The CPU cell's server-step fields that the full-scale robustness cells copy.
_ROBUSTNESS_FIELDS = ("aggregator", "trim_fraction", "krum_byzantine", "byzantine", "dp")


def _spear(dataset: str, algorithm: str, seed: int) -> ml_collections.ConfigDict:
    if dataset not in _SPEAR_SETTING:
        raise ValueError(
            f"dataset={dataset!r}: no full-scale setting; choose one of {tuple(_SPEAR_SETTING)}"
        )
    setting, train_split, eval_split = _SPEAR_SETTING[dataset]
    config = reference.spear_config(setting, SPEAR_MODEL, algorithm=algorithm)
    config.task.name = dataset
    config.task.train_split, config.task.eval_split = train_split, eval_split
    config.seed = seed
    return config


def _tpaw(algorithm: str, seed: int) -> ml_collections.ConfigDict:
    config = selfplay_reference.selfplay_config(algorithm, "gsm8k", TPAW_MODEL)
    prompts = selfplay_reference.GSM8K_TRAIN // TPAW_CLIENTS
    config.data.num_clients = TPAW_CLIENTS
    config.data.partition = "dirichlet"
    config.data.alpha = 1.0
    config.fl.clients_per_round = TPAW_CLIENTS
    config.rollout.prompts_per_client = prompts
    opponent_rounds = selfplay_reference.OPPONENT_ROUNDS[algorithm]
    config.local.steps = (
        selfplay_reference.SPIN_EPOCHS * prompts * opponent_rounds // selfplay_reference.SPIN_BATCH
    )
    config.seed = seed
    return config


def full_config(table: str, run: str, dataset: str, seed: int) -> ml_collections.ConfigDict:
    """The full-scale config of ``run`` in ``table`` on ``dataset`` (run names as in
    `experiments.tables.TABLES`)."""
    if table == "spear":
        return _spear(dataset, run, seed)
    if table == "tpaw":
        return _tpaw(run, seed)
    if table == "aggregation":
        weighting, _, prune = run.partition("_")
        config = _spear(dataset, "spear", seed)
        config.fl.client_weighting = "examples" if weighting == "fedavg" else "advantage"
        config.fl.prune_threshold = 0.0 if prune == "prune" else None
        config.eval.every = 1
        return config
    if table == "settings":
        if run == "centralized":
            setting = _SPEAR_SETTING[dataset][0]
            config = reference.centralized_config(setting, SPEAR_MODEL)
            config.task.name = dataset
            config.task.train_split, config.task.eval_split = _SPEAR_SETTING[dataset][1:]
            config.seed = seed
            return config
        return _spear(dataset, {"fed_sft": "sft", "fed_selfplay": "spear"}[run], seed)
    if table == "robustness":
        from experiments.tables.robustness import ROBUSTNESS  # the tables import this module

        runs = {r.key: r for r in ROBUSTNESS.runs}
        if run not in runs:
            raise ValueError(f"run={run!r}: the robustness table has runs {tuple(runs)}")
        cpu = runs[run].build(dataset, seed)
        config = _spear(dataset, cpu.algorithm.name, seed)
        config.fl.clients_per_round = ROBUSTNESS_CLIENTS_PER_ROUND
        for field in _ROBUSTNESS_FIELDS:
            config.fl[field] = cpu.fl[field]
        config.eval.every = 1
        return config
    raise ValueError(f"table={table!r}: no full-scale configs")
