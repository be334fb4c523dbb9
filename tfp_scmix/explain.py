"""Explanations: the genes of each topic and the topics that predict each class, as tables and figures.

Each function takes an `SCMix` or an `SCMixEnsemble`. By default it explains every member together:
the topics of different restarts are different topics, each with its own class weights, so a member's
topics are named `m<member>_topic_<k>` (`topic_<k>` when there is one member) and a class's most
predictive topic is the one of highest contrast over all members. `member=m` explains member m alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tfp_scmix.annotate import model_fingerprint
from tfp_scmix.data import FEW_LABELS, DataError, did_you_mean
from tfp_scmix.ensemble import SCMixEnsemble, as_ensemble, trained
from tfp_scmix.io import atomic_path, write_csv
from tfp_scmix.model import SCMix

logger = logging.getLogger(__name__)


def _explained(model: SCMix | SCMixEnsemble, member: int | None) -> list[tuple[str, SCMix]]:
    """(topic-name prefix, member) pairs to explain. Raises IndexError for a member the model lacks, NotTrainedError
    (a ValueError) for a model that has not been trained."""
    members = as_ensemble(trained(model, "explain")).members
    if member is not None:
        if not -len(members) <= member < len(members):
            raise IndexError(f"member {member} out of range: the model has {len(members)} member(s)")
        return [("", members[member])]
    return [("", members[0])] if len(members) == 1 else [(f"m{i}_", m) for i, m in enumerate(members)]


def labelled_cells(model: SCMix | SCMixEnsemble) -> pd.Series:
    """Labelled training cells per class `[n_classes]`, indexed by class name (Int64; <NA> for every class of a
    model file written before the counts were recorded in its provenance)."""
    recorded = as_ensemble(model).members[0].provenance.get("labelled_cells") or {}
    counts = [recorded.get(name) for name in model.class_names]
    return pd.Series(counts, index=list(model.class_names), dtype="Int64", name="labelled_cells")


def few_label_classes(model: SCMix | SCMixEnsemble, below: int = FEW_LABELS) -> dict[str, int]:
    """{class: labelled cells} of the classes trained on fewer than `below` labelled cells (none when the model
    did not record its counts)."""
    counts = labelled_cells(model).dropna()
    return {str(name): int(n) for name, n in counts.items() if n < below}


def _with_counts(model: SCMix | SCMixEnsemble, classes) -> list[str]:
    """Class names with their labelled training cells, "B cells (12 labelled)" (the name alone where unknown)."""
    counts = labelled_cells(model)
    return [c if pd.isna(counts[c]) else f"{c} ({counts[c]} labelled)" for c in classes]


def topic_names(model: SCMix | SCMixEnsemble, member: int | None = None) -> list[str]:
    """Names of the explained topics, in the column order of `topic_gene_table`."""
    return [f"{prefix}topic_{k}" for prefix, m in _explained(model, member) for k in range(m.n_topics)]


def topic_gene_table(model: SCMix | SCMixEnsemble, member: int | None = None) -> pd.DataFrame:
    """Posterior-mean topic-gene distributions as a DataFrame `[n_genes, n_topics]` indexed by gene."""
    weights = np.concatenate([m.topic_gene().numpy() for _, m in _explained(model, member)], axis=0)
    return pd.DataFrame(weights.T, index=model.genes, columns=topic_names(model, member))


def _background(model: SCMix | SCMixEnsemble, member: int | None) -> pd.DataFrame:
    """Each explained topic's background profile (normalised) `[n_genes, n_topics]`: its member's."""
    columns = []
    for _, m in _explained(model, member):
        background = np.exp(m.topics.background.numpy())
        columns.append(np.repeat((background / background.sum())[:, None], m.n_topics, axis=1))
    return pd.DataFrame(np.concatenate(columns, axis=1), index=model.genes, columns=topic_names(model, member))


def top_genes(
    model: SCMix | SCMixEnsemble, n_genes: int = 30, by: str = "weight", member: int | None = None
) -> pd.DataFrame:
    """Top `n_genes` genes of each topic: long table (topic, rank, gene, weight, lift).

    weight: the gene's probability in the topic; lift: that probability over the background profile's
    (what the topic adds to an average cell). `by` picks the ranking ("weight" or "lift").
    """
    if by not in ("weight", "lift"):
        raise ValueError(f"by must be 'weight' or 'lift', received {by!r}")
    weights = topic_gene_table(model, member)
    lift = weights / _background(model, member)
    rows = []
    for topic in weights.columns:
        order = np.argsort(-(weights if by == "weight" else lift)[topic].to_numpy(), kind="stable")[:n_genes]
        for rank, g in enumerate(order):
            rows.append((topic, rank, weights.index[g], weights[topic].iat[g], lift[topic].iat[g]))
    return pd.DataFrame(rows, columns=["topic", "rank", "gene", "weight", "lift"])


def class_topic_table(model: SCMix | SCMixEnsemble, member: int | None = None) -> pd.DataFrame:
    """Each class's topics ranked by how much they predict it: (class, topic, rank, weight, contrast, scale,
    labelled_cells).

    weight: posterior mean regression weight; contrast: the weight minus its mean over classes (only
    differences between classes change a softmax, so this is what the topic says about the class);
    scale: the horseshoe's posterior scale for the weight (small = shrunk to zero); labelled_cells: the class's
    labelled training cells (`labelled_cells`: below `FEW_LABELS`, read its rows with care).
    """
    explained = [m for _, m in _explained(model, member)]
    per_member = [m.classifier.class_weights(None).numpy() for m in explained]  # [n_classes, n_topics] each
    weights = np.concatenate(per_member, axis=1)
    # Contrasts within each member: a softmax is unchanged by a constant added to one member's weights.
    contrast = np.concatenate([w - w.mean(axis=0, keepdims=True) for w in per_member], axis=1)
    scale = np.concatenate([m.classifier.class_weights.shrinkage().numpy() for m in explained], axis=1)
    names = topic_names(model, member)
    rows = []
    for c, cls in enumerate(model.class_names):
        for rank, k in enumerate(np.argsort(-contrast[c], kind="stable")):
            rows.append((cls, names[k], rank, weights[c, k], contrast[c, k], scale[c, k]))
    table = pd.DataFrame(rows, columns=["class", "topic", "rank", "weight", "contrast", "scale"])
    return _with_labelled_cells(table, model)


def _with_labelled_cells(table: pd.DataFrame, model: SCMix | SCMixEnsemble) -> pd.DataFrame:
    """`table` with a column labelled_cells: each row's class's labelled training cells (`labelled_cells`)."""
    table["labelled_cells"] = table["class"].map(labelled_cells(model)).astype("Int64")
    return table


def class_genes(
    model: SCMix | SCMixEnsemble, n_genes: int = 30, by: str = "lift", member: int | None = None
) -> pd.DataFrame:
    """For each class, the top genes of its most predictive topic: (class, topic, labelled_cells, rank, gene,
    weight, lift).

    Ranked by lift by default: by weight, every topic's top genes are the genes that are abundant in
    every cell (ribosomal, mitochondrial); lift ranks what the topic adds to an average cell, which is
    what tells one cell type from another (on pbmc3k it finds about twice as many canonical markers).
    Under the default settings the horseshoe shrinks the topic weights nearly to zero and the call rests on the gene
    weights (`class_gene_weights`; experiments/few_shot/topic_share/summary.md): these topics describe the class's
    cells, not the reason for its calls.
    """
    best = class_topic_table(model, member).query("rank == 0")[["class", "topic", "labelled_cells"]]
    return best.merge(top_genes(model, n_genes, by, member), on="topic")


def class_gene_weights(model: SCMix | SCMixEnsemble, n_genes: int = 20, member: int | None = None) -> pd.DataFrame:
    """Each class's genes ranked by the classification branch's gene term: (class, rank, gene, weight, contrast,
    labelled_cells).

    weight: the gene's weight V for the class (per log1p CP10k unit above the gene's training mean; the
    members' mean when several are explained: unlike topics, genes are the same in every member); contrast:
    the weight minus its mean over classes (what the gene says for the class against the others, as for
    topics in `class_topic_table`). The top `n_genes` per class by contrast. Raises ValueError for a model
    whose branch reads topics only (`Config.classifier_genes=False`).
    """
    explained = [m for _, m in _explained(model, member)]
    if not all(m.classifier.n_genes for m in explained):
        raise ValueError(
            "this model's classification branch reads topics only (classifier_genes=False): it has no gene "
            "weights; use class_genes for the genes of each class's topics"
        )
    weights = np.mean([m.classifier.gene_weights.numpy() for m in explained], axis=0)  # [n_classes, n_genes]
    contrast = weights - weights.mean(axis=0, keepdims=True)
    rows = []
    for c, cls in enumerate(model.class_names):
        for rank, g in enumerate(np.argsort(-contrast[c], kind="stable")[:n_genes]):
            rows.append((cls, rank, model.genes[g], weights[c, g], contrast[c, g]))
    return _with_labelled_cells(pd.DataFrame(rows, columns=["class", "rank", "gene", "weight", "contrast"]), model)


def marker_score(
    model: SCMix | SCMixEnsemble, markers: dict, n_genes: int = 30, by: str = "lift", member: int | None = None
) -> tuple[float, pd.DataFrame]:
    """Fraction of canonical markers found among the top `n_genes` (ranked `by` lift or weight) of their
    class's most predictive topic.

    markers: {class name: [genes]}. Returns (score, DataFrame of class, marker, found).
    """
    table = class_genes(model, n_genes, by, member)
    rows: list[tuple[str, str, bool]] = []
    for cls, genes in markers.items():
        top = set(table.loc[table["class"] == cls, "gene"])
        rows.extend((cls, g, g in top) for g in genes)
    found = pd.DataFrame(rows, columns=["class", "marker", "found"])
    return float(found["found"].mean()), found


def topic_labels(model: SCMix | SCMixEnsemble, n_genes: int = 3, member: int | None = None) -> dict[str, str]:
    """Readable names for figures: {topic name: "topic_k: GENE1 GENE2 GENE3"}, its top `n_genes` by lift."""
    top = top_genes(model, n_genes, by="lift", member=member)
    return {t: f"{t}: {' '.join(rows.gene)}" for t, rows in top.groupby("topic", sort=False)}


def _wrap(label: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, width)) or label


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_class_topics(
    model: SCMix | SCMixEnsemble, path, n_topics: int | None = 30, member: int | None = None, min_share: float = 0.05
) -> None:
    """Heatmap of class x topic contrast weights (PNG). Only the topics that matter: those whose largest
    |contrast| reaches `min_share` of the largest in the table, at most `n_topics` of them (the largest);
    columns named by their top genes (`topic_labels`), class names wrapped."""
    plt = _pyplot()
    table = class_topic_table(model, member).pivot(index="class", columns="topic", values="contrast")
    table = table.loc[model.class_names, topic_names(model, member)]
    strength = table.abs().max()
    keep = strength[strength >= min_share * strength.max()]
    table = table[(keep.nlargest(n_topics) if n_topics else keep).index]
    labels = topic_labels(model, member=member)
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * table.shape[1] + 3), 0.45 * table.shape[0] + 2.5))
    limit = np.abs(table.to_numpy()).max() or 1.0
    image = ax.imshow(table.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(table.shape[1]), [labels[t] for t in table.columns], rotation=90, fontsize=7)
    ax.set_yticks(range(table.shape[0]), [_wrap(c) for c in _with_counts(model, table.index)], fontsize=8)
    ax.set_title(f"Class-predictive topics ({table.shape[1]} of {strength.size}; weight minus mean over classes)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="contrast")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_topic_genes(model: SCMix | SCMixEnsemble, path, n_genes: int = 8, member: int | None = None) -> None:
    """Heatmap of each class's most predictive topic x its top genes by lift (PNG), every member's topics
    considered. Colour: each gene's log weight standardised over all the topics of its member (z-score),
    so a gene specific to a topic stands out and abundant genes (MALAT1, ribosomal) do not fill every row."""
    plt = _pyplot()
    genes = class_genes(model, n_genes, member=member)
    topics = list(dict.fromkeys(genes["topic"]))
    gene_list = list(dict.fromkeys(genes["gene"]))
    table = topic_gene_table(model, member)
    logs = np.log(table.loc[gene_list].clip(lower=1e-12))
    z = pd.concat(
        [
            _zscore(logs[[c for c in logs.columns if c.startswith(prefix)] if prefix else list(logs.columns)])
            for prefix in dict.fromkeys(p for p, _ in _explained(model, member))
        ],
        axis=1,
    )[topics].T
    labels = topic_labels(model, member=member)
    rows = [_wrap(f"{labels[t]} ({', '.join(genes.loc[genes.topic == t, 'class'].unique())})", 60) for t in topics]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(gene_list) + 5), 0.6 * len(topics) + 2))
    limit = float(np.nanmax(np.abs(z.to_numpy()))) or 1.0
    image = ax.imshow(z.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(gene_list)), gene_list, rotation=90, fontsize=7)
    ax.set_yticks(range(len(topics)), rows, fontsize=7)
    ax.set_title("Top genes of class-predictive topics (gene's log weight, z-score over topics)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="z-score")
    fig.tight_layout()
    _save_figure(fig, path)


def call_genes(model: SCMix | SCMixEnsemble, n_genes: int = 3) -> pd.DataFrame:
    """(class, gene): each class's `n_genes` genes that weigh most in its calls. By the classification branch's
    own gene weights (`class_gene_weights`, which carry most of each call under the default settings: docs/few_shot.md,
    "The gene term") when it reads genes; else the top genes of its most predictive topic (`class_genes`)."""
    if all(m.classifier.n_genes for m in as_ensemble(model).members):
        return class_gene_weights(model, n_genes)[["class", "gene"]]
    return class_genes(model, n_genes)[["class", "gene"]]


def plot_class_gene_weights(model: SCMix | SCMixEnsemble, path, n_genes: int = 5) -> None:
    """Heatmap (PNG) of the classification branch's gene weights: classes x the top `n_genes` genes of each class
    by contrast (`class_gene_weights`: the weight minus its mean over classes, what the gene says for a class
    against the others), every class's contrast on each of those genes; classes with their labelled cells.
    Raises ValueError for a model whose branch reads topics only."""
    plt = _pyplot()
    every = class_gene_weights(model, len(model.genes))  # every class's contrast on every gene
    gene_list = list(dict.fromkeys(every[every["rank"] < n_genes]["gene"]))
    table = every.pivot(index="class", columns="gene", values="contrast").loc[model.class_names, gene_list].to_numpy()
    names = _with_counts(model, model.class_names)
    fig, ax = plt.subplots(figsize=(max(6, 0.26 * len(gene_list) + 4), 0.42 * len(names) + 2.4))
    limit = float(np.abs(table).max()) or 1.0
    image = ax.imshow(table, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(gene_list)), gene_list, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), [_wrap(c) for c in names], fontsize=8)
    ax.set_title(f"Genes that weigh most in each class's calls (top {n_genes} a class; weight minus mean over classes)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="contrast (per log1p CP10k unit)")
    fig.tight_layout()
    _save_figure(fig, path)


def _zscore(frame: pd.DataFrame) -> pd.DataFrame:
    """Each row standardised over its columns (a gene over topics); a constant row gives zeros."""
    centred = frame.sub(frame.mean(axis=1), axis=0)
    return centred.div(frame.std(axis=1).replace(0, 1.0), axis=0)


def _save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_explanations(model: SCMix | SCMixEnsemble, folder, n_genes: int = 30) -> dict[str, Path]:
    """Write the explanation tables (CSV) and figures (PNG) of every member into `folder`; returns the paths.
    Warns (logger tfp_scmix.explain) when a class was trained on fewer than `FEW_LABELS` labelled cells, unless
    `tfp_scmix.train` made `model` in this process (it has warned about those classes already)."""
    few = few_label_classes(model)
    if few and not getattr(model, "warned_few_labels", False):
        listed = ", ".join(f"{name} ({n})" for name, n in few.items())
        logger.warning(
            "%d class(es) had fewer than %d labelled cells in training: %s. Their topics and genes are what those "
            "few cells share and may not describe the type; label more cells of them for explanations to rely on.",
            len(few),
            FEW_LABELS,
            listed,
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "topic_genes": write_csv(top_genes(model, n_genes), folder / "topic_genes.csv"),
        "topic_genes_by_lift": write_csv(top_genes(model, n_genes, by="lift"), folder / "topic_genes_by_lift.csv"),
        "class_topics": write_csv(class_topic_table(model), folder / "class_topics.csv"),
        "class_genes": write_csv(class_genes(model, n_genes), folder / "class_genes.csv"),
        "class_genes_by_weight": write_csv(
            class_genes(model, n_genes, by="weight"), folder / "class_genes_by_weight.csv"
        ),
    }
    if all(m.classifier.n_genes for m in as_ensemble(model).members):
        paths["class_gene_weights"] = write_csv(class_gene_weights(model, n_genes), folder / "class_gene_weights.csv")
        plot_class_gene_weights(model, folder / "class_gene_weights.png")
        paths["class_gene_weights_png"] = folder / "class_gene_weights.png"
    plot_class_topics(model, folder / "class_topics.png")
    plot_topic_genes(model, folder / "topic_genes.png")
    paths.update(class_topics_png=folder / "class_topics.png", topic_genes_png=folder / "topic_genes.png")
    return paths


# --------------------------------------------------------------------------------------------
# Figures of the data: what the model says about an annotated dataset
# --------------------------------------------------------------------------------------------


def embed(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D embedding `[n_cells, 2]` of `features` (X_scmix) and its method's name: UMAP through scanpy or
    umap-learn when installed (scanpy's defaults: 15 neighbours), else scikit-learn's t-SNE."""
    try:
        import scanpy as sc

        adata = sc.AnnData(np.asarray(features, np.float32))
        sc.pp.neighbors(adata, use_rep="X", random_state=seed)
        sc.tl.umap(adata, random_state=seed)
        return np.asarray(adata.obsm["X_umap"]), "UMAP"
    except ImportError:
        pass
    try:
        import umap

        return np.asarray(umap.UMAP(random_state=seed).fit_transform(features)), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
        return TSNE(perplexity=perplexity, random_state=seed, init="pca").fit_transform(features), "t-SNE"


def _colors(adata, column: str) -> dict[str, str]:
    categories = list(adata.obs[column].cat.categories)
    colors = adata.uns.get(f"{column}_colors")
    if colors is None or len(colors) != len(categories):
        from matplotlib import colormaps
        from matplotlib.colors import to_hex

        colors = [to_hex(colormaps["tab20"](i % 20)) for i in range(len(categories))]
    return dict(zip(categories, colors))


def annotated_by_another_model(model: SCMix | SCMixEnsemble, adata, key: str = "scmix") -> bool:
    """Whether `adata`'s annotation under `key` was written by a model other than `model`: its uns[key] names
    other weights (`annotate.model_fingerprint`: another training on the same data too), another training data set
    or other genes. False when it records none of them."""
    record = adata.uns.get(key, {})
    names = ("model_fingerprint", "model_data_fingerprint", "gene_fingerprint")
    recorded = [str(record.get(name, "")) for name in names]
    own = (model_fingerprint(model), str(model.provenance.get("data_fingerprint", "")), str(model.gene_fingerprint))
    return any(r and r != o for r, o in zip(recorded, own, strict=True))


def _require_annotated(
    adata,
    key: str,
    label_key: str | None = None,
    obsm: tuple[str, ...] = (),
    model: SCMix | SCMixEnsemble | None = None,
) -> None:
    """Raise DataError, naming what is missing and how to get it, unless `adata` holds `annotate`'s
    obs[f"{key}_label"] and obs[f"{key}_confidence"], the obsm entries `obsm`, and obs[label_key] when given; and,
    with `model`, unless that annotation is `model`'s own (a figure of one model's genes by another's labels, seen in
    a trial, is wrong without a sign of it)."""
    missing = [f"obs[{c!r}]" for c in (f"{key}_label", f"{key}_confidence") if c not in adata.obs]
    missing += [f"obsm[{m!r}]" for m in obsm if m not in adata.obsm]
    if missing:
        raise DataError(
            f"{', '.join(missing)} missing: annotate the data first (tfp_scmix.annotate(model, adata), or "
            "`tfp-scmix annotate`), then draw its figures"
        )
    if model is not None and annotated_by_another_model(model, adata, key):
        raise DataError(
            f"the annotation under {key!r} was written by another model (uns[{key!r}] names other weights, training "
            "data or genes): annotate the data with this model first (tfp_scmix.annotate(model, adata), or another "
            "key_added= to keep both), or pass the model that annotated it"
        )
    if label_key is not None and label_key not in adata.obs:
        raise DataError(
            f"no obs column {label_key!r} of known labels{did_you_mean([label_key], adata.obs.columns)} (columns: "
            f"{list(adata.obs.columns)})"
        )


def plot_embedding(adata, path, key: str = "scmix", basis: str | None = None) -> None:
    """Two panels (PNG): the cells of an annotated AnnData in 2-D, coloured by predicted label and by
    confidence. basis: an obsm key holding a 2-D embedding (e.g. "X_umap"); by default `embed` of
    obsm[f"X_{key}"], stored in obsm[f"X_{key}_umap"] (or `_tsne`) for the next call."""
    stored = [k for k in (f"X_{key}_umap", f"X_{key}_tsne") if k in adata.obsm]
    _require_annotated(adata, key, obsm=(basis,) if basis is not None else () if stored else (f"X_{key}",))
    plt = _pyplot()
    if basis is None:
        if stored:
            basis = stored[0]
        else:
            coords, method = embed(adata.obsm[f"X_{key}"])
            basis = f"X_{key}_{'umap' if method == 'UMAP' else 'tsne'}"
            adata.obsm[basis] = coords.astype(np.float32)
    coords = np.asarray(adata.obsm[basis])[:, :2]
    method = {"umap": "UMAP", "tsne": "t-SNE"}.get(basis.rsplit("_", 1)[-1], basis)
    labels = adata.obs[f"{key}_label"]
    colors = _colors(adata, f"{key}_label")
    size = max(1.0, min(20.0, 30000 / max(len(coords), 1)))
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    order = np.random.default_rng(0).permutation(len(coords))  # no class drawn on top of all the others
    axes[0].scatter(*coords[order].T, s=size, c=[colors[v] for v in labels.to_numpy()[order]], linewidths=0)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=colors[c], label=f"{_wrap(str(c), 30)} ({(labels == c).sum()})")
        for c in labels.cat.categories
    ]
    axes[0].legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    axes[0].set_title("predicted label")
    image = axes[1].scatter(
        *coords[order].T, s=size, c=adata.obs[f"{key}_confidence"].to_numpy()[order], cmap="viridis", vmin=0, vmax=1
    )
    fig.colorbar(image, ax=axes[1], shrink=0.8, label="confidence (largest class probability)")
    novel = f"{key}_novel"
    if novel in adata.obs and adata.obs[novel].any():
        flagged = adata.obs[novel].to_numpy()
        axes[1].scatter(*coords[flagged].T, s=size * 2, facecolors="none", edgecolors="red", linewidths=0.6)
        axes[1].set_title(f"confidence; red rings: {int(flagged.sum())} novel cells (topic distance)")
    else:
        axes[1].set_title("confidence")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{method} 1")
        ax.set_ylabel(f"{method} 2")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_confusion(
    adata, label_key: str, path, key: str = "scmix", unlabeled_category: str | None = None
) -> pd.DataFrame:
    """Row-normalised confusion matrix (PNG) of obs[label_key] (rows, any labels) against the predicted
    labels (columns, in the model's class order; rows whose name is a predicted class in the same order, so that
    agreeing calls lie on the diagonal, then the other labels); returns the counts table. Cells without a label
    (NaN, or the value `unlabeled_category`, e.g. "Unknown") are left out; cells the model was trained on count
    too when the column holds their labels (the title says so: not a held-out score). Raises DataError when
    `adata` is not annotated or has no obs[label_key]."""
    _require_annotated(adata, key, label_key)
    plt = _pyplot()
    known = adata.obs[label_key].notna().to_numpy()
    if unlabeled_category is not None:
        known &= adata.obs[label_key].astype(str).to_numpy() != str(unlabeled_category)
    counts = pd.crosstab(
        adata.obs[label_key][known].astype(str), adata.obs[f"{key}_label"][known].astype(str), dropna=False
    )
    predicted = [c for c in adata.obs[f"{key}_label"].cat.categories if c in counts.columns]
    # Rows in the columns' order where the names agree (a diagonal of correct calls), the other labels after them.
    rows = [c for c in predicted if c in counts.index] + sorted(set(counts.index) - set(predicted))
    counts = counts.loc[rows, predicted]
    shares = counts.div(counts.sum(axis=1).replace(0, 1), axis=0)
    fig, ax = plt.subplots(figsize=(0.55 * len(predicted) + 4, 0.45 * len(counts) + 3))
    image = ax.imshow(shares.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(shares.to_numpy()):
        if value >= 0.01:
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if value > 0.6 else "black"
            )
    ax.set_xticks(range(len(predicted)), [_wrap(c, 20) for c in predicted], rotation=90, fontsize=7)
    ax.set_yticks(range(len(counts)), [f"{_wrap(r, 30)} ({counts.loc[r].sum()})" for r in counts.index], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel(label_key)
    agree = np.mean(
        adata.obs[label_key][known].astype(str).to_numpy() == adata.obs[f"{key}_label"][known].astype(str).to_numpy()
    )
    if set(counts.index) & set(predicted):  # labels named as the model's classes: agreement means something
        title = (
            f"Confusion, row-normalised (same name: {agree:.1%} of the {int(known.sum())} cells with a {label_key!r})\n"
            "cells the model was trained on count too, if the column holds their labels: not a held-out score"
        )
    else:  # other names (clusters, another annotation): which labels each group got, nothing to score
        title = f"Predicted labels of each {label_key!r} group, row-normalised ({int(known.sum())} cells)"
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the row")
    fig.tight_layout()
    _save_figure(fig, path)
    return counts


def plot_confidence(adata, path, key: str = "scmix") -> None:
    """Histogram of the confidence of each predicted label (PNG), one row per label, each scaled to its tallest bar;
    beside each, its cells' median confidence and the share below 0.9, which compare across rows. Raises DataError
    when `adata` is not annotated."""
    _require_annotated(adata, key)
    plt = _pyplot()
    labels = adata.obs[f"{key}_label"]
    colors = _colors(adata, f"{key}_label")
    categories = list(labels.cat.categories)
    fig, axes = plt.subplots(len(categories), 1, figsize=(7, 0.7 * len(categories) + 1.2), sharex=True, squeeze=False)
    bins = np.linspace(0, 1, 41)
    for ax, category in zip(axes[:, 0], categories):
        confidence = adata.obs[f"{key}_confidence"].to_numpy()[(labels == category).to_numpy()]
        values = confidence[~np.isnan(confidence)]  # NaN: a cell without counts (counted in the row, not drawn)
        ax.hist(values, bins=bins, color=colors[category])
        if values.size:
            ax.text(
                0.02, 0.5, f"median {np.median(values):.2f}; {np.mean(values < 0.9):.0%} below 0.9",
                transform=ax.transAxes, fontsize=7, va="center",
            )  # fmt: skip
        ax.set_yticks([])
        name = f"{_wrap(str(category), 22)}\n({len(confidence)})"
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
        ax.spines[["top", "right", "left"]].set_visible(False)
    axes[-1, 0].set_xlabel("confidence (largest class probability); each row scaled to its tallest bar")
    axes[0, 0].set_title("Confidence per predicted label (cells in brackets)")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_dotplot(
    model: SCMix | SCMixEnsemble,
    adata,
    path,
    n_genes: int = 3,
    key: str = "scmix",
    counts=None,
    genes: Sequence[str] | None = None,
) -> None:
    """Dotplot (PNG) by predicted label of the genes that weigh most in each class's calls (`call_genes`: the
    classification branch's gene weights, or its topics' genes for a branch that reads topics only), or of `genes`,
    the markers of your choice (as scanpy's `var_names`), in their order: dot size the fraction of cells with a
    count, colour the mean log1p counts per 10k scaled to [0, 1] per gene (as scanpy's `standard_scale="var"`).
    Raises DataError when `adata` is not annotated, or annotated by another model (`annotated_by_another_model`),
    holds no raw counts, or lacks one of `genes` (named, with the nearest names it has)."""
    from tfp_scmix.data import extract_counts

    _require_annotated(adata, key, model=model)
    matrix, var_names = extract_counts(adata, counts)
    chosen = list(dict.fromkeys(call_genes(model, n_genes)["gene"] if genes is None else map(str, genes)))
    position = pd.Index(var_names).get_indexer(chosen)
    if genes is not None and (position < 0).any():
        absent = [g for g, p in zip(chosen, position) if p < 0]
        raise DataError(
            f"genes {absent[:5]} are not among the data's genes{did_you_mean(absent, var_names)}; name genes of "
            "adata.var_names (of the slot the counts are in)"
        )
    plt = _pyplot()
    gene_list = [g for g, p in zip(chosen, position) if p >= 0]
    position = position[position >= 0]
    library = np.asarray(matrix.sum(axis=1)).ravel()
    selected = matrix[:, position].toarray()
    expression = np.log1p(selected * (1e4 / np.maximum(library, 1))[:, None])
    labels = adata.obs[f"{key}_label"]
    groups = list(labels.cat.categories)
    fraction = np.stack([(selected[(labels == g).to_numpy()] > 0).mean(axis=0) for g in groups])
    mean = np.stack([expression[(labels == g).to_numpy()].mean(axis=0) for g in groups])
    scaled = (mean - mean.min(axis=0)) / np.maximum(mean.max(axis=0) - mean.min(axis=0), 1e-12)
    fig, ax = plt.subplots(figsize=(0.3 * len(gene_list) + 4, 0.4 * len(groups) + 2.2))
    yy, xx = np.meshgrid(np.arange(len(groups)), np.arange(len(gene_list)), indexing="ij")
    image = ax.scatter(xx.ravel(), yy.ravel(), s=200 * fraction.ravel(), c=scaled.ravel(), cmap="Reds", vmin=0, vmax=1)
    ax.set_xticks(range(len(gene_list)), gene_list, rotation=90, fontsize=7)
    ax.set_yticks(range(len(groups)), [_wrap(str(g), 30) for g in groups], fontsize=7)
    ax.set_ylim(len(groups) - 0.5, -0.5)
    what = "Each class's genes of most weight" if genes is None else "Genes"
    ax.set_title(f"{what} by predicted label\n(size: fraction of cells; colour: scaled mean)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="mean log1p CP10k, scaled per gene")
    sizes = [ax.scatter([], [], s=200 * f, c="grey") for f in (0.25, 0.5, 0.75, 1.0)]
    ax.legend(
        sizes, ["25%", "50%", "75%", "100%"], title="cells with a count", loc="upper left", bbox_to_anchor=(1.25, 1),
        fontsize=7, title_fontsize=7, frameon=False, labelspacing=1.2,
    )  # fmt: skip
    fig.tight_layout()
    _save_figure(fig, path)


def write_data_figures(
    model: SCMix | SCMixEnsemble,
    adata,
    folder,
    label_key: str | None = None,
    key: str = "scmix",
    counts=None,
    unlabeled_category: str | None = None,
) -> dict[str, Path]:
    """Figures of an annotated AnnData (`tfp_scmix.annotate` output) into `folder`; returns their paths:
    embedding.png (`plot_embedding`), confidence.png, dotplot.png, and with `label_key` (an obs column of
    known labels; cells whose label is NaN or `unlabeled_category` left out) confusion.png and, for the cells whose
    label is one of the model's classes, reliability.png (`evaluate.reliability_diagram`). Raises DataError when
    `adata` is not annotated, or annotated by another model (`annotated_by_another_model`), or `label_key` is not an
    obs column, before any file is written."""
    from tfp_scmix.evaluate import reliability_diagram

    stored = any(k in adata.obsm for k in (f"X_{key}_umap", f"X_{key}_tsne"))
    needed = (() if stored else (f"X_{key}",)) + ((f"{key}_probs",) if label_key is not None else ())
    _require_annotated(adata, key, label_key, obsm=needed, model=model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"embedding_png": folder / "embedding.png", "confidence_png": folder / "confidence.png"}
    plot_embedding(adata, paths["embedding_png"], key)
    plot_confidence(adata, paths["confidence_png"], key)
    paths["dotplot_png"] = folder / "dotplot.png"
    plot_dotplot(model, adata, paths["dotplot_png"], key=key, counts=counts)
    if label_key is not None:
        paths["confusion_png"] = folder / "confusion.png"
        plot_confusion(adata, label_key, paths["confusion_png"], key, unlabeled_category)
        truth = adata.obs[label_key].astype(str).to_numpy()
        lookup = {c: i for i, c in enumerate(model.class_names)}
        known = np.array([t in lookup for t in truth])
        if known.sum() >= 10:
            paths["reliability_png"] = folder / "reliability.png"
            reliability_diagram(
                adata.obsm[f"{key}_probs"][known],
                np.array([lookup[t] for t in truth[known]]),
                paths["reliability_png"],
                title=f"{int(known.sum())} cells labelled with one of the model's classes ({label_key})\n"
                "training cells count too if the column holds their labels:\nthen not a held-out calibration",
            )
    return paths
