"""Command line: `tfp-scmix demo | train | annotate | explain` (also `python -m tfp_scmix`)."""

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np


def few_shot_split(n_cells, n_test, n_labelled, seed):
    """The benchmark split: `default_rng(seed).permutation`, first `n_test` test cells, next `n_labelled` labelled."""
    order = np.random.default_rng(seed).permutation(n_cells)
    if n_test + n_labelled > n_cells:
        raise ValueError(f"{n_test} test + {n_labelled} labelled cells exceed the {n_cells} cells")
    return order[:n_test], order[n_test:n_test + n_labelled]


def train_model(data, epochs=100, batch_size=256, learning_rate=2e-3, seed=0, verbose=1, callbacks=(),
                classifier_steps=2000, restarts=3, **settings):
    """Build, compile and fit an `SCMix` on `data` (labels where known), then fit its classification
    branch to convergence (`classifier_steps` full-batch steps; 0 to skip).

    With `restarts` > 1, that many models are trained from seeds `seed`, `seed + 1`, ... and returned as
    an `SCMixEnsemble` that averages their class probabilities (the few-shot benchmark's winner);
    `restarts=1` returns the single `SCMix`.
    """
    import keras

    from tfp_scmix.ensemble import SCMixEnsemble
    from tfp_scmix.model import SCMix

    if int(restarts) < 1:
        raise ValueError(f"restarts must be 1 or more, received {restarts!r}")
    members = []
    for member_seed in range(seed, seed + int(restarts)):
        if verbose and restarts > 1:
            print(f"restart {member_seed - seed + 1} of {restarts} (seed {member_seed})")
        keras.utils.set_random_seed(member_seed)
        model = SCMix.from_data(data, seed=member_seed, **settings)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate))
        model.fit(data.dataset(batch_size, seed=member_seed), epochs=epochs, verbose=verbose,
                  callbacks=list(callbacks))
        if classifier_steps:
            model.fit_classifier(data, steps=classifier_steps, verbose=verbose)
        members.append(model)
    return members[0] if len(members) == 1 else SCMixEnsemble(members)


def scores(true, predicted):
    """Errors, accuracy and macro-F1 of integer predictions."""
    from sklearn.metrics import f1_score

    return {"errors": int((true != predicted).sum()), "accuracy": float((true == predicted).mean()),
            "macro_f1": float(f1_score(true, predicted, average="macro"))}


def demo(args):
    from tfp_scmix import explain
    from tfp_scmix.annotate import predict_data
    from tfp_scmix.data import from_anndata
    from tfp_scmix.datasets import pbmc68k_reduced
    from tfp_scmix.io import atomic_path

    data = from_anndata(pbmc68k_reduced())
    test, labelled = few_shot_split(data.n_cells, data.n_cells - args.labels, args.labels, args.seed)
    print(f"embedded pbmc68k_reduced: {data.n_cells} cells x {data.n_genes} genes, {data.n_classes} types; "
          f"{args.labels} labelled cells, {len(test)} held-out cells (their counts used without labels)")
    start = time.time()
    model = train_model(data.hide_labels(labelled), epochs=args.epochs, batch_size=args.batch_size,
                        seed=args.seed, verbose=args.verbose, n_topics=args.topics, restarts=args.restarts)
    print(f"trained in {time.time() - start:.0f} s")
    predicted = predict_data(model, data.subset(test))["label"]
    result = scores(data.labels[test], predicted)
    print(f"held-out cells: accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f} "
          f"({result['errors']} errors of {len(test)})")
    genes = explain.class_genes(model, n_genes=args.top_genes)
    print("\nTop genes of the most predictive topic of each class:")
    for (cls, topic), rows in genes.groupby(["class", "topic"], sort=False):
        print(f"  {cls:<28} {topic:<9} {' '.join(rows.gene)}")
    out = Path(args.out)
    with atomic_path(out / "model.keras") as tmp:
        model.save(tmp)
    explain.write_explanations(model, out / "explanations")
    print(f"\nmodel and explanation tables/figures written to {out}/")
    return result


def train(args):
    from tfp_scmix.data import from_anndata
    from tfp_scmix.io import atomic_path

    data = from_anndata(args.data, counts=args.counts, label_key=args.label_key, batch_key=args.batch_key,
                        unknown=args.unknown or ())
    if args.n_genes and data.n_genes > args.n_genes:
        from tfp_scmix.data import highly_variable_genes

        data = data.select_genes(highly_variable_genes(data.counts, data.genes, args.n_genes))
    print(f"{data.n_cells} cells x {data.n_genes} genes; {data.n_labelled} labelled cells of {data.n_classes} types")
    model = train_model(data, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                        verbose=args.verbose, n_topics=args.topics, prior=args.prior, restarts=args.restarts)
    with atomic_path(args.out) as tmp:
        model.save(tmp)
    print(f"model written to {args.out}")


def annotate_cmd(args):
    from tfp_scmix.annotate import annotate
    from tfp_scmix.data import read_h5ad
    from tfp_scmix.reliability import load_model

    model = load_model(args.model)
    adata = annotate(model, read_h5ad(args.data), counts=args.counts, min_confidence=args.min_confidence)
    from tfp_scmix.io import atomic_path

    with atomic_path(args.out) as tmp:
        adata.write_h5ad(tmp)
    print(adata.obs["scmix_label"].value_counts().to_string())
    print(f"annotated dataset written to {args.out}")


def explain_cmd(args):
    from tfp_scmix.explain import write_explanations
    from tfp_scmix.reliability import load_model

    paths = write_explanations(load_model(args.model), args.out, n_genes=args.top_genes)
    print("\n".join(str(p) for p in paths.values()))


def build_parser():
    parser = argparse.ArgumentParser(prog="tfp-scmix", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train on the embedded dataset with a few labels and report held-out scores")
    p.add_argument("--labels", type=int, default=150)
    p.add_argument("--epochs", type=int, default=100)
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
    p.add_argument("--n-genes", type=int, default=2000, help="highly variable genes to keep (0: all)")
    p.add_argument("--topics", type=int, default=50)
    p.add_argument("--prior", default="regularized")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restarts", type=int, default=3, help="models averaged (1: a single model)")
    p.add_argument("--verbose", type=int, default=1)
    p.set_defaults(func=train)
    p = sub.add_parser("annotate", help="annotate an .h5ad with a trained model")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.add_argument("--counts", default=None)
    p.add_argument("--min-confidence", type=float, default=None)
    p.set_defaults(func=annotate_cmd)
    p = sub.add_parser("explain", help="write explanation tables (CSV) and figures (PNG) of a trained model")
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--top-genes", type=int, default=30)
    p.set_defaults(func=explain_cmd)
    return parser


def main(argv=None):
    from tfp_scmix.data import DataError
    from tfp_scmix.reliability import ModelFileError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, ModelFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
