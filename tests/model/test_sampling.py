"""fedsp.model.sampling: KV-cache decoding equals full recomputation; EOS, buckets, top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedsp.model import next_token, sampling
from fedsp.model.config import ModelConfig
from fedsp.model.hf_weights import load_hf_state_dict
from fedsp.model.lora import LoRAConfig, apply_lora, split_lora
from fedsp.model.sampling import SampleOutput, bucket_length, generate
from fedsp.model.transformer import Transformer
from tests.model import tiny

PAD = 0
N = 7


@pytest.fixture(scope="module")
def model():
    hf = tiny.tiny_hf_config("smollm")
    m = Transformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
    load_hf_state_dict(m, tiny.torch_state_dict(tiny.torch_model(hf, seed=3)))
    return m


@pytest.fixture(scope="module")
def prompts():
    return tiny.left_padded_batch(128, [7, 3, 5], 7, seed=5, pad_id=PAD)


def _teacher_forced(model, prompts, out: SampleOutput):
    """Full no-cache forward over prompt + generated tokens: (logits at the steps, mask)."""
    ids, mask = prompts
    rows = []
    for r in range(ids.shape[0]):
        prompt = ids[r][mask[r] == 1]
        rows.append(np.concatenate([prompt, np.asarray(out.tokens[r, : out.lengths[r]])]))
    width = max(len(x) for x in rows)
    full = np.full((len(rows), width), PAD, np.int32)
    full_mask = np.zeros_like(full)
    for r, x in enumerate(rows):
        full[r, width - len(x) :], full_mask[r, width - len(x) :] = x, 1
    logits = tiny.logits(model, full, full_mask)
    steps = []
    for r, x in enumerate(rows):
        n_prompt, n_gen = len(x) - int(out.lengths[r]), int(out.lengths[r])
        start = width - len(x) + n_prompt - 1  # logits here predict the first new token
        steps.append(logits[r, start : start + n_gen])
    return steps


def test_greedy_equals_full_recompute_argmax_and_logprobs(model, prompts):
    graphdef, state = nnx.split(model)
    out = generate(graphdef, state, *prompts, max_new_tokens=N, pad_id=PAD)
    assert out.tokens.shape == (3, N) and out.logprobs.shape == (3, N)
    np.testing.assert_array_equal(out.lengths, [N] * 3)
    for r, logits in enumerate(_teacher_forced(model, prompts, out)):
        np.testing.assert_array_equal(out.tokens[r], logits.argmax(-1))
        logp = jax.nn.log_softmax(jnp.asarray(logits), -1)
        ref = np.take_along_axis(np.asarray(logp), np.asarray(out.tokens[r])[:, None], -1)[:, 0]
        np.testing.assert_allclose(out.logprobs[r], ref, atol=1e-4)
    assert (np.asarray(out.logprobs) < 0).all()


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "mistral"])
def test_decode_matches_full_recompute_for_every_architecture(kind):
    """The unrolled per-layer decode step (qkv bias, llama3 rope, sliding window) agrees
    with the scanned full forward; the prompts are longer than Mistral's window of 4."""
    hf = tiny.tiny_hf_config(kind)
    m = Transformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
    load_hf_state_dict(m, tiny.torch_state_dict(tiny.torch_model(hf, seed=4)))
    prompts = tiny.left_padded_batch(128, [7, 3, 6], 7, seed=6, pad_id=PAD)
    out = generate(*nnx.split(m), *prompts, max_new_tokens=N, pad_id=PAD, layer_loop="unrolled")
    for r, logits in enumerate(_teacher_forced(m, prompts, out)):
        np.testing.assert_array_equal(out.tokens[r], logits.argmax(-1))
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
        ref = np.take_along_axis(logp, np.asarray(out.tokens[r])[:, None], -1)[:, 0]
        np.testing.assert_allclose(out.logprobs[r], ref, atol=1e-4)
    scanned = generate(*nnx.split(m), *prompts, max_new_tokens=N, pad_id=PAD, layer_loop="scan")
    np.testing.assert_array_equal(scanned.tokens, out.tokens)
    np.testing.assert_allclose(scanned.logprobs, out.logprobs, atol=1e-5)


def test_lora_merged_for_decoding_equals_applied_per_step(model, prompts):
    """generate folds the adapters into the base once (merge_lora=True, the default);
    that gives the tokens and log-probs of applying them at every step, and of the
    adapted model's full forward."""
    lora_model = nnx.clone(model)
    apply_lora(lora_model, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    graphdef, lora, base = split_lora(lora_model)
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), lora)
    nnx.update(lora_model, lora)
    merged = generate(graphdef, (lora, base), *prompts, max_new_tokens=N, pad_id=PAD)
    applied = generate(
        graphdef, (lora, base), *prompts, max_new_tokens=N, pad_id=PAD, merge_lora=False
    )
    np.testing.assert_array_equal(merged.tokens, applied.tokens)
    np.testing.assert_allclose(merged.logprobs, applied.logprobs, atol=1e-5)
    plain = generate(*nnx.split(model), *prompts, max_new_tokens=N, pad_id=PAD)
    assert not np.array_equal(np.asarray(plain.logprobs), np.asarray(merged.logprobs))
    for r, logits in enumerate(_teacher_forced(lora_model, prompts, merged)):
        np.testing.assert_array_equal(merged.tokens[r], logits.argmax(-1))


def test_sampled_logprobs_are_the_untempered_policy_logprobs(model, prompts):
    graphdef, state = nnx.split(model)
    out = generate(
        graphdef,
        state,
        *prompts,
        jax.random.key(3),
        max_new_tokens=N,
        temperature=0.7,
        top_p=0.9,
        pad_id=PAD,
    )
    for r, logits in enumerate(_teacher_forced(model, prompts, out)):
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
        ref = np.take_along_axis(logp, np.asarray(out.tokens[r])[:, None], -1)[:, 0]
        np.testing.assert_allclose(out.logprobs[r], ref, atol=1e-4)


def test_left_padding_does_not_change_a_row(model, prompts):
    graphdef, state = nnx.split(model)
    ids, mask = prompts
    # Pad the batch much further (another prompt bucket) and compare each row alone.
    wide_ids = np.pad(ids, ((0, 0), (13, 0)), constant_values=PAD)
    wide_mask = np.pad(mask, ((0, 0), (13, 0)))
    batched = generate(graphdef, state, wide_ids, wide_mask, max_new_tokens=N, pad_id=PAD)
    for r in range(3):
        n = mask[r].sum()
        alone = generate(
            graphdef,
            state,
            ids[r : r + 1, 7 - n :],
            mask[r : r + 1, 7 - n :],
            max_new_tokens=N,
            pad_id=PAD,
        )
        np.testing.assert_array_equal(batched.tokens[r], alone.tokens[0])
        np.testing.assert_allclose(batched.logprobs[r], alone.logprobs[0], atol=2e-5)


@pytest.mark.parametrize("layer_loop", ["unrolled", "scan"])
def test_shared_prefix_equals_the_concatenated_prompts(model, prompts, layer_loop):
    """A prefix prefilled once and shared gives each row the tokens and log-probs of its
    concatenated prompt (prefix + row), sampled as well as greedy, padding included."""
    graphdef, state = nnx.split(model)
    ids, mask = prompts
    prefix = np.array([11, 5, 99, 42, 7], np.int32)
    whole_ids = np.concatenate([np.tile(prefix, (3, 1)), ids], axis=1)
    whole_mask = np.concatenate([np.ones((3, 5), mask.dtype), mask], axis=1)
    # The concatenation is padded in the middle; left-align each row as a real prompt is.
    flat_ids, flat_mask = tiny.pack_left([whole_ids[r][whole_mask[r] == 1] for r in range(3)], PAD)
    for kw in ({}, {"temperature": 0.9, "top_p": 0.95}):
        key = jax.random.key(4) if kw else None
        ref = generate(
            graphdef,
            state,
            flat_ids,
            flat_mask,
            key,
            max_new_tokens=N,
            pad_id=PAD,
            layer_loop=layer_loop,
            **kw,
        )
        out = generate(
            graphdef,
            state,
            ids,
            mask,
            key,
            max_new_tokens=N,
            pad_id=PAD,
            layer_loop=layer_loop,
            prefix_ids=prefix,
            **kw,
        )
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.lengths, ref.lengths)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=2e-5)
    # And the greedy tokens are the argmax of a full recompute of prefix + row.
    out = generate(graphdef, state, ids, mask, max_new_tokens=N, pad_id=PAD, prefix_ids=prefix)
    for r, logits in enumerate(_teacher_forced(model, (flat_ids, flat_mask), out)):
        np.testing.assert_array_equal(out.tokens[r], logits.argmax(-1))
    # The prefix is bucketed like the prompts: another length in its bucket reuses the program.
    compiled = sampling.GENERATE.cache_size()
    generate(
        graphdef,
        state,
        ids,
        mask,
        max_new_tokens=N,
        pad_id=PAD,
        prefix_ids=prefix[:4],
        layer_loop=layer_loop,
    )
    assert sampling.GENERATE.cache_size() == compiled
    # Several prefixes of different lengths (left-padded), one chosen per row.
    heads = np.array([[PAD, PAD, 8, 3], [21, 9, 64, 2]], np.int32)
    head_mask = (heads != PAD).astype(np.int32)
    index = np.array([1, 0, 1])
    flat_ids, flat_mask = tiny.pack_left(
        [
            np.concatenate([heads[index[r]][head_mask[index[r]] == 1], ids[r][mask[r] == 1]])
            for r in range(3)
        ],
        PAD,
    )
    ref = generate(
        graphdef, state, flat_ids, flat_mask, max_new_tokens=N, pad_id=PAD, layer_loop=layer_loop
    )
    out = generate(
        graphdef,
        state,
        ids,
        mask,
        max_new_tokens=N,
        pad_id=PAD,
        prefix_ids=heads,
        prefix_mask=head_mask,
        prefix_index=index,
        layer_loop=layer_loop,
    )
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=2e-5)
    with pytest.raises(ValueError, match="prefix_ids must be"):
        generate(graphdef, state, ids, mask, max_new_tokens=N, prefix_ids=[[[1, 2]]])
    with pytest.raises(ValueError, match="prefix_index must hold one prefix in"):
        generate(
            graphdef, state, ids, mask, max_new_tokens=N, prefix_ids=heads, prefix_index=[0, 2, 1]
        )


@pytest.mark.parametrize("layer_loop", ["unrolled", "scan"])
def test_continuing_from_a_returned_cache_equals_the_whole_prompt(model, monkeypatch, layer_loop):
    """Keys/values a call returns (``return_cache``, finished rows dropped on the way and a
    shared head) stand for its rows' prompt + generated tokens: a later call that
    continues from them, cut to any shared prefix, samples what the whole prompt would."""
    monkeypatch.setattr(sampling, "MIN_ROWS", 2)
    graphdef, state = nnx.split(model)
    ids, mask = tiny.left_padded_batch(128, [7, 3, 5, 6, 2, 7, 4, 1], 7, seed=9, pad_id=PAD)
    head = np.array([11, 5, 99], np.int32)
    kw = dict(max_new_tokens=9, temperature=1.0, pad_id=PAD, layer_loop=layer_loop)
    free = generate(graphdef, state, ids, mask, jax.random.key(2), prefix_ids=head, **kw)
    eos = tuple(int(t) for t in np.asarray(free.tokens)[[0, 1, 2, 3], [1, 3, 2, 5]])
    first, cache = generate(
        graphdef,
        state,
        ids,
        mask,
        jax.random.key(2),
        prefix_ids=head,
        eos_ids=eos,
        return_cache=True,
        **kw,
    )
    np.testing.assert_array_equal(
        first.tokens,
        generate(
            graphdef, state, ids, mask, jax.random.key(2), prefix_ids=head, eos_ids=eos, **kw
        ).tokens,
    )
    lengths = np.asarray(first.lengths)
    assert (lengths < 9).sum() >= 3 and (lengths == 9).any()  # the batch shrank
    cached = [
        np.concatenate([head, ids[r][mask[r] == 1], np.asarray(first.tokens[r, : n - 1])])
        for r, n in enumerate(lengths)
    ]
    np.testing.assert_array_equal(np.asarray(cache.mask).sum(1), [len(c) for c in cached])
    # New prompts: every row keeps a prefix of its cached tokens (all of them, or cut
    # inside the head, the prompt or the reply), then new tokens follow.
    rng = np.random.default_rng(0)
    rows = [5, 0, 7, 2, 3, 1]
    keep = [len(cached[5]), 2, len(cached[7]) - 1, 4, len(cached[3]), len(cached[1]) - 2]
    tails = [rng.integers(1, 128, rng.integers(1, 5)).astype(np.int32) for _ in rows]
    whole = [np.concatenate([cached[r][:k], t]) for r, k, t in zip(rows, keep, tails)]
    flat_ids, flat_mask = tiny.pack_left(whole, PAD)
    tail_ids, tail_mask = tiny.pack_left(tails, PAD)
    prefix = sampling.gather_prefix([(cache, r) for r in rows], keep)
    for extra in ({}, {"temperature": 0.9, "top_p": 0.95}):
        call = dict(kw, eos_ids=(), **extra)
        ref = generate(graphdef, state, flat_ids, flat_mask, jax.random.key(7), **call)
        out = generate(
            graphdef, state, tail_ids, tail_mask, jax.random.key(7), prefix_cache=prefix, **call
        )
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=5e-5)
    # Rows may come from several caches of different widths: the same rows and mask.
    narrow = sampling.PrefixCache(cache.k[:, :, :, :24], cache.v[:, :, :, :24], cache.mask[:, :24])
    assert cache.k.shape[3] == 32 and np.asarray(cache.mask)[:, 24:].sum() == 0
    mixed = sampling.gather_prefix(
        [(narrow if j % 2 else cache, r) for j, r in enumerate(rows)], keep
    )
    np.testing.assert_array_equal(mixed.mask, prefix.mask)
    real = np.asarray(prefix.mask)[None, :, None, :, None]
    for a, b in ((mixed.k, prefix.k), (mixed.v, prefix.v)):
        np.testing.assert_array_equal(np.where(real, a, 0), np.where(real, b, 0))
    with pytest.raises(ValueError, match="keep more tokens than their cache holds"):
        sampling.gather_prefix([(cache, 1)], [len(cached[1]) + 1])
    with pytest.raises(ValueError, match="prefix_ids or prefix_cache"):
        generate(
            graphdef,
            state,
            tail_ids,
            tail_mask,
            max_new_tokens=2,
            prefix_ids=head,
            prefix_cache=prefix,
        )
    with pytest.raises(ValueError, match="prefix_cache k/v must both be"):
        generate(
            graphdef, state, tail_ids[:2], tail_mask[:2], max_new_tokens=2, prefix_cache=prefix
        )


def test_eos_stops_each_row(model, prompts):
    graphdef, state = nnx.split(model)
    free = generate(graphdef, state, *prompts, max_new_tokens=N, pad_id=PAD)
    tokens = np.asarray(free.tokens)
    eos = (int(tokens[0, 2]), int(tokens[1, 4]))  # two EOS ids
    out = generate(graphdef, state, *prompts, max_new_tokens=N, eos_ids=eos, pad_id=PAD)
    stopped = 0
    for r in range(3):
        hits = np.flatnonzero(np.isin(tokens[r], eos))
        end = hits[0] + 1 if len(hits) else N
        stopped += end < N
        assert out.lengths[r] == end
        np.testing.assert_array_equal(out.tokens[r, :end], tokens[r, :end])
        np.testing.assert_array_equal(out.tokens[r, end:], PAD)
        np.testing.assert_allclose(out.logprobs[r, :end], free.logprobs[r, :end], atol=1e-6)
        np.testing.assert_array_equal(out.logprobs[r, end:], 0.0)
    assert stopped >= 2
    # One EOS id as an int works too, and a row ending at step 0 has length 1.
    first = generate(
        graphdef, state, *prompts, max_new_tokens=N, eos_ids=int(tokens[2, 0]), pad_id=PAD
    )
    assert first.lengths[2] == 1 and (np.asarray(first.tokens[2, 1:]) == PAD).all()


def test_no_recompilation_within_a_bucket(model, prompts):
    graphdef, state = nnx.split(model)
    ids, mask = prompts
    generate(graphdef, state, ids, mask, max_new_tokens=5, pad_id=PAD)
    before = sampling.GENERATE.cache_size()
    # Shorter prompt, another max_new_tokens in the same buckets (8, 8), other EOS ids.
    generate(
        graphdef,
        state,
        ids[:, 2:],
        mask[:, 2:] | (np.arange(5) >= 2),
        max_new_tokens=8,
        eos_ids=(5, 9, 11),
        pad_id=PAD,
    )
    assert sampling.GENERATE.cache_size() == before
    generate(
        graphdef,
        state,
        ids,
        mask,
        jax.random.key(0),
        max_new_tokens=6,
        temperature=0.7,
        top_p=0.9,
        pad_id=PAD,
    )
    sampled = sampling.GENERATE.cache_size()
    assert sampled <= before + 1  # sampling is one more program (maybe compiled earlier)
    # Temperature, top_p and the key are traced values.
    generate(
        graphdef,
        state,
        ids,
        mask,
        jax.random.key(1),
        max_new_tokens=3,
        temperature=1.3,
        top_p=0.5,
        pad_id=PAD,
    )
    assert sampling.GENERATE.cache_size() == sampled
    # A new adapter value reuses the program too (split_lora state).
    lora_model = nnx.clone(model)
    apply_lora(lora_model, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(0))
    lg, lora, base = split_lora(lora_model)
    out0 = generate(lg, (lora, base), ids, mask, max_new_tokens=N, pad_id=PAD)
    count = sampling.GENERATE.cache_size()
    bumped = jax.tree.map(lambda x: x + 0.3, lora)
    out1 = generate(lg, (bumped, base), ids, mask, max_new_tokens=N, pad_id=PAD)
    assert sampling.GENERATE.cache_size() == count
    assert not np.allclose(out0.logprobs, out1.logprobs)


def test_sampling_is_deterministic_per_key_and_tiny_top_p_is_greedy(model, prompts):
    graphdef, state = nnx.split(model)
    kw = dict(max_new_tokens=N, temperature=1.0, top_p=0.95, pad_id=PAD)
    a = generate(graphdef, state, *prompts, jax.random.key(7), **kw)
    b = generate(graphdef, state, *prompts, jax.random.key(7), **kw)
    c = generate(graphdef, state, *prompts, jax.random.key(8), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    greedy = generate(graphdef, state, *prompts, max_new_tokens=N, pad_id=PAD)
    tiny_p = generate(
        graphdef,
        state,
        *prompts,
        jax.random.key(7),
        max_new_tokens=N,
        temperature=1.0,
        top_p=1e-6,
        pad_id=PAD,
    )
    np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)
    np.testing.assert_allclose(tiny_p.logprobs, greedy.logprobs, atol=1e-6)


@pytest.mark.slow  # compiles a 3-stage decode loop (~10-30 s on 2 shared cores)
def test_dropping_finished_rows_changes_nothing(model, monkeypatch):
    monkeypatch.setattr(sampling, "MIN_ROWS", 2)
    assert sampling._stage_sizes(8) == (8, 4, 2) and sampling._stage_sizes(6) == (6, 3)
    graphdef, state = nnx.split(model)
    ids, mask = tiny.left_padded_batch(128, [7, 3, 5, 6, 2, 7, 4, 1], 7, seed=9, pad_id=PAD)
    kw = dict(max_new_tokens=12, temperature=1.0, pad_id=PAD)
    free = generate(graphdef, state, ids, mask, jax.random.key(2), compact=False, **kw)
    # EOS ids that end most rows early and at different steps, so the batch shrinks.
    eos = tuple(int(t) for t in np.asarray(free.tokens)[[0, 1, 2, 3, 4], [1, 3, 2, 5, 8]])
    full = generate(graphdef, state, ids, mask, jax.random.key(2), compact=False, eos_ids=eos, **kw)
    assert int((np.asarray(full.lengths) < 12).sum()) >= 5
    compact = generate(
        graphdef, state, ids, mask, jax.random.key(2), compact=True, eos_ids=eos, **kw
    )
    np.testing.assert_array_equal(compact.tokens, full.tokens)
    np.testing.assert_array_equal(compact.lengths, full.lengths)
    np.testing.assert_allclose(compact.logprobs, full.logprobs, atol=1e-5)


def _nucleus_probs(logits, temperature, top_p):
    """HF's TopPLogitsWarper after temperature, in numpy: the target distribution."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = np.zeros_like(p, bool)
    keep[order[(cum - p[order]) < top_p]] = True
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize("top_k", [64, 3])  # 3 forces the exact full-vocabulary fallback
def test_nucleus_sampling_distribution(monkeypatch, top_k):
    monkeypatch.setattr(next_token, "TOP_K_CANDIDATES", top_k)
    logits = np.array([2.0, 1.5, 1.4, 0.3, 0.2, -1.0, 0.9, -3.0, 1.1, 0.0], np.float32)
    temperature, top_p, n = 0.8, 0.85, 20000
    keys = jax.random.split(jax.random.key(0), n // 4)
    batch = jnp.tile(jnp.asarray(logits)[None], (4, 1))

    @jax.jit
    def draw(key):
        tok, lp = next_token.select_tokens(
            batch,
            jax.random.split(key, 4),
            temperature=jnp.float32(temperature),
            top_p=jnp.float32(top_p),
            greedy=False,
            use_top_p=True,
        )
        return tok, lp

    tokens, logps = jax.vmap(draw)(keys)
    freq = np.bincount(np.asarray(tokens).ravel(), minlength=10) / n
    expected = _nucleus_probs(logits, temperature, top_p)
    assert (freq[expected == 0] == 0).all()
    np.testing.assert_allclose(freq, expected, atol=0.015)
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))[np.asarray(tokens)]
    np.testing.assert_allclose(logps, ref, atol=1e-6)


def test_nucleus_threshold_matches_sorted_cumsum():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(1000, 0.1), size=4).astype(np.float32)
    for top_p in (0.3, 0.9, 0.999):
        tau = np.asarray(next_token.nucleus_threshold(jnp.asarray(probs), jnp.float32(top_p)))
        for r in range(4):
            order = np.argsort(-probs[r], kind="stable")
            cum = np.cumsum(probs[r][order], dtype=np.float64)
            size = int(np.sum((cum - probs[r][order]) < top_p))
            assert int((probs[r] >= tau[r]).sum()) == size


def test_blocked_inverse_cdf_matches_searchsorted():
    rng = np.random.default_rng(1)
    w = rng.random((3, 700)).astype(np.float32) * (rng.random((3, 700)) < 0.3)
    u = rng.random(3).astype(np.float32) * w.sum(-1)
    out = np.asarray(next_token.blocked_inverse_cdf(jnp.asarray(w), jnp.asarray(u)))
    ref = [np.searchsorted(np.cumsum(w[r], dtype=np.float64), u[r], side="right") for r in range(3)]
    np.testing.assert_array_equal(out, ref)
    assert (w[np.arange(3), out] > 0).all()


def test_bucket_length_golden():
    assert [bucket_length(n) for n in (1, 8, 9, 33, 64, 65, 130)] == [8, 8, 16, 64, 64, 128, 192]
    with pytest.raises(ValueError, match="positive"):
        bucket_length(0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.5), "key"),
        (dict(layer_loop="python"), "layer_loop"),
    ],
)
def test_bad_arguments(model, prompts, kwargs, match):
    graphdef, state = nnx.split(model)
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(graphdef, state, *prompts, **kwargs)


def test_bad_prompts(model, prompts):
    graphdef, state = nnx.split(model)
    ids, mask = prompts
    with pytest.raises(ValueError, match="left-padded"):
        generate(graphdef, state, ids, mask[:, ::-1], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(graphdef, state, ids, mask[:, 1:], max_new_tokens=4)
    holes = mask.copy()
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="left-padded"):
        generate(graphdef, state, ids, holes, max_new_tokens=4)
