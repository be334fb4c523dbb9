"""What the call with known labels costs: `annotate.with_labels_probs` (pooled counts, each member's class branch
refitted on the labelled cells' pooled counts) against the call before it (`propagate.with_known_labels`, label
spreading) and against the per-cell prediction, on the same model and cells.

    ./run experiments.few_shot.pooled_cost      # cbmc, 150 labels, seed 0; writes pooled_cost/results.json

The model is the package default (`scm.Config()`, three restarts) trained for `EPOCHS` epochs only: the time of the
calls does not depend on how well the model is trained, and a full training takes minutes that measure nothing
here. Each call is timed `REPEATS` times in the same process, after one untimed call that traces and compiles;
the median is reported, with its ratio to the per-cell prediction of the same cells (ratios, since the machine is
shared). docs/few_shot.md, "Pooled counts of the neighbours", cites the file.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import tfp_scmix as scm
from experiments.common import most_variable, write_json
from experiments.few_shot.run import suite_dataset
from tfp_scmix.annotate import with_labels_probs
from tfp_scmix.evaluate import few_shot_split
from tfp_scmix.novelty import log_ratio_features
from tfp_scmix.propagate import with_known_labels

HERE = Path(__file__).parent / "pooled_cost"
EPOCHS = 5
REPEATS = 3


def timed(function):
    """Median seconds of `REPEATS` calls of `function` after one untimed call."""
    function()
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="cbmc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)
    full = suite_dataset(args.dataset)
    data = most_variable(full, 2000)
    _, labelled = few_shot_split(data.n_cells, 0, 150, args.seed)
    known = data.hide_labels(labelled)
    model = scm.train(known, scm.Config(), restarts=3, seed=args.seed, epochs=EPOCHS, verbose=0)

    def per_cell():
        return scm.predict(model, known, keys=("probs", "cell_topic"))

    out = per_cell()
    features = log_ratio_features(out["cell_topic"], len(model.members))
    result = {
        "dataset": args.dataset,
        "cells": int(data.n_cells),
        "genes": int(data.n_genes),
        "labelled": int(len(labelled)),
        "members": len(model.members),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "seconds": {
            "per-cell prediction": timed(per_cell),
            "label spreading call (with_known_labels, the call before)": timed(
                lambda: with_known_labels(out["probs"], known.labels, known.counts, features)
            ),
            "pooled-counts call (with_labels_probs, given the per-cell outputs)": timed(
                lambda: with_labels_probs(model, known, out)
            ),
        },
    }
    base = result["seconds"]["per-cell prediction"]
    result["ratio to the per-cell prediction"] = {k: round(v / base, 2) for k, v in result["seconds"].items()}
    path = Path(args.out) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
