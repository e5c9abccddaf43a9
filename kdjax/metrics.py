"""Evaluation metrics (numpy, host side), the fidelity measures of a student against its
teacher (agreement, KL, calibration, representation similarity), and the run's metric log."""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np


def classification_metrics(predictions: np.ndarray, labels: np.ndarray,
                           num_labels: int) -> dict[str, float]:
    """Accuracy and Matthews correlation, plus F1 of class 1 for two classes and macro-F1 for
    more.

    Matthews correlation is GLUE's CoLA metric; for more than two classes it is Gorodkin's
    generalisation (the one scikit-learn computes), and 0 where it is undefined (one class
    predicted or present), as scikit-learn reports it.

    Args:
      predictions: [N] predicted class indices.
      labels: [N] true class indices.
      num_labels: number of classes.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    result = {"accuracy": float(np.mean(predictions == labels)) if len(labels) else float("nan")}
    f1s = []
    for c in range(num_labels):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    result["mcc"] = matthews_correlation(predictions, labels, num_labels)
    if num_labels == 2:
        result["f1"] = float(f1s[1])
    else:
        result["macro_f1"] = float(np.mean(f1s))
    return result


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """Matthews correlation from the confusion matrix (float64, so large N cannot overflow)."""
    confusion = np.zeros((num_labels, num_labels), np.float64)
    np.add.at(confusion, (np.asarray(labels), np.asarray(predictions)), 1.0)
    n = confusion.sum()
    correct = np.trace(confusion)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    numerator = correct * n - predicted_counts @ true_counts
    denominator = np.sqrt((n * n - predicted_counts @ predicted_counts)
                          * (n * n - true_counts @ true_counts))
    return float(numerator / denominator) if denominator > 0 else 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (the fidelity measures below compare small differences
    of probabilities, which float32 logits would blur)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def prediction_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """The fraction of examples on which two models predict the same class.

    Args:
      logits_a, logits_b: [N, C] logits (or probabilities: only the argmax is read).
    """
    return float(np.mean(np.argmax(logits_a, -1) == np.argmax(logits_b, -1)))


def mean_kl_divergence(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """KL(teacher || student) in nats, averaged over examples: how much of the teacher's output
    distribution the student fails to reproduce (0 when the two agree exactly; soft-target
    distillation minimises this at temperature T).

    Args:
      teacher_logits, student_logits: [N, C] logits at temperature 1.
    """
    log_p, log_q = log_softmax(teacher_logits), log_softmax(student_logits)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def reliability_bins(logits: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> dict:
    """Top-label calibration per confidence bin: the data of a reliability diagram.

    The confidence of an example is its top class's probability; bin b holds the examples with
    confidence in (b / num_bins, (b + 1) / num_bins] (equal widths; a confidence of exactly 0,
    impossible for a softmax, would go to bin 0).

    Returns:
      {"count": [num_bins] examples per bin, "confidence": mean confidence per bin,
       "accuracy": fraction correct per bin (both NaN for an empty bin), "edges": [num_bins + 1]}.
    """
    probs = np.exp(log_softmax(logits))
    confidence = probs.max(-1)
    correct = (probs.argmax(-1) == np.asarray(labels)).astype(np.float64)
    index = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, minlength=num_bins) / count
        accuracy = np.bincount(index, correct, minlength=num_bins) / count
    return {"count": count, "confidence": mean_confidence, "accuracy": accuracy,
            "edges": np.linspace(0.0, 1.0, num_bins + 1)}


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray,
                               num_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017), top-label, equal-width bins:
    sum over bins of (examples in bin / N) * |accuracy in bin - mean confidence in bin|.

    Args:
      logits: [N, C] logits.
      labels: [N] true classes.
      num_bins: 15, as Guo et al. report it.
    """
    bins = reliability_bins(logits, labels, num_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(bins["count"][filled] * gaps) / np.sum(bins["count"]))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019) of two representations of the
    same examples: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc.
    1 when one is an orthogonal transform and scaling of the other; it compares layers of
    different widths, as a student's and its teacher's are.

    Args:
      x: [N, P] features of N examples.
      y: [N, Q] features of the same N examples.

    Returns:
      The CKA in [0, 1], or NaN when either representation is the same for every example
      (up to float32 rounding), where it is undefined: the embedding output's [CLS] vector is
      such a representation, since [CLS] is always the first token.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    centred_x, centred_y = x - x.mean(axis=0), y - y.mean(axis=0)
    for raw, centred in ((x, centred_x), (y, centred_y)):
        # Rounding leaves ~1e-7 of relative spread in a constant float32 representation;
        # below 1e-5 the centred features are noise and their CKA is meaningless.
        if np.linalg.norm(centred) <= _CONSTANT_TOLERANCE * np.linalg.norm(raw):
            return float("nan")
    cross = np.linalg.norm(centred_y.T @ centred_x) ** 2
    return float(cross / (np.linalg.norm(centred_x.T @ centred_x)
                          * np.linalg.norm(centred_y.T @ centred_y)))


_CONSTANT_TOLERANCE = 1e-5


def cka_matrix(student_layers: list[np.ndarray], teacher_layers: list[np.ndarray]) -> np.ndarray:
    """[S, T] linear CKA of every student layer's features against every teacher layer's (NaN
    where undefined, see `linear_cka`)."""
    return np.array([[linear_cka(s, t) for t in teacher_layers] for s in student_layers])


# File name of the dev outputs a distillation or fine-tuning run leaves for `kdjax report`.
DEV_LOGITS_FILE = "dev_logits.npz"


def write_dev_logits(path: pathlib.Path, labels: np.ndarray, student: np.ndarray,
                     teacher: np.ndarray | None = None) -> None:
    """Saves the dev logits (`student`: the run's trained model; `teacher`, when there is one)
    and labels, so a report computes calibration, KL and agreement without rerunning a model.
    Written by process 0, into a temporary file renamed into place (a kill leaves no half file).
    """
    from kdjax import distributed

    if not distributed.is_main_process():
        return
    arrays = {"labels": np.asarray(labels, np.int32),
              "student": np.asarray(student, np.float32)}
    if teacher is not None:
        arrays["teacher"] = np.asarray(teacher, np.float32)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)


class MetricLog:
    """Appends one JSON object per line to `metrics.jsonl`; optionally mirrors scalars to
    TensorBoard event files (needs tensorboardX). By default only process 0 of a multi-process
    run writes (`enabled=None`)."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = False,
                 enabled: bool | None = None):
        if enabled is None:
            from kdjax import distributed
            enabled = distributed.is_main_process()
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ValueError("train.tensorboard=True needs tensorboardX "
                                 "(pip install 'kdjax[tensorboard]')") from None
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
            self._tb.flush()

    def discard_after(self, stage: str, step: int) -> None:
        """Removes the records of `stage` (its own split, `stage/...` splits and its warnings)
        past `step`, and a line cut short by a kill, so that a resumed run logs each step once.

        The file is rewritten beside itself and renamed over, so a kill leaves the old or the
        new one, never a mix.
        """
        if not self.enabled or not self.path.is_file():
            return
        kept, changed = [], False
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # Only a kill mid-write leaves a broken line.
                changed = True
                continue
            split = record.get("split", "")
            of_stage = (split == stage or split.startswith(f"{stage}/")
                        or (split == "warning" and record.get("stage") == stage))
            if of_stage and record.get("step", 0) > step:
                changed = True
                continue
            kept.append(line)
        if changed:
            partial = self.path.with_name(self.path.name + ".tmp")
            partial.write_text("".join(line + "\n" for line in kept))
            os.replace(partial, self.path)
