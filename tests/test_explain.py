"""Explanations: topics' genes and the topics that predict each class, for one model or every restart."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import tfp_scmix as scm
from tfp_scmix import explain
from tfp_scmix.data import DataError


def test_explanations(small_model, tmp_path):
    genes = explain.top_genes(small_model, n_genes=5)
    assert len(genes) == 12 * 5 and set(genes.columns) == {"topic", "rank", "gene", "weight", "lift"}
    assert explain.topic_names(small_model) == [f"topic_{k}" for k in range(12)]  # one member: plain names
    table = explain.class_topic_table(small_model)
    assert len(table) == 10 * 12 and (table.groupby("topic")["contrast"].sum().abs() < 1e-4).all()
    per_class = explain.class_genes(small_model, n_genes=5)
    assert set(per_class["class"]) == set(small_model.class_names)
    score, found = explain.marker_score(small_model, {"CD56+ NK": ["GNLY", "NKG7"]}, n_genes=30)
    assert 0 <= score <= 1 and len(found) == 2
    by_lift = explain.class_genes(small_model, n_genes=5)
    assert (by_lift.groupby("class")["lift"].apply(lambda x: x.is_monotonic_decreasing)).all()
    paths = explain.write_explanations(small_model, tmp_path)
    for path in paths.values():
        assert path.exists() and path.stat().st_size > 0
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_each_class_shows_its_labelled_cells_and_classes_of_few_are_warned_of(
    small_model, embedded, tmp_path, caplog, monkeypatch
):
    labelled = np.random.default_rng(0).permutation(embedded.n_cells)[:150]  # small_model's labelled cells
    expected = {name: int((embedded.labels[labelled] == code).sum()) for code, name in enumerate(embedded.classes)}
    counts = explain.labelled_cells(small_model)
    assert counts.to_dict() == expected and counts.sum() == 150
    for table in (
        explain.class_topic_table(small_model),
        explain.class_genes(small_model, n_genes=3),
        explain.class_gene_weights(small_model, n_genes=3),
    ):
        assert (table["labelled_cells"] == table["class"].map(expected)).all()
    few = {name: n for name, n in expected.items() if n < explain.FEW_LABELS}
    assert few and explain.few_label_classes(small_model) == few  # the embedded set's rare types: a real case
    reloaded = scm.load_model(scm.save_model(small_model, tmp_path / "m.keras"))
    assert explain.labelled_cells(reloaded).to_dict() == expected  # kept in the file
    with caplog.at_level("WARNING", logger="tfp_scmix.explain"):
        explain.write_explanations(small_model, tmp_path / "explained")  # train warned already: not again
        assert not [r for r in caplog.records if r.name == "tfp_scmix.explain"]
        explain.write_explanations(reloaded, tmp_path / "explained")  # a model from its file: named here
    warned = [r.getMessage() for r in caplog.records if r.name == "tfp_scmix.explain"]
    assert len(warned) == 1 and all(f"{name} ({n})" in warned[0] for name, n in few.items())
    # A model file written before the counts were recorded: unknown counts, shown as <NA>, and no warning.
    monkeypatch.delitem(reloaded.members[0].provenance, "labelled_cells")
    assert explain.labelled_cells(reloaded).isna().all() and explain.few_label_classes(reloaded) == {}
    assert explain.class_topic_table(reloaded)["labelled_cells"].isna().all()
    caplog.clear()
    with caplog.at_level("WARNING", logger="tfp_scmix.explain"):
        explain.write_explanations(reloaded, tmp_path / "older")
    assert not [r for r in caplog.records if r.name == "tfp_scmix.explain"]


def test_an_ensemble_is_explained_member_by_member_or_together(two_restarts, tmp_path):
    names = [f"m{m}_topic_{k}" for m in range(2) for k in range(8)]
    assert explain.topic_names(two_restarts) == names
    table = explain.class_topic_table(two_restarts)
    assert len(table) == 10 * 16 and set(table.topic) == set(names)
    assert (table.groupby("topic")["contrast"].sum().abs() < 1e-4).all()
    assert list(explain.topic_gene_table(two_restarts).columns) == names
    # member=1: that member's table alone, with plain topic names, the same as explaining the member itself.
    second = explain.class_topic_table(two_restarts, member=1)
    assert set(second.topic) == {f"topic_{k}" for k in range(8)}
    assert second.equals(explain.class_topic_table(two_restarts.members[1]))
    assert explain.class_topic_table(two_restarts, member=-1).equals(second)
    # Together, member 1's rows hold the same numbers under its prefix.
    together = table[table.topic.str.startswith("m1_")].assign(topic=lambda t: t.topic.str[3:])
    merged = together.merge(second, on=["class", "topic"], suffixes=("", "_alone"))
    assert len(merged) == 10 * 8
    for column in ("weight", "contrast", "scale"):
        np.testing.assert_allclose(merged[column], merged[f"{column}_alone"], rtol=1e-6)
    # A class's most predictive topic is the one of highest contrast over both members.
    best = table.loc[table.groupby("class")["contrast"].idxmax(), ["class", "topic"]]
    chosen = explain.class_genes(two_restarts, n_genes=3).drop_duplicates("class")[["class", "topic"]]
    assert dict(zip(best["class"], best["topic"])) == dict(zip(chosen["class"], chosen["topic"]))
    for bad in (5, 2, -3):
        with pytest.raises(IndexError, match=f"member {bad} out of range: the model has 2 member"):
            explain.class_topic_table(two_restarts, member=bad)
    paths = explain.write_explanations(two_restarts, tmp_path)
    assert all(path.stat().st_size > 0 for path in paths.values()) and "class_gene_weights" in paths
    assert "class_gene_weights_png" in paths  # the figure of the genes that carry the calls
    # The dotplot's genes are those that weigh most in the calls: the gene weights' top genes when the branch reads
    # genes (they carry the calls: docs/few_shot.md, "The gene term").
    genes = explain.call_genes(two_restarts, 2)
    assert genes.equals(explain.class_gene_weights(two_restarts, 2)[["class", "gene"]])


def test_class_gene_weights_rank_each_class_by_its_gene_weight_contrast(two_restarts, embedded):
    import tfp_scmix as scm

    table = explain.class_gene_weights(two_restarts, n_genes=4)
    assert len(table) == 10 * 4 and list(table["rank"][:4]) == [0, 1, 2, 3]
    weights = np.mean([m.classifier.gene_weights.numpy() for m in two_restarts.members], axis=0)
    contrast = weights - weights.mean(axis=0)
    for c, cls in enumerate(two_restarts.class_names):
        rows = table[table["class"] == cls]
        expected = np.argsort(-contrast[c], kind="stable")[:4]
        assert list(rows.gene) == [two_restarts.genes[g] for g in expected]
        np.testing.assert_allclose(rows.contrast, contrast[c, expected], rtol=1e-6)
        np.testing.assert_allclose(rows.weight, weights[c, expected], rtol=1e-6)
    alone = explain.class_gene_weights(two_restarts, n_genes=4, member=1)
    first = alone[alone["class"] == two_restarts.class_names[0]]
    one = two_restarts.members[1].classifier.gene_weights.numpy()
    np.testing.assert_allclose(first.contrast.iloc[0], (one[0] - one.mean(axis=0)).max(), rtol=1e-6)
    topics_only = scm.SCMix.from_data(embedded, scm.Config(n_topics=4, classifier_genes=False))
    topics_only.cells_seen.assign(1.0)  # as if trained: the branch's kind is refused, not the untrained model
    with pytest.raises(ValueError, match="reads topics only .* use class_genes"):
        explain.class_gene_weights(topics_only)


def test_embedding_of_the_classifier_features():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (40, 6)), rng.normal(8, 1, (40, 6))])
    coords, method = explain.embed(features)
    assert coords.shape == (80, 2) and method in ("UMAP", "t-SNE")
    # The two groups stay apart: every cell is nearer its own group's centre than the other's.
    centres = np.stack([coords[:40].mean(axis=0), coords[40:].mean(axis=0)])
    nearest = np.linalg.norm(coords[:, None] - centres[None], axis=2).argmin(axis=1)
    assert (nearest == np.repeat([0, 1], 40)).all()


def test_figures_of_a_dataset_need_it_annotated_and_say_so_before_writing(small_model, embedded_adata, tmp_path):
    adata = embedded_adata.copy()
    plots = [
        lambda: explain.plot_embedding(adata, tmp_path / "embedding.png"),
        lambda: explain.plot_confidence(adata, tmp_path / "confidence.png"),
        lambda: explain.plot_dotplot(small_model, adata, tmp_path / "dotplot.png"),
        lambda: explain.plot_confusion(adata, "cell_type", tmp_path / "confusion.png"),
        lambda: explain.write_data_figures(small_model, adata, tmp_path / "figures"),
    ]
    for plot in plots:
        with pytest.raises(DataError, match=r"obs\['scmix_label'\].*annotate the data first"):
            plot()
    assert not list(tmp_path.iterdir())
    adata.X = sp.csr_matrix(np.where(np.arange(adata.n_obs)[:, None] < 2, 0, adata.X.toarray()))  # two without counts
    scm.annotate(small_model, adata)
    assert np.isnan(adata.obs["scmix_confidence"].to_numpy()[:2]).all()  # drawn without a warning (below)
    adata.obsm["X_scmix_umap"] = adata.obsm["X_scmix"][:, :2]  # a stored embedding: no t-SNE of 700 cells here
    with pytest.raises(DataError, match="no obs column 'nosuch' of known labels"):
        explain.write_data_figures(small_model, adata, tmp_path / "figures", label_key="nosuch")
    assert not list(tmp_path.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        paths = explain.write_data_figures(small_model, adata, tmp_path / "figures", label_key="cell_type")
    assert set(paths) >= {"embedding_png", "confidence_png", "dotplot_png", "confusion_png"}
    assert all(path.stat().st_size > 0 for path in paths.values())
    # Markers of the user's choice, as scanpy's var_names (a trial could not pass its own); one the data lack is named.
    markers = list(adata.var_names[:4])
    explain.plot_dotplot(small_model, adata, tmp_path / "markers.png", genes=markers)
    assert (tmp_path / "markers.png").stat().st_size > 0
    with pytest.raises(DataError, match=r"genes \['NOTAGENE'\] are not among the data's genes"):
        explain.plot_dotplot(small_model, adata, tmp_path / "never.png", genes=[markers[0], "NOTAGENE"])
    assert not (tmp_path / "never.png").exists()
    # Annotated by another model (another training set): its labels are not drawn against this model's genes (a
    # trial's dotplot had one model's classes by another's genes, without a sign of it).
    assert not explain.annotated_by_another_model(small_model, adata)
    scm.save_model(small_model, tmp_path / "copy.keras")  # a model and its saved copy are one model
    assert not explain.annotated_by_another_model(scm.load_model(tmp_path / "copy.keras"), adata)
    # Another training on the same data (other settings or seed): its weights differ, and that is enough (a trial).
    adata.uns["scmix"] = {**adata.uns["scmix"], "model_fingerprint": "0123456789abcdef"}
    assert explain.annotated_by_another_model(small_model, adata)
    adata.uns["scmix"] = {
        **adata.uns["scmix"],
        "model_fingerprint": "",
        "model_data_fingerprint": "another-training-set",
    }
    assert explain.annotated_by_another_model(small_model, adata)
    for plot in (
        lambda: explain.plot_dotplot(small_model, adata, tmp_path / "other.png"),
        lambda: explain.write_data_figures(small_model, adata, tmp_path / "other"),
    ):
        with pytest.raises(DataError, match="written by another model .* annotate the data with this model first"):
            plot()
    assert not (tmp_path / "other.png").exists() and not (tmp_path / "other").exists()


def test_the_confusion_figure_puts_agreeing_calls_on_its_diagonal(tmp_path):
    """Rows follow the model's class order (the columns), not string order, where the names agree; the other
    labels come after them. (Rows were sorted as strings: "CD14+" before "CD4", against the model's order.)"""
    import anndata
    import pandas as pd

    order = ["B cells", "CD4 T cells", "CD8 T cells", "CD14+ Monocytes"]  # a model's order, not sorted as strings
    called = ["B cells", "CD4 T cells", "CD8 T cells", "CD14+ Monocytes", "CD4 T cells", "CD14+ Monocytes"]
    truth = ["B cells", "CD4 T cells", "CD8 T cells", "CD14+ Monocytes", "CD8 T cells", "Platelets"]
    adata = anndata.AnnData(
        X=np.zeros((6, 1), np.float32),
        obs=pd.DataFrame(
            {"scmix_label": pd.Categorical(called, categories=order), "scmix_confidence": 0.9, "truth": truth},
            index=[f"c{i}" for i in range(6)],
        ),
    )
    counts = explain.plot_confusion(adata, "truth", tmp_path / "confusion.png")
    assert list(counts.columns) == order and list(counts.index) == [*order, "Platelets"]
    assert np.diag(counts.to_numpy()[:4]).tolist() == [1, 1, 1, 1]
    # Cells marked unlabelled (a value such as "Unknown", `--unlabeled-category`) are left out like NaN: a trial's
    # confusion plot had an "Unknown (2488)" row and a share of agreeing names over all cells.
    adata.obs["truth"] = ["B cells", "Unknown", "Unknown", "CD14+ Monocytes", "CD8 T cells", "Unknown"]
    counts = explain.plot_confusion(adata, "truth", tmp_path / "confusion.png", unlabeled_category="Unknown")
    assert "Unknown" not in counts.index and counts.to_numpy().sum() == 3
