"""Device targets: TPU topologies through libtpu without a TPU, simulated CPU devices."""

from __future__ import annotations

import jax
import pytest

from fedsp.plan.targets import GIB, get_target


@pytest.mark.parametrize(
    ("name", "count", "kind", "usable"),
    [
        ("v5e:2x4", 8, "TPU v5 lite", 15.75),
        ("v5e-8", 8, "TPU v5 lite", 15.75),
        ("v5p-8", 4, "TPU v5", 95.74),
        ("v4:2x2x1", 4, "TPU v4", 30.75),
    ],
)
def test_tpu_topology_has_its_devices(name, count, kind, usable):
    target = get_target(name)
    assert (target.platform, target.num_devices, target.device_kind) == ("tpu", count, kind)
    assert {d.device_kind for d in target.devices} == {kind}
    assert target.memory_bytes == int(usable * GIB)
    assert not target.estimate


def test_cpu_target_takes_the_first_devices():
    target = get_target("cpu:2", cpu_memory_bytes=123)
    assert target.devices == tuple(jax.devices("cpu")[:2])
    assert (target.platform, target.memory_bytes) == ("cpu", 123)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("v9:2x2", "--topology: unknown target 'v9:2x2'"),
        ("tpu", "--topology: unknown target"),
        ("cpu:0", "--topology: 'cpu:0' needs at least one device"),
        ("cpu:4096", "--topology: 'cpu:4096' needs 4096 CPU devices"),
        # The GPU estimate needs 8 CPU devices; the tests run with fewer.
        ("h100x8", "--topology: 'h100x8' needs 8 CPU devices"),
    ],
)
def test_bad_topology_names_the_flag(name, match):
    if name == "h100x8" and len(jax.devices("cpu")) >= 8:
        target = get_target(name)
        assert target.estimate and target.memory_bytes == 80 * 10**9
        return
    with pytest.raises(ValueError, match=match):
        get_target(name)
