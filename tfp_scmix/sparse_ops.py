"""Sparse kernels of the count likelihood: products over the nonzero counts only.

`topic_rate` computes, for each nonzero count (cell n, gene g), rate = sum_k cell_topic[n, k] topic_gene[k, g]
(a sampled dense-dense product): cost O(nnz * n_topics), never O(cells * genes).

Forward: in graph mode TensorFlow materialises the two `[nnz, n_topics]` gathers, several passes over
memory; compiled with XLA the gather, product and sum fuse into one loop. XLA compiles one program per
shape, and the number of nonzeros changes with every minibatch, so the nonzeros are padded up to a few
geometric sizes (at most `1 / BUCKETS_PER_DOUBLING` of padding, about 9%): a handful of compilations over
a whole training run.

Gradient: with U the sparse `[cells, genes]` matrix of upstream gradients at the nonzeros,
d cell_topic = U @ gene_topic and d gene_topic = U^T @ cell_topic: two sparse-dense products,
O(nnz * n_topics), which TensorFlow's SparseTensorDenseMatMul kernel does without materialising any
`[nnz, n_topics]` array: with the XLA forward, faster on CPU than the automatic gradient's scatter-adds
(by how much is measured on one minibatch of 1,024 Kang cells: the topic-rate line of the XLA section of
experiments/performance/results.md, discussed in docs/performance.md).

Column blocks: both kernels slow down several times over once the dense factor has 32 or more
columns (on CPU TensorFlow's SparseTensorDenseMatMul leaves its scalar loop for a vectorised one that is much
slower here; XLA's fused gather-product likewise), so products with many topics (or units, classes) run
in blocks of at most `COLUMN_BLOCK` columns (`column_blocks`, `sparse_dense_product`): the same sums, in
pieces. The measured gain is the "topics in blocks" line of the XLA section of experiments/performance/results.md.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

BUCKETS_PER_DOUBLING = 8
# Dense columns per block of the sparse products (see the module docstring): below TensorFlow's vectorisation
# threshold of 32 columns, and where XLA's fused product still ran fast on the Kang minibatches.
COLUMN_BLOCK = 25
# log(x!) for x = 0 .. 4,095 (float64 sums of logs, stored as float32).
LOG_FACTORIAL = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, 4096)))]).astype(np.float32)


def row_sums(values: tf.Tensor, rows: tf.Tensor, n_rows: int | tf.Tensor) -> tf.Tensor:
    """Per-row sums `[n_rows]` of the values `[nnz]` of a sparse matrix whose `rows` `[nnz]` (int64) are sorted
    (canonical order).

    A sorted segment sum, faster on CPU than an unsorted one (docs/performance.md, "What changed since the
    first grid"); rows without nonzeros sum to zero. `tf.math.segment_sum` raises InvalidArgumentError for
    unsorted rows on CPU and gives unspecified sums on GPU, hence the canonical order that every pipeline of
    this package yields.
    """
    sums = tf.math.segment_sum(values, rows)
    return tf.pad(sums, [[0, n_rows - tf.shape(sums, out_type=tf.int64)[0]]])


def log_factorial(x: tf.Tensor) -> tf.Tensor:
    """log(x!) = lgamma(x + 1) `[n]` of counts x `[n]` (float): a table lookup when every x is a whole count
    below 4,096 (`LOG_FACTORIAL`; as UMI counts usually are), lgamma otherwise."""
    whole = tf.cast(x, tf.int32)
    in_table = tf.reduce_all((tf.cast(whole, x.dtype) == x) & (whole >= 0) & (whole < len(LOG_FACTORIAL)))
    return tf.cond(in_table, lambda: tf.gather(LOG_FACTORIAL, whole), lambda: tf.math.lgamma(x + 1.0))


def padded_size(n: int | tf.Tensor) -> tf.Tensor:
    """The bucket size (an int64 scalar >= n) that `n` nonzeros are padded up to: 2^(j / 8) rounded up, with
    j the smallest integer that reaches n (8 = `BUCKETS_PER_DOUBLING`)."""
    n = tf.maximum(tf.cast(n, tf.float64), 1.0)
    exponent = tf.math.ceil(BUCKETS_PER_DOUBLING * tf.math.log(n) / tf.math.log(tf.constant(2.0, tf.float64)))
    return tf.cast(tf.math.ceil(2.0 ** (exponent / BUCKETS_PER_DOUBLING) - 1e-9), tf.int64)


def column_blocks(n_columns: int | None) -> list[slice]:
    """Slices that split `n_columns` into the fewest blocks of at most `COLUMN_BLOCK` columns, of (nearly) equal
    width, so that a product compiled with XLA sees at most two block shapes; one block of all columns when their
    number is not known (None: not static)."""
    if n_columns is None:
        return [slice(None)]
    if n_columns == 0:
        return [slice(0, 0)]
    n_blocks = -(-int(n_columns) // COLUMN_BLOCK)
    width = -(-int(n_columns) // n_blocks)
    return [slice(start, min(start + width, n_columns)) for start in range(0, n_columns, width)]


def sparse_dense_product(x: tf.SparseTensor, dense: tf.Tensor, adjoint_a: bool = False) -> tf.Tensor:
    """x @ dense `[rows, columns]` (x^T @ dense with `adjoint_a`) of a SparseTensor x and a dense matrix with a
    static number of columns: TensorFlow's `sparse_dense_matmul`, in blocks of at most `COLUMN_BLOCK` columns
    (module docstring). Same values as one call; differentiable as `sparse_dense_matmul` is."""
    blocks = column_blocks(dense.shape[-1])
    if len(blocks) == 1:
        return tf.sparse.sparse_dense_matmul(x, dense, adjoint_a=adjoint_a)
    return tf.concat([tf.sparse.sparse_dense_matmul(x, dense[:, b], adjoint_a=adjoint_a) for b in blocks], axis=1)


def _rate(cell_topic, gene_topic, rows, genes):
    return tf.reduce_sum(tf.gather(cell_topic, rows) * tf.gather(gene_topic, genes), axis=-1)


_rate_xla = tf.function(_rate, jit_compile=True)


def _padded_rate(cell_topic, gene_topic, rows, genes):
    """`_rate` compiled with XLA, the nonzeros padded to a bucket size (entries pointing at cell 0, gene 0)."""
    nnz = tf.size(rows, out_type=tf.int64)
    pad = padded_size(nnz) - nnz
    return _rate_xla(cell_topic, gene_topic, tf.pad(rows, [[0, pad]]), tf.pad(genes, [[0, pad]]))[:nnz]


def topic_rate(cell_topic: tf.Tensor, topic_gene: tf.Tensor, indices: tf.Tensor, jit: bool = True) -> tf.Tensor:
    """rate `[nnz]` = sum_k cell_topic[cell, k] * topic_gene[k, gene] for each (cell, gene) row of `indices`.

    cell_topic `[batch, n_topics]`, topic_gene `[n_topics, n_genes]`, indices `[nnz, 2]` (int64: the cell
    and gene of each nonzero count, a SparseTensor's indices: each pair at most once, in any order).
    jit=False computes the forward product in graph mode (same values). Differentiable in both factors.
    """
    rows, genes = indices[:, 0], indices[:, 1]
    shape = tf.stack([tf.shape(cell_topic, out_type=tf.int64)[0], tf.shape(topic_gene, out_type=tf.int64)[1]])

    @tf.custom_gradient
    def rate(cell_topic, topic_gene):
        gene_topic = tf.transpose(topic_gene)

        def gradient(upstream):
            upstream_matrix = tf.SparseTensor(indices, upstream, shape)
            d_cell = sparse_dense_product(upstream_matrix, gene_topic)
            d_topic = sparse_dense_product(upstream_matrix, cell_topic, adjoint_a=True)
            return d_cell, tf.transpose(d_topic)

        product = _padded_rate if jit else _rate
        blocks = column_blocks(cell_topic.shape[-1])
        return tf.add_n([product(cell_topic[:, b], gene_topic[:, b], rows, genes) for b in blocks]), gradient

    return rate(cell_topic, topic_gene)
