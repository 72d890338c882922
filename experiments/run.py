"""Runs one experiment: ``python -m experiments.run --config=experiments/configs/demo.py
--workdir=runs/demo [--config.fl.rounds=3 ...]``.

Every config field can be overridden on the command line (ml_collections
``config_flags``). Running again with the same ``--workdir`` resumes from its latest
checkpoint. At the end it prints the accuracy of every evaluated round and the run
directory.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed if present)")


def accuracy_table(summary: dict) -> str:
    """The per-round accuracy and wall time of ``summary`` as a fixed-width text table
    (round 0 is the evaluation before training; its time is that evaluation's)."""
    times = summary.get("time_by_round", {})
    lines = ["round  accuracy  time (s)"]
    for rnd, acc in summary["accuracy_by_round"].items():
        seconds = times.get(rnd)
        shown = f"{seconds:8.1f}" if seconds is not None else f"{'-':>8}"
        lines.append(f"{int(rnd):>5}  {acc:8.3f}  {shown}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax logs every checkpoint step at INFO; the progress bar and the table suffice.
    logging.set_verbosity(logging.WARNING)
    import fedsp

    summary = fedsp.run(_CONFIG.value, pathlib.Path(_WORKDIR.value))
    print(accuracy_table(summary))
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "initial_accuracy",
                    "final_accuracy",
                    "best_accuracy",
                    "wall_time_s",
                    "compile_s",
                )
            }
        )
    )
    print(f"run directory: {summary['workdir']}")
    sys.stdout.flush()


if __name__ == "__main__":
    from fedsp import hostalloc

    hostalloc.reexec_with_tunables()  # before any work: see fedsp/hostalloc.py
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
