"""The device mesh: one data axis over every device of every host, and global arrays on it.

Data parallelism in pmap's programming model, written the way JAX recommends since 0.8 (where
`jax.pmap` itself became jit + shard_map): the train and eval steps are `jax.jit` programs over
a `Mesh` with one axis, `DATA_AXIS`, and their per-device body runs under `jax.shard_map`, so
each device sees its share of the batch and talks to the others through named-axis collectives
(`lax.pmean(grads, DATA_AXIS)`), exactly as a pmapped function would. What changes is the layout
outside the step:

  * the training state is a pytree of *replicated global arrays* (PartitionSpec()): no leading
    device axis anywhere, so a checkpoint does not depend on the topology and orbax can save and
    restore it from every host;
  * a batch is one global array split along its first axis (PartitionSpec(DATA_AXIS)); each host
    builds only its own rows (`global_batch`) and never holds another host's data.

Devices are ordered by (process, id), so process p holds the contiguous rows
[p * n, (p + 1) * n) of every global batch, and device d the rows [d * m, (d + 1) * m).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
PyTree = Any


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named DATA_AXIS over `devices` (default: every device of every process)."""
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_share(mesh: Mesh) -> tuple[int, int]:
  """(index, count) of this process's equal, contiguous share of the mesh's devices.

  Raises:
    ValueError: this process's devices are not one contiguous block of the mesh (a mesh the
      row layout above does not describe).
  """
  devices = list(mesh.devices.flat)
  mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
  if not mine:
    raise ValueError("This process has no device in the mesh.")
  count = len(devices) // len(mine)
  if len(devices) % len(mine) or mine != list(range(mine[0], mine[0] + len(mine))) or (
      mine[0] % len(mine)):
    raise ValueError("Every process must own an equal, contiguous block of the mesh's devices.")
  return mine[0] // len(mine), count


def local_rows(global_rows: int, mesh: Mesh) -> tuple[int, int]:
  """[start, stop) of the rows of a global batch of `global_rows` that this process holds."""
  index, count = local_share(mesh)
  if global_rows % mesh.devices.size:
    raise ValueError(f"A batch of {global_rows} does not split over {mesh.devices.size} devices.")
  per_process = global_rows // count
  return index * per_process, (index + 1) * per_process


def place(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host value as a global array with `sharding` (every process passes the same value)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Host values -> replicated global arrays (every process passes the same values)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: place(x, sharding), tree)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over DATA_AXIS (asynchronous)."""
  sharding = batch_sharding(mesh)
  _, count = local_share(mesh)
  return {k: jax.make_array_from_process_local_data(
      sharding, np.asarray(v), (np.shape(v)[0] * count,) + np.shape(v)[1:])
          for k, v in local.items()}


def host_copy(tree: PyTree) -> PyTree:
  """Numpy copies of replicated global arrays (read from this process's first shard).

  The copy stays valid after the arrays are donated to the next step; reading a shard's buffer
  compiles nothing (indexing a global array would compile a program per leaf shape).
  """
  def copy(x):
    if isinstance(x, jax.Array):
      return np.array(x.addressable_data(0))
    return np.array(x)

  return jax.tree.map(copy, tree)


def prefetch(batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh,
             size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Sends each host batch to the devices `size` steps before it is needed."""
  queue: collections.deque = collections.deque()
  for batch in batches:
    queue.append(global_batch(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
