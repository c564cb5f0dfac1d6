"""nfnets/train/mesh.py: the data axis, a host's rows of a global batch, host copies."""

import jax
import numpy as np
import pytest

from nfnets.train import mesh as mesh_lib


def test_a_host_batch_becomes_one_global_array_split_row_by_row():
  mesh = mesh_lib.make_mesh()
  assert mesh.axis_names == (mesh_lib.DATA_AXIS,) and mesh.devices.size == jax.device_count()
  # One process: it holds every row.
  assert mesh_lib.local_share(mesh) == (0, 1)
  assert mesh_lib.local_rows(16, mesh) == (0, 16)
  rows = np.arange(16 * 3).reshape(16, 3)
  batch = mesh_lib.global_batch({"x": rows}, mesh)["x"]
  assert batch.shape == (16, 3)
  # Device d holds rows [2d, 2d + 2): the order of the host batch is the global order.
  for shard in batch.addressable_shards:
    d = list(mesh.devices.flat).index(shard.device)
    np.testing.assert_array_equal(np.asarray(shard.data), rows[2 * d:2 * d + 2])
  with pytest.raises(ValueError, match="does not split over 8 devices"):
    mesh_lib.local_rows(12, mesh)


def test_replicate_and_host_copy_round_trip():
  mesh = mesh_lib.make_mesh(jax.devices()[:2])
  tree = {"a": np.arange(6.0, dtype=np.float32).reshape(2, 3), "b": np.int32(7)}
  placed = mesh_lib.replicate(tree, mesh)
  assert placed["a"].sharding.is_fully_replicated and placed["a"].shape == (2, 3)
  back = mesh_lib.host_copy(placed)
  assert isinstance(back["a"], np.ndarray) and back["b"] == 7
  np.testing.assert_array_equal(back["a"], tree["a"])
  fetched = list(mesh_lib.prefetch([{"x": np.ones((4, 2))}] * 3, mesh, size=2))
  assert len(fetched) == 3 and fetched[0]["x"].shape == (4, 2)
