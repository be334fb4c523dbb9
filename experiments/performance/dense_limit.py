"""The encoder's dense-minibatch limit: training throughput with the old and the new limit, side by side.

    ./run experiments.performance.dense_limit      # about 2 minutes; writes results_dense_limit.json
    ./run experiments.performance.dense_limit --cells 2048 --steps 2 --out /tmp/dense_limit.json   # a check

A minibatch of 1,024 cells x 5,000 genes (12.8% nonzero, the density of the Kang files at 5,000 genes)
holds 5.1M entries: above the old limit of 2^22 the encoder multiplied it sparse, below the new 2^25 it is
densified (20 MB) and multiplied by BLAS. Synthetic counts of that shape; 20 topics; each limit measured
twice, alternating, after 3 warm-up steps. Times `model.fit` steps of a model built and compiled as
`tfp_scmix.train` builds it (a speed measurement, not a training recipe).
"""

import argparse
import json
from pathlib import Path

import keras
import numpy as np
import scipy.sparse as sp

from experiments.common import write_json

HERE = Path(__file__).parent
LIMITS = {"old (2^22)": 2**22, "new (2^25)": 2**25}


def counts_data(n_cells=8192, n_genes=5000, density=0.128, seed=0):
    from tfp_scmix.data import SCData

    rng = np.random.default_rng(seed)
    counts = sp.random(n_cells, n_genes, density=density, random_state=seed, format="csr", dtype=np.float32)
    counts.data = rng.integers(1, 6, counts.nnz).astype(np.float32)
    labels = np.where(rng.random(n_cells) < 0.05, rng.integers(0, 3, n_cells), -1).astype(np.int32)
    return SCData(
        counts,
        np.array([f"g{i}" for i in range(n_genes)]),
        labels,
        ["a", "b", "c"],
        np.zeros(n_cells, np.int32),
        ["0"],
        np.array([f"c{i}" for i in range(n_cells)]),
    )


def fit_rate(data, batch_size=1024, steps=16, configure=None, n_topics=20):
    """Training cell-passes per second of a model of `n_topics` topics built and compiled as `tfp_scmix.train`
    builds it, over `steps` minibatches after 3 warm-up steps of the same `fit` call, timed from step to step
    (`StepTimer`) so that the call's own start and end (the input pipeline's iterator made and torn down) are not
    counted; `configure(model)` runs before compiling."""
    from experiments.performance.run import StepTimer
    from tfp_scmix.config import Config
    from tfp_scmix.model import SCMix

    keras.utils.set_random_seed(0)
    config = Config(n_topics=n_topics, batch_size=batch_size)
    model = SCMix.from_data(data, config)
    if configure is not None:
        configure(model)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    timer = StepTimer(warmup=3, budget_s=float("inf"))
    model.fit(data.dataset(batch_size, repeat=True), epochs=1, steps_per_epoch=3 + steps, verbose=0, callbacks=[timer])
    return (len(timer.times) - 1) * batch_size / (timer.times[-1] - timer.times[0])


def throughput(data, limit, batch_size=1024, steps=16):
    """Training cell-passes per second with the encoder's DENSE_BATCH_LIMIT set to `limit`."""
    from tfp_scmix.layers.cell import CellEncoder

    default = CellEncoder.DENSE_BATCH_LIMIT
    CellEncoder.DENSE_BATCH_LIMIT = limit
    try:
        return fit_rate(data, batch_size, steps)
    finally:
        CellEncoder.DENSE_BATCH_LIMIT = default


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=8192, help="synthetic cells (5,000 genes each)")
    parser.add_argument("--steps", type=int, default=16, help="timed training steps of each measurement")
    parser.add_argument("--out", default=str(HERE / "results_dense_limit.json"))
    args = parser.parse_args(argv)
    data = counts_data(args.cells)
    rates = {name: [] for name in LIMITS}
    for _ in range(2):
        for name, limit in LIMITS.items():
            rates[name].append(throughput(data, limit, steps=args.steps))
            print(f"{name}: {rates[name][-1]:,.0f} cell-passes/s", flush=True)
    result = {
        "data": f"synthetic {args.cells:,} cells x 5,000 genes, 12.8% nonzero; batch 1,024; 20 topics",
        "cell_passes_per_s": {name: float(np.mean(v)) for name, v in rates.items()},
    }
    result["ratio_new_over_old"] = result["cell_passes_per_s"]["new (2^25)"] / result["cell_passes_per_s"]["old (2^22)"]
    write_json(args.out, result, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
