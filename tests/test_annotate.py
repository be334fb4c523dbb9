"""scm.annotate: predictions, topic proportions and topic-gene weights written into an AnnData."""

import dataclasses
import logging
import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import tfp_scmix as scm
from tfp_scmix.annotate import UNASSIGNED
from tfp_scmix.data import DataError, from_anndata


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
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        out = scm.predict(small_model, query)
    assert np.isfinite(out["probs"]).all()
    # predict says so too, with NaN confidence and novelty (a trial: "CD14+ Monocytes" at 0.976 from no counts).
    assert np.isnan(out["confidence"][:5]).all() and np.isfinite(out["confidence"][5:]).all()
    assert np.isnan(out["novelty"][:5]).all() and np.isfinite(out["novelty"][5:]).all()
    assert caplog.text.count("5 cells have no counts over the model's genes") == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        scm.annotate(small_model, query)
    assert caplog.text.count("5 cells have no counts") == 1  # once, not again by annotate
    assert (query.obs["scmix_label"][:5] == UNASSIGNED).all()
    assert (query.obs["scmix_label"][5:] != UNASSIGNED).all()
    # Majority voting leaves them unassigned too (a trial: a cluster's label, from a tie, on four empty cells).
    voted = scm.annotate(small_model, query.copy(), majority_voting=True).obs["scmix_majority_voting"]
    assert (voted[:5] == UNASSIGNED).all()
    # No confidence for a call from no counts (before: the prior's top probability, 0.92 on a trial's data).
    confidence = query.obs["scmix_confidence"].to_numpy()
    assert np.isnan(confidence[:5]).all() and np.allclose(confidence[5:], out["confidence"][5:])
    assert "5 cells have no counts" in caplog.text
    # Nor a novelty score (a trial saw 0.88 from no counts), nor a flag.
    novelty = query.obs["scmix_novelty"].to_numpy()
    assert np.isnan(novelty[:5]).all() and np.isfinite(novelty[5:]).all()
    assert not query.obs["scmix_novel"][:5].any()


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
    earlier = embedded_adata.copy()  # as if annotated before with smooth=True: that slot must not survive
    earlier.obsm["scmix_smoothed_probs"] = np.zeros((earlier.n_obs, 2), np.float32)
    earlier.write_h5ad(source)
    expected = scm.annotate(small_model, embedded_adata.copy(), min_confidence=0.5)
    backed = anndata.read_h5ad(source, backed="r")
    scm.annotate(small_model, backed, min_confidence=0.5, chunk_size=128)
    assert backed.isbacked
    # Chunks of 128 cells against one of 700: minibatches of other shapes, the same up to float32 round-off.
    np.testing.assert_array_equal(backed.obs["scmix_label"].to_numpy(), expected.obs["scmix_label"].to_numpy())
    confidence = backed.obs["scmix_confidence"].to_numpy()
    np.testing.assert_allclose(confidence, expected.obs["scmix_confidence"].to_numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(backed.obsm["scmix_cell_topic"], expected.obsm["scmix_cell_topic"], rtol=1e-5, atol=1e-7)
    written = anndata.read_h5ad(write_h5ad(backed, tmp_path / "out" / "annotated.h5ad"))
    backed.file.close()
    assert (written.X != embedded_adata.X).nnz == 0 and list(written.obs_names) == list(embedded_adata.obs_names)
    np.testing.assert_array_equal(written.obs["scmix_label"].to_numpy(), expected.obs["scmix_label"].to_numpy())
    # Chunks of 128 cells against one: the same up to float32 round-off of the sums.
    np.testing.assert_allclose(written.obsm["scmix_probs"], expected.obsm["scmix_probs"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(written.obsm["X_scmix"], expected.obsm["X_scmix"], rtol=1e-5, atol=1e-5)
    assert list(written.uns["scmix_label_colors"]) == list(expected.uns["scmix_label_colors"])
    np.testing.assert_array_equal(written.varm["scmix_topic_gene"], expected.varm["scmix_topic_gene"])
    assert written.uns["scmix"]["gene_fingerprint"] == small_model.gene_fingerprint
    assert written.uns["scmix"]["counts"] == "X" and len(written.uns["scmix"]["model_adapted_to"]) == 0
    assert written.uns["scmix"]["model_adapted_to"].dtype == object  # strings, none (was float64 when empty)
    assert written.uns["scmix"]["min_gene_fraction"] == 0.5
    assert "scmix_smoothed_probs" not in written.obsm
    assert "cell_type" in written.obs and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["annotated.h5ad"]

    backed = anndata.read_h5ad(source, backed="r")
    with pytest.raises(DataError, match=r"subset \(view\) of a backed AnnData.*to_memory\(\)"):
        scm.annotate(small_model, backed[:100])
    backed.file.close()


def test_a_view_is_annotated_as_an_anndata_of_its_own_with_one_warning(small_model, embedded_adata, caplog):
    """annotate(model, adata[mask]): anndata turns the view into a copy of its own; the parent gets nothing. One
    warning of the package says so (anndata's ImplicitModificationWarning leaked before, naming an attribute)."""
    import warnings

    parent = embedded_adata.copy()
    view = parent[:50]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="tfp_scmix"):
        warnings.simplefilter("always")
        annotated = scm.annotate(small_model, view)
    assert not [w for w in caught if "view" in str(w.message)], [str(w.message) for w in caught]
    assert "adata is a view" in caplog.text and "parent AnnData gets nothing" in caplog.text
    assert not annotated.is_view and "scmix_label" in annotated.obs and "scmix_label" not in parent.obs


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


def test_a_call_that_reads_the_data_twice_warns_of_missing_genes_once(small_model, embedded_adata, caplog):
    """Majority voting reads the counts again after the prediction: the gene-coverage warning once per call (a trial
    saw it twice), and again in the next call."""
    query = embedded_adata[:, 40:].copy()  # the first 40 of the model's genes missing
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tfp_scmix"):
            scm.annotate(small_model, query, smooth=True, majority_voting=True)
        assert caplog.text.count("model genes") == 1, caplog.text
    assert query.uns["scmix"]["gene_coverage"] < 1


def test_annotated_anndata_is_what_scanpy_takes(small_model, embedded_adata, tmp_path):
    """Used categories only, colours, X_scmix, probabilities kept by write_h5ad without a warning (class
    names with "/"), flags and a record; with scanpy installed, its usual next steps run on the output."""
    import warnings

    adata = scm.annotate(small_model, embedded_adata[:300].copy(), majority_voting=True, over_clustering="louvain")
    labels = adata.obs["scmix_label"]
    assert set(labels.cat.categories) == set(labels) and UNASSIGNED not in labels.cat.categories
    assert any("/" in c for c in adata.uns["scmix"]["classes"])  # "CD4+/CD25 T Reg": a key anndata would refuse
    assert adata.obsm["X_scmix"].dtype == np.float32 and adata.obsm["X_scmix"].shape == (300, 12)
    assert adata.obs["scmix_novel"].dtype == bool and adata.obs["scmix_novelty"].between(0, 1).all()
    assert adata.uns["scmix"]["novelty_threshold"] == small_model.novelty.threshold
    assert adata.uns["scmix"]["n_novel"] == int(adata.obs["scmix_novel"].sum())
    # The vote: every louvain cluster gets one label, the most frequent of its cells' labels.
    for _, cells in adata.obs.groupby("louvain", observed=True):
        assert cells["scmix_majority_voting"].nunique() == 1
        counts = cells["scmix_label"].value_counts()
        assert counts[cells["scmix_majority_voting"].iloc[0]] == counts.max()  # a most frequent one (ties)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adata.write_h5ad(tmp_path / "annotated.h5ad")
    back = scm.data.read_h5ad(tmp_path / "annotated.h5ad")
    np.testing.assert_array_equal(back.obsm["scmix_probs"], adata.obsm["scmix_probs"])
    assert list(back.uns["scmix"]["classes"]) == small_model.class_names

    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sizes = adata.obs["scmix_label"].value_counts()  # as the README: a label of one cell has no test
    sc.tl.rank_genes_groups(adata, "scmix_label", groups=list(sizes.index[sizes > 1]))
    sc.pl.dotplot(adata, ["CD3E", "LYZ", "MS4A1"], groupby="scmix_label", show=False)
    sc.pp.neighbors(adata, use_rep="X_scmix")
    sc.tl.umap(adata)
    sc.pl.umap(adata, color="scmix_label", show=False)
    assert adata.obsm["X_umap"].shape == (300, 2)


def test_flags_change_labels_only_when_asked(small_model, embedded_adata):
    query = embedded_adata[:100].copy()
    dense = query.X.toarray()
    dense[:3] = 0
    dense[:3, :10] = 1  # 10 counts: too few to judge (MIN_COUNTS = 50)
    query.X = sp.csr_matrix(dense)
    flagged = scm.annotate(small_model, query.copy())
    assert flagged.obs["scmix_low_counts"].to_numpy()[:3].all()
    assert (flagged.obs["scmix_label"] != UNASSIGNED).all()  # flags only
    relabelled = scm.annotate(small_model, query.copy(), unassign_flagged=True)
    either = flagged.obs["scmix_low_counts"].to_numpy() | flagged.obs["scmix_novel"].to_numpy()
    assert ((relabelled.obs["scmix_label"] == UNASSIGNED).to_numpy() == either).all()
    assert relabelled.uns["scmix"]["n_unassigned"] == int(either.sum())


def test_majority_voting_by_hand_and_bad_clusterings(small_model, embedded_adata, caplog, monkeypatch):
    from tfp_scmix.annotate import majority_vote

    voted = majority_vote(["a", "b", "b", UNASSIGNED, UNASSIGNED, "c"], [0, 0, 0, 1, 1, 1])
    assert voted.tolist() == ["b", "b", "b", "c", "c", "c"]
    assert majority_vote([UNASSIGNED, UNASSIGNED], [0, 0]).tolist() == [UNASSIGNED, UNASSIGNED]
    # A cell without a cluster id is in no cluster: its own label (a trial saw 377 such cells of every type all
    # voted "CD4 T cells", as if NaN were one cluster).
    assert majority_vote(["a", "b", "a", "c"], [0, None, 0, None]).tolist() == ["a", "b", "a", "c"]
    query = embedded_adata[:60].copy()
    with pytest.raises(scm.DataError, match="no obs column 'leiden'"):
        scm.annotate(small_model, query, majority_voting=True, over_clustering="leiden")
    with pytest.raises(scm.DataError, match="one cluster id per cell"):
        scm.annotate(small_model, query, majority_voting=True, over_clustering=[0, 1])
    with pytest.raises(ValueError, match="pass majority_voting=True with it"):
        scm.annotate(small_model, query, over_clustering="louvain")  # before: silently no vote
    # The default over-clustering reads the genes' principal components beside X_scmix (on X_scmix alone, clusters
    # mixed lineages: docs/cross_dataset.md, "Majority voting"), as the known labels' graph does.
    import importlib

    from tfp_scmix.propagate import known_labels_features

    annotate_module = importlib.import_module("tfp_scmix.annotate")  # the module, not the function of that name

    seen = []

    def recorded(features, *args, **kwargs):
        seen.append(features)
        return over_clusters(features, *args, **kwargs)

    over_clusters = annotate_module.over_clusters
    monkeypatch.setattr(annotate_module, "over_clusters", recorded)
    computed = scm.annotate(small_model, query, majority_voting=True)
    assert computed.obs["scmix_over_clustering"].nunique() == round(np.sqrt(60))
    counts = scm.from_anndata(query, label_key=None).select_genes(small_model.genes).counts
    np.testing.assert_allclose(seen[0], known_labels_features(counts, computed.obsm["X_scmix"]), atol=1e-4)
    monkeypatch.setattr(annotate_module, "over_clusters", lambda features: over_clusters(features, n_clusters=12))
    twelve = scm.annotate(small_model, query, majority_voting=True).obs["scmix_over_clustering"]
    assert list(twelve.cat.categories) == [str(i) for i in range(12)]  # in numeric order, not "0", "1", "10", "11"
    monkeypatch.undo()
    # The user's clusters with ids missing: those cells keep their label, the others vote; the clusters are written.
    query.obs["leiden"] = pd.Categorical(np.where(np.arange(60) % 7 == 0, None, np.arange(60) // 20))
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        scm.annotate(small_model, query, majority_voting=True, over_clustering="leiden")
    assert "9 of 60 cells have no cluster id in obs['leiden']" in caplog.text
    alone = query.obs["leiden"].isna().to_numpy()
    np.testing.assert_array_equal(
        query.obs["scmix_majority_voting"].astype(str)[alone], query.obs["scmix_label"].astype(str)[alone]
    )
    for cluster in range(3):
        voters = (query.obs["leiden"] == cluster).to_numpy()
        assert query.obs["scmix_majority_voting"][voters].nunique() == 1
    assert query.obs["scmix_over_clustering"].isna().sum() == 9


def test_smooth_writes_labels_from_the_neighbourhood_averaged_probabilities(small_model, embedded_adata, caplog):
    from tfp_scmix.novelty import log_ratio_features
    from tfp_scmix.propagate import smooth

    query = embedded_adata[:120].copy()
    counts = query.X.tolil()
    counts[:2] = 0  # cells without counts stay unassigned after smoothing too
    query.X = sp.csr_matrix(counts)
    adata = scm.annotate(small_model, query, smooth=True)
    out = scm.predict(small_model, query)
    expected = smooth(log_ratio_features(out["cell_topic"], 1), out["probs"])
    np.testing.assert_allclose(adata.obsm["scmix_smoothed_probs"], expected, rtol=1e-5, atol=1e-6)
    names = np.asarray(small_model.class_names, dtype=object)[expected.argmax(axis=1)]
    names[:2] = UNASSIGNED
    assert adata.obs["scmix_smoothed"].astype(str).tolist() == names.tolist()
    assert set(adata.obs["scmix_smoothed"].cat.categories) == set(names)
    assert adata.uns["scmix"]["smooth"] is True
    # Annotating again without the option leaves no stale smoothed labels behind.
    again = scm.annotate(small_model, query)
    assert "scmix_smoothed" not in again.obs and "scmix_smoothed_probs" not in again.obsm
    assert "scmix_smoothed_colors" not in again.uns
    with caplog.at_level(logging.WARNING, logger="tfp_scmix"):
        scm.annotate(small_model, query[:10].copy(), smooth=True)
    assert "10 cells: too few for smoothing" in caplog.text


def test_known_labels_of_the_annotated_cells_refit_the_class_branch_on_pooled_counts(
    small_model, embedded_adata, caplog
):
    """annotate with label_key writes the per-cell probabilities times those of the neighbour-pooled counts,
    predicted by the class branch refitted on the labelled cells' pooled counts; the user's model is left as
    it was. Without the refit, the branch (fitted on single cells) calls the pooled counts worse."""
    from tfp_scmix.annotate import known_label_experts
    from tfp_scmix.data import from_anndata
    from tfp_scmix.novelty import log_ratio_features
    from tfp_scmix.propagate import POOLING_NEIGHBORS, known_labels_graph, pooled_counts, product_of_experts

    adata = embedded_adata.copy()
    known = np.full(adata.n_obs, "Unknown", dtype=object)
    labelled = np.random.default_rng(0).permutation(adata.n_obs)[:150]
    known[labelled] = adata.obs["cell_type"].astype(str).to_numpy()[labelled]
    adata.obs["known"] = known
    before = scm.predict(small_model, adata)
    weights = [w.copy() for m in small_model.members for w in m.classifier.get_weights()]
    scm.annotate(small_model, adata, label_key="known", unlabeled_category="Unknown")
    after = [w for m in small_model.members for w in m.classifier.get_weights()]
    assert all(np.array_equal(a, b) for a, b in zip(weights, after, strict=True))
    np.testing.assert_array_equal(scm.predict(small_model, adata)["probs"], before["probs"])
    ids = np.full(adata.n_obs, -1)
    ids[labelled] = [small_model.class_names.index(c) for c in known[labelled]]
    data = dataclasses.replace(from_anndata(adata, label_key=None, genes=small_model.genes), labels=ids)
    experts = known_label_experts(small_model, data)
    assert POOLING_NEIGHBORS == (15,)
    np.testing.assert_allclose(experts["pooled"], experts["pooled_15"], rtol=1e-6)
    # The experiments' ablation: one pooled expert per neighbourhood size, multiplied, the default's among them.
    sizes = known_label_experts(small_model, data, pooling_neighbors=(15, 30))
    np.testing.assert_allclose(sizes["pooled"], product_of_experts(sizes["pooled_15"], sizes["pooled_30"]))
    np.testing.assert_allclose(sizes["pooled_15"], experts["pooled"], atol=1e-5)
    assert not np.allclose(sizes["pooled_15"], sizes["pooled_30"], atol=1e-3)
    with pytest.raises(ValueError, match="pooling_neighbors must be one or more positive"):
        known_label_experts(small_model, data, pooling_neighbors=())
    expected = product_of_experts(experts["cell"], experts["pooled"])
    np.testing.assert_allclose(adata.obsm["scmix_with_labels_probs"], expected, rtol=1e-4, atol=1e-6)
    names = np.asarray(small_model.class_names, dtype=object)[expected.argmax(axis=1)]
    names[labelled] = known[labelled]  # the labelled cells keep their label
    assert adata.obs["scmix_with_labels"].astype(str).tolist() == names.tolist()
    assert adata.uns["scmix"]["label_key"] == "known" and adata.uns["scmix"]["n_known_labels"] == 150
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    hidden = np.setdiff1d(np.arange(adata.n_obs), labelled)

    def errors(probs):
        return int((np.asarray(small_model.class_names)[probs[hidden].argmax(axis=1)] != truth[hidden]).sum())

    # The refit is what makes the pooled counts useful: the unrefitted branch calls them worse.
    graph = known_labels_graph(data.counts, log_ratio_features(before["cell_topic"], 1), POOLING_NEIGHBORS[0])
    unrefitted = scm.predict(small_model, pooled_counts(graph, data.counts, np.arange(adata.n_obs)))["probs"]
    assert errors(experts[f"pooled_{POOLING_NEIGHBORS[0]}"]) < errors(unrefitted)
    # On the held-out cells, fewer errors than the per-cell call of this small model.
    per_cell = (adata.obs["scmix_label"].astype(str).to_numpy()[hidden] != truth[hidden]).sum()
    assert (names[hidden] != truth[hidden]).sum() < per_cell
    # Annotating again without known labels leaves no stale outputs behind, and says what it removed.
    with caplog.at_level(logging.WARNING, logger="tfp_scmix"):
        again = scm.annotate(small_model, adata)
    removed = "removed obs['scmix_with_labels'], obsm['scmix_with_labels_probs'] of an earlier annotate call"
    assert removed in caplog.text and "key_added=" in caplog.text
    assert "scmix_with_labels" not in again.obs and "scmix_with_labels_probs" not in again.obsm
    assert "scmix_with_labels_colors" not in again.uns


def test_known_labels_that_cannot_be_used_are_refused(small_model, embedded_adata):
    adata = embedded_adata[:100].copy()
    with pytest.raises(scm.DataError, match="no obs column 'known'"):
        scm.annotate(small_model, adata, label_key="known")
    adata.obs["known"] = "Unknown"
    with pytest.raises(scm.DataError, match="has no known label"):
        scm.annotate(small_model, adata, label_key="known", unlabeled_category="Unknown")
    adata.obs["known"] = ["Martian cell"] + ["Unknown"] * 99
    with pytest.raises(scm.DataError, match=r"labels \['Martian cell'\] that are not among the model's classes"):
        scm.annotate(small_model, adata, label_key="known", unlabeled_category="Unknown")
    # The likeliest slip, the placeholder of the unlabelled cells left out: the message names the option.
    with pytest.raises(scm.DataError, match=r"pass unlabeled_category='Unknown' \(command line: --unlabeled-category"):
        scm.annotate(small_model, adata, label_key="known")
    with pytest.raises(ValueError, match="pass label_key with it"):
        scm.annotate(small_model, adata, unlabeled_category="Unknown")
    # A class written another way (a trial's "B cells " for "B cells"): the message names the class meant.
    written = small_model.class_names[0]
    adata.obs["known"] = [f"{written} "] + ["Unknown"] * 99
    said = f"'{written} ' looks like the model's '{written}' written another way"
    with pytest.raises(scm.DataError, match=re.escape(said)):
        scm.annotate(small_model, adata, label_key="known", unlabeled_category="Unknown")
    assert "scmix_label" not in adata.obs  # refused before anything is written


def test_known_labels_are_read_as_training_reads_them(embedded_adata, caplog):
    """Labels compared as class names, as `from_anndata` compares them (a trial: unlabeled_category=-1 trained but
    annotate refused the "-1" cells it named; integer codes with NaN, which pandas stores as 0.0, 1.0, ..., were
    "not among the model's classes" "0", "1", ...)."""
    from types import SimpleNamespace

    from tfp_scmix.annotate import _known_labels

    adata = embedded_adata[:6].copy()
    codes = [0, 1, 2, -1, 1, 0]
    expected = [0, 1, 2, -1, 1, 0]
    for column, unknown in (
        (codes, -1),  # integer codes, -1 (an int) for the unlabelled cells
        ([str(c) for c in codes], -1),
        (codes, "-1"),
        ([0.0, 1.0, 2.0, np.nan, 1.0, 0.0], None),  # integer codes with NaN: pandas stores floats
        (pd.array([0, 1, 2, None, 1, 0], dtype="Int64"), None),
    ):
        adata.obs["known"] = column
        for_model = from_anndata(adata, label_key="known", unlabeled_category=unknown)
        model = SimpleNamespace(class_names=for_model.classes)
        assert model.class_names == ["0", "1", "2"]
        np.testing.assert_array_equal(_known_labels(adata, model, "known", unknown), expected)
        np.testing.assert_array_equal(for_model.labels, expected)
    # An unlabeled_category that marks no cell is warned of, as training warns (a trial: annotate said nothing).
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        _known_labels(adata, model, "known", "Unknown")
    assert "unlabeled_category 'Unknown' matches no value of obs['known']" in caplog.text


def test_a_model_without_a_novelty_detector_says_so(small_model, embedded_adata, caplog):
    """A member fitted on the plain Keras path carries no novelty detector (`train` fits one): annotate warns that
    it writes no novelty columns, instead of leaving a user's obs['scmix_novel'] to fail with a KeyError."""
    adata = embedded_adata.copy()
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        scm.annotate(small_model.members[0], adata)
    assert "no novelty detector" in caplog.text and "tfp_scmix.train fits one" in caplog.text
    assert "scmix_novel" not in adata.obs and "scmix_novelty" not in adata.obs
    caplog.clear()
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        scm.annotate(small_model, adata)
    assert "no novelty detector" not in caplog.text and "scmix_novel" in adata.obs
