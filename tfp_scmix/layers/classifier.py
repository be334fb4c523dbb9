"""Classification branch: softmax regression from a cell's topic features to cell types."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_scmix.layers.horseshoe import HorseshoePrior
from tfp_scmix.sparse_ops import sparse_dense_product

tfd, tfb = tfp.distributions, tfp.bijectors


def _matmul(x: tf.Tensor | tf.SparseTensor, kernel: tf.Tensor) -> tf.Tensor:
    """x @ kernel for a dense or sparse x `[batch, n]` and a dense kernel `[n, m]` (sparse: in column blocks,
    `sparse_ops.sparse_dense_product`)."""
    if isinstance(x, tf.SparseTensor):
        return sparse_dense_product(x, kernel)
    return tf.matmul(x, kernel)


@keras.saving.register_keras_serializable(package="tfp_scmix")
class ClassBranch(keras.layers.Layer):
    """p(label | f, x) = (1 - eps) softmax(W f + V (x - m) + c) + eps / C: W under a horseshoe-family prior.

    Mathematical details: `class_weights` W `[n_classes, n_topics]` reads the topic features f under the
    prior of `HorseshoePrior` (mean-field posterior, averaged over by the posterior predictive). With
    `n_genes` > 0, `gene_weights` V `[n_classes, n_genes]` reads the genes: x the cell's log1p counts per 10k,
    centred by m, the genes' mean over the training cells (`set_gene_mean`), not scaled (a marker's weight
    acts on its log-fold change, as in logistic regression on log-normalised counts). V has a Gaussian prior
    N(0, `gene_prior_scale`^2) and is a point estimate (MAP): its loss term is -log p(V) up to a constant,
    1/2 sum V^2 / gene_prior_scale^2, the ridge penalty of scikit-learn's LogisticRegression (C = 1 for a
    scale of 1). A mean-field posterior over the G x C gene weights, or a horseshoe on them, measured worse:
    the thousands of weights the few labels do not inform put prior-width noise into every predictive draw,
    and the horseshoe's small global scale holds every gene weight at zero (docs/few_shot.md, "The gene
    term"). The bias c `[n_classes]` is a point estimate. With `label_noise`
    (default: on for the "santa_barbara" variant only), the error rate eps has a Beta(1, 19) prior
    (`NOISE_PRIOR`: a-priori mean error rate 1 / (1 + 19) = 5%) and a logit-normal posterior, so a few wrong
    labels are explained as noise instead of bending W (and V). Without it, eps = 0.

    Shapes: features `[batch, n_topics]` (centred log topic proportions) and genes `[batch, n_genes]` (log1p
    counts per 10k, dense or tf.SparseTensor; only with n_genes > 0) -> class probabilities `[batch, n_classes]`.
    The gene term is computed as x V^T - m V^T, so sparse genes stay sparse.
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
        n_genes: int = 0,
        gene_prior_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        """variant, global_scale, slab_scale, slab_df: the prior of W (`HorseshoePrior`; ValueError for an
        unknown variant). n_predictive_samples: draws of W averaged by `call`. n_genes: genes read directly
        (0: topics only); gene_prior_scale: the standard deviation of V's Gaussian prior (ValueError unless
        positive). kwargs go to `keras.layers.Layer`."""
        super().__init__(**kwargs)
        self.n_classes, self.n_topics, self.n_genes = int(n_classes), int(n_topics), int(n_genes)
        self.label_noise = bool(variant == "santa_barbara" if label_noise is None else label_noise)
        self.n_predictive_samples = int(n_predictive_samples)
        self.class_weights = HorseshoePrior(
            self.n_classes, self.n_topics, variant, global_scale, slab_scale, slab_df, name="class_weights"
        )
        self.gene_prior_scale = float(gene_prior_scale)
        if not self.gene_prior_scale > 0:
            raise ValueError(f"gene_prior_scale must be positive, received {gene_prior_scale!r}")
        if self.n_genes:
            self.gene_weights = self.add_weight(
                shape=(self.n_classes, self.n_genes), name="gene_weights", initializer="zeros"
            )
            self.gene_mean = self.add_weight(
                shape=(self.n_genes,), name="gene_mean", initializer="zeros", trainable=False
            )
        self.bias = self.add_weight(shape=(self.n_classes,), name="bias", initializer="zeros")
        if self.label_noise:
            self.noise_loc = self.add_weight(shape=(), name="noise_loc", initializer=keras.initializers.Constant(-3.0))
            self.noise_scale_raw = self.add_weight(
                shape=(), name="noise_scale_raw", initializer=keras.initializers.Constant(-3.0)
            )
        self.built = True

    def set_gene_mean(self, mean: np.ndarray) -> None:
        """Set m `[n_genes]`, the genes' mean log1p CP10k over the training cells."""
        self.gene_mean.assign(np.asarray(mean, np.float32))

    def gene_logits(self, genes: tf.Tensor | tf.SparseTensor) -> tf.Tensor:
        """V (x - m) `[batch, n_classes]` of genes x `[batch, n_genes]` (log1p CP10k, dense or sparse)."""
        kernel, offset = self.gene_kernel()
        return _matmul(genes, kernel) - offset

    def gene_penalty(self) -> tf.Tensor:
        """-log p(V) up to a constant, 1/2 sum V^2 / gene_prior_scale^2 (nats; 0 without genes)."""
        if not self.n_genes:
            return tf.constant(0.0)
        return 0.5 * tf.reduce_sum(tf.square(self.gene_weights)) / self.gene_prior_scale**2

    def noise_posterior(self) -> tuple[tfp.distributions.Distribution, tfp.distributions.Distribution]:
        """q(logit eps) and the prior of logit eps (Beta(1, 19) pushed through the logit)."""
        q = tfd.Normal(self.noise_loc, tf.nn.softplus(self.noise_scale_raw) + 1e-4)
        p = tfd.TransformedDistribution(tfd.Beta(*self.NOISE_PRIOR), tfb.Invert(tfb.Sigmoid()))
        return q, p

    def error_rate(self) -> tf.Tensor:
        """Posterior median of the label error rate eps, a scalar in [0, 1] (0 without label noise)."""
        return tf.sigmoid(self.noise_loc) if self.label_noise else tf.constant(0.0)

    def _log_probs(self, logits: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
        """log class probabilities `[batch, n_classes]` of logits `[batch, n_classes]`, error rate eps."""
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

    def draw(self, seed: tf.Tensor | tuple[int, int]) -> dict[str, tf.Tensor]:
        """One reparameterized posterior draw: {"class_weights" W `[n_classes, n_topics]`, "error_rate" eps (0
        without label noise), "kl" the Monte Carlo KL scalar in nats (the error rate's term and the gene
        weights' `gene_penalty` included)}. seed: a stateless seed (int32 `[2]`)."""
        weight_seed, noise_seed = tfp.random.split_seed(seed, n=2)
        draw = {}
        draw["class_weights"], kl = self.class_weights.sample(weight_seed)
        kl += self.gene_penalty()
        draw["error_rate"] = tf.constant(0.0)
        if self.label_noise:
            q, p = self.noise_posterior()
            logit = q.sample(seed=noise_seed)
            kl += q.log_prob(logit) - p.log_prob(logit)
            draw["error_rate"] = tf.sigmoid(logit)
        draw["kl"] = kl
        return draw

    def gene_kernel(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(kernel V^T `[n_genes, n_classes]`, offset m V^T `[n_classes]`): the gene term V (x - m) is
        x @ kernel - offset, x the log1p CP10k (so that the product on x can be shared with the encoder)."""
        kernel = tf.transpose(self.gene_weights)
        return kernel, tf.linalg.matvec(self.gene_weights, self.gene_mean)

    def draw_log_probs(self, features: tf.Tensor, gene_logits: tf.Tensor | None, draw: dict) -> tf.Tensor:
        """log class probabilities `[batch, n_classes]` under one `draw`: features `[batch, n_topics]`; gene_logits
        V (x - m) `[cells, n_classes]` (with genes), batch a whole multiple of cells: features may stack versions
        of the same cells (the training step's posterior mean and draw), whose gene term is repeated. With label
        noise the probabilities are those of the noisy labels."""
        logits = tf.matmul(features, draw["class_weights"], transpose_b=True) + self.bias
        if self.n_genes:
            gene_logits = self._require_genes(gene_logits)
            logits += tf.tile(gene_logits, [tf.shape(features)[0] // tf.shape(gene_logits)[0], 1])
        return self._log_probs(logits, draw["error_rate"])

    def sample_log_probs(
        self,
        features: tf.Tensor,
        seed: tf.Tensor | tuple[int, int],
        genes: tf.Tensor | tf.SparseTensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """One posterior draw: (log class probabilities `[batch, n_classes]`, Monte Carlo KL scalar in nats).

        features `[batch, n_topics]`; genes `[batch, n_genes]` log1p CP10k (required when n_genes > 0); seed: a
        stateless seed (int32 `[2]`). See `draw` and `draw_log_probs`.
        """
        draw = self.draw(seed)
        gene_logits = self.gene_logits(self._require_genes(genes)) if self.n_genes else None
        return self.draw_log_probs(features, gene_logits, draw), draw["kl"]

    def _require_genes(self, genes):
        if genes is None:
            raise ValueError("this classification branch reads genes: pass genes [batch, n_genes]")
        return genes

    def predictive_tables(self) -> dict[str, tf.Tensor]:
        """The fixed draws of the posterior predictive, taken once for any number of cells (S =
        n_predictive_samples): "class_weights" W `[S, n_classes, n_topics]` and, with genes, "gene_kernel"
        V^T `[n_genes, n_classes]` and "gene_offset" m V^T `[n_classes]` (`gene_kernel`). The draws come from
        a fixed seed: every call gives the same tables.
        """
        tables = {"class_weights": self.class_weights.posterior_weights(self.n_predictive_samples)}
        if self.n_genes:
            tables["gene_kernel"], tables["gene_offset"] = self.gene_kernel()
        return tables

    def predictive_probs(self, features: tf.Tensor, gene_products: tf.Tensor | None, tables: dict) -> tf.Tensor:
        """Posterior predictive class probabilities `[batch, n_classes]`: the softmax averaged over the draws of
        `tables` (`predictive_tables`). features `[batch, n_topics]`; gene_products `[batch, n_classes]`, the
        gene input x (log1p CP10k) times tables["gene_kernel"] (None when the branch reads topics only).

        The label-noise part is left out: it models annotation errors, not the cell's true type.
        """
        logits = tf.einsum("bk,sck->bsc", features, tables["class_weights"]) + self.bias
        if self.n_genes:
            logits += (self._require_genes(gene_products) - tables["gene_offset"])[:, None, :]
        return tf.reduce_mean(tf.nn.softmax(logits, axis=-1), axis=1)

    def call(self, features, genes=None):
        """Posterior predictive class probabilities `[batch, n_classes]` over fixed draws of W, from
        features `[batch, n_topics]` and genes `[batch, n_genes]` (log1p CP10k, dense or sparse)."""
        tables = self.predictive_tables()
        gene_products = None
        if self.n_genes:
            gene_products = _matmul(self._require_genes(genes), tables["gene_kernel"])
        return self.predictive_probs(features, gene_products, tables)

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
            "n_genes": self.n_genes,
            "gene_prior_scale": self.gene_prior_scale,
        }
