"""Predicted labels of the few-shot main setting (150 labels, seed 0, package defaults) for a before/after check.

    ./run experiments.few_shot.same_labels --out /tmp/after            # writes labels_<dataset>.npz
    ./run experiments.few_shot.same_labels --out /tmp/after --compare /tmp/before

A refactor must not change predictions: run it on both checkouts and compare (labels equal, largest
probability difference printed). Writes one .npz per dataset ("label" [n_test], "probs" [n_test, n_classes]).
"""

import argparse
from pathlib import Path

import numpy as np

import tfp_scmix as scm
from tfp_scmix.data import data_path, highly_variable_genes, read_h5ad
from tfp_scmix.evaluate import few_shot_split

N_TEST = 2000


def load(name):
    """pbmc3k (8 types) or cbmc without its "Unknown" cells (12 types), as the few-shot benchmark reads them."""
    adata = read_h5ad(data_path(f"{name}.h5ad"))
    if name == "cbmc":
        adata = adata[adata.obs["cell_type"] != "Unknown"].copy()
    return scm.from_anndata(adata)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["pbmc3k", "cbmc"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", default=None, help="folder written by another checkout")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        full = load(name)
        test, labelled = few_shot_split(full.n_cells, N_TEST, 150, args.seed)
        data = full.select_genes(highly_variable_genes(full.counts, full.genes, 2000))
        model = scm.train(data.hide_labels(labelled), seed=args.seed, verbose=0)
        result = scm.predict(model, data.subset(test))
        np.savez(out / f"labels_{name}.npz", label=result["label"], probs=result["probs"])
        line = f"{name}: {int((result['label'] != data.labels[test]).sum())} errors of {len(test)}"
        if args.compare:
            other = np.load(Path(args.compare) / f"labels_{name}.npz")
            line += (
                f"; labels equal to {args.compare}: {bool(np.array_equal(other['label'], result['label']))}, "
                f"largest probability difference {np.abs(other['probs'] - result['probs']).max():.2e}"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
