"""Cross-dataset benchmark: label transfer, stability under stimulation, unknown cell types, calibration.

    ./run experiments.cross_dataset.run                                # every part, seed 0
    ./run experiments.cross_dataset.run --parts transfer --seeds 0 1 2  # the transfer matrix

Parts (docs/cross_dataset.md says what each number means):
- transfer: the transfer matrix (matrix.py): train on every label of one dataset (or of several with their
  batch ids) and annotate another of the same tissue over the genes they share, for every ordered pair of
  pbmc3k, pbmc_sorted_zheng and pbmc68k_reduced, both ways between the two Baron mice, and pbmc3k +
  pbmc_sorted_zheng -> pbmc68k_reduced; tfp_scmix without and with `adapt`, smoothed over the target's cells
  (`+smooth`: `annotate(..., smooth=True)`), and the peers (logistic regression, linear SVM, kNN on PCA,
  CellTypist, scANVI with scArches query mapping) on the same cells and genes, scored through one coarse label
  map per tissue. `--pairs`, `--methods` and `--seeds` choose what to measure; rows of
  other pairs, methods and seeds are kept, so the matrix can be filled in several runs.
- kang: the pbmc3k model of `transfer`, adapted to kang_ctrl, labels its cells (those it leaves unassigned
  stay unlabelled); a model trained on kang_ctrl (its own most variable genes) with those labels predicts
  kang_stim without and with `adapt`, beside the peers trained on the same labels. Both conditions hold
  the same donors' cells, so a stable annotation keeps the type proportions.
- unknown: pbmc3k split in half (numpy `default_rng(seed).permutation`); for each class, a model trained on
  the training half without that class's cells; on the held-out half, the AUROC of the unassigned score
  (left-out cells against known ones) and the fraction of known cells flagged at the default threshold.
- calibration: a model trained on the training half with every class; ECE and a reliability diagram on
  the held-out half (the cross-dataset ECE is part of `transfer`).
Writes results.csv (one row per part, method, seed, pair and left-out class; rows of parts not run this time
are kept), results.md (goals, the matrices, summary tables), transfer_matrix.png (a heatmap of coarse accuracy
per method), transfer_confusion.csv and reliability_pbmc3k.png into `--out` (this folder by default), and
records the rows as MLflow runs of the experiment "cross_dataset" when MLflow is installed.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

import tfp_scmix as scm
from experiments import common
from experiments.common import markdown_table, most_variable, read_dataset, record_results, write_text
from experiments.cross_dataset.matrix import (
    METHODS,
    MULTI_SOURCE,
    PAIRS,
    PBMC,
    fit,
    label_rule_table,
    pair_data,
    pair_name,
    pair_rows,
    selected_methods,
    stack,
    transfer_goal_lines,
    transfer_heatmap,
    transfer_tables,
)
from experiments.few_shot.run import knn_pca, linear_svm, logistic_regression
from tfp_scmix.data import SCData, from_anndata
from tfp_scmix.evaluate import (
    UNASSIGNED_SCORES,
    UNASSIGNED_THRESHOLDS,
    TopicNovelty,
    expected_calibration_error,
    reliability_diagram,
    unassigned,
    unassigned_score,
)
from tfp_scmix.io import write_csv

HERE = Path(__file__).parent
PARTS = ("transfer", "kang", "unknown", "calibration")
REFERENCE, QUERY, KANG_CTRL, KANG_STIM = "pbmc3k", "pbmc_sorted_zheng", "kang_ctrl", "kang_stim"
PEERS = {"logistic_regression": logistic_regression, "linear_svm": linear_svm, "knn_pca": knn_pca}

QUERY_COARSE = PBMC[QUERY]  # the sorted set's coarse classes (label_definitions.py)
GOALS = {"transfer_accuracy": 0.95, "unknown_auroc": 0.9, "ece_in_dataset": 0.03}


def read(name, args):
    """AnnData of dataset `name` (from $TFP_SCMIX_DATA); `args.max_cells` random cells of it when set."""
    return read_dataset(name, args.max_cells)


def without_class(data: SCData, label: int, keep_cells=False) -> SCData:
    """`data` with class `label` removed from its classes: its cells dropped, or kept unlabelled."""
    if not keep_cells:
        data = data.subset(data.labels != label)
    labels = np.where(data.labels == label, -1, data.labels - (data.labels > label)).astype(np.int32)
    return dataclasses.replace(data, labels=labels, classes=[c for i, c in enumerate(data.classes) if i != label])


def adapt(model, data, args):
    """Predictions for `data` of `model` adapted to it (its own batch offsets fitted)."""
    return scm.predict(scm.adapt(model, data, epochs=args.adapt_epochs, batch_size=args.batch_size), data)


def peer_predictions(train: SCData, query: SCData, seed):
    """{peer: class ids `[query cells]`}: peers fitted on the labelled cells of `train`; kNN's PCA sees
    only `train`'s cells, as the unadapted model does."""
    both = stack([train, query])
    labelled = np.flatnonzero(train.labels >= 0)
    visible, test = np.arange(train.n_cells), train.n_cells + np.arange(query.n_cells)
    out = {}
    for name, peer in PEERS.items():
        start = time.time()
        out[name] = (peer(both, visible, test, labelled, seed), time.time() - start)
    return out


# -- label transfer: the matrix of pairs (matrix.py) -------------------------------------------------------
def reference_model(args, seed, cache):
    """pbmc3k, every cell labelled, over the `args.genes` most variable of its genes that the sorted set also
    measures, and the model trained on it: the matrix's pbmc3k -> sorted model (kept in `cache` for the kang part)."""
    if seed not in cache:
        source, _, _ = pair_data((REFERENCE,), QUERY, args.genes, args.max_cells)
        start = time.time()
        cache[seed] = source, fit(source, args, seed), time.time() - start
    return cache[seed]


def transfer(args, seed, cache, out):
    """The matrix's rows for `seed` (`selected_pairs`), one pair at a time; the first seed's confusions."""
    path = out / "transfer_confusion.csv"
    for sources, target in selected_pairs(args):
        rows, confusion = pair_rows(sources, target, args, seed, cache)
        if confusion is not None:
            kept = pd.read_csv(path) if path.is_file() else confusion.iloc[:0]
            kept = kept if "pair" in kept else confusion.iloc[:0]  # the one-pair benchmark's table: replaced
            kept = kept[~(kept.pair.isin(confusion.pair) & kept.method.isin(confusion.method))]
            write_csv(pd.concat([kept, confusion], ignore_index=True), path)
        yield rows


def selected_pairs(args):
    """The pairs to run: `PAIRS` (and `MULTI_SOURCE` unless --no-multi-source), those named by --pairs only."""
    pairs = PAIRS + ([] if args.no_multi_source else MULTI_SOURCE)
    if args.pairs:
        names = {pair_name(s, t): (s, t) for s, t in pairs}
        unknown = sorted(set(args.pairs) - set(names))
        if unknown:
            raise ValueError(f"--pairs {unknown} are not pairs of the matrix; choose among {sorted(names)}")
        pairs = [names[name] for name in args.pairs]
    return pairs


# -- stability under interferon stimulation -----------------------------------------------------------------
def proportions(labels, n_classes):
    return np.bincount(labels, minlength=n_classes) / max(len(labels), 1)


def kang(args, seed, cache, out):
    _, reference, _ = reference_model(args, seed, cache)
    ctrl_adata, stim_adata = read(KANG_CTRL, args), read(KANG_STIM, args)
    # Labels for kang_ctrl from the pbmc3k model adapted to it; cells it leaves unassigned stay unlabelled.
    from_reference = adapt(reference, from_anndata(ctrl_adata, label_key=None, genes=reference.genes), args)
    confident = ~unassigned(from_reference["probs"], "entropy", threshold=args.pseudo_label_entropy)
    if not confident.any():
        raise ValueError(
            f"the pbmc3k model is unsure of every kang_ctrl cell (normalised entropy above "
            f"{args.pseudo_label_entropy}): train it longer or raise --pseudo-label-entropy"
        )
    ctrl = from_anndata(ctrl_adata, label_key=None)
    ctrl = most_variable(ctrl, args.genes)
    ctrl = dataclasses.replace(
        ctrl,
        labels=np.where(confident, from_reference["label"], -1).astype(np.int32),
        classes=list(reference.class_names),
    )
    start = time.time()
    model = fit(ctrl, args, seed)
    train_seconds = time.time() - start
    stim = from_anndata(stim_adata, label_key=None, genes=model.genes)
    # The direct route for comparison: the pbmc3k model adapted to kang_stim.
    direct = adapt(reference, from_anndata(stim_adata, label_key=None, genes=reference.genes), args)["label"]

    base = {
        "part": "kang",
        "dataset": f"{KANG_CTRL} -> {KANG_STIM}",
        "seed": seed,
        "genes": model.n_genes,
        "labelled": float(confident.mean()),
    }
    n_classes = model.n_classes
    ctrl_out = scm.predict(model, ctrl)
    rows = []
    for method in ("tfp_scmix", "tfp_scmix+adapt"):
        start = time.time()
        stim_out = adapt(model, stim, args) if method.endswith("adapt") else scm.predict(model, stim)
        rows.append(
            {
                **base,
                "method": method,
                "composition_tvd": 0.5
                * float(
                    np.abs(proportions(ctrl_out["label"], n_classes) - proportions(stim_out["label"], n_classes)).sum()
                ),
                "agreement_pbmc3k": float((stim_out["label"] == direct).mean()),
                "ctrl_confidence": float(np.nanmean(ctrl_out["confidence"])),
                "stim_confidence": float(np.nanmean(stim_out["confidence"])),
                "ctrl_unassigned": float(unassigned(ctrl_out["probs"]).mean()),
                "stim_unassigned": float(unassigned(stim_out["probs"]).mean()),
                "stim_composition": json.dumps(
                    dict(zip(model.class_names, np.round(proportions(stim_out["label"], n_classes), 3).tolist()))
                ),
                "epochs": args.epochs,
                "seconds": train_seconds + time.time() - start,
            }
        )
    both = stack([ctrl, stim])
    for method, (predicted, seconds) in peer_predictions(ctrl, both, seed).items():
        ctrl_pred, stim_pred = predicted[: ctrl.n_cells], predicted[ctrl.n_cells :]
        rows.append(
            {
                **base,
                "method": method,
                "composition_tvd": 0.5
                * float(np.abs(proportions(ctrl_pred, n_classes) - proportions(stim_pred, n_classes)).sum()),
                "agreement_pbmc3k": float((stim_pred == direct).mean()),
                "stim_composition": json.dumps(
                    dict(zip(model.class_names, np.round(proportions(stim_pred, n_classes), 3).tolist()))
                ),
                "seconds": seconds,
            }
        )
    yield rows


# -- unknown cell types and in-dataset calibration -----------------------------------------------------------
def split_reference(args, seed, cache):
    """pbmc3k over its `args.genes` most variable genes (counts only), and a half/half (train, test) split."""
    key = ("split", seed)
    if key not in cache:
        data = from_anndata(read(REFERENCE, args))
        data = most_variable(data, args.genes)
        order = np.random.default_rng(seed).permutation(data.n_cells)
        cache[key] = data, order[data.n_cells // 2 :], order[: data.n_cells // 2]
    return cache[key]


def unknown(args, seed, cache, out):
    from sklearn.metrics import roc_auc_score

    data, train, test = split_reference(args, seed, cache)
    held_out = data.subset(test)
    rows = []
    for name in args.left_out or data.classes:
        if name not in data.classes:
            raise ValueError(f"--left-out {name!r} is not a pbmc3k class; choose among {data.classes}")
        label = data.classes.index(name)
        novel = held_out.labels == label
        known_truth = held_out.labels[~novel] - (held_out.labels[~novel] > label)
        for setting in args.unknown_settings:
            start = time.time()
            # main: every cell's counts train the topics, labels of the known training cells only;
            # inductive: the training half without the left-out class's cells.
            training = (
                without_class(data.hide_labels(train), label, keep_cells=True)
                if setting == "main"
                else without_class(data.subset(train), label)
            )
            model = fit(training, args, seed, epochs=args.unknown_epochs)
            outputs = scm.predict(model, held_out)
            labelled = training.subset(training.labels >= 0)
            novelty = TopicNovelty.fit(scm.predict(model, labelled)["cell_topic"], labelled.labels)
            scores = {
                score: (unassigned_score(outputs["probs"], score), unassigned(outputs["probs"], score))
                for score in UNASSIGNED_SCORES
            }
            scores["topic_distance"] = (novelty.score(outputs["cell_topic"]), novelty.unassigned(outputs["cell_topic"]))
            names, counts = np.unique(np.asarray(model.class_names)[outputs["label"][novel]], return_counts=True)
            for score, (values, flagged) in scores.items():
                rows.append(
                    {
                        "part": "unknown",
                        "dataset": f"{REFERENCE} held-out half",
                        "method": "tfp_scmix",
                        "setting": setting,
                        "seed": seed,
                        "left_out": name,
                        "score": score,
                        "novel_cells": int(novel.sum()),
                        "auroc": float(roc_auc_score(novel, values)),
                        "flagged_known": float(flagged[~novel].mean()),
                        "flagged_novel": float(flagged[novel].mean()),
                        "accuracy": float((outputs["label"][~novel] == known_truth).mean()),
                        "novel_predicted_as": f"{names[counts.argmax()]} ({counts.max() / novel.sum():.0%})",
                        "genes": model.n_genes,
                        "epochs": args.unknown_epochs,
                        "seconds": time.time() - start,
                    }
                )
            print(
                f"unknown {setting:<9} {name:<18} AUROC "
                + ", ".join(f"{r['score']} {r['auroc']:.3f}" for r in rows[-len(scores) :])
                + f"; left-out cells mostly called {rows[-1]['novel_predicted_as']}",
                flush=True,
            )
    yield rows


def calibration(args, seed, cache, out):
    data, train, test = split_reference(args, seed, cache)
    start = time.time()
    model = fit(data.subset(train), args, seed)
    held_out = data.subset(test)
    probs = scm.predict(model, held_out)["probs"]
    if seed == args.seeds[0]:
        reliability_diagram(
            probs, held_out.labels, out / f"reliability_{REFERENCE}.png", title=f"{REFERENCE} held-out half"
        )
    yield [
        {
            "part": "calibration",
            "dataset": f"{REFERENCE} held-out half",
            "method": "tfp_scmix",
            "seed": seed,
            "ece": expected_calibration_error(probs, held_out.labels),
            "accuracy": float((probs.argmax(axis=1) == held_out.labels).mean()),
            "mean_confidence": float(probs.max(axis=1).mean()),
            "genes": model.n_genes,
            "epochs": args.epochs,
            "seconds": time.time() - start,
        }
    ]


# -- results -----------------------------------------------------------------------------------------------
def summary_tables(frame):
    """{section title: summary DataFrame} of the parts present in the results `frame` (means over seeds)."""
    tables = {}

    def mean_over_seeds(part, keys, columns):
        rows = frame[frame.part == part]
        columns = [c for c in columns if c in rows and rows[c].notna().any()]
        table = rows.groupby(keys, sort=False)[columns].mean().round(3)
        table["seeds"] = rows.groupby(keys, sort=False)["seed"].nunique()
        return table.reset_index()

    if (frame.part == "transfer").any():
        tables.update(transfer_tables(frame[frame.part == "transfer"]))
    if (frame.part == "kang").any():
        tables["Stability kang_ctrl -> kang_stim"] = mean_over_seeds(
            "kang",
            ["method"],
            [
                "composition_tvd",
                "agreement_pbmc3k",
                "ctrl_confidence",
                "stim_confidence",
                "ctrl_unassigned",
                "stim_unassigned",
                "labelled",
                "seconds",
            ],
        )
    if (frame.part == "unknown").any():
        table = mean_over_seeds(
            "unknown",
            ["setting", "left_out", "score"],
            ["auroc", "flagged_known", "flagged_novel", "accuracy", "novel_cells"],
        )
        tables["Unknown cell types (pbmc3k, one class left out): AUROC of each unassigned score"] = (
            table.pivot(index=["setting", "left_out"], columns="score", values="auroc").round(3).reset_index()
        )
        tables["Unknown cell types: fraction of known and of left-out cells flagged at the default thresholds"] = (
            table.pivot(
                index=["setting", "left_out"], columns="score", values=["flagged_known", "flagged_novel"]
            ).round(3)
        )
    if (frame.part == "calibration").any():
        tables["Calibration in-dataset (pbmc3k held-out half)"] = mean_over_seeds(
            "calibration", ["method"], ["ece", "accuracy", "mean_confidence", "seconds"]
        )
    return tables


def goal_lines(frame):
    lines = []
    if (frame.part == "transfer").any():
        lines += transfer_goal_lines(frame[frame.part == "transfer"])
    unknown_rows = frame[frame.part == "unknown"]
    for (setting, score), rows in unknown_rows.groupby(["setting", "score"], sort=False) if len(unknown_rows) else []:
        by_class = rows.groupby("left_out")["auroc"].mean()
        flagged = rows["flagged_known"].mean()
        lines.append(
            f"- unknown types ({setting} setting, {score} score): lowest AUROC {by_class.min():.3f} "
            f"({by_class.idxmin()}), {int((by_class >= GOALS['unknown_auroc']).sum())} of {len(by_class)} "
            f"classes reach the goal >= {GOALS['unknown_auroc']}; known cells flagged {flagged:.3f}"
        )
    ece = frame[(frame.part == "calibration")]["ece"] if "ece" in frame else []
    if len(ece):
        lines.append(f"- in-dataset ECE: {ece.mean():.3f} (goal <= {GOALS['ece_in_dataset']})")
    return lines


def write_summary(frame, path, max_cells=None):
    text = [
        "# Cross-dataset benchmark",
        "",
        "Written by `experiments/cross_dataset/run.py`; docs/cross_dataset.md explains the protocol and "
        "the columns. Means over seeds.",
        "",
        *goal_lines(frame),
        "",
    ]
    tables = summary_tables(frame)
    confusion_path = Path(path).parent / "transfer_confusion.csv"
    if (frame.part == "transfer").any() and confusion_path.is_file():
        table = label_rule_table(pd.read_csv(confusion_path), max_cells).round(3).reset_index()
        tables[
            "Coarse accuracy with each cell's own label mapped to its coarse class (the peers' rule; first seed)"
        ] = table
    for title, table in tables.items():
        if isinstance(table.columns, pd.MultiIndex):
            table.columns = [f"{score} {name}" for name, score in table.columns]
            table = table.reset_index()
        text += [f"## {title}", "", markdown_table(table), ""]
    write_text(path, "\n".join(text))
    print("\n".join(text))


def run(parts, args, out=HERE):
    """Run `parts` for every seed; rows not measured again are kept from `out`/results.csv (`replaced`)."""
    out.mkdir(parents=True, exist_ok=True)
    rows, cache = [], {}

    def table():
        # Read again at every write: another run filling other pairs or methods into the same folder keeps its rows.
        kept = pd.read_csv(out / "results.csv") if (out / "results.csv").is_file() else pd.DataFrame({"part": []})
        kept = kept if args.summary_only else kept[~replaced(kept, parts, args)]
        return pd.concat([f for f in (kept, pd.DataFrame(rows)) if len(f)], ignore_index=True).astype({"seed": int})

    if args.merge:
        merge_results([pd.read_csv(p) for p in args.merge], out / "results.csv")
    for part in [] if args.summary_only else parts:
        for seed in args.seeds:
            start = time.time()
            for new_rows in PART_FUNCTIONS[part](args, seed, cache, out):
                rows += new_rows
                # Keep what has been measured even if a later pair or part is interrupted.
                write_csv(table(), out / "results.csv")
            print(f"{part} seed {seed}: {time.time() - start:.0f} s", flush=True)
    frame = table()
    if (frame.part == "transfer").any():
        transfer_heatmap(frame[frame.part == "transfer"], out / "transfer_matrix.png")
    write_summary(frame, out / "results.md", args.max_cells)
    return frame


def merge_results(frames, path):
    """Rows of `frames` (results of runs written elsewhere, --merge) into the results file at `path`, each
    replacing the row of the same part, pair, method, seed and left-out class and score there."""
    keys = ["part", "pair", "method", "seed", "left_out", "score", "setting"]
    merged = pd.concat([pd.read_csv(path), *frames] if path.is_file() else frames, ignore_index=True)
    present = [k for k in keys if k in merged]
    merged = merged.drop_duplicates(subset=present, keep="last") if present else merged
    write_csv(merged.reset_index(drop=True), path)


def replaced(kept, parts, args):
    """`[rows]` bool: the rows of `kept` this run measures again. Every row of a part that runs, except, in the
    transfer matrix, rows of other seeds, pairs or methods than the ones selected (rows of the one-pair
    benchmark before the matrix, without a `pair`, are replaced)."""
    mask = kept.part.isin(parts).to_numpy()
    if "transfer" in parts and (kept.part == "transfer").any():
        names = [pair_name(s, t) for s, t in selected_pairs(args)]
        pair = kept["pair"] if "pair" in kept else pd.Series(np.nan, index=kept.index)
        again = pair.isna() | (pair.isin(names) & kept.method.isin(selected_methods(args)) & kept.seed.isin(args.seeds))
        mask &= ((kept.part != "transfer") | again).to_numpy()
    return mask


PART_FUNCTIONS = {"transfer": transfer, "kang": kang, "unknown": unknown, "calibration": calibration}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--epochs",
        type=common.positive_int,
        help="epochs of the transfer, kang and calibration models (default: the package's)",
    )
    parser.add_argument(
        "--pairs", nargs="+", help='transfer pairs to run, by name ("pbmc3k -> pbmc_sorted_zheng"; default: all)'
    )
    parser.add_argument("--no-multi-source", action="store_true", help="leave out the multi-source transfer rows")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, help="transfer methods (default: all)"
    )
    parser.add_argument(
        "--unknown-epochs", type=common.positive_int, default=50, help="epochs of each left-one-out model"
    )
    parser.add_argument(
        "--unknown-settings",
        nargs="+",
        default=["main"],
        choices=["main", "inductive"],
        help="main: every cell's counts train the topics (left-out cells unlabelled); "
        "inductive: the left-out cells are never seen",
    )
    parser.add_argument("--adapt-epochs", type=common.positive_int, default=30)
    parser.add_argument(
        "--adapt-shrinkage",
        nargs="+",
        type=float,
        help="also adapt with the offsets' prior scale fixed at each value (methods tfp_scmix+adapt(shrinkage=v))",
    )
    parser.add_argument(
        "--smooth-alpha",
        nargs="+",
        type=float,
        help="also smooth with the neighbourhood's weight at each value (methods tfp_scmix+smooth(alpha=v))",
    )
    parser.add_argument("--models", help="save the transfer models here and load them again in later runs")
    parser.add_argument("--classifier-steps", type=common.positive_int, help="default: the package's")
    parser.add_argument(
        "--pseudo-label-entropy",
        type=float,
        default=UNASSIGNED_THRESHOLDS["entropy"],
        help="kang_ctrl cells whose normalised entropy under the pbmc3k model exceeds this stay unlabelled",
    )
    parser.add_argument("--left-out", nargs="+", help="pbmc3k classes to leave out in turn (default: all)")
    parser.add_argument("--genes", type=common.positive_int, default=2000, help="highly variable genes")
    parser.add_argument("--topics", type=common.positive_int, help="default: the package's")
    parser.add_argument(
        "--restarts",
        type=common.positive_int,
        help="models averaged (default: the package's, 3; the unknown and calibration rows were measured with 1)",
    )
    parser.add_argument("--batch-size", type=common.positive_int, default=256)
    parser.add_argument(
        "--max-cells",
        type=common.positive_int,
        help="use at most this many random cells of each dataset (quick checks)",
    )
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--merge", nargs="+", help="results.csv files of runs written elsewhere: their rows replace the same rows here"
    )
    parser.add_argument(
        "--summary-only", action="store_true", help="measure nothing: write results.md and the heatmap from results.csv"
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    out = common.output_folder(parser, args.out)
    try:
        selected_pairs(args)  # a misnamed pair: a usage error before anything is read (a trial got a traceback)
    except ValueError as err:
        parser.error(str(err))
    frame = run(args.parts, args, out)
    if not args.no_mlflow:
        runs = record_results(out / "results.csv", "cross_dataset")
        if runs is not None:
            print(f"{len(runs)} new MLflow run(s) in experiment 'cross_dataset'")
    return frame


if __name__ == "__main__":
    main()
