"""Smoke test of experiments/cross_dataset/run.py on the real files (tiny epochs, a few hundred cells)."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tfp_scmix.data import DATA_DIR_ENV

FILES = ["pbmc3k.h5ad", "pbmc_sorted_zheng.h5ad", "kang_ctrl.h5ad", "kang_stim.h5ad"]
ROOT = os.environ.get(DATA_DIR_ENV)
missing = [f for f in FILES if not (ROOT and (Path(ROOT) / f).is_file())]
pytestmark = pytest.mark.skipif(
    bool(missing),
    reason=(
        f"real datasets {missing} not found: set ${DATA_DIR_ENV} to the folder holding them "
        f"(currently {ROOT!r}; ./run test sets it to ../shared/data)"
    ),
)


def test_every_part_runs_and_writes_its_results(tmp_path):
    from experiments.cross_dataset.run import COARSE, main

    argv = [
        "--epochs",
        "2",
        "--unknown-epochs",
        "2",
        "--adapt-epochs",
        "1",
        "--classifier-steps",
        "10",
        "--genes",
        "300",
        "--topics",
        "8",
        "--max-cells",
        "400",
        "--pseudo-label-entropy",
        "1",
        "--left-out",
        "B cells",
        "--unknown-settings",
        "main",
        "inductive",
        "--out",
        str(tmp_path),
        "--no-mlflow",
    ]
    frame = main(argv)
    saved = pd.read_csv(tmp_path / "results.csv")
    assert len(saved) == len(frame)
    transfer = saved[saved.part == "transfer"].set_index("method")
    assert set(transfer.index) == {"tfp_scmix", "tfp_scmix+adapt", "logistic_regression", "linear_svm", "knn_pca"}
    assert transfer.accuracy.between(0, 1).all()
    # Scores are over the sorted set's coarse classes: errors and accuracy agree on 400 cells.
    assert np.allclose(transfer.errors, np.round((1 - transfer.accuracy) * 400))
    assert set(json.loads(transfer.per_class_recall.iloc[0])) == set(COARSE)
    assert transfer.loc[["tfp_scmix", "tfp_scmix+adapt"], "ece"].between(0, 1).all()
    kang = saved[saved.part == "kang"].set_index("method")
    assert {"tfp_scmix", "tfp_scmix+adapt"} <= set(kang.index)
    assert kang.composition_tvd.between(0, 1).all()
    unknown = saved[saved.part == "unknown"]
    assert set(unknown.left_out) == {"B cells"} and set(unknown.setting) == {"main", "inductive"}
    assert set(unknown.score) == {"max_prob", "entropy", "topic_distance"}
    assert unknown.auroc.between(0, 1).all() and (unknown.novel_cells > 0).all()
    assert saved[saved.part == "calibration"].ece.between(0, 1).all()
    for name in [
        "reliability_pbmc_sorted_zheng.png",
        "reliability_pbmc_sorted_zheng_adapted.png",
        "reliability_pbmc3k.png",
    ]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "results.md").read_text()
    assert "tfp_scmix+adapt" in summary and "in-dataset ECE" in summary


def test_running_one_part_again_replaces_only_its_rows(tmp_path, monkeypatch):
    from experiments.cross_dataset import run

    def calibration(args, seed, cache, out):
        return [{"part": "calibration", "method": "tfp_scmix", "seed": seed, "ece": 0.01 * (seed + 1)}]

    def transfer(args, seed, cache, out):
        return [{"part": "transfer", "method": m, "seed": seed, "accuracy": 0.9} for m in ("tfp_scmix", "knn_pca")]

    monkeypatch.setitem(run.PART_FUNCTIONS, "calibration", calibration)
    monkeypatch.setitem(run.PART_FUNCTIONS, "transfer", transfer)
    run.main(["--parts", "transfer", "calibration", "--seeds", "0", "1", "--out", str(tmp_path), "--no-mlflow"])
    run.main(["--parts", "calibration", "--seeds", "2", "--out", str(tmp_path), "--no-mlflow"])
    saved = pd.read_csv(tmp_path / "results.csv")
    assert saved[saved.part == "calibration"].seed.tolist() == [2]
    assert saved[saved.part == "transfer"].seed.tolist() == [0, 0, 1, 1]
    assert "in-dataset ECE: 0.030" in (tmp_path / "results.md").read_text()
