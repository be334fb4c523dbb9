"""AnnData out: predictions, topic proportions and topic-gene weights written into a dataset."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from tfp_scmix.data import from_anndata, read_h5ad
from tfp_scmix.ensemble import SCMixEnsemble
from tfp_scmix.model import SCMix
from tfp_scmix.predict import predict

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
):
    """Annotate `adata` (an AnnData or an .h5ad path) in place with the model's predictions and return it.

    Writes obs[f"{key}_label"] (class names; "unassigned" below `min_confidence` or without counts over
    the model's genes), obs[f"{key}_confidence"], obsm[f"{key}_probs"] (DataFrame, one column per class),
    obsm[f"{key}_cell_topic"] `[n_cells, n_topics]`, varm[f"{key}_topic_gene"] `[n_vars, n_topics]`
    (zero for genes the model lacks) and uns[key] (classes, gene fingerprint, gene coverage).
    The dataset's genes are aligned to the model's by name. Raises DataError as `from_anndata` does.
    """
    if isinstance(adata, str):
        adata = read_h5ad(adata)
    data = from_anndata(
        adata,
        counts=counts,
        label_key=None,
        genes=model.genes,
        min_gene_fraction=min_gene_fraction,
        allow_empty_cells=True,
    )
    empty = data.library_size == 0
    if empty.any():
        logger.warning(
            "%d cells have no counts over the model's genes; they are marked %r", int(empty.sum()), UNASSIGNED
        )
    out = predict(model, data, batch_size=batch_size)
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
        "gene_coverage": float((pd.Index(model.genes).isin(adata.var_names)).mean()),
    }
    return adata
