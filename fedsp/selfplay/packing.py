"""Host-side packing of client traces into fixed-shape arrays, and the token-level
facts of a chat template that packing needs (end of turn, protected format tokens, the
gold completion of an SFT target).

Every function here runs on the host on token ids; `pack`'s output is what the jitted
local step reads (`fedsp.selfplay.base.PackedSequences`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from fedsp.core.advantage import ema_baseline
from fedsp.data.base import Example, Task
from fedsp.model import sampling
from fedsp.model.tokenizer import Tokenizer
from fedsp.selfplay.base import PackedSequences


@dataclasses.dataclass(frozen=True)
class Trace:
    """One training sequence of a client, host side (token ids, never text).

    Attributes:
      prompt: chat-formatted prompt ids.
      completion: completion ids (end-of-turn included when generated).
      weight: per-sequence weight (confidence, AWR weight or advantage).
      tail_only: for unlikelihood rows: restrict the loss mask to the tail tokens,
        without end-of-turn and protected tokens (`pack`).
    """

    prompt: Sequence[int] | np.ndarray
    completion: Sequence[int] | np.ndarray
    weight: float = 1.0
    tail_only: bool = False


def pack(
    traces: Sequence[Sequence[Trace]],
    max_len: int,
    pad_id: int,
    *,
    end_ids: Sequence[int] = (),
    protected_ids: Sequence[int] = (),
    tail_tokens: int = 0,
    min_rows: int = 1,
) -> PackedSequences:
    """Packs per-client traces into right-padded [C, S, T] arrays.

    S is the most traces of any client (at least ``min_rows``) rounded up to a power of
    two below 64 / a multiple of 64 (``sampling.bucket_length``), T the longest sequence
    rounded up the same way and capped at ``max_len``, so few shapes recur across rounds.
    A sequence longer than ``max_len`` keeps its completion (up to max_len − 1 tokens)
    and the end of its prompt, as the reference's ``_build_sft_batch``.

    Loss masks: 1 on completion tokens. For a ``tail_only`` trace (SPEAR's lose rows),
    in the reference's order: the completion tokens that are not end-of-turn
    (``end_ids``), then only the last ``tail_tokens`` of those (``ul_tail_tokens``;
    0 = all), then without the ``protected_ids`` (format tokens such as "Answer:").

    Args:
      traces: per client, its traces (a client may have none).
      max_len: the most tokens per sequence.
      pad_id: the id written in padding.
      end_ids: end-of-turn ids, removed before the tail is taken.
      protected_ids: ids removed from the tail.
      tail_tokens: ``tail_only`` masks keep the last this many tokens (0: all).
      min_rows: the smallest S.

    Returns:
      `PackedSequences` with leaves [C, S, T] / [C, S].
    """
    if not traces:
        raise ValueError("traces must hold one (possibly empty) list per client, got none")
    rows = sampling.bucket_length(max([len(t) for t in traces] + [min_rows, 1]))
    longest = max([len(tr.prompt) + len(tr.completion) for t in traces for tr in t] + [2])
    width = min(max_len, sampling.bucket_length(longest))
    c = len(traces)
    tokens = np.full((c, rows, width), pad_id, np.int32)
    attention = np.zeros((c, rows, width), bool)
    loss_mask = np.zeros((c, rows, width), np.float32)
    weight = np.zeros((c, rows), np.float32)
    valid = np.zeros((c, rows), bool)
    end = np.asarray(sorted({int(i) for i in end_ids}), np.int64)
    protected = np.asarray(sorted({int(i) for i in protected_ids}), np.int64)
    for ci, client in enumerate(traces):
        for si, trace in enumerate(client):
            if len(trace.completion) == 0:
                raise ValueError(f"client {ci} trace {si} has an empty completion")
            completion = list(trace.completion)[: max_len - 1]
            prompt = list(trace.prompt)[-(max_len - len(completion)) :]
            n_prompt, n = len(prompt), len(prompt) + len(completion)
            tokens[ci, si, :n] = prompt + completion
            attention[ci, si, :n] = True
            keep = np.ones(len(completion), bool)
            if trace.tail_only:
                ids = np.asarray(completion)
                keep = ~np.isin(ids, end)
                if tail_tokens > 0:
                    positions = np.flatnonzero(keep)
                    keep[:] = False
                    keep[positions[-tail_tokens:]] = True
                keep &= ~np.isin(ids, protected)
            loss_mask[ci, si, n_prompt:n] = keep
            weight[ci, si] = trace.weight
            valid[ci, si] = True
    return PackedSequences(
        tokens=jnp.asarray(tokens),
        attention_mask=jnp.asarray(attention),
        loss_mask=jnp.asarray(loss_mask),
        weight=jnp.asarray(weight),
        valid=jnp.asarray(valid),
    )


def protected_token_ids(tokenizer: Tokenizer, strings: Sequence[str]) -> tuple[int, ...]:
    """Every id in the tokenisations of ``strings``."""
    ids: set[int] = set()
    for s in strings:
        ids.update(tokenizer.encode(s))
    return tuple(sorted(ids))


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    """The id the chat template writes right after an assistant reply (ChatML:
    ``<|im_end|>``); the tokenizer's EOS if the template shows none."""
    marker = "\x00fedsp\x00"
    # One conversation in, one string out (`Tokenizer.apply_chat_template` has no overloads).
    text = cast(
        str,
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
            add_generation_prompt=False,
        ),
    )
    after = tokenizer.encode(text.split(marker, 1)[1]) if marker in text else []
    if after and after[0] in tokenizer.eos_token_ids:
        return int(after[0])
    return int(
        tokenizer.hf.eos_token_id
        if tokenizer.hf.eos_token_id is not None
        else tokenizer.eos_token_ids[0]
    )


def gold_completion(task: Task, example: Example) -> str:
    """The SFT target: ``example.gold_response``, else the gold answer written in the
    task's answer format (``\\boxed{}`` for MATH, ``Answer: <gold>`` otherwise)."""
    if example.gold_response:
        return example.gold_response
    if "boxed" in task.format_reminder:
        return f"The final answer is \\boxed{{{example.answer}}}."
    return f"Answer: {example.answer}"


def advantage_stats(
    rewards: Sequence[float] | np.ndarray, prev_baseline: float | None, decay: float
) -> tuple[float, float, float]:
    """(reference baseline b, mean advantage, new baseline) of one client's round.

    b is the previous EMA baseline, or this round's mean reward when there is none
    (`fedsp.core.advantage.ema_baseline` with prev=None), so a first round has mean
    advantage 0. The new baseline is `ema_baseline(prev, rewards, decay)`; a client
    without rewards keeps its baseline.
    """
    prev = prev_baseline if prev_baseline is not None and math.isfinite(prev_baseline) else None
    r = np.asarray(rewards, np.float32)
    if r.size == 0:
        b = prev if prev is not None else float("nan")
        return b, 0.0, b
    new = float(ema_baseline(prev, jnp.asarray(r), decay))
    b = float(prev) if prev is not None else float(r.mean())
    return b, float(np.mean(r - b)), new


def key_words(key: jax.Array) -> list[int]:
    """The key's raw uint32 words, to seed host-side numpy generators from it."""
    if jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(w) for w in np.asarray(key).ravel()]
