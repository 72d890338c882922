"""The capacity planner against reality at SmolLM2 scale on CPU: predicted vs measured bytes
of the same programs.

    python -m benchmarks.plan_check [--config experiments/configs/demo.py] [--remat none,full]

For each program of the config's round (rollout sampler, mapped local training, server
step, evaluation) a fresh child process

- plans it: `fedsp.plan.plan_round` on ``cpu:1`` from SmolLM2-135M's config.json alone
  (shapes only);
- runs it: ``fedsp.init_run`` with a SmolLM2-135M-shaped model (random float32 weights:
  the bytes do not depend on the values) and the real SmolLM2 tokenizer, then the call the
  round makes, on real arrays of the planned shapes: ``sampling.generate`` for the
  rollout (no EOS, so every row decodes every token) and the greedy evaluation,
  ``run.train_clients`` for training, ``server_step`` for the server;
- measures: the argument and output bytes of those arrays on the device (their shards),
  and the resident memory the call adds: the process's peak RSS during the second call
  (the first compiles) minus its RSS before it. glibc is told to ``mmap`` every
  allocation above 128 KiB and to return it at ``free`` (``GLIBC_TUNABLES``), so XLA's
  buffers of the call are fresh pages and its growth is what the call touched;
- compares: measured arguments with planned arguments, and the measured growth with the
  planned peak − arguments (the outputs and temporaries the call allocates). The growth
  counts pages written, so a temporary buffer XLA reserves but never fully writes makes
  it lower than planned.

Also checks that the planned program is the run's: compiled from the run's arrays
instead of shapes, it has the same argument, output and temporary bytes. Results go to
BENCHMARKS.md ("Capacity planner").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import common

PROGRAMS = ("rollout", "train", "server", "eval")
SMOLLM2 = (
    pathlib.Path(__file__).resolve().parents[1] / "experiments/model_configs/smollm2_135m.json"
)
# Every allocation above 128 KiB is its own mmap, unmapped when freed (a fixed threshold
# also stops glibc from raising it after frees).
TUNABLES = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"


def _config(path: str, remat: str):
    config = _load(path)
    config.model.remat = remat
    config.log.tensorboard = False
    config.log.progress = False
    return config


def _load(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_check_config", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _materialize(tree: Any, vocab: int) -> Any:
    """Arrays of ``tree``'s ShapeDtypeStructs on their shardings: token ids below the
    vocabulary, masks and weights 1, keys split from key(0)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)

    def fill(s):
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            value = jax.random.split(jax.random.key(0), s.shape[0])
        elif s.dtype == jnp.int32:
            value = rng.integers(3, vocab, size=s.shape, dtype=np.int32)
        else:
            value = np.ones(s.shape, s.dtype)
        return jax.device_put(value, s.sharding)

    return jax.tree.map(fill, tree)


def child(program: str, config_path: str, remat: str) -> dict[str, Any]:
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import fedsp
    from fedsp.assets import default_model_path
    from fedsp.federated import default_optimizer
    from fedsp.federated.server import server_step
    from fedsp.model import Tokenizer, Transformer
    from fedsp.model.config import ModelConfig
    from fedsp.model.sampling import bucket_length, generate, lower_generate
    from fedsp.model.sharding import device_bytes
    from fedsp.plan import get_target, plan_round
    from fedsp.plan.abstract import abstract_batch, round_rows, stacked

    config = _config(config_path, remat)
    model_config = ModelConfig.from_hf(json.loads(SMOLLM2.read_text()))
    target = get_target("cpu:1")
    (planned,) = plan_round(config, target, model_config, programs=[program]).programs

    model = Transformer(model_config, rngs=nnx.Rngs(0))
    state = fedsp.init_run(config, model=model, tokenizer=Tokenizer.from_gguf(default_model_path()))
    run = state.run
    assert run is not None and run.mesh is not None
    mesh, policy, params = run.mesh, run.policy, state.params
    device = jax.devices()[0]
    seq_len = config.local.max_len
    vocab = model_config.vocab_size

    if program in ("rollout", "eval"):
        r, e = config.rollout, config.eval
        rows = round_rows(config, run.algorithm)
        if program == "rollout":
            total = config.fl.clients_per_round * rows.sampled
            batch = 1 << (min(total, r.batch_size) - 1).bit_length()
            new, temperature, top_p = r.max_new_tokens, r.temperature, r.top_p
            keep = config.algorithm.name == "spear" and r.reuse_cache
        else:
            batch, new, temperature, top_p, keep = e.batch_size, e.max_new_tokens, 0.0, 1.0, False
        prompt = bucket_length(max(1, seq_len - bucket_length(new)))
        ids = _materialize(jax.ShapeDtypeStruct((batch, prompt), jnp.int32), vocab)
        mask = jnp.ones((batch, prompt), jnp.bool_)
        keys = jax.random.split(jax.random.key(1), batch)
        states = (params, policy.base_state)
        args: Any = (states, ids, mask, keys)
        call = functools.partial(
            generate,
            policy.graphdef,
            max_new_tokens=new,
            temperature=temperature,
            top_p=top_p,
            eos_ids=(),  # no row stops early: every decode step runs
            return_cache=keep,
        )

        def fn(states, ids, mask, keys):
            with jax.set_mesh(mesh):
                return call(states, ids, mask, keys)

        with jax.set_mesh(mesh):
            concrete = lower_generate(
                policy.graphdef,
                states,
                batch=batch,
                prompt_len=prompt,
                max_new_tokens=new,
                temperature=temperature,
                top_p=top_p,
                layer_loop="unrolled",
                return_cache=keep,
            )
    elif program == "train":
        clients = config.fl.clients_per_round
        rows = round_rows(config, run.algorithm)
        batch_c = _materialize(abstract_batch(config, rows, clients, seq_len, mesh), vocab)
        keys = jax.device_put(jax.random.split(jax.random.key(2), clients), batch_c.lr.sharding)
        args = (policy.base_state, params, batch_c, keys)
        fn = run.train_clients
        with jax.set_mesh(mesh):
            concrete = jax.jit(fn).lower(*args)
    else:
        fl = config.fl
        clients = fl.clients_per_round
        optimizer = default_optimizer(fl)
        client_params = _materialize(stacked(params, clients, mesh), vocab)
        n = jnp.ones((clients,), jnp.float32)
        args = (params, state.opt_state, client_params, n, n)
        fn = functools.partial(
            server_step,
            optimizer=optimizer,
            mode=fl.client_weighting,
            temperature=fl.weight_temperature,
            threshold=fl.prune_threshold,
        )
        with jax.set_mesh(mesh):
            concrete = jax.jit(fn).lower(*args)

    # The program compiled from the run's arrays has the planned program's buffers.
    stats = concrete.compile().memory_analysis()
    same = (
        stats.argument_size_in_bytes,
        stats.output_size_in_bytes,
        stats.temp_size_in_bytes,
    ) == (planned.argument_bytes, planned.output_bytes, planned.temp_bytes)

    common.block(fn(*args))  # compiles
    common.block(args)
    common.reset_peak_rss()
    before = common.current_rss_bytes()
    out = common.block(fn(*args))
    peak = common.peak_rss_bytes()
    return {
        "program": program,
        "remat": remat,
        "shape": planned.shape,
        "same_buffers": same,
        "planned_argument_bytes": planned.argument_bytes,
        "planned_output_bytes": planned.output_bytes,
        "planned_temp_bytes": planned.temp_bytes,
        "planned_peak_bytes": planned.peak_bytes,
        "planned_xla_peak_bytes": planned.xla_peak_bytes,
        "measured_argument_bytes": device_bytes(args, device),
        "measured_output_bytes": device_bytes(out, device),
        "measured_growth_bytes": None if before is None else peak - before,
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    mib = common.mib
    lines = [
        "| program | remat | shape | same buffers | arguments planned / measured (MiB) | "
        "outputs planned / measured | planned peak − arguments | measured RSS growth | "
        "growth / planned |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        planned_new = r["planned_peak_bytes"] - r["planned_argument_bytes"]
        growth = r["measured_growth_bytes"]
        lines.append(
            f"| {r['program']} | {r['remat']} | {r['shape']} | {'yes' if r['same_buffers'] else 'NO'} "
            f"| {mib(r['planned_argument_bytes']):.1f} / {mib(r['measured_argument_bytes']):.1f} "
            f"| {mib(r['planned_output_bytes']):.1f} / {mib(r['measured_output_bytes']):.1f} "
            f"| {mib(planned_new):.1f} | {mib(growth):.1f} | {growth / planned_new:.2f} |"
        )
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/configs/demo.py")
    parser.add_argument("--programs", default=",".join(PROGRAMS))
    parser.add_argument("--remat", default="none,full", help="model.remat values to check")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        program, remat = args.child.split(":")
        common.emit(child(program, args.config, remat))
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    rows = []
    for remat in args.remat.split(","):
        for program in args.programs.split(","):
            if remat != "none" and program != "train":
                continue  # remat changes the training step only
            row = common.run_child(
                "benchmarks.plan_check", ["--config", args.config, "--child", f"{program}:{remat}"]
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(rows))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
