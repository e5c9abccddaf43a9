"""Failure that loses nothing, with real processes: a `kdjax` run killed (SIGKILL) at a random
moment and run again with the same command ends with bitwise the student of an uninterrupted
run; SIGTERM and Ctrl-C save, exit cleanly with a message, and resume the same way.

Each case is a tiny model on the toy task with a checkpoint every two steps. The kill moment is
drawn (seeded) over the span the uninterrupted run took from its start to its end, so it lands
in the teacher-cache build, a step, an asynchronous save, the evaluation or the export.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO_ROOT, write_toy_task, write_toy_teacher

# The children import this checkout's kdjax and share the suite's compilation cache (a cached
# program is the same program: it only saves the children compiling it again).
_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(REPO_ROOT / ".pytest_cache" / "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
_TIMEOUT_S = 300

_COMMON = ["--config.data.task=toy", "--config.data.max_length=16",
           "--config.data.batch_size=16", "--config.data.eval_batch_size=16",
           "--config.data.buckets=(16,)", "--config.train.num_devices=1",
           "--config.train.checkpoint_every=2", "--config.train.log_every=2"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_hf_dir):
    """The toy task's files and a teacher already fine-tuned for it (random weights with its
    labels: what is tested is the run's bookkeeping, and skipping the teacher's fine-tuning
    keeps the children short)."""
    root = tmp_path_factory.mktemp("kill")
    train_file, dev_file = write_toy_task(root / "data")
    write_toy_teacher(tiny_hf_dir, root / "teacher", train_file, dev_file)
    files = [f"--config.data.train_file={train_file}", f"--config.data.dev_file={dev_file}"]
    return {"root": root, "files": files, "teacher": root / "teacher", "model": tiny_hf_dir}


def _command(toy, kind: str, workdir: pathlib.Path) -> list[str]:
    """`kdjax ...` for a fine-tuning run, a plain distillation stage (kd, with the teacher-output
    cache) or an adversarial one (kdabert)."""
    cli = [sys.executable, "-m", "kdjax.cli"]
    if kind == "fine-tune":
        return [*cli, "fine-tune", "--config", "configs/finetune.py", "--workdir", str(workdir),
                "--no-progress", f"--config.model.name={toy['model']}", "--config.optim.lr=1e-3",
                "--config.train.max_steps=16", *_COMMON, *toy["files"]]
    student = ["--config.student.layers=1", "--config.student.hidden=16",
               "--config.student.heads=4", "--config.student.intermediate=32",
               "--config.student.init=random",
               f"--config.teacher.name={toy['teacher']}", "--config.optim.lr=1e-2",
               "--config.train.max_steps=12"]
    if kind == "kd":
        return [*cli, "distill", "--config", "configs/kd.py", "--workdir", str(workdir),
                "--no-progress", *student, *_COMMON, *toy["files"]]
    assert kind == "kdabert"
    return [*cli, "distill", "--config", "configs/kdabert.py", "--workdir", str(workdir),
            "--no-progress", *student, "--config.discriminator.hidden=32",
            "--config.distill.loss.adversarial_after_loss_drop=0.1",
            "--config.distill.loss.adversarial_max_d_accuracy=0.9", *_COMMON, *toy["files"]]


def _start(command) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO_ROOT, env=_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _has_checkpoint(workdir: pathlib.Path) -> bool:
    return any(p.name.isdigit() for p in [*workdir.glob("checkpoints/*"),
                                          *workdir.glob("stages/*/checkpoints/*")])


def _finish(command) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO_ROOT, env=_ENV, capture_output=True, text=True,
                          timeout=_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _student(workdir: pathlib.Path) -> dict:
    return load_file(str(workdir / "model" / "model.safetensors"))


def _assert_same_student(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # Bitwise.


def _assert_each_step_logged_once(workdir: pathlib.Path) -> None:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    seen = [(r["split"], r["step"]) for r in records if r["split"] != "warning"]
    assert len(seen) == len(set(seen)), seen
    assert sum(split == "dev" for split, _ in seen) == 1


def _records(workdir: pathlib.Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_for_training(process: subprocess.Popen, workdir: pathlib.Path, records: int) -> None:
    """Until the run has logged past its first `records` lines of metrics.jsonl (so it is in
    the training loop)."""
    deadline = time.monotonic() + _TIMEOUT_S
    while _records(workdir) <= records:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never logged a training step"
        time.sleep(0.01)


def _uninterrupted(toy, kind: str) -> dict:
    """The run without interruption: its student, and the seconds from its first logged
    training interval to its end (training, saves, evaluation, export)."""
    workdir = toy["root"] / f"straight-{kind}"
    process = _start(_command(toy, kind, workdir))
    _wait_for_training(process, workdir, 0)
    training = time.monotonic()
    _, err = process.communicate(timeout=_TIMEOUT_S)
    assert process.returncode == 0, err[-3000:]
    return {"student": _student(workdir), "span": time.monotonic() - training}


@pytest.mark.parametrize("kind, signum, seed", [
    ("fine-tune", signal.SIGTERM, 0),
    ("kd", signal.SIGINT, 1),  # A plain distillation stage on the teacher-output cache.
    ("kdabert", None, 2),  # An adversarial stage (student, discriminator, their optimizers).
])
def test_interrupted_run_resumes_to_the_same_student_as_an_uninterrupted_one(
        toy, kind, signum, seed):
    reference = _uninterrupted(toy, kind)
    workdir = toy["root"] / f"interrupted-{kind}"
    command = _command(toy, kind, workdir)

    if signum is not None:
        # SIGTERM / Ctrl-C in training: a checkpoint, a clean exit, one line saying what to do.
        process = _start(command)
        _wait_for_training(process, workdir, 0)
        process.send_signal(signum)
        _, err = process.communicate(timeout=_TIMEOUT_S)
        name = signal.Signals(signum).name
        assert process.returncode == 128 + signum, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"kdjax {command[3]}: interrupted by {name} at step "), err
        assert last.endswith("; run the same command again to resume"), last
        assert "Traceback" not in err and "Exception" not in err, err[-3000:]
        saved = last.split(" at step ")[1].split()[0]
        assert any(p.name == saved for p in [*workdir.glob("checkpoints/*"),
                                             *workdir.glob("stages/*/checkpoints/*")])

    # SIGKILL at a random moment of what is left: a step, an asynchronous save, the
    # evaluation or the export.
    delay = np.random.default_rng(seed).uniform(0, 0.5 * reference["span"])
    process = _start(command)
    _wait_for_training(process, workdir, _records(workdir))
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=_TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    print(f"{kind}: killed {delay:.2f} s into training (the uninterrupted run took "
          f"{reference['span']:.2f} s from there)")

    done = _finish(command)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    _assert_same_student(_student(workdir), reference["student"])
    _assert_each_step_logged_once(workdir)


def test_sigterm_before_training_stops_at_once_and_leaves_no_workdir(tmp_path, tiny_hf_dir,
                                                                     monkeypatch, capsys):
    from kdjax import cli, train

    def terminated_while_loading(config):
        signal.raise_signal(signal.SIGTERM)  # As `kill PID` while the data is read.
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(train, "prepare_task", terminated_while_loading)
    workdir = tmp_path / "run"
    code = cli.main(["fine-tune", "--config", "configs/finetune.py", "--workdir", str(workdir),
                     "--no-progress", f"--config.model.name={tiny_hf_dir}",
                     "--config.train.num_devices=1"])
    err = capsys.readouterr().err.strip()
    assert code == 143 and err == ("kdjax fine-tune: interrupted by SIGTERM; run the same "
                                   "command again to resume"), err
    assert not workdir.exists()  # Nothing was written, so nothing is left.
    # The command's handler is gone with the command.
    assert signal.getsignal(signal.SIGTERM) is not cli._raise_terminated


def test_a_second_signal_while_stopping_stops_at_once(capsys):
    from kdjax import train

    before = signal.getsignal(signal.SIGINT)
    stop = train._StopSignals().__enter__()
    signal.raise_signal(signal.SIGINT)  # The first only asks the loop to save and stop.
    assert stop.signum == signal.SIGINT
    assert "received SIGINT: saving a checkpoint after this step" in capsys.readouterr().out
    with pytest.raises(train.TrainingInterrupted, match="interrupted again by SIGINT before "
                       "the checkpoint was saved; the last complete checkpoint is kept"):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # Handlers restored.
    stop.__exit__()  # Idempotent, as the loop's `finally` calls it again.
    assert signal.getsignal(signal.SIGINT) is before
