"""training/tune.py: keras-tuner searches over the recipe tfp_scmix.train ships, tracked and resumable."""

import json
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

import tfp_scmix as scm
from training import config, tune
from training.callbacks import predict_labels


def trial_runs(client, parent):
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return sorted(runs, key=lambda r: r.info.start_time)


def trial_json(project_dir):
    return {t["trial_id"]: t for t in (json.loads(p.read_text()) for p in Path(project_dir).glob("trial_*/trial.json"))}


def trial_states(project_dir):
    return {trial_id: t["status"] for trial_id, t in trial_json(project_dir).items()}


def test_two_trial_search_resumes_without_redoing_trials(tracking, tmp_path, splits, small_config):
    cfg = small_config("search.space.restarts=[1, 2]")
    epochs = cfg.training.epochs
    first = tune.search(cfg, max_trials=1, directory=tmp_path / "tuning")
    assert first["n_completed"] == 1
    second = tune.search(cfg, max_trials=2, directory=tmp_path / "tuning")
    assert second["run_id"] == first["run_id"] and second["n_completed"] == 2
    assert trial_states(second["project_dir"]) == {"0": "COMPLETED", "1": "COMPLETED"}

    parent = tracking.get_run(second["run_id"])
    trials = trial_runs(tracking, parent)
    assert [r.data.tags["trial_id"] for r in trials] == ["0", "1"]  # trial 0 did not run again
    assert all(r.info.status == "FINISHED" for r in trials)
    scores = {t: record["score"] for t, record in trial_json(second["project_dir"]).items()}
    for trial in trials:
        params = trial.data.params
        assert {
            "hp.n_topics",
            "hp.hidden_units",
            "hp.learning_rate",
            "hp.prior",
            "hp.global_scale",
            "hp.label_weight",
            "hp.batch_size",
            "hp.restarts",
        } <= set(params)
        # the drawn values reach the recipe's Config and restarts
        assert params["model.n_topics"] == params["hp.n_topics"] and params["model.prior"] == params["hp.prior"]
        assert float(params["training.learning_rate"]) == pytest.approx(float(params["hp.learning_rate"]))
        assert params["training.restarts"] == params["hp.restarts"]
        restarts = int(params["hp.restarts"])
        for restart in range(restarts):
            f1 = tracking.get_metric_history(trial.info.run_id, f"restart_{restart}/val_macro_f1")
            assert sorted(m.step for m in f1) == list(range(epochs))
        assert f"restart_{restarts}/loss" not in trial.data.metrics
        # the objective is the trained ensemble's validation macro-F1
        assert trial.data.metrics["val_final_macro_f1"] == pytest.approx(scores[trial.data.tags["trial_id"]])
    best = max(trials, key=lambda r: r.data.metrics["val_final_macro_f1"])
    assert parent.data.metrics["best_val_macro_f1"] == pytest.approx(best.data.metrics["val_final_macro_f1"])
    assert parent.data.tags["best_trial"] == second["best_trial"] == best.data.tags["trial_id"]
    assert parent.info.status == "FINISHED" and parent.data.tags["search.resumed"] == "true"

    # the best trial's ensemble, as the trial saved it, registered and scored on the test cells
    versions = tracking.search_model_versions(f"name = '{second['registered_model']}'")
    assert versions and all(v.run_id == parent.info.run_id for v in versions)
    latest = max(versions, key=lambda v: int(v.version))
    model = mlflow.keras.load_model(f"models:/{second['registered_model']}/{latest.version}")
    assert isinstance(model, scm.SCMixEnsemble) and len(model.members) == int(best.data.params["hp.restarts"])
    assert model.members[0].n_topics == int(best.data.params["hp.n_topics"])
    saved = scm.load_model(Path(second["project_dir"]) / f"trial_{best.data.tags['trial_id']}" / tune.MODEL_FILE)
    assert np.array_equal(predict_labels(model, splits.test), predict_labels(saved, splits.test))
    assert parent.data.metrics["val_final_macro_f1"] == pytest.approx(parent.data.metrics["best_val_macro_f1"])
    assert {"test_errors", "test_accuracy", "test_macro_f1"} <= set(parent.data.metrics)
    # The search's run records what every trial shares, not the base configuration's values of the swept settings
    # (no trial's); the registered model records the best trial's own (a trial reproduced the wrong model from them).
    swept = {"model.n_topics", "model.hidden_units", "model.prior", "training.learning_rate", "training.restarts"}
    assert not swept & set(parent.data.params) and "training.epochs" in parent.data.params
    models = mlflow.search_logged_models(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"source_run_id = '{parent.info.run_id}'",
        output_format="list",
    )
    logged = max(models, key=lambda m: m.creation_timestamp).params
    for key in swept | {"training.epochs", "model.label_weight"}:
        assert logged[key] == best.data.params[key], key


def test_search_needs_validation_cells(tracking, tmp_path, small_config):
    with pytest.raises(config.ConfigError, match=r"\[data\]: a search scores each trial on validation cells"):
        tune.search(small_config("data.n_validation=0"), max_trials=1, directory=tmp_path / "tuning")
    assert not (tmp_path / "tuning").exists()  # refused before keras-tuner started


class Diverge(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise FloatingPointError("loss is NaN")


def test_failed_trials_say_why(tracking, tmp_path, small_config):
    cfg = small_config()
    with pytest.raises(RuntimeError, match="no trial of the search .* completed"):
        tune.search(cfg, max_trials=1, directory=tmp_path / "tuning", callbacks=[Diverge()])
    parent_id = (tmp_path / "tuning" / tune.project_name(cfg) / tune.PARENT_RUN_FILE).read_text()
    (trial,) = trial_runs(tracking, tracking.get_run(parent_id))
    assert trial.info.status == "FAILED" and trial.data.tags["error"] == "FloatingPointError: loss is NaN"

    # resuming that search with other settings would mix two configurations' trials: refused, naming what changed
    for overrides, changed in [
        (("model.kl_warmup_epochs=3",), "model.kl_warmup_epochs: was"),
        (("search.space.n_topics=[8, 12]",), "search.space: was"),
        (("search.algorithm='hyperband'",), "search.algorithm: was bayesian, now hyperband"),
    ]:
        with pytest.raises(config.ConfigError, match="was started with other settings") as refused:
            tune.search(small_config(*overrides), max_trials=1, directory=tmp_path / "tuning")
        assert changed in str(refused.value) and "another --directory" in str(refused.value)
    assert len(trial_runs(tracking, tracking.get_run(parent_id))) == 1  # no trial ran


class InterruptOnce(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the end of the first epoch it sees in this process (as Ctrl-C would)."""

    fired = False

    def on_epoch_end(self, epoch, logs=None):
        if not InterruptOnce.fired:
            InterruptOnce.fired = True
            raise KeyboardInterrupt


def test_interrupted_search_resumes_the_interrupted_trial(tracking, tmp_path, small_config):
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


def test_hyperband_trains_a_continued_trial_from_the_start(tracking, tmp_path, small_config):
    """Hyperband's second round continues its best first-round trial with more epochs: here that trial trains
    the recipe again for all of them (tfp_scmix.train does not continue another trial's ensemble)."""
    cfg = small_config(
        "search.algorithm='hyperband'",
        "search.hyperband_factor=2",
        "model.n_topics=4",
        "model.hidden_units=16",
        "training.classifier_steps=50",
        "search.space.n_topics=[4, 5]",
        "search.space.hidden_units=[16]",
    )
    result = tune.search(cfg, max_trials=3, directory=tmp_path / "tuning")
    trials = trial_json(result["project_dir"])
    continued = [t for t in trials.values() if "tuner/trial_id" in t["hyperparameters"]["values"]]
    assert result["n_completed"] == 3 and len(continued) == 1
    values = continued[0]["hyperparameters"]["values"]
    assert (values["tuner/initial_epoch"], values["tuner/epochs"]) == (1, 2)
    (run,) = [
        r
        for r in trial_runs(tracking, tracking.get_run(result["run_id"]))
        if r.data.tags["trial_id"] == continued[0]["trial_id"]
    ]
    assert [m.step for m in tracking.get_metric_history(run.info.run_id, "restart_0/loss")] == [0, 1]
    assert run.data.params["training.epochs"] == "2"
    assert "training.epochs" not in tracking.get_run(result["run_id"]).data.params  # Hyperband's budget per trial


def test_a_search_of_no_trials_or_into_a_file_is_refused_at_once(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for argv, message in [
        (["--max-trials", "0"], "--max-trials: must be at least 1, received 0"),
        (["--max-trials", "-1"], "must be at least 1, received -1"),
        (["--directory", str(tmp_path / "afile")], "is a file; name a folder for keras-tuner's trials"),
        # A folder that cannot be made (a trial: /proc/x ended in keras-tuner's traceback).
        (["--directory", str(tmp_path / "afile" / "trials")], "cannot write keras-tuner's trials to"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            tune.main(["training/configs/pbmc68k_reduced.toml", *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a configuration error: one line, not a traceback
        tune.main([str(tmp_path / "missing.toml")])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_an_interrupted_search_exits_as_the_other_commands_do(monkeypatch, capsys):
    """Ctrl-C during a search: the shell's code 130 (as tfp-scmix and training.run; it was 1) and how to resume."""

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune, "search", interrupt)
    with pytest.raises(SystemExit) as exit_:
        tune.main(["training/configs/pbmc68k_reduced.toml"])
    assert (
        exit_.value.code == 130
        and "search interrupted: run the same command again to resume it" in capsys.readouterr().err
    )
