"""The `kdjax` command end to end: fine-tune, eval, export, errors; and one real SST-2 run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from conftest import REPO_ROOT, write_toy_task
from kdjax import cli


def _toy_args(tmp_path, tiny_hf_dir):
    train, dev = write_toy_task(tmp_path / "data")
    return [f"--config.model.name={tiny_hf_dir}", "--config.data.task=toy",
            f"--config.data.train_file={train}", f"--config.data.dev_file={dev}",
            "--config.data.max_length=16", "--config.data.batch_size=16",
            "--config.data.eval_batch_size=16", "--config.train.num_devices=1"]


def test_fine_tune_eval_export(tmp_path, tiny_hf_dir, capsys):
    args = _toy_args(tmp_path, tiny_hf_dir)
    workdir = tmp_path / "run"
    assert cli.main(["fine-tune", "--config", "configs/finetune.py", "--workdir", str(workdir),
                     "--no-progress", "--config.train.max_steps=6", "--config.optim.lr=1e-3",
                     *args]) == 0
    fine_tune_dev = json.loads((workdir / "eval.json").read_text())

    capsys.readouterr()
    assert cli.main(["eval", "--model", str(workdir / "model"), *args]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == fine_tune_dev["accuracy"]
    assert evaluated["loss"] == pytest.approx(fine_tune_dev["loss"], abs=1e-5)

    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "exp")]) == 0
    exported = load_file(str(tmp_path / "exp" / "model.safetensors"))
    final = load_file(str(workdir / "model" / "model.safetensors"))
    assert exported.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(exported[k], final[k])
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "exp") is not None


@pytest.mark.parametrize("extra, message", [
    (["--config.optim.lr=-1"], "config key 'optim.lr' must be > 0"),
    (["--config.data.train_file=/no/such.tsv"], "/no/such.tsv"),
    (["--config.model.name=/no/such/model"], "/no/such/model"),
])
def test_errors_are_one_clear_line(tmp_path, tiny_hf_dir, capsys, extra, message):
    args = _toy_args(tmp_path, tiny_hf_dir) + extra
    code = cli.main(["fine-tune", "--config", "configs/finetune.py", "--workdir",
                     str(tmp_path / "run"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model").exists()


def test_bin_entry_point_runs_without_install():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bin" / "kdjax"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("fine-tune", "eval", "export"):
        assert command in out


@pytest.mark.slow
def test_real_sst2_minilm_smoke_run(tmp_path, minilm_dir, sst2_dir):
    """The default config (packaged MiniLM, ../shared SST-2) for a short real run, as a user
    would launch it."""
    workdir = tmp_path / "sst2"
    subprocess.run(
        [sys.executable, "-m", "kdjax.cli", "fine-tune", "--config", "configs/finetune.py:quick",
         "--workdir", str(workdir), "--no-progress", "--config.data.train_limit=1280",
         "--config.data.dev_limit=256"],
        cwd=REPO_ROOT, check=True, timeout=900)
    result = json.loads((workdir / "eval.json").read_text())
    assert result["examples"] == 256 and result["steps"] == 40
    # 40 steps from a sentence encoder already beat the majority class on SST-2 dev.
    assert result["accuracy"] > 0.6, result
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [l["loss"] for l in lines if l["split"] == "train"]
    assert train_losses[-1] < train_losses[0], train_losses
    ref = transformers.BertForSequenceClassification.from_pretrained(workdir / "model")
    assert ref.config.id2label == {0: "negative", 1: "positive"}  # data.GLUE_LABEL_NAMES
