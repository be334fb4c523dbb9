"""Prediction stage: the one door through which a trained model labels cells, at any number of cells.

`predict(model, source)` takes `SCData`, an AnnData (in memory or backed), an .h5ad path (read backed,
chunk by chunk) or a count matrix in the model's gene order, validates each chunk as `from_anndata`
does, and predicts it with the model's deterministic `call`: memory is bounded by one chunk plus the
outputs. `annotate`, the command line, the export client and the experiments predict through it.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import numpy as np
import scipy.sparse as sp

from tfp_scmix.data import UNLABELLED, DataError, SCData, check_counts, from_anndata, read_h5ad
from tfp_scmix.ensemble import SCMixEnsemble
from tfp_scmix.model import SCMix

logger = logging.getLogger("tfp_scmix")
OUTPUT_KEYS = ("probs", "label", "confidence", "cell_topic")


def _open(source, model, min_gene_fraction) -> tuple[int, Any]:
    """The number of cells of `source` and the source ready to slice (a path opened backed, an
    `SCData` aligned to the model's genes, a matrix checked against the model's width)."""
    if isinstance(source, (str, os.PathLike)):
        source = read_h5ad(source, backed="r")
    if isinstance(source, SCData):
        if list(source.genes) != list(model.genes):
            source = source.select_genes(model.genes, min_gene_fraction)
        n_cells = source.n_cells
    elif hasattr(source, "obs_names"):  # AnnData, in memory or backed
        n_cells = source.n_obs
    else:
        source = source if sp.issparse(source) else np.asarray(source)
        if source.ndim != 2 or source.shape[1] != model.n_genes:
            raise DataError(
                f"the count matrix has shape {source.shape}; the model reads {model.n_genes} genes "
                "in its own order (model.genes). Pass an AnnData to align genes by name."
            )
        n_cells = source.shape[0]
    if n_cells == 0:
        raise DataError("the dataset is empty (0 cells).")
    return n_cells, source


def _chunk(source, model, start, stop, counts, min_gene_fraction) -> SCData:
    """Cells `start:stop` of an opened source as validated `SCData` in the model's gene order."""
    if isinstance(source, SCData):
        return source.subset(np.arange(start, stop))
    if hasattr(source, "obs_names"):
        chunk = source[start:stop]
        chunk = chunk.to_memory() if source.isbacked else chunk
        return from_anndata(
            chunk,
            counts=counts,
            label_key=None,
            genes=model.genes,
            min_gene_fraction=min_gene_fraction,
            allow_empty_cells=True,
        )
    csr = sp.csr_matrix(source[start:stop], dtype=np.float32)
    check_counts(csr, f"rows {start}-{stop} of the count matrix")
    n = csr.shape[0]
    return SCData(
        csr,
        np.asarray(model.genes, dtype=str),
        np.full(n, UNLABELLED, np.int32),
        list(model.class_names),
        np.zeros(n, np.int32),
        ["0"],
        np.arange(start, stop).astype(str),
    )


class _OncePerMessage(logging.Filter):
    """Let each distinct log message through once (the same gene-coverage warning for every chunk)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        key = record.getMessage()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def predict(
    model: SCMix | SCMixEnsemble,
    source,
    *,
    counts: str | None = None,
    chunk_size: int = 10_000,
    batch_size: int = 1024,
    min_gene_fraction: float = 0.5,
    keys=None,
) -> dict[str, np.ndarray]:
    """Model outputs for any number of cells, read and predicted `chunk_size` cells at a time.

    source: an AnnData (genes aligned by name; a backed one is read chunk by chunk from disk), an .h5ad
    path (opened backed), an `SCData`, or a scipy sparse / numpy matrix `[n_cells, n_genes]` in the
    model's gene order. Each chunk is validated like `from_anndata` input. Memory is bounded by one chunk
    plus the outputs: {"probs" [n_cells, n_classes], "label" [n_cells], "confidence" [n_cells],
    "cell_topic" [n_cells, n_topics]}, and "novelty" [n_cells] (the `TopicNovelty` score in [0, 1]) when
    the model carries a detector (`tfp_scmix.train` fits one); `keys` keeps only some of them. Cells
    without counts over the model's genes are predicted from no evidence: `annotate` marks them unassigned.
    Raises DataError for an unreadable file, counts that are not raw counts, too few of the model's genes,
    a matrix of the wrong width or no cells.
    """
    n_cells, source = _open(source, model, min_gene_fraction)
    novelty = getattr(model, "novelty", None)
    keys = tuple(keys or (OUTPUT_KEYS if novelty is None else (*OUTPUT_KEYS, "novelty")))
    outputs = {}
    once = _OncePerMessage()
    logger.addFilter(once)
    try:
        for start in range(0, n_cells, chunk_size):
            stop = min(start + chunk_size, n_cells)
            chunk = _chunk(source, model, start, stop, counts, min_gene_fraction)
            out = model.predict(chunk.dataset(batch_size, shuffle=False), verbose=0)
            if novelty is not None and "novelty" in keys:
                out["novelty"] = novelty.score(out["cell_topic"])
            for key in keys:
                if key not in outputs:  # filled in place: no second copy of the outputs
                    outputs[key] = np.empty((n_cells,) + out[key].shape[1:], out[key].dtype)
                outputs[key][start:stop] = out[key]
            # A chunk's tf.data pipeline and Keras's predict loop leave reference cycles that hold its
            # tensors; left to the collector's schedule they kept memory creeping 1.3 MB per chunk.
            del out
            gc.collect(1)
    finally:
        logger.removeFilter(once)
    return outputs
