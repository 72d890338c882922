"""The capacity planner on a tiny model: its bytes against independently placed arrays,
its memory levers, its TPU path and its verdicts."""

from __future__ import annotations

import pytest
from flax import nnx

from fedsp.config import default_config
from fedsp.model.config import ModelConfig
from fedsp.model.lora import apply_lora, split_lora
from fedsp.model.sharding import device_bytes, make_mesh, replicate, shard_state
from fedsp.model.transformer import Transformer
from fedsp.plan import Shapes, get_target, plan_round
from fedsp.plan.targets import GIB
from fedsp.run_setup import lora_config
from tests.model import tiny

EVAL_LEN = 32


@pytest.fixture(scope="module")
def model_config():
    # D = 64 and F = 96 divide a 4-way "model" axis.
    return ModelConfig.from_hf(tiny.tiny_hf_config("smollm"))


def small_config(**fields):
    config = default_config()
    config.model.lora.rank = 2
    config.data.num_clients = 2
    config.fl.clients_per_round = 2
    config.rollout.prompts_per_client = 2
    config.rollout.max_new_tokens = 8
    config.local.steps = 1
    config.local.batch_size = 4
    config.local.max_len = 64
    config.eval.batch_size = 4
    config.eval.max_new_tokens = 8
    for key, value in fields.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def loglik_config(**fields):
    # ARC-Challenge is multiple choice: its evaluation is one log-likelihood forward of
    # (adapters, base, 3 [B, T] arrays), the simplest program that reads the whole model.
    return small_config(eval__task="arc_challenge", eval__split="test", **fields)


def placed_bytes(model_config, config, mesh) -> tuple[int, int]:
    """(base, adapter) bytes on the first device of ``mesh``: a real model placed as
    `fedsp.runner.init_run` places it (base by the logical-axis rules, adapters
    replicated)."""
    model = Transformer(model_config, rngs=nnx.Rngs(0))
    apply_lora(model, lora_config(config, model_config.num_hidden_layers), rngs=nnx.Rngs(0))
    _, lora, base = split_lora(model)
    device = mesh.devices.flat[0]
    return device_bytes(shard_state(base, mesh), device), device_bytes(
        replicate(lora, mesh), device
    )


def eval_arguments(model_config, config, mesh) -> int:
    plan = plan_round(
        config,
        get_target("cpu:4"),
        model_config,
        mesh=mesh,
        shapes=Shapes(eval_len=EVAL_LEN),
        programs=["eval"],
    )
    assert plan.mesh == mesh
    return plan.programs[0].argument_bytes


@pytest.mark.parametrize("mesh", [(1, 1), (1, 4)])
def test_argument_bytes_are_the_placed_parameters(model_config, mesh):
    config = loglik_config()
    rows = 3 * config.eval.batch_size * EVAL_LEN * 4  # ids, attention and target masks
    base, lora = placed_bytes(model_config, config, make_mesh(*mesh))
    assert eval_arguments(model_config, config, mesh) == base + lora + rows


def test_model_axis_divides_the_base(model_config):
    config = loglik_config()
    rows = 3 * config.eval.batch_size * EVAL_LEN * 4
    _, lora = placed_bytes(model_config, config, make_mesh(1, 1))
    one, four = (eval_arguments(model_config, config, m) - rows - lora for m in ((1, 1), (1, 4)))
    # Only the norms (64 floats each) stay whole on every device.
    assert 3.9 < one / four <= 4.0


@pytest.mark.slow  # two compilations of the training step for XLA:TPU (~25 s)
def test_tpu_training_step_and_remat(model_config):
    target = get_target("v5e:2x4")
    peaks = {}
    for remat in ("none", "full"):
        # One client (the loop backend's program) keeps the two compilations small.
        config = small_config(
            model__remat=remat, fl__backend="loop", fl__clients_per_round=1, data__num_clients=1
        )
        plan = plan_round(config, target, model_config, mesh=(1, 1), programs=["train"])
        (train,) = plan.programs
        assert plan.fits and train.error is None and train.flops > 0
        peaks[remat] = train.peak_bytes
    # "full" keeps each layer's input only, "none" every activation the backward pass reads.
    assert peaks["full"] < 0.5 * peaks["none"]


def test_tpu_topology_compiles_server_and_evaluation(model_config):
    target = get_target("v5e:2x4")
    plan = plan_round(
        loglik_config(), target, model_config, mesh=(2, 4), programs=["server", "eval"]
    )
    assert plan.mesh == (2, 4) and plan.fits and plan.peak_bytes < GIB
    assert all(p.error is None and p.flops > 0 for p in plan.programs)
    base, lora = placed_bytes(model_config, loglik_config(), make_mesh(2, 2))
    # XLA:TPU pads arrays to its tiles, so a device holds at least its shard.
    assert plan.programs[1].argument_bytes >= base + lora


def test_rollout_keeps_spear_caches(model_config):
    # 2 clients × 8 prompts in calls of 4 rows: SPEAR keeps the keys/values of the 4 calls
    # for its revisions, which gather rows from a concatenated copy of them.
    config = small_config(rollout__prompts_per_client=8, rollout__batch_size=4)
    (rollout,) = plan_round(
        config, get_target("cpu:2"), model_config, mesh=(2, 1), programs=["rollout"]
    ).programs
    # Prompts of 64 − 8 tokens round up to the sampler's 64-token bucket.
    assert rollout.calls == 4 and rollout.shape == "4 rows × 64+8 tokens"
    c = model_config
    slots = 64 + 8
    # k and v [L, B, K, S, hd] float32 plus the [B, S] bool mask, rows split 2 ways.
    per_call = (
        2 * c.num_hidden_layers * c.num_key_value_heads * slots * c.head_dim * 4 + slots
    ) * 2
    assert rollout.held_bytes == (2 * 4 - 1) * per_call
    plain = small_config(
        rollout__prompts_per_client=8, rollout__batch_size=4, rollout__reuse_cache=False
    )
    (again,) = plan_round(
        plain, get_target("cpu:2"), model_config, mesh=(2, 1), programs=["rollout"]
    ).programs
    assert again.held_bytes == 0 and again.output_bytes < rollout.output_bytes


def test_a_round_that_cannot_fit_says_so(model_config):
    small = get_target("cpu:1", cpu_memory_bytes=1 << 20)
    plan = plan_round(
        loglik_config(), small, model_config, shapes=Shapes(eval_len=64), programs=["eval"]
    )
    assert plan.peak_bytes > small.memory_bytes and not plan.fits
    # XLA:TPU refuses a program above the HBM: reported, not raised. 8192 rows × 4096
    # tokens of float32 logits over 128 ids are 16 GiB on every device.
    tpu = get_target("v5e-8")
    huge = loglik_config(eval__batch_size=8192)
    plan = plan_round(
        huge, tpu, model_config, mesh=(1, 4), shapes=Shapes(eval_len=4096), programs=["eval"]
    )
    (program,) = plan.programs
    assert program.error is not None and "RESOURCE_EXHAUSTED" in program.error
    assert program.peak_bytes > tpu.memory_bytes and not plan.fits
    # With no executable to ask, the arguments are counted from their placement: the base
    # split four ways, as on CPU devices.
    base, lora = placed_bytes(model_config, huge, make_mesh(1, 4))
    assert program.argument_bytes == base + lora + 3 * 8192 * 4096 * 4


@pytest.mark.parametrize(
    ("mesh", "match"),
    [
        ((3, 1), "fl.mesh.clients: 3 does not divide fl.clients_per_round = 2"),
        ((1, 8), "fl.mesh.model: 8 is more than the 4 devices"),
        ((2, 4), "fl.mesh.clients: a \\(2, 4\\) mesh needs 8 devices, 4 available"),
    ],
)
def test_a_mesh_the_target_cannot_hold_names_the_field(model_config, mesh, match):
    with pytest.raises(ValueError, match=match):
        plan_round(small_config(), get_target("cpu:4"), model_config, mesh=mesh)


def test_bad_config_fields_are_named(model_config):
    with pytest.raises(ValueError, match=r"model\.remat"):
        plan_round(small_config(model__remat="some"), get_target("cpu:1"), model_config)
    with pytest.raises(ValueError, match=r"fl\.backend"):
        plan_round(small_config(fl__backend="pmap"), get_target("cpu:1"), model_config)


def test_pairwise_rounds_score_their_players(model_config):
    config = small_config(algorithm__name="tpaw", local__batch_size=2)
    (players,) = plan_round(
        config, get_target("cpu:1"), model_config, programs=["players"]
    ).programs
    assert players.shape == "3 player(s) × 4 rows × 64 tokens" and players.flops > 0
    # TPAW's team: N_max = 3 players' adapters and their mask beside the base, and one
    # chunk of 2 · local.batch_size rows (ids, attention and loss masks).
    base, lora = placed_bytes(model_config, config, make_mesh(1, 1))
    rows = 4 * 64 * (4 + 1 + 4)
    assert players.argument_bytes == base + 3 * lora + 3 + rows
