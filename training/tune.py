"""A tracked search over the package's settings: `python -m training.tune CONFIG.toml [--max-trials N]`.

keras-tuner (Bayesian optimization or Hyperband) maximises the validation macro-F1 of the model the package
ships, the `SCMixEnsemble` that `tfp_scmix.train` returns (restarts included), over the ranges in the
configuration's [search.space] (any `tfp_scmix.Config` setting, and restarts). The search is one MLflow
run; each trial is a run nested under it, which trains with `training.run.fit` and saves its ensemble
in its keras-tuner trial folder. At the end the best trial's ensemble is loaded, scored on the test
cells, logged and registered in the MLflow model registry. Run the same command again to resume a
stopped search: finished trials are kept and an interrupted one starts over.
"""

import argparse
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import keras_tuner as kt
import mlflow

import tfp_scmix as scm
from training import config as run_config
from training import data as run_data
from training import run as tracked
from training import store
from training.callbacks import classification_scores, predict_labels

logger = logging.getLogger("training")
OBJECTIVE = kt.Objective("val_macro_f1", direction="max")
PARENT_RUN_FILE = "mlflow_run_id"
MODEL_FILE = "scmix.keras"  # each trial's trained ensemble, in its trial folder


class SCMixHyperModel(kt.HyperModel):
    """The search space of a run configuration (its [search.space]) over the package's recipe.

    keras-tuner's `build` must return a Keras model: it returns the untrained `SCMix` of the drawn
    settings, which keras-tuner only inspects (its size) and hands to `fit`. `fit` trains what the package
    ships, `tfp_scmix.train` with the drawn `Config` and restarts (`training.run.fit`), and returns
    {"val_macro_f1": the ensemble's macro-F1 on the validation cells}.
    """

    def __init__(self, cfg: run_config.RunConfig, splits: run_data.Splits):
        super().__init__(name="scmix", tunable=True)
        self.cfg, self.splits = cfg, splits

    def draw(self, hp) -> run_config.RunConfig:
        """The run configuration with the settings `hp` draws from the space."""
        values = {}
        for name, spec in self.cfg.search.space.items():
            number = run_config.setting_type(name)
            if isinstance(spec, list):
                values[name] = hp.Choice(name, [float(v) for v in spec] if number is float else spec)
            else:
                sampling = "log" if spec.get("log") else "linear"
                numeric = hp.Int if number is int else hp.Float
                values[name] = numeric(name, spec["min"], spec["max"], step=spec.get("step"), sampling=sampling)
        return self.cfg.with_settings(values)

    def trial_config(self, hp, epochs: int | None = None) -> run_config.RunConfig:
        """The run configuration a trial trains: the drawn settings, and Hyperband's `epochs` when it sets them."""
        cfg = self.draw(hp)
        return cfg if epochs is None else cfg.with_settings({"epochs": int(epochs)})

    def build(self, hp):
        return scm.SCMix.from_data(self.splits.train, self.draw(hp).model_config(), seed=self.cfg.data.seed)

    def fit(self, hp, model, *args, callbacks=(), epochs=None, model_path=None, verbose=0, **kwargs):
        """Train the drawn settings with the package's recipe, log them to the active (trial) run, save the
        ensemble at `model_path`; returns {"val_macro_f1": ...}. `model` (keras-tuner's build) is not used;
        `epochs` (Hyperband's budget for the trial) replaces the configured epochs: the trial trains from
        the start, since `tfp_scmix.train` does not continue another trial's models."""
        cfg = self.trial_config(hp, epochs)
        mlflow.log_params(trial_params(cfg))
        # keras-tuner adds its own callbacks: SaveBestEpoch would save the weights of one restart's best
        # epoch, not the ensemble the recipe returns (saved below); TunerCallback forwards to hooks that
        # these tuners leave empty.
        callbacks = [c for c in callbacks if not type(c).__module__.startswith("keras_tuner")]
        ensemble = tracked.fit(cfg, self.splits, callbacks=callbacks, verbose=verbose)
        scores = classification_scores(
            self.splits.validation.labels, predict_labels(ensemble, self.splits.validation), "val_final_"
        )
        mlflow.log_metrics(scores)
        if model_path is not None:
            scm.save_model(ensemble, model_path)
        return {OBJECTIVE.name: scores["val_final_macro_f1"]}


class _TrackedTrials:
    """Each trial inside an MLflow run nested under the active (search) run; its model is the ensemble it saved."""

    def model_path(self, trial_id) -> Path:
        return Path(self.get_trial_dir(trial_id)) / MODEL_FILE

    def run_trial(self, trial, *args, **kwargs):
        parent = mlflow.active_run()
        with store.start_run(
            run_name=f"trial {trial.trial_id}",
            nested=True,
            experiment_id=parent.info.experiment_id,
            tags={"trial_id": trial.trial_id, "search": parent.info.run_name},
        ):
            mlflow.log_params({f"hp.{k}": v for k, v in trial.hyperparameters.values.items()})
            try:
                return super().run_trial(trial, *args, model_path=self.model_path(trial.trial_id), **kwargs)
            except Exception as err:  # keras-tuner records the trial as failed and goes on; say why in MLflow
                mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:4000])
                raise

    def load_model(self, trial):
        """The trained `SCMixEnsemble` of `trial` (what `get_best_models` returns)."""
        return scm.load_model(self.model_path(trial.trial_id))


class BayesianSearch(_TrackedTrials, kt.BayesianOptimization):
    pass


class HyperbandSearch(_TrackedTrials, kt.Hyperband):
    def _build_hypermodel(self, hp):
        # Hyperband loads the weights of the trial a trial continues into the model built for it; each
        # trial here trains the recipe from the start (fit), so that model is built as is.
        return kt.Tuner._build_hypermodel(self, hp)


def make_tuner(cfg: run_config.RunConfig, hypermodel, directory: Path, max_trials: int):
    """The keras-tuner tuner of `cfg`, reloaded from `directory` when a search was started there."""
    # keras-tuner takes seed 0 for "no seed" (a random one): data.seed 0 would make the search unrepeatable.
    common = dict(
        objective=OBJECTIVE,
        directory=str(directory),
        project_name=project_name(cfg),
        overwrite=False,
        seed=cfg.data.seed + 1,
    )
    if cfg.search.algorithm == "bayesian":
        return BayesianSearch(hypermodel, max_trials=max_trials, **common)
    tuner = HyperbandSearch(hypermodel, max_epochs=cfg.training.epochs, factor=cfg.search.hyperband_factor, **common)
    tuner.oracle.max_trials = max_trials  # Hyperband has no trial cap of its own; the base oracle honours it
    return tuner


def project_name(cfg) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.experiment)


def search_params(cfg: run_config.RunConfig) -> dict:
    """The parameters a search's parent run records: every fixed setting (`RunConfig.params`), the algorithm and the
    search space (as JSON). A resumed search must match them (`_parent_run`)."""
    return {
        **cfg.params(),
        "search.algorithm": cfg.search.algorithm,
        "search.space": json.dumps(cfg.search.space, sort_keys=True),
    }


def swept_params(cfg: run_config.RunConfig) -> set[str]:
    """The parameters (`RunConfig.params` keys) that the search's trials set for themselves: those of its space, and
    the epochs under Hyperband (its budget per trial). The search's run does not record them, since the base
    configuration's values are no trial's (a trial found the parent run and its registered model reporting them)."""
    names = set(cfg.search.space) | ({"epochs"} if cfg.search.algorithm == "hyperband" else set())
    return {key for key in cfg.params() if key.rsplit(".", 1)[-1] in names}


def trial_params(cfg: run_config.RunConfig) -> dict:
    """The settings of a trial's configuration (`SCMixHyperModel.trial_config`) as its run records them: the
    `RunConfig.params` other than the data's, which the search's run records."""
    return {k: v for k, v in cfg.params().items() if not k.startswith("data.")}


def _changed_settings(recorded: dict, cfg: run_config.RunConfig) -> list[str]:
    """'name: was X, now Y' for each parameter the parent run recorded that `cfg` sets otherwise. Parameters the run
    did not record (a search started by an older version) are not compared."""
    now = {key: str(value) for key, value in search_params(cfg).items()}  # MLflow records str(value)
    return [
        f"{key}: was {recorded[key]}, now {now[key]}"
        for key in sorted(now)
        if key in recorded and recorded[key] != now[key]
    ]


def _parent_run(path: Path, splits: run_data.Splits, cfg: run_config.RunConfig):
    """Id of the search run recorded in `path` when it exists in the current store, else None.

    Raises ConfigError when that search ran on other data or with other settings: resuming it would mix trials of
    two configurations in one search and one best model."""
    if not path.is_file():
        return None
    run_id = path.read_text().strip()
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        logger.warning(
            "search run %s (from %s) is not in %s: starting a new MLflow run for this search.",
            run_id,
            path,
            store.tracking_uri(),
        )
        return None
    recorded = run.data.params.get("data.fingerprint")
    if recorded not in (None, splits.identity["data.fingerprint"]):
        raise run_config.ConfigError(
            f"the search in {path.parent} was run on other data (fingerprint {recorded}, now "
            f"{splits.identity['data.fingerprint']}); pass another --directory or delete {path.parent}."
        )
    changed = _changed_settings(run.data.params, cfg)
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise run_config.ConfigError(
            f"the search in {path.parent} was started with other settings ({shown}). Resuming it would mix trials "
            f"of both in one search: run it with the settings it started with, or pass another --directory for a "
            f"new search."
        )
    return run_id


def search(
    cfg: run_config.RunConfig, max_trials: int | None = None, directory=None, callbacks=(), verbose: int = 0
) -> dict:
    """Run (or resume) the search of `cfg`; returns {"run_id", "best_trial", "best_value", "scores", ...}."""
    store.configure()
    experiment = store.experiment_id(cfg.experiment)
    splits = run_data.load(cfg.data)
    if not splits.validation.n_cells:
        raise run_config.ConfigError(
            f"{cfg.source} [data]: a search scores each trial on validation cells; "
            "set n_validation to 1 or more (e.g. 30)."
        )
    directory = Path(directory or cfg.search.directory or store.REPO / "outputs" / "tuning")
    max_trials = cfg.search.max_trials if max_trials is None else int(max_trials)
    if max_trials < 1:
        raise run_config.ConfigError(f"max_trials must be at least 1, received {max_trials}")
    try:  # before training, as the tracking store is checked (keras-tuner's own error came after a traceback)
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        raise run_config.ConfigError(
            f"cannot write keras-tuner's trials to {directory} ({err.strerror or err}); pass --directory with a "
            "folder you can write to"
        ) from None
    run_file = directory / project_name(cfg) / PARENT_RUN_FILE  # in keras-tuner's project_dir
    parent_id = _parent_run(run_file, splits, cfg)  # before the tuner reloads a search of other settings
    hypermodel = SCMixHyperModel(cfg, splits)
    tuner = make_tuner(cfg, hypermodel, directory, max_trials)
    name = f"search {project_name(cfg)} ({cfg.search.algorithm})"
    with store.start_run(
        run_id=parent_id, experiment_id=None if parent_id else experiment, run_name=None if parent_id else name
    ) as parent:
        if parent_id is None:
            tracked.log_context(cfg, splits, exclude=swept_params(cfg))
            mlflow.log_params(
                {
                    "search.algorithm": cfg.search.algorithm,
                    "search.space": search_params(cfg)["search.space"],
                    "search.directory": str(directory),
                    "search.objective": OBJECTIVE.name,
                }
            )
            tmp = run_file.with_suffix(".tmp")
            tmp.write_text(parent.info.run_id)
            os.replace(tmp, run_file)
        else:
            mlflow.set_tag("search.resumed", "true")
        mlflow.set_tag("search.max_trials", str(max_trials))
        tuner.search(callbacks=list(callbacks), verbose=verbose)
        completed = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
        if not completed:
            raise RuntimeError(
                f"no trial of the search in {tuner.project_dir} completed; each trial's error is "
                "in its trial.json file and in the tag 'error' of its MLflow run."
            )
        best = tuner.oracle.get_best_trials(1)[0]
        registered = cfg.search.registered_model or f"scmix-{project_name(cfg)}"
        recorded = mlflow.get_run(parent.info.run_id).data
        if recorded.tags.get("best_trial") == best.trial_id:  # a finished search run again: nothing new
            scores = {k: v for k, v in recorded.metrics.items() if k.startswith(("test_", "val_final_"))}
        else:
            model = tuner.get_best_models(1)[0]  # the best trial's ensemble, as it saved it
            mlflow.log_metric("best_val_macro_f1", best.score)
            scores = tracked.log_outputs(
                model,
                splits,
                registered_model=registered,
                params=trial_params(
                    hypermodel.trial_config(best.hyperparameters, best.hyperparameters.values.get("tuner/epochs"))
                ),
            )
            mlflow.set_tags(
                {"best_trial": best.trial_id, **{f"best.{k}": str(v) for k, v in best.hyperparameters.values.items()}}
            )
        mlflow.set_tag("n_trials_completed", str(len(completed)))
    return {
        "run_id": parent.info.run_id,
        "best_trial": best.trial_id,
        "best_value": best.score,
        "best_hyperparameters": dict(best.hyperparameters.values),
        "n_completed": len(completed),
        "registered_model": registered,
        "project_dir": tuner.project_dir,
        "scores": scores,
    }


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, received {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.tune", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="run configuration (TOML) with a [search] table")
    parser.add_argument(
        "--max-trials", type=positive, default=None, help="trials in all, at least 1 (default: [search] max_trials)"
    )
    parser.add_argument("--directory", default=None, help="keras-tuner directory (default: outputs/tuning)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a configuration value, e.g. --set training.epochs=3 (repeatable)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="every epoch's loss terms (default: each trial's progress bar)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.directory is not None and Path(args.directory).exists() and not Path(args.directory).is_dir():
        parser.error(f"--directory {args.directory} is a file; name a folder for keras-tuner's trials")
    try:
        cfg = run_config.load(args.config, args.set)
        # verbose 1: keras-tuner's line per trial and tfp_scmix.train's one progress bar per trial
        result = search(cfg, args.max_trials, args.directory, verbose=2 if args.verbose else 1)
    except ValueError as err:  # ConfigError and DataError among them: what is wrong and the fix, in one line
        parser.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:  # 130: the shell's code for Ctrl-C, as tfp-scmix and training.run exit with
        parser.exit(130, "\nsearch interrupted: run the same command again to resume it\n")
    print(f"search run {result['run_id']} in experiment {cfg.experiment!r} of {store.tracking_uri()}")
    print(
        f"best trial {result['best_trial']} (val_macro_f1 {result['best_value']:.4f}) of "
        f"{result['n_completed']} completed: {result['best_hyperparameters']}"
    )
    print(" ".join(f"{k}={v:.4g}" for k, v in result["scores"].items()))
    print(f"registered as {result['registered_model']!r}")
    if store.uses_default_store():
        print(f"see it with: mlflow ui --backend-store-uri {store.tracking_uri()}")


if __name__ == "__main__":
    main()
