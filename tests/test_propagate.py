import numpy as np
import pytest

from tfp_scmix.propagate import (
    PROPAGATED_WEIGHT,
    correct_and_smooth,
    knn_graph,
    self_training_targets,
    smooth,
    spread,
)


def two_clusters(n=40, seed=0):
    """Points of two well-separated Gaussian clusters in 5 dimensions and their cluster index."""
    rng = np.random.default_rng(seed)
    truth = np.repeat([0, 1], n // 2)
    return rng.normal(size=(n, 5)) + 8.0 * truth[:, None], truth


def test_knn_graph_is_the_symmetric_normalised_connectivity():
    points, truth = two_clusters()
    graph = knn_graph(points, n_neighbors=5)
    assert graph.shape == (40, 40)
    assert np.allclose(graph.toarray(), graph.toarray().T)
    assert graph.diagonal().sum() == 0
    # D^-1/2 A D^-1/2 has largest eigenvalue 1, with eigenvector sqrt(degree).
    degree = np.asarray((graph.toarray() > 0).sum(axis=1)).ravel()
    vector = np.sqrt(degree)
    assert np.allclose(graph @ vector, vector)
    # Separated clusters are not connected.
    assert graph[truth == 0][:, truth == 1].nnz == 0
    # Duplicated points: no self-loops wherever the neighbour search puts the cell itself.
    assert knn_graph(np.zeros((6, 2)), n_neighbors=3).diagonal().sum() == 0
    with pytest.raises(ValueError, match="at least two cells, received 1"):
        knn_graph(points[:1])


def test_spread_holds_clamped_rows_and_converges_to_the_closed_form():
    points, _ = two_clusters()
    graph = knn_graph(points, n_neighbors=5)
    start = np.random.default_rng(1).random((40, 2))
    result = spread(graph, start, np.array([], int), alpha=0.5, iterations=200)
    closed = 0.5 * np.linalg.solve(np.eye(40) - 0.5 * graph.toarray(), start)  # (1-a)(I - aS)^-1 f0
    assert np.allclose(result, closed)
    clamped = spread(graph, start, np.array([0, 39]), alpha=0.5)
    assert np.array_equal(clamped[[0, 39]], start[[0, 39]])


def test_correct_and_smooth_fixes_a_classifier_that_errs_within_a_cluster():
    points, truth = two_clusters()
    labels = np.full(40, -1)
    labels[[0, 1, 20, 21]] = truth[[0, 1, 20, 21]]
    # A classifier right on most cells but wrong, with confidence, on a quarter of each cluster.
    probs = np.where(truth[:, None] == np.arange(2), 0.7, 0.3)
    wrong = np.r_[5:10, 25:30]
    probs[wrong] = probs[wrong, ::-1]
    result = correct_and_smooth(knn_graph(points, n_neighbors=8), probs, labels)
    assert np.array_equal(result.argmax(axis=1), truth)
    assert np.allclose(result.sum(axis=1), 1.0) and (result >= 0).all()
    assert np.array_equal(result[[0, 1, 20, 21]], np.eye(2)[truth[[0, 1, 20, 21]]])


def test_correct_and_smooth_refuses_what_it_cannot_use():
    points, truth = two_clusters()
    graph = knn_graph(points)
    probs = np.full((40, 2), 0.5)
    with pytest.raises(ValueError, match="needs labelled cells"):
        correct_and_smooth(graph, probs, np.full(40, -1))
    with pytest.raises(ValueError, match="must describe the same cells"):
        correct_and_smooth(graph, probs[:30], truth[:30])


def test_self_training_targets_keep_the_classifiers_class_proportions():
    points, truth = two_clusters()
    labels = np.full(40, -1)
    labels[[0, 20]] = [0, 1]
    probs = np.where(truth[:, None] == np.arange(2), 0.7, 0.3)
    wrong = np.r_[5:10, 25:30]
    probs[wrong] = probs[wrong, ::-1]
    graph = knn_graph(points, n_neighbors=8)
    targets = self_training_targets(graph, probs, labels)
    assert np.array_equal(targets[[0, 20]], np.eye(2))
    assert np.allclose(targets.sum(axis=1), 1.0)
    assert np.array_equal(targets.argmax(axis=1), truth)
    # The unlabelled rows mix the aligned propagated probabilities with the classifier's own.
    hidden = labels < 0
    propagated = correct_and_smooth(graph, probs, labels)[hidden]
    aligned = propagated * probs[hidden].mean(0) / propagated.mean(0)
    aligned /= aligned.sum(axis=1, keepdims=True)
    expected = PROPAGATED_WEIGHT * aligned + (1 - PROPAGATED_WEIGHT) * probs[hidden]
    np.testing.assert_allclose(targets[hidden], expected)
    # A classifier that puts a fifth of the cells in class 1 keeps a fifth there, where propagation alone
    # would follow the graph's two halves.
    skewed = np.tile([0.8, 0.2], (40, 1))
    assert abs(self_training_targets(graph, skewed, labels)[hidden].mean(0)[1] - 0.2) < 0.05


def test_smooth_mends_scattered_errors_without_labels_and_is_the_renormalised_fixed_point():
    points, truth = two_clusters()
    probs = np.where(truth[:, None] == np.arange(2), 0.7, 0.3)
    unsure, sure = np.r_[5:8, 25:28], np.array([10, 30])  # mistakes inside each cluster
    probs[unsure] = np.where(truth[unsure, None] == np.arange(2), 0.45, 0.55)
    probs[sure] = np.where(truth[sure, None] == np.arange(2), 0.05, 0.95)
    result = smooth(points, probs, n_neighbors=8)
    # Equal weight to a cell and its neighbourhood: the unsure mistakes are mended, the sure ones stand.
    expected = truth.copy()
    expected[sure] = 1 - truth[sure]
    assert np.array_equal(result.argmax(axis=1), expected)
    assert np.allclose(result.sum(axis=1), 1.0) and (result >= 0).all()
    closed = np.linalg.solve(np.eye(40) - 0.5 * knn_graph(points, n_neighbors=8).toarray(), probs)
    assert np.allclose(result, closed / closed.sum(axis=1, keepdims=True))
    assert np.array_equal(smooth(points, probs, alpha=0.0), probs)
    assert np.array_equal(smooth(points[:1], probs[:1]), probs[:1])  # one cell: no neighbours
    with pytest.raises(ValueError, match="must describe the same cells"):
        smooth(points[:30], probs)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\), received 1.0"):
        smooth(points, probs, alpha=1.0)
