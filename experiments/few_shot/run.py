"""Few-shot annotation benchmark (design note protocol): tfp_scmix against its peers on the same splits.

The results in this folder come from these runs (each writes results.csv and summary.md in its --out):

    ./run experiments.few_shot.run               # main table: pbmc3k + cbmc, 150 labels, seeds 0-4
    ./run experiments.few_shot.run --datasets pbmc3k --ablation --out experiments/few_shot/ablation
    ./run experiments.few_shot.run --datasets pbmc3k --label-noise 0.1 --out experiments/few_shot/label_noise \
        --methods tfp_scmix tfp_scmix:restarts=1 tfp_scmix:restarts=1,prior=santa_barbara \
                  logistic_regression linear_svm knn_pca lda_logistic
    ./run experiments.few_shot.run --datasets pbmc3k --budgets 50 500 --seeds 0 1 2 --out experiments/few_shot/budgets
    ./run experiments.few_shot.run --datasets pbmc3k --settings inductive --seeds 0 1 2 \
        --out experiments/few_shot/inductive

Split: numpy `default_rng(seed).permutation` of the cells; the first 2000 are test cells, the next
`budget` carry labels, every other label is hidden. Main setting: every cell's counts may be used
without labels (test labels never); inductive: test cells are held out entirely. Genes: the 2000 most
variable (by counts only) of the cells the setting may see. Peers read log1p(counts per 10k).
`--ablation` runs the tfp_scmix variants instead (label modes, priors, topics, single models);
`--label-noise 0.1` flips that fraction of the training labels. Writes results.csv (one row per method,
dataset, budget, setting and seed) and summary.md, and records the rows as MLflow runs when MLflow is
installed.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

import tfp_scmix as scm
from experiments.common import load_dataset, log_normalised, markdown_table, most_variable, record_results, write_text
from tfp_scmix.evaluate import few_shot_split, scores
from tfp_scmix.io import write_csv

HERE = Path(__file__).parent
N_TEST = 2000


# -- peers: each gets (data, visible cells, test, labelled, seed) and returns test predictions -----------
def logistic_regression(data, visible, test, labelled, seed):
    from sklearn.linear_model import LogisticRegression

    x = log_normalised(data.counts)
    return LogisticRegression(max_iter=3000).fit(x[labelled], data.labels[labelled]).predict(x[test])


def linear_svm(data, visible, test, labelled, seed):
    from sklearn.svm import LinearSVC

    x = log_normalised(data.counts)
    return LinearSVC(random_state=seed).fit(x[labelled], data.labels[labelled]).predict(x[test])


def knn_pca(data, visible, test, labelled, seed):
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    x = log_normalised(data.counts).toarray()
    scaler = StandardScaler().fit(x[visible])
    pca = PCA(30, random_state=seed).fit(np.clip(scaler.transform(x[visible]), -10, 10))
    pcs = pca.transform(np.clip(scaler.transform(x), -10, 10))
    knn = KNeighborsClassifier(n_neighbors=min(15, len(labelled))).fit(pcs[labelled], data.labels[labelled])
    return knn.predict(pcs[test])


def lda_logistic(data, visible, test, labelled, seed):
    from sklearn.decomposition import LatentDirichletAllocation
    from sklearn.linear_model import LogisticRegression

    lda = LatentDirichletAllocation(30, learning_method="online", random_state=seed, n_jobs=1)
    lda.fit(data.counts[visible])
    theta = lda.transform(data.counts)
    return LogisticRegression(max_iter=3000).fit(theta[labelled], data.labels[labelled]).predict(theta[test])


# Canonical markers of the design note, by pbmc3k's class names.
PBMC3K_MARKERS = {
    "B cells": ["MS4A1", "CD79A"],
    "NK cells": ["GNLY", "NKG7"],
    "CD14+ Monocytes": ["CD14", "LYZ"],
    "FCGR3A+ Monocytes": ["FCGR3A", "MS4A7"],
    "Dendritic cells": ["FCER1A", "CST3"],
    "Megakaryocytes": ["PPBP", "PF4"],
    "CD8 T cells": ["CD8A"],
    "CD4 T cells": ["IL7R"],
}

# The ablation of issue 3, on single models (the default averages 3 restarts): how labels shape topics
# ((a) joint, (b) cut = the default, (c) class-conditional prior, (d) joint with the label-noise-tolerant
# likelihood; joint with a label weight of 0.01, below which the label term stops overwhelming the
# count likelihood in the encoder), the prior on the class weights, the number of topics. The default itself is the
# restarts row: compare "tfp_scmix" (the main table, same seeds) with "tfp_scmix:restarts=1".
ABLATION = [
    "tfp_scmix:restarts=1",
    "tfp_scmix:restarts=1,label_mode=joint",
    "tfp_scmix:restarts=1,label_mode=class_prior",
    "tfp_scmix:restarts=1,label_mode=joint,prior=santa_barbara",
    "tfp_scmix:restarts=1,prior=horseshoe",
    "tfp_scmix:restarts=1,prior=santa_barbara",
    "tfp_scmix:restarts=1,prior=normal",
    "tfp_scmix:restarts=1,n_topics=20",
    "tfp_scmix:restarts=1,n_topics=100",
    "tfp_scmix:restarts=1,label_mode=joint,label_weight=0.01",
]


def parse_method(spec):
    """ "tfp_scmix:key=value,key=value" -> ("tfp_scmix", {key: value}) with numbers converted."""
    name, _, options = spec.partition(":")
    settings = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        settings[key] = value
    return name, settings


def tfp_scmix(data, visible, test, labelled, seed, epochs=100, restarts=3, **settings):
    """tfp_scmix trained on the visible cells (labels of `labelled` only) by `scm.train` with the package's
    defaults (an ensemble of 3 restarts unless `restarts` is given; other options are `Config` settings).
    Returns (test predictions, extra scores: sparsity of the class weights and the marker score, averaged
    over the members)."""
    train = data.subset(visible).hide_labels(np.flatnonzero(np.isin(visible, labelled)))
    model = scm.train(train, scm.Config(**settings), restarts=restarts, seed=seed * 100, verbose=0, epochs=epochs)
    predicted = scm.predict(model, data.subset(test))["label"]
    extras = {
        "weights_above_0.1": np.mean(
            [(np.abs(m.classifier.class_weights(None).numpy()) > 0.1).mean() for m in model.members]
        )
    }
    if set(PBMC3K_MARKERS) <= set(model.class_names):
        for by, key in (("lift", "marker_score"), ("weight", "marker_score_by_weight")):
            extras[key] = np.mean(
                [
                    scm.explain.marker_score(model, PBMC3K_MARKERS, n_genes=30, by=by, member=i)[0]
                    for i in range(len(model.members))
                ]
            )
    return predicted, extras


def flip_labels(labels, labelled, fraction, n_classes, seed):
    """A copy of `labels` in which `fraction` of the `labelled` cells get another class at random."""
    rng = np.random.default_rng(10_000 + seed)
    noisy = labels.copy()
    flipped = rng.choice(labelled, int(round(fraction * len(labelled))), replace=False)
    noisy[flipped] = (labels[flipped] + rng.integers(1, n_classes, len(flipped))) % n_classes
    return noisy


PEERS = {
    "logistic_regression": logistic_regression,
    "linear_svm": linear_svm,
    "knn_pca": knn_pca,
    "lda_logistic": lda_logistic,
}


def run(datasets, seeds, budgets, settings, methods, epochs, label_noise=0.0, n_genes=2000, out=HERE):
    import dataclasses

    from sklearn.metrics import f1_score

    rows = []
    # Rows already in the folder's results.csv are kept unless this run measures them again, so that a
    # run can add methods or seeds to a table (or resume one that was interrupted).
    kept = pd.read_csv(out / "results.csv") if (out / "results.csv").exists() else pd.DataFrame()
    for name in datasets:
        full = load_dataset(name)
        for setting in settings:
            for budget in budgets:
                for seed in seeds:
                    test, labelled = few_shot_split(full.n_cells, N_TEST, budget, seed)
                    visible = (
                        np.arange(full.n_cells) if setting == "main" else np.setdiff1d(np.arange(full.n_cells), test)
                    )
                    data = most_variable(full, n_genes, cells=visible)
                    truth = data.labels[test]
                    if label_noise:
                        data = dataclasses.replace(
                            data, labels=flip_labels(data.labels, labelled, label_noise, data.n_classes, seed)
                        )
                    for spec in methods:
                        method, options = parse_method(spec)
                        start, extras = time.time(), {}
                        if method == "tfp_scmix":
                            predicted, extras = tfp_scmix(data, visible, test, labelled, seed, epochs=epochs, **options)
                        else:
                            predicted = PEERS[method](data, visible, test, labelled, seed)
                        row = {
                            "method": spec,
                            "dataset": name,
                            "setting": setting,
                            "labels": budget,
                            "label_noise": label_noise,
                            "seed": seed,
                            **scores(truth, predicted),
                            "seconds": time.time() - start,
                            **extras,
                        }
                        per_class = f1_score(
                            truth, predicted, average=None, labels=range(data.n_classes), zero_division=0
                        )
                        row["per_class_f1"] = json.dumps(dict(zip(data.classes, np.round(per_class, 3).tolist())))
                        rows.append(row)
                        print(
                            f"{name} {setting} {budget} labels seed {seed} {spec:<28} errors {row['errors']:4d} "
                            f"macro-F1 {row['macro_f1']:.3f} ({row['seconds']:.0f} s)",
                            flush=True,
                        )
                        # Keep what has been measured even if a later run is interrupted.
                        write_csv(merge_rows(kept, rows), out / "results.csv")
    frame = merge_rows(kept, rows)
    write_summary(frame, out / "summary.md")
    return frame


ROW_KEYS = ["method", "dataset", "setting", "labels", "label_noise", "seed"]


def merge_rows(kept, rows):
    """The kept rows that `rows` does not measure again, then `rows` (a DataFrame)."""
    new = pd.DataFrame(rows)
    if kept.empty:
        return new
    again = kept.set_index(ROW_KEYS).index.isin(new.set_index(ROW_KEYS).index)
    return pd.concat([kept[~again], new], ignore_index=True)


EXTRA_SCORES = ("marker_score", "marker_score_by_weight", "weights_above_0.1")


def mean_table(frame, keys=("dataset", "setting", "labels", "label_noise", "method"), extra=EXTRA_SCORES):
    """Mean errors of 2000, accuracy, macro-F1 (and the `extra` scores present) over seeds, per `keys`."""
    columns = {
        "errors": ("errors", "mean"),
        "accuracy": ("accuracy", "mean"),
        "macro_f1": ("macro_f1", "mean"),
        "seeds": ("seed", "count"),
        "seconds": ("seconds", "mean"),
    }
    columns.update({name: (name, "mean") for name in extra if name in frame})
    return frame.groupby(list(keys), sort=False).agg(**columns).round(3).reset_index()


def write_summary(frame, path):
    """Mean errors of 2000, accuracy and macro-F1 over seeds, per dataset, setting, budget and method."""
    summary = mean_table(frame)
    write_text(
        path, "# Few-shot benchmark: mean over seeds (errors of 2000 test cells)\n\n" + markdown_table(summary) + "\n"
    )
    print(summary.to_string(index=False))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["pbmc3k", "cbmc"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--budgets", nargs="+", type=int, default=[150])
    parser.add_argument("--settings", nargs="+", default=["main"], choices=["main", "inductive"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["tfp_scmix", *PEERS],
        help='peers and tfp_scmix variants such as "tfp_scmix:prior=normal,restarts=3"',
    )
    parser.add_argument("--ablation", action="store_true", help="run the tfp_scmix variants of the ablation only")
    parser.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels flipped")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    methods = ABLATION if args.ablation else args.methods
    run(args.datasets, args.seeds, args.budgets, args.settings, methods, args.epochs, args.label_noise, out=out)
    if not args.no_mlflow:
        record_results(out / "results.csv", "few_shot")


if __name__ == "__main__":
    main()
