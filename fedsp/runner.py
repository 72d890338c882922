"""Runs from a config: ``init_run`` (`fedsp.run_setup`) builds a `RunState`, ``run``
loops over `run_round`, saving checkpoints with `fedsp.run_checkpoint.save_checkpoint`.

``run(config, workdir)`` is ``init_run``, the round-0 evaluation, `run_round` until
``fl.rounds``, and around each round the run directory's files: ``config.json``,
``metrics.jsonl``, TensorBoard events, an Orbax checkpoint of the run state every
``checkpoint.every`` rounds (the algorithm's client-side data beside it, never on the
server) and, at the end, ``summary.json``. A run killed after round r and restarted in
the same ``workdir`` continues with the numbers of an uninterrupted run; resuming with
different settings raises, naming the fields (``log.*``, ``checkpoint.*``,
``distributed.*``, ``fl.mesh`` and the memory levers ``model.remat``,
``local.micro_batch_size`` and ``fl.clients_at_once`` may change).

Nothing is lost on a crash, and the resume is exact. The newest committed checkpoint is
the run's truth: a kill (even mid-write: Orbax commits a round by renaming it into place,
and deletes older rounds only after that), a full disk or a damaged newest checkpoint
(moved aside to ``<round>.corrupt`` with a logged warning) leaves the run resuming after
the newest readable round. A round's ``metrics.jsonl`` record is appended after its
checkpoint is written, so the file never shows a round the checkpoints lack (rounds
between checkpoints, with ``checkpoint.every`` > 1, excepted); the resume rewrites it
from the restored history, so no round is recorded twice. A checkpoint that fails for
lack of space raises OSError (ENOSPC) naming the path and the round to resume from.

Multi-host (`fedsp.distributed`): every process calls `run` with the same config (but
its own ``distributed.process_id``) and the same ``workdir``, which they must all see;
the main process writes ``config.json``, ``metrics.jsonl``, TensorBoard and
``summary.json``, and every process takes part in the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from fedsp import compilation_cache, distributed, progress
from fedsp.config import validate
from fedsp.federated.round import evaluate, run_round
from fedsp.federated.state import RoundHooks
from fedsp.model import Tokenizer, Transformer
from fedsp.run_checkpoint import save_checkpoint
from fedsp.run_setup import init_run

__all__ = ["init_run", "round_times", "run", "save_checkpoint"]

_log = logging.getLogger(__name__)


def run(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    hooks: RoundHooks | None = None,
    model: Transformer | None = None,
    tokenizer: Tokenizer | None = None,
    algorithm: Any | None = None,
    train_data: bool = True,
) -> dict[str, Any]:
    """Runs (or resumes) a federated self-play experiment into ``workdir``.

    Args:
      config: an experiment config (`fedsp.config.default_config` schema).
      workdir: the run directory (see the module docstring); if it holds checkpoints
        the run resumes from the newest one.
      hooks: observe the clients' uploads or wrap / replace the server step
        (`fedsp.federated.RoundHooks`).
      model, tokenizer, algorithm, train_data: an in-memory model and its tokenizer, a
        client algorithm object, whether to read the training split (see `init_run`;
        without it, ``hooks.client_updates`` must bring the clients' updates).

    Returns:
      The summary: ``initial_accuracy`` (round 0), ``final_accuracy``,
      ``best_accuracy``, ``accuracy_by_round``, ``rounds``, ``bytes_sent``,
      ``bytes_saved``, ``rejected_updates``, ``skipped_rounds``, ``time_by_round``
      (each round's wall time; round 0's is the first evaluation), ``wall_time_s``,
      ``compile_s`` (of it, tracing and compiling, or loading compiled programs from the
      persistent cache) and ``compile`` (that time split into ``trace_s``, tracing and
      lowering, and ``backend_s``, XLA compiling or loading from the cache, with the
      cache's ``cache_hits`` and ``cache_misses``), ``workdir``.

    Raises:
      ValueError: see `init_run`.

    In a multi-process run (``config.distributed``) an error ends the process instead of
    raising (`fedsp.distributed.stop_all_on_error`).
    """
    start = time.perf_counter()
    distributed.initialize(config.distributed)
    # A failing process of a multi-host run ends at once, so the others stop too.
    with distributed.stop_all_on_error():
        return _run(config, workdir, hooks, model, tokenizer, algorithm, train_data, start)


def _run(
    config, workdir, hooks, model, tokenizer, algorithm, train_data: bool, start: float
) -> dict[str, Any]:
    if not train_data and (hooks is None or hooks.client_updates is None):
        raise ValueError(
            "run(train_data=False) needs hooks.client_updates: without the training data "
            "the clients' updates must come from elsewhere (e.g. fedsp.flower)"
        )
    validate(config)
    # In a multi-host run the main process writes the run files; all write checkpoints.
    main = distributed.is_main_process()
    workdir = pathlib.Path(workdir).absolute()
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    from tqdm.auto import tqdm

    compile_start = compilation_cache.compile_clock()
    fl = config.fl
    # One bar for the whole run: its description says what the run is doing, its
    # postfix how far the current phase is (`fedsp.progress`).
    bar = tqdm(total=fl.rounds, desc="loading model", disable=not (config.log.progress and main))

    def show(phase: str, done: int, total: int) -> None:
        bar.set_postfix_str(f"{phase} {done}/{total}")

    with progress.listening(show):
        state = init_run(
            config,
            model=model,
            tokenizer=tokenizer,
            workdir=workdir,
            algorithm=algorithm,
            train_data=train_data,
        )
        context = state.run
        assert context is not None
        logger = _Logger(workdir if main else None, config.log.tensorboard)
        # metrics.jsonl as the checkpoint knows it (drops lines of an unfinished round).
        logger.rewrite(state.metrics_history)
        bar.update(state.round)
        if not state.metrics_history:
            bar.set_description_str("round 0: evaluating (compiling on first use)")
            eval_start = time.perf_counter()
            record = {"round": 0, **evaluate(state)}
            record["time/eval_s"] = time.perf_counter() - eval_start
            state = dataclasses.replace(state, metrics_history=(record,))
            logger.write(record)
        first = state.round + 1
        for rnd in range(first, fl.rounds + 1):
            note = " (compiling: first round only)" if rnd == first else ""
            bar.set_description_str(f"round {rnd}/{fl.rounds}{note}")
            bar.set_postfix_str("")
            state, record = run_round(state, hooks=hooks)
            if rnd % config.checkpoint.every == 0 or rnd == fl.rounds:
                bar.set_description_str(f"round {rnd}/{fl.rounds}: checkpoint")
                save_checkpoint(state)
            # After the checkpoint: a crash in between leaves no record of a round the
            # resume runs again (see the module docstring).
            logger.write(record)
            bar.update(1)
            line = round_times(record)
            _log.info(line)
            if not bar.disable:
                bar.write(line, file=sys.stderr)  # where the bar is, above it
    bar.close()
    context.close()
    logger.close()

    history = state.metrics_history
    accuracies = [(r["round"], r["eval/accuracy"]) for r in history if "eval/accuracy" in r]
    summary = {
        "workdir": str(workdir),
        "rounds": fl.rounds,
        "initial_accuracy": accuracies[0][1],
        "final_accuracy": accuracies[-1][1],
        "best_accuracy": max(a for _, a in accuracies),
        "accuracy_by_round": {str(r): a for r, a in accuracies},
        "bytes_sent": sum(r.get("bytes_sent", 0) for r in history),
        "bytes_saved": sum(r.get("bytes_saved", 0) for r in history),
        "rejected_updates": sum(len(r.get("rejected", [])) for r in history),
        "skipped_rounds": sum(bool(r.get("server_step_skipped")) for r in history),
        # Round 0 is the evaluation before training.
        "time_by_round": {str(r["round"]): r.get("time_s", r.get("time/eval_s")) for r in history},
        "wall_time_s": time.perf_counter() - start,
    }
    compiled = compilation_cache.compile_clock().since(compile_start)
    summary["compile_s"] = compiled.total_s
    summary["compile"] = {
        "trace_s": compiled.trace_s,
        "backend_s": compiled.backend_s,
        "cache_hits": compiled.cache_hits,
        "cache_misses": compiled.cache_misses,
        "background_s": compiled.background_s,
    }
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def round_times(record: dict[str, Any]) -> str:
    """One line with a round's wall time and its parts (`fedsp.run_round`'s ``time/*``),
    its accuracy and loss when it has them."""
    parts = ", ".join(
        f"{name} {record[f'time/{key}_s']:.1f}"
        for key, name in (
            ("rollout", "rollout"),
            ("train", "training"),
            ("server", "server"),
            ("eval", "evaluation"),
            ("compile", "of which compiling"),
        )
        if f"time/{key}_s" in record
    )
    text = f"round {record['round']}: {record['time_s']:.1f} s ({parts})"
    if record.get("eval/accuracy") is not None:
        text += f", accuracy {record['eval/accuracy']:.3f}"
    if record.get("loss") is not None:
        text += f", loss {record['loss']:.4f}"
    return text


class _Logger:
    """``metrics.jsonl`` (one JSON record per line) and optional TensorBoard scalars;
    without a workdir (a multi-host run's other processes) it writes nothing."""

    def __init__(self, workdir: pathlib.Path | None, tensorboard: bool):
        self.path = None if workdir is None else workdir / "metrics.jsonl"
        self.writer = None
        if tensorboard and workdir is not None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def rewrite(self, history: Sequence[Mapping[str, Any]]) -> None:
        if self.path is not None:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "round":
                    self.writer.add_scalar(key, value, record["round"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
