import numpy as np
import pytest

from gpu_ops.metrics import evaluate, hungarian_accuracy, mapped_confusion


def test_hungarian_accuracy_is_permutation_invariant():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([5, 5, 3, 3, 9, 9, 3])
    result = hungarian_accuracy(y, pred)
    assert result.accuracy == pytest.approx(6 / 7)
    assert result.mapping == {5: 0, 3: 1, 9: 2}


def test_more_clusters_than_classes_leaves_extra_clusters_unmatched():
    y = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 2, 2, 3])
    result = hungarian_accuracy(y, pred)
    assert result.accuracy == pytest.approx(4 / 6)
    assert len(result.mapping) == 2


def test_fewer_clusters_than_classes():
    y = np.array([0, 1, 2, 2])
    pred = np.array([0, 0, 1, 1])
    assert hungarian_accuracy(y, pred).accuracy == pytest.approx(3 / 4)


def test_mapped_confusion_is_diagonal_for_a_relabelled_perfect_clustering():
    y = np.repeat(np.arange(4), 5)
    pred = (y + 2) % 4
    matrix, classes, clusters = mapped_confusion(y, pred)
    assert matrix.sum() == y.size
    assert np.array_equal(matrix, np.diag([5, 5, 5, 5]))
    assert list(clusters) == [2, 3, 0, 1]


def test_evaluate_perfect_and_random():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 5000)
    assert evaluate(y, y) == {"acc": 1.0, "nmi": 1.0, "ari": 1.0}
    noise = evaluate(y, rng.integers(0, 10, 5000))
    assert noise["acc"] < 0.15 and noise["nmi"] < 0.02 and abs(noise["ari"]) < 0.01
