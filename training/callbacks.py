"""Per-epoch MLflow logging for any `model.fit`, with validation accuracy and macro-F1."""

import warnings

import keras
import mlflow
import numpy as np
from sklearn.exceptions import UndefinedMetricWarning

from tfp_scmix import SCData
from tfp_scmix.cli import scores


def classification_scores(y_true, y_pred, prefix: str = "") -> dict:
    """{"<prefix>errors", "<prefix>accuracy", "<prefix>macro_f1"} (tfp_scmix's benchmark scores)."""
    with warnings.catch_warnings():  # a class absent from a small validation set has no F1: it counts 0
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return {prefix + name: value for name, value in scores(np.asarray(y_true), np.asarray(y_pred)).items()}


def predict_labels(model, data: SCData, batch_size: int = 512) -> np.ndarray:
    """Predicted class ids `[n_cells]` for the cells of `data` (in the model's gene order)."""
    return np.asarray(model.predict(data.dataset(batch_size, shuffle=False), verbose=0)["label"])


class MLflowLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics (each ELBO term, and `val_*` ones) to an MLflow run.

    validation: labelled `SCData` the training never saw the labels of, or None. Its accuracy and macro-F1
    are added to the epoch's logs as "val_accuracy" and "val_macro_f1", so that callbacks after this one
    (EarlyStopping, keras-tuner's checkpoints) can monitor them: list it first.
    The run is the active one (`with mlflow.start_run(): model.fit(...)`); with none active, the callback
    starts a run when training begins and ends it when training ends.
    """

    def __init__(self, validation: SCData | None = None, batch_size: int = 512):
        super().__init__()
        if validation is not None and (validation.labels < 0).any():
            raise ValueError(f"validation cells must all be labelled; {int((validation.labels < 0).sum())} of "
                             f"{validation.n_cells} are not: pass data.subset(data.labels >= 0).")
        self.validation, self.batch_size = validation, batch_size
        self.run_id, self._owns_run = None, False

    def on_train_begin(self, logs=None):
        active = mlflow.active_run()
        self._owns_run = active is None
        self.run_id = (active or mlflow.start_run()).info.run_id

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if self.validation is not None and self.validation.n_cells:
            scores = classification_scores(self.validation.labels,
                                           predict_labels(self.model, self.validation, self.batch_size), "val_")
            logs["val_accuracy"], logs["val_macro_f1"] = scores["val_accuracy"], scores["val_macro_f1"]
        metrics = {}
        for name, value in logs.items():
            try:
                metrics[name] = float(value)  # NaN too: a diverged run should show it
            except (TypeError, ValueError):
                continue  # e.g. a learning-rate schedule object
        mlflow.log_metrics(metrics, step=epoch, run_id=self.run_id)

    def on_train_end(self, logs=None):
        if self._owns_run:
            mlflow.end_run()
            self._owns_run = False


class RefitClassifier(keras.callbacks.Callback):
    """Fits an SCMix's classification branch to convergence (`SCMix.fit_classifier`) after the last epoch.

    It runs at the end of the last scheduled epoch, before the callbacks after it score that epoch (list it
    first, before MLflowLogger), so the last epoch's validation scores, checkpoints and keras-tuner see the
    final model; when training stops early it runs when training ends. Adds "classifier_loss" to the logs.
    """

    def __init__(self, data: SCData, steps: int = 2000):
        super().__init__()
        self.data, self.steps, self.done = data, steps, False

    def on_train_begin(self, logs=None):
        self.done = False

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.params["epochs"]:
            self._refit(logs)

    def on_train_end(self, logs=None):
        if not self.done:
            self._refit(logs)

    def _refit(self, logs):
        loss = self.model.fit_classifier(self.data, steps=self.steps)
        self.done = True
        if logs is not None:
            logs["classifier_loss"] = loss
