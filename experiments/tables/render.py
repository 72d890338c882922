"""A table's numbers and how they are shown: `collect` reads the rows off the cells'
learning curves (mean ± sample std over seeds, rounds and bytes to a target accuracy,
whether raw text left a client), `render_markdown` writes ``NAME.md``, `plot_curves`
``NAME.png``, and `_jsonable` makes the results JSON-safe for ``NAME.json``.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.tables.grids import Table

# --------------------------------------------------------------------------- numbers


def rounds_to_target(accuracy: dict[Any, float], target: float) -> int | None:
    """The first evaluated round whose accuracy is ≥ ``target`` (0: already at round 0);
    None if no round reaches it. Accuracies are fractions k/n and the target is computed
    from them, so "reaches" allows for float rounding (1e-9)."""
    for rnd in sorted(accuracy, key=int):
        if accuracy[rnd] is not None and accuracy[rnd] >= target - 1e-9:
            return int(rnd)
    return None


def bytes_until(bytes_sent: dict[Any, int], last_round: int) -> int:
    """Bytes sent by the clients in rounds 1..``last_round``."""
    return int(sum(v for r, v in bytes_sent.items() if 0 < int(r) <= last_round))


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample std (ddof = 1; NaN for one value), n) over the non-None values."""
    xs = np.asarray([v for v in values if v is not None], np.float64)
    if xs.size == 0:
        return math.nan, math.nan, 0
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else math.nan, int(xs.size)


def accuracy_at(curve: dict[str, float], rnd: int | None) -> float | None:
    if rnd is None:
        return curve[max(curve, key=int)] if curve else None
    return curve.get(str(rnd))


def collect(
    table: Table, results: list[dict[str, Any]], *, target: float | None = None
) -> dict[str, Any]:
    """The table's numbers from its cells' results (dicts with ``run``, ``dataset``,
    ``seed``, ``summary``, ``curves``, ``audit``, ``config``): per-seed values and
    mean/std per (row, dataset)."""
    by = {(r["run"], r["dataset"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    out: dict[str, Any] = {"rows": {}, "seeds": seeds}
    for row in table.rows:
        out["rows"][row.key] = {}
        for dataset in table.datasets:
            per_seed = {
                s: accuracy_at(by[(row.run, dataset, s)]["curves"]["accuracy"], row.round)
                for s in seeds
                if (row.run, dataset, s) in by
            }
            mean, std, n = mean_std(list(per_seed.values()))
            out["rows"][row.key][dataset] = {"per_seed": per_seed, "mean": mean, "std": std, "n": n}
    if table.kind in ("aggregation", "settings"):
        out["targets"] = {}
        for dataset in table.datasets:
            if target is not None:
                goal, rule = float(target), "absolute (--target)"
            else:
                ref = [
                    r for r in results if r["run"] == table.target_run and r["dataset"] == dataset
                ]
                start = mean_std([accuracy_at(r["curves"]["accuracy"], 0) for r in ref])[0]
                best = mean_std([max(r["curves"]["accuracy"].values()) for r in ref])[0]
                goal = start + table.target_fraction * (best - start)
                rule = (
                    f"round-0 accuracy + {table.target_fraction:g} × (best − round-0) of "
                    f"{table.target_run}, means over seeds"
                    if ref
                    else f"undefined: no {table.target_run} cell ran; pass --target"
                )
            out["targets"][dataset] = {"target": goal, "rule": rule}
            for row in table.rows:
                cell = out["rows"][row.key][dataset]
                reached, sent, total_sent, total_saved, text = {}, {}, {}, {}, {}
                for s in seeds:
                    r = by.get((row.run, dataset, s))
                    if r is None:
                        continue
                    rtt = rounds_to_target(r["curves"]["accuracy"], goal)
                    reached[s] = rtt
                    sent[s] = None if rtt is None else bytes_until(r["curves"]["bytes_sent"], rtt)
                    total_sent[s] = r["summary"]["bytes_sent"]
                    total_saved[s] = r["summary"]["bytes_saved"]
                    text[s] = raw_text_left_client(r)
                cell.update(
                    rounds_to_target=reached,
                    bytes_to_target=sent,
                    bytes_sent=total_sent,
                    bytes_saved=total_saved,
                    raw_text_left_client=text,
                    rounds_to_target_stat=mean_std(list(reached.values())),
                    bytes_sent_stat=mean_std(list(total_sent.values())),
                    bytes_to_target_stat=mean_std(list(sent.values())),
                    bytes_saved_stat=mean_std(list(total_saved.values())),
                )
    return out


def raw_text_left_client(result: dict[str, Any]) -> bool | None:
    """True if the cell pooled several users' text in one holder (centralized) or any
    non-array leaf reached the server; None when the cell has no audit (it ran without
    `ServerAudit`)."""
    audit = result.get("audit")
    pooled = result["config"]["data"]["num_clients"] == 1
    if audit is None:
        return True if pooled else None
    return bool(pooled or audit["text_leaves"] > 0)


# --------------------------------------------------------------------------- markdown


def _fmt(stat: tuple[float, float, int], digits: int = 3, total: int | None = None) -> str:
    mean, std, n = stat
    if n == 0:
        return "—"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    if total is not None and n < total:
        text += f" ({n}/{total})"
    return text


def render_markdown(table: Table, numbers: dict[str, Any], meta: dict[str, Any]) -> str:
    total = len(numbers["seeds"])
    lines = [
        f"# {table.title}",
        "",
        f"Scale: **{meta['scale']}**; seeds {numbers['seeds']}; mean ± sample std "
        f"(ddof = 1) over seeds; `(k/n)`: only k of n seeds have the value.",
        "",
    ]
    if table.kind == "accuracy":
        lines += [
            "| method | " + " | ".join(table.datasets) + " |",
            "|---|" + "---|" * len(table.datasets),
        ]
        for row in table.rows:
            cells_ = [
                _fmt((v["mean"], v["std"], v["n"]), total=total)
                for v in (numbers["rows"][row.key][d] for d in table.datasets)
            ]
            lines.append(f"| {row.label} | " + " | ".join(cells_) + " |")
    else:
        for dataset in table.datasets:
            goal = numbers["targets"][dataset]
            lines += [f"{dataset}: target accuracy {goal['target']:.3f} ({goal['rule']}).", ""]
            if table.kind == "aggregation":
                lines += [
                    "| method | final accuracy | rounds to target | MB sent to target "
                    "| MB sent (all rounds) | MB not sent (pruned or empty clients) |",
                    "|---|---|---|---|---|---|",
                ]
            else:
                lines += [
                    "| setting | final accuracy | rounds to target | raw text left a client |",
                    "|---|---|---|---|",
                ]
            for row in table.rows:
                v = numbers["rows"][row.key][dataset]
                acc = _fmt((v["mean"], v["std"], v["n"]), total=total)
                rtt = _fmt(v["rounds_to_target_stat"], 1, total)
                if table.kind == "aggregation":
                    mb = [
                        _fmt((v[k][0] / 1e6, v[k][1] / 1e6, v[k][2]), 2, total)
                        for k in ("bytes_to_target_stat", "bytes_sent_stat", "bytes_saved_stat")
                    ]
                    lines.append(f"| {row.label} | {acc} | {rtt} | " + " | ".join(mb) + " |")
                else:
                    flags = set(v["raw_text_left_client"].values())
                    text = (
                        "unknown"
                        if None in flags or not flags
                        else "yes"
                        if flags == {True}
                        else "no"
                        if flags == {False}
                        else "mixed"
                    )
                    lines.append(f"| {row.label} | {acc} | {rtt} | {text} |")
            if table.kind == "aggregation":
                lines += [_speedup(numbers["rows"], dataset), ""]
            lines.append("")
    shared = [f"{name} = {where}" for name, where in meta.get("shared_cells", {}).items()]
    commits = meta.get("cell_commits", {})
    lines += [
        "",
        f"Notes: {table.notes}" if table.notes else "",
        "",
        "## Budget",
        "",
        f"Stated CPU budget (2 cores, CPU scale, 3 seeds): {table.cpu_budget_h:g} h"
        + (
            f" for the cells it runs itself; {len(shared)} of its cells are another "
            f"table's (same config, run once): {', '.join(shared)}. "
            if shared
            else ". "
        )
        + (
            f"Cost-model estimate for all its cells: {meta['estimated_s'] / 3600:.2f} h; "
            if meta["scale"] == "cpu"
            else ""
        )
        + f"measured wall time of the cells in this invocation: "
        f"{meta['measured_s'] / 3600:.2f} h (finished cells it skipped count as their "
        f"saved summaries say)"
        + (
            f"; their rounds alone, over every process that ran them: "
            f"{meta['rounds_s'] / 3600:.2f} h"
            if "rounds_s" in meta
            else ""
        )
        + (
            f". Table written by a process started at commit {meta['commit']}"
            if meta.get("commit")
            else ""
        )
        + (f"; its cells ran at {_commit_summary(commits)}." if commits else "."),
        "",
        "## Command",
        "",
        "```",
        meta["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def _speedup(rows: dict[str, Any], dataset: str) -> str:
    """Advantage weighting vs FedAvg in mean rounds to the target, as measured."""
    fed, adv = (rows[k][dataset]["rounds_to_target_stat"] for k in ("fedavg", "advantage"))
    if fed[2] == 0 or adv[2] == 0 or fed[0] == 0:
        return (
            "Rounds to target, advantage-weighted vs FedAvg: not comparable (a run did "
            "not reach the target, or FedAvg started at it)."
        )
    fewer = 1 - adv[0] / fed[0]
    return (
        f"Rounds to target, advantage-weighted vs FedAvg: {adv[0]:.2f} vs {fed[0]:.2f} "
        f"(means over the seeds that reached it): {abs(fewer):.0%} "
        f"{'fewer' if fewer >= 0 else 'more'} rounds (the claim: about 40% fewer)."
    )


def _commit_summary(cell_commits: dict[str, list[str]]) -> str:
    """ "commit X (all 6 cells)" or "commits X (4 cells), Y (2 cells), unrecorded (1 cell)":
    how many cells ran (in part) at each commit; a cell resumed across commits counts
    under each."""
    counts: dict[str, int] = {}
    for commits in cell_commits.values():
        for commit in dict.fromkeys(commits or ["unrecorded"]):
            counts[commit] = counts.get(commit, 0) + 1
    if len(counts) == 1:
        ((commit, n),) = counts.items()
        return (
            f"commit {commit} (all {n} cells)"
            if commit != "unrecorded"
            else f"commits that were not recorded (all {n} cells)"
        )
    return "commits " + ", ".join(f"{c} ({n} cell{'s' * (n != 1)})" for c, n in counts.items())


# --------------------------------------------------------------------------- plot


def plot_curves(table: Table, results: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Accuracy vs round per dataset (mean over seeds, ± std band); the aggregation
    table adds accuracy vs cumulative MB sent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, "round") for d in table.datasets]
    if table.kind == "aggregation":
        panels += [(d, "MB sent") for d in table.datasets]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (dataset, x_axis) in zip(axes[0], panels):
        for run in table.runs:
            runs = [r["curves"] for r in results if r["run"] == run.key and r["dataset"] == dataset]
            if not runs:
                continue
            rounds = sorted({int(k) for c in runs for k in c["accuracy"]})
            stats = [mean_std([c["accuracy"].get(str(k)) for c in runs]) for k in rounds]
            mean = np.array([s[0] for s in stats])
            std = np.nan_to_num(np.array([s[1] for s in stats]))
            x = np.asarray(rounds, np.float64)
            if x_axis == "MB sent":
                x = (
                    np.array(
                        [np.mean([bytes_until(c["bytes_sent"], k) for c in runs]) for k in rounds]
                    )
                    / 1e6
                )
            ax.plot(x, mean, marker="o", label=run.label)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_title(dataset)
        ax.set_xlabel(x_axis)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    labelled = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if labelled:
        labelled[-1].legend(fontsize=7)
    fig.suptitle(table.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- JSON


def _jsonable(value: Any) -> Any:
    """NaN/inf become null (JSON has none); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
