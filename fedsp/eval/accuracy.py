"""Evaluation of a (base + adapters) policy: generation accuracy and multiple-choice
log-likelihood accuracy.

Both run on a split model, ``(graphdef, states)`` with ``states = (lora_state,
base_state)`` as `fedsp.model.lora.split_lora` returns them, so one compiled program
serves every round's adapters:

- `generation_accuracy`: greedy decoding of the chat-formatted prompt, batched through
  `fedsp.model.sampling.generate`; a reply counts when ``task.is_correct`` accepts it.
  The last batch is padded with copies of its first prompt, so every call in a run uses
  the same batch shape (no recompile).
- `loglik_accuracy`: lm-evaluation-harness style scoring of multiple-choice items: for
  ``(context, continuations, gold) = task.choices(example)`` the prediction is
  argmax_i Σ_t log π(c_i,t | context, c_i,<t) ("acc"); "acc_norm" divides each sum by
  the continuation's length in characters (Gao et al. 2021, the harness's acc_norm).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp import progress
from fedsp.core.logprobs import token_logprobs
from fedsp.data.base import Example, Task
from fedsp.distributed import to_host
from fedsp.model.sampling import SampleOutput, bucket_length, generate
from fedsp.model.sharding import shard_rows
from fedsp.model.tokenizer import Tokenizer

__all__ = ["EVAL_MODES", "evaluate", "generation_accuracy", "loglik_accuracy"]

EVAL_MODES = ("loglik", "generate")


def _batches(items: Sequence, batch_size: int) -> list[tuple[list, int]]:
    """Chunks of exactly ``batch_size`` items (the last padded with its first item) and
    the number of real items in each."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        real = len(chunk)
        out.append((chunk + [chunk[0]] * (batch_size - real), real))
    return out


def generation_accuracy(
    graphdef: nnx.GraphDef,
    states: Sequence[nnx.State],
    tokenizer: Tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, float]:
    """Greedy-decoding accuracy of the policy on ``examples``.

    Args:
      graphdef, states: the split model (``states`` merged in order by ``nnx.merge``).
      tokenizer: formats prompts with its chat template and decodes replies.
      task: prompts (`Task.messages`) and judges (`Task.is_correct`) the replies.
      examples: the fixed evaluation set (N items).
      max_new_tokens: the most tokens decoded per reply.
      batch_size: rows per `generate` call.

    Returns:
      ``{"accuracy": correct / N, "correct": ..., "total": N, "mean_reply_tokens": ...}``.

    Raises:
      ValueError: ``examples`` is empty.
    """
    if not examples:
        raise ValueError("examples is empty: nothing to evaluate")
    correct, tokens, done = 0, 0, 0
    for chunk, real in _batches(list(examples), batch_size):
        prompts = tokenizer.apply_chat_template([task.messages(ex) for ex in chunk])
        ids, mask = tokenizer.encode_batch(prompts)
        # Without return_cache `generate` returns the SampleOutput alone (it has no overloads).
        out = cast(
            SampleOutput,
            generate(
                graphdef,
                tuple(states),
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                eos_ids=tokenizer.eos_token_ids,
                pad_id=tokenizer.pad_token_id,
            ),
        )
        out_tokens, lengths = to_host((out.tokens, out.lengths))
        lengths = lengths[:real]
        texts = tokenizer.batch_decode(out_tokens[:real])
        correct += sum(task.is_correct(text, ex) for text, ex in zip(texts, chunk[:real]))
        tokens += int(lengths.sum())
        done += real
        progress.report("evaluation problems", done, len(examples))
    total = len(examples)
    return {
        "accuracy": correct / total,
        "correct": float(correct),
        "total": float(total),
        "mean_reply_tokens": tokens / total,
    }


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _continuation_logprobs(graphdef, states, ids, attention_mask, target_mask):
    """Σ_t log π(ids[:, t+1] | ids[:, ≤t]) over positions where target_mask[:, t+1] = 1.

    ids, attention_mask, target_mask: [B, T] (right-padded). Returns [B] float32.
    """
    model = nnx.merge(graphdef, *states)
    ids, attention_mask, target_mask = (shard_rows(x) for x in (ids, attention_mask, target_mask))
    logits = model(ids, attention_mask)
    logps = token_logprobs(logits[:, :-1], ids[:, 1:])
    return jnp.sum(jnp.where(target_mask[:, 1:] > 0, logps, 0.0), axis=-1)


def loglik_accuracy(
    graphdef: nnx.GraphDef,
    states: Sequence[nnx.State],
    tokenizer: Tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int,
    bucket_multiple: int = 64,
) -> dict[str, float]:
    """Multiple-choice accuracy by the log-likelihood of each option (no generation).

    Every (item, option) pair is one row ``context ‖ continuation`` (tokenized
    separately and concatenated, as the harness does), right-padded to a length bucket;
    only continuation tokens are scored.

    Args:
      graphdef, states: the split model.
      tokenizer: tokenizes contexts and continuations (no chat template: the harness
        scores raw text).
      task: a multiple-choice task (`Task.choices`).
      examples: N items.
      batch_size: rows per forward pass.
      bucket_multiple: granularity of the padded row length (fewer compiled shapes).

    Returns:
      ``{"accuracy": acc, "acc_norm": ..., "correct": ..., "total": N}``.

    Raises:
      ValueError: ``examples`` is empty.
      NotImplementedError: ``task`` is not multiple choice.
    """
    if not examples:
        raise ValueError("examples is empty: nothing to evaluate")
    rows: list[tuple[list[int], int]] = []  # (ids, index where the continuation starts)
    owners, char_lengths, golds = [], [], []
    for item, example in enumerate(examples):
        context, continuations, gold = task.choices(example)
        context_ids = tokenizer.encode(context)
        golds.append(gold)
        for continuation in continuations:
            rows.append((context_ids + tokenizer.encode(continuation), len(context_ids)))
            owners.append(item)
            char_lengths.append(max(len(continuation), 1))
    width = bucket_length(max(len(ids) for ids, _ in rows), bucket_multiple)
    scores = []
    for chunk, real in _batches(rows, batch_size):
        ids = np.full((len(chunk), width), tokenizer.pad_token_id, np.int32)
        attention = np.zeros((len(chunk), width), np.int32)
        target = np.zeros((len(chunk), width), np.int32)
        for r, (row_ids, start) in enumerate(chunk):
            row_ids = row_ids[-width:]
            ids[r, : len(row_ids)] = row_ids
            attention[r, : len(row_ids)] = 1
            target[r, start : len(row_ids)] = 1
        scores.append(
            to_host(_continuation_logprobs(graphdef, tuple(states), ids, attention, target))[:real]
        )
    flat = np.concatenate(scores)
    owners_arr, lengths = np.asarray(owners), np.asarray(char_lengths, np.float64)
    correct = correct_norm = 0
    for item, gold in enumerate(golds):
        rows_of = np.flatnonzero(owners_arr == item)
        correct += int(np.argmax(flat[rows_of]) == gold)
        correct_norm += int(np.argmax(flat[rows_of] / lengths[rows_of]) == gold)
    total = len(examples)
    return {
        "accuracy": correct / total,
        "acc_norm": correct_norm / total,
        "correct": float(correct),
        "total": float(total),
    }


def evaluate(
    graphdef: nnx.GraphDef,
    states: Sequence[nnx.State],
    tokenizer: Tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    multiple_choice: str = "loglik",
    max_new_tokens: int = 64,
    batch_size: int = 32,
) -> dict[str, float]:
    """`loglik_accuracy` for multiple-choice items when ``multiple_choice == "loglik"``,
    else `generation_accuracy`.

    Raises:
      ValueError: ``multiple_choice`` is not one of `EVAL_MODES`, or ``examples`` is empty.
    """
    if multiple_choice not in EVAL_MODES:
        raise ValueError(f"multiple_choice must be one of {EVAL_MODES}, got {multiple_choice!r}")
    if multiple_choice == "loglik" and examples and examples[0].choices:
        return loglik_accuracy(graphdef, states, tokenizer, task, examples, batch_size=batch_size)
    return generation_accuracy(
        graphdef,
        states,
        tokenizer,
        task,
        examples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
