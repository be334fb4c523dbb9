"""SCMix: what it learns, how it is built from data, and its life as a Keras model."""

import dataclasses

import keras
import numpy as np
import pytest
import scipy.sparse as sp
import tensorflow as tf
from scipy.optimize import linear_sum_assignment

import tfp_scmix as scm
from tfp_scmix import SCMix
from tfp_scmix.config import Config
from tfp_scmix.evaluate import few_shot_split, scores
from tfp_scmix.layers import CellEncoder
from tfp_scmix.model import library_versions
from tfp_scmix.stream import H5ADStream


def matched_topic_correlation(learned, planted):
    """Correlation of each planted topic with its Hungarian-matched learned topic.

    Topics are compared by their excess over the mean topic (topic_gene minus its mean over topics),
    which is what distinguishes one topic from the others.
    """
    a, b = (beta - beta.mean(axis=0, keepdims=True) for beta in (planted, learned))
    corr = np.corrcoef(a, b)[: len(a), len(a) :]
    rows, cols = linear_sum_assignment(-corr)
    return corr[rows, cols]


def test_recovers_planted_topics_and_labels(synthetic):
    data, planted = synthetic
    model = scm.train(data, Config(n_topics=6, kl_warmup_epochs=5, batch_size=128), epochs=80, restarts=1, verbose=0)
    corr = matched_topic_correlation(model.topic_gene().numpy(), planted.topic_gene)
    # stated measure: every planted topic's matched learned topic correlates > 0.75, on average > 0.85
    assert corr.min() > 0.75 and corr.mean() > 0.85, corr
    truth = (np.log(planted.cell_topic + 1e-12) @ planted.class_weights.T).argmax(1)
    predicted = scm.predict(model, data)["label"]
    unlabelled = data.labels < 0
    assert (predicted[unlabelled] == truth[unlabelled]).mean() > 0.9


def test_embedded_real_data_well_above_chance(embedded):
    test, labelled = few_shot_split(embedded.n_cells, 550, 150, seed=0)
    model = scm.train(
        embedded.hide_labels(labelled), Config(n_topics=20, batch_size=128), epochs=40, restarts=1, verbose=0
    )
    result = scores(embedded.labels[test], scm.predict(model, embedded.subset(test))["label"])
    majority = np.bincount(embedded.labels[test]).max() / len(test)
    # 10 types; the largest is 34% of cells: chance is at most that
    assert result["accuracy"] > majority + 0.2, result


def test_fit_validation_callbacks_evaluate_save_load(embedded, tmp_path):
    train, valid = embedded.subset(np.arange(500)).hide_labels(np.arange(150)), embedded.subset(np.arange(500, 700))
    model = SCMix.from_data(train, Config(n_topics=8))
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    history = model.fit(
        train.dataset(128),
        validation_data=valid.dataset(200, shuffle=False),
        epochs=3,
        verbose=0,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=5),
            keras.callbacks.ModelCheckpoint(tmp_path / "best.keras", monitor="val_loss"),
        ],
    )
    for term in ("loss", "reconstruction", "kl_cell", "kl_topic", "kl_class", "label_nll", "val_loss"):
        assert term in history.history and np.isfinite(history.history[term]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]
    evaluated = model.evaluate(valid.dataset(200, shuffle=False), verbose=0, return_dict=True)
    assert np.isfinite(evaluated["loss"])
    before = scm.predict(model, valid)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    after = scm.predict(loaded, valid)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    assert loaded.genes == model.genes and loaded.class_names == model.class_names
    assert loaded.config == model.config and loaded.sizes == model.sizes and loaded.seed == model.seed
    assert keras.models.load_model(tmp_path / "best.keras").n_topics == 8
    # Keras's predict on dense counts (TensorFlow's normalisation, graph mode) gives the predictions of
    # scm.predict (numpy's normalisation, the XLA-compiled function) up to float32 sums in another order
    np.testing.assert_allclose(loaded.predict(valid.counts, verbose=0)["probs"], before["probs"], atol=1e-5)
    # training resumes from the saved optimizer state without warnings about skipped variables
    loaded.fit(train.dataset(128), epochs=1, verbose=0)


def test_bad_settings_are_refused(embedded):
    with pytest.raises(ValueError, match="prior must be one of .*'laplace'"):
        SCMix.from_data(embedded, {"prior": "laplace"})
    with pytest.raises(ValueError, match="label_mode must be one of .*'semi'"):
        SCMix.from_data(embedded, {**Config(n_topics=4).to_dict(), "label_mode": "semi"})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['n_topic'\]"):
        SCMix.from_data(embedded, {"n_topic": 4})


SIZES = {"n_cells": 10, "n_labelled": 4, "total_counts": 1000.0, "n_batches": 1}


def test_data_sizes_are_required_and_positive():
    genes, classes = ["g0", "g1", "g2"], ["a", "b"]
    with pytest.raises(TypeError, match="n_cells"):
        SCMix(genes, classes, Config(n_topics=2))
    for name in SIZES:
        with pytest.raises(TypeError, match=name):
            SCMix(genes, classes, Config(n_topics=2), **{k: v for k, v in SIZES.items() if k != name})
    for name, bad in [("n_cells", 0), ("total_counts", 0.0), ("n_batches", 0), ("n_labelled", -1)]:
        with pytest.raises(ValueError, match=rf"data sizes must be positive, received \{{'{name}': {bad}\}}"):
            SCMix(genes, classes, Config(n_topics=2), **{**SIZES, name: bad})
    model = SCMix(genes, classes, Config(n_topics=2), **{**SIZES, "n_labelled": 0})  # unlabelled data is fine
    assert model.sizes == {**SIZES, "n_labelled": 0} and model.settings["n_labelled"] == 1
    topic_gene = model.topic_gene().numpy()
    assert topic_gene.shape == (2, 3) and np.allclose(topic_gene.sum(1), 1, atol=1e-6)
    with pytest.raises(ValueError, match="at least two classes"):
        SCMix(genes, ["a"], **SIZES)


# What SCMix.get_config held before the settings became one Config (tfp_scmix 0.1.0 files written up to
# commit a996566): every setting flat beside the sizes, global_scale and expected_active_topics resolved,
# no training settings but classifier_learning_rate, no "config" and no "adapted_batch" key.
OLD_FLAT_SETTINGS = (
    "n_topics",
    "hidden_units",
    "dropout",
    "prior",
    "label_mode",
    "label_weight",
    "prior_alpha",
    "learn_alpha",
    "kl_warmup_epochs",
    "n_cells",
    "n_labelled",
    "total_counts",
    "expected_active_topics",
    "global_scale",
    "slab_scale",
    "slab_df",
    "label_noise",
    "topic_prior_scale",
    "n_predictive_samples",
    "classifier_learning_rate",
    "n_batches",
    "seed",
)


def old_format(config):
    """A get_config of the current format rewritten in the old flat one."""
    settings = {
        **config["config"],
        "n_cells": config["n_cells"],
        "n_labelled": max(config["n_labelled"], 1),
        "total_counts": config["total_counts"],
        "n_batches": config["n_batches"],
        "seed": config["seed"],
    }
    return {
        **{k: config[k] for k in ("name", "trainable", "dtype") if k in config},
        "genes": config["genes"],
        "class_names": config["class_names"],
        "provenance": config["provenance"],
        **{k: settings[k] for k in OLD_FLAT_SETTINGS},
    }


def test_a_model_in_the_old_flat_config_format_still_loads(embedded, tmp_path):
    from tests.helpers import rewrite_archive

    # Old files predate the gene weights of the classification branch: a topics-only model.
    labelled = np.random.default_rng(0).permutation(embedded.n_cells)[:150]
    config = scm.Config(n_topics=12, batch_size=128, classifier_genes=False, classifier_steps=100)
    model = scm.train(embedded.hide_labels(labelled), config, epochs=2, restarts=1, verbose=0).members[0]
    old = old_format(model.get_config())
    # expected_active_topics and global_scale as the old files held them: resolved numbers.
    old.update(
        expected_active_topics=model.settings["expected_active_topics"], global_scale=model.settings["global_scale"]
    )
    assert "config" not in old and "adapted_batch" not in old
    rebuilt = SCMix.from_config(old)
    assert rebuilt.genes == model.genes and rebuilt.class_names == model.class_names
    assert rebuilt.sizes == model.sizes and rebuilt.seed == model.seed and rebuilt.adapted_batch is None
    assert rebuilt.provenance == model.provenance
    for name in scm.config.MODEL_SETTINGS:
        assert rebuilt.settings[name] == model.settings[name], name
    rebuilt.set_weights(model.get_weights())
    np.testing.assert_array_equal(scm.predict(rebuilt, embedded)["probs"], scm.predict(model, embedded)["probs"])
    # The same through a file: a .keras archive whose config is in the old format.
    scm.save_model(model, tmp_path / "new.keras")
    rewrite_archive(
        tmp_path / "new.keras",
        tmp_path / "old.keras",
        config=lambda c: {
            **c,
            "config": {**old_format(c["config"]), **{k: old[k] for k in ("expected_active_topics", "global_scale")}},
        },
    )
    loaded = scm.load_model(tmp_path / "old.keras")
    assert loaded.sizes == model.sizes
    np.testing.assert_array_equal(scm.predict(loaded, embedded)["probs"], scm.predict(model, embedded)["probs"])
    # A config that does not state the hidden layer's width was written when it was 256 units wide.
    unstated = model.get_config()
    del unstated["config"]["hidden_units"]
    assert SCMix.from_config(unstated).encoder.hidden_units == 256 and Config().hidden_units == 128
    # One that does not state balanced_classes was refitted unweighted.
    del unstated["config"]["balanced_classes"]
    assert SCMix.from_config(unstated).config.balanced_classes is False


def test_library_versions_are_the_installed_ones():
    import tensorflow as tf
    import tensorflow_probability as tfp

    versions = library_versions()
    assert versions["tfp_scmix"] == scm.__version__ and versions["tensorflow"] == tf.__version__
    assert versions["keras"] == keras.__version__ and versions["tensorflow_probability"] == tfp.__version__


def test_keras_leaves_xla_off_for_the_training_step(synthetic):
    """The step's sparse ops have no XLA kernels: jit_compile="auto" (XLA where there is a GPU) and True both
    give a model that trains without XLA, instead of failing in the first step."""
    from keras.src.trainers.trainer import model_supports_jit

    data, _ = synthetic
    model = SCMix.from_data(data, Config(n_topics=4))
    assert not model_supports_jit(model)
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    assert model.jit_compile is False
    model.fit(data.dataset(256), epochs=1, verbose=0)


def test_the_training_step_is_traced_once(synthetic, monkeypatch):
    """Python runs train_step only while tf.function traces it: once for a whole fit, the last smaller minibatch
    included. Both optimizers' slots are made before the first step (made inside it, they traced it twice)."""
    data, _ = synthetic
    traced = []
    step = SCMix.train_step
    monkeypatch.setattr(SCMix, "train_step", lambda self, batch: (traced.append(1), step(self, batch))[1])
    model = SCMix.from_data(data, Config(n_topics=4, hidden_units=16))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(data.dataset(256), epochs=2, verbose=0)  # 1200 cells: four full minibatches and one of 176
    assert len(traced) == 1 and model.optimizer.built and model.classifier_optimizer.built


def test_from_data_reads_the_same_sizes_from_a_stream_and_from_memory(synthetic_file):
    """The same file with a two-value batch column, read as a stream and into memory: the same settings,
    sizes (two batches both ways), topic background and cells."""
    _, path = synthetic_file
    config = Config(n_topics=4, hidden_units=16)
    stream = H5ADStream(path, batch_key="donor", chunk_cells=128)
    in_memory = scm.from_anndata(path, batch_key="donor")
    ours, theirs = SCMix.from_data(stream, config, seed=3), SCMix.from_data(in_memory, config, seed=3)
    assert ours.config == theirs.config == config
    assert ours.sizes == theirs.sizes and ours.sizes["n_batches"] == 2 == len(in_memory.batch_names)
    assert ours.sizes["n_labelled"] == in_memory.n_labelled == 200 and ours.sizes["n_cells"] == 700
    assert ours.settings == theirs.settings
    assert ours.batch_offsets.loc.shape == theirs.batch_offsets.loc.shape == (2, in_memory.n_genes)
    assert ours.provenance["n_cells"] == theirs.provenance["n_cells"] == 700
    assert {k: v for k, v in ours.provenance.items() if k != "data_fingerprint"} == {
        k: v for k, v in theirs.provenance.items() if k != "data_fingerprint"
    }
    np.testing.assert_allclose(ours.topics.background.numpy(), theirs.topics.background.numpy(), rtol=1e-5, atol=1e-6)


def test_from_data_records_the_same_data_fingerprint_from_a_stream_and_from_memory(synthetic_file):
    _, path = synthetic_file
    stream = H5ADStream(path, batch_key="donor")
    in_memory = scm.from_anndata(path, batch_key="donor")
    assert (
        SCMix.from_data(stream, Config(n_topics=4)).provenance
        == SCMix.from_data(in_memory, Config(n_topics=4)).provenance
    )


def test_the_class_branch_reads_the_genes_centred_over_the_training_cells(small_model, embedded):
    model = small_model.members[0]
    assert model.config.classifier_genes and model.classifier.n_genes == embedded.n_genes
    x = embedded.counts.toarray()
    x = np.log1p(x * 1e4 / x.sum(1, keepdims=True))
    np.testing.assert_allclose(model.classifier.gene_mean.numpy(), x.mean(0), rtol=1e-4, atol=1e-5)
    # Sparse and dense counts give the same prediction; the gene weights left zero.
    dense = model(tf.constant(embedded.counts[:50].toarray()))["probs"].numpy()
    np.testing.assert_allclose(scm.predict(model, embedded.subset(np.arange(50)))["probs"], dense, atol=1e-5)
    assert model.classifier.gene_prior_scale == model.config.gene_prior_scale
    assert np.abs(model.classifier.gene_weights.numpy()).max() > 0.05
    off = SCMix.from_data(embedded, scm.Config(n_topics=4, classifier_genes=False))
    assert off.classifier.n_genes == 0 and not any("gene_weights" in w.path for w in off.weights)


def test_self_training_fits_the_class_branch_to_the_combined_calls(small_model, embedded, monkeypatch):
    """The self-training fit reads the cells' labels from `self_training_labels` (of the call combined with the
    known labels by `with_known_labels`: confident cells only) and fits the branch to them: labels that put every
    unlabelled cell in one class move the branch's calls there, and cells left at -1 are not fitted; without
    self-training they are never read. Its accuracy is measured by experiments/few_shot."""
    import tfp_scmix.model as model_stage

    model = small_model.members[0]
    labelled = np.random.default_rng(0).permutation(embedded.n_cells)[:150]  # as the fixture
    data = embedded.hide_labels(labelled)
    calls = []

    def one_class(combined, labels):
        calls.append(combined.shape)
        return np.where(labels >= 0, labels, 0)

    monkeypatch.setattr(model_stage, "self_training_labels", one_class)
    trained, config = model.classifier.get_weights(), model.config
    hidden = data.labels < 0
    share, added = {}, {}
    try:
        for self_training in (False, True):
            model.config = config.replace(self_training=self_training)
            model.fit_classifier(data, steps=400)
            share[self_training] = (scm.predict(model, data)["label"][hidden] == 0).mean()
            added[self_training] = model.self_trained_cells
    finally:
        model.config = config
        model.classifier.set_weights(trained)
        model.self_trained_cells = None
    assert calls == [(data.n_cells, data.n_classes)]
    assert share[False] < 0.3 and share[True] > 0.9, share
    assert added == {False: None, True: int(hidden.sum())}  # the training summary's count
    from tfp_scmix.train import summary_line

    line = summary_line({**small_model.training_summary, "self_trained_cells": [added[True], None]})
    assert line.endswith(f"; self-training added confident unlabelled cells per model: {int(hidden.sum())}, -")
    assert "self-training" not in summary_line(small_model.training_summary)


def test_balanced_class_weights_are_scikit_learns():
    """n / (k n_c) for the classes present, as scikit-learn's `compute_class_weight("balanced")`; 0 for a class
    without labels; weighted one-hot targets keep their total mass; soft targets count by their mass."""
    from sklearn.utils.class_weight import compute_class_weight

    from tfp_scmix.model import balanced_class_weights

    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 3])
    weights = balanced_class_weights(np.eye(4)[labels])
    present = np.array([0, 1, 3])
    np.testing.assert_allclose(weights[present], compute_class_weight("balanced", classes=present, y=labels))
    assert weights[2] == 0 and np.isclose((np.eye(4)[labels] * weights).sum(), labels.size)
    np.testing.assert_allclose(balanced_class_weights(np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])), [0.75, 1.5])


def test_balanced_refit_weighs_each_class_by_its_weight(small_model, embedded, monkeypatch):
    """With balanced_classes the refit's targets are weighted by `balanced_class_weights`: weights that keep
    one class alone (the others weigh 0) make the branch call nearly every cell that class; without the
    setting they are never read.
    Its accuracy is measured by experiments/few_shot."""
    import tfp_scmix.model as model_stage

    model = small_model.members[0]
    labelled = np.random.default_rng(0).permutation(embedded.n_cells)[:150]  # as the fixture
    data = embedded.hide_labels(labelled)
    common = int(np.bincount(data.labels[labelled]).argmax())
    calls = []

    def one_class(targets):
        calls.append(targets.shape)
        return np.eye(targets.shape[1])[common]

    monkeypatch.setattr(model_stage, "balanced_class_weights", one_class)
    trained, config = model.classifier.get_weights(), model.config
    share = {}
    try:
        for balanced in (False, True):
            model.config = config.replace(balanced_classes=balanced)
            model.fit_classifier(data, steps=400)
            share[balanced] = (scm.predict(model, data)["label"] == common).mean()
    finally:
        model.config = config
        model.classifier.set_weights(trained)
    assert calls == [(labelled.size, data.n_classes)]
    assert share[False] < 0.6 and share[True] > 0.9, share


@pytest.mark.parametrize("label_mode", ["cut", "joint", "class_prior"])
def test_labels_reach_the_count_model_only_in_the_joint_mode(synthetic, label_mode):
    """The class branch reads the encoder's normalised counts (one product per minibatch): the label term's
    gradient reaches the gene weights in every mode and the encoder only in the "joint" mode; the batch offsets
    learn from the likelihood alone (the normalised counts carry no gradient), in every mode."""
    data, _ = synthetic
    model = SCMix.from_data(data, Config(n_topics=4, label_mode=label_mode))
    batch = next(iter(data.dataset(128, shuffle=False)))
    watched = [model.classifier.gene_weights, model.encoder.kernel, model.batch_offsets.loc]
    with tf.GradientTape(persistent=True) as tape:
        terms = model.elbo_terms(batch, training=True)
    gene_weights, kernel, offsets = (
        0.0 if g is None else float(tf.reduce_max(tf.abs(g))) for g in tape.gradient(terms["label_nll"], watched)
    )
    assert gene_weights > 0 and offsets == 0
    assert kernel > 0 if label_mode == "joint" else kernel == 0
    assert tape.gradient(terms["loss"], model.batch_offsets.loc) is not None  # the likelihood moves them


def test_sparse_data_train_through_the_csr_product(synthetic):
    """Data with at most CSR_DENSITY nonzero entries get the encoder's CSR product (`from_data`), denser data are
    densified; a model that multiplies by it trains (Keras's traced step) to the same losses as one that densifies,
    within float rounding."""
    data, _ = synthetic
    assert data.nonzero_fraction > CellEncoder.CSR_DENSITY  # the synthetic counts are dense
    assert not SCMix.from_data(data, Config(n_topics=4)).encoder.sparse_product
    thinned = data.counts.toarray() * (np.random.default_rng(0).random(data.counts.shape) < 0.1)
    sparse = dataclasses.replace(data, counts=sp.csr_matrix(thinned.astype(np.float32)))
    sparse = sparse.subset(sparse.library_size > 0)
    assert sparse.nonzero_fraction <= CellEncoder.CSR_DENSITY
    assert SCMix.from_data(sparse, Config(n_topics=4)).encoder.sparse_product
    losses = []
    for csr in (False, True):
        keras.utils.set_random_seed(0)
        model = SCMix.from_data(data, Config(n_topics=4), seed=0)
        model.encoder.sparse_product = csr
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        history = model.fit(data.dataset(64, seed=0), epochs=2, verbose=0)
        losses.append(history.history["loss"])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)
