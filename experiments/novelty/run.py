"""Unknown cells flagged by default: leave-one-type-out with the few-shot setting a user starts from.

    ./run experiments.novelty.run                      # pbmc3k and pbmc_sorted_zheng, seed 0
    ./run experiments.novelty.run --datasets pbmc3k --restarts 3

For each dataset (its 2000 most variable genes) and each cell type T in turn: 150 random labelled cells
(numpy `default_rng(seed)`) drawn from the cells of the other types; every cell's counts train the
topics (the main setting). `tfp_scmix.train` fits the model's novelty detector on the labelled cells as a
user's run does; `annotate`'s flag (obs["scmix_novel"], score above the 0.95 threshold) is read on the
unlabelled cells: the fraction flagged among T's cells (left out: should be high) and among the other
types' cells (known: should be low). The same with the detector's in-sample reference distances
(`TopicNovelty.fit(..., folds=0)`, the cross-dataset benchmark's detector) and with the probability
score (`evaluate.unassigned`, entropy above 0.5) for comparison, and the AUROC of the novelty score.
Writes results.csv and results.md into `--out` (this folder by default).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

import tfp_scmix as scm
from experiments.common import load_dataset, markdown_table, write_text
from tfp_scmix.evaluate import unassigned
from tfp_scmix.io import write_csv
from tfp_scmix.novelty import TopicNovelty

HERE = Path(__file__).parent


def leave_one_out(data, left_out: int, args, seed: int) -> dict:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    known = np.flatnonzero(data.labels != left_out)
    labelled = rng.choice(known, args.labels, replace=False)
    # The left-out type is not a class of the model: its labels go, the other classes keep their order.
    classes = [c for i, c in enumerate(data.classes) if i != left_out]
    labels = np.full(data.n_cells, -1, np.int32)
    labels[labelled] = data.labels[labelled] - (data.labels[labelled] > left_out)
    training = type(data)(data.counts, data.genes, labels, classes, data.batches, data.batch_names, data.obs_names)
    start = time.time()
    model = scm.train(training, scm.Config(epochs=args.epochs), restarts=args.restarts, seed=seed, verbose=0)
    seconds = time.time() - start
    out = scm.predict(model, training)
    unlabelled = labels < 0
    novel = (data.labels == left_out)[unlabelled]
    in_sample = TopicNovelty.fit(out["cell_topic"][~unlabelled], labels[~unlabelled], len(model.members), folds=0)
    flags = {
        "default": (out["novelty"] > model.novelty.threshold)[unlabelled],
        "in_sample": in_sample.unassigned(out["cell_topic"])[unlabelled],
        "entropy": unassigned(out["probs"])[unlabelled],
    }
    row = {
        "left_out": data.classes[left_out],
        "left_out_cells": int(novel.sum()),
        "known_cells": int((~novel).sum()),
        "auroc": float(roc_auc_score(novel, out["novelty"][unlabelled])),
        "seconds": round(seconds, 1),
    }
    for name, flagged in flags.items():
        row[f"{name}_left_out_flagged"] = float(flagged[novel].mean())
        row[f"{name}_known_flagged"] = float(flagged[~novel].mean())
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["pbmc3k", "pbmc_sorted_zheng"])
    parser.add_argument("--labels", type=int, default=150)
    parser.add_argument("--restarts", type=int, default=1, help="models per run (the package default is 3)")
    parser.add_argument("--epochs", type=int, default=scm.Config().epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)
    rows = []
    for name in args.datasets:
        data = load_dataset(name, n_genes=2000)
        for left_out in range(data.n_classes):
            rows.append({"dataset": name, **leave_one_out(data, left_out, args, args.seed)})
            print(rows[-1], flush=True)
            frame = pd.DataFrame(rows)
            write_csv(frame, Path(args.out) / "results.csv", index=False)
    frame = pd.DataFrame(rows)
    summary = frame.groupby("dataset")[[c for c in frame.columns if c.endswith("flagged") or c == "auroc"]].mean()
    text = (
        f"# Unknown cells flagged by default (seed {args.seed}, {args.labels} labels, {args.restarts} restart(s), "
        f"{args.epochs} epochs)\n\nCommand: `./run experiments.novelty.run "
        f"--restarts {args.restarts} --epochs {args.epochs}`\n\nMean over left-out types:\n\n"
        + markdown_table(summary.round(3).reset_index())
        + "\n\nPer left-out type:\n\n"
        + markdown_table(frame.round(3))
        + "\n"
    )
    write_text(Path(args.out) / "results.md", text)


if __name__ == "__main__":
    main()
