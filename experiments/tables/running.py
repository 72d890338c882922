"""Running a table's cells: validating every config first, running (or resuming, or
skipping when finished) each cell in its run directory with the server step audited, and
reading back what a cell wrote (its learning curves, the commits it ran at).

A finished cell is only reused if its saved config is the cell's own (up to
`experiments.tables.expand.comparable`): a changed field is refused, naming it.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

from experiments.tables.base import Cell
from experiments.tables.expand import comparable


def validation_problems(grid: Sequence[Cell]) -> list[str]:
    """`fedsp.config.validate` of every cell, one line per bad cell (naming the fields),
    and a DP cell without ``dp_accounting`` installed (its first round would stop on it,
    after the cells before it had run)."""
    from fedsp import config as config_lib

    problems = []
    for cell in grid:
        try:
            config_lib.validate(cell.config)
        except ValueError as err:
            problems.append(f"{cell.name}: " + "; ".join(str(err).splitlines()[1:]).strip())
        if cell.config.fl.dp.clip_norm and not _dp_accounting_installed():
            problems.append(
                f"{cell.name}: fl.dp.clip_norm: the ε accounting needs dp_accounting "
                "(pip install -e '.[dp]')"
            )
    return problems


def _dp_accounting_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("dp_accounting") is not None


# --------------------------------------------------------------------------- commits


def git_commit() -> str | None:
    """The checkout's commit (with "+dirty" for uncommitted changes), None outside git."""
    import subprocess

    here = pathlib.Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


COMMITS_FILE = "commits.txt"


def _record_commit(workdir: pathlib.Path) -> None:
    """Appends the checkout's commit to ``workdir/commits.txt`` when it differs from the
    last one there: the code versions a cell ran on, one line per change (a resumed cell
    can span several)."""
    commit = git_commit() or "unknown"
    path = workdir / COMMITS_FILE
    seen = path.read_text().split() if path.is_file() else []
    if not seen or seen[-1] != commit:
        workdir.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(commit + "\n")


def cell_commits(workdir: pathlib.Path) -> list[str]:
    """The commits `run_cell` recorded for a cell, oldest first ([] if none were)."""
    path = workdir / COMMITS_FILE
    return path.read_text().split() if path.is_file() else []


# --------------------------------------------------------------------------- audit


class ServerAudit:
    """A server-step hook (`fedsp.RoundHooks`) that records, for every server step of a
    cell, the type of every leaf of what reached the server (θ_r, the optimizer state and
    the clients' uploads), and how many of them were text (``str``/``bytes``) or any other
    non-array object. ``hooks`` is what `run_cell` passes to `fedsp.run`."""

    def __init__(self):
        self.calls = 0
        self.leaf_types: dict[str, int] = {}
        self.text_leaves = 0

    @property
    def hooks(self):
        import fedsp

        return fedsp.RoundHooks(server_step=self.wrap)

    def wrap(self, step):
        """``step`` with every call's inputs recorded."""

        def audited(*inputs):
            self.record(inputs)
            return step(*inputs)

        return audited

    def record(self, inputs: Any) -> None:
        import jax

        self.calls += 1
        for leaf in jax.tree.leaves(inputs):
            name = type(leaf).__name__
            self.leaf_types[name] = self.leaf_types.get(name, 0) + 1
            if isinstance(leaf, (str, bytes)) or (
                not hasattr(leaf, "dtype") and not isinstance(leaf, (int, float))
            ):
                self.text_leaves += 1

    def merge(self, path: pathlib.Path) -> dict[str, Any]:
        """Adds this audit to the one saved at ``path`` (a resumed cell) and saves it."""
        saved = (
            json.loads(path.read_text())
            if path.is_file()
            else {"server_calls": 0, "leaf_types": {}, "text_leaves": 0}
        )
        saved["server_calls"] += self.calls
        saved["text_leaves"] += self.text_leaves
        for k, v in self.leaf_types.items():
            saved["leaf_types"][k] = saved["leaf_types"].get(k, 0) + v
        path.write_text(json.dumps(saved, indent=2) + "\n")
        return saved


# --------------------------------------------------------------------------- end of audit


# --------------------------------------------------------------------------- running


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def run_cell(cell: Cell, workdir: pathlib.Path) -> dict[str, Any]:
    """Runs (resumes, or skips if finished) one cell; returns its summary."""
    summary_path = workdir / "summary.json"
    if summary_path.is_file():
        saved = json.loads((workdir / "config.json").read_text())
        want = json.loads(cell.config.to_json_best_effort())
        changed = _diff(comparable(saved), comparable(want))
        if changed:
            raise ValueError(
                f"{workdir} finished with a different config (fields {changed}); "
                "use another --workdir or delete the cell"
            )
        return json.loads(summary_path.read_text())
    import fedsp

    _record_commit(workdir)
    audit = ServerAudit()
    try:
        summary = fedsp.run(cell.config, workdir, hooks=audit.hooks)
    finally:
        # A cell stopped by an error keeps the audit of the rounds it ran; the resumed
        # process adds its own (server_calls then counts every round once more or less
        # only if a round was repeated after a crash).
        if audit.calls:
            audit.merge(workdir / "server_audit.json")
    return summary


def update_norms(config: Any, rounds: int = 1) -> list[list[float]]:
    """Per round 1..``rounds`` of ``config``'s run (from its start, writing nothing),
    each sampled client's ‖θ_k − θ_r‖₂ over all its adapters, as the server receives it
    (after any simulated attack): how the robustness table's DP clip norm was chosen.
    No round is evaluated unless it is the run's last (``eval.every`` = 0; ``fl.rounds``
    is kept, so the learning rate is the run's)."""
    import jax
    import jax.numpy as jnp

    import fedsp

    config = config.copy_and_resolve_references()
    config.eval.every = 0
    config.log.progress = False
    state = fedsp.init_run(config)
    norms: list[list[float]] = []

    def on_uploads(rnd: int, uploads: Any) -> None:
        squares = [
            jnp.sum(
                (jnp.asarray(c, jnp.float32) - jnp.asarray(s, jnp.float32)[None]) ** 2,
                axis=tuple(range(1, c.ndim)),
            )
            for c, s in zip(jax.tree.leaves(uploads.params), jax.tree.leaves(state.params))
        ]
        norms.append([float(x) for x in jnp.sqrt(sum(squares))])

    hooks = fedsp.RoundHooks(on_uploads=on_uploads)
    for _ in range(rounds):
        state, _ = fedsp.run_round(state, hooks=hooks)
    return norms


def read_curves(workdir: pathlib.Path) -> dict[str, dict[str, float]]:
    """Per-round curves of a run directory's ``metrics.jsonl``: accuracy (evaluated
    rounds), bytes sent and bytes saved (every round; round 0 sends nothing), each
    round's wall time (``time_s``: training and evaluation, without start-up), which adds
    up across the processes of a resumed cell, the number of Byzantine clients among the
    round's uploads (``byzantine``, rounds 1..R) and, with DP, the ε spent after the
    round (``dp/epsilon``; None where the record has null, i.e. ∞)."""
    accuracy, sent, saved, seconds, byzantine, epsilon = {}, {}, {}, {}, {}, {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        rnd = str(record["round"])
        if "eval/accuracy" in record:
            accuracy[rnd] = record["eval/accuracy"]
        sent[rnd] = record.get("bytes_sent", 0)
        saved[rnd] = record.get("bytes_saved", 0)
        if "time_s" in record:
            seconds[rnd] = record["time_s"]
        if "byzantine" in record:
            byzantine[rnd] = len(record["byzantine"])
        if "dp/epsilon" in record:
            epsilon[rnd] = record["dp/epsilon"]
    return {
        "accuracy": accuracy,
        "bytes_sent": sent,
        "bytes_saved": saved,
        "time_s": seconds,
        "byzantine": byzantine,
        "epsilon": epsilon,
    }
