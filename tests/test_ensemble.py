"""SCMixEnsemble: restarts averaged, and every use of a model (save/load, annotate, explain, export) on it."""

import keras
import numpy as np
import pytest

from tfp_scmix import datasets, explain, export
from tfp_scmix.annotate import annotate, predict_data
from tfp_scmix.cli import train_model
from tfp_scmix.ensemble import SCMixEnsemble
from tfp_scmix.model import SCMix
from tfp_scmix.reliability import load_model


@pytest.fixture(scope="module")
def ensemble(embedded):
    labelled = np.random.default_rng(0).permutation(embedded.n_cells)[:150]
    return train_model(embedded.hide_labels(labelled), epochs=4, batch_size=128, verbose=0, n_topics=8,
                       classifier_steps=200, restarts=2, seed=5)


def test_restarts_are_averaged(ensemble, embedded):
    assert isinstance(ensemble, SCMixEnsemble) and [m.settings["seed"] for m in ensemble.members] == [5, 6]
    out = predict_data(ensemble, embedded)
    members = [predict_data(m, embedded) for m in ensemble.members]
    assert not np.allclose(members[0]["probs"], members[1]["probs"])  # the restarts differ
    np.testing.assert_allclose(out["probs"], (members[0]["probs"] + members[1]["probs"]) / 2, atol=1e-6)
    np.testing.assert_array_equal(out["label"], out["probs"].argmax(1))
    assert out["topics"].shape == (embedded.n_cells, 16)
    np.testing.assert_allclose(out["topics"][:, :8], members[0]["topics"], atol=1e-6)
    np.testing.assert_allclose(out["topics"].reshape(-1, 2, 8).sum(-1), 1.0, atol=1e-5)


def test_save_load_annotate_explain_export(ensemble, embedded, tmp_path):
    path = tmp_path / "ensemble.keras"
    ensemble.save(path)
    expected = predict_data(ensemble, embedded)
    for loaded in (keras.models.load_model(path), load_model(path)):
        assert isinstance(loaded, SCMixEnsemble) and loaded.genes == ensemble.genes
        np.testing.assert_allclose(predict_data(loaded, embedded)["probs"], expected["probs"], atol=1e-6)
    adata = annotate(ensemble, datasets.pbmc68k_reduced())
    assert adata.varm["scmix_topic_gene"].shape == (adata.n_vars, 16)
    np.testing.assert_allclose(adata.obs["scmix_confidence"].to_numpy(), expected["confidence"], atol=1e-6)
    # Explanations are those of the first member.
    assert explain.class_genes(ensemble).equals(explain.class_genes(ensemble.members[0]))
    frame = export.load_exported(ensemble.export_serving(tmp_path / "serving" / "1")).annotate(adata)
    np.testing.assert_allclose(frame["confidence"].to_numpy(), expected["confidence"], rtol=1e-4, atol=1e-6)


def test_members_must_share_genes_and_classes(ensemble, embedded):
    other = SCMix.from_data(embedded.select_genes(embedded.genes[:100]), n_topics=8)
    with pytest.raises(ValueError, match="same genes and classes"):
        SCMixEnsemble([ensemble.members[0], other])
    with pytest.raises(ValueError, match="restarts must be 1 or more"):
        train_model(embedded, restarts=0)
