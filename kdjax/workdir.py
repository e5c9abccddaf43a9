"""Claiming a run directory: one process at a time, only for the run it already holds.

`claim(workdir, config, kind)` is what every `kdjax fine-tune` and `kdjax distill` run does
before it writes anything:
  - it locks WORKDIR/.kdjax.lock for the run's lifetime, so that a second process started on the
    same workdir refuses at once, naming the holder's pid (a POSIX record lock: the kernel
    releases it when the holder exits or is killed, so a stale lock never blocks);
  - it compares the run with the one already recorded there (WORKDIR/config.json): another kind
    of run (`distill` in a fine-tuning workdir) or a config that differs in a key that changes
    the result is refused, naming the keys, unless `overwrite`, which moves the old run aside to
    WORKDIR.old-TIMESTAMP rather than deleting it;
  - when the run fails before writing anything (a bad data file, a missing model), it leaves the
    disk as it found it: a workdir it created is removed, an old run it moved aside is moved
    back.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import shutil
import struct
from typing import Any, Iterator

import ml_collections

from kdjax import config as config_lib, distributed

LOCK_FILE = ".kdjax.lock"

# Keys that do not change what a run computes, only how it is logged, checkpointed, laid out
# or cached: a resume may change them freely.
HARMLESS_KEYS = frozenset({
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.stop_after_steps", "train.tensorboard", "train.num_devices",
    "data.eval_batch_size", "teacher.cache_dir", "teacher.cache_max_gb",
})


class WorkdirError(ValueError):
    """The workdir is held by another process or holds an incompatible run."""


def run_kind(config: dict | ml_collections.ConfigDict) -> str:
    """"distill" for a distillation config (it has stages or a method), else "fine-tune"."""
    return "distill" if ("stages" in config or "method" in config) else "fine-tune"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def differing_keys(recorded: dict, config: ml_collections.ConfigDict) -> list[str]:
    """The dotted keys whose values differ between a recorded config.json and `config`,
    harmless keys left out.

    Only keys both hold are compared: a key one lacks was added or removed by another kdjax
    version (another recipe shows in `method`, `stages` and the loss weights, which both hold).
    """
    # Through JSON, so that tuples and lists (and int/float spellings) compare as recorded.
    current = _flatten(json.loads(json.dumps(config_lib.to_dict(config))))
    recorded = _flatten(recorded)
    return [k for k in sorted(set(current) & set(recorded))
            if k not in HARMLESS_KEYS and recorded[k] != current[k]]


def _describe(key: str, recorded: dict, config: ml_collections.ConfigDict) -> str:
    old = _flatten(recorded)[key]
    new = _flatten(json.loads(json.dumps(config_lib.to_dict(config))))[key]
    return f"{key} {old!r} -> {new!r}"


def check_compatible(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                     kind: str) -> str | None:
    """Why the run recorded in `workdir` cannot be resumed by `config` (one line), or None
    when there is none or it is the same run."""
    record = workdir / "config.json"
    if not record.is_file():
        return None
    try:
        recorded = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{workdir} holds a run whose config.json cannot be read"
    recorded_kind = run_kind(recorded)
    if recorded_kind != kind:
        return f"{workdir} holds a {recorded_kind} run, not a {kind} run"
    differ = differing_keys(recorded, config)
    if not differ:
        return None
    shown = ", ".join(_describe(k, recorded, config) for k in differ[:5])
    more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
    return f"{workdir} holds another run: its config differs in {shown}{more}"


def _holder_pid(fd: int) -> int | None:
    """The pid holding a write lock on `fd`'s file (F_GETLK), or None when unknown."""
    # struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
    # pid_t l_pid (native alignment pads it to 32 bytes).
    request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, request)
        l_type, _, _, _, pid = struct.unpack("hhqqi4x", answer)
    except (OSError, struct.error):
        return None
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


class _Lock:
    """A POSIX write lock on WORKDIR/.kdjax.lock (held until `release` or the process ends)."""

    def __init__(self, workdir: pathlib.Path):
        path = workdir / LOCK_FILE
        self.created = not path.exists()
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = _holder_pid(self.fd)
            os.close(self.fd)
            holder = f"process {pid}" if pid else "another process"
            raise WorkdirError(f"{workdir} is in use by {holder} (lock {path}); wait for it to "
                               "end or use another --workdir") from None

    def release(self, *, remove: bool = False) -> None:
        if remove and self.created:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # Closing the descriptor drops the lock.


def _aside_name(workdir: pathlib.Path) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = workdir.with_name(f"{workdir.name}.old-{stamp}")
    n = 1
    while candidate.exists():
        candidate = workdir.with_name(f"{workdir.name}.old-{stamp}-{n}")
        n += 1
    return candidate


def _entries(workdir: pathlib.Path) -> set[str]:
    """What the workdir holds besides the lock file."""
    return {p.name for p in workdir.iterdir()} - {LOCK_FILE}


@contextlib.contextmanager
def claim(workdir: str | pathlib.Path, config: ml_collections.ConfigDict, kind: str, *,
          overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Holds `workdir` for a run of `kind` ("fine-tune" or "distill") with `config`.

    Yields the workdir (created when missing). In a multi-process run only process 0 locks and
    moves; every process checks.

    Raises:
      WorkdirError: another process holds the workdir, or it holds another run (and not
        `overwrite`); nothing on disk has changed.
    """
    workdir = pathlib.Path(workdir)
    main = distributed.is_main_process()
    existed = workdir.exists()
    if existed and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory")
    if not main:
        distributed.barrier(f"claim {workdir}")  # Process 0 has locked and moved.
        problem = check_compatible(workdir, config, kind)
        if problem:
            raise WorkdirError(problem)
        yield workdir
        return
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        lock = _Lock(workdir)
    except WorkdirError:
        if not existed:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    moved_to = None
    lock_was_there = not lock.created
    found = _entries(workdir)
    try:
        problem = check_compatible(workdir, config, kind)
        if problem and not overwrite:
            raise WorkdirError(f"{problem}; rerun with the original config, use another "
                               "--workdir, or pass --overwrite to move the old run aside")
        if overwrite and found:
            # The old lock moves with the old directory and stays held until the new one is.
            moved_to = _aside_name(workdir)
            workdir.rename(moved_to)
            workdir.mkdir()
            old_lock, lock = lock, _Lock(workdir)
            old_lock.release()
            found = set()
            print(f"moved the old run in {workdir} aside to {moved_to}", flush=True)
    except BaseException:
        lock.release(remove=True)
        if not existed and not _entries(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        distributed.barrier(f"claim {workdir}")  # The others then find the same problem.
        raise
    distributed.barrier(f"claim {workdir}")
    try:
        yield workdir
    except BaseException:
        # A run that failed (or was interrupted) before writing anything leaves the disk as it
        # found it. One that wrote something keeps it: the same command resumes from there.
        unchanged = _entries(workdir) == found
        lock.release(remove=unchanged)
        if unchanged:
            if moved_to is not None:
                workdir.rmdir()
                if not lock_was_there:  # The old run goes back exactly as it was.
                    (moved_to / LOCK_FILE).unlink(missing_ok=True)
                moved_to.rename(workdir)
                print(f"moved the old run back from {moved_to} to {workdir}", flush=True)
            elif not existed:
                workdir.rmdir()
        raise
    lock.release()
