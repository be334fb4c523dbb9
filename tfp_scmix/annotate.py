"""AnnData in and out: predictions, topic proportions and topic-gene weights written into a dataset."""

import logging

import numpy as np
import pandas as pd

from tfp_scmix.data import from_anndata, read_h5ad

logger = logging.getLogger("tfp_scmix")
UNASSIGNED = "unassigned"


def predict_data(model, data, batch_size=1024):
    """Model outputs for every cell of an `SCData` in the model's gene order, batched (bounded memory)."""
    return model.predict(data.dataset(batch_size, shuffle=False), verbose=0)


def annotate(model, adata, counts=None, min_confidence=None, key_added="scmix", batch_size=1024,
             min_gene_fraction=0.5):
    """Annotate `adata` in place with the model's predictions and return it.

    Writes obs[f"{key}_label"] (class names; "unassigned" below `min_confidence`),
    obs[f"{key}_confidence"], obsm[f"{key}_probs"] (DataFrame, one column per class),
    obsm[f"{key}_topics"] `[n_cells, n_topics]`, varm[f"{key}_topic_gene"] `[n_vars, n_topics]`
    (zero for genes the model lacks) and uns[key] (classes, gene fingerprint, gene coverage).
    The dataset's genes are aligned to the model's by name.
    """
    if isinstance(adata, str):
        adata = read_h5ad(adata)
    data = from_anndata(adata, counts=counts, label_key=None, genes=model.genes,
                        min_gene_fraction=min_gene_fraction, allow_empty_cells=True)
    empty = data.library_size == 0
    if empty.any():
        logger.warning("%d cells have no counts over the model's genes; they are marked %r",
                       int(empty.sum()), UNASSIGNED)
    out = predict_data(model, data, batch_size)
    names = np.asarray(model.class_names, dtype=object)[out["label"]]
    unassigned = empty if min_confidence is None else empty | (out["confidence"] < min_confidence)
    names[unassigned] = UNASSIGNED
    adata.obs[f"{key_added}_label"] = pd.Categorical(names, categories=list(model.class_names) + [UNASSIGNED])
    adata.obs[f"{key_added}_confidence"] = out["confidence"]
    adata.obsm[f"{key_added}_probs"] = pd.DataFrame(out["probs"], index=adata.obs_names,
                                                   columns=model.class_names)
    adata.obsm[f"{key_added}_topics"] = out["topics"]
    position = pd.Index(model.genes).get_indexer(adata.var_names)
    topic_gene = model.topics(None).numpy().T  # [n_genes, n_topics]
    varm = np.zeros((adata.n_vars, model.n_topics), np.float32)
    varm[position >= 0] = topic_gene[position[position >= 0]]
    adata.varm[f"{key_added}_topic_gene"] = varm
    adata.uns[key_added] = {"classes": list(model.class_names), "gene_fingerprint": model.gene_fingerprint,
                            "gene_coverage": float((pd.Index(model.genes).isin(adata.var_names)).mean())}
    return adata
