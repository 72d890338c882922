"""The runner CLI: config file + command-line overrides, on a tiny saved model with the
real SPEAR client algorithm."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments.configs import demo
from tests.federated import fixtures

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run_demo(
    workdir: pathlib.Path, overrides: dict[str, object], **env: str
) -> subprocess.CompletedProcess:
    """``python -m experiments.run`` on the demo config with ``overrides``, on CPU; it
    must succeed."""
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=experiments/configs/demo.py",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]
    environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **env)
    result = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _tiny(model_dir: pathlib.Path) -> dict[str, object]:
    """Overrides that shrink the demo config to one round of seconds on the tiny model."""
    return {
        "model.path": str(model_dir),
        "model.lora.rank": 2,
        "fl.rounds": 1,
        "data.limit": 32,
        "rollout.prompts_per_client": 2,
        "rollout.max_new_tokens": 4,
        "algorithm.max_revisions": 1,
        "local.steps": 1,
        "local.batch_size": 2,
        "local.max_len": 128,
        "eval.examples": 4,
        "eval.max_new_tokens": 4,
        "eval.batch_size": 4,
        "log.tensorboard": False,
    }


@pytest.mark.slow
def test_runner_applies_overrides_and_prints_the_table(tmp_path):
    model_dir = fixtures.save_tiny_model(tmp_path / "model")
    workdir = tmp_path / "run"
    result = _run_demo(workdir, {**_tiny(model_dir), "fl.backend": "loop"})
    lines = result.stdout.splitlines()
    assert lines[0] == "round  accuracy  time (s)"
    rows = [line.split() for line in lines[1:3]]
    assert [row[0] for row in rows] == ["0", "1"]
    assert all(float(row[2]) > 0 for row in rows)
    assert lines[-1] == f"run directory: {workdir}"
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["fl"]["rounds"] == 1 and saved["model"]["path"] == str(model_dir)
    assert saved["data"]["num_clients"] == demo.get_config().data.num_clients
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["rounds"] == 1 and set(summary["accuracy_by_round"]) == {"0", "1"}
    # The round's wall time is the sum of its phases (plus bookkeeping between them),
    # and the first round of a process compiles.
    record = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][1]
    parts = sum(record[f"time/{k}_s"] for k in ("rollout", "train", "server", "eval"))
    assert parts <= record["time_s"] <= parts + 1.0
    assert 0 < record["time/compile_s"] < record["time_s"]
    assert summary["time_by_round"]["1"] == record["time_s"]
    assert "round 1: " in result.stderr and "of which compiling" in result.stderr


@pytest.mark.slow
def test_a_second_run_loads_its_programs_and_repeats_the_numbers(tmp_path):
    # The demo's layout (vmap backend, clients one at a time) on the tiny model, twice,
    # with an empty compilation cache: the second process loads the sampler and the
    # training program (`fedsp.executables`) instead of tracing and compiling them.
    model_dir = fixtures.save_tiny_model(tmp_path / "model")
    overrides = {**_tiny(model_dir), "log.progress": False}
    runs = []
    for name in ("first", "second"):
        workdir = tmp_path / name
        _run_demo(workdir, overrides, FEDSP_COMPILATION_CACHE=str(tmp_path / "cache"))
        records = [
            json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
        ]
        runs.append((json.loads((workdir / "summary.json").read_text())["compile"], records))
    (first, first_records), (second, second_records) = runs
    stored = list((tmp_path / "cache" / "executables").glob("*.xla"))
    assert first["cache_hits"] == 0 and len(stored) >= 3  # 2+ sampler programs, training
    assert second["cache_hits"] >= len(stored) and second["cache_misses"] == 0
    assert second["background_s"] > 0  # prefetched while the model loaded
    assert second["trace_s"] < first["trace_s"] / 3
    for a, b in zip(first_records, second_records, strict=True):
        numbers = lambda r: {k: v for k, v in r.items() if not k.startswith("time")}  # noqa: E731
        assert numbers(a) == numbers(b)


def test_runner_rejects_unknown_override(tmp_path):
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=experiments/configs/demo.py",
        f"--workdir={tmp_path}",
        "--config.fl.roundz=3",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "roundz" in result.stderr
