"""Simulated faults: dropout and Byzantine attacks are deterministic from (seed, round,
client), poison exactly what they say, and reach the round's record."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import fedsp
from fedsp.federated import RoundHooks, faults
from tests.federated import fixtures


def test_dropout_draws_are_fixed_by_seed_round_and_client():
    clients = np.arange(2000)
    a = faults.returns(clients, 0.3, 7, 5)
    np.testing.assert_array_equal(a, faults.returns(clients, 0.3, 7, 5))
    assert 0.27 < 1 - a.mean() < 0.33
    # A client's draw does not depend on who else was sampled.
    np.testing.assert_array_equal(faults.returns(clients[100:110], 0.3, 7, 5), a[100:110])
    assert not np.array_equal(a, faults.returns(clients, 0.3, 7, 6))
    assert faults.returns(clients[:3], 0.0, 7, 5).all()


def test_byzantine_clients_are_a_fixed_fraction():
    ids = faults.byzantine_clients(20, 0.25, 3)
    assert len(ids) == 5 and len(set(ids)) == 5
    np.testing.assert_array_equal(ids, faults.byzantine_clients(20, 0.25, 3))
    assert len(faults.byzantine_clients(20, 0.0, 3)) == 0


@pytest.mark.parametrize("kind", faults.ATTACKS)
def test_attacks_match_numpy(kind):
    rng = np.random.default_rng(0)
    server = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    stacked = {"w": rng.normal(size=(5, 3, 4)).astype(np.float32)}
    bad = np.asarray([False, True, False, False, True])
    out = np.asarray(faults.attack_uploads(server, stacked, bad, kind, 3.0, jax.random.key(0))["w"])
    x, s = stacked["w"], server["w"]
    np.testing.assert_array_equal(out[~bad], x[~bad])
    d = x - s[None]
    honest = d[~bad]
    want = {
        "sign_flip": s - 3.0 * d[bad],
        "scale": s + 3.0 * d[bad],
        "shift_mean": np.broadcast_to(s + honest.mean(0) - 3.0 * honest.std(0), d[bad].shape),
    }
    if kind in want:
        np.testing.assert_allclose(out[bad], want[kind], rtol=1e-5, atol=1e-5)
    elif kind == "nan":
        assert np.isnan(out[bad]).all()
    else:
        noise = out[bad] - s[None]
        assert 1.5 < noise.std() < 4.5 and not np.allclose(noise[0], noise[1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()][1:]


def test_a_run_drops_and_poisons_as_drawn(model_dir, tmp_path):
    config = fixtures.tiny_config(model_dir, fl__rounds=4)
    config.fl.dropout = 0.4
    config.fl.min_clients = 3
    config.fl.byzantine.fraction = 0.25
    config.fl.byzantine.attack = "sign_flip"
    config.fl.byzantine.scale = 2.0
    seen = {}

    def on_uploads(rnd, uploads):
        seen[rnd] = uploads

    fedsp.run(
        config,
        tmp_path / "a",
        hooks=RoundHooks(on_uploads=on_uploads),
        algorithm=fixtures.StandInAlgorithm(),
    )
    fedsp.run(config, tmp_path / "b", algorithm=fixtures.StandInAlgorithm())
    a, b = _records(tmp_path / "a" / "metrics.jsonl"), _records(tmp_path / "b" / "metrics.jsonl")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time", "compile"))}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    attacker = int(faults.byzantine_clients(4, 0.25, config.seed)[0])
    skipped = 0
    for r in a:
        sampled = sorted(r["clients"] + r["dropped"])
        back = faults.returns(np.asarray(sampled), 0.4, config.seed, r["round"])
        assert sorted(r["dropped"]) == [k for k, ok in zip(sampled, back) if not ok]
        assert r["byzantine"] == ([attacker] if attacker in r["clients"] else [])
        if len(r["clients"]) < 3:
            skipped += 1
            assert r["server_step_skipped"] and r["server/update_norm"] == 0.0
    assert skipped >= 1 and any(r["dropped"] for r in a)

    # Round 1 starts from the same θ_0 with or without attackers: the attacker's upload
    # is its honest one, sign-flipped and doubled; the others' are untouched.
    uploads = {}
    for name, fraction in (("honest", 0.0), ("attacked", 0.25)):
        one = fixtures.tiny_config(model_dir, fl__rounds=1)
        one.fl.byzantine.fraction, one.fl.byzantine.scale = fraction, 2.0
        fedsp.run(
            one,
            tmp_path / name,
            hooks=RoundHooks(on_uploads=lambda rnd, u, name=name: uploads.setdefault(name, u)),
            algorithm=fixtures.StandInAlgorithm(),
        )
    theta0 = fedsp.init_run(one).params
    clients = uploads["attacked"].clients.tolist()
    assert attacker in clients
    for got, want, s0 in zip(
        jax.tree.leaves(uploads["attacked"].params),
        jax.tree.leaves(uploads["honest"].params),
        jax.tree.leaves(theta0),
    ):
        got, want, s0 = np.asarray(got), np.asarray(want), np.asarray(s0)
        for row, k in enumerate(clients):
            expected = s0 - 2.0 * (want[row] - s0) if k == attacker else want[row]
            np.testing.assert_allclose(got[row], expected, rtol=1e-5, atol=1e-6)
