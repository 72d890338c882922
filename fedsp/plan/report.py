"""A `Plan` as text (a table per program) and as a JSON-ready dict."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedsp.plan.planner import Plan

__all__ = ["format_bytes", "format_plan", "plan_dict"]


def format_bytes(n: float) -> str:
    """Bytes in GiB (MiB below 1 GiB, KiB below 1 MiB), e.g. "15.75 GiB"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(plan: Plan) -> str:
    """The plan as a fixed-width table: per program its shapes, calls per round, bytes per
    device (arguments, outputs, temporaries, held by others, peak), GFLOPs per device and
    compile time, then the verdict."""
    target = plan.target
    head = (
        f"target {target.name}: {target.num_devices} × {target.device_kind}, "
        f"{format_bytes(target.memory_bytes)} per device"
        + (" (estimate: compiled for XLA:CPU)" if target.estimate else "")
        + f"; mesh (clients, model) = {plan.mesh}; model {plan.model.model_type} "
        f"L={plan.model.num_hidden_layers} D={plan.model.hidden_size}"
    )
    columns = ("program", "shape", "calls", "args", "out", "temp", "held", "peak", "GFLOP", "s")
    rows = [
        (
            p.name,
            p.shape,
            "eval" if p.calls is None else str(p.calls),
            format_bytes(p.argument_bytes),
            format_bytes(p.output_bytes),
            format_bytes(p.temp_bytes),
            format_bytes(p.held_bytes),
            ("≥ " if p.error else "") + format_bytes(p.peak_bytes),
            f"{p.flops / 1e9:.1f}",
            f"{p.compile_s:.0f}",
        )
        for p in plan.programs
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines += [f"  {p.name}: {p.error}" for p in plan.programs if p.error]
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(
        f"peak {format_bytes(plan.peak_bytes)} of {format_bytes(target.memory_bytes)} "
        f"per device: {verdict}"
    )
    return "\n".join(lines)


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan's figures as plain JSON values."""
    return {
        "target": plan.target.name,
        "device_kind": plan.target.device_kind,
        "devices": plan.target.num_devices,
        "memory_bytes": plan.target.memory_bytes,
        "estimate": plan.target.estimate,
        "mesh": list(plan.mesh),
        "model": {
            "model_type": plan.model.model_type,
            "num_hidden_layers": plan.model.num_hidden_layers,
            "hidden_size": plan.model.hidden_size,
            "vocab_size": plan.model.vocab_size,
        },
        "shapes": dataclasses.asdict(plan.shapes),
        "peak_bytes": plan.peak_bytes,
        "fits": plan.fits,
        "programs": [{**dataclasses.asdict(p), "peak_bytes": p.peak_bytes} for p in plan.programs],
    }
