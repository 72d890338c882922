"""Runs `fedsp.run` on the tiny model in a process of its own, and on request SIGKILLs
that process inside the checkpoint write of one round (or fills its disk before it).

``python -m tests.checkpoint.crash_worker MODEL_DIR WORKDIR [ROUND:POINT]``

A SIGKILL is a power cut or the kernel's OOM killer as the run sees it: no ``finally``,
no ``atexit``, Orbax's writer threads stop where they are. The kill is tied to one of
Orbax's own file operations on round ROUND's checkpoint (never to a timer), so the files
left behind are the same on every machine. POINT is one of

- ``write``: before the JSON side of the round (``meta/data.json``) is written into the
  round's temporary directory; the array files may be written or half written.
- ``commit``: before the rename that commits the round; every file of it is written.
- ``prune``: after that rename, before older rounds beyond ``checkpoint.keep`` are
  deleted and before `fedsp.save_checkpoint` returns.
- ``fill``: no kill; before the round's checkpoint a file ``WORKDIR/../ballast`` takes
  every free byte of the file system (meant for a small tmpfs), so the save meets a real
  ENOSPC.

The test (`tests/checkpoint/test_run_failures.py`) runs the same command again without
the kill and compares the result with an uninterrupted run.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

from orbax.checkpoint._src.path import async_path

import fedsp
from tests.federated import fixtures

POINTS = ("write", "commit", "prune")


def config_for(model_dir: pathlib.Path):
    """A 4-round run whose every piece of run state matters to the next round: FedAdam
    moments, advantage weighting (reward baselines) and the RNG key."""
    return fixtures.tiny_config(
        model_dir,
        fl__rounds=4,
        fl__server_optimizer="fedadam",
        fl__server_lr=0.1,
        fl__client_weighting="advantage",
        eval__every=1,
    )


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_inside_save(round: int, point: str) -> None:
    """Makes the process SIGKILL itself at ``point`` of the save of round ``round``."""
    if point not in POINTS:
        raise ValueError(f"point must be one of {POINTS}, got {point!r}")
    tmp_name = f"{round}.orbax-checkpoint-tmp"
    write_text, rename = async_path.write_text, async_path.rename

    async def write_text_or_die(path, text):
        if point == "write" and path.name == "data.json" and tmp_name in path.parts:
            _die()
        return await write_text(path, text)

    async def rename_or_die(src, dst):
        commits = src.name == tmp_name and dst.name == str(round)
        if commits and point == "commit":
            _die()
        result = await rename(src, dst)
        if commits and point == "prune":
            _die()
        return result

    async_path.write_text, async_path.rename = write_text_or_die, rename_or_die


def fill_disk_before_save(round: int, ballast: pathlib.Path) -> None:
    """Makes ``ballast`` take all the free space just before round ``round``'s checkpoint."""
    from fedsp import runner

    save_checkpoint = runner.save_checkpoint

    def fill_then_save(state):
        if state.round == round:
            with ballast.open("wb", buffering=0) as f:
                try:
                    while True:
                        f.write(bytes(1 << 16))
                except OSError:  # ENOSPC: the disk is full
                    pass
        return save_checkpoint(state)

    runner.save_checkpoint = fill_then_save


def main(argv: list[str]) -> None:
    model_dir, workdir = pathlib.Path(argv[1]), pathlib.Path(argv[2])
    if len(argv) > 3:
        round, point = argv[3].split(":")
        if point == "fill":
            fill_disk_before_save(int(round), workdir.parent / "ballast")
        else:
            kill_inside_save(int(round), point)
    fedsp.run(config_for(model_dir), workdir, algorithm=fixtures.StandInAlgorithm())


if __name__ == "__main__":
    main(sys.argv)
