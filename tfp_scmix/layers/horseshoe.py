"""The horseshoe prior family on the class weights, with its variational posterior.

Mathematical details: each weight has a Gaussian prior given its scale, `w_ck ~ N(0, scale_ck^2)`
(equivalently `w = z * scale`, `z ~ N(0, 1)`, the non-centred form that `params_to_weights` computes), with

- `normal`:       scale_ck = slab_scale (a plain Gaussian prior, for comparison);
- `horseshoe`:    scale_ck = lambda_ck * tau, lambda_ck ~ HalfCauchy(0, 1), tau ~ HalfCauchy(0, tau0);
- `regularized`:  the Finnish horseshoe (Piironen & Vehtari 2017):
                  scale_ck = tau * lambda~_ck, lambda~^2 = c^2 lambda^2 / (c^2 + tau^2 lambda^2),
                  c^2 ~ InverseGamma(slab_df / 2, slab_df * slab_scale^2 / 2);
- `santa_barbara`: our definition of the error-tolerant variant: the regularized horseshoe with a
                  heavier-tailed slab (slab_df = 1, so the slab is a Cauchy-like Student-t) and, in the
                  classification branch, the label-noise mixture likelihood with a learned error rate.

Variational family (mean-field): q(w) normal in weight space; q(lambda), q(tau), q(c^2) log-normal.
KL(q(w) || N(0, scale^2)) is analytic given a draw of the scales; the scale terms are Monte Carlo
estimates `log q(s) - log p(s)` at that draw. The weights' mean lives in weight space (not as z) so
that Adam moves weights at its own step size whatever the current scales: with the non-centred mean
a small tau makes every weight tiny for thousands of steps.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

PRIOR_VARIANTS = ("normal", "horseshoe", "regularized", "santa_barbara")
DEFAULT_SLAB_DF = {"regularized": 4.0, "santa_barbara": 1.0}


def default_global_scale(
    n_features: int, n_observations: float, expected_nonzero: float = 3.0, pseudo_sigma: float = 2.0
) -> float:
    """tau0 = p0 / (K - p0) * pseudo_sigma / sqrt(n) (Piironen & Vehtari 2017; pseudo_sigma=2 for logits).

    K = n_features, p0 = expected_nonzero (capped at K - 1), n = n_observations (at least 1). The
    pseudo-sigma of a logistic likelihood is 1 / sqrt(mu (1 - mu)), 2 at mu = 1/2 (same paper).
    """
    p0 = min(float(expected_nonzero), n_features - 1.0)
    return p0 / (n_features - p0) * pseudo_sigma / max(float(n_observations), 1.0) ** 0.5


def params_to_weights(
    z: float | tf.Tensor, local_scale: tf.Tensor, global_scale: float | tf.Tensor, slab_c2: tf.Tensor | None = None
) -> tf.Tensor:
    """w = z * tau * lambda (horseshoe) or z * tau * lambda~ (regularized, when slab_c2 is given)."""
    if slab_c2 is None:
        return z * local_scale * global_scale
    lam2 = tf.square(local_scale)
    tilde = tf.sqrt(slab_c2 * lam2 / (slab_c2 + tf.square(global_scale) * lam2))
    return z * tilde * global_scale


def _lognormal(loc: tf.Tensor, scale_raw: tf.Tensor) -> tfp.distributions.LogNormal:
    return tfd.LogNormal(loc, tf.nn.softplus(scale_raw) + 1e-5)


@keras.saving.register_keras_serializable(package="tfp_scmix")
class HorseshoePrior(keras.layers.Layer):
    """Weights `[rows, cols]` under a horseshoe-family prior, and their mean-field posterior.

    `sample(seed)` draws weights `[rows, cols]` and the Monte Carlo KL for that draw;
    `posterior_weights(n)` gives `n` fixed draws `[n, rows, cols]` (deterministic, for prediction).
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        variant: str = "regularized",
        global_scale: float = 0.05,
        slab_scale: float = 2.0,
        slab_df: float | None = None,
        **kwargs: Any,
    ) -> None:
        """variant: one of PRIOR_VARIANTS (ValueError otherwise); global_scale: tau0; slab_scale, slab_df: the
        slab of the regularized variants (slab_df default: `DEFAULT_SLAB_DF`). kwargs go to `keras.layers.Layer`."""
        super().__init__(**kwargs)
        if variant not in PRIOR_VARIANTS:
            raise ValueError(f"prior variant must be one of {PRIOR_VARIANTS}, received {variant!r}")
        self.rows, self.cols, self.variant = int(rows), int(cols), variant
        self.global_scale, self.slab_scale = float(global_scale), float(slab_scale)
        self.slab_df = float(slab_df if slab_df is not None else DEFAULT_SLAB_DF.get(variant, 4.0))
        shape = (self.rows, self.cols)
        small = keras.initializers.Constant(float(tfp.math.softplus_inverse(0.3)))
        self.w_loc = self.add_weight(shape=shape, name="w_loc", initializer="zeros")
        self.w_scale_raw = self.add_weight(
            shape=shape,
            name="w_scale_raw",
            initializer=keras.initializers.Constant(float(tfp.math.softplus_inverse(1e-2))),
        )
        if self.variant != "normal":
            self.lambda_loc = self.add_weight(shape=shape, name="lambda_loc", initializer="zeros")
            self.lambda_scale_raw = self.add_weight(shape=shape, name="lambda_scale_raw", initializer=small)
            self.tau_loc = self.add_weight(
                shape=(), name="tau_loc", initializer=keras.initializers.Constant(float(tf.math.log(self.global_scale)))
            )
            self.tau_scale_raw = self.add_weight(shape=(), name="tau_scale_raw", initializer=small)
        if self.regularized:
            self.c2_loc = self.add_weight(
                shape=(), name="c2_loc", initializer=keras.initializers.Constant(float(tf.math.log(self.slab_scale**2)))
            )
            self.c2_scale_raw = self.add_weight(shape=(), name="c2_scale_raw", initializer=small)
        self.built = True

    @property
    def regularized(self) -> bool:
        """Whether the variant has a slab (c^2): "regularized" and "santa_barbara"."""
        return self.variant in ("regularized", "santa_barbara")

    # -- distributions ------------------------------------------------------------------------
    def posteriors(self) -> dict[str, tfp.distributions.Distribution]:
        """Mean-field q as a dict of TFP distributions: w and lambda `[rows, cols]`, tau and c2 scalars, the
        scales where the variant uses them."""
        q: dict[str, tfp.distributions.Distribution] = {"w": self.weight_posterior()}
        if self.variant != "normal":
            q["lambda"] = _lognormal(self.lambda_loc, self.lambda_scale_raw)
            q["tau"] = _lognormal(self.tau_loc, self.tau_scale_raw)
        if self.regularized:
            q["c2"] = _lognormal(self.c2_loc, self.c2_scale_raw)
        return q

    def weight_posterior(self) -> tfp.distributions.Normal:
        """q(w) `[rows, cols]`: the mean-field Normal of the weights (the "w" of `posteriors`)."""
        return tfd.Normal(self.w_loc, tf.nn.softplus(self.w_scale_raw) + 1e-5)

    def scale_priors(self) -> dict[str, tfp.distributions.Distribution]:
        """The priors of the scale variables (lambda, tau, c2 where used), as TFP distributions."""
        p = {}
        if self.variant != "normal":
            p["lambda"] = tfd.HalfCauchy(0.0, 1.0)
            p["tau"] = tfd.HalfCauchy(0.0, self.global_scale)
        if self.regularized:
            p["c2"] = tfd.InverseGamma(self.slab_df / 2.0, self.slab_df * self.slab_scale**2 / 2.0)
        return p

    def prior_scale(self, scales: dict[str, tf.Tensor]) -> tf.Tensor:
        """Each weight's prior standard deviation `[..., rows, cols]` from a dict of scale values."""
        if self.variant == "normal":
            return tf.fill([self.rows, self.cols], self.slab_scale)
        c2 = scales["c2"][..., None, None] if self.regularized else None  # per-draw scalars vs [rows, cols]
        return params_to_weights(1.0, scales["lambda"], scales["tau"][..., None, None], c2)

    def prior_log_prob(self, params: dict[str, tf.Tensor]) -> tf.Tensor:
        """log p(w, scales) of a dict of values (w, and lambda, tau, c2 where used), summed: a scalar."""
        scales = {name: value for name, value in params.items() if name != "w"}
        log_prob = tf.reduce_sum(tfd.Normal(0.0, self.prior_scale(scales)).log_prob(params["w"]))
        for name, prior in self.scale_priors().items():
            log_prob += tf.reduce_sum(prior.log_prob(scales[name]))
        return log_prob

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, seed: tf.Tensor | tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
        """One reparameterized draw: (weights `[rows, cols]`, Monte Carlo KL(q || p) scalar in nats).

        seed: a stateless seed (int32 `[2]`).
        """
        q, p = self.posteriors(), self.scale_priors()
        seeds = tfp.random.split_seed(seed, n=len(q))
        draw = {name: dist.sample(seed=s) for (name, dist), s in zip(q.items(), seeds, strict=True)}
        kl = tf.reduce_sum(tfd.kl_divergence(q["w"], tfd.Normal(0.0, self.prior_scale(draw))))
        for name, prior in p.items():
            kl += tf.reduce_sum(q[name].log_prob(draw[name]) - prior.log_prob(draw[name]))
        return draw["w"], kl

    def posterior_weights(self, n_samples: int, seed: tf.Tensor | tuple[int, int] = (7, 11)) -> tf.Tensor:
        """`n_samples` draws of the weights `[n_samples, rows, cols]` from a fixed seed (deterministic)."""
        return self.weight_posterior().sample(n_samples, seed=seed)

    def shrinkage(self) -> tf.Tensor:
        """Posterior median of each weight's prior scale `[rows, cols]` (small = shrunk to zero)."""
        median = {name: tf.exp(q.distribution.loc) for name, q in self.posteriors().items() if name != "w"}
        return self.prior_scale(median)

    def call(self, inputs=None):
        """Posterior mean of the weights `[rows, cols]`."""
        return tf.convert_to_tensor(self.w_loc)

    def get_config(self):
        return {
            **super().get_config(),
            "rows": self.rows,
            "cols": self.cols,
            "variant": self.variant,
            "global_scale": self.global_scale,
            "slab_scale": self.slab_scale,
            "slab_df": self.slab_df,
        }
