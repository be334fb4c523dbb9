"""Predicting a million cells in one call: `predict_in_batches` from a backed .h5ad against the plain
`predict_data` on the whole matrix in memory.

    ./run experiments.reliability.predict_1m                     # pbmc3k, 2000 genes, 1,000,000 cells
    ./run experiments.reliability.predict_1m --dataset embedded --cells 100000 --skip-whole

Trains a model on the dataset (150 labels; or takes --model), tiles the dataset's cells (the 2000 most
variable genes) up to --cells and writes them as an .h5ad, then predicts it in a fresh process for each
method while a thread samples the process's resident memory every 5 ms. Writes results_predict_1m.json
beside this file (or at --out): cells, nonzero counts, seconds, memory before and at the peak, the
largest growth in each tenth of the run, the size of the outputs (filled as the run goes), and whether
the predictions of the first copy equal the model's predictions of the original cells.
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

HERE = Path(__file__).parent
ROOT = HERE.parent.parent

MEASURE = """
import json, os, sys, threading, time
import numpy as np
from tfp_scmix.annotate import predict_data
from tfp_scmix.data import from_anndata
from tfp_scmix.reliability import load_model, predict_in_batches

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

method, model_path, data_path, chunk_size, first = sys.argv[1:6]
model = load_model(model_path)
predict_in_batches(model, np.zeros((10, model.n_genes), np.float32))  # builds the predict function
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
    out = predict_in_batches(model, data_path, chunk_size=int(chunk_size))
else:
    out = predict_data(model, from_anndata(data_path, label_key=None, genes=model.genes))
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


def load_dataset(name):
    """SCData of the embedded dataset or of pbmc3k ($TFP_SCMIX_DATA), on at most 2000 variable genes."""
    from tfp_scmix.data import data_path, from_anndata, highly_variable_genes
    from tfp_scmix.datasets import pbmc68k_reduced

    data = from_anndata(pbmc68k_reduced() if name == "embedded" else data_path(f"{name}.h5ad"))
    if data.n_genes > 2000:
        data = data.select_genes(highly_variable_genes(data.counts, data.genes, 2000))
    return data


def measure(method, model_path, data_path, chunk_size, work, n_first, timeout):
    first = work / f"{method}.npy"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(MEASURE), method, str(model_path), str(data_path),
                           str(chunk_size), str(first), str(n_first)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
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
    parser.add_argument("--skip-whole", action="store_true", help="measure only predict_in_batches")
    parser.add_argument("--work", default=None, help="folder for the model and the .h5ad (default: temporary)")
    parser.add_argument("--out", default=str(HERE / "results_predict_1m.json"))
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)

    import anndata
    import pandas as pd
    import scipy.sparse as sp

    from tfp_scmix.annotate import predict_data
    from tfp_scmix.cli import train_model
    from tfp_scmix.io import atomic_path
    from tfp_scmix.reliability import load_model

    data = load_dataset(args.dataset)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        start = time.time()
        if args.model:
            model_path = Path(args.model)
            model = load_model(model_path)
        else:
            labelled = np.random.default_rng(0).permutation(data.n_cells)[:150]
            model = train_model(data.hide_labels(labelled), epochs=args.epochs, verbose=0, classifier_steps=500,
                                restarts=1)
            model_path = work / "model.keras"
            model.save(model_path)
        train_seconds = time.time() - start
        expected = predict_data(model, data.select_genes(model.genes))["probs"]
        copies = -(-args.cells // data.n_cells)
        counts = sp.vstack([data.counts] * copies, format="csr")[:args.cells]
        big = anndata.AnnData(X=counts, obs=pd.DataFrame(index=[f"cell{i}" for i in range(args.cells)]),
                              var=pd.DataFrame(index=data.genes))
        big[:, ::-1].write_h5ad(work / "cells.h5ad")  # genes in another order than the model's: aligned by name
        nonzeros = int(counts.nnz)
        del big, counts
        result = {"dataset": args.dataset, "n_cells": args.cells, "n_genes": int(data.n_genes),
                  "nonzeros": nonzeros, "n_topics": model.n_topics, "chunk_size": args.chunk_size,
                  "h5ad_mb": round((work / "cells.h5ad").stat().st_size / 2 ** 20, 1),
                  "train_seconds": round(train_seconds, 1), "cpu_count": __import__("os").cpu_count()}
        for method in ("streamed",) if args.skip_whole else ("streamed", "whole"):
            numbers, first = measure(method, model_path, work / "cells.h5ad", args.chunk_size, work,
                                     data.n_cells, args.timeout)
            numbers["first_copy_equals_model"] = bool(np.allclose(first, expected, atol=1e-5))
            result[method] = numbers
            print(method, numbers, flush=True)
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
