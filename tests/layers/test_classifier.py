import numpy as np
import pytest
import tensorflow as tf

from tests.layers.helpers import roundtrip
from tfp_scmix.layers import ClassBranch


def test_class_branch_probabilities_and_label_noise():
    branch = ClassBranch(4, 6, "santa_barbara", 0.1)
    assert branch.label_noise and 0 < float(branch.error_rate()) < 0.2
    features = tf.math.log(tf.nn.softmax(tf.random.normal([5, 6], seed=1)))
    log_probs, kl = branch.sample_log_probs(features, tf.constant([3, 4]))
    assert np.allclose(np.exp(log_probs.numpy()).sum(1), 1, atol=1e-5) and np.isfinite(float(kl))
    # the mixture never goes below eps / C
    assert np.all(np.exp(log_probs.numpy()) > 0)
    probs = branch(features).numpy()
    assert probs.shape == (5, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.array_equal(probs, branch(features).numpy())  # deterministic
    roundtrip(branch)
    assert not ClassBranch(4, 6, "regularized").label_noise


def test_gene_term_is_the_standardised_genes_times_the_gene_weights_dense_or_sparse():
    rng = np.random.default_rng(0)
    branch = ClassBranch(3, 4, "regularized", 0.1, n_genes=6, gene_global_scale=0.01)
    mean, sd = rng.uniform(0, 2, 6), np.array([0.5, 1.0, 2.0, 0.05, 1.5, 0.3])
    branch.set_gene_moments(mean, sd)
    genes = np.where(rng.random((5, 6)) < 0.5, 0.0, rng.uniform(0, 3, (5, 6))).astype(np.float32)
    weights = rng.normal(size=(3, 6)).astype(np.float32)
    expected = ((genes - mean) / np.maximum(sd, ClassBranch.MIN_GENE_SD)) @ weights.T  # sd floored at 0.1
    dense = branch.gene_logits(tf.constant(genes), tf.constant(weights)).numpy()
    sparse = branch.gene_logits(tf.sparse.from_dense(genes), tf.constant(weights)).numpy()
    np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sparse, expected, rtol=1e-5, atol=1e-4)
    # Several draws of the weights at once: one block per draw.
    stacked = branch.gene_logits(tf.constant(genes), tf.constant(np.stack([weights, 2 * weights]))).numpy()
    assert stacked.shape == (5, 2, 3)
    np.testing.assert_allclose(stacked[:, 1], 2 * expected, rtol=1e-5, atol=1e-3)

    features = tf.math.log(tf.nn.softmax(tf.random.normal([5, 4], seed=1)))
    log_probs, kl = branch.sample_log_probs(features, tf.constant([3, 4]), tf.constant(genes))
    assert np.allclose(np.exp(log_probs.numpy()).sum(1), 1, atol=1e-5) and np.isfinite(float(kl))
    probs = branch(features, tf.constant(genes)).numpy()
    assert probs.shape == (5, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(branch(features, tf.sparse.from_dense(genes)).numpy(), probs, atol=1e-6)
    with pytest.raises(ValueError, match="reads genes"):
        branch(features)
    roundtrip(branch)
