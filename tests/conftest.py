import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import tfp_scmix as scm
from tfp_scmix.datasets import pbmc68k_reduced
from tfp_scmix.synthetic import sample_counts, to_anndata


@pytest.fixture(scope="session")
def embedded():
    """The embedded real dataset as SCData."""
    return scm.from_anndata(pbmc68k_reduced())


@pytest.fixture(scope="session")
def embedded_adata():
    return pbmc68k_reduced()


@pytest.fixture(scope="session")
def synthetic():
    """Counts from the model's own generative process, with their planted truth."""
    return sample_counts(n_cells=1200, n_genes=300, n_topics=6, n_classes=3, n_labelled=150, seed=1)


@pytest.fixture(scope="session")
def synthetic_file(tmp_path_factory):
    """(SCData, .h5ad path) of counts from the model's generative process, with unknown labels and two
    batches in obs["donor"] (d1: every third cell, d2: the others)."""
    data, _ = sample_counts(n_cells=700, n_genes=120, n_topics=4, n_classes=3, n_labelled=200, seed=5)
    adata = to_anndata(data)
    adata.obs["donor"] = np.where(np.arange(data.n_cells) % 3 == 0, "d1", "d2")
    path = tmp_path_factory.mktemp("stream") / "synthetic.h5ad"
    adata.write_h5ad(path)
    return data, path


@pytest.fixture(scope="session")
def small_model(embedded):
    """A quickly trained model on the embedded dataset (150 labels), shared by several tests: what
    `scm.train` returns for one restart (an SCMixEnsemble of one SCMix). Its classification branch is refitted
    for 500 steps, here and in every refit that reads its config (annotate's with known labels)."""
    labelled = np.random.default_rng(0).permutation(embedded.n_cells)[:150]
    config = scm.Config(n_topics=12, batch_size=128, classifier_steps=500)
    return scm.train(embedded.hide_labels(labelled), config, epochs=5, restarts=1, verbose=0)


@pytest.fixture(scope="session")
def two_restarts(embedded):
    """An SCMixEnsemble of two restarts (seeds 5 and 6) on the embedded dataset (150 labels)."""
    labelled = np.random.default_rng(0).permutation(embedded.n_cells)[:150]
    return scm.train(
        embedded.hide_labels(labelled),
        scm.Config(n_topics=8, batch_size=128, classifier_steps=200),
        epochs=4,
        restarts=2,
        seed=5,
        verbose=0,
    )
