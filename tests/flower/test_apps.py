"""fedsp's Flower apps in one process (`LocalGrid`): the wire codec, the privacy
invariant of every reply, and the simulator's numbers from a federation of nodes."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

import fedsp
from fedsp.flower import client, records, server, settings
from tests.federated import fixtures
from tests.flower.configs import TINY, write_config
from tests.flower.local_grid import LocalGrid


def test_trees_round_trip_exactly_with_bfloat16():
    tree = {
        "a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "b": [np.asarray([1.5, -2.25], ml_dtypes.bfloat16), np.int32(7)],
    }
    back = records.record_to_tree(records.tree_to_record(tree), tree)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        assert np.asarray(x).dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), y)
    assert set(records.tree_to_record(tree)) == {"['a']['w']", "['b'][0]", "['b'][1]"}


def test_a_record_of_another_tree_is_an_error_naming_the_leaf():
    tree = {"w": np.zeros((2, 3), np.float32)}
    with pytest.raises(ValueError, match=r"params\['w'\]: got float32\[3, 2\]"):
        records.record_to_tree(
            records.tree_to_record({"w": np.zeros((3, 2), np.float32)}), tree, name="params"
        )
    with pytest.raises(ValueError, match=r"missing leaves \[\"\['w'\]\"\]"):
        records.record_to_tree(records.tree_to_record({"v": tree["w"]}), tree)


def test_check_reply_refuses_text():
    ok = RecordDict({"a": records.tree_to_record({"w": np.ones(2)}), "m": MetricRecord({"x": 1.0})})
    records.check_reply(ok, {"x"})
    with pytest.raises(TypeError, match="ConfigRecord"):
        records.check_reply(RecordDict({"c": ConfigRecord({"text": "the answer is 4"})}))
    with pytest.raises(TypeError, match="unexpected metric keys"):
        records.check_reply(RecordDict({"m": MetricRecord({"y": 1.0})}), {"x"})
    with pytest.raises(TypeError, match="metric 'text' is not a number"):
        records.metrics_record({"text": "4"})


def test_overrides_and_node_config_errors_name_the_field(tmp_path):
    path = write_config(tmp_path, TINY)
    config = settings.load_config(path, "fl.rounds=3 algorithm.name=spear")
    assert config.fl.rounds == 3 and config.algorithm.name == "spear"
    with pytest.raises(ValueError, match=r"no config field 'fl\.roundz'"):
        settings.load_config(path, "fl.roundz=3")
    with pytest.raises(ValueError, match="no config file"):
        settings.load_config(tmp_path / "missing.py")
    with pytest.raises(ValueError, match="partition-id=2 is not a client"):
        settings.node_client(config, {"partition-id": 2})
    with pytest.raises(ValueError, match="num-partitions=3 differs"):
        settings.node_client(config, {"partition-id": 0, "num-partitions": 3})
    with pytest.raises(ValueError, match="min-clients must be >= 1"):
        settings.FederationSettings.from_run_config({"min-clients": 0})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _records(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _simulate_and_serve(tmp_path: pathlib.Path, fields: dict) -> tuple:
    """The config of ``fields`` run by the simulator (``tmp_path/sim``) and served to two
    nodes holding clients 1 and 0 (``tmp_path/fl``, min-clients 1): (config, both runs'
    records, the grid)."""
    path = write_config(tmp_path, fields)
    config = settings.load_config(path)
    fedsp.run(config, tmp_path / "sim")
    run_config = {"config": str(path), "workdir": str(tmp_path / "fl"), "min-clients": 1}
    grid = LocalGrid(run_config, [{"partition-id": k} for k in (1, 0)])
    server.serve(grid, run_config)
    return config, _records(tmp_path / "sim"), _records(tmp_path / "fl"), grid


def _numbers(record: dict) -> dict:
    # Wall times and rollout diagnostics (per-node means on the federation) differ.
    skip = ("time", "collect/", "compile")
    return {k: v for k, v in record.items() if not k.startswith(skip)}


def _final_params(config, workdir):
    return fedsp.init_run(config, workdir=workdir).params


@pytest.mark.parametrize(
    "algorithm,prune", [("grpo", False), ("grpo", True), ("tpaw", False), ("spear", False)]
)
def test_federation_gives_the_simulators_numbers(model_dir, tmp_path, algorithm, prune):
    """GRPO, TPAW with its player pool on the server (players go out as arrays), and
    SPEAR, whose tiny-model clients train on nothing (no correct answer) and so send no
    adapters."""
    fields = dict(TINY, **{"model.path": str(model_dir), "algorithm.name": algorithm})
    if prune:
        # The tiny model's clients all have advantage 0 (no reward yet): all are pruned.
        fields["fl.prune_threshold"] = 0.5
    config, sim, fl, grid = _simulate_and_serve(tmp_path, fields)
    assert len(sim) == len(fl) == 3
    for a, b in zip(sim, fl):
        assert _numbers(a) == _numbers(b)
    silent = prune or algorithm == "spear"  # clients with weight 0 (no example: spear)
    assert [r["pruned"] for r in fl[1:]] == ([[0, 1]] * 2 if silent else [[]] * 2)
    if algorithm == "tpaw":  # round 2's nodes played the pool's rounds 0 and 1
        assert [r["collect/players/count"] for r in fl[1:]] == [1.0, 2.0]
    a_params = _final_params(config, tmp_path / "sim")
    b_params = _final_params(config, tmp_path / "fl")
    for x, y in zip(jax.tree.leaves(a_params), jax.tree.leaves(b_params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # Privacy on the wire: every reply holds arrays and numbers only, under fixed keys;
    # a pruned client's adapters never leave its node.
    stat_keys = {k.removeprefix("client/") for k in fl[1] if k.startswith("client/")}
    sent = []
    for reply in grid.replies:
        records.check_reply(reply.content)
        assert set(reply.content) <= {"node", "stats", "collect", "time", "adapters"}
        if "stats" in reply.content:
            assert set(reply.content["stats"]) == stat_keys | {"finite"}
        sent.append("adapters" in reply.content)
    assert sum(sent) == (0 if silent else 4)
    upload = [r["collect/wire/upload_bytes"] for r in fl[1:]]
    adapters = fl[1]["bytes_sent"] + fl[1]["bytes_saved"]
    assert all(u < adapters / 2 if silent else u > adapters for u in upload)


def test_simulated_stragglers_are_not_asked_and_the_numbers_are_the_simulators(model_dir, tmp_path):
    """``fl.straggler`` on a federation: the server draws the stragglers as the simulator
    does and does not ask their nodes; the others' slots are counted without them, so
    records and adapters are the simulator's. Seed 5: client 0 misses round 2's deadline,
    and client 1 plays slot 0."""
    fields = dict(TINY, **{"model.path": str(model_dir), "seed": 5})
    fields.update({"fl.straggler.deadline": 1.5, "fl.straggler.jitter": 0.5})
    config, sim, fl, grid = _simulate_and_serve(tmp_path, fields)
    assert [_numbers(r) for r in sim] == [_numbers(r) for r in fl]
    assert [(r["clients"], r["stragglers"]) for r in fl[1:]] == [([0, 1], []), ([1], [0])]
    assert grid.trained == {1: 2, 2: 1}  # node 2 (client 0) was not asked in round 2
    for x, y in zip(
        jax.tree.leaves(_final_params(config, tmp_path / "sim")),
        jax.tree.leaves(_final_params(config, tmp_path / "fl")),
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pruning_before_upload_keeps_whom_the_server_step_keeps():
    rng = np.random.default_rng(0)
    config = fedsp.default_config()
    config.fl.client_weighting = "advantage"
    config.fl.prune_threshold = 0.0
    params = {"w": np.zeros((3,), np.float32)}
    optimizer = fedsp.federated.default_optimizer(config.fl)
    for _ in range(20):
        n = rng.integers(0, 3, 6).astype(np.float32)
        adv = rng.normal(size=6).astype(np.float32)
        adv[rng.random(6) < 0.2] = np.nan
        finite = rng.random(6) > 0.2
        stacked = {
            "w": np.where(finite[:, None], 1.0, np.nan).astype(np.float32)
            * np.ones((6, 3), np.float32)
        }
        _, _, diag = fedsp.federated.server_step(
            params,
            optimizer.init(params),
            stacked,
            n,
            adv,
            optimizer=optimizer,
            mode="advantage",
            threshold=0.0,
        )
        keep = server.upload_mask(config.fl, {"num_examples": n, "mean_advantage": adv}, finite)
        np.testing.assert_array_equal(keep, np.asarray(diag["keep"]))


def test_a_lost_node_fails_the_round_by_min_clients_and_a_rerun_resumes(model_dir, tmp_path):
    fields = dict(TINY, **{"model.path": str(model_dir)})
    path = write_config(tmp_path, fields)
    config = settings.load_config(path)
    fedsp.run(config, tmp_path / "sim")
    nodes = [{"partition-id": 0}, {"partition-id": 1}]

    # Node 2 answers round 1, then is gone: with min-clients 1 round 2 goes on without it.
    run_config = {"config": str(path), "workdir": str(tmp_path / "one"), "node-timeout": 0.2}
    server.serve(LocalGrid(run_config, nodes, kill_after={2: 1}), run_config)
    fl = _records(tmp_path / "one")
    assert fl[1]["dropped"] == [] and fl[2]["dropped"] == [1] and fl[2]["clients"] == [0]
    assert fl[2]["bytes_sent"] == fl[1]["bytes_sent"] // 2

    # With min-clients 2 round 2 fails, naming the client; rerun with both nodes resumes
    # after round 1 and ends with the simulator's adapters.
    run_config = dict(run_config, workdir=str(tmp_path / "two"), **{"min-clients": 2})
    with pytest.raises(
        RuntimeError, match=r"round 2: 1 of 2 sampled clients .* Missing clients \[1\]"
    ):
        server.serve(LocalGrid(run_config, nodes, kill_after={2: 1}), run_config)
    assert len(_records(tmp_path / "two")) == 2
    server.serve(LocalGrid(run_config, nodes), run_config)
    sim, fl = _records(tmp_path / "sim"), _records(tmp_path / "two")
    assert [_numbers(r) for r in sim] == [_numbers(r) for r in fl]
    for x, y in zip(
        jax.tree.leaves(_final_params(config, tmp_path / "sim")),
        jax.tree.leaves(_final_params(config, tmp_path / "two")),
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_node_keeps_only_its_shard_and_refuses_another_config(model_dir, tmp_path):
    path = write_config(tmp_path, dict(TINY, **{"model.path": str(model_dir)}))
    config = settings.load_config(path)
    whole = fedsp.init_run(config).run
    node = client.load_node({"config": str(path)}, {"partition-id": 1})
    own = node.state.run
    assert [ex.uid for ex in own.train] == [whole.train[i].uid for i in whole.shards[1]]
    assert [len(s) for s in own.shards] == [0, len(whole.shards[1])]
    for rnd in (1, 2, 3):
        mine = fedsp.federated.client_prompts(own.shards[1], 2, config.seed, rnd, 1)
        theirs = fedsp.federated.client_prompts(whole.shards[1], 2, config.seed, rnd, 1)
        assert [own.train[i].uid for i in mine] == [whole.train[i].uid for i in theirs]

    other = settings.fingerprint(settings.load_config(path, "fl.rounds=5 local.lr=0.5"))
    spec = ConfigRecord(
        {
            "round": 1,
            "client": 1,
            "slot": 0,
            "baseline": float("nan"),
            "upload": 1,
            "fingerprint": json.dumps(other),
        }
    )
    content = RecordDict({"params": records.tree_to_record(node.state.params), "round": spec})
    with pytest.raises(
        ValueError, match=r"differs from the server's in \['fl.rounds', 'local.lr'\]"
    ):
        node.train(content)
    with pytest.raises(ValueError, match="train message for client 0 reached client 1"):
        node.train(RecordDict({"round": ConfigRecord(dict(spec, client=0))}))


def test_a_client_that_withholds_its_adapters_is_dropped_not_averaged_as_theta(model_dir, tmp_path):
    path = write_config(tmp_path, dict(TINY, **{"model.path": str(model_dir)}))
    run_config = {"config": str(path), "workdir": str(tmp_path / "fl")}
    grid = LocalGrid(run_config, [{"partition-id": 0}, {"partition-id": 1}], withhold=[2])
    server.serve(grid, run_config)
    fl = _records(tmp_path / "fl")
    assert [(r["clients"], r["dropped"]) for r in fl[1:]] == [([0], [1])] * 2
    assert all(r["bytes_sent"] == fl[1]["bytes_sent"] and r["weights"] == [1.0] for r in fl[1:])
