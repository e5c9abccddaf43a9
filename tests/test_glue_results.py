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
    # The target line compares the headline metric: kd's 30.00 against the control's 10.00.
    assert "tenth_size best recipe vs control: kd 30.00 % vs control 10.00 %" in text
