"""Every experiment config loads, and validates apart from the model weights it names."""

from __future__ import annotations

import importlib
import pathlib

import pytest

from experiments.configs import reference, selfplay_reference
from fedsp import config as config_lib

CONFIGS = sorted(
    p
    for p in pathlib.Path(__file__).resolve().parents[2].glob("experiments/configs/**/*.py")
    if p.stem not in ("__init__",)
)


def _module(path: pathlib.Path):
    parts = path.relative_to(path.parents[len(path.parts) - path.parts.index("experiments") - 1])
    return importlib.import_module(".".join(parts.with_suffix("").parts))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates(path, tmp_path):
    module = _module(path)
    if not hasattr(module, "get_config"):
        return
    config = module.get_config()
    if config.model.path:
        # Paper configs name Hugging Face weights that are not on this machine.
        config.model.path = str(tmp_path)
    try:
        config_lib.validate(config)
    except ValueError as err:
        # The shared data folder lacks some paper splits (e.g. ARC train), which then
        # come from the hub (`fedsp[data]`); any other problem is a config bug.
        problems = str(err).splitlines()[1:]
        assert all("is not on disk" in line for line in problems), str(err)


def test_reference_values_are_copied():
    config = reference.spear_config("strategyqa", "qwen2p5_1p5b")
    assert (
        config.local.lr,
        config.local.lr_min,
        config.algorithm.tail_tokens,
        config.algorithm.rho,
        config.fl.clients_per_round,
        config.rollout.prompts_per_client,
        config.seed,
    ) == (1e-4, 5e-5, 24, 4.0, 5, 80, 43)
    math = reference.spear_config("math", "llama3p2_3b")
    assert (math.local.batch_size, math.rollout.max_new_tokens, math.local.lr) == (16, 512, 5.05e-5)
    assert math.model.lora.layers == tuple(range(-28, 0))
    central = reference.centralized_config("arc_challenge", "llama3p2_3b")
    assert (central.data.num_clients, central.data.examples_per_client) == (1, 50 * 400)


def test_selfplay_reference_values_are_copied():
    tpaw = selfplay_reference.selfplay_config("tpaw", "gsm8k", "qwen2p5_1p5b")
    assert (
        tpaw.algorithm.eta,
        tpaw.algorithm.gamma,
        tpaw.algorithm.n_max,
        tpaw.algorithm.opponent_rounds,
        tpaw.algorithm.lam,
    ) == (6.0, 0.5, 3, 3, 0.1)
    assert (
        tpaw.rollout.temperature,
        tpaw.rollout.top_p,
        tpaw.rollout.max_new_tokens,
        tpaw.local.batch_size,
        tpaw.local.max_len,
        tpaw.seed,
    ) == (0.8, 0.95, 256, 64, 1024, 42)
    assert (tpaw.data.num_clients, tpaw.rollout.prompts_per_client) == (1, 7473)
    spin = selfplay_reference.selfplay_config("spin", "ultrachat", "qwen2p5_1p5b")
    assert (spin.task.name, spin.data.limit, spin.algorithm.opponent_rounds, spin.eval.task) == (
        "ultrachat",
        50_000,
        2,
        "arc_challenge",
    )
    assert selfplay_reference.selfplay_config("dpo", "gsm8k", "qwen2p5_1p5b").algorithm.beta == 0.1
    fed = selfplay_reference.smollm2_config("tpaw", federated=True)
    assert (fed.data.num_clients, fed.fl.clients_per_round, fed.model.path) == (4, 4, "")
