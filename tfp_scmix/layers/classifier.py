"""Classification branch: softmax regression from a cell's topic features to cell types."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_scmix.layers.horseshoe import HorseshoePrior

tfd, tfb = tfp.distributions, tfp.bijectors


@keras.saving.register_keras_serializable(package="tfp_scmix")
class ClassBranch(keras.layers.Layer):
    """p(label | features) = (1 - eps) softmax(W f + c) + eps / C, with W under a horseshoe-family prior.

    Mathematical details: `class_weights` W `[n_classes, n_topics]` has the prior of `HorseshoePrior`;
    the bias c `[n_classes]` is a point estimate. With `label_noise` (default: on for the "santa_barbara"
    variant only), the error rate eps has a Beta(1, 19) prior (`NOISE_PRIOR`: a-priori mean error rate
    1 / (1 + 19) = 5%) and a logit-normal posterior, so a few wrong labels are explained as noise instead
    of bending W. Without it, eps = 0.

    Shapes: features `[batch, n_topics]` (log topic proportions) -> class probabilities `[batch, n_classes]`.
    """

    NOISE_PRIOR = (1.0, 19.0)  # Beta(a, b) of the label error rate: prior mean a / (a + b) = 5%

    def __init__(
        self,
        n_classes: int,
        n_topics: int,
        variant: str = "regularized",
        global_scale: float = 0.05,
        slab_scale: float = 2.0,
        slab_df: float | None = None,
        label_noise: bool | None = None,
        n_predictive_samples: int = 32,
        **kwargs: Any,
    ) -> None:
        """variant, global_scale, slab_scale, slab_df: the prior of W (`HorseshoePrior`; ValueError for an
        unknown variant). n_predictive_samples: draws of W averaged by `call`. kwargs go to `keras.layers.Layer`."""
        super().__init__(**kwargs)
        self.n_classes, self.n_topics = int(n_classes), int(n_topics)
        self.label_noise = bool(variant == "santa_barbara" if label_noise is None else label_noise)
        self.n_predictive_samples = int(n_predictive_samples)
        self.class_weights = HorseshoePrior(
            self.n_classes, self.n_topics, variant, global_scale, slab_scale, slab_df, name="class_weights"
        )
        self.bias = self.add_weight(shape=(self.n_classes,), name="bias", initializer="zeros")
        if self.label_noise:
            self.noise_loc = self.add_weight(shape=(), name="noise_loc", initializer=keras.initializers.Constant(-3.0))
            self.noise_scale_raw = self.add_weight(
                shape=(), name="noise_scale_raw", initializer=keras.initializers.Constant(-3.0)
            )
        self.built = True

    def noise_posterior(self) -> tuple[tfp.distributions.Distribution, tfp.distributions.Distribution]:
        """q(logit eps) and the prior of logit eps (Beta(1, 19) pushed through the logit)."""
        q = tfd.Normal(self.noise_loc, tf.nn.softplus(self.noise_scale_raw) + 1e-4)
        p = tfd.TransformedDistribution(tfd.Beta(*self.NOISE_PRIOR), tfb.Invert(tfb.Sigmoid()))
        return q, p

    def error_rate(self) -> tf.Tensor:
        """Posterior median of the label error rate eps, a scalar in [0, 1] (0 without label noise)."""
        return tf.sigmoid(self.noise_loc) if self.label_noise else tf.constant(0.0)

    def _log_probs(self, features: tf.Tensor, weights: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
        """log class probabilities `[batch, n_classes]` for weights `[n_classes, n_topics]`, error rate eps."""
        logits = tf.matmul(features, weights, transpose_b=True) + self.bias
        log_softmax = tf.nn.log_softmax(logits, axis=-1)
        if not self.label_noise:
            return log_softmax
        # eps is one scalar draw: mix the softmax with a uniform over the classes.
        return tf.reduce_logsumexp(
            tf.stack(
                [tf.math.log1p(-eps) + log_softmax, tf.math.log(eps / self.n_classes) + tf.zeros_like(log_softmax)]
            ),
            0,
        )

    def sample_log_probs(self, features: tf.Tensor, seed: tf.Tensor | tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
        """One posterior draw: (log class probabilities `[batch, n_classes]`, Monte Carlo KL scalar in nats).

        features `[batch, n_topics]`; seed: a stateless seed (int32 `[2]`). With label noise the
        probabilities are those of the noisy labels, and the KL includes the error rate's term.
        """
        weight_seed, noise_seed = tfp.random.split_seed(seed)
        weights, kl = self.class_weights.sample(weight_seed)
        eps = tf.constant(0.0)
        if self.label_noise:
            q, p = self.noise_posterior()
            logit = q.sample(seed=noise_seed)
            kl += q.log_prob(logit) - p.log_prob(logit)
            eps = tf.sigmoid(logit)
        return self._log_probs(features, weights, eps), kl

    def call(self, features):
        """Posterior predictive class probabilities `[batch, n_classes]` over fixed draws of W.

        The label-noise part is left out: it models annotation errors, not the cell's true type.
        """
        weights = self.class_weights.posterior_weights(self.n_predictive_samples)
        logits = tf.einsum("bk,sck->sbc", features, weights) + self.bias
        return tf.reduce_mean(tf.nn.softmax(logits, axis=-1), axis=0)

    def get_config(self):
        hs = self.class_weights
        return {
            **super().get_config(),
            "n_classes": self.n_classes,
            "n_topics": self.n_topics,
            "variant": hs.variant,
            "global_scale": hs.global_scale,
            "slab_scale": hs.slab_scale,
            "slab_df": hs.slab_df,
            "label_noise": self.label_noise,
            "n_predictive_samples": self.n_predictive_samples,
        }
