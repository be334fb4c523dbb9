"""Where runs are recorded: `MLFLOW_TRACKING_URI` when set, else a SQLite store inside the repo's `mlruns/`.

MLflow 3 would otherwise create `mlflow.db` in whatever directory a command runs from, so the default is
set explicitly: the database `mlruns/mlflow.db` and the artifacts under `mlruns/artifacts/<experiment>`
(any SQLite store keeps its artifacts in `artifacts/` beside its database).
"""

import contextlib
import os
import subprocess
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from tfp_scmix.tracking import EXPERIMENT_KIND, check_store

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STORE = REPO / "mlruns"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def default_tracking_uri() -> str:
    """`sqlite:///<repo>/mlruns/mlflow.db`, the store used when `$MLFLOW_TRACKING_URI` names none."""
    return f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


def tracking_uri() -> str:
    """The tracking URI in force: `$MLFLOW_TRACKING_URI`, else `default_tracking_uri()`."""
    return os.environ.get(TRACKING_URI_ENV) or default_tracking_uri()


def uses_default_store() -> bool:
    """Whether the store in force is the default one (`configure` sets `$MLFLOW_TRACKING_URI` to it, through
    `mlflow.set_tracking_uri`, so the variable alone does not tell)."""
    return tracking_uri() == default_tracking_uri()


def configure() -> str:
    """Point MLflow at the tracking store (see `tracking_uri`) and return its URI. Raises TrackingStoreError for
    a store runs cannot be logged to (`tfp_scmix.tracking.check_store`)."""
    uri = tracking_uri()
    if uses_default_store():
        DEFAULT_STORE.mkdir(exist_ok=True)
    check_store(uri)  # a store that cannot take runs is refused before training, not after (TrackingStoreError)
    mlflow.set_tracking_uri(uri)
    return uri


def _artifact_location(name: str) -> str | None:
    """Artifacts of a SQLite store go beside its database (MLflow would put them in ./mlruns of the cwd);
    a tracking server or a file store chooses for itself."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "artifacts" / name).as_uri()


def experiment_id(name: str) -> str:
    """Id of the experiment `name`, created if missing (for SQLite stores, artifacts in `<db folder>/artifacts`)."""
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            raise MlflowException(
                f"experiment {name!r} is deleted in {tracking_uri()}; restore it "
                f"(mlflow experiments restore --experiment-id {existing.experiment_id}) "
                "or choose another experiment name."
            )
        return existing.experiment_id
    try:
        # Tagged as model training: MLflow 3's UI opens such an experiment on its runs table, not the GenAI view.
        return mlflow.create_experiment(name, artifact_location=_artifact_location(name), tags=EXPERIMENT_KIND)
    except MlflowException:  # created meanwhile by another process
        existing = mlflow.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def code_version() -> dict:
    """The git commit of the code that runs, and whether tracked files differ from it."""

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"mlflow.source.git.commit": "unknown", "code.dirty": "unknown"}
    return {"mlflow.source.git.commit": commit, "code.dirty": str(dirty).lower()}


@contextlib.contextmanager
def start_run(**kwargs):
    """`mlflow.start_run` that records an interrupted run (Ctrl-C) as KILLED rather than FAILED."""
    with mlflow.start_run(**kwargs) as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise
