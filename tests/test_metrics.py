import numpy as np
import pytest

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
