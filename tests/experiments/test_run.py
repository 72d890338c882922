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


@pytest.mark.slow
def test_runner_applies_overrides_and_prints_the_table(tmp_path):
    model_dir = fixtures.save_tiny_model(tmp_path / "model")
    workdir = tmp_path / "run"
    overrides = {
        "model.path": str(model_dir),
        "model.lora.rank": 2,
        "fl.rounds": 1,
        "fl.backend": "loop",
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
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=experiments/configs/demo.py",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "round  accuracy"
    assert [line.split()[0] for line in lines[1:3]] == ["0", "1"]
    assert lines[-1] == f"run directory: {workdir}"
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["fl"]["rounds"] == 1 and saved["model"]["path"] == str(model_dir)
    assert saved["data"]["num_clients"] == demo.get_config().data.num_clients
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["rounds"] == 1 and set(summary["accuracy_by_round"]) == {"0", "1"}


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
