"""Robust aggregators: golden values against numpy on the kept clients, parity with
Flower's own implementations, and a sign-flipping minority against the honest mean."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flwr.server.strategy import aggregate as flower

import fedsp
from fedsp.core import robust
from fedsp.core.aggregation import server_optimizer
from fedsp.federated import ClientUploads, default_optimizer, server_step_from_config
from fedsp.federated.server import RobustSettings, server_step


def _tree(rng, c):
    return {
        "a": rng.normal(size=(c, 3, 2)).astype(np.float32),
        "b": rng.normal(size=(c, 5)).astype(np.float32),
    }


def _leaves_of(tree, k):
    return [np.asarray(tree["a"][k]), np.asarray(tree["b"][k])]


@pytest.mark.parametrize("seed", range(5))
def test_masked_aggregators_are_numpy_on_the_kept_clients(seed):
    rng = np.random.default_rng(seed)
    c = 7
    tree = _tree(rng, c)
    keep = rng.random(c) > 0.3
    keep[:3] = True
    kept = {k: v[keep] for k, v in tree.items()}
    n = int(keep.sum())
    weights = np.where(keep, rng.random(c) + 0.1, 0.0).astype(np.float32)

    med = robust.masked_median(tree, jnp.asarray(keep))
    for k in tree:
        np.testing.assert_allclose(med[k], np.median(kept[k], axis=0), rtol=1e-6)

    trim = int(np.floor(0.2 * n))
    tm = robust.masked_trimmed_mean(tree, jnp.asarray(keep), 0.2)
    for k in tree:
        s = np.sort(kept[k], axis=0)
        np.testing.assert_allclose(tm[k], s[trim : n - trim].mean(axis=0), rtol=1e-5, atol=1e-6)

    wm = robust.weighted_mean_of(tree, jnp.asarray(weights))
    for k in tree:
        want = np.tensordot(weights, tree[k], axes=1) / weights.sum()
        np.testing.assert_allclose(wm[k], want, rtol=1e-5, atol=1e-6)

    # Krum by its definition, in numpy.
    flat = np.concatenate([tree["a"].reshape(c, -1), tree["b"]], axis=1)[keep]
    d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    f = 1
    m = max(1, n - f - 2)
    scores = np.array([np.sort(np.delete(d[i], i))[:m].sum() for i in range(n)])
    got = np.asarray(robust.krum_scores(tree, jnp.asarray(keep), f))
    np.testing.assert_allclose(got[keep], scores, rtol=1e-4)
    assert np.all(np.isinf(got[~keep]))
    best = np.flatnonzero(keep)[np.argmin(scores)]
    kr = robust.krum(tree, jnp.asarray(keep), jnp.asarray(weights), f)
    for k in tree:
        np.testing.assert_array_equal(kr[k], tree[k][best])


def test_norm_bounded_mean_clips_each_delta():
    server = {"w": np.zeros(2, np.float32)}
    stacked = {"w": np.asarray([[3.0, 4.0], [0.3, 0.4]], np.float32)}  # norms 5 and 0.5
    out = robust.norm_bounded_mean(server, stacked, jnp.asarray([1.0, 1.0]), 1.0)
    np.testing.assert_allclose(out["w"], [(0.6 + 0.3) / 2, (0.8 + 0.4) / 2], rtol=1e-6)


def test_same_results_as_flowers_aggregators():
    rng = np.random.default_rng(0)
    c = 6
    tree = _tree(rng, c)
    n_examples = rng.integers(1, 9, c)
    results = [(_leaves_of(tree, k), int(n_examples[k])) for k in range(c)]
    keep = jnp.ones(c, bool)
    w = jnp.asarray(n_examples, jnp.float32)

    for ours, theirs in (
        (robust.masked_median(tree, keep), flower.aggregate_median(results)),
        (robust.masked_trimmed_mean(tree, keep, 0.2), flower.aggregate_trimmed_avg(results, 0.2)),
        (robust.krum(tree, keep, w, 1), flower.aggregate_krum(results, 1, 0)),
        (robust.krum(tree, keep, w, 1, 3), flower.aggregate_krum(results, 1, 3)),
    ):
        for got, want in zip([ours["a"], ours["b"]], theirs):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["trimmed_mean", "median", "krum", "multi_krum"])
def test_a_sign_flipping_quarter_and_a_nan_client_leave_the_round_near_the_honest_one(name):
    rng = np.random.default_rng(1)
    c, honest = 12, 8
    server = {"w": np.zeros(16, np.float32)}
    direction = rng.normal(size=16).astype(np.float32)
    updates = direction[None] + 0.1 * rng.normal(size=(c, 16)).astype(np.float32)
    updates[honest : honest + 3] *= -10.0  # three sign-flipped, scaled attackers (25%)
    updates[-1] = np.nan  # and one broken client (rejected)
    stacked = {"w": updates}
    opt = server_optimizer("fedavg", 1.0)
    n = np.ones(c, np.float32)
    adv = np.zeros(c, np.float32)
    honest_mean = updates[:honest].mean(axis=0)

    def step(robust_settings):
        new, _, diag = server_step(
            server, opt.init(server), stacked, n, adv, optimizer=opt, robust=robust_settings
        )
        assert not bool(np.asarray(diag["finite"])[-1])
        return np.asarray(new["w"])

    settings = RobustSettings(name=name, trim_fraction=0.3, krum_byzantine=3, multi_krum_keep=4)
    robust_err = np.linalg.norm(step(settings) - honest_mean)
    mean_err = np.linalg.norm(step(RobustSettings()) - honest_mean)
    assert mean_err > 2 * np.linalg.norm(direction)  # the mean lands at -2 × direction
    assert robust_err < 0.3 * np.linalg.norm(direction), (robust_err, mean_err)


def test_robust_aggregate_names_are_checked():
    with pytest.raises(ValueError, match="aggregator must be one of"):
        robust.robust_aggregate("mode", {}, {}, jnp.ones(1), jnp.ones(1, bool))
    x = {"w": jnp.asarray([[1.0, 2.0], [3.0, 6.0]])}
    out = robust.robust_aggregate(
        "mean", {"w": jnp.zeros(2)}, x, jnp.asarray([1.0, 3.0]), jnp.ones(2, bool)
    )
    np.testing.assert_allclose(out["w"], [2.5, 5.0])


def test_the_config_reaches_the_server_step():
    config = fedsp.default_config()
    config.fl.aggregator = "median"
    opt = default_optimizer(config.fl)
    rng = np.random.default_rng(2)
    params = {"w": np.zeros(4, np.float32)}
    stacked = {"w": rng.normal(size=(5, 4)).astype(np.float32)}
    uploads = ClientUploads(
        clients=np.arange(5),
        params=stacked,
        stats={"num_examples": np.ones(5, np.float32), "mean_advantage": np.zeros(5, np.float32)},
    )
    new, _, _ = server_step_from_config(config.fl, opt)(params, opt.init(params), uploads)
    np.testing.assert_allclose(new["w"], np.median(stacked["w"], axis=0), rtol=1e-6)
