"""Predicting a million cells in one call: `tfp_scmix.predict` reading a backed .h5ad chunk by chunk, against
the same call on the whole matrix read into memory first (`from_anndata`).

    ./run experiments.reliability.predict_1m                     # pbmc3k, 2000 genes, 1,000,000 cells
    ./run experiments.reliability.predict_1m --dataset embedded --cells 100000 --skip-whole

Trains a model on the dataset (150 labels, `tfp_scmix.train` with one restart; or takes --model), tiles
the dataset's cells (the 2000 most variable genes) up to --cells and writes them as an .h5ad, then predicts
it in a fresh process for each method ("streamed": the path, read backed; "whole": the file read with
`from_anndata` first; both in chunks of --chunk-size cells) while a thread samples the process's resident
memory every 5 ms. Writes results_predict_1m.json beside this file (or at --out): cells, nonzero counts,
seconds, memory before and at the peak, the largest growth in each tenth of the run, the size of the
outputs (filled as the run goes), and whether the predictions of the first copy equal the model's
predictions of the original cells.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from experiments.common import load_dataset, write_json

HERE = Path(__file__).parent
ROOT = HERE.parent.parent

MEASURE = """
import json, sys, threading, time
import numpy as np
import tfp_scmix as scm
from experiments.common import rss_mb
from tfp_scmix.io import load_model

method, model_path, data_path, chunk_size, first = sys.argv[1:6]
model = load_model(model_path)
scm.predict(model, np.zeros((10, model.n_genes), np.float32))  # builds the predict function
samples, running = [], [True]
def watch():
    while running[0]:
        samples.append(rss_mb())
        time.sleep(0.005)
base = rss_mb()
watcher = threading.Thread(target=watch)
watcher.start()
start = time.time()
if method == "streamed":
    out = scm.predict(model, data_path, chunk_size=int(chunk_size))
else:
    out = scm.predict(model, scm.from_anndata(data_path, label_key=None, genes=model.genes),
                      chunk_size=int(chunk_size))
seconds = time.time() - start
running[0] = False
watcher.join()
np.save(first, out["probs"][:int(sys.argv[6])])
trajectory = [round(max(samples[i * len(samples) // 10:(i + 1) * len(samples) // 10]) - base, 1) for i in range(10)]
print(json.dumps({"seconds": round(seconds, 1), "rss_before_mb": round(base, 1),
                  "peak_growth_mb": round(max(samples) - base, 1), "growth_per_tenth_mb": trajectory,
                  "outputs_mb": round(sum(v.nbytes for v in out.values()) / 2 ** 20, 1),
                  "n_cells": int(out["label"].size)}))
"""


def measure(method, model_path, data_path, chunk_size, work, n_first, timeout):
    first = work / f"{method}.npy"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(MEASURE),
            method,
            str(model_path),
            str(data_path),
            str(chunk_size),
            str(first),
            str(n_first),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{method} prediction failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(first)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pbmc3k", help="pbmc3k (needs $TFP_SCMIX_DATA) or embedded")
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--model", default=None, help="a saved model of the dataset's genes (default: train one)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--skip-whole", action="store_true", help="measure only the chunked prediction from disk")
    parser.add_argument("--work", default=None, help="folder for the model and the .h5ad (default: temporary)")
    parser.add_argument("--out", default=str(HERE / "results_predict_1m.json"))
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)

    import anndata
    import pandas as pd
    import scipy.sparse as sp

    import tfp_scmix as scm
    from tfp_scmix.io import load_model

    data = load_dataset(args.dataset, n_genes=2000)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        start = time.time()
        if args.model:
            model_path = Path(args.model)
            model = load_model(model_path)
        else:
            labelled = np.random.default_rng(0).permutation(data.n_cells)[:150]
            model = scm.train(
                data.hide_labels(labelled), scm.Config(classifier_steps=500), restarts=1, epochs=args.epochs, verbose=0
            )
            model_path = scm.save_model(model, work / "model.keras")
        train_seconds = time.time() - start
        expected = scm.predict(model, data.select_genes(model.genes))["probs"]
        copies = -(-args.cells // data.n_cells)
        counts = sp.vstack([data.counts] * copies, format="csr")[: args.cells]
        big = anndata.AnnData(
            X=counts,
            obs=pd.DataFrame(index=[f"cell{i}" for i in range(args.cells)]),
            var=pd.DataFrame(index=data.genes),
        )
        big[:, ::-1].write_h5ad(work / "cells.h5ad")  # genes in another order than the model's: aligned by name
        nonzeros = int(counts.nnz)
        del big, counts
        result = {
            "dataset": args.dataset,
            "n_cells": args.cells,
            "n_genes": int(data.n_genes),
            "nonzeros": nonzeros,
            "n_topics": model.n_topics,
            "chunk_size": args.chunk_size,
            "h5ad_mb": round((work / "cells.h5ad").stat().st_size / 2**20, 1),
            "train_seconds": round(train_seconds, 1),
            "cpu_count": __import__("os").cpu_count(),
        }
        for method in ("streamed",) if args.skip_whole else ("streamed", "whole"):
            numbers, first = measure(
                method, model_path, work / "cells.h5ad", args.chunk_size, work, data.n_cells, args.timeout
            )
            numbers["first_copy_equals_model"] = bool(np.allclose(first, expected, atol=1e-5))
            result[method] = numbers
            print(method, numbers, flush=True)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
