"""Fixtures shared by the tests of training/: a fresh tracking store, tiny run configurations, the splits."""

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from training import config, store
from training import data as run_data

CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "pbmc68k_reduced.toml"
# Tiny: 2 epochs, one restart, 8 topics, a short classifier refit (a run takes seconds on 2 cores).
SMALL = (
    "training.epochs=2",
    "training.restarts=1",
    "training.classifier_steps=200",
    "model.n_topics=8",
    "model.hidden_units=32",
    "model.n_predictive_samples=8",
    "search.space.n_topics=[8, 10]",
    "search.space.hidden_units=[16, 32]",
)


@pytest.fixture(autouse=True)
def no_mlflow_leftovers():
    """No test leaves an active run or its (deleted) store as MLflow's tracking URI to the tests after it."""
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh SQLite tracking store in tmp_path (MLFLOW_TRACKING_URI), and its client."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(store.TRACKING_URI_ENV, uri)
    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="session")
def config_file():
    """The example configuration the tests start from."""
    return CONFIG


@pytest.fixture(scope="session")
def small_config():
    """`small_config(*overrides)`: training/configs/pbmc68k_reduced.toml made tiny (SMALL), then `overrides`."""
    return lambda *overrides: config.load(CONFIG, SMALL + overrides)


@pytest.fixture(scope="session")
def splits(small_config):
    return run_data.load(small_config().data)
