"""Record a benchmark's results table as MLflow runs, beside the tracked runs of the same experiment.

    python -m training.record experiments/few_shot/results.csv [--experiment few_shot]

One run per row (CSV, or JSON as a list of records). Text columns (`method`, `dataset`, `setting`) and the
identifiers `seed` and `labels` become parameters; other numeric columns become metrics, the scores named
`test_errors`, `test_accuracy`, `test_macro_f1` as a tracked run names its test scores, so that `mlflow ui`
shows the peers and tfp_scmix's runs side by side. Importing the same file again adds no duplicate runs.
"""

import argparse
import hashlib
from pathlib import Path

import mlflow
import pandas as pd

from training import store

KEY_TAG = "record.key"
IDENTIFIERS = ("seed", "labels")  # numeric columns that say which run a row is, not how well it did
SCORES = ("errors", "accuracy", "macro_f1")  # logged as test_<score>


def read_table(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results table {path} not found; run the benchmark that writes it first.")
    frame = pd.read_json(path) if path.suffix == ".json" else pd.read_csv(path)
    if "method" not in frame.columns:
        raise ValueError(
            f"{path} has no 'method' column (columns: {list(frame.columns)}); each row must name the method it scores."
        )
    return frame


def record(path, experiment: str = "few_shot") -> list:
    """Log each row of the results table at `path` as a run of `experiment`; returns the new runs' ids."""
    frame = read_table(path)
    store.configure()
    experiment_id = store.experiment_id(experiment)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    new = []
    for index, row in frame.iterrows():
        key = f"{digest}:{index}"
        if mlflow.search_runs(
            [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", output_format="list", max_results=1
        ):
            continue
        params = {
            name: value for name, value in row.items() if name in IDENTIFIERS or not pd.api.types.is_number(value)
        }
        metrics = {
            f"test_{name}" if name in SCORES else name: float(value)
            for name, value in row.items()
            if name not in params and pd.notna(value)
        }
        run_name = " ".join(str(params[k]) for k in ("method", "dataset") if k in params)
        if "seed" in params:
            run_name += f" seed {params['seed']}"
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags={KEY_TAG: key, "record.source": str(path)}
        ) as run:
            mlflow.log_params(params)
            mlflow.log_metrics(metrics)
        new.append(run.info.run_id)
    return new


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.record", description=__doc__.split("\n")[0])
    parser.add_argument("results", help="results table (CSV or JSON records) with a 'method' column")
    parser.add_argument("--experiment", default="few_shot", help="MLflow experiment (default: few_shot)")
    args = parser.parse_args(argv)
    new = record(args.results, args.experiment)
    print(f"{len(new)} new run(s) in experiment {args.experiment!r} of {store.tracking_uri()}")


if __name__ == "__main__":
    main()
