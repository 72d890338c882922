"""``python -m experiments.plan``: its flags, the architectures it knows, one run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from flax import nnx

from experiments.plan import MODEL_CONFIGS, model_config, parse_mesh
from fedsp.model.transformer import Transformer
from tests.model import tiny

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("name", "parameters"),
    # The model cards' counts: 1.54B, 3.21B, 8.03B, 135M.
    [
        ("Qwen/Qwen2.5-1.5B", 1_543_714_304),
        ("meta-llama/Llama-3.2-3B", 3_212_749_824),
        ("meta-llama/Llama-3.1-8B", 8_030_261_248),
        ("", 134_515_008),
    ],
)
def test_known_architectures_have_their_parameter_counts(name, parameters):
    config = model_config(name, None)
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model))) == parameters
    assert name in MODEL_CONFIGS


def test_model_config_sources(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny.tiny_hf_config("qwen2")))
    assert model_config(str(tmp_path), None).model_type == "qwen2"
    # --model_config wins over model.path, and may name a config.json file.
    assert model_config("", str(tmp_path / "config.json")).model_type == "qwen2"
    with pytest.raises(ValueError, match=r"model\.path='/no/such/model': no config\.json"):
        model_config("/no/such/model", None)
    with pytest.raises(ValueError, match="--model_config='nowhere'"):
        model_config("Qwen/Qwen2.5-1.5B", "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        model_config(str(empty), None)


def test_parse_mesh():
    assert parse_mesh("3,2") == (3, 2)
    assert parse_mesh("auto,4") == ("auto", 4)
    assert parse_mesh(None) is None
    for bad in ("3", "3,2,1", "a,b", "-1,2"):
        with pytest.raises(ValueError, match="--mesh: expected C,M"):
            parse_mesh(bad)


def test_command_line_plans_a_config(tmp_path):
    out = tmp_path / "plan.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # the command sets the CPU device count itself
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.plan",
            "--config=experiments/configs/demo.py",
            "--topology=cpu:2",
            "--mesh=2,1",
            "--programs=server",
            f"--json={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "mesh (clients, model) = (2, 1)" in result.stdout
    assert "per device: fits" in result.stdout
    (record,) = (json.loads(line) for line in out.read_text().splitlines())
    assert record["config"] == "experiments/configs/demo.py" and record["fits"]
    assert [p["name"] for p in record["programs"]] == ["server"]
