"""Helpers shared by the federated benchmarks (`benchmarks.round`, `benchmarks.client_update`):
peak-RSS bookkeeping, the SmolLM2 + LoRA policy, and child processes that report JSON.

Memory is read from the kernel: ``ru_maxrss`` (the process's peak resident set since it
started, or since the last reset) and ``/proc/self/status`` VmRSS (resident now). Writing
"5" to ``/proc/self/clear_refs`` resets the peak to the current RSS (Linux ≥ 4.0), which
lets a benchmark report the peak of one phase (a round after the warm-up) apart from
model loading and compilation; where the reset is not allowed, the phase peak is None.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peak_rss_bytes() -> int:
    """This process's peak RSS (``ru_maxrss``, KiB on Linux) in bytes."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int | None:
    """VmRSS of this process in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets the peak RSS to the current RSS; False where the kernel does not allow it.

    Freed heap memory is first handed back to the kernel (``gc.collect`` and glibc's
    ``malloc_trim``), so the new peak starts from what is live, not from what the
    allocator kept after compilation.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mib(n: float | None) -> float | None:
    return None if n is None else n / 2**20


def load_policy(
    rank: int = 16,
    alpha: float = 32.0,
    seed: int = 0,
    remat: str = "none",
    dtype: str = "float32",
):
    """SmolLM2-135M-Instruct (``dtype`` weights, float32 by default) with LoRA on
    q,k,v,o,gate,up,down of every layer, its backward pass rematerialising ``remat``
    (`fedsp.model.Transformer`).

    Returns ``(graphdef, lora_state, base_state, tokenizer)``.
    """
    from flax import nnx

    from fedsp.assets import default_model_path
    from fedsp.model import from_pretrained
    from fedsp.model.lora import LoRAConfig, apply_lora, split_lora

    model, tokenizer = from_pretrained(default_model_path(), dtype)
    model.remat = remat
    apply_lora(model, LoRAConfig(rank=rank, alpha=alpha, targets=LORA_TARGETS), rngs=nnx.Rngs(seed))
    graphdef, lora_state, base_state = split_lora(model)
    return graphdef, lora_state, base_state, tokenizer


def block(tree: Any) -> Any:
    import jax

    return jax.block_until_ready(tree)


def emit(result: dict[str, Any]) -> None:
    """Prints a child's result line for `run_child`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(module: str, args: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Runs ``python -m module args`` in a fresh process (its own peak RSS) and returns the
    dict it `emit`-ted; raises with the child's stderr tail if it failed."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{module} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])
