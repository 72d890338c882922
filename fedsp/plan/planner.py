"""``plan_round(config, target)``: compiles a round's programs for a target and reports each
one's per-device memory and FLOPs, and whether the round fits the device's memory.

Per program and device (XLA's ``memory_analysis()`` / ``cost_analysis()`` of the compiled
executable): argument, output, temporary and aliased bytes; the peak, taken as the larger
of XLA's own ``peak_memory_in_bytes`` and argument + output + temporary − aliased bytes
(the backends fill these fields differently: XLA:CPU's peak leaves its temporaries out,
XLA:TPU's can exceed the sum); the bytes other buffers hold meanwhile (the rollout's kept
caches); and the FLOPs (a while loop's body counted once: the sampler's figure is its
prefill and one decode step per batch size it shrinks through, not the whole
generation). A program XLA:TPU refuses for lack of HBM is reported with the bytes its
error names."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from collections.abc import Sequence

import jax
import ml_collections

from fedsp.config import requested_mesh, validate
from fedsp.model.config import ModelConfig
from fedsp.model.sharding import AUTO, make_mesh, mesh_shape
from fedsp.plan.programs import Program, Shapes, round_programs
from fedsp.plan.targets import GIB, Target

__all__ = ["Plan", "ProgramPlan", "check_config", "plan_round"]


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
    """One compiled program's figures, per device (bytes; FLOPs).

    Attributes:
      name, shape, calls: see `fedsp.plan.programs.Program`.
      argument_bytes, output_bytes, temp_bytes, alias_bytes: XLA's memory analysis.
      xla_peak_bytes: XLA's ``peak_memory_in_bytes``.
      held_bytes: other buffers alive while it runs (not its arguments).
      flops: XLA's cost analysis (loop bodies once).
      compile_s: seconds to lower and compile it.
      error: XLA's out-of-memory message when it refused to compile (then the byte
        figures are those the message and the arguments give, a lower bound).
    """

    name: str
    shape: str
    calls: int | None
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    xla_peak_bytes: int
    held_bytes: int
    flops: float
    compile_s: float
    error: str | None = None

    @property
    def peak_bytes(self) -> int:
        """The most bytes a device holds while the program runs (see the module docstring)."""
        own = self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes
        return max(self.xla_peak_bytes, own) + self.held_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    """A round of one config on one target.

    Attributes:
      target: the device target.
      mesh: the (clients, model) mesh shape.
      model: the architecture planned.
      shapes: the sequence lengths assumed.
      programs: one `ProgramPlan` per program of the round.
    """

    target: Target
    mesh: tuple[int, int]
    model: ModelConfig
    shapes: Shapes
    programs: tuple[ProgramPlan, ...]

    @property
    def peak_bytes(self) -> int:
        """The largest per-device peak of the round's programs."""
        return max(p.peak_bytes for p in self.programs)

    @property
    def fits(self) -> bool:
        """Every program compiled and peaks within one device's memory."""
        return all(
            p.error is None and p.peak_bytes <= self.target.memory_bytes for p in self.programs
        )


def check_config(config: ml_collections.ConfigDict) -> None:
    """`fedsp.config.validate` without what a plan does not need: the model's weights
    (``model.path``), the task's data files and this machine's device count (the target's
    devices are checked by `plan_round`).

    Raises:
      ValueError: every other bad field, named as ``validate`` names it.
    """
    probe = copy.deepcopy(config)
    probe.unlock()
    probe.model.path = ""
    probe.fl.mesh.clients, probe.fl.mesh.model = AUTO, 1
    if probe.fl.backend == "pmap":
        probe.fl.backend = "vmap"
    try:
        validate(probe)
    except ValueError as err:
        lines = str(err).splitlines()[1:]
        kept = [
            line
            for line in lines
            if not line.strip().startswith("task.data_dir") and "is not on disk" not in line
        ]
        if kept:
            raise ValueError("invalid config:\n" + "\n".join(kept)) from None
    if config.fl.backend == "pmap":
        raise ValueError("fl.backend: the planner plans the vmap and loop backends, not pmap")


def plan_round(
    config: ml_collections.ConfigDict,
    target: Target,
    model_config: ModelConfig,
    *,
    mesh: tuple[int | str, int | str] | None = None,
    shapes: Shapes | None = None,
    programs: Sequence[str] | None = None,
) -> Plan:
    """Compiles the round's programs of ``config`` for ``target`` (see the module docstring).

    Args:
      config: an experiment config (``model.path`` need not exist: ``model_config``
        gives the architecture).
      target: where the round would run (`fedsp.plan.targets.get_target`).
      model_config: the architecture of ``config.model``.
      mesh: (clients, model) overriding ``fl.mesh``; each an int or "auto".
      shapes: the sequence lengths the data would decide (default `Shapes()`).
      programs: only these program names (default all).

    Raises:
      ValueError: a bad config field or a mesh the target cannot hold (named as
        ``fl.mesh.<axis>``).
    """
    check_config(config)
    shapes = Shapes() if shapes is None else shapes
    fl = config.fl
    clients, model = requested_mesh(fl) if mesh is None else mesh
    shape = mesh_shape(clients, model, fl.clients_per_round, target.num_devices)
    device_mesh = make_mesh(*shape, devices=target.devices)
    plans = tuple(
        _compile(program)
        for program in round_programs(config, model_config, device_mesh, target.runs_on, shapes)
        if programs is None or program.name in programs
    )
    return Plan(target, shape, model_config, shapes, plans)


# "… required for HLO temporaries (488.74G) exceeds available HBM (15.75G)", in GiB (T: TiB).
_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}


def _compile(program: Program) -> ProgramPlan:
    start = time.perf_counter()
    lowered = program.lower()
    arguments = _argument_bytes(lowered)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        found = _OOM.search(str(err))
        if "RESOURCE_EXHAUSTED" not in str(err) or found is None:
            raise
        temp = int(float(found.group(1)) * _UNITS[found.group(2)])
        return ProgramPlan(
            program.name,
            program.shape,
            program.calls,
            arguments,
            0,
            temp,
            0,
            0,
            0,
            0.0,
            time.perf_counter() - start,
            str(err).splitlines()[0],
        )
    stats = compiled.memory_analysis()
    if stats is None:
        raise ValueError(f"XLA gives no memory analysis of the {program.name} program here")
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per executable
        cost = cost[0] if cost else {}
    return ProgramPlan(
        program.name,
        program.shape,
        program.calls,
        int(stats.argument_size_in_bytes),
        int(stats.output_size_in_bytes),
        int(stats.temp_size_in_bytes),
        int(stats.alias_size_in_bytes),
        int(getattr(stats, "peak_memory_in_bytes", 0)),
        program.held(compiled) if program.held is not None else 0,
        float((cost or {}).get("flops", 0.0)),
        time.perf_counter() - start,
    )


def _argument_bytes(lowered: jax.stages.Lowered) -> int:
    """Per-device bytes of a lowered program's arguments (their shards on one device).

    Read from the lowering's own (kept) input avals and shardings: the public
    ``args_info`` carries no shardings, and would count every argument whole.
    """
    compile_args = lowered._lowering.compile_args
    total = 0
    for aval, sharding in zip(compile_args["global_in_avals"], compile_args["in_shardings"]):
        shape = tuple(aval.shape)
        if isinstance(sharding, jax.sharding.Sharding):
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * aval.dtype.itemsize
    return total
