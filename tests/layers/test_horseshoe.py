import numpy as np
import pytest
import scipy.stats as st
import tensorflow as tf

from tests.layers.helpers import normal_kl, roundtrip
from tfp_scmix.layers import HorseshoePrior
from tfp_scmix.layers.horseshoe import default_global_scale, params_to_weights


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
        scale = tau * np.sqrt(c2 * lam**2 / (c2 + tau**2 * lam**2))
        params["c2"] = np.array(c2)
        expected = st.invgamma.logpdf(c2, layer.slab_df / 2, scale=layer.slab_df * 4.0 / 2)
    expected += (
        st.norm.logpdf(w, scale=scale).sum() + st.halfcauchy.logpdf(lam).sum() + st.halfcauchy.logpdf(tau, scale=0.1)
    )
    tf_params = {k: tf.constant(v, tf.float32) for k, v in params.items()}
    assert float(layer.prior_log_prob(tf_params)) == pytest.approx(expected, rel=1e-4)
    roundtrip(layer)


def test_regularized_weights_formula():
    z, lam, tau, c2 = 1.5, 4.0, 0.2, 2.0
    expected = z * tau * np.sqrt(c2 * lam**2 / (c2 + tau**2 * lam**2))
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
