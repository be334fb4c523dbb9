"""tfp_scmix.novelty: the classifier's features and the topic-space detector that train fits and saves."""

import numpy as np
import pytest

import tfp_scmix as scm
from tfp_scmix.novelty import TopicNovelty, log_ratio_features


def test_log_ratio_features_centre_each_block():
    topics = np.array([[0.5, 0.25, 0.25, 0.1, 0.9], [0.2, 0.2, 0.6, 0.5, 0.5]])
    with pytest.raises(ValueError, match="does not split into 2 blocks"):
        log_ratio_features(topics, blocks=2)
    blocks = np.array([[0.5, 0.5, 0.1, 0.9], [0.2, 0.8, 0.5, 0.5]])
    expected = np.log(blocks)
    expected[:, :2] -= expected[:, :2].mean(axis=1, keepdims=True)
    expected[:, 2:] -= expected[:, 2:].mean(axis=1, keepdims=True)
    np.testing.assert_allclose(log_ratio_features(blocks, blocks=2), expected)
    np.testing.assert_allclose(log_ratio_features(blocks[:, :2]), expected[:, :2])


def test_train_fits_a_detector_that_saves_with_the_model(two_restarts, embedded, tmp_path):
    novelty = two_restarts.novelty
    assert isinstance(novelty, TopicNovelty) and novelty.blocks == 2 and novelty.means.shape == (10, 16)
    # Fitted on the labelled training cells: by construction they score at most 1 - 5% above the threshold.
    labelled = embedded.subset(np.random.default_rng(0).permutation(embedded.n_cells)[:150])
    scores = novelty.score(scm.predict(two_restarts, labelled)["cell_topic"])
    assert (scores > novelty.threshold).mean() <= 0.05 + 1e-9
    back = TopicNovelty.from_dict(novelty.to_dict())
    np.testing.assert_array_equal(back.precision, novelty.precision)
    assert back.blocks == 2 and back.threshold == novelty.threshold
    scm.save_model(two_restarts, tmp_path / "model.keras")
    loaded = scm.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(scm.predict(loaded, embedded)["novelty"], scm.predict(two_restarts, embedded)["novelty"])


def test_training_summary(small_model):
    summary = small_model.training_summary
    assert summary["n_labelled"] == 150 == sum(summary["labelled_per_class"].values())
    assert summary["restarts"] == 1 and summary["epochs"] == 5 and 0 <= summary["training_accuracy"] <= 1
    from tfp_scmix.train import summary_line

    assert summary_line(summary).startswith("trained 1 model(s) x 5 epochs on 700 cells x 765 genes")
