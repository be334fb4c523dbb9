"""Topic branch: a distribution over genes for each topic (hierarchical logistic-normal)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

tfd = tfp.distributions


@keras.saving.register_keras_serializable(package="tfp_scmix")
class TopicBranch(keras.layers.Layer):
    """q(topic_gene logits) around a background expression profile.

    Mathematical details: for topic k, `logits_k = background + delta_k` with prior
    `delta_k ~ N(0, prior_scale^2 I_G)` and mean-field posterior `q(delta_k) = N(loc_k, scale_k^2)`;
    `topic_gene_k = softmax(logits_k)` is a distribution over the G genes. The background
    (centred log mean expression) is set from data with `set_background` and is not trained.

    Shapes: loc, scale `[n_topics, n_genes]`; `call()` returns the posterior-mean-logit topic
    distribution `[n_topics, n_genes]`.
    """

    def __init__(
        self,
        n_topics: int,
        n_genes: int,
        prior_scale: float = 1.0,
        init_noise: float = 0.5,
        init_posterior_scale: float = 0.01,
        **kwargs: Any,
    ) -> None:
        """prior_scale: the prior's standard deviation of delta (logit units); init_noise: the standard
        deviation of loc's random initial values; init_posterior_scale: the initial posterior scale.
        kwargs go to `keras.layers.Layer`."""
        super().__init__(**kwargs)
        self.n_topics, self.n_genes = int(n_topics), int(n_genes)
        self.prior_scale, self.init_noise = float(prior_scale), float(init_noise)
        self.init_posterior_scale = float(init_posterior_scale)
        shape = (self.n_topics, self.n_genes)
        self.background = self.add_weight(
            shape=(self.n_genes,), initializer="zeros", trainable=False, name="background"
        )
        self.loc = self.add_weight(
            shape=shape, name="loc", initializer=keras.initializers.RandomNormal(stddev=self.init_noise)
        )
        self.scale_raw = self.add_weight(
            shape=shape,
            name="scale_raw",
            initializer=keras.initializers.Constant(float(tfp.math.softplus_inverse(self.init_posterior_scale))),
        )
        self.built = True

    def set_background(self, mean_counts: ArrayLike) -> None:
        """Set the background from mean counts per gene `[n_genes]`: log(proportion + 1e-6), centred to mean 0
        (the pseudocount 1e-6 is on the proportion, keeping genes with no counts finite)."""
        mean_counts = np.asarray(mean_counts, np.float64)
        profile = np.log(mean_counts / mean_counts.sum() + 1e-6)
        self.background.assign((profile - profile.mean()).astype(np.float32))

    def posterior(self) -> tfp.distributions.Normal:
        """q(logits) as a TFP distribution with batch shape `[n_topics, n_genes]`."""
        return tfd.Normal(self.background + self.loc, tf.nn.softplus(self.scale_raw) + 1e-6)

    def sample_log_topic_gene(self, seed: tf.Tensor | tuple[int, int]) -> tf.Tensor:
        """One reparameterized draw of log topic_gene `[n_topics, n_genes]`; seed: a stateless seed (int32 `[2]`)."""
        return tf.nn.log_softmax(self.posterior().sample(seed=seed), axis=-1)

    def kl(self) -> tf.Tensor:
        """KL(q(logits) || p(logits)) summed over topics and genes (a scalar, in nats)."""
        prior = tfd.Normal(self.background, self.prior_scale)
        return tf.reduce_sum(tfd.kl_divergence(self.posterior(), prior))

    def call(self, inputs=None):
        return tf.nn.softmax(self.background + self.loc, axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "n_topics": self.n_topics,
            "n_genes": self.n_genes,
            "prior_scale": self.prior_scale,
            "init_noise": self.init_noise,
            "init_posterior_scale": self.init_posterior_scale,
        }
