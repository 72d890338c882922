"""The tables' CPU cost model: `estimate_seconds` gives the seconds a cell is expected to
take on 2 CPU cores from its config's token counts and a few throughputs, without running
anything. Summed over a table's own cells it is the table's stated budget
(`Table.cpu_budget_h`); the dry run prints it per cell.
"""

from __future__ import annotations

import ml_collections

# Inputs of the model, for the 2-core machine class the CPU tables run on, from
# BENCHMARKS.md: DECODE_TOKENS_S (generated tokens per second, prefill included) from the
# federated-round benchmark's SPEAR rollout (4 clients × 4 prompts × 16 new tokens, one
# revision), TRAIN_TOKENS_S from the LoRA train-step benchmark (4 × 256 tokens).
# FORWARD_TOKENS_S (a forward without gradients) is taken as 3 × TRAIN_TOKENS_S;
# STARTUP_S (model load, compiling the sampler, train step and evaluation) and
# ROUND_OVERHEAD_S are fixed costs per cell and per round. Each `Table.cpu_budget_h` is a
# sum of this model (tests/experiments/test_tables.py checks it): change both together.
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
        rollout_tokens = (
            c * p * config.rollout.max_new_tokens * (1 + 0.75 * config.algorithm.max_revisions)
        )
    rows = config.local.batch_size * (2 if algo in _PAIRWISE else 1)
    train_tokens = c * config.local.steps * rows * config.local.max_len
    forward_tokens = 0.0
    if algo == "tpaw":  # every pair scored once a round under each of N_max players
        forward_tokens = c * p * 3 * 2 * config.local.max_len * config.algorithm.n_max
    round_s = (
        rollout_tokens / DECODE_TOKENS_S
        + train_tokens / TRAIN_TOKENS_S
        + forward_tokens / FORWARD_TOKENS_S
        + ROUND_OVERHEAD_S
    )
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
