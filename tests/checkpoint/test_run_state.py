"""Tests for fedsp.checkpoint.run_state: bit-exact save/restore, retention, atomicity,
corruption fallback and config fingerprints."""

from __future__ import annotations

import functools
import gc
import logging
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from orbax.checkpoint._src.path import atomicity

from fedsp.checkpoint import (
    CorruptCheckpointError,
    RoundState,
    RunCheckpointer,
    config_fingerprint,
    load_tree,
    save_tree,
)
from fedsp.core.aggregation import server_optimizer


class LoRAMLP(nnx.Module):
    """Two LoRA-adapted linear layers: the smallest model with an nnx.LoRAParam state."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.LoRA(4, 2, 8, base_module=nnx.Linear(4, 8, rngs=rngs), rngs=rngs)
        self.l2 = nnx.LoRA(8, 2, 3, base_module=nnx.Linear(8, 3, rngs=rngs), rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


@functools.cache
def _abstract_lora_model():
    return nnx.split(nnx.eval_shape(lambda: LoRAMLP(nnx.Rngs(0))))


def lora_model(seed: int) -> LoRAMLP:
    """A LoRAMLP whose every weight (LoRA B included, zero at init) is drawn from ``seed``.

    Built from its abstract shape and numpy draws: eager NNX initialization compiles one
    XLA program per op, seconds on a loaded 2-core machine.
    """
    graphdef, state = _abstract_lora_model()
    rng = np.random.default_rng(seed)
    return nnx.merge(
        graphdef, jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), state)
    )


def _adapters(seed: int) -> nnx.State:
    return nnx.state(lora_model(seed), nnx.LoRAParam)


_fedadam = server_optimizer("fedadam", 0.1)
_adam = optax.adam(1e-3)


@jax.jit
def _optimizer_states(adapters, adam_params):
    """One update of a FedAdam server optimizer and of optax.adam: nonzero NamedTuple states."""
    _, server = _fedadam.update(
        jax.tree.map(lambda x: x * 0.5, adapters), _fedadam.init(adapters), adapters
    )
    _, adam = _adam.update(adam_params, _adam.init(adam_params), adam_params)
    return {"server": server, "adam": adam}


def _make_state(seed: int, round_: int = 0) -> RoundState:
    """A run state whose every field depends on ``seed`` (so restores are observable)."""
    adapters = _adapters(seed)
    adam_params = {"w": jnp.asarray(np.arange(6.0).reshape(2, 3) + seed, jnp.float32)}
    return RoundState(
        round=round_,
        params=adapters,
        opt_state=_optimizer_states(adapters, adam_params),
        rng={
            "typed": jax.random.key(seed),
            "rbg": jax.random.key(seed, impl="rbg"),
            "split": jax.random.split(jax.random.key(seed + 7), 3),
            "raw": jax.random.PRNGKey(seed),
        },
        baselines=jnp.asarray(np.asarray([0.1, 0.2, 0.3, 0.4], np.float32) * (seed + 1)),
        sampler_state={
            "epoch": seed + 2,
            "frac": 1.0 / (seed + 3),
            "done": bool(seed % 2),
            "perm": np.arange(5, dtype=np.int64)[::-1] + seed,
            "count": np.int32(seed),
            "bf16": jnp.asarray(np.full((2,), 1.1 + seed), jnp.bfloat16),
        },
        pool={"max_players": 3, "entries": [{"round": 1, "score": 0.5, "metadata": {"k": [1, 2]}}]},
        metrics_history=({"accuracy": 0.25, "loss": 1.5}, {"accuracy": 0.5, "loss": float("nan")}),
    )


def _assert_trees_identical(a, b):
    """Same structure, types, dtypes and bits (typed keys compared via their data)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert type(x) is type(y), (type(x), type(y))
        if isinstance(x, (bool, int, float)):
            assert x == y
            continue
        assert x.dtype == y.dtype
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(
            np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8)
        )


def _assert_states_identical(restored: RoundState, expected: RoundState):
    assert restored.round == expected.round
    _assert_trees_identical(restored.arrays(), expected.arrays())
    assert restored.pool == expected.pool
    assert len(restored.metrics_history) == len(expected.metrics_history)
    for got, want in zip(restored.metrics_history, expected.metrics_history, strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k]))


def test_save_restore_is_bit_identical(tmp_path):
    saved = _make_state(seed=1, round_=3)
    template = _make_state(seed=5)
    with RunCheckpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_round() is None
        path = ckpt.save(saved)
        assert pathlib.Path(path) == tmp_path / "3"
        assert ckpt.latest_round() == 3
        restored = ckpt.restore(template)
    _assert_states_identical(restored, saved)
    assert isinstance(restored.params, nnx.State)
    assert type(restored.params["l1"]["lora_a"]) is nnx.LoRAParam
    assert type(restored.opt_state["adam"][0]) is optax.ScaleByAdamState
    # The template is a structure only: restoring does not touch its values.
    _assert_trees_identical(template.arrays(), _make_state(seed=5).arrays())


def test_restore_against_abstract_template(tmp_path):
    saved = _make_state(seed=2, round_=0)
    concrete = _make_state(seed=0)
    abstract_arrays = jax.eval_shape(lambda: _make_state(seed=0).arrays())
    # Python and numpy scalars have no abstract form under eval_shape; keep them concrete.
    abstract_arrays["sampler_state"] = concrete.sampler_state
    template = RoundState(round=0, **abstract_arrays)
    with RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(saved)
        restored = ckpt.restore(template)
    _assert_states_identical(restored, saved)
    assert restored.rng["typed"].dtype == jax.random.key(0).dtype


def test_resume_continues_exactly(tmp_path):
    """Train 4 rounds straight vs 2 rounds, save, reopen, restore, 2 more: same bits."""
    opt = server_optimizer("fedadam", 0.05)

    @jax.jit
    def step(params, opt_state, rng):
        rng, sub = jax.random.split(rng)
        grad = jax.tree.map(lambda p: jax.random.normal(sub, p.shape), params)
        updates, opt_state = opt.update(grad, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, rng, optax.tree.norm(params)

    def one_round(state: RoundState) -> RoundState:
        params, opt_state, rng, norm = step(state.params, state.opt_state, state.rng)
        history = (*state.metrics_history, {"norm": float(norm)})
        return RoundState(state.round + 1, params, opt_state, rng, metrics_history=history)

    params = {
        "a": jnp.asarray(np.ones((3, 2), np.float32)),
        "b": jnp.asarray(np.zeros(4, np.float32)),
    }
    start = RoundState(0, params, jax.jit(opt.init)(params), jax.random.key(0))
    straight = start
    for _ in range(4):
        straight = one_round(straight)

    state = one_round(one_round(start))
    with RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(state)
    with RunCheckpointer(tmp_path) as ckpt:  # a new process, after the kill
        state = ckpt.restore(start)
    assert state.round == 2
    state = one_round(one_round(state))
    _assert_states_identical(state, straight)


def test_keeps_last_n_rounds(tmp_path):
    with RunCheckpointer(tmp_path, keep=2) as ckpt:
        for r in range(4):
            ckpt.save(_make_state(seed=r, round_=r))
        assert ckpt.rounds() == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]
    with RunCheckpointer(tmp_path, keep=2) as ckpt:
        _assert_states_identical(
            ckpt.restore(_make_state(0), round=2), _make_state(seed=2, round_=2)
        )


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    ckpt = RunCheckpointer(tmp_path)
    ckpt.save(_make_state(seed=1, round_=1))

    async def crash(self, *args, **kwargs):
        raise RuntimeError("simulated crash before the final rename")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ckpt.save(_make_state(seed=2, round_=2))
    monkeypatch.undo()
    del ckpt  # the crashed process never closes its checkpointer
    assert (tmp_path / "2.orbax-checkpoint-tmp").is_dir()  # the partial write is there
    with RunCheckpointer(tmp_path) as ckpt:  # a restarted process
        assert ckpt.latest_round() == 1
        _assert_states_identical(ckpt.restore(_make_state(0)), _make_state(seed=1, round_=1))
        assert not (tmp_path / "2.orbax-checkpoint-tmp").exists()  # cleaned on open
        ckpt.save(_make_state(seed=2, round_=2))  # the run goes on
        assert ckpt.rounds() == [1, 2]


def test_partial_tmp_dir_is_ignored(tmp_path):
    with RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(_make_state(seed=1, round_=1))
    partial = tmp_path / "2.orbax-checkpoint-tmp-1795000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "manifest.ocdbt").write_bytes(b"\x00\x01")
    with RunCheckpointer(tmp_path) as ckpt:
        assert ckpt.rounds() == [1]
        _assert_states_identical(ckpt.restore(_make_state(0)), _make_state(seed=1, round_=1))


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    return files


def _delete_arrays(step_dir):
    for f in _array_files(step_dir):
        f.unlink()


def _truncate_arrays(step_dir):
    for f in _array_files(step_dir):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_meta(step_dir):
    (step_dir / "meta" / "data.json").unlink()


# Orbax's reader threads complain about the aborted read of a damaged file.
@pytest.mark.filterwarnings(
    "ignore::RuntimeWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.parametrize("damage", [_delete_arrays, _truncate_arrays, _delete_meta])
def test_corrupt_round_errors_and_falls_back(tmp_path, damage, caplog):
    with RunCheckpointer(tmp_path, keep=3) as ckpt:
        for r in (1, 2, 3):
            ckpt.save(_make_state(seed=r, round_=r))
    damage(tmp_path / "3")
    with RunCheckpointer(tmp_path, keep=3) as ckpt:
        with pytest.raises(CorruptCheckpointError, match=r"round 3 at .*/3\b"):
            ckpt.restore(_make_state(0))
        with caplog.at_level(logging.WARNING, logger="fedsp.checkpoint"):
            restored = ckpt.restore_latest_valid(_make_state(0))
        [record] = [r for r in caplog.records if r.name.startswith("fedsp.checkpoint")]
        assert re.search(
            r"round 3 at .*/3\b.*moved it to .*/3\.corrupt, resuming from round 2",
            record.getMessage(),
        )
        _assert_states_identical(restored, _make_state(seed=2, round_=2))
        assert ckpt.latest_round() == 2
        ckpt.save(_make_state(seed=4, round_=3))  # round 3 is saved again
        _assert_states_identical(ckpt.restore(_make_state(0)), _make_state(seed=4, round_=3))
    assert (tmp_path / "3.corrupt").is_dir()  # kept for inspection
    gc.collect()  # finalize Orbax's aborted reads while the warning filter is active


def test_all_rounds_corrupt(tmp_path):
    with RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(_make_state(seed=1, round_=1))
    _delete_meta(tmp_path / "1")
    with (
        RunCheckpointer(tmp_path) as ckpt,
        pytest.raises(CorruptCheckpointError, match="no readable checkpoint"),
    ):
        ckpt.restore_latest_valid(_make_state(0))


def test_fingerprint_mismatch_names_fields(tmp_path):
    config = {"fl": {"lr": 0.1, "rounds": 10, "clients": [1, 2]}, "seed": 0, "workdir": "/a"}
    fp = config_fingerprint(config, ignore=("workdir",))
    assert fp == {"fl.lr": 0.1, "fl.rounds": 10, "fl.clients": [1, 2], "seed": 0}
    with RunCheckpointer(tmp_path, fingerprint=fp) as ckpt:
        ckpt.save(_make_state(seed=1, round_=1))
    changed = {"fl": {"lr": 0.2, "rounds": 10, "clients": (1, 2)}, "seed": 0, "workdir": "/b"}
    with RunCheckpointer(
        tmp_path, fingerprint=config_fingerprint(changed, ignore=("workdir",))
    ) as ckpt:
        with pytest.raises(ValueError, match=r"field\(s\): fl\.lr \(checkpoint 0\.1, now 0\.2\)$"):
            ckpt.restore(_make_state(0))
        with pytest.raises(ValueError, match=r"fl\.lr"):  # not mistaken for corruption
            ckpt.restore_latest_valid(_make_state(0))
    # The same config (tuples and lists alike, a different ignored field) resumes.
    same = {"fl": {"lr": 0.1, "rounds": 10, "clients": (1, 2)}, "seed": 0, "workdir": "/c"}
    with RunCheckpointer(
        tmp_path, fingerprint=config_fingerprint(same, ignore=("workdir",))
    ) as ckpt:
        assert ckpt.restore(_make_state(0)).round == 1
    extra = config_fingerprint({**config, "new_field": 1}, ignore=("workdir",))
    with (
        RunCheckpointer(tmp_path, fingerprint=extra) as ckpt,
        pytest.raises(ValueError, match=r"new_field \(checkpoint <absent>, now 1\)"),
    ):
        ckpt.restore(_make_state(0))


def test_template_mismatch_names_leaf(tmp_path):
    with RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(_make_state(seed=1, round_=1))
        wrong_shape = _make_state(0)
        wrong_shape = RoundState(
            0, wrong_shape.params, wrong_shape.opt_state, wrong_shape.rng, baselines=jnp.zeros(5)
        )
        with pytest.raises(
            ValueError, match=r"\['baselines'\] is float32\[4\] in the checkpoint, float32\[5\]"
        ):
            ckpt.restore(wrong_shape)
        no_sampler = RoundState(
            0, wrong_shape.params, wrong_shape.opt_state, wrong_shape.rng, baselines=jnp.zeros(4)
        )
        with pytest.raises(
            ValueError, match=r"\['sampler_state'\]\['epoch'\] is in the checkpoint but not"
        ):
            ckpt.restore(no_sampler)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        RunCheckpointer(tmp_path, keep=0)
    with RunCheckpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(_make_state(0))
        with pytest.raises(ValueError, match=r"state\.round must be an int >= 0"):
            ckpt.save(_make_state(0, round_=-1))
        with pytest.raises(ValueError, match="state must be a RoundState"):
            ckpt.save({"round": 1})
        bad = _make_state(0, round_=1)
        with pytest.raises(ValueError, match=r"state\.metrics_history\[0\]\['x'\] must be JSON"):
            ckpt.save(
                RoundState(
                    1, bad.params, bad.opt_state, bad.rng, metrics_history=({"x": object()},)
                )
            )
        with pytest.raises(
            ValueError, match=r"leaf \['baselines'\]\['f'\] has unsupported type str"
        ):
            ckpt.save(RoundState(1, bad.params, bad.opt_state, bad.rng, baselines={"f": "text"}))
        ckpt.save(bad)
        with pytest.raises(ValueError, match="round 1 is already saved"):
            ckpt.save(bad)
        with pytest.raises(FileNotFoundError, match="round 7"):
            ckpt.restore(_make_state(0), round=7)


def test_save_tree_load_tree_roundtrip(tmp_path):
    tree = {
        "adapters": _adapters(3),
        "key": jax.random.key(9),
        "step": 4,
        "opt": optax.adam(0.1).init({"x": jnp.ones(2)}),
    }
    save_tree(tmp_path / "t", tree, meta={"note": "x", "score": np.float32(0.5)})
    restored, meta = load_tree(tmp_path / "t", {**tree, "step": 0})
    _assert_trees_identical(restored, tree)
    assert meta == {"note": "x", "score": 0.5}
    with pytest.raises(ValueError, match="already exists"):
        save_tree(tmp_path / "t", tree)
    with pytest.raises(CorruptCheckpointError, match="is missing"):
        load_tree(tmp_path / "absent", tree)


def test_restores_onto_the_template_sharding(tmp_path):
    """A sharded leaf comes back with the template's sharding, whatever it was saved with."""
    assert jax.device_count() == 4  # tests/conftest.py simulates 4 CPU devices
    mesh = jax.make_mesh((4,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,))
    by_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    value = np.arange(16, dtype=np.float32).reshape(8, 2)
    save_tree(tmp_path / "t", {"w": jax.device_put(value, by_rows)})
    for sharding in (by_rows, replicated):
        template = {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=sharding)}
        restored, _ = load_tree(tmp_path / "t", template)
        assert restored["w"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(restored["w"]), value)


def test_overwritten_array_bytes_fail_their_checksum(tmp_path):
    """Garbage over the middle of a zstd chunk (file size unchanged) decodes without an
    error to other numbers (tensorstore's chunks carry no checksum): the CRC-32 saved on
    the JSON side catches it."""
    weights = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    state = RoundState(round=1, params={"w": jnp.asarray(weights)}, opt_state=(), rng=())
    with RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(state)
    [chunk] = [f for f in _array_files(tmp_path / "1") if f.stat().st_size > 4096]
    data = bytearray(chunk.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    chunk.write_bytes(bytes(data))
    with (
        RunCheckpointer(tmp_path) as ckpt,
        pytest.raises(CorruptCheckpointError, match=r"round 1 at .*/1 is corrupt: the data of"),
    ):
        ckpt.restore(state)
