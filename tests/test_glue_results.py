"""The results-table driver (benchmarks/glue_results.py) on finished runs it did not train."""

import json

from benchmarks import glue_results


def _finished_run(run_dir, *, accuracy, mcc, holdout_mcc):
    run_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text(json.dumps({
        "accuracy": accuracy, "mcc": mcc, "metric": "mcc", "dev_metric": mcc,
        "teacher_accuracy": 0.81, "teacher_dev_metric": 0.52, "teacher_agreement": 0.9,
        "student_layers": 3, "student_hidden": 168, "student_params": 6_300_000,
        "student_non_embedding_params": 1_000_000, "teacher_non_embedding_params": 10_000_000,
        "train_seconds": 12.0,
        "stages": {"distill": {"steps": 100, "train_seconds": 12.0, "epochs": 0.37,
                               "selected_step": 80,
                               "holdout": {"accuracy": 0.7, "mcc": holdout_mcc}}}}))


def test_cola_table_reports_mcc_and_ranks_recipes_for_extra_seeds_on_the_held_out_slice(
        tmp_path):
    work = tmp_path / "runs"
    _finished_run(work / "tenth_size" / "baseline-seed0", accuracy=0.70, mcc=0.10,
                  holdout_mcc=0.12)
    # kd is better on dev, tinybert on the held-out slice.
    _finished_run(work / "tenth_size" / "kd-seed0", accuracy=0.72, mcc=0.30, holdout_mcc=0.20)
    _finished_run(work / "tenth_size" / "tinybert-seed0", accuracy=0.71, mcc=0.25,
                  holdout_mcc=0.28)
    _finished_run(work / "tenth_size" / "tinybert-seed1", accuracy=0.70, mcc=0.23,
                  holdout_mcc=0.27)
    out = tmp_path / "results" / "cola"
    glue_results.main(["--task", "cola", "--settings", "tenth_size",
                       "--recipes", "baseline,kd,tinybert", "--seeds", "2", "--only-finished",
                       "--teacher", str(tmp_path / "teacher"), "--workdir", str(work),
                       "--out", str(out), "--max-steps", "100"])
    rows = {r["recipe"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    assert set(rows) == {"baseline", "kd", "tinybert"}
    tiny = rows["tinybert"]
    assert tiny["metric"] == "mcc" and tiny["seeds"] == 2
    assert tiny["dev_metric_per_seed"] == [0.25, 0.23] and abs(tiny["dev_metric"] - 0.24) < 1e-12
    assert tiny["dev_accuracy_per_seed"] == [0.71, 0.70]
    assert tiny["teacher_dev_metric"] == 0.52 and tiny["epochs"] == 0.37
    assert tiny["budget"] == "capped at 100 steps per stage"
    # The recipe that gets the extra seeds is ranked on the held-out slice, never on dev.
    runs = {r: json.loads((work / "tenth_size" / f"{r}-seed0" / "eval.json").read_text())
            for r in ("kd", "tinybert")}
    assert max(runs, key=lambda r: glue_results._selection_score(runs[r])) == "tinybert"
    assert max(runs, key=lambda r: runs[r]["dev_metric"]) == "kd"
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# CoLA dev") and "| dev MCC |" in text
    # The target line compares the headline metric of the recipe the held-out slice ranks
    # first (tinybert, 24.00 on dev; kd is better on dev) against the control's 10.00.
    assert ("tenth_size best recipe on the held-out slice vs control (baseline, 100 steps): "
            "tinybert 24.00 % vs control 10.00 %") in text


def _row(recipe, steps, metric, setting="tenth_size"):
    return {"setting": setting, "recipe": recipe, "train_steps": steps, "dev_metric": metric}


def test_a_recipe_is_held_against_the_control_of_at_least_its_steps():
    rows = [_row("baseline", 300, 0.10), _row("baseline@x3", 900, 0.20),
            _row("baseline", 900, 0.9, setting="half_depth")]
    control = lambda steps: glue_results.control_for(rows, _row("kd", steps, 0.3))["recipe"]
    assert control(300) == "baseline"  # Equal steps: the control of its own length.
    assert control(600) == "baseline@x3"  # MiniLM's two stages: the longer control.
    assert control(900) == "baseline@x3"  # TinyBERT's three stages.
    assert control(1200) == "baseline@x3"  # Longer than every control: the longest.
    assert glue_results.control_for([_row("kd", 300, 0.3)], _row("kd", 300, 0.3)) is None
    # With held-out scores the control is trained to its own best among the budgets it may use:
    # the shorter run wins on the held-out slice, so a two-stage recipe meets it (dev is never
    # looked at: the longer control is better on dev here).
    rows[0]["holdout_metric"], rows[1]["holdout_metric"] = 0.15, 0.14
    assert control(600) == "baseline" and control(900) == "baseline"
    assert control(300) == "baseline"  # baseline@x3 is more budget than a 300-step recipe has.


def test_epochs_set_every_stage_and_a_longer_control_multiplies_them():
    tinybert = glue_results._config("tinybert", "tenth_size", [], epochs=3)
    assert [tinybert[s].epochs for s in tinybert.stages] == [3.0, 3.0, 3.0]
    # NewsBERT's joint run: the shared teacher's passes plus the student's; the teacher
    # fine-tuning overrides other rows take do not apply to it (and are not refused).
    news = glue_results._config("newsbert", "half_depth", ["teacher.epochs=10",
                                                             "teacher.patience=3"],
                                epochs=3, teacher_epochs=4.5)
    assert news.newsbert.epochs == 7.5 and "epochs" not in news.teacher
    longer = glue_results._config("baseline@x3", "tenth_size", [], epochs=3)
    assert [longer[s].epochs for s in longer.stages] == [9.0]
    assert longer.recipe == "baseline"
    assert glue_results._config("kd", "tenth_size", []).distill.epochs == 1.0  # The config's.
