"""Batched rollouts across clients equal per-client rollouts with the same keys."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from fedsp.data import Hint
from fedsp.selfplay import get_algorithm, rollout
from tests.selfplay.conftest import make_config


def sampling_params(**fields) -> rollout.SamplingParams:
    """The default config's rollout settings with ``fields`` changed."""
    return dataclasses.replace(rollout.SamplingParams.from_config(make_config()), **fields)


@pytest.fixture(scope="module")
def client_prompts(policy, task):
    examples = task.load("train", limit=3, seed=0)
    # Client 1 repeats client 0's first prompt: same prompt, different key, own sample.
    clients = [[examples[0], examples[1]], [examples[0], examples[2]]]
    return [[rollout.prompt_ids(policy.tokenizer, task, ex) for ex in exs] for exs in clients]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (1.0, 0.9)])
def test_batched_rollout_equals_per_client_rollout(
    policy, split_model, client_prompts, temperature, top_p
):
    lora = split_model[1]
    params = sampling_params(max_new_tokens=5, temperature=temperature, top_p=top_p)
    key = jax.random.key(11)
    flat = [p for ps in client_prompts for p in ps]
    clients, prompts = [0, 0, 1, 1], [0, 1, 0, 1]
    batched = rollout.sample_completions(
        policy, lora, flat, rollout.rollout_keys(key, 3, 0, clients, prompts), params
    )
    for c, ps in enumerate(client_prompts):
        alone = rollout.sample_completions(
            policy, lora, ps, rollout.rollout_keys(key, 3, 0, [c, c], [0, 1]), params
        )
        for i, out in enumerate(alone):
            np.testing.assert_array_equal(out.tokens, batched[2 * c + i].tokens)
            np.testing.assert_allclose(out.logprobs, batched[2 * c + i].logprobs, atol=1e-4)
            assert out.text == batched[2 * c + i].text
    # Order within the batch does not matter either.
    order = [3, 1, 2, 0]
    shuffled = rollout.sample_completions(
        policy,
        lora,
        [flat[j] for j in order],
        rollout.rollout_keys(key, 3, 0, [clients[j] for j in order], [prompts[j] for j in order]),
        params,
    )
    for j, out in zip(order, shuffled):
        np.testing.assert_array_equal(out.tokens, batched[j].tokens)
    if temperature == 0.0:  # greedy: the repeated prompt gives the same reply
        np.testing.assert_array_equal(batched[0].tokens, batched[2].tokens)
    else:  # sampled: its own key gives it its own sample
        assert not np.array_equal(batched[0].tokens, batched[2].tokens)


def test_split_head_golden():
    assert rollout.split_head([5, 2, 7, 2, 9], [2]) == 2  # up to the first end of turn
    assert rollout.split_head([5, 7, 2], [2, 3]) == 0  # nothing would follow it
    assert rollout.split_head([5, 7, 9], [2]) == 0 and rollout.split_head([3, 1], (2, 3)) == 1


def test_shared_prompt_heads_change_no_sample(policy, split_model, client_prompts, monkeypatch):
    """Every chat prompt starts with the same system turn: the sampler gets it once per
    call as a shared prefix, and the samples equal prefilling each whole prompt."""
    tok, lora = policy.tokenizer, split_model[1]
    flat = [p for ps in client_prompts for p in ps]
    heads = {tuple(p[: rollout.split_head(p, tok.eos_token_ids)]) for p in flat}
    (head,) = heads
    assert 10 < len(head) < min(len(p) for p in flat) and head[-1] in tok.eos_token_ids
    params = sampling_params(max_new_tokens=5, temperature=1.0, top_p=0.9)
    keys = rollout.rollout_keys(jax.random.key(2), 1, 0, [0, 0, 1, 1], [0, 1, 0, 1])
    calls, real = [], rollout.sampling.generate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("prefix_ids"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rollout.sampling, "generate", spy)
    shared = rollout.sample_completions(policy, lora, flat, keys, params)
    assert calls and all(c is not None and c.shape[0] == 1 for c in calls)
    monkeypatch.setattr(rollout, "split_head", lambda prompt, eos_ids: 0)
    whole = rollout.sample_completions(policy, lora, flat, keys, params)
    assert calls[-1] is None
    for a, b in zip(shared, whole):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_spear_collect_with_the_real_sampler(policy, split_model, task):
    config = make_config(**{"rollout.max_new_tokens": 4})
    algo = get_algorithm("spear", config)
    clients = [task.load("train", limit=2, seed=1), task.load("train", limit=1, seed=2)]
    batch, metrics = algo.collect(
        policy, split_model[1], clients, task, Hint(task), jax.random.key(0), 1
    )
    again, _ = algo.collect(policy, split_model[1], clients, task, Hint(task), jax.random.key(0), 1)
    # A random model answers nothing right: 3 first answers and 2 revisions each.
    assert metrics["rollout/generated"] == 9 and metrics["rollout/wins"] == 0
    np.testing.assert_array_equal(batch.wrong, [2, 1])
    for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(again)):  # deterministic
        np.testing.assert_array_equal(a, b)


def test_one_call_for_mixed_lengths_and_the_same_samples_as_split_calls(
    policy, split_model, client_prompts, monkeypatch
):
    """Prompts of different length buckets share one sampler call, padded to the longest
    one's bucket; splitting them by bucket (``split_by_length``) changes no sample."""
    tok, lora = policy.tokenizer, split_model[1]
    short = client_prompts[0][0]
    cut = rollout.split_head(short, tok.eos_token_ids)
    long = short + tok.encode(" and then some more words" * 12)  # > 64 tokens after the head
    prompts = [short, long, client_prompts[0][1]]
    widths = {rollout.sampling.bucket_length(len(p) - cut) for p in prompts}
    assert len(widths) == 2
    keys = rollout.rollout_keys(jax.random.key(5), 1, 0, [0, 0, 1], [0, 1, 0])
    calls, real = [], rollout.sampling.generate

    def spy(graphdef, state, ids, mask, *args, **kwargs):
        calls.append(ids.shape)
        return real(graphdef, state, ids, mask, *args, **kwargs)

    monkeypatch.setattr(rollout.sampling, "generate", spy)
    params = sampling_params(max_new_tokens=5, temperature=1.0, top_p=0.9)
    merged = rollout.sample_completions(policy, lora, prompts, keys, params)
    assert calls == [(4, max(widths))]  # 3 rows padded to 4, the longest bucket
    split = rollout.sample_completions(
        policy,
        lora,
        prompts,
        keys,
        sampling_params(max_new_tokens=5, temperature=1.0, top_p=0.9, split_by_length=True),
    )
    assert sorted(calls[1:]) == [(1, max(widths)), (2, min(widths))]
    for a, b in zip(merged, split):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_revisions_reuse_the_first_answers_keys_and_values(policy, split_model, task, monkeypatch):
    """SPEAR keeps the first call's keys/values and its revisions continue from them: a
    revision prefills only what follows the shared start of its prompt, and the round's
    batch equals the one computed without reuse."""
    clients = [task.load("train", limit=2, seed=1), task.load("train", limit=2, seed=2)]
    calls, real = [], rollout.sampling.generate

    def spy(graphdef, state, ids, mask, *args, **kwargs):
        cache = kwargs.get("prefix_cache")
        calls.append(
            (
                ids.shape[1],
                None if cache is None else int(cache.mask.sum(1).min()),
                kwargs.get("return_cache", False),
            )
        )
        return real(graphdef, state, ids, mask, *args, **kwargs)

    monkeypatch.setattr(rollout.sampling, "generate", spy)
    out = {}
    for reuse in (True, False):
        calls.clear()
        config = make_config(**{"rollout.max_new_tokens": 5, "rollout.reuse_cache": reuse})
        batch, metrics = get_algorithm("spear", config).collect(
            policy, split_model[1], clients, task, Hint(task), jax.random.key(3), 1
        )
        out[reuse] = (batch, metrics, list(calls))
    (b_on, m_on, calls_on), (b_off, m_off, calls_off) = out[True], out[False]
    assert m_on["rollout/generated"] == m_off["rollout/generated"] == 12  # 4 + 2 × 4 revisions
    # First answers: one call that keeps its caches; revisions: calls that continue from
    # them, each cached row holding at least its whole first prompt.
    assert [c[2] for c in calls_on] == [True, False, False]
    first_prompt = min(
        len(rollout.prompt_ids(policy.tokenizer, task, ex)) for exs in clients for ex in exs
    )
    assert all(c[1] is not None and c[1] >= first_prompt - 1 for c in calls_on[1:])
    assert all(c[1] is None and not c[2] for c in calls_off)
    for on, off in zip(calls_on[1:], calls_off[1:]):
        assert on[0] < off[0]  # a narrower prefill
    for a, b in zip(jax.tree.leaves(b_on), jax.tree.leaves(b_off)):
        if np.issubdtype(np.asarray(a).dtype, np.floating):
            np.testing.assert_allclose(a, b, atol=1e-4)
        else:
            np.testing.assert_array_equal(a, b)
