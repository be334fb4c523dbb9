"""Loss stage: the count likelihood on nonzero entries and the record of named ELBO terms."""

import tensorflow as tf

ELBO_TERMS = ("loss", "reconstruction", "kl_cell", "kl_topic", "kl_class", "kl_batch", "label_nll")


def multinomial_log_prob(counts: tf.SparseTensor, log_cell_topic, log_topic_gene, offsets=None, batch_ids=None):
    """log Multinomial(x_n | l_n, normalise(cell_topic_n @ topic_gene * exp(gamma_b))) per cell `[batch]`.

    Only the nonzero counts enter: log p = lgamma(l_n + 1) - sum_g lgamma(x_ng + 1) + sum_g x_ng log rate_ng,
    where the sums run over genes with x_ng > 0 and
    rate_ng = (sum_k cell_topic_nk topic_gene_kg) exp(gamma_bg) / Z_n, Z_n = sum_k cell_topic_nk M_bk,
    M_bk = sum_g topic_gene_kg exp(gamma_bg). Cost: O(nnz * n_topics + n_batches * n_genes * n_topics)
    instead of O(batch * n_genes * n_topics).

    counts: SparseTensor `[batch, n_genes]`; log_cell_topic `[batch, n_topics]`;
    log_topic_gene `[n_topics, n_genes]`; offsets: gamma `[n_batches, n_genes]` or None;
    batch_ids: `[batch]` batch of each cell.
    """
    rows, genes = counts.indices[:, 0], counts.indices[:, 1]
    cell_topic, topic_gene = tf.exp(log_cell_topic), tf.exp(log_topic_gene)
    # The rate is a convex combination of probabilities, so summing in probability space is safe in
    # float32 and avoids a logsumexp (nnz * n_topics exponentials) per step.
    rate = tf.reduce_sum(tf.gather(cell_topic, rows) * tf.gather(tf.transpose(topic_gene), genes), axis=-1)
    log_rate = tf.math.log(rate + 1e-30)
    if offsets is not None:
        cell_batch = tf.gather(batch_ids, rows)
        log_rate += tf.gather_nd(offsets, tf.stack([tf.cast(cell_batch, tf.int64), genes], axis=1))
        normaliser = tf.reduce_sum(cell_topic * tf.gather(tf.matmul(tf.exp(offsets), topic_gene, transpose_b=True),
                                                          batch_ids), axis=-1)
        log_rate -= tf.gather(tf.math.log(normaliser), rows)
    n_rows = tf.shape(log_cell_topic, out_type=tf.int64)[0]
    per_entry = counts.values * log_rate - tf.math.lgamma(counts.values + 1.0)
    library = tf.math.unsorted_segment_sum(counts.values, rows, n_rows)
    return tf.math.unsorted_segment_sum(per_entry, rows, n_rows) + tf.math.lgamma(library + 1.0)


def as_sparse(counts):
    """A count matrix as a tf.SparseTensor (dense inputs are converted; sparse pass through)."""
    if isinstance(counts, tf.SparseTensor):
        return counts
    return tf.sparse.from_dense(tf.convert_to_tensor(counts, tf.float32))
