"""Command line: `tfp-scmix demo | train | annotate | explain | export` (also `python -m tfp_scmix`).

Only argument parsing and printing: every command calls the library (`train`, `predict`, `annotate`,
`explain`, `save_model` / `load_model`, `export_serving`). TensorFlow is imported only by the commands that
need it, so `--help` and `--version` answer at once; its log lines are hidden unless `--verbose 2`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import tfp_scmix as scm
from tfp_scmix.config import PRIORS, Config
from tfp_scmix.distribute import STRATEGIES


def demo(args) -> dict:
    from tfp_scmix import explain
    from tfp_scmix.annotate import with_labels_probs
    from tfp_scmix.datasets import pbmc68k_reduced
    from tfp_scmix.evaluate import few_shot_split, graph_peers, linear_peers, scores

    data = scm.from_anndata(pbmc68k_reduced())
    test, labelled = few_shot_split(data.n_cells, data.n_cells - args.labels, args.labels, args.seed)
    print(
        f"embedded pbmc68k_reduced: {data.n_cells} cells x {data.n_genes} genes, {data.n_classes} types; "
        f"{args.labels} labelled cells, {len(test)} held-out cells (their counts used without labels)"
    )
    start = time.time()
    config = scm.Config(
        n_topics=args.topics,
        batch_size=args.batch_size,
        epochs=args.epochs,
        classifier_steps=args.classifier_steps,
        kl_warmup_epochs=args.kl_warmup_epochs,
    )
    model = scm.train(data.hide_labels(labelled), config, restarts=args.restarts, seed=args.seed, verbose=args.verbose)
    if not args.verbose:  # at verbose >= 1 train's own summary line says how long it took
        print(f"trained in {time.time() - start:.0f} s")
    predicted = scm.predict(model, data.subset(test))["label"]
    result = scores(data.labels[test], predicted)
    print(
        f"held-out cells: accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f} "
        f"({result['errors']} errors of {len(test)})"
    )
    # The call with the 150 known labels, as `annotate(model, adata, label_key=...)` makes it.
    probs = with_labels_probs(model, data.hide_labels(labelled))
    with_labels = scores(data.labels[test], probs[test].argmax(axis=1))
    print(
        "  with the known labels and the neighbours' pooled counts (annotate label_key): "
        f"accuracy {with_labels['accuracy']:.3f}, "
        f"macro-F1 {with_labels['macro_f1']:.3f} ({with_labels['errors']} errors)"
    )
    # The strongest peers of the few-shot suite on the same split (docs/few_shot.md has the whole suite).
    peers = linear_peers(data, labelled, test, args.seed) | graph_peers(data, labelled, test, args.seed)
    for name, peer in peers.items():
        print(
            f"  peer {name.replace('_', ' ')}: accuracy {peer['accuracy']:.3f}, macro-F1 {peer['macro_f1']:.3f} "
            f"({peer['errors']} errors)"
        )
    # The gene term carries most of each call (docs/few_shot.md, "The gene term"): its genes first.
    weights = explain.class_gene_weights(model, n_genes=args.top_genes)
    print(
        "\nGenes that weigh most for each class (the classifier's gene weights, against the other classes; "
        f"in brackets the class's labelled cells, * under {explain.FEW_LABELS}: too few to rely on):"
    )
    counts = explain.labelled_cells(model)
    shown = {c: f"{c} ({counts[c]}{'*' if counts[c] < explain.FEW_LABELS else ''})" for c in model.class_names}
    for cls, rows in weights.groupby("class", sort=False):
        print(f"  {shown[cls]:<33} {' '.join(rows.gene)}")
    genes = explain.class_genes(model, n_genes=args.top_genes)
    print(
        "\nTop genes of each class's highest-weight topic (gene programs of its cells; the topic weights are nearly "
        "zero, so the gene weights above carry the call: README):"
    )
    for (cls, topic), rows in genes.groupby(["class", "topic"], sort=False):
        print(f"  {shown[cls]:<33} {topic:<12} {' '.join(rows.gene)}")
    out = Path(args.out)
    scm.save_model(model, out / "model.keras")
    explain.write_explanations(model, out / "explanations")
    print(f"\nmodel and explanation tables/figures written to {out}/")
    return result


# With --stream, the highly variable genes (--n-genes) are chosen on at most this many cells sampled from the file.
HVG_SAMPLE_CELLS = 20_000


def train(args) -> None:
    import numpy as np

    from tfp_scmix.data import DataError
    from tfp_scmix.io import check_model_path
    from tfp_scmix.stream import H5ADStream

    check_model_path(args.out)  # before hours of training, not after
    existing = existing_output(args)
    if existing:
        raise FileExistsError(existing)
    if args.mlflow:
        from tfp_scmix import tracking

        tracking.check_store()
    options = dict(
        counts=args.counts,
        label_key=args.label_key,
        batch_key=args.batch_key,
        unknown=args.unknown or (),
        unlabeled_category=args.unlabeled_category,
    )
    data: scm.SCData | H5ADStream
    if args.stream:
        if args.shared_genes:
            raise DataError("--shared-genes selects genes in memory: leave out --stream, or subset the file first")
        data = H5ADStream(args.data, **options)
        if args.n_genes and data.n_genes > args.n_genes:  # chosen on a sample of the cells, read from the file
            sample = np.random.default_rng(args.seed).permutation(data.n_cells)[:HVG_SAMPLE_CELLS]
            cells = data.to_data(sample)
            genes = scm.data.highly_variable_genes(cells.counts, cells.genes, args.n_genes)
            say(args, f"{len(genes)} highly variable genes, chosen on {cells.n_cells} cells of the file")
            data = H5ADStream(args.data, genes=genes, **options)
    else:
        data = scm.from_anndata(args.data, **options)
        if args.shared_genes:
            data = data.select_genes(shared_genes(data.genes, args.shared_genes, verbose=args.verbose))
        if args.n_genes and data.n_genes > args.n_genes:
            data = data.select_genes(scm.data.highly_variable_genes(data.counts, data.genes, args.n_genes))
    summary = f"{data.n_labelled} labelled cells of {data.n_classes} types"
    say(args, f"{data.n_cells} cells x {data.n_genes} genes; {summary}")
    config = scm.Config(
        n_topics=args.topics,
        prior=args.prior,
        epochs=args.epochs,
        batch_size=args.batch_size,
        classifier_steps=args.classifier_steps,
        kl_warmup_epochs=args.kl_warmup_epochs,
    )
    checkpoints = Path(args.checkpoint_dir or checkpoint_dir(args.out))
    model = scm.train(
        data,
        config,
        restarts=args.restarts,
        seed=args.seed,
        verbose=args.verbose,
        strategy=args.strategy,
        checkpoint_dir=checkpoints,
    )
    if args.strategy is None or scm.distribute.is_chief(scm.distribute.get_strategy(args.strategy)):
        scm.save_model(model, args.out)
        args.written = args.out  # what an interrupt from here on leaves whole (`interrupted`)
        say(args, f"model written to {args.out}")
        shutil.rmtree(checkpoints, ignore_errors=True)  # the finished restarts train kept: the model is saved
        if args.mlflow:
            from tfp_scmix import tracking

            run = tracking.log_training(model, data, experiment=args.mlflow_experiment, dataset_path=args.data)
            say(args, f"MLflow run {run} logged to experiment {args.mlflow_experiment!r} ({tracking.tracking_uri()})")


# Fewer shared genes than this cannot train a model worth the name (the package selects 2,000 by default).
MIN_SHARED_GENES = 50


def shared_genes(genes, paths, verbose: int = 1) -> list[str]:
    """The genes of `genes` that every dataset of `paths` also measures (their var_names; an .h5ad is opened
    backed, its counts unread), in the order of `genes`. Raises DataError when fewer than `MIN_SHARED_GENES` are
    left (unless every gene is), or fewer than half where the two name genes differently (`data.naming_hint`:
    Ensembl IDs against symbols, another species), with that hint."""
    import numpy as np
    import pandas as pd

    from tfp_scmix.data import DataError

    kept = pd.Index(np.asarray(genes, dtype=str))
    for path in paths:
        if str(path).endswith(".h5ad"):
            other = scm.data.read_h5ad(path, backed="r")
            names = pd.Index(np.asarray(other.var_names, dtype=str))
            other.file.close()
        else:
            names = pd.Index(np.asarray(scm.read(path).var_names, dtype=str))
        before, shared = kept, kept[kept.isin(names)]
        if verbose:
            print(f"{len(shared)} of {len(before)} genes are also in {path}")
        hint = scm.data.naming_hint(names, before) if len(shared) < len(before) / 2 else ""
        if hint or len(shared) < min(MIN_SHARED_GENES, len(before)):  # a small panel shared whole is fine
            raise DataError(
                f"only {len(shared)} of the training data's {len(before)} genes are in {path}, too few to train a "
                f"model for it (at least {MIN_SHARED_GENES}).{hint or ' Check that both name genes alike.'}"
            )
        kept = shared
    return list(kept)


def say(args, text: str) -> None:
    """Print a status line of a command (standard output) unless it runs with `--verbose 0`."""
    if args.verbose:
        print(text)


def checkpoint_dir(out: str | Path) -> Path:
    """`train`'s default backup folder for a model written to `out`: `.NAME.checkpoints` beside it, so that
    the same command run again after a kill resumes from the last finished epoch."""
    out = Path(out)
    return out.with_name(f".{out.name}.checkpoints")


def annotate(args) -> None:
    from tfp_scmix.annotate import write_h5ad
    from tfp_scmix.data import DataError

    if not str(args.out).endswith(".h5ad"):  # before the work: the output is an AnnData whatever its name
        raise DataError(f"--out {args.out} must end in .h5ad: annotate writes an AnnData (e.g. --out annotated.h5ad)")
    model = scm.load_model(args.model)
    # An .h5ad is opened backed: its counts are read a chunk at a time and never enter memory whole, in
    # annotate or in writing. Other formats (10x folders, .h5, .loom: `tfp_scmix.read`) are read into memory.
    backed = str(args.data).endswith(".h5ad")
    adata = scm.data.read_h5ad(args.data, backed="r") if backed else scm.read(args.data)
    try:
        if args.adapt:  # the dataset's own batch offsets first (its counts read into memory)
            model = scm.adapt(model, adata, counts=args.counts, min_gene_fraction=args.min_gene_fraction)
            say(args, f"model adapted to the {adata.n_obs} cells of {args.data} (its own batch offsets; not saved)")
        scm.annotate(
            model,
            adata,
            counts=args.counts,
            min_confidence=args.min_confidence,
            min_counts=args.min_counts,
            unassign_flagged=args.unassign_flagged,
            majority_voting=args.majority_voting,
            over_clustering=args.over_clustering,
            smooth=args.smooth,
            label_key=args.label_key,
            unlabeled_category=args.unlabeled_category,
            batch_key=args.batch_key,
            min_gene_fraction=args.min_gene_fraction,
            key_added=args.key_added,
        )
        write_h5ad(adata, args.out, key_added=args.key_added)
    finally:
        if backed:
            adata.file.close()
    key = args.key_added
    say(args, adata.obs[f"{key}_label"].value_counts().to_string())
    for column, what in (
        ("smoothed", "smoothed over the neighbours"),
        ("majority_voting", "by majority voting"),
        ("with_labels", f"with the known labels of obs[{args.label_key!r}]"),
    ):
        if f"{key}_{column}" in adata.obs:
            changed = int((adata.obs[f"{key}_{column}"].astype(str) != adata.obs[f"{key}_label"].astype(str)).sum())
            say(args, f"{what}: {changed} calls differ (obs {key}_{column})")
    flags = [f"{int(adata.obs[c].sum())} {c}" for c in (f"{key}_novel", f"{key}_low_counts") if c in adata.obs]
    if flags:
        unassigned = "labelled unassigned" if args.unassign_flagged else "--unassign-flagged makes them unassigned"
        say(args, f"flagged: {', '.join(flags)} (obs columns; {unassigned})")
    say(args, f"annotated dataset written to {args.out}")


def explain_cmd(args) -> None:
    from tfp_scmix import explain

    if Path(args.out).exists() and not Path(args.out).is_dir():  # before loading the model
        raise ValueError(f"--out {args.out} is a file: name a folder for the tables and figures (made if missing)")
    model = scm.load_model(args.model)
    paths = {}
    if args.data:  # the data's figures first: they check the data (and --label-key) before writing anything
        adata = scm.read(args.data)
        if "scmix_label" not in adata.obs or explain.annotated_by_another_model(model, adata):
            if "scmix_label" in adata.obs:  # another model's calls: this model's are drawn (the file is not changed)
                say(args, f"{args.data} was annotated by another model: annotated with {args.model} for the figures")
            adata = scm.annotate(model, adata, counts=args.counts, min_gene_fraction=args.min_gene_fraction)
        paths.update(
            explain.write_data_figures(
                model, adata, args.out, label_key=args.label_key, unlabeled_category=args.unlabeled_category
            )
        )
    paths = {**explain.write_explanations(model, args.out, n_genes=args.top_genes), **paths}
    say(args, "\n".join(str(p) for p in paths.values()))


def export_cmd(args) -> None:
    from tfp_scmix.export import export_serving, log_to_experiment

    model = scm.load_model(args.model)
    path = export_serving(model, args.out, overwrite=args.overwrite)
    args.written = path  # what an interrupt from here on leaves whole (`interrupted`)
    say(
        args,
        f"exported {model.n_genes} genes x {model.n_classes} classes "
        f"(gene fingerprint {model.gene_fingerprint}) to {path}",
    )
    if args.mlflow_experiment:
        say(args, f"logged MLflow model {log_to_experiment(path, args.mlflow_experiment, args.max_cells).model_uri}")


def whole_number(minimum: int):
    """An argparse type: a whole number of at least `minimum`, refused when the command line is read (before: after
    the data were read and their genes chosen, seconds to minutes later)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, received {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, received {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(prog="tfp-scmix", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {scm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def verbose(p, default):
        p.add_argument(
            "--verbose",
            type=int,
            default=default,
            choices=(0, 1, 2),
            help=(
                "0: quiet, no progress bar or status lines (errors still print; demo still prints its report); "
                "1: one progress bar and a summary; 2: every epoch's loss terms and TensorFlow's logs"
            ),
        )

    def model_settings(p, topics, batch_size, restarts):
        at_least_1, at_least_0 = whole_number(1), whole_number(0)
        p.add_argument("--epochs", type=at_least_1, default=defaults.epochs, help="passes over the cells per model")
        p.add_argument("--topics", type=at_least_1, default=topics, help="topics per model")
        p.add_argument("--batch-size", type=at_least_1, default=batch_size, help="cells per minibatch")
        p.add_argument("--seed", type=at_least_0, default=0, help="random seed (model r gets seed + r)")
        p.add_argument("--restarts", type=at_least_1, default=restarts, help="models averaged (1: a single model)")
        p.add_argument(
            "--classifier-steps",
            type=at_least_0,
            default=defaults.classifier_steps,
            help="steps of the classification branch's refit after training, and of annotate's with known labels",
        )
        p.add_argument(
            "--kl-warmup-epochs",
            type=lambda text: float(at_least_0(text)),  # a float, as Config's: the same settings as its default
            default=defaults.kl_warmup_epochs,
            help="epochs over which the KL terms' weight rises to 1 (at most --epochs: the full ELBO is reached)",
        )

    p = sub.add_parser("demo", help="train on the embedded dataset with a few labels and report held-out scores")
    p.add_argument("--labels", type=int, default=150, help="cells that keep their label")
    # The package's defaults: the demo shows the model a user gets (the few-shot suite's pbmc68k_reduced rows).
    model_settings(p, topics=defaults.n_topics, batch_size=defaults.batch_size, restarts=3)
    p.add_argument("--top-genes", type=int, default=10, help="genes shown per class")
    p.add_argument("--out", default="outputs/demo", help="folder for the model and its explanations")
    verbose(p, 1)
    p.set_defaults(func=demo)

    p = sub.add_parser("train", help="train on counts (labels where known) and save a .keras model")
    p.add_argument("data", help="counts: .h5ad, 10x folder or .h5, .loom")
    p.add_argument("--out", required=True, help="model path ending in .keras")
    p.add_argument("--counts", default=None, help="where the raw counts are: X, raw or a layer (default: detect)")
    p.add_argument(
        "--label-key", default="cell_type", help="obs column of cell types (default: cell_type; empty/NaN: unlabelled)"
    )
    p.add_argument("--batch-key", default=None, help="obs column of batches (dataset, donor)")
    p.add_argument(
        "--unlabeled-category", default=None, help="the label value that marks unlabelled cells (e.g. Unknown)"
    )
    p.add_argument("--unknown", nargs="*", help="more label values that mean unlabelled")
    p.add_argument(
        "--n-genes",
        type=int,
        default=2000,
        help=f"highly variable genes to keep (0: all; with --stream chosen on {HVG_SAMPLE_CELLS:,} cells of the file)",
    )
    p.add_argument(
        "--shared-genes",
        nargs="+",
        metavar="DATASET",
        help="train only on the genes these datasets also measure (chosen before --n-genes): for annotating them",
    )
    model_settings(p, topics=defaults.n_topics, batch_size=defaults.batch_size, restarts=3)
    p.add_argument("--prior", default=defaults.prior, choices=PRIORS, help="prior on the class weights")
    p.add_argument("--stream", action="store_true", help="read the counts from disk in chunks (any number of cells)")
    p.add_argument(
        "--strategy",
        default=None,
        choices=STRATEGIES,
        help="tf.distribute strategy (with --stream); multi_worker reads TF_CONFIG",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="back up every epoch here (default: .OUT.checkpoints beside --out); the same command after a kill "
        "resumes from the last finished epoch",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at --out")
    p.add_argument("--mlflow", action="store_true", help="log the run to MLflow (tfp_scmix.tracking)")
    p.add_argument("--mlflow-experiment", default="tfp_scmix", help="MLflow experiment name (with --mlflow)")
    verbose(p, 1)
    p.set_defaults(func=train)

    p = sub.add_parser("annotate", help="annotate counts with a trained model and write an .h5ad for scanpy")
    p.add_argument("model", help="trained model (.keras)")
    p.add_argument("data", help="counts: .h5ad, 10x folder or .h5, .loom")
    p.add_argument("--out", required=True, help="annotated .h5ad to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists (it may be the input itself: written whole, then swapped in)",
    )
    p.add_argument("--counts", default=None, help="where the raw counts are: X, raw or a layer (default: detect)")
    p.add_argument("--min-confidence", type=float, default=None, help="below this top probability: unassigned")
    p.add_argument(
        "--adapt",
        action="store_true",
        help="fit the dataset's own batch offsets first (tfp_scmix.adapt; for another lab's data; not saved)",
    )
    p.add_argument(
        "--min-counts", type=int, default=50, help="fewer counts over the model's genes: flagged as low_counts"
    )
    p.add_argument("--unassign-flagged", action="store_true", help="label novel and low-count cells unassigned")
    p.add_argument(
        "--majority-voting", action="store_true", help="also write each cluster's most frequent label (CellTypist)"
    )
    p.add_argument("--over-clustering", default=None, help="obs column of clusters to vote in (default: k-means)")
    p.add_argument(
        "--smooth", action="store_true", help="also write labels smoothed over the cells' neighbours (another dataset)"
    )
    p.add_argument(
        "--label-key",
        default=None,
        help="obs column of the dataset's own known labels: also write scmix_with_labels, the calls combined with "
        "those of each cell's counts pooled with its 15 nearest neighbours', by the class branch refitted on "
        "the known labels (the dataset the model was trained on)",
    )
    p.add_argument("--unlabeled-category", default=None, help="with --label-key: the value that marks unlabelled cells")
    p.add_argument(
        "--batch-key",
        default=None,
        help="obs column of the batches the model was trained with (donor, dataset): each cell is read through its "
        "batch's offsets (default, and for other batches: the centre of the trained batches')",
    )
    p.add_argument(
        "--min-gene-fraction",
        type=float,
        default=0.5,
        help="the fraction of the model's genes the data must measure (the rest count as zeros)",
    )
    p.add_argument(
        "--key-added",
        default="scmix",
        help="prefix of every obs, obsm and uns name written (default scmix); another prefix keeps an earlier "
        "annotation's results beside this one's",
    )
    p.set_defaults(func=annotate)

    p = sub.add_parser("explain", help="write explanation tables (CSV) and figures (PNG) of a trained model")
    p.add_argument("model", help="trained model (.keras)")
    p.add_argument("--out", required=True, help="folder for the tables and figures")
    p.add_argument("--top-genes", type=int, default=30, help="genes listed per topic")
    p.add_argument("--data", default=None, help="also draw figures of this dataset (annotated first if needed)")
    p.add_argument("--label-key", default=None, help="obs column of known labels to compare with (with --data)")
    p.add_argument(
        "--unlabeled-category",
        default=None,
        help="the label value of cells without a known label (e.g. Unknown), left out of the comparison",
    )
    p.add_argument("--counts", default=None, help="where the raw counts of --data are (default: detect)")
    p.add_argument(
        "--min-gene-fraction",
        type=float,
        default=0.5,
        help="with --data annotated here: the fraction of the model's genes it must measure (the rest count as zeros)",
    )
    p.set_defaults(func=explain_cmd)

    p = sub.add_parser("export", help="export a trained model as a TensorFlow SavedModel for serving")
    p.add_argument("model", help="trained model (.keras)")
    p.add_argument("out", help="SavedModel folder to write (e.g. export/1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument(
        "--mlflow-experiment",
        default=None,
        help="also log a served pyfunc model to this MLflow experiment (tracking store: $MLFLOW_TRACKING_URI)",
    )
    p.add_argument(
        "--max-cells",
        type=whole_number(1),
        default=None,
        help="with --mlflow-experiment: the most cells one request may hold; more get HTTP 413",
    )
    p.set_defaults(func=export_cmd)
    for name in ("annotate", "explain", "export"):
        verbose(sub.choices[name], 1)
    return parser


def existing_output(args) -> str | None:
    """The error for `train --out` or `annotate --out` onto a file that exists, or `export` onto a folder that
    exists, without `--overwrite`, and for `export --overwrite` onto what is not an earlier export
    (`tfp_scmix.data.export_target`); None otherwise."""
    if args.command == "export" and args.overwrite:
        from tfp_scmix.data import export_target

        try:
            export_target(args.out, True)
        except FileExistsError as err:
            return str(err)
    if args.command not in ("train", "export", "annotate") or not Path(args.out).exists() or args.overwrite:
        return None
    if args.command == "annotate":
        same = Path(args.out).resolve() == Path(args.data).resolve() if Path(args.data).exists() else False
        return (
            f"{args.out} already exists{' (it is the input)' if same else ''}: pass --overwrite to replace it with "
            "the annotated data (written whole, then swapped in), or choose another --out"
        )
    if args.command == "export":
        if not (Path(args.out) / "saved_model.pb").is_file():  # --overwrite would be refused there too
            return f"{args.out} already exists and is not a SavedModel export: export to a new folder (e.g. export/2)"
        return (
            f"{args.out} already exists: pass --overwrite to replace the export there, or export to a new version "
            "folder (e.g. export/2)"
        )
    return (
        f"{args.out} already exists: pass --overwrite to replace it with the model this command trains, or "
        "choose another --out"
    )


def missing_input(args) -> str | None:
    """The error for a model or data file named on the command line that does not exist, or for an output `train`
    or `export` would replace (`existing_output`); None when there is none.

    Checked before TensorFlow's import, which takes seconds, so that a mistyped path fails at once; the
    messages are those `load_model` and `read` would give (`tfp_scmix.data.data_path` for the data).
    """
    from tfp_scmix.data import DataError, data_path

    model = getattr(args, "model", None)
    if model and (Path(model) / "saved_model.pb").is_file():
        return (
            f"{model} is a SavedModel export, for serving (`tfp_scmix.export.load_exported`); this command reads "
            "the .keras model file it was exported from."
        )
    if model and not Path(model).is_file():
        out = model if Path(model).suffix == ".keras" else "MODEL.keras"  # train writes .keras files only
        return f"no model file at {model}; train one with `tfp-scmix train ... --out {out}`."
    data = getattr(args, "data", None)
    try:
        if data:
            data_path(data)
    except DataError as err:
        return str(err)
    return existing_output(args)  # an output that would be replaced: refused before the import too


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record is emitted (as logging's last resort does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record) -> None:
        """Write the line through tqdm, which lifts an open progress bar off its line first and draws it again
        below (written plainly, "INFO: resuming training at epoch 20" ran on from the bar's line)."""
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # as logging's own handlers do: a failing record must not stop the command
            self.handleError(record)


@contextlib.contextmanager
def _log_to_stderr(verbose: int = 1) -> Iterator[None]:
    """While a command runs, the package's INFO and WARNING lines go to stderr as "LEVEL: message", each distinct
    line once (the steps of one command find the same counts slot more than once); with `--verbose 0` the warnings
    only. Only the package's logger is configured, and put back as it was afterwards: other libraries' INFO lines
    (TensorFlow's among them) stay hidden, and a library that configures the root logger meanwhile changes nothing
    here."""
    from tfp_scmix.data import OncePerMessage

    package = logging.getLogger("tfp_scmix")
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(OncePerMessage())
    level, propagate = package.level, package.propagate
    package.addHandler(handler)
    package.setLevel(logging.INFO if verbose else logging.WARNING)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        package.propagate = propagate


def parse(argv=None) -> argparse.Namespace:
    """The command line parsed. An option the command does not know is reported by that command's parser, with its
    usage and the closest option it has (argparse's top-level parser printed its own usage, which lists the
    commands, and no suggestion)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        from tfp_scmix.data import did_you_mean  # reads anndata: only for the message, not for every --help

        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        command = commands[args.command]
        known = [option for action in command._actions for option in action.option_strings]
        typed = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
        command.error(f"unrecognized arguments: {' '.join(extras)}{did_you_mean(typed, known)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    missing = missing_input(args)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    if args.verbose >= 2 and "tensorflow" not in sys.modules:
        os.environ[scm.VERBOSE_ENV] = "1"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    try:
        from tfp_scmix.callbacks import TrainingDiverged  # imports TensorFlow: after --help and --version
    except KeyboardInterrupt:  # Ctrl-C in the first seconds, while TensorFlow loads: nothing has been done yet
        print(f"\n{interrupted(args)}", file=sys.stderr)
        return 130

    try:
        with _log_to_stderr(args.verbose), _terminate_as_interrupt():
            args.func(args)
    except (ValueError, TrainingDiverged) as err:  # DataError, ModelFileError and bad arguments among them
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an existing export folder, a full disk, a folder without write permission
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"\n{interrupted(args)}", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130  # the shell's codes for SIGTERM and Ctrl-C
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler's stop) during a command: handled as Ctrl-C is, with the same message."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Raise `Terminated` on SIGTERM while a command runs (before: the process died without a word, its backup
    kept but not said), in the main thread only (the one place Python delivers signals)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(args) -> str:
    """The line printed when Ctrl-C stops a command: what was kept and how to go on."""
    written = getattr(args, "written", None)  # the command's output, written whole (then MLflow's logging, if asked)
    if written is not None:
        logging = args.mlflow if args.command == "train" else getattr(args, "mlflow_experiment", None)
        unlogged = "its MLflow run is marked KILLED" if args.command == "train" else "the MLflow model was not logged"
        return f"interrupted: {written} was written whole" + (
            f"; {unlogged}: run the command again with --overwrite to log it" if logging else ""
        )
    if args.command == "train":
        checkpoints = Path(args.checkpoint_dir or checkpoint_dir(args.out))
        if checkpoints.is_dir() and any(p.is_file() for p in checkpoints.rglob("*")):  # not only empty folders
            return (
                f"interrupted: the finished epochs and restarts are backed up in {checkpoints}; run the same command "
                "again to resume from the last one"
            )
        return "interrupted before the first epoch finished: nothing was written"
    if args.command in ("annotate", "export"):
        return f"interrupted: nothing was written to {args.out} (it is written whole or not at all)"
    return f"interrupted: the files already in {args.out} are whole (each written at once); run it again for the rest"


if __name__ == "__main__":
    sys.exit(main())
