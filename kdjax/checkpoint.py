"""All of kdjax's Orbax code: saving and restoring training state.

A checkpoint holds the array state (parameters, optimizer state, step counter; later recipes add
their own entries such as a discriminator) and a JSON `meta` record (data-iterator position, RNG
seed, anything small). Orbax writes each step into a temporary directory and renames it when
complete, so a kill during a save leaves the previous checkpoint usable; saves run asynchronously
so training continues while the bytes are written.
"""

from __future__ import annotations

import datetime
import pathlib
import sys
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


class CheckpointError(ValueError):
    """No checkpoint of a run can be read."""


def _first_line(error: Exception, limit: int = 160) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _quiet_late_read_callbacks() -> None:
    """Silences the one error a failed restore leaves behind: TensorStore's reads still in flight
    call back into Orbax's event loop after it closed, and Python prints each as an "Exception
    ignored" traceback. Any other unraisable error still goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_kdjax_quiet", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook._kdjax_quiet = True
    sys.unraisablehook = hook


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

    def restore_latest_good(self, target: Any, *, set_aside: bool = True,
                            ) -> tuple[Any, dict, list[str]]:
        """Restores the newest checkpoint that can be read, as `restore` does.

        A checkpoint that cannot be read (a truncated or damaged file: a disk that filled up, a
        copy that did not finish) is skipped for the one before it; with `set_aside` (a run
        that will save again) it is moved to DIRECTORY/../damaged-checkpoints/ (kept, never
        deleted), so that later saves can reuse its step.

        Returns:
          (state, meta, one line per damaged checkpoint set aside).

        Raises:
          FileNotFoundError: no checkpoint at all.
          CheckpointError: none can be read (nothing is moved then: the problem may be the
            target, not the files).
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failures = []
        for step in steps:
            try:
                state, meta = self.restore(target, step)
            except Exception as e:  # Orbax and TensorStore raise many kinds for a bad file.
                _quiet_late_read_callbacks()
                failures.append((step, e))
                continue
            if not set_aside:
                return state, meta, [f"checkpoint step {bad} in {self.directory} cannot be read "
                                     f"({_first_line(error)})" for bad, error in failures]
            notes = [self._set_aside(bad, error) for bad, error in failures]
            if failures:
                self._manager.reload()  # Forget the steps moved away.
            return state, meta, notes
        step, error = failures[0]
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be read (step {step}: {_first_line(error)}); "
            f"move {self.directory} aside to start over, or use another --workdir")

    def _set_aside(self, step: int, error: Exception) -> str:
        damaged = self.directory.parent / "damaged-checkpoints"
        damaged.mkdir(exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        destination = damaged / f"{self.directory.name}-{step}-{stamp}"
        (self.directory / str(step)).rename(destination)
        return (f"checkpoint step {step} in {self.directory} cannot be read "
                f"({_first_line(error)}); moved it to {destination}")

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
