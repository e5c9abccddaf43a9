"""`kdjax report`: one Markdown (and optionally HTML) report over a set of finished runs.

It reads only what runs leave behind (eval.json, config.json, labels.json, metrics.jsonl,
dev_logits.npz, model/config.json) and never reruns a model:
  - a results table, runs that share recipe, setting and student size grouped as seeds
    (mean ± sample standard deviation);
  - PNG figures made with matplotlib: training curves, discriminator accuracies (adversarial
    runs), held-out/dev metric per evaluation, reliability diagrams, per-layer CKA, accuracy
    against inference speed.
docs/report.md says what each column and figure is and how it is computed.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import pathlib
import re
from typing import Any

import numpy as np

from kdjax import data, metrics

# The calibration bins of every ECE and reliability diagram (Guo et al. 2017's choice).
CALIBRATION_BINS = 15

# metrics.jsonl keys that are bookkeeping, not curves.
_NOT_CURVES = {"step", "split", "time", "epoch", "examples_per_s", "count"}


class ReportError(ValueError):
    """Runs that cannot be reported together, or a directory that is not a finished run."""


@dataclasses.dataclass
class Run:
    """What one finished run directory holds, as the report reads it.

    Attributes:
      directory: the run directory.
      label: its name in the report (the directory name, made unique).
      config: config.json.
      result: eval.json.
      log: metrics.jsonl records, one per (split, step): a step logged twice (an interval
        rerun after a resume) keeps its last record.
      logits: dev_logits.npz ("labels", "student" and, for a distillation, "teacher"), or None
        for a run that predates it.
      label_names: labels.json.
    """

    directory: pathlib.Path
    label: str
    config: dict
    result: dict
    log: list[dict]
    logits: dict[str, np.ndarray] | None
    label_names: list[str]
    # run_values' result, computed once (it reads the safetensors header and all dev logits).
    _values: dict | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def is_distillation(self) -> bool:
        return "teacher_metrics" in self.result

    @property
    def task(self) -> str:
        return str(self.config.get("data", {}).get("task", "?"))

    @property
    def task_identity(self) -> tuple[str, str]:
        """Runs compare only on the same task and dev set (a custom task is its dev file)."""
        data_config = self.config.get("data", {})
        return self.task.lower().replace("-", ""), str(data_config.get("dev_file") or "")

    @property
    def recipe(self) -> str:
        return str(self.config.get("recipe") or ("fine-tune" if not self.is_distillation
                                                 else "?"))

    @property
    def setting(self) -> str:
        return str(self.config.get("setting") or "-")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair_task(self) -> bool:
        columns = self.config.get("data", {}).get("text_columns") or ()
        glue = data.GLUE_TASKS.get(self.task_identity[0])
        return len(columns) == 2 or (not columns and glue is not None and len(glue[0]) == 2)

    @property
    def metric(self) -> str:
        return self.result.get("metric") or data.task_metric(self.task)

    def student_size(self) -> tuple[int | None, int | None, int | None]:
        """(layers, hidden width, parameters) of the run's trained model."""
        if self.is_distillation:
            return (self.result.get("student_layers"), self.result.get("student_hidden"),
                    self.result.get("student_params"))
        model_config = self.directory / "model" / "config.json"
        layers = hidden = None
        if model_config.is_file():
            arch = json.loads(model_config.read_text())
            layers, hidden = arch.get("num_hidden_layers"), arch.get("hidden_size")
        return layers, hidden, _safetensors_params(self.directory / "model" / "model.safetensors")


def _safetensors_params(path: pathlib.Path) -> int | None:
    """Parameters of a safetensors file from its JSON header alone (no tensor is read)."""
    if not path.is_file():
        return None
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def read_log(path: pathlib.Path) -> list[dict]:
    """metrics.jsonl as records, the last one of each (split, step), in file order."""
    if not path.is_file():
        return []
    last: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            key = (record.get("split"), record.get("step"))
            last.pop(key, None)  # Re-inserted, so it sits where its last copy was written.
            last[key] = record
    return list(last.values())


def load_run(directory: str | pathlib.Path, label: str | None = None) -> Run:
    directory = pathlib.Path(directory)
    for name in ("eval.json", "config.json"):
        if not (directory / name).is_file():
            raise ReportError(f"{directory} is not a finished kdjax run: no {name}")
    result = json.loads((directory / "eval.json").read_text())
    if not result.get("finished", True):
        raise ReportError(f"{directory} has not finished (eval.json says finished: false)")
    labels_path = directory / "labels.json"
    label_names = json.loads(labels_path.read_text()) if labels_path.is_file() else []
    logits = None
    if (directory / metrics.DEV_LOGITS_FILE).is_file():
        with np.load(directory / metrics.DEV_LOGITS_FILE) as npz:
            logits = {k: npz[k] for k in npz.files}
    if not label_names and logits is not None:
        label_names = [str(i) for i in range(logits["student"].shape[1])]
    return Run(directory=directory, label=label or directory.name,
               config=json.loads((directory / "config.json").read_text()), result=result,
               log=read_log(directory / "metrics.jsonl"), logits=logits,
               label_names=label_names)


def find_run_directories(paths: list[str | pathlib.Path]) -> list[pathlib.Path]:
    """The run directories named, or found under a named folder (a results folder): a folder
    with an eval.json is a run, and the runs nested in it (its teachers) are not listed."""
    found = []
    for path in map(pathlib.Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path} is not a directory")
        if (path / "eval.json").is_file():
            found.append(path)
            continue
        runs = sorted(p.parent for p in path.rglob("eval.json"))
        outer = [r for r in runs if not any(o in r.parents for o in runs)]
        if not outer:
            raise ReportError(f"{path} holds no finished kdjax run (no eval.json under it)")
        found.extend(outer)
    return list(dict.fromkeys(found))


def load_runs(paths: list[str | pathlib.Path]) -> list[Run]:
    """The runs under `paths`, each labelled uniquely; refuses runs of different tasks."""
    directories = find_run_directories(paths)
    names = [d.name for d in directories]
    # A name found in two folders gets its parent's too (two settings' kd-seed0).
    labels = [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name
              for d in directories]
    runs = [load_run(d, label) for d, label in zip(directories, labels)]
    tasks: dict[tuple, list[str]] = {}
    for run in runs:
        tasks.setdefault(run.task_identity, []).append(run.label)
    if len(tasks) > 1:
        described = "; ".join(f"{task}{' (dev ' + dev + ')' if dev else ''}: {', '.join(names)}"
                              for (task, dev), names in tasks.items())
        raise ReportError(f"the runs are of different tasks and cannot share one table "
                          f"({described}); report each task separately")
    return runs


# ------------------------------------------------------------------------------------------------
# The table


def fidelity(run: Run) -> dict[str, float | None]:
    """Agreement, KL(teacher || student) and both ECEs from the run's dev logits (or, for a run
    without them, what its eval.json recorded)."""
    result, logits = run.result, run.logits
    if logits is None:
        return {"agreement": result.get("teacher_agreement"), "kl": result.get("teacher_kl"),
                "ece": result.get("ece"), "teacher_ece": result.get("teacher_ece")}
    labels, student = logits["labels"], logits["student"]
    teacher = logits.get("teacher")
    with_teacher = teacher is not None
    return {
        "agreement": metrics.prediction_agreement(student, teacher) if with_teacher else None,
        "kl": metrics.mean_kl_divergence(teacher, student) if with_teacher else None,
        "ece": metrics.expected_calibration_error(student, labels, CALIBRATION_BINS),
        "teacher_ece": (metrics.expected_calibration_error(teacher, labels, CALIBRATION_BINS)
                        if with_teacher else None),
    }


def task_metric_columns(run: Run) -> list[str]:
    """The task metrics a table shows: accuracy; F1 (of class 1) for a two-class pair task;
    macro-F1 for more than two classes; Matthews correlation for a CoLA-like task."""
    columns = ["accuracy"]
    if run.num_labels == 2 and run.is_pair_task:
        columns.append("f1")
    if run.num_labels > 2:
        columns.append("macro_f1")
    if run.metric == "mcc":
        columns.append("mcc")
    return columns


def run_values(run: Run) -> dict[str, float | None]:
    """Every numeric column of one run's row (computed once per run)."""
    if run._values is not None:
        return run._values
    result = run.result
    layers, hidden, params = run.student_size()
    values: dict[str, float | None] = {k: result.get(k) for k in
                                       ("accuracy", "f1", "macro_f1", "mcc")}
    values.update(fidelity(run))
    values.update(
        teacher_metric=result.get("teacher_dev_metric"), params=params,
        train_seconds=result.get("train_seconds"),
        examples_per_s=result.get("student_examples_per_s"),
        teacher_examples_per_s=result.get("teacher_examples_per_s"))
    values["layers"], values["hidden"] = layers, hidden
    run._values = values
    return values


# Config keys that do not make two runs different experiments: the seed (runs that differ
# only in it are seeds of one row), where the teacher and data files are (the task is checked
# separately; a seed's teacher may be its own fine-tune), and bookkeeping.
NOT_A_VARIANT = frozenset({
    "train.seed", "teacher.name", "teacher.extra", "teacher.cache_dir", "data.train_file",
    "data.dev_file", "train.num_devices", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.stop_after_steps", "train.tensorboard"})


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def experiment_config(run: Run) -> dict[str, str]:
    """The run's config as dotted keys -> JSON values, without the `NOT_A_VARIANT` keys."""
    return {k: json.dumps(v) for k, v in _flatten(run.config).items() if k not in NOT_A_VARIANT}


@dataclasses.dataclass
class Group:
    """Runs whose configs differ only in the seed (and `NOT_A_VARIANT`): one table row.

    Attributes:
      variant: what sets this group apart from others of the same recipe and setting (the
        config keys whose values differ, `key=value, ...`), or "".
    """

    recipe: str
    setting: str
    runs: list[Run]
    variant: str = ""

    @property
    def size(self) -> tuple[int | None, int | None, int | None]:
        return self.runs[0].student_size()

    def values(self, key: str) -> list[float]:
        return [v for v in (run_values(r)[key] for r in self.runs) if v is not None]

    def mean_std(self, key: str) -> tuple[float, float | None] | None:
        """Mean and sample standard deviation (ddof 1; None for one run), or None if no run
        has the value."""
        values = self.values(key)
        if not values:
            return None
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        return float(np.mean(values)), std


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped as seeds of one experiment, in the order first seen; groups of the same
    recipe and setting that differ elsewhere (a longer budget, another student size, another
    loss weight) get their differing keys as `variant`."""
    groups: dict[tuple, Group] = {}
    configs: dict[tuple, dict] = {}
    for run in runs:
        config = experiment_config(run)
        key = (run.recipe, run.setting, tuple(sorted(config.items())))
        groups.setdefault(key, Group(run.recipe, run.setting, runs=[])).runs.append(run)
        configs[key] = config
    for key, group in groups.items():
        siblings = [configs[k] for k in groups if k[:2] == key[:2]]
        if len(siblings) > 1:
            names = set().union(*siblings)
            differing = sorted(n for n in names if len({s.get(n) for s in siblings}) > 1)
            group.variant = ", ".join(f"{n}={configs[key].get(n, '-')}" for n in differing)
    return list(groups.values())


_METRIC_TITLES = {"accuracy": "accuracy", "f1": "F1", "macro_f1": "macro-F1", "mcc": "MCC"}


def _format(value: tuple[float, float | None] | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _format_count(value: tuple[float, float | None] | None) -> str:
    """Thousands separated, one decimal below 100 (a tiny run's seconds)."""
    if value is None:
        return "-"
    mean, std = value
    digits = 1 if abs(mean) < 100 else 0
    if std is None:
        return f"{mean:,.{digits}f}"
    return f"{mean:,.{digits}f} ± {std:,.{digits}f}"


def results_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the results table: one row per group of seeds."""
    metric_columns = task_metric_columns(runs[0])
    groups = group_runs(runs)
    with_variants = any(g.variant for g in groups)
    header = (["recipe", "setting"] + (["variant"] if with_variants else [])
              + ["runs", "student", "params"]
              + [_METRIC_TITLES[c] for c in metric_columns]
              + [f"teacher {_METRIC_TITLES.get(runs[0].metric, runs[0].metric)}",
                 "agreement", "KL(T‖S)", "ECE student", "ECE teacher", "train s",
                 "student ex/s", "teacher ex/s"])
    rows = []
    for group in groups:
        layers, hidden, _ = group.size
        size = f"{layers} × {hidden}" if layers is not None else "-"
        params = group.mean_std("params")
        rows.append(
            [group.recipe, group.setting] + ([group.variant] if with_variants else [])
            + [str(len(group.runs)), size,
             f"{params[0] / 1e6:.1f} M" if params else "-"]
            + [_format(group.mean_std(c)) for c in metric_columns]
            + [_format(group.mean_std("teacher_metric")), _format(group.mean_std("agreement")),
               _format(group.mean_std("kl")), _format(group.mean_std("ece")),
               _format(group.mean_std("teacher_ece")),
               _format_count(group.mean_std("train_seconds")),
               _format_count(group.mean_std("examples_per_s")),
               _format_count(group.mean_std("teacher_examples_per_s"))])
    return header, rows


# ------------------------------------------------------------------------------------------------
# Figures (matplotlib's object-oriented API on a bare Figure: no pyplot state, no GUI backend)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path: pathlib.Path) -> pathlib.Path:
    figure.savefig(path, format="png", dpi=100)
    return path


def _is_training_split(split: str) -> bool:
    return split != "dev" and not split.endswith("/holdout")


def stage_offsets(run: Run) -> dict[str, int]:
    """Where each training split (stage) starts on the run's one step axis: a stage's steps
    count from 0, so later stages are shifted by the steps of those before them."""
    order = list(run.result.get("stages") or {})
    for record in run.log:
        split = record["split"]
        if _is_training_split(split) and split not in order:
            order.append(split)
    offsets, total = {}, 0
    for split in order:
        offsets[split] = total
        steps = (run.result.get("stages") or {}).get(split, {}).get("steps")
        if steps is None:
            steps = max((r["step"] for r in run.log if r["split"] == split), default=0)
        total += steps
    return offsets


def _curves(run: Run, keep) -> dict[str, dict[str, tuple[list, list]]]:
    """{metric key: {stage: (steps on the run's axis, values)}} of the training records."""
    offsets = stage_offsets(run)
    curves: dict[str, dict[str, tuple[list, list]]] = {}
    for record in run.log:
        split = record["split"]
        if not _is_training_split(split):
            continue
        for key, value in record.items():
            if key in _NOT_CURVES or not keep(key) or not isinstance(value, (int, float)):
                continue
            xs, ys = curves.setdefault(key, {}).setdefault(split, ([], []))
            xs.append(record["step"] + offsets.get(split, 0))
            ys.append(value)
    return curves


def _is_discriminator_accuracy(key: str) -> bool:
    return key.startswith("d_") and "accuracy" in key


def _plot_grid(curves: dict, title: str, path: pathlib.Path, boundaries: list[int]):
    keys = sorted(curves, key=lambda k: (k not in ("loss", "lr"), k))
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure = _figure(4.2 * columns, 2.8 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for stage, (xs, ys) in curves[key].items():
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=stage)
        for boundary in boundaries:
            ax.axvline(boundary, color="0.6", linestyle=":", linewidth=1)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    if any(len(c) > 1 for c in curves.values()):
        axes[0].legend(fontsize=8)
    figure.suptitle(title)
    return _save(figure, path)


def plot_training_curves(run: Run, path: pathlib.Path) -> pathlib.Path | None:
    """Every logged training quantity (each loss term, loss, accuracy, learning rate, gradient
    norm, ...) against the run's step, one panel each, a line per stage."""
    curves = _curves(run, lambda k: not _is_discriminator_accuracy(k))
    if not curves:
        return None
    boundaries = [o for o in stage_offsets(run).values() if o > 0]
    return _plot_grid(curves, f"{run.label}: training curves (interval means)", path,
                      boundaries)


def plot_discriminator(run: Run, path: pathlib.Path) -> pathlib.Path | None:
    """The discriminators' accuracies of an adversarial run (teacher features called real,
    student features called fake); None for other runs."""
    curves = _curves(run, _is_discriminator_accuracy)
    if not curves:
        return None
    figure = _figure(6.5, 3.5)
    ax = figure.subplots()
    for key, stages in sorted(curves.items()):
        for stage, (xs, ys) in stages.items():
            ax.plot(xs, ys, label=key if len(stages) == 1 else f"{key} ({stage})")
    ax.axhline(0.5, color="0.5", linestyle="--", linewidth=1, label="chance")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"{run.label}: discriminator accuracies")
    return _save(figure, path)


def evaluation_points(run: Run) -> tuple[list[tuple[int, float]], tuple[int, float] | None]:
    """The run's held-out evaluations (step on the run's axis, headline metric) and its final
    dev evaluation (the step it ended at, headline metric), from metrics.jsonl and eval.json."""
    offsets, metric = stage_offsets(run), run.metric
    held_out = [(r["step"] + offsets.get(r["split"].removesuffix("/holdout"), 0), r[metric])
                for r in run.log if r["split"].endswith("/holdout") and metric in r]
    final_step = sum(s.get("steps", 0) for s in (run.result.get("stages") or {}).values())
    final_step = final_step or run.result.get("steps") or 0
    dev = run.result.get(metric)
    return sorted(held_out), ((final_step, dev) if dev is not None else None)


def plot_evaluations(runs: list[Run], path: pathlib.Path) -> pathlib.Path | None:
    """The task's headline metric at each held-out evaluation (a line per run) and on dev at the
    end (a star): dev is evaluated once, at the end, so that nothing is chosen on it."""
    figure = _figure(7, 4)
    ax = figure.subplots()
    drawn = False
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        held_out, dev = evaluation_points(run)
        if held_out:
            ax.plot(*zip(*held_out), marker="o", color=color, label=f"{run.label} held-out")
            drawn = True
        if dev is not None:
            ax.plot(*dev, marker="*", markersize=12, color=color, linestyle="none",
                    label=f"{run.label} dev (final)")
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(runs[0].metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("held-out metric per evaluation; dev at the end")
    return _save(figure, path)


def plot_reliability(run: Run, path: pathlib.Path) -> pathlib.Path | None:
    """Reliability diagram: accuracy against mean confidence in each of the 15 equal-width
    top-label confidence bins, teacher and student (the diagonal is perfect calibration), with
    the examples per bin below."""
    if run.logits is None:
        return None
    labels = run.logits["labels"]
    models = [("student", run.logits["student"])]
    if "teacher" in run.logits:
        models.insert(0, ("teacher", run.logits["teacher"]))
    figure = _figure(5.5, 6)
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="calibrated")
    width = 1 / CALIBRATION_BINS
    for index, (name, logits) in enumerate(models):
        bins = metrics.reliability_bins(logits, labels, CALIBRATION_BINS)
        ece = metrics.expected_calibration_error(logits, labels, CALIBRATION_BINS)
        filled = bins["count"] > 0
        top.plot(bins["confidence"][filled], bins["accuracy"][filled], marker="o",
                 label=f"{name} (ECE {ece:.4f})")
        offset = (index - (len(models) - 1) / 2) * width / len(models)
        bottom.bar(bins["edges"][:-1] + width / 2 + offset, bins["count"],
                   width=width / len(models), label=name)
    top.set_ylabel("accuracy in bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    top.set_title(f"{run.label}: reliability ({CALIBRATION_BINS} bins)")
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("examples")
    bottom.set_yscale("log")
    return _save(figure, path)


def plot_layer_cka(run: Run, path: pathlib.Path) -> pathlib.Path | None:
    """Heatmaps of linear CKA between every student and teacher hidden state on dev, for the
    [CLS] vector and the mean over tokens (row/column 0: the embeddings)."""
    cka = run.result.get("layer_cka")
    if not cka:
        return None
    figure = _figure(10, 3.8)
    axes = figure.subplots(1, 2)
    for ax, (key, title) in zip(axes, (("cls", "[CLS]"), ("mean", "mean-pooled"))):
        # null (undefined, a constant representation) -> NaN, drawn blank and labelled "n/a".
        matrix = np.array([[np.nan if v is None else v for v in row] for row in cka[key]],
                          np.float64)
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                          origin="lower")
        if matrix.size <= 200:
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center",
                        va="center", fontsize=7,
                        color="black" if np.isnan(value) or value >= 0.6 else "white")
        ax.set_xlabel("teacher layer (0 = embeddings)")
        ax.set_ylabel("student layer (0 = embeddings)")
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]))
        ax.set_title(f"linear CKA, {title}")
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.suptitle(f"{run.label}: student-teacher similarity on {cka.get('examples', '?')} "
                    "dev examples")
    return _save(figure, path)


def plot_accuracy_vs_speed(runs: list[Run], path: pathlib.Path) -> pathlib.Path | None:
    """Each group's headline dev metric (mean, ± std as a bar) against its student's inference
    examples/s, and the teacher's, on a log speed axis: the trade-off to choose from."""
    points = []
    for group in group_runs(runs):
        metric, speed = group.mean_std(runs[0].metric), group.mean_std("examples_per_s")
        if metric is not None and speed is not None:
            name = f"{group.recipe} {group.setting}" + (f" ({group.variant})"
                                                         if group.variant else "")
            points.append((name, speed[0], metric[0], metric[1] or 0.0))
    if not points:
        return None
    teachers = {}
    for run in runs:
        speed = run.result.get("teacher_examples_per_s")
        if speed is not None and run.result.get("teacher_dev_metric") is not None:
            teachers.setdefault(run.config.get("setting"), []).append(
                (speed, run.result["teacher_dev_metric"]))
    figure = _figure(7, 4.5)
    ax = figure.subplots()
    for index, (name, speed, metric, std) in enumerate(points):
        ax.errorbar(speed, metric, yerr=std, marker="o", color=f"C{index % 10}", capsize=3,
                    linestyle="none")
        ax.annotate(name, (speed, metric), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    for setting, pairs in teachers.items():
        speed, metric = np.mean(pairs, axis=0)
        ax.plot(speed, metric, marker="s", color="black", linestyle="none")
        ax.annotate(f"teacher {setting or ''}".strip(), (speed, metric),
                    textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("inference examples/s (dev, log scale)")
    ax.set_ylabel(f"dev {runs[0].metric}")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("dev metric against inference speed")
    return _save(figure, path)


# ------------------------------------------------------------------------------------------------
# The document: blocks rendered as Markdown or as one self-contained HTML page


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def build_report(runs: list[Run], out: pathlib.Path) -> list[tuple]:
    """Writes every figure into `out` and returns the document as blocks:
    ("h1" | "h2" | "h3" | "p", text), ("table", header, rows), ("img", file name, caption)."""
    out.mkdir(parents=True, exist_ok=True)
    first = runs[0]
    header, rows = results_table(runs)
    blocks: list[tuple] = [
        ("h1", f"kdjax report: {first.task}"),
        ("p", f"{len(runs)} run(s): " + ", ".join(f"`{r.directory}`" for r in runs)),
        ("h2", "Results on dev"),
        ("table", header, rows),
        ("p", "Runs whose configs differ only in the seed are one row (runs: how many; "
              "mean ± sample standard deviation); variant names the config keys that set apart "
              "rows of the same recipe and setting. Agreement, KL(teacher‖student) in nats and "
              f"the expected calibration errors ({CALIBRATION_BINS} equal-width top-label "
              "bins) are computed from each run's saved dev logits; train s is the distillation's (or "
              "fine-tune's) training time, teachers not included; ex/s is measured inference "
              "throughput on dev. '-': not recorded by the run."),
    ]

    def figure(path, caption):
        if path is not None:
            blocks.append(("img", path.name, caption))

    speed = plot_accuracy_vs_speed(runs, out / "accuracy_vs_speed.png")
    if speed is not None:
        blocks.append(("h2", "Dev metric against inference speed"))
        figure(speed, "dev metric against inference examples/s")
    evaluations = plot_evaluations(runs, out / "evaluations.png")
    if evaluations is not None:
        blocks.append(("h2", "Evaluations"))
        figure(evaluations, "held-out metric per evaluation and final dev metric")
    for run in runs:
        slug = _slug(run.label)
        blocks.append(("h2", f"Run {run.label}"))
        blocks.append(("p", f"recipe {run.recipe}, setting {run.setting}, "
                            f"`{run.directory}`"))
        figure(plot_training_curves(run, out / f"{slug}-curves.png"), "training curves")
        figure(plot_discriminator(run, out / f"{slug}-discriminator.png"),
               "discriminator accuracies")
        figure(plot_reliability(run, out / f"{slug}-reliability.png"), "reliability diagram")
        figure(plot_layer_cka(run, out / f"{slug}-cka.png"), "per-layer linear CKA")
    return blocks


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(blocks: list[tuple]) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(map(_markdown_cell, header)) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
          "padding:3px 6px;text-align:right}th{background:#f3f3f3}img{max-width:100%}"
          "code{background:#f3f3f3}")


def render_html(blocks: list[tuple], out: pathlib.Path) -> str:
    """One page with its figures inlined (base64 data URIs) and its style inline: nothing is
    fetched, so it opens with no network."""
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
             f"<title>{html.escape(blocks[0][1])}</title>", f"<style>{_STYLE}</style>",
             "</head><body>"]

    def inline(text: str) -> str:  # `code` spans, the only Markdown the text blocks use.
        return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))

    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{inline(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{inline(block[1])}</p>")
        elif kind == "table":
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                         + "</tr>")
            for row in block[2]:
                parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
                             + "</tr>")
            parts.append("</table>")
        elif kind == "img":
            encoded = base64.b64encode((out / block[1]).read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt=\"{html.escape(block[2])}\" "
                         f"src=\"data:image/png;base64,{encoded}\"><figcaption>"
                         f"{html.escape(block[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(paths: list[str | pathlib.Path], out: str | pathlib.Path, *,
                 html_page: bool = False) -> dict[str, Any]:
    """Reads the runs under `paths` and writes OUT/report.md, its PNG figures and, with
    `html_page`, OUT/report.html.

    Returns:
      {"markdown": path, "html": path or None, "figures": [paths], "runs": count}.

    Raises:
      ReportError: a path without a finished run, or runs of different tasks.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError("the report's figures need matplotlib: pip install 'kdjax[report]'"
                          ) from None
    out = pathlib.Path(out)
    runs = load_runs(list(paths))
    blocks = build_report(runs, out)
    markdown = out / "report.md"
    markdown.write_text(render_markdown(blocks))
    page = None
    if html_page:
        page = out / "report.html"
        page.write_text(render_html(blocks, out))
    figures = [out / b[1] for b in blocks if b[0] == "img"]
    return {"markdown": markdown, "html": page, "figures": figures, "runs": len(runs)}
