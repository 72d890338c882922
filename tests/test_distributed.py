"""`fedsp.distributed` in one process: what a multi-host run uses must be the identity here.

The multi-process behaviour is tested with real processes in
`tests/federated/test_multihost.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fedsp import distributed
from fedsp.config import default_config
from fedsp.model.sharding import make_mesh


def test_a_single_process_run_does_not_join_a_runtime(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    section = default_config().distributed
    assert distributed.initialize(section) is False
    section.initialize = False
    section.coordinator_address = "127.0.0.1:1234"
    assert distributed.initialize(section) is False
    assert distributed.is_main_process()


def test_joining_after_jax_started_names_the_setting():
    jax.devices()  # the backends of this test process are up
    section = default_config().distributed
    section.initialize = True
    section.coordinator_address = "127.0.0.1:1"
    section.num_processes, section.process_id = 2, 0
    with pytest.raises(ValueError, match=r"distributed.initialize: JAX already ran"):
        distributed.initialize(section)


def test_bad_fields_are_named_before_anything_starts():
    section = default_config().distributed
    section.process_id = -2
    with pytest.raises(ValueError, match=r"distributed.process_id: must be an integer >= -1"):
        distributed.initialize(section)


def test_put_places_values_and_keeps_key_types():
    mesh = make_mesh(2, 2)
    sharding = NamedSharding(mesh, PartitionSpec())
    tree = {
        "nan": np.full((3,), np.nan, np.float32),
        "key": jax.random.key(7),
        "x": jnp.arange(4.0),
    }
    placed = distributed.put(tree, sharding)
    assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(placed))
    assert jax.dtypes.issubdtype(placed["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(placed["key"]), jax.random.key_data(jax.random.key(7))
    )
    np.testing.assert_array_equal(placed["nan"], tree["nan"])


def test_to_host_gathers_sharded_arrays():
    mesh = make_mesh(4, 1)
    x = jax.device_put(jnp.arange(8.0).reshape(4, 2), NamedSharding(mesh, PartitionSpec("clients")))
    host = distributed.to_host({"x": x, "n": 3})
    assert isinstance(host["x"], np.ndarray)
    np.testing.assert_array_equal(host["x"], np.arange(8.0).reshape(4, 2))
    assert host["n"] == 3


def test_agreement_is_not_checked_in_one_process():
    distributed.check_agreement({"a": np.arange(3)}, "a test batch")
    distributed.sync("fedsp.test")
