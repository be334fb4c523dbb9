"""Per-epoch MLflow logging of `tfp_scmix.train` (every restart) or any `model.fit`, with validation scores.

The classifier refit after the last epoch is the package recipe's own callback
(`tfp_scmix.callbacks.RefitClassifier`, in `tfp_scmix.callbacks.default`), which `tfp_scmix.train` runs
before the callbacks it is given: the logger's scores of the last epoch are those of the refitted model.
"""

import warnings

import keras
import mlflow
import numpy as np
from sklearn.exceptions import UndefinedMetricWarning

import tfp_scmix as scm
from tfp_scmix import SCData

RESTART_PREFIX = "restart_{}/"  # per-epoch metric names: restart_0/loss, restart_1/val_macro_f1, ...


def classification_scores(y_true, y_pred, prefix: str = "") -> dict:
    """{"<prefix>errors", "<prefix>accuracy", "<prefix>macro_f1"} (`tfp_scmix.evaluate.scores`)."""
    with warnings.catch_warnings():  # a class absent from a small validation set has no F1: it counts 0
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        scores = scm.evaluate.scores(np.asarray(y_true), np.asarray(y_pred))
    return {prefix + name: value for name, value in scores.items()}


def predict_labels(model, data: SCData) -> np.ndarray:
    """Predicted class ids `[n_cells]` of an SCMix or SCMixEnsemble for the cells of `data` (`tfp_scmix.predict`)."""
    return scm.predict(model, data, keys=("label",))["label"]


def _random_states(model) -> list:
    """The model's random-generator states (keras SeedGenerators): its variables that are not weights."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


class MLflowLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics (each ELBO term, and `val_*` ones) of every restart to an MLflow run.

    `tfp_scmix.train` runs one `fit` per restart with the same callbacks; the logger counts the fits it
    sees and logs the epochs of fit r (restart r, seeded seed + r, ensemble member r) as the metrics
    "restart_<r>/<name>" at step = epoch (0-based), e.g. "restart_0/val_macro_f1", so that the restarts
    of a run are told apart and each has its own curve. A plain `model.fit` is restart 0.

    validation: labelled `SCData` the training never saw the labels of, or None. Its ELBO terms
    ("val_loss", "val_reconstruction", ...: `model.evaluate`, with the model's random-generator states
    put back afterwards, so that logging does not change what is trained), accuracy and macro-F1
    ("val_accuracy", "val_macro_f1") are added to the epoch's logs, so that callbacks after this one
    (EarlyStopping) can monitor them: list it first among yours.
    The run is the active one (`with mlflow.start_run(): scm.train(...)`); with none active, the callback
    starts a run when the first restart begins, ends it when each restart ends and resumes it when the
    next one begins.
    """

    def __init__(self, validation: SCData | None = None, batch_size: int = 512):
        super().__init__()
        if validation is not None and (validation.labels < 0).any():
            raise ValueError(
                f"validation cells must all be labelled; {int((validation.labels < 0).sum())} of "
                f"{validation.n_cells} are not: pass data.subset(data.labels >= 0)."
            )
        self.validation, self.batch_size = validation, batch_size
        self.run_id, self._owns_run = None, False
        self.restart = -1  # the fit being logged: 0 for the first

    def on_train_begin(self, logs=None):
        self.restart += 1
        active = mlflow.active_run()
        if active is not None:
            self.run_id, self._owns_run = active.info.run_id, False
        else:  # our own run: new for the first restart, the same one again for the next
            self.run_id, self._owns_run = mlflow.start_run(run_id=self.run_id).info.run_id, True

    def _validation_logs(self) -> dict:
        random_states = _random_states(self.model)
        saved = [keras.ops.convert_to_numpy(v) for v in random_states]
        try:
            terms = self.model.evaluate(
                self.validation.dataset(self.batch_size, shuffle=False), verbose=0, return_dict=True
            )
        finally:  # evaluating draws from the model's generators; training goes on with the draws it had
            for variable, value in zip(random_states, saved):
                variable.assign(value)
        scores = classification_scores(self.validation.labels, predict_labels(self.model, self.validation), "val_")
        return {
            **{f"val_{name}": value for name, value in terms.items()},
            "val_accuracy": scores["val_accuracy"],
            "val_macro_f1": scores["val_macro_f1"],
        }

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if self.validation is not None and self.validation.n_cells:
            logs.update(self._validation_logs())
        metrics = {}
        for name, value in logs.items():
            try:
                metrics[RESTART_PREFIX.format(self.restart) + name] = float(value)  # NaN too: a diverged run shows it
            except (TypeError, ValueError):
                continue  # e.g. a learning-rate schedule object
        mlflow.log_metrics(metrics, step=epoch, run_id=self.run_id)

    def on_train_end(self, logs=None):
        if self._owns_run:
            mlflow.end_run()
            self._owns_run = False
