"""training/record.py: a benchmark's results table recorded as MLflow runs, once."""

import pandas as pd

from training import record


def test_record_peers_once(tracking, tmp_path):
    table = tmp_path / "results.csv"
    pd.DataFrame(
        {
            "method": ["knn", "logreg"],
            "dataset": ["pbmc3k", "pbmc3k"],
            "setting": ["main", "main"],
            "labels": [150, 150],
            "seed": [0, 0],
            "errors": [190, 201],
            "accuracy": [0.905, 0.8995],
            "seconds": [1.5, 2.0],
        }
    ).to_csv(table, index=False)
    assert len(record.record(table, "peers")) == 2
    assert record.record(table, "peers") == []  # importing again adds nothing
    runs = tracking.search_runs([tracking.get_experiment_by_name("peers").experiment_id])
    knn = next(r for r in runs if r.data.params["method"] == "knn")
    assert knn.data.params == {"method": "knn", "dataset": "pbmc3k", "setting": "main", "labels": "150", "seed": "0"}
    assert knn.data.metrics == {"test_errors": 190.0, "test_accuracy": 0.905, "seconds": 1.5}
