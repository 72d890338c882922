"""The federated round (`fedsp.run_round`) and the run loop (`fedsp.run`) on a tiny random
model with the real SmolLM2 tokenizer."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedsp
from fedsp import data as data_lib
from fedsp.federated import RoundHooks, client_prompts, server
from fedsp.selfplay import get_algorithm
from tests.federated import fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


class Recorder:
    """A server-step hook: keeps every round's inputs (θ_r, opt state, uploads) and
    outputs; ``hooks`` passes it to `fedsp.run`."""

    def __init__(self):
        self.calls = []
        self.hooks = RoundHooks(server_step=self.wrap)

    def wrap(self, step):
        def recorded(params, opt_state, uploads):
            out = step(params, opt_state, uploads)
            self.calls.append(((params, opt_state, uploads), jax.tree.map(np.asarray, out)))
            return out

        return recorded


def run(config, workdir, recorder=None, **kwargs):
    return fedsp.run(config, workdir, hooks=recorder.hooks if recorder else None, **kwargs)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _history(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_server_result_is_weighted_mean_of_distinct_clients(model_dir, tmp_path):
    recorder = Recorder()
    config = fixtures.tiny_config(model_dir)
    summary = run(config, tmp_path / "run", recorder, algorithm=fixtures.StandInAlgorithm())
    assert len(recorder.calls) == 2
    (server_params, _, uploads), (new_params, _, diag) = recorder.calls[0]
    client_params = uploads.params
    n = np.asarray(uploads.stats["num_examples"], np.float64)
    expected_w = n / n.sum()
    np.testing.assert_allclose(diag["weights"], expected_w, rtol=1e-6)
    clients = _leaves(client_params)
    for got, stacked in zip(_leaves(new_params), clients):
        want = np.tensordot(expected_w, stacked.astype(np.float64), axes=1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # Every client trained its own copy: no two clients share parameters.
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.allclose(clients[0][a], clients[0][b])
    assert not np.allclose(_leaves(new_params)[0], _leaves(server_params)[0])
    history = _history(tmp_path / "run")
    assert [r["round"] for r in history] == [0, 1, 2]
    assert summary["rounds"] == 2 and summary["initial_accuracy"] == history[0]["eval/accuracy"]
    assert (tmp_path / "run" / "summary.json").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["fl"]["rounds"] == 2


def test_server_inputs_hold_no_text(model_dir, tmp_path, monkeypatch):
    recorder = Recorder()
    seen = []
    monkeypatch.chdir(tmp_path)  # a relative workdir, as `make demo` passes
    hooks = RoundHooks(
        on_uploads=lambda rnd, uploads: seen.append((rnd, uploads)), server_step=recorder.wrap
    )
    summary = fedsp.run(
        fixtures.tiny_config(model_dir, fl__rounds=1),
        "run",
        hooks=hooks,
        algorithm=fixtures.StandInAlgorithm(),
    )
    assert summary["workdir"] == str(tmp_path / "run")
    inputs, _ = recorder.calls[0]
    # Everything a client sends (adapters, counts, advantages, loss stats) is an array.
    for leaf in jax.tree.leaves(inputs):
        assert isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float)), type(leaf)
    # on_uploads saw the same uploads the server step got, with the clients' ids.
    [(rnd, uploads)] = seen
    assert rnd == 1 and uploads is inputs[2]
    np.testing.assert_array_equal(uploads.clients, _history(tmp_path / "run")[1]["clients"])
    assert set(uploads.stats) >= {"num_examples", "mean_advantage", "baseline", "loss"}
    with pytest.raises(TypeError, match=r"client_params\['feedback'\] is a str"):
        server.check_arrays_only("client_params", {"w": jnp.ones(2), "feedback": "wrong"})


def test_nan_client_is_rejected_and_round_completes(model_dir, tmp_path):
    recorder = Recorder()
    algo = fixtures.StandInAlgorithm(poison=((1, 2),))
    summary = run(fixtures.tiny_config(model_dir), tmp_path / "run", recorder, algorithm=algo)
    history = _history(tmp_path / "run")
    first = history[1]
    assert first["rejected"] == [first["clients"][2]]
    assert first["weights"][2] == 0.0 and abs(sum(first["weights"]) - 1.0) < 1e-6
    assert not first["server_step_skipped"]
    _, (new_params, _, diag) = recorder.calls[0]
    assert all(np.isfinite(x).all() for x in _leaves(new_params))
    np.testing.assert_array_equal(diag["finite"], [True, True, False, True])
    assert summary["rejected_updates"] == 1 and history[2]["rejected"] == []


def test_pruned_clients_send_nothing_and_empty_round_is_skipped(model_dir, tmp_path):
    recorder = Recorder()
    # Every advantage is 0 in a client's first round, so a threshold above 0 prunes all.
    config = fixtures.tiny_config(model_dir, fl__rounds=1, fl__prune_threshold=0.5)
    run(config, tmp_path / "run", recorder, algorithm=fixtures.StandInAlgorithm())
    record = _history(tmp_path / "run")[1]
    (server_params, *_), (new_params, _, _) = recorder.calls[0]
    adapter_bytes = server.tree_bytes(server_params)
    assert record["server_step_skipped"] and record["pruned"] == record["clients"]
    assert record["bytes_sent"] == 0 and record["bytes_saved"] == 4 * adapter_bytes
    for a, b in zip(_leaves(new_params), _leaves(server_params)):
        np.testing.assert_array_equal(a, b)


def _assert_resume_is_exact(config, algorithm, tmp_path, recorder=None):
    recorder = recorder or Recorder()
    run(config, tmp_path / "full", recorder, algorithm=algorithm)
    full_params = recorder.calls[-1][1][0]
    recorder.calls.clear()
    with pytest.raises(fixtures.Killed):
        run(config, tmp_path / "resumed", recorder, algorithm=fixtures.KilledAt(algorithm, 2))
    # A kill may leave a log line of the unfinished round; the resume must drop it.
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"round": 2, "partial": True}) + "\n")
    run(config, tmp_path / "resumed", recorder, algorithm=algorithm)
    assert len(recorder.calls) == config.fl.rounds  # round 1, then 2.. after the resume
    for a, b in zip(_leaves(recorder.calls[-1][1][0]), _leaves(full_params)):
        np.testing.assert_array_equal(a, b)

    def strip(history):
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in history]

    full, resumed = _history(tmp_path / "full"), _history(tmp_path / "resumed")
    assert strip(resumed) == strip(full)
    return full


def test_resume_after_kill_matches_uninterrupted_run(model_dir, tmp_path):
    config = fixtures.tiny_config(
        model_dir,
        fl__rounds=3,
        fl__server_optimizer="fedadam",
        fl__server_lr=0.1,
        fl__client_weighting="advantage",
    )
    full = _assert_resume_is_exact(config, fixtures.StandInAlgorithm(), tmp_path)
    # Baselines were restored and used: round 2 advantages are not all zero.
    assert any(a != 0.0 for a in full[2]["client_advantage"])


@pytest.mark.slow  # ≈ 35-60 s on 2 cores, nearly all of it compiling the sampler and train step
def test_resume_after_kill_matches_uninterrupted_run_with_real_spear(
    model_dir, tmp_path, monkeypatch
):
    """The real SPEAR client (sampler, revisions, packing, jitted AdamW steps) through a
    kill after round 1: bit-exact. Every draw is a function of (seed, round, client) and
    the resumed round runs the same executables on the restored bits, so nothing is left
    to a tolerance."""
    monkeypatch.setattr(
        data_lib, "get_feedback", lambda name, task, **kw: fixtures.CoinFlipUser(task)
    )
    config = fixtures.tiny_config(
        model_dir,
        fl__rounds=2,
        fl__server_optimizer="fedadam",
        fl__server_lr=0.1,
        fl__client_weighting="advantage",
        data__limit=32,
        rollout__prompts_per_client=2,
        rollout__max_new_tokens=4,
        algorithm__max_revisions=1,
        local__steps=2,
        local__batch_size=2,
        local__max_len=128,
        local__lr=1e-2,
        local__warmup_ratio=0.0,
    )
    recorder = Recorder()
    full = _assert_resume_is_exact(
        config, get_algorithm("spear", config), tmp_path, recorder=recorder
    )
    # The comparison is not vacuous: clients won, trained and moved the server adapters in
    # both rounds, and round 2 used the restored baselines (advantages not all zero).
    assert all(r["collect/rollout/wins"] > 0 and r["client/trained"] > 0 for r in full[1:])
    assert any(a != 0.0 for a in full[2]["client_advantage"])
    # recorder.calls: round 1 of the killed run, round 2 of the resumed one.
    params = [recorder.calls[0][0][0]] + [out[0] for _, out in recorder.calls]
    for before, after in itertools.pairwise(params):
        assert any(not np.array_equal(a, b) for a, b in zip(_leaves(before), _leaves(after)))


def test_resume_with_other_settings_names_the_field(model_dir, tmp_path):
    config = fixtures.tiny_config(model_dir, fl__rounds=1)
    run(config, tmp_path / "run", algorithm=fixtures.StandInAlgorithm())
    config.local.lr = 1e-3
    with pytest.raises(ValueError, match=r"local\.lr"):
        run(config, tmp_path / "run", algorithm=fixtures.StandInAlgorithm())


@pytest.mark.parametrize("backend", ["vmap", "pmap", "vmap, one client at a time"])
def test_backends_give_the_loop_result(model_dir, tmp_path, backend):
    recorder = Recorder()
    run(
        fixtures.tiny_config(model_dir, fl__rounds=1),
        tmp_path / "loop",
        recorder,
        algorithm=fixtures.StandInAlgorithm(),
    )
    at_once = {"fl__clients_at_once": 1} if "at a time" in backend else {}
    run(
        fixtures.tiny_config(model_dir, fl__rounds=1, fl__backend=backend.split(",")[0], **at_once),
        tmp_path / "other",
        recorder,
        algorithm=fixtures.StandInAlgorithm(),
    )
    reference, other = recorder.calls[0][1][0], recorder.calls[1][1][0]
    for a, b in zip(_leaves(reference), _leaves(other)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_client_prompts_depend_only_on_seed_round_client():
    shard = np.arange(10, 30)
    a = client_prompts(shard, 5, seed=0, round=3, client=1)
    np.testing.assert_array_equal(a, client_prompts(shard, 5, seed=0, round=3, client=1))
    assert not np.array_equal(a, client_prompts(shard, 5, seed=0, round=4, client=1))
    assert len(set(a.tolist())) == 5 and set(a.tolist()) <= set(shard.tolist())
    small = client_prompts(np.array([7, 8]), 5, seed=0, round=1, client=0)
    assert len(small) == 5 and set(small.tolist()) <= {7, 8}
