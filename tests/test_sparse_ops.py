"""The likelihood's sparse kernels: the nonzero product with padded sizes, log-factorials, row sums."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_scmix.sparse_ops import (
    COLUMN_BLOCK,
    column_blocks,
    log_factorial,
    padded_size,
    row_sums,
    sparse_dense_product,
    topic_rate,
)


@pytest.mark.parametrize("topics", [7, 60])
def test_topic_rate_matches_the_plain_product_with_padded_nonzeros(topics):
    """topic_rate (XLA forward with padded nonzeros, sparse-product gradient; 60 topics: in column blocks) against
    the plain gather product and TensorFlow's automatic gradient of it, with cells and genes in any order."""
    assert [int(padded_size(n)) for n in (1, 7, 100, 1000, 512_003)] == [1, 8, 108, 1024, 524_288]
    sizes = np.array([int(padded_size(n)) for n in range(1, 5000)])
    assert np.all(sizes >= np.arange(1, 5000)) and np.all(sizes <= np.ceil(np.arange(1, 5000) * 2 ** (1 / 8)))
    assert len(np.unique(sizes[1000:])) <= 20  # few shapes: few XLA compilations
    rng = np.random.default_rng(0)
    cells, genes, nnz = 64, 300, 2001
    pairs = rng.permutation(cells * genes)[:nnz]  # distinct (cell, gene) pairs, unsorted
    indices = tf.constant(np.stack([pairs // genes, pairs % genes], axis=1), tf.int64)
    cell_topic = tf.Variable(rng.dirichlet(np.ones(topics), cells).astype(np.float32))
    topic_gene = tf.Variable(rng.dirichlet(np.ones(genes), topics).astype(np.float32))
    weights = tf.constant(rng.integers(1, 5, nnz).astype(np.float32))

    def plain(cell_topic, topic_gene, indices):
        return tf.reduce_sum(
            tf.gather(cell_topic, indices[:, 0]) * tf.gather(tf.transpose(topic_gene), indices[:, 1]), axis=-1
        )

    results = []
    for product in (plain, topic_rate, lambda *args: topic_rate(*args, jit=False)):
        with tf.GradientTape() as tape:
            rate = product(cell_topic, topic_gene, indices)
            loss = tf.reduce_sum(weights * tf.math.log(rate))
        gradients = tape.gradient(loss, [cell_topic, topic_gene])
        results.append([rate.numpy()] + [tf.convert_to_tensor(g).numpy() for g in gradients])
    assert results[1][0].shape == (nnz,)
    for ours in results[1:]:
        for expected, value in zip(results[0], ours):
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_log_factorial_and_row_sums():
    from scipy.special import gammaln

    whole = np.array([0, 1, 2, 7, 4095, 4096, 100_000], np.float32)
    for x in (whole[:5], whole, np.array([0.5, 3.0, 12.25], np.float32)):  # table, past it, not whole counts
        np.testing.assert_allclose(
            log_factorial(tf.constant(x)).numpy(), gammaln(x.astype(np.float64) + 1), rtol=1e-6, atol=1e-6
        )
    rows = tf.constant([1, 1, 3, 3, 3], tf.int64)  # rows 0, 2 and 4 (last) have no nonzeros
    np.testing.assert_array_equal(row_sums(tf.constant([1.0, 2, 3, 4, 5]), rows, 5).numpy(), [0, 3, 0, 12, 0])


def test_products_in_column_blocks_give_the_same_values():
    """Column blocks cover every column once, at most COLUMN_BLOCK wide and of at most two widths; the blocked
    sparse-dense product equals TensorFlow's single one, plain and transposed."""
    for n in (1, COLUMN_BLOCK, COLUMN_BLOCK + 1, 100, 143):
        blocks = column_blocks(n)
        covered = np.concatenate([np.arange(n)[b] for b in blocks])
        np.testing.assert_array_equal(covered, np.arange(n))
        widths = {b.stop - b.start for b in blocks}
        assert max(widths) <= COLUMN_BLOCK and len(widths) <= 2 and len(blocks) == -(-n // COLUMN_BLOCK)
    assert column_blocks(0) == [slice(0, 0)] and column_blocks(None) == [slice(None)]
    rng = np.random.default_rng(1)
    x = tf.sparse.from_dense(((rng.random((40, 90)) < 0.1) * rng.integers(1, 5, (40, 90))).astype(np.float32))
    for dense, adjoint in ((rng.normal(size=(90, 70)), False), (rng.normal(size=(40, 70)), True)):
        dense = tf.constant(dense.astype(np.float32))
        np.testing.assert_allclose(
            sparse_dense_product(x, dense, adjoint_a=adjoint).numpy(),
            tf.sparse.sparse_dense_matmul(x, dense, adjoint_a=adjoint).numpy(),
            rtol=1e-5,
            atol=1e-5,
        )
