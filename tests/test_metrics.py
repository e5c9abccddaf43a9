import math
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


# ------------------------------------------------------------------------------------------------
# Fidelity measures, each against an independent reference written here.

from kdjax import metrics  # noqa: E402


def _reference_ece(probs, labels, num_bins):
    """ECE by the definition, one example at a time: find its bin by scanning the edges."""
    edges = [b / num_bins for b in range(num_bins + 1)]
    bins = [[] for _ in range(num_bins)]
    for p, y in zip(probs, labels):
        confidence, predicted = max(p), int(np.argmax(p))
        for b in range(num_bins):
            if edges[b] < confidence <= edges[b + 1] or (b == 0 and confidence == 0):
                bins[b].append((confidence, predicted == y))
                break
    total = 0.0
    for members in bins:
        if members:
            mean_conf = sum(c for c, _ in members) / len(members)
            acc = sum(ok for _, ok in members) / len(members)
            total += len(members) / len(labels) * abs(acc - mean_conf)
    return total


def test_ece_by_hand():
    # Probabilities given as logits log(p): confidences 0.9 (right), 0.9 (wrong), 0.6 (right),
    # 0.55 (wrong). With 2 bins: (0.5, 1] holds all four: acc 0.5, mean confidence 0.7375
    # -> ECE 0.2375. With 10 bins: 0.9s in (0.8, 0.9], acc 0.5 vs 0.9 (weight 1/2);
    # 0.6 in (0.5, 0.6] and 0.55 too: acc 0.5 vs 0.575 (weight 1/2) -> 0.2 + 0.0375.
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 1])
    logits = np.log(probs)
    assert metrics.expected_calibration_error(logits, labels, 2) == pytest.approx(0.2375)
    assert metrics.expected_calibration_error(logits, labels, 10) == pytest.approx(0.2375)
    # A perfectly calibrated pair: confidence 0.75, right 3 times in 4 -> 0.
    calibrated = np.log(np.array([[0.75, 0.25]] * 4))
    assert metrics.expected_calibration_error(calibrated, np.array([0, 0, 0, 1])) == \
        pytest.approx(0.0, abs=1e-12)


def test_ece_and_reliability_bins_match_a_loop_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 4)) * 3
    labels = rng.integers(0, 4, 500)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert metrics.expected_calibration_error(logits, labels) == pytest.approx(
        _reference_ece(probs, labels, 15), rel=1e-9)
    bins = metrics.reliability_bins(logits, labels)
    assert bins["count"].sum() == 500 and len(bins["count"]) == 15
    confidence = probs.max(-1)
    in_top_bin = confidence > 14 / 15
    assert bins["count"][-1] == in_top_bin.sum()
    assert bins["accuracy"][-1] == pytest.approx(
        np.mean(probs[in_top_bin].argmax(-1) == labels[in_top_bin]))


def test_kl_and_agreement_match_a_loop_reference():
    rng = np.random.default_rng(1)
    teacher, student = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    total = 0.0
    for t, s in zip(teacher, student):
        p = np.exp(t) / np.exp(t).sum()
        q = np.exp(s) / np.exp(s).sum()
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert metrics.mean_kl_divergence(teacher, student) == pytest.approx(total / 50, rel=1e-9)
    assert metrics.mean_kl_divergence(teacher, teacher) == pytest.approx(0.0, abs=1e-12)
    # By hand: p = (1/2, 1/2), q = (1/4, 3/4) -> 1/2 log 2 + 1/2 log(2/3).
    kl = metrics.mean_kl_divergence(np.log([[0.5, 0.5]]), np.log([[0.25, 0.75]]))
    assert kl == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    agree = sum(int(np.argmax(t) == np.argmax(s)) for t, s in zip(teacher, student)) / 50
    assert metrics.prediction_agreement(teacher, student) == agree


def _reference_cka(x, y):
    """CKA through Gram matrices and the HSIC estimator (a different route from the feature
    form kdjax computes): HSIC(K, L) = tr(K H L H),
    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka_matches_the_gram_matrix_reference_and_its_invariances():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 8))
    y = x[:, :5] @ rng.normal(size=(5, 6)) + 0.5 * rng.normal(size=(40, 6))
    assert metrics.linear_cka(x, y) == pytest.approx(_reference_cka(x, y), rel=1e-9)
    assert 0 < metrics.linear_cka(x, y) < 1
    # Invariant to an orthogonal transform, isotropic scaling and a shift: CKA 1 with itself.
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert metrics.linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0)
    # By hand: x = (1, -1, 0), y = (1, 1, -2) are centred and orthogonal -> 0.
    assert metrics.linear_cka(np.array([[1.0], [-1.0], [0.0]]),
                              np.array([[1.0], [1.0], [-2.0]])) == pytest.approx(0.0, abs=1e-12)
    matrix = metrics.cka_matrix([x, y], [x, y, x[:, :3]])
    assert matrix.shape == (2, 3) and matrix[0, 0] == pytest.approx(1.0)
    assert matrix[1, 2] == pytest.approx(_reference_cka(y, x[:, :3]), rel=1e-9)


def test_linear_cka_is_undefined_for_a_constant_representation():
    # Every example's embedding-layer [CLS] vector is the same: nothing to align with.
    rng = np.random.default_rng(3)
    constant = np.tile(rng.normal(size=(1, 6)), (20, 1)).astype(np.float32)
    assert math.isnan(metrics.linear_cka(constant, rng.normal(size=(20, 4))))
    assert math.isnan(metrics.linear_cka(rng.normal(size=(20, 4)), constant))
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
