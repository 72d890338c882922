"""Model benchmark: fedsp vs torch transformers on SmolLM2-135M-Instruct, side by side.

    python -m benchmarks.model                      # the figures in BENCHMARKS.md
    python -m benchmarks.model --batches 1,16 --repeats 2 --json out.json
    python -m benchmarks.model --against 56b4663 --batches 16 --repeats 5   # vs a revision

Both frameworks run in this one process, on the same token ids, one after the other for
each measurement, so the ratios are not skewed by the machine's load drifting between runs.
Every figure is the median over ``--repeats`` timed runs after one warm-up run (the
warm-up also holds the JAX compilation, reported separately).

What is measured:
- matmul peak: a 2048³ float32 matmul, jitted in JAX and ``torch.mm`` in torch (GFLOP/s).
- decode: greedy generation of ``--new-tokens`` tokens at several batch sizes from
  chat-formatted arithmetic prompts (left-padded), EOS disabled so every row decodes all
  tokens. fedsp: ``fedsp.model.sampling.generate``; torch: ``model.generate``. Reported as
  end-to-end tokens/s (new tokens over wall time, prefill included) and decode-only
  tokens/s (a one-token run's time subtracted first), the latter also as model GFLOP/s
  (forward FLOPs per token at the mean context) to set against the matmul peak.
- decode matmul ceiling: the weight matmuls of one decode step alone (q, k, v, o, gate,
  up, down of every layer and the tied lm_head, on the real weights, with the residual
  adds and an RMS rescale between them, no attention, no sampling), jitted as a
  ``fori_loop`` over ``--new-tokens`` steps at each decode batch size, with float32
  operands and with bfloat16 operands (float32 accumulation). No implementation of the
  decode step can beat these rates on this CPU without doing less matmul work, so they
  bound what a target on decode tokens/s can ask for (``--skip-ceiling`` leaves them out).
- rollout: greedy generation with EOS on (rows stop when they answer), as self-play
  runs it, from other arithmetic prompts; both sides produce the same tokens, and
  tokens/s counts real tokens (padding after a row's end excluded) over wall time.
- LoRA train step: rank 16, alpha 32 on q,k,v,o,gate,up,down of all layers, AdamW, a
  batch of 4 × 256 tokens, forward + backward + update. After fedsp's compile and three
  warm-up pairs (fedsp, torch: until fedsp's heap stops growing, see below), the two steps
  alternate (fedsp, torch) for ``--repeats`` pairs, and ``speedup`` is the
  median of the per-pair ratios (``pair_speedups``): the machine's speed drifts by tens of
  percent within minutes, and a pair is measured seconds apart. fedsp: one jitted step over the
  LoRA state; torch: peft + ``torch.optim.AdamW`` (no gradient checkpointing, the faster
  torch setting on this model). MFU = model FLOPs / time / the same framework's measured
  matmul peak, with model FLOPs = 2 × forward FLOPs: the base is frozen, so the backward
  pass computes activation gradients (one matmul per forward matmul) but no base-weight
  gradients; the LoRA matmuls (< 3% of the total at rank 16) are left out.
- against a revision (``--against REV``, instead of everything above): fedsp's model code
  at REV (``git archive REV fedsp``) and at this checkout, each in its own worker process
  (``benchmarks/against.py``), on the same requests, alternating within each pair
  (the order flips every pair): greedy decode with a rank-16 LoRA whose B is non-zero, EOS
  off, for each ``--batches`` size with the unrolled and the scanned layer loop, and the
  LoRA gradient of a ``--train-batch`` × ``--train-len`` batch. ``ratio`` is the median
  of the per-pair ratios REV time / this time (> 1: this checkout is faster), and
  ``same_output`` says whether the two produced the same tokens (gradients: equal when
  rounded to 1e-5).
- Unlike the other benchmarks this one does not re-execute itself with
  ``fedsp.hostalloc.TUNABLES``: both frameworks share the process's allocator, so the
  caller chooses it (``GLIBC_TUNABLES=$(python -m fedsp.hostalloc)`` or not) and the
  results record which ran. The train row also counts the page faults of fedsp's warm-up
  calls and the page faults and kernel time of one steady-state fedsp step, which those
  settings remove.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from benchmarks.against import bench_against
from fedsp import assets
from fedsp.core.logprobs import token_logprobs
from fedsp.core.losses import sft_loss
from fedsp.data import get_task
from fedsp.model import from_pretrained
from fedsp.model.lora import LoRAConfig, apply_lora, split_lora
from fedsp.model.sampling import generate

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first-call seconds, median seconds of ``repeats`` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def matmul_peaks(n: int = 2048, repeats: int = 10) -> dict[str, float]:
    flops = 2.0 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.dot)
    _, t_jax = timed(lambda: mm(a, b).block_until_ready(), repeats)
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    with torch.no_grad():
        _, t_torch = timed(lambda: torch.mm(ta, tb), repeats)
    return {"jax_gflops": flops / t_jax / 1e9, "torch_gflops": flops / t_torch / 1e9}


def forward_flops_per_token(config: Any, context: int) -> float:
    """2 × matmul parameters (lm_head included) + attention scores and values."""
    d, f = config.hidden_size, config.intermediate_size
    hd = config.head_dim or d // config.num_attention_heads
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    matmul_params = config.num_hidden_layers * per_layer + d * config.vocab_size
    attention = config.num_hidden_layers * 4 * context * q  # QKᵀ and AV, full context
    return 2.0 * matmul_params + attention


def decode_matmul_program(
    model: Any, steps: int, dtype: Any = jnp.float32
) -> tuple[Callable[[jax.Array], jax.Array], int]:
    """The decode step's weight matmuls alone, ``steps`` times: (jitted fn of x [B, D], dots
    per step).

    Per step and layer: x @ Wq, Wk, Wv; the q result through Wo back into the residual
    (k and v are reduced into it so XLA keeps them); x @ Wgate, Wup, their product
    through Wdown; then x @ Eᵀ (the tied embedding, or lm_head) with a max over the
    vocabulary. Operands are cast to ``dtype``, products accumulate in float32. The
    weights are bound as jit arguments (not constants), sliced per layer once per call.
    """
    layers = model.layers
    names = {
        "q": layers.self_attn.q_proj,
        "k": layers.self_attn.k_proj,
        "v": layers.self_attn.v_proj,
        "o": layers.self_attn.o_proj,
        "gate": layers.mlp.gate_proj,
        "up": layers.mlp.up_proj,
        "down": layers.mlp.down_proj,
    }
    stacked = {k: jnp.asarray(m.kernel[...], dtype) for k, m in names.items()}
    if model.lm_head is not None:
        head = jnp.asarray(model.lm_head.kernel[...], dtype)  # [d, V]
    else:
        head = jnp.asarray(model.embed_tokens.embedding[...], dtype).T  # [d, V]
    num_layers = model.config.num_hidden_layers

    def mm(x: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(dtype), w, preferred_element_type=jnp.float32)

    def rescale(x: jax.Array) -> jax.Array:
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    @jax.jit
    def run(weights: dict[str, jax.Array], head: jax.Array, x: jax.Array) -> jax.Array:
        per_layer = [{k: w[i] for k, w in weights.items()} for i in range(num_layers)]

        def step(_: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            x, acc = carry
            for w in per_layer:
                h = rescale(x)
                q, k, v = mm(h, w["q"]), mm(h, w["k"]), mm(h, w["v"])
                kv = jnp.max(k, axis=-1, keepdims=True) + jnp.max(v, axis=-1, keepdims=True)
                x = x + mm(q, w["o"]) + 1e-3 * kv
                h = rescale(x)
                x = x + mm(mm(h, w["gate"]) * mm(h, w["up"]), w["down"])
            logits = mm(rescale(x), head)
            return x, acc + jnp.max(logits, axis=-1)

        return jax.lax.fori_loop(0, steps, step, (x, jnp.zeros(x.shape[0], jnp.float32)))[1]

    return jax.tree_util.Partial(run, stacked, head), len(names) * num_layers + 1


def decode_matmul_ceiling(
    model: Any, batch: int, steps: int, repeats: int, dtype: Any = jnp.float32
) -> float:
    """Tokens/s of :func:`decode_matmul_program` at ``batch`` rows (module docstring)."""
    run, _ = decode_matmul_program(model, steps, dtype)
    x = jax.random.normal(jax.random.key(0), (batch, model.config.hidden_size), jnp.float32)
    _, seconds = timed(lambda: run(x).block_until_ready(), repeats)
    return batch * steps / seconds


def prompt_batch(tokenizer: Any, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    task = get_task("arithmetic")
    examples = task.load("test", limit=batch, seed=seed)
    texts = [tokenizer.apply_chat_template(task.messages(ex)) for ex in examples]
    return tokenizer.encode_batch(texts)


def load_torch_model(gguf: os.PathLike[str]) -> Any:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    )
    return model.eval()


def bench_decode(args: argparse.Namespace, model: Any, tokenizer: Any, tmodel: Any) -> list[dict]:
    graphdef, state = nnx.split(model)
    pad = tokenizer.pad_token_id
    rows = []

    def one_batch(batch: int) -> dict[str, Any]:  # one function per batch: closures bind its locals
        ids, mask = prompt_batch(tokenizer, batch)
        n = args.new_tokens

        def fedsp_run(new: int) -> None:
            out = generate(graphdef, state, ids, mask, max_new_tokens=new, eos_ids=(), pad_id=pad)
            jax.block_until_ready(out.tokens)

        t_ids = torch.from_numpy(ids.astype(np.int64))
        t_mask = torch.from_numpy(mask.astype(np.int64))

        def torch_run(new: int) -> None:
            with torch.no_grad():
                tmodel.generate(
                    input_ids=t_ids,
                    attention_mask=t_mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=None,
                )

        compile_s, fedsp_s = timed(lambda: fedsp_run(n), args.repeats)
        _, fedsp_prefill = timed(lambda: fedsp_run(1), args.repeats)
        _, torch_s = timed(lambda: torch_run(n), args.repeats)
        _, torch_prefill = timed(lambda: torch_run(1), args.repeats)
        new_tokens = batch * n
        row = {
            "batch": batch,
            "prompt_tokens": int(mask.sum()),
            "prompt_len": ids.shape[1],
            "new_tokens": n,
            "fedsp_s": fedsp_s,
            "torch_s": torch_s,
            "fedsp_tok_s": new_tokens / fedsp_s,
            "torch_tok_s": new_tokens / torch_s,
            "fedsp_decode_tok_s": batch * (n - 1) / max(fedsp_s - fedsp_prefill, 1e-9),
            "torch_decode_tok_s": batch * (n - 1) / max(torch_s - torch_prefill, 1e-9),
            "fedsp_first_call_s": compile_s,
        }
        row["speedup"] = row["fedsp_tok_s"] / row["torch_tok_s"]
        # Model FLOP rate of the decode-only figures (attention at the mean context).
        per_token = forward_flops_per_token(model.config, ids.shape[1] + n // 2)
        row["fedsp_decode_gflops"] = row["fedsp_decode_tok_s"] * per_token / 1e9
        row["torch_decode_gflops"] = row["torch_decode_tok_s"] * per_token / 1e9
        if not args.skip_ceiling:
            for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
                row[f"matmul_ceiling_{name}_tok_s"] = decode_matmul_ceiling(
                    model, batch, n, args.repeats, dtype
                )
        return row

    for batch in args.batches:
        row = one_batch(batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_rollout(args: argparse.Namespace, model: Any, tokenizer: Any, tmodel: Any) -> list[dict]:
    """Greedy decoding as self-play runs it: EOS on, rows stop when they answer.

    Both sides generate the same greedy continuations of the same prompts (checked), so
    they produce the same real tokens; tokens/s counts real tokens (EOS included, the
    padding after a row's end excluded) over wall time. HF ``generate`` keeps computing
    a finished row until the last row ends; fedsp drops finished rows from the batch
    (``compact``), which is the point of the comparison.
    """
    graphdef, state = nnx.split(model)
    pad = tokenizer.pad_token_id
    eos = list(tokenizer.eos_token_ids)
    rows = []

    def one_batch(batch: int) -> dict[str, Any]:  # one function per batch: closures bind its locals
        ids, mask = prompt_batch(tokenizer, batch, seed=1)
        n = args.rollout_tokens
        result: dict[str, Any] = {}

        def fedsp_run() -> None:
            out = generate(graphdef, state, ids, mask, max_new_tokens=n, eos_ids=eos, pad_id=pad)
            result["fedsp"] = np.asarray(out.lengths)
            result["fedsp_tokens"] = np.asarray(out.tokens)

        t_ids = torch.from_numpy(ids.astype(np.int64))
        t_mask = torch.from_numpy(mask.astype(np.int64))

        def torch_run() -> None:
            with torch.no_grad():
                out = tmodel.generate(
                    input_ids=t_ids,
                    attention_mask=t_mask,
                    max_new_tokens=n,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            new = out[:, ids.shape[1] :].numpy()
            is_eos = np.isin(new, eos)
            ended = is_eos.any(axis=1)
            result["torch"] = np.where(ended, is_eos.argmax(axis=1) + 1, new.shape[1])

        compile_s, fedsp_s = timed(fedsp_run, args.repeats)
        _, torch_s = timed(torch_run, args.repeats)
        same = int((result["fedsp"] == result["torch"]).sum())
        real = int(result["fedsp"].sum())
        row = {
            "batch": batch,
            "max_new_tokens": n,
            "real_tokens": real,
            "rows_with_same_length": same,
            "longest_row": int(result["fedsp"].max()),
            "fedsp_s": fedsp_s,
            "torch_s": torch_s,
            "fedsp_tok_s": real / fedsp_s,
            "torch_tok_s": int(result["torch"].sum()) / torch_s,
            "fedsp_first_call_s": compile_s,
        }
        row["speedup"] = torch_s / fedsp_s
        return row

    for batch in args.rollout_batches:
        row = one_batch(batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_train(args: argparse.Namespace, gguf: os.PathLike[str], peaks: dict[str, float]) -> dict:
    batch, length = args.train_batch, args.train_len
    rng = np.random.default_rng(0)
    model, _ = from_pretrained(gguf)
    config = model.config
    ids = rng.integers(0, config.vocab_size, size=(batch, length + 1)).astype(np.int32)
    mask = np.ones_like(ids, dtype=np.float32)
    apply_lora(model, LoRAConfig(rank=16, alpha=32.0, targets=LORA_TARGETS), rngs=nnx.Rngs(0))
    graphdef, lora, base = split_lora(model)
    del model
    opt = optax.adamw(1e-4)
    opt_state = opt.init(lora)

    @jax.jit
    def step(lora, opt_state, base, ids, mask):
        def loss_fn(lora):
            m = nnx.merge(graphdef, lora, base)
            logits = m(ids[:, :-1], attention_mask=mask[:, :-1])
            return sft_loss(token_logprobs(logits, ids[:, 1:]), mask[:, 1:])[0]

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    state = {"lora": lora, "opt": opt_state, "base": base}
    del base

    def fedsp_step() -> None:
        state["lora"], state["opt"], loss = step(
            state["lora"], state["opt"], state["base"], ids, mask
        )
        loss.block_until_ready()

    def faults_and_sys(fn: Callable[[], None]) -> tuple[int, float]:
        before = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF)
        return after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime

    start = time.perf_counter()
    fedsp_step()
    compile_s = time.perf_counter() - start
    import peft

    tmodel = load_torch_model(gguf)
    tmodel.train()
    tmodel = peft.get_peft_model(
        tmodel,
        peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS)),
    )
    topt = torch.optim.AdamW([p for p in tmodel.parameters() if p.requires_grad], lr=1e-4)
    t_ids = torch.from_numpy(ids.astype(np.int64))

    def torch_step() -> None:
        # The loss is computed here rather than by HF's `labels=` so both sides score the
        # same 4 × 256 next-token targets.
        out = tmodel(input_ids=t_ids[:, :-1])
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), t_ids[:, 1:].reshape(-1)
        )
        loss.backward()
        topt.step()
        topt.zero_grad(set_to_none=True)

    # Warm-up pairs, so the timed steps are steady-state. With fedsp.hostalloc's settings
    # the heap still grows (by one fedsp step's temporaries, ≈ 2.5 GB) on some of the
    # first calls, including the first fedsp call after torch's first step, before freed
    # blocks fit the next call's requests; their page faults are recorded. Then the page
    # faults and kernel time of one more fedsp step: what those settings remove.
    warmup_faults = []
    for _ in range(3):
        warmup_faults.append(faults_and_sys(fedsp_step)[0])
        torch_step()
    faults, sys_s = faults_and_sys(fedsp_step)
    fedsp_times, torch_times = [], []
    for _ in range(args.repeats):  # alternate, so each pair sees the same machine speed
        for step_fn, times in ((fedsp_step, fedsp_times), (torch_step, torch_times)):
            start = time.perf_counter()
            step_fn()
            times.append(time.perf_counter() - start)
    state.clear()  # frees fedsp's weights and optimizer state
    fedsp_s, torch_s = statistics.median(fedsp_times), statistics.median(torch_times)
    pair_speedups = [t / f for f, t in zip(fedsp_times, torch_times, strict=True)]
    tokens = batch * length
    flops = 2.0 * forward_flops_per_token(config, length) * tokens
    return {
        "batch": batch,
        "length": length,
        "fedsp_s": fedsp_s,
        "torch_s": torch_s,
        "fedsp_tok_s": tokens / fedsp_s,
        "torch_tok_s": tokens / torch_s,
        "fedsp_mfu": flops / fedsp_s / (peaks["jax_gflops"] * 1e9),
        "torch_mfu": flops / torch_s / (peaks["torch_gflops"] * 1e9),
        "speedup": statistics.median(pair_speedups),
        "pair_speedups": pair_speedups,
        "fedsp_first_call_s": compile_s,
        "fedsp_warmup_page_faults": warmup_faults,
        "fedsp_step_page_faults": faults,
        "fedsp_step_sys_s": sys_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--batches", default="1,16,64", type=lambda s: [int(x) for x in s.split(",") if x]
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rollout-batches", default="16,64", type=lambda s: [int(x) for x in s.split(",") if x]
    )
    parser.add_argument("--rollout-tokens", type=int, default=128)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-rollout", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument(
        "--skip-ceiling", action="store_true", help="leave out the decode matmul-ceiling rows"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--against",
        default=None,
        metavar="REV",
        help="only time this checkout's model code against revision REV",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    gguf = assets.default_model_path()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "jax_devices": len(jax.devices()),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        },
    }
    results["matmul_peak"] = peaks = matmul_peaks()
    print(json.dumps(peaks), flush=True)
    if args.against:
        _, tokenizer = from_pretrained(gguf)
        results["against"] = bench_against(
            args, tokenizer, lambda batch: prompt_batch(tokenizer, batch)
        )
    elif not args.skip_decode:
        model, tokenizer = from_pretrained(gguf)
        tmodel = load_torch_model(gguf)
        results["decode"] = bench_decode(args, model, tokenizer, tmodel)
        if not args.skip_rollout:
            results["rollout"] = bench_rollout(args, model, tokenizer, tmodel)
        del model, tmodel
    if not args.skip_train and not args.against:
        results["train"] = bench_train(args, gguf, peaks)
        print(json.dumps(results["train"]), flush=True)
    if args.json:
        with tempfile.NamedTemporaryFile(
            "w", dir=os.path.dirname(os.path.abspath(args.json)), delete=False
        ) as f:
            json.dump(results, f, indent=2)
        os.replace(f.name, args.json)


if __name__ == "__main__":
    main()
