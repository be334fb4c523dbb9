"""Command line: `tfp-scmix demo | train | annotate | explain` (also `python -m tfp_scmix`).

Only argument parsing and printing: every command calls the library (`train`, `predict`, `annotate`,
`explain`, `save_model` / `load_model`).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import tfp_scmix as scm
from tfp_scmix import explain
from tfp_scmix.callbacks import TrainingDiverged
from tfp_scmix.datasets import pbmc68k_reduced
from tfp_scmix.distribute import STRATEGIES
from tfp_scmix.evaluate import few_shot_split, scores
from tfp_scmix.io import check_model_path
from tfp_scmix.stream import H5ADStream


def demo(args) -> dict:
    data = scm.from_anndata(pbmc68k_reduced())
    test, labelled = few_shot_split(data.n_cells, data.n_cells - args.labels, args.labels, args.seed)
    print(
        f"embedded pbmc68k_reduced: {data.n_cells} cells x {data.n_genes} genes, {data.n_classes} types; "
        f"{args.labels} labelled cells, {len(test)} held-out cells (their counts used without labels)"
    )
    start = time.time()
    config = scm.Config(n_topics=args.topics, batch_size=args.batch_size, epochs=args.epochs)
    model = scm.train(data.hide_labels(labelled), config, restarts=args.restarts, seed=args.seed, verbose=args.verbose)
    print(f"trained in {time.time() - start:.0f} s")
    predicted = scm.predict(model, data.subset(test))["label"]
    result = scores(data.labels[test], predicted)
    print(
        f"held-out cells: accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f} "
        f"({result['errors']} errors of {len(test)})"
    )
    genes = explain.class_genes(model, n_genes=args.top_genes)
    print("\nTop genes of the most predictive topic of each class:")
    for (cls, topic), rows in genes.groupby(["class", "topic"], sort=False):
        print(f"  {cls:<28} {topic:<12} {' '.join(rows.gene)}")
    out = Path(args.out)
    scm.save_model(model, out / "model.keras")
    explain.write_explanations(model, out / "explanations")
    print(f"\nmodel and explanation tables/figures written to {out}/")
    return result


def train(args) -> None:
    check_model_path(args.out)  # before hours of training, not after
    options = dict(counts=args.counts, label_key=args.label_key, batch_key=args.batch_key, unknown=args.unknown or ())
    data: scm.SCData | H5ADStream
    if args.stream:
        data = H5ADStream(args.data, **{**options, "counts": args.counts or "X"})
    else:
        data = scm.from_anndata(args.data, **options)
        if args.n_genes and data.n_genes > args.n_genes:
            data = data.select_genes(scm.data.highly_variable_genes(data.counts, data.genes, args.n_genes))
    print(f"{data.n_cells} cells x {data.n_genes} genes; {data.n_labelled} labelled cells of {data.n_classes} types")
    config = scm.Config(n_topics=args.topics, prior=args.prior, epochs=args.epochs, batch_size=args.batch_size)
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
        print(f"model written to {args.out}")
        shutil.rmtree(checkpoints, ignore_errors=True)  # train has emptied it; the model is saved


def checkpoint_dir(out: str | Path) -> Path:
    """`train`'s default backup folder for a model written to `out`: `.NAME.checkpoints` beside it, so that
    the same command run again after a kill resumes from the last finished epoch."""
    out = Path(out)
    return out.with_name(f".{out.name}.checkpoints")


def annotate(args) -> None:
    from tfp_scmix.annotate import write_h5ad

    model = scm.load_model(args.model)
    # Backed: the counts are read a chunk at a time and never enter memory whole, in annotate or in writing.
    adata = scm.data.read_h5ad(args.data, backed="r")
    try:
        scm.annotate(model, adata, counts=args.counts, min_confidence=args.min_confidence)
        write_h5ad(adata, args.out)
    finally:
        adata.file.close()
    print(adata.obs["scmix_label"].value_counts().to_string())
    print(f"annotated dataset written to {args.out}")


def explain_cmd(args) -> None:
    paths = explain.write_explanations(scm.load_model(args.model), args.out, n_genes=args.top_genes)
    print("\n".join(str(p) for p in paths.values()))


def build_parser() -> argparse.ArgumentParser:
    defaults = scm.Config()
    parser = argparse.ArgumentParser(prog="tfp-scmix", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train on the embedded dataset with a few labels and report held-out scores")
    p.add_argument("--labels", type=int, default=150)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--topics", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-genes", type=int, default=10)
    p.add_argument("--restarts", type=int, default=3, help="models averaged (1: a single model)")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--verbose", type=int, default=2)
    p.set_defaults(func=demo)
    p = sub.add_parser("train", help="train on an .h5ad (labels where known) and save a .keras model")
    p.add_argument("data")
    p.add_argument("--out", required=True, help="model path ending in .keras")
    p.add_argument("--counts", default=None)
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--batch-key", default=None)
    p.add_argument("--unknown", nargs="*", help="label values that mean unlabelled")
    p.add_argument("--n-genes", type=int, default=2000, help="highly variable genes to keep (0: all; in memory only)")
    p.add_argument("--topics", type=int, default=defaults.n_topics)
    p.add_argument("--prior", default=defaults.prior, choices=scm.config.PRIORS)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restarts", type=int, default=3, help="models averaged (1: a single model)")
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
    p.add_argument("--verbose", type=int, default=1)
    p.set_defaults(func=train)
    p = sub.add_parser("annotate", help="annotate an .h5ad with a trained model")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.add_argument("--counts", default=None)
    p.add_argument("--min-confidence", type=float, default=None)
    p.set_defaults(func=annotate)
    p = sub.add_parser("explain", help="write explanation tables (CSV) and figures (PNG) of a trained model")
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--top-genes", type=int, default=30)
    p.set_defaults(func=explain_cmd)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TrainingDiverged) as err:  # DataError, ModelFileError and bad arguments among them
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
