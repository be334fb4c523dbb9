"""AnnData out: predictions, flags, an embedding and topic-gene weights written into a dataset, as scanpy
expects them (categoricals of the categories that occur, colours in `uns`, an `X_`-prefixed embedding).

What `annotate` writes (`key` = key_added, "scmix" by default):

- obs[f"{key}_label"]: class names, a categorical of the categories that occur; "unassigned" for cells
  without counts over the model's genes, below `min_confidence`, or flagged when `unassign_flagged`;
  uns[f"{key}_label_colors"]: one colour per category (class i always gets colour i; "unassigned" grey).
- obs[f"{key}_confidence"]: the largest class probability; NaN for cells without counts over the model's genes.
- obs[f"{key}_novelty"], obs[f"{key}_novel"]: the topic-space novelty score in [0, 1] and the flag score >
  threshold (`TopicNovelty`, carried by models that `tfp_scmix.train` made); NaN and False for cells without counts.
- obs[f"{key}_low_counts"]: fewer than `min_counts` counts over the model's genes, too little to judge.
- obs[f"{key}_majority_voting"], obs[f"{key}_over_clustering"]: with `majority_voting=True`, each
  cluster's most frequent label, and the clusters voted in (computed, or those given; NaN for a cell in none).
- obs[f"{key}_smoothed"], obsm[f"{key}_smoothed_probs"]: with `smooth=True`, the labels and probabilities
  after spreading the probabilities over the 15-nearest-neighbour graph of X_scmix (`propagate.smooth`).
- obs[f"{key}_with_labels"], obsm[f"{key}_with_labels_probs"]: with `label_key`, the labels and probabilities
  after combining the model's with those of each cell's counts pooled with its neighbours', called by the class branch
  refitted on the known labels' pooled counts (`with_labels_probs`); the cells with a known label keep it in
  obs[f"{key}_with_labels"].
- obsm[f"X_{key}"]: float32 `[n_cells, n_topics]`, the classifier's features (centred log-ratio of each
  member's topic proportions), for `sc.pp.neighbors(adata, use_rep="X_scmix")`.
- obsm[f"{key}_probs"]: float32 `[n_cells, n_classes]`, columns in the order of uns[key]["classes"]
  (an array, not a DataFrame: class names such as "CD4+/CD25 T Reg" are not keys anndata keeps writing).
- obsm[f"{key}_cell_topic"]: `[n_cells, n_topics]` topic proportions.
- varm[f"{key}_topic_gene"]: `[n_vars, n_topics]` topic-gene weights (zero for genes the model lacks).
- uns[key]: the call: classes, thresholds, the slot the counts were read from ("counts"), gene coverage and
  min_gene_fraction, fingerprints (of the training data, and of each dataset the model was adapted to:
  "model_adapted_to"), version, counts of flagged cells.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata
import numpy as np
import pandas as pd

from tfp_scmix import __version__
from tfp_scmix.data import (
    PLACEHOLDER_LABELS,
    DataError,
    OncePerMessage,
    SCData,
    check_argument,
    check_unlabeled_category,
    did_you_mean,
    encode_labels,
    label_name,
    missing_values,
    read,
    spelled_as,
)
from tfp_scmix.ensemble import SCMixEnsemble, as_ensemble, trained
from tfp_scmix.io import atomic_path
from tfp_scmix.model import SCMix
from tfp_scmix.novelty import log_ratio_features
from tfp_scmix.predict import OUTPUT_KEYS, UNASSIGNED, counts_slot, model_counts, predict, progress_bar
from tfp_scmix.propagate import (
    N_NEIGHBORS,
    POOLING_NEIGHBORS,
    knn_graph,
    known_labels_features,
    label_spreading,
    pooled_counts,
    product_of_experts,
)
from tfp_scmix.propagate import smooth as smooth_probs

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

logger = logging.getLogger("tfp_scmix")
UNASSIGNED_COLOR = "#d3d3d3"
# Fewer counts than this over the model's genes: too little evidence to judge a cell (a chosen default,
# not measured: pbmc3k's least-covered cell has 211 counts over its 2000 most variable genes; the serving
# doc's example cell, 9 counts, is flagged).
MIN_COUNTS = 50
# Labelled cells at most whose pooled counts refit the class branch in `known_label_experts` (a seeded sample of
# them beyond): the full-batch fit holds their pooled counts, each up to 16 times a cell's nonzeros. The
# few-shot use has hundreds; 5,000 is the self-training fit's bound (`model.SELF_TRAINING_CELLS`), not tuned.
POOLED_FIT_CELLS = 5_000


def class_colors(n_classes: int) -> list[str]:
    """`n_classes` hex colours: matplotlib's tab10 / tab20 (as scanpy's default palettes), then evenly
    spaced hues, so that class i has the same colour in every dataset a model annotates."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if n_classes <= 20:
        palette = colormaps["tab10" if n_classes <= 10 else "tab20"]
        return [to_hex(palette(i)) for i in range(n_classes)]
    return [to_hex(colormaps["hsv"](i / n_classes)) for i in range(n_classes)]


def _categorical(names: np.ndarray, order: list[str], colors: list[str]) -> tuple[pd.Categorical, np.ndarray]:
    """Names as a categorical of only the categories that occur, in `order`, and their colours."""
    used = set(names)
    keep = [i for i, name in enumerate(order) if name in used]
    return pd.Categorical(names, categories=[order[i] for i in keep]), np.asarray([colors[i] for i in keep])


def model_fingerprint(model: SCMix | SCMixEnsemble) -> str:
    """A short hash of a trained model's own weights (every member's topic-gene posterior means): two models trained
    on the same data with other settings or seeds differ, a model and its saved copy agree. `annotate` records it in
    uns[key]["model_fingerprint"], so that figures drawn with a model can tell its annotation from another's."""
    import hashlib

    digest = hashlib.sha256()
    for member in as_ensemble(model).members:
        digest.update(np.ascontiguousarray(member.topics.loc.numpy()).tobytes())
    return digest.hexdigest()[:16]


def over_clusters(features: np.ndarray, n_clusters: int | None = None, seed: int = 0) -> np.ndarray:
    """Over-clustering for majority voting: k-means on `features` `[n_cells, n_features]` (`annotate` passes
    `propagate.known_labels_features`: the principal components of the counts over the model's genes beside
    X_scmix; on X_scmix alone, clusters mixed lineages and voting lost accuracy: docs/cross_dataset.md, "Majority
    voting").

    n_clusters: default round(sqrt(n_cells)) within [2, 500], small clusters as CellTypist's
    over-clustering makes them. Returns int `[n_cells]` cluster ids. scikit-learn's KMeans (MiniBatchKMeans
    above 50,000 cells), seeded.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n_cells = len(features)
    k = n_clusters or int(np.clip(round(np.sqrt(n_cells)), 2, 500))
    k = max(1, min(k, n_cells))
    if n_cells > 50_000:
        kmeans: Any = MiniBatchKMeans(k, random_state=seed, n_init=3, batch_size=4096)
    else:
        kmeans = KMeans(k, random_state=seed, n_init=3)
    return kmeans.fit_predict(features)


def majority_vote(labels: ArrayLike, clusters: ArrayLike) -> np.ndarray:
    """Each cell's cluster's most frequent label `[n_cells]` (object); "unassigned" cells do not vote,
    and a cluster of only unassigned cells stays unassigned. Ties go to the label seen first. A cell without a
    cluster id (None or NaN in `clusters`) is in no cluster and keeps its own label."""
    frame = pd.DataFrame({"label": np.asarray(labels, dtype=object), "cluster": np.asarray(clusters, dtype=object)})
    voting = frame[frame.label != UNASSIGNED]
    winner = voting.groupby("cluster", sort=False)["label"].agg(lambda s: s.value_counts(sort=True).index[0])
    in_none = frame.cluster.isna()
    voted = frame.cluster.map(winner).fillna(UNASSIGNED)
    voted[in_none] = frame.label[in_none]
    return voted.to_numpy(dtype=object)


def with_labels_probs(
    model: SCMix | SCMixEnsemble, data: SCData, out: dict[str, np.ndarray] | None = None, chunk_size: int = 10_000
) -> np.ndarray:
    """Class probabilities `[n_cells, n_classes]` of `annotate(..., label_key=...)`: the model's per-cell
    probabilities times those of its class branch refitted on the known labels' pooled counts, at the
    neighbourhood sizes of `propagate.POOLING_NEIGHBORS` (`known_label_experts`; `propagate.product_of_experts`).
    data: an SCData over the model's genes whose labels, -1 for unlabelled cells, are the known ones. out:
    `predict(model, data)`'s outputs when already computed (needs "probs" and "cell_topic"). The model is left as
    it was. Fewer errors than the per-cell call, and than label spreading in its place, on the few-shot suite
    (docs/few_shot.md, "Pooled counts of the neighbours").
    Raises ValueError as `known_label_experts` does (no known label, a label that is not a class index)."""
    experts = known_label_experts(model, data, out, chunk_size=chunk_size)
    return product_of_experts(experts["cell"], experts["pooled"])


def known_label_experts(
    model: SCMix | SCMixEnsemble,
    data: SCData,
    out: dict[str, np.ndarray] | None = None,
    *,
    spreading: bool = False,
    pooling_neighbors: tuple[int, ...] = POOLING_NEIGHBORS,
    chunk_size: int = 10_000,
) -> dict[str, np.ndarray]:
    """The sources of evidence `with_labels_probs` combines, each `[n_cells, n_classes]`, rows summing to one:
    "cell", the model's probabilities from each cell's own counts; f"pooled_{k}" for each k of `pooling_neighbors`
    (default `propagate.POOLING_NEIGHBORS`; more than one size is the experiments' ablation), those from each cell's
    counts summed with its k nearest neighbours' (`propagate.pooled_counts` over the `knn_graph` of
    `propagate.known_labels_features`: the genes' principal components beside X_scmix), each member's class branch
    first refitted (`SCMix.fit_classifier`) on the pooled counts of the labelled cells (at most `POOLED_FIT_CELLS`,
    a seeded sample beyond), since pooled counts are not what the branch was fitted on; "pooled", their product
    (`propagate.product_of_experts`); with `spreading`, also "spreading", label spreading of the known labels over
    the graph of `propagate.N_NEIGHBORS` neighbours (`propagate.label_spreading`; the experiments' ablation). Each
    member's class branch is restored afterwards, also on error. With fewer than two cells there is no neighbour:
    every expert but "cell" is the per-cell probabilities.
    data, out: as for `with_labels_probs`; chunk_size: cells pooled and predicted at a time (memory: a chunk's
    pooled counts, up to max(pooling_neighbors) + 1 times its counts' nonzeros).
    Raises ValueError when no cell has a known label, a label is not a class index or `pooling_neighbors` is not
    one or more positive sizes."""
    labels = np.asarray(data.labels)
    if not pooling_neighbors or min(pooling_neighbors) < 1:
        raise ValueError(f"pooling_neighbors must be one or more positive neighbourhood sizes, got {pooling_neighbors}")
    if not (labels >= 0).any():
        raise ValueError("no cell has a known label (every label is -1): nothing to refit on")
    if labels.max() >= model.n_classes or labels.min() < -1:
        raise ValueError(f"labels must be class indices in [0, {model.n_classes}) or -1 for unknown")
    members = as_ensemble(model).members
    out = out if out is not None else predict(model, data, keys=("probs", "cell_topic"))
    cell = np.asarray(out["probs"], np.float64)
    parts = ["pooled", *(f"pooled_{k}" for k in pooling_neighbors), *(["spreading"] if spreading else [])]
    if data.n_cells < 2:
        return {"cell": cell} | dict.fromkeys(parts, cell)
    features = known_labels_features(data.counts, log_ratio_features(out["cell_topic"], len(members)))
    labelled = np.flatnonzero(labels >= 0)
    if labelled.size > POOLED_FIT_CELLS:
        labelled = np.sort(np.random.default_rng(0).choice(labelled, POOLED_FIT_CELLS, replace=False))
    experts = {"cell": cell}
    saved = [(member.classifier.get_weights(), member.self_trained_cells) for member in members]
    try:
        for k in pooling_neighbors:
            graph = knn_graph(features, k)
            # Only the labelled cells: fit_classifier's self-training (Config.self_training) needs unlabelled ones.
            fit_data = dataclasses.replace(data.subset(labelled), counts=pooled_counts(graph, data.counts, labelled))
            for member in members:
                member.fit_classifier(fit_data)
            # Each cell's pooled counts are read through its own batch's offsets, as the refit read them.
            pooled = []
            progress = progress_bar(data.n_cells, "pooled call")
            try:
                for start in range(0, data.n_cells, chunk_size):
                    rows = data.rows(start, min(start + chunk_size, data.n_cells))
                    counts = pooled_counts(graph, data.counts, np.arange(start, start + rows.n_cells))
                    out_rows = predict(  # inside this call's bar: no bar of its own
                        model,
                        dataclasses.replace(rows, counts=counts),
                        keys=("probs",),
                        chunk_size=chunk_size,
                        progress=False,
                    )
                    pooled.append(out_rows["probs"])
                    progress.update(rows.n_cells)
            finally:
                progress.close()
            experts[f"pooled_{k}"] = np.vstack(pooled).astype(np.float64)
    finally:
        for member, (weights, self_trained) in zip(members, saved, strict=True):
            member.classifier.set_weights(weights)
            member.self_trained_cells = self_trained
    experts["pooled"] = product_of_experts(*(experts[f"pooled_{k}"] for k in pooling_neighbors))
    if spreading:
        experts["spreading"] = label_spreading(knn_graph(features, N_NEIGHBORS), labels, model.n_classes)
    return experts


def _each_warning_once(function):
    """`function` with each distinct log message of the package said once per call: annotate reads the data again
    after `predict` for what reads the counts whole (majority voting, the known labels), and a trial saw the
    gene-coverage warning twice in one call."""

    @functools.wraps(function)
    def once_per_call(*args, **kwargs):
        once = OncePerMessage()
        logger.addFilter(once)
        try:
            return function(*args, **kwargs)
        finally:
            logger.removeFilter(once)

    return once_per_call


@_each_warning_once
def annotate(
    model: SCMix | SCMixEnsemble,
    adata,
    counts: str | None = None,
    min_confidence: float | None = None,
    key_added: str = "scmix",
    batch_size: int = 1024,
    min_gene_fraction: float = 0.5,
    chunk_size: int = 10_000,
    *,
    min_counts: int = MIN_COUNTS,
    unassign_flagged: bool = False,
    majority_voting: bool = False,
    over_clustering: str | ArrayLike | None = None,
    smooth: bool = False,
    label_key: str | None = None,
    unlabeled_category: str | None = None,
    batch_key: str | None = None,
):
    """Annotate `adata` (an AnnData, in memory or backed, or a path `tfp_scmix.read` reads) in place; returns it.

    Writes the slots of the module's table. The dataset's genes are aligned to the model's by name; cells
    are predicted `chunk_size` at a time (`tfp_scmix.predict`), so a backed AnnData's counts never enter
    memory whole: `write_h5ad` then writes the result with bounded memory too. Gene coverage (uns) is the
    fraction of the model's genes found in the slot the counts were read from (adata.raw's genes for
    counts='raw').
    min_confidence: a probability in [0, 1]; cells whose largest probability is below it are "unassigned"
    (default: none).
    min_counts: cells with fewer counts over the model's genes are flagged in obs[f"{key}_low_counts"].
    Novelty: a model trained by `tfp_scmix.train` carries a `TopicNovelty` detector; cells whose score
    exceeds its threshold (0.95: 5% of the labelled training cells by construction; measured on
    left-out cell types: docs/cross_dataset.md, "Unknown cell types") are flagged in obs[f"{key}_novel"].
    Flags do not change the label unless `unassign_flagged=True` (then novel and low-count cells are
    "unassigned").
    majority_voting: also write obs[f"{key}_majority_voting"], each cluster's most frequent label (as
    CellTypist's `majority_voting`); over_clustering: an obs column name or `[n_cells]` cluster ids (a cell
    whose id is missing, NaN or "", is in no cluster and keeps its own label; warned); by default `over_clusters`
    of the genes' principal components beside X_scmix (`propagate.known_labels_features`), which reads the counts
    of every cell over the model's genes into memory (a backed AnnData too). Either is written to
    obs[f"{key}_over_clustering"].
    smooth: also write obs[f"{key}_smoothed"] and obsm[f"{key}_smoothed_probs"]: each cell's probabilities
    averaged with its neighbours' over the kNN graph of X_scmix (`tfp_scmix.propagate.smooth`, equal weight
    to the cell and its neighbourhood); the cells unassigned in obs[f"{key}_label"] stay unassigned. Meant for
    a dataset other than the training one, annotated whole (docs/cross_dataset.md, "Smoothing over the
    target's cells"); the neighbour search (scikit-learn) over every cell's X_scmix adds time that grows with
    the cells.
    label_key: an obs column of known labels for some of adata's cells (the few-shot use: annotate the dataset
    the model was trained on, with its few hundred labels); missing values (NaN, "") and `unlabeled_category`
    (scvi-tools' name, e.g. "Unknown") mark the unlabelled cells. Also writes obs[f"{key}_with_labels"] and
    obsm[f"{key}_with_labels_probs"]: the model's probabilities times those of each cell's counts pooled with its
    15 nearest neighbours' (`propagate.POOLING_NEIGHBORS`, on the genes' principal components beside X_scmix),
    called by each member's class branch refitted on the known labels' pooled counts (`with_labels_probs`; the
    model itself is left as it was), renormalised; cells with a known label keep it. Fewer errors than the
    per-cell call on the few-shot suite (docs/few_shot.md, "Pooled counts of the neighbours"). It reads the counts
    of every cell over the model's genes into memory (a backed AnnData too) and adds a principal component
    analysis, a neighbour search and a second prediction pass (of the pooled counts, `chunk_size` cells at a time)
    that grow with the cells.
    batch_key: the obs column of batches (donor, dataset) the model was trained with: each cell's batch's offsets
    are divided out (`predict`); cells of batches the model was not trained on (a warning names them), and every
    cell when batch_key is None, are read through the centre of the trained batches' offsets (for a model of one
    batch, that batch's). Every cell needs a value in the column.
    Raises DataError as `from_anndata` does, for a `label_key` or `batch_key` that is not an obs column, labels that are
    neither among the model's classes nor `unlabeled_category` or no known label at all, for a view of a
    backed AnnData (anndata cannot write into it) and for an `over_clustering` column that is missing or of
    the wrong length; ValueError for numeric arguments out of range, for `over_clustering` without
    `majority_voting` and for `unlabeled_category` without `label_key`; TypeError for an `adata` that is not an
    AnnData or a path (an SCData: use `predict`).
    """
    check_argument(
        "min_confidence", 0.0 if min_confidence is None else min_confidence, 0, 1, hint=" (a probability: 95% is 0.95)"
    )
    check_argument("min_counts", min_counts, 0, integer=True)
    if isinstance(adata, str | os.PathLike):
        adata = read(adata)
    if not hasattr(adata, "isbacked") or not hasattr(adata, "obsm"):
        raise TypeError(
            f"annotate writes into an AnnData (or a path tfp_scmix.read reads), received {type(adata).__name__}. "
            "For an SCData or a count matrix, scm.predict(model, data) returns the same calls as arrays; or "
            "annotate the AnnData the data came from."
        )
    if adata.isbacked and adata.is_view:
        raise DataError(
            "adata is a subset (view) of a backed AnnData: anndata cannot write annotations into it without "
            "copying it, which a backed view cannot do. Annotate adata[index].to_memory() (in memory), or the "
            "whole backed AnnData and subset afterwards."
        )
    if over_clustering is not None and not majority_voting:
        raise ValueError(
            "over_clustering names the clusters majority voting votes in; pass majority_voting=True with it "
            "(CLI: --majority-voting), or leave it out."
        )
    if unlabeled_category is not None and label_key is None:
        raise ValueError(
            "unlabeled_category names the value of label_key's column that marks unlabelled cells; pass "
            "label_key with it (command line: --label-key), or leave it out."
        )
    clusters = _clusters(adata, over_clustering) if over_clustering is not None else None
    known = _known_labels(adata, model, label_key, unlabeled_category) if label_key is not None else None
    ensemble = as_ensemble(trained(model, "annotate"))
    if batch_key is None and ensemble.members[0].adapted_batch is None:  # adapt's model reads the query's own
        _hint_batch_key(adata, ensemble.members[0].batch_names)
    slot, slot_genes = counts_slot(adata, counts)
    keys = (*OUTPUT_KEYS, "library_size", *(("novelty",) if ensemble.novelty is not None else ()))
    out = predict(
        model,
        adata,
        counts=slot,
        chunk_size=chunk_size,
        batch_size=batch_size,
        min_gene_fraction=min_gene_fraction,
        keys=keys,
        batch_key=batch_key,
    )
    library = out["library_size"]
    empty = library == 0  # predict has warned of them
    names = np.asarray(model.class_names, dtype=object)[out["label"]]
    low_counts = library < min_counts
    threshold = ensemble.novelty.threshold if ensemble.novelty is not None and "novelty" in out else None
    # A cell without counts has no topics to be novel in: no score, no flag (it is unassigned already).
    novel = np.zeros(len(names), bool) if threshold is None else (out["novelty"] > threshold) & ~empty
    unassigned = empty.copy()
    if min_confidence is not None:
        unassigned |= out["confidence"] < min_confidence
    if unassign_flagged:
        unassigned |= novel | low_counts
    names[unassigned] = UNASSIGNED
    key = key_added
    order = [*model.class_names, UNASSIGNED]
    colors = [*class_colors(model.n_classes), UNASSIGNED_COLOR]
    if adata.is_view:  # anndata makes it a copy of its own on the first write, with a warning of its own
        logger.warning(
            "adata is a view (a subset such as adata[mask]): as anndata does, the annotation makes it an AnnData of "
            "its own, and the parent AnnData gets nothing; keep the AnnData annotate returns, or annotate the "
            "whole AnnData"
        )
    with warnings.catch_warnings():  # anndata's own warning of that copy, said above
        warnings.simplefilter("ignore", anndata.ImplicitModificationWarning)
        adata.obs[f"{key}_label"], adata.uns[f"{key}_label_colors"] = _categorical(names, order, colors)
    # A cell without counts is called from nothing (the model's prior): no confidence, so no filter on it keeps it.
    adata.obs[f"{key}_confidence"] = np.where(empty, np.nan, out["confidence"]).astype(np.float32)
    if threshold is not None:
        adata.obs[f"{key}_novelty"] = np.where(empty, np.nan, out["novelty"]).astype(np.float32)
        adata.obs[f"{key}_novel"] = novel
    else:
        logger.warning(
            "the model carries no novelty detector, so obs['%s_novelty'] and obs['%s_novel'] are not written: "
            "tfp_scmix.train fits one on the labelled cells (a model fitted on the plain Keras path, or trained on "
            "too few labelled cells, has none)",
            key,
            key,
        )
    adata.obs[f"{key}_low_counts"] = low_counts
    features = log_ratio_features(out["cell_topic"], len(ensemble.members)).astype(np.float32)
    adata.obsm[f"X_{key}"] = features
    adata.obsm[f"{key}_probs"] = out["probs"].astype(np.float32)
    adata.obsm[f"{key}_cell_topic"] = out["cell_topic"]
    position = pd.Index(model.genes).get_indexer(adata.var_names)
    topic_gene = model.topic_gene().numpy().T  # [n_genes, n_topics]
    varm = np.zeros((adata.n_vars, model.n_topics), np.float32)
    varm[position >= 0] = topic_gene[position[position >= 0]]
    adata.varm[f"{key}_topic_gene"] = varm
    if (smooth or majority_voting) and adata.n_obs <= N_NEIGHBORS:
        logger.warning(
            "%d cell%s: too few for smoothing or majority voting over their neighbours (%d neighbours a cell by "
            "default) to mean much; annotate the whole dataset together",
            adata.n_obs,
            "" if adata.n_obs == 1 else "s",
            N_NEIGHBORS,
        )
    _drop_stale(
        adata,
        key,
        majority_voting=majority_voting,
        smooth=smooth,
        novelty=threshold is not None,
        with_labels=known is not None,
    )
    # The counts over the model's genes in memory, for what reads them whole: the known labels' pooled call, and
    # the default over-clustering of majority voting.
    needs_counts = known is not None or (majority_voting and clusters is None)
    aligned = model_counts(adata, model, slot, min_gene_fraction, batch_key) if needs_counts else None
    if majority_voting:
        if clusters is None:  # the genes' principal components beside X_scmix, as the known labels' graph
            assert aligned is not None
            ids = over_clusters(known_labels_features(aligned.counts, features))
            clusters = pd.Categorical(ids.astype(str), categories=[str(i) for i in range(ids.max() + 1)])  # 2 < 10
        adata.obs[f"{key}_over_clustering"] = pd.Categorical(clusters)  # the clusters voted in (NaN: in none)
        voted = majority_vote(names, clusters)
        voted[empty] = UNASSIGNED  # a cell without counts is called by no one (a trial saw a cluster's label on it)
        adata.obs[f"{key}_majority_voting"], adata.uns[f"{key}_majority_voting_colors"] = _categorical(
            voted, order, colors
        )
    if smooth:
        smoothed = smooth_probs(features, out["probs"])
        smoothed_names = np.asarray(model.class_names, dtype=object)[smoothed.argmax(axis=1)]
        smoothed_names[unassigned] = UNASSIGNED
        adata.obs[f"{key}_smoothed"], adata.uns[f"{key}_smoothed_colors"] = _categorical(smoothed_names, order, colors)
        adata.obsm[f"{key}_smoothed_probs"] = smoothed.astype(np.float32)
    if known is not None:
        assert aligned is not None
        combined = with_labels_probs(model, dataclasses.replace(aligned, labels=known), out)
        combined_names = np.asarray(model.class_names, dtype=object)[combined.argmax(axis=1)]
        combined_names[known >= 0] = np.asarray(model.class_names, dtype=object)[known[known >= 0]]
        combined_names[empty] = UNASSIGNED
        adata.obs[f"{key}_with_labels"], adata.uns[f"{key}_with_labels_colors"] = _categorical(
            combined_names, order, colors
        )
        adata.obsm[f"{key}_with_labels_probs"] = combined.astype(np.float32)
    record: dict[str, Any] = {
        "classes": list(model.class_names),
        "tfp_scmix_version": __version__,
        "model_data_fingerprint": str(model.provenance.get("data_fingerprint", "")),
        "gene_fingerprint": model.gene_fingerprint,
        "model_fingerprint": model_fingerprint(model),
        "counts": slot,
        "gene_coverage": float(pd.Index(model.genes).isin(slot_genes).mean()),
        "min_gene_fraction": float(min_gene_fraction),
        # An array of strings, so that an empty one reads back from .h5ad as strings too (a list: as float64).
        "model_adapted_to": np.array([str(a["data_fingerprint"]) for a in model.provenance.get("adapted_to", [])], str),
        "n_members": len(ensemble.members),
        "min_counts": int(min_counts),
        "unassign_flagged": bool(unassign_flagged),
        "majority_voting": bool(majority_voting),
        "smooth": bool(smooth),
        "label_key": label_key or "",
        # Only a batch_key that chose offsets: a model of one batch, or adapted, reads every cell alike (predict warns).
        "batch_key": batch_key if batch_key and _reads_batches(ensemble) else "",
        "n_known_labels": 0 if known is None else int((known >= 0).sum()),
        "n_unassigned": int(unassigned.sum()),
        "n_low_counts": int(low_counts.sum()),
    }
    if min_confidence is not None:  # .h5ad files cannot hold None
        record["min_confidence"] = float(min_confidence)
    if threshold is not None:
        record.update(novelty_threshold=float(threshold), n_novel=int(novel.sum()))
    adata.uns[key] = record
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
            for group in ("obsm", "varm", "uns"):
                mapping = getattr(adata, group)
                for key in list(f[group]) if group in f else []:  # an earlier call's outputs this one dropped
                    if _written_by_annotate(key, key_added) and key not in mapping:
                        del f[group][key]
                for key in mapping:
                    if _written_by_annotate(key, key_added):
                        if group in f:
                            write_elem(f[group], key, mapping[key])
                        else:
                            write_elem(f, group, {key: mapping[key]})
    return path


def _written_by_annotate(name: str, key_added: str) -> bool:
    return name in (key_added, f"X_{key_added}") or name.startswith(f"{key_added}_")


def _drop_stale(adata, key: str, *, majority_voting: bool, smooth: bool, novelty: bool, with_labels: bool) -> None:
    """Remove the optional outputs of an earlier `annotate` call under `key` that this call does not write,
    so that no column describes a model or an option other than the latest call's."""
    stale = {
        "obs": [
            *([] if majority_voting else [f"{key}_majority_voting", f"{key}_over_clustering"]),
            *([] if smooth else [f"{key}_smoothed"]),
            *([] if novelty else [f"{key}_novelty", f"{key}_novel"]),
            *([] if with_labels else [f"{key}_with_labels"]),
        ],
        "obsm": [
            *([] if smooth else [f"{key}_smoothed_probs"]),
            *([] if with_labels else [f"{key}_with_labels_probs"]),
        ],
        "uns": [
            *([] if majority_voting else [f"{key}_majority_voting_colors"]),
            *([] if smooth else [f"{key}_smoothed_colors"]),
            *([] if with_labels else [f"{key}_with_labels_colors"]),
        ],
    }
    # An earlier call's results, replaced by nothing: name every obs and obsm entry (key_added= keeps both calls).
    removed = [
        f"{group}[{name!r}]" for group in ("obs", "obsm") for name in stale[group] if name in getattr(adata, group)
    ]
    if removed:
        logger.warning(
            "removed %s of an earlier annotate call: this call does not write %s (its options differ); pass "
            "key_added= (command line: --key-added) to keep the results of both calls",
            ", ".join(removed),
            "them" if len(removed) > 1 else "it",
        )
    for name in stale["obs"]:
        if name in adata.obs:
            del adata.obs[name]
    for group in ("obsm", "uns"):
        mapping = getattr(adata, group)
        for name in stale[group]:
            if name in mapping:
                del mapping[name]


def _reads_batches(ensemble: SCMixEnsemble) -> bool:
    """Whether a batch_key changes what the model reads: it has learned offsets of several batches and is not adapted
    to one dataset (the two cases `predict` warns about)."""
    member = ensemble.members[0]
    return member.adapted_batch is None and member.batch_names is not None and len(member.batch_names) > 1


def _hint_batch_key(adata, trained: list[str] | None) -> None:
    """Without batch_key every cell is read through the centre of the trained batches' offsets: say which obs
    column holds the model's own batch names, when the model was trained with several and one does (at least half
    of the column's distinct values are trained batch names: cluster ids "0", "1", ... beside batches named so
    are not taken for them)."""
    if not trained or len(trained) < 2:
        return
    for name in adata.obs.columns:
        values = adata.obs[name]
        if values.dtype.kind in "OU" or isinstance(values.dtype, pd.CategoricalDtype):
            distinct = set(values.astype(str).unique())
            shared = sorted(distinct & set(trained))
            if shared and 2 * len(shared) >= len(distinct):
                logger.warning(
                    "the model was trained with batches %s and obs[%r] holds %s of them: pass batch_key=%r "
                    "(command line: --batch-key %s) to read each cell through its own batch's offsets; without it "
                    "every cell is read through the centre of the trained batches'",
                    trained[:5],
                    name,
                    shared[:5],
                    name,
                    name,
                )
                return


def _known_labels(adata, model, label_key: str, unlabeled_category: str | None) -> np.ndarray:
    """Class indices `[n_cells]` of the model's classes from obs[label_key], -1 where unlabelled."""
    if label_key not in adata.obs:
        raise DataError(
            f"no obs column {label_key!r} of known labels{did_you_mean([label_key], adata.obs.columns)} (columns: "
            f"{list(adata.obs.columns)}); pass the column "
            "that holds the cell types of the labelled cells, or leave label_key out."
        )
    unknown = () if unlabeled_category is None else (unlabeled_category,)
    values = adata.obs[label_key]
    if unlabeled_category is not None:  # as training checks it: a near miss refused, no match at all warned
        check_unlabeled_category(values, unlabeled_category, label_key)
    # Values compared as class names, as training compares them (`label_name`: -1, -1.0 and "-1" alike; 3.0 from a
    # column of integer codes with NaN is class "3").
    series = pd.Series(np.asarray(values, dtype=object))
    names = set(series[~missing_values(series).to_numpy()].map(label_name))
    outside = sorted(names - set(model.class_names) - {label_name(u) for u in unknown})
    if outside:
        placeholder = next((name for name in outside if name.strip().lower() in PLACEHOLDER_LABELS), None)
        respelled = spelled_as(outside, model.class_names)
        hint = (
            f"if {placeholder!r} marks the unlabelled cells, pass unlabeled_category={placeholder!r} (command line: "
            f"--unlabeled-category {placeholder})"
            if placeholder is not None
            else "; ".join(
                f"{name!r} looks like the model's {cls!r} written another way" for name, cls in respelled.items()
            )
            + ": write them as the model does"
            if respelled
            else "pass unlabeled_category= (command line: --unlabeled-category) for the value that marks unlabelled "
            "cells, or label with the model's classes"
        )
        raise DataError(
            f"obs[{label_key!r}] holds labels {outside[:5]} that are not among the model's classes "
            f"{list(model.class_names)}; {hint}."
        )
    known, _ = encode_labels(values, classes=list(model.class_names), unknown=unknown)
    if not (known >= 0).any():
        raise DataError(
            f"obs[{label_key!r}] has no known label (every value is missing or {unlabeled_category!r}); "
            "label some cells with the model's classes, or leave label_key out."
        )
    return known


def _clusters(adata, over_clustering) -> np.ndarray:
    if isinstance(over_clustering, str):
        if over_clustering not in adata.obs:
            raise DataError(
                f"no obs column {over_clustering!r} for over_clustering"
                f"{did_you_mean([over_clustering], adata.obs.columns)} (columns: {list(adata.obs.columns)}); "
                "pass a column of cluster ids (e.g. 'leiden'), or leave it out for annotate's own over-clustering."
            )
        values, where = adata.obs[over_clustering], f"obs[{over_clustering!r}]"
    else:
        values, where = np.asarray(over_clustering, dtype=object), "over_clustering"
        if values.shape != (adata.n_obs,):
            raise DataError(
                f"over_clustering has shape {values.shape}; it needs one cluster id per cell ({adata.n_obs})."
            )
    # Cluster ids as names; a missing one (NaN, None, "") is no cluster, never one cluster of all such cells.
    series = pd.Series(np.asarray(values, dtype=object))
    missing = missing_values(series).to_numpy()
    if missing.any():
        logger.warning(
            "%d of %d cells have no cluster id in %s (NaN or empty): they are in no cluster and keep their own "
            "label in majority voting",
            int(missing.sum()),
            len(series),
            where,
        )
    clusters = series.map(label_name).to_numpy(dtype=object)
    clusters[missing] = None
    return clusters
