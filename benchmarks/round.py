"""Federated round benchmark: round time and peak memory vs clients per round, batched vs
per-client rollout, SPEAR on SmolLM2-135M-Instruct.

    python -m benchmarks.round                           # the figures in BENCHMARKS.md
    python -m benchmarks.round --clients 1,2 --repeats 1 --json /tmp/round.json

One round is what `fedsp.run_round` does between client sampling and
evaluation: SPEAR ``collect`` for C clients (first answers, hints, one revision attempt,
trace packing), local training of every client from θ_r through ``map_clients`` (vmap
backend, the default), and the server step (FedAvg). Two rollouts, same work:

- batched (what fedsp does): ONE sampler call over all C clients' prompts, and one per
  revision attempt over all clients' still-wrong rows;
- per-client (what a client-by-client implementation does, e.g. the SPEAR reference):
  one sampler call per client, and one per client per revision attempt.

Both give the same rows the same keys. A row's sample depends only on its prompt and
key (``tests/selfplay/test_rollout.py``), so the two rollouts produce identical
completions, traces, training batches and adapters (checked: ``fingerprint`` in the
output), and the timings differ only by how generation is batched.

Every (C, rollout) configuration runs in its own child process, so its peak RSS is its
own; the two rollouts of one C run back to back, and the batched child also times the
per-client rollout of the same round, alternating with its own ("side by side": one
process, the same machine load; separate children can see different loads). In the child:
load the model (RSS after loading is reported), one warm-up round (compiles), then
``--repeats`` timed rounds on the same inputs (same shapes, nothing recompiles); times are
medians. Peak RSS is reported twice: for the whole process (``ru_maxrss``: loading,
compilation and all rounds) and for the timed rounds alone (the kernel's peak reset after
the warm-up, `benchmarks.common.reset_peak_rss`). The analytic per-client state is the
adapter copy plus AdamW's two moments (3 × adapter bytes) and its gradient (1 ×) — what
the client axis carries; the base weights are shared by all clients, never stacked. The
batched child checks that too: XLA's memory analysis of the local-training program
(temporaries per client) and a search of its HLO for any buffer shaped like a base weight
with a leading client axis (`train_memory`).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any
from unittest import mock

import numpy as np

from benchmarks import common
from fedsp import hostalloc

ROLLOUTS = ("batched", "per_client")


def round_config(args: argparse.Namespace, clients: int):
    """The run config of one benchmark round (the demo's SPEAR settings, shrunk)."""
    from fedsp.config import default_config

    config = default_config()
    config.model.lora.rank, config.model.lora.alpha = 16, 32.0
    config.task.name = "arithmetic"
    config.data.num_clients = max(8, clients)
    config.algorithm.name = "spear"
    config.algorithm.max_revisions = args.revisions
    config.rollout.prompts_per_client = args.prompts
    config.rollout.max_new_tokens = args.new_tokens
    config.local.steps = args.local_steps
    config.local.batch_size = args.local_batch
    config.local.max_len = args.max_len
    config.fl.clients_per_round = clients
    config.fl.backend = args.backend
    return config


class Sampler:
    """The ``generate_fn`` of the benchmarked Spear: `fedsp.selfplay.rollout.sample_completions`,
    once per call (batched) or once per client (per-client), counting sampler calls and
    generated tokens.

    Per-client needs each row's client: it is what ``collect`` passes to
    ``rollout.rollout_keys`` just before calling the sampler, so `rollout_keys` is installed
    in its place while collecting (`collecting`).
    """

    def __init__(self, per_client: bool):
        from fedsp.selfplay import rollout

        self.rollout, self.per_client = rollout, per_client
        self.real_row_keys = rollout.rollout_keys
        self.calls = self.tokens = 0
        self.row_clients: list[int] = []
        # One entry per sampler call: rows, prompt tokens, longest prompt, seconds.
        self.log: list[dict[str, float]] = []

    def rollout_keys(self, key, round, attempt, clients, prompts, samples=None):
        self.row_clients = [int(c) for c in clients]
        return self.real_row_keys(key, round, attempt, clients, prompts, samples)

    def collecting(self):
        return mock.patch.object(self.rollout, "rollout_keys", self.rollout_keys)

    def __call__(
        self, policy, lora_state, prompts, keys, params, *, keep_cache=False, continue_from=None
    ):
        if not self.per_client:
            groups = [list(range(len(prompts)))]
        else:
            if len(self.row_clients) != len(prompts):
                raise RuntimeError("row clients not recorded for this sampler call")
            by_client: dict[int, list[int]] = {}
            for row, c in enumerate(self.row_clients):
                by_client.setdefault(c, []).append(row)
            groups = list(by_client.values())
        out: list[Any] = [None] * len(prompts)
        for rows in groups:
            start = time.perf_counter()
            done = self.rollout.sample_completions(
                policy,
                lora_state,
                [prompts[r] for r in rows],
                keys[np.asarray(rows)],
                params,
                keep_cache=keep_cache,
                continue_from=None if continue_from is None else [continue_from[r] for r in rows],
            )
            lengths = [len(prompts[r]) for r in rows]
            self.log.append(
                {
                    "rows": len(rows),
                    "prompt_tokens": sum(lengths),
                    "longest_prompt": max(lengths),
                    "s": time.perf_counter() - start,
                }
            )
            self.calls += 1
            for r, completion in zip(rows, done):
                out[r] = completion
                self.tokens += len(completion.tokens)
        return out


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One (C, rollout) configuration; runs in its own process."""
    import jax
    import jax.numpy as jnp

    from fedsp import data as data_lib
    from fedsp.core.aggregation import server_optimizer
    from fedsp.federated import client_prompts
    from fedsp.federated.mapping import map_clients
    from fedsp.federated.server import server_step, tree_bytes
    from fedsp.selfplay.base import Policy
    from fedsp.selfplay.spear import Spear

    c = args.clients_per_round
    config = round_config(args, c)
    start = time.perf_counter()
    graphdef, lora, base_state, tokenizer = common.load_policy(
        config.model.lora.rank, config.model.lora.alpha
    )
    load_s = time.perf_counter() - start
    loaded_rss = common.current_rss_bytes()

    task = data_lib.get_task("arithmetic")
    train = task.load("train", limit=50 * config.data.num_clients, seed=0)
    shards = data_lib.iid_partition(len(train), config.data.num_clients, seed=0)
    clients = list(range(c))
    examples = [
        [train[i] for i in client_prompts(shards[k], args.prompts, 0, 1, k)] for k in clients
    ]
    feedback = data_lib.get_feedback("hint", task)
    sampler = Sampler(per_client=args.rollout == "per_client")
    algo = Spear("spear", config, generate_fn=sampler)
    policy = Policy(graphdef, base_state, tokenizer)
    train_clients = map_clients(
        functools.partial(algo.local_train, graphdef), args.backend, in_axes=(None, None, 0, 0)
    )
    optimizer = server_optimizer("fedavg", 1.0)
    opt_state = optimizer.init(lora)
    collect_key, train_key = jax.random.split(jax.random.key(0))
    keys = jnp.stack([jax.random.fold_in(train_key, k) for k in clients])
    baselines = np.full((c,), np.nan, np.float32)

    batch_for_analysis: list[Any] = []

    def one_round() -> dict[str, Any]:
        sampler.calls = sampler.tokens = 0
        t0 = time.perf_counter()
        with sampler.collecting():
            batch, metrics = algo.collect(
                policy, lora, examples, task, feedback, collect_key, 1, baselines=baselines
            )
        common.block(batch)
        batch_for_analysis[:] = [batch]
        t1 = time.perf_counter()
        client_lora, stats = common.block(train_clients(base_state, lora, batch, keys))
        t2 = time.perf_counter()
        new_lora, _, _ = common.block(
            server_step(
                lora,
                opt_state,
                client_lora,
                np.asarray(stats["num_examples"], np.float32),
                np.asarray(stats["mean_advantage"], np.float32),
                optimizer=optimizer,
            )
        )
        t3 = time.perf_counter()
        return {
            "rollout_s": t1 - t0,
            "train_s": t2 - t1,
            "server_s": t3 - t2,
            "round_s": t3 - t0,
            "sampler_calls": sampler.calls,
            "generated_tokens": sampler.tokens,
            "rows": int(metrics["rollout/generated"]),
            "wins": int(metrics["rollout/wins"]),
            "train_shape": list(batch.train.tokens.shape),
            "fingerprint": float(
                sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(new_lora))
            ),
        }

    warm = one_round()
    warm_peak = common.peak_rss_bytes()
    reset = common.reset_peak_rss()
    rss_after_warmup = common.current_rss_bytes()
    timed = [one_round() for _ in range(args.repeats)]
    round_peak = common.peak_rss_bytes() if reset else None
    process_peak = max(warm_peak, common.peak_rss_bytes())
    med = {
        k: statistics.median(t[k] for t in timed)
        for k in ("rollout_s", "train_s", "server_s", "round_s")
    }
    side_by_side: dict[str, Any] = {}
    if args.rollout == "batched" and args.side_by_side and c > 1:
        # The per-client rollout of the same round in this process, alternating with the
        # batched one: both see the same machine load (the two children do not).
        other = Sampler(per_client=True)
        algo_pc = Spear("spear", config, generate_fn=other)

        def collect(a, s):
            t0 = time.perf_counter()
            with s.collecting():
                out = common.block(
                    a.collect(
                        policy, lora, examples, task, feedback, collect_key, 1, baselines=baselines
                    )[0]
                )
            return out, time.perf_counter() - t0

        ref, _ = collect(algo_pc, other)  # warm-up: compiles the per-client shapes
        pairs, calls = [], {}
        for _ in range(args.repeats):
            sampler.log, other.log = [], []
            pairs.append((collect(algo, sampler)[1], collect(algo_pc, other)[1]))
            calls = {"batched": list(sampler.log), "per_client": list(other.log)}  # last pair
        batched_batch, _ = collect(algo, sampler)
        side_by_side = {
            "sbs_calls": calls,
            "sbs_batched_rollout_s": statistics.median(p[0] for p in pairs),
            "sbs_per_client_rollout_s": statistics.median(p[1] for p in pairs),
            "sbs_pairs_s": pairs,
            "sbs_same_batch": all(
                np.array_equal(np.asarray(x), np.asarray(y))
                for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(batched_batch))
            ),
        }
    xla: dict[str, Any] = {}
    if args.rollout == "batched" and args.train_memory:
        xla = train_memory(train_clients, base_state, lora, batch_for_analysis[0], keys, c)
    adapter = tree_bytes(lora)
    return {
        **side_by_side,
        **xla,
        "clients": c,
        "rollout": args.rollout,
        **med,
        "warmup_round_s": warm["round_s"],
        "warmup_phases_s": [warm[k] for k in ("rollout_s", "train_s", "server_s")],
        "rss_after_warmup_mib": common.mib(rss_after_warmup),
        **{
            k: timed[0][k]
            for k in (
                "sampler_calls",
                "generated_tokens",
                "rows",
                "wins",
                "train_shape",
                "fingerprint",
            )
        },
        "load_s": load_s,
        "loaded_rss_mib": common.mib(loaded_rss),
        "process_peak_rss_mib": common.mib(process_peak),
        "round_peak_rss_mib": common.mib(round_peak),
        "adapter_mib": common.mib(adapter),
        # adapters + AdamW (m, v): the state a client holds through its local steps.
        "client_state_mib": common.mib(3 * adapter),
        "client_state_with_grads_mib": common.mib(4 * adapter),
    }


def train_memory(train_clients, base_state, lora, batch, keys, clients: int) -> dict[str, Any]:
    """XLA's buffer sizes of the round's local-training program, and whether any buffer
    has the shape of a base weight stacked over clients ([C, *base_shape]: a per-client
    base-model copy). Compiled apart from the timed runs (one more compile)."""
    import jax

    compiled = jax.jit(train_clients).lower(base_state, lora, batch, keys).compile()
    stats = compiled.memory_analysis()
    hlo = compiled.as_text()
    base_shapes = {tuple(x.shape) for x in jax.tree.leaves(base_state) if x.ndim >= 2}
    candidates = {f"f32[{clients},{','.join(map(str, s))}]" for s in base_shapes}
    stacked = sorted(c for c in candidates if c in hlo)
    return {
        "train_xla_temp_mib": common.mib(stats.temp_size_in_bytes),
        "train_xla_argument_mib": common.mib(stats.argument_size_in_bytes),
        "train_xla_output_mib": common.mib(stats.output_size_in_bytes),
        "train_stacked_base_buffers": stacked,
    }


def sbs(row: dict[str, Any]) -> str:
    if "sbs_batched_rollout_s" not in row:
        return "—"
    b, p = row["sbs_batched_rollout_s"], row["sbs_per_client_rollout_s"]
    return f"{b:.1f} / {p:.1f} s ({p / b:.2f}×)"


def table(rows: Sequence[dict[str, Any]]) -> str:
    by = {(r["clients"], r["rollout"]): r for r in rows}
    lines = [
        "| clients | batched round | per-client round | speed-up | batched rollout | "
        "per-client rollout | rollout speed-up | side by side: rollout b / pc (speed-up) | "
        "train b / pc | sampler calls b / pc | round peak RSS b / pc (MiB) | "
        "process peak RSS b / pc (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted({r["clients"] for r in rows}):
        b, p = by.get((c, "batched")), by.get((c, "per_client"))
        if not (b and p):
            continue
        fmt = lambda x: "—" if x is None else f"{x:.0f}"  # noqa: E731
        lines.append(
            f"| {c} | {b['round_s']:.1f} s | {p['round_s']:.1f} s | "
            f"{p['round_s'] / b['round_s']:.2f}× | {b['rollout_s']:.1f} s | "
            f"{p['rollout_s']:.1f} s | {p['rollout_s'] / b['rollout_s']:.2f}× | {sbs(b)} | "
            f"{b['train_s']:.1f} / {p['train_s']:.1f} s | {b['sampler_calls']} / "
            f"{p['sampler_calls']} | {fmt(b['round_peak_rss_mib'])} / "
            f"{fmt(p['round_peak_rss_mib'])} | {fmt(b['process_peak_rss_mib'])} / "
            f"{fmt(p['process_peak_rss_mib'])} |"
        )
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--clients",
        type=ints,
        default=[1, 2, 4, 8],
        help="clients per round to measure (comma-separated)",
    )
    p.add_argument("--rollouts", type=lambda s: s.split(","), default=list(ROLLOUTS))
    p.add_argument("--prompts", type=int, default=4, help="prompts per client")
    p.add_argument("--new-tokens", type=int, default=16, help="rollout.max_new_tokens")
    p.add_argument("--revisions", type=int, default=1, help="algorithm.max_revisions")
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument(
        "--local-batch",
        type=int,
        default=1,
        help="local.batch_size: wins (and as many loses) per step",
    )
    p.add_argument("--max-len", type=int, default=128, help="local.max_len")
    p.add_argument("--backend", default="vmap", help="fl.backend of local training")
    p.add_argument("--repeats", type=int, default=1, help="timed rounds after the warm-up")
    p.add_argument(
        "--no-side-by-side",
        dest="side_by_side",
        action="store_false",
        help="skip timing the per-client rollout inside the batched child",
    )
    p.add_argument(
        "--no-train-memory",
        dest="train_memory",
        action="store_false",
        help="skip XLA's memory analysis of the training program (batched child)",
    )
    p.add_argument("--json", help="also write every configuration's figures here")
    # Internal: run one configuration in this process.
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--clients-per-round", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rollout", choices=ROLLOUTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        common.emit(child(args))
        return
    shared = [
        "--prompts",
        str(args.prompts),
        "--new-tokens",
        str(args.new_tokens),
        "--revisions",
        str(args.revisions),
        "--local-steps",
        str(args.local_steps),
        "--local-batch",
        str(args.local_batch),
        "--max-len",
        str(args.max_len),
        "--backend",
        args.backend,
        "--repeats",
        str(args.repeats),
        *([] if args.side_by_side else ["--no-side-by-side"]),
        *([] if args.train_memory else ["--no-train-memory"]),
    ]
    rows = []
    start = time.perf_counter()
    for c in args.clients:
        for rollout in args.rollouts:
            if c == 1 and rollout == "per_client" and "batched" in args.rollouts:
                # One client: one sampler call either way, the same computation.
                rows.append(dict(rows[-1], rollout="per_client", same_as_batched=True))
                continue
            row = common.run_child(
                "benchmarks.round",
                ["--child", "--clients-per-round", str(c), "--rollout", rollout, *shared],
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    for c in args.clients:
        same = {r["fingerprint"] for r in rows if r["clients"] == c}
        if len(same) > 1:
            print(f"WARNING: C={c}: the rollouts gave different adapters {sorted(same)}")
    print(
        f"\nworkload: {args.prompts} prompts/client, {args.new_tokens} new tokens, "
        f"{args.revisions} revision(s), {args.local_steps} local step(s) of batch "
        f"{args.local_batch}, max_len {args.max_len}, backend {args.backend}; "
        f"{args.repeats} timed round(s) after a warm-up; total "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(table(rows))
    for r in rows:
        if r["rollout"] == "batched" and "train_xla_temp_mib" in r:
            print(
                f"C={r['clients']}: training program temp {r['train_xla_temp_mib']:.0f} MiB "
                f"({r['train_xla_temp_mib'] / r['clients']:.0f} MiB per client), arguments "
                f"{r['train_xla_argument_mib']:.0f} MiB, outputs {r['train_xla_output_mib']:.0f} "
                f"MiB; base weights stacked over clients: "
                f"{r['train_stacked_base_buffers'] or 'none'}"
            )
    for r in rows:
        for arm, log in r.get("sbs_calls", {}).items():
            # Spear.collect calls the sampler once per attempt (batched) or once per client
            # and attempt (per-client): attempt k's calls are the k-th run of calls.
            print(
                f"C={r['clients']} side by side, {arm} sampler calls (rows, prompt tokens, s): "
                + ", ".join(f"({e['rows']}, {e['prompt_tokens']}, {e['s']:.2f})" for e in log)
                + f"; total {sum(e['s'] for e in log):.2f} s"
            )
    if rows:
        print(
            f"\nper-client state (analytic): adapters {rows[0]['adapter_mib']:.1f} MiB, "
            f"+ AdamW moments {rows[0]['client_state_mib']:.1f} MiB, + gradients "
            f"{rows[0]['client_state_with_grads_mib']:.1f} MiB"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    hostalloc.reexec_with_tunables()  # before any work: see fedsp/hostalloc.py
    main()
