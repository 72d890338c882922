"""The server's own failures at the loop level: `fedsp.run` on the tiny model with a
workdir, killed inside a checkpoint write, resumed over a damaged newest checkpoint, or
out of disk space while it saves a round.

The invariant each test asserts: nothing is lost and the resume is exact. The rerun of
the same command ends with the metrics.jsonl of an uninterrupted run (every round's
record, wall times aside) and its final run state (adapters, FedAdam moments, RNG key,
reward baselines), bit for bit.

How the failures are made, each at a fixed point (no timers): a SIGKILL the run sends
itself from inside one of Orbax's file operations on the round's checkpoint, in a
process of its own (`tests.checkpoint.crash_worker`, importing fedsp from this checkout
through PYTHONPATH, not from wherever the package is installed); damage written into the
newest round's files; ENOSPC raised from Orbax's writer in this process (as a Python
write and as tensorstore report it), and once for real on a filled 8 MiB tmpfs in a
private mount namespace (skipped where ``unshare`` cannot mount one).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import async_path

import fedsp
from tests.checkpoint import crash_worker
from tests.federated import fixtures

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def config(model_dir):
    return crash_worker.config_for(model_dir)


def _history(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("time")} for line in lines
    ]


def _outcome(config, workdir: pathlib.Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(metrics.jsonl without wall times, the final run state's arrays by leaf path)."""
    state = fedsp.init_run(config, workdir=workdir, algorithm=fixtures.StandInAlgorithm())
    assert state.run is not None
    state.run.close()
    assert state.round == config.fl.rounds

    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    leaves = jax.tree_util.tree_flatten_with_path(state.arrays())[0]
    return _history(workdir), {jax.tree_util.keystr(p): host(x) for p, x in leaves}


def _assert_same_outcome(got, want):
    (history, arrays), (want_history, want_arrays) = got, want
    assert [r["round"] for r in history] == list(range(len(want_history)))
    assert history == want_history
    assert arrays.keys() == want_arrays.keys()
    for key in want_arrays:
        np.testing.assert_array_equal(arrays[key], want_arrays[key], err_msg=key)


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory):
    """The reference run's directory and outcome (tests copy the directory)."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    fedsp.run(config, workdir, algorithm=fixtures.StandInAlgorithm())
    return workdir, _outcome(config, workdir)


def _rerun(model_dir, workdir):
    """The same command again, in this process (`crash_worker.main`)."""
    crash_worker.main(["crash_worker", str(model_dir), str(workdir)])


def _committed(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize(("point", "round"), [("write", 2), ("commit", 3), ("prune", 3)])
def test_sigkill_inside_a_checkpoint_write_resumes_exactly(
    model_dir, config, uninterrupted, tmp_path, point, round
):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "tests.checkpoint.crash_worker", str(model_dir), str(workdir)]
    killed = subprocess.run(
        [*command, f"{round}:{point}"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = workdir / "checkpoints"
    if point == "prune":  # committed; round - 2 (beyond checkpoint.keep = 2) not yet deleted
        assert _committed(workdir) == [round - 2, round - 1, round]
    else:  # the torn write is left in its temporary directory
        assert _committed(workdir)[-1] == round - 1
        assert (checkpoints / f"{round}.orbax-checkpoint-tmp").is_dir()
    # A round's record is appended after its checkpoint: the killed round has none.
    assert [r["round"] for r in _history(workdir)] == list(range(round))

    _rerun(model_dir, workdir)
    _assert_same_outcome(_outcome(config, workdir), uninterrupted[1])
    assert sorted(p.name for p in checkpoints.iterdir()) == ["3", "4"]  # no leftovers


# --------------------------------------------------------------------------- damage


def _chunk_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The file holding the round's array chunks (zstd-compressed, in its first ~12 KiB
    here; the rest is a B-tree the commit superseded)."""
    [chunks] = [p for p in (step_dir / "state").glob("ocdbt.*/d/*") if p.is_file()]
    return chunks


def _truncate_chunks(step_dir):
    chunks = _chunk_file(step_dir)
    chunks.write_bytes(chunks.read_bytes()[:1024])


def _garbage_in_chunks(step_dir):
    """Same size, 64 bytes inverted inside the chunks: zstd decodes them to other numbers
    without an error (measured: at most offsets of the chunk data), so without the CRC-32
    saved on the JSON side the run would resume from wrong adapters."""
    chunks = _chunk_file(step_dir)
    data = bytearray(chunks.read_bytes())
    data[1024:1088] = bytes(b ^ 0xFF for b in data[1024:1088])
    chunks.write_bytes(bytes(data))


def _garbage_meta(step_dir):
    path = step_dir / "meta" / "data.json"
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256 + 1))


# Orbax's threads complain about the aborted read of a damaged file or the aborted save.
_aborted_orbax_io = pytest.mark.filterwarnings(
    "ignore::RuntimeWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)


@_aborted_orbax_io
@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate_chunks, "is corrupt or incomplete: ValueError"),
        (_garbage_in_chunks, "does not match the CRC-32 saved with it"),
        (_garbage_meta, "is corrupt or incomplete: UnicodeDecodeError"),
    ],
    ids=["truncated-chunks", "garbage-in-chunks", "garbage-meta"],
)
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_exactly(
    model_dir, config, uninterrupted, tmp_path, damage, reason, caplog
):
    # The finished reference run holds rounds 3 and 4 and records of rounds 0-4; with
    # round 4 damaged the rerun must drop round 4's record and run round 4 again.
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    damage(workdir / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, logger="fedsp"):
        _rerun(model_dir, workdir)
    assert re.search(
        rf"round 4 at \S*/checkpoints/4 .*{re.escape(reason)}.*; moved it to "
        r"\S*/checkpoints/4\.corrupt, resuming from round 3",
        caplog.text,
    ), caplog.text
    assert (workdir / "checkpoints" / "4.corrupt").is_dir()  # kept for inspection
    _assert_same_outcome(_outcome(config, workdir), uninterrupted[1])


# --------------------------------------------------------------------------- full disk


def _tensorstore_enospc(path):
    # What tensorstore raises (seen on a full tmpfs) when an array file hits ENOSPC.
    return ValueError(
        f'RESOURCE_EXHAUSTED: Error writing local file "{path}": Failed to write 4473 bytes '
        "to file 12: No space left on device [os_error_code='28']"
    )


@_aborted_orbax_io
@pytest.mark.parametrize(
    "error",
    [lambda path: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), _tensorstore_enospc],
    ids=["python-write", "tensorstore-write"],
)
def test_full_disk_fails_clearly_and_the_rerun_resumes_exactly(
    model_dir, config, uninterrupted, tmp_path, monkeypatch, error
):
    workdir = tmp_path / "run"
    write_text = async_path.write_text

    async def disk_full_in_round_3(path, text):
        if "3.orbax-checkpoint-tmp" in path.parts:
            raise error(path)
        return await write_text(path, text)

    monkeypatch.setattr(async_path, "write_text", disk_full_in_round_3)
    with pytest.raises(OSError) as failure:
        _rerun(model_dir, workdir)
    assert failure.value.errno == errno.ENOSPC
    message = str(failure.value)
    assert "the disk is full: the checkpoint of round 3 could not be written to " in message
    assert f"{workdir / 'checkpoints' / '3'} " in message
    assert f"free space in {workdir} and rerun the same command to resume after round 2" in message
    # No record of the round whose checkpoint failed; older rounds intact.
    assert [r["round"] for r in _history(workdir)] == [0, 1, 2]
    assert _committed(workdir) == [1, 2]

    monkeypatch.undo()  # space is freed
    _rerun(model_dir, workdir)
    _assert_same_outcome(_outcome(config, workdir), uninterrupted[1])


def _tmpfs_namespace(mount_point: pathlib.Path) -> list[str] | None:
    """The command prefix of a private mount namespace where a tmpfs can be mounted on
    ``mount_point`` (as root, or with unprivileged user namespaces), or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--map-root-user", "--mount"]
    probe = subprocess.run(
        [*prefix, "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', str(mount_point)],
        capture_output=True,
    )
    return prefix if probe.returncode == 0 else None


# The tmpfs lives as long as the namespace: the run directory is copied out of it.
_FULL_DISK_SCRIPT = """
set -u
mount -t tmpfs -o size=8m tmpfs "$DISK" || exit 97
"$PYTHON" -m tests.checkpoint.crash_worker "$MODEL" "$DISK/run" 3:fill 2>"$OUT/failed.err"
echo $? >"$OUT/failed.rc"
cp -a "$DISK/run" "$OUT/run"
"""


def test_real_full_disk_fails_clearly_and_the_rerun_resumes_exactly(
    model_dir, config, uninterrupted, tmp_path
):
    """As above on a real file system: an 8 MiB tmpfs in a private mount namespace,
    filled up just before round 3's checkpoint; the rerun has the run directory moved
    to a disk with space."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    namespace = _tmpfs_namespace(disk)
    if namespace is None:
        pytest.skip("cannot mount a tmpfs in a private mount namespace (unshare) here")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHON": sys.executable,
        "MODEL": str(model_dir),
        "DISK": str(disk),
        "OUT": str(out),
    }
    done = subprocess.run(
        [*namespace, "sh", "-c", _FULL_DISK_SCRIPT], cwd=REPO, env=env, timeout=600
    )
    assert done.returncode == 0
    failed_err = (out / "failed.err").read_text()
    assert (out / "failed.rc").read_text().strip() == "1", failed_err[-3000:]
    last = failed_err.strip().splitlines()[-1]
    run = disk / "run"
    assert last.startswith(
        f"OSError: [Errno {errno.ENOSPC}] the disk is full: the checkpoint of round 3 could "
        f"not be written to {run / 'checkpoints' / '3'} ("
    ), last
    assert last.endswith(f"free space in {run} and rerun the same command to resume after round 2")
    assert [r["round"] for r in _history(out / "run")] == [0, 1, 2]
    assert _committed(out / "run") == [1, 2]

    _rerun(model_dir, out / "run")
    _assert_same_outcome(_outcome(config, out / "run"), uninterrupted[1])
