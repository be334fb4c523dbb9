import keras
import numpy as np
import pytest
import scipy.stats as st
import tensorflow as tf

from tfp_scmix.layers import CellEncoder, ClassBranch, HorseshoePrior, TopicBranch
from tfp_scmix.layers.cell import laplace_dirichlet_prior
from tfp_scmix.layers.horseshoe import default_global_scale, params_to_weights
from tfp_scmix.loss import multinomial_log_prob


def roundtrip(layer):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert [w.shape for w in clone.weights] == [w.shape for w in layer.weights]


def normal_kl(m1, s1, m2, s2):
    return np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5


def test_topic_branch_kl_and_shape():
    layer = TopicBranch(4, 10, prior_scale=0.7)
    layer.set_background(np.arange(1, 11))
    topic_gene = layer(None).numpy()
    assert topic_gene.shape == (4, 10) and np.allclose(topic_gene.sum(1), 1, atol=1e-5)
    q = layer.posterior()
    expected = normal_kl(q.loc.numpy(), q.scale.numpy(), layer.background.numpy(), 0.7).sum()
    assert float(layer.kl()) == pytest.approx(expected, rel=1e-4)
    roundtrip(layer)


def test_laplace_prior_matches_formula():
    loc, scale = laplace_dirichlet_prior(0.5, 5)
    assert np.allclose(loc, 0)
    assert np.allclose(scale.numpy() ** 2, (1 - 2 / 5) / 0.5 + 5 / 0.5 / 25)


def test_cell_encoder_kl_against_hand_formula():
    enc = CellEncoder(20, 5, hidden_units=8)
    counts = tf.sparse.from_dense(tf.constant(np.random.default_rng(0).poisson(2, (3, 20)).astype(np.float32)))
    loc, scale = enc(counts)
    assert loc.shape == (3, 5) and np.all(scale.numpy() > 0)
    dense_loc, _ = enc(tf.sparse.to_dense(counts))
    assert np.allclose(loc, dense_loc, atol=1e-5)
    shift = np.full((3, 5), 0.3, np.float32)
    p_loc, p_scale = (t.numpy() for t in enc.prior())
    expected = normal_kl(loc.numpy(), scale.numpy(), p_loc + shift, p_scale).sum(1)
    assert np.allclose(enc.kl(loc, scale, shift).numpy(), expected, rtol=1e-4)
    roundtrip(enc)


@pytest.mark.parametrize("variant", ["horseshoe", "regularized", "santa_barbara"])
def test_horseshoe_prior_log_prob_against_scipy(variant):
    layer = HorseshoePrior(3, 4, variant, global_scale=0.1, slab_scale=2.0)
    rng = np.random.default_rng(1)
    w, lam, tau, c2 = rng.normal(size=(3, 4)), rng.gamma(2, 1, (3, 4)), 0.3, 3.0
    params = {"w": w, "lambda": lam, "tau": np.array(tau)}
    if variant == "horseshoe":
        scale = lam * tau
        expected = 0.0
    else:
        scale = tau * np.sqrt(c2 * lam ** 2 / (c2 + tau ** 2 * lam ** 2))
        params["c2"] = np.array(c2)
        expected = st.invgamma.logpdf(c2, layer.slab_df / 2, scale=layer.slab_df * 4.0 / 2)
    expected += (st.norm.logpdf(w, scale=scale).sum() + st.halfcauchy.logpdf(lam).sum()
                 + st.halfcauchy.logpdf(tau, scale=0.1))
    tf_params = {k: tf.constant(v, tf.float32) for k, v in params.items()}
    assert float(layer.prior_log_prob(tf_params)) == pytest.approx(expected, rel=1e-4)
    roundtrip(layer)


def test_regularized_weights_formula():
    z, lam, tau, c2 = 1.5, 4.0, 0.2, 2.0
    expected = z * tau * np.sqrt(c2 * lam ** 2 / (c2 + tau ** 2 * lam ** 2))
    assert float(params_to_weights(z, lam, tau, c2)) == pytest.approx(expected, rel=1e-6)
    assert float(params_to_weights(z, lam, tau)) == pytest.approx(z * lam * tau)
    # the slab caps a huge local scale at c / tau * tau = c
    assert float(params_to_weights(1.0, 1e6, tau, c2)) == pytest.approx(np.sqrt(c2), rel=1e-3)


def test_horseshoe_kl_normal_variant_is_analytic_and_scales_finite():
    layer = HorseshoePrior(2, 3, "normal", slab_scale=2.0)
    _, kl = layer.sample(tf.constant([1, 2]))
    q = layer.posteriors()["w"]
    expected = normal_kl(q.loc.numpy(), q.scale.numpy(), 0.0, 2.0).sum()
    assert float(kl) == pytest.approx(expected, rel=1e-4)
    # horseshoe variants: average of the Monte Carlo KL estimates is finite and positive
    hs = HorseshoePrior(2, 3, "regularized")
    kls = [float(hs.sample(tf.constant([i, 0]))[1]) for i in range(50)]
    assert np.isfinite(kls).all() and np.mean(kls) > 0


def test_default_global_scale_formula():
    assert default_global_scale(50, 150, 3) == pytest.approx(3 / 47 * 2 / np.sqrt(150))


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


def test_multinomial_log_prob_against_scipy():
    rng = np.random.default_rng(2)
    counts = rng.poisson(1.0, (4, 12)).astype(np.float32)
    log_theta = np.log(rng.dirichlet(np.ones(3), 4)).astype(np.float32)
    log_beta = np.log(rng.dirichlet(np.ones(12), 3)).astype(np.float32)
    ours = multinomial_log_prob(tf.sparse.from_dense(counts), log_theta, log_beta).numpy()
    rate = np.exp(log_theta) @ np.exp(log_beta)
    expected = [st.multinomial.logpmf(c, c.sum(), r / r.sum()) for c, r in zip(counts, rate)]
    assert np.allclose(ours, expected, rtol=1e-4)


def test_layers_are_keras3_layers():
    assert isinstance(TopicBranch(2, 3), keras.layers.Layer)


def test_multinomial_with_batch_offsets_against_scipy():
    rng = np.random.default_rng(3)
    counts = rng.poisson(1.0, (4, 12)).astype(np.float32)
    log_theta = np.log(rng.dirichlet(np.ones(3), 4)).astype(np.float32)
    log_beta = np.log(rng.dirichlet(np.ones(12), 3)).astype(np.float32)
    offsets = rng.normal(0, 0.5, (2, 12)).astype(np.float32)
    batch = np.array([0, 1, 1, 0], np.int32)
    ours = multinomial_log_prob(tf.sparse.from_dense(counts), log_theta, log_beta, offsets, batch).numpy()
    rate = (np.exp(log_theta) @ np.exp(log_beta)) * np.exp(offsets[batch])
    expected = [st.multinomial.logpmf(c, c.sum(), r / r.sum()) for c, r in zip(counts, rate)]
    assert np.allclose(ours, expected, rtol=1e-4)


def test_multinomial_gradients_match_the_dense_multinomial():
    """The sparse likelihood's gradients (custom sparse-product gradient of the topic rate, offsets) equal
    automatic differentiation of TFP's dense Multinomial on the same parameters."""
    import tensorflow_probability as tfp

    rng = np.random.default_rng(4)
    counts = (rng.poisson(0.7, (6, 15)) * (rng.random((6, 15)) < 0.6)).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    batch = tf.constant([0, 1, 1, 0, 1, 0], tf.int32)
    params = [tf.Variable(rng.normal(size=shape).astype(np.float32)) for shape in ((6, 3), (3, 15), (2, 15))]

    def gradients(log_prob):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(log_prob(tf.nn.log_softmax(params[0]), tf.nn.log_softmax(params[1]), params[2]))
        return [tf.convert_to_tensor(g).numpy() for g in tape.gradient(value, params)]

    def dense(log_theta, log_beta, offsets):
        rate = tf.exp(log_theta) @ tf.exp(log_beta) * tf.exp(tf.gather(offsets, batch))
        probs = rate / tf.reduce_sum(rate, axis=1, keepdims=True)
        return tfp.distributions.Multinomial(counts.sum(1), probs=probs).log_prob(counts)

    sparse = tf.sparse.from_dense(counts)
    for jit in (True, False):
        ours = gradients(lambda *p: multinomial_log_prob(sparse, *p, batch_ids=batch, jit=jit))
        for value, expected in zip(ours, gradients(dense)):
            np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5)


def test_batch_offsets_kl_and_config():
    from tfp_scmix.layers import BatchOffsets

    layer = BatchOffsets(2, 5, init_shrinkage=0.3)
    q = layer.posterior()
    expected = normal_kl(q.loc.numpy(), q.scale.numpy(), 0.0, float(layer.shrinkage())).sum()
    assert float(layer.kl()) == pytest.approx(expected, rel=1e-4)
    assert layer(tf.constant([1, 0, 1])).shape == (3, 5)
    roundtrip(layer)


def test_cell_encoder_sparse_and_dense_products_agree():
    """Minibatches above DENSE_BATCH_LIMIT entries are multiplied sparse; both paths give the same posterior."""
    rng = np.random.default_rng(3)
    counts = rng.poisson(0.5, (64, 300)).astype(np.float32)
    sparse = tf.sparse.from_dense(counts)
    encoder = CellEncoder(300, 6)
    dense_loc, dense_scale = encoder(sparse)
    encoder.DENSE_BATCH_LIMIT = 0  # every minibatch is now "wide"
    sparse_loc, sparse_scale = encoder(sparse)
    np.testing.assert_allclose(sparse_loc.numpy(), dense_loc.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sparse_scale.numpy(), dense_scale.numpy(), rtol=1e-4, atol=1e-5)
