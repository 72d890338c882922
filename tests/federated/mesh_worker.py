"""Runs the same 2-round federation on several (clients, model) meshes, in its own process.

``python -m tests.federated.mesh_worker MODEL_DIR OUT.npz`` needs 8 devices (the caller
sets ``--xla_force_host_platform_device_count=8``: the test process has fewer). For
SPEAR and TPAW and each mesh of `MESHES` it runs `fedsp.init_run` + 2 `run_round`s with
the vmap backend and saves, under ``{algorithm}/{clients}x{model}/``, the adapters before
and after each round, every numeric round metric and the bytes of the base weights the
first device holds. The test (`tests/federated/test_mesh.py`) compares them.

Rollouts are greedy: with temperature sampling the tiny random model's near-uniform
49k-token distribution makes an inverse-CDF draw flip on float rounding between meshes
(one token in 64 on the same keys), which then changes whole traces. The simulated user
is a coin flip seeded by (example, reply), so SPEAR has wins and wrong answers to train
on although the random model never answers right.
"""

from __future__ import annotations

import gc
import pathlib
import sys

import jax
import numpy as np

import fedsp
from fedsp.data import FEEDBACK_PROVIDERS, Feedback
from fedsp.data.base import stable_rng
from fedsp.model.sharding import device_bytes
from tests.federated.fixtures import tiny_config

MESHES = ((1, 1), (8, 1), (4, 2), (2, 4), (1, 8))
ALGORITHMS = ("spear", "tpaw")


class CoinFlip:
    """A simulated user whose verdict is a fair coin seeded by (example, reply)."""

    def __init__(self, task):
        self.task = task

    def __call__(self, example, response):
        correct = bool(stable_rng("coin", example.uid, response).random() < 0.5)
        return Feedback("Correct." if correct else "Incorrect.", float(correct), correct)


def config_for(model_dir: pathlib.Path, algorithm: str, mesh: tuple[int, int]):
    config = tiny_config(
        model_dir,
        fl__backend="vmap",
        # Two clients at a time: all 8 at once on the 1x8 mesh held 12-13 GB in training
        # (8 clients' activations, each replicated over the model axis's 8 CPU devices),
        # enough for the OOM killer when another test ran beside it.
        fl__clients_at_once=2,
        fl__clients_per_round=8,
        data__num_clients=8,
        rollout__prompts_per_client=2,
        rollout__temperature=0.0,
        rollout__max_new_tokens=8,
        local__steps=2,
        local__batch_size=2,
        local__max_len=96,
        eval__every=1,
    )
    config.algorithm.name = algorithm
    config.algorithm.feedback = "coinflip"
    config.algorithm.max_revisions = 1
    # At θ = the pool's player, TPAW's opponent probabilities P_j(y+) are exactly equal
    # and its η weighting is decided by float rounding; η = 1 weighs every response the
    # same, so the meshes compare what they compute rather than how they round a tie.
    config.algorithm.eta = 1.0
    config.fl.mesh.clients, config.fl.mesh.model = mesh
    return config


def main(model_dir: str, out: str) -> None:
    FEEDBACK_PROVIDERS["coinflip"] = CoinFlip
    arrays: dict[str, np.ndarray] = {}
    for algorithm in ALGORITHMS:
        for mesh in MESHES:
            tag = f"{algorithm}/{mesh[0]}x{mesh[1]}"
            state = fedsp.init_run(config_for(pathlib.Path(model_dir), algorithm, mesh))
            assert state.run is not None and state.run.mesh is not None
            assert dict(state.run.mesh.shape) == {"clients": mesh[0], "model": mesh[1]}
            base = state.run.policy.base_state
            arrays[f"{tag}/base_bytes"] = np.asarray(
                [device_bytes(base, jax.devices()[0]), sum(x.nbytes for x in jax.tree.leaves(base))]
            )
            for i, leaf in enumerate(jax.tree.leaves(state.params)):
                arrays[f"{tag}/round0/params/{i}"] = np.asarray(leaf)
            for _ in range(2):
                state, record = fedsp.run_round(state)
                rnd = record["round"]
                for i, leaf in enumerate(jax.tree.leaves(state.params)):
                    arrays[f"{tag}/round{rnd}/params/{i}"] = np.asarray(leaf)
                for key, value in record.items():
                    # Numbers only; wall-clock times differ by nature.
                    number = isinstance(value, (int, float)) and not isinstance(value, bool)
                    if number and "time" not in key:
                        arrays[f"{tag}/round{rnd}/metric/{key}"] = np.asarray(value, np.float64)
            # Each run compiles its own programs for its own mesh: drop them before the
            # next one, or ten runs' executables and weights add up to >10 GB.
            state.run.close()
            del state, base
            gc.collect()
            jax.clear_caches()
            print(tag, "done", flush=True)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:3])
