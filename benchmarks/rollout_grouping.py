"""Rollout grouping: one sampler call per prompt head vs one per prompt-length bucket.

``python -m benchmarks.rollout_grouping --task gsm8k --split train --new-tokens 96``

Samples one completion for each of N prompts of a task (SmolLM2-135M-Instruct, fresh LoRA
r8/α16, T = 0.8, top-p 0.95, EOS on) with `fedsp.selfplay.rollout.sample_completions`, side by side
in one process: ``merged`` (the default: rows sharing a head bucket go in one call,
padded to the longest prompt's bucket) and ``split`` (``split_by_length=True``: one call
per length bucket). Each arm is timed on its first call (compiling every program it
needs, then running) and on a second call with the same inputs; the two arms alternate
for ``--repeats`` pairs, so every arm's later first calls find their programs compiled.
Both arms must generate the same tokens (checked). Needs ``$FEDSP_DATA_DIR`` for gsm8k
and ARC.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax

from benchmarks.common import load_policy
from fedsp.data import get_task
from fedsp.model import sampling
from fedsp.selfplay import rollout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--split", default="train")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from fedsp.selfplay.base import Policy

    graphdef, lora, base_state, tokenizer = load_policy(rank=8, alpha=16.0)
    policy = Policy(graphdef, base_state, tokenizer)
    task = get_task(args.task)
    examples = task.load(
        args.split, os.environ.get("FEDSP_DATA_DIR"), limit=4 * args.prompts, seed=0
    )[: args.prompts]
    prompts = [rollout.prompt_ids(tokenizer, task, ex) for ex in examples]
    cuts = [rollout.split_head(p, tokenizer.eos_token_ids) for p in prompts]
    buckets = sorted({sampling.bucket_length(len(p) - c) for p, c in zip(prompts, cuts)})
    keys = rollout.rollout_keys(
        jax.random.key(0), 1, 0, list(range(len(prompts))), [0] * len(prompts)
    )

    times: dict[str, dict[str, list[float]]] = {}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for arm in ("split", "merged"):
            params = rollout.SamplingParams(
                max_new_tokens=args.new_tokens,
                temperature=0.8,
                top_p=0.95,
                batch_size=64,
                split_by_length=arm == "split",
                reuse_cache=True,
            )
            for phase in ("first", "second"):
                start = time.perf_counter()
                out = rollout.sample_completions(policy, lora, prompts, keys, params)
                times.setdefault(arm, {}).setdefault(phase, []).append(time.perf_counter() - start)
            tokens[arm] = [c.tokens.tolist() for c in out]
    if tokens["split"] != tokens["merged"]:
        raise SystemExit("the two arms generated different tokens")
    result = {
        "task": args.task,
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "suffix_buckets": buckets,
        "generated_tokens": sum(map(len, tokens["merged"])),
        "seconds": times,
        "second_call_ratio": statistics.median(times["split"]["second"])
        / statistics.median(times["merged"]["second"]),
    }
    print(
        f"{args.task}: {len(prompts)} prompts, suffix length buckets {buckets}, "
        f"{result['generated_tokens']} tokens generated (same in both arms)"
    )
    for arm, phases in times.items():
        print(
            f"  {arm:6s} first calls "
            + ", ".join(f"{t:.1f}" for t in phases["first"])
            + " s; second calls "
            + ", ".join(f"{t:.1f}" for t in phases["second"])
            + " s"
        )
    print(f"  split / merged, median second call: {result['second_call_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    from fedsp import hostalloc

    hostalloc.reexec_with_tunables()
    main()
