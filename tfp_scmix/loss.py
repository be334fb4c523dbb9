"""Loss stage: the count likelihood on nonzero entries and the record of named ELBO terms."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import tensorflow as tf

from tfp_scmix.data import sparse_entries
from tfp_scmix.sparse_ops import log_factorial, row_sums, sparse_dense_product, topic_rate

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

ELBO_TERMS = ("loss", "reconstruction", "kl_cell", "kl_topic", "kl_class", "kl_batch", "label_nll")


def multinomial_log_prob(
    counts: tf.SparseTensor,
    log_cell_topic: tf.Tensor,
    log_topic_gene: tf.Tensor,
    offsets: tf.Tensor | None = None,
    batch_ids: tf.Tensor | None = None,
    jit: bool = True,
) -> tf.Tensor:
    """log Multinomial(x_n | l_n, normalise(cell_topic_n @ topic_gene * exp(gamma_b))) per cell `[batch]`, in nats.

    Only the nonzero counts enter: log p = lgamma(l_n + 1) - sum_g lgamma(x_ng + 1) + sum_g x_ng log rate_ng,
    where the sums run over genes with x_ng > 0 and
    rate_ng = (sum_k cell_topic_nk topic_gene_kg) exp(gamma_bg) / Z_n, Z_n = sum_k cell_topic_nk M_bk,
    M_bk = sum_g topic_gene_kg exp(gamma_bg). Cost: O(nnz * n_topics + n_batches * n_genes * n_topics)
    instead of O(batch * n_genes * n_topics).

    counts: SparseTensor `[batch, n_genes]` in canonical (row-major) order, as `tf.sparse.reorder` leaves it and
    every pipeline of this package yields it; log_cell_topic `[batch, n_topics]`;
    log_topic_gene `[n_topics, n_genes]`; offsets: gamma `[n_batches, n_genes]` or None;
    batch_ids: `[batch]` batch of each cell (needed with offsets). jit: the nonzero product compiled with XLA
    (`sparse_ops.topic_rate`). l_n is the cell's total count, x_ng its counts. Counts out of canonical order
    raise InvalidArgumentError on CPU (the sorted segment sums of `sparse_ops.row_sums`).
    """
    rows = counts.indices[:, 0]
    cell_topic, topic_gene = tf.exp(log_cell_topic), tf.exp(log_topic_gene)
    n_rows = tf.shape(log_cell_topic, out_type=tf.int64)[0]
    # Per cell: sum_g x_ng log rate_ng. The rate is a convex combination of probabilities, so summing in
    # probability space is safe in float32 and avoids a logsumexp (nnz * n_topics exponentials) per step.
    log_rate = tf.math.log(topic_rate(cell_topic, topic_gene, counts.indices, jit=jit) + 1e-30)
    log_prob = row_sums(counts.values * log_rate, rows, n_rows)
    library = row_sums(counts.values, rows, n_rows)
    if offsets is not None:
        # sum_g x_ng gamma_bg - l_n log Z_n: per cell, with no per-nonzero gather of the normaliser.
        in_batch = tf.one_hot(batch_ids, tf.shape(offsets)[0])  # [batch, n_batches]
        log_prob += tf.reduce_sum(sparse_dense_product(counts, tf.transpose(offsets)) * in_batch, axis=-1)
        normaliser = tf.reduce_sum(
            cell_topic * tf.matmul(in_batch, tf.matmul(tf.exp(offsets), topic_gene, transpose_b=True)), axis=-1
        )
        log_prob -= library * tf.math.log(normaliser)
    # The multinomial coefficient: no parameter enters it.
    log_coefficient = tf.math.lgamma(library + 1.0) - row_sums(log_factorial(counts.values), rows, n_rows)
    return log_prob + log_coefficient


def as_sparse(counts: tf.SparseTensor | tf.Tensor | ArrayLike) -> tf.SparseTensor:
    """A count matrix `[batch, n_genes]` as a tf.SparseTensor: dense and scipy sparse inputs are converted
    (float32, canonical order); tf.SparseTensor passes through unchanged."""
    if isinstance(counts, tf.SparseTensor):
        return counts
    if sp.issparse(counts):
        csr = sp.csr_matrix(counts, dtype=np.float32)
        csr.sum_duplicates()  # also sorts the indices: canonical order
        return tf.SparseTensor(*sparse_entries(csr), csr.shape)
    return tf.sparse.from_dense(tf.convert_to_tensor(counts, tf.float32))
