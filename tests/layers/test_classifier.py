import numpy as np
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
