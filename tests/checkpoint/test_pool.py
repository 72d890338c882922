"""Tests for fedsp.checkpoint.pool: TPAW's player pool of the last K global adapters."""

from __future__ import annotations

import gc
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint._src.path import atomicity

from fedsp.checkpoint import CorruptCheckpointError, PlayerPool, with_adapters
from tests.checkpoint.test_run_state import lora_model

X = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(2, 4)


def _adapters(seed: int) -> nnx.State:
    return nnx.state(lora_model(seed), nnx.LoRAParam)


def _push(pool: PlayerPool, rounds) -> dict[int, nnx.State]:
    pushed = {}
    for r in rounds:
        pushed[r] = _adapters(r)
        pool.push(
            pushed[r], round=r, score=r / 10, metadata={"clients": [r, r + 1], "tag": f"r{r}"}
        )
    return pushed


def _leaves_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _slot(players, j: int):
    """Player slot j of a stacked tree, as numpy (eager jax slicing compiles per shape)."""
    return jax.tree.map(lambda x: np.asarray(x)[j], players)


def _entry_dirs(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("round_"))


@jax.jit
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _logits(model: nnx.Module) -> np.ndarray:
    return np.asarray(_forward(*nnx.split(model), X))


def test_keeps_last_k_in_order_with_metadata(tmp_path):
    pool = PlayerPool(tmp_path, max_players=3, keep_dropped=1)
    pushed = _push(pool, [1, 2, 3, 4, 5])
    assert len(pool) == 3
    assert pool.rounds == (3, 4, 5)
    assert [e.score for e in pool.entries] == [0.3, 0.4, 0.5]
    assert [e.metadata for e in pool.entries] == [
        {"clients": [r, r + 1], "tag": f"r{r}"} for r in (3, 4, 5)
    ]
    assert [e.path.name for e in pool.entries] == ["round_000003", "round_000004", "round_000005"]
    # Round 2 left the pool but keeps its files (keep_dropped=1); round 1 is gone.
    assert _entry_dirs(tmp_path) == ["round_000002", "round_000003", "round_000004", "round_000005"]
    template = _adapters(99)
    for i, r in enumerate((3, 4, 5)):
        assert _leaves_equal(pool.load(i, template), pushed[r])
    assert _leaves_equal(pool.load(-1, template), pushed[5])


def test_survives_reopen_and_a_lost_index(tmp_path):
    pushed = _push(PlayerPool(tmp_path, max_players=3), [1, 2, 3, 4])
    reopened = PlayerPool(tmp_path, max_players=3)
    assert reopened.rounds == (2, 3, 4)
    assert [e.score for e in reopened.entries] == [0.2, 0.3, 0.4]
    assert reopened.entries[0].metadata == {"clients": [2, 3], "tag": "r2"}
    assert _leaves_equal(reopened.load(1, _adapters(99)), pushed[3])
    (tmp_path / "index.json").unlink()
    rebuilt = PlayerPool(tmp_path, max_players=3)
    assert rebuilt.entries == reopened.entries


def test_state_dict_resume_removes_later_pushes(tmp_path):
    pool = PlayerPool(tmp_path, max_players=3, keep_dropped=2)
    pushed = _push(pool, [1, 2, 3, 4])
    state = json.loads(json.dumps(pool.state_dict()))  # as stored in the round-4 run state
    _push(pool, [5])  # then the run is killed before the round-5 run state is saved
    assert pool.rounds == (3, 4, 5)

    resumed = PlayerPool.from_state_dict(tmp_path, state, keep_dropped=2)
    assert resumed.rounds == (2, 3, 4)
    assert "round_000005" not in _entry_dirs(tmp_path)
    template = _adapters(99)
    for i, r in enumerate((2, 3, 4)):  # round 2 had left the pool; its files were kept
        assert _leaves_equal(resumed.load(i, template), pushed[r])
    new5 = _adapters(55)
    resumed.push(new5, round=5, score=0.9)
    assert PlayerPool(tmp_path, max_players=3).rounds == (3, 4, 5)
    assert _leaves_equal(PlayerPool(tmp_path, max_players=3).load(-1, template), new5)


def test_stacked_pads_and_masks(tmp_path):
    pool = PlayerPool(tmp_path, max_players=3)
    template = _adapters(99)
    players, mask = pool.stacked(template)  # empty pool
    np.testing.assert_array_equal(mask, [False, False, False])
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(players))

    pushed = _push(pool, [7, 8])
    for tmpl in (template, jax.eval_shape(lambda: _adapters(99))):
        players, mask = pool.stacked(tmpl)
        assert mask.dtype == jnp.bool_
        np.testing.assert_array_equal(mask, [True, True, False])
        assert isinstance(players, nnx.State)
        for stacked_leaf, leaf in zip(
            jax.tree.leaves(players), jax.tree.leaves(template), strict=True
        ):
            assert stacked_leaf.shape == (3, *leaf.shape)
        assert _leaves_equal(_slot(players, 0), pushed[7])
        assert _leaves_equal(_slot(players, 1), pushed[8])
        assert all(not np.any(x) for x in jax.tree.leaves(_slot(players, 2)))


def test_restored_players_reproduce_logits(tmp_path):
    base = lora_model(0)
    base_logits = _logits(base)
    pool = PlayerPool(tmp_path, max_players=3)
    expected = {}
    for r in (1, 2, 3):
        adapters = _adapters(r)  # a "trained" global adapter after round r
        expected[r] = _logits(with_adapters(base, adapters))
        pool.push(adapters, round=r)
    assert not np.allclose(expected[1], expected[2])

    pool = PlayerPool(tmp_path, max_players=3)  # after a restart
    template = nnx.state(base, nnx.LoRAParam)
    for i, r in enumerate(pool.rounds):
        restored = pool.load(i, template)
        np.testing.assert_array_equal(_logits(with_adapters(base, restored)), expected[r])
        pure = nnx.to_pure_dict(restored)
        np.testing.assert_array_equal(_logits(with_adapters(base, pure)), expected[r])
    np.testing.assert_array_equal(_logits(base), base_logits)  # the base is untouched

    # TPAW scores responses under every player at once: a vmap over J.
    graphdef, _, frozen = nnx.split(base, nnx.LoRAParam, ...)
    players, _mask = pool.stacked(template)
    per_player = jax.jit(jax.vmap(lambda a: nnx.merge(graphdef, a, frozen)(X)))(players)
    assert per_player.shape == (3, 2, 3)
    for j, r in enumerate(pool.rounds):
        np.testing.assert_allclose(per_player[j], expected[r], rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match="adapters must have the model's adapter shapes"):
        with_adapters(base, jax.tree.map(lambda x: x[:1], template))


def _truncate_arrays(entry_dir):
    files = [p for p in entry_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


# Orbax's reader threads complain about the aborted read of a damaged file.
@pytest.mark.filterwarnings(
    "ignore::RuntimeWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)
def test_corrupt_or_missing_entry(tmp_path):
    pool = PlayerPool(tmp_path, max_players=3)
    pushed = _push(pool, [1, 2, 3])
    template = _adapters(99)
    _truncate_arrays(tmp_path / "round_000002")
    with pytest.raises(
        CorruptCheckpointError, match=r"entry for round 2: .*round_000002 is corrupt"
    ):
        pool.load(1, template)
    assert _leaves_equal(pool.load(0, template), pushed[1])
    assert _leaves_equal(pool.load(2, template), pushed[3])
    with pytest.raises(CorruptCheckpointError, match="round 2"):
        pool.stacked(template)
    assert pool.rounds == (1, 2, 3)  # "raise" changes nothing

    with pytest.warns(UserWarning, match="dropped from the player pool: .*round 2"):
        players, mask = pool.stacked(template, on_error="drop")
    np.testing.assert_array_equal(mask, [True, True, False])
    assert _leaves_equal(_slot(players, 0), pushed[1])
    assert _leaves_equal(_slot(players, 1), pushed[3])
    assert pool.rounds == (1, 3)
    assert (tmp_path / "round_000002.corrupt").is_dir()  # kept for inspection
    assert PlayerPool(tmp_path, max_players=3).rounds == (1, 3)

    (tmp_path / "round_000003").rename(tmp_path / "moved")
    with pytest.raises(
        CorruptCheckpointError, match=r"entry for round 3: .*round_000003 is missing"
    ):
        pool.load(1, template)
    with pytest.warns(UserWarning, match="round 3"):
        assert len(pool.players(template, on_error="drop")) == 1
    assert pool.rounds == (1,)
    gc.collect()  # finalize Orbax's aborted reads while the warning filter is active


def test_crash_mid_push_keeps_the_pool(tmp_path, monkeypatch):
    pool = PlayerPool(tmp_path, max_players=2)
    pushed = _push(pool, [1])

    async def crash(self, *args, **kwargs):
        raise RuntimeError("simulated crash before the final rename")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pool.push(_adapters(2), round=2)
    monkeypatch.undo()
    reopened = PlayerPool(tmp_path, max_players=2)
    assert reopened.rounds == (1,)
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    assert _leaves_equal(reopened.load(0, _adapters(99)), pushed[1])
    reopened.push(_adapters(2), round=2)
    assert reopened.rounds == (1, 2)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="max_players must be an int >= 1"):
        PlayerPool(tmp_path, max_players=0)
    with pytest.raises(ValueError, match="keep_dropped must be an int >= 0"):
        PlayerPool(tmp_path, keep_dropped=-1)
    pool = PlayerPool(tmp_path, max_players=2)
    _push(pool, [3])
    with pytest.raises(ValueError, match="round must exceed the newest player's round 3, got 3"):
        pool.push(_adapters(0), round=3)
    with pytest.raises(
        ValueError, match=r"cannot push round 4: meta\['metadata'\]\['bad'\] must be JSON"
    ):
        pool.push(_adapters(0), round=4, metadata={"bad": object()})
    with pytest.raises(ValueError, match="score must be a real number"):
        pool.push(_adapters(0), round=4, score="high")
    with pytest.raises(ValueError, match=r"i must be an int in \[-1, 1\)"):
        pool.load(1, _adapters(0))
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'drop'"):
        pool.stacked(_adapters(0), on_error="ignore")
    with pytest.raises(ValueError, match=r"round must be one of the players' rounds \[3\]"):
        pool.drop(4)
    with pytest.raises(ValueError, match=r"state must be a PlayerPool\.state_dict"):
        PlayerPool.from_state_dict(tmp_path, {"entries": []})
    with pytest.raises(
        ValueError, match=r"template does not match .*\['l1'\]\['lora_a'\] is float32\[4, 2\]"
    ):
        pool.load(
            0,
            {
                "l1": {"lora_a": jnp.zeros((4, 3)), "lora_b": jnp.zeros((2, 8))},
                "l2": _adapters(0)["l2"],
            },
        )
    assert pool.rounds == (3,)  # failed pushes left nothing behind
    assert _entry_dirs(tmp_path) == ["round_000003"]
