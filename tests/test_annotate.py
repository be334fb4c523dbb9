"""scm.annotate: predictions, topic proportions and topic-gene weights written into an AnnData."""

import numpy as np
import pytest
import scipy.sparse as sp

import tfp_scmix as scm
from tfp_scmix.annotate import UNASSIGNED
from tfp_scmix.data import DataError


def test_annotate_writes_anndata_slots(small_model, embedded_adata):
    adata = embedded_adata.copy()
    adata = adata[:, ::-1].copy()  # a different gene order is aligned by name
    assert scm.annotate(small_model, adata, min_confidence=0.99) is adata
    assert set(adata.obs["scmix_label"].cat.categories) == set(small_model.class_names) | {UNASSIGNED}
    assert (adata.obs["scmix_label"] == UNASSIGNED).any()
    out = scm.predict(small_model, embedded_adata)
    np.testing.assert_array_equal(adata.obs["scmix_confidence"].to_numpy(), out["confidence"])
    confident = out["confidence"] >= 0.99
    np.testing.assert_array_equal(
        adata.obs["scmix_label"].to_numpy()[confident], np.asarray(small_model.class_names)[out["label"][confident]]
    )
    assert (adata.obs["scmix_label"][~confident] == UNASSIGNED).all()
    assert "scmix_topics" not in adata.obsm
    np.testing.assert_array_equal(adata.obsm["scmix_cell_topic"], out["cell_topic"])
    assert adata.obsm["scmix_cell_topic"].shape == (700, 12)
    assert list(adata.obsm["scmix_probs"].columns) == small_model.class_names
    assert adata.varm["scmix_topic_gene"].shape == (765, 12)
    gene = small_model.genes[0]
    np.testing.assert_allclose(
        adata.varm["scmix_topic_gene"][adata.var_names.get_loc(gene)], small_model.topic_gene().numpy()[:, 0], rtol=1e-6
    )
    assert adata.uns["scmix"]["gene_fingerprint"] == small_model.gene_fingerprint
    assert adata.uns["scmix"]["gene_coverage"] == 1.0


def test_annotate_reads_a_path_and_takes_another_key(small_model, embedded_adata, tmp_path):
    embedded_adata[:50].copy().write_h5ad(tmp_path / "query.h5ad")
    adata = scm.annotate(small_model, str(tmp_path / "query.h5ad"), key_added="ref")
    assert adata.n_obs == 50 and "ref_label" in adata.obs and "scmix_label" not in adata.obs
    assert adata.obsm["ref_cell_topic"].shape == (50, 12) and adata.uns["ref"]["classes"] == small_model.class_names


def test_cells_without_counts_over_the_model_genes_are_unassigned(small_model, embedded_adata, caplog):
    """Query cells with no counts over the model's genes are predicted from nothing, so marked unassigned."""
    query = embedded_adata[:50].copy()
    dense = query.X.toarray()
    dense[:5] = 0
    query.X = sp.csr_matrix(dense)
    out = scm.predict(small_model, query)
    assert np.isfinite(out["probs"]).all()
    scm.annotate(small_model, query)
    assert (query.obs["scmix_label"][:5] == UNASSIGNED).all()
    assert (query.obs["scmix_label"][5:] != UNASSIGNED).all()
    assert "5 cells have no counts" in caplog.text


def test_a_backed_anndata_is_annotated_chunk_by_chunk_and_written_without_its_counts(
    small_model, embedded_adata, tmp_path
):
    """annotate on an AnnData opened backed="r" reads the counts a chunk at a time (before: the whole
    matrix), gives the in-memory result, and `write_h5ad` writes the annotated file by copying the source
    and adding the annotation; a subset (view) of a backed AnnData is refused with a way out (before: a
    crash in anndata's copy after predicting)."""
    import anndata

    from tfp_scmix.annotate import write_h5ad

    source = tmp_path / "query.h5ad"
    embedded_adata.write_h5ad(source)
    expected = scm.annotate(small_model, embedded_adata.copy(), min_confidence=0.5)
    backed = anndata.read_h5ad(source, backed="r")
    scm.annotate(small_model, backed, min_confidence=0.5, chunk_size=128)
    assert backed.isbacked
    for key in ("scmix_label", "scmix_confidence"):
        np.testing.assert_array_equal(backed.obs[key].to_numpy(), expected.obs[key].to_numpy())
    np.testing.assert_array_equal(backed.obsm["scmix_cell_topic"], expected.obsm["scmix_cell_topic"])
    written = anndata.read_h5ad(write_h5ad(backed, tmp_path / "out" / "annotated.h5ad"))
    backed.file.close()
    assert (written.X != embedded_adata.X).nnz == 0 and list(written.obs_names) == list(embedded_adata.obs_names)
    np.testing.assert_array_equal(written.obs["scmix_label"].to_numpy(), expected.obs["scmix_label"].to_numpy())
    np.testing.assert_array_equal(written.obsm["scmix_probs"].to_numpy(), expected.obsm["scmix_probs"].to_numpy())
    np.testing.assert_array_equal(written.varm["scmix_topic_gene"], expected.varm["scmix_topic_gene"])
    assert written.uns["scmix"]["gene_fingerprint"] == small_model.gene_fingerprint
    assert "cell_type" in written.obs and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["annotated.h5ad"]

    backed = anndata.read_h5ad(source, backed="r")
    with pytest.raises(DataError, match=r"subset \(view\) of a backed AnnData.*to_memory\(\)"):
        scm.annotate(small_model, backed[:100])
    backed.file.close()


def test_min_confidence_is_a_probability(small_model, embedded_adata):
    with pytest.raises(
        ValueError, match=r"min_confidence must be a number in \[0, 1\], received 95 \(a probability: 95% is 0.95\)"
    ):
        scm.annotate(small_model, embedded_adata[:10].copy(), min_confidence=95)


def test_gene_coverage_is_that_of_the_slot_the_counts_come_from(small_model, embedded_adata):
    """Counts from adata.raw (all the model's genes) under an X of 300 log-normalized genes: coverage 1.0,
    not the share of the model's genes in adata.var (0.39, as before)."""
    query = embedded_adata[:60].copy()
    query.raw = query
    query = query[:, :300].copy()
    query.X = query.X.log1p()
    scm.annotate(small_model, query)
    assert query.uns["scmix"]["gene_coverage"] == 1.0
    np.testing.assert_array_equal(
        query.obs["scmix_confidence"].to_numpy(), scm.predict(small_model, embedded_adata[:60])["confidence"]
    )
