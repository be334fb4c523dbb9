"""A tracked search over the model's settings: `python -m training.tune CONFIG.toml [--max-trials N]`.

keras-tuner (Bayesian optimization or Hyperband) maximises the validation macro-F1 over the ranges in the
configuration's [search.space]. The search is one MLflow run; each trial is a run nested under it. At the
end the best trial's model (the weights of its best epoch) is scored on the test cells, logged and
registered in the MLflow model registry. Run the same command again to resume a stopped search: finished
trials are kept and an interrupted one starts over.
"""

import argparse
import logging
import os
import re
import warnings
from pathlib import Path

import keras
import keras_tuner as kt
import mlflow

from training import config as run_config
from training import data as run_data
from training import run as tracked
from training import store

logger = logging.getLogger("training")
OBJECTIVE = kt.Objective("val_macro_f1", direction="max")
PARENT_RUN_FILE = "mlflow_run_id"


class SCMixHyperModel(kt.HyperModel):
    """The search space of a run configuration: its [search.space] over the [model] and [training] settings."""

    def __init__(self, cfg: run_config.RunConfig, splits: run_data.Splits):
        super().__init__(name="scmix", tunable=True)
        self.cfg, self.splits = cfg, splits

    def settings(self, hp):
        """(model settings, learning rate, batch size) for the values `hp` draws from the space."""
        values = {}
        for name, spec in self.cfg.search.space.items():
            if isinstance(spec, list):
                values[name] = hp.Choice(name, spec)
            elif all(isinstance(spec[k], int) for k in ("min", "max")) and not spec.get("log"):
                values[name] = hp.Int(name, spec["min"], spec["max"], step=spec.get("step", 1))
            else:
                values[name] = hp.Float(name, spec["min"], spec["max"], step=spec.get("step"),
                                        sampling="log" if spec.get("log") else "linear")
        model = {**self.cfg.model, **{k: v for k, v in values.items() if k in run_config.MODEL_SETTINGS}}
        return (model, values.get("learning_rate", self.cfg.training.learning_rate),
                values.get("batch_size", self.cfg.training.batch_size))

    def build(self, hp):
        model, learning_rate, _ = self.settings(hp)
        return tracked.build_model(self.splits.train, model, learning_rate)

    def fit(self, hp, model, *args, callbacks=(), epochs=None, initial_epoch=0, **kwargs):
        _, _, batch_size = self.settings(hp)
        return tracked.fit(model, self.splits, self.cfg.training, batch_size, epochs, initial_epoch, callbacks,
                           seed=self.cfg.data.seed, verbose=kwargs.get("verbose", 0))


class _TrackedTrials:
    """Runs each trial inside an MLflow run nested under the active (search) run."""

    def run_trial(self, trial, *args, **kwargs):
        parent = mlflow.active_run()
        with store.start_run(run_name=f"trial {trial.trial_id}", nested=True,
                             experiment_id=parent.info.experiment_id,
                             tags={"trial_id": trial.trial_id, "search": parent.info.run_name}):
            mlflow.log_params({f"hp.{k}": v for k, v in trial.hyperparameters.values.items()})
            try:
                histories = super().run_trial(trial, *args, **kwargs)
            except Exception as err:  # keras-tuner records the trial as failed and goes on; say why in MLflow
                mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:4000])
                raise
            mlflow.log_metric("best_val_macro_f1", max(max(h.history["val_macro_f1"]) for h in histories))
            return histories


class BayesianSearch(_TrackedTrials, kt.BayesianOptimization):
    pass


class HyperbandSearch(_TrackedTrials, kt.Hyperband):
    pass


def make_tuner(cfg: run_config.RunConfig, hypermodel, directory: Path, max_trials: int):
    """The keras-tuner tuner of `cfg`, reloaded from `directory` when a search was started there."""
    common = dict(objective=OBJECTIVE, directory=str(directory), project_name=project_name(cfg),
                  overwrite=False, seed=cfg.data.seed)
    if cfg.search.algorithm == "bayesian":
        return BayesianSearch(hypermodel, max_trials=max_trials, **common)
    tuner = HyperbandSearch(hypermodel, max_epochs=cfg.training.epochs, factor=cfg.search.hyperband_factor,
                            **common)
    tuner.oracle.max_trials = max_trials  # Hyperband has no trial cap of its own; the base oracle honours it
    return tuner


def project_name(cfg) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.experiment)


def _parent_run(path: Path, splits: run_data.Splits):
    """Id of the search run recorded in `path` when it exists in the current store, else None."""
    if not path.is_file():
        return None
    run_id = path.read_text().strip()
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        logger.warning("search run %s (from %s) is not in %s: starting a new MLflow run for this search.",
                       run_id, path, store.tracking_uri())
        return None
    recorded = run.data.params.get("data.fingerprint")
    if recorded not in (None, splits.identity["data.fingerprint"]):
        raise run_config.ConfigError(
            f"the search in {path.parent} was run on other data (fingerprint {recorded}, now "
            f"{splits.identity['data.fingerprint']}); pass another --directory or delete {path.parent}.")
    return run_id


def search(cfg: run_config.RunConfig, max_trials: int | None = None, directory=None, callbacks=(),
           verbose: int = 0) -> dict:
    """Run (or resume) the search of `cfg`; returns {"run_id", "best_trial", "best_value", "scores", ...}."""
    store.configure()
    experiment = store.experiment_id(cfg.experiment)
    splits = run_data.load(cfg.data)
    keras.utils.set_random_seed(cfg.data.seed)
    directory = Path(directory or cfg.search.directory or store.REPO / "outputs" / "tuning")
    max_trials = max_trials or cfg.search.max_trials
    tuner = make_tuner(cfg, SCMixHyperModel(cfg, splits), directory, max_trials)
    run_file = Path(tuner.project_dir) / PARENT_RUN_FILE
    parent_id = _parent_run(run_file, splits)
    name = f"search {project_name(cfg)} ({cfg.search.algorithm})"
    with store.start_run(run_id=parent_id, experiment_id=None if parent_id else experiment,
                         run_name=None if parent_id else name) as parent:
        if parent_id is None:
            tracked.log_context(cfg, splits)
            mlflow.log_params({"search.algorithm": cfg.search.algorithm, "search.directory": str(directory),
                               "search.objective": OBJECTIVE.name})
            tmp = run_file.with_suffix(".tmp")
            tmp.write_text(parent.info.run_id)
            os.replace(tmp, run_file)
        else:
            mlflow.set_tag("search.resumed", "true")
        mlflow.set_tag("search.max_trials", str(max_trials))
        tuner.search(callbacks=list(callbacks), verbose=verbose)
        completed = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
        if not completed:
            raise RuntimeError(f"no trial of the search in {tuner.project_dir} completed; each trial's error is "
                               "in its trial.json file and in the tag 'error' of its MLflow run.")
        best = tuner.oracle.get_best_trials(1)[0]
        registered = cfg.search.registered_model or f"scmix-{project_name(cfg)}"
        recorded = mlflow.get_run(parent.info.run_id).data
        if recorded.tags.get("best_trial") == best.trial_id:  # a finished search run again: nothing new
            scores = {k: v for k, v in recorded.metrics.items() if k.startswith(("test_", "val_final_"))}
        else:
            with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed to predict
                warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
                model = tuner.get_best_models(1)[0]
            mlflow.log_metric("best_val_macro_f1", best.score)
            scores = tracked.log_outputs(model, splits, registered_model=registered)
            mlflow.set_tags({"best_trial": best.trial_id,
                             **{f"best.{k}": str(v) for k, v in best.hyperparameters.values.items()}})
        mlflow.set_tag("n_trials_completed", str(len(completed)))
    return {"run_id": parent.info.run_id, "best_trial": best.trial_id, "best_value": best.score,
            "best_hyperparameters": dict(best.hyperparameters.values), "n_completed": len(completed),
            "registered_model": registered, "project_dir": tuner.project_dir, "scores": scores}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.tune", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="run configuration (TOML) with a [search] table")
    parser.add_argument("--max-trials", type=int, default=None, help="trials in all (default: [search] max_trials)")
    parser.add_argument("--directory", default=None, help="keras-tuner directory (default: outputs/tuning)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a configuration value, e.g. --set training.epochs=3 (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="show keras-tuner's and Keras's progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = run_config.load(args.config, args.set)
    try:
        result = search(cfg, args.max_trials, args.directory, verbose=2 if args.verbose else 0)
    except KeyboardInterrupt:
        raise SystemExit("search interrupted: run the same command again to resume it") from None
    print(f"search run {result['run_id']} in experiment {cfg.experiment!r} of {store.tracking_uri()}")
    print(f"best trial {result['best_trial']} (val_macro_f1 {result['best_value']:.4f}) of "
          f"{result['n_completed']} completed: {result['best_hyperparameters']}")
    print(" ".join(f"{k}={v:.4g}" for k, v in result["scores"].items()))
    print(f"registered as {result['registered_model']!r}")
    if store.uses_default_store():
        print(f"see it with: mlflow ui --backend-store-uri {store.tracking_uri()}")


if __name__ == "__main__":
    main()
