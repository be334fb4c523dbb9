"""The likelihood's sparse products with many topics: in column blocks (the package's way) or in one block.

    ./run experiments.performance.column_blocks      # about 8 minutes; writes results_column_blocks.json
    ./run experiments.performance.column_blocks --steps 2 --repeats 1 --topics 30 --out /tmp/blocks.json  # a check

On CPU, TensorFlow's SparseTensorDenseMatMul and XLA's fused gather-product slow down several times over once the
dense factor has 32 or more columns, so `tfp_scmix.sparse_ops` runs the topic-rate product and its gradient (and
every `sparse_dense_matmul` of the package; the encoder's CSR product is another kernel) in blocks of at most
`sparse_ops.COLUMN_BLOCK` columns. This measures
what that does to training: cell-passes per second of a model built and compiled as `tfp_scmix.train` builds it,
on the Kang cells (`kang_ctrl.h5ad` and `kang_stim.h5ad` in `$TFP_SCMIX_DATA`) over the 2,000 highly variable genes
the package selects (2.7% nonzero) and over the 20,000-gene panel of `run.py`'s grid (3.6% nonzero), at 20, 50
(the package's default) and 100 topics, minibatches of 1,024, 2 threads; each way measured `--repeats` times,
alternating, the best kept. "One block" sets `COLUMN_BLOCK` to the number of topics: the code before the blocks.
"""

import argparse
from pathlib import Path

from experiments.common import write_json
from experiments.performance.dense_limit import fit_rate
from experiments.performance.run import use_threads
from experiments.performance.sparse_product import panels

HERE = Path(__file__).parent
PANELS = ("2000 highly variable genes", "20000 genes with the highest mean")


def throughput(data, n_topics, block, steps):
    """Training cell-passes per second with `sparse_ops.COLUMN_BLOCK` set to `block` while the model is traced."""
    from unittest import mock

    from tfp_scmix import sparse_ops

    with mock.patch.object(sparse_ops, "COLUMN_BLOCK", block):
        return fit_rate(data, 1024, steps, n_topics=n_topics)


def main(argv=None):
    from tfp_scmix.sparse_ops import COLUMN_BLOCK

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="timed training steps of each measurement")
    parser.add_argument("--repeats", type=int, default=2, help="alternating measurements of each way")
    parser.add_argument("--topics", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--out", default=str(HERE / "results_column_blocks.json"))
    args = parser.parse_args(argv)
    use_threads(2)
    data = panels(PANELS)
    results = []
    for name in PANELS:
        for k in args.topics:
            rates: dict[str, list[float]] = {"blocks": [], "one block": []}
            for _ in range(args.repeats):
                for way, block in (("blocks", COLUMN_BLOCK), ("one block", k)):
                    rates[way].append(throughput(data[name], k, block, args.steps))
            best = {way: max(values) for way, values in rates.items()}
            row = {
                "panel": name,
                "nonzero_fraction": round(data[name].nonzero_fraction, 4),
                "n_topics": k,
                "cell_passes_per_s": best,
                "every_measurement": rates,
                "blocks_over_one_block": best["blocks"] / best["one block"],
            }
            results.append(row)
            print(row, flush=True)
    write_json(
        Path(args.out),
        {
            "data": (
                f"Kang 13,999 cells; batch 1,024; 2 threads; best of {args.repeats} alternating measurements, "
                "each timed from step to step"
            ),
            "column_block": COLUMN_BLOCK,
            "rows": results,
        },
    )


if __name__ == "__main__":
    main()
