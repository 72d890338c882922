"""`LocalFederation` runs a Flower App on a real localhost deployment, and survives a
SuperNode's death.

The App is `tests/flower/toy_app`: its ServerApp sends an array (zeros at first) to
every SuperNode each round and keeps the mean of the replies; each ClientApp adds its
partition id. With partitions 0 and 1 the array is 0.5 after round 1 and 1.0 after
round 2. The ServerApp writes what it saw to a JSON file (`result-path`) after every
round, including what the ClientApps and itself read from an environment variable
given to `LocalFederation`: the SuperNode's environment reaches its ClientApps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from fedsp.flower.deploy import LocalFederation

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parent / "toy_app"
ECHO = "FEDSP_TOY_ECHO"


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _processes_with_home(home: Path) -> list[int]:
    """Processes whose environment has ``FLWR_HOME=home``: all those the federation ran."""
    needle = f"FLWR_HOME={home.resolve()}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def test_two_rounds_on_two_nodes(tmp_path):
    home, result_path, pythonpath = tmp_path / "flwr", tmp_path / "result.json", tmp_path / "lib"
    pythonpath.mkdir()
    env = {ECHO: "echo from the test", "PYTHONPATH": str(pythonpath)}
    with LocalFederation(APP, 2, home=home, env=env) as federation:
        assert len(set(federation.node_ids)) == 2
        assert len(_processes_with_home(home)) >= 4  # SuperLink, 2 SuperNodes, SuperExecs
        done = federation.run({"result-path": str(result_path)}, timeout=120)
    assert _processes_with_home(home) == []

    result = _read(result_path)
    assert result is not None and result["done"], done.stdout
    assert sorted(result["node_ids"]) == sorted(federation.node_ids)
    assert [r["arrays"] for r in result["rounds"]] == [[[0.5] * 3], [[1.0] * 3]]
    for r in result["rounds"]:
        assert r["replied_nodes"] == sorted(federation.node_ids)
        assert r["partition_ids"] == [0, 1]
        assert r["errors"] == []
        assert r["client_env"] == [env[ECHO]] * 2
        assert r["client_pythonpath"] == [env["PYTHONPATH"]] * 2
    assert result["server_env"] == env[ECHO]
    # The ServerApp's stdout is streamed to `flwr run --stream`.
    assert "toy server: round 2: 2 of 2 replies" in done.stdout


def test_run_finishes_without_a_killed_node(tmp_path):
    home, result_path = tmp_path / "flwr", tmp_path / "result.json"
    run_config = {
        "result-path": str(result_path),
        # Round 2's replies take 4 s: SuperNode 1 is killed before it answers, and
        # the ServerApp stops waiting for it after 12 s.
        "client-sleep-s": 4.0,
        "sleep-from-round": 2,
        "reply-timeout-s": 12.0,
    }
    with LocalFederation(APP, 2, home=home) as federation:
        run = federation.start_run(run_config)
        deadline = time.monotonic() + 60
        while not ((result := _read(result_path)) and result["rounds"]):
            assert run.poll() is None, federation.logs()
            assert time.monotonic() < deadline, federation.logs()
            time.sleep(0.1)
        federation.kill_node(1)
        done = federation.wait(run, timeout=90)
    assert _processes_with_home(home) == []

    result = _read(result_path)
    assert result is not None and result["done"], done.stdout
    first, second = result["rounds"]
    assert first["replied_nodes"] == sorted(federation.node_ids)
    assert first["arrays"] == [[0.5] * 3]
    # Within the timeout the SuperLink still lists the dead node as online: no error
    # reply, just no reply.
    assert second["replied_nodes"] == [federation.node_ids[0]]
    assert second["partition_ids"] == [0]
    assert second["errors"] == []
    assert second["arrays"] == [[0.5] * 3]  # 0.5 + partition id 0
    assert second["seconds"] >= 12
