"""Levers around the pooled call, measured with a stand-in classifier: how neighbours are pooled, self-training
of both experts, and the classifiers' regularisation.

    ./run experiments.few_shot.pooled_levers     # the suite's five datasets, seeds 0-4; writes pooled_levers/

`annotate(model, adata, label_key=...)` multiplies the model's per-cell call by a pooled call: the class branch
refitted on the labelled cells' counts summed with their 15 neighbours' (`propagate.pooled_counts`) and applied
to every cell's pooled counts (docs/few_shot.md, "Pooled counts of the neighbours"). As in the round that chose
that rule, class-balanced logistic regression on log1p CP10k stands in for the model (its errors are close to
the model's per-cell call), and the graph is `propagate.knn_graph` of the genes' 30 principal components
(`annotate`'s also reads X_scmix). Splits, genes and the main setting are the suite's (`run.py`).

Columns (errors on the test cells; `*_pooled` the pooled call alone, `*_product` its product with the per-cell
call, the call's form):
- `base`: the rule of `annotate`: the symmetrised 15-neighbour graph plus the cell itself, each weight 1.
- `mutual`: only neighbours that have each other among their 15 (a stricter graph).
- `snn`: shared-nearest-neighbour weights (the Jaccard index of two cells' neighbour sets, Seurat's graph).
- `gauss`: weights exp(-d^2 / sigma^2), sigma the cell's distance to its 15th neighbour (scanpy's "gauss").
- `two_hop`: the row-normalised graph applied twice (neighbours of neighbours, MAGIC's diffusion with t=2).
- `label_aware`: the labelled cells' pools keep only the neighbours whose per-cell call is the cell's label
  (cleaner training pools); every other cell pools as `base`.
- `self_trained_0.9`, `self_trained_0.99`: both classifiers fitted again on the labelled cells plus the
  unlabelled cells whose `base_product` probability is at least that, labelled with its call.
- `self_trained_quarter`: the same with the most confident quarter of the cells of each called class.
- `self_trained_weighted`: every unlabelled cell with its call, weighted by its probability to the fourth power.
- `C_0.1`, `C_10`: both classifiers with the inverse regularisation C of scikit-learn's logistic regression at
  0.1 and 10 (the peers' and `base`'s C is 1).

Writes results.csv (one row per dataset and seed) and summary.md (means per dataset, totals, and the number of
dataset-seeds on which each product has fewer and more errors than `base_product`).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from experiments.common import log_normalised, markdown_table, most_variable
from experiments.few_shot.run import stand_in_main, test_size
from tfp_scmix import propagate
from tfp_scmix.evaluate import few_shot_split

HERE = Path(__file__).parent / "pooled_levers"
BUDGET = 150
K = propagate.N_NEIGHBORS


def pooling_weights(features: np.ndarray, k: int = K) -> dict[str, sp.csr_matrix]:
    """{name: `[n_cells, n_cells]` weights of the cells summed into each cell's pooled counts} for the graph
    variants of the module docstring (each includes the cell itself)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(features)
    distance, index = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    distance, index = distance[:, 1:], index[:, 1:]
    rows = np.repeat(np.arange(n), k)
    nearest = sp.csr_matrix((np.ones(n * k), (rows, index.ravel())), shape=(n, n))
    eye = sp.identity(n, format="csr")
    symmetric = nearest.maximum(nearest.T)
    base = sp.csr_matrix(symmetric + eye)
    with_self = nearest + eye
    shared = sp.csr_matrix((with_self @ with_self.T).multiply(base))
    shared.data = shared.data / (2 * (k + 1) - shared.data)  # Jaccard index of the two neighbour sets
    sigma = distance[:, -1:] + 1e-12
    gauss = sp.csr_matrix((np.exp(-((distance / sigma) ** 2)).ravel(), (rows, index.ravel())), shape=(n, n))
    step = sp.diags(1.0 / np.asarray(base.sum(axis=1)).ravel()) @ base
    return {
        "base": base,
        "mutual": sp.csr_matrix(nearest.minimum(nearest.T) + eye),
        "snn": shared,
        "gauss": sp.csr_matrix(gauss.maximum(gauss.T) + eye),
        "two_hop": sp.csr_matrix(step @ step),
    }


def label_aware(base: sp.csr_matrix, labelled: np.ndarray, labels: np.ndarray, calls: np.ndarray) -> sp.csr_matrix:
    """`base` with each labelled cell's row keeping only itself and the neighbours whose call is its label."""
    weights = sp.lil_matrix(base)
    for cell, label in zip(labelled, labels, strict=True):
        neighbours = np.asarray(weights.rows[cell])
        keep = neighbours[(calls[neighbours] == label) | (neighbours == cell)]
        weights.rows[cell] = keep.tolist()
        weights.data[cell] = [1.0] * len(keep)
    return sp.csr_matrix(weights)


def one_split(full, name: str, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    test, labelled = few_shot_split(full.n_cells, test_size(name, full.n_cells, BUDGET), BUDGET, seed)
    data = most_variable(full, 2000, cells=np.arange(full.n_cells))
    n, n_classes, truth = data.n_cells, data.n_classes, data.labels[test]
    known = data.labels[labelled]
    counts = sp.csr_matrix(data.counts).astype(np.float64)
    x = log_normalised(counts)

    def fitted(train, labels, apply, weight=None, inverse_regularisation=1.0):
        classifier = LogisticRegression(max_iter=5000, C=inverse_regularisation, class_weight="balanced")
        classifier.fit(train, labels, sample_weight=weight)
        probs = np.zeros((apply.shape[0], n_classes))
        probs[:, classifier.classes_] = classifier.predict_proba(apply)
        return probs

    def errors(probs):
        return int((probs[test].argmax(axis=1) != truth).sum())

    per_cell = fitted(x[labelled], known, x)
    weights = pooling_weights(propagate.principal_components(data.counts, seed=seed))
    weights["label_aware"] = label_aware(weights["base"], labelled, known, per_cell.argmax(axis=1))
    row = {"dataset": name, "seed": seed, "per_cell": errors(per_cell)}
    for variant, pool in weights.items():
        apply = weights["base"] if variant == "label_aware" else pool  # label_aware changes the training pools only
        pooled = fitted(log_normalised(pool[labelled] @ counts), known, log_normalised(apply @ counts))
        row[f"{variant}_pooled"] = errors(pooled)
        row[f"{variant}_product"] = errors(propagate.product_of_experts(per_cell, pooled))

    pooled_x = log_normalised(weights["base"] @ counts)
    first = propagate.product_of_experts(per_cell, fitted(pooled_x[labelled], known, pooled_x))
    unlabelled = np.setdiff1d(np.arange(n), labelled)
    calls, confidence = first.argmax(axis=1), first.max(axis=1)

    def both_experts(cells, weight=None, inverse_regularisation=1.0):
        labels = np.concatenate([known, calls[cells]])
        cells = np.concatenate([labelled, cells])
        weight = None if weight is None else np.concatenate([np.ones(len(labelled)), weight])
        return propagate.product_of_experts(
            fitted(x[cells], labels, x, weight, inverse_regularisation),
            fitted(pooled_x[cells], labels, pooled_x, weight, inverse_regularisation),
        )

    for threshold in (0.9, 0.99):
        row[f"self_trained_{threshold}_product"] = errors(both_experts(unlabelled[confidence[unlabelled] >= threshold]))
    quarter = [
        unlabelled[mine[np.argsort(-confidence[unlabelled][mine])[: max(1, len(mine) // 4)]]]
        for mine in (np.flatnonzero(calls[unlabelled] == c) for c in range(n_classes))
        if len(mine)
    ]
    row["self_trained_quarter_product"] = errors(both_experts(np.concatenate(quarter)))
    row["self_trained_weighted_product"] = errors(both_experts(unlabelled, confidence[unlabelled] ** 4))
    for inverse_regularisation in (0.1, 10):
        row[f"C_{inverse_regularisation}_product"] = errors(
            both_experts(np.array([], int), inverse_regularisation=inverse_regularisation)
        )
    return row


def summary(frame: pd.DataFrame) -> str:
    means = frame.drop(columns="seed").groupby("dataset", sort=False).mean().round(1).T
    means["total"] = frame.drop(columns=["dataset", "seed"]).sum()
    products = [c for c in frame.columns if c.endswith("_product") and c != "base_product"]
    means["fewer / more than base_product (dataset-seeds)"] = [
        f"{int((frame[c] < frame['base_product']).sum())} / {int((frame[c] > frame['base_product']).sum())}"
        if c in products
        else ""
        for c in means.index
    ]
    return "\n".join(
        [
            "# Levers around the pooled call (written by `./run experiments.few_shot.pooled_levers`)",
            "",
            f"Errors on each dataset's test cells (the suite's splits and genes, main setting), means over seeds "
            f"{sorted(frame.seed.unique().tolist())}, and totals over every dataset and seed. Class-balanced "
            "logistic regression stands in for the model; the columns are described in the script's docstring. "
            "'base_product' is the rule `annotate` uses with known labels.",
            "",
            markdown_table(means.reset_index(names="variant")),
            "",
        ]
    )


def main(argv=None):
    return stand_in_main(argv, __doc__, one_split, summary, HERE)


if __name__ == "__main__":
    main()
