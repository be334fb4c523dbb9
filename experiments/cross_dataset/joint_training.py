"""Transfer by training on the source's labelled cells and the target's unlabelled cells together (issue 17).

scANVI's way to meet a dataset it can see at training time, and the hierarchical lever the joint model has without
any new code: the target's cells enter the topics and get a batch row of offsets of their own (`batch_names`), the
classifier learns from the source's labels only. Against the model trained on the source alone, on the pairs of the
matrix (`matrix.PAIRS` and the multi-source row), each read four ways: the per-cell call; majority voting
(`annotate(..., majority_voting=True)`'s over-clusters); the known labels' call (`annotate(..., label_key=...)` on
the source and target cells together, the source's labels known: each cell's call times that of its counts pooled
with its neighbours'); and the pooled call alone. Coarse accuracy, macro-F1 and ECE over the matched cells, scored
as the matrix scores them. One restart per model unless `--restarts`.

    ./run experiments.cross_dataset.joint_training [--seeds 0] [--restarts 1]

Writes experiments/cross_dataset/joint_training/results.csv (one row per pair, seed and method) and results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

import tfp_scmix as scm
from experiments.cross_dataset.matrix import (
    MULTI_SOURCE,
    PAIRS,
    pair_data,
    pair_name,
    scores,
    source_coarse,
    stack,
    tissue_order,
)
from tfp_scmix.annotate import known_label_experts, majority_vote, over_clusters
from tfp_scmix.io import write_csv
from tfp_scmix.novelty import log_ratio_features
from tfp_scmix.propagate import known_labels_features, product_of_experts

HERE = Path(__file__).parent / "joint_training"
# Best peer's coarse accuracy per pair, seeds 0-2 (docs/cross_dataset.md, "Majority voting over the genes and
# X_scmix": CellTypist with and without majority voting, logistic regression, linear SVM, kNN; scANVI seed 0).
BEST_PEER = {
    "pbmc3k -> pbmc_sorted_zheng": 0.923,
    "pbmc3k -> pbmc68k_reduced": 0.902,
    "pbmc_sorted_zheng -> pbmc3k": 0.880,
    "pbmc_sorted_zheng -> pbmc68k_reduced": 0.871,
    "pbmc68k_reduced -> pbmc3k": 0.898,
    "pbmc68k_reduced -> pbmc_sorted_zheng": 0.955,
    "mouse1 -> mouse2": 0.976,
    "mouse2 -> mouse1": 0.988,
    "pbmc3k+pbmc_sorted_zheng -> pbmc68k_reduced": 0.875,
}


def pair_rows(sources, target, seed, restarts, genes):
    """Rows of the eight readings (source-only and joint models, four calls each) of one pair and seed."""
    source, query, truth = pair_data(sources, target, genes)
    to_coarse = source_coarse(sources, source.classes)
    columns = [c for c in tissue_order(target) if c in set(to_coarse)]
    names = np.array(columns, dtype=object)
    one_hot = (to_coarse[:, None] == names[None, :]).astype(float)
    both = stack([source, dataclasses.replace(query, batch_names=[target])])
    target_rows = source.n_cells + np.arange(query.n_cells)
    pair = pair_name(sources, target)
    rows = []
    for mode in ("source", "joint"):
        start = time.time()
        model = scm.train(source if mode == "source" else both, restarts=restarts, seed=seed, verbose=0)
        seconds = time.time() - start
        cells = both.subset(target_rows) if mode == "joint" else query  # the joint model reads the target's row
        out = scm.predict(model, cells)
        features = log_ratio_features(out["cell_topic"], len(model.members))
        voted = majority_vote(out["label"], over_clusters(known_labels_features(cells.counts, features)))
        experts = known_label_experts(model, both)
        readings = {
            mode: (out["probs"], None),
            f"{mode}+majority_voting": (out["probs"], voted.astype(int)),
            f"{mode}+with_labels": (product_of_experts(experts["cell"], experts["pooled"])[target_rows], None),
            f"{mode}+pooled_only": (experts["pooled"][target_rows], None),
        }
        for method, (probs, labels) in readings.items():
            coarse = probs @ one_hot
            called = coarse.argmax(1) if labels is None else (np.eye(len(source.classes))[labels] @ one_hot).argmax(1)
            score = scores(truth, names[called], columns, coarse)
            rows.append(
                {
                    "pair": pair,
                    "seed": seed,
                    "method": method,
                    "restarts": restarts,
                    **{k: score[k] for k in ("accuracy", "macro_f1", "ece", "cells")},
                    "train_seconds": seconds,
                }
            )
            print(f"{pair:<44} {method:<24} accuracy {score['accuracy']:.3f} macro-F1 {score['macro_f1']:.3f}")
    return rows


def table(frame: pd.DataFrame) -> list[str]:
    """A markdown table of `frame`, one line per row."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return lines + ["| " + " | ".join(str(v) for v in values) + " |" for values in frame.itertuples(index=False)]


def summary(frame: pd.DataFrame) -> list[str]:
    """results.md's lines: accuracy per pair and method (means over seeds), and each method's margin over the best
    peer on the single-source pairs."""
    means = frame.groupby(["pair", "method"])[["accuracy", "macro_f1"]].mean()
    accuracy = means["accuracy"].unstack().round(3)
    single = [p for p in accuracy.index if "+" not in p.split(" -> ")[0]]
    peer = pd.Series(BEST_PEER)[single]
    lines = [*table(accuracy.reset_index()), ""]
    lines.append(
        "| method | mean accuracy | margin over the best peer (points) | pairs at or above it | mean macro-F1 |"
    )
    lines.append("|---|---|---|---|---|")
    for method in accuracy.columns:
        values = means["accuracy"].unstack().loc[single, method]
        lines.append(
            f"| {method} | {values.mean():.3f} | {100 * (values - peer).mean():+.1f} | {int((values >= peer).sum())} "
            f"of {len(single)} | {means['macro_f1'].unstack().loc[single, method].mean():.3f} |"
        )
    for mode in ("", "+majority_voting", "+with_labels"):
        gain = 100 * (
            means["accuracy"].unstack().loc[single, f"joint{mode}"]
            - means["accuracy"].unstack().loc[single, f"source{mode}"]
        )
        lines.append(
            f"\nJoint training against the source alone{' (' + mode[1:] + ')' if mode else ' (per cell)'}: "
            f"{gain.mean():+.2f} points of accuracy on average, from {gain.min():+.1f} to {gain.max():+.1f}."
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for sources, target in PAIRS + MULTI_SOURCE:
            rows.extend(pair_rows(sources, target, seed, args.restarts, args.genes))
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(frame, args.out / "results.csv")
    lines = [
        "# Transfer with the target's cells in training (joint) against the source alone",
        "",
        "Written by `./run experiments.cross_dataset.joint_training`; coarse accuracy over the matched cells, means "
        f"over seeds {sorted(set(frame.seed))}, {args.restarts} restart(s) per model; best peers from "
        "docs/cross_dataset.md (seeds 0-2).",
        "",
        *summary(frame),
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
