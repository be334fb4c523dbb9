"""tfp_scmix.tracking: one call records a trained model in MLflow, with useful names and the dataset."""

from pathlib import Path

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
    assert params["seed"] == str(small_model.members[0].seed)  # a trial could not tell a run's seed
    from tfp_scmix.annotate import model_fingerprint

    assert run.data.tags["tfp_scmix.model_fingerprint"] == model_fingerprint(small_model)  # an export's run has it
    metrics = run.data.metrics
    assert metrics["eval/training_accuracy"] == pytest.approx(small_model.training_summary["training_accuracy"])
    assert 0 <= metrics["eval/test_accuracy"] <= 1 and metrics["eval/test_errors"] <= 200
    assert {"train/loss", "train/reconstruction", "train/kl_cell"} <= set(metrics)
    assert sorted(metrics)[0].startswith("eval/")  # scores sort before the ELBO terms
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(5))  # every epoch
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "pbmc68k.h5ad" and dataset.tags[0].value == "training"
    assert str(Path("pbmc68k.h5ad").resolve()) in dataset.dataset.source  # absolute: the run is read from anywhere
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"model", "explanations"} <= artifacts


def test_a_store_that_cannot_take_runs_is_refused_before_training(tmp_path, monkeypatch):
    """check_store, which the CLI's --mlflow and training's store call before training: a SQLite store in a missing
    folder (it was created silently), one where no file can be made (/proc: an MLflow traceback of 180 lines after
    training), and a server that does not answer (the CLI hung after training) are refused with the fix."""
    import socket

    from tfp_scmix.tracking import TrackingStoreError, check_store

    check_store(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a folder that exists: fine
    check_store(f"file://{tmp_path / 'mlruns'}")
    with pytest.raises(TrackingStoreError, match=r"folder .*typo of the tracking store .* does not exist; create it"):
        check_store(f"sqlite:///{tmp_path / 'typo' / 'mlflow.db'}")
    assert not (tmp_path / "typo").exists()
    if Path("/proc/self").is_dir():
        with pytest.raises(TrackingStoreError, match=r"cannot write to /proc, the folder of the tracking store"):
            check_store("sqlite:////proc/mlflow.db")
    with socket.socket() as closed:  # a port nobody listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(
            TrackingStoreError, match=f"cannot reach the MLflow tracking server http://127.0.0.1:{port}"
        ):
            check_store(f"http://127.0.0.1:{port}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    check_store()  # the default store, mlruns/ of the working directory: made on first use
    assert (tmp_path / "mlruns").is_dir()


def test_a_new_store_is_set_up_quietly(tmp_path, monkeypatch, capfd):
    """MLflow narrates a new SQLite store's set-up at INFO level ("Creating initial MLflow database tables...") through
    a handler of its own; the package's tracking steps log without it, its warnings kept."""
    import logging

    for name in tracking.STORE_SET_UP_LOGGERS:  # as in a fresh process, whatever earlier tests did
        logging.getLogger(name).setLevel(logging.NOTSET)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.experiment_id("quiet")
    assert "database tables" not in capfd.readouterr().err
    assert all(logging.getLogger(name).level == logging.WARNING for name in tracking.STORE_SET_UP_LOGGERS)


def test_an_interrupted_log_marks_its_run_killed(small_model, embedded, tmp_path, monkeypatch):
    """Ctrl-C while the model is logged: the run reads KILLED, not FINISHED (a trial's interrupted run read FINISHED
    with no model in it); an error, FAILED."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for raised, status in ((KeyboardInterrupt, "KILLED"), (OSError, "FAILED")):

        def stopped(*args, raised=raised, **kwargs):
            raise raised

        monkeypatch.setattr("tfp_scmix.explain.write_explanations", stopped)
        with pytest.raises(raised):
            tracking.log_training(small_model, embedded, f"interrupted_{status}")
        (run,) = mlflow.search_runs(experiment_names=[f"interrupted_{status}"], output_format="list")
        assert run.info.status == status and mlflow.active_run() is None
