"""Several processes (hosts) training one model: start-up, who writes, and barriers.

kdjax is multi-controller JAX: every process runs the same program over the one global mesh
(`kdjax.sharding`), loads only its own rows of each global batch (`data.Batcher` with
`process_index`/`process_count`, then `sharding.shard_batch`), and computes everything. Files
other than checkpoints are written by process 0 only (`is_main_process`, `write_text`); every
process takes part in Orbax saves and restores, which coordinate themselves. The run directory
must be on a file system all processes see (NFS, GCS FUSE, or one machine's disk).

Start-up (`initialize_from_env`, called first by every `kdjax` command; Python API users call it
themselves before anything touches a device) reads, in this order:

  KDJAX_COORDINATOR=host:port, KDJAX_NUM_PROCESSES=N, KDJAX_PROCESS_ID=i
      an explicit cluster: process i of N, process 0 also serves as coordinator at host:port.
  JAX_COORDINATOR_ADDRESS=host:port (with JAX_NUM_PROCESSES / JAX_PROCESS_ID)
      JAX's own variables, read by `jax.distributed.initialize` itself.
  KDJAX_DISTRIBUTED=1
      cluster auto-detection (Cloud TPU pods, SLURM, Open MPI): `jax.distributed.initialize()`.

With none of them set nothing happens: one process, all local devices. On CPU, cross-process
collectives use gloo (JAX's default; `jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


class DistributedSetupError(ValueError):
    """The environment asks for a multi-process run but its variables are wrong or missing."""


_EXPLICIT = ("KDJAX_COORDINATOR", "KDJAX_NUM_PROCESSES", "KDJAX_PROCESS_ID")


def _int_variable(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"{name}={value!r} must be an integer") from None


def distributed_arguments(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments `jax.distributed.initialize` gets for this environment.

    Returns:
      None on a single machine (no variable set); {} when JAX should read its own variables or
      detect the cluster; else coordinator_address, num_processes and process_id.

    Raises:
      DistributedSetupError: a KDJAX_* variable without its partners, or a bad value; the
        message names the variable.
    """
    environ = os.environ if environ is None else environ
    given = [name for name in _EXPLICIT if environ.get(name)]
    if given:
        missing = [name for name in _EXPLICIT if name not in given]
        if missing:
            raise DistributedSetupError(
                f"{given[0]} is set but {missing[0]} is not; a multi-process run needs all of "
                f"{', '.join(_EXPLICIT)} (or none of them on a single machine)")
        coordinator = environ["KDJAX_COORDINATOR"]
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedSetupError(f"KDJAX_COORDINATOR={coordinator!r} must be host:port, "
                                        "e.g. 10.0.0.1:1234")
        num_processes = _int_variable(environ, "KDJAX_NUM_PROCESSES")
        process_id = _int_variable(environ, "KDJAX_PROCESS_ID")
        if num_processes < 1:
            raise DistributedSetupError(f"KDJAX_NUM_PROCESSES={num_processes} must be >= 1")
        if not 0 <= process_id < num_processes:
            raise DistributedSetupError(f"KDJAX_PROCESS_ID={process_id} must be in "
                                        f"0..{num_processes - 1} (KDJAX_NUM_PROCESSES="
                                        f"{num_processes})")
        return {"coordinator_address": coordinator, "num_processes": num_processes,
                "process_id": process_id}
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return {}
    flag = environ.get("KDJAX_DISTRIBUTED", "")
    if flag not in ("", "0", "1"):
        raise DistributedSetupError(f"KDJAX_DISTRIBUTED={flag!r} must be 1 (auto-detect the "
                                    "cluster) or 0/unset")
    return {} if flag == "1" else None


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Joins a multi-process run when the environment describes one (see the module docstring).

    Call once, before anything touches a device. Calling again after a successful start is a
    no-op.

    Returns:
      True when `jax.distributed.initialize` was called (now or earlier), False on one machine.
    """
    if jax.distributed.is_initialized():
        return True
    arguments = distributed_arguments(environ)
    if arguments is None:
        return False
    jax.distributed.initialize(**arguments)
    return True


def is_main_process() -> bool:
    """True on the one process (index 0) that writes logs, exports and other run files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (e.g. after process 0 wrote a file
    the others read next). All processes must call it with the same name; one process: no-op."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes a run file (config.json, eval.json, ...) on process 0 only. Other processes return
    at once; call `barrier` after it when they read the file next."""
    if is_main_process():
        # Beside the destination, then renamed over it: a kill leaves the old file or the new.
        path = pathlib.Path(path)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text)
        os.replace(partial, path)


def host_arrays(tree: Any) -> Any:
    """`tree` with every array leaf as the full numpy value on every process.

    Arrays split over several processes are all-gathered, so every process must call this for
    the same tree (a collective); replicated and local arrays are fetched directly.
    """
    def fetch(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x) if isinstance(x, jax.Array) else x

    return jax.tree.map(fetch, tree)
