"""Evaluation stage: how good and how trustworthy predictions are.

- `few_shot_split` / `scores`: the benchmark protocol's split and its scores (errors, accuracy, macro-F1).
- `expected_calibration_error`: the top-label ECE of Guo et al. (2017) over equal-width confidence bins;
  `reliability_table` / `reliability_diagram`: accuracy against confidence per bin (a PNG, written atomically).
- `unassigned_score`: how unsure the class probabilities are; `unassigned` flags the cells whose score
  exceeds the score's default threshold (`UNASSIGNED_THRESHOLDS`).
- `TopicNovelty`: how far a cell's topic proportions lie from every known class (Mahalanobis distance to
  the nearest class mean, as in Lee et al. 2018): separates unknown cell types far better than the
  probabilities, which stay confident on cells unlike any training cell (measured: docs/cross_dataset.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tfp_scmix.io import atomic_path
from tfp_scmix.novelty import TopicNovelty  # noqa: F401  (its home before the novelty stage; still imported from here)

if TYPE_CHECKING:
    from pathlib import Path

    from numpy.typing import ArrayLike


def few_shot_split(n_cells: int, n_test: int, n_labelled: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark split: `default_rng(seed).permutation` of the cells, the first `n_test` are test cells,
    the next `n_labelled` labelled. Returns (test `[n_test]`, labelled `[n_labelled]`) cell indices.
    Raises ValueError when the two exceed the cells, or either is below 1."""
    if n_test < 1 or n_labelled < 1:
        raise ValueError(f"a split needs test and labelled cells; received {n_test} test and {n_labelled} labelled")
    if n_test + n_labelled > n_cells:
        raise ValueError(f"{n_test} test + {n_labelled} labelled cells exceed the {n_cells} cells")
    order = np.random.default_rng(seed).permutation(n_cells)
    return order[:n_test], order[n_test : n_test + n_labelled]


def scores(true: ArrayLike, predicted: ArrayLike) -> dict[str, float]:
    """Errors (a count, int), accuracy and macro-F1 (scikit-learn's `f1_score(average="macro")`, over the
    classes present in either array) of integer predictions `[n_cells]` against true class ids `[n_cells]`."""
    from sklearn.metrics import f1_score

    true, predicted = np.asarray(true), np.asarray(predicted)
    return {
        "errors": int((true != predicted).sum()),
        "accuracy": float((true == predicted).mean()),
        "macro_f1": float(f1_score(true, predicted, average="macro")),
    }


def linear_peers(data, labelled: ArrayLike, test: ArrayLike, seed: int = 0) -> dict[str, dict[str, float]]:
    """`scores` of the strongest simple peers of the few-shot suite on the same split: scikit-learn's
    LogisticRegression (max_iter 3000), unweighted and with class_weight="balanced", and LinearSVC on
    log1p(counts per 10k) of the `labelled` cells of `data` (an SCData), predicting the `test` cells
    (experiments/few_shot/run.py runs them and the others).
    Returns {"logistic_regression": scores, "logistic_regression_balanced": scores, "linear_svm": scores}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    from tfp_scmix.data import log_normalised

    x = log_normalised(data.counts)
    labelled, test = np.asarray(labelled), np.asarray(test)
    peers = {
        "logistic_regression": LogisticRegression(max_iter=3000),
        "logistic_regression_balanced": LogisticRegression(max_iter=3000, class_weight="balanced"),
        "linear_svm": LinearSVC(random_state=seed),
    }
    return {
        name: scores(data.labels[test], peer.fit(x[labelled], data.labels[labelled]).predict(x[test]))
        for name, peer in peers.items()
    }


def principal_components_peer(data, visible: ArrayLike, seed: int = 0) -> np.ndarray:
    """30 principal components `[n_cells, 30]` of every cell of `data` fitted on the `visible` cells, the
    few-shot suite's peers' recipe (scanpy's tutorial: log1p CP10k, genes scaled and clipped at 10;
    `propagate.principal_components` with max_value=10)."""
    from tfp_scmix.propagate import principal_components

    return principal_components(data.counts, seed=seed, fit_cells=np.asarray(visible), max_value=10)


def knn_peer(pcs: np.ndarray, labels: ArrayLike, labelled: ArrayLike, test: ArrayLike, k: int) -> np.ndarray:
    """scikit-learn's KNeighborsClassifier (k neighbours, at most the labelled cells) on `pcs` of the
    `labelled` cells; returns the `test` cells' predictions."""
    from sklearn.neighbors import KNeighborsClassifier

    labels, labelled = np.asarray(labels), np.asarray(labelled)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(labelled))).fit(pcs[labelled], labels[labelled])
    return knn.predict(pcs[np.asarray(test)])


def label_spreading_peer(
    pcs: np.ndarray, labels: ArrayLike, visible: ArrayLike, labelled: ArrayLike, test: ArrayLike
) -> np.ndarray:
    """scikit-learn's LabelSpreading (kNN graph of 15 neighbours, max_iter 200) on `pcs` of the `visible`
    cells, the `labelled` ones with their labels; returns the `test` cells' predictions (cells outside
    `visible` by the fitted model's kNN rule)."""
    from sklearn.semi_supervised import LabelSpreading

    labels, visible = np.asarray(labels), np.asarray(visible)
    y = np.where(np.isin(visible, labelled), labels[visible], -1)
    spreading = LabelSpreading(kernel="knn", n_neighbors=15, max_iter=200).fit(pcs[visible], y)
    return spreading.predict(pcs[np.asarray(test)])


def graph_peers(data, labelled: ArrayLike, test: ArrayLike, seed: int = 0) -> dict[str, dict[str, float]]:
    """`scores` of the few-shot suite's peers on a graph of 30 principal components of all cells of `data`
    (`principal_components_peer`): kNN with 5 neighbours and label spreading, which uses the unlabelled
    cells as `annotate(..., label_key=...)` does. Returns {"knn_pca_k5": scores, "label_spreading": scores}."""
    everyone = np.arange(data.n_cells)
    pcs = principal_components_peer(data, everyone, seed)
    truth = data.labels[np.asarray(test)]
    return {
        "knn_pca_k5": scores(truth, knn_peer(pcs, data.labels, labelled, test, 5)),
        "label_spreading": scores(truth, label_spreading_peer(pcs, data.labels, everyone, labelled, test)),
    }


UNASSIGNED_SCORES = ("max_prob", "entropy")
# Default score and threshold for flagging a cell as unassigned; see docs/cross_dataset.md for the
# measurements behind the choice.
UNASSIGNED_SCORE = "entropy"
UNASSIGNED_THRESHOLDS = {"max_prob": 0.5, "entropy": 0.5}


def _check(probs: ArrayLike, true: ArrayLike | None = None) -> tuple[np.ndarray, Any]:
    """(probs float64 `[n_cells, n_classes]`, true as an array `[n_cells]`, or None when not given); the second
    is typed Any so that callers which pass `true` need no None check."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be [n_cells, n_classes] with at least two classes, received shape {probs.shape}")
    if true is not None:
        true = np.asarray(true)
        if true.shape != (probs.shape[0],):
            raise ValueError(
                f"true must hold one class id per row of probs ({probs.shape[0]}), received shape {true.shape}"
            )
    return probs, true


def reliability_table(probs: ArrayLike, true: ArrayLike, n_bins: int = 15) -> pd.DataFrame:
    """Per confidence bin: `lower`, `upper`, `cells`, mean `confidence` and `accuracy` of the top class.

    probs: `[n_cells, n_classes]`; true: `[n_cells]` class ids (a cell whose true class the model lacks,
    e.g. -1, counts as wrong). Bins are (lower, upper], equal width on [0, 1]; confidence 0 falls into
    the first. Empty bins have NaN confidence and accuracy. Raises ValueError when probs is not 2-D with
    at least two classes, or true does not hold one class id per row of probs.
    """
    probs, true = _check(probs, true)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    cells = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, n_bins) / cells
        accuracy = np.bincount(index, correct, n_bins) / cells
    return pd.DataFrame(
        {"lower": edges[:-1], "upper": edges[1:], "cells": cells, "confidence": mean_confidence, "accuracy": accuracy}
    )


def expected_calibration_error(probs: ArrayLike, true: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of (cells in bin / cells) * |accuracy - mean confidence|.

    The estimator of Guo et al. (2017, "On calibration of modern neural networks"), with their 15
    equal-width bins as the default. probs: `[n_cells, n_classes]`, true: `[n_cells]` class ids.
    0 means perfectly calibrated; at most 1. Raises ValueError as `reliability_table` does.
    """
    table = reliability_table(probs, true, n_bins)
    filled = table[table.cells > 0]
    return float((filled.cells * (filled.accuracy - filled.confidence).abs()).sum() / filled.cells.sum())


def reliability_diagram(
    probs: ArrayLike, true: ArrayLike, path: str | Path, n_bins: int = 15, title: str | None = None
) -> str | Path:
    """Write a reliability diagram (accuracy and cell count per confidence bin) as a PNG at `path`.

    Written atomically (`tfp_scmix.io.atomic_path`); returns `path` as given. The title shows the ECE
    above `title`. Raises ValueError as `reliability_table` does.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = reliability_table(probs, true, n_bins)
    ece = expected_calibration_error(probs, true, n_bins)
    width = 1.0 / n_bins
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(
        table.lower,
        table.accuracy.fillna(0),
        width=width,
        align="edge",
        edgecolor="black",
        color="tab:blue",
        label="accuracy",
    )
    top.plot(
        table.lower + width / 2,
        table.confidence,
        "_",
        color="tab:red",
        markersize=12,
        markeredgewidth=2,
        label="mean confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    top.set_title(f"{title + chr(10) if title else ''}ECE {ece:.3f} ({int(table.cells.sum())} cells)", fontsize=9)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(table.lower, table.cells, width=width, align="edge", color="grey", edgecolor="black")
    bottom.set(xlabel="confidence (top class probability)", ylabel="cells", yscale="log")
    bottom.set_ylim(bottom=0.5)  # a bin of one cell shows (the automatic limit hid bins under ten; a trial)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def unassigned_score(probs: ArrayLike, score: str = UNASSIGNED_SCORE) -> np.ndarray:
    """`[n_cells]` score in [0, 1] of how unlike every known class a cell is (higher: less sure).

    score="max_prob": 1 - max_c p_c; score="entropy": -sum_c p_c log p_c / log n_classes (0 for a
    one-hot row, 1 for the uniform one). probs: `[n_cells, n_classes]`. Raises ValueError for a score
    outside UNASSIGNED_SCORES or probs that are not `[n_cells, n_classes]` with at least two classes.
    """
    probs, _ = _check(probs)
    if score == "max_prob":
        return 1.0 - probs.max(axis=1)
    if score == "entropy":
        p = np.clip(probs, 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        return np.clip(entropy / np.log(probs.shape[1]), 0.0, 1.0)
    raise ValueError(f"score must be one of {UNASSIGNED_SCORES}, received {score!r}")


def unassigned(probs: ArrayLike, score: str = UNASSIGNED_SCORE, threshold: float | None = None) -> np.ndarray:
    """`[n_cells]` bool: cells whose `unassigned_score` exceeds `threshold` (default: the score's own in
    UNASSIGNED_THRESHOLDS). Raises ValueError as `unassigned_score` does."""
    return unassigned_score(probs, score) > (UNASSIGNED_THRESHOLDS[score] if threshold is None else threshold)
