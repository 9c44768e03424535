"""Data parallelism over every device of every process: one mesh axis, `data`, along which batches are split.

Params, bounds and optimizer states are replicated; a batch is split along `data`, and sharded `jit` inserts the
all-reduce of gradients and losses itself. The same code runs on one device (a mesh of one). A batch is defined
by its step's key whatever the device count: row i of a batch comes from `split(key, batch)[i]`, and each process
samples only its own rows (`process_rows`), so every process count and device count sees the same batches.

Multi-host: one process per host, all started alike (`initialize_distributed`); docs/scaling.md shows the launch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def initialize_distributed() -> bool:
    """Join a multi-host run where JAX_COORDINATOR_ADDRESS (host:port of process 0) is set, with JAX_NUM_PROCESSES
    and JAX_PROCESS_ID (or a cluster JAX detects: SLURM, Open MPI, TPU pods); returns whether it did. Call it
    before JAX's first computation."""
    if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=None if count is None else int(count),
                               process_id=None if index is None else int(index))
    return True


def data_mesh(devices: int | None = None) -> Mesh:
    """A one-axis (`data`) mesh over the first `devices` local devices of every process (None: all of them)."""
    local = jax.local_device_count()
    count = local if devices is None else devices
    if not 1 <= count <= local:
        raise ValueError(f"--devices must be 1..{local} (the devices of this process), got {count}")
    chosen = [d for p in range(jax.process_count()) for d in _process_devices(p)[:count]]
    return Mesh(np.array(chosen), (DATA,))


def _process_devices(process: int) -> list:
    return sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)


def local_devices(mesh: Mesh | None) -> list | None:
    """This process's devices of `mesh` (None without one), over which `evaluation.evaluate` spreads images."""
    return None if mesh is None else mesh.local_devices


def describe(mesh: Mesh) -> str:
    """What a run reports: e.g. '2 devices (cpu), 1 process'."""
    n, processes = mesh.devices.size, jax.process_count()
    return (f"{n} device{'s' * (n > 1)} ({mesh.devices.flat[0].platform}), "
            f"{processes} process{'es' * (processes > 1)}")


def check_batch(batch: int, mesh: Mesh | None, what: str = "--batch") -> None:
    """A batch must split evenly over the mesh's devices (a one-line error otherwise)."""
    if mesh is not None and batch % mesh.devices.size:
        raise ValueError(f"{what} {batch} does not split evenly over {mesh.devices.size} devices; use a multiple "
                         f"of {mesh.devices.size} or fewer --devices")


def process_rows(batch: int) -> tuple[int, int]:
    """The rows `[start, stop)` of a global batch that this process samples and feeds."""
    share = batch // jax.process_count()
    return jax.process_index() * share, (jax.process_index() + 1) * share


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA))


# `mesh=None` below: no mesh, arrays left where they are (one device, as without this module).


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` (the same on every process) on every device of `mesh`."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: _global(x, replicated(mesh), np.shape(x)), tree)


def shard_batch(rows: jax.Array, batch: int, mesh: Mesh | None) -> jax.Array:
    """This process's rows of a batch of `batch` (`process_rows`) as the global batch, split along `data`."""
    if mesh is None:
        return rows
    return _global(rows, batch_sharded(mesh), (batch, *rows.shape[1:]))


def to_device(tree: Any, device: jax.Device) -> Any:
    """A copy of `tree` on one of this process's devices, whether its arrays are replicated over a mesh that spans
    other processes (whose local copy is taken) or not."""
    local = lambda x: x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x
    return jax.device_put(jax.tree.map(local, tree), device)


def _global(x, sharding: NamedSharding, shape: tuple[int, ...]) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x), shape)


def constrain_to_batch(x: jax.Array) -> jax.Array:
    """Inside `jit`, `x` split along `data` of the mesh set by `jax.set_mesh`; unchanged without one."""
    return _constrain(x, PartitionSpec(DATA))


def gather(x: jax.Array) -> jax.Array:
    """Inside `jit`, `x` whole on every device of the mesh set by `jax.set_mesh` (unchanged without one): a
    reduction over it then runs in one order, as on one device, instead of as partial sums all-reduced."""
    return _constrain(x, PartitionSpec())


def _constrain(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA not in mesh.axis_names:
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def is_main_process() -> bool:
    """Whether this process writes results and files (process 0; every process takes part in checkpoints)."""
    return jax.process_index() == 0
