"""Exports a user can ship: named classes, the export self-check, the StableHLO artifact."""

import json

import numpy as np
import pytest

from conftest import write_toy_task
from kdjax import cli, data


# ------------------------------------------------------------------------------------------------
# Class names


def test_class_names_come_from_the_task_table_only_for_integer_labels():
    assert data.class_names("sst2", ["0", "1"]) == ["negative", "positive"]
    assert data.class_names("SST-2", ["0", "1"]) == ["negative", "positive"]
    assert data.class_names("cola", ["0", "1"]) == ["unacceptable", "acceptable"]
    # The local GLUE TSVs of RTE/MNLI hold the names themselves, sorted: kept as they are.
    assert data.class_names("mnli", ["contradiction", "entailment", "neutral"]) == [
        "contradiction", "entailment", "neutral"]
    # Integers that are not exactly 0..n-1 cannot be indices into the table.
    assert data.class_names("sst2", ["1", "2"]) == ["1", "2"]
    assert data.class_names("mytask", ["0", "1"]) == ["0", "1"]


def test_configured_class_names_override_and_are_checked():
    assert data.class_names("sst2", ["0", "1"], ("bad", "good")) == ["bad", "good"]
    with pytest.raises(data.DataError, match=r"has 3 names .* for 2 labels"):
        data.class_names("sst2", ["0", "1"], ("a", "b", "c"))
    with pytest.raises(data.DataError, match="distinct"):
        data.class_names("sst2", ["0", "1"], ("a", "a"))


# ------------------------------------------------------------------------------------------------
# One tiny fine-tuning run on an SST-2-like task, shared by the export tests


@pytest.fixture(scope="module")
def sst2_like_run(tmp_path_factory, tiny_hf_dir):
    """A 2-step fine-tune of the tiny model on toy files named as the task "sst2" (integer
    labels 0/1), so the exports must carry SST-2's class names."""
    root = tmp_path_factory.mktemp("sst2_like")
    train, dev = write_toy_task(root / "data", n_train=32, n_dev=8)
    args = [f"--config.model.name={tiny_hf_dir}", "--config.data.task=sst2",
            f"--config.data.train_file={train}", f"--config.data.dev_file={dev}",
            "--config.data.max_length=16", "--config.data.batch_size=16",
            "--config.data.eval_batch_size=16", "--config.train.num_devices=1"]
    workdir = root / "run"
    assert cli.main(["fine-tune", "--config", "configs/finetune.py", "--workdir", str(workdir),
                     "--no-progress", "--config.train.max_steps=2", *args]) == 0
    return workdir, args, dev


def test_fine_tuned_model_answers_with_class_names_in_a_pipeline(sst2_like_run):
    import transformers

    workdir, _, _ = sst2_like_run
    config = json.loads((workdir / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    # The run's own label map keeps the values the files hold.
    assert json.loads((workdir / "labels.json").read_text()) == ["0", "1"]
    classify = transformers.pipeline("text-classification", model=str(workdir / "model"),
                                     device="cpu")
    answers = classify(["a wonderful film", "a dull boring film"])
    assert {a["label"] for a in answers} <= {"negative", "positive"}
