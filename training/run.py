"""A tracked training run: `python -m training.run CONFIG.toml [--set section.key=value ...]`.

Trains the package's model with the package's recipe, `tfp_scmix.train` (its restarts included), and
records in MLflow: the configuration (every `tfp_scmix.Config` setting) as parameters; the data's identity
and the code version; every restart's per-epoch ELBO terms and validation accuracy / macro-F1 (as
"restart_<r>/<name>"); the returned ensemble's validation and test scores; and as artifacts the saved
ensemble (also logged as an MLflow Keras model), the explanation tables and figures, and a confusion matrix.
"""

import argparse
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import keras
import matplotlib
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

import tfp_scmix as scm
from tfp_scmix import explain, tracking
from tfp_scmix.annotate import model_fingerprint
from training import config as run_config
from training import data as run_data
from training import store
from training.callbacks import MLflowLogger, classification_scores, predict_labels

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix  # noqa: E402

_REQUIREMENTS = ("tfp_scmix", "tensorflow", "tensorflow-probability", "tf-keras", "keras")
# Settings whose Config default (None) each model resolves from the data; logged as "resolved.<name>".
RESOLVED = ("expected_active_topics", "global_scale")


def fit(cfg: run_config.RunConfig, splits: run_data.Splits, callbacks=(), verbose: int = 0) -> scm.SCMixEnsemble:
    """`tfp_scmix.train` on the training cells as `cfg` says, each restart's epochs logged to the active run.

    The recipe is the package's: `cfg.model_config()`, `cfg.training.restarts` restarts seeded from
    `cfg.data.seed`, each ending with the classifier refit (`tfp_scmix.callbacks.RefitClassifier`) before
    the callbacks here score its last epoch. Ours come after the recipe's: `MLflowLogger` (validation
    scores into the logs), then with `training.early_stopping_patience` > 0 an EarlyStopping on
    val_macro_f1 (per restart), then `callbacks`. Logs the resolved defaults as "resolved.<name>".
    Returns the trained `SCMixEnsemble` (one member per restart).
    """
    ours = [MLflowLogger(splits.validation if splits.validation.n_cells else None)]
    if cfg.training.early_stopping_patience:
        ours.append(
            keras.callbacks.EarlyStopping("val_macro_f1", mode="max", patience=cfg.training.early_stopping_patience)
        )
    model = scm.train(
        splits.train,
        cfg.model_config(),
        restarts=cfg.training.restarts,
        seed=cfg.data.seed,
        callbacks=[*ours, *callbacks],
        verbose=verbose,
    )
    settings = model.members[0].settings  # the same in every member: they depend on the data and the Config
    mlflow.log_params({f"resolved.{name}": settings[name] for name in RESOLVED})
    # The package's own record of a training (tfp_scmix.tracking): the dataset fills the runs table's
    # Dataset column, the training summary's accuracy goes with the scores.
    name = str(splits.identity.get("data.name", "data"))
    mlflow.log_input(tracking.dataset(splits.train, name), context="training")
    if model.training_summary.get("training_accuracy") is not None:
        mlflow.log_metric("eval/training_accuracy", model.training_summary["training_accuracy"])
    return model


def _requirements():
    pins = []
    for dist in _REQUIREMENTS:
        try:
            pins.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pins.append(dist)
    return pins


def log_model(model, registered_model: str | None = None, params: dict | None = None):
    """Log the model as the run artifact model/scmix.keras (`tfp_scmix.load_model`) and as the MLflow Keras
    model "scmix" (`mlflow.keras.load_model`; registered if named). params: the settings the model was trained with,
    recorded on the logged model beside the run's own parameters (a search's run holds only what every trial shares)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = scm.save_model(model, Path(tmp) / "scmix.keras")
        mlflow.log_artifact(str(path), "model")
    # The tag an export's served model carries too (`tfp-scmix export --mlflow-experiment`): what links the two.
    mlflow.set_tag("tfp_scmix.model_fingerprint", model_fingerprint(model))
    # The input: raw counts [cells, genes] in model.genes order (MLflow warned of a model logged without one).
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.n_genes), "counts")]))
    return mlflow.keras.log_model(
        model,
        name="scmix",
        pip_requirements=_requirements(),
        registered_model_name=registered_model,
        signature=signature,
        params=params,
    )


def log_evaluation(model, cells: scm.SCData, prefix: str = "test_") -> dict:
    """Score `cells` (metrics `<prefix>errors/accuracy/macro_f1`) and log their confusion matrix."""
    predicted = predict_labels(model, cells)
    scores = classification_scores(cells.labels, predicted, prefix)
    mlflow.log_metrics(scores)
    names = list(model.class_names)
    matrix = confusion_matrix(cells.labels, predicted, labels=np.arange(len(names)))
    with tempfile.TemporaryDirectory() as tmp:
        pd.DataFrame(matrix, index=pd.Index(names, name="true"), columns=pd.Index(names, name="predicted")).to_csv(
            Path(tmp) / "confusion_matrix.csv"
        )
        size = 3 + 0.6 * len(names)
        fig, ax = plt.subplots(figsize=(size, size))
        ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=ax, xticks_rotation="vertical", colorbar=False)
        ax.set_title(f"{prefix.rstrip('_')} cells: {scores[prefix + 'errors']} errors of {cells.n_cells}")
        fig.tight_layout()
        fig.savefig(Path(tmp) / "confusion_matrix.png", dpi=100)
        plt.close(fig)
        mlflow.log_artifacts(tmp, f"evaluation/{prefix.rstrip('_')}")
    return scores


def log_explanations(model):
    """Log tfp_scmix.explain's tables (CSV) and figures (PNG) under explain/."""
    with tempfile.TemporaryDirectory() as tmp:
        explain.write_explanations(model, tmp)
        mlflow.log_artifacts(tmp, "explain")


def log_outputs(
    model, splits: run_data.Splits, registered_model: str | None = None, params: dict | None = None
) -> dict:
    """Everything recorded after training: scores, confusion matrix, model (with `params`: `log_model`),
    explanations."""
    scores = log_evaluation(model, splits.validation, "val_final_") if splits.validation.n_cells else {}
    if splits.test.n_cells:
        scores.update(log_evaluation(model, splits.test, "test_"))
    log_model(model, registered_model, params)
    log_explanations(model)
    return scores


def log_context(cfg: run_config.RunConfig, splits: run_data.Splits, exclude=()):
    """Parameters, data identity, code version and the configuration file of the active run; the parameters named
    in `exclude` are left out (a search's swept settings, which differ from trial to trial)."""
    # The parameters a benchmark's peers are recorded with (training/record.py, experiments/few_shot).
    mlflow.log_params(
        {
            "method": "tfp_scmix",
            "dataset": splits.identity["data.name"],
            "seed": cfg.data.seed,
            "setting": cfg.data.setting,
            "labels": cfg.data.n_labelled,
            **{k: v for k, v in cfg.params().items() if k not in exclude},
            **splits.identity,
        }
    )
    mlflow.set_tags(
        {
            **store.code_version(),
            "tfp_scmix.version": scm.__version__,
            "config": cfg.source or "",
            "config.overrides": " ".join(cfg.overrides),
        }
    )
    if cfg.source and Path(cfg.source).is_file():
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(cfg.source, Path(tmp) / Path(cfg.source).name)
            mlflow.log_artifacts(tmp, "config")


def train(cfg: run_config.RunConfig, callbacks=(), verbose: int = 0):
    """Train as configured (`fit`), recorded as an MLflow run; returns (run id, SCMixEnsemble, scores)."""
    store.configure()
    experiment = store.experiment_id(cfg.experiment)
    splits = run_data.load(cfg.data)
    name = cfg.run_name or f"tfp_scmix {splits.identity['data.name']} seed {cfg.data.seed}"
    with store.start_run(experiment_id=experiment, run_name=name) as run:
        log_context(cfg, splits)
        model = fit(cfg, splits, callbacks=callbacks, verbose=verbose)
        scores = log_outputs(model, splits)
    return run.info.run_id, model, scores


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="run configuration (TOML), e.g. training/configs/pbmc68k_reduced.toml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a configuration value, e.g. --set training.epochs=3 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = run_config.load(args.config, args.set)
        run_id, _, scores = train(cfg, verbose=1)  # one progress bar; every epoch's terms are in MLflow
    except ValueError as err:  # ConfigError and DataError among them: what is wrong and the fix, in one line
        parser.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ntraining interrupted: its MLflow run is marked KILLED and nothing was registered\n")
    print(f"run {run_id} in experiment {cfg.experiment!r} of {store.tracking_uri()}")
    print(" ".join(f"{k}={v:.4g}" for k, v in scores.items()))
    if store.uses_default_store():
        print(f"see it with: mlflow ui --backend-store-uri {store.tracking_uri()}")


if __name__ == "__main__":
    main()
