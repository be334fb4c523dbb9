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
    run.main(common + ["--methods", "tfp_scmix:restarts=1,classifier_steps=100", "logistic_regression"])
    # A second run adds a method: the first run's rows stay, re-measured rows are replaced, not repeated.
    run.main(common + ["--methods", "linear_svm", "logistic_regression"])
    saved = pd.read_csv(tmp_path / "results.csv")
    assert sorted(saved.method) == ["linear_svm", "logistic_regression", "tfp_scmix:restarts=1,classifier_steps=100"]
    assert saved.errors.between(0, 2000).all()
    row = saved.set_index("method").loc["tfp_scmix:restarts=1,classifier_steps=100"]
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
    assert f"]({report.FIGURE})" in text and (tmp_path / report.FIGURE).stat().st_size > 0
    table = report.noise_table(pd.read_csv(tmp_path / "label_noise" / "results.csv"), saved)
    clean = saved.set_index("method").loc["logistic_regression", "errors"]
    assert table.iloc[0].errors_clean == clean and table.iloc[0].seeds == 1


def test_any_h5ad_with_cell_type_runs_by_path_with_the_test_size_rule_and_verdicts(tmp_path):
    import json

    import numpy as np

    from experiments.few_shot import report, run
    from tfp_scmix.data import read_h5ad

    adata = read_h5ad(Path(ROOT) / "baron2016_mouse_pancreas.h5ad")
    adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 500, replace=False))].copy()
    path = tmp_path / "mouse_islets.h5ad"
    adata.write_h5ad(path)
    assert run.test_size(str(path), 500, 150) == 100 and run.test_size("pbmc68k_reduced", 700, 150) == 550
    data = run.suite_dataset(str(path))
    assert data.batch_names == ["mouse1", "mouse2"]  # its batch column becomes the batches
    ours_spec = "tfp_scmix:restarts=1,classifier_steps=100,with_labels=True"
    methods = [ours_spec, "label_spreading", "knn_pca_k5"]
    args = ["--datasets", str(path), "--seeds", "0", "--epochs", "2", "--no-mlflow", "--out", str(tmp_path / "out")]
    run.main(args + ["--methods", *methods])
    saved = pd.read_csv(tmp_path / "out" / "results.csv")
    assert sorted(saved.method) == sorted(methods) and saved.errors.between(0, 100).all()
    ours = saved.set_index("method").loc[ours_spec]
    assert len(json.loads(ours.single_model_errors)) == 1 and 0 <= ours.topics_logistic_errors <= 100
    # with_labels: the call with the known labels is scored; the same model's per-cell call is kept beside it.
    assert 0 <= ours.per_cell_errors <= 100 and json.loads(ours.single_model_errors) == [ours.per_cell_errors]
    lines = report.verdicts(saved, method=ours_spec)
    assert lines[-1].startswith("- Suite (1 datasets)") and "mean error ratio" in lines[-1]


def test_headroom_gives_the_peers_every_training_label(tmp_path):
    """pbmc68k_reduced has no training cell outside its 150 labelled ones (700 cells, 550 test): with "all"
    labels the peers see the same cells and make the same errors; the summary sets them against the suite's
    best peer and the goal's 0.85 x."""
    from experiments.few_shot import headroom

    if not (Path(ROOT) / "pbmc68k_reduced.h5ad").is_file():
        pytest.skip("pbmc68k_reduced.h5ad not found")
    frame = headroom.run(["pbmc68k_reduced"], [0])
    by = frame.set_index(["method", "labels"])
    assert set(frame.n_labelled) == {150} and len(frame) == 2 * len(headroom.METHODS)
    for method in headroom.METHODS:
        assert by.loc[(method, "all"), "errors"] == by.loc[(method, "150"), "errors"]
    suite = pd.DataFrame(
        {"dataset": "pbmc68k_reduced", "setting": "main", "labels": 150, "label_noise": 0.0, "seed": 0}
        | {"method": ["knn_pca_k5", "logistic_regression"], "errors": [100, 120]}
    )
    row = headroom.summary(frame, suite).iloc[0]
    assert row["goal (0.85 x)"] == 85.0 and row["best peer, 150 labels (suite)"] == "knn_pca_k5 100.0"


def test_balanced_spreading_weighs_each_class_alike(tmp_path):
    """Seeds weighted n / (k n_c): with equal classes the same as `label_spreading`; a class of one seed beside
    one of nine spreads with the mass of nine. And one split of pbmc68k_reduced scores every column."""
    import numpy as np

    from experiments.few_shot import balanced_spreading
    from tfp_scmix import propagate

    rng = np.random.default_rng(0)
    graph = propagate.knn_graph(rng.normal(size=(60, 3)), n_neighbors=5)
    equal = np.full(60, -1)
    equal[:10] = np.arange(10) % 2
    np.testing.assert_allclose(
        balanced_spreading.balanced_spreading(graph, equal, 2), propagate.label_spreading(graph, equal, 2)
    )
    rare = np.full(60, -1)
    rare[:10] = [1] + [0] * 9
    plain = propagate.label_spreading(graph, rare, 2)[:, 1].mean()
    assert balanced_spreading.balanced_spreading(graph, rare, 2)[:, 1].mean() > plain
    if not (Path(ROOT) / "pbmc68k_reduced.h5ad").is_file():
        pytest.skip("pbmc68k_reduced.h5ad not found")
    from experiments.few_shot.run import suite_dataset

    row = balanced_spreading.one_split(suite_dataset("pbmc68k_reduced"), "pbmc68k_reduced", 0)
    scores = [v for k, v in row.items() if k not in ("dataset", "seed")]
    assert len(scores) == 6 and all(0 < v < 550 for v in scores)


def test_variants_table_compares_the_dataset_seeds_every_variant_measured():
    """Means per dataset and variant over the dataset-seeds that every variant has, in the variants' order."""
    from experiments.few_shot import report

    def frame(method, errors):
        return pd.DataFrame(
            {
                "method": method,
                "dataset": ["a", "a", "b", "b"],
                "seed": [0, 1, 0, 1],
                "errors": errors,
                "per_cell_errors": [e + 1 for e in errors],
                "macro_f1": 0.5,
            }
        )

    first, second = frame("m", [10, 20, 30, 40]), frame("n", [1, 2, 3, 4]).iloc[:3]  # b seed 1 missing
    table = report.variants_table([("first", first, "m"), ("second", second, "n")])
    assert list(zip(table.dataset, table.variant)) == [("a", "first"), ("a", "second"), ("b", "first"), ("b", "second")]
    assert table["errors with the known labels"].tolist() == [15.0, 1.5, 30.0, 3.0]
    assert table.seeds.tolist() == [2, 2, 1, 1]


def test_a_file_too_small_or_without_cell_types_is_refused_before_training(tmp_path, capsys):
    """A trial's 100- and 250-cell files crashed in scikit-learn (0 test cells; 100 cells even gave 50 labelled
    cells) after the model had trained: now a usage error that names the file and the rule, before any training."""
    from experiments.few_shot.run import main as few_shot
    from tfp_scmix import datasets
    from tfp_scmix.evaluate import few_shot_split

    adata = datasets.pbmc68k_reduced()
    adata[:300].copy().write_h5ad(tmp_path / "small.h5ad")
    renamed = adata[:400].copy()
    renamed.obs = renamed.obs.rename(columns={"cell_type": "celltype"})
    renamed.write_h5ad(tmp_path / "renamed.h5ad")
    for name, message in (
        ("small.h5ad", "has 300 cells: too few for 150 labelled cells"),
        ("renamed.h5ad", "celltype"),
    ):
        with pytest.raises(SystemExit) as exit_:
            few_shot(["--datasets", str(tmp_path / name), "--seeds", "0", "--no-mlflow", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o" / "results.csv").exists()
    with pytest.raises(ValueError, match="needs test and labelled cells"):
        few_shot_split(100, -100, 150, seed=0)


def test_bad_arguments_are_refused_before_any_data_is_read(tmp_path, capsys):
    from experiments.cross_dataset.run import main as cross_dataset
    from experiments.few_shot.run import main as few_shot

    (tmp_path / "afile").write_text("")
    bad = [
        (few_shot, ["--methods", "nosuch"], "no method 'nosuch'; choose among tfp_scmix"),
        (few_shot, ["--methods", "tfp_scmix:bogus=1"], "tfp_scmix has no setting ['bogus']"),
        (few_shot, ["--methods", "linear_svm:C=2"], "linear_svm takes no settings"),
        (few_shot, ["--budgets", "-5"], "--budgets: must be at least 1"),
        (few_shot, ["--label-noise", "1.5"], "--label-noise is a fraction in [0, 1)"),
        (few_shot, ["--out", str(tmp_path / "afile")], "is a file; name a folder"),
        (cross_dataset, ["--max-cells", "-5"], "--max-cells: must be at least 1"),
        (cross_dataset, ["--out", str(tmp_path / "afile")], "is a file; name a folder"),
        (cross_dataset, ["--pairs", "mouse1->mouse2"], "are not pairs of the matrix; choose among"),
    ]
    for main, argv, message in bad:
        with pytest.raises(SystemExit) as exit_:
            main(
                [
                    *argv,
                    "--datasets" if main is few_shot else "--parts",
                    "nosuch_dataset" if main is few_shot else "transfer",
                ]
            )
        assert exit_.value.code == 2 and message in capsys.readouterr().err, (argv, message)


def test_the_figure_draws_both_calls_of_the_default_models_beside_the_peers(tmp_path):
    """figure_rows: the peers of the main table, the call with the known labels and the same models' per-cell call
    (per_cell_errors) on every seed of the pooled run, not the main table's tfp_scmix rows (fewer seeds)."""
    from experiments.few_shot import report

    keys = dict(dataset="d", setting="main", labels=150, label_noise=0.0)
    main = pd.DataFrame(
        [dict(keys, method="linear_svm", seed=s, errors=10 + s) for s in range(3)]
        + [dict(keys, method="scanvi", seed=0, errors=30)]
        + [dict(keys, method="tfp_scmix", seed=0, errors=99)]
    )
    pooled = pd.DataFrame(
        [dict(keys, method=report.WITH_LABELS[1], seed=s, errors=5 + s, per_cell_errors=12 + s) for s in range(3)]
    )
    rows = report.figure_rows(main, pooled)
    means = rows.groupby("method").errors.mean().to_dict()
    assert means == {"linear_svm": 11, "scanvi": 30, "tfp_scmix": 13, report.WITH_LABELS[1]: 6}
    report.errors_figure(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_pooled_levers_pool_each_cell_with_itself_and_its_kind_of_neighbours():
    """The graph variants of pooled_levers: every cell pools itself; mutual neighbours are a subset of the
    default graph; SNN weights are Jaccard indices (the cell itself 1); two hops keep rows summing to one; the
    label-aware pools of labelled cells drop the neighbours called otherwise and leave other cells' pools alone."""
    import numpy as np

    from experiments.few_shot.pooled_levers import label_aware, pooling_weights

    features = np.random.default_rng(0).normal(size=(80, 4))
    weights = pooling_weights(features, k=6)
    base = weights["base"]
    assert set(weights) == {"base", "mutual", "snn", "gauss", "two_hop"}
    for name in ("base", "mutual", "snn", "gauss"):
        np.testing.assert_allclose(weights[name].diagonal(), 1.0, err_msg=name)
    assert (weights["mutual"] - weights["mutual"].multiply(base)).nnz == 0  # mutual within base
    assert weights["mutual"].nnz < base.nnz
    assert 0 < weights["snn"].data.min() and weights["snn"].data.max() <= 1
    np.testing.assert_allclose(np.asarray(weights["two_hop"].sum(axis=1)).ravel(), 1.0)
    calls = np.arange(80) % 2
    labelled, labels = np.array([0, 1]), np.array([0, 0])
    aware = label_aware(base, labelled, labels, calls)
    assert set(aware[1].indices) == {1} | set(base[1].indices[calls[base[1].indices] == 0])
    assert set(aware[0].indices) == set(base[0].indices[calls[base[0].indices] == 0])
    assert (aware[2:] != base[2:]).nnz == 0


def test_report_gives_the_spread_of_single_models_with_the_known_labels():
    """Each restart's own call with the known labels (single_with_labels/): mean, sd and range per dataset, set
    against the best peer of the suite's results on the same seeds only."""
    from experiments.few_shot import report

    main = pd.DataFrame(
        [
            {"dataset": "d", "method": "linear_svm", "seed": 0, "errors": 50},
            {"dataset": "d", "method": "linear_svm", "seed": 1, "errors": 70},
            {"dataset": "d", "method": "knn_pca", "seed": 0, "errors": 55},
            {"dataset": "d", "method": "knn_pca", "seed": 1, "errors": 55},
            {"dataset": "d", "method": "linear_svm", "seed": 3, "errors": 1},  # another seed: not compared
            {"dataset": "d", "method": "tfp_scmix", "seed": 0, "errors": 1},  # not a peer
        ]
    )
    run = pd.DataFrame(
        [
            {
                "dataset": "d",
                "method": "tfp_scmix:with_labels=True",
                "seed": s,
                "errors": e,
                "topics_logistic_errors": 0,
                "single_model_with_labels_errors": json,
            }
            for s, e, json in ((0, 40, "[40, 44, 48]"), (1, 42, "[36, 42, 42]"))
        ]
    )
    lines = report.single_with_labels_lines(main, run)
    table = "\n".join(lines)
    assert "| d | 6 | 42.0 |" in table and "| 36 | 48 | 41.0 | knn_pca 55.0 |" in table
    assert "best peer: 0.764 over 1 datasets; single models ahead of the best peer on average on 1" in table
    assert report.single_with_labels_lines(main, run.drop(columns="single_model_with_labels_errors")) == []
