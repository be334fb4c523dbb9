"""Loss stage: the count likelihood on nonzero entries and the record of named ELBO terms."""

import tensorflow as tf

ELBO_TERMS = ("loss", "reconstruction", "kl_cell", "kl_topic", "kl_class", "label_nll")


def multinomial_log_prob(counts: tf.SparseTensor, log_cell_topic, log_topic_gene):
    """log Multinomial(x_n | l_n, cell_topic_n @ topic_gene) per cell `[batch]`, from the nonzeros only.

    log p = lgamma(l_n + 1) - sum_g lgamma(x_ng + 1) + sum_g x_ng log rate_ng, where only genes with
    x_ng > 0 contribute to the sums, and log rate_ng = logsumexp_k(log cell_topic_nk + log topic_gene_kg).
    Cost: O(nnz * n_topics) instead of O(batch * n_genes * n_topics).

    counts: SparseTensor `[batch, n_genes]`; log_cell_topic `[batch, n_topics]`;
    log_topic_gene `[n_topics, n_genes]`.
    """
    rows, genes = counts.indices[:, 0], counts.indices[:, 1]
    # The rate is a convex combination of probabilities, so summing in probability space is safe in
    # float32 and avoids a logsumexp (nnz * n_topics exponentials) per step.
    rate = tf.reduce_sum(tf.gather(tf.exp(log_cell_topic), rows)
                         * tf.gather(tf.transpose(tf.exp(log_topic_gene)), genes), axis=-1)
    log_rate = tf.math.log(rate + 1e-30)
    n_rows = tf.shape(log_cell_topic, out_type=tf.int64)[0]
    per_entry = counts.values * log_rate - tf.math.lgamma(counts.values + 1.0)
    library = tf.math.unsorted_segment_sum(counts.values, rows, n_rows)
    return tf.math.unsorted_segment_sum(per_entry, rows, n_rows) + tf.math.lgamma(library + 1.0)


def as_sparse(counts):
    """A count matrix as a tf.SparseTensor (dense inputs are converted; sparse pass through)."""
    if isinstance(counts, tf.SparseTensor):
        return counts
    return tf.sparse.from_dense(tf.convert_to_tensor(counts, tf.float32))
