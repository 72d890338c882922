"""Runs the paper-style table grids and renders them:
``python -m experiments.tables --table NAME [--seeds 0,1,2] [--workdir runs/tables]``.

``--table all`` runs every table in turn, each as its own invocation. ``--scale cpu``
(the default) is the tables' own scale; ``--scale tiny`` swaps in a 2-layer random model
(built once under the workdir) with tiny sizes, to run the whole pipeline quickly: its
numbers mean nothing and go to ``<workdir>/tiny/results``. ``--scale full`` uses the paper
models and sizes (`experiments.configs.tables_full`). ``--set FIELD=VALUE`` overrides a
field of every cell (e.g. ``--set model.path=/data/Llama-3.2-3B``), ``--cells`` keeps
the cells whose names contain one of its strings, ``--dry-run`` prints the cells, their
run directories, configs and cost estimates without running anything.

Every cell is validated before the first one starts, so a missing data split fails at
once, naming it. Resumable: every cell has its own run directory
``<workdir>/<scale>/<table>/<cell>`` (another table's, for a cell two tables share); a
cell with a ``summary.json`` is finished and skipped (after checking that its saved
config matches), a partial one resumes from its latest checkpoint (the loop's exact
resume).

Outputs (``--results-dir``, default ``experiments/results``, ``.../results/full`` at full
scale): ``NAME.md`` (mean ± sample std over seeds, budget, the command), ``NAME.json``
(per-seed numbers and per-round curves) and ``NAME.png`` (learning curves, mean ± std band
over seeds).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time
from collections.abc import Sequence

from experiments.tables.base import DEFAULT_SEEDS, SCALES
from experiments.tables.cost import estimate_seconds
from experiments.tables.expand import cell_dirs, cells, parse_set, tiny_model
from experiments.tables.grids import TABLES
from experiments.tables.render import collect, jsonable, plot_curves, render_markdown
from experiments.tables.running import (
    cell_commits,
    git_commit,
    read_curves,
    run_cell,
    validation_problems,
)

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.tables",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--table",
        required=True,
        choices=[*sorted(TABLES), "all"],
        help="a table, or all of them in turn",
    )
    p.add_argument(
        "--seeds",
        default=",".join(map(str, DEFAULT_SEEDS)),
        help="comma-separated seeds (default 0,1,2)",
    )
    p.add_argument("--workdir", default="runs/tables", help="root of the cells' run directories")
    p.add_argument(
        "--results-dir",
        default=None,
        help="where NAME.md/json/png go (default: experiments/results at cpu "
        "scale, experiments/results/full at full scale, "
        "<workdir>/tiny/results at tiny scale)",
    )
    p.add_argument("--scale", default="cpu", choices=SCALES)
    p.add_argument("--cells", default="", help="comma-separated substrings of cell names to keep")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field of every cell (repeatable), e.g. fl.rounds=2",
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="absolute target accuracy (aggregation, settings)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the cells and configs only")
    return p


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds: expected non-negative integers, got {text!r}")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        seeds = _seeds(args.seeds)
        overrides = parse_set(args.set)
    except ValueError as err:
        parser.error(str(err))
    if args.table == "all":
        argv = list(sys.argv[1:] if argv is None else argv)
        at = max(i for i, a in enumerate(argv) if a == "--table" or a.startswith("--table="))
        del argv[at : at + (1 if "=" in argv[at] else 2)]
        for name in TABLES:
            if main([*argv, "--table", name]):
                return 1
        return 0
    table = TABLES[args.table]
    root = pathlib.Path(args.workdir) / args.scale
    tiny_path = ""
    if args.scale == "tiny":
        tiny_path = str(
            overrides.get("model.path")
            or tiny_model(pathlib.Path(args.workdir).absolute() / "tiny" / "_model")
        )
    grid_kwargs = dict(
        seeds=seeds, scale=args.scale, overrides=overrides, tiny_model_path=tiny_path
    )
    try:
        grid = cells(table, only=[s for s in args.cells.split(",") if s], **grid_kwargs)
        dirs = cell_dirs(grid, root, **grid_kwargs)
    except ValueError as err:
        parser.error(str(err))
    if not grid:
        parser.error(f"--cells {args.cells!r} matches no cell of table {table.name!r}")
    estimated = sum(estimate_seconds(c.config) for c in grid)
    problems = validation_problems(grid)
    if args.dry_run:
        print(
            f"table {table.name}: {len(grid)} cells, scale {args.scale}, "
            f"estimated {estimated / 3600:.2f} h on 2 CPU cores"
            + (" (the cost model is for CPU scale)" if args.scale != "cpu" else "")
            + f"; stated CPU budget {table.cpu_budget_h:g} h"
        )
        for cell, workdir in zip(grid, dirs):
            print(
                f"\n== {cell.name}  ->  {workdir}  (~{estimate_seconds(cell.config) / 60:.1f} min)"
            )
            print(cell.config.to_json_best_effort(indent=1))
        if problems:
            print("\ninvalid cells (fix before running):\n  " + "\n  ".join(problems))
        return 0
    if problems:
        parser.error("invalid cell config(s):\n  " + "\n  ".join(problems))

    started_at = git_commit()
    shared = {
        c.name: f"{d.parent.name}/{d.name}"
        for c, d in zip(grid, dirs)
        if d != root / table.name / c.name
    }
    results, measured = [], 0.0
    for i, (cell, workdir) in enumerate(zip(grid, dirs)):
        note = " (shared)" if cell.name in shared else ""
        print(f"[{i + 1}/{len(grid)}] {cell.name} -> {workdir}{note}", flush=True)
        start = time.perf_counter()
        summary = run_cell(cell, workdir)
        measured += summary.get("wall_time_s", time.perf_counter() - start)
        audit_path = workdir / "server_audit.json"
        results.append(
            {
                "run": cell.run,
                "dataset": cell.dataset,
                "seed": cell.seed,
                "workdir": str(workdir),
                "summary": summary,
                "curves": read_curves(workdir),
                "audit": json.loads(audit_path.read_text()) if audit_path.is_file() else None,
                "config": json.loads(cell.config.to_json_best_effort()),
                "estimated_s": estimate_seconds(cell.config),
                "commits": cell_commits(workdir),
            }
        )
    numbers = collect(table, results, target=args.target)
    command = "python -m experiments.tables " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    meta = {
        "scale": args.scale,
        "estimated_s": estimated,
        "measured_s": measured,
        "rounds_s": sum(sum(r["curves"]["time_s"].values()) for r in results),
        "command": command,
        "cpu_budget_h": table.cpu_budget_h,
        "commit": started_at,
        "shared_cells": shared,
        "cell_commits": {c.name: r["commits"] for c, r in zip(grid, results)},
    }
    out_dir = (
        pathlib.Path(args.results_dir)
        if args.results_dir
        else {
            "cpu": RESULTS,
            "full": RESULTS / "full",
            "tiny": pathlib.Path(args.workdir) / "tiny" / "results",
        }[args.scale]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{table.name}.md").write_text(render_markdown(table, numbers, meta))
    (out_dir / f"{table.name}.json").write_text(
        json.dumps(
            jsonable({"table": table.name, "meta": meta, "numbers": numbers, "cells": results}),
            indent=1,
            allow_nan=False,
        )
        + "\n"
    )
    plot_curves(table, results, out_dir / f"{table.name}.png")
    print(f"wrote {out_dir / table.name}.{{md,json,png}}")
    return 0
