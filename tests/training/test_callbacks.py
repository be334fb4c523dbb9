"""training/callbacks.py: MLflowLogger under tfp_scmix.train, restart by restart."""

import keras
import mlflow
import pytest

import tfp_scmix as scm
from training import store
from training.callbacks import MLflowLogger, classification_scores, predict_labels


def test_logger_records_each_restart_of_the_recipe(tracking, splits, small_config):
    """Without an active run the logger keeps one run of its own over the restarts; it feeds val_macro_f1 to
    the callbacks after it and logs each restart's epochs under restart_<r>/."""
    store.configure()
    config = small_config().model_config()
    stopper = keras.callbacks.EarlyStopping("val_macro_f1", mode="max", patience=5)
    logger = MLflowLogger(splits.validation)
    model = scm.train(splits.train, config, restarts=2, seed=3, callbacks=[logger, stopper], verbose=0)
    assert mlflow.active_run() is None
    (run,) = tracking.search_runs([tracking.get_experiment_by_name("Default").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == logger.run_id
    for restart, member in enumerate(model.members):
        f1 = tracking.get_metric_history(run.info.run_id, f"restart_{restart}/val_macro_f1")
        assert sorted(m.step for m in f1) == list(range(config.epochs))
        # the last epoch is scored after the recipe's classifier refit: it is the member as trained
        final = classification_scores(splits.validation.labels, predict_labels(member, splits.validation))
        assert max(f1, key=lambda m: m.step).value == pytest.approx(final["macro_f1"])
        assert [m.step for m in tracking.get_metric_history(run.info.run_id, f"restart_{restart}/classifier_loss")] == [
            config.epochs - 1
        ]
    assert stopper.best == max(m.value for m in tracking.get_metric_history(run.info.run_id, "restart_1/val_macro_f1"))
    assert {
        f"restart_1/{name}"
        for name in (
            "reconstruction",
            "kl_cell",
            "kl_topic",
            "kl_class",
            "label_nll",
            "val_loss",
            "val_label_nll",
            "val_accuracy",
        )
    } <= set(run.data.metrics)
    assert not any(name.startswith("restart_2/") for name in run.data.metrics)
    with pytest.raises(ValueError, match="validation cells must all be labelled"):
        MLflowLogger(splits.train)
