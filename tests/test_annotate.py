"""scm.annotate: predictions, topic proportions and topic-gene weights written into an AnnData."""

import numpy as np
import scipy.sparse as sp

import tfp_scmix as scm
from tfp_scmix.annotate import UNASSIGNED


def test_annotate_writes_anndata_slots(small_model, embedded_adata):
    adata = embedded_adata.copy()
    adata = adata[:, ::-1].copy()  # a different gene order is aligned by name
    assert scm.annotate(small_model, adata, min_confidence=0.99) is adata
    labels = adata.obs["scmix_label"]
    assert (labels == UNASSIGNED).any()
    # Only the categories that occur, in the model's class order, "unassigned" last, one colour each.
    assert list(labels.cat.categories) == [c for c in [*small_model.class_names, UNASSIGNED] if (labels == c).any()]
    assert len(adata.uns["scmix_label_colors"]) == len(labels.cat.categories)
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
    np.testing.assert_allclose(adata.obsm["scmix_probs"], out["probs"], rtol=1e-6)
    assert adata.uns["scmix"]["classes"] == small_model.class_names
    # The classifier's own features: the centred log-ratio of the topic proportions.
    logs = np.log(out["cell_topic"])
    np.testing.assert_allclose(adata.obsm["X_scmix"], logs - logs.mean(axis=1, keepdims=True), rtol=1e-4, atol=1e-4)
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
