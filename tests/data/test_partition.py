"""Client partitions and per-round client sampling."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from fedsp import data


def _assert_partition(parts, n):
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64 and len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # disjoint and covering
    assert all(np.all(np.diff(p) > 0) for p in parts)  # each sorted


def _mean_label_entropy(parts, labels):
    """Mean over clients of the entropy (nats) of the client's label histogram."""
    labels = np.asarray(labels)
    entropies = []
    for part in parts:
        counts = np.array(list(collections.Counter(labels[part]).values()), dtype=float)
        p = counts / counts.sum()
        entropies.append(-(p * np.log(p)).sum())
    return float(np.mean(entropies))


def test_iid_partition_is_balanced_disjoint_and_deterministic():
    parts = data.iid_partition(103, 10, seed=0)
    _assert_partition(parts, 103)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    assert all(
        np.array_equal(a, b)
        for a, b in zip(parts, data.iid_partition(103, 10, seed=0), strict=True)
    )
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(parts, data.iid_partition(103, 10, seed=1), strict=True)
    )


@pytest.mark.parametrize("num_clients", [0, 11, -1])
def test_iid_partition_bad_num_clients(num_clients):
    with pytest.raises(ValueError, match="num_clients"):
        data.iid_partition(10, num_clients, seed=0)


LABELS = ["add"] * 400 + ["sub"] * 300 + ["mul"] * 200 + ["div"] * 100


def test_dirichlet_partition_covers_and_is_deterministic():
    parts = data.dirichlet_partition(LABELS, 8, alpha=0.5, seed=3)
    _assert_partition(parts, len(LABELS))
    again = data.dirichlet_partition(LABELS, 8, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert min(len(p) for p in parts) >= 1


def test_small_alpha_is_more_skewed_than_large_alpha():
    global_entropy = _mean_label_entropy(
        [np.arange(len(LABELS))], LABELS
    )  # 4 labels 4:3:2:1 -> 1.28 nats
    skewed = np.mean(
        [
            _mean_label_entropy(data.dirichlet_partition(LABELS, 10, 0.05, seed=s), LABELS)
            for s in range(5)
        ]
    )
    mild = np.mean(
        [
            _mean_label_entropy(data.dirichlet_partition(LABELS, 10, 1.0, seed=s), LABELS)
            for s in range(5)
        ]
    )
    near_iid = np.mean(
        [
            _mean_label_entropy(data.dirichlet_partition(LABELS, 10, 1000.0, seed=s), LABELS)
            for s in range(5)
        ]
    )
    assert skewed < 0.4 < mild < near_iid
    assert abs(near_iid - global_entropy) < 0.05


def test_large_alpha_gives_each_client_its_share_of_every_label():
    parts = data.dirichlet_partition(LABELS, 4, alpha=1e4, seed=0)
    labels = np.asarray(LABELS)
    for part in parts:
        counts = collections.Counter(labels[part])
        for label, total in collections.Counter(LABELS).items():
            assert abs(counts[label] - total / 4) <= 0.1 * total / 4 + 2


def test_dirichlet_min_size_is_guaranteed_even_when_redraws_fail():
    # With alpha = 0.01 almost every label lands on one client: redraws cannot reach
    # 5 examples for all 20 clients, so the top-up repair has to.
    labels = ["a"] * 60 + ["b"] * 40
    parts = data.dirichlet_partition(labels, 20, alpha=0.01, seed=0, min_size=5, max_retries=3)
    _assert_partition(parts, 100)
    assert [len(p) for p in parts] == [5] * 20


def test_dirichlet_impossible_or_bad_arguments():
    with pytest.raises(
        ValueError, match=r"num_clients=11 clients with at least 1 example\(s\) each need 11"
    ):
        data.dirichlet_partition(["a"] * 10, 11, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match=r"num_clients=4 clients with at least 3"):
        data.dirichlet_partition(["a"] * 10, 4, alpha=1.0, seed=0, min_size=3)
    for alpha in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            data.dirichlet_partition(["a"] * 10, 2, alpha=alpha, seed=0)
    with pytest.raises(ValueError, match="labels is empty"):
        data.dirichlet_partition([], 2, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="min_size"):
        data.dirichlet_partition(["a"] * 10, 2, alpha=1.0, seed=0, min_size=-1)


def test_dirichlet_over_arithmetic_labels_gives_non_iid_clients():
    examples = data.get_task("arithmetic").load("train", limit=600)
    parts = data.dirichlet_partition([ex.label for ex in examples], 4, alpha=0.1, seed=0)
    _assert_partition(parts, 600)
    shares = [
        max(collections.Counter(examples[i].label for i in p).values()) / len(p) for p in parts
    ]
    assert np.mean(shares) > 0.6  # each client is dominated by one operation (IID would be ~1/3)


def test_key_partition_groups_by_label():
    parts = data.key_partition(["b", "a", "b", "c", "a"])
    assert list(parts) == ["a", "b", "c"]
    assert {k: v.tolist() for k, v in parts.items()} == {"a": [1, 4], "b": [0, 2], "c": [3]}
    _assert_partition(list(parts.values()), 5)
    with pytest.raises(ValueError, match="labels is empty"):
        data.key_partition([])


def test_sample_clients_is_a_function_of_seed_and_round():
    rounds = [data.sample_clients(50, 10, seed=0, round=r) for r in range(200)]
    for r, clients in enumerate(rounds):
        assert clients.dtype == np.int64 and len(set(clients.tolist())) == 10
        assert np.all(np.diff(clients) > 0) and clients.min() >= 0 and clients.max() < 50
        np.testing.assert_array_equal(
            clients, data.sample_clients(50, 10, seed=0, round=r)
        )  # resumable
    assert len({tuple(c) for c in rounds}) > 190  # rounds differ
    assert not np.array_equal(rounds[0], data.sample_clients(50, 10, seed=1, round=0))
    # Uniform: each client takes part in 10/50 of the rounds (binomial sd ~ 5.7 of 40).
    frequency = np.bincount(np.concatenate(rounds), minlength=50)
    assert frequency.sum() == 2000 and frequency.min() > 15 and frequency.max() < 65
    np.testing.assert_array_equal(data.sample_clients(4, 4, seed=9, round=3), np.arange(4))


def test_poisson_sampling_takes_each_client_with_rate_q():
    """Each client independently with q = per_round / num_clients, from (seed, round).

    Deterministic (fixed seed), so the tolerances only have to hold for this draw; they
    are also wide enough for any seed: 8 sd for the overall rate, 5.6 sd per client."""
    q, rounds = 10 / 50, 2000
    drawn = [data.sample_clients(50, 10, 0, r, sampling="poisson") for r in range(rounds)]
    for r in (0, 7, 1999):  # resumable: a function of (seed, round) alone
        np.testing.assert_array_equal(drawn[r], data.sample_clients(50, 10, 0, r, "poisson"))
        assert drawn[r].dtype == np.int64 and np.all(np.diff(drawn[r]) > 0)
    assert not np.array_equal(drawn[0], data.sample_clients(50, 10, 1, 0, "poisson"))
    sizes = np.asarray([len(c) for c in drawn])
    assert len(set(sizes.tolist())) > 5  # the count varies from round to round
    member = np.zeros((rounds, 50), bool)
    for r, clients in enumerate(drawn):
        member[r, clients] = True
    sd = np.sqrt(q * (1 - q) / member.size)
    assert abs(member.mean() - q) < 8 * sd
    assert np.abs(member.mean(axis=0) - q).max() < 0.05  # sd 0.0089 per client
    # Independent clients: two clients take part together at rate q² (sd ≈ 0.0045).
    assert abs((member[:, 0] & member[:, 1]).mean() - q * q) < 0.03
    # A small federation meets empty rounds (P = 0.75⁴ ≈ 0.32 for q = 1/4).
    small = [len(data.sample_clients(4, 1, 3, r, "poisson")) for r in range(200)]
    assert 0.2 < small.count(0) / 200 < 0.45
    np.testing.assert_array_equal(data.sample_clients(4, 4, 9, 3, "poisson"), np.arange(4))
    with pytest.raises(ValueError, match="sampling must be one of"):
        data.sample_clients(4, 2, 0, 0, sampling="bernoulli")


@pytest.mark.parametrize("per_round", [0, 5, 2.0])
def test_sample_clients_bad_clients_per_round(per_round):
    with pytest.raises(
        ValueError, match=r"clients_per_round must be an integer in 1..num_clients=4"
    ):
        data.sample_clients(4, per_round, seed=0, round=0)


def test_sample_clients_bad_num_clients_seed_round():
    with pytest.raises(ValueError, match="num_clients must be a positive integer"):
        data.sample_clients(0, 1, seed=0, round=0)
    with pytest.raises(ValueError, match="seed and round must be >= 0"):
        data.sample_clients(4, 2, seed=0, round=-1)
