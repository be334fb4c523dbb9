"""Smoke test of experiments/cross_dataset/run.py on the real files (tiny epochs, a few hundred cells)."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tfp_scmix.data import DATA_DIR_ENV

FILES = ["pbmc3k.h5ad", "pbmc_sorted_zheng.h5ad", "pbmc68k_reduced.h5ad", "kang_ctrl.h5ad", "kang_stim.h5ad"]
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
    from experiments.cross_dataset.run import main

    argv = [
        "--pairs",
        "pbmc3k -> pbmc_sorted_zheng",
        "pbmc3k+pbmc_sorted_zheng -> pbmc68k_reduced",
        "--methods",
        "tfp_scmix",
        "tfp_scmix+adapt",
        "tfp_scmix+smooth",
        "logistic_regression",
        "linear_svm",
        "knn_pca",
        "--restarts",
        "1",
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
        "--smooth-alpha",
        "0.9",
        "--out",
        str(tmp_path),
        "--no-mlflow",
    ]
    frame = main(argv)
    saved = pd.read_csv(tmp_path / "results.csv")
    assert len(saved) == len(frame)
    transfer = saved[saved.part == "transfer"]
    assert set(transfer.pair) == {"pbmc3k -> pbmc_sorted_zheng", "pbmc3k+pbmc_sorted_zheng -> pbmc68k_reduced"}
    assert set(transfer.method) == {
        "tfp_scmix",
        "tfp_scmix+adapt",
        "tfp_scmix+smooth",
        "tfp_scmix+smooth(alpha=0.9)",
        "logistic_regression",
        "linear_svm",
        "knn_pca",
    }
    assert transfer.accuracy.between(0, 1).all() and transfer.macro_f1.between(0, 1).all()
    # Scores are over the target cells whose coarse class the source has: errors and accuracy agree.
    assert np.allclose(transfer.errors, np.round((1 - transfer.accuracy) * transfer.cells))
    one = transfer[transfer.pair == "pbmc3k -> pbmc_sorted_zheng"]
    assert set(json.loads(one.per_class_recall.iloc[0])) == {"B", "CD4 T", "CD8 T", "NK", "Myeloid"}
    assert (one.unmatched_cells == 0).all()  # every sorted population has a pbmc3k counterpart
    model = transfer[transfer.method.str.startswith("tfp_scmix")]
    assert model.ece.between(0, 1).all() and model.flagged_matched.between(0, 1).all()
    # pbmc68k_reduced's CD34+ cells have no counterpart in the sources: the novelty rule is scored on them.
    assert model[model.multi_source].novelty_auroc.between(0, 1).all()
    assert (tmp_path / "transfer_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert set(pd.read_csv(tmp_path / "transfer_confusion.csv").pair) == set(transfer.pair)
    kang = saved[saved.part == "kang"].set_index("method")
    assert {"tfp_scmix", "tfp_scmix+adapt"} <= set(kang.index)
    assert kang.composition_tvd.between(0, 1).all()
    unknown = saved[saved.part == "unknown"]
    assert set(unknown.left_out) == {"B cells"} and set(unknown.setting) == {"main", "inductive"}
    assert set(unknown.score) == {"max_prob", "entropy", "topic_distance"}
    assert unknown.auroc.between(0, 1).all() and (unknown.novel_cells > 0).all()
    assert saved[saved.part == "calibration"].ece.between(0, 1).all()
    assert (tmp_path / "reliability_pbmc3k.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "results.md").read_text()
    assert "Coarse accuracy of tfp_scmix+adapt: rows source, columns target" in summary
    assert "in-dataset ECE" in summary and "adapt: mean accuracy gain" in summary


def test_running_one_part_again_replaces_only_its_rows(tmp_path, monkeypatch):
    from experiments.cross_dataset import run

    def calibration(args, seed, cache, out):
        yield [{"part": "calibration", "method": "tfp_scmix", "seed": seed, "ece": 0.01 * (seed + 1)}]

    def kang(args, seed, cache, out):
        yield [{"part": "kang", "method": m, "seed": seed, "composition_tvd": 0.1} for m in ("tfp_scmix", "knn_pca")]

    monkeypatch.setitem(run.PART_FUNCTIONS, "calibration", calibration)
    monkeypatch.setitem(run.PART_FUNCTIONS, "kang", kang)
    run.main(["--parts", "kang", "calibration", "--seeds", "0", "1", "--out", str(tmp_path), "--no-mlflow"])
    run.main(["--parts", "calibration", "--seeds", "2", "--out", str(tmp_path), "--no-mlflow"])
    saved = pd.read_csv(tmp_path / "results.csv")
    assert saved[saved.part == "calibration"].seed.tolist() == [2]
    assert saved[saved.part == "kang"].seed.tolist() == [0, 0, 1, 1]
    assert "in-dataset ECE: 0.030" in (tmp_path / "results.md").read_text()
    # A run of a part without the ece column (the kang part here; a transfer run of a peer alone, as scANVI's runs
    # are, crashed after writing results.csv) into a folder of its own writes its summary.
    run.main(["--parts", "kang", "--seeds", "0", "--out", str(tmp_path / "kang"), "--no-mlflow"])
    assert "in-dataset ECE" not in (tmp_path / "kang" / "results.md").read_text()


def test_a_matrix_run_replaces_only_the_seeds_pairs_and_methods_it_measures():
    from experiments.cross_dataset import run

    args = run.build_parser().parse_args(
        ["--parts", "transfer", "--seeds", "1", "--pairs", "pbmc3k -> pbmc_sorted_zheng", "--methods", "knn_pca"]
    )
    pair, other = "pbmc3k -> pbmc_sorted_zheng", "pbmc3k -> pbmc68k_reduced"
    kept = pd.DataFrame(
        [
            ("transfer", pair, "knn_pca", 1),  # measured again
            ("transfer", pair, "knn_pca", 0),  # another seed
            ("transfer", pair, "tfp_scmix", 1),  # another method
            ("transfer", other, "knn_pca", 1),  # another pair
            ("transfer", np.nan, "knn_pca", 0),  # the one-pair benchmark before the matrix
            ("kang", np.nan, "knn_pca", 1),  # a part not run
        ],
        columns=["part", "pair", "method", "seed"],
    )
    assert run.replaced(kept, ["transfer"], args).tolist() == [True, False, False, False, True, False]


def test_scores_count_no_counterpart_calls_as_errors_and_leave_unmatched_cells_out():
    from experiments.cross_dataset.matrix import scores

    # The source names B, T and Mk; the target has B, T and CD34+ (which the source cannot name) but no Mk.
    truth = np.array(["B", "B", "T", "T", "CD34+", "CD34+"], dtype=object)
    predicted = np.array(["B", "Mk", "T", "B", "T", "B"], dtype=object)
    novelty = np.array([0.1, 0.99, 0.2, 0.3, 0.97, 0.4])
    out = scores(truth, predicted, ["B", "T", "Mk"], flagged=novelty > 0.95, novelty=novelty)
    assert (out["cells"], out["errors"], out["unmatched_cells"]) == (4, 2, 2)
    assert out["accuracy"] == 0.5 and out["no_counterpart"] == 0.25
    assert out["flagged_no_counterpart"] == 1.0 and out["flagged_unmatched"] == 0.5 and out["flagged_matched"] == 0.25
    assert out["novelty_auroc"] == 0.75  # unmatched (0.97, 0.4) against matched (0.1, 0.99, 0.2, 0.3)
    assert set(json.loads(out["per_class_recall"])) == {"B", "T"}  # Mk is not in the target
