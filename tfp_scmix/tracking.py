"""Tracking: one call records a trained model in MLflow (needs the `track` extra: `pip install tfp_scmix[track]`).

    model = scm.train(data)
    scm.tracking.log_training(model, data, experiment="my_pbmc", dataset_path="pbmc.h5ad", test=held_out)

What a run holds:
- params: the `Config` fields under their own names (`n_topics`, `prior`, ...), `restarts`, and the data's
  sizes (`n_cells`, `n_genes`, `n_labelled`, `n_classes`);
- metrics in two groups that sort scores first: `eval/...` (the training summary's accuracy on the labelled
  cells, and with `test=` the scores of `evaluate.scores` and the expected calibration error) and `train/...`
  (the ELBO terms of every epoch, averaged over the restarts; `train/seconds`);
- the dataset (`mlflow.log_input`, context "training"): one row per cell (label, batch, library size),
  named after `dataset_path`, so that the runs table's Dataset column shows it;
- artifacts: the explanation tables and figures (`explanations/`) and the model (`model/model.keras`);
- tags: the package version, the data and gene fingerprints. The experiment is tagged as model training
  (`mlflow.experimentKind`), so MLflow 3's UI opens it on the runs table, not the GenAI view.

The store is `$MLFLOW_TRACKING_URI`, else `sqlite:///mlruns/mlflow.db` under the working directory (MLflow 3
would otherwise write `mlflow.db` wherever a command runs). `training/` records its tracked runs with the
same functions.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tfp_scmix import __version__

if TYPE_CHECKING:
    from tfp_scmix.data import SCData
    from tfp_scmix.ensemble import SCMixEnsemble
    from tfp_scmix.stream import H5ADStream

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else a SQLite store `mlruns/mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns').resolve() / 'mlflow.db'}"


class TrackingStoreError(ValueError):
    """A tracking store that runs cannot be logged to: the message names the URI, what is wrong and the fix."""


# Seconds to wait for a tracking server to accept a connection (MLflow itself retries for minutes, silently).
SERVER_TIMEOUT = 5.0


# MLflow's loggers that narrate a new SQLite store's set-up ("Creating initial MLflow database tables...", alembic's
# migrations) at INFO level, through a handler of MLflow's own: the runs log quietly, as the package's other steps do.
STORE_SET_UP_LOGGERS = ("mlflow.store.db.utils", "alembic")


def quiet_store_set_up() -> None:
    """Raise `STORE_SET_UP_LOGGERS` to WARNING (their warnings and errors still print)."""
    import logging

    for name in STORE_SET_UP_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def check_store(uri: str | None = None) -> None:
    """Check that runs can be logged to the tracking store `uri` (default `tracking_uri()`) before any training.

    A SQLite or file store needs an existing folder this process can create files in (a typo's folder is not
    created); a tracking server (http, https) must accept a connection within `SERVER_TIMEOUT` seconds. Other
    schemes (databricks, ...) are left to MLflow. Raises TrackingStoreError naming the store and the fix.
    """
    import socket
    from urllib.parse import urlparse

    quiet_store_set_up()
    uri = uri or tracking_uri()
    parsed = urlparse(uri)
    fix = "fix $MLFLOW_TRACKING_URI, or unset it for the default store"
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=SERVER_TIMEOUT).close()
        except OSError as err:
            raise TrackingStoreError(
                f"cannot reach the MLflow tracking server {uri} ({err.strerror or err}); start it (mlflow server "
                f"...) or {fix}."
            ) from None
        return
    if parsed.scheme == "sqlite":
        folder = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else None
    elif parsed.scheme in ("", "file"):
        folder = Path(parsed.path if parsed.scheme else uri)
        folder = folder if folder.is_dir() else folder.parent
    else:
        return
    if folder is None:
        return
    if not os.environ.get("MLFLOW_TRACKING_URI") and uri == tracking_uri():  # the default store: made on first use
        folder.mkdir(parents=True, exist_ok=True)
    if not folder.is_dir():
        raise TrackingStoreError(f"the folder {folder} of the tracking store {uri} does not exist; create it or {fix}.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise TrackingStoreError(
            f"cannot write to {folder}, the folder of the tracking store {uri} ({err.strerror}); {fix}."
        ) from None


def experiment_id(name: str) -> str:
    """Point MLflow at `tracking_uri()` and return the id of experiment `name` (created if missing, its
    artifacts beside a SQLite database; tagged as model training). MLflow's active experiment is left
    as it was."""
    import mlflow

    quiet_store_set_up()
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    existing = mlflow.get_experiment_by_name(name)
    if existing is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///") :]).parent / "artifacts" / name).resolve().as_uri()
        experiment_id = mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    else:
        experiment_id = existing.experiment_id
        for key, value in EXPERIMENT_KIND.items():
            mlflow.MlflowClient().set_experiment_tag(experiment_id, key, value)
    return experiment_id


def params(model: SCMixEnsemble, data: SCData | H5ADStream | None = None) -> dict[str, Any]:
    """Run parameters: every `Config` field by name, `restarts`, `seed` (`train`'s: the first restart's), and the
    data's sizes."""
    import dataclasses

    values: dict[str, Any] = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(model.config)}
    members = getattr(model, "members", [model])
    values["restarts"], values["seed"] = len(members), members[0].seed  # restart r trained with seed + r
    if data is not None:
        values.update(n_cells=data.n_cells, n_genes=data.n_genes, n_labelled=data.n_labelled, n_classes=data.n_classes)
    return {k: "None" if v is None else v for k, v in values.items()}


def epoch_metrics(model: SCMixEnsemble) -> list[dict[str, float]]:
    """`train/<term>` of each epoch `[epochs]`, the mean over the restarts of Keras's epoch logs."""
    histories = [m.history.history for m in getattr(model, "members", [model]) if getattr(m, "history", None)]
    histories = [h for h in histories if h]
    if not histories:
        return []
    epochs = min(len(next(iter(h.values()))) for h in histories)
    keys = sorted(set.intersection(*(set(h) for h in histories)))
    return [
        {f"train/{k}": float(np.mean([h[k][e] for h in histories])) for k in keys if len(histories[0][k]) > e}
        for e in range(epochs)
    ]


def dataset(data: SCData | H5ADStream, name: str, source: str | None = None):
    """An MLflow dataset of `data`'s cells: label, batch and library size per cell (not the counts)."""
    import mlflow.data.pandas_dataset

    labels = np.where(data.labels >= 0, np.asarray(data.classes + [""], dtype=object)[data.labels], "")
    frame = pd.DataFrame(
        {
            "label": labels.astype(str),
            "batch": np.asarray(data.batch_names, dtype=object)[data.batches].astype(str),
        }
    )
    if hasattr(data, "library_size"):
        frame["library_size"] = np.asarray(data.library_size, dtype=np.float64)
    with warnings.catch_warnings():  # a local path matches two of MLflow's source kinds; either is right
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
        return mlflow.data.pandas_dataset.from_pandas(frame, source=source or name, name=name, targets="label")


def log_training(
    model: SCMixEnsemble,
    data: SCData | H5ADStream,
    experiment: str = "tfp_scmix",
    *,
    dataset_path: str | os.PathLike[str] | None = None,
    test: SCData | None = None,
    run_name: str | None = None,
    log_model: bool = True,
    log_figures: bool = True,
) -> str:
    """Record a trained model (what `tfp_scmix.train` returned for `data`) as one MLflow run of
    `experiment`; returns the run id. test: labelled cells the model did not train on, scored into
    `eval/test_...`. A run is started (and ended) unless one is active, which is used as it is.
    Raises ImportError (with the install command) when MLflow is missing.
    """
    try:
        import mlflow
    except ImportError as err:
        raise ImportError("MLflow tracking needs mlflow: pip install 'tfp_scmix[track]'") from err
    from tfp_scmix.annotate import model_fingerprint
    from tfp_scmix.evaluate import expected_calibration_error, scores
    from tfp_scmix.explain import write_explanations
    from tfp_scmix.io import save_model
    from tfp_scmix.predict import predict

    name = Path(dataset_path).name if dataset_path else "data"
    active = mlflow.active_run()
    run = active or mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name or f"tfp_scmix {name}")
    # The run ends FINISHED only once everything is logged: an interrupt (Ctrl-C) marks it KILLED, an error FAILED
    # (a trial's interrupted run read FINISHED with no model in it).
    status = "FAILED"
    try:
        mlflow.log_params(params(model, data))
        mlflow.set_tags(
            {
                "tfp_scmix.version": __version__,
                "tfp_scmix.data_fingerprint": data.fingerprint(),
                "tfp_scmix.gene_fingerprint": model.gene_fingerprint,
                "tfp_scmix.model_fingerprint": model_fingerprint(model),  # an export's served model has it too
            }
        )
        # The absolute path: a relative one means nothing once the run is read from another folder.
        source = str(Path(dataset_path).resolve()) if dataset_path else None
        mlflow.log_input(dataset(data, name, source), context="training")
        summary = getattr(model, "training_summary", None) or {}
        evaluation = {}
        if summary.get("training_accuracy") is not None:
            evaluation["eval/training_accuracy"] = summary["training_accuracy"]
        if test is not None and test.n_labelled:
            cells = test.subset(test.labels >= 0)
            out = predict(model, cells)
            evaluation.update({f"eval/test_{k}": float(v) for k, v in scores(cells.labels, out["label"]).items()})
            evaluation["eval/test_ece"] = float(expected_calibration_error(out["probs"], cells.labels))
        mlflow.log_metrics(evaluation)
        for epoch, metrics in enumerate(epoch_metrics(model)):
            mlflow.log_metrics(metrics, step=epoch)
        if "seconds" in summary:
            mlflow.log_metric("train/seconds", summary["seconds"])
        with tempfile.TemporaryDirectory(prefix="tfp_scmix_tracking-") as tmp:
            if log_figures:
                write_explanations(model, Path(tmp) / "explanations")
                mlflow.log_artifacts(str(Path(tmp) / "explanations"), "explanations")
            if log_model:
                save_model(model, Path(tmp) / "model.keras")
                mlflow.log_artifact(str(Path(tmp) / "model.keras"), "model")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if active is None:
            mlflow.end_run(status)
    return run.info.run_id
