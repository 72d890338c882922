"""The decode matmul ceiling in benchmarks/model.py times what it says it times.

BENCHMARKS.md argues from it that no decode step can beat its rate, which holds only if
XLA keeps every weight matmul of the step: none folded away as dead code, none hoisted
out of the step loop. Checked on the optimized HLO of a tiny model's program.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.model import decode_matmul_program
from fedsp.model.config import ModelConfig
from fedsp.model.transformer import Transformer
from tests.model import tiny


@pytest.mark.parametrize("arch", ["smollm", "llama"])  # tied and untied lm_head
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ceiling_program_keeps_every_matmul_inside_the_loop(arch, dtype):
    config = ModelConfig.from_hf(tiny.tiny_hf_config(arch))
    model = Transformer(config, rngs=nnx.Rngs(0))
    assert (model.lm_head is None) == (arch == "smollm")
    run, dots = decode_matmul_program(model, steps=3, dtype=dtype)
    assert dots == 7 * config.num_hidden_layers + 1
    x = jax.random.normal(jax.random.key(0), (4, config.hidden_size), jnp.float32)
    hlo = jax.jit(run).lower(x).compile().as_text()
    # The fori_loop is one while loop; every dot must sit in its body computation.
    body_name = re.search(r"while\([^)]*\).*?body=%?([\w.\-]+)", hlo).group(1)
    body = re.search(rf"\n(?:%)?{re.escape(body_name)} .*?\n}}", hlo, re.S).group(0)
    called = set(re.findall(r"calls=%?([\w.\-]+)", body)) | {body_name}
    comps = {
        m.group(1): m.group(0)
        for m in re.finditer(r"\n(?:%)?([\w.\-]+) [^\n]*\{\n.*?\n\}", hlo, re.S)
    }
    in_loop = sum(len(re.findall(r"\bdot\(", comps.get(c, ""))) for c in called)
    assert in_loop == dots, (in_loop, dots)
    out = np.asarray(run(x))
    assert out.shape == (4,) and np.isfinite(out).all()
