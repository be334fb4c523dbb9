import numpy as np
import tensorflow as tf

from tests.layers.helpers import normal_kl, roundtrip
from tfp_scmix.layers import CellEncoder
from tfp_scmix.layers.cell import csr_product, laplace_dirichlet_prior


def test_laplace_prior_matches_formula():
    loc, scale = laplace_dirichlet_prior(0.5, 5)
    assert np.allclose(loc, 0)
    assert np.allclose(scale.numpy() ** 2, (1 - 2 / 5) / 0.5 + 5 / 0.5 / 25)


def test_cell_encoder_kl_against_hand_formula():
    enc = CellEncoder(20, 5, hidden_units=8)
    counts = tf.sparse.from_dense(tf.constant(np.random.default_rng(0).poisson(2, (3, 20)).astype(np.float32)))
    loc, scale = enc(counts)
    assert loc.shape == (3, 5) and np.all(scale.numpy() > 0)
    dense_loc, _ = enc(tf.sparse.to_dense(counts))
    assert np.allclose(loc, dense_loc, atol=1e-5)
    shift = np.full((3, 5), 0.3, np.float32)
    p_loc, p_scale = (t.numpy() for t in enc.prior())
    expected = normal_kl(loc.numpy(), scale.numpy(), p_loc + shift, p_scale).sum(1)
    assert np.allclose(enc.kl(loc, scale, shift).numpy(), expected, rtol=1e-4)
    roundtrip(enc)


def test_cell_encoder_sparse_and_dense_products_agree():
    """Minibatches above DENSE_BATCH_LIMIT entries are multiplied sparse; both paths give the same posterior."""
    rng = np.random.default_rng(3)
    counts = rng.poisson(0.5, (64, 300)).astype(np.float32)
    sparse = tf.sparse.from_dense(counts)
    encoder = CellEncoder(300, 6)
    dense_loc, dense_scale = encoder(sparse)
    encoder.DENSE_BATCH_LIMIT = 0  # every minibatch is now "wide"
    sparse_loc, sparse_scale = encoder(sparse)
    np.testing.assert_allclose(sparse_loc.numpy(), dense_loc.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sparse_scale.numpy(), dense_scale.numpy(), rtol=1e-4, atol=1e-5)


def test_first_layer_is_the_same_whether_normalised_before_or_after_densifying():
    """Sparse minibatches below SPARSE_DENSITY nonzeros are normalised on their nonzeros, denser ones after
    densifying, those of a model with `sparse_product` multiplied by the CSR kernel, and dense input as it is: the
    same products and kernel gradients every way. The batch offsets
    divide the counts but get no gradient through the encoder (they learn from the likelihood)."""
    rng = np.random.default_rng(1)
    enc = CellEncoder(200, 4, hidden_units=8)
    offsets = tf.Variable(rng.normal(0, 0.3, (2, 200)).astype(np.float32))
    batch_ids = tf.constant([0, 1, 1, 0, 1, 0])
    for density in (0.03, 0.4):
        counts = (rng.poisson(3, (6, 200)) * (rng.random((6, 200)) < density)).astype(np.float32)
        results = []
        for given, csr in (
            (tf.sparse.from_dense(counts), False),
            (tf.sparse.from_dense(counts), True),
            (tf.constant(counts), False),
        ):
            enc.sparse_product = csr  # TensorFlow's CSR kernel instead of densifying (`SCMix.from_data` sets it)

            def first_layer(given):
                with tf.GradientTape() as tape:
                    product = enc.first_layer(given, batch_ids, offsets)
                    loss = tf.reduce_sum(tf.sin(product))
                kernel_gradient, offsets_gradient = tape.gradient(loss, [enc.kernel, offsets])
                assert offsets_gradient is None
                return product, kernel_gradient

            for run in (first_layer, tf.function(first_layer)):  # eager, and traced as Keras's training step is
                results.append(list(run(given)))
        fraction = np.count_nonzero(counts) / counts.size
        assert (fraction <= CellEncoder.SPARSE_DENSITY) == (density < 0.1)
        for other in results[1:]:
            for got, expected in zip(other, results[0]):
                # float32 sums in another order: round-off grows with the size of the terms, not of the result
                # (an entry near 0.25 of a gradient whose entries reach about 5 differed by 1.5e-5 in one CI run)
                scale = max(1.0, float(np.abs(expected.numpy()).max()))
                np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5 * scale)
        x = np.log1p(
            counts
            / np.exp(offsets.numpy()[batch_ids.numpy()])
            * 1e4
            / np.maximum((counts / np.exp(offsets.numpy()[batch_ids.numpy()])).sum(1, keepdims=True), 1.0)
        )
        np.testing.assert_allclose(results[0][0].numpy(), x @ enc.kernel.numpy(), rtol=1e-4, atol=1e-4)


def test_csr_product_gradient_is_deterministic():
    """The CSR product's kernel gradient is bit-identical call after call, as seeded training needs. TensorFlow's
    `SparseMatrixMatMul(transpose_a=True)`, which it replaced, gave different last bits on most calls of this size
    (256 x 2,000 at 5%, 2 threads)."""
    rng = np.random.default_rng(0)
    counts = (rng.random((256, 2000)) < 0.05) * rng.integers(1, 5, (256, 2000))
    x = tf.sparse.from_dense(counts.astype(np.float32))
    kernel = tf.constant(rng.normal(size=(2000, 130)).astype(np.float32))
    upstream = tf.constant(rng.normal(size=(256, 130)).astype(np.float32))

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            loss = tf.reduce_sum(csr_product(x, kernel) * upstream)
        return tape.gradient(loss, kernel)

    first = gradient().numpy()
    np.testing.assert_allclose(first, counts.T.astype(np.float32) @ upstream.numpy(), rtol=1e-4, atol=1e-3)
    assert all(np.array_equal(gradient().numpy(), first) for _ in range(20))
