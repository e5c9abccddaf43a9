"""All of kdjax's Orbax code: saving and restoring training state.

A checkpoint holds the array state (parameters, optimizer state, step counter; later recipes add
their own entries such as a discriminator) and a JSON `meta` record (data-iterator position, RNG
seed, anything small). Orbax writes each step into a temporary directory and renames it when
complete, so a kill during a save leaves the previous checkpoint usable; saves run asynchronously
so training continues while the bytes are written.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(tree: Any, default_sharding=None) -> Any:
    """Shape/dtype/sharding placeholders for restoring into arrays laid out like `tree`.

    Leaves without a sharding of their own (e.g. from `jax.eval_shape`) get `default_sharding`,
    or a single-device placement when that is None.
    """
    if default_sharding is None:
        default_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default_sharding),
        tree)


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def discard_after(self, step: int) -> list[int]:
        """Deletes the checkpoints of steps after `step`; returns those steps."""
        later = [s for s in self.all_steps() if s > step]
        for s in later:
            self._manager.delete(s)
        return later

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving `state` (a pytree of arrays) and `meta` (JSON) as `step`."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into the structure, dtypes and shardings of `target` (arrays or abstract).

        Returns:
          (state, meta) of `step`, or of the latest checkpoint when `step` is None.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON record of `step` (default: latest) without reading the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
