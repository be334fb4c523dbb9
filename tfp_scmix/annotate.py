"""AnnData out: predictions, topic proportions and topic-gene weights written into a dataset."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from tfp_scmix.data import DataError, check_argument, read_h5ad
from tfp_scmix.ensemble import SCMixEnsemble
from tfp_scmix.io import atomic_path
from tfp_scmix.model import SCMix
from tfp_scmix.predict import OUTPUT_KEYS, counts_slot, predict

logger = logging.getLogger("tfp_scmix")
UNASSIGNED = "unassigned"


def annotate(
    model: SCMix | SCMixEnsemble,
    adata,
    counts: str | None = None,
    min_confidence: float | None = None,
    key_added: str = "scmix",
    batch_size: int = 1024,
    min_gene_fraction: float = 0.5,
    chunk_size: int = 10_000,
):
    """Annotate `adata` (an AnnData, in memory or backed, or an .h5ad path) in place with the model's predictions.

    Writes obs[f"{key}_label"] (class names; "unassigned" below `min_confidence` or without counts over
    the model's genes), obs[f"{key}_confidence"], obsm[f"{key}_probs"] (DataFrame, one column per class),
    obsm[f"{key}_cell_topic"] `[n_cells, n_topics]`, varm[f"{key}_topic_gene"] `[n_vars, n_topics]`
    (zero for genes the model lacks) and uns[key] (classes, gene fingerprint, gene coverage: the fraction of
    the model's genes found in the slot the counts were read from, adata.raw's genes for counts='raw').
    Returns `adata` (a path is read into memory). The dataset's genes are aligned to the model's by name;
    cells are predicted `chunk_size` at a time (`tfp_scmix.predict`), so a backed AnnData's counts never
    enter memory whole: `write_h5ad` then writes the result with bounded memory too.
    min_confidence: a probability in [0, 1] (None: no threshold).
    Raises DataError as `from_anndata` does, and for a view of a backed AnnData (anndata cannot write into
    it); ValueError for numeric arguments out of range.
    """
    check_argument(
        "min_confidence", 0.0 if min_confidence is None else min_confidence, 0, 1, hint=" (a probability: 95% is 0.95)"
    )
    if isinstance(adata, (str, os.PathLike)):
        adata = read_h5ad(adata)
    if adata.isbacked and adata.is_view:
        raise DataError(
            "adata is a subset (view) of a backed AnnData: anndata cannot write annotations into it without "
            "copying it, which a backed view cannot do. Annotate adata[index].to_memory() (in memory), or the "
            "whole backed AnnData and subset afterwards."
        )
    slot, slot_genes = counts_slot(adata, counts)
    out = predict(
        model,
        adata,
        counts=slot,
        chunk_size=chunk_size,
        batch_size=batch_size,
        min_gene_fraction=min_gene_fraction,
        keys=(*OUTPUT_KEYS, "library_size"),
    )
    empty = out["library_size"] == 0
    if empty.any():
        logger.warning(
            "%d cells have no counts over the model's genes; they are marked %r", int(empty.sum()), UNASSIGNED
        )
    names = np.asarray(model.class_names, dtype=object)[out["label"]]
    unassigned = empty if min_confidence is None else empty | (out["confidence"] < min_confidence)
    names[unassigned] = UNASSIGNED
    adata.obs[f"{key_added}_label"] = pd.Categorical(names, categories=list(model.class_names) + [UNASSIGNED])
    adata.obs[f"{key_added}_confidence"] = out["confidence"]
    adata.obsm[f"{key_added}_probs"] = pd.DataFrame(out["probs"], index=adata.obs_names, columns=model.class_names)
    adata.obsm[f"{key_added}_cell_topic"] = out["cell_topic"]
    position = pd.Index(model.genes).get_indexer(adata.var_names)
    topic_gene = model.topic_gene().numpy().T  # [n_genes, n_topics]
    varm = np.zeros((adata.n_vars, model.n_topics), np.float32)
    varm[position >= 0] = topic_gene[position[position >= 0]]
    adata.varm[f"{key_added}_topic_gene"] = varm
    adata.uns[key_added] = {
        "classes": list(model.class_names),
        "gene_fingerprint": model.gene_fingerprint,
        "gene_coverage": float(pd.Index(model.genes).isin(slot_genes).mean()),
    }
    return adata


def write_h5ad(adata, path: str | os.PathLike[str], key_added: str = "scmix") -> Path:
    """Write an AnnData annotated by `annotate` to `path` atomically (a crash leaves the old file or nothing).

    A backed AnnData is written without reading its counts: its file is copied, then obs and the
    annotation's obsm, varm and uns entries (`key_added`) are written into the copy. Memory stays bounded
    for any number of cells (experiments/reliability/memory_1m.py). An AnnData in memory is written whole.
    Returns the path.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if not adata.isbacked:
            adata.write_h5ad(tmp)
            return path
        import h5py
        from anndata.io import write_elem

        shutil.copyfile(adata.filename, tmp)
        with h5py.File(tmp, "r+") as f:
            write_elem(f, "obs", adata.obs)
            for group, key in (
                ("obsm", f"{key_added}_probs"),
                ("obsm", f"{key_added}_cell_topic"),
                ("varm", f"{key_added}_topic_gene"),
                ("uns", key_added),
            ):
                value = getattr(adata, group)[key]
                if group in f:
                    write_elem(f[group], key, value)
                else:
                    write_elem(f, group, {key: value})
    return path
