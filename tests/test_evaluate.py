"""tfp_scmix.evaluate against hand-computed examples: the benchmark split and scores, calibration, unassigned cells."""

import numpy as np
import pytest

from tfp_scmix.evaluate import (
    TopicNovelty,
    expected_calibration_error,
    few_shot_split,
    reliability_diagram,
    reliability_table,
    scores,
    unassigned,
    unassigned_score,
)

# Two bins, (0, 0.5] and (0.5, 1]:
#   bin 2: confidences 0.9 (right), 0.8 (wrong), 0.6 (right): mean 0.7667, accuracy 2/3, gap 0.1
#   bin 1: confidence 0.5 (argmax is the first class: right): gap 0.5
#   ECE = 3/4 * 0.1 + 1/4 * 0.5 = 0.2
PROBS = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.5, 0.5]])
TRUE = np.array([0, 1, 1, 0])


def test_few_shot_split_is_the_seeded_permutation():
    test, labelled = few_shot_split(10, 6, 3, seed=4)
    order = np.random.default_rng(4).permutation(10)
    np.testing.assert_array_equal(test, order[:6])
    np.testing.assert_array_equal(labelled, order[6:9])
    assert not set(test) & set(labelled)
    np.testing.assert_array_equal(few_shot_split(10, 6, 3, seed=4)[0], test)
    assert not np.array_equal(few_shot_split(10, 6, 3, seed=5)[0], test)
    with pytest.raises(ValueError, match="6 test \\+ 5 labelled cells exceed the 10 cells"):
        few_shot_split(10, 6, 5, seed=0)


def test_scores_hand_example():
    # Class 0: precision 1/2, recall 1/2, F1 1/2; class 1: precision 2/4, recall 2/3, F1 4/7; class 2: never
    # predicted, F1 0. Macro-F1 (1/2 + 4/7 + 0) / 3.
    result = scores([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 1])
    assert result["errors"] == 3 and result["accuracy"] == pytest.approx(0.5)
    assert result["macro_f1"] == pytest.approx((1 / 2 + 4 / 7 + 0) / 3)


def test_ece_hand_example():
    assert expected_calibration_error(PROBS, TRUE, n_bins=2) == pytest.approx(0.2)
    table = reliability_table(PROBS, TRUE, n_bins=2)
    assert table.cells.tolist() == [1, 3]
    assert table.accuracy.tolist() == pytest.approx([1.0, 2 / 3])
    assert table.confidence.tolist() == pytest.approx([0.5, 2.3 / 3])


def test_ece_zero_when_confidence_matches_accuracy():
    probs = np.tile([0.8, 0.2], (10, 1))
    true = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, true) == pytest.approx(0.0)
    # Always right at confidence 0.8: under-confident by 0.2.
    assert expected_calibration_error(probs, np.zeros(10, int)) == pytest.approx(0.2)


def test_ece_counts_classes_the_model_lacks_as_wrong():
    # -1: a cell whose true type has no counterpart among the model's classes.
    assert expected_calibration_error([[1.0, 0.0]], [-1]) == pytest.approx(1.0)


def test_ece_bin_edges_are_right_closed():
    # Confidence exactly 0.5 falls into (0, 0.5], 0.50001 into (0.5, 1].
    table = reliability_table([[0.5, 0.5], [0.50001, 0.49999]], [0, 0], n_bins=2)
    assert table.cells.tolist() == [1, 1]


def test_unassigned_scores_hand_examples():
    probs = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert unassigned_score(probs, "max_prob") == pytest.approx([0.3, 2 / 3, 0.0, 0.5])
    entropy_first = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)) / np.log(3)
    assert unassigned_score(probs, "entropy") == pytest.approx([entropy_first, 1.0, 0.0, np.log(2) / np.log(3)])
    assert unassigned(probs, "max_prob", threshold=0.4).tolist() == [False, True, False, True]


def test_bad_inputs_say_what_was_received():
    with pytest.raises(ValueError, match="n_classes"):
        expected_calibration_error(np.array([0.3, 0.7]), [1])
    with pytest.raises(ValueError, match="one class id per row"):
        expected_calibration_error(PROBS, [0, 1])
    with pytest.raises(ValueError, match="max_prob"):
        unassigned_score(PROBS, "margin")


def test_reliability_diagram_writes_png_atomically(tmp_path):
    path = tmp_path / "figs" / "reliability.png"
    assert reliability_diagram(PROBS, TRUE, path, n_bins=2, title="hand example") == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]


def softmax_rows(features):
    """Topic proportions whose centred log is `features` (rows of `features` must sum to zero)."""
    e = np.exp(features)
    return e / e.sum(axis=1, keepdims=True)


def test_topic_novelty_hand_example():
    # Identity precision; features [0.5, -0.5, 0]: squared distances 0.5 (first mean) and 4.5 (second).
    novelty = TopicNovelty(np.array([[0.0, 0.0, 0.0], [2.0, -2.0, 0.0]]), np.eye(3), np.array([3.0, 0.1, 1.0, 0.4]))
    topics = softmax_rows(np.array([[0.5, -0.5, 0.0], [2.0, -2.0, 0.0], [4.0, -4.0, 0.0]]))
    assert novelty.distance(topics) == pytest.approx([0.5, 0.0, 8.0])
    # Fractions of the reference distances (0.1, 0.4, 1.0, 3.0) below each distance.
    assert novelty.score(topics) == pytest.approx([0.5, 0.0, 1.0])
    assert novelty.unassigned(topics).tolist() == [False, False, True]


def test_topic_novelty_fit_flags_a_new_cluster():
    from sklearn.covariance import LedoitWolf
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    centres = np.array([[2.0, 0.0, -2.0, 0.0], [0.0, 2.0, 0.0, -2.0], [-3.0, -3.0, 3.0, 3.0]])
    labels = np.repeat([0, 1, 2], 200)
    features = centres[labels] + rng.normal(0, 0.5, (600, 4))
    features -= features.mean(axis=1, keepdims=True)
    topics = softmax_rows(features)
    known = labels < 2
    novelty = TopicNovelty.fit(topics[known], labels[known])
    assert roc_auc_score(~known, novelty.score(topics)) > 0.99
    # Cross-validated reference distances (the default) flag new cells of known types at about the rate
    # 1 - threshold; in-sample ones flag exactly that share of the reference cells, by construction.
    assert novelty.unassigned(topics[known]).mean() <= 1 - novelty.threshold + 0.01
    in_sample = TopicNovelty.fit(topics[known], labels[known], folds=0)
    assert in_sample.unassigned(topics[known]).mean() == pytest.approx(1 - novelty.threshold, abs=0.005)
    assert novelty.unassigned(topics[~known]).all()
    # Class means, and Ledoit-Wolf on the residuals from them, as documented.
    means = np.stack([features[labels == c].mean(axis=0) for c in (0, 1)])
    within = np.concatenate([features[labels == c] - means[c] for c in (0, 1)])
    precision = LedoitWolf(assume_centered=True).fit(within).precision_
    diff = features[:, None, :] - means[None]
    assert novelty.distance(topics) == pytest.approx(np.einsum("ncj,jk,nck->nc", diff, precision, diff).min(axis=1))
    # Unlabelled cells (-1) are left out of the fit.
    hidden = np.where(np.arange(400) % 2 == 0, labels[known], -1)
    subset = TopicNovelty.fit(topics[known][hidden >= 0], labels[known][hidden >= 0])
    assert TopicNovelty.fit(topics[known], hidden).distance(topics) == pytest.approx(subset.distance(topics))


def test_topic_novelty_needs_two_labelled_classes():
    with pytest.raises(ValueError, match="at least two classes"):
        TopicNovelty.fit(softmax_rows(np.zeros((5, 3))), [0, 0, 0, -1, -1])


def test_linear_peers_reproduce_the_suite_on_the_demo_split(embedded):
    """The demo's peers: the few-shot suite's logistic regression (unweighted and balanced), linear SVM, kNN with
    5 neighbours and label spreading rows on pbmc68k_reduced, seed 0 (experiments/few_shot/results.csv: 121,
    118, 123, 124 and 112 errors of 550)."""
    from tfp_scmix.evaluate import few_shot_split, graph_peers, linear_peers

    test, labelled = few_shot_split(embedded.n_cells, embedded.n_cells - 150, 150, 0)
    peers = linear_peers(embedded, labelled, test, seed=0)
    assert peers["logistic_regression"]["errors"] == 121 and peers["linear_svm"]["errors"] == 123
    assert peers["logistic_regression_balanced"]["errors"] == 118
    graph = graph_peers(embedded, labelled, test, seed=0)
    assert graph["knn_pca_k5"]["errors"] == 124 and graph["label_spreading"]["errors"] == 112
