"""Speed and scale: the likelihood's cost in nonzeros, streaming from disk under a memory cap, several workers."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tfp_scmix.data import DataError, from_anndata
from tfp_scmix.sparse_ops import padded_size, topic_rate
from tfp_scmix.stream import H5ADStream, build_model
from tfp_scmix.synthetic import sample_counts, to_anndata

HERE = Path(__file__).parent
ROOT = HERE.parent


def write(adata, path):
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory):
    """(SCData, .h5ad path) of counts from the model's generative process, with unknown labels and 2 batches."""
    data, _ = sample_counts(n_cells=700, n_genes=120, n_topics=4, n_classes=3, n_labelled=200, seed=5)
    adata = to_anndata(data)
    adata.obs["donor"] = np.where(np.arange(data.n_cells) % 3 == 0, "d1", "d2")
    return data, write(adata, tmp_path_factory.mktemp("stream") / "synthetic.h5ad")


def identified_file(path, n_cells=1000, n_genes=30):
    """An .h5ad whose gene 0 holds each cell's id + 1, so that batches can be traced back to cells."""
    rng = np.random.default_rng(0)
    counts = sp.random(n_cells, n_genes, density=0.3, random_state=1, format="csr",
                       data_rvs=lambda n: rng.integers(1, 9, n)).tolil()
    counts[:, 0] = np.arange(1, n_cells + 1)[:, None]
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["a", "b"], n_cells))},
                       index=[f"c{i}" for i in range(n_cells)])
    adata = anndata.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs,
                            var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    return write(adata, path)


def cell_ids(stream, **kwargs):
    """The ids (gene 0 - 1) of the cells in each numpy minibatch of a stream made by identified_file."""
    order = []
    for indices, values, _, _ in stream.batches_numpy(**kwargs):
        first = indices[:, 1] == 0
        assert np.array_equal(indices[first, 0], np.arange(first.sum()))  # every row has its id gene
        order.append(values[first].astype(int) - 1)
    return order


# -- streaming -------------------------------------------------------------------------------
def test_stream_batches_match_the_in_memory_dataset(synthetic_file):
    data, path = synthetic_file
    stream = H5ADStream(path, batch_key="donor", chunk_cells=64)
    in_memory = from_anndata(path, batch_key="donor")
    assert stream.classes == in_memory.classes and list(stream.genes) == list(in_memory.genes)
    assert np.array_equal(stream.labels, in_memory.labels) and np.array_equal(stream.batches, in_memory.batches)
    assert stream.n_labelled == 200
    ours = list(stream.dataset(batch_size=100, shuffle=False))
    theirs = list(in_memory.dataset(batch_size=100, shuffle=False))
    assert len(ours) == len(theirs) == 7
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        assert a["counts"].dense_shape.numpy().tolist() == b["counts"].dense_shape.numpy().tolist()
        assert np.array_equal(a["counts"].indices.numpy(), b["counts"].indices.numpy())  # canonical order
        assert np.array_equal(a["counts"].values.numpy(), b["counts"].values.numpy())
        assert np.array_equal(a["label"].numpy(), b["label"].numpy())
        assert np.array_equal(a["batch"].numpy(), b["batch"].numpy())
    library, gene_sums = stream.summary()
    assert np.allclose(library, data.library_size) and np.allclose(gene_sums, data.counts.sum(axis=0))


def test_stream_shuffles_by_chunk_and_buffer_and_shards_by_chunk(tmp_path):
    stream = H5ADStream(identified_file(tmp_path / "ids.h5ad"), chunk_cells=100)
    passes = [np.concatenate(cell_ids(stream, batch_size=64, seed=(0, i), buffer_chunks=3)) for i in range(2)]
    for order in passes:  # every cell exactly once per pass, in whole batches but the last
        assert np.array_equal(np.sort(order), np.arange(1000))
    assert not np.array_equal(passes[0], passes[1]) and not np.array_equal(passes[0], np.arange(1000))
    assert np.array_equal(passes[0], np.concatenate(cell_ids(stream, batch_size=64, seed=(0, 0), buffer_chunks=3)))
    sizes = [len(b) for b in cell_ids(stream, batch_size=64, seed=(0, 0), buffer_chunks=3)]
    assert set(sizes[:-1]) == {64} and sizes[-1] == 1000 % 64
    # A buffer holds whole chunks: cells of one buffer never mix with those of another.
    first_buffer = np.concatenate(cell_ids(stream, batch_size=50, seed=3, buffer_chunks=3))[:300] // 100
    assert len(set(first_buffer.tolist())) == 3
    shards = [np.concatenate(cell_ids(stream, batch_size=64, num_shards=3, shard_index=i)) for i in range(3)]
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(1000))
    assert set(np.unique(shards[1] // 100)) == {1, 4, 7}
    # tf.data: each pass (epoch) of a repeated dataset is shuffled anew.
    ds = stream.dataset(batch_size=500, seed=0, repeat=True)
    first = [next(iter(ds.skip(i).take(1)))["counts"] for i in (0, 2)]
    assert not np.array_equal(first[0].values.numpy()[:20], first[1].values.numpy()[:20])


def test_stream_aligns_genes_like_from_anndata(synthetic_file):
    data, path = synthetic_file
    vocabulary = list(data.genes[::-3][:30]) + ["not_a_gene"]
    stream = H5ADStream(path, genes=vocabulary, label_key=None, chunk_cells=256)
    aligned = from_anndata(path, genes=vocabulary, label_key=None, allow_empty_cells=True)
    chunks = sp.vstack([chunk for _, chunk in stream.chunks()])
    assert chunks.shape == (700, 31) and abs(chunks - aligned.counts).sum() == 0
    subset = stream.to_data(np.array([5, 600, 3]))
    assert np.array_equal(subset.counts.toarray(), aligned.counts[[3, 5, 600]].toarray())
    assert list(subset.obs_names) == [aligned.obs_names[i] for i in (3, 5, 600)]
    with pytest.raises(DataError, match="only 0 of the model's"):
        H5ADStream(path, genes=["x", "y"], label_key=None)


def test_stream_refuses_column_major_and_non_count_files(tmp_path, synthetic_file):
    data, _ = synthetic_file
    adata = to_anndata(data)
    adata.X = sp.csc_matrix(adata.X)
    with pytest.raises(DataError, match="stored as csc_matrix.*tocsr"):
        H5ADStream(write(adata, tmp_path / "csc.h5ad"))
    adata.X = sp.csr_matrix(np.log1p(data.counts.toarray()))
    stream = H5ADStream(write(adata, tmp_path / "log.h5ad"))
    with pytest.raises(DataError, match="not integers"):
        stream.summary()
    with pytest.raises(DataError, match="no obs column 'nope'"):
        H5ADStream(tmp_path / "log.h5ad", label_key="nope")


CAPPED_CHILD = r"""
import json, resource, sys
import anndata, keras, numpy as np, tensorflow as tf
from tfp_scmix.stream import H5ADStream, build_model

def vm(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024

path, budget = sys.argv[1], int(sys.argv[2]) * 2 ** 20
stream = H5ADStream(path, chunk_cells=1024)
model = build_model(stream, n_topics=5, hidden_units=32)
model.compile(optimizer=keras.optimizers.Adam(1e-3))
# Warm up TensorFlow's thread pools and allocators, then cap the address space at what they hold plus
# `budget`: less than the counts of the file take in memory.
model.fit(stream.dataset(256, repeat=True), epochs=1, steps_per_epoch=3, verbose=0)
for _ in stream.dataset(1024, shuffle=False).take(2):
    pass
cap = vm("VmSize") + budget
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
stream = H5ADStream(path, chunk_cells=1024)
history = model.fit(stream.dataset(256, repeat=True), epochs=1, steps_per_epoch=20, verbose=0)
library, _ = stream.summary()
cells, total = 0, 0.0
for batch in stream.dataset(1024, shuffle=False):
    cells += int(batch["label"].shape[0])
    total += float(tf.reduce_sum(batch["counts"].values))
result = {"cells": cells, "total": total, "summary_total": float(library.sum()),
          "loss": history.history["loss"][-1]}
try:
    anndata.read_h5ad(path)
    result["whole_file"] = "loaded"
except MemoryError:
    result["whole_file"] = "MemoryError"
print(json.dumps(result))
"""


def test_stream_trains_from_a_file_larger_than_the_memory_cap(tmp_path):
    """50,000 cells x 1,000 nonzeros (380 MB as CSR in memory) stream through a process capped at 250 MB."""
    n_cells, per_cell, n_genes = 50_000, 1000, 2000
    rng = np.random.default_rng(0)
    indices = np.tile(np.sort(rng.choice(n_genes, per_cell, replace=False)).astype(np.int32), n_cells)
    counts = sp.csr_matrix((rng.integers(1, 5, n_cells * per_cell).astype(np.float32), indices,
                            np.arange(n_cells + 1, dtype=np.int64) * per_cell), shape=(n_cells, n_genes))
    labels = np.where(rng.random(n_cells) < 0.05, np.array(["a", "b"])[rng.integers(0, 2, n_cells)], None)
    path = write(anndata.AnnData(X=counts, obs=pd.DataFrame({"cell_type": pd.Categorical(labels)},
                                                           index=[f"c{i}" for i in range(n_cells)]),
                                 var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])), tmp_path / "big.h5ad")
    total = float(counts.data.sum())
    in_memory_mb = (counts.data.nbytes + counts.indices.nbytes) / 2 ** 20
    del counts, indices
    budget_mb = 250
    assert in_memory_mb > 1.4 * budget_mb
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", CAPPED_CHILD, str(path), str(budget_mb)], capture_output=True,
                          text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cells"] == n_cells and result["total"] == pytest.approx(total, rel=1e-6)
    assert result["summary_total"] == pytest.approx(total, rel=1e-6)
    assert np.isfinite(result["loss"])
    assert result["whole_file"] == "MemoryError"  # the cap is real: the counts do not fit under it


def test_build_model_matches_from_data(synthetic_file):
    from tfp_scmix.model import SCMix

    data, path = synthetic_file
    ours, theirs = build_model(H5ADStream(path), n_topics=4), SCMix.from_data(from_anndata(path), n_topics=4)
    assert ours.settings == theirs.settings
    assert np.allclose(ours.topics.background.numpy(), theirs.topics.background.numpy(), atol=1e-6)


# -- the likelihood's cost -------------------------------------------------------------------
def likelihood_program(n_genes, tmp_path, n_cells=256, per_cell=10, n_topics=8, seed=0):
    """(log-likelihoods, [(entries, op type, op name)] of every array the forward + gradient program computed)
    for counts whose nonzeros all lie in the first 1,000 genes; genes past those have zero probability in
    every topic. Sizes are recorded while it runs (TensorFlow's debug dump in SHAPE mode), nested functions
    included; the nonzero product runs in graph mode (jit=False) so that each of its ops is recorded too."""
    import tensorflow as tf
    from tensorflow.python.debug.lib import debug_events_reader

    from tfp_scmix.loss import multinomial_log_prob

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
        arrays = [(int(reader.graph_execution_trace_to_tensor_value(trace)[3]), trace.op_type, trace.op_name)
                  for trace in reader.graph_execution_traces()]
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


def test_topic_rate_matches_the_plain_product_with_padded_nonzeros():
    """topic_rate (XLA forward with padded nonzeros, sparse-product gradient) against the plain gather product
    and TensorFlow's automatic gradient of it, with cells and genes in any order."""
    import tensorflow as tf

    assert [int(padded_size(n)) for n in (1, 7, 100, 1000, 512_003)] == [1, 8, 108, 1024, 524_288]
    sizes = np.array([int(padded_size(n)) for n in range(1, 5000)])
    assert np.all(sizes >= np.arange(1, 5000)) and np.all(sizes <= np.ceil(np.arange(1, 5000) * 2 ** (1 / 8)))
    assert len(np.unique(sizes[1000:])) <= 20  # few shapes: few XLA compilations
    rng = np.random.default_rng(0)
    cells, genes, topics, nnz = 64, 300, 7, 2001
    pairs = rng.permutation(cells * genes)[:nnz]  # distinct (cell, gene) pairs, unsorted
    indices = tf.constant(np.stack([pairs // genes, pairs % genes], axis=1), tf.int64)
    cell_topic = tf.Variable(rng.dirichlet(np.ones(topics), cells).astype(np.float32))
    topic_gene = tf.Variable(rng.dirichlet(np.ones(genes), topics).astype(np.float32))
    weights = tf.constant(rng.integers(1, 5, nnz).astype(np.float32))

    def plain(cell_topic, topic_gene, indices):
        return tf.reduce_sum(tf.gather(cell_topic, indices[:, 0]) * tf.gather(tf.transpose(topic_gene), indices[:, 1]),
                             axis=-1)

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
    import tensorflow as tf
    from scipy.special import gammaln

    from tfp_scmix.sparse_ops import log_factorial, row_sums

    whole = np.array([0, 1, 2, 7, 4095, 4096, 100_000], np.float32)
    for x in (whole[:5], whole, np.array([0.5, 3.0, 12.25], np.float32)):  # table, past it, not whole counts
        np.testing.assert_allclose(log_factorial(tf.constant(x)).numpy(), gammaln(x.astype(np.float64) + 1),
                                   rtol=1e-6, atol=1e-6)
    rows = tf.constant([1, 1, 3, 3, 3], tf.int64)  # rows 0, 2 and 4 (last) have no nonzeros
    np.testing.assert_array_equal(row_sums(tf.constant([1.0, 2, 3, 4, 5]), rows, 5).numpy(), [0, 3, 0, 12, 0])


# -- several workers -------------------------------------------------------------------------
def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_and_two_devices_agree_with_one(tmp_path, synthetic_file):
    """MultiWorkerMirroredStrategy over two CPU workers on 127.0.0.1 (TF_CONFIG) and MirroredStrategy over two
    logical CPUs, each replica fed the same cells as one worker: after 3 steps every weight equals the
    one-worker run's. Then the workers train on their own shards and their trainable weights stay in sync
    (batch-normalisation moving statistics are each replica's own, as in Keras)."""
    _, path = synthetic_file
    worker = str(HERE / "_distribute_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    runs = {"single": ("reference", env)}
    for index in range(2):
        runs[f"worker{index}"] = ("multi_worker", {**env, "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})})
    processes = {name: subprocess.Popen([sys.executable, worker, strategy, str(path), str(tmp_path / f"{name}.npz"),
                                         "3", "32"], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                 for name, (strategy, run_env) in runs.items()}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=400)
        assert process.returncode == 0, f"{name} failed:\n{stderr[-3000:]}"
    out = {name: np.load(tmp_path / f"{name}.npz") for name in [*runs, "single_mirrored"]}
    assert [int(out[n]["replicas"]) for n in ("single", "single_mirrored", "worker0", "worker1")] == [1, 2, 2, 2]
    # cells_seen (the KL warm-up's clock) counts one replica's cells or all replicas' (with aggregation="sum").
    counter = [f"w{i}" for i, path in enumerate(out["single"]["names"]) if "cells_seen" in str(path)]
    for run in ("single_mirrored", "worker0", "worker1"):
        assert out[run][counter[0]] / out["single"][counter[0]] in (1.0, int(out[run]["replicas"]))
    names = [k for k in out["single"].files if k.startswith("w") and k not in counter]
    assert len(names) > 10
    changed = [not np.allclose(out["single"][n], out["single"]["init" + n[1:]]) for n in names]
    assert sum(changed) > len(names) // 2  # the steps did train
    for run in ("single_mirrored", "worker0", "worker1"):
        for name in names:
            np.testing.assert_allclose(out[run][name], out["single"][name], rtol=1e-5, atol=1e-6, err_msg=run)
    trainable = out["worker0"]["trainable"]
    sharded = [k for k in out["worker0"].files if k.startswith("sharded") and trainable[int(k[7:])]]
    for name in sharded:
        np.testing.assert_array_equal(out["worker0"][name], out["worker1"][name])
    assert any(not np.allclose(out["worker0"][n], out["worker0"]["w" + n[7:]]) for n in sharded)


def test_strategy_setting_is_checked(monkeypatch):
    from tfp_scmix.distribute import get_strategy

    with pytest.raises(ValueError, match="strategy must be one of"):
        get_strategy("ring")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{cluster")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_strategy("multi_worker")


# -- the benchmark's data ------------------------------------------------------------------------
def test_benchmark_writes_readable_h5ad_in_chunks(tmp_path, synthetic_file):
    from experiments.performance.run import file_stats, gene_panel, write_h5ad

    data, _ = synthetic_file
    condition = np.where(np.arange(data.n_cells) % 2, "ctrl", "stim")
    panel, genes = gene_panel(data.counts, data.genes, 150)  # 120 real genes + 30 resampled columns
    assert panel.shape == (700, 150) and list(genes[:120]) == list(data.genes)
    chunks = [(panel[i:i + 256], condition[i:i + 256]) for i in range(0, 700, 256)]
    path = write_h5ad(tmp_path / "panel.h5ad", iter(chunks), 700, genes)
    adata = anndata.read_h5ad(path)
    assert abs(sp.csr_matrix(adata.X) - panel).sum() == 0 and list(adata.var_names) == list(genes)
    assert 0 < adata.obs["cell_type"].notna().sum() < 100
    cells, n_genes, density, _ = file_stats(path)
    assert (cells, n_genes) == (700, 150) and density == pytest.approx(panel.nnz / (700 * 150))
    top, _ = gene_panel(data.counts, data.genes, 40)
    assert top.sum() >= np.sort(np.asarray(data.counts.sum(axis=0)).ravel())[-40:].sum() - 1e-3


def test_keras_leaves_xla_off_for_the_training_step(synthetic):
    """The step's sparse ops have no XLA kernels: jit_compile="auto" (XLA where there is a GPU) and True both
    give a model that trains without XLA, instead of failing in the first step."""
    import keras
    from keras.src.trainers.trainer import model_supports_jit

    from tfp_scmix.model import SCMix

    data, _ = synthetic
    model = SCMix.from_data(data, n_topics=4)
    assert not model_supports_jit(model)
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    assert model.jit_compile is False
    model.fit(data.dataset(256), epochs=1, verbose=0)
