"""Cell branch: an amortized encoder from a cell's counts to a logistic-normal over topics."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_scmix.sparse_ops import row_sums, sparse_dense_product

tfd = tfp.distributions


def laplace_dirichlet_prior(alpha: float | tf.Tensor, n_topics: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Logistic-normal (loc, scale) `[n_topics]` approximating a symmetric Dirichlet(alpha).

    The Laplace approximation in the softmax basis (MacKay 1998, "Choice of basis for Laplace
    approximation"; as in ProdLDA, Srivastava & Sutton 2017):
    loc_k = log a_k - mean(log a), var_k = (1 - 2/K) / a_k + sum_j 1/a_j / K^2.
    alpha: the concentration (a scalar > 0); K = n_topics.
    """
    a = tf.fill([n_topics], tf.cast(alpha, tf.float32))
    k = float(n_topics)
    loc = tf.math.log(a) - tf.reduce_mean(tf.math.log(a))
    var = (1.0 - 2.0 / k) / a + tf.reduce_sum(1.0 / a) / k**2
    return loc, tf.sqrt(var)


def divide_offsets(
    counts: tf.SparseTensor | tf.Tensor, batch_ids: tf.Tensor, offsets: tf.Tensor
) -> tf.SparseTensor | tf.Tensor:
    """counts / exp(offsets[batch of the cell]) for a sparse or dense `[batch, n_genes]` count matrix.

    batch_ids `[batch]` (integer); offsets gamma `[n_batches, n_genes]` (natural-log units). Sparse input
    stays sparse (same indices); dense input comes back float32.
    """
    batch_ids = tf.cast(batch_ids, tf.int64)
    factors = tf.exp(-offsets)  # of the [n_batches, n_genes] table, not of every entry
    if isinstance(counts, tf.SparseTensor):
        rows, genes = counts.indices[:, 0], counts.indices[:, 1]
        flat = tf.gather(batch_ids, rows) * tf.shape(offsets, out_type=tf.int64)[1] + genes
        return counts.with_values(counts.values * tf.gather(tf.reshape(factors, [-1]), flat))
    # A one-hot product rather than a gather: its gradient is a matmul instead of a scatter-add of [batch, n_genes].
    return tf.cast(counts, tf.float32) * tf.matmul(tf.one_hot(batch_ids, tf.shape(offsets)[0]), factors)


def csr_product(x: tf.SparseTensor, kernel: tf.Tensor) -> tf.Tensor:
    """x @ kernel `[batch, units]` of a sparse x `[batch, n_genes]` (canonical order) by TensorFlow's CSR kernel
    (`SparseMatrixMatMul`): cost O(nnz * units), never O(batch * n_genes * units). Differentiable in the kernel only:
    its gradient x^T @ upstream is x transposed by `SparseMatrixTranspose`, then the same plain product. The kernel's
    own `transpose_a=True` is not deterministic (repeated calls on the same inputs differ in the last bits,
    tests/layers/test_cell.py); this way is, and as fast (TensorFlow's own gradient of the op needs static shapes).
    Not inside a tf.cond: a CSR matrix cannot cross one into its gradient."""
    csr = tf.raw_ops.SparseTensorToCSRSparseMatrix(
        indices=x.indices, values=tf.stop_gradient(x.values), dense_shape=tf.shape(x, out_type=tf.int64)
    )  # built once, for the product and its gradient

    @tf.custom_gradient
    def product(kernel):
        def gradient(upstream):
            transposed = tf.raw_ops.SparseMatrixTranspose(input=csr, type=tf.float32)
            return tf.raw_ops.SparseMatrixMatMul(a=transposed, b=upstream)

        return tf.raw_ops.SparseMatrixMatMul(a=csr, b=kernel), gradient

    return product(tf.convert_to_tensor(kernel))  # a tensor: a variable read inside would need `variables=`


def normalise_counts(counts: tf.SparseTensor | tf.Tensor) -> tf.SparseTensor | tf.Tensor:
    """log1p(counts per 10k) of a sparse (canonical order) or dense `[batch, n_genes]` count matrix (stays sparse).

    Counts per 10k: counts * (10,000 / the cell's total) (a total below 1 counts as 1), the usual CP10k scaling,
    in the order of `tfp_scmix.data.log_normalised` (one product per entry).
    """
    if isinstance(counts, tf.SparseTensor):
        rows = counts.indices[:, 0]
        library = row_sums(counts.values, rows, tf.shape(counts, out_type=tf.int64)[0])
        return counts.with_values(tf.math.log1p(counts.values * tf.gather(1e4 / tf.maximum(library, 1.0), rows)))
    library = tf.reduce_sum(counts, axis=1, keepdims=True)
    return tf.math.log1p(counts * (1e4 / tf.maximum(library, 1.0)))


@keras.saving.register_keras_serializable(package="tfp_scmix")
class CellEncoder(keras.layers.Layer):
    """q(cell_topic | counts): log1p CP10k -> Dense(hidden) -> BatchNorm -> ReLU -> Dropout -> (loc, scale).

    The first layer reads sparse input: with `sparse_product` (set by `SCMix.from_data` for data with at most
    `CSR_DENSITY` nonzero entries) every sparse minibatch is multiplied by the CSR kernel; otherwise minibatches are
    densified, and those wider than `DENSE_BATCH_LIMIT` entries multiplied sparse, so memory is bounded by the
    batch, not the dataset.
    The prior p(cell_topic) is the logistic-normal Laplace approximation of Dirichlet(prior_alpha);
    with `learn_alpha` the concentration is learned (empirical Bayes).

    Shapes: counts `[batch, n_genes]` (tf.SparseTensor or dense) -> loc, scale `[batch, n_topics]`.
    """

    # Entries of a minibatch (128 MiB in float32) up to which it is densified: BLAS on a dense minibatch
    # beats the sparse kernel even at 3.6% nonzero, the density of the Kang counts over 20,000 genes
    # (docs/performance.md).
    # experiments/performance/dense_limit.py measures this limit against the earlier 2^22 side by side; the
    # speed-up is in experiments/performance/results_dense_limit.json.
    DENSE_BATCH_LIMIT = 2**25
    # Fraction of nonzero entries at or below which a densified minibatch is normalised on its nonzeros first
    # (fewer passes over memory), rather than after it is densified.
    SPARSE_DENSITY = 0.1
    # Fraction of nonzero entries at or below which `SCMix.from_data` has the encoder multiply sparse minibatches by
    # the CSR kernel (`sparse_product`) instead of densifying them: it trains faster on the Kang panels at 2.7% and
    # 3.6% nonzero, slower at 19% and 25%, and neither clearly at 12.8%
    # (experiments/performance/results_sparse_product.json; docs/performance.md).
    CSR_DENSITY = 0.1

    def __init__(
        self,
        n_genes: int,
        n_topics: int,
        hidden_units: int = 128,
        dropout: float = 0.2,
        prior_alpha: float = 0.5,
        learn_alpha: bool = False,
        **kwargs: Any,
    ) -> None:
        """dropout: the rate after the hidden layer; prior_alpha: the Dirichlet concentration of the prior
        (its initial value with `learn_alpha`). kwargs go to `keras.layers.Layer`."""
        super().__init__(**kwargs)
        self.n_genes, self.n_topics, self.hidden_units = int(n_genes), int(n_topics), int(hidden_units)
        self.dropout_rate, self.prior_alpha, self.learn_alpha = float(dropout), float(prior_alpha), bool(learn_alpha)
        self.kernel = self.add_weight(
            shape=(self.n_genes, self.hidden_units), name="kernel", initializer="glorot_uniform"
        )
        self.bias = self.add_weight(shape=(self.hidden_units,), name="bias", initializer="zeros")
        self.norm = keras.layers.BatchNormalization(name="norm")
        self.norm.build((None, self.hidden_units))
        self.drop = keras.layers.Dropout(self.dropout_rate)
        self.head = keras.layers.Dense(2 * self.n_topics, name="head")
        self.head.build((None, self.hidden_units))
        self.alpha_raw = self.add_weight(
            shape=(),
            name="alpha_raw",
            trainable=self.learn_alpha,
            initializer=keras.initializers.Constant(float(tfp.math.softplus_inverse(self.prior_alpha))),
        )
        # Sparse minibatches multiplied by TensorFlow's CSR kernel (`csr_product`), never densified. `SCMix.from_data`
        # sets it for data with at most CSR_DENSITY nonzero entries. A per-model choice, not a per-minibatch tf.cond,
        # which a CSR matrix cannot cross.
        self.sparse_product = False
        self.built = True

    def call(self, counts, batch_ids=None, offsets=None, training=False):
        """(loc, scale) from counts `[batch, n_genes]`, divided by exp(offsets[batch_ids]) when offsets are given."""
        return self.topics_from_first_layer(self.first_layer(counts, batch_ids, offsets), training=training)

    def first_layer(
        self,
        counts: tf.SparseTensor | tf.Tensor,
        batch_ids: tf.Tensor | None = None,
        offsets: tf.Tensor | None = None,
        kernel: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """x @ kernel `[batch, units]`: x the log1p CP10k `[batch, n_genes]` of sparse or dense counts, divided by
        exp(offsets `[n_batches, n_genes]`) of batch_ids `[batch]` when given; kernel `[n_genes, units]` defaults
        to the first layer's own (without its bias). Training and prediction pass the first layer's kernel with the
        classification branch's gene weights beside it, so that one product reads x for both branches.
        x carries no gradient: the offsets divide the counts as they stand and learn from the likelihood alone, so
        the product's gradient is the kernel's (the gradient with respect to x cost as much again: a third of the
        layer's training time, docs/performance.md).
        """
        kernel = self.kernel if kernel is None else kernel

        def normalised(counts):
            if offsets is not None:
                counts = divide_offsets(counts, batch_ids, tf.stop_gradient(offsets))
            return normalise_counts(counts)

        def products(x):
            return sparse_dense_product(x, kernel) if isinstance(x, tf.SparseTensor) else tf.matmul(x, kernel)

        if isinstance(counts, tf.SparseTensor) and self.sparse_product:
            return csr_product(normalised(counts), kernel)
        if isinstance(counts, tf.SparseTensor):
            # On CPU a dense matmul of one minibatch beats the sparse kernel several times over, so minibatches
            # are densified (never the dataset); wide ones stay sparse. A sparse minibatch (few nonzeros) is
            # normalised on its nonzeros first, a dense one after densifying: fewer passes over memory either way.
            entries = tf.reduce_prod(counts.dense_shape)
            nonzero = tf.cast(tf.size(counts.values, out_type=tf.int64), tf.float64)
            return tf.cond(
                entries > self.DENSE_BATCH_LIMIT,
                lambda: products(normalised(counts)),
                lambda: tf.cond(
                    nonzero <= self.SPARSE_DENSITY * tf.cast(entries, tf.float64),
                    lambda: products(tf.sparse.to_dense(normalised(counts))),
                    lambda: products(normalised(tf.sparse.to_dense(counts))),
                ),
            )
        return products(normalised(counts))

    def split(self, product: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(first layer `[batch, hidden_units]`, the other readers' columns) of a product by a kernel that has the
        first layer's beside other columns (`first_layer`'s kernel)."""
        return product[:, : self.hidden_units], product[:, self.hidden_units :]

    def topics_from_first_layer(self, first: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """(loc, scale) `[batch, n_topics]` from the first layer's product `[batch, hidden_units]` (`first_layer`)."""
        hidden = tf.nn.relu(self.norm(first + self.bias, training=training))
        hidden = self.drop(hidden, training=training)
        loc, scale_raw = tf.split(self.head(hidden), 2, axis=-1)
        return loc, tf.nn.softplus(scale_raw) + 1e-4

    def prior(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(loc, scale) `[n_topics]` of the logistic-normal prior over topics."""
        return laplace_dirichlet_prior(tf.nn.softplus(self.alpha_raw), self.n_topics)

    def kl(self, loc: tf.Tensor, scale: tf.Tensor, prior_shift: float | tf.Tensor = 0.0) -> tf.Tensor:
        """KL(q || p) per cell `[batch]` (nats) of q = N(loc, scale) `[batch, n_topics]` against the prior;
        `prior_shift` `[batch, n_topics]` moves the prior's centre."""
        prior_loc, prior_scale = self.prior()
        q = tfd.MultivariateNormalDiag(loc, scale)
        p = tfd.MultivariateNormalDiag(prior_loc + prior_shift, tf.broadcast_to(prior_scale, tf.shape(loc)))
        return tfd.kl_divergence(q, p)

    def get_config(self):
        return {
            **super().get_config(),
            "n_genes": self.n_genes,
            "n_topics": self.n_topics,
            "hidden_units": self.hidden_units,
            "dropout": self.dropout_rate,
            "prior_alpha": self.prior_alpha,
            "learn_alpha": self.learn_alpha,
        }
