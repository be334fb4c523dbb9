"""Levers around `annotate`'s product of a per-cell classifier and label spreading: class-balanced seeds for the
spreading, and a per-cell classifier refitted on the product's confident calls (self-training).

    ./run experiments.few_shot.balanced_spreading     # the suite's five datasets, seeds 0-4; writes balanced_spreading/

`annotate` with known labels multiplies the model's probabilities by those of label spreading over a kNN graph
(`tfp_scmix.propagate.with_known_labels`). The refit weighs the classes equally (`Config.balanced_classes`), so
this experiment asks whether the spreading should too. Here each known label starts with weight n / (k n_c), the
same weights as the refit, instead of 1. It uses no model: the per-cell classifier is class-balanced logistic
regression on log1p CP10k, whose errors are close to the model's per-cell call (docs/few_shot.md). The graph is
`propagate.knn_graph` of the genes' 30 principal components (`propagate.principal_components`). Splits, genes
and the main setting are the suite's (`run.py`). docs/few_shot.md gives the decision and its reasons.

The second lever: the classifier fitted again, on the labelled cells and on the unlabelled cells whose product
probability is at least `CONFIDENT` (labelled with the product's call), then multiplied by the same spreading
("product_self_trained"). It asks whether the product's confident calls teach the per-cell classifier what the
150 labels do not (the self-training of `Config.self_training`, but seeded by the product).

Writes results.csv (errors per dataset and seed of: logistic regression, label spreading, balanced label
spreading, and the three products) and summary.md (means per dataset, totals, and the count of dataset-seeds where
each variant of the product has fewer and more errors than the product).
"""

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import log_normalised, markdown_table, most_variable
from experiments.few_shot.run import stand_in_main, test_size
from tfp_scmix import propagate
from tfp_scmix.evaluate import few_shot_split
from tfp_scmix.model import balanced_class_weights

HERE = Path(__file__).parent / "balanced_spreading"
BUDGET = 150
# The product probability from which an unlabelled cell's call joins the refit (self-training).
CONFIDENT = 0.9


def balanced_spreading(graph, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """`propagate.label_spreading` with each known label weighted n / (k n_c) (scikit-learn's "balanced",
    `model.balanced_class_weights`)."""
    known = np.flatnonzero(labels >= 0)
    seeds = np.zeros((len(labels), n_classes))
    seeds[known, labels[known]] = 1.0
    weights = balanced_class_weights(seeds)  # the refit's weights (Config.balanced_classes)
    spreadout = propagate.spread(graph, seeds * weights, np.array([], int), alpha=propagate.SPREADING_ALPHA)
    total = spreadout.sum(axis=1, keepdims=True)
    return np.where(total > 0, spreadout / np.maximum(total, 1e-300), 1.0 / n_classes)


def one_split(full, name: str, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    test, labelled = few_shot_split(full.n_cells, test_size(name, full.n_cells, BUDGET), BUDGET, seed)
    data = most_variable(full, 2000, cells=np.arange(full.n_cells))
    n_classes, truth = data.n_classes, data.labels[test]
    x = log_normalised(data.counts)

    def fitted(cells, labels):  # balanced logistic regression's probabilities for every cell
        classifier = LogisticRegression(max_iter=3000, class_weight="balanced").fit(x[cells], labels)
        probs = np.zeros((data.n_cells, n_classes))
        probs[:, classifier.classes_] = classifier.predict_proba(x)
        return probs

    per_cell = fitted(labelled, data.labels[labelled])
    graph = propagate.knn_graph(propagate.principal_components(data.counts, seed=seed))
    known = np.full(data.n_cells, -1)
    known[labelled] = data.labels[labelled]
    spreading = propagate.label_spreading(graph, known, n_classes)
    balanced = balanced_spreading(graph, known, n_classes)

    def errors(probs):
        return int((probs[test].argmax(axis=1) != truth).sum())

    def product(a, b):
        joint = np.maximum(a, 1e-12) * np.maximum(b, 1e-12)
        return joint / joint.sum(axis=1, keepdims=True)

    first = product(per_cell, spreading)
    unlabelled = np.setdiff1d(np.arange(data.n_cells), labelled)
    confident = unlabelled[first[unlabelled].max(axis=1) >= CONFIDENT]
    refit = fitted(np.concatenate([labelled, confident]), np.concatenate([known[labelled], first[confident].argmax(1)]))
    return {
        "dataset": name,
        "seed": seed,
        "logistic_regression_balanced": errors(per_cell),
        "label_spreading": errors(spreading),
        "label_spreading_balanced_seeds": errors(balanced),
        "product": errors(product(per_cell, spreading)),
        "product_balanced_seeds": errors(product(per_cell, balanced)),
        "product_self_trained": errors(product(refit, spreading)),
    }


def summary(frame: pd.DataFrame) -> str:
    means = frame.drop(columns="seed").groupby("dataset", sort=False).mean().round(1).reset_index()
    totals = frame.drop(columns=["dataset", "seed"]).sum()
    counts = [
        f"The product {words} has fewer errors than the product on {int((frame[variant] < frame['product']).sum())} "
        f"and more on {int((frame[variant] > frame['product']).sum())} of {len(frame)} dataset-seeds."
        for variant, words in (
            ("product_balanced_seeds", "with balanced seeds"),
            ("product_self_trained", "self-trained"),
        )
    ]
    return "\n".join(
        [
            "# Levers around the product (written by `./run experiments.few_shot.balanced_spreading`)",
            "",
            f"Errors on each dataset's test cells, means over seeds {sorted(frame.seed.unique().tolist())} (the "
            "suite's splits and genes, main setting). 'product': balanced logistic regression's probabilities times "
            "label spreading's, as `annotate` combines the model's with label spreading's; 'balanced_seeds': the "
            "spreading's known labels weighted n / (k n_c); 'self_trained': the classifier fitted again with the "
            f"unlabelled cells the product calls with probability at least {CONFIDENT}.",
            "",
            markdown_table(means),
            "",
            "Totals over every dataset and seed: " + ", ".join(f"{k} {int(v)}" for k, v in totals.items()) + ".",
            "",
            *counts,
            "",
        ]
    )


def main(argv=None):
    return stand_in_main(argv, __doc__, one_split, summary, HERE)


if __name__ == "__main__":
    main()
