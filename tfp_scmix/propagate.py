"""Propagation stage: class probabilities spread over a k-nearest-neighbour graph of cells.

The classification branch labels each cell from its own counts. Cells of one type sit together, so the few
known labels carry information about their neighbours. Propagation iterates f <- (1 - alpha) f0 + alpha S f
with S = D^-1/2 A D^-1/2, A the symmetrised kNN connectivity (Zhou et al. 2004, "Learning with local and global
consistency", the label spreading that scikit-learn's `LabelSpreading` implements; that class clamps one-hot
labels only, so it cannot start from a classifier's probabilities).

`smooth` spreads a trained model's probabilities over the kNN graph of the cells it annotates, no cell
clamped: each cell's call then weighs its neighbours' as much as its own (alpha = 0.5), which mends calls that a
shift between datasets scatters within a population (docs/cross_dataset.md, "Smoothing over the target's
cells": measured on the transfer matrix, where larger alphas let large classes swallow rare ones).

`with_known_labels` is a transductive step for a dataset annotated together with some of its own labels
(the few-shot use: train on a dataset with a few hundred labels, then annotate that dataset): label spreading
(Zhou et al. 2004, scikit-learn's `LabelSpreading` with its default alpha = 0.2) of the known labels over the
kNN graph of the cells, the graph built on the genes' principal components (scanpy's recipe) and the model's
own topic features side by side, combined with the model's probabilities as a product of experts (Hinton
2002): two sources of evidence about a cell's label, its own counts and its neighbours' known labels, each
normalised. It seeds self-training (`Config.self_training`); it was `annotate`'s call with known labels until
the pooled counts below replaced it. docs/few_shot.md, "Known labels of the annotated dataset", has the
measurements.

`known_labels_features`, `pooled_counts` and `product_of_experts` serve `annotate`'s call with known labels,
which pools each cell's counts with its `POOLING_NEIGHBORS` nearest neighbours' on those features (kNN pooling,
as kNN-smoothing and metacells do) and multiplies the model's probabilities of the cell with those of its pooled
counts (`annotate.with_labels_probs`; docs/few_shot.md, "Pooled counts of the neighbours" and "Pooling at two
scales"): the model's class branch is needed to call pooled counts, so that step lives in the annotation stage.

`self_training_labels` turns `with_known_labels`'s combined call into the labels `SCMix.fit_classifier` fits the
unlabelled cells to (self-training, docs/few_shot.md): each cell's call where the combined probability is at least
`SELF_TRAINING_CONFIDENCE`, no label elsewhere. Seeded by the combined call rather than by the classifier alone,
the refit learns from the neighbours' known labels as well as from its own confident calls.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from tfp_scmix.data import log_normalised

# Neighbours per cell (scanpy's `pp.neighbors` default) and `spread`'s iterations (those of Huang et al. 2021's
# correct-and-smooth, which this module implemented until self-training was seeded by `with_known_labels`).
N_NEIGHBORS = 15
ITERATIONS = 50
# Smoothing's weight of the neighbourhood against the cell's own prediction (`smooth`): equal weights. Of
# 0.5, 0.8, 0.9 and 0.95 on the transfer matrix (docs/cross_dataset.md), the only one that cost no pair more
# than 0.001 of accuracy or macro-F1 (smaller weights were not measured); 0.8 and above merged the Baron mice's
# rare types into their neighbours.
SMOOTHING_ALPHA = 0.5
# Label spreading's weight of the neighbourhood for known labels (`with_known_labels`): scikit-learn's
# `LabelSpreading` default, the setting of the few-shot suite's label-spreading peer (not tuned here).
SPREADING_ALPHA = 0.2
# Above this many cells `knn_graph` finds approximate neighbours (NN-descent) instead of exact ones, whose cost grows
# with the square of the cells (experiments/performance/neighbour_graph.json); the same threshold as the switch to
# mini-batch k-means in `annotate.over_clusters`. Every dataset of the benchmarks is below it.
EXACT_NEIGHBORS_CELLS = 50_000
# Principal components of the genes in the graph of `with_known_labels` (the few-shot suite's peers' 30).
N_COMPONENTS = 30
# `gram`: scipy's sparse product x^T x costs about as much as this many dense multiply-adds (BLAS, float64) for each
# product of two nonzeros of a cell (the two ways side by side on the Kang cells at 25%, 12.8% and 2.7% nonzero:
# experiments/performance/principal_components.json); the dense product is computed in blocks of at most
# GRAM_BLOCK_ENTRIES entries (32 MB of float64).
SPARSE_GRAM_COST = 100.0
GRAM_BLOCK_ENTRIES = 2**22
# Neighbourhood sizes at which `annotate.known_label_experts` pools a cell's counts with its neighbours' (one
# pooled expert per size, multiplied): scanpy's 15. Adding 30 was measured and not taken: fewer errors on seeds 3-4
# of the few-shot suite, where it was chosen, none on seeds 0-2 (docs/few_shot.md, "Pooling at two scales").
POOLING_NEIGHBORS: tuple[int, ...] = (N_NEIGHBORS,)
# The combined call's probability from which an unlabelled cell's call joins the self-training fit
# (`self_training_labels`). Chosen with a stand-in classifier on the few-shot suite before the model was run
# with it (experiments/few_shot/balanced_spreading/, column product_self_trained; docs/few_shot.md).
SELF_TRAINING_CONFIDENCE = 0.9


def knn_graph(features: np.ndarray, n_neighbors: int = N_NEIGHBORS) -> sp.csr_matrix:
    """S = D^-1/2 A D^-1/2 `[n_cells, n_cells]` of the symmetrised kNN connectivity A of `features`
    `[n_cells, n_features]` (Euclidean; each cell's `n_neighbors` nearest other cells, fewer when there
    are fewer cells). Raises ValueError for fewer than two cells.

    Up to `EXACT_NEIGHBORS_CELLS` cells the neighbours are exact (scikit-learn's `NearestNeighbors`, whose cost
    grows with the square of the cells); above, approximate: NN-descent (Dong et al. 2011; `pynndescent`, the search
    scanpy's `pp.neighbors` uses), seeded, the same on every call with the same number of threads
    (experiments/performance/neighbour_graph.json: time and the fraction of exact neighbours found)."""
    features = np.asarray(features, np.float64)
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"a neighbour graph needs at least two cells, received {n}")
    k = min(int(n_neighbors), n - 1)
    index = nearest_neighbors(features, k + 1)
    # Identical cells can push a cell out of its own first place: drop self-loops wherever they landed.
    rows = np.repeat(np.arange(n), k + 1)
    keep = (index.ravel() != rows) & (index.ravel() >= 0)  # NN-descent marks a neighbour it could not fill -1
    connect = sp.csr_matrix((np.ones(keep.sum()), (rows[keep], index.ravel()[keep])), shape=(n, n))
    connect = connect.maximum(connect.T)
    scale = sp.diags(1.0 / np.sqrt(np.asarray(connect.sum(axis=1)).ravel()))
    return sp.csr_matrix(scale @ connect @ scale)


def nearest_neighbors(features: np.ndarray, n_neighbors: int) -> np.ndarray:
    """Each cell's `n_neighbors` nearest cells, itself included, int `[n_cells, n_neighbors]` (Euclidean, of
    `features` `[n_cells, n_features]`): exact up to `EXACT_NEIGHBORS_CELLS` cells, NN-descent above (`knn_graph`)."""
    if features.shape[0] <= EXACT_NEIGHBORS_CELLS:
        from sklearn.neighbors import NearestNeighbors

        return NearestNeighbors(n_neighbors=n_neighbors).fit(features).kneighbors(features, return_distance=False)
    from pynndescent import NNDescent

    return NNDescent(features.astype(np.float32), n_neighbors=n_neighbors, random_state=0).neighbor_graph[0]


def spread(
    graph: sp.csr_matrix,
    start: np.ndarray,
    clamped: np.ndarray,
    alpha: float,
    iterations: int = ITERATIONS,
) -> np.ndarray:
    """Iterate f <- (1 - alpha) start + alpha graph f `iterations` times, rows `clamped` (index) held at
    their `start` values; start `[n_cells, n_classes]`; alpha the neighbourhood's weight, each caller's own
    (`SMOOTHING_ALPHA`, `SPREADING_ALPHA`). Returns f `[n_cells, n_classes]`."""
    result = start.copy()
    for _ in range(int(iterations)):
        result = (1.0 - alpha) * start + alpha * (graph @ result)
        result[clamped] = start[clamped]
    return result


def smooth(
    features: np.ndarray, probs: np.ndarray, alpha: float = SMOOTHING_ALPHA, n_neighbors: int = N_NEIGHBORS
) -> np.ndarray:
    """Class probabilities `[n_cells, n_classes]` spread over the `knn_graph` of `features`
    `[n_cells, n_features]` (the model's `X_scmix`), no cell clamped, rows renormalised to sum to one: the
    fixed point of f = (1 - alpha) probs + alpha S f (Zhou et al. 2004, with the classifier's probabilities
    as the start instead of one-hot labels). alpha in [0, 1): 0 returns `probs`; larger values trust the
    neighbourhood more. A single cell comes back unchanged. Raises ValueError when the shapes disagree or
    alpha is outside [0, 1)."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or np.shape(features)[0] != probs.shape[0]:
        raise ValueError(
            f"features {np.shape(features)} and probs {probs.shape} must describe the same cells "
            "([n_cells, n_features] and [n_cells, n_classes])"
        )
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), received {alpha}")
    if probs.shape[0] < 2 or alpha == 0.0:
        return probs
    smoothed = spread(knn_graph(features, n_neighbors), probs, np.array([], int), alpha=alpha)
    return smoothed / np.maximum(smoothed.sum(axis=1, keepdims=True), 1e-12)


def principal_components(
    counts: sp.spmatrix,
    n_components: int = N_COMPONENTS,
    seed: int = 0,
    fit_cells: np.ndarray | None = None,
    max_value: float | None = None,
) -> np.ndarray:
    """`[n_cells, min(n_components, n_fit - 1, n_genes)]` principal components of counts `[n_cells, n_genes]`
    (CSR) after scanpy's recipe: log1p(counts per 10k), each gene scaled to unit variance
    (`sc.pp.scale`), principal components of the centred matrix (`sc.pp.pca`); fitted on the cells
    `fit_cells` (index; default all) and applied to all.
    max_value None (`sc.pp.scale`'s default): genes without variance are dropped (at most as many components
    as genes that vary; one component of zeros when none does) and the matrix stays sparse, centred implicitly:
    the components are the leading eigenvectors of the genes' covariance (scikit-learn's
    `svd_solver="covariance_eigh"`, with x^T x formed by `gram` in place of scikit-learn's sparse product, several
    times slower on dense-ish counts: experiments/performance/principal_components.json),
    each signed so that its largest loading is positive (scikit-learn's `svd_flip`); memory: one float64 copy of
    the nonzeros plus genes x genes. max_value 10 (scanpy's tutorial): scaled values are clipped at +-10 on a dense
    copy, scikit-learn's `StandardScaler` and `PCA` (the few-shot suite's peers); seed is that PCA's."""
    fit = np.arange(counts.shape[0]) if fit_cells is None else np.asarray(fit_cells)
    k = max(1, min(int(n_components), len(fit) - 1, counts.shape[1]))
    if max_value is not None:
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        dense = log_normalised(counts).toarray()
        scaler = StandardScaler().fit(dense[fit])
        pca = PCA(k, random_state=seed).fit(np.clip(scaler.transform(dense[fit]), -max_value, max_value))
        return pca.transform(np.clip(scaler.transform(dense), -max_value, max_value))
    from sklearn.utils.sparsefuncs import mean_variance_axis

    # float64 values, scaled in place: each copy of a matrix of a million cells is gigabytes (a trial's majority
    # voting on 1,000,000 cells passed 22 GB).
    x = log_normalised(counts, dtype=np.float64)
    _, variance = mean_variance_axis(x if fit_cells is None else x[fit], axis=0)
    keep = variance > 0
    if not keep.any():  # no gene varies among the fitted cells: they are all alike
        return np.zeros((x.shape[0], 1))
    scale = np.zeros(x.shape[1])
    scale[keep] = 1.0 / np.sqrt(variance[keep])
    for start in range(0, x.nnz, GRAM_BLOCK_ENTRIES):  # x.data *= scale[x.indices], without a temporary of nnz
        x.data[start : start + GRAM_BLOCK_ENTRIES] *= scale[x.indices[start : start + GRAM_BLOCK_ENTRIES]]
    k = max(1, min(k, int(keep.sum())))
    fitted = x if fit_cells is None else x[fit]
    mean = column_sums(fitted)[keep] / fitted.shape[0]
    covariance = (gram(fitted)[np.ix_(keep, keep)] - len(fit) * np.outer(mean, mean)) / (len(fit) - 1)
    n_kept = covariance.shape[0]
    _, vectors = scipy.linalg.eigh(covariance, subset_by_index=[n_kept - k, n_kept - 1])
    vectors = vectors[:, ::-1]  # the largest variance first
    vectors *= np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(k)])
    loadings = np.zeros((x.shape[1], k))  # genes without variance weigh nothing (their scaled values are 0)
    loadings[keep] = vectors
    return np.asarray(x @ loadings) - mean @ vectors


def column_sums(x: sp.csr_matrix) -> np.ndarray:
    """Each gene's sum over the cells `[n_genes]` (float64) of `x` `[n_cells, n_genes]` (CSR), in blocks of
    `GRAM_BLOCK_ENTRIES` values: scipy's `sum(axis=0)` converts the whole matrix first (6 GB more for a million
    cells of 2,000 genes at 25% nonzero, measured)."""
    sums = np.zeros(x.shape[1])
    for start in range(0, x.nnz, GRAM_BLOCK_ENTRIES):
        stop = start + GRAM_BLOCK_ENTRIES
        sums += np.bincount(x.indices[start:stop], weights=x.data[start:stop], minlength=x.shape[1])
    return sums


def gram(x: sp.csr_matrix) -> np.ndarray:
    """x^T x `[n_genes, n_genes]` (float64) of `x` `[n_cells, n_genes]` (CSR): scipy's sparse product where its
    cost, the sum over cells of their nonzeros squared, times `SPARSE_GRAM_COST`, is below the dense product's
    cells x genes^2 multiply-adds; otherwise dense blocks of at most `GRAM_BLOCK_ENTRIES` entries through BLAS
    (experiments/performance/principal_components.json measures both). Memory: genes x genes plus one block."""
    n_cells, n_genes = x.shape
    row_nonzeros = np.diff(x.indptr).astype(np.float64)
    if SPARSE_GRAM_COST * float(row_nonzeros @ row_nonzeros) < float(n_cells) * n_genes * n_genes:
        return np.asarray((x.T @ x).toarray(), np.float64)
    result = np.zeros((n_genes, n_genes))
    step = max(1, GRAM_BLOCK_ENTRIES // n_genes)
    for start in range(0, n_cells, step):
        block = x[start : start + step].toarray().astype(np.float64, copy=False)
        result += block.T @ block
    return result


def equal_blocks(*blocks: np.ndarray) -> np.ndarray:
    """Feature blocks `[n_cells, d_i]` side by side, each scaled so that its mean squared distance to the
    cells' centre is one: each block weighs equally in Euclidean distances whatever its dimension and units."""
    scaled = []
    for block in blocks:
        block = np.asarray(block, np.float64)
        spread_ = np.sqrt(((block - block.mean(axis=0)) ** 2).sum(axis=1).mean())
        scaled.append(block / spread_ if spread_ > 0 else block)
    return np.hstack(scaled)


def label_spreading(
    graph: sp.csr_matrix, labels: np.ndarray, n_classes: int, alpha: float = SPREADING_ALPHA
) -> np.ndarray:
    """Known labels `[n_cells]` (class index, -1 unknown) spread over `graph` (`knn_graph`, `[n_cells,
    n_cells]`): the fixed point of f = (1 - alpha) Y + alpha S f, Y the one-hot known labels (Zhou et al.
    2004; scikit-learn's `LabelSpreading`). Returns probabilities `[n_cells, n_classes]`, rows normalised;
    cells no known label reaches within `ITERATIONS` steps get 1 / n_classes each."""
    onehot = np.zeros((len(labels), int(n_classes)))
    known = np.flatnonzero(labels >= 0)
    onehot[known, labels[known]] = 1.0
    spreadout = spread(graph, onehot, np.array([], int), alpha=alpha)
    mass = spreadout.sum(axis=1, keepdims=True)
    return np.where(mass > 0, spreadout / np.maximum(mass, 1e-300), 1.0 / n_classes)


def with_known_labels(
    probs: np.ndarray,
    labels: np.ndarray,
    counts: sp.spmatrix,
    topic_features: np.ndarray,
    n_neighbors: int = N_NEIGHBORS,
    seed: int = 0,
) -> np.ndarray:
    """A model's class probabilities `[n_cells, n_classes]` combined with the known labels of the same cells
    (module docstring): label spreading (`label_spreading`, alpha `SPREADING_ALPHA`) over the `knn_graph` of
    the genes' `principal_components` of `counts` `[n_cells, n_genes]` beside `topic_features` `[n_cells,
    n_features]` (the model's X_scmix; `equal_blocks`), then each cell's product of the two distributions,
    renormalised. Cells the known labels do not reach keep the model's probabilities.
    labels: `[n_cells]` class index into probs' columns, -1 where unknown.
    Returns float64 `[n_cells, n_classes]`, rows summing to one. Raises ValueError when the shapes disagree,
    a label is outside [-1, n_classes) or no cell is labelled.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    n_cells = probs.shape[0] if probs.ndim == 2 else -1
    if n_cells < 0 or labels.shape != (n_cells,) or counts.shape[0] != n_cells or len(topic_features) != n_cells:
        raise ValueError(
            f"probs {probs.shape}, labels {labels.shape}, counts {counts.shape} and topic_features "
            f"{np.shape(topic_features)} must describe the same cells"
        )
    if labels.size and (labels.min() < -1 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]}) or -1 for unknown")
    if not (labels >= 0).any():
        raise ValueError("no cell has a known label (every label is -1): nothing to spread")
    if n_cells < 2:
        return probs
    graph = known_labels_graph(counts, topic_features, n_neighbors, seed)
    return product_of_experts(probs, label_spreading(graph, labels, probs.shape[1]))


def known_labels_graph(
    counts: sp.spmatrix, topic_features: np.ndarray, n_neighbors: int = N_NEIGHBORS, seed: int = 0
) -> sp.csr_matrix:
    """The `knn_graph` `[n_cells, n_cells]` of the cells of a dataset annotated with its own known labels
    (`known_labels_features`). Raises ValueError for fewer than two cells."""
    return knn_graph(known_labels_features(counts, topic_features, seed), n_neighbors)


def known_labels_features(counts: sp.spmatrix, topic_features: np.ndarray, seed: int = 0) -> np.ndarray:
    """The features `[n_cells, n_components + n_features]` of `known_labels_graph` (n_components at most
    `N_COMPONENTS`): the genes'
    `principal_components` of `counts` `[n_cells, n_genes]` beside `topic_features` `[n_cells, n_features]` (the
    model's X_scmix), each block weighing equally (`equal_blocks`)."""
    return equal_blocks(principal_components(counts, seed=seed), topic_features)


def pooled_counts(graph: sp.spmatrix, counts: sp.spmatrix, rows: np.ndarray) -> sp.csr_matrix:
    """Counts `[len(rows), n_genes]` of each cell in `rows` (index) summed with those of its neighbours in `graph`
    (`[n_cells, n_cells]`, every nonzero entry of the cell's row; `knn_graph`'s are symmetric): kNN pooling, as
    kNN-smoothing (Wagner et al. 2018, arXiv:1803.00008) and metacells (Baran et al. 2019, Genome Biology 20:206)
    pool a cell with its nearest neighbours, so that its sampling noise shrinks and its genes of few counts
    show. counts: `[n_cells, n_genes]`, raw counts; the sums keep their dtype and stay integers (raw counts).
    Memory: each pooled row holds the union of its cells' nonzeros, up to (n_neighbors + 1) times a cell's."""
    rows = np.asarray(rows, np.int64)
    connect = sp.csr_matrix(graph[rows], copy=True)
    connect.data = np.ones_like(connect.data)
    connect = connect + sp.csr_matrix((np.ones(len(rows)), (np.arange(len(rows)), rows)), shape=connect.shape)
    return sp.csr_matrix(connect.astype(counts.dtype) @ sp.csr_matrix(counts))


def product_of_experts(*probs: np.ndarray) -> np.ndarray:
    """Each cell's product of the class distributions `probs` (each `[n_cells, n_classes]`), renormalised
    (Hinton 2002, "Training products of experts by minimizing contrastive divergence"): independent sources of
    evidence about a cell's label. Probabilities are floored at 1e-12, so that no expert vetoes a class alone.
    Returns float64 `[n_cells, n_classes]`, rows summing to one."""
    combined = np.ones(np.shape(probs[0]))
    for expert in probs:
        combined = combined * np.maximum(np.asarray(expert, np.float64), 1e-12)
    return combined / combined.sum(axis=1, keepdims=True)


def self_training_labels(
    combined: np.ndarray, labels: np.ndarray, confidence: float = SELF_TRAINING_CONFIDENCE
) -> np.ndarray:
    """Labels `[n_cells]` (class index, -1 for none) for the self-training fit of the classification branch: the
    known label where `labels` `[n_cells]` has one (-1 where unknown); elsewhere the call of `combined`
    `[n_cells, n_classes]` (`with_known_labels`'s probabilities) where its probability is at least `confidence`,
    and -1 where it is not. Raises ValueError when the shapes disagree."""
    combined, labels = np.asarray(combined), np.asarray(labels)
    if combined.ndim != 2 or labels.shape != combined.shape[:1]:
        raise ValueError(f"combined {combined.shape} and labels {labels.shape} must describe the same cells")
    confident = combined.max(axis=1) >= confidence
    return np.where(labels >= 0, labels, np.where(confident, combined.argmax(axis=1), -1))
