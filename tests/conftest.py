import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from tfp_scmix.data import from_anndata
from tfp_scmix.datasets import pbmc68k_reduced
from tfp_scmix.synthetic import sample_counts


@pytest.fixture(scope="session")
def embedded():
    """The embedded real dataset as SCData."""
    return from_anndata(pbmc68k_reduced())


@pytest.fixture(scope="session")
def embedded_adata():
    return pbmc68k_reduced()


@pytest.fixture(scope="session")
def synthetic():
    """Counts from the model's own generative process, with their planted truth."""
    return sample_counts(n_cells=1200, n_genes=300, n_topics=6, n_classes=3, n_labelled=150, seed=1)


@pytest.fixture(scope="session")
def small_model(embedded):
    """A quickly trained model on the embedded dataset (150 labels), shared by several tests."""
    from tfp_scmix.cli import train_model

    labelled = np.random.default_rng(0).permutation(embedded.n_cells)[:150]
    return train_model(embedded.hide_labels(labelled), epochs=5, batch_size=128, verbose=0, n_topics=12,
                       restarts=1)
