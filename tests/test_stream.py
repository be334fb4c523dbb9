"""H5ADStream: an .h5ad read from disk in chunks, equal to the data in memory, in bounded memory."""

import json
import os
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tfp_scmix.data import DataError, from_anndata
from tfp_scmix.stream import H5ADStream
from tfp_scmix.synthetic import to_anndata


def write(adata, path):
    adata.write_h5ad(path)
    return path


def identified_file(path, n_cells=1000, n_genes=30):
    """An .h5ad whose gene 0 holds each cell's id + 1, so that batches can be traced back to cells."""
    rng = np.random.default_rng(0)
    counts = sp.random(
        n_cells, n_genes, density=0.3, random_state=1, format="csr", data_rvs=lambda n: rng.integers(1, 9, n)
    ).tolil()
    counts[:, 0] = np.arange(1, n_cells + 1)[:, None]
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(rng.choice(["a", "b"], n_cells))}, index=[f"c{i}" for i in range(n_cells)]
    )
    adata = anndata.AnnData(
        X=sp.csr_matrix(counts, dtype=np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    )
    return write(adata, path)


def cell_ids(stream, **kwargs):
    """The ids (gene 0 - 1) of the cells in each numpy minibatch of a stream made by identified_file."""
    order = []
    for indices, values, _, _ in stream.batches_numpy(**kwargs):
        first = indices[:, 1] == 0
        assert np.array_equal(indices[first, 0], np.arange(first.sum()))  # every row has its id gene
        order.append(values[first].astype(int) - 1)
    return order


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
    assert stream.nonzero_fraction == data.nonzero_fraction == data.counts.nnz / (data.n_cells * data.n_genes) > 0


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
    with pytest.raises(DataError, match="not integers.*--counts counts"):  # detection finds no counts at the open
        H5ADStream(write(adata, tmp_path / "log.h5ad"))
    stream = H5ADStream(tmp_path / "log.h5ad", counts="X")  # named: checked chunk by chunk as it is read
    with pytest.raises(DataError, match="not integers"):
        stream.summary()
    with pytest.raises(DataError, match="no obs column 'nope'.*--label-key"):
        H5ADStream(tmp_path / "log.h5ad", counts="X", label_key="nope")


def test_stream_finds_the_raw_counts_in_a_layer_as_from_anndata_does(tmp_path, synthetic_file):
    data, _ = synthetic_file
    adata = to_anndata(data)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(data.counts.toarray()))
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object).where(np.arange(adata.n_obs) % 3 > 0, "Unknown")
    path = write(adata, tmp_path / "lognorm_with_layer.h5ad")
    stream = H5ADStream(path, unlabeled_category="Unknown")
    assert stream.counts_key == "counts"
    memory = from_anndata(path, unlabeled_category="Unknown")
    assert np.array_equal(stream.to_data(np.arange(stream.n_cells)).counts.toarray(), memory.counts.toarray())
    assert np.array_equal(stream.labels, memory.labels) and "Unknown" not in stream.classes
    assert (stream.labels[(adata.obs["cell_type"] == "Unknown").to_numpy()] == -1).all()
    with pytest.raises(DataError, match="unlabeled_category 'unknown'.*'Unknown'"):
        H5ADStream(path, unlabeled_category="unknown")


CAPPED_CHILD = r"""
import json, resource, sys
import anndata, keras, numpy as np, tensorflow as tf
import tfp_scmix as scm
from tfp_scmix.stream import H5ADStream

def vm(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024

path, budget = sys.argv[1], int(sys.argv[2]) * 2 ** 20
stream = H5ADStream(path, chunk_cells=1024)
model = scm.SCMix.from_data(stream, scm.Config(n_topics=5, hidden_units=32))
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
    counts = sp.csr_matrix(
        (
            rng.integers(1, 5, n_cells * per_cell).astype(np.float32),
            indices,
            np.arange(n_cells + 1, dtype=np.int64) * per_cell,
        ),
        shape=(n_cells, n_genes),
    )
    labels = np.where(rng.random(n_cells) < 0.05, np.array(["a", "b"])[rng.integers(0, 2, n_cells)], None)
    path = write(
        anndata.AnnData(
            X=counts,
            obs=pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(n_cells)]),
            var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
        ),
        tmp_path / "big.h5ad",
    )
    total = float(counts.data.sum())
    in_memory_mb = (counts.data.nbytes + counts.indices.nbytes) / 2**20
    del counts, indices
    budget_mb = 250
    assert in_memory_mb > 1.4 * budget_mb
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", CAPPED_CHILD, str(path), str(budget_mb)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cells"] == n_cells and result["total"] == pytest.approx(total, rel=1e-6)
    assert result["summary_total"] == pytest.approx(total, rel=1e-6)
    assert np.isfinite(result["loss"])
    assert result["whole_file"] == "MemoryError"  # the cap is real: the counts do not fit under it


def test_rechunked_reads_the_same_cells_and_leaves_the_original(tmp_path):
    stream = H5ADStream(identified_file(tmp_path / "ids.h5ad"), chunk_cells=100)
    small = stream.rechunked(30)
    assert (small.chunk_cells, stream.chunk_cells) == (30, 100)
    assert [len(rows) for rows, _ in small.chunks()] == [30] * 33 + [10]
    np.testing.assert_array_equal(np.concatenate(cell_ids(small, batch_size=64, shuffle=False)), np.arange(1000))
    assert small.fingerprint() == stream.fingerprint()
    with pytest.raises(ValueError, match="chunk_cells must be positive, received 0"):
        stream.rechunked(0)


def test_fingerprint_identifies_counts_labels_and_batches(synthetic_file, tmp_path):
    data, path = synthetic_file
    fingerprint = H5ADStream(path, batch_key="donor").fingerprint()
    assert len(fingerprint) == 16 and H5ADStream(path, batch_key="donor", chunk_cells=50).fingerprint() == fingerprint
    assert H5ADStream(path).fingerprint() != fingerprint  # other batches
    assert H5ADStream(path, batch_key="donor", label_key=None).fingerprint() != fingerprint  # no labels
    adata = anndata.read_h5ad(path)
    adata.X = adata.X.copy()
    adata.X[0, adata.X[0].indices[0]] += 1  # one count more
    assert H5ADStream(write(adata, tmp_path / "one_more.h5ad"), batch_key="donor").fingerprint() != fingerprint
