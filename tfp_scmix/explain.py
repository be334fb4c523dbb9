"""Explanations: the genes of each topic and the topics that predict each class, as tables and figures.

Each function takes an `SCMix` or an `SCMixEnsemble`. By default it explains every member together:
the topics of different restarts are different topics, each with its own class weights, so a member's
topics are named `m<member>_topic_<k>` (`topic_<k>` when there is one member) and a class's most
predictive topic is the one of highest contrast over all members. `member=m` explains member m alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tfp_scmix.ensemble import SCMixEnsemble, as_ensemble
from tfp_scmix.io import atomic_path, write_csv
from tfp_scmix.model import SCMix


def _explained(model: SCMix | SCMixEnsemble, member: int | None) -> list[tuple[str, SCMix]]:
    """(topic-name prefix, member) pairs to explain. Raises IndexError for a member the model lacks."""
    members = as_ensemble(model).members
    if member is not None:
        if not -len(members) <= member < len(members):
            raise IndexError(f"member {member} out of range: the model has {len(members)} member(s)")
        return [("", members[member])]
    return [("", members[0])] if len(members) == 1 else [(f"m{i}_", m) for i, m in enumerate(members)]


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
    """Each class's topics ranked by how much they predict it: (class, topic, rank, weight, contrast, scale).

    weight: posterior mean regression weight; contrast: the weight minus its mean over classes (only
    differences between classes change a softmax, so this is what the topic says about the class);
    scale: the horseshoe's posterior scale for the weight (small = shrunk to zero).
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
    return pd.DataFrame(rows, columns=["class", "topic", "rank", "weight", "contrast", "scale"])


def class_genes(
    model: SCMix | SCMixEnsemble, n_genes: int = 30, by: str = "lift", member: int | None = None
) -> pd.DataFrame:
    """For each class, the top genes of its most predictive topic: (class, topic, rank, gene, weight, lift).

    Ranked by lift by default: by weight, every topic's top genes are the genes that are abundant in
    every cell (ribosomal, mitochondrial); lift ranks what the topic adds to an average cell, which is
    what tells one cell type from another (on pbmc3k it finds about twice as many canonical markers).
    """
    best = class_topic_table(model, member).query("rank == 0")[["class", "topic"]]
    return best.merge(top_genes(model, n_genes, by, member), on="topic")


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


def plot_class_topics(
    model: SCMix | SCMixEnsemble, path, n_topics: int | None = None, member: int | None = None
) -> None:
    """Heatmap of class x topic contrast weights (PNG); the `n_topics` most used topics when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = class_topic_table(model, member).pivot(index="class", columns="topic", values="contrast")
    table = table.loc[model.class_names, topic_names(model, member)]
    if n_topics:
        table = table[table.abs().max().nlargest(n_topics).index]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * table.shape[1] + 2), 0.4 * table.shape[0] + 1.5))
    limit = np.abs(table.to_numpy()).max() or 1.0
    image = ax.imshow(table.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    ax.set_title("Class-predictive topics (weight minus mean over classes)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_topic_genes(model: SCMix | SCMixEnsemble, path, n_genes: int = 8, member: int | None = None) -> None:
    """Heatmap of each class's most predictive topic x its top genes (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    genes = class_genes(model, n_genes, member=member)
    topics = list(dict.fromkeys(genes["topic"]))
    gene_list = list(dict.fromkeys(genes["gene"]))
    weights = topic_gene_table(model, member).loc[gene_list, topics].T
    labels = [f"{t} ({', '.join(genes.loc[genes.topic == t, 'class'].unique())})" for t in topics]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(gene_list) + 3), 0.45 * len(topics) + 1.5))
    image = ax.imshow(np.log10(weights.to_numpy() + 1e-6), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(gene_list)), gene_list, rotation=90, fontsize=7)
    ax.set_yticks(range(len(topics)), labels, fontsize=8)
    ax.set_title("Top genes of class-predictive topics (log10 weight)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_explanations(model: SCMix | SCMixEnsemble, folder, n_genes: int = 30) -> dict[str, Path]:
    """Write the explanation tables (CSV) and figures (PNG) of every member into `folder`; returns the paths."""
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
    plot_class_topics(model, folder / "class_topics.png")
    plot_topic_genes(model, folder / "topic_genes.png")
    paths.update(class_topics_png=folder / "class_topics.png", topic_genes_png=folder / "topic_genes.png")
    return paths
