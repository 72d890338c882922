"""Shared fixtures: a tiny random SmolLM-shaped model with LoRA and the real tokenizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fedsp.assets import default_model_path
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
        lambda x: jnp.asarray(np.asarray(x) + np.float32(0.05) * noise[:x.size].reshape(x.shape)),
        lora_state)
    return graphdef, lora_state, base_state


@pytest.fixture(scope="session")
def policy(split_model, tokenizer):
    graphdef, _, base_state = split_model
    return Policy(graphdef, base_state, tokenizer)


@pytest.fixture(scope="session")
def task():
    return get_task("arithmetic")


def make_config(**overrides) -> ml_collections.ConfigDict:
    """A small config; ``overrides`` are "section.field" = value."""
    config = ml_collections.ConfigDict({
        "algorithm": {"name": "spear", "max_revisions": 2, "lambda_win": 1.0,
                      "lambda_lose": 0.1, "margin": 0.3, "tail_tokens": 0, "rho": 2.0,
                      "group_size": 2, "clip_eps": 0.2, "kl_coef": 0.02,
                      "awr_temperature": 0.0, "awr_max_weight": 20.0, "baseline_decay": 0.9},
        "rollout": {"prompts_per_client": 2, "max_new_tokens": 6, "temperature": 0.8,
                    "top_p": 0.95},
        "local": {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_ratio": 0.0,
                  "weight_decay": 0.0, "max_len": 128},
        "fl": {"rounds": 4},
    })
    for name, value in overrides.items():
        section, field = name.split(".")
        config[section][field] = value
    return config
