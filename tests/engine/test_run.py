"""The staged run end to end on the toy task: teacher fine-tuning, student export, TinyBERT's
three stages, a multi-teacher ensemble."""

import json

import pytest

from conftest import REPO_ROOT, write_toy_task
from kdjax import config as config_lib, distill, hf, methods, train



def _toy_distill_config(tmp_path, tiny_hf_dir, recipe, *overrides):
    train_file, dev_file = write_toy_task(tmp_path / "data")
    config = config_lib.load_config(str(REPO_ROOT / "configs" / f"{recipe}.py"))
    return methods.validate(config_lib.apply_overrides(config, [
        f"teacher.name={tiny_hf_dir}", "teacher.epochs=8", "teacher.optim.lr=1e-2",
        "data.task=toy", f"data.train_file={train_file}", f"data.dev_file={dev_file}",
        "data.max_length=16", "data.batch_size=16", "data.eval_batch_size=16",
        "optim.lr=1e-2", "train.log_every=2", "train.num_devices=2", *overrides]))


def test_distill_end_to_end_fine_tunes_the_teacher_then_saves_a_student(tmp_path, tiny_hf_dir):
    config = _toy_distill_config(tmp_path, tiny_hf_dir, "kd", "student.layers=1",
                                 "distill.epochs=8")
    result = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    assert (tmp_path / "run" / "teacher-seed0" / "model" / "model.safetensors").is_file()
    assert result["teacher_accuracy"] > 0.8  # The toy task is learnable.
    assert result["accuracy"] > 0.7 and result["student_layers"] == 1
    # The headline metric of a non-GLUE task is accuracy; mcc is reported beside it.
    assert result["metric"] == "accuracy" and result["dev_metric"] == result["accuracy"]
    assert result["teacher_dev_metric"] == result["teacher_metrics"]["accuracy"]
    assert -1.0 <= result["mcc"] <= 1.0 and "mcc" in result["teacher_metrics"]
    # The exported student is a plain HF classifier that reproduces the reported accuracy.
    saved = train.evaluate_saved_model(tmp_path / "run" / "model", config_lib.apply_overrides(
        config_lib.load_config(str(REPO_ROOT / "configs" / "finetune.py")),
        ["data.task=toy", f"data.train_file={config.data.train_file}",
         f"data.dev_file={config.data.dev_file}", "data.max_length=16",
         "data.eval_batch_size=16", "train.num_devices=1"]))
    assert saved["accuracy"] == pytest.approx(result["accuracy"])
    model, report, _ = hf.load_pretrained(str(tmp_path / "run" / "model"))
    assert model.config.num_hidden_layers == 1 and not report.newly_initialized
    # Run again: teacher and stage are reused, nothing retrains, same answer.
    again = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    assert again["accuracy"] == result["accuracy"]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["accuracy"] == \
        result["accuracy"]


def test_tinybert_runs_its_three_stages_with_a_narrow_student(tmp_path, tiny_hf_dir):
    config = _toy_distill_config(tmp_path, tiny_hf_dir, "tinybert", "student.layers=1",
                                 "student.hidden=16", "student.heads=4", "student.init=random",
                                 "train.max_steps=3", "data.holdout_fraction=0.25",
                                 "train.holdout_every=1")
    result = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    assert list(result["stages"]) == ["general", "intermediate", "prediction"]
    assert all(s["steps"] == 3 for s in result["stages"].values())
    # The held-out slice (24 of the 96 toy rows) chooses the exported student in the last
    # stage only, and the teacher's fine-tuning is scored on the same slice.
    assert result["holdout_examples"] == 24
    assert result["stages"]["prediction"]["selected_step"] in (1, 2, 3)
    assert "selected_step" not in result["stages"]["general"]
    teacher = json.loads((tmp_path / "run" / "teacher-seed0" / "eval.json").read_text())
    assert teacher["holdout_examples"] == 24 and teacher["selected_step"] >= 1
    # Its budget in passes over the 72 rows left for training (a results table reports it).
    batches = -(-72 // config.data.batch_size)
    assert teacher["epochs"] == pytest.approx(teacher["steps"] / batches)
    logged = [json.loads(line)["split"] for line in
              (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"general", "intermediate", "prediction", "dev"} <= set(logged)


def test_kd_ensemble_fine_tunes_one_teacher_per_seed_and_reports_each(tmp_path, tiny_hf_dir):
    config = _toy_distill_config(tmp_path, tiny_hf_dir, "kd_ensemble", "teacher.seeds=(0,1)",
                                 "student.layers=1", "train.max_steps=4")
    result = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    # Each member's accuracy, measured independently from its saved directory.
    eval_config = config_lib.apply_overrides(
        config_lib.load_config(str(REPO_ROOT / "configs" / "finetune.py")),
        ["data.task=toy", f"data.train_file={config.data.train_file}",
         f"data.dev_file={config.data.dev_file}", "data.max_length=16",
         "data.eval_batch_size=16", "train.num_devices=1"])
    each = [train.evaluate_saved_model(tmp_path / "run" / f"teacher-seed{seed}" / "model",
                                       eval_config)["accuracy"] for seed in (0, 1)]
    assert result["teacher_accuracies"] == pytest.approx(each)
    assert result["best_single_teacher_accuracy"] == pytest.approx(max(each))


def test_any_transformer_recipe_adds_the_augmented_set_to_its_task_stage(tmp_path, tiny_hf_dir,
                                                                        capsys):
    config = _toy_distill_config(tmp_path, tiny_hf_dir, "kd", "student.layers=1",
                                 "train.max_steps=2", "augment.method=tinybert",
                                 "augment.n_iter=2", "augment.max_examples=40")
    result = distill.distill(config, tmp_path / "run", progress=False, measure_throughput=False)
    added = result["augmented_examples"]
    assert 0 < added <= 40
    # The stage trains on the 96 labelled rows plus the augmented ones, labelled by the teacher
    # through the stage's teacher-output cache.
    assert f"stage distill: 2 steps over {96 + added} examples" in capsys.readouterr().out
    assert len(list((tmp_path / "run" / "cache").glob("augmented-*.npz"))) == 1
