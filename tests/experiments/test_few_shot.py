"""Smoke test of experiments/few_shot (run.py and report.py) on the real pbmc3k file, with tiny epochs."""

import os
from pathlib import Path

import pandas as pd
import pytest

from tfp_scmix.data import DATA_DIR_ENV

ROOT = os.environ.get(DATA_DIR_ENV)
pytestmark = pytest.mark.skipif(
    not (ROOT and (Path(ROOT) / "pbmc3k.h5ad").is_file()),
    reason=(
        f"pbmc3k.h5ad not found: set ${DATA_DIR_ENV} to the folder holding it (./run test sets it to ../shared/data)"
    ),
)


def test_runs_keep_earlier_rows_and_the_report_scores_noise(tmp_path):
    from experiments.few_shot import report, run

    common = ["--datasets", "pbmc3k", "--seeds", "0", "--epochs", "2", "--no-mlflow", "--out", str(tmp_path)]
    run.main(common + ["--methods", "tfp_scmix:restarts=1", "logistic_regression"])
    # A second run adds a method: the first run's rows stay, re-measured rows are replaced, not repeated.
    run.main(common + ["--methods", "linear_svm", "logistic_regression"])
    saved = pd.read_csv(tmp_path / "results.csv")
    assert sorted(saved.method) == ["linear_svm", "logistic_regression", "tfp_scmix:restarts=1"]
    assert saved.errors.between(0, 2000).all()
    row = saved.set_index("method").loc["tfp_scmix:restarts=1"]
    assert 0 <= row.marker_score <= 1 and 0 <= row["weights_above_0.1"] <= 1
    noise = [
        "--datasets",
        "pbmc3k",
        "--seeds",
        "0",
        "--no-mlflow",
        "--label-noise",
        "0.1",
        "--methods",
        "logistic_regression",
        "--out",
        str(tmp_path / "label_noise"),
    ]
    run.main(noise)
    text = report.report(tmp_path)
    assert "## Main setting" in text and "## Label noise" in text
    table = report.noise_table(pd.read_csv(tmp_path / "label_noise" / "results.csv"), saved)
    clean = saved.set_index("method").loc["logistic_regression", "errors"]
    assert table.iloc[0].errors_clean == clean and table.iloc[0].seeds == 1
