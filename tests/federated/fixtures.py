"""Shared helpers for the round-loop and runner tests: a tiny saved model with the real
SmolLM2 tokenizer, a small arithmetic config, and a deterministic stand-in algorithm."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import pathlib
import tempfile
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp import data as data_lib
from fedsp.assets import default_model_path
from fedsp.config import default_config
from fedsp.model import ModelConfig, Tokenizer, Transformer, save_pretrained
from tests.model import tiny


@contextlib.contextmanager
def one_process_group_at_a_time() -> Iterator[None]:
    """A machine-wide lock for the tests that start several JAX processes of their own
    (the 8-device mesh worker, the multi-host jobs): each group holds several GB and two
    cores' worth of work, so two pytest workers running them at once only overcommit the
    machine (and its memory: the kernel's OOM killer ends one)."""
    path = pathlib.Path(tempfile.gettempdir()) / "fedsp-tests-process-groups.lock"
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save_tiny_model(directory: pathlib.Path) -> pathlib.Path:
    """A 2-layer random SmolLM-shaped model with SmolLM2's 49,152-token tokenizer."""
    hf = tiny.tiny_hf_config("smollm")
    hf["vocab_size"] = 49152
    tokenizer = Tokenizer.from_gguf(default_model_path())
    model = Transformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
    return save_pretrained(model, directory, tokenizer=tokenizer)


def tiny_config(model_dir: pathlib.Path, **overrides: Any):
    config = default_config()
    config.model.path = str(model_dir)
    config.model.lora.rank = 2
    config.data.num_clients = 4
    config.data.limit = 64
    config.rollout.prompts_per_client = 4
    config.fl.rounds = 2
    config.fl.clients_per_round = 4
    config.fl.backend = "loop"
    config.eval.every = 0
    config.eval.examples = 4
    config.eval.max_new_tokens = 4
    config.eval.batch_size = 4
    config.log.tensorboard = False
    config.log.progress = False
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


@dataclasses.dataclass
class StandInAlgorithm:
    """Numbers only, derived from the examples' gold answers: collect turns text into
    arrays (as the real algorithms do), local_train is a pure per-client update.
    ``poison`` names (round, client) pairs whose update becomes NaN."""

    name: str = "stand_in"
    poison: tuple[tuple[int, int], ...] = ()

    def collect(
        self, policy, lora_state, client_examples, task, feedback, key, round, *, baselines=None
    ):
        del policy, lora_state, task, feedback
        targets = np.asarray(
            [[float(ex.answer) / 100.0 for ex in exs] for exs in client_examples], np.float32
        )
        rewards = (targets > 0.5).mean(axis=1)
        prev = np.asarray(baselines, np.float32)
        reference = np.where(np.isnan(prev), rewards, prev)
        new_baseline = np.where(np.isnan(prev), rewards, 0.5 * prev + 0.5 * rewards)
        poison = np.zeros((len(client_examples),), np.float32)
        for rnd, position in self.poison:
            if rnd == round:
                poison[position] = 1.0
        batch = {
            "target": jnp.asarray(targets),
            "poison": jnp.asarray(poison),
            "noise": jax.random.normal(key, (len(client_examples),)),
            "mean_advantage": jnp.asarray(rewards - reference),
            "baseline": jnp.asarray(new_baseline, jnp.float32),
        }
        return batch, {"num_prompts": float(targets.size)}

    def local_train(self, graphdef, base_state, lora_state, batch_c, key_c):
        del graphdef, base_state
        shift = 1e-2 * jnp.mean(batch_c["target"]) + 1e-3 * batch_c["noise"]
        shift = shift + jnp.where(batch_c["poison"] > 0, jnp.nan, 0.0)
        leaves, treedef = jax.tree.flatten(lora_state)
        keys = jax.random.split(key_c, len(leaves))
        new = [
            x + shift + 1e-3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)
        ]
        target = batch_c["target"]
        stats = {
            "num_examples": jnp.float32(target.shape[0]) + jnp.sum(target > 0.5),
            "mean_advantage": batch_c["mean_advantage"],
            "baseline": batch_c["baseline"],
            "wins": jnp.sum(target > 0.5).astype(jnp.float32),
            "wrong": jnp.sum(target <= 0.5).astype(jnp.float32),
            "loss": jnp.mean(target**2),
        }
        return jax.tree.unflatten(treedef, new), stats


class Killed(Exception):
    """Stands for the process dying mid-round."""


class KilledAt:
    """Proxies an algorithm and dies when ``collect`` starts round ``round``."""

    def __init__(self, algorithm, round):
        self.algorithm, self.round = algorithm, round
        self.name = algorithm.name
        self.local_train = algorithm.local_train

    def collect(self, *args, **kwargs):
        if args[6] == self.round:
            raise Killed(f"killed in round {self.round}")
        return self.algorithm.collect(*args, **kwargs)


class CoinFlipUser:
    """A simulated user whose verdict is a fixed hash of the reply: about half the replies
    are "correct". The tiny random model never solves arithmetic, and SPEAR without wins
    does not train, so with the real judge a resume test would compare untouched
    adapters. Wrong replies get the real non-leaking hint (revision prompts as in a run)."""

    def __init__(self, task):
        self.task, self.hint = task, data_lib.Hint(task)

    def __call__(self, example, response):
        if zlib.crc32(response.encode()) % 2 == 0:
            return data_lib.Feedback("Your answer is correct.", 1.0, True)
        return self.hint(example, response)
