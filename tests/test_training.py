"""Tracked runs and searches (training/): what MLflow records, keras-tuner resume, a real tracking server."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tfp_scmix import datasets, from_anndata
from tfp_scmix.cli import few_shot_split
from tfp_scmix.loss import ELBO_TERMS
from training import config, record, store, tune
from training import data as run_data
from training import run as tracked
from training.callbacks import MLflowLogger, RefitClassifier, classification_scores, predict_labels

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "pbmc68k_reduced.toml"
EPOCHS = 2
SMALL = (f"training.epochs={EPOCHS}", "training.classifier_steps=200", "model.n_topics=8", "model.hidden_units=32", "model.n_predictive_samples=8",
         "search.space.n_topics=[8, 10]", "search.space.hidden_units=[16, 32]")


def small_config(*overrides):
    return config.load(CONFIG, SMALL + overrides)


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


@pytest.fixture(scope="module")
def splits():
    return run_data.load(small_config().data)


# -- configuration and data -------------------------------------------------------------------


def test_config_rejects_mistakes_with_the_fix(tmp_path):
    with pytest.raises(config.ConfigError, match=r"unknown setting\(s\) \['n_topic'\]"):
        small_config("model.n_topic=5")
    with pytest.raises(config.ConfigError, match="n_validation .* smaller than the label budget"):
        small_config("data.n_validation=150")
    with pytest.raises(config.ConfigError, match="'epochs' is not a setting a search can vary"):
        small_config("search.space.epochs=[1, 2]")
    with pytest.raises(config.ConfigError, match="list of choices or a range"):
        small_config("search.space.label_weight={min = 2.0, max = 1.0}")
    with pytest.raises(config.ConfigError, match="training.*epochs must be a number"):
        small_config('training.epochs="ten"')
    with pytest.raises(config.ConfigError, match="not found; the examples are in training/configs"):
        config.load(tmp_path / "missing.toml")
    assert small_config().training.epochs == EPOCHS


def test_store_defaults_to_mlruns_and_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(store.TRACKING_URI_ENV, raising=False)
    assert store.tracking_uri() == f"sqlite:///{store.REPO / 'mlruns' / 'mlflow.db'}"
    assert store._artifact_location("few shot") == (store.REPO / "mlruns" / "artifacts" / "few shot").as_uri()
    monkeypatch.setenv(store.TRACKING_URI_ENV, f"sqlite:///{tmp_path / 'other.db'}")
    assert store.configure() == mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'other.db'}"
    assert store._artifact_location("x") == (tmp_path / "artifacts" / "x").as_uri()
    monkeypatch.setenv(store.TRACKING_URI_ENV, "http://127.0.0.1:5000")
    assert store._artifact_location("x") is None  # the server decides


def test_splits_follow_the_few_shot_protocol(splits):
    full = from_anndata(datasets.pbmc68k_reduced())
    test, budget = few_shot_split(full.n_cells, 200, 150, 0)
    # main setting: all 700 cells are trained on; only the 120 training labels remain
    assert splits.train.n_cells == 700 and splits.train.n_labelled == 120
    kept = splits.train.labels >= 0
    assert set(splits.train.obs_names[kept]) == set(full.obs_names[budget[30:]])
    assert np.array_equal(splits.train.labels[kept], full.labels[np.isin(full.obs_names, splits.train.obs_names[kept])])
    assert list(splits.validation.obs_names) == list(full.obs_names[budget[:30]])
    assert list(splits.test.obs_names) == list(full.obs_names[test])
    assert (splits.test.labels >= 0).all() and (splits.validation.labels >= 0).all()
    with resources.as_file(resources.files(datasets) / datasets.EMBEDDED) as path:
        assert splits.identity["data.sha256"] == run_data.file_sha256(path)
    assert (splits.identity["data.n_cells"], splits.identity["data.n_genes"], splits.identity["data.n_classes"]) \
        == (700, 765, 10)

    inductive = run_data.load(small_config("data.setting='inductive'").data)
    assert inductive.train.n_cells == 700 - 230
    assert not set(inductive.train.obs_names) & set(full.obs_names[np.concatenate([test, budget[:30]])])


# -- the tracked run ----------------------------------------------------------------------------


def test_tracked_run_records_params_metrics_and_artifacts(tracking, tmp_path, splits):
    cfg = small_config()
    run_id, model, scores = tracked.train(cfg)
    run = tracking.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert run.info.status == "FINISHED"
    assert params["model.n_topics"] == "8" and params["training.epochs"] == str(EPOCHS)
    assert float(params["model.global_scale"]) == pytest.approx(model.settings["global_scale"])  # resolved default
    assert params["data.sha256"] == splits.identity["data.sha256"]
    assert (params["data.n_cells"], params["data.n_genes"], params["data.n_classes"]) == ("700", "765", "10")
    assert (params["method"], params["dataset"], params["setting"], params["labels"], params["seed"]) \
        == ("tfp_scmix", "pbmc68k_reduced", "main", "150", "0")
    commit = subprocess.run(["git", "-C", str(store.REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit and tags["code.dirty"] in ("true", "false")
    assert tags["config.overrides"].startswith("training.epochs=")

    # every ELBO term, and the validation scores, once per epoch
    for name in (*ELBO_TERMS, "val_loss", "val_accuracy", "val_macro_f1"):
        history = tracking.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == list(range(EPOCHS)), name
    # the classifier is refitted once, at the end of the last epoch, before that epoch is scored
    assert [m.step for m in tracking.get_metric_history(run_id, "classifier_loss")] == [EPOCHS - 1]
    last_f1 = max(tracking.get_metric_history(run_id, "val_macro_f1"), key=lambda m: m.step).value
    assert last_f1 == pytest.approx(scores["val_final_macro_f1"])  # the final model is the last epoch's

    # test scores agree with the confusion matrix logged beside them
    n_test = splits.test.n_cells
    assert run.data.metrics["test_errors"] == scores["test_errors"]
    assert scores["test_accuracy"] == pytest.approx(1 - scores["test_errors"] / n_test)
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "art")))
    matrix = pd.read_csv(local / "evaluation" / "test" / "confusion_matrix.csv", index_col=0)
    assert list(matrix.index) == model.class_names and matrix.to_numpy().sum() == n_test
    assert np.trace(matrix.to_numpy()) == n_test - scores["test_errors"]
    assert (local / "evaluation" / "test" / "confusion_matrix.png").stat().st_size > 0

    # explanations, the configuration and the model, which loads back and predicts the same
    for name in ("topic_genes.csv", "class_topics.csv", "topic_genes.png", "class_topics.png"):
        assert (local / "explain" / name).stat().st_size > 0, name
    assert len(pd.read_csv(local / "explain" / "topic_genes.csv")) >= 8
    assert (local / "config" / CONFIG.name).read_text() == CONFIG.read_text()
    expected = predict_labels(model, splits.test)
    assert np.array_equal(predict_labels(keras.models.load_model(local / "model" / "scmix.keras"), splits.test),
                          expected)
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [run_id]
    assert np.array_equal(predict_labels(mlflow.keras.load_model(logged[0].model_uri), splits.test), expected)


def test_callback_logs_a_plain_fit(tracking, splits):
    """MLflowLogger alone: starts and ends its own run, feeds val_macro_f1 to the callbacks after it."""
    store.configure()
    model = tracked.build_model(splits.train, {"n_topics": 8, "hidden_units": 32}, 2e-3)
    stopper = keras.callbacks.EarlyStopping("val_macro_f1", mode="max", patience=5)
    history = model.fit(splits.train.dataset(256), epochs=EPOCHS, verbose=0,
                        callbacks=[RefitClassifier(splits.train, 200), MLflowLogger(splits.validation), stopper])
    assert mlflow.active_run() is None
    assert len(history.history["classifier_loss"]) == 1  # refitted at the last epoch only
    (run,) = tracking.search_runs([tracking.get_experiment_by_name("Default").experiment_id])
    assert run.info.status == "FINISHED"
    assert len(history.history["val_macro_f1"]) == EPOCHS and stopper.best == max(history.history["val_macro_f1"])
    final = classification_scores(splits.validation.labels, predict_labels(model, splits.validation))
    assert run.data.metrics["val_macro_f1"] == pytest.approx(final["macro_f1"])
    assert run.data.metrics["val_accuracy"] == pytest.approx(final["accuracy"])
    assert {"reconstruction", "kl_cell", "kl_topic", "kl_class", "label_nll"} <= set(run.data.metrics)
    with pytest.raises(ValueError, match="validation cells must all be labelled"):
        MLflowLogger(splits.train)


class StopNow(keras.callbacks.Callback):
    """Stops training after the first epoch, keeping the classifier's weights as they were then."""

    def on_epoch_end(self, epoch, logs=None):
        self.weights = [v.numpy().copy() for v in self.model.classifier.trainable_variables]
        self.model.stop_training = True


def test_classifier_is_refitted_when_training_stops_early(splits):
    model = tracked.build_model(splits.train, {"n_topics": 8, "hidden_units": 32}, 2e-3)
    refit, stop = RefitClassifier(splits.train, 200), StopNow()
    history = model.fit(splits.train.dataset(256), epochs=3, verbose=0, callbacks=[refit, stop])
    assert len(history.history["loss"]) == 1 and refit.done and "classifier_loss" not in history.history
    after = [v.numpy() for v in model.classifier.trainable_variables]
    assert any(not np.allclose(a, b) for a, b in zip(stop.weights, after))  # changed after the epoch ended


# -- the search ---------------------------------------------------------------------------------


def trial_runs(client, parent):
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return sorted(runs, key=lambda r: r.info.start_time)


def trial_states(project_dir):
    return {json.loads(p.read_text())["trial_id"]: json.loads(p.read_text())["status"]
            for p in Path(project_dir).glob("trial_*/trial.json")}


def test_two_trial_search_resumes_without_redoing_trials(tracking, tmp_path):
    cfg = small_config()
    first = tune.search(cfg, max_trials=1, directory=tmp_path / "tuning")
    assert first["n_completed"] == 1
    second = tune.search(cfg, max_trials=2, directory=tmp_path / "tuning")
    assert second["run_id"] == first["run_id"] and second["n_completed"] == 2
    assert trial_states(second["project_dir"]) == {"0": "COMPLETED", "1": "COMPLETED"}

    parent = tracking.get_run(second["run_id"])
    trials = trial_runs(tracking, parent)
    assert [r.data.tags["trial_id"] for r in trials] == ["0", "1"]  # trial 0 did not run again
    assert all(r.info.status == "FINISHED" for r in trials)
    for trial in trials:
        assert {"hp.n_topics", "hp.hidden_units", "hp.learning_rate", "hp.prior", "hp.global_scale",
                "hp.label_weight", "hp.batch_size"} <= set(trial.data.params)
        assert trial.data.params["model.n_topics"] == trial.data.params["hp.n_topics"]
        f1 = [m.value for m in tracking.get_metric_history(trial.info.run_id, "val_macro_f1")]
        assert len(f1) == EPOCHS and trial.data.metrics["best_val_macro_f1"] == pytest.approx(max(f1))
    best = max(trials, key=lambda r: r.data.metrics["best_val_macro_f1"])
    assert parent.data.metrics["best_val_macro_f1"] == pytest.approx(best.data.metrics["best_val_macro_f1"])
    assert parent.data.tags["best_trial"] == second["best_trial"] == best.data.tags["trial_id"]
    assert parent.info.status == "FINISHED" and parent.data.tags["search.resumed"] == "true"

    # the best trial's model, registered, scored on the test cells
    versions = tracking.search_model_versions(f"name = '{second['registered_model']}'")
    assert versions and all(v.run_id == parent.info.run_id for v in versions)
    latest = max(versions, key=lambda v: int(v.version))
    model = mlflow.keras.load_model(f"models:/{second['registered_model']}/{latest.version}")
    assert model.n_topics == int(best.data.params["hp.n_topics"])
    assert {"test_errors", "test_accuracy", "test_macro_f1"} <= set(parent.data.metrics)


class Diverge(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise FloatingPointError("loss is NaN")


def test_failed_trials_say_why(tracking, tmp_path):
    # a value the model refuses fails at once (keras-tuner builds a model to learn the space)
    with pytest.raises(ValueError, match="prior must be one of"):
        tune.search(small_config("search.space.prior=['bogus']"), max_trials=1, directory=tmp_path / "bogus")
    cfg = small_config()
    with pytest.raises(RuntimeError, match="no trial of the search .* completed"):
        tune.search(cfg, max_trials=1, directory=tmp_path / "tuning", callbacks=[Diverge()])
    parent_id = (tmp_path / "tuning" / tune.project_name(cfg) / tune.PARENT_RUN_FILE).read_text()
    (trial,) = trial_runs(tracking, tracking.get_run(parent_id))
    assert trial.info.status == "FAILED" and trial.data.tags["error"] == "FloatingPointError: loss is NaN"


class InterruptOnce(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the end of the first epoch it sees in this process (as Ctrl-C would)."""

    fired = False

    def on_epoch_end(self, epoch, logs=None):
        if not InterruptOnce.fired:
            InterruptOnce.fired = True
            raise KeyboardInterrupt


def test_interrupted_search_resumes_the_interrupted_trial(tracking, tmp_path):
    cfg = small_config("search.algorithm='hyperband'")
    with pytest.raises(KeyboardInterrupt):
        tune.search(cfg, max_trials=1, directory=tmp_path / "tuning", callbacks=[InterruptOnce()])
    project = tmp_path / "tuning" / tune.project_name(cfg)
    assert trial_states(project) == {"0": "RUNNING"}
    parent_id = (project / tune.PARENT_RUN_FILE).read_text()
    assert tracking.get_run(parent_id).info.status == "KILLED"

    result = tune.search(cfg, max_trials=1, directory=tmp_path / "tuning")
    assert result["run_id"] == parent_id and trial_states(project) == {"0": "COMPLETED"}
    trials = trial_runs(tracking, tracking.get_run(parent_id))
    assert [(r.data.tags["trial_id"], r.info.status) for r in trials] == [("0", "KILLED"), ("0", "FINISHED")]
    assert tracking.get_run(parent_id).info.status == "FINISHED"


# -- a real tracking server -----------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracked_run_against_an_mlflow_server(tmp_path, monkeypatch):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}",
         "--default-artifact-root", str(tmp_path / "art"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own process group
        env={k: v for k, v in os.environ.items() if k != store.TRACKING_URI_ENV})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(0.5)
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv(store.TRACKING_URI_ENV, uri)
        run_id, _, scores = tracked.train(small_config("training.epochs=1", "experiment='server'"))
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["data.n_cells"] == "700"
        assert run.data.metrics["test_macro_f1"] == pytest.approx(scores["test_macro_f1"])
        assert [m.step for m in client.get_metric_history(run_id, "val_macro_f1")] == [0]
        assert "model/scmix.keras" in {a.path for a in client.list_artifacts(run_id, "model")}
        assert {"confusion_matrix.csv", "confusion_matrix.png"} <= {
            Path(a.path).name for a in client.list_artifacts(run_id, "evaluation/test")}
        (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
        assert logged.source_run_id == run_id
        assert str(tmp_path / "art") in run.info.artifact_uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # any worker that outlived it
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=20)
        log.close()


# -- peers recorded beside the tracked runs -------------------------------------------------------


def test_record_peers_once(tracking, tmp_path):
    table = tmp_path / "results.csv"
    pd.DataFrame({"method": ["knn", "logreg"], "dataset": ["pbmc3k", "pbmc3k"], "setting": ["main", "main"],
                  "labels": [150, 150], "seed": [0, 0], "errors": [190, 201], "accuracy": [0.905, 0.8995],
                  "seconds": [1.5, 2.0]}).to_csv(table, index=False)
    assert len(record.record(table, "peers")) == 2
    assert record.record(table, "peers") == []  # importing again adds nothing
    runs = tracking.search_runs([tracking.get_experiment_by_name("peers").experiment_id])
    knn = next(r for r in runs if r.data.params["method"] == "knn")
    assert knn.data.params == {"method": "knn", "dataset": "pbmc3k", "setting": "main", "labels": "150", "seed": "0"}
    assert knn.data.metrics == {"test_errors": 190.0, "test_accuracy": 0.905, "seconds": 1.5}
