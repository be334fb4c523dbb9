"""training/run.py: a tracked run trains what tfp_scmix.train ships and records everything about it."""

import subprocess
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

import tfp_scmix as scm
from tfp_scmix.loss import ELBO_TERMS
from training import run as tracked
from training import store
from training.callbacks import predict_labels


def download(run_id, tmp_path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "art")))


def test_tracked_run_records_params_metrics_and_artifacts(tracking, tmp_path, splits, small_config):
    cfg = small_config()
    epochs = cfg.training.epochs
    run_id, model, scores = tracked.train(cfg)
    run = tracking.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert run.info.status == "FINISHED"
    assert params["model.n_topics"] == "8" and params["training.epochs"] == str(epochs)
    assert params["training.restarts"] == "1" and params["model.global_scale"] == "None"
    member = model.members[0]
    assert float(params["resolved.global_scale"]) == pytest.approx(member.settings["global_scale"])  # from the data
    assert params["data.sha256"] == splits.identity["data.sha256"]
    assert (params["data.n_cells"], params["data.n_genes"], params["data.n_classes"]) == ("700", "765", "10")
    assert (params["method"], params["dataset"], params["setting"], params["labels"], params["seed"]) == (
        "tfp_scmix",
        "pbmc68k_reduced",
        "main",
        "150",
        "0",
    )
    commit = subprocess.run(
        ["git", "-C", str(store.REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit and tags["code.dirty"] in ("true", "false")
    assert tags["config.overrides"].startswith("training.epochs=")

    # the shipped model: what tfp_scmix.train returns for this Config, restarts and seed (logging changes nothing)
    assert isinstance(model, scm.SCMixEnsemble) and len(model.members) == 1
    assert member.config == cfg.model_config() and member.seed == cfg.data.seed
    plain = scm.train(splits.train, cfg.model_config(), restarts=1, seed=cfg.data.seed, verbose=0)
    np.testing.assert_array_equal(scm.predict(model, splits.test)["probs"], scm.predict(plain, splits.test)["probs"])

    # every ELBO term, and the validation scores, once per epoch
    for name in (*ELBO_TERMS, "val_loss", "val_accuracy", "val_macro_f1"):
        history = tracking.get_metric_history(run_id, f"restart_0/{name}")
        assert sorted(m.step for m in history) == list(range(epochs)), name
    # the classifier is refitted once, at the end of the last epoch, before that epoch is scored
    assert [m.step for m in tracking.get_metric_history(run_id, "restart_0/classifier_loss")] == [epochs - 1]
    last_f1 = max(tracking.get_metric_history(run_id, "restart_0/val_macro_f1"), key=lambda m: m.step).value
    assert last_f1 == pytest.approx(scores["val_final_macro_f1"])  # one restart: the ensemble is its model

    # test scores agree with the confusion matrix logged beside them
    n_test = splits.test.n_cells
    assert run.data.metrics["test_errors"] == scores["test_errors"]
    assert scores["test_accuracy"] == pytest.approx(1 - scores["test_errors"] / n_test)
    local = download(run_id, tmp_path)
    matrix = pd.read_csv(local / "evaluation" / "test" / "confusion_matrix.csv", index_col=0)
    assert list(matrix.index) == model.class_names and matrix.to_numpy().sum() == n_test
    assert np.trace(matrix.to_numpy()) == n_test - scores["test_errors"]
    assert (local / "evaluation" / "test" / "confusion_matrix.png").stat().st_size > 0

    # explanations, the configuration and the model, which loads back and predicts the same
    for name in ("topic_genes.csv", "class_topics.csv", "topic_genes.png", "class_topics.png"):
        assert (local / "explain" / name).stat().st_size > 0, name
    assert len(pd.read_csv(local / "explain" / "topic_genes.csv")) >= 8
    assert (local / "config" / Path(cfg.source).name).read_text() == Path(cfg.source).read_text()
    expected = predict_labels(model, splits.test)
    assert np.array_equal(predict_labels(scm.load_model(local / "model" / "scmix.keras"), splits.test), expected)
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [run_id]
    assert np.array_equal(predict_labels(mlflow.keras.load_model(logged[0].model_uri), splits.test), expected)


def test_tracked_run_with_two_restarts_logs_their_ensemble(tracking, tmp_path, splits, small_config):
    cfg = small_config("training.epochs=1", "training.restarts=2")
    run_id, model, scores = tracked.train(cfg)
    run = tracking.get_run(run_id)
    # every Config setting is a parameter, under the table of the file it is set in
    settings = cfg.model_config().to_dict()
    for name in scm.config.names():
        table = "model" if name in scm.config.MODEL_SETTINGS else "training"
        assert run.data.params[f"{table}.{name}"] == str(settings[name]), name
    assert run.data.params["training.restarts"] == "2"
    # each restart's epochs, told apart by name
    for restart in (0, 1):
        assert [m.step for m in tracking.get_metric_history(run_id, f"restart_{restart}/val_macro_f1")] == [0]
    assert not any(name.startswith("restart_2/") for name in run.data.metrics)
    # the logged model is the ensemble of both restarts (seeds seed, seed + 1), scored as logged
    local = download(run_id, tmp_path)
    logged = scm.load_model(local / "model" / "scmix.keras")
    assert isinstance(logged, scm.SCMixEnsemble) and [m.seed for m in logged.members] == [0, 1]
    assert all(m.config == cfg.model_config() for m in logged.members)
    (registered,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert len(mlflow.keras.load_model(registered.model_uri).members) == 2
    expected = predict_labels(model, splits.test)
    assert np.array_equal(predict_labels(logged, splits.test), expected)
    assert run.data.metrics["test_errors"] == scores["test_errors"] == int((expected != splits.test.labels).sum())
    topics = set(pd.read_csv(local / "explain" / "topic_genes.csv")["topic"])
    assert {t.split("_")[0] for t in topics} == {"m0", "m1"}  # both members explained


class StopNow(keras.callbacks.Callback):
    """Stops training after the first epoch, keeping the classifier's weights as they were then."""

    def on_epoch_end(self, epoch, logs=None):
        self.weights = [v.numpy().copy() for v in self.model.classifier.trainable_variables]
        self.model.stop_training = True


def test_classifier_is_refitted_when_a_restart_stops_early(tracking, splits, small_config):
    store.configure()
    stop = StopNow()
    with mlflow.start_run() as run:
        model = tracked.fit(small_config("training.epochs=3"), splits, callbacks=[stop])
    (member,) = model.members
    after = [v.numpy() for v in member.classifier.trainable_variables]
    assert any(not np.allclose(a, b) for a, b in zip(stop.weights, after))  # changed after the epoch ended
    assert [m.step for m in tracking.get_metric_history(run.info.run_id, "restart_0/loss")] == [0]
    # refitted when training ended, after the last logged epoch was scored
    assert "restart_0/classifier_loss" not in tracking.get_run(run.info.run_id).data.metrics


def test_training_scripts_start_without_tensorflows_log_lines():
    """keras and keras_tuner import TensorFlow, which writes its start-up lines (CUDA probing, CPU features) to
    stderr before any log setting applies; the training package imports it through tfp_scmix first, quietly."""
    import os

    from tests.helpers import run_python

    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TFP_SCMIX_VERBOSE")}
    result = run_python(  # training.tune imports keras_tuner, keras and mlflow at the top, as training.run does
        "import runpy, sys; sys.argv = ['tune', '--help']; runpy.run_module('training.tune', run_name='__main__')",
        env=env,
    )
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
    assert result.stderr == "", result.stderr
