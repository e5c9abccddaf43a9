import json

import numpy as np
import pytest

from kdjax import metrics as metrics_lib
from kdjax.metrics import classification_metrics


def test_binary_accuracy_and_f1_by_hand():
    # tp=2, fp=1, fn=1 for class 1 -> F1 = 4 / 6.
    m = classification_metrics(np.array([1, 1, 0, 1, 0]), np.array([1, 0, 0, 1, 1]), 2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(4 / 6)


def test_macro_f1_by_hand():
    preds, labels = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])
    # class 0: F1 1; class 1: tp 0 -> 0; class 2: tp 1, fp 1, fn 1 -> 0.5.
    m = classification_metrics(preds, labels, 3)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(0.5)


def test_binary_mcc_by_hand():
    # preds [1,1,0,1,0] vs labels [1,0,0,1,1]: tp 2, tn 1, fp 1, fn 1
    # -> (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1 / 6.
    m = classification_metrics(np.array([1, 1, 0, 1, 0]), np.array([1, 0, 0, 1, 1]), 2)
    assert m["mcc"] == pytest.approx(1 / 6)


def test_multiclass_mcc_by_hand():
    # preds [0,1,2,2] vs labels [0,2,2,1]: N 4, correct 2, true counts (1,1,2), predicted
    # counts (1,1,2) -> (2*4 - 6) / sqrt((16 - 6) * (16 - 6)) = 2 / 10.
    m = classification_metrics(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]), 3)
    assert m["mcc"] == pytest.approx(0.2)


def test_mcc_is_zero_when_one_class_is_predicted():
    # CoLA's failure mode: a student that calls every sentence acceptable has MCC 0, whatever
    # its accuracy (69 % on CoLA dev).
    labels = np.array([1, 1, 1, 0, 1, 0, 1])
    m = classification_metrics(np.ones_like(labels), labels, 2)
    assert m["mcc"] == 0.0 and m["accuracy"] == pytest.approx(5 / 7)
    assert classification_metrics(labels, labels, 2)["mcc"] == pytest.approx(1.0)
    assert classification_metrics(1 - labels, labels, 2)["mcc"] == pytest.approx(-1.0)


def test_discard_after_keeps_each_step_once_for_a_resumed_stage(tmp_path):
    log = metrics_lib.MetricLog(tmp_path, enabled=True)
    for step in (2, 4, 6):
        log.write(step, "general", {"loss": 1.0})
    for step in (2, 4, 6):
        log.write(step, "distill", {"loss": 1.0})
        log.write(step, "distill/holdout", {"accuracy": 0.5})
    log.write(6, "warning", {"stage": "distill", "warning": "discriminator_wins"})
    log.write(6, "warning", {"stage": "general", "warning": "discriminator_wins"})
    with log.path.open("a") as f:
        f.write('{"step": 7, "split": "dis')  # A kill in the middle of a line.
    log.discard_after("distill", 4)
    kept = [(r["split"], r["step"]) for r in map(json.loads, log.path.read_text().splitlines())]
    assert kept == [("general", 2), ("general", 4), ("general", 6), ("distill", 2),
                    ("distill/holdout", 2), ("distill", 4), ("distill/holdout", 4),
                    ("warning", 6)]
    assert not log.path.with_name("metrics.jsonl.tmp").exists()
