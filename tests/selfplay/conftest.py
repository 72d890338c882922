"""Shared fixtures: a tiny random SmolLM-shaped model with LoRA and the real tokenizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fedsp.assets import default_model_path
from fedsp.config import default_config
from fedsp.data import get_task
from fedsp.model import Tokenizer
from fedsp.model.config import ModelConfig
from fedsp.model.lora import LoRAConfig, apply_lora, split_lora
from fedsp.model.transformer import Transformer
from fedsp.selfplay import Policy
from tests.model import tiny


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="session")
def split_model(tokenizer):
    hf = dict(tiny.tiny_hf_config("smollm"), vocab_size=tokenizer.vocab_size)
    model = Transformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    graphdef, lora_state, base_state = split_lora(model)
    # A fresh adapter has B = 0; give it values so adapters matter in every test: x + 0.05 ·
    # jax.random.normal(key(7), x.shape) per leaf. Drawn once at the largest size and
    # sliced (the same numbers: threefry draws are a function of the flat index), since
    # eager jax.random.normal compiles once per leaf shape (≈ 7 s of the suite).
    size = max(x.size for x in jax.tree.leaves(lora_state))
    noise = np.asarray(jax.random.normal(jax.random.key(7), (size,)))
    lora_state = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + np.float32(0.05) * noise[: x.size].reshape(x.shape)),
        lora_state,
    )
    return graphdef, lora_state, base_state


@pytest.fixture(scope="session")
def policy(split_model, tokenizer):
    graphdef, _, base_state = split_model
    return Policy(graphdef, base_state, tokenizer)


@pytest.fixture(scope="session")
def task():
    return get_task("arithmetic")


def make_config(**overrides) -> ml_collections.ConfigDict:
    """A small config from `default_config`; ``overrides`` are "section.field" = value."""
    config = default_config()
    config.algorithm.group_size = 2
    config.rollout.prompts_per_client, config.rollout.max_new_tokens = 2, 6
    config.local.steps, config.local.batch_size, config.local.lr = 4, 2, 1e-2
    config.local.warmup_ratio, config.local.max_len = 0.0, 128
    config.fl.rounds = 4
    for name, value in overrides.items():
        section, field = name.split(".")
        config[section][field] = value
    return config
