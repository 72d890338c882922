"""The "spear_client_update" work unit (BENCHMARKS.md, "spear_client_update"): one SPEAR
client update on SmolLM2-135M-Instruct, against the official SPEAR code's 55.4 s.

    python -m benchmarks.client_update                  # the figures in BENCHMARKS.md
    python -m benchmarks.client_update --repeats 1      # a quick check

The work unit, as the reference measurement: LoRA r16 / α32 on q,k,v,o,gate,up,down of
all 30 layers (float32); 16 ARC-Challenge prompts (the local test split in
``$FEDSP_DATA_DIR``, the first 16 after the loader's seed-0 shuffle); one sample per
prompt, then up to 2 feedback-guided revisions of the wrong ones (non-leaking hints), 64
new tokens at T = 0.8, top-p 0.95; traces packed (max_len 256); 2 AdamW steps of batch 4
(`fedsp.selfplay.spear`: each step reads 4 win rows for the likelihood term and 4 lose
rows for the unlikelihood term).

Generation is the whole of ``Spear.collect`` (sampling, feedback on the host, packing);
training is ``Spear.local_train`` (jitted, both steps). One warm-up update compiles,
then ``--repeats`` timed updates run on the same prompts and keys (same shapes, nothing
recompiles); times are medians. Peak RSS: the whole process (``ru_maxrss``: model load,
compilation, every update; the reference's 2.9 GB is of that kind) and the timed updates
alone (the kernel's peak reset after the warm-up). The run is a child process, so the
peak is not the parent's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common
from fedsp import hostalloc

# The project's reference figures (BENCHMARKS.md, "spear_client_update"): lee3296/SPEAR (PyTorch + transformers + peft) on
# this machine class (2 cores, fp32), the same work unit.
REFERENCE = {"total_s": 55.4, "generation_s": 38.6, "training_s": 17.2, "peak_rss_gb": 2.9}
TARGET = {"total_s": 11.0, "peak_rss_gb": 1.5}


def work_unit_config(args: argparse.Namespace):
    from fedsp.config import default_config

    config = default_config()
    config.model.lora.rank, config.model.lora.alpha = 16, 32.0
    config.task.name = "arc_challenge"
    config.algorithm.name = "spear"
    config.algorithm.feedback = "hint"
    config.algorithm.max_revisions = 2
    config.rollout.prompts_per_client = args.prompts
    config.rollout.max_new_tokens = 64
    config.rollout.temperature = 0.8
    config.rollout.top_p = 0.95
    config.local.steps = 2
    config.local.batch_size = 4
    config.local.max_len = 256
    return config


def child(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from fedsp import data as data_lib
    from fedsp.selfplay import get_algorithm
    from fedsp.selfplay.base import Policy

    config = work_unit_config(args)
    start = time.perf_counter()
    graphdef, lora, base_state, tokenizer = common.load_policy(16, 32.0)
    load_s = time.perf_counter() - start
    task = data_lib.get_task("arc_challenge")
    data_dir = os.environ.get("FEDSP_DATA_DIR") or None
    examples = task.load("test", data_dir, limit=args.prompts, seed=0)
    feedback = data_lib.get_feedback("hint", task)
    algo = get_algorithm("spear", config)
    policy = Policy(graphdef, base_state, tokenizer)
    key, train_key = jax.random.split(jax.random.key(0))

    def update() -> dict[str, Any]:
        t0 = time.perf_counter()
        batch, metrics = algo.collect(policy, lora, [examples], task, feedback, key, 1)
        common.block(batch)
        t1 = time.perf_counter()
        client = jax.tree.map(lambda x: x[0], batch)
        _, stats = common.block(algo.local_train(graphdef, base_state, lora, client, train_key))
        t2 = time.perf_counter()
        return {
            "generation_s": t1 - t0,
            "training_s": t2 - t1,
            "total_s": t2 - t0,
            "generated_rows": int(metrics["rollout/generated"]),
            "first_accuracy": metrics["rollout/first_accuracy"],
            "wins": int(metrics["rollout/wins"]),
            "loses_kept": int(metrics["rollout/loses_kept"]),
            "trained": float(stats["trained"]),
            "train_shape": list(batch.train.tokens.shape),
            "lose_shape": list(batch.lose.tokens.shape),
        }

    warm = update()
    warm_peak = common.peak_rss_bytes()
    reset = common.reset_peak_rss()
    rss_after_warmup = common.current_rss_bytes()
    runs = [update() for _ in range(args.repeats)]
    med = {
        k: statistics.median(r[k] for r in runs) for k in ("generation_s", "training_s", "total_s")
    }
    out = {
        **med,
        "runs_total_s": [r["total_s"] for r in runs],
        "warmup_total_s": warm["total_s"],
        "warmup_phases_s": [warm["generation_s"], warm["training_s"]],
        "rss_after_warmup_mib": common.mib(rss_after_warmup),
        **{
            k: runs[0][k]
            for k in (
                "generated_rows",
                "first_accuracy",
                "wins",
                "loses_kept",
                "trained",
                "train_shape",
                "lose_shape",
            )
        },
        "load_s": load_s,
        "process_peak_rss_mib": common.mib(max(warm_peak, common.peak_rss_bytes())),
        "update_peak_rss_mib": common.mib(common.peak_rss_bytes()) if reset else None,
    }
    out["speedup_vs_reference"] = REFERENCE["total_s"] / out["total_s"]
    return out


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed updates after the warm-up")
    p.add_argument("--prompts", type=int, default=16, help="ARC prompts (the work unit: 16)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        common.emit(child(args))
        return
    result = common.run_child(
        "benchmarks.client_update",
        ["--child", "--repeats", str(args.repeats), "--prompts", str(args.prompts)],
    )
    print(json.dumps(result))
    ref = REFERENCE
    peak_gb = result["process_peak_rss_mib"] * 2**20 / 1e9
    print(f"\nspear_client_update ({args.prompts} ARC prompts, median of {args.repeats}):")
    print("| | fedsp | SPEAR reference | ratio |\n|---|---:|---:|---:|")
    for key, name in (
        ("total_s", "client update"),
        ("generation_s", "generation"),
        ("training_s", "training"),
    ):
        print(
            f"| {name} | {result[key]:.1f} s | {ref[key]:.1f} s | {ref[key] / result[key]:.2f}× |"
        )
    print(
        f"| peak RSS (process) | {peak_gb:.2f} GB | {ref['peak_rss_gb']:.1f} GB | "
        f"{ref['peak_rss_gb'] / peak_gb:.2f}× |"
    )
    print(
        f"\ntargets: ≤ {TARGET['total_s']:.0f} s ({ref['total_s'] / TARGET['total_s']:.0f}×), "
        f"≤ {TARGET['peak_rss_gb']} GB RSS"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "result": result, "reference": ref}, f, indent=2)


if __name__ == "__main__":
    hostalloc.reexec_with_tunables()  # before any work: see fedsp/hostalloc.py
    main()
