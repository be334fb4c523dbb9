"""The encoder's first layer on sparse data: densified and multiplied by BLAS, or multiplied by the CSR kernel.

    ./run experiments.performance.sparse_product      # about 8 minutes; writes results_sparse_product.json
    ./run experiments.performance.sparse_product --steps 2 --out /tmp/sparse_product.json   # a check

`CellEncoder.sparse_product` multiplies sparse minibatches by TensorFlow's CSR kernel instead of densifying them;
`SCMix.from_data` sets it for data with at most `CellEncoder.CSR_DENSITY` nonzero entries, the threshold this
measures. Training throughput both ways on the Kang cells (real counts, `kang_ctrl.h5ad` and `kang_stim.h5ad` in
`$TFP_SCMIX_DATA`), over the gene panels of the grid of `run.py` (`gene_panel`: 2,000, 5,000 and 20,000 genes, 25%,
12.8% and 3.6% nonzero), over 3,000 genes between them, and over the 2,000 genes the package selects by default
(`highly_variable_genes`, sparser). 20 topics, minibatches of 1,024, each way measured
three times alternating after 3 warm-up steps, 2 threads. Times `model.fit` steps of a model built and compiled as
`tfp_scmix.train` builds it (a speed measurement, not a training recipe).
"""

import argparse
from pathlib import Path

import numpy as np

from experiments.common import write_json
from experiments.performance.dense_limit import fit_rate
from experiments.performance.run import gene_panel, reference, use_threads
from tfp_scmix.layers import CellEncoder

HERE = Path(__file__).parent


def panels(names=None):
    """{name: SCData} of the Kang cells over the grid's gene panels and the package's highly variable genes; only
    those in `names` when given (each panel is built only if asked for)."""
    from tfp_scmix.data import SCData, highly_variable_genes

    counts, genes, _ = reference()
    n_cells = counts.shape[0]

    def data(panel, names):
        return SCData(
            panel.astype(np.float32),
            np.asarray(names, dtype=str),
            np.full(n_cells, -1, np.int32),
            ["a", "b"],
            np.zeros(n_cells, np.int32),
            ["0"],
            np.arange(n_cells).astype(str),
        )

    wanted = lambda name: names is None or name in names  # noqa: E731
    out = {
        f"{n} genes with the highest mean": data(*gene_panel(counts, genes, n))
        for n in (2000, 3000, 5000, 20_000)
        if wanted(f"{n} genes with the highest mean")
    }
    if wanted("2000 highly variable genes"):
        variable = np.isin(genes, highly_variable_genes(counts, genes, 2000))
        out["2000 highly variable genes"] = data(counts[:, variable], np.asarray(genes)[variable])
    return out


def throughput(data, sparse_product: bool, batch_size=1024, steps=16):
    """Training cell-passes per second with the encoder's `sparse_product` set as given."""

    def configure(model):
        model.encoder.sparse_product = sparse_product

    return fit_rate(data, batch_size, steps, configure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="timed training steps of each measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements of each way")
    parser.add_argument("--out", default=str(HERE / "results_sparse_product.json"))
    args = parser.parse_args(argv)
    use_threads(2)
    results = {}
    for name, data in panels().items():
        rates: dict[str, list[float]] = {"densified": [], "CSR": []}
        for _ in range(args.repeats):
            for way, csr in (("densified", False), ("CSR", True)):
                rates[way].append(throughput(data, csr, steps=args.steps))
        best = {way: max(values) for way, values in rates.items()}
        results[name] = {
            "nonzero_fraction": round(data.nonzero_fraction, 4),
            "cell_passes_per_s": best,
            "every_measurement": rates,
            "csr_over_densified": best["CSR"] / best["densified"],
        }
        print(f"{name}: {results[name]}", flush=True)
    write_json(
        Path(args.out),
        {
            "data": (
                f"Kang 13,999 cells; batch 1,024; 20 topics; 2 threads; best of {args.repeats} alternating "
                "measurements, each timed from step to step"
            ),
            "csr_density": CellEncoder.CSR_DENSITY,
            "panels": results,
        },
    )


if __name__ == "__main__":
    main()
