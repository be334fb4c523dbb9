"""tfp_scmix.tracking: one call records a trained model in MLflow, with useful names and the dataset."""

import numpy as np
import pytest

from tfp_scmix import tracking

mlflow = pytest.importorskip("mlflow")


def test_log_training_records_params_scores_dataset_and_model(small_model, embedded, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    labelled = np.random.default_rng(0).permutation(embedded.n_cells)[:150]
    training = embedded.hide_labels(labelled)
    test = embedded.subset(np.setdiff1d(np.arange(embedded.n_cells), labelled)[:200])
    run_id = tracking.log_training(small_model, training, "user_data", dataset_path="pbmc68k.h5ad", test=test)
    run = mlflow.get_run(run_id)
    assert mlflow.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    params = run.data.params
    assert params["n_topics"] == "12" and params["prior"] == small_model.config.prior and params["restarts"] == "1"
    assert params["n_labelled"] == "150" and params["global_scale"] == "None"
    metrics = run.data.metrics
    assert metrics["eval/training_accuracy"] == pytest.approx(small_model.training_summary["training_accuracy"])
    assert 0 <= metrics["eval/test_accuracy"] <= 1 and metrics["eval/test_errors"] <= 200
    assert {"train/loss", "train/reconstruction", "train/kl_cell"} <= set(metrics)
    assert sorted(metrics)[0].startswith("eval/")  # scores sort before the ELBO terms
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(5))  # every epoch
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "pbmc68k.h5ad" and dataset.tags[0].value == "training"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"model", "explanations"} <= artifacts
