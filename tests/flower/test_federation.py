"""fedsp's Flower App (`flower_app/`) on a real localhost deployment: a SuperLink and two
SuperNodes as separate processes, each node one client that reads only its own shard.

The 2-round run gives the simulator's records and adapters bit for bit. Then a node is
killed during a run: with ``min-clients`` 2 the round fails, naming the missing client;
running again with ``min-clients`` 1 resumes after the last checkpoint and finishes the
run with the remaining client, the lost one in each round's ``dropped``.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np
import pytest

import fedsp
from fedsp.flower import settings
from fedsp.flower.deploy import LocalFederation
from tests.federated import fixtures
from tests.flower.configs import TINY, write_config

pytestmark = pytest.mark.slow

APP = pathlib.Path(__file__).resolve().parents[2] / "flower_app"


def _records(workdir: pathlib.Path) -> list[dict]:
    file = workdir / "metrics.jsonl"
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _numbers(record: dict) -> dict:
    skip = ("time", "collect/", "compile")
    return {k: v for k, v in record.items() if not k.startswith(skip)}


def test_localhost_federation(tmp_path):
    model_dir = fixtures.save_tiny_model(tmp_path / "model")
    path = write_config(tmp_path, dict(TINY, **{"model.path": str(model_dir), "fl.rounds": 2}))
    config = settings.load_config(path)
    fedsp.run(config, tmp_path / "sim")
    sim = _records(tmp_path / "sim")

    nodes = [{"partition-id": k, "num-partitions": 2} for k in (0, 1)]
    with LocalFederation(APP, 2, node_configs=nodes, home=tmp_path / "flwr") as federation:
        start = time.perf_counter()
        federation.run({"config": str(path), "workdir": str(tmp_path / "fl")}, timeout=600)
        print(f"2-round localhost run: {time.perf_counter() - start:.1f} s")
        fl = _records(tmp_path / "fl")
        assert [_numbers(r) for r in fl] == [_numbers(r) for r in sim]
        for x, y in zip(
            jax.tree.leaves(fedsp.init_run(config, workdir=tmp_path / "sim").params),
            jax.tree.leaves(fedsp.init_run(config, workdir=tmp_path / "fl").params),
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        print(
            "bytes on the wire per round (down, up):",
            [(r["collect/wire/download_bytes"], r["collect/wire/upload_bytes"]) for r in fl[1:]],
        )

        # A node dies after round 1 of a 3-round run.
        lost = {
            "config": str(path),
            "overrides": "fl.rounds=3",
            "workdir": str(tmp_path / "lost"),
            "min-clients": 2,
            "reply-timeout": 20.0,
            "node-timeout": 5.0,
        }
        run = federation.start_run(lost)
        deadline = time.monotonic() + 300
        while len(_records(tmp_path / "lost")) < 2:
            assert time.monotonic() < deadline, federation.logs()
            assert run.poll() is None, federation.logs()
            time.sleep(0.2)
        federation.kill_node(1)
        with pytest.raises(RuntimeError) as failed:
            federation.wait(run, timeout=300)
        assert "min-clients is 2. Missing clients [1]" in str(failed.value) + federation.logs(400)
        done = len(_records(tmp_path / "lost"))
        assert done in (2, 3)  # round 2 may have finished before the node was gone

        federation.run(dict(lost, **{"min-clients": 1}), timeout=300)
        records = _records(tmp_path / "lost")
        assert [r["round"] for r in records] == [0, 1, 2, 3]
        assert records[-1]["dropped"] == [1] and records[-1]["clients"] == [0]
        assert records[1]["dropped"] == [] and records[1]["clients"] == [0, 1]
