"""Jit-compiled autoregressive sampling with a KV cache.

``generate(graphdef, state, prompt_ids, prompt_mask, key, max_new_tokens=...)`` prefills a
left-padded prompt batch into a KV cache (``fedsp.model.transformer.KVCache``) in one
pass, then decodes one token per step inside a ``lax.while_loop`` that stops as soon as
every row has emitted an EOS id (or ``max_new_tokens`` is reached). It runs on a split
model, ``nnx.split(model)`` or ``fedsp.model.lora.split_lora(model)``, so one compiled
program serves every adapter value a federated round produces.

Returned per row: the sampled tokens (``pad_id`` after the row's end), the number of
generated tokens (including the EOS token when the row stopped on one) and, for each
token, its log-probability log π(y_t | x, y_<t) = log_softmax(logits)[y_t] under the
model's own, untempered and unfiltered distribution — the policy log-prob that
likelihood-ratio and KL losses need, whatever temperature/top-p produced the sample.

Recompilation: prompt lengths are left-padded up to a bucket and the generation buffer is
rounded up to a bucket (``bucket_length``); ``max_new_tokens``, ``temperature`` and
``top_p`` are traced values, so calls in the same (batch, prompt bucket, new-token bucket,
greedy or not, top-p or not) reuse one executable.

Token choice (greedy, temperature, top-p) is ``fedsp.model.next_token``; the decode step
of the unrolled layer loop is ``fedsp.model.decode``; shared prompt heads and cached rows
(`PrefixCache`, `gather_prefix`, re-exported here) are ``fedsp.model.prefixes``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.executables import Program
from fedsp.model.decode import decode_step, layer_weights
from fedsp.model.next_token import select_tokens
from fedsp.model.prefixes import (
    PrefixCache,
    bucket_length,
    check_left_padded,
    check_prefix_cache,
    gather_prefix,
    shared_prefixes,
)
from fedsp.model.sharding import shard_rows
from fedsp.model.transformer import KVCache, default_positions, init_cache

# PrefixCache, bucket_length and gather_prefix are re-exported: a sampler's callers use them.
__all__ = [
    "MIN_ROWS",
    "PrefixCache",
    "SampleOutput",
    "bucket_length",
    "gather_prefix",
    "generate",
    "lower_generate",
]

_EOS_SLOTS = 8
MIN_ROWS = 4


class SampleOutput(NamedTuple):
    """tokens [B, N] int32 (pad_id after a row ends), lengths [B] int32 (generated
    tokens, EOS included), logprobs [B, N] float32 (0 after a row ends)."""

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array


def generate(
    graphdef: nnx.GraphDef,
    state: nnx.State | Sequence[nnx.State],
    prompt_ids: jax.Array | np.ndarray,
    prompt_mask: jax.Array | np.ndarray,
    key: jax.Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: int | Sequence[int] = (),
    pad_id: int = 0,
    bucket_multiple: int = 64,
    compact: bool = True,
    merge_lora: bool = True,
    layer_loop: str = "auto",
    prefix_ids: Sequence[int] | np.ndarray | None = None,
    prefix_mask: np.ndarray | None = None,
    prefix_index: Sequence[int] | np.ndarray | None = None,
    prefix_cache: PrefixCache | None = None,
    return_cache: bool = False,
) -> SampleOutput | tuple[SampleOutput, PrefixCache]:
    """Samples up to ``max_new_tokens`` tokens per row of a left-padded prompt batch.

    Args:
      graphdef: the model's graph (``nnx.split(model)[0]``).
      state: the model's state, or a sequence of states to ``nnx.merge`` (e.g.
        ``(lora_state, base_state)`` from ``split_lora``).
      prompt_ids: [B, P] int prompt tokens, left-padded.
      prompt_mask: [B, P] 1 for real tokens, 0 for left padding; every row needs at least
        one real token.
      key: PRNG key; required unless greedy. The same key gives the same samples. A [B]
        array of keys (one per row) makes each row's sample depend only on its own key
        and prompt, not on which other rows share the batch or where it sits in it.
      max_new_tokens: N, the most tokens generated per row.
      temperature: 0 for greedy decoding, else the softmax temperature T (> 0).
      top_p: nucleus mass in (0, 1]; 1 disables the filter.
      eos_ids: token id(s) that end a row (emitted, then pad_id follows).
      pad_id: id written after a row ends and used to pad prompts to their bucket.
      bucket_multiple: granularity of the prompt and generation length buckets.
      compact: drop finished rows as the batch empties: once at most half the rows are
        still running, the rest continue in a half-size batch (B, B/2, … down to
        ``MIN_ROWS``), so finished rows stop costing matmuls and cache reads. Each size is
        one more compiled loop; results are the same either way.
      layer_loop: how a decode step runs the layers. "unrolled" slices every layer's
        weights out of the stacked arrays once per call and unrolls the layers in the
        decode body; "scan" runs ``Transformer.forward_with_cache``'s layer scan, which
        XLA:CPU pays for with a copy of each layer's weights on every step (see
        ``fedsp.model.decode``) but which keeps one copy of the weights and compiles
        one layer body. "auto": "unrolled" on CPU, "scan" on accelerators (where the
        per-call weight copy would cost memory that large models need). The prefill is
        scanned either way.
      merge_lora: with "unrolled", fold LoRA adapters into the sliced weights once per
        call (W + s·A B) rather than applying them at every step: equal up to float
        rounding, and a step then runs 7 matmuls per layer instead of 21.
      prefix_ids: prompt heads shared between rows, prefilled once each and their
        keys/values reused by every row that starts with them (e.g. the chat-formatted
        system turn every prompt of a task begins with), so a row's prefill costs only
        its own tokens. [L0]: one prefix for every row; [U, L0] (left-padded, with
        ``prefix_mask``): U prefixes, row r starting with ``prefix_index[r]``. Row r's
        prompt is then its prefix followed by ``prompt_ids[r]``; the samples equal those
        of the concatenated prompts up to float rounding. None: no prefix.
      prefix_mask: [U, L0] 1 for real prefix tokens, 0 for left padding (default: all 1).
      prefix_index: [B] the prefix of each row (default: all 0).
      prefix_cache: per-row keys/values of tokens already processed (a `PrefixCache`
        from an earlier call with ``return_cache``, rows gathered to this batch, with
        its mask cut to the tokens each row shares with its new prompt): row r's prompt
        is then the cached tokens followed by ``prompt_ids[r]``, and only the latter are
        prefilled. The samples equal those of the whole prompt up to float rounding
        (the cached keys/values may come from decode steps, which compute them with the
        adapters folded into the weights). Exclusive with ``prefix_ids``. Slots are not
        positions here either, so a sliding-window model would measure its window in
        slots.
      return_cache: also return every row's keys/values (`PrefixCache`) at the end.

    Returns:
      SampleOutput(tokens [B, N], lengths [B], logprobs [B, N]); with ``return_cache``,
      (SampleOutput, PrefixCache).
    """
    prompt_ids = np.asarray(prompt_ids) if not isinstance(prompt_ids, jax.Array) else prompt_ids
    if prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids must be [B, P], got shape {prompt_ids.shape}")
    if tuple(prompt_mask.shape) != tuple(prompt_ids.shape):
        raise ValueError(
            f"prompt_mask must have the shape of prompt_ids {tuple(prompt_ids.shape)}, got "
            f"{tuple(prompt_mask.shape)}"
        )
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    greedy = temperature == 0.0
    if not greedy and key is None:
        raise ValueError("key is required when temperature > 0")
    check_left_padded(prompt_mask)
    eos = [int(eos_ids)] if isinstance(eos_ids, (int, np.integer)) else [int(e) for e in eos_ids]
    # A fixed-size array (padded with -1, which no token equals) keeps the EOS set a traced
    # value: another tokenizer's EOS ids reuse the compiled program.
    eos_array = np.full((-(-max(len(eos), 1) // _EOS_SLOTS) * _EOS_SLOTS,), -1, np.int32)
    eos_array[: len(eos)] = eos

    b, p = prompt_ids.shape
    heads = shared_prefixes(prefix_ids, prefix_mask, prefix_index, b, pad_id, bucket_multiple)
    if prefix_cache is not None:
        if heads is not None:
            raise ValueError("pass prefix_ids or prefix_cache, not both")
        heads = check_prefix_cache(prefix_cache, b)
    p_bucket = bucket_length(p, bucket_multiple)
    n_bucket = bucket_length(int(max_new_tokens), bucket_multiple)
    ids = jnp.pad(
        jnp.asarray(prompt_ids, jnp.int32), ((0, 0), (p_bucket - p, 0)), constant_values=pad_id
    )
    mask = jnp.pad(jnp.asarray(prompt_mask).astype(jnp.bool_), ((0, 0), (p_bucket - p, 0)))
    if key is None:
        key = jax.random.key(0)
    key = _batch_keys(key, b)
    states = tuple(state) if isinstance(state, (tuple, list)) else (state,)
    out = GENERATE(
        graphdef,
        states,
        heads,
        ids,
        mask,
        key,
        jnp.asarray(eos_array),
        jnp.int32(max_new_tokens),
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        n_bucket=n_bucket,
        greedy=greedy,
        use_top_p=top_p < 1.0,
        pad_id=int(pad_id),
        compact=bool(compact),
        merge_lora=bool(merge_lora),
        unroll=_unroll(layer_loop),
        return_cache=bool(return_cache),
    )
    n = int(max_new_tokens)
    if return_cache:
        out, cache = out
        return SampleOutput(out.tokens[:, :n], out.lengths, out.logprobs[:, :n]), cache
    return SampleOutput(out.tokens[:, :n], out.lengths, out.logprobs[:, :n])


def lower_generate(
    graphdef: nnx.GraphDef,
    states: Sequence[Any],
    *,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    bucket_multiple: int = 64,
    compact: bool = True,
    merge_lora: bool = True,
    layer_loop: str = "auto",
    return_cache: bool = False,
    input_sharding: jax.sharding.Sharding | None = None,
) -> jax.stages.Lowered:
    """The program `generate` runs for ``batch`` prompts of ``prompt_len`` tokens, lowered
    without running it: for capacity planning (`fedsp.plan`).

    ``states`` may hold ``jax.ShapeDtypeStruct`` leaves (with shardings); the prompt-side
    arguments are shapes too, placed by ``input_sharding`` (None: unplaced, as `generate`
    passes host arrays). The other arguments are `generate`'s: the program is the one a
    `generate` call with them compiles (prompts and new tokens rounded up to their
    buckets, no shared prefix). Call it under ``jax.set_mesh`` when the run has a mesh
    (rows are split over its "clients" axis).
    """

    def shape(dims: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(dims, dtype, sharding=input_sharding)

    p_bucket = bucket_length(prompt_len, bucket_multiple)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    return GENERATE.jitted.lower(
        graphdef,
        tuple(states),
        None,
        shape((batch, p_bucket), jnp.int32),
        shape((batch, p_bucket), jnp.bool_),
        shape(keys.shape, keys.dtype),
        shape((_EOS_SLOTS,), jnp.int32),
        shape((), jnp.int32),
        shape((), jnp.float32),
        shape((), jnp.float32),
        n_bucket=bucket_length(int(max_new_tokens), bucket_multiple),
        greedy=temperature == 0.0,
        use_top_p=top_p < 1.0,
        pad_id=0,
        compact=bool(compact),
        merge_lora=bool(merge_lora),
        unroll=_unroll(layer_loop),
        return_cache=bool(return_cache),
    )


_LAYER_LOOPS = ("auto", "unrolled", "scan")


def _unroll(layer_loop: str) -> bool:
    if layer_loop not in _LAYER_LOOPS:
        raise ValueError(f"layer_loop must be one of {_LAYER_LOOPS}, got {layer_loop!r}")
    if layer_loop == "auto":
        return jax.default_backend() == "cpu"
    return layer_loop == "unrolled"


def _batch_keys(key: jax.Array, batch: int) -> jax.Array:
    """[B] typed keys, one per row: a [B] key array as given, one key split B ways.

    Raw uint32 keys are wrapped. Drawing every row from its own key makes a row's sample
    independent of the batch slot it decodes in, so dropping finished rows (``compact``)
    does not change results.
    """
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return jax.random.split(key, batch)
    if key.shape != (batch,):
        raise ValueError(
            f"key must be one key or one per row, shape () or ({batch},); got {key.shape}"
        )
    return key


def _fold_in(keys: jax.Array, data: jax.Array | int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def _generate(
    graphdef,
    states,
    prefix,
    ids,
    mask,
    key,
    eos,
    max_new,
    temperature,
    top_p,
    *,
    n_bucket,
    greedy,
    use_top_p,
    pad_id,
    compact,
    merge_lora,
    unroll,
    return_cache,
):
    model = nnx.merge(graphdef, *states)
    # Rows are independent: under a mesh they run data parallel over "clients".
    ids, mask, key = shard_rows(ids), shard_rows(mask), shard_rows(key)
    b, p = ids.shape
    positions = default_positions(mask)
    # Prefill into a prompt-sized cache, then grow it: the prompt's attention then spans
    # P key slots instead of P + N empty-tailed ones.
    if prefix is None:
        hidden, cache = model.forward_with_cache(
            ids, positions, mask, init_cache(model.config, b, p, model.dtype), jnp.int32(0)
        )
    elif isinstance(prefix, PrefixCache):
        # Row r's cached keys/values fill slots 0 … S0−1 (its mask marks the real ones);
        # its own left-padded tokens follow, positioned after its real cached tokens.
        l0 = prefix.k.shape[3]
        tail = ((0, 0), (0, 0), (0, 0), (0, p), (0, 0))
        cache = KVCache(
            jnp.pad(prefix.k, tail).astype(model.dtype), jnp.pad(prefix.v, tail).astype(model.dtype)
        )
        mask = jnp.concatenate([prefix.mask, mask], axis=1)
        positions = default_positions(mask)[:, l0:]
        hidden, cache = model.forward_with_cache(ids, positions, mask, cache, jnp.int32(l0))
        p = l0 + p
    else:
        # Each distinct prefix once (batch U); row r's cache then starts with the keys and
        # values of prefix index[r] in slots 0 … L0−1 and its own left-padded tokens follow
        # in slots L0 … L0+P−1. Slots are not positions: padding sits between the two
        # parts, and RoPE positions count real tokens only.
        head_ids, head_mask, index = prefix
        u, l0 = head_ids.shape
        _, head = model.forward_with_cache(
            head_ids,
            default_positions(head_mask),
            head_mask,
            init_cache(model.config, u, l0, model.dtype),
            jnp.int32(0),
        )
        tail = ((0, 0), (0, 0), (0, 0), (0, p), (0, 0))
        cache = KVCache(jnp.pad(head.k[:, index], tail), jnp.pad(head.v[:, index], tail))
        mask = jnp.concatenate([head_mask[index], mask], axis=1)
        positions = default_positions(mask)[:, l0:]
        hidden, cache = model.forward_with_cache(ids, positions, mask, cache, jnp.int32(l0))
        p = l0 + p
    if unroll:
        # Per-layer (k, v) pairs here, one stacked KVCache below: the loop is generic.
        grow = ((0, 0), (0, 0), (0, n_bucket), (0, 0))
        caches: Any = [
            (jnp.pad(cache.k[i], grow), jnp.pad(cache.v[i], grow))
            for i in range(model.config.num_hidden_layers)
        ]
        weights = layer_weights(model, merge_lora)

        def decode(tok, pos, kv_mask, caches, slot):
            return decode_step(model, weights, caches, tok, pos, kv_mask, slot)

        def keep_rows(caches, keep):
            return [(k[keep], v[keep]) for k, v in caches]

        def put_rows(final, caches, rows):
            return [
                (fk.at[rows].set(k), fv.at[rows].set(v)) for (fk, fv), (k, v) in zip(final, caches)
            ]

        def stacked(caches):
            return (jnp.stack([k for k, _ in caches]), jnp.stack([v for _, v in caches]))
    else:
        grow_stacked = ((0, 0), (0, 0), (0, 0), (0, n_bucket), (0, 0))
        caches = KVCache(jnp.pad(cache.k, grow_stacked), jnp.pad(cache.v, grow_stacked))

        def decode(tok, pos, kv_mask, caches, slot):
            hidden, caches = model.forward_with_cache(
                tok[:, None], pos[:, None], kv_mask, caches, slot
            )
            return hidden[:, 0], caches

        def keep_rows(caches, keep):
            return KVCache(caches.k[:, keep], caches.v[:, keep])

        def put_rows(final, caches, rows):
            return KVCache(final.k.at[:, rows].set(caches.k), final.v.at[:, rows].set(caches.v))

        def stacked(caches):
            return caches.k, caches.v

    del cache
    kv_mask = jnp.pad(mask, ((0, 0), (0, n_bucket)))
    # Left padding puts every row's last prompt token in the last column.
    logits = model.logits(hidden[:, -1])
    select = functools.partial(
        select_tokens, temperature=temperature, top_p=top_p, greedy=greedy, use_top_p=use_top_p
    )

    tok, lp = select(logits, _fold_in(key, 0))
    tokens = jnp.full((b, n_bucket), pad_id, jnp.int32).at[:, 0].set(tok)
    logprobs = jnp.zeros((b, n_bucket), jnp.float32).at[:, 0].set(lp)
    done = jnp.isin(tok, eos)
    lengths = jnp.ones((b,), jnp.int32)
    # Per-stage state: rows[j] is the output row that batch slot j decodes.
    rows = jnp.arange(b)
    i, pos = jnp.int32(1), positions[:, -1] + 1

    def body(carry):
        i, tok, done, rows, key, caches, kv_mask, pos, lengths, tokens, logprobs = carry
        size = tok.shape[0]
        slot = p + i - 1  # where the previous token's key/value goes
        kv_mask = jax.lax.dynamic_update_slice(kv_mask, jnp.ones((size, 1), jnp.bool_), (0, slot))
        hidden, caches = decode(tok, pos, kv_mask, caches, slot)
        new_tok, new_lp = select(model.logits(hidden), _fold_in(key, i))
        new_tok = jnp.where(done, pad_id, new_tok)
        new_lp = jnp.where(done, 0.0, new_lp)
        tokens = tokens.at[rows, i].set(new_tok)
        logprobs = logprobs.at[rows, i].set(new_lp)
        lengths = lengths.at[rows].add((~done).astype(jnp.int32))
        done = done | jnp.isin(new_tok, eos)
        return i + 1, new_tok, done, rows, key, caches, kv_mask, pos + 1, lengths, tokens, logprobs

    stages = _stage_sizes(b) if compact else (b,)
    final = None  # with return_cache: every row's caches, in output-row order
    for j, size in enumerate(stages):
        if j:
            if return_cache:
                # Rows about to be dropped keep their keys/values here; at the end of
                # stage 0 batch slot j still decodes output row j.
                final = caches if final is None else put_rows(final, caches, rows)
            # Drop finished rows: keep the first `size` slots after moving active ones first.
            keep = jnp.argsort(done, stable=True)[:size]
            tok, done, rows, pos = tok[keep], done[keep], rows[keep], pos[keep]
            kv_mask = kv_mask[keep]
            caches = keep_rows(caches, keep)
            key = key[keep]
        floor = stages[j + 1] if j + 1 < len(stages) else 0

        def cond(carry, floor=floor):
            i, _, done, *_ = carry
            return (i < max_new) & (jnp.sum(~done) > floor)

        carry = (i, tok, done, rows, key, caches, kv_mask, pos, lengths, tokens, logprobs)
        i, tok, done, rows, key, caches, kv_mask, pos, lengths, tokens, logprobs = (
            jax.lax.while_loop(cond, body, carry)
        )
    out = SampleOutput(tokens, lengths, logprobs)
    if not return_cache:
        return out
    final = caches if final is None else put_rows(final, caches, rows)
    k, v = stacked(final)
    # Generated token t sits in slot p + t once fed; the last one of a row never is.
    fed = jnp.arange(n_bucket)[None, :] < (lengths - 1)[:, None]
    return out, PrefixCache(k, v, jnp.concatenate([mask, fed], axis=1))


# `generate`'s program, loaded by later processes without tracing (`fedsp.executables`):
# everything it reads besides its arrays is a static argument. No buffer donation: the KV
# cache is created and updated inside the program (prefill, then the decode while_loop);
# a ``prefix`` cache matches no output's shape (the returned cache is longer), so XLA
# could not reuse it, and a caller may pass it again.
GENERATE = Program(
    _generate,
    "fedsp.model.sampling.generate",
    static_argnames=(
        "graphdef",
        "n_bucket",
        "greedy",
        "use_top_p",
        "pad_id",
        "compact",
        "merge_lora",
        "unroll",
        "return_cache",
    ),
)


def _stage_sizes(batch: int) -> tuple[int, ...]:
    """Batch sizes the decode loop shrinks through as rows finish: B, B/2, … ≥ MIN_ROWS.

    Each size is one more compiled loop body, so halving stops at MIN_ROWS rows.
    """
    sizes = [batch]
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= MIN_ROWS:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)
