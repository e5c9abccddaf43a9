"""The one device mesh and the shardings every step uses.

kdjax runs data-parallel over a 1-D mesh with a `data` axis (jit over a `jax.make_mesh` mesh,
the successor of pmap): the batch is split over `data`; parameters and optimizer state are
replicated, or with FSDP (`train.fsdp`) split over the same axis by a shape rule
(`state_shardings`), so every device holds 1/N of each large array.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D `data` mesh over the first `num_devices` devices (0 = all).

    With several processes every process must own an equal, contiguous part of the mesh (each
    loads the rows of its own devices), so `num_devices` is split evenly: the first
    `num_devices / process_count` devices of each process, in process order.
    """
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = _first_devices_of_each_process(num_devices)
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
    if batch_size % jax.process_count():
        raise ValueError(f"{what}={batch_size} is not divisible by the {jax.process_count()} "
                         "processes; each process loads an equal share of every batch")


def check_grad_accum_steps(batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """Every micro-batch of a gradient-accumulation step must still split evenly over `mesh`.

    Raises:
      ValueError: naming train.grad_accum_steps when data.batch_size is not a multiple of
        grad_accum_steps x the mesh size.
    """
    if grad_accum_steps < 1 or batch_size % (grad_accum_steps * mesh.size):
        raise ValueError(
            f"train.grad_accum_steps={grad_accum_steps}: data.batch_size={batch_size} must be a "
            f"multiple of grad_accum_steps x the {mesh.size} devices of the '{DATA_AXIS}' axis "
            f"(= {grad_accum_steps * mesh.size}), so that every micro-batch is spread over all "
            "devices")


def _first_devices_of_each_process(num_devices: int) -> list:
    """`num_devices` devices: all on one process, or an equal share of each process's."""
    processes = jax.process_count()
    if processes == 1:
        return jax.devices()[:num_devices]
    if num_devices % processes:
        raise ValueError(f"train.num_devices={num_devices} is not divisible by the {processes} "
                         "processes; use a multiple of it, or 0 for every device")
    per_process = num_devices // processes
    by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(processes)]
    if min(len(devices) for devices in by_process) < per_process:
        raise ValueError(f"train.num_devices={num_devices} needs {per_process} devices on each "
                         f"of the {processes} processes; some have fewer")
    return [d for devices in by_process for d in devices[:per_process]]


def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """The rows [start, stop) of a global batch that this process's devices hold.

    Raises:
      ValueError: the mesh gives this process no rows or a non-contiguous set of rows (its
        devices are not adjacent on the `data` axis).
    """
    rows = sorted({(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
                   for index in batch_sharded(mesh).addressable_devices_indices_map(
                       (batch_size,)).values()})
    if not rows or any(a[1] != b[0] for a, b in itertools.pairwise(rows)):
        raise ValueError(f"process {jax.process_index()} holds rows {rows} of the batch; every "
                         f"process needs a contiguous block of the '{DATA_AXIS}' axis")
    return rows[0][0], rows[-1][1]


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split along the batch dimension.

    With one process `batch` is the whole global batch. With several, it holds only this
    process's rows (`data.Batcher(process_index=..., process_count=...)`, rows
    [p * B / P, (p + 1) * B / P)) and the global arrays are assembled with
    `jax.make_array_from_process_local_data`, without copying any other process's rows.
    """
    sharding = batch_sharded(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    local_rows = len(next(iter(batch.values())))
    global_rows = local_rows * jax.process_count()
    start, stop = process_rows(mesh, global_rows)
    if stop - start != local_rows:
        raise ValueError(f"process {jax.process_index()} got {local_rows} batch rows but its "
                         f"devices hold rows [{start}, {stop}) of the {global_rows}-row batch")
    return {name: jax.make_array_from_process_local_data(
                sharding, value, (global_rows, *np.shape(value)[1:]))
            for name, value in batch.items()}


def replicate(tree, mesh: Mesh):
    """`tree` with every array replicated on every device of `mesh`.

    With several processes each process passes its own (identical) copy: arrays are built from
    the local values without the cross-process equality check `jax.device_put` would do per leaf.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, replicated(mesh))
    return jax.tree.map(lambda leaf: _replicate_across_processes(leaf, replicated(mesh)), tree)


def _replicate_across_processes(leaf, sharding: NamedSharding):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return jax.device_put(leaf, sharding)  # Already global: a reshard on the same devices.
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        key_data = _replicate_across_processes(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# ------------------------------------------------------------------------------------------------
# State placement: replicated, or FSDP (fully sharded data parallel)

# Arrays with fewer elements stay replicated under FSDP: splitting a LayerNorm scale or a bias
# saves almost no memory but costs a collective per use. 2**14 = 16,384 elements (64 KiB in
# float32): every embedding table and dense kernel of a BERT (e.g. MiniLM's 384 x 384 and
# 384 x 1536 kernels) is split; biases, LayerNorm parameters and scalars are not.
FSDP_MIN_SIZE = 2**14


def leaf_partition(shape: Sequence[int], num_shards: int, *, fsdp: bool) -> P:
    """The shape rule for one array: P() (replicated), or, under FSDP, split over `data` along
    its largest dimension divisible by `num_shards` (the first such on a tie) when it has at
    least `FSDP_MIN_SIZE` elements. Arrays without a divisible dimension stay replicated."""
    shape = tuple(shape)
    if not fsdp or num_shards == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return P()
    divisible = [(size, -axis) for axis, size in enumerate(shape) if size % num_shards == 0]
    if not divisible:
        return P()
    axis = -max(divisible)[1]
    return P(*(DATA_AXIS if i == axis else None for i in range(len(shape))))


def state_shardings(tree, mesh: Mesh, *, fsdp: bool):
    """A `NamedSharding` for every array of `tree` (a state, teachers, parameters), by
    `leaf_partition`. The rule looks only at shapes, so an optimizer's moments are laid out
    exactly like their parameters, and the same rule applied inside a jitted step to the new
    state gives back the layout of the state that came in."""
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, leaf_partition(np.shape(leaf), mesh.size, fsdp=fsdp)),
        tree)


def place_state(tree, mesh: Mesh, *, fsdp: bool):
    """`tree` placed on `mesh` by `state_shardings`: replicated, or FSDP-split. Every update
    step kind's state and the frozen teachers are placed with it (`fsdp` = `train.fsdp`)."""
    shardings = state_shardings(tree, mesh, fsdp=fsdp)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    # Each process holds the same host values: build the global arrays from them.
    return jax.tree.map(_replicate_across_processes, tree, shardings)


def constrain_state(tree, mesh: Mesh, *, fsdp: bool):
    """Inside a jitted step: pins `tree` to the layout `place_state` gives it."""
    if tree is None:
        return None
    return jax.lax.with_sharding_constraint(tree, state_shardings(tree, mesh, fsdp=fsdp))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a step's arrays live: the mesh and whether the state is FSDP-split. Hashable, so a
    step function takes it as a static keyword argument (bound by `with_accumulation`) and helpers
    inside the step (gradient accumulation) lay out what they create like the state."""

    mesh: Mesh
    fsdp: bool = False


def with_accumulation(step_fn: Callable, grad_accum_steps: int, mesh: Mesh, *,
                      fsdp: bool = False) -> Callable:
    """`step_fn` with `grad_accum_steps=` and `layout=` bound when it accumulates micro-batches
    (k != 1); unchanged otherwise, so a step function without those parameters still works
    without accumulation."""
    if grad_accum_steps == 1:
        return step_fn
    return functools.partial(step_fn, grad_accum_steps=grad_accum_steps,
                             layout=Layout(mesh, fsdp))


# Kinds of a jitted step's positional arguments (see `jit_step`).
STATE, BATCH, REPLICATED, AS_IS = "state", "batch", "replicated", "as_is"


def jit_step(step_fn: Callable, mesh: Mesh, arg_kinds: Sequence[str], *, fsdp: bool = False,
             returns_state: bool = True, donate_state: bool = True) -> Callable:
    """`step_fn` jitted over `mesh`, the one way kdjax builds its update steps.

    Args:
      step_fn: `(*args) -> (new state, metric sums)` (or any outputs if not `returns_state`).
      mesh: the `data` mesh.
      arg_kinds: one per positional argument: STATE (a state or teachers: placed by
        `state_shardings`, pinned to that layout on entry), BATCH (split over `data`),
        REPLICATED, or AS_IS (keeps the sharding it arrives with).
      fsdp: the state layout (`train.fsdp`).
      returns_state: the first output is the new state of the first argument: pinned to the
        same layout (so FSDP state stays split and donation can reuse its buffers), and the
        metrics after it replicated.
      donate_state: donate the first argument's buffers.
    """
    rep, split = replicated(mesh), batch_sharded(mesh)
    # STATE arguments are left to their committed sharding (any explicit one would be refused
    # for a committed array laid out differently) and pinned by a constraint instead.
    by_kind = {STATE: None, BATCH: split, REPLICATED: rep, AS_IS: None}
    unknown = set(arg_kinds) - set(by_kind)
    if unknown:
        raise ValueError(f"unknown argument kinds {sorted(unknown)}; use {sorted(by_kind)}")
    state_args = tuple(i for i, kind in enumerate(arg_kinds) if kind == STATE)

    def placed_step(*args):
        args = list(args)
        for i in state_args:
            args[i] = constrain_state(args[i], mesh, fsdp=fsdp)
        out = step_fn(*args)
        if returns_state:
            new_state, *rest = out
            return (constrain_state(new_state, mesh, fsdp=fsdp), *rest)
        return out

    # Not functools.wraps: jit would read the wrapped function's keyword-only parameters.
    placed_step.__name__ = getattr(getattr(step_fn, "func", step_fn), "__name__", "step")
    return jax.jit(placed_step, in_shardings=tuple(by_kind[k] for k in arg_kinds),
                   out_shardings=(None, rep) if returns_state else None,
                   donate_argnums=0 if donate_state else ())
