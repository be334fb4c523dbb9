"""SCMixEnsemble: restarts averaged, and every use of a model (save/load, annotate, export) on it."""

from pathlib import Path

import anndata
import keras
import numpy as np
import pytest

import tfp_scmix as scm
from tfp_scmix import datasets, export
from tfp_scmix.config import Config
from tfp_scmix.ensemble import SCMixEnsemble, as_ensemble
from tfp_scmix.io import load_model, save_model
from tfp_scmix.model import SCMix


def test_restarts_are_averaged(two_restarts, embedded):
    out = scm.predict(two_restarts, embedded)
    members = [scm.predict(m, embedded) for m in two_restarts.members]
    assert not np.allclose(members[0]["probs"], members[1]["probs"])  # the restarts differ
    np.testing.assert_allclose(out["probs"], (members[0]["probs"] + members[1]["probs"]) / 2, atol=1e-6)
    np.testing.assert_array_equal(out["label"], out["probs"].argmax(1))
    np.testing.assert_allclose(out["confidence"], out["probs"].max(1))
    assert out["cell_topic"].shape == (embedded.n_cells, 16) and two_restarts.n_topics == 16
    np.testing.assert_allclose(out["cell_topic"][:, :8], members[0]["cell_topic"], atol=1e-6)
    np.testing.assert_allclose(out["cell_topic"][:, 8:], members[1]["cell_topic"], atol=1e-6)
    np.testing.assert_allclose(out["cell_topic"].reshape(-1, 2, 8).sum(-1), 1.0, atol=1e-5)
    topic_gene = two_restarts.topic_gene().numpy()
    assert topic_gene.shape == (16, embedded.n_genes)
    np.testing.assert_array_equal(topic_gene[8:], two_restarts.members[1].topic_gene().numpy())


def test_save_load_annotate_export(two_restarts, embedded, tmp_path):
    path = save_model(two_restarts, tmp_path / "ensemble.keras")
    expected = scm.predict(two_restarts, embedded)
    for loaded in (keras.models.load_model(path), load_model(path)):
        assert isinstance(loaded, SCMixEnsemble) and loaded.genes == two_restarts.genes
        assert loaded.batch_names == loaded.members[0].batch_names == list(embedded.batch_names)  # a trial looked
        assert [m.seed for m in loaded.members] == [5, 6] and loaded.provenance == two_restarts.provenance
        np.testing.assert_array_equal(scm.predict(loaded, embedded)["probs"], expected["probs"])
    adata = scm.annotate(two_restarts, datasets.pbmc68k_reduced())
    assert adata.varm["scmix_topic_gene"].shape == (adata.n_vars, 16)
    np.testing.assert_allclose(adata.obs["scmix_confidence"].to_numpy(), expected["confidence"], atol=1e-6)
    frame = export.load_exported(export.export_serving(two_restarts, tmp_path / "serving" / "1")).annotate(adata)
    np.testing.assert_allclose(frame["confidence"].to_numpy(), expected["confidence"], rtol=1e-4, atol=1e-6)
    assert frame.filter(like="topic_").shape[1] == 16


def test_members_must_share_genes_and_classes(two_restarts, embedded):
    other = SCMix.from_data(embedded.select_genes(embedded.genes[:100]), Config(n_topics=8))
    with pytest.raises(ValueError, match="same genes and classes"):
        SCMixEnsemble([two_restarts.members[0], other])
    with pytest.raises(ValueError, match="one or more SCMix models"):
        SCMixEnsemble([])
    with pytest.raises(ValueError, match="one or more SCMix models"):
        SCMixEnsemble([two_restarts])  # an ensemble is not a member


def test_as_ensemble(two_restarts, embedded):
    assert as_ensemble(two_restarts) is two_restarts
    member = two_restarts.members[1]
    wrapped = as_ensemble(member)
    assert isinstance(wrapped, SCMixEnsemble) and wrapped.members == [member]
    np.testing.assert_array_equal(scm.predict(wrapped, embedded)["probs"], scm.predict(member, embedded)["probs"])
    with pytest.raises(
        TypeError, match=r"received str: load the saved model first, model = tfp_scmix.load_model\('model.keras'\)"
    ):
        as_ensemble("model.keras")
    with pytest.raises(TypeError, match="received PosixPath: load the saved model first"):
        scm.annotate(Path("model.keras"), anndata.AnnData(np.ones((2, 2), np.float32)))  # as annotate says it
    with pytest.raises(TypeError, match=r"received dict \(tfp_scmix.train returns one"):
        as_ensemble({})


def test_an_untrained_model_is_refused_where_its_calls_are_used(two_restarts, embedded, embedded_adata, tmp_path):
    """A model built and never trained calls every cell from its random initial weights (a fresh-user trial saw
    an accuracy of 0.16 and gene weights of 0 with no word said): prediction, annotation, explanations and export
    refuse it with what to do, naming the untrained member of an ensemble; saving it stays allowed."""
    from tfp_scmix.ensemble import NotTrainedError, trained

    untrained = SCMix.from_data(embedded, Config(n_topics=8, batch_size=128), seed=0)
    assert scm.NotTrainedError is NotTrainedError and issubclass(NotTrainedError, ValueError)
    calls = {
        "predict": lambda m: scm.predict(m, embedded),
        "annotate": lambda m: scm.annotate(m, embedded_adata.copy()),
        "explain": lambda m: scm.explain.class_gene_weights(m),
        "export": lambda m: export.export_serving(m, tmp_path / "export"),
    }
    for action, call in calls.items():
        with pytest.raises(NotTrainedError, match=f"cannot {action}: the model has not been trained") as err:
            call(untrained)
        assert "tfp_scmix.train" in str(err.value)
    assert not (tmp_path / "export").exists()
    mixed = SCMixEnsemble([two_restarts.members[0], untrained])
    with pytest.raises(NotTrainedError, match=r"member\(s\) \[1\] of the ensemble"):
        scm.predict(mixed, embedded)
    assert (
        trained(two_restarts, "predict") is two_restarts
        and trained(two_restarts.members[0], "x") is two_restarts.members[0]
    )
    with pytest.raises(TypeError, match="expected a model"):
        trained("model.keras", "predict")
    save_model(untrained, tmp_path / "untrained.keras")  # a model may be saved before it is trained
    with pytest.raises(NotTrainedError):
        scm.predict(load_model(tmp_path / "untrained.keras"), embedded)
