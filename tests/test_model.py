import keras
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from tfp_scmix import SCMix
from tfp_scmix.annotate import annotate, predict_data
from tfp_scmix.cli import few_shot_split, main, scores, train_model
from tfp_scmix import explain


def matched_topic_correlation(learned, planted):
    """Correlation of each planted topic with its Hungarian-matched learned topic.

    Topics are compared by their excess over the mean topic (topic_gene minus its mean over topics),
    which is what distinguishes one topic from the others.
    """
    a, b = (beta - beta.mean(axis=0, keepdims=True) for beta in (planted, learned))
    corr = np.corrcoef(a, b)[: len(a), len(a):]
    rows, cols = linear_sum_assignment(-corr)
    return corr[rows, cols]


def test_recovers_planted_topics_and_labels(synthetic):
    data, planted = synthetic
    model = train_model(data, epochs=80, batch_size=128, verbose=0, n_topics=6, kl_warmup_epochs=5, restarts=1)
    corr = matched_topic_correlation(model.topics(None).numpy(), planted.topic_gene)
    # stated measure: every planted topic's matched learned topic correlates > 0.75, on average > 0.85
    assert corr.min() > 0.75 and corr.mean() > 0.85, corr
    truth = (np.log(planted.cell_topic + 1e-12) @ planted.class_weights.T).argmax(1)
    predicted = predict_data(model, data)["label"]
    unlabelled = data.labels < 0
    assert (predicted[unlabelled] == truth[unlabelled]).mean() > 0.9


def test_embedded_real_data_well_above_chance(embedded):
    test, labelled = few_shot_split(embedded.n_cells, 550, 150, seed=0)
    model = train_model(embedded.hide_labels(labelled), epochs=40, batch_size=128, verbose=0, n_topics=20)
    result = scores(embedded.labels[test], predict_data(model, embedded.subset(test))["label"])
    majority = np.bincount(embedded.labels[test]).max() / len(test)
    # 10 types; the largest is 34% of cells: chance is at most that
    assert result["accuracy"] > majority + 0.2, result


def test_fit_validation_callbacks_evaluate_save_load(embedded, tmp_path):
    train, valid = embedded.subset(np.arange(500)).hide_labels(np.arange(150)), embedded.subset(np.arange(500, 700))
    model = SCMix.from_data(train, n_topics=8)
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    history = model.fit(train.dataset(128), validation_data=valid.dataset(200, shuffle=False), epochs=3, verbose=0,
                        callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=5),
                                   keras.callbacks.ModelCheckpoint(tmp_path / "best.keras", monitor="val_loss")])
    for term in ("loss", "reconstruction", "kl_cell", "kl_topic", "kl_class", "label_nll", "val_loss"):
        assert term in history.history and np.isfinite(history.history[term]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]
    evaluated = model.evaluate(valid.dataset(200, shuffle=False), verbose=0, return_dict=True)
    assert np.isfinite(evaluated["loss"])
    before = predict_data(model, valid)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    after = predict_data(loaded, valid)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    assert loaded.genes == model.genes and loaded.class_names == model.class_names
    assert keras.models.load_model(tmp_path / "best.keras").n_topics == 8
    # dense and scipy inputs give the same predictions as the sparse pipeline
    np.testing.assert_allclose(loaded.predict(valid.counts, verbose=0)["probs"], before["probs"], atol=1e-6)
    # training resumes from the saved optimizer state without warnings about skipped variables
    loaded.fit(train.dataset(128), epochs=1, verbose=0)


def test_predict_outputs(small_model, embedded):
    out = predict_data(small_model, embedded)
    assert out["probs"].shape == (700, 10) and out["topics"].shape == (700, 12)
    np.testing.assert_allclose(out["probs"].sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(out["label"], out["probs"].argmax(1))
    np.testing.assert_allclose(out["confidence"], out["probs"].max(1))


def test_annotate_writes_anndata_slots(small_model, embedded_adata):
    adata = embedded_adata.copy()
    adata = adata[:, ::-1].copy()  # a different gene order is aligned by name
    annotate(small_model, adata, min_confidence=0.99)
    assert set(adata.obs["scmix_label"].cat.categories) == set(small_model.class_names) | {"unassigned"}
    assert (adata.obs["scmix_label"] == "unassigned").any()
    assert adata.obsm["scmix_topics"].shape == (700, 12)
    assert list(adata.obsm["scmix_probs"].columns) == small_model.class_names
    assert adata.varm["scmix_topic_gene"].shape == (765, 12)
    gene = small_model.genes[0]
    np.testing.assert_allclose(adata.varm["scmix_topic_gene"][adata.var_names.get_loc(gene)],
                               small_model.topics(None).numpy()[:, 0], rtol=1e-6)


def test_explanations(small_model, tmp_path):
    genes = explain.top_genes(small_model, n_genes=5)
    assert len(genes) == 12 * 5 and set(genes.columns) == {"topic", "rank", "gene", "weight", "lift"}
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


def test_bad_settings_are_refused(embedded):
    with pytest.raises(ValueError, match="prior must be one of"):
        SCMix.from_data(embedded, prior="laplace")
    with pytest.raises(ValueError, match="label_mode must be one of"):
        SCMix.from_data(embedded, label_mode="semi")


def test_cli_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--topics", "8", "--verbose", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "held-out cells: accuracy" in out and "Top genes" in out
    assert (tmp_path / "model.keras").exists() and (tmp_path / "explanations" / "class_topics.csv").exists()
    # The demo's model (an ensemble of 3 restarts) annotates and explains from the command line.
    from tfp_scmix.datasets import pbmc68k_reduced

    pbmc68k_reduced().write_h5ad(tmp_path / "query.h5ad")
    assert main(["annotate", str(tmp_path / "model.keras"), str(tmp_path / "query.h5ad"),
                 "--out", str(tmp_path / "annotated.h5ad")]) == 0
    assert main(["explain", str(tmp_path / "model.keras"), "--out", str(tmp_path / "explained")]) == 0
    assert (tmp_path / "explained" / "class_genes.csv").exists()
    (tmp_path / "broken.keras").write_bytes(b"not a model")
    capsys.readouterr()
    assert main(["annotate", str(tmp_path / "broken.keras"), str(tmp_path / "query.h5ad"),
                 "--out", str(tmp_path / "never.h5ad")]) == 2
    assert "broken.keras" in capsys.readouterr().err and not (tmp_path / "never.h5ad").exists()


def test_adapt_fits_query_offsets_and_leaves_reference_alone(small_model, embedded):
    import dataclasses

    import scipy.sparse as sp

    reference = predict_data(small_model, embedded)
    rng = np.random.default_rng(1)
    log_factor = rng.normal(0, 1.0, embedded.n_genes)
    shifted = (embedded.counts @ sp.diags(np.exp(log_factor).astype(np.float32))).tocsr()
    shifted.data = rng.poisson(shifted.data).astype(np.float32)
    keep = np.asarray(shifted.sum(axis=1)).ravel() > 0
    query = dataclasses.replace(embedded, counts=shifted).subset(keep)
    out = small_model.adapt(query, epochs=10)
    assert out["probs"].shape == (int(keep.sum()), small_model.n_classes)
    after = predict_data(small_model, embedded)
    for key in reference:  # the reference model and its predictions are untouched
        np.testing.assert_array_equal(reference[key], after[key])
    assert small_model.settings["n_batches"] == 1
    with pytest.raises(ValueError, match="model's gene order"):
        small_model.adapt(query.select_genes(list(reversed(small_model.genes))))
