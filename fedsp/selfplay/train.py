"""Shared pieces of the client algorithms: hyper-parameters, trace packing, the
per-round learning rate, minibatch sampling, token log-probs and the local AdamW loop.

Everything after packing is pure and jit/vmap-safe: ``local_train`` functions are
mapped over clients by ``fedsp.federated.mapping.map_clients``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedsp.core.advantage import ema_baseline
from fedsp.core.logprobs import token_logprobs
from fedsp.data.base import Example, Task
from fedsp.model import sampling
from fedsp.model.tokenizer import Tokenizer
from fedsp.selfplay.base import ClientBatch, Sequences, config_value
from fedsp.selfplay.rollout import SamplingParams

# The SPEAR reference never lets unlikelihood touch the answer marker: every completion,
# right or wrong, must write it (spear.py, `_ul_format_protect_ids`).
DEFAULT_PROTECTED_STRINGS = (
    "Answer:", " Answer:", "Answer: ", " Answer: ", "Answer", " Answer",
    "answer:", " answer:", "answer", " answer",
)
# Vocabulary projection is the largest activation ([B, T, V] float32); it is computed
# (and rematerialised in the backward pass) this many positions at a time.
_LOGITS_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class HParams:
    """Client-algorithm hyper-parameters (hashable: a static argument of the jitted step).

    Defaults are the SPEAR reference's (``configs/*_spear.yaml`` and ``config.py`` of
    lee3296/SPEAR): lambda_lose 0.1, margin 0.3, ρ 2, 2 revisions, 5 local steps of
    batch 16, lr 5e-5 → 1e-5 with 10% warmup over rounds, AdamW without weight decay,
    gradient norm clipped at 1, GRPO G = 4, ε = 0.2, β = 0.02.
    """

    max_revisions: int = 2
    lambda_win: float = 1.0
    lambda_lose: float = 0.1
    margin: float = 0.3
    tail_tokens: int = 0
    rho: float = 2.0
    group_size: int = 4
    clip_eps: float = 0.2
    kl_coef: float = 0.02
    awr_temperature: float = 0.0
    awr_max_weight: float = 20.0
    baseline_decay: float = 0.9
    reward: str = "verdict"
    protected_strings: tuple[str, ...] = DEFAULT_PROTECTED_STRINGS
    steps: int = 5
    batch_size: int = 16
    lr: float = 5e-5
    lr_min: float = 1e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 512
    rounds: int = 100

    def __post_init__(self):
        checks = {
            "algorithm.max_revisions": self.max_revisions >= 0,
            "algorithm.margin": 0.0 <= self.margin < 1.0,
            "algorithm.tail_tokens": self.tail_tokens >= 0,
            "algorithm.rho": self.rho >= 0,
            "algorithm.group_size": self.group_size >= 1,
            "algorithm.awr_temperature": self.awr_temperature >= 0,
            "algorithm.awr_max_weight": self.awr_max_weight > 0,
            "algorithm.baseline_decay": 0.0 <= self.baseline_decay <= 1.0,
            "local.steps": self.steps >= 1,
            "local.batch_size": self.batch_size >= 1,
            "local.lr": self.lr > 0,
            "local.lr_min": 0 <= self.lr_min,
            "local.warmup_ratio": 0.0 <= self.warmup_ratio <= 1.0,
            "local.max_len": self.max_len >= 2,
            "fl.rounds": self.rounds >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid config field(s) {bad}: {self}")
        if self.reward not in ("verdict", "score"):
            raise ValueError(f"algorithm.reward must be 'verdict' or 'score', got {self.reward!r}")

    def static(self) -> HParams:
        """These hyper-parameters with the host-only fields (LR schedule, rollout-side
        settings) reset: the jitted local step is keyed on what it reads, so runs that
        differ only in those fields share one executable (the round's LR is traced)."""
        d = HParams()
        return dataclasses.replace(
            self, max_revisions=d.max_revisions, rho=d.rho, group_size=d.group_size,
            awr_temperature=d.awr_temperature, awr_max_weight=d.awr_max_weight,
            baseline_decay=d.baseline_decay, reward=d.reward, protected_strings=(),
            tail_tokens=d.tail_tokens, lr=d.lr, lr_min=d.lr_min, warmup_ratio=d.warmup_ratio,
            max_len=d.max_len, rounds=d.rounds,
        )

    @classmethod
    def from_config(cls, config: Any) -> HParams:
        """Reads ``config.algorithm.*``, ``config.local.*`` and ``config.fl.rounds``."""
        d = cls()
        a = lambda f: config_value(config, "algorithm", f, getattr(d, f))  # noqa: E731
        loc = lambda f: config_value(config, "local", f, getattr(d, f))  # noqa: E731
        return cls(
            max_revisions=int(a("max_revisions")),
            lambda_win=float(a("lambda_win")),
            lambda_lose=float(a("lambda_lose")),
            margin=float(a("margin")),
            tail_tokens=int(a("tail_tokens")),
            rho=float(a("rho")),
            group_size=int(a("group_size")),
            clip_eps=float(a("clip_eps")),
            kl_coef=float(a("kl_coef")),
            awr_temperature=float(a("awr_temperature")),
            awr_max_weight=float(a("awr_max_weight")),
            baseline_decay=float(a("baseline_decay")),
            reward=str(a("reward")),
            protected_strings=tuple(a("protected_strings")),
            steps=int(loc("steps")),
            batch_size=int(loc("batch_size")),
            lr=float(loc("lr")),
            lr_min=float(loc("lr_min")),
            warmup_ratio=float(loc("warmup_ratio")),
            weight_decay=float(loc("weight_decay")),
            max_grad_norm=float(loc("max_grad_norm")),
            max_len=int(loc("max_len")),
            rounds=int(config_value(config, "fl", "rounds", d.rounds)),
        )


def sampling_params(config: Any) -> SamplingParams:
    """``config.rollout.*`` as `SamplingParams` (reference defaults where absent)."""
    d = SamplingParams()
    return SamplingParams(
        max_new_tokens=int(config_value(config, "rollout", "max_new_tokens", d.max_new_tokens)),
        temperature=float(config_value(config, "rollout", "temperature", d.temperature)),
        top_p=float(config_value(config, "rollout", "top_p", d.top_p)),
        batch_size=int(config_value(config, "rollout", "batch_size", d.batch_size)),
        reuse_cache=bool(config_value(config, "rollout", "reuse_cache", d.reuse_cache)),
    )


def round_lr_schedule(
    rounds: int, peak: float, minimum: float, warmup_ratio: float
) -> optax.Schedule:
    """The SPEAR reference's per-round LR (``_cosine_lr``) as an optax schedule of the round.

    With W = int(warmup_ratio · R): lr(r) = peak · r / W for r ≤ W, then
    minimum + (peak − minimum) · ½(1 + cos(π (r − W) / (R − W))). Rounds are 1-based as in
    the reference (round 0 would get lr 0); the LR is constant within a round.
    """
    warmup = int(warmup_ratio * rounds)
    cosine = optax.cosine_decay_schedule(
        peak, max(1, rounds - warmup), alpha=minimum / peak if peak else 0.0
    )
    if warmup == 0:
        return cosine
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), cosine], [warmup])


def round_lr(hp: HParams, round: int) -> float:
    """`round_lr_schedule` of ``hp`` at ``round``."""
    return float(round_lr_schedule(hp.rounds, hp.lr, hp.lr_min, hp.warmup_ratio)(round))


# ---------------------------------------------------------------------------- packing


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

    prompt: Sequence[int]
    completion: Sequence[int]
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
) -> Sequences:
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
      `Sequences` with leaves [C, S, T] / [C, S].
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
    end = np.asarray(sorted(set(int(i) for i in end_ids)), np.int64)
    protected = np.asarray(sorted(set(int(i) for i in protected_ids)), np.int64)
    for ci, client in enumerate(traces):
        for si, trace in enumerate(client):
            if len(trace.completion) == 0:
                raise ValueError(f"client {ci} trace {si} has an empty completion")
            completion = list(trace.completion)[: max_len - 1]
            prompt = list(trace.prompt)[-(max_len - len(completion)):]
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
    return Sequences(
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
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
        add_generation_prompt=False,
    )
    after = tokenizer.encode(text.split(marker, 1)[1]) if marker in text else []
    if after and after[0] in tokenizer.eos_token_ids:
        return int(after[0])
    return int(tokenizer.hf.eos_token_id if tokenizer.hf.eos_token_id is not None
               else tokenizer.eos_token_ids[0])


def gold_completion(task: Task, example: Example) -> str:
    """The SFT target: ``example.gold_response``, else the gold answer written in the
    task's answer format (``\\boxed{}`` for MATH, ``Answer: <gold>`` otherwise)."""
    if example.gold_response:
        return example.gold_response
    if "boxed" in task.format_reminder:
        return f"The final answer is \\boxed{{{example.answer}}}."
    return f"Answer: {example.answer}"


def empty_sequences(num_clients: int) -> Sequences:
    """An all-invalid [C, 1, 8] placeholder (algorithms without lose traces)."""
    return Sequences(
        tokens=jnp.zeros((num_clients, 1, 8), jnp.int32),
        attention_mask=jnp.zeros((num_clients, 1, 8), bool),
        loss_mask=jnp.zeros((num_clients, 1, 8), jnp.float32),
        weight=jnp.zeros((num_clients, 1), jnp.float32),
        valid=jnp.zeros((num_clients, 1), bool),
    )


def advantage_stats(
    rewards: Sequence[float], prev_baseline: float | None, decay: float
) -> tuple[float, float, float]:
    """(reference baseline b, mean advantage, new baseline) of one client's round.

    b is the previous EMA baseline, or this round's mean reward when there is none
    (`fedsp.core.advantage.ema_baseline` with prev=None), so a first round has mean
    advantage 0. The new baseline is `ema_baseline(prev, rewards, decay)`; a client
    without rewards keeps its baseline.
    """
    has_prev = prev_baseline is not None and math.isfinite(prev_baseline)
    r = np.asarray(rewards, np.float32)
    if r.size == 0:
        b = prev_baseline if has_prev else float("nan")
        return b, 0.0, b
    new = float(ema_baseline(prev_baseline if has_prev else None, jnp.asarray(r), decay))
    b = float(prev_baseline) if has_prev else float(r.mean())
    return b, float(np.mean(r - b)), new


# ---------------------------------------------------------------------------- training


def sample_rows(key: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """[k] indices of valid rows: without replacement when there are at least k valid
    rows, else with replacement (the reference's ``_sample``). With no valid row the
    indices point at invalid rows; callers mask by ``valid[idx]``."""
    (s,) = valid.shape
    k_perm, k_repl = jax.random.split(key)
    order = jnp.argsort(jnp.where(valid, jax.random.uniform(k_perm, (s,)), 2.0))
    if s < k:
        order = jnp.concatenate([order, jnp.zeros((k - s,), order.dtype)])
    n = jnp.sum(valid)
    valid_first = jnp.argsort(~valid, stable=True)
    repl = valid_first[jax.random.randint(k_repl, (k,), 0, jnp.maximum(n, 1))]
    return jnp.where(n >= k, order[:k], repl)


def gather_rows(seqs: Sequences, idx: jax.Array) -> Sequences:
    """Rows ``idx`` of one client's sequences, with invalid rows' masks zeroed."""
    rows = jax.tree.map(lambda x: x[idx], seqs)
    keep = rows.valid.astype(jnp.float32)
    return dataclasses.replace(rows, loss_mask=rows.loss_mask * keep[:, None],
                               weight=rows.weight * keep)


def sequence_token_logps(
    graphdef: nnx.GraphDef,
    lora_state: nnx.State,
    base_state: nnx.State,
    tokens: jax.Array,
    attention_mask: jax.Array,
) -> jax.Array:
    """[B, T] log π(tokens[:, t] | tokens[:, :t]); column 0 (no prefix) is 0.

    The vocabulary projection runs ``_LOGITS_CHUNK`` positions at a time under
    ``jax.checkpoint``, so neither pass holds the full [B, T, V] logits.
    """
    model = nnx.merge(graphdef, lora_state, base_state)
    hidden = model.hidden_states(tokens, attention_mask)[:, :-1]
    targets = tokens[:, 1:]

    @jax.checkpoint
    def chunk_logps(h, t):
        return token_logprobs(model.logits(h), t)

    t_len = targets.shape[1]
    parts = [
        chunk_logps(hidden[:, i:i + _LOGITS_CHUNK], targets[:, i:i + _LOGITS_CHUNK])
        for i in range(0, t_len, _LOGITS_CHUNK)
    ]
    return jnp.pad(jnp.concatenate(parts, axis=1), ((0, 0), (1, 0)))


LossFn = Callable[[nnx.State, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def fit(
    loss_fn: LossFn,
    lora_state: nnx.State,
    key: jax.Array,
    lr: jax.Array,
    hp: HParams,
) -> tuple[nnx.State, dict[str, jax.Array]]:
    """``hp.steps`` AdamW steps on ``loss_fn(lora, step_key)``; returns (adapters, mean metrics).

    AdamW as torch's (b = 0.9/0.999, eps 1e-8, decoupled weight decay) after global-norm
    clipping at ``hp.max_grad_norm`` (≤ 0: none); a step whose gradient is not finite
    is skipped, as the reference does (``optax.apply_if_finite``).
    """
    parts = [optax.clip_by_global_norm(hp.max_grad_norm)] if hp.max_grad_norm > 0 else []
    parts.append(optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=hp.weight_decay))
    tx = optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=hp.steps + 1)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(carry, step_key):
        lora, opt_state = carry
        (_, metrics), grads = grad_fn(lora, step_key)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return (optax.apply_updates(lora, updates), opt_state), metrics

    (lora_state, _), metrics = jax.lax.scan(
        step, (lora_state, tx.init(lora_state)), jax.random.split(key, hp.steps)
    )
    return lora_state, jax.tree.map(jnp.mean, metrics)


def keep_if(pred: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``pred`` else ``old`` leaf by leaf (exactly ``old``: a select)."""
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def client_stats(
    batch_c: ClientBatch, metrics: dict[str, jax.Array], trained: jax.Array
) -> dict[str, jax.Array]:
    """The stats every algorithm returns for one client: its loss metrics (means over
    local steps, 0 when it did not train) and the batch's per-client scalars;
    ``num_examples`` is 0 for a client that did not train."""
    metrics = jax.tree.map(lambda m: jnp.where(trained, m, 0.0).astype(jnp.float32), metrics)
    return {
        **metrics,
        "num_examples": jnp.where(trained, batch_c.num_examples, 0.0),
        "mean_advantage": batch_c.mean_advantage,
        "baseline": batch_c.baseline,
        "wins": batch_c.wins,
        "losses": batch_c.losses,
        "lr": batch_c.lr,
        "trained": trained.astype(jnp.float32),
    }


def prev_baselines(baselines: Sequence[float] | np.ndarray | None, num_clients: int) -> np.ndarray:
    """[C] previous baselines as float32 (NaN: none yet)."""
    if baselines is None:
        return np.full(num_clients, np.nan, np.float32)
    out = np.asarray(baselines, np.float32)
    if out.shape != (num_clients,):
        raise ValueError(
            f"baselines must have shape ({num_clients},), one per client, got {out.shape}"
        )
    return out


def key_words(key: jax.Array) -> list[int]:
    """The key's raw uint32 words, to seed host-side numpy generators from it."""
    if jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(w) for w in np.asarray(key).ravel()]
