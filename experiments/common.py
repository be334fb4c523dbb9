"""Helpers shared by the experiments: benchmark datasets by name, the peers' log-normalised counts, markdown
tables, results written atomically, MLflow recording and process memory.

Only what more than one experiment needs lives here; each experiment keeps its own protocol.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np

EMBEDDED = "embedded"  # the dataset inside the package (tfp_scmix.datasets.pbmc68k_reduced)


# -- command lines -------------------------------------------------------------------------------------
def positive_int(text):
    """An argparse type: an integer of at least 1 (epochs, cells, genes, restarts, label budgets)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, received {value}")
    return value


def output_folder(parser, out):
    """`out` as a Path, checked before any measurement: a file there would fail only when the results are written
    (argparse's error and exit status 2)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; name a folder for the results")
    return out


# -- datasets ------------------------------------------------------------------------------------------
def read_dataset(name, max_cells=None):
    """AnnData of benchmark dataset `name` ($TFP_SCMIX_DATA/<name>.h5ad, or the embedded dataset for
    "embedded"): cbmc without its "Unknown" cells; `max_cells` random cells of it (numpy seed 0, in file
    order) when set and smaller than the dataset."""
    from tfp_scmix.data import data_path, read_h5ad
    from tfp_scmix.datasets import pbmc68k_reduced

    adata = pbmc68k_reduced() if name == EMBEDDED else read_h5ad(data_path(f"{name}.h5ad"))
    if name == "cbmc":
        adata = adata[adata.obs["cell_type"] != "Unknown"].copy()
    if max_cells and adata.n_obs > max_cells:
        adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, max_cells, replace=False))].copy()
    return adata


def load_dataset(name, max_cells=None, n_genes=None, **kwargs):
    """SCData of benchmark dataset `name` (see `read_dataset`; `kwargs` go to `from_anndata`), over its
    `n_genes` most variable genes when given (`most_variable`)."""
    from tfp_scmix.data import from_anndata

    data = from_anndata(read_dataset(name, max_cells), **kwargs)
    return most_variable(data, n_genes) if n_genes else data


def most_variable(data, n_genes, cells=None):
    """`data` over its `n_genes` most variable genes, by the counts of `cells` only (default: every cell);
    `data` itself when it has no more genes than that."""
    from tfp_scmix.data import highly_variable_genes

    if data.n_genes <= n_genes:
        return data
    counts = data.counts if cells is None else data.counts[cells]
    return data.select_genes(highly_variable_genes(counts, data.genes, n_genes))


def log_normalised(counts):
    """log1p(counts per 10k) of a CSR matrix (stays sparse): what the peers read (`tfp_scmix.data.log_normalised`)."""
    from tfp_scmix.data import log_normalised as package_log_normalised

    return package_log_normalised(counts)


# -- results -------------------------------------------------------------------------------------------
def markdown_table(frame):
    """A DataFrame as a markdown table (its columns, no index)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_text(path, text):
    """Write `text` to `path` atomically: the file appears whole or not at all. Returns `path`."""
    from tfp_scmix.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return path


def write_json(path, value, **kwargs):
    """`value` as indented JSON at `path`, atomically (`kwargs` go to json.dumps). Returns `path`."""
    return write_text(path, json.dumps(value, **{"indent": 2, **kwargs}) + "\n")


def record_results(path, experiment):
    """Log the rows of the results table at `path` as MLflow runs of `experiment` (training/record.py);
    returns the new runs' ids, or None (with a message) when MLflow is not installed."""
    try:
        from training.record import record
    except ImportError:
        print("MLflow not installed: results not logged")
        return None
    return record(path, experiment)


# -- peers in their own environments ------------------------------------------------------------------
PEER_ENVS = Path(__file__).parent  # experiments/.venv-<name>, shared by every experiment


def ensure_venv(name, package_groups, module, log=print):
    """Create experiments/.venv-<name> with `package_groups` (lists of pip requirements, installed in
    order) unless it already imports `module`. Returns (python path, None) or (None, why it cannot run)."""
    import subprocess
    import sys

    env = PEER_ENVS / f".venv-{name}"
    python = env / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0:
        return python, None
    log(f"installing the {name} peer into {env} ({'; '.join(' '.join(g) for g in package_groups)}; minutes)")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, capture_output=True)
        for packages in package_groups:
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", *packages],
                check=True,
                capture_output=True,
                text=True,
                timeout=1800,
            )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        detail = getattr(err, "stderr", "") or ""
        return None, f"{name} did not install ({type(err).__name__}: {detail.strip().splitlines()[-1:] or ''})"
    return python, None


# -- process memory ------------------------------------------------------------------------------------
def rss_mb():
    """Current resident memory of this process in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    """Peak resident memory of this process in MB (VmHWM: unlike ru_maxrss it restarts at exec, so a child
    does not inherit the peak of the process that started it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
