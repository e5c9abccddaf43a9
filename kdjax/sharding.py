"""The one device mesh and the shardings every step uses.

kdjax runs data-parallel over a 1-D mesh with a `data` axis (jit over a `jax.make_mesh` mesh,
the successor of pmap): the batch is split over `data`, parameters and optimizer state are
replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D `data` mesh over the first `num_devices` devices (0 = all)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    # Auto axes: XLA propagates the batch sharding through the model on its own.
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "data.batch_size") -> None:
    if batch_size % mesh.size:
        raise ValueError(f"{what}={batch_size} is not divisible by the {mesh.size} devices "
                         f"of the '{DATA_AXIS}' mesh axis")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split along the batch dimension."""
    return jax.device_put(batch, batch_sharded(mesh))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))
