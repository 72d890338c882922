"""DP-FedAvg: the clipped, noised mean against numpy, its noise statistics, ε against
``dp_accounting`` used directly, noise calibration, and a run that spends its budget."""

from __future__ import annotations

import json

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

import fedsp
from fedsp.core import privacy
from fedsp.federated import steps
from tests.federated import fixtures


def test_epsilon_matches_dp_accounting():
    # The check: q = 0.01, z = 1.0, T = 1000, δ = 1e-5 gives RDP ε ≈ 2.1.
    poisson = dict(
        num_clients=1000,
        clients_per_round=10,
        noise_multiplier=1.0,
        delta=1e-5,
        sampling="poisson",
    )
    eps = privacy.epsilon(1000, **poisson)
    assert eps == pytest.approx(2.1014, abs=1e-3)
    pld = privacy.epsilon(1000, **poisson, accountant="pld")
    assert 0.5 * eps < pld < eps  # PLD is the tighter analysis
    acc = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    acc.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(100, 4, dp_accounting.GaussianDpEvent(1.3)),
        20,
    )
    ours = privacy.epsilon(
        20, num_clients=100, clients_per_round=4, noise_multiplier=1.3, delta=1e-5
    )
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert (
        privacy.epsilon(0, num_clients=4, clients_per_round=2, noise_multiplier=1.0, delta=1e-5)
        == 0
    )
    assert np.isinf(
        privacy.epsilon(3, num_clients=4, clients_per_round=2, noise_multiplier=0.0, delta=1e-5)
    )


def test_a_run_accounts_the_sampling_it_uses():
    """``fl.sampling = "poisson"``: ε is dp_accounting's Poisson-sampled Gaussian (rate
    q = clients_per_round / num_clients, add-or-remove-one), the calibrated noise meets
    the target under it, and DP-FedAvg still divides by clients_per_round."""
    config = fedsp.default_config()
    config.data.num_clients, config.fl.clients_per_round = 100, 4
    config.fl.dp.clip_norm, config.fl.dp.noise_multiplier = 0.5, 1.3
    config.fl.sampling = "poisson"
    acc = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.04, dp_accounting.GaussianDpEvent(1.3)), 20)
    poisson = steps.privacy_spent(config, 20)
    assert poisson == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    config.fl.sampling = "fixed"
    fixed = steps.privacy_spent(config, 20)
    assert fixed == pytest.approx(
        privacy.epsilon(20, num_clients=100, clients_per_round=4, noise_multiplier=1.3, delta=1e-5),
        rel=1e-12,
    )
    assert fixed != pytest.approx(poisson)

    config.fl.sampling = "poisson"
    config.fl.dp.target_epsilon = 3.0
    dp = fedsp.federated.server.DpSettings.from_config(config)
    assert dp.denominator == 4.0
    assert steps.privacy_spent(config, config.fl.rounds) == pytest.approx(3.0, rel=0.01)


def test_calibrated_noise_just_meets_the_target():
    kw = dict(num_clients=100, clients_per_round=10, delta=1e-5)
    z = privacy.calibrate_noise(4.0, 50, **kw)
    assert privacy.epsilon(50, noise_multiplier=z, **kw) <= 4.0
    assert privacy.epsilon(50, noise_multiplier=0.99 * z, **kw) > 4.0


def test_dp_mean_clips_each_client_and_divides_by_the_fixed_denominator():
    server = {"a": np.ones(2, np.float32), "b": np.zeros((1, 2), np.float32)}
    # Deltas of global norm 10 (clipped to 2) and 1 (kept), and an excluded client.
    stacked = {
        "a": np.asarray([[7.0, 1.0], [1.0, 1.0], [50.0, 50.0]], np.float32),
        "b": np.asarray([[[8.0, 0.0]], [[0.0, 1.0]], [[9.0, 9.0]]], np.float32),
    }
    include = np.asarray([True, True, False])
    out = privacy.dp_mean(
        server,
        stacked,
        include,
        clip_norm=2.0,
        noise_multiplier=0.0,
        denominator=4.0,
        key=jax.random.key(0),
    )
    delta0 = np.asarray([6.0, 0.0, 8.0, 0.0]) * 0.2
    delta1 = np.asarray([0.0, 0.0, 0.0, 1.0])
    want = (delta0 + delta1) / 4.0
    np.testing.assert_allclose(out["a"], 1.0 + want[:2], rtol=1e-6)
    np.testing.assert_allclose(out["b"].reshape(-1), want[2:], rtol=1e-6, atol=1e-7)


def test_dp_noise_has_the_promised_spread():
    server = {"w": np.zeros(200_000, np.float32)}
    stacked = {"w": np.zeros((3, 200_000), np.float32)}
    out = privacy.dp_mean(
        server,
        stacked,
        np.ones(3, bool),
        clip_norm=0.5,
        noise_multiplier=1.2,
        denominator=3.0,
        key=jax.random.key(1),
    )
    noise = np.asarray(out["w"])
    assert noise.std() == pytest.approx(1.2 * 0.5 / 3.0, rel=0.01)
    assert abs(noise.mean()) < 3 * 0.2 / np.sqrt(200_000)


def _dp_config(model_dir, **dp):
    config = fixtures.tiny_config(model_dir, fl__rounds=4, fl__clients_per_round=2)
    config.fl.dp.clip_norm = 0.5
    for key, value in dp.items():
        config.fl.dp[key] = value
    return config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def test_a_dp_run_logs_epsilon_repeats_its_noise_and_stops_at_its_budget(model_dir, tmp_path):
    config = _dp_config(model_dir, noise_multiplier=1.0)
    runs = []
    for name in ("a", "b"):
        fedsp.run(config, tmp_path / name, algorithm=fixtures.StandInAlgorithm())
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs.append([json.loads(line) for line in lines][1:])
    eps = [r["dp/epsilon"] for r in runs[0]]
    assert eps == sorted(eps) and eps[0] > 0
    want = [
        privacy.epsilon(r, num_clients=4, clients_per_round=2, noise_multiplier=1.0, delta=1e-5)
        for r in (1, 2, 3, 4)
    ]
    np.testing.assert_allclose(eps, want, rtol=1e-12)
    # Same seed, same noise: the two runs' server updates agree.
    assert [r["server/update_norm"] for r in runs[0]] == [r["server/update_norm"] for r in runs[1]]

    budget = _dp_config(model_dir, noise_multiplier=1.0, max_epsilon=(want[1] + want[2]) / 2)
    with pytest.raises(RuntimeError, match=r"round 3 would spend ε = .* over fl.dp.max_epsilon"):
        fedsp.run(budget, tmp_path / "c", algorithm=fixtures.StandInAlgorithm())
    assert len((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()) == 3

    target = _dp_config(model_dir, target_epsilon=5.0)
    dp = fedsp.federated.server.DpSettings.from_config(target)
    assert privacy.epsilon(
        4, num_clients=4, clients_per_round=2, noise_multiplier=dp.noise_multiplier, delta=1e-5
    ) == pytest.approx(5.0, rel=0.01)
