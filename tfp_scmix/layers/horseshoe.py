"""The horseshoe prior family on the class weights, with its variational posterior.

Mathematical details (non-centred): `w_ck = z_ck * scale_ck`, `z_ck ~ N(0, 1)`, and

- `normal`:       scale_ck = slab_scale (a plain Gaussian prior, for comparison);
- `horseshoe`:    scale_ck = lambda_ck * tau, lambda_ck ~ HalfCauchy(0, 1), tau ~ HalfCauchy(0, tau0);
- `regularized`:  the Finnish horseshoe (Piironen & Vehtari 2017):
                  scale_ck = tau * lambda~_ck, lambda~^2 = c^2 lambda^2 / (c^2 + tau^2 lambda^2),
                  c^2 ~ InverseGamma(slab_df / 2, slab_df * slab_scale^2 / 2);
- `santa_barbara`: our definition of the error-tolerant variant: the regularized horseshoe with a
                  heavier-tailed slab (slab_df = 1, so the slab is a Cauchy-like Student-t) and, in the
                  classification branch, the label-noise mixture likelihood with a learned error rate.

Variational family: q(z) normal; q(lambda), q(tau), q(c^2) log-normal; all mean-field. KL(q(z)||p(z))
is analytic; the scale terms are Monte Carlo estimates `log q(s) - log p(s)` at the sampled scales.
"""

import keras
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

PRIOR_VARIANTS = ("normal", "horseshoe", "regularized", "santa_barbara")
DEFAULT_SLAB_DF = {"regularized": 4.0, "santa_barbara": 1.0}


def default_global_scale(n_features, n_observations, expected_nonzero=3.0, pseudo_sigma=2.0):
    """tau0 = p0 / (K - p0) * pseudo_sigma / sqrt(n) (Piironen & Vehtari 2017; pseudo_sigma=2 for logits)."""
    p0 = min(float(expected_nonzero), n_features - 1.0)
    return p0 / (n_features - p0) * pseudo_sigma / max(float(n_observations), 1.0) ** 0.5


def params_to_weights(z, local_scale, global_scale, slab_c2=None):
    """w = z * tau * lambda (horseshoe) or z * tau * lambda~ (regularized, when slab_c2 is given)."""
    if slab_c2 is None:
        return z * local_scale * global_scale
    lam2 = tf.square(local_scale)
    tilde = tf.sqrt(slab_c2 * lam2 / (slab_c2 + tf.square(global_scale) * lam2))
    return z * tilde * global_scale


def _lognormal(loc, scale_raw):
    return tfd.LogNormal(loc, tf.nn.softplus(scale_raw) + 1e-5)


@keras.saving.register_keras_serializable(package="tfp_scmix")
class HorseshoePrior(keras.layers.Layer):
    """Weights `[rows, cols]` under a horseshoe-family prior, and their mean-field posterior.

    `sample(seed)` draws weights `[rows, cols]` and the Monte Carlo KL for that draw;
    `posterior_weights(n)` gives `n` fixed draws `[n, rows, cols]` (deterministic, for prediction).
    """

    def __init__(self, rows, cols, variant="regularized", global_scale=0.05, slab_scale=2.0, slab_df=None,
                 **kwargs):
        super().__init__(**kwargs)
        if variant not in PRIOR_VARIANTS:
            raise ValueError(f"prior variant must be one of {PRIOR_VARIANTS}, received {variant!r}")
        self.rows, self.cols, self.variant = int(rows), int(cols), variant
        self.global_scale, self.slab_scale = float(global_scale), float(slab_scale)
        self.slab_df = float(slab_df if slab_df is not None else DEFAULT_SLAB_DF.get(variant, 4.0))
        shape = (self.rows, self.cols)
        # Start with unit scales (tau = lambda = 1), not at tau0: in the non-centred form a tiny initial
        # scale makes every weight tiny and Adam needs thousands of steps to grow z; the prior then
        # shrinks what the labels do not support.
        small = keras.initializers.Constant(float(tfp.math.softplus_inverse(0.3)))
        self.z_loc = self.add_weight(shape=shape, name="z_loc",
                                     initializer=keras.initializers.RandomNormal(stddev=0.01))
        self.z_scale_raw = self.add_weight(shape=shape, name="z_scale_raw", initializer=keras.initializers.Constant(
            float(tfp.math.softplus_inverse(0.05))))
        if self.variant != "normal":
            self.lambda_loc = self.add_weight(shape=shape, name="lambda_loc", initializer="zeros")
            self.lambda_scale_raw = self.add_weight(shape=shape, name="lambda_scale_raw", initializer=small)
            self.tau_loc = self.add_weight(shape=(), name="tau_loc", initializer="zeros")
            self.tau_scale_raw = self.add_weight(shape=(), name="tau_scale_raw", initializer=small)
        if self.regularized:
            self.c2_loc = self.add_weight(shape=(), name="c2_loc", initializer=keras.initializers.Constant(
                float(tf.math.log(self.slab_scale ** 2))))
            self.c2_scale_raw = self.add_weight(shape=(), name="c2_scale_raw", initializer=small)
        self.built = True

    @property
    def regularized(self):
        return self.variant in ("regularized", "santa_barbara")

    # -- distributions ------------------------------------------------------------------------
    def posteriors(self):
        """Mean-field q as a dict of TFP distributions: z, and the scales lambda, tau, c2 where used."""
        q = {"z": tfd.Normal(self.z_loc, tf.nn.softplus(self.z_scale_raw) + 1e-5)}
        if self.variant != "normal":
            q["lambda"] = _lognormal(self.lambda_loc, self.lambda_scale_raw)
            q["tau"] = _lognormal(self.tau_loc, self.tau_scale_raw)
        if self.regularized:
            q["c2"] = _lognormal(self.c2_loc, self.c2_scale_raw)
        return q

    def priors(self):
        """The prior of each variable in `posteriors()`, as TFP distributions."""
        p = {"z": tfd.Normal(0.0, 1.0)}
        if self.variant != "normal":
            p["lambda"] = tfd.HalfCauchy(0.0, 1.0)
            p["tau"] = tfd.HalfCauchy(0.0, self.global_scale)
        if self.regularized:
            p["c2"] = tfd.InverseGamma(self.slab_df / 2.0, self.slab_df * self.slab_scale ** 2 / 2.0)
        return p

    def prior_log_prob(self, params):
        """log p of a dict of variable values (z, lambda, tau, c2), summed: a scalar."""
        priors = self.priors()
        return tf.add_n([tf.reduce_sum(priors[name].log_prob(value)) for name, value in params.items()])

    def to_weights(self, params):
        """Weights from a dict of variable values; leading sample dimensions broadcast."""
        if self.variant == "normal":
            return params["z"] * self.slab_scale
        c2 = params["c2"][..., None, None] if self.regularized else None  # per-draw scalars vs [rows, cols]
        return params_to_weights(params["z"], params["lambda"], params["tau"][..., None, None], c2)

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, seed):
        """One reparameterized draw: (weights `[rows, cols]`, Monte Carlo KL(q || p) scalar)."""
        q, p = self.posteriors(), self.priors()
        seeds = tfp.random.split_seed(seed, n=len(q))
        params = {name: dist.sample(seed=s) for (name, dist), s in zip(q.items(), seeds)}
        kl = tf.reduce_sum(tfd.kl_divergence(q["z"], p["z"]))
        for name in q:
            if name != "z":
                kl += tf.reduce_sum(q[name].log_prob(params[name]) - p[name].log_prob(params[name]))
        return self.to_weights(params), kl

    def posterior_weights(self, n_samples, seed=(7, 11)):
        """`n_samples` draws of the weights `[n_samples, rows, cols]` from fixed seeds (deterministic)."""
        q = self.posteriors()
        seeds = tfp.random.split_seed(seed, n=len(q))
        params = {name: dist.sample(n_samples, seed=s) for (name, dist), s in zip(q.items(), seeds)}
        return self.to_weights(params)

    def shrinkage(self):
        """Posterior median of each weight's prior scale `[rows, cols]` (small = shrunk to zero)."""
        if self.variant == "normal":
            return tf.fill([self.rows, self.cols], self.slab_scale)
        median = {"z": tf.ones_like(self.z_loc), "lambda": tf.exp(self.lambda_loc), "tau": tf.exp(self.tau_loc)}
        if self.regularized:
            median["c2"] = tf.exp(self.c2_loc)
        return self.to_weights(median)

    def call(self, inputs=None):
        """Posterior mean of the weights `[rows, cols]` (Monte Carlo over fixed draws)."""
        return tf.reduce_mean(self.posterior_weights(64), axis=0)

    def get_config(self):
        return {**super().get_config(), "rows": self.rows, "cols": self.cols, "variant": self.variant,
                "global_scale": self.global_scale, "slab_scale": self.slab_scale, "slab_df": self.slab_df}
