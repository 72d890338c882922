"""Simulated faults: dropout, stragglers and Byzantine attacks are deterministic from
(seed, round, client), drop or poison exactly what they say, and reach the round's
record; a Poisson-sampled run with stragglers resumes exactly."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import fedsp
from fedsp import data as data_lib
from fedsp.federated import RoundHooks, faults
from fedsp.federated.clients import placeable_clients
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


def test_straggler_times_are_fixed_by_seed_round_and_client():
    clients = np.arange(2000)
    times = faults.simulated_times(clients, 0.5, 0.3, 7, 5)
    np.testing.assert_array_equal(times, faults.simulated_times(clients, 0.5, 0.3, 7, 5))
    # A client's time does not depend on who else was sampled.
    some = np.asarray([1999, 5, 17])
    np.testing.assert_array_equal(faults.simulated_times(some, 0.5, 0.3, 7, 5), times[some])
    # Its speed is its own for the whole run; only the jitter changes between rounds.
    speeds = faults.client_speeds(clients, 0.5, 7)
    np.testing.assert_array_equal(faults.client_speeds(some, 0.5, 7), speeds[some])
    for rnd in (1, 9):
        np.testing.assert_array_equal(faults.simulated_times(clients, 0.5, 0.0, 7, rnd), 1 / speeds)
    assert not np.array_equal(times, faults.simulated_times(clients, 0.5, 0.3, 7, 6))
    assert not np.array_equal(speeds, faults.client_speeds(clients, 0.5, 8))
    # Log-normal of median 1 with the configured σ (sd of each estimate below ≈ 0.01).
    jitter = times * speeds
    assert abs(np.log(speeds).std() - 0.5) < 0.05 and abs(np.log(jitter).std() - 0.3) < 0.03
    assert abs(np.median(times) - 1.0) < 0.08
    np.testing.assert_array_equal(faults.simulated_times(clients, 0.0, 0.0, 7, 5), 1.0)


def test_arrivals_leave_out_stragglers_and_dropouts():
    config = fedsp.default_config()
    config.seed, config.fl.dropout = 7, 0.2
    config.fl.straggler.speed_spread, config.fl.straggler.jitter = 0.5, 0.3
    clients = np.arange(500)
    back = faults.returns(clients, 0.2, 7, 3)
    # Deadline 0 (the default): nobody straggles, only dropouts stay away.
    waits_for_all = faults.arrivals(config, clients, 3)
    assert waits_for_all.stragglers == [] and waits_for_all.times is None
    np.testing.assert_array_equal(waits_for_all.returns, back)
    assert waits_for_all.dropouts == clients[~back].tolist()

    config.fl.straggler.deadline = 1.2
    arrival = faults.arrivals(config, clients, 3)
    times = faults.simulated_times(clients, 0.5, 0.3, 7, 3)
    np.testing.assert_array_equal(arrival.times, times)
    late = back & (times > 1.2)  # a dropout is not also a straggler
    assert arrival.stragglers == clients[late].tolist()
    assert arrival.dropouts == clients[~back].tolist()
    np.testing.assert_array_equal(arrival.returns, back & ~late)
    assert 0.15 < late.mean() < 0.45 and arrival.wait == 1.2
    # Independent of who else was sampled.
    subset = faults.arrivals(config, clients[::7], 3)
    np.testing.assert_array_equal(subset.returns, arrival.returns[::7])
    # Everyone in time: the server waits for the slowest client only.
    config.fl.dropout, config.fl.straggler.deadline = 0.0, 100.0
    fast = faults.arrivals(config, clients[:10], 3)
    assert fast.returns.all() and fast.stragglers == [] and fast.wait == times[:10].max()


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


def test_a_poisson_run_with_stragglers_drops_them_and_resumes_exactly(model_dir, tmp_path):
    """Poisson sampling, dropouts and stragglers on the vmap backend (a 2-device clients
    axis: a round of 1 client is padded to 2), killed in round 2 and resumed from the
    checkpoint after round 1: the records and final adapters of the uninterrupted run.
    Seed 110 draws rounds of 4, 4 and 0 sampled clients, of which 1, 2 and 0 deliver."""
    config = fixtures.tiny_config(
        model_dir,
        fl__rounds=3,
        fl__clients_per_round=2,
        fl__backend="vmap",
        fl__sampling="poisson",
        fl__dropout=0.2,
    )
    config.seed = 110
    config.fl.straggler.deadline = 1.5
    config.fl.straggler.speed_spread, config.fl.straggler.jitter = 0.5, 0.3
    seen = {}
    hooks = RoundHooks(on_uploads=lambda rnd, uploads: seen.setdefault(rnd, uploads))
    fedsp.run(config, tmp_path / "full", hooks=hooks, algorithm=fixtures.StandInAlgorithm())
    with pytest.raises(fixtures.Killed):
        fedsp.run(
            config,
            tmp_path / "resumed",
            algorithm=fixtures.KilledAt(fixtures.StandInAlgorithm(), 2),
        )
    fedsp.run(config, tmp_path / "resumed", algorithm=fixtures.StandInAlgorithm())

    full = _records(tmp_path / "full" / "metrics.jsonl")
    resumed = _records(tmp_path / "resumed" / "metrics.jsonl")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time", "compile"))}  # noqa: E731
    assert [strip(r) for r in resumed] == [strip(r) for r in full]
    finals = [
        fedsp.init_run(config, workdir=tmp_path / name, algorithm=fixtures.StandInAlgorithm())
        for name in ("full", "resumed")
    ]
    for a, b in zip(jax.tree.leaves(finals[0].params), jax.tree.leaves(finals[1].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Round 1's lone client was padded to the 2-device clients axis; the loop backend
    # (no padding) trains it to the same adapters.
    assert placeable_clients(finals[0].run, 1) == 2
    config.fl.backend = "loop"
    fedsp.run(config, tmp_path / "loop", algorithm=fixtures.StandInAlgorithm())
    loop = fedsp.init_run(config, workdir=tmp_path / "loop", algorithm=fixtures.StandInAlgorithm())
    for a, b in zip(jax.tree.leaves(loop.params), jax.tree.leaves(finals[0].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

    for r in full:
        sampled = data_lib.sample_clients(4, 2, config.seed, r["round"], "poisson")
        arrival = faults.arrivals(config, sampled, r["round"])
        assert sorted(r["clients"] + r["dropped"]) == sampled.tolist()
        assert r["clients"] == sampled[arrival.returns].tolist()
        # A straggler's update never reached the server: it is dropped and named.
        assert r["stragglers"] == arrival.stragglers
        assert set(r["stragglers"]) <= set(r["dropped"]) - set(arrival.dropouts)
        assert len(r["straggler_times"]) == len(r["stragglers"])
        assert all(t > 1.5 for t in r["straggler_times"]) and r["sim/round_s"] == arrival.wait
        assert seen[r["round"]].clients.tolist() == r["clients"]
    assert [len(r["clients"]) for r in full] == [1, 2, 0]
    assert full[0]["stragglers"] and full[1]["stragglers"] and full[0]["dropped"]
    # The empty round skips its server step; the others step with the clients in time.
    assert [r["server_step_skipped"] for r in full] == [False, False, True]
    assert full[2]["weights"] == [] and full[2]["loss"] is None
