"""Sparse kernels of the count likelihood: products over the nonzero counts only, optionally XLA-compiled.

`topic_rate` computes, for each nonzero count (cell n, gene g), rate = sum_k cell_topic[n, k] topic_gene[k, g]
(a sampled dense-dense product): cost O(nnz * n_topics), never O(cells * genes). In graph mode TensorFlow
materialises the `[nnz, n_topics]` gathers and their gradients, several passes over memory; compiled with
XLA the gather, product and sum fuse into one loop (and so do the two scatter-adds of the gradient).
XLA compiles one program per shape, and the number of nonzeros changes with every minibatch, so the
nonzeros are padded up to a few geometric sizes (at most `1 / BUCKETS_PER_DOUBLING` of padding, about
9%): a handful of compilations over a whole training run.
"""

import tensorflow as tf

BUCKETS_PER_DOUBLING = 8


def padded_size(n):
    """The bucket size (an int64 scalar >= n) that `n` nonzeros are padded up to: 2^(j / 8) rounded up."""
    n = tf.maximum(tf.cast(n, tf.float64), 1.0)
    exponent = tf.math.ceil(BUCKETS_PER_DOUBLING * tf.math.log(n) / tf.math.log(tf.constant(2.0, tf.float64)))
    return tf.cast(tf.math.ceil(2.0 ** (exponent / BUCKETS_PER_DOUBLING) - 1e-9), tf.int64)


@tf.function(jit_compile=True)
def _rate(cell_topic, gene_topic, rows, genes):
    return tf.reduce_sum(tf.gather(cell_topic, rows) * tf.gather(gene_topic, genes), axis=-1)


@tf.function(jit_compile=True)
def _rate_gradient(cell_topic, gene_topic, rows, genes, upstream):
    d_cell = tf.math.unsorted_segment_sum(upstream[:, None] * tf.gather(gene_topic, genes), rows,
                                          tf.shape(cell_topic)[0])
    d_gene = tf.math.unsorted_segment_sum(upstream[:, None] * tf.gather(cell_topic, rows), genes,
                                          tf.shape(gene_topic)[0])
    return d_cell, d_gene


def topic_rate(cell_topic, topic_gene, rows, genes, jit=True):
    """rate `[nnz]` = sum_k cell_topic[rows, k] * topic_gene[k, genes], with its gradient.

    cell_topic `[batch, n_topics]`, topic_gene `[n_topics, n_genes]`, rows / genes `[nnz]` (int64: the cell
    and gene of each nonzero count). jit=False gives the plain graph-mode product (same values).
    """
    gene_topic = tf.transpose(topic_gene)
    if not jit:
        return tf.reduce_sum(tf.gather(cell_topic, rows) * tf.gather(gene_topic, genes), axis=-1)
    nnz = tf.size(rows, out_type=tf.int64)
    pad = padded_size(nnz) - nnz
    # Padding entries point at cell 0 and gene 0 and get a zero upstream gradient: they change nothing.
    rows_padded, genes_padded = tf.pad(rows, [[0, pad]]), tf.pad(genes, [[0, pad]])

    @tf.custom_gradient
    def rate(cell_topic, gene_topic):
        def gradient(upstream):
            return _rate_gradient(cell_topic, gene_topic, rows_padded, genes_padded, tf.pad(upstream, [[0, pad]]))

        return _rate(cell_topic, gene_topic, rows_padded, genes_padded)[:nnz], gradient

    return rate(cell_topic, gene_topic)
