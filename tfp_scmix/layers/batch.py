"""Batch effects: gene-wise log offsets per batch (dataset), with a learned shrinkage scale."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions


@keras.saving.register_keras_serializable(package="tfp_scmix")
class BatchOffsets(keras.layers.Layer):
    """gamma_b `[n_batches, n_genes]`: a batch's counts follow normalise(cell_topic @ topic_gene * exp(gamma_b)).

    Mathematical details: prior gamma_bg ~ N(0, sigma^2) with the shrinkage scale sigma learned (a point
    estimate: hierarchical shrinkage shared by every batch and gene); posterior q(gamma_bg) normal.
    With one batch the offsets are shrunk to zero unless the data need them.

    Shapes: `call(batch_ids [B])` -> posterior-mean offsets of those cells' batches `[B, n_genes]`.
    """

    def __init__(self, n_batches: int, n_genes: int, init_shrinkage: float = 0.1, **kwargs: Any) -> None:
        """n_batches, n_genes: the table's shape; init_shrinkage: the initial sigma (log-count units; the
        posterior scales start at 0.01). kwargs go to `keras.layers.Layer`."""
        super().__init__(**kwargs)
        self.n_batches, self.n_genes, self.init_shrinkage = int(n_batches), int(n_genes), float(init_shrinkage)
        shape = (self.n_batches, self.n_genes)
        self.loc = self.add_weight(shape=shape, name="loc", initializer="zeros")
        self.scale_raw = self.add_weight(
            shape=shape,
            name="scale_raw",
            initializer=keras.initializers.Constant(float(tfp.math.softplus_inverse(0.01))),
        )
        self.shrinkage_raw = self.add_weight(
            shape=(),
            name="shrinkage_raw",
            initializer=keras.initializers.Constant(float(tfp.math.softplus_inverse(self.init_shrinkage))),
        )
        self.built = True

    def shrinkage(self) -> tf.Tensor:
        """The learned prior scale sigma of the offsets (a scalar, in natural-log units of the rate)."""
        return tf.nn.softplus(self.shrinkage_raw) + 1e-4

    def posterior(self) -> tfp.distributions.Normal:
        """q(gamma): a normal with batch shape `[n_batches, n_genes]`."""
        return tfd.Normal(self.loc, tf.nn.softplus(self.scale_raw) + 1e-6)

    def sample(self, seed: tf.Tensor | tuple[int, int]) -> tf.Tensor:
        """One reparameterized draw of the offsets `[n_batches, n_genes]`; `seed` a stateless seed (int32 `[2]`)."""
        return self.posterior().sample(seed=seed)

    def kl(self) -> tf.Tensor:
        """KL(q(gamma) || N(0, sigma^2)) summed over batches and genes (a scalar, in nats)."""
        return tf.reduce_sum(tfd.kl_divergence(self.posterior(), tfd.Normal(0.0, self.shrinkage())))

    def call(self, batch_ids):
        return tf.gather(self.loc, batch_ids)

    def get_config(self):
        return {
            **super().get_config(),
            "n_batches": self.n_batches,
            "n_genes": self.n_genes,
            "init_shrinkage": self.init_shrinkage,
        }
