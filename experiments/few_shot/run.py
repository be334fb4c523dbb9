"""Few-shot annotation benchmark (design note protocol): tfp_scmix against its peers on the same splits.

The results in this folder come from these runs (each writes results.csv and summary.md in its --out):

    ./run experiments.few_shot.run               # the suite: five datasets, 150 labels, seeds 0-4
    ./run experiments.few_shot.run --ablation --seeds 0 --out experiments/few_shot/label_modes
    ./run experiments.few_shot.run --datasets pbmc3k --label-noise 0.1 --out experiments/few_shot/label_noise \
        --methods tfp_scmix tfp_scmix:restarts=1 tfp_scmix:restarts=1,prior=santa_barbara \
                  logistic_regression linear_svm knn_pca lda_logistic
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng pbmc3k \
        --seeds 0 1 --methods tfp_scmix:self_training=True --out experiments/few_shot/self_training
    ./run experiments.few_shot.run --datasets pbmc3k pbmc68k_reduced pbmc_sorted_zheng baron2016_mouse_pancreas \
        --seeds 0 1 2 --methods tfp_scmix:prior=normal,label_mode=cut --out experiments/few_shot/prior_normal
    ./run experiments.few_shot.run --datasets pbmc3k pbmc68k_reduced pbmc_sorted_zheng baron2016_mouse_pancreas \
        --seeds 0 1 2 --methods tfp_scmix:label_mode=joint --out experiments/few_shot/joint
    ./run experiments.few_shot.run --datasets pbmc3k pbmc68k_reduced pbmc_sorted_zheng baron2016_mouse_pancreas \
        --seeds 0 1 2 --methods tfp_scmix:label_mode=cut --out experiments/few_shot/cut
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc3k pbmc_sorted_zheng \
        --seeds 0 1 2 --methods tfp_scmix:batch_size=1024 --out experiments/few_shot/batch_1024
    ./run experiments.few_shot.run --datasets pbmc3k pbmc68k_reduced pbmc_sorted_zheng baron2016_mouse_pancreas \
        --seeds 0 1 2 --methods tfp_scmix:hidden_units=128 --out experiments/few_shot/hidden_128
    ./run experiments.few_shot.run --datasets pbmc3k pbmc68k_reduced pbmc_sorted_zheng baron2016_mouse_pancreas \
        --seeds 0 1 2 --methods tfp_scmix:batch_size=512 --out experiments/few_shot/batch_512
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng pbmc3k \
        --seeds 0 1 2 --methods tfp_scmix:balanced_classes=True --out experiments/few_shot/balanced_classes
    ./run experiments.few_shot.run --methods logistic_regression_balanced --seeds 0 1 2   # and cbmc seed 0
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng pbmc3k \
        --seeds 0 1 2 --methods tfp_scmix:prior=normal --out experiments/few_shot/prior_normal_balanced
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng pbmc3k cbmc \
        --seeds 0 1 2 --methods tfp_scmix:with_labels=True --out experiments/few_shot/with_labels
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng pbmc3k cbmc \
        --seeds 0 1 2 --methods tfp_scmix:with_labels=True,self_training=True \
        --out experiments/few_shot/self_training_product
    # self_training_with_labels/ holds the rows of that command with self-training's first targets (commit 3fdc110);
    # offsets_no_encoder_gradient/ those of the with_labels command with the batch offsets' change (seeds 0-4), and
    # self_training_product/ has seeds 3 4 too.
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng pbmc3k cbmc \
        --seeds 0 1 2 3 4 --methods tfp_scmix:with_labels=True --out experiments/few_shot/pooled_counts
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng pbmc3k cbmc \
        --seeds 0 1 2 --methods tfp_scmix:with_labels=True,self_training=True \
        --out experiments/few_shot/self_training_pooled
    ./run experiments.few_shot.pooled_cost       # the pooled-counts call's time (its docstring)
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng pbmc3k cbmc \
        --seeds 0 1 2 --methods tfp_scmix:with_labels=True --out experiments/few_shot/single_with_labels
    # single_with_labels/: the default again, with each restart's own call with the known labels recorded
    ./run experiments.few_shot.pooled_levers     # the stand-in's levers around the pooled call (its docstring)
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng pbmc3k cbmc \
        --seeds 0 1 2 3 4 --methods tfp_scmix:with_labels=True,pooling=15+30 --out experiments/few_shot/two_scales
    # two_scales/ was written by commit 9a2746f, when 15+30 was briefly the default (methods renamed to say so).
    ./run experiments.few_shot.run --datasets pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng \
        --seeds 0 1 2 --methods tfp_scmix:with_labels=True --out experiments/few_shot/column_blocks
    # column_blocks/: the default once the likelihood's sparse products ran in blocks of topics (performance issue 16)
    ./run experiments.few_shot.run --datasets baron2016_mouse_pancreas --seeds 0 1 2 3 4 \
        --methods tfp_scmix:with_labels=True logistic_regression logistic_regression_balanced linear_svm knn_pca \
                  knn_pca_k5 label_spreading lda_logistic --no-mlflow --out experiments/few_shot/scanpy_bins
    # scanpy_bins/: the pancreas after highly_variable_genes scored a gene alone in its bin 1 (its genes changed)
    # prior_normal/, joint/, cut/, batch_1024/, hidden_128/, batch_512/, balanced_classes/ and
    # prior_normal_balanced/ hold cbmc seed 0 too (the same commands, --datasets cbmc --seeds 0). cut/ holds the
    # suite's rows of the cut label mode, hidden_256/ those of the 256-unit first layer, batch_256/ those of 128
    # units at minibatches of 256, unbalanced/ those of the refit without class weights, each the default of its
    # time (methods renamed to say so); the main results.csv's tfp_scmix rows are balanced_classes/'s, the same
    # settings as today's default.
    ./run experiments.few_shot.headroom          # the linear and kNN peers with every training label (its docstring)
    ./run experiments.few_shot.class_branch      # the classification branch on fixed topics (its docstring)
    ./run experiments.few_shot.run --datasets pbmc3k --budgets 50 500 --seeds 0 1 2 --out experiments/few_shot/budgets
    ./run experiments.few_shot.run --datasets pbmc3k pbmc68k_reduced baron2016_mouse_pancreas pbmc_sorted_zheng cbmc \
        --settings inductive --seeds 0 1 2 3 4 \
        --methods tfp_scmix:with_labels=True logistic_regression logistic_regression_balanced linear_svm \
                  knn_pca_k5 label_spreading --out experiments/few_shot/inductive

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
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

import tfp_scmix as scm
from experiments.common import (
    ensure_venv,
    log_normalised,
    markdown_table,
    most_variable,
    output_folder,
    positive_int,
    read_dataset,
    record_results,
    write_text,
)
from tfp_scmix.evaluate import (
    few_shot_split,
    knn_peer,
    label_spreading_peer,
    principal_components_peer,
    scores,
)
from tfp_scmix.io import write_csv
from tfp_scmix.novelty import log_ratio_features

HERE = Path(__file__).parent
# The suite: test cells per dataset (issue 14). Any other .h5ad with a `cell_type` column (a name in
# $TFP_SCMIX_DATA or a path) gets `test_size`: half the cells left after the labelled ones, in hundreds,
# at most 2000.
SUITE = {
    "pbmc3k": 2000,
    "cbmc": 2000,
    "pbmc68k_reduced": 550,
    "pbmc_sorted_zheng": 1000,
    "baron2016_mouse_pancreas": 1000,
}


def test_size(name, n_cells, budget):
    """Test cells of dataset `name` (`SUITE`, else min(2000, (n_cells - budget) // 2 rounded down to 100)).
    Raises ValueError when that leaves none (fewer than budget + 200 cells) or more than the cells."""
    size = SUITE.get(name, min(2000, (n_cells - budget) // 200 * 100))
    if size < 1 or size + budget > n_cells:
        raise ValueError(
            f"{name} has {n_cells} cells: too few for {budget} labelled cells and a test set (the test size is "
            f"min(2000, (cells - labelled) / 2 rounded down to hundreds); at least {budget + 200} cells are needed)"
        )
    return size


def check_datasets(datasets, budgets):
    """Read each dataset and check its splits before anything is trained: DataError (e.g. no `cell_type` column)
    or ValueError (too few cells for a budget), naming the dataset."""
    for name in datasets:
        full = suite_dataset(name)
        for budget in budgets:
            test_size(name, full.n_cells, budget)


def suite_dataset(name):
    """SCData of `name` (a dataset of $TFP_SCMIX_DATA or a path to an .h5ad) with its `cell_type` labels and
    its `batch` column as batches when it has one (the two mice of baron2016_mouse_pancreas)."""
    from tfp_scmix.data import from_anndata, read_h5ad

    adata = read_h5ad(name) if name.endswith(".h5ad") else read_dataset(name)
    return from_anndata(adata, label_key="cell_type", batch_key="batch" if "batch" in adata.obs else None)


def stand_in_main(argv, description, one_split, summary, default_out, seeds=(0, 1, 2, 3, 4)):
    """The command of an experiment on the suite's splits (balanced_spreading.py, pooled_levers.py, topic_share.py):
    `one_split(dataset, name, seed)` -> a row (a dict) or a list of rows for each dataset and seed of
    `--datasets`/`--seeds` (the suite's five; `seeds` by default), then results.csv and summary.md
    (`summary(frame)`) in `--out` (default `default_out`). Returns the frame."""
    from experiments.common import write_text

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(SUITE))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(seeds))
    parser.add_argument("--out", default=str(default_out))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.datasets:
        full = suite_dataset(name)
        for seed in args.seeds:
            row = one_split(full, name, seed)
            rows.extend(row if isinstance(row, list) else [row])
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    write_csv(frame, out / "results.csv")
    write_text(out / "summary.md", summary(frame))
    print(summary(frame))
    return frame


# -- peers: each gets (data, visible cells, test, labelled, seed) and returns test predictions -----------
def logistic_regression(data, visible, test, labelled, seed, class_weight=None):
    from sklearn.linear_model import LogisticRegression

    x = log_normalised(data.counts)
    model = LogisticRegression(max_iter=3000, class_weight=class_weight)
    return model.fit(x[labelled], data.labels[labelled]).predict(x[test])


def logistic_regression_balanced(data, visible, test, labelled, seed):
    """Logistic regression with scikit-learn's class_weight="balanced": fewer errors than unweighted on every
    dataset of the suite (docs/few_shot.md, "Balanced classes"), so it is a peer of its own."""
    return logistic_regression(data, visible, test, labelled, seed, class_weight="balanced")


def linear_svm(data, visible, test, labelled, seed):
    from sklearn.svm import LinearSVC

    x = log_normalised(data.counts)
    return LinearSVC(random_state=seed).fit(x[labelled], data.labels[labelled]).predict(x[test])


def principal_components(data, visible, seed):
    """30 principal components of every cell, fitted on the visible cells (scanpy's recipe: log1p CP10k,
    genes scaled to unit variance and clipped at 10; `tfp_scmix.evaluate.principal_components_peer`)."""
    return principal_components_peer(data, visible, seed)


def knn_pca(data, visible, test, labelled, seed, k=15):
    return knn_peer(principal_components(data, visible, seed), data.labels, labelled, test, k)


def knn_pca_k5(data, visible, test, labelled, seed):
    return knn_pca(data, visible, test, labelled, seed, k=5)


def label_spreading(data, visible, test, labelled, seed):
    """scikit-learn's LabelSpreading on the kNN graph (15 neighbours) of 30 PCs of the visible cells; test
    cells outside them (the inductive setting) are predicted by the fitted model's kNN rule."""
    pcs = principal_components(data, visible, seed)
    return label_spreading_peer(pcs, data.labels, visible, labelled, test)


def env_peer(name, module, packages):
    """A peer run by experiments/few_shot/peer_env.py in its own environment (experiments/.venv-<env>)."""

    def peer(data, visible, test, labelled, seed):
        import subprocess
        import tempfile

        import anndata
        import pandas as pd
        import scipy.sparse as sp

        python, problem = ensure_venv(module, packages, module)
        if problem:
            raise RuntimeError(problem)
        cells = np.union1d(visible, test)
        labels = np.array(data.classes, dtype=object)[data.labels[cells]]
        labels[~np.isin(cells, labelled)] = "Unknown"
        obs = pd.DataFrame(
            {"label": pd.Categorical(labels), "is_test": np.isin(cells, test)}, index=data.obs_names[cells].astype(str)
        )
        if len(data.batch_names) > 1:
            obs["batch"] = pd.Categorical(np.array(data.batch_names, dtype=object)[data.batches[cells]])
        adata = anndata.AnnData(sp.csr_matrix(data.counts[cells]), obs=obs)
        adata.var_names = [str(g) for g in data.genes]
        adata.uns["seed"] = int(seed)
        with tempfile.TemporaryDirectory() as tmp:
            adata.write_h5ad(Path(tmp) / "split.h5ad")
            done = subprocess.run(
                [str(python), str(HERE / "peer_env.py"), name, str(Path(tmp) / "split.h5ad")],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""},
            )
        lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"{name} failed: {' | '.join(done.stderr.strip().splitlines()[-3:])[:500]}")
        # The child predicts the test cells in `cells` order (sorted); labels it cannot name count as errors.
        index = {c: i for i, c in enumerate(data.classes)}
        codes = np.array([index.get(p, -2) for p in json.loads(lines[-1])])
        return codes[np.searchsorted(np.sort(test), test)]

    return peer


CELLTYPIST = (["celltypist==1.7.1", "scikit-learn<1.6"],)
celltypist = env_peer("celltypist", "celltypist", CELLTYPIST)
celltypist_majority_voting = env_peer("celltypist_majority_voting", "celltypist", CELLTYPIST)
scanvi = env_peer("scanvi", "scvi", (["torch==2.13.0"], ["scvi-tools==1.4.2"]))


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

# The label-mode ablation (issue 14, with the classifier on topics and genes): how labels shape the topics
# ((a) joint = the default, (b) cut, (c) class-conditional prior, (d) joint with the label-noise-tolerant
# likelihood), on single models of every suite dataset; and the classifier reading the topics only (the model
# before issue 14). The default itself is the restarts row: compare "tfp_scmix" (the main table, same seeds).
ABLATION = [
    "tfp_scmix:restarts=1,label_mode=cut",
    "tfp_scmix:restarts=1,label_mode=joint",
    "tfp_scmix:restarts=1,label_mode=class_prior",
    "tfp_scmix:restarts=1,label_mode=joint,prior=santa_barbara",
    "tfp_scmix:restarts=1,label_mode=cut,classifier_genes=False",
]


def parse_method(spec):
    """ "tfp_scmix:key=value,key=value" -> ("tfp_scmix", {key: value}) with numbers and True/False converted."""
    name, _, options = spec.partition(":")
    settings = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if value in ("True", "False"):
            settings[key] = value == "True"
            continue
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        settings[key] = value
    return name, settings


def tfp_scmix(
    data, visible, test, labelled, seed, epochs=None, restarts=3, with_labels=False, pooling=None, **settings
):
    """tfp_scmix trained on the visible cells (labels of `labelled` only) by `scm.train` with the package's
    defaults (an ensemble of 3 restarts unless `restarts` is given; other options are `Config` settings).
    with_labels: predict as `annotate(..., label_key=...)` does, annotating the visible and test cells
    together with the labelled cells' labels (`annotate.with_labels_probs`: the per-cell probabilities times
    those of pooled counts); the per-cell call's errors of the same model go to the extra score
    "per_cell_errors", and the ablation of the call's parts (`known_label_experts`) to "pooled_only_errors",
    "with_spreading_errors" and "pooled_and_spreading_errors". pooling: the call's neighbourhood sizes joined by "+"
    ("15+30", two_scales/'s; default `propagate.POOLING_NEIGHBORS`); with more than one, each size's call with the
    per-cell one goes to "one_scale_{k}_errors"; each restart's own call with the known labels (its own graph and
    refit) to "single_model_with_labels_errors".
    Returns (test predictions, extra scores: sparsity of the class weights and the marker score, averaged
    over the members)."""
    from sklearn.linear_model import LogisticRegression

    from tfp_scmix.annotate import known_label_experts
    from tfp_scmix.propagate import POOLING_NEIGHBORS, product_of_experts

    train = data.subset(visible).hide_labels(np.flatnonzero(np.isin(visible, labelled)))
    model = scm.train(train, scm.Config(**settings), restarts=restarts, seed=seed * 100, verbose=0, epochs=epochs)
    predicted = scm.predict(model, data.subset(test))["label"]
    truth = data.labels[test]
    extras = {}
    if with_labels:
        extras["per_cell_errors"] = int((predicted != truth).sum())
        cells = np.union1d(visible, test)
        known = data.subset(cells).hide_labels(np.flatnonzero(np.isin(cells, labelled)))
        sizes = POOLING_NEIGHBORS if pooling is None else tuple(int(k) for k in str(pooling).split("+"))
        experts = known_label_experts(model, known, spreading=True, pooling_neighbors=sizes)
        rows = np.searchsorted(cells, test)
        # The ablation of the call's parts: pooled counts alone, label spreading in their place (annotate's call
        # until the pooled counts, offsets_no_encoder_gradient/), and all three sources together.
        for column, parts in (
            ("pooled_only_errors", ("pooled",)),
            ("with_spreading_errors", ("cell", "spreading")),
            ("pooled_and_spreading_errors", ("cell", "pooled", "spreading")),
            # With several sizes (two_scales/), each size's call alone.
            *((f"one_scale_{k}_errors", ("cell", f"pooled_{k}")) for k in sizes if len(sizes) > 1),
        ):
            call = product_of_experts(*(experts[part] for part in parts)).argmax(axis=1)[rows]
            extras[column] = int((call != truth).sum())
        predicted = product_of_experts(experts["cell"], experts["pooled"]).argmax(axis=1)[rows]
        # Each restart's own call with the known labels (its own graph and refit): the spread of single models
        # for the call that the default wins with, not only for the per-cell call.
        extras["single_model_with_labels_errors"] = json.dumps(
            [
                int((product_of_experts(e["cell"], e["pooled"]).argmax(axis=1)[rows] != truth).sum())
                for e in (known_label_experts(member, known, pooling_neighbors=sizes) for member in model.members)
            ]
        )
    # Each restart alone (the seed-to-seed spread of single models), and the standing diagnostic: logistic
    # regression on the first restart's own topic features (centred log proportions) of the same cells.
    single = [int((scm.predict(m, data.subset(test))["label"] != truth).sum()) for m in model.members]
    features = log_ratio_features(scm.predict(model.members[0], data)["cell_topic"])
    probe = LogisticRegression(max_iter=3000).fit(features[labelled], data.labels[labelled]).predict(features[test])
    extras |= {
        "weights_above_0.1": np.mean(
            [(np.abs(m.classifier.class_weights(None).numpy()) > 0.1).mean() for m in model.members]
        ),
        "single_model_errors": json.dumps(single),
        "topics_logistic_errors": int((probe != truth).sum()),
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
    "logistic_regression_balanced": logistic_regression_balanced,
    "linear_svm": linear_svm,
    "knn_pca": knn_pca,
    "knn_pca_k5": knn_pca_k5,
    "label_spreading": label_spreading,
    "lda_logistic": lda_logistic,
    "celltypist": celltypist,
    "celltypist_majority_voting": celltypist_majority_voting,
    "scanvi": scanvi,
}


def run(datasets, seeds, budgets, settings, methods, epochs, label_noise=0.0, n_genes=2000, out=HERE):
    import dataclasses

    from sklearn.metrics import f1_score

    rows = []
    # Rows already in the folder's results.csv are kept unless this run measures them again, so that a
    # run can add methods or seeds to a table (or resume one that was interrupted).
    kept = pd.read_csv(out / "results.csv") if (out / "results.csv").exists() else pd.DataFrame()
    for name in datasets:
        full = suite_dataset(name)
        for setting in settings:
            for budget in budgets:
                for seed in seeds:
                    test, labelled = few_shot_split(full.n_cells, test_size(name, full.n_cells, budget), budget, seed)
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
                            try:
                                predicted = PEERS[method](data, visible, test, labelled, seed)
                            except RuntimeError as err:  # a peer whose environment cannot be built or that fails
                                print(f"{name} seed {seed} {spec}: {err}", flush=True)
                                continue
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
    """Mean errors (of each dataset's test cells), accuracy, macro-F1 (and the `extra` scores present) over seeds,
    per `keys`."""
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
    """Mean errors, accuracy and macro-F1 over seeds, per dataset, setting, budget and method."""
    summary = mean_table(frame)
    write_text(
        path,
        "# Few-shot benchmark: mean over seeds (errors of each dataset's test cells: run.py's SUITE)\n\n"
        + markdown_table(summary)
        + "\n",
    )
    print(summary.to_string(index=False))


def method_problem(spec):
    """What is wrong with a `--methods` entry (None when nothing is): an unknown method, or a tfp_scmix setting
    that neither `tfp_scmix` nor `Config` takes."""
    import dataclasses
    import inspect

    name, settings = parse_method(spec)
    if name != "tfp_scmix" and name not in PEERS:
        return f"no method {name!r}; choose among tfp_scmix (with settings: tfp_scmix:key=value,...) and {list(PEERS)}"
    if name != "tfp_scmix":
        return f"{name} takes no settings" if settings else None
    known = {f.name for f in dataclasses.fields(scm.Config)} | set(inspect.signature(tfp_scmix).parameters)
    unknown = sorted(set(settings) - known - {"data", "visible", "test", "labelled", "seed", "settings"})
    return f"tfp_scmix has no setting {unknown} (Config's fields, restarts, with_labels, pooling)" if unknown else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", default=list(SUITE), help="names in $TFP_SCMIX_DATA or .h5ad paths with cell_type"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--budgets", nargs="+", type=positive_int, default=[150])
    parser.add_argument("--settings", nargs="+", default=["main"], choices=["main", "inductive"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["tfp_scmix", *PEERS],
        help='peers and tfp_scmix variants such as "tfp_scmix:prior=normal,restarts=3"',
    )
    parser.add_argument("--ablation", action="store_true", help="run the tfp_scmix variants of the ablation only")
    parser.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels flipped")
    parser.add_argument("--epochs", type=positive_int, default=None, help="default: the package's")
    parser.add_argument(
        "--out", default=str(HERE), help="folder whose results.csv the rows are merged into (default: the suite's)"
    )
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    out = output_folder(parser, args.out)
    if not 0 <= args.label_noise < 1:
        parser.error(f"--label-noise is a fraction in [0, 1), received {args.label_noise}")
    methods = ABLATION if args.ablation else args.methods
    for spec in methods:  # before any data is read
        problem = method_problem(spec)
        if problem:
            parser.error(f"--methods {spec}: {problem}")
    from tfp_scmix.data import DataError

    try:
        check_datasets(args.datasets, args.budgets)
    except (DataError, ValueError) as err:
        parser.error(f"--datasets: {err}")
    run(args.datasets, args.seeds, args.budgets, args.settings, methods, args.epochs, args.label_noise, out=out)
    if not args.no_mlflow:
        record_results(out / "results.csv", "few_shot")


if __name__ == "__main__":
    main()
