"""Counts drawn from the model's own generative process, for tests and benchmarks."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from tfp_scmix.data import SCData

if TYPE_CHECKING:
    import anndata


@dataclasses.dataclass
class Planted:
    """The truth behind a synthetic dataset: topic_gene `[K, G]`, cell_topic `[N, K]`, class_weights `[C, K]`."""

    topic_gene: np.ndarray
    cell_topic: np.ndarray
    class_weights: np.ndarray


def sample_counts(
    n_cells: int = 1000,
    n_genes: int = 300,
    n_topics: int = 6,
    n_classes: int = 3,
    alpha: float = 0.3,
    library_size: float = 2000,
    genes_per_topic: int = 15,
    n_labelled: int | None = None,
    seed: int = 0,
) -> tuple[SCData, Planted]:
    """Draw (SCData, Planted) from the generative process.

    Each class has its own dominant topics (class_weights is sparse, as under the horseshoe); a cell's
    topics are Dirichlet(alpha) plus a boost of its class's topics; counts are
    Multinomial(library, cell_topic @ topic_gene) with log-normal library sizes; labels are the argmax of
    class_weights @ log cell_topic. `n_labelled` cells keep their labels (all when None).

    Constants of the process (design choices, not fitted to data): gene background Gamma(0.5, 1); each
    topic's `genes_per_topic` marker genes get the mean background times Uniform(20, 60) added; a class's
    topics add 3 to the Dirichlet concentration of its cells; library sizes LogNormal(log(library_size),
    0.4) (median `library_size` counts), at least 50. One batch "0"; genes "gene<g>", cells "cell<n>",
    classes "type<c>". Raises ValueError (from numpy) when genes_per_topic > n_genes.
    """
    rng = np.random.default_rng(seed)
    background = rng.gamma(0.5, 1.0, n_genes)
    topic_gene = np.tile(background, (n_topics, 1))
    for k in range(n_topics):  # each topic over-expresses its own block of marker genes
        markers = rng.choice(n_genes, genes_per_topic, replace=False)
        topic_gene[k, markers] += background.mean() * rng.uniform(20, 60, genes_per_topic)
    topic_gene /= topic_gene.sum(axis=1, keepdims=True)
    class_topics = np.array_split(rng.permutation(n_topics), n_classes)
    class_weights = np.zeros((n_classes, n_topics))
    for c, topics in enumerate(class_topics):
        class_weights[c, topics] = 1.0
    cell_class = rng.integers(0, n_classes, n_cells)
    concentration = np.full((n_cells, n_topics), alpha)
    for c, topics in enumerate(class_topics):
        concentration[np.ix_(cell_class == c, topics)] += 3.0
    cell_topic = np.vstack([rng.dirichlet(a) for a in concentration])
    library = np.maximum(rng.lognormal(np.log(library_size), 0.4, n_cells).astype(int), 50)
    counts = np.vstack([rng.multinomial(n, p) for n, p in zip(library, cell_topic @ topic_gene, strict=True)])
    labels = (np.log(cell_topic + 1e-12) @ class_weights.T).argmax(axis=1).astype(np.int32)
    if n_labelled is not None:
        labels[rng.permutation(n_cells)[n_labelled:]] = -1
    data = SCData(
        sp.csr_matrix(counts.astype(np.float32)),
        np.array([f"gene{g}" for g in range(n_genes)]),
        labels,
        [f"type{c}" for c in range(n_classes)],
        np.zeros(n_cells, np.int32),
        ["0"],
        np.array([f"cell{n}" for n in range(n_cells)]),
    )
    return data, Planted(topic_gene, cell_topic, class_weights)


def to_anndata(data: SCData) -> anndata.AnnData:
    """An AnnData with the counts in X and labels in obs["cell_type"] (NaN where unknown)."""
    import anndata
    import pandas as pd

    labels = pd.Categorical.from_codes(data.labels, categories=data.classes)
    return anndata.AnnData(
        X=data.counts.copy(),
        obs=pd.DataFrame({"cell_type": labels}, index=data.obs_names),
        var=pd.DataFrame(index=data.genes),
    )
