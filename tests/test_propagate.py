import numpy as np
import pytest
import scipy.sparse as sp

from tfp_scmix.propagate import (
    SPREADING_ALPHA,
    equal_blocks,
    knn_graph,
    label_spreading,
    pooled_counts,
    principal_components,
    product_of_experts,
    self_training_labels,
    smooth,
    spread,
    with_known_labels,
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


def test_self_training_labels_are_the_known_ones_and_the_confident_calls_of_the_combined_call():
    """Known labels stay; an unlabelled cell gets the combined call where its probability is at least the
    confidence, -1 elsewhere. On two clusters, a classifier wrong on a quarter of each is mended by the known
    labels of its neighbours (`with_known_labels`), and cells the combined call is unsure of are left out."""
    points, truth = two_clusters()
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(np.where(truth[:, None] == np.arange(6) // 3, 20, 1)))
    labels = np.full(40, -1)
    labels[[0, 1, 20, 21]] = truth[[0, 1, 20, 21]]
    probs = np.where(truth[:, None] == np.arange(2), 0.7, 0.3)
    wrong = np.r_[5:10, 25:30]
    probs[wrong] = probs[wrong, ::-1]
    combined = with_known_labels(probs, labels, counts, points)
    assert np.array_equal(self_training_labels(combined, labels, confidence=0.5), truth)
    confidence = np.median(combined.max(axis=1)[labels < 0])  # half the unlabelled cells fall below it
    strict = self_training_labels(combined, labels, confidence=confidence)
    unsure = (labels < 0) & (combined.max(axis=1) < confidence)
    assert unsure.sum() >= 10 and (strict[unsure] == -1).all()
    assert np.array_equal(strict[~unsure], truth[~unsure])
    flipped = labels.copy()
    flipped[0] = 1  # a known label overrides a confident call
    assert self_training_labels(combined, flipped, confidence=0.5)[0] == 1
    with pytest.raises(ValueError, match="must describe the same cells"):
        self_training_labels(combined, labels[:30])


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


def test_principal_components_follow_scanpys_recipe_on_sparse_counts():
    from sklearn.decomposition import PCA

    from tfp_scmix.data import log_normalised

    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(0.5, 2.0, size=(200, 60))).astype(np.float32)
    counts[:, 7] = 0  # a gene without variance is dropped, not divided by zero
    counts = sp.csr_matrix(counts)
    dense = log_normalised(counts).toarray().astype(np.float64)
    keep = dense.std(axis=0) > 0
    scaled = (dense[:, keep] - dense[:, keep].mean(axis=0)) / dense[:, keep].std(axis=0)
    expected = PCA(10).fit_transform(scaled)
    result = principal_components(counts, n_components=10)
    assert result.shape == (200, 10) and np.isfinite(result).all()
    # Components agree up to sign.
    np.testing.assert_allclose(np.abs(result), np.abs(expected), rtol=1e-6, atol=1e-8)
    assert principal_components(counts[:5], n_components=10).shape == (5, 4)  # at most cells - 1
    # Fewer varying genes than components, and cells that no gene tells apart: no error from deep inside.
    assert principal_components(sp.csr_matrix(np.array([[1.0, 0, 3], [2, 0, 3], [0, 1, 3]])), 10).shape == (3, 2)
    same = principal_components(sp.csr_matrix(np.ones((4, 3))))
    assert same.shape == (4, 1) and not same.any()


def test_knn_graph_above_the_exact_limit_finds_nearly_every_exact_neighbour(monkeypatch):
    from tfp_scmix import propagate

    rng = np.random.default_rng(2)
    centres = 4.0 * rng.normal(size=(6, 10))
    points = centres[rng.integers(0, 6, 600)] + rng.normal(size=(600, 10))
    points[1] = points[0]  # identical cells
    exact = knn_graph(points)
    monkeypatch.setattr(propagate, "EXACT_NEIGHBORS_CELLS", 100)  # NN-descent from 101 cells on
    approximate = knn_graph(points)
    assert (approximate != approximate.T).nnz == 0 and approximate.diagonal().sum() == 0
    found = approximate.multiply(exact).nnz / exact.nnz
    assert found > 0.95, found
    assert (knn_graph(points) != approximate).nnz == 0  # seeded: the same graph again


def test_gram_is_the_same_by_the_sparse_product_and_by_dense_blocks(monkeypatch):
    from tfp_scmix import propagate

    rng = np.random.default_rng(1)
    x = sp.random(300, 40, density=0.3, random_state=rng, format="csr") * 5.0
    expected = x.toarray().T @ x.toarray()
    monkeypatch.setattr(propagate, "GRAM_BLOCK_ENTRIES", 7 * 40)  # blocks of 7 cells: the last one shorter
    for cost in (0.0, np.inf):  # the rule choosing the sparse product, then the dense blocks
        monkeypatch.setattr(propagate, "SPARSE_GRAM_COST", cost)
        np.testing.assert_allclose(propagate.gram(x), expected, rtol=1e-12, atol=1e-9)


def test_equal_blocks_weigh_each_block_equally_whatever_its_dimension():
    rng = np.random.default_rng(0)
    wide, narrow = 100.0 * rng.normal(size=(50, 40)), rng.normal(size=(50, 2))
    joined = equal_blocks(wide, narrow)
    assert joined.shape == (50, 42)
    for block in (joined[:, :40], joined[:, 40:]):
        assert np.isclose(((block - block.mean(axis=0)) ** 2).sum(axis=1).mean(), 1.0)


def test_label_spreading_is_scikit_learns_on_the_same_graph():
    points, truth = two_clusters()
    labels = np.full(40, -1)
    labels[[0, 3, 20]] = truth[[0, 3, 20]]
    graph = knn_graph(points, n_neighbors=5)
    result = label_spreading(graph, labels, 2)
    # The fixed point (1 - alpha)(I - alpha S)^-1 Y, rows normalised (scikit-learn's LabelSpreading).
    onehot = np.zeros((40, 2))
    onehot[[0, 3, 20], truth[[0, 3, 20]]] = 1
    closed = np.linalg.solve(np.eye(40) - SPREADING_ALPHA * graph.toarray(), onehot)
    np.testing.assert_allclose(result, closed / closed.sum(axis=1, keepdims=True), rtol=1e-6)
    assert np.array_equal(result.argmax(axis=1), truth)
    # Cells that no label reaches (a cluster without labels) get uniform probabilities.
    only_first = np.where(np.arange(40) == 0, 0, -1)
    unreached = label_spreading(graph, only_first, 2)
    np.testing.assert_allclose(unreached[truth == 1], 0.5)


def test_with_known_labels_mends_a_classifier_by_its_labelled_neighbours():
    points, truth = two_clusters(n=60)
    rng = np.random.default_rng(2)
    # Counts whose genes separate the clusters, so that the genes' principal components do too.
    rates = np.where(truth[:, None] == np.repeat([0, 1], 10), 8.0, 0.5)
    counts = sp.csr_matrix(rng.poisson(rates).astype(np.float32))
    labels = np.full(60, -1)
    labels[[0, 1, 30, 31]] = truth[[0, 1, 30, 31]]
    probs = np.where(truth[:, None] == np.arange(2), 0.7, 0.3)
    wrong = np.r_[5:10, 35:40]  # a classifier that errs, mildly, within each cluster
    probs[wrong] = probs[wrong, ::-1]
    result = with_known_labels(probs, labels, counts, points)
    assert np.array_equal(result.argmax(axis=1), truth)
    assert np.allclose(result.sum(axis=1), 1.0)
    # The product of the two experts, renormalised.
    graph = knn_graph(equal_blocks(principal_components(counts), points))
    product = probs * label_spreading(graph, labels, 2)
    np.testing.assert_allclose(result, product / product.sum(axis=1, keepdims=True), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="no cell has a known label"):
        with_known_labels(probs, np.full(60, -1), counts, points)
    with pytest.raises(ValueError, match="must describe the same cells"):
        with_known_labels(probs[:50], labels[:50], counts, points)
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        with_known_labels(probs, np.where(labels >= 0, 2, -1), counts, points)


def test_pooled_counts_sum_each_cell_with_its_neighbours():
    """Row i of the pooled counts is cell i's counts plus those of every cell connected to it in the graph,
    whatever the graph's weights; raw integer counts stay integers of the same dtype."""
    counts = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0], [0, 0, 5]], np.int32))
    # Path 0 - 1 - 2, cell 3 alone; weights as knn_graph's normalisation leaves them.
    graph = sp.csr_matrix(np.array([[0, 0.5, 0, 0], [0.5, 0, 0.7, 0], [0, 0.7, 0, 0], [0, 0, 0, 0]]))
    pooled = pooled_counts(graph, counts, np.array([1, 3, 0]))
    assert pooled.dtype == np.int32
    np.testing.assert_array_equal(pooled.toarray(), [[5, 3, 2], [0, 0, 5], [1, 3, 2]])
    assert pooled_counts(graph, counts, np.array([], int)).shape == (0, 3)


def test_product_of_experts_multiplies_and_renormalises_without_a_veto():
    first = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    second = np.array([[0.25, 0.75, 0.0], [0.5, 0.25, 0.25]])
    result = product_of_experts(first, second)
    np.testing.assert_allclose(result[1], np.array([0.1, 0.075, 0.125]) / 0.3)
    np.testing.assert_allclose(result[0, :2], [0.25, 0.75], rtol=1e-9)
    assert result[0, 2] > 0  # a zero is floored: one expert alone cannot rule a class out
    np.testing.assert_allclose(result.sum(axis=1), 1.0)
