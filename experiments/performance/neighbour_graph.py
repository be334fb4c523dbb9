"""The neighbour graph of `annotate`'s calls over the target's cells: exact neighbours against NN-descent.

    ./run experiments.performance.neighbour_graph      # a few minutes; writes neighbour_graph.json
    ./run experiments.performance.neighbour_graph --cells 20000 --out /tmp/graph.json   # a check

`propagate.knn_graph` (`annotate`'s smoothing and its call with known labels) finds each cell's 15 nearest
neighbours exactly (scikit-learn's `NearestNeighbors`) up to `propagate.EXACT_NEIGHBORS_CELLS` cells and by
NN-descent (`pynndescent`) above. This measures both on the features `annotate` builds the graph on (the genes'
30 principal components, `propagate.principal_components`, beside 20 stand-in topic features drawn from a Dirichlet
per cell, `propagate.equal_blocks`), for cells drawn from the Kang cells (`kang_ctrl.h5ad`, `kang_stim.h5ad` in
`$TFP_SCMIX_DATA`) over the 2,000 genes of highest mean, each drawn cell's counts thinned binomially at 0.8 so
that copies of one cell differ (they stay close: at 300,000 cells each Kang cell is drawn about 21 times, which makes
NN-descent's search easier than on as many different cells): seconds each way, and the fraction of the exact
graph's edges that NN-descent's graph holds. Exact neighbours are measured up to `--exact-up-to` cells (their cost
grows with the square of the cells). 2 threads; the first NN-descent call also compiles pynndescent's functions
(numba), timed apart.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np

from experiments.common import write_json
from experiments.performance.run import gene_panel, reference

HERE = Path(__file__).parent


def features(counts, rng):
    from tfp_scmix.propagate import equal_blocks, principal_components

    topics = np.log(rng.dirichlet(np.full(20, 0.3), size=counts.shape[0]) + 1e-6)
    return equal_blocks(principal_components(counts), topics)


def drawn_cells(counts, n_cells, rng):
    """`n_cells` cells drawn with replacement from `counts` (CSR), each thinned binomially at 0.8."""
    import scipy.sparse as sp

    drawn = sp.csr_matrix(counts[rng.integers(0, counts.shape[0], n_cells)], dtype=np.float32)
    drawn.data = rng.binomial(drawn.data.astype(np.int64), 0.8).astype(np.float32)
    drawn.eliminate_zeros()
    return drawn


def graph_seconds(points, exact):
    from tfp_scmix import propagate

    limit = propagate.EXACT_NEIGHBORS_CELLS
    try:
        propagate.EXACT_NEIGHBORS_CELLS = len(points) if exact else 0
        start = time.perf_counter()
        graph = propagate.knn_graph(points)
        return graph, time.perf_counter() - start
    finally:
        propagate.EXACT_NEIGHBORS_CELLS = limit


def main(argv=None):
    from threadpoolctl import threadpool_limits

    from tfp_scmix import propagate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[13_999, 50_000, 100_000, 300_000])
    parser.add_argument("--exact-up-to", type=int, default=100_000)
    parser.add_argument("--out", default=str(HERE / "neighbour_graph.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", "2")
    counts, genes, _ = reference()
    panel, _ = gene_panel(counts, genes, 2000)
    rng = np.random.default_rng(0)
    results = []
    with threadpool_limits(2):
        warm = features(drawn_cells(panel, 2000, rng), rng)
        _, compile_s = graph_seconds(warm, exact=False)
        for n_cells in args.cells:
            points = features(drawn_cells(panel, n_cells, rng), rng)
            approximate, approximate_s = graph_seconds(points, exact=False)
            row = {"cells": n_cells, "nn_descent_s": round(approximate_s, 2)}
            if n_cells <= args.exact_up_to:
                exact, exact_s = graph_seconds(points, exact=True)
                row.update(
                    exact_s=round(exact_s, 2),
                    exact_over_nn_descent=round(exact_s / approximate_s, 2),
                    exact_edges_found=round(approximate.multiply(exact).nnz / exact.nnz, 4),
                )
            results.append(row)
            print(row, flush=True)
    write_json(
        Path(args.out),
        {
            "data": "Kang cells drawn with replacement and thinned at 0.8, 2,000 genes of highest mean; features: 30 "
            "principal components beside 20 Dirichlet stand-in topic features; 15 neighbours; 2 threads; one "
            "measurement each",
            "nn_descent_first_call_s": round(compile_s, 2),
            "exact_neighbors_cells": propagate.EXACT_NEIGHBORS_CELLS,
            "rows": results,
        },
    )


if __name__ == "__main__":
    main()
