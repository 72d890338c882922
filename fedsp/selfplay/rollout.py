"""Batched rollouts for many clients at once with the round's adapters.

Every sampled client starts a round from the same server adapters, so all their
prompts can go through ONE jit-compiled sampler call instead of one per client
(docs/design.md, "One round, as data flows"). Rows are grouped by the length bucket of their head
(the chat-formatted system turn, `split_head`), sorted by prompt length and split into
chunks of at most ``batch_size`` rows; a chunk is padded to its longest prompt's length
bucket and its row count rounded up to a power of two, so a few executables serve every
round. Each distinct head is prefilled once per call for all the rows that share it, so
each row pays only for its own question and turns.

A SPEAR revision prompt repeats its first prompt and answer before the feedback turn:
the first call keeps its rows' keys/values (``keep_cache``) and the revision call
continues each row from the longest start its prompt shares with them
(``continue_from``), so a revision prefills only the feedback turn. The match is checked
token by token, so a reply that re-tokenizes differently (or a later revision, which
shares only the first prompt) just reuses less.

Reproducibility does not depend on that batching: each row gets its own PRNG key,
derived from (round key, round, attempt, client, prompt, sample), and the sampler
draws a row's tokens from its key alone (``fedsp.model.sampling.generate`` with
per-row keys). A row's sample is therefore the same whether it is generated with all
clients, with its own client only, or alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp import progress
from fedsp.data.base import Example, Task
from fedsp.distributed import to_host
from fedsp.model import sampling
from fedsp.model.sharding import padded_rows
from fedsp.model.tokenizer import Tokenizer
from fedsp.selfplay.base import Policy


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Generation settings of a rollout (``config.rollout.*``; `from_config`).

    Attributes:
      max_new_tokens: most tokens generated per row.
      temperature: 0 for greedy, else the sampling temperature (SPEAR reference: 0.8).
      top_p: nucleus mass (reference: 0.95).
      batch_size: most rows per sampler call (memory bound of the KV cache).
      split_by_length: also split a call's rows by prompt-length bucket (one call per
        bucket). Off by default: rows that share a head bucket go in one call, padded to
        the longest prompt's bucket. Splitting saves prefill padding but runs one more
        decode loop, with rows padded to a power of two, and compiles one more program
        per bucket (BENCHMARKS.md, "Rollout grouping", compares the two).
      reuse_cache: SPEAR keeps the first answers' keys/values (`sample_completions`'s
        ``keep_cache``) and its revisions continue from them (``continue_from``), so a
        revision prefills only the feedback turn (False saves the memory of those caches
        until the revisions are sampled).
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int
    split_by_length: bool
    reuse_cache: bool

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    @classmethod
    def from_config(cls, config: Any) -> SamplingParams:
        """``config.rollout`` of a validated `fedsp.config.default_config` config."""
        r = config.rollout
        return cls(
            max_new_tokens=int(r.max_new_tokens),
            temperature=float(r.temperature),
            top_p=float(r.top_p),
            batch_size=int(r.batch_size),
            split_by_length=bool(r.split_by_length),
            reuse_cache=bool(r.reuse_cache),
        )


@dataclasses.dataclass(frozen=True)
class CachedRow:
    """The keys/values one sampler call left for one of its rows.

    Attributes:
      cache: the call's `fedsp.model.sampling.PrefixCache` (shared by its rows).
      row: this row's index in it.
      tokens: the token ids those keys/values stand for: the prompt, then the reply
        but its last token.
    """

    cache: sampling.PrefixCache
    row: int
    tokens: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated reply.

    Attributes:
      tokens: [n] int32 generated ids, the end-of-turn id included when the row emitted
        one (so training on them teaches the model to stop).
      logprobs: [n] float32 log π(token | prefix) under the sampling adapters.
      text: the decoded reply without special tokens.
      cache: with `sample_completions`'s ``keep_cache``, the keys/values of the prompt and reply,
        for a later prompt that continues the conversation (``continue_from``).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    text: str
    cache: CachedRow | None = dataclasses.field(default=None, compare=False, repr=False)


def prompt_ids(
    tokenizer: Tokenizer,
    task: Task,
    example: Example,
    *,
    feedback: str | None = None,
    previous: str | None = None,
) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant header.

    With ``previous`` and ``feedback`` the conversation is the original prompt, the
    previous attempt as an assistant turn and the feedback as a user turn
    (`fedsp.data.base.Task.messages`).
    """
    # One conversation in, one string out (`Tokenizer.apply_chat_template` has no overloads).
    text = cast(
        str,
        tokenizer.apply_chat_template(
            task.messages(example, feedback=feedback, previous=previous),
            add_generation_prompt=True,
        ),
    )
    return tokenizer.encode(text)


def rollout_keys(
    key: jax.Array,
    round: int,
    attempt: int,
    clients: Sequence[int],
    prompts: Sequence[int],
    samples: Sequence[int] | None = None,
) -> jax.Array:
    """[N] keys, row r's = fold_in(key, round, attempt, clients[r], prompts[r], samples[r]).

    Args:
      key: the round's key (one typed or raw key).
      round: the round number.
      attempt: 0 for first answers, k for the k-th revision.
      clients: [N] the row's client index within the round.
      prompts: [N] the row's prompt index within its client.
      samples: [N] the sample index within a group (GRPO); None means 0.
    """
    if not jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    base = jax.random.fold_in(jax.random.fold_in(key, round), attempt)
    samples = [0] * len(clients) if samples is None else samples
    if not len(clients) == len(prompts) == len(samples):
        raise ValueError(
            f"clients, prompts and samples need one entry per row, got lengths "
            f"{len(clients)}, {len(prompts)}, {len(samples)}"
        )
    ids = [jnp.asarray(np.asarray(x, np.uint32)) for x in (clients, prompts, samples)]
    return _fold_rows(base, *ids)


@jax.jit
def _fold_rows(base, clients, prompts, samples):
    fold = jax.random.fold_in
    return jax.vmap(lambda c, p, s: fold(fold(fold(base, c), p), s))(clients, prompts, samples)


class Rollout(Protocol):
    """A rollout sampler: `sample_completions`, or a test double with its signature.

    Algorithms call it with ``keep_cache`` / ``continue_from`` only when they reuse
    keys/values across calls (SPEAR's revisions); a double may ignore both (a
    `Completion` without ``cache`` makes a later call prefill its whole prompt).
    """

    def __call__(
        self,
        policy: Policy,
        lora_state: nnx.State,
        prompts: Sequence[Sequence[int]],
        keys: jax.Array,
        params: SamplingParams,
        *,
        keep_cache: bool = False,
        continue_from: Sequence[Completion | None] | None = None,
    ) -> list[Completion]: ...


def sample_completions(
    policy: Policy,
    lora_state: nnx.State,
    prompts: Sequence[Sequence[int]],
    keys: jax.Array,
    params: SamplingParams,
    *,
    keep_cache: bool = False,
    continue_from: Sequence[Completion | None] | None = None,
) -> list[Completion]:
    """Samples one completion per prompt with the adapters ``lora_state``.

    Args:
      policy: graphdef, frozen base state and tokenizer.
      lora_state: the adapters to sample with.
      prompts: N prompt token-id lists (from `prompt_ids`), any lengths.
      keys: [N] per-row keys (`rollout_keys`); a row's completion depends only on its prompt
        and key, not on the other rows.
      params: lengths, temperature, top-p, batch size.
      keep_cache: keep each row's keys/values on its completion (``Completion.cache``):
        a revision prompt that repeats the prompt and reply then prefills only what
        follows them. They hold memory (for SmolLM2 in float32, 46 KiB per token and row)
        until the completions are dropped.
      continue_from: N completions (or None) from an earlier call with ``keep_cache``
        and the same adapters: row r reuses the keys/values of the longest start its
        prompt shares with ``continue_from[r]``'s prompt + reply, and prefills only the
        rest. The samples equal those without it up to float rounding.

    Returns:
      N completions, in the order of ``prompts``.
    """
    n = len(prompts)
    if n == 0:
        return []
    if keys.shape != (n,):
        raise ValueError(f"keys must have shape ({n},), one per prompt, got {keys.shape}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if continue_from is not None and len(continue_from) != n:
        raise ValueError(
            f"continue_from needs one entry per prompt ({n}), got {len(continue_from)}"
        )
    tokenizer = policy.tokenizer
    pad = tokenizer.pad_token_id
    # Per row, how its prompt starts: from a cached row (the tokens it shares with it),
    # or from a shared head, or neither; each call holds rows of one kind only.
    sources: dict[int, tuple[sampling.PrefixCache, int]] = {}
    cuts = [0] * n
    for row, prompt in enumerate(prompts):
        previous = continue_from[row] if continue_from is not None else None
        if previous is not None and previous.cache is not None:
            shared = _common_prefix(prompt, previous.cache.tokens)
            # The last prompt token is always fed: its logits give the first new token.
            shared = min(shared, len(prompt) - 1)
            if shared:
                sources[row] = (previous.cache.cache, previous.cache.row)
                cuts[row] = shared
                continue
        cuts[row] = split_head(prompt, tokenizer.eos_token_ids)
    heads = [tuple(prompt[:cut]) for prompt, cut in zip(prompts, cuts)]
    suffix = [sampling.bucket_length(len(prompt) - cut) for prompt, cut in zip(prompts, cuts)]
    groups: dict[tuple[bool, int, int], list[int]] = {}
    for row, cut in enumerate(cuts):
        width = suffix[row] if params.split_by_length else 0
        cached = row in sources
        head_width = sampling.bucket_length(cut) if cut and not cached else 0
        groups.setdefault((cached, head_width, width), []).append(row)
    out: list[Completion | None] = [None] * n
    done = 0
    for (cached, head_width, _), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: -suffix[r])
        for start in range(0, len(rows), params.batch_size):
            chunk = rows[start : start + params.batch_size]
            width = max(suffix[r] for r in chunk)
            # Repeating the last row up to a power of two keeps the set of compiled
            # batch sizes small; the copies are dropped below.
            # A multiple of the mesh's clients axis gives every device rows (`shard_rows`).
            padded = chunk + [chunk[-1]] * (padded_rows(_pow2(len(chunk))) - len(chunk))
            ids = np.full((len(padded), width), pad, np.int32)
            mask = np.zeros((len(padded), width), np.int32)
            for i, row in enumerate(padded):
                tail = prompts[row][cuts[row] :]
                ids[i, width - len(tail) :] = tail
                mask[i, width - len(tail) :] = 1
            prefix_args: dict[str, Any] = {}
            if cached:
                prefix_args = dict(
                    prefix_cache=sampling.gather_prefix(
                        [sources[r] for r in padded], [cuts[r] for r in padded]
                    )
                )
            elif head_width:
                # Each distinct head once (their count rounded up to a power of two too).
                distinct = list(dict.fromkeys(heads[r] for r in padded))
                distinct += [distinct[-1]] * (_pow2(len(distinct)) - len(distinct))
                head_ids = np.full((len(distinct), head_width), pad, np.int32)
                head_mask = np.zeros((len(distinct), head_width), np.int32)
                for i, head in enumerate(distinct):
                    head_ids[i, head_width - len(head) :] = head
                    head_mask[i, head_width - len(head) :] = 1
                slot = {head: i for i, head in enumerate(distinct)}
                prefix_args = dict(
                    prefix_ids=head_ids,
                    prefix_mask=head_mask,
                    prefix_index=[slot[heads[r]] for r in padded],
                )
            result = sampling.generate(
                policy.graphdef,
                (lora_state, policy.base_state),
                ids,
                mask,
                keys[np.asarray(padded)],
                max_new_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                eos_ids=tokenizer.eos_token_ids,
                pad_id=pad,
                return_cache=keep_cache,
                **prefix_args,
            )
            if keep_cache:
                # `sampling.generate` has no overloads on return_cache: with it, a pair.
                result, kv = cast(tuple[sampling.SampleOutput, sampling.PrefixCache], result)
            tokens, lengths, logprobs = to_host(result)
            for i, row in enumerate(chunk):
                k = int(lengths[i])
                reply = np.asarray(tokens[i, :k], np.int32)
                out[row] = Completion(
                    tokens=reply,
                    logprobs=np.asarray(logprobs[i, :k], np.float32),
                    text=tokenizer.decode(tokens[i, :k]),
                    cache=(
                        CachedRow(
                            kv,
                            i,
                            tuple(int(t) for t in prompts[row]) + tuple(int(t) for t in reply[:-1]),
                        )
                        if keep_cache
                        else None
                    ),
                )
            done += len(chunk)
            progress.report("rollout rows", done, n)
    return out  # type: ignore[return-value]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


def split_head(prompt: Sequence[int], eos_ids: Sequence[int]) -> int:
    """Length of ``prompt``'s shareable head: its tokens up to and including the first
    end-of-turn id, when more tokens follow; else 0.

    For a chat-formatted prompt the head is the system turn, which every prompt of a
    task repeats: `sample_completions` prefills each distinct head once per sampler call and
    shares its keys and values between the rows that start with it. The split depends
    on the row's own tokens only, so a row is computed the same way whichever rows
    share its call (batched or per-client rollouts give the same samples).
    """
    stops = {int(e) for e in eos_ids}
    for i, token in enumerate(prompt[:-1]):
        if int(token) in stops:
            return i + 1
    return 0


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
