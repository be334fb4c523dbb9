"""Peak memory against the number of cells for the three paths that read a whole .h5ad: the command line's
`annotate`, `tfp_scmix.annotate` on an AnnData opened backed="r", and chunked prediction (`tfp_scmix.predict`
on an .h5ad path). Each must be flat in the number of cells apart from the outputs it returns.

    ./run experiments.reliability.memory_1m                                   # 100k, 300k, 1M cells of pbmc3k
    ./run experiments.reliability.memory_1m --dataset embedded --cells 20000 50000 100000 --out /tmp/m.json

Trains a model on the dataset's 2000 most variable genes (150 labels, one restart; or takes --model), then
for each size writes a synthetic .h5ad of that many cells (the dataset's cells tiled, genes stored in reverse
order, so that they are aligned by name) into a temporary folder, chunk by chunk with h5py so that writing
it needs no memory of its size, and runs each path on it in a fresh process. Each process reports its peak
resident memory (VmHWM) above what it held after loading the model and predicting ten cells (the traced
function built), and the bytes of what it returns (outputs, or the annotated AnnData's obs/obsm in memory).
Writes results_memory_1m.json beside this file (or at --out): per path and size the seconds, the peak growth,
the outputs, and the growth per cell above the outputs (from a straight line through the sizes); a flat path
has working memory (peak growth minus outputs) that does not grow with the cells.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from experiments.common import load_dataset, write_json

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
PATHS = ("cli_annotate", "annotate_backed", "predict_chunked")

MEASURE = """
import json, sys, time
import numpy as np
import tfp_scmix as scm
from experiments.common import peak_rss_mb, rss_mb

path, model_path, data_path, out_path = sys.argv[1:5]
model = scm.load_model(model_path)
scm.predict(model, np.zeros((10, model.n_genes), np.float32))  # builds the predict function
base = rss_mb()
start = time.time()

def held(adata):  # MB of what an annotated AnnData holds in memory besides its counts: obs and obsm
    return (sum(np.asarray(v).nbytes for v in adata.obsm.values()) + adata.obs.memory_usage(deep=True).sum()) / 2**20

if path == "cli_annotate":
    from tfp_scmix.cli import main
    assert main(["annotate", model_path, data_path, "--out", out_path]) == 0
elif path == "annotate_backed":
    import anndata
    outputs = held(scm.annotate(model, anndata.read_h5ad(data_path, backed="r")))
else:
    out = scm.predict(model, data_path)
    outputs = sum(v.nbytes for v in out.values()) / 2**20
seconds, peak = time.time() - start, peak_rss_mb() - base
if path == "cli_annotate":  # what the command held while writing: the annotation it wrote (read after the peak)
    import anndata
    outputs = held(anndata.read_h5ad(out_path, backed="r"))
print(json.dumps({"seconds": round(seconds, 1), "rss_before_mb": round(base, 1),
                  "peak_growth_mb": round(peak, 1), "outputs_mb": round(float(outputs), 1)}))
"""


def write_tiled_h5ad(path, data, n_cells, block=50_000):
    """Write `n_cells` cells of `data` (SCData) tiled, genes in reverse order, as an .h5ad at `path`, block by
    block with h5py (memory: one block). Returns the number of nonzero counts."""
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    counts = data.counts[:, ::-1].tocsr()
    counts.sort_indices()
    nonzeros = 0
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        group = f.create_group("X")
        group.attrs["encoding-type"], group.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        group.attrs["shape"] = (n_cells, data.n_genes)
        values = group.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(1 << 16,))
        indices = group.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(1 << 16,))
        indptr = group.create_dataset("indptr", (n_cells + 1,), np.int64)
        indptr[0] = 0
        for start in range(0, n_cells, block):
            stop = min(start + block, n_cells)
            rows = np.arange(start, stop) % data.n_cells
            part = counts[rows]
            assert isinstance(part, sp.csr_matrix)
            values.resize((nonzeros + part.nnz,))
            indices.resize((nonzeros + part.nnz,))
            values[nonzeros:] = part.data
            indices[nonzeros:] = part.indices
            indptr[start + 1 : stop + 1] = nonzeros + part.indptr[1:]
            nonzeros += part.nnz
        write_elem(f, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
        write_elem(f, "var", pd.DataFrame(index=np.asarray(data.genes)[::-1]))
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, name, {})
    return nonzeros


def measure(path, model_path, data_path, work, timeout):
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEASURE), path, str(model_path), str(data_path), str(work / "out.h5ad")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{path} failed:\n{done.stderr[-3000:]}")
    (work / "out.h5ad").unlink(missing_ok=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pbmc3k", help="pbmc3k (needs $TFP_SCMIX_DATA) or embedded")
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--model", default=None, help="a saved model of the dataset's genes (default: train one)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--work", default=None, help="folder for the model and the .h5ad (default: temporary)")
    parser.add_argument("--out", default=str(HERE / "results_memory_1m.json"))
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)

    import tfp_scmix as scm

    data = load_dataset(args.dataset, n_genes=2000)
    result = {"dataset": args.dataset, "n_genes": int(data.n_genes), "cpu_count": __import__("os").cpu_count()}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if args.model:
            model_path = Path(args.model)
        else:
            labelled = np.random.default_rng(0).permutation(data.n_cells)[:150]
            model = scm.train(
                data.hide_labels(labelled), scm.Config(classifier_steps=500), restarts=1, epochs=args.epochs, verbose=0
            )
            model_path = scm.save_model(model, work / "model.keras")
        result["n_topics"] = scm.load_model(model_path).n_topics
        runs = []
        for n_cells in sorted(args.cells):
            nonzeros = write_tiled_h5ad(work / "cells.h5ad", data, n_cells)
            size = {
                "n_cells": n_cells,
                "nonzeros": nonzeros,
                "h5ad_mb": round((work / "cells.h5ad").stat().st_size / 2**20, 1),
            }
            for path in args.paths:
                numbers = {"path": path, **size, **measure(path, model_path, work / "cells.h5ad", work, args.timeout)}
                numbers["working_mb"] = round(numbers["peak_growth_mb"] - numbers["outputs_mb"], 1)
                print(json.dumps(numbers), flush=True)
                runs.append(numbers)
            (work / "cells.h5ad").unlink()
    result["runs"] = runs
    result["per_path"] = {}
    for path in args.paths:
        rows = [r for r in runs if r["path"] == path]
        cells = np.array([r["n_cells"] for r in rows], float)
        working = np.array([r["working_mb"] for r in rows])
        summary = {"working_mb": working.tolist(), "n_cells": cells.astype(int).tolist()}
        if len(rows) > 1:
            # MB of working memory (beyond the outputs) per million more cells: flat means near 0.
            summary["working_mb_per_million_cells"] = round(float(np.polyfit(cells / 1e6, working, 1)[0]), 1)
        result["per_path"][path] = summary
    write_json(args.out, result)
    print(json.dumps(result["per_path"], indent=2))
    return result


if __name__ == "__main__":
    main()
