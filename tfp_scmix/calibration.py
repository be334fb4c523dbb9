"""Calibration and unknown cell types: how far the class probabilities can be trusted.

- `expected_calibration_error`: the top-label ECE of Guo et al. (2017) over equal-width confidence bins.
- `reliability_diagram`: accuracy against confidence per bin, as a PNG (written atomically).
- `unassigned_score`: how strongly a cell looks like none of the model's classes; `unassigned` flags the
  cells whose score exceeds the score's default threshold (`UNASSIGNED_THRESHOLDS`).
"""

import numpy as np
import pandas as pd

from tfp_scmix.io import atomic_path

UNASSIGNED_SCORES = ("max_prob", "entropy")
# Default score and threshold for flagging a cell as unassigned; see docs/cross_dataset.md for the
# measurements behind the choice.
UNASSIGNED_SCORE = "entropy"
UNASSIGNED_THRESHOLDS = {"max_prob": 0.5, "entropy": 0.5}


def _check(probs, true=None):
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be [n_cells, n_classes] with at least two classes, received shape {probs.shape}")
    if true is not None:
        true = np.asarray(true)
        if true.shape != (probs.shape[0],):
            raise ValueError(f"true must hold one class id per row of probs ({probs.shape[0]}), "
                             f"received shape {true.shape}")
    return probs, true


def reliability_table(probs, true, n_bins=15) -> pd.DataFrame:
    """Per confidence bin: `lower`, `upper`, `cells`, mean `confidence` and `accuracy` of the top class.

    probs: `[n_cells, n_classes]`; true: `[n_cells]` class ids (a cell whose true class the model lacks,
    e.g. -1, counts as wrong). Bins are (lower, upper], equal width on [0, 1]; confidence 0 falls into
    the first. Empty bins have NaN confidence and accuracy.
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
    return pd.DataFrame({"lower": edges[:-1], "upper": edges[1:], "cells": cells,
                         "confidence": mean_confidence, "accuracy": accuracy})


def expected_calibration_error(probs, true, n_bins=15) -> float:
    """Top-label ECE: sum over bins of (cells in bin / cells) * |accuracy - mean confidence|.

    probs: `[n_cells, n_classes]`, true: `[n_cells]` class ids. 0 means perfectly calibrated.
    """
    table = reliability_table(probs, true, n_bins)
    filled = table[table.cells > 0]
    return float((filled.cells * (filled.accuracy - filled.confidence).abs()).sum() / filled.cells.sum())


def reliability_diagram(probs, true, path, n_bins=15, title=None):
    """Write a reliability diagram (accuracy and cell count per confidence bin) as a PNG at `path`.

    Written atomically; returns the path. The title shows the ECE.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = reliability_table(probs, true, n_bins)
    ece = expected_calibration_error(probs, true, n_bins)
    width = 1.0 / n_bins
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.bar(table.lower, table.accuracy.fillna(0), width=width, align="edge", edgecolor="black",
            color="tab:blue", label="accuracy")
    top.bar(table.lower, (table.confidence - table.accuracy).fillna(0), bottom=table.accuracy.fillna(0),
            width=width, align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
            title=f"{title + ': ' if title else ''}ECE {ece:.3f} ({int(table.cells.sum())} cells)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(table.lower, table.cells, width=width, align="edge", color="grey", edgecolor="black")
    bottom.set(xlabel="confidence (top class probability)", ylabel="cells", yscale="log")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def unassigned_score(probs, score=UNASSIGNED_SCORE) -> np.ndarray:
    """`[n_cells]` score in [0, 1] of how unlike every known class a cell is (higher: less sure).

    score="max_prob": 1 - max_c p_c; score="entropy": -sum_c p_c log p_c / log n_classes (0 for a
    one-hot row, 1 for the uniform one). probs: `[n_cells, n_classes]`.
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


def unassigned(probs, score=UNASSIGNED_SCORE, threshold=None) -> np.ndarray:
    """`[n_cells]` bool: cells whose `unassigned_score` exceeds `threshold` (default: the score's own)."""
    return unassigned_score(probs, score) > (UNASSIGNED_THRESHOLDS[score] if threshold is None else threshold)
