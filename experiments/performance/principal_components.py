"""The genes' principal components that `annotate` computes for its neighbour graphs, against scikit-learn's PCA.

    ./run experiments.performance.principal_components      # a few minutes; writes principal_components.json
    ./run experiments.performance.principal_components --copies 1 --out /tmp/pcs.json   # a check

`annotate`'s call with known labels, its majority voting and the graphs of the few-shot suite read the 30 principal
components of the scaled log-normalised counts (`propagate.principal_components`, scanpy's recipe) on a sparse
matrix centred implicitly. Until 2026-12-05 they were scikit-learn's `PCA(svd_solver="covariance_eigh")` fitted on
the sparse matrix, which forms x^T x as a sparse product; `propagate.gram` forms it as scipy's sparse product or in
dense blocks through BLAS, whichever its cost rule (`SPARSE_GRAM_COST`) says is cheaper. This measures, on the Kang
cells (`kang_ctrl.h5ad`, `kang_stim.h5ad` in `$TFP_SCMIX_DATA`) over the gene panels of `run.py` and the package's
2,000 highly variable genes, and on `--copies` stacked copies of the 2,000-gene panel: seconds for scikit-learn's
PCA (fit and transform) and for `principal_components`, the two ways of `gram` side by side, and the largest
difference between the two results' absolute values (components are defined up to sign). 2 threads for BLAS.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from experiments.common import write_json
from experiments.performance.sparse_product import panels

HERE = Path(__file__).parent


def scaled(counts):
    """The sparse matrix both ways factorise: log1p(CP10k), genes without variance dropped, each gene divided by its
    standard deviation (`propagate.principal_components`'s steps before the components)."""
    import scipy.sparse as sp
    from sklearn.utils.sparsefuncs import mean_variance_axis

    from tfp_scmix.data import log_normalised

    x = log_normalised(counts).astype(np.float64)
    _, variance = mean_variance_axis(x, axis=0)
    keep = variance > 0
    return sp.csr_matrix(x[:, keep] @ sp.diags(1.0 / np.sqrt(variance[keep])))


def seconds(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def measure(counts, n_components=30):
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    from tfp_scmix import propagate

    x = scaled(counts)
    theirs, sklearn_s = seconds(
        lambda: PCA(n_components, svd_solver="covariance_eigh", random_state=0).fit(x).transform(x)
    )
    ours, ours_s = seconds(propagate.principal_components, counts, n_components)
    _, sparse_s = seconds(lambda: (x.T @ x).toarray())
    rule = propagate.SPARSE_GRAM_COST
    try:  # the dense blocks alone: the rule made never to choose the sparse product
        propagate.SPARSE_GRAM_COST = float("inf")
        _, dense_s = seconds(propagate.gram, x)
    finally:
        propagate.SPARSE_GRAM_COST = rule
    row_nonzeros = np.diff(sp.csr_matrix(x).indptr).astype(np.float64)
    return {
        "cells": int(x.shape[0]),
        "genes": int(x.shape[1]),
        "nonzero_fraction": round(x.nnz / (x.shape[0] * x.shape[1]), 4),
        "sklearn_pca_s": round(sklearn_s, 3),
        "principal_components_s": round(ours_s, 3),
        "sklearn_over_ours": round(sklearn_s / ours_s, 2),
        "gram_sparse_product_s": round(sparse_s, 3),
        "gram_dense_blocks_s": round(dense_s, 3),
        "gram_rule_chooses": "sparse product"
        if rule * float(row_nonzeros @ row_nonzeros) < float(x.shape[0]) * x.shape[1] ** 2
        else "dense blocks",
        "max_abs_difference": float(np.max(np.abs(np.abs(ours) - np.abs(theirs)))),
        "max_abs_value": float(np.max(np.abs(theirs))),
    }


def main(argv=None):
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--copies", type=int, default=7, help="stacked copies of the 2,000-gene panel (7: 97,993 cells)"
    )
    parser.add_argument("--out", default=str(HERE / "principal_components.json"))
    args = parser.parse_args(argv)
    results = {}
    with threadpool_limits(2):
        for name, data in panels(
            ["2000 genes with the highest mean", "2000 highly variable genes", "5000 genes with the highest mean"]
        ).items():
            results[name] = measure(sp.csr_matrix(data.counts))
            print(name, results[name], flush=True)
            if name.startswith("2000 genes") and args.copies > 1:
                stacked = sp.vstack([sp.csr_matrix(data.counts)] * args.copies, format="csr")
                results[f"{name}, {args.copies} copies"] = measure(stacked)
                print(f"{args.copies} copies", results[f"{name}, {args.copies} copies"], flush=True)
    write_json(
        Path(args.out),
        {
            "data": "Kang 13,999 cells (and stacked copies); 30 components; 2 BLAS threads; one measurement each",
            "rule": "propagate.gram: sparse product when SPARSE_GRAM_COST x sum of squared nonzeros per cell < "
            "cells x genes^2",
            "panels": results,
        },
    )


if __name__ == "__main__":
    main()
