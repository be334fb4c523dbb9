"""The transfer matrix (run.py's `transfer` part): train on every label of one dataset, or of several at once
with their batch ids, and annotate another dataset of the same tissue.

For each pair (`PAIRS`: every ordered pair of datasets of a tissue; `MULTI_SOURCE`: several sources, one target)
the genes are those that every dataset of the pair measures, the `--genes` most variable of them by the source
cells alone. Every method trains on the same source cells over the same genes and predicts the same target cells:
- tfp_scmix: `scm.train` as the package ships it (default `Config`, `--restarts` models averaged), then
  `scm.predict` of the target, and `scm.adapt` to the target's unlabelled counts then `scm.predict`;
- logistic regression, linear SVM and kNN on 30 PCs of the source cells (experiments/few_shot/run.py's peers);
- CellTypist trained on the source (best match, and majority voting over its over-clustering of the target),
  and scANVI trained on the source and mapped to the target by scArches (`SCANVI.load_query_data`), each in its
  own environment (experiments/few_shot/peer_env.py).
Labels are compared through one coarse map per tissue (`TISSUES`; the table in docs/cross_dataset.md). Target
cells whose coarse class the source has are "matched" and scored (`scores`): accuracy, errors, macro-F1 over the
coarse classes both datasets have, and the fraction given a source class without counterpart in the target
(always an error: `no_counterpart`). Target cells of types the source lacks ("unmatched") cannot be named; they
and the no-counterpart calls are reported through tfp_scmix's default novelty rule (`model.novelty`): its AUROC
for unmatched against matched cells and the fractions it flags.
"""

import dataclasses
import json
import time
from itertools import permutations
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

import tfp_scmix as scm
from experiments.common import most_variable, read_dataset
from experiments.few_shot.run import celltypist, celltypist_majority_voting, knn_pca, linear_svm, logistic_regression
from experiments.few_shot.run import env_peer as _env_peer
from tfp_scmix.annotate import majority_vote, over_clusters
from tfp_scmix.data import SCData, from_anndata
from tfp_scmix.evaluate import expected_calibration_error
from tfp_scmix.novelty import log_ratio_features
from tfp_scmix.propagate import SMOOTHING_ALPHA, known_labels_features, smooth

# Coarse classes that every dataset of the tissue can express. Myeloid joins monocytes and dendritic cells: the
# sorted "monocytes" carry dendritic-cell markers and are called Dendritic cells by every pbmc3k-trained method
# (label_definitions.md), and pbmc68k_reduced's large "Dendritic" group is defined by correlation with bulk
# profiles, not by markers.
PBMC = {
    "pbmc3k": {
        "B cells": "B",
        "CD4 T cells": "CD4 T",
        "CD8 T cells": "CD8 T",
        "NK cells": "NK",
        "CD14+ Monocytes": "Myeloid",
        "FCGR3A+ Monocytes": "Myeloid",
        "Dendritic cells": "Myeloid",
        "Megakaryocytes": "Megakaryocytes",
    },
    "pbmc_sorted_zheng": {
        "bcells": "B",
        "thelper": "CD4 T",
        "memoryt": "CD4 T",
        "naivet": "CD4 T",
        "regulatoryt": "CD4 T",
        "cytotoxict": "CD8 T",
        "naivecytotoxic": "CD8 T",
        "nk": "NK",
        "monocytes": "Myeloid",
    },
    "pbmc68k_reduced": {
        "CD19+ B": "B",
        "CD4+/CD25 T Reg": "CD4 T",
        "CD4+/CD45RO+ Memory": "CD4 T",
        "CD4+/CD45RA+/CD25- Naive T": "CD4 T",
        "CD8+ Cytotoxic T": "CD8 T",
        "CD8+/CD45RA+ Naive Cytotoxic": "CD8 T",
        "CD56+ NK": "NK",
        "CD14+ Monocyte": "Myeloid",
        "Dendritic": "Myeloid",
        "CD34+": "CD34+",
    },
}
# Both mice carry the same authors' annotation; the rare immune types (7-17 cells a mouse) and the two stellate
# states are joined so that every coarse class has cells in both mice.
BARON = {
    "alpha": "alpha",
    "beta": "beta",
    "delta": "delta",
    "gamma": "gamma",
    "ductal": "ductal",
    "endothelial": "endothelial",
    "activated_stellate": "stellate",
    "quiescent_stellate": "stellate",
    "macrophage": "immune",
    "B_cell": "immune",
    "T_cell": "immune",
    "immune_other": "immune",
    "schwann": "schwann",
}
MOUSE = "baron2016_mouse_pancreas"
TISSUES = {"PBMC": PBMC, "pancreas": {f"{MOUSE}:mouse1": BARON, f"{MOUSE}:mouse2": BARON}}
PAIRS = [((source,), target) for datasets in TISSUES.values() for source, target in permutations(datasets, 2)]
MULTI_SOURCE = [(("pbmc3k", "pbmc_sorted_zheng"), "pbmc68k_reduced")]
scanvi_scarches = _env_peer("scanvi_scarches", "scvi", (["torch==2.13.0"], ["scvi-tools==1.4.2"]))
PEERS = {
    "logistic_regression": logistic_regression,
    "linear_svm": linear_svm,
    "knn_pca": knn_pca,
    "celltypist": celltypist,
    "celltypist_majority_voting": celltypist_majority_voting,
    "scanvi_scarches": scanvi_scarches,
}
# "+smooth": the unadapted model's probabilities spread over the target cells' kNN graph in X_scmix
# (`annotate(..., smooth=True)`, `tfp_scmix.propagate.smooth`).
# "+majority_voting": each target cluster's most frequent call (`annotate(..., majority_voting=True)`: k-means of the
# genes' principal components beside X_scmix, `annotate.over_clusters`), CellTypist's option.
MODEL_METHODS = ("tfp_scmix", "tfp_scmix+adapt", "tfp_scmix+smooth", "tfp_scmix+majority_voting")
METHODS = (*MODEL_METHODS, *PEERS)


def short(spec):
    """Display name of a dataset spec: the mouse for a batch of the pancreas file, else the file name."""
    return spec.split(":")[-1]


def pair_name(sources, target):
    return f"{'+'.join(map(short, sources))} -> {short(target)}"


def coarse_map(spec):
    """{label: coarse class} of dataset `spec`."""
    for datasets in TISSUES.values():
        if spec in datasets:
            return datasets[spec]
    raise ValueError(
        f"{spec!r} is in no tissue of the label maps; choose among {[d for t in TISSUES.values() for d in t]}"
    )


def tissue_order(spec):
    """The coarse classes of `spec`'s tissue, in a fixed order."""
    for datasets in TISSUES.values():
        if spec in datasets:
            return list(dict.fromkeys(c for labels in datasets.values() for c in labels.values()))
    raise ValueError(f"{spec!r} is in no tissue of the label maps")


def label_map_table():
    """The label maps as one table: for each tissue and coarse class, each dataset's labels in it ("-": none)."""
    rows = []
    for tissue, datasets in TISSUES.items():
        for coarse in list(dict.fromkeys(c for labels in datasets.values() for c in labels.values())):
            row = {"tissue": tissue, "coarse class": coarse}
            for spec, labels in datasets.items():
                row[short(spec)] = ", ".join(label for label, c in labels.items() if c == coarse) or "-"
            rows.append(row)
    return pd.DataFrame(rows).fillna("")


def read_spec(spec, max_cells=None):
    """AnnData of `spec`: a dataset name, or "name:batch" for the cells of one value of its obs["batch"]."""
    name, _, batch = spec.partition(":")
    adata = read_dataset(name, max_cells)
    return adata[(adata.obs["batch"] == batch).to_numpy()].copy() if batch else adata


def stack(datasets):
    """The cells of `datasets` (same genes) one after another, each keeping its batches; labels in the first's
    classes (the others must have the same classes or no labels)."""
    first = datasets[0]
    if any(list(d.genes) != list(first.genes) for d in datasets):
        raise ValueError("stack needs the datasets over the same genes in the same order; align them first")
    if any(d.n_labelled and list(d.classes) != list(first.classes) for d in datasets):
        raise ValueError("stack needs labelled datasets in the same classes (from_anndata(..., classes=))")
    offsets = np.cumsum([0] + [len(d.batch_names) for d in datasets])
    return SCData(
        sp.vstack([d.counts for d in datasets]).tocsr(),
        first.genes,
        np.concatenate([d.labels for d in datasets]).astype(np.int32),
        list(first.classes),
        np.concatenate([d.batches + o for d, o in zip(datasets, offsets)]).astype(np.int32),
        [name for d in datasets for name in d.batch_names],
        np.concatenate([d.obs_names for d in datasets]),
    )


def pair_data(sources, target, n_genes, max_cells=None):
    """(source SCData: every label, one batch per source; target SCData without labels over the same genes;
    the target cells' coarse classes). Genes: the `n_genes` most variable, by the source cells, of those every
    dataset of the pair measures; classes: the union of the sources' labels."""
    adatas = [read_spec(s, max_cells) for s in sources]
    target_adata = read_spec(target, max_cells)
    shared = pd.Index(adatas[0].var_names)
    for adata in [*adatas[1:], target_adata]:
        shared = shared[shared.isin(adata.var_names)]
    classes = list(dict.fromkeys(c for a in adatas for c in sorted(a.obs["cell_type"].astype(str).unique())))
    parts = [
        dataclasses.replace(from_anndata(a, genes=shared, classes=classes, allow_empty_cells=True), batch_names=[s])
        for a, s in zip(adatas, sources)
    ]
    source = most_variable(stack(parts), n_genes)
    source = source.subset(source.library_size > 0)
    query = from_anndata(target_adata, label_key=None, genes=source.genes, allow_empty_cells=True)
    target_map = coarse_map(target)
    truth = np.array([target_map[t] for t in target_adata.obs["cell_type"].astype(str)], dtype=object)
    return source, query, truth


def source_coarse(sources, class_names):
    """The coarse class of each of the model's classes (from the map of the source that names it)."""
    merged = {}
    for spec in sources:
        for label, coarse in coarse_map(spec).items():
            if merged.setdefault(label, coarse) != coarse:
                raise ValueError(f"label {label!r} maps to {merged[label]!r} and {coarse!r} in different sources")
    return np.array([merged[c] for c in class_names], dtype=object)


def scores(truth, predicted, source_classes, probs=None, flagged=None, novelty=None):
    """Scores of `predicted` coarse classes `[target cells]` against `truth`, over the matched cells (those whose
    coarse class is in `source_classes`, the coarse classes the model can name, in the columns' order of `probs`).
    With a model's `probs` `[cells, len(source_classes)]` (coarse), `flagged` and `novelty` `[cells]`: its ECE on the
    matched cells and the novelty rule's AUROC and flagged fractions."""
    from sklearn.metrics import f1_score, recall_score, roc_auc_score

    matched = np.isin(truth, source_classes)
    both = [c for c in source_classes if c in set(truth)]
    without = [c for c in source_classes if c not in set(truth)]
    y, p = truth[matched], predicted[matched]
    recall = recall_score(y, p, labels=both, average=None, zero_division=0)
    out = {
        "cells": int(matched.sum()),
        "accuracy": float((y == p).mean()),
        "errors": int((y != p).sum()),
        "macro_f1": float(f1_score(y, p, labels=both, average="macro", zero_division=0)),
        "no_counterpart": float(np.isin(p, without).mean()),
        "unmatched_cells": int((~matched).sum()),
        "per_class_recall": json.dumps(dict(zip(both, np.round(recall, 3).tolist()))),
    }
    if probs is not None:
        columns = list(source_classes)
        out["ece"] = expected_calibration_error(probs[matched], np.array([columns.index(c) for c in y]))
    if flagged is not None:
        calls_without = matched & np.isin(predicted, without)
        out.update(
            flagged_matched=float(flagged[matched].mean()),
            flagged_unmatched=float(flagged[~matched].mean()) if (~matched).any() else np.nan,
            flagged_no_counterpart=float(flagged[calls_without].mean()) if calls_without.any() else np.nan,
            novelty_auroc=float(roc_auc_score(~matched, novelty)) if 0 < matched.sum() < len(matched) else np.nan,
        )
    return out


def selected_methods(args):
    """The methods a run measures: `args.methods`, the adapt variants of `--adapt-shrinkage` and the smoothing
    variants of `--smooth-alpha`."""
    return [
        *args.methods,
        *(f"tfp_scmix+adapt(shrinkage={v:g})" for v in args.adapt_shrinkage or ()),
        *(f"tfp_scmix+smooth(alpha={v:g})" for v in args.smooth_alpha or ()),
    ]


def trained_model(source, args, seed, pair):
    """(the tfp_scmix model of `pair` trained on `source`, training seconds); with `--models DIR` it is saved
    there and loaded again by later runs of the same pair, seed and settings (adapt variants, other methods)."""
    settings = f"{args.genes}-{args.topics}-{args.classifier_steps}-{args.restarts}-{args.epochs}-{args.max_cells}"
    name = f"{pair.replace(' -> ', '_to_').replace('+', '_')}-seed{seed}-{settings}.keras"
    path = Path(args.models) / name if args.models else None
    if path is not None and path.is_file():
        return scm.load_model(path), float("nan")
    start = time.time()
    model = fit(source, args, seed)
    seconds = time.time() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        scm.save_model(model, path)
    return model, seconds


def pair_rows(sources, target, args, seed, cache):
    """Rows of every method in `args.methods` for one pair and seed; the first seed's confusion tables too."""
    source, query, truth = pair_data(sources, target, args.genes, args.max_cells)
    to_coarse = source_coarse(sources, source.classes)
    columns = [c for c in tissue_order(target) if c in set(to_coarse)]
    one_hot = (to_coarse[:, None] == np.array(columns, dtype=object)[None, :]).astype(float)
    base = {
        "part": "transfer",
        "pair": pair_name(sources, target),
        "source": "+".join(map(short, sources)),
        "target": short(target),
        "multi_source": len(sources) > 1,
        "seed": seed,
        "genes": source.n_genes,
        "source_cells": source.n_cells,
    }
    rows, predicted = [], {}
    # adapt with the offsets' prior scale fixed (`--adapt-shrinkage`): the lever of the gene-wise offsets.
    variants = {f"tfp_scmix+adapt(shrinkage={v:g})": v for v in args.adapt_shrinkage or ()}
    # smoothing with another weight of the neighbourhood (`--smooth-alpha`): how the default was chosen.
    alphas = {f"tfp_scmix+smooth(alpha={v:g})": v for v in args.smooth_alpha or ()}
    methods = [m for m in selected_methods(args) if m.startswith("tfp_scmix")]
    if methods:
        model, train_seconds = trained_model(source, args, seed, base["pair"])
        if sources == ("pbmc3k",) and target == "pbmc_sorted_zheng":
            cache[seed] = source, model, train_seconds  # the kang part starts from this model
        for method in methods:
            start = time.time()
            fitted = model
            if "+adapt" in method:
                shrinkage = variants.get(method)
                fitted = scm.adapt(
                    model, query, epochs=args.adapt_epochs, batch_size=args.batch_size, shrinkage=shrinkage
                )
            outputs = scm.predict(fitted, query)
            if "+smooth" in method:
                features = log_ratio_features(outputs["cell_topic"], len(model.members))
                alpha = alphas.get(method, SMOOTHING_ALPHA)
                outputs["probs"] = smooth(features, outputs["probs"], alpha=alpha)
                outputs["label"] = outputs["probs"].argmax(axis=1)
            probs = outputs["probs"] @ one_hot
            called = probs.argmax(1)
            if "+majority_voting" in method:  # the voted calls; the calibration stays the per-cell probabilities'
                features = log_ratio_features(outputs["cell_topic"], len(model.members))
                clusters = over_clusters(known_labels_features(query.counts, features))
                outputs["label"] = majority_vote(outputs["label"], clusters).astype(np.int64)
                called = (np.eye(len(source.classes))[outputs["label"]] @ one_hot).argmax(1)
            flagged = outputs["novelty"] > model.novelty.threshold
            predicted[method] = outputs["label"]
            rows.append(
                {
                    **base,
                    "method": method,
                    **scores(
                        truth,
                        np.array(columns, dtype=object)[called],
                        columns,
                        probs,
                        flagged,
                        outputs["novelty"],
                    ),
                    "restarts": len(model.members),
                    "seconds": train_seconds + time.time() - start,
                }
            )
    peers = [m for m in PEERS if m in args.methods]
    if peers:
        both = stack([source, dataclasses.replace(query, batch_names=[target])])
        visible = np.arange(source.n_cells)
        test = source.n_cells + np.arange(query.n_cells)
        for method in peers:
            start = time.time()
            try:
                ids = PEERS[method](both, visible, test, visible, seed)
            except RuntimeError as err:  # a peer whose environment cannot be built or that fails: say so, go on
                print(f"{pair_name(sources, target)} {method}: {err}", flush=True)
                continue
            predicted[method] = ids
            coarse = np.where(ids >= 0, to_coarse[np.clip(ids, 0, None)], "none")
            rows.append({**base, "method": method, **scores(truth, coarse, columns), "seconds": time.time() - start})
    for row in rows:
        print(
            f"{row['pair']:<28} seed {seed} {row['method']:<27} accuracy {row['accuracy']:.3f} "
            f"macro-F1 {row['macro_f1']:.3f} ({row['seconds']:.0f} s)",
            flush=True,
        )
    confusion = None
    if predicted and seed == args.seeds[0]:
        confusion = confusion_table(predicted, read_spec(target, args.max_cells).obs["cell_type"], source.classes)
        confusion.insert(0, "pair", base["pair"])
    return rows, confusion


def confusion_table(predicted, target_types, class_names):
    """Per method and target type, the fraction of its cells given each source class (rows sum to 1)."""
    frames = []
    names = np.asarray(list(class_names) + ["(none)"], dtype=object)
    for method, ids in predicted.items():
        labels = pd.Categorical(names[np.where(ids >= 0, ids, len(class_names))], categories=list(names))
        table = pd.crosstab(
            pd.Series(np.asarray(target_types, dtype=str), name="target_type"), labels, normalize="index", dropna=False
        )
        frames.append(table.round(3).reset_index().assign(method=method))
    frame = pd.concat(frames, ignore_index=True)
    return frame[["method", "target_type", *[c for c in names if c in frame]]]


def fit(data, args, seed, epochs=None):
    """tfp_scmix as the package ships it: `scm.train` with the default Config and restarts, except the settings
    given on the command line (`--topics`, `--classifier-steps`, `--restarts`, `--epochs`: quick checks)."""
    given = {"n_topics": args.topics, "classifier_steps": args.classifier_steps}
    config = scm.Config(**{k: v for k, v in given.items() if v is not None})
    restarts = {} if args.restarts is None else {"restarts": args.restarts}
    return scm.train(data, config, epochs=epochs or args.epochs, seed=seed, verbose=0, **restarts)


# -- summaries ----------------------------------------------------------------------------------------------
SCORES = [
    "accuracy",
    "macro_f1",
    "errors",
    "cells",
    "no_counterpart",
    "unmatched_cells",
    "ece",
    "novelty_auroc",
    "flagged_matched",
    "flagged_unmatched",
    "flagged_no_counterpart",
    "genes",
    "seconds",
]
GOALS = {"margin": 0.03, "adapt_cost": 0.01, "ece": 0.05}


def pair_means(rows):
    """Means over seeds of every score, one row per pair and method (pairs in the matrix's order)."""
    keys = ["pair", "source", "target", "multi_source", "method"]
    columns = [c for c in SCORES if c in rows and rows[c].notna().any()]
    table = rows.groupby(keys, sort=False)[columns].mean()
    table["seeds"] = rows.groupby(keys, sort=False)["seed"].nunique()
    return table.reset_index()


def ordered_methods(methods):
    """The methods present, in `METHODS` order, adapt and smoothing variants after the model's methods."""
    present = set(methods)
    variants = sorted(m for m in present if m.startswith(("tfp_scmix+adapt(", "tfp_scmix+smooth(")))
    order = [*MODEL_METHODS, *variants, *PEERS]
    return [m for m in order if m in present]


def by_pair(means, score):
    """`score` as a pair x method table (pairs in order, methods in `METHODS` order), with the best peer."""
    table = means.pivot(index="pair", columns="method", values=score)
    table = table.reindex(index=list(dict.fromkeys(means.pair)), columns=ordered_methods(means.method))
    peers = [m for m in PEERS if m in table]
    if peers:
        table["best peer"] = table[peers].max(axis=1)
    return table


def transfer_tables(rows):
    """{title: DataFrame} of the matrix (means over seeds): accuracy and macro-F1 by pair and method, the
    source x target matrix of each method, adapt's gains, novelty and calibration, and the multi-source rows."""
    means = pair_means(rows)
    seeds = sorted(map(int, rows.seed.unique()))
    tables = {}
    for score, name in (("accuracy", "coarse accuracy"), ("macro_f1", "macro-F1")):
        tables[f"Transfer, {name} by pair and method (seeds {seeds})"] = by_pair(means, score).round(3).reset_index()
    single = means[~means.multi_source.astype(bool)]
    for method in ordered_methods(single.method):
        matrix = single[single.method == method].pivot(index="source", columns="target", values="accuracy")
        order = [short(s) for t in TISSUES.values() for s in t]
        matrix = matrix.reindex(
            index=[o for o in order if o in matrix.index], columns=[o for o in order if o in matrix]
        )
        matrix = matrix.round(3).astype(object).where(matrix.notna(), "-")
        tables[f"Coarse accuracy of {method}: rows source, columns target"] = matrix.reset_index()
    model = means[means.method.str.startswith("tfp_scmix")]
    adapted = [m for m in ordered_methods(model.method) if m.startswith("tfp_scmix+adapt")]
    if "tfp_scmix" in set(model.method) and adapted:
        accuracy, f1, ece = (by_pair(model, score) for score in ("accuracy", "macro_f1", "ece"))
        table = {"accuracy": accuracy["tfp_scmix"], "ECE": ece["tfp_scmix"]}
        for method in adapted:
            name = method.removeprefix("tfp_scmix+")
            table[f"{name}: accuracy gain"] = accuracy[method] - accuracy["tfp_scmix"]
            table[f"{name}: macro-F1 gain"] = f1[method] - f1["tfp_scmix"]
            table[f"{name}: ECE"] = ece[method]
        tables["What adapt changes (minus tfp_scmix without it)"] = pd.DataFrame(table).round(3).reset_index()
    novelty = [c for c in SCORES[4:11] if c in model]
    if len(model):
        tables["Novelty rule and calibration of tfp_scmix per pair"] = model[["pair", "method", *novelty]].round(3)
    multi = means[means.target.isin(means[means.multi_source.astype(bool)].target)]
    if multi.multi_source.astype(bool).any():
        tables["Several sources with their batch ids against each alone"] = pd.concat(
            [
                by_pair(multi, "accuracy").round(3).add_suffix(" accuracy"),
                by_pair(multi, "macro_f1").round(3).add_suffix(" F1"),
            ],
            axis=1,
        ).T.reset_index(names="method")
    tables["The coarse label maps (matrix.TISSUES)"] = label_map_table()
    return tables


def label_rule_table(confusion, max_cells=None):
    """Coarse accuracy of every method when each cell's own label is mapped to its coarse class (the peers'
    rule; tfp_scmix's `accuracy` takes the largest of its probabilities summed into coarse classes), from the
    first seed's confusion table (fractions rounded to 3 decimals) and the target cells' types."""
    rows = []
    for pair, table in confusion.groupby("pair", sort=False):
        specs = {short(s): s for t in TISSUES.values() for s in t}
        sources, target = pair.split(" -> ")
        target_map = coarse_map(specs[target])
        merged = {k: v for s in sources.split("+") for k, v in coarse_map(specs[s]).items()}
        counts = read_spec(specs[target], max_cells).obs["cell_type"].astype(str).value_counts()
        for method, by_type in table.groupby("method", sort=False):
            right = total = 0.0
            for _, row in by_type.iterrows():
                coarse = target_map[row.target_type]
                if coarse not in set(merged.values()):
                    continue  # unmatched: left out, as in `scores`
                n = counts[row.target_type]
                right += n * sum(row[c] for c in merged if c in row and merged[c] == coarse and pd.notna(row[c]))
                total += n
            rows.append({"pair": pair, "method": method, "accuracy": right / total})
    frame = pd.DataFrame(rows)
    return frame.pivot(index="pair", columns="method", values="accuracy").reindex(
        index=list(dict.fromkeys(frame.pair)), columns=ordered_methods(frame.method)
    )


def transfer_goal_lines(rows):
    """The issue's goals, each with what was measured (means over seeds)."""
    means = pair_means(rows)
    single = means[~means.multi_source.astype(bool)]
    lines = [f"- transfer matrix: {single.pair.nunique()} pairs, seeds {sorted(map(int, rows.seed.unique()))}"]
    accuracy, f1 = by_pair(single, "accuracy"), by_pair(single, "macro_f1")
    if "best peer" in accuracy:
        # Only pairs on which peers ran are compared (a pair measured for tfp_scmix alone is listed, not scored).
        alone = accuracy.index[accuracy["best peer"].isna()]
        if len(alone):
            lines.append(f"- pairs without peer rows (not compared): {', '.join(alone)}")
        accuracy, f1 = accuracy.drop(index=alone), f1.drop(index=alone)
        for method in [m for m in MODEL_METHODS if m in accuracy]:
            ahead = ((accuracy[method] >= accuracy["best peer"]) & (f1[method] >= f1["best peer"])).sum()
            margin = accuracy[method] - accuracy["best peer"]
            lines.append(
                f"- {method}: accuracy and macro-F1 at least the best peer's on {ahead} of {len(accuracy)} pairs "
                f"(goal: every pair); mean margin over the best peer {margin.mean():+.3f} accuracy, "
                f"{(f1[method] - f1['best peer']).mean():+.3f} macro-F1 (goal >= +{GOALS['margin']}); "
                f"mean accuracy {accuracy[method].mean():.3f}, best peer's {accuracy['best peer'].mean():.3f}"
            )
        peers = [m for m in PEERS if m in accuracy and accuracy[m].notna().all()]  # measured on every pair
        best = accuracy[peers].mean().idxmax()
        lines.append(f"- best peer on average: {best} (mean accuracy {accuracy[best].mean():.3f})")
    for method in [m for m in accuracy if m.startswith("tfp_scmix+adapt")] if "tfp_scmix" in accuracy else []:
        gain = accuracy[method] - accuracy["tfp_scmix"]
        lines.append(
            f"- {method.removeprefix('tfp_scmix+')}: mean accuracy gain {gain.mean():+.3f} (goal > 0), worst pair "
            f"{gain.min():+.3f} ({gain.idxmin()}; goal >= -{GOALS['adapt_cost']}) over {gain.notna().sum()} pairs"
        )
    if "ece" in single:
        ece = by_pair(single[single.method.str.startswith("tfp_scmix")], "ece")
        for method in ece:
            values = ece[method].dropna()
            lines.append(
                f"- ECE {method}: at most {GOALS['ece']} on {(values <= GOALS['ece']).sum()} of {len(values)} pairs "
                f"(goal: every pair); worst {values.max():.3f} ({values.idxmax()})"
            )
    for sources, target in MULTI_SOURCE:
        multi = means[means.target == short(target)]
        name = pair_name(sources, target)
        if name not in set(multi.pair):
            continue
        table = by_pair(multi, "accuracy")
        for method in [m for m in MODEL_METHODS if m in table]:
            alone = table.loc[
                [pair_name((s,), target) for s in sources if pair_name((s,), target) in table.index], method
            ]
            lines.append(
                f"- {name}, {method}: accuracy {table.loc[name, method]:.3f} against "
                + ", ".join(f"{p.split(' ->')[0]} alone {v:.3f}" for p, v in alone.items())
                + " (goal: above each)"
            )
    return lines


def transfer_heatmap(rows, path):
    """One heatmap of coarse accuracy per method (rows source, columns target; the multi-source rows last), as a
    PNG at `path`, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfp_scmix.io import atomic_path

    means = pair_means(rows)
    methods = ordered_methods(means.method)
    order = [short(s) for t in TISSUES.values() for s in t]
    sources = [o for o in order if o in set(means.source)] + [s for s in dict.fromkeys(means.source) if s not in order]
    targets = [o for o in order if o in set(means.target)]
    columns = min(4, len(methods))
    n_rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(3.4 * columns, 3.2 * n_rows), squeeze=False)
    for index, (ax, method) in enumerate(zip(axes.flat, methods)):
        matrix = means[means.method == method].pivot(index="source", columns="target", values="accuracy")
        matrix = matrix.reindex(index=sources, columns=targets)
        image = ax.imshow(matrix.to_numpy(dtype=float), vmin=0.5, vmax=1.0, cmap="viridis")
        for (i, j), value in np.ndenumerate(matrix.to_numpy(dtype=float)):
            if np.isfinite(value):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < 0.8 else "black",
                )
        ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(sources)), sources, fontsize=7)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("target", fontsize=7)
        if index % columns == 0:  # the first column's (the source names of the others would cover it)
            ax.set_ylabel("source", fontsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.suptitle(
        f"Coarse accuracy, rows source, columns target (seeds {sorted(map(int, rows.seed.unique()))})", fontsize=10
    )
    fig.tight_layout()
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, pad=0.02)  # the scale every panel shares
    bar.set_label("coarse accuracy (0.5 and below: darkest)", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
