"""The count likelihood on nonzero entries: its values, gradients and cost."""

import numpy as np
import scipy.stats as st
import tensorflow as tf

from tfp_scmix.loss import multinomial_log_prob


def test_multinomial_log_prob_against_scipy():
    rng = np.random.default_rng(2)
    counts = rng.poisson(1.0, (4, 12)).astype(np.float32)
    log_theta = np.log(rng.dirichlet(np.ones(3), 4)).astype(np.float32)
    log_beta = np.log(rng.dirichlet(np.ones(12), 3)).astype(np.float32)
    ours = multinomial_log_prob(tf.sparse.from_dense(counts), log_theta, log_beta).numpy()
    rate = np.exp(log_theta) @ np.exp(log_beta)
    expected = [st.multinomial.logpmf(c, c.sum(), r / r.sum()) for c, r in zip(counts, rate)]
    assert np.allclose(ours, expected, rtol=1e-4)


def test_multinomial_with_batch_offsets_against_scipy():
    rng = np.random.default_rng(3)
    counts = rng.poisson(1.0, (4, 12)).astype(np.float32)
    log_theta = np.log(rng.dirichlet(np.ones(3), 4)).astype(np.float32)
    log_beta = np.log(rng.dirichlet(np.ones(12), 3)).astype(np.float32)
    offsets = rng.normal(0, 0.5, (2, 12)).astype(np.float32)
    batch = np.array([0, 1, 1, 0], np.int32)
    ours = multinomial_log_prob(tf.sparse.from_dense(counts), log_theta, log_beta, offsets, batch).numpy()
    rate = (np.exp(log_theta) @ np.exp(log_beta)) * np.exp(offsets[batch])
    expected = [st.multinomial.logpmf(c, c.sum(), r / r.sum()) for c, r in zip(counts, rate)]
    assert np.allclose(ours, expected, rtol=1e-4)


def test_multinomial_gradients_match_the_dense_multinomial():
    """The sparse likelihood's gradients (custom sparse-product gradient of the topic rate, offsets) equal
    automatic differentiation of TFP's dense Multinomial on the same parameters."""
    import tensorflow_probability as tfp

    rng = np.random.default_rng(4)
    counts = (rng.poisson(0.7, (6, 15)) * (rng.random((6, 15)) < 0.6)).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    batch = tf.constant([0, 1, 1, 0, 1, 0], tf.int32)
    params = [tf.Variable(rng.normal(size=shape).astype(np.float32)) for shape in ((6, 3), (3, 15), (2, 15))]

    def gradients(log_prob):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(log_prob(tf.nn.log_softmax(params[0]), tf.nn.log_softmax(params[1]), params[2]))
        return [tf.convert_to_tensor(g).numpy() for g in tape.gradient(value, params)]

    def dense(log_theta, log_beta, offsets):
        rate = tf.exp(log_theta) @ tf.exp(log_beta) * tf.exp(tf.gather(offsets, batch))
        probs = rate / tf.reduce_sum(rate, axis=1, keepdims=True)
        return tfp.distributions.Multinomial(counts.sum(1), probs=probs).log_prob(counts)

    sparse = tf.sparse.from_dense(counts)
    for jit in (True, False):
        ours = gradients(lambda *p, jit=jit: multinomial_log_prob(sparse, *p, batch_ids=batch, jit=jit))
        for value, expected in zip(ours, gradients(dense)):
            np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5)


def likelihood_program(n_genes, tmp_path, n_cells=256, per_cell=10, n_topics=8, seed=0):
    """(log-likelihoods, [(entries, op type, op name)] of every array the forward + gradient program computed)
    for counts whose nonzeros all lie in the first 1,000 genes; genes past those have zero probability in
    every topic. Sizes are recorded while it runs (TensorFlow's debug dump in SHAPE mode), nested functions
    included; the nonzero product runs in graph mode (jit=False) so that each of its ops is recorded too."""
    from tensorflow.python.debug.lib import debug_events_reader

    rng = np.random.default_rng(seed)
    genes = np.stack([np.sort(rng.choice(1000, per_cell, replace=False)) for _ in range(n_cells)])
    indices = np.stack([np.repeat(np.arange(n_cells), per_cell), genes.ravel()], 1).astype(np.int64)
    values = rng.integers(1, 5, n_cells * per_cell).astype(np.float32)
    log_cell_topic = tf.nn.log_softmax(rng.normal(size=(n_cells, n_topics)).astype(np.float32))
    logits = np.full((n_topics, n_genes), -np.inf, np.float32)
    logits[:, :1000] = rng.normal(size=(n_topics, 1000))
    log_topic_gene = tf.nn.log_softmax(logits)
    offsets = np.zeros((2, n_genes), np.float32)
    offsets[:, :1000] = rng.normal(0, 0.1, size=(2, 1000))
    batch_ids = tf.constant(rng.integers(0, 2, n_cells).astype(np.int32))

    @tf.function
    def program(indices, values, log_cell_topic, log_topic_gene, offsets):
        counts = tf.SparseTensor(indices, values, [n_cells, n_genes])
        with tf.GradientTape() as tape:
            tape.watch([log_cell_topic, log_topic_gene, offsets])
            log_prob = multinomial_log_prob(counts, log_cell_topic, log_topic_gene, offsets, batch_ids, jit=False)
        return log_prob, tape.gradient(tf.reduce_sum(log_prob), [log_cell_topic, log_topic_gene, offsets])

    root = str(tmp_path / f"dump{n_genes}")
    tf.debugging.experimental.enable_dump_debug_info(root, tensor_debug_mode="SHAPE", circular_buffer_size=-1)
    try:
        log_prob = program(indices, values, log_cell_topic, log_topic_gene, offsets)[0].numpy()
    finally:
        tf.debugging.experimental.disable_dump_debug_info()
    with debug_events_reader.DebugDataReader(root) as reader:
        reader.update()
        arrays = [
            (int(reader.graph_execution_trace_to_tensor_value(trace)[3]), trace.op_type, trace.op_name)
            for trace in reader.graph_execution_traces()
        ]
    return log_prob, arrays


def test_likelihood_cost_grows_with_nonzeros_not_cells_times_genes(tmp_path):
    """Same nonzeros, 10x the genes: the same log-likelihoods, and no array the forward and gradient program
    computes grows to cells x genes: the largest is max(nnz x topics, batches x topics x genes)."""
    narrow, narrow_arrays = likelihood_program(1000, tmp_path)
    wide, wide_arrays = likelihood_program(10_000, tmp_path)
    np.testing.assert_allclose(wide, narrow, rtol=1e-5)
    assert len(wide_arrays) > 50  # every op of the program was recorded, gradient included
    assert {"SparseTensorDenseMatMul", "GatherV2"} <= {op for _, op, _ in wide_arrays}
    nnz_topics, topics_genes = 256 * 10 * 8, 2 * 8 * 10_000
    assert max(n for n, _, _ in narrow_arrays) <= max(nnz_topics, 2 * 8 * 1000)
    assert max(n for n, _, _ in wide_arrays) <= max(nnz_topics, topics_genes)
    assert max(n for n, _, _ in wide_arrays) < 256 * 10_000 / 15  # cells x genes would be 2,560,000
