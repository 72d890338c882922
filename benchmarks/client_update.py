"""The "spear_client_update" work unit (BENCHMARKS.md, "spear_client_update"): one SPEAR
client update on SmolLM2-135M-Instruct, side by side with the official SPEAR code.

    python -m benchmarks.client_update --reference <refbench>/results/client.json
    python -m benchmarks.client_update --repeats 1      # fedsp alone, a quick check

The work unit, as the reference measurement (``../shared/refbench``): LoRA r16 / α32 on
q,k,v,o,gate,up,down of all 30 layers (float32); 16 ARC-Challenge questions (with
``--reference``, the reference's own: the items of its recorded first-answer prompts, so both
sides answer the same questions; without it, the first 16 of the local test split after the
loader's seed-0 shuffle, ``$FEDSP_DATA_DIR``), posed in the reference's prompt
(``--prompt-style spear``, `fedsp.data.multiple_choice`; ``fedsp`` for fedsp's own); one
sample per prompt, then up to 2 feedback-guided revisions of the wrong ones (non-leaking
hints), 64 new tokens at T = 0.8, top-p 0.95; traces packed (max_len 256); 2 AdamW steps
of batch 4 (`fedsp.selfplay.spear`: each step reads 4 win rows for the likelihood term
and 4 lose rows for the unlikelihood term), the backward pass rematerialising each
layer (``--remat full``, as the reference's default gradient checkpointing).

Generation is the whole of ``Spear.collect`` (sampling, feedback on the host, packing);
training is ``Spear.local_train`` (jitted, both steps). One warm-up update compiles,
then ``--repeats`` timed updates run on the same prompts and keys (same shapes, nothing
recompiles); times are medians. Peak RSS: the whole process (``ru_maxrss``: model load,
compilation, every update, as the reference's ``peak_rss_mib_process``) and the timed
updates alone (the kernel's peak reset after the warm-up). The run is a child process,
so the peak is not the parent's.

Ratios are printed only against a reference run of the same sitting (``--reference``,
refbench's ``client.json``); its generated and trained token counts are shown beside
ours, with the time per generated token and per trained token, since the two sides
sample different replies and so revise and train different amounts.

The FLOP floor: the useful FLOPs of the work (every request's prompt prefilled once and
every generated token decoded once, 2 FLOPs per weight and token plus attention over the
context; training 2 × the forward FLOPs of the real trained tokens: the forward and the
gradient with respect to the activations, since the frozen weights need no weight
gradient; rematerialised recomputation is not useful work) divided by the matmul peak
measured in the same process (float32 2048² ``jnp.dot``; ``--matmul`` adds refbench's
torch figure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common
from fedsp import hostalloc


def work_unit_config(args: argparse.Namespace):
    from fedsp.config import default_config

    config = default_config()
    config.model.lora.rank, config.model.lora.alpha = 16, 32.0
    config.task.name = "arc_challenge"
    config.task.options.prompt_style = args.prompt_style
    config.rollout.reuse_cache = args.reuse_cache == "on"
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
    from flax import nnx

    from fedsp import compilation_cache
    from fedsp import data as data_lib
    from fedsp.selfplay import get_algorithm
    from fedsp.selfplay.base import Policy

    config = work_unit_config(args)
    cache = compilation_cache.enable()
    peak_gflops = matmul_gflops()
    start = time.perf_counter()
    graphdef, lora, base_state, tokenizer = common.load_policy(
        16, 32.0, remat=args.remat, dtype=args.dtype
    )
    load_s = time.perf_counter() - start
    task = data_lib.get_task(config.task.name, **dict(config.task.options))
    data_dir = os.environ.get("FEDSP_DATA_DIR") or None
    if args.questions:
        with open(args.questions) as f:
            examples = matching_examples(task.load("test", data_dir), json.load(f))
    else:
        examples = task.load("test", data_dir, limit=args.prompts, seed=0)
    feedback = data_lib.get_feedback("hint", task)
    algo = get_algorithm("spear", config)
    requests: list[tuple[int, int]] = []  # (prompt tokens, generated tokens) per request
    sample = algo.generate_fn

    def counted(policy, lora_state, prompts, keys, params, **kwargs):
        out = sample(policy, lora_state, prompts, keys, params, **kwargs)
        requests.extend((len(p), len(c.tokens)) for p, c in zip(prompts, out))
        return out

    algo.generate_fn = counted
    policy = Policy(graphdef, base_state, tokenizer)
    model_config = nnx.merge(graphdef, lora, base_state).config
    key, train_key = jax.random.split(jax.random.key(0))

    def update() -> dict[str, Any]:
        requests.clear()
        t0 = time.perf_counter()
        batch, metrics = algo.collect(policy, lora, [examples], task, feedback, key, 1)
        common.block(batch)
        t1 = time.perf_counter()
        client = jax.tree.map(lambda x: x[0], batch)
        _, stats = common.block(algo.local_train(graphdef, base_state, lora, client, train_key))
        t2 = time.perf_counter()
        trained = trained_rows(client, config.local.steps, config.local.batch_size)
        return {
            "requests": len(requests),
            "prompt_tokens": sum(p for p, _ in requests),
            "generated_tokens": sum(g for _, g in requests),
            "trained_tokens": int(sum(trained)),
            "gen_flops": sum(generation_flops(model_config, p, g) for p, g in requests),
            "train_flops": 2 * sum(forward_flops(model_config, n) for n in trained),
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

    clock = compilation_cache.compile_clock()
    warm = update()
    compiled = compilation_cache.compile_clock().since(clock)
    warm_peak = common.peak_rss_bytes()
    reset = common.reset_peak_rss()
    rss_after_warmup = common.current_rss_bytes()
    runs = [update() for _ in range(args.repeats)]
    med = {
        k: statistics.median(r[k] for r in runs)
        for k in (
            "generation_s",
            "training_s",
            "total_s",
            "requests",
            "prompt_tokens",
            "generated_tokens",
            "trained_tokens",
            "gen_flops",
            "train_flops",
        )
    }
    out = {
        **med,
        "runs_total_s": [r["total_s"] for r in runs],
        "warmup_total_s": warm["total_s"],
        "warmup_phases_s": [warm["generation_s"], warm["training_s"]],
        "warmup_compile_s": compiled.total_s,
        "warmup_cache_hits": compiled.cache_hits,
        "warmup_cache_misses": compiled.cache_misses,
        "compilation_cache": str(cache) if cache else None,
        "remat": args.remat,
        "dtype": args.dtype,
        "matmul_gflops": peak_gflops,
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
    out["floor_s"] = (out["gen_flops"] + out["train_flops"]) / (peak_gflops * 1e9)
    return out


def matmul_gflops(n: int = 2048, repeats: int = 20) -> float:
    """float32 ``n × n`` matmul throughput of this process: the best of ``repeats``
    (a peak; the median moves with the machine's other load)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def forward_flops(
    cfg: Any, tokens: int, *, context: int = 0, logits: int | None = None, rank: int = 16
) -> float:
    """FLOPs of a forward pass over ``tokens`` consecutive positions after ``context``
    earlier ones: 2 per weight and token in the layers (with rank-``rank`` LoRA on all
    seven projections), causal attention scores and values (4 · layers · heads ·
    head_dim per attended position), and the LM head on ``logits`` of the positions
    (default all)."""
    d, hd = cfg.hidden_size, cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    q, kv, ff = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    heads = cfg.num_attention_heads
    layer = 2 * d * q + 2 * d * kv + 3 * d * ff
    lora = rank * ((d + q) * 2 + (d + kv) * 2 + (d + ff) * 3)
    dense = 2 * cfg.num_hidden_layers * (layer + lora) * tokens
    # Position i (0-based, after `context`) attends to context + i + 1 positions.
    attended = tokens * context + tokens * (tokens + 1) // 2
    attention = 4 * cfg.num_hidden_layers * heads * hd * attended
    head = 2 * d * cfg.vocab_size * (tokens if logits is None else logits)
    return float(dense + attention + head)


def generation_flops(cfg: Any, prompt: int, generated: int) -> float:
    """Useful FLOPs of one request: its prompt prefilled once (LM head on the last
    position), then each generated token but the last decoded against the context."""
    flops = forward_flops(cfg, prompt, logits=1)
    if generated > 1:
        flops += forward_flops(cfg, generated - 1, context=prompt)
    return flops


def trained_rows(client: Any, steps: int, batch_size: int) -> list[int]:
    """Real tokens of the rows local training reads, expected: each step reads
    ``batch_size`` rows from each of the win and lose sets (fewer when a set has fewer
    valid rows), counted at the set's mean row length."""
    import numpy as np

    rows = []
    for seqs in (client.train, client.lose):
        valid = np.asarray(seqs.valid)
        lengths = np.asarray(seqs.attention_mask).sum(-1)[valid]
        if lengths.size:
            rows += [int(lengths.mean())] * (min(batch_size, lengths.size) * steps)
    return rows


_REFERENCE_ITEM = re.compile(r"\[QUESTION\]\n(.*?)\n\n\[OPTIONS\]\n(.*?)\n\nAnswer:", re.S)


def reference_questions(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The ARC items of the reference's first-answer prompts, in its order:
    ``[{"question": str, "options": [str, ...]}]`` parsed from the warm-up repetition's
    recorded prompts in refbench's ``client.json`` (its `_arc_to_ex` layout: a
    ``[QUESTION]`` block, then ``[OPTIONS]`` lines "A. text")."""
    calls = [c for c in data["reps"][0]["gen_calls_detail"] if c.get("kind") == "y0"]
    if not calls or "prompts" not in calls[0]:
        raise ValueError("no first-answer prompts recorded in the warm-up repetition")
    items = []
    for prompt in calls[0]["prompts"]:
        match = _REFERENCE_ITEM.search(prompt)
        if match is None:
            raise ValueError(f"a first-answer prompt without [QUESTION]/[OPTIONS]: {prompt!r}")
        lines = match.group(2).split("\n")
        if not all(re.match(r"[A-Z]\. ", line) for line in lines):
            raise ValueError(f"an [OPTIONS] line is not 'X. text': {lines!r}")
        options = [line[3:] for line in lines]
        items.append({"question": match.group(1), "options": options})
    return items


def matching_examples(examples: Sequence[Any], items: Sequence[dict[str, Any]]) -> list[Any]:
    """The ``examples`` whose question and option texts are ``items``' (whitespace
    normalised), in ``items``' order; ValueError naming an item that has no match."""

    def norm(text: str) -> str:
        return " ".join(text.split())

    index = {(norm(e.question), tuple(map(norm, e.choices))): e for e in examples}
    out = []
    for item in items:
        found = index.get((norm(item["question"]), tuple(map(norm, item["options"]))))
        if found is None:
            raise ValueError(f"no ARC-Challenge test item matches {item['question']!r}")
        out.append(found)
    return out


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed updates after the warm-up")
    p.add_argument("--prompts", type=int, default=16, help="ARC prompts (the work unit: 16)")
    p.add_argument(
        "--reference",
        help="refbench's client.json from this sitting (../shared/refbench: refbench.py client)",
    )
    p.add_argument("--matmul", help="refbench's matmul.json (torch's float32 peak), optional")
    p.add_argument(
        "--remat", default="full", help="model.remat: full (as the reference's default) or none"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="model weights and compute: float32 (the work unit, as the reference) or "
        "bfloat16 (an extra row on CPUs with AVX-512 BF16)",
    )
    p.add_argument(
        "--prompt-style",
        default="spear",
        choices=("spear", "fedsp"),
        help="task.options.prompt_style: the reference's ARC prompt (the work unit) or fedsp's",
    )
    p.add_argument(
        "--reuse-cache",
        default="on",
        choices=("on", "off"),
        help="rollout.reuse_cache: revisions continue from the first answers' keys/values "
        "(on, fedsp's default) or prefill their whole prompt as the reference does (off: "
        "less memory)",
    )
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--questions", help=argparse.SUPPRESS)  # the child's: reference_questions
    return p.parse_args(argv)


def reference_figures(path: str) -> dict[str, Any]:
    """The timed repetitions' medians from refbench's ``client.json`` (`refbench.py
    client`), in this benchmark's units; ValueError naming the file if it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
        summary = data["summary"]
        median = {k: v["median"] for k, v in summary.items() if isinstance(v, dict)}
        generation = median["generation_seconds"] + median.get("feedback_seconds", 0.0)
        return {
            "total_s": median["total_seconds"],
            "generation_s": generation,
            "training_s": median["train_phase_seconds"],
            "generated_tokens": median["generated_tokens"],
            "trained_tokens": statistics.median(
                r["train_tokens_real"] for r in data["reps"] if not r["warmup"]
            ),
            "process_peak_rss_mib": data["peak_rss_mib_process"],
            "others_cores": median.get("others_cores_during_rep"),
            "cpu": data.get("env", {}).get("cpu"),
            "questions": reference_questions(data),
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--reference {path}: not a refbench client.json ({e!r})") from e


def table(result: dict[str, Any], ref: dict[str, Any] | None, peak_torch: float | None) -> str:
    """The markdown table of BENCHMARKS.md ("spear_client_update")."""
    rows = [
        ("client update (s)", "total_s", "{:.1f}"),
        ("generation (s)", "generation_s", "{:.1f}"),
        ("training (s)", "training_s", "{:.1f}"),
        ("generated tokens", "generated_tokens", "{:.0f}"),
        ("trained tokens", "trained_tokens", "{:.0f}"),
        ("peak RSS, process (GiB)", "process_peak_rss_mib", "{:.2f}"),
    ]
    out = ["| | fedsp | SPEAR reference | reference / fedsp |", "|---|---:|---:|---:|"]
    for name, key, fmt in rows:
        ours = result[key] / 1024 if key.endswith("_mib") else result[key]
        if ref is None:
            out.append(f"| {name} | {fmt.format(ours)} | not run | |")
            continue
        theirs = ref[key] / 1024 if key.endswith("_mib") else ref[key]
        out.append(f"| {name} | {fmt.format(ours)} | {fmt.format(theirs)} | {theirs / ours:.2f}× |")
    if ref is not None:
        for name, time_key, count_key in (
            ("ms per generated token", "generation_s", "generated_tokens"),
            ("ms per trained token", "training_s", "trained_tokens"),
        ):
            ours = 1e3 * result[time_key] / result[count_key]
            theirs = 1e3 * ref[time_key] / ref[count_key]
            out.append(f"| {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}× |")
    flops = result["gen_flops"] + result["train_flops"]
    out.append("")
    out.append(
        f"useful work: {flops / 1e12:.3f} TFLOP (generation {result['gen_flops'] / 1e12:.3f}, "
        f"training {result['train_flops'] / 1e12:.3f}); float32 matmul peak "
        f"{result['matmul_gflops']:.1f} GFLOP/s (jnp.dot 2048²)"
        + (f", torch {peak_torch:.1f} GFLOP/s" if peak_torch else "")
        + f"; floor {result['floor_s']:.2f} s; fedsp at {result['total_s'] / result['floor_s']:.1f}× "
        "the floor"
    )
    out.append(
        f"first update (compiles): {result['warmup_total_s']:.1f} s, of which compiling "
        f"{result['warmup_compile_s']:.1f} s ({result['warmup_cache_hits']} programs from the "
        f"persistent cache, {result['warmup_cache_misses']} compiled)"
    )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        common.emit(child(args))
        return
    # Read first: a bad path fails before the long run.
    ref = reference_figures(args.reference) if args.reference else None
    if ref is not None:
        args.prompts = len(ref["questions"])
    peak_torch = None
    if args.matmul:
        with open(args.matmul) as f:
            peak_torch = json.load(f)["gflops"]["median"]
    with tempfile.TemporaryDirectory() as tmp:
        child_args = [
            "--child",
            *("--repeats", str(args.repeats)),
            *("--prompts", str(args.prompts)),
            *("--remat", args.remat),
            *("--dtype", args.dtype),
            *("--prompt-style", args.prompt_style),
            *("--reuse-cache", args.reuse_cache),
        ]
        if ref is not None:
            # Both sides answer the same 16 questions: the reference's client's.
            questions = os.path.join(tmp, "questions.json")
            with open(questions, "w") as f:
                json.dump(ref["questions"], f)
            child_args += ["--questions", questions]
        result = common.run_child("benchmarks.client_update", child_args)
    print(json.dumps(result))
    prompts = "the reference's" if ref is not None else f"{args.prompts}"
    print(f"\nspear_client_update ({prompts} ARC prompts, median of {args.repeats}):")
    print(table(result, ref, peak_torch))
    if ref is None:
        print("\n(no ratio: pass --reference with refbench's client.json of this sitting)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "result": result, "reference": ref}, f, indent=2)


if __name__ == "__main__":
    hostalloc.reexec_with_tunables()  # before any work: see fedsp/hostalloc.py
    main()
