"""`kdjax report` on tiny toy-task runs: what the runs leave behind (dev logits, CKA), the
table against independently computed values, every figure a readable PNG, the self-contained
HTML page, and the refusal of runs of different tasks."""

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest

from conftest import REPO_ROOT, write_toy_task
from kdjax import cli, config as config_lib, distill, methods, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _config(data_dir, teacher, *overrides):
    train_file, dev_file = write_toy_task(data_dir)
    config = config_lib.load_config(str(REPO_ROOT / "configs" / "kd.py"))
    return methods.validate(config_lib.apply_overrides(config, [
        f"teacher.name={teacher}", "teacher.epochs=4", "teacher.optim.lr=1e-2",
        "data.task=toy", f"data.train_file={train_file}", f"data.dev_file={dev_file}",
        "data.max_length=16", "data.batch_size=16", "data.eval_batch_size=16",
        "optim.lr=1e-2", "train.log_every=2", "train.num_devices=1", "student.layers=1",
        "train.max_steps=6", "data.holdout_fraction=0.25", "train.holdout_every=2",
        # One padded length: one compilation per step kind keeps the module fast.
        "data.buckets=(16,)",
        *overrides]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hf_dir):
    """Two seeds of a tiny kd distillation (the second reuses the first's fine-tuned teacher),
    and that teacher's own fine-tuning run: built once for the module."""
    root = tmp_path_factory.mktemp("report_runs")
    first = root / "kd-seed0"
    # The first run shows its progress; what it prints is kept for the progress test.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        distill.distill(_config(root / "data", tiny_hf_dir), first, progress=True,
                        measure_throughput=True)
    second = root / "kd-seed1"
    distill.distill(_config(root / "data", first / "teacher-seed0" / "model", "train.seed=1"),
                    second, progress=False, measure_throughput=True)
    return {"root": root, "seeds": [first, second], "teacher": first / "teacher-seed0",
            "stdout": out.getvalue(), "stderr": err.getvalue()}


def test_long_steps_show_progress_and_the_teacher_metric_comes_before_distillation(runs):
    stdout, stderr = runs["stdout"], runs["stderr"]
    teacher = json.loads((runs["teacher"] / "eval.json").read_text())
    line = f"teacher teacher-seed0: dev accuracy {teacher['accuracy']:.4f} (40 examples)"
    assert line in stdout
    assert stdout.index(line) < stdout.index("stage distill:")
    # The teacher-output cache build has its own bar, as the training loop does.
    assert "teacher outputs for stage distill" in stderr and "batch" in stderr


def test_runs_save_dev_logits_and_layer_cka(runs):
    first = runs["seeds"][0]
    result = json.loads((first / "eval.json").read_text())
    with np.load(first / "dev_logits.npz") as saved:
        labels, student, teacher = saved["labels"], saved["student"], saved["teacher"]
    assert student.shape == teacher.shape == (40, 2) and labels.shape == (40,)
    # The saved logits are the ones eval.json's figures came from.
    assert np.mean(student.argmax(-1) == labels) == pytest.approx(result["accuracy"])
    assert np.mean(teacher.argmax(-1) == labels) == pytest.approx(result["teacher_accuracy"])
    assert np.mean(student.argmax(-1) == teacher.argmax(-1)) == \
        pytest.approx(result["teacher_agreement"])
    # CKA: student (1 layer + embeddings) x teacher (2 layers + embeddings), in [0, 1].
    for key in ("cls", "mean"):
        matrix = np.array(result["layer_cka"][key], dtype=float)  # null -> NaN
        defined = matrix[~np.isnan(matrix)]
        assert matrix.shape == (2, 3) and np.all((defined >= -1e-9) & (defined <= 1 + 1e-9))
    # Recomputed here from the saved models, on all of dev in one padded batch (the run used
    # length buckets), with the Gram-matrix form of CKA.
    import transformers
    from kdjax import data, hf
    teacher_dir = runs["teacher"] / "model"
    encoded = data.encode(data.load_task("toy", dev_file=str(json.loads(
        (first / "config.json").read_text())["data"]["dev_file"]), splits=("dev",)).splits["dev"],
        transformers.AutoTokenizer.from_pretrained(teacher_dir), 16)
    mask = (np.arange(16)[None] < encoded.lengths[:, None]).astype(np.int32)

    def pooled(model_dir):
        model, _, _ = hf.load_pretrained(str(model_dir))
        hidden = model(encoded.input_ids, mask, encoded.token_type_ids,
                       output_hidden_states=True).hidden_states
        return ([np.asarray(h[:, 0], np.float64) for h in hidden],
                [(np.asarray(h, np.float64) * mask[..., None]).sum(1) / mask.sum(1)[:, None]
                 for h in hidden])

    (student_cls, student_mean), (teacher_cls, teacher_mean) = (pooled(first / "model"),
                                                                pooled(teacher_dir))
    for key, s_layers, t_layers in (("cls", student_cls, teacher_cls),
                                    ("mean", student_mean, teacher_mean)):
        expected = np.array([[_gram_cka(s, t) for t in t_layers] for s in s_layers])
        # Undefined (null) exactly where one side is the same for every example: the
        # embeddings' [CLS] vector. Elsewhere the values match.
        constant = lambda f: np.ptp(f, axis=0).max() <= 1e-5 * np.abs(f).max()
        undefined = np.array([[constant(s) or constant(t) for t in t_layers]
                              for s in s_layers])
        saved = np.array(result["layer_cka"][key], dtype=object)
        assert np.array_equal(saved == None, undefined), key  # noqa: E711
        assert undefined.sum() < undefined.size  # Some entries are defined.
        np.testing.assert_allclose(saved[~undefined].astype(float), expected[~undefined],
                                   atol=1e-4)
    # A fine-tuning run saves its own dev logits (no teacher).
    with np.load(runs["teacher"] / "dev_logits.npz") as saved:
        assert set(saved.files) == {"labels", "student"}


def _gram_cka(x, y):
    """Linear CKA through centred Gram matrices (HSIC form)."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def _reference_ece(logits, labels, bins=15):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    conf, correct = probs.max(-1), probs.argmax(-1) == labels
    total = 0.0
    for b in range(bins):
        members = (conf > b / bins) & (conf <= (b + 1) / bins)
        if members.any():
            total += members.mean() * abs(correct[members].mean() - conf[members].mean())
    return total


def _reference_kl(teacher, student):
    def log_softmax(x):
        x = x.astype(np.float64)
        return x - x.max(-1, keepdims=True) - np.log(
            np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    p, log_p, log_q = np.exp(log_softmax(teacher)), log_softmax(teacher), log_softmax(student)
    return float(np.mean((p * (log_p - log_q)).sum(-1)))


def _cell(text):
    """'0.8125 ± 0.0125' -> (0.8125, 0.0125); '0.8125' -> (0.8125, None)."""
    mean, _, std = text.partition(" ± ")
    return float(mean.replace(",", "")), (float(std.replace(",", "")) if std else None)


def test_table_values_equal_independently_computed_ones(runs):
    loaded = report.load_runs(runs["seeds"] + [runs["teacher"]])
    header, rows = report.results_table(loaded)
    assert header[:6] == ["recipe", "setting", "runs", "student", "params", "accuracy"]
    # Toy task: one text column, two classes -> accuracy only (no F1, macro-F1, MCC).
    assert "F1" not in header and "MCC" not in header and "macro-F1" not in header
    kd = next(row for row in rows if row[0] == "kd")
    finetune = next(row for row in rows if row[0] == "fine-tune")
    assert kd[2] == "2" and finetune[2] == "1"
    column = dict(zip(header, kd))
    evals = [json.loads((d / "eval.json").read_text()) for d in runs["seeds"]]
    npz = [np.load(d / "dev_logits.npz") for d in runs["seeds"]]

    def mean_std(values):
        return float(np.mean(values)), float(np.std(values, ddof=1))

    expected = {
        "accuracy": mean_std([np.mean(z["student"].argmax(-1) == z["labels"]) for z in npz]),
        "agreement": mean_std([np.mean(z["student"].argmax(-1) == z["teacher"].argmax(-1))
                               for z in npz]),
        "KL(T‖S)": mean_std([_reference_kl(z["teacher"], z["student"]) for z in npz]),
        "ECE student": mean_std([_reference_ece(z["student"], z["labels"]) for z in npz]),
        "ECE teacher": mean_std([_reference_ece(z["teacher"], z["labels"]) for z in npz]),
        "teacher accuracy": mean_std([e["teacher_accuracy"] for e in evals]),
    }
    for name, (mean, std) in expected.items():
        shown_mean, shown_std = _cell(column[name])
        assert shown_mean == pytest.approx(mean, abs=6e-5), name  # 4 decimals shown
        assert shown_std == pytest.approx(std, abs=6e-5), name
    assert column["student"] == f"1 × {evals[0]['student_hidden']}"
    assert _cell(column["train s"])[0] == pytest.approx(
        np.mean([e["train_seconds"] for e in evals]), abs=0.051)
    assert _cell(column["student ex/s"])[0] == pytest.approx(
        np.mean([e["student_examples_per_s"] for e in evals]), abs=0.51)
    # The fine-tuning row: its parameters counted from the safetensors header.
    import safetensors.numpy
    tensors = safetensors.numpy.load_file(runs["teacher"] / "model" / "model.safetensors")
    assert dict(zip(header, finetune))["params"] == \
        f"{sum(t.size for t in tensors.values()) / 1e6:.1f} M"


def _is_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    import matplotlib.image
    assert matplotlib.image.imread(path).ndim == 3


def test_report_writes_every_figure_and_a_self_contained_page(runs, tmp_path):
    # A copy of the first run whose log also holds discriminator accuracies, as an adversarial
    # (KDABert) stage logs them, to check that figure without the cost of a third run.
    adversarial = runs["root"] / "adversarial-copy"
    if not adversarial.exists():
        shutil.copytree(runs["seeds"][0], adversarial)
        log = adversarial / "metrics.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        for record in records:
            if record["split"] == "distill":
                record.update(d_real_accuracy=0.5 + record["step"] / 20, d_fake_accuracy=0.6)
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report"
    code = cli.main(["report", str(runs["root"]), "--out", str(out), "--html"])
    assert code == 0
    markdown = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    expected = {"accuracy_vs_speed.png", "evaluations.png"}
    for run in ("kd-seed0", "kd-seed1", "adversarial-copy"):
        expected |= {f"{run}-curves.png", f"{run}-reliability.png", f"{run}-cka.png"}
    expected |= {"adversarial-copy-discriminator.png"}
    # The results folder's runs: the two seeds and the copy; the teacher runs nested in them
    # are not separate runs of the report.
    assert expected <= set(figures), expected - set(figures)
    assert "kd-seed0-discriminator.png" not in figures
    for name in figures:
        _is_png(out / name)
    page = (out / "report.html").read_text()
    assert not re.search(r"(src|href)\s*=\s*\"(https?:)?//", page)
    assert "http://" not in page and "https://" not in page
    assert page.count("src=\"data:image/png;base64,") == len(figures)
    # The table's rows are in both documents.
    assert "| kd | half_depth |" in markdown and "<td>kd</td>" in page


def test_training_curves_use_one_step_axis_and_keep_one_record_per_step(runs, tmp_path):
    run = report.load_run(runs["seeds"][0])
    steps = [r["step"] for r in run.log if r["split"] == "distill"]
    assert steps == sorted(set(steps))  # No duplicates, in order.
    held_out, dev = report.evaluation_points(run)
    assert [s for s, _ in held_out] == [2, 4, 6]
    assert dev == (6, run.result["accuracy"])


def test_runs_of_different_tasks_are_refused(runs, tmp_path, capsys):
    other = tmp_path / "other-task"
    shutil.copytree(runs["teacher"], other, ignore=shutil.ignore_patterns("checkpoints", "best",
                                                                           "model"))
    config = json.loads((other / "config.json").read_text())
    config["data"]["task"] = "cola"
    config["data"]["dev_file"] = ""
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(report.ReportError, match="different tasks"):
        report.load_runs([runs["seeds"][0], other])
    code = cli.main(["report", str(runs["seeds"][0]), str(other), "--out",
                     str(tmp_path / "refused")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "toy" in err and "cola" in err and "kd-seed0" in err and "other-task" in err
    assert not (tmp_path / "refused").exists()


def test_a_directory_without_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "no finished kdjax run" in capsys.readouterr().err


def test_metric_columns_follow_the_task():
    def fake(task, labels, columns=()):
        return report.Run(directory=None, label=task, log=[], logits=None,
                          config={"data": {"task": task, "text_columns": list(columns)}},
                          result={}, label_names=[str(i) for i in range(labels)])

    assert report.task_metric_columns(fake("sst2", 2)) == ["accuracy"]
    assert report.task_metric_columns(fake("mrpc", 2)) == ["accuracy", "f1"]
    assert report.task_metric_columns(fake("rte", 2)) == ["accuracy", "f1"]
    assert report.task_metric_columns(fake("cola", 2)) == ["accuracy", "mcc"]
    assert report.task_metric_columns(fake("mnli", 3)) == ["accuracy", "macro_f1"]
    assert report.task_metric_columns(fake("mine", 2, ("a", "b"))) == ["accuracy", "f1"]


def test_runs_that_differ_beyond_the_seed_are_separate_rows_named_by_the_difference(runs,
                                                                                   tmp_path):
    # A copy of the first seed as if it had trained twice as long (as baseline@x3 does).
    longer = tmp_path / "kd-longer"
    shutil.copytree(runs["seeds"][0], longer, ignore=shutil.ignore_patterns(
        "stages", "cache", "teacher-seed0"))
    config = json.loads((longer / "config.json").read_text())
    config["train"]["max_steps"] = 12
    (longer / "config.json").write_text(json.dumps(config))
    header, rows = report.results_table(report.load_runs(runs["seeds"] + [longer]))
    assert header[:4] == ["recipe", "setting", "variant", "runs"]
    assert [row[:4] for row in rows] == [["kd", "half_depth", "train.max_steps=6", "2"],
                                         ["kd", "half_depth", "train.max_steps=12", "1"]]
    # Seeds alone: no variant column.
    header, rows = report.results_table(report.load_runs(runs["seeds"]))
    assert "variant" not in header and len(rows) == 1


def test_runs_of_the_same_name_in_two_folders_are_told_apart(runs, tmp_path):
    for folder in ("half_depth", "tenth_size"):
        shutil.copytree(runs["seeds"][0], tmp_path / folder / "kd-seed0",
                        ignore=shutil.ignore_patterns("stages", "cache", "teacher-seed0"))
    loaded = report.load_runs([tmp_path])  # A results folder: its runs are found under it.
    assert [r.label for r in loaded] == ["half_depth/kd-seed0", "tenth_size/kd-seed0"]
