"""Device targets the capacity planner compiles for: TPU topologies through libtpu (no TPU
needed), simulated CPU devices, and GPUs as an estimate.

A target is a set of ``jax.Device`` objects to build a mesh on plus the memory one device
may use. ``get_target(name)`` accepts:

- a TPU topology, ``"v5e:2x4"``, ``"v5p:2x2x1"``, ``"v4:2x2x1"`` (or their slice names
  ``"v5e-8"``, ``"v5p-8"``, ``"v4-8"``): compiled by XLA:TPU from
  ``jax.experimental.topologies`` without TPU hardware (the ``fedsp[plan]`` extra
  installs libtpu; ``JAX_PLATFORMS=cpu`` keeps JAX off any real accelerator);
- ``"cpu:N"``: the first N CPU devices of this process (``XLA_FLAGS=
  --xla_force_host_platform_device_count=N`` must give at least N; the CLI sets it);
- ``"h100x8"`` (8 × H100 80 GB): XLA:CUDA cannot compile here, so its programs are
  compiled for N CPU devices with the same mesh and judged against the GPU's memory. An
  estimate: XLA:CPU schedules and fuses differently from XLA:GPU (``Target.estimate``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import jax

__all__ = ["GIB", "TPU_CHIPS", "Target", "get_target", "target_names"]

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class TpuChip:
    """One TPU generation: how to name its topologies and how much HBM a device may use.

    Attributes:
      chip_config: libtpu's ``chip_config_name`` ("megacore": one device per chip of two
        TensorCores).
      host_bounds: the chips of one host (a v5e host holds 2×4 chips, a v5p or v4 host
        2×2×1).
      hbm_bytes: HBM per chip, as Google documents it.
      usable_bytes: what XLA:TPU lets one program use: the "available HBM" its
        out-of-memory error reports for this libtpu (0.0.42.1), below ``hbm_bytes`` by the
        runtime's reserve.
    """

    chip_config: str
    host_bounds: tuple[int, int, int]
    hbm_bytes: int
    usable_bytes: int


# HBM per chip: cloud.google.com/tpu/docs/v5e ("16 GB" of HBM2 per chip),
# cloud.google.com/tpu/docs/v5p ("95 GB" of HBM2e), cloud.google.com/tpu/docs/v4
# ("32 GiB" of HBM2). Usable: XLA:TPU's "exceeds available HBM (15.75G / 95.74G / 30.75G)"
# when asked for 200 GiB of temporaries on each topology (BENCHMARKS.md, "Capacity planner").
TPU_CHIPS = {
    "v5e": TpuChip("default", (2, 4, 1), 16 * GIB, int(15.75 * GIB)),
    "v5p": TpuChip("megacore", (2, 2, 1), 95 * GIB, int(95.74 * GIB)),
    "v4": TpuChip("megacore", (2, 2, 1), 32 * GIB, int(30.75 * GIB)),
}
# Slice names (cores) → topologies (chips): v5e has one core per chip, v5p and v4 two.
_SLICES = {"v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1", "v4-8": "v4:2x2x1"}
# GPU targets that are compiled for CPU devices: name → (devices, memory per device).
_GPU_ESTIMATES = {"h100x8": (8, 80 * 10**9)}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the planned programs would run.

    Attributes:
      name: the name it was asked by (e.g. "v5e:2x4", "cpu:4", "h100x8").
      platform: "tpu" or "cpu": the compiler the programs go through.
      devices: the devices a mesh is built from.
      device_kind: e.g. "TPU v5 lite", "cpu", "H100 80GB (compiled for CPU)".
      memory_bytes: the memory one device may use; a program fits when its per-device
        peak is at most this.
      estimate: True when the programs are compiled for another platform than the
        target's (GPUs), so the bytes are XLA:CPU's, not the target's compiler's.
      runs_on: the platform the run itself would use ("gpu" for a GPU estimate): the
        sampler's layer loop follows it (`fedsp.model.sampling.generate`'s "auto").
    """

    name: str
    platform: str
    devices: tuple[jax.Device, ...]
    device_kind: str
    memory_bytes: int
    estimate: bool = False
    runs_on: str = ""

    def __post_init__(self):
        if not self.runs_on:
            object.__setattr__(self, "runs_on", self.platform)

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def target_names() -> tuple[str, ...]:
    """Example names `get_target` accepts (any TPU topology of a known generation and any
    ``cpu:N`` work too)."""
    return (*_SLICES.values(), *_SLICES, "cpu:N", *_GPU_ESTIMATES)


def get_target(name: str, *, cpu_memory_bytes: int | None = None) -> Target:
    """The `Target` called ``name`` (see the module docstring).

    Args:
      name: a TPU topology ("v5e:2x4") or slice ("v5e-8"), "cpu:N" or "h100x8".
      cpu_memory_bytes: the memory of one ``cpu:N`` device; default this machine's
        physical memory divided by N (the simulated devices share it).

    Raises:
      ValueError: an unknown name, or fewer CPU devices than asked for; the message
        starts with ``--topology``.
    """
    name = str(name).strip()
    topology = _SLICES.get(name, name)
    if name in _GPU_ESTIMATES:
        count, memory = _GPU_ESTIMATES[name]
        return dataclasses.replace(
            _cpu_target(count, memory, name),
            device_kind=f"{name} (compiled for XLA:CPU)",
            estimate=True,
            runs_on="gpu",
        )
    cpu = re.fullmatch(r"cpu:(\d+)", topology)
    if cpu:
        count = int(cpu.group(1))
        return _cpu_target(count, cpu_memory_bytes, name)
    tpu = re.fullmatch(r"(v5e|v5p|v4):(\d+(?:x\d+){1,2})", topology)
    if tpu:
        return _tpu_target(name, tpu.group(1), tpu.group(2))
    raise ValueError(
        f"--topology: unknown target {name!r}; expected a TPU topology such as "
        f"{', '.join(target_names())}"
    )


def _cpu_target(count: int, memory: int | None, name: str) -> Target:
    if count < 1:
        raise ValueError(f"--topology: {name!r} needs at least one device")
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ValueError(
            f"--topology: {name!r} needs {count} CPU devices, this process has "
            f"{len(devices)} (set XLA_FLAGS=--xla_force_host_platform_device_count={count} "
            "before JAX starts)"
        )
    if memory is None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // count
    return Target(name, "cpu", tuple(devices[:count]), devices[0].device_kind, int(memory))


def _tpu_target(name: str, generation: str, shape: str) -> Target:
    from jax.experimental import topologies

    chip = TPU_CHIPS[generation]
    dims = [int(d) for d in shape.split("x")]
    dims3 = (*dims, 1) if len(dims) == 2 else tuple(dims)
    bounds = tuple(min(d, h) for d, h in zip(dims3, chip.host_bounds))
    # No metadata server to ask outside Google Cloud: libtpu would wait for it.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu takes /tmp/libtpu_lockfile so that one process owns the chips; compiling
    # for a topology owns none, and planners (or test workers) may run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topology = topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{generation}:{shape}",
            chip_config_name=chip.chip_config,
            chips_per_host_bounds=bounds,
            num_slices=1,
        )
    except Exception as err:  # libtpu missing, or a topology it does not know
        raise ValueError(
            f"--topology: cannot build TPU topology {name!r} ({err}); the TPU path needs "
            "libtpu: pip install -e '.[plan]'"
        ) from err
    devices: Sequence[jax.Device] = topology.devices
    return Target(name, "tpu", tuple(devices), devices[0].device_kind, chip.usable_bytes)
