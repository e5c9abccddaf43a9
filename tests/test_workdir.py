"""Claiming a workdir: one process at a time, only the run it holds, nothing changed by a
refusal, no empty workdir left by a failed start."""

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, write_toy_task
from kdjax import cli, workdir as workdir_lib


def tree_fingerprint(root: pathlib.Path) -> dict:
    """Every file under `root`: its content hash and modification time (a rewrite with the same
    bytes shows too)."""
    result = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            result[str(path.relative_to(root))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mtime_ns)
        else:
            result[str(path.relative_to(root))] = "dir"
    return result


def _fine_tune_args(tmp_path, tiny_hf_dir, workdir, *extra):
    train, dev = write_toy_task(tmp_path / "data")
    return ["fine-tune", "--config", "configs/finetune.py", "--workdir", str(workdir),
            "--no-progress", f"--config.model.name={tiny_hf_dir}", "--config.data.task=toy",
            f"--config.data.train_file={train}", f"--config.data.dev_file={dev}",
            "--config.data.max_length=16", "--config.data.batch_size=16",
            "--config.data.eval_batch_size=16", "--config.train.num_devices=1",
            "--config.train.max_steps=2", "--config.optim.lr=1e-3", *extra]


@pytest.fixture
def finished_run(tmp_path, tiny_hf_dir):
    workdir = tmp_path / "run"
    assert cli.main(_fine_tune_args(tmp_path, tiny_hf_dir, workdir)) == 0
    return workdir


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_second_process_on_a_workdir_is_refused_naming_the_holder(tmp_path, tiny_hf_dir,
                                                                  capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys, time\n"
         "from kdjax import workdir\n"
         "workdir._Lock(pathlib.Path(sys.argv[1])); print('locked', flush=True)\n"
         "time.sleep(120)", str(workdir)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_fingerprint(workdir)
        code = cli.main(_fine_tune_args(tmp_path, tiny_hf_dir, workdir))
        err = _one_error_line(capsys)
        assert code == 2 and f"is in use by process {holder.pid}" in err, err
        assert tree_fingerprint(workdir) == before
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the lock file left behind does not block.
    lock = workdir_lib._Lock(workdir)
    lock.release()


@pytest.mark.parametrize("extra, differing", [
    (["--config.optim.lr=1e-2"], "optim.lr 0.001 -> 0.01"),
    (["--config.train.max_steps=3"], "train.max_steps 2 -> 3"),
    (["--config.data.task=other"], "data.task 'toy' -> 'other'"),
])
def test_a_workdir_of_another_config_is_refused_and_left_untouched(
        finished_run, tmp_path, tiny_hf_dir, capsys, extra, differing):
    before = tree_fingerprint(finished_run)
    capsys.readouterr()
    code = cli.main(_fine_tune_args(tmp_path, tiny_hf_dir, finished_run, *extra))
    err = _one_error_line(capsys)
    assert code == 2 and f"holds another run: its config differs in {differing}" in err, err
    assert "--overwrite" in err
    assert tree_fingerprint(finished_run) == before


def test_harmless_keys_resume_and_distill_in_a_fine_tune_workdir_is_refused(
        finished_run, tmp_path, tiny_hf_dir, capsys):
    assert cli.main(_fine_tune_args(tmp_path, tiny_hf_dir, finished_run,
                                    "--config.train.log_every=1")) == 0
    before = tree_fingerprint(finished_run)
    capsys.readouterr()
    code = cli.main(["distill", "--config", "configs/kd.py", "--workdir", str(finished_run),
                     "--no-progress", f"--config.teacher.name={tiny_hf_dir}",
                     "--config.data.task=toy", "--config.train.num_devices=1"])
    err = _one_error_line(capsys)
    assert code == 2 and "holds a fine-tune run, not a distill run" in err, err
    assert tree_fingerprint(finished_run) == before


def test_overwrite_moves_the_old_run_aside(finished_run, tmp_path, tiny_hf_dir, capsys):
    before = tree_fingerprint(finished_run)
    assert cli.main(_fine_tune_args(tmp_path, tiny_hf_dir, finished_run,
                                    "--config.optim.lr=1e-2", "--overwrite")) == 0
    out = capsys.readouterr().out
    (aside,) = tmp_path.glob("run.old-*")
    assert f"moved the old run in {finished_run} aside to {aside}" in out
    assert tree_fingerprint(aside) == before  # Moved whole, not rewritten.
    assert '"lr": 0.01' in (finished_run / "config.json").read_text()


def test_overwrite_with_a_bad_data_file_moves_the_old_run_back(finished_run, tmp_path,
                                                               tiny_hf_dir, capsys):
    (finished_run / workdir_lib.LOCK_FILE).unlink()  # As a run of an older kdjax left it.
    before = tree_fingerprint(finished_run)
    code = cli.main(_fine_tune_args(tmp_path, tiny_hf_dir, finished_run, "--overwrite",
                                    "--config.data.train_file=/no/such.tsv"))
    assert code == 2 and "/no/such.tsv" in capsys.readouterr().err
    assert tree_fingerprint(finished_run) == before
    assert not list(tmp_path.glob("run.old-*"))


def test_a_failed_start_leaves_no_empty_workdir_and_an_existing_one_untouched(
        tmp_path, tiny_hf_dir, capsys):
    new = tmp_path / "new" / "run"
    code = cli.main(_fine_tune_args(tmp_path, tiny_hf_dir, new,
                                    "--config.data.train_file=/no/such.tsv"))
    assert code == 2 and "/no/such.tsv" in _one_error_line(capsys)
    assert not new.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    before = tree_fingerprint(existing)
    code = cli.main(_fine_tune_args(tmp_path, tiny_hf_dir, existing,
                                    "--config.model.name=/no/such/model"))
    assert code == 2 and "/no/such/model" in _one_error_line(capsys)
    assert tree_fingerprint(existing) == before


def test_differing_keys_skip_harmless_ones():
    import json

    from kdjax import config as config_lib
    config = config_lib.load_config(str(REPO_ROOT / "configs" / "finetune.py"))
    recorded = json.loads(json.dumps(config_lib.to_dict(config)))  # As config.json holds it.
    config_lib.apply_overrides(config, ["train.log_every=7", "train.checkpoint_every=3",
                                        "train.stop_after_steps=5", "optim.weight_decay=0.5"])
    assert workdir_lib.differing_keys(recorded, config) == ["optim.weight_decay"]
    # A key one side lacks (another kdjax version) is not compared.
    del recorded["train"]["grad_accum_steps"]
    recorded["train"]["retired_key"] = 1
    assert workdir_lib.differing_keys(recorded, config) == ["optim.weight_decay"]


def test_another_recipe_is_named_by_its_method_and_stages():
    from kdjax import config as config_lib
    kd = config_lib.load_config(str(REPO_ROOT / "configs" / "kd.py"))
    tinybert = config_lib.load_config(str(REPO_ROOT / "configs" / "tinybert.py"))
    differ = workdir_lib.differing_keys(config_lib.to_dict(tinybert), kd)
    assert "stages" in differ, differ


def test_a_workdir_that_is_a_file_is_refused(tmp_path, tiny_hf_dir, capsys):
    path = tmp_path / "run"
    path.write_text("not a directory")
    code = cli.main(_fine_tune_args(tmp_path, tiny_hf_dir, path))
    assert code == 2 and "is a file, not a directory" in _one_error_line(capsys)
    assert path.read_text() == "not a directory"
