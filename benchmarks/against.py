"""``benchmarks.model --against REV``: fedsp's model code at two revisions, side by side.

``bench_against`` (the parent) starts this file as a script twice, each time with one
revision's source tree first on ``PYTHONPATH``, so ``import fedsp`` loads that revision.
Each worker reads one JSON request per line on stdin and answers one JSON line
on stdout; the parent alternates requests between two workers (two revisions), so both
are timed in the same minutes of the machine's drifting speed. Only APIs that both
revisions share are used: ``from_pretrained``, ``apply_lora``/``split_lora``, ``generate``.

Requests:
  {"op": "hello"}: loads SmolLM2 with a rank-16 LoRA whose B is non-zero (seeded), answers
    the path ``fedsp`` was imported from.
  {"op": "decode", "ids", "mask", "new", "layer_loop", "merge_lora"}: greedy generation,
    EOS off; the first request of a shape also compiles (answered as ``first_s``).
  {"op": "train", "ids", "mask"}: the gradient of the mean token log-likelihood with
    respect to the adapters (forward + backward through the stacked layers).
Answers carry ``seconds`` and a digest of the outputs, so the parent can check that both
revisions computed the same thing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()[:16]


class Worker:
    def __init__(self) -> None:
        import fedsp
        from fedsp import assets
        from fedsp.model import from_pretrained
        from fedsp.model.lora import LoRAConfig, apply_lora, split_lora

        self.origin = fedsp.__file__
        model, _ = from_pretrained(assets.default_model_path())
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        apply_lora(model, LoRAConfig(rank=16, alpha=32.0, targets=targets), rngs=nnx.Rngs(0))
        self.graphdef, lora, self.base = split_lora(model)
        rng = np.random.default_rng(0)
        # Non-zero B so the adapters change every projection's output.
        self.lora = jax.tree.map(
            lambda x: (
                jnp.asarray(rng.normal(0, 0.01, x.shape).astype(np.float32), x.dtype)
                if x.ndim == 3
                else x
            ),
            lora,
        )
        self.seen: set[tuple] = set()
        self._grad = jax.jit(jax.grad(self._loss))

    def _loss(self, lora: Any, base: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        model = nnx.merge(self.graphdef, lora, base)
        logp = jax.nn.log_softmax(model(ids[:, :-1], mask[:, :-1]))
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(tok * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    def decode(self, req: dict[str, Any]) -> dict[str, Any]:
        from fedsp.model.sampling import generate

        ids = np.asarray(req["ids"], np.int32)
        mask = np.asarray(req["mask"], np.int32)

        def run() -> Any:
            out = generate(
                self.graphdef,
                (self.lora, self.base),
                ids,
                mask,
                max_new_tokens=int(req["new"]),
                eos_ids=(),
                pad_id=0,
                layer_loop=req["layer_loop"],
                merge_lora=bool(req["merge_lora"]),
            )
            return jax.block_until_ready(out)

        return self._timed(
            ("decode", ids.shape, req["new"], req["layer_loop"], req["merge_lora"]),
            run,
            lambda out: _digest(out.tokens),
        )

    def train(self, req: dict[str, Any]) -> dict[str, Any]:
        ids = jnp.asarray(req["ids"], jnp.int32)
        mask = jnp.asarray(req["mask"], jnp.float32)

        def run() -> Any:
            return jax.block_until_ready(self._grad(self.lora, self.base, ids, mask))

        def digest(grads: Any) -> str:  # rounded: the two sides may differ in the last bits
            return _digest(*[np.round(np.asarray(g), 5) for g in jax.tree.leaves(grads)])

        return self._timed(("train", ids.shape), run, digest)

    def _timed(self, shape: tuple, run: Any, digest: Any) -> dict[str, Any]:
        answer: dict[str, Any] = {}
        if shape not in self.seen:
            start = time.perf_counter()
            run()
            answer["first_s"] = time.perf_counter() - start
            self.seen.add(shape)
        start = time.perf_counter()
        out = run()
        answer["seconds"] = time.perf_counter() - start
        answer["digest"] = digest(out)
        return answer


class RevisionWorker:
    """A ``benchmarks/revision_worker.py`` process importing fedsp from ``source``."""

    def __init__(self, source: str):
        script = os.path.abspath(__file__)
        env = {**os.environ, "PYTHONPATH": source}
        self.proc = subprocess.Popen(
            [sys.executable, script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.origin = self.ask({"op": "hello"})["fedsp"]

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"revision worker exited with {self.proc.wait()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def paired(
    workers: dict[str, RevisionWorker], request: dict[str, Any], repeats: int, against: str
) -> dict[str, Any]:
    """Alternating timings of one request on both workers, as the module docstring says."""
    seconds: dict[str, list[float]] = {name: [] for name in workers}
    first: dict[str, float] = {}
    digests: dict[str, set[str]] = {name: set() for name in workers}
    names = list(workers)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            answer = workers[name].ask(request)
            seconds[name].append(answer["seconds"])
            digests[name].add(answer["digest"])
            if "first_s" in answer:
                first[name] = answer["first_s"]
    ratios = [old / new for old, new in zip(seconds[against], seconds["this"])]
    return {
        "seconds": {name: statistics.median(v) for name, v in seconds.items()},
        "first_call_s": first,
        "pair_ratios": [round(r, 3) for r in ratios],
        "ratio": statistics.median(ratios),
        "same_output": digests[against] == digests["this"] and len(digests["this"]) == 1,
    }


def bench_against(
    args: Any, tokenizer: Any, prompts: Callable[[int], tuple[Any, Any]]
) -> dict[str, Any]:
    """This checkout's model code against revision ``args.against``, side by side.

    ``prompts(batch)`` gives the (ids, mask) of a decode batch.
    """
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = tempfile.mkdtemp(prefix="fedsp-rev-")
    archive = subprocess.run(
        ["git", "-C", repo, "archive", args.against, "fedsp"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    workers = {"this": RevisionWorker(repo), args.against: RevisionWorker(tree)}
    try:
        result: dict[str, Any] = {
            "against": args.against,
            "fedsp": {n: w.origin for n, w in workers.items()},
            "decode": [],
        }
        for batch in args.batches:
            ids, mask = prompts(batch)
            for layer_loop in ("unrolled", "scan"):
                request = {
                    "op": "decode",
                    "ids": ids.tolist(),
                    "mask": mask.tolist(),
                    "new": args.new_tokens,
                    "layer_loop": layer_loop,
                    "merge_lora": True,
                }
                row = {
                    "batch": batch,
                    "new_tokens": args.new_tokens,
                    "layer_loop": layer_loop,
                    **paired(workers, request, args.repeats, args.against),
                }
                result["decode"].append(row)
                print(json.dumps(row), flush=True)
        if not args.skip_train:
            rng = np.random.default_rng(0)
            shape = (args.train_batch, args.train_len)
            request = {
                "op": "train",
                "ids": rng.integers(0, tokenizer.vocab_size, shape).tolist(),
                "mask": np.ones(shape, np.int32).tolist(),
            }
            result["train"] = {
                "batch": args.train_batch,
                "tokens": args.train_len,
                **paired(workers, request, args.repeats, args.against),
            }
            print(json.dumps(result["train"]), flush=True)
        return result
    finally:
        for worker in workers.values():
            worker.close()
        shutil.rmtree(tree, ignore_errors=True)


def main() -> None:
    worker = None
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "hello":
            worker = Worker()
            answer: dict[str, Any] = {"fedsp": worker.origin}
        elif worker is None:
            answer = {"error": "send hello first"}
        else:
            answer = getattr(worker, req["op"])(req)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
