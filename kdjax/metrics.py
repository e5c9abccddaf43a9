"""Evaluation metrics (numpy, host side) and the run's metric log."""

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
