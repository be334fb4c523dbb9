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


def test_gene_term_is_the_centred_genes_times_the_gene_weights_and_its_prior_is_a_ridge_penalty():
    """V (x - m), dense or sparse x, and -log p(V) = 1/2 sum V^2 / s^2 (s = gene_prior_scale) in the draw's KL."""
    rng = np.random.default_rng(0)
    branch = ClassBranch(3, 4, "regularized", 0.1, n_genes=6, gene_prior_scale=0.5)
    mean = rng.uniform(0, 2, 6)
    branch.set_gene_mean(mean)
    weights = rng.normal(size=(3, 6)).astype(np.float32)
    branch.gene_weights.assign(weights)
    genes = np.where(rng.random((5, 6)) < 0.5, 0.0, rng.uniform(0, 3, (5, 6))).astype(np.float32)
    expected = (genes - mean) @ weights.T
    np.testing.assert_allclose(branch.gene_logits(tf.constant(genes)).numpy(), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(branch.gene_logits(tf.sparse.from_dense(genes)).numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(float(branch.gene_penalty()), 0.5 * (weights**2).sum() / 0.25, rtol=1e-5)
    topics_only = ClassBranch(3, 4, "regularized", 0.1)
    topics_only.class_weights.set_weights(branch.class_weights.get_weights())
    kl_genes, kl_topics = (float(b.draw((1, 2))["kl"]) for b in (branch, topics_only))
    np.testing.assert_allclose(kl_genes - kl_topics, float(branch.gene_penalty()), rtol=1e-4)
    with pytest.raises(ValueError, match="gene_prior_scale must be positive"):
        ClassBranch(3, 4, n_genes=6, gene_prior_scale=0.0)

    features = tf.math.log(tf.nn.softmax(tf.random.normal([5, 4], seed=1)))
    log_probs, kl = branch.sample_log_probs(features, tf.constant([3, 4]), tf.constant(genes))
    assert np.allclose(np.exp(log_probs.numpy()).sum(1), 1, atol=1e-5) and np.isfinite(float(kl))
    probs = branch(features, tf.constant(genes)).numpy()
    assert probs.shape == (5, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(branch(features, tf.sparse.from_dense(genes)).numpy(), probs, atol=1e-6)
    with pytest.raises(ValueError, match="reads genes"):
        branch(features)
    roundtrip(branch)
