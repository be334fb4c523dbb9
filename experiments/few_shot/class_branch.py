"""Ablation of the classification branch on fixed topics: which prior and which gene term, on the suite's splits.

    ./run experiments.few_shot.class_branch            # four datasets, seeds 0-1; writes class_branch/results.csv

For each dataset and seed (the suite's split, genes and main setting: `run.py`), one model is trained with the
package defaults (one restart). In the "cut" label mode the classification branch never changes the topics,
so each variant below is the same trained model (encoder, topics, batch offsets copied) with a fresh
classification branch of the variant's settings, fitted by `SCMix.fit_classifier` to convergence: a clean
comparison of the branch alone, at the cost of one training per dataset and seed. Beside them, the standing
diagnostic: scikit-learn's LogisticRegression (defaults) on log1p CP10k genes, on the model's topic features
(centred log proportions) and on both. Writes results.csv (one row per dataset, seed, variant) and
summary.md (errors summed over seeds per dataset, and their total) in class_branch/.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

import tfp_scmix as scm
from experiments.common import log_normalised, markdown_table, most_variable, write_text
from experiments.few_shot.run import suite_dataset, test_size
from tfp_scmix.evaluate import few_shot_split, scores
from tfp_scmix.io import write_csv
from tfp_scmix.novelty import log_ratio_features

HERE = Path(__file__).parent / "class_branch"
DATASETS = ["pbmc3k", "pbmc68k_reduced", "pbmc_sorted_zheng", "baron2016_mouse_pancreas"]
# Config settings per variant ("default": the package's); each branch is fitted afresh on the same topics.
VARIANTS = {
    "default": {},
    "topics only": {"classifier_genes": False},
    "prior=normal": {"prior": "normal"},
    "prior=normal, topics only": {"prior": "normal", "classifier_genes": False},
    "prior=santa_barbara": {"prior": "santa_barbara"},
    "gene_prior_scale=0.3": {"gene_prior_scale": 0.3},
    "gene_prior_scale=3": {"gene_prior_scale": 3.0},
}


def with_branch(trained, train, settings):
    """A model of `settings` whose encoder, topics and batch offsets are those of `trained`, its classification
    branch fitted afresh on the labelled cells of `train`."""
    model = scm.SCMix.from_data(train, trained.config.replace(**settings), seed=trained.seed)
    for name in ("encoder", "topics", "batch_offsets"):
        getattr(model, name).set_weights(getattr(trained, name).get_weights())
    model.fit_classifier(train)
    return model


def logistic(x, labelled, labels):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=3000).fit(x[labelled], labels[labelled]).predict(x)


def run(datasets, seeds, out=HERE):
    rows = []
    for name in datasets:
        full = suite_dataset(name)
        for seed in seeds:
            test, labelled = few_shot_split(full.n_cells, test_size(name, full.n_cells, 150), 150, seed)
            data = most_variable(full, 2000)
            train = data.hide_labels(labelled)
            trained = scm.train(train, restarts=1, seed=seed * 100, verbose=0).members[0]
            truth = data.labels[test]
            predictions = {}
            for variant, settings in VARIANTS.items():
                start = time.time()
                model = with_branch(trained, train, settings)
                predictions[variant] = (scm.predict(model, data.subset(test))["label"], time.time() - start)
            genes = log_normalised(data.counts)
            topics = log_ratio_features(scm.predict(trained, data)["cell_topic"])
            for variant, x in (
                ("logistic regression: genes", genes),
                ("logistic regression: topic features", topics),
                ("logistic regression: genes + topic features", np.hstack([genes.toarray(), topics])),
            ):
                start = time.time()
                predictions[variant] = (logistic(x, labelled, data.labels)[test], time.time() - start)
            for variant, (predicted, seconds) in predictions.items():
                row = {"dataset": name, "seed": seed, "variant": variant, **scores(truth, predicted)}
                rows.append({**row, "seconds": round(seconds, 1), "settings": json.dumps(VARIANTS.get(variant))})
                print(f"{name} seed {seed} {variant:<45} errors {row['errors']:4d}", flush=True)
            write_csv(pd.DataFrame(rows), out / "results.csv")
    frame = pd.DataFrame(rows)
    write_summary(frame, out / "summary.md")
    return frame


def write_summary(frame, path):
    """Errors summed over seeds per dataset and variant, the total over datasets, and mean macro-F1."""
    errors = frame.pivot_table(index="variant", columns="dataset", values="errors", aggfunc="sum", sort=False)
    errors["total"] = errors.sum(axis=1)
    errors["mean macro-F1"] = frame.groupby("variant", sort=False)["macro_f1"].mean().round(3)
    seeds = sorted(int(seed) for seed in frame["seed"].unique())
    text = (
        "# Classification branch ablation on fixed topics\n\n"
        f"Errors summed over seeds {seeds} (one trained model per dataset and seed; written by "
        "`./run experiments.few_shot.class_branch`, see its docstring).\n\n"
        + markdown_table(errors.reset_index())
        + "\n"
    )
    write_text(path, text)
    print(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)
    run(args.datasets, args.seeds, Path(args.out))


if __name__ == "__main__":
    main()
