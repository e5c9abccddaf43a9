"""Several processes: start-up from the environment, process-local batches, and a real
2-process distillation on localhost (local coordinator, gloo CPU collectives) checked against the
same run done by one process."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, write_toy_task
from kdjax import cli, data, distributed, metrics, sharding

DRIVER = REPO_ROOT / "tests" / "multiprocess_driver.py"


# ------------------------------------------------------------------------------------------------
# Start-up from the environment


def test_single_machine_environment_starts_nothing():
    assert distributed.distributed_arguments({}) is None
    assert distributed.distributed_arguments({"KDJAX_DISTRIBUTED": "0"}) is None
    assert distributed.initialize_from_env({}) is False
    assert not jax.distributed.is_initialized()


def test_explicit_cluster_variables_become_initialize_arguments():
    env = {"KDJAX_COORDINATOR": "10.0.0.1:1234", "KDJAX_NUM_PROCESSES": "4",
           "KDJAX_PROCESS_ID": "3"}
    assert distributed.distributed_arguments(env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    # JAX's own variables and cluster auto-detection: JAX reads the environment itself.
    assert distributed.distributed_arguments({"JAX_COORDINATOR_ADDRESS": "h:1"}) == {}
    assert distributed.distributed_arguments({"KDJAX_DISTRIBUTED": "1"}) == {}


@pytest.mark.parametrize("env, message", [
    ({"KDJAX_COORDINATOR": "h:1", "KDJAX_PROCESS_ID": "0"}, "KDJAX_NUM_PROCESSES is not"),
    ({"KDJAX_NUM_PROCESSES": "2"}, "KDJAX_COORDINATOR is not"),
    ({"KDJAX_COORDINATOR": "h", "KDJAX_NUM_PROCESSES": "2", "KDJAX_PROCESS_ID": "0"},
     "KDJAX_COORDINATOR='h' must be host:port"),
    ({"KDJAX_COORDINATOR": "h:1", "KDJAX_NUM_PROCESSES": "two", "KDJAX_PROCESS_ID": "0"},
     "KDJAX_NUM_PROCESSES='two' must be an integer"),
    ({"KDJAX_COORDINATOR": "h:1", "KDJAX_NUM_PROCESSES": "2", "KDJAX_PROCESS_ID": "2"},
     "KDJAX_PROCESS_ID=2 must be in 0..1"),
    ({"KDJAX_DISTRIBUTED": "yes"}, "KDJAX_DISTRIBUTED='yes'"),
])
def test_bad_cluster_variables_are_one_clear_error(env, message):
    with pytest.raises(distributed.DistributedSetupError, match=message):
        distributed.distributed_arguments(env)


def test_cli_reports_a_missing_partner_variable_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("KDJAX_COORDINATOR", "localhost:1")
    monkeypatch.delenv("KDJAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("KDJAX_PROCESS_ID", raising=False)
    code = cli.main(["distill", "--config", "configs/kd.py", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "KDJAX_NUM_PROCESSES" in err and "Traceback" not in err
    assert not jax.distributed.is_initialized()


# ------------------------------------------------------------------------------------------------
# Process-local batches (one process here; the shares are checked against the whole batch)


def _toy_split(n=37, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 17, n).astype(np.int32)
    ids = rng.integers(5, 100, (n, 16)).astype(np.int32)
    ids[np.arange(16)[None] >= lengths[:, None]] = 0
    return data.EncodedSplit(ids, np.zeros_like(ids), lengths,
                             rng.integers(0, 2, n).astype(np.int32))


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("processes", [2, 4])
def test_process_shares_put_together_are_the_one_process_batches(shuffle, processes):
    split = _toy_split()
    whole = data.Batcher(split, 8, buckets=(4, 8, 16), shuffle=shuffle, seed=3)
    shares = [data.Batcher(split, 8, buckets=(4, 8, 16), shuffle=shuffle, seed=3,
                           process_index=p, process_count=processes)
              for p in range(processes)]
    for epoch in (0, 1):
        batches = list(whole.epoch(epoch))
        assert len(batches) == 5  # 37 examples: the last batch has 3 padding rows.
        for k, batch in enumerate(batches):
            parts = [next(s.epoch(epoch, start=k)) for s in shares]
            for name, value in batch.items():
                assert all(len(p[name]) == 8 // processes for p in parts)
                np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), value)
    # The padding rows of the last batch land on the last process, with weight 0.
    last = list(shares[-1].epoch(0))[-1] if not shuffle else None
    if last is not None:
        assert last["weights"][-1] == 0 and last["example_index"][-1] == -1


def test_batch_size_must_split_over_processes():
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the 4 processes"):
        data.Batcher(_toy_split(), 6, buckets=(16,), shuffle=False, process_index=0,
                     process_count=4)


def test_one_process_shard_batch_is_device_put_and_main_process_writes(tmp_path):
    mesh = sharding.make_mesh()
    batch = next(data.Batcher(_toy_split(), 8, buckets=(16,), shuffle=False).epoch(0))
    placed = sharding.shard_batch(batch, mesh)
    for name, value in batch.items():
        assert placed[name].sharding == sharding.batch_sharded(mesh)
        np.testing.assert_array_equal(np.asarray(placed[name]), value)
    assert sharding.process_rows(mesh, 8) == (0, 8)
    assert distributed.is_main_process()
    distributed.write_text(tmp_path / "x.json", "{}\n")
    assert (tmp_path / "x.json").read_text() == "{}\n"
    assert metrics.MetricLog(tmp_path).enabled
    key = sharding.replicate(jax.random.key(7), mesh)
    assert key.sharding == sharding.replicated(mesh)


# ------------------------------------------------------------------------------------------------
# A real 2-process run on localhost


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(args, *, devices, out, process_id=None, num_processes=1, port=None, log=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KDJAX_", "JAX_", "XLA_FLAGS"))}
    env.update(KDJAX_TEST_DEVICES=str(devices), KDJAX_TEST_OUT=str(out),
               PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    if process_id is not None:
        env.update(KDJAX_COORDINATOR=f"localhost:{port}", KDJAX_NUM_PROCESSES=str(num_processes),
                   KDJAX_PROCESS_ID=str(process_id))
    return subprocess.Popen([sys.executable, str(DRIVER), *args], cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_all(procs, logs, timeout):
    """Exit codes; kills every process still running at the deadline (the test never hangs)."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("multi-process run timed out:\n" + "\n".join(
            log.read_text()[-3000:] for log in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _params(path):
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


def test_two_processes_distill_like_one_process_with_the_same_devices(tmp_path, tiny_hf_dir):
    train_file, dev_file = write_toy_task(tmp_path / "data")
    args = ["distill", "--config", "configs/kd.py", "--no-progress",
            f"--config.teacher.name={tiny_hf_dir}", "--config.teacher.epochs=1",
            "--config.teacher.optim.lr=1e-2", "--config.data.task=toy",
            f"--config.data.train_file={train_file}", f"--config.data.dev_file={dev_file}",
            "--config.data.max_length=16", "--config.data.batch_size=16",
            "--config.data.eval_batch_size=16", "--config.optim.lr=1e-2",
            "--config.student.layers=1", "--config.train.max_steps=4",
            # One padded length: one compilation per step kind keeps three runs quick.
            "--config.data.buckets=(16,)",
            "--config.train.log_every=2", "--config.train.checkpoint_every=2"]
    multi, single = tmp_path / "multi", tmp_path / "single"
    port = _free_port()
    logs = [tmp_path / f"process{p}.log" for p in range(2)] + [tmp_path / "single.log"]
    files = [log.open("w") for log in logs]
    try:
        # 2 processes x 2 devices, and the same 4-device mesh in one process.
        procs = [_launch([*args, "--workdir", str(multi / "run")], devices=2, out=multi,
                         process_id=p, num_processes=2, port=port, log=files[p])
                 for p in range(2)]
        procs.append(_launch([*args, "--workdir", str(single / "run")], devices=4, out=single,
                             log=files[2]))
        codes = _wait_all(procs, logs, timeout=420)
    finally:
        for f in files:
            f.close()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0, 0], "\n".join(o[-3000:] for o in outputs)

    # Both processes end every loop (teacher fine-tuning, distillation) with the same parameters,
    # and they equal the one-process run's up to the order of cross-device sums.
    for loop in ("train", "distill"):
        p0, p1 = (_params(multi / f"params-{loop}-process{p}.npz") for p in range(2))
        reference = _params(single / f"params-{loop}-process0.npz")
        assert p0.keys() == p1.keys() == reference.keys() and len(p0) > 10
        for name in p0:
            np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
            np.testing.assert_allclose(p0[name], reference[name], rtol=1e-4, atol=1e-5,
                                       err_msg=name)

    # Process 0 alone wrote the run files: one metrics line per logged step, one result print.
    run = multi / "run"
    assert (run / "model" / "model.safetensors").is_file()
    assert (run / "teacher-seed0" / "model" / "model.safetensors").is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".model.")]  # No stray staging.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    single_records = [json.loads(line) for line in
                      (single / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in records] == \
        [(r["split"], r["step"]) for r in single_records] == [("distill", 2), ("distill", 4),
                                                               ("dev", 4)]
    # Metrics are global sums over all 16 rows of each batch, whichever process logs them.
    for mine, theirs in zip(records, single_records):
        assert mine["accuracy"] == pytest.approx(theirs["accuracy"])
        if mine["split"] == "distill":
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    # The loop counts global examples: the teacher's 6 steps saw all 96 training examples.
    for workdir in (run, single / "run"):
        teacher = json.loads((workdir / "teacher-seed0" / "eval.json").read_text())
        assert round(teacher["train_examples_per_s"] * teacher["train_seconds"]) == 96
    assert '"model":' in outputs[0] and '"model":' not in outputs[1]

    result = json.loads((run / "eval.json").read_text())
    reference = json.loads((single / "run" / "eval.json").read_text())
    for key in ("accuracy", "teacher_accuracy", "teacher_agreement", "examples"):
        assert result[key] == pytest.approx(reference[key]), key
    assert result["examples"] == 40  # Every dev example predicted once, gathered in order.
    # Orbax checkpoints were written by both processes together, once (the last two are kept,
    # so that a damaged latest one falls back to the one before).
    assert sorted(p.name for p in (run / "stages" / "distill" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2", "4"]
