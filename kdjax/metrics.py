"""Evaluation metrics (numpy, host side) and the run's metric log."""

from __future__ import annotations

import json
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
