"""Writes a run's checkpoint (`save_checkpoint`): the run state through Orbax and the
algorithm's client-side data beside it; a full disk says so, naming the path and the
round a rerun resumes after.
"""

from __future__ import annotations

import errno

from fedsp import distributed
from fedsp.checkpoint import prune_client_state, save_client_state
from fedsp.federated.state import RunState

__all__ = ["save_checkpoint"]


def save_checkpoint(state: RunState) -> None:
    """Writes ``state`` to its run's ``workdir/checkpoints`` (and the algorithm's
    client-side data to ``workdir/client_state``), keeping ``checkpoint.keep`` rounds.

    Raises:
      ValueError: the run has no workdir.
      OSError: ENOSPC (or EDQUOT) when the disk is full, naming the round's checkpoint
        path and the round a rerun resumes after; the older rounds are intact.
    """
    run = state.run
    if run is None or run.checkpointer is None or run.workdir is None:
        raise ValueError(
            "this run has no workdir to save checkpoints in (fedsp.init_run(config, workdir=...))"
        )
    algo, client_dir = run.algorithm, run.workdir / "client_state"
    saved = run.checkpointer.latest_round()
    # Client state is host data every process holds alike: the main process writes it.
    main = distributed.is_main_process()
    try:
        if hasattr(algo, "client_state") and main:
            save_client_state(client_dir, state.round, algo.client_state())
        run.checkpointer.save(state)  # every process: Orbax writes multi-host checkpoints
        if hasattr(algo, "client_state") and main:
            prune_client_state(client_dir, run.checkpointer.rounds())
    except Exception as e:
        code = _disk_full(e)
        if code is None:
            raise
        # Orbax re-raises its writer threads' errors under screens of traceback; say what
        # happened and what to do. The round is not committed, older ones are kept.
        full = "the disk is full" if code == errno.ENOSPC else "the disk quota is used up"
        resume = f"resume after round {saved}" if saved is not None else "start over"
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        raise OSError(
            code,
            f"{full}: the checkpoint of round {state.round} could not be written to "
            f"{run.checkpointer.path(state.round)} ({type(e).__name__}: {cause}); free "
            f"space in {run.workdir} and rerun the same command to {resume}",
        ) from e
    distributed.sync(f"fedsp.save_checkpoint.{state.round}")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT if ``exc`` or an exception it chains says the disk (or quota) is
    full: an OSError of a Python write, or tensorstore's ValueError ("[os_error_code='28']")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for code in _DISK_FULL:
            if (isinstance(exc, OSError) and exc.errno == code) or (
                f"os_error_code='{code}'" in str(exc)
            ):
                return code
        exc = exc.__cause__ or exc.__context__
    return None
