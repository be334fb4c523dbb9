from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tfp_scmix.data import (
    DATA_DIR_ENV,
    DataError,
    align_genes,
    encode_labels,
    from_anndata,
    highly_variable_genes,
    log_normalised,
    read_h5ad,
)


def make_adata(counts, genes=None, labels=None):
    counts = np.asarray(counts, dtype=np.float32)
    genes = genes if genes is not None else [f"G{i}" for i in range(counts.shape[1])]
    obs = pd.DataFrame(index=[f"c{i}" for i in range(counts.shape[0])])
    if labels is not None:
        obs["cell_type"] = labels
    return anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))


COUNTS = np.array([[1, 0, 3, 0], [0, 2, 0, 5], [4, 1, 0, 0], [0, 0, 2, 2]])


def test_counts_from_x_layer_and_raw():
    adata = make_adata(COUNTS, labels=["a", "b", "a", "b"])
    data = from_anndata(adata)
    assert np.array_equal(data.counts.toarray(), COUNTS)
    assert data.classes == ["a", "b"] and data.labels.tolist() == [0, 1, 0, 1]
    # log-normalized X with counts in a layer: detected
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(COUNTS * 1.7))
    assert np.array_equal(from_anndata(adata).counts.toarray(), COUNTS)
    # counts in raw
    raw = make_adata(COUNTS, labels=["a", "b", "a", "b"])
    raw.raw = raw.copy()
    raw.X = sp.csr_matrix(np.log1p(COUNTS * 1.7))
    assert np.array_equal(from_anndata(raw, counts="raw").counts.toarray(), COUNTS)


@pytest.mark.parametrize(
    "values, message",
    [
        (np.log1p(COUNTS * 1.3), "log-normalized"),
        (COUNTS - 2.5, "negative"),
        (np.where(COUNTS == 3, np.nan, COUNTS), "NaN or infinite"),
        (np.where(COUNTS == 3, np.inf, COUNTS), "NaN or infinite"),
        # Decimals above what a log can reach (ambient-RNA-corrected counts: max 231 in issue 18).
        (COUNTS * 46.37, "max 232; 100% of the stored values have decimals.*look like corrected counts.*np.rint"),
        # sc.pp.normalize_total without log1p: every cell sums to 10,000 (max 1567 in issue 18).
        (COUNTS / COUNTS.sum(1, keepdims=True) * 1e4, "normalized but not log-transformed.*sums to 1e\\+04"),
    ],
)
def test_refuses_non_counts_with_a_fix(values, message):
    adata = make_adata(values, labels=["a", "b", "a", "b"])
    with pytest.raises(DataError, match=message) as err:
        from_anndata(adata)
    assert "counts=" in str(err.value) or "integers" in str(err.value) or "No slot of this AnnData" in str(err.value)


def test_the_fix_names_the_slot_that_holds_raw_counts():
    """A message about the counts of one slot names the slot of this AnnData that holds raw counts, or says that
    none does (a trial passed counts='raw' with log-normalised values there and was told to pass counts='raw')."""
    adata = make_adata(np.log1p(COUNTS * 1.3), labels=["a", "b", "a", "b"])
    adata.raw = adata.copy()
    adata.layers["spliced"] = sp.csr_matrix(COUNTS.astype(np.float32))
    with pytest.raises(DataError, match=r"Raw counts are in adata.layers\['spliced'\]: pass counts='spliced'") as err:
        from_anndata(adata, counts="raw")
    assert "counts='raw'" not in str(err.value)
    del adata.layers["spliced"]
    with pytest.raises(DataError, match=r"No slot of this AnnData holds raw counts \(adata.X, adata.raw.X\)"):
        from_anndata(adata)


def test_a_few_stray_values_are_named_by_cell_and_not_called_normalized():
    """Counts with decimals in a few entries (fewer than 1% of the stored values) are not a normalization of the
    whole matrix: the message says how many values and cells, the first cell's row, and does not send the user to
    another slot; a negative value is named by its cell too."""
    from tfp_scmix.data import check_counts

    counts = sp.random(3000, 50, density=0.2, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.rint(counts.data * 10) + 1
    for row in (1500, 1600):
        counts.data[counts.indptr[row]] += 0.5
    with pytest.raises(DataError) as err:
        check_counts(counts, "adata.layers['counts']")
    message = str(err.value)
    assert "2 of the 30,000 stored values have decimals, in 2 cells (the first at row 1500)" in message
    assert "edited or damaged" in message and "look" in message and "corrected counts" not in message
    assert "log-normalized" not in message and "counts='raw'" not in message
    every = sp.csr_matrix(np.full((4, 3), 0.5, np.float32))  # e.g. one chunk of a log-normalised matrix
    with pytest.raises(DataError, match=r"in all 4 cells read\)"):
        check_counts(every, "rows 0-3 of adata.X")
    counts.data[counts.indptr[1500]] = -1
    with pytest.raises(DataError, match=r"negative \(min -1, in 1 cell \(row 1600\)\)"):
        check_counts(counts, "x", row_offset=100)
    # The fix fits the input: an AnnData's other slots, or a matrix's raw counts; far below zero is damage.
    for where, fix in (("adata.X", "counts='raw'"), ("the count matrix", "Pass the raw integer counts")):
        with pytest.raises(DataError, match="look scaled") as err:
            check_counts(counts, where)
        assert fix in str(err.value) and ("counts='raw'" in str(err.value)) == (where == "adata.X")
        with pytest.raises(DataError, match="log-normalized") as err:
            check_counts(every, where)
        assert fix in str(err.value)
    counts.data[counts.indptr[1500]] = -2.1e9  # random bytes where counts were
    with pytest.raises(DataError, match="neither counts nor scaled data: the matrix may be damaged"):
        check_counts(counts, "rows 0-2999 of adata.X")


def test_explicit_slot_errors():
    adata = make_adata(COUNTS, labels=["a", "b", "a", "b"])
    with pytest.raises(DataError, match="no layer 'umis'"):
        from_anndata(adata, counts="umis")
    with pytest.raises(DataError, match="adata.raw is empty"):
        from_anndata(adata, counts="raw")


def test_empty_cells_and_datasets():
    with pytest.raises(DataError, match="1 cell has no counts"):
        from_anndata(make_adata(np.vstack([COUNTS, np.zeros(4)]), labels=["a", "b", "a", "b", "a"]))
    with pytest.raises(DataError, match="empty"):
        from_anndata(make_adata(np.zeros((0, 4))), label_key=None)
    # The fix in the message runs as written and reads the slot the counts are in, over the genes asked for (a
    # trial: it read adata.X, which held log-normalised values, and `.A1` failed on a dense X).
    counts = np.vstack([COUNTS, np.zeros(4), [0, 0, 0, 5]])
    for genes in (None, ["G0", "G1", "G2"]):
        adata = make_adata(counts, labels=["a", "b", "a", "b", "a", "b"])
        adata.layers["counts"] = adata.X.copy()
        adata.X = np.log1p(counts)  # dense, log-normalised
        with pytest.raises(DataError, match="cells? ha(s|ve) no counts") as err:
            from_anndata(adata, genes=genes)
        fix = str(err.value).split("(e.g. ")[1][: -len(").")]
        namespace = {"np": np, "adata": adata, "genes": genes}
        exec(fix, namespace)
        kept = namespace["adata"]
        assert kept.n_obs == (4 if genes else 5)
        from_anndata(kept, genes=genes)


def test_labels_unknown_one_class_and_outside():
    ids, classes = encode_labels(pd.Series(["x", np.nan, "unknown", "y", ""]), unknown=["unknown"])
    assert classes == ["x", "y"] and ids.tolist() == [0, -1, -1, 1, -1]
    with pytest.raises(DataError, match="1 class"):
        encode_labels(["x", "x", None])
    with pytest.raises(DataError, match=r"labels \['z'\] are not among"):
        encode_labels(["x", "z"], classes=["x", "y"])
    with pytest.raises(DataError, match="no obs column 'celltype'"):
        from_anndata(make_adata(COUNTS), label_key="celltype")


def test_integer_labels_are_classes_in_the_order_of_their_values():
    """Cluster ids as labels (integers, or floats where pandas stores them with missing values) name their classes
    without ".0" and in numeric order ("2" before "10"); names that are not integers follow, sorted."""
    ids, classes = encode_labels(np.array([10.0, 2.0, np.nan, 0.0, 2.0]))
    assert classes == ["0", "2", "10"] and ids.tolist() == [2, 1, -1, 0, 1]
    assert encode_labels(["b", "10", "2", "a"])[1] == ["2", "10", "a", "b"]


def test_batches():
    adata = make_adata(COUNTS, labels=["a", "b", "a", "b"])
    adata.obs["donor"] = ["d2", "d1", "d2", "d1"]
    data = from_anndata(adata, batch_key="donor")
    assert data.batch_names == ["d1", "d2"] and data.batches.tolist() == [1, 0, 1, 0]
    # A missing batch is not a batch named "nan" with offsets of its own: every kind of missing is refused.
    for missing in (np.nan, None, ""):
        adata.obs["donor"] = ["d2", missing, "d2", "d1"]
        with pytest.raises(DataError, match="1 cells have no batch"):
            from_anndata(adata, batch_key="donor")
    adata.obs["donor"] = pd.Categorical(["d2", None, "d2", "d1"])
    with pytest.raises(DataError, match="1 cells have no batch"):
        from_anndata(adata, batch_key="donor")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: align_genes(sp.csr_matrix(COUNTS), list("abcd"), list("ab"), min_fraction=50), "min_fraction"),
        (lambda: from_anndata(make_adata(COUNTS), label_key=None, genes=["G0"], min_gene_fraction=-1), "min_fraction"),
        (lambda: highly_variable_genes(sp.csr_matrix(COUNTS), list("abcd"), n_top=0), "n_top"),
        (lambda: highly_variable_genes(sp.csr_matrix(COUNTS), list("abcd"), n_top=2.5), "n_top"),
        (lambda: from_anndata(make_adata(COUNTS), label_key=None).dataset(batch_size=0), "batch_size"),
    ],
)
def test_numeric_arguments_out_of_range_are_refused(call, message):
    with pytest.raises(ValueError, match=f"{message} must be .*received"):
        call()


def test_structure_check_reads_row_views_in_place_and_pointers_alone_when_asked():
    """`check_structure` leaves a row view's arrays as they are (scipy's `check_format` copies a view of less
    than half of its array: prediction checks minibatch views of each chunk), and with full=False checks the
    pointers only: backwards pointers are refused, an index out of range waits for the full check."""
    from tfp_scmix.data import check_structure, csr_rows

    big = sp.random(400, 50, density=0.2, format="csr", dtype=np.float32, random_state=0)
    rows = csr_rows(big, 10, 20)
    data, indices = rows.data, rows.indices
    check_structure(rows, "rows")
    assert rows.data is data and rows.indices is indices and np.shares_memory(rows.data, big.data)
    out_of_range = big.copy()
    out_of_range.indices[3] = 50
    check_structure(out_of_range, "x", full=False)
    with pytest.raises(DataError, match="indices must be < 50"):
        check_structure(out_of_range, "x")
    backwards = big.copy()
    backwards.indptr[5] = backwards.indptr[6] + 1
    with pytest.raises(DataError, match="non-decreasing"):
        check_structure(backwards, "x", full=False)


def test_row_selections_keep_int32_indices_beside_int64_pointers():
    """anndata writes int64 row pointers beside int32 indices; with mixed types scipy casts the whole matrix's
    indices to int64 on every row selection (a copy of the largest array per minibatch). `csr_on`, `csr_rows`, the
    counts `from_anndata` finds and a stream's chunks carry int32 pointers instead, and the same entries."""
    from tfp_scmix.data import csr_on, csr_rows, index_pointers

    big = sp.random(400, 50, density=0.2, format="csr", dtype=np.float32, random_state=0)
    wide = np.asarray(big.indptr, np.int64)
    assert index_pointers(wide, big.indices.astype(np.int64)) is wide  # int64 indices: left as they are
    mixed = csr_on(big.data, big.indices.astype(np.int32), wide, big.shape)
    for matrix, first in ((mixed, 0), (csr_rows(mixed, 10, 20), 10)):
        assert matrix.indptr.dtype == np.int32 and matrix.indices.dtype == np.int32
        picked = matrix[np.array([3, 1, 2])]
        assert picked.indices.dtype == np.int32
        assert np.array_equal(picked.toarray(), big[np.array([3, 1, 2]) + first].toarray())
    adata = anndata.AnnData(
        X=sp.csr_matrix(COUNTS.astype(np.float32)), var=pd.DataFrame(index=[f"G{i}" for i in range(4)])
    )
    adata.X.indptr = adata.X.indptr.astype(np.int64)
    adata.X.indices = adata.X.indices.astype(np.int32)
    counts = from_anndata(adata, label_key=None).counts
    assert counts.indptr.dtype == np.int32 and counts.indices.dtype == np.int32
    assert np.array_equal(counts.toarray(), COUNTS)


def test_damaged_sparse_matrices_are_refused_before_any_arithmetic():
    """Index arrays that do not describe the matrix (a damaged file) are refused before scipy's compiled code
    reads them (the process-level check, where a regression would crash, is in test_predict.py)."""
    good = sp.csr_matrix(COUNTS.astype(np.float32))
    out_of_range = good.copy()
    out_of_range.indices[2] = 40
    backwards = good.copy()
    backwards.indptr[2] = backwards.indptr[3] + 1
    for bad, message in ((out_of_range, "indices must be < 4"), (backwards, "non-decreasing")):
        for fmt in (bad, sp.csc_matrix((bad.data, bad.indices, bad.indptr), shape=(4, 4))):
            adata = anndata.AnnData(X=fmt, var=pd.DataFrame(index=[f"G{i}" for i in range(4)]))
            with pytest.raises(
                DataError, match=f"sparse matrix of adata.X is damaged \\(.*{message}.*copy or write it again"
            ):
                from_anndata(adata, label_key=None)


def test_gene_alignment_fills_missing_and_reports(caplog):
    counts = sp.csr_matrix(COUNTS.astype(np.float32))
    aligned, fraction = align_genes(counts, ["G0", "G1", "G2", "G3"], ["G2", "G0", "NEW"], min_fraction=0.5)
    assert fraction == pytest.approx(2 / 3)
    assert np.array_equal(aligned.toarray(), np.stack([COUNTS[:, 2], COUNTS[:, 0], np.zeros(4)], 1))
    assert "2 of 3 model genes" in caplog.text and "train --shared-genes" in caplog.text  # 67%: how to do better
    caplog.clear()
    ten = [f"G{i}" for i in range(10)]
    align_genes(sp.csr_matrix(np.ones((2, 10), np.float32)), ten, [*ten[:9], "NEW"])  # 90% found: no hint
    assert "9 of 10 model genes" in caplog.text and "shared-genes" not in caplog.text
    with pytest.raises(
        DataError,
        match="only 1 of the model.s 3 genes.*genes both datasets measure.*train --shared-genes.*min_gene_fraction",
    ):
        align_genes(counts, ["G0", "G1", "G2", "G3"], ["G0", "X", "Y"])
    with pytest.raises(DataError, match="Ensembl"):
        align_genes(counts, ["ENSG01", "ENSG02", "ENSG03", "ENSG04"], ["CD3E", "MS4A1", "LYZ"])
    with pytest.raises(
        DataError,
        match=r"another species .* orthologues .* same species written in another case, rename them "
        r"\(adata.var_names = adata.var_names.str.upper\(\)\)",
    ):
        align_genes(counts, ["Cd3e", "Ms4a1", "Lyz2", "Gnly"], ["CD3E", "MS4A1", "LYZ"])
    # The same species' symbols lower-cased: not another species, and the rename that fixes it.
    with pytest.raises(DataError, match=r"another case \(lower-case against the model's upper-case\)") as err:
        align_genes(counts, ["cd3e", "ms4a1", "lyz", "gnly"], ["CD3E", "MS4A1", "LYZ"])
    assert "another species" not in str(err.value) and "adata.var_names.str.upper()" in str(err.value)
    with pytest.raises(DataError, match="duplicated gene names"):
        align_genes(counts, ["G0", "G0", "G2", "G3"], ["G0"])
    # Duplicates among genes not asked for are not read (a trial: a repeated MIR1302-10 refused a whole query).
    aligned, fraction = align_genes(counts, ["G0", "G0", "G2", "G3"], ["G3", "G2"])
    assert fraction == 1.0
    np.testing.assert_array_equal(aligned.toarray(), counts.toarray()[:, [3, 2]])


def test_aligning_to_the_same_genes_copies_only_to_put_the_counts_in_order():
    """Counts already float32 CSR in canonical order, columns in the vocabulary's order, come back as they are
    (prediction aligns every chunk); anything else is copied and put in order, the input left untouched."""
    genes = ["G0", "G1", "G2", "G3"]
    counts = sp.csr_matrix(COUNTS.astype(np.float32))
    assert align_genes(counts, genes, genes)[0] is counts
    unsorted = sp.csr_matrix(
        (np.array([3.0, 1.0], np.float32), np.array([2, 0]), np.array([0, 2, 2, 2, 2])), shape=(4, 4)
    )
    before = unsorted.indices.copy()
    aligned, _ = align_genes(unsorted, genes, genes)
    assert aligned is not unsorted and aligned.has_canonical_format
    np.testing.assert_array_equal(aligned.toarray(), unsorted.toarray())
    np.testing.assert_array_equal(unsorted.indices, before)
    as_int = align_genes(sp.csr_matrix(COUNTS), genes, genes)[0]
    assert as_int.dtype == np.float32 and np.array_equal(as_int.toarray(), COUNTS)


def test_counts_are_copied_unless_asked_not_to():
    """from_anndata's counts do not change with the AnnData afterwards (sc.pp.normalize_total in place, say);
    copy=False, for a chunk predicted at once, reads float32 CSR counts where they are."""
    adata = make_adata(COUNTS)
    assert not np.shares_memory(from_anndata(adata, label_key=None).counts.data, adata.X.data)
    assert np.shares_memory(from_anndata(adata, label_key=None, copy=False).counts.data, adata.X.data)


def test_rows_are_views_equal_to_the_subset(embedded):
    rows, subset = embedded.rows(100, 250), embedded.subset(np.arange(100, 250))
    assert np.shares_memory(rows.counts.data, embedded.counts.data)
    assert (rows.counts != subset.counts).nnz == 0
    for name in ("labels", "batches", "obs_names"):
        np.testing.assert_array_equal(getattr(rows, name), getattr(subset, name))


def test_dataset_yields_sparse_minibatches_equal_to_rows(embedded):
    import tensorflow as tf

    batches = list(embedded.dataset(batch_size=64, shuffle=False))
    assert isinstance(batches[0]["counts"], tf.SparseTensor)
    first = tf.sparse.to_dense(batches[0]["counts"]).numpy()
    assert np.array_equal(first, embedded.counts[:64].toarray())
    assert np.array_equal(batches[0]["label"].numpy(), embedded.labels[:64])
    assert sum(int(b["label"].shape[0]) for b in batches) == embedded.n_cells
    shuffled = next(iter(embedded.dataset(batch_size=700, shuffle=True, seed=3)))
    assert float(tf.sparse.reduce_sum(shuffled["counts"])) == pytest.approx(embedded.counts.sum())


def test_highly_variable_genes_prefers_markers(embedded):
    hvg = highly_variable_genes(embedded.counts, embedded.genes, n_top=200)
    assert len(hvg) == 200 and len(set(hvg)) == 200
    assert {"GNLY", "NKG7", "LYZ"} <= set(hvg)


def test_log_normalised_is_scanpys_cp10k_log1p_in_blocks_of_cells():
    """The same values as the whole-matrix product it replaced (each cell's counts times 10,000 over its total, in
    the counts' precision), across the boundary of its blocks of 8,192 cells; `dtype` only stores them wider."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.int64):
        dense = rng.poisson(0.3, size=(9000, 12)).astype(dtype)
        dense[7] = 0  # a cell without counts: total taken as 1
        counts = sp.csr_matrix(dense)
        expected = sp.diags(1e4 / np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1)) @ counts
        expected.data = np.log1p(expected.data)
        result = log_normalised(counts)
        assert result.dtype == expected.dtype and (result != expected).nnz == 0
        wide = log_normalised(counts, dtype=np.float64)
        assert wide.dtype == np.float64 and np.array_equal(wide.data, result.data.astype(np.float64))


def test_a_gene_alone_in_its_bin_of_means_scores_one_as_in_scanpy():
    """Insulin in a pancreas: a few genes of far higher mean than any other sit alone in their bins of the mean; the
    score of such a gene was its bin's own mean (0) and it was dropped (Ins1, Ins2 and Iapp of the Baron mice, found
    by a fresh-user trial). scanpy's seurat flavour scores it 1."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(0.5, 2.0, size=(1, 300)), size=(400, 300)).astype(np.float32)
    # The hormone: most cells make it in bulk, the others a little; its mean is far above every other gene's.
    counts[:, 0] = np.where(np.arange(400) < 240, rng.poisson(1000, 400), rng.poisson(20, 400))
    names = np.array([f"g{i}" for i in range(300)])
    assert "g0" in highly_variable_genes(sp.csr_matrix(counts), names, n_top=60)  # with a score of 0: from 150 on


def test_corrupt_h5ad(tmp_path):
    path = tmp_path / "broken.h5ad"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_h5ad(path)


def test_a_missing_file_is_named_with_where_it_was_looked_for(tmp_path, monkeypatch):
    """An absolute path is looked for there alone: the message names it (and a missing folder), not the data
    folder's variable; a bare name is looked for in the working directory and in $TFP_SCMIX_DATA."""
    with pytest.raises(DataError, match="no file at .*missing.h5ad. Check the path") as absolute:
        read_h5ad(tmp_path / "missing.h5ad")
    assert DATA_DIR_ENV not in str(absolute.value)
    with pytest.raises(DataError, match="its folder .*nowhere does not exist either"):
        read_h5ad(tmp_path / "nowhere" / "missing.h5ad")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    with pytest.raises(
        DataError, match=r"'missing.h5ad' not found \(looked in the working directory; \$TFP_SCMIX_DATA="
    ):
        read_h5ad("missing.h5ad")
    # A bare name without a suffix finds name.h5ad in the working directory or the data folder.
    (tmp_path / "data").mkdir()
    anndata.AnnData(X=sp.csr_matrix(COUNTS.astype(np.float32))).write_h5ad(tmp_path / "data" / "mine.h5ad")
    assert read_h5ad("mine").n_obs == COUNTS.shape[0]
    with pytest.raises(DataError, match=r"'mine.loom' not found"):  # a name with another suffix is taken as given
        read_h5ad("mine.loom")


def test_real_embedded_dataset(embedded):
    assert (embedded.n_cells, embedded.n_genes, embedded.n_classes) == (700, 765, 10)
    assert embedded.n_labelled == 700 and len(embedded.fingerprint()) == 16
    expected = f"SCData: 700 cells x 765 genes, 700 labelled of 10 classes, 1 batch(es), {embedded.counts.nnz}"
    assert repr(embedded) == expected + " nonzero counts"
    assert repr(embedded.hide_labels(np.arange(150))).split(", ")[1] == "150 labelled of 10 classes"


def test_epoch_batches_depend_on_the_epoch_alone(embedded):
    """What a resumed run relies on: epochs 2 and 3 started at epoch 2 are those of a run started at 0;
    every epoch visits every cell once, in its own order."""
    import dataclasses

    from tfp_scmix.data import epoch_batches

    # Each cell's "label" is its own index, so that a minibatch's labels name its cells.
    data = dataclasses.replace(embedded.subset(np.arange(300)), labels=np.arange(300, dtype=np.int32))

    def labels_of(batches):
        return [b["label"].numpy() for b in batches]

    whole = labels_of(epoch_batches(data, 64, seed=3, epochs=4))
    resumed = labels_of(epoch_batches(data, 64, seed=3, epochs=4, initial_epoch=2))
    assert len(whole) == 4 * 5 and len(resumed) == 2 * 5
    for a, b in zip(whole[10:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    epochs = [np.concatenate(whole[5 * e : 5 * (e + 1)]) for e in range(4)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(300))
    assert not np.array_equal(epochs[0], epochs[1])
    other_seed = labels_of(epoch_batches(data, 64, seed=4, epochs=1))
    assert not np.array_equal(np.concatenate(other_seed), epochs[0])
    # SCData.dataset's passes are those epochs, whatever TensorFlow's global seed (before, it entered the order:
    # the same adapt call gave other offsets after an unrelated training had set it), and so is a repeated one.
    import tensorflow as tf

    dataset = data.dataset(64, seed=3)
    assert dataset.cardinality().numpy() == 5
    passes = []
    for global_seed in (1, 2, 1, 2):
        tf.random.set_seed(global_seed)
        passes += labels_of(dataset)
    repeated = labels_of(data.dataset(64, seed=3, repeat=True).take(20))
    for a, b, c in zip(whole, passes, repeated, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_read_h5ad_backed_leaves_the_counts_on_disk(tmp_path):
    path = tmp_path / "small.h5ad"
    make_adata(COUNTS, labels=["a", "b", "a", "b"]).write_h5ad(path)
    backed = read_h5ad(path, backed="r")
    assert backed.isbacked and backed.shape == (4, 4)
    assert np.array_equal(from_anndata(backed.to_memory()).counts.toarray(), COUNTS)


def test_hide_labels_with_no_cells_kept_hides_every_label():
    data = from_anndata(make_adata(COUNTS, labels=["a", "b", "a", "b"]))
    assert data.hide_labels([]).n_labelled == 0


def test_unlabeled_category_and_placeholder_warning(caplog):
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (80, 6)).astype(np.float32) + 1)
    adata = anndata.AnnData(counts)
    adata.obs["cell_type"] = ["Unknown"] * 70 + ["B"] * 5 + ["T"] * 5
    # The placeholder left out, holding most of the labels: refused, naming the option (it trained as a class,
    # with one warning, and its model called every cell "Unknown").
    with pytest.raises(DataError, match=r"'Unknown' holds 70 of the 80 cells with a label value \(88%\).*unlabeled_"):
        from_anndata(adata)
    with pytest.raises(DataError, match="'unassigned' holds 41 of the 80"):  # any placeholder, just past half
        from_anndata(make_adata(adata.X.toarray(), labels=["unassigned"] * 41 + ["B"] * 39))
    # Integer codes with scikit-learn's -1 for unlabelled: refused the same way (it trained "-1" as a class, with a
    # warning that "-1" and "1" looked like one type written two ways).
    adata.obs["cell_type"] = [-1] * 60 + [0] * 10 + [1] * 10
    with pytest.raises(DataError, match=r"'-1' holds 60 of the 80 .*pass unlabeled_category='-1'"):
        from_anndata(adata)
    assert from_anndata(adata, unlabeled_category=-1).classes == ["0", "1"]
    # A smaller one may be a group of its own: trained as a class, with a warning.
    adata.obs["cell_type"] = ["Unknown"] * 40 + ["B"] * 20 + ["T"] * 20
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        data = from_anndata(adata)
    assert data.classes == ["B", "T", "Unknown"]
    assert "'Unknown' (40 cells) looks like a marker of unlabelled cells" in caplog.text
    assert "unlabeled_category='Unknown'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        data = from_anndata(adata, unlabeled_category="Unknown")
    assert data.classes == ["B", "T"] and data.n_labelled == 40 and not caplog.text
    # A value in another case than the data's would train the unlabelled cells as a class: refused, with the fix.
    with pytest.raises(
        DataError, match=r"unlabeled_category 'unknown' matches no value.*pass unlabeled_category='Unknown'"
    ):
        from_anndata(adata, unlabeled_category="unknown")
    # One that matches nothing where a label looks like the marker: refused too, naming that label.
    with pytest.raises(DataError, match=r"whose label 'Unknown' \(40 cells\) looks like the marker.*='Unknown'"):
        from_anndata(adata, unlabeled_category="unlabelled")
    with caplog.at_level("WARNING", logger="tfp_scmix"):  # one that matches nothing: every label is used
        data = from_anndata(adata[40:].copy(), unlabeled_category="Unknown")
    assert data.n_labelled == 40 and "unlabeled_category 'Unknown' matches no value of obs['cell_type']" in caplog.text
    caplog.clear()
    adata.obs["cell_type"] = ["T cell"] * 70 + ["B"] * 10  # not a placeholder, but most of the cells
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        from_anndata(adata)
    assert "'T cell' holds 88% of the labelled cells" in caplog.text
    caplog.clear()
    adata.obs["cell_type"] = "T cell"  # one class: refused, without first advising unlabeled_category='T cell'
    with caplog.at_level("WARNING", logger="tfp_scmix"), pytest.raises(DataError, match="1 class"):
        from_anndata(adata)
    assert not caplog.text
    # Integer labels with missing values (pandas stores them as floats): classes "0" and "1", not "0.0", and
    # unlabeled_category=-1 matches -1 whatever the type (it was refused as a mismatch "but for case").
    adata.obs["cell_type"] = pd.Series([np.nan] * 10 + [0.0] * 30 + [1.0] * 30 + [-1.0] * 10, index=adata.obs_names)
    data = from_anndata(adata, unlabeled_category=-1)
    assert data.classes == ["0", "1"] and data.n_labelled == 60


def _write_10x(folder, counts, genes, barcodes, gz=True, v3=True):
    import gzip

    from scipy.io import mmwrite

    folder.mkdir()
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"matrix.mtx{suffix}", "wb") as f:
        mmwrite(f, sp.coo_matrix(counts.T))  # 10x: genes x cells
    rows = [f"ENSG{i:05d}\t{g}" + ("\tGene Expression" if v3 else "") for i, g in enumerate(genes)]
    with opener(folder / (f"features.tsv{suffix}" if v3 else f"genes.tsv{suffix}"), "wt") as f:
        f.write("\n".join(rows) + "\n")
    with opener(folder / f"barcodes.tsv{suffix}", "wt") as f:
        f.write("\n".join(barcodes) + "\n")


def test_a_loom_written_by_anndata_is_named_by_its_attributes(tmp_path):
    """anndata's reader names a .loom's genes and cells by loompy's "Gene" and "CellID"; a file written by anndata's
    own `write_loom` keeps them under the index's name ("index", or "var_names"/"obs_names"), so they came back
    numbered 0, 1, ... and a model matched none of its genes (a trial). `_loom_names` takes them from there; a file
    that names no genes is refused. (loompy, which reads the files, is optional: the renaming is tested alone.)"""
    from tfp_scmix.data import _loom_names

    numbered = make_adata(COUNTS)
    numbers = [str(i) for i in range(4)]  # as anndata's reader leaves them
    numbered.var = pd.DataFrame({"index": ["CD3E", "MS4A1", "LYZ", "LYZ"], "gene_ids": list("abcd")}, index=numbers)
    numbered.obs = pd.DataFrame({"obs_names": [f"cell{i}" for i in range(4)], "cell_type": list("xyxy")}, index=numbers)
    named = _loom_names(numbered, Path("counts.loom"))
    assert list(named.var_names) == ["CD3E", "MS4A1", "LYZ", "LYZ-1"] and list(named.var.columns) == ["gene_ids"]
    assert list(named.obs_names) == ["cell0", "cell1", "cell2", "cell3"] and list(named.obs.columns) == ["cell_type"]
    nameless = make_adata(COUNTS)
    nameless.var = pd.DataFrame({"gene_ids": list("abcd")}, index=[str(i) for i in range(4)])
    with pytest.raises(DataError, match=r"counts.loom names no genes \(row attributes: \['gene_ids'\]"):
        _loom_names(nameless, Path("counts.loom"))


def test_read_10x_folders_and_refuse_other_formats(tmp_path, monkeypatch):
    from tfp_scmix.data import read

    counts = np.random.default_rng(1).poisson(1.0, (5, 4)).astype(np.float32)
    genes, barcodes = ["CD3E", "MS4A1", "LYZ", "LYZ"], [f"cell{i}" for i in range(5)]
    _write_10x(tmp_path / "v3", counts, genes, barcodes)
    _write_10x(tmp_path / "v2", counts, genes, barcodes, gz=False, v3=False)
    for path in (tmp_path / "v3", tmp_path / "v2", tmp_path / "v3" / "matrix.mtx.gz"):
        adata = read(path)
        assert list(adata.obs_names) == barcodes and list(adata.var_names) == ["CD3E", "MS4A1", "LYZ", "LYZ-1"]
        np.testing.assert_array_equal(adata.X.toarray(), counts)
        assert adata.var["gene_ids"].iloc[0] == "ENSG00000"
        assert from_anndata(path, label_key=None).n_genes == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is not a 10x matrix folder: it needs matrix.mtx"):
        read(tmp_path / "empty")
    (tmp_path / "counts.csv").write_text("gene,cell1\nCD3E,1\n")
    with pytest.raises(DataError, match=r"counts.csv is a \.csv file \(a text file\), which tfp_scmix does not read"):
        read(tmp_path / "counts.csv")
    with pytest.raises(DataError, match="not an HDF5 file"):
        read_h5ad(tmp_path / "counts.csv")
    (tmp_path / "data.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setitem(__import__("sys").modules, "scanpy", None)  # as if scanpy were not installed
    with pytest.raises(DataError, match="needs the scanpy package"):
        read(tmp_path / "data.h5")


def test_log_normalised_dense_is_the_encoders_normalisation_of_the_nonzeros():
    """`log_normalised_dense` (numpy, nonzeros only) against the encoder's TensorFlow `normalise_counts(
    divide_offsets(...))` on dense counts: three batches with their own gene factors, an empty cell, duplicate-free
    CSR rows; without factors it is log1p CP10k. Tolerance 1e-6 (float32 rounding of the same formula)."""
    import tensorflow as tf

    from tfp_scmix.data import log_normalised_dense
    from tfp_scmix.layers.cell import divide_offsets, normalise_counts

    rng = np.random.default_rng(3)
    dense = rng.poisson(0.6, (40, 25)).astype(np.float32)
    dense[7] = 0  # a cell without counts
    counts = sp.csr_matrix(dense)
    offsets = rng.normal(0, 0.5, (3, 25)).astype(np.float32)
    batches = rng.integers(0, 3, 40).astype(np.int32)
    expected = normalise_counts(divide_offsets(tf.constant(dense), tf.constant(batches), tf.constant(offsets)))
    got = log_normalised_dense(counts, np.exp(-offsets), batches)
    assert got.dtype == np.float32 and got.shape == (40, 25)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    assert not got[7].any()
    np.testing.assert_allclose(log_normalised_dense(counts), normalise_counts(tf.constant(dense)).numpy(), atol=1e-6)
    one = log_normalised_dense(counts, np.exp(-offsets[:1]))  # one batch: its factors for every cell
    np.testing.assert_allclose(one, log_normalised_dense(counts, np.exp(-offsets), np.zeros(40, np.int32)), atol=0)


def test_normalisation_in_a_reused_workspace_matches_new_arrays():
    """`log_normalised_values` written into a `Workspace` gives what it gives in new arrays, call after call on
    matrices of other sizes (the workspace's arrays are reused and grown): one batch for every cell and mixed
    batches, rows without counts (first, inner and last); `value_rows` is `np.repeat` of the row numbers."""
    from tfp_scmix.data import Workspace, log_normalised_dense, log_normalised_values, value_rows

    rng = np.random.default_rng(5)
    factors = np.exp(rng.normal(0, 0.5, (3, 30))).astype(np.float32)
    work = Workspace()
    for n_cells in (50, 12, 80):
        dense = rng.poisson(0.4, (n_cells, 30)).astype(np.float32)
        dense[[0, n_cells // 2, n_cells - 1]] = 0
        counts = sp.csr_matrix(dense)
        lengths = np.diff(counts.indptr)
        np.testing.assert_array_equal(value_rows(counts.indptr, work), np.repeat(np.arange(n_cells), lengths))
        for batches in (np.full(n_cells, 2, np.int32), rng.integers(0, 3, n_cells).astype(np.int32), None):
            fresh = log_normalised_values(counts, factors, batches)
            reused = log_normalised_values(counts, factors, batches, work)
            np.testing.assert_array_equal(reused, fresh)
            cells = np.repeat(np.arange(n_cells), lengths)
            ids = np.zeros(n_cells, np.int64) if batches is None else batches
            by_hand = dense[dense > 0] * factors[ids[cells], counts.indices]
            by_hand = np.log1p(by_hand * 1e4 / np.maximum(np.bincount(cells, by_hand, n_cells), 1)[cells])
            np.testing.assert_allclose(reused, by_hand, rtol=1e-5)
        out = np.full((n_cells, 30), 7.0, np.float32)  # overwritten, zeros included
        log_normalised_dense(counts, factors, batches, out=out, workspace=work)
        np.testing.assert_array_equal(out, log_normalised_dense(counts, factors, batches))


def test_class_names_written_two_ways_are_warned_of(caplog):
    """Labels that differ only in case, spacing, punctuation or a plural s are likely one type: warned of (they
    train as two classes); distinct names that share words are not."""
    values = ["B cells"] * 30 + ["B cell"] * 3 + ["NK cells"] * 20 + ["NK  cells"] * 2 + ["CD4+ T"] * 10 + ["CD4 T"] * 5
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        _, classes = encode_labels(values)
    assert len(classes) == 6  # still trained as written
    assert "'B cells' (30 cells) and 'B cell' (3 cells) look like one type written 2 ways" in caplog.text
    assert "'NK cells' (20 cells) and 'NK  cells' (2 cells)" in caplog.text
    assert "CD4" not in caplog.text  # CD4+ and CD4 are kept apart


def test_did_you_mean_prefers_the_same_name_in_another_case():
    from tfp_scmix.data import did_you_mean

    assert did_you_mean(["cell_type"], ["truth", "Cell_Type"]) == " (did you mean 'Cell_Type'?)"
    assert did_you_mean(["celltype"], ["cell_type", "batch"]) == " (did you mean 'cell_type'?)"
    assert did_you_mean(["donor"], ["cell_type", "batch"]) == ""


def test_a_label_column_without_two_classes_says_what_it_holds():
    """All cells unlabelled, or one class only: the message says which, and names the settings that exist
    (label_key, unlabeled_category; it named an `unknown` option that the user cannot pass)."""
    from tfp_scmix.data import encode_labels

    with pytest.raises(DataError, match=r"every one of its 5 cells is unlabelled .*unlabeled_category") as err:
        encode_labels([np.nan] * 5)
    assert "unknown." not in str(err.value)
    with pytest.raises(DataError, match=r"its labelled cells \(3\) are all of one class, 'B'"):
        encode_labels(["B", "B", np.nan, "B"])
