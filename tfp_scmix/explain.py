"""Explanations: the genes of each topic and the topics that predict each class, as tables and figures.

Each function takes an `SCMix` or an `SCMixEnsemble` (whose first member it explains: the topics of
different restarts are different topics, each with its own class weights).
"""

import numpy as np
import pandas as pd

from tfp_scmix.ensemble import single_model


def topic_names(n_topics):
    return [f"topic_{k}" for k in range(n_topics)]


def topic_gene_table(model):
    """Posterior-mean topic-gene distributions as a DataFrame `[n_genes, n_topics]` indexed by gene."""
    model = single_model(model)
    return pd.DataFrame(model.topics(None).numpy().T, index=model.genes, columns=topic_names(model.n_topics))


def top_genes(model, n_genes=30, by="weight"):
    """Top `n_genes` genes of each topic: long table (topic, rank, gene, weight, lift).

    weight: the gene's probability in the topic; lift: that probability over the background profile's
    (what the topic adds to an average cell). `by` picks the ranking ("weight" or "lift").
    """
    model = single_model(model)
    if by not in ("weight", "lift"):
        raise ValueError(f"by must be 'weight' or 'lift', received {by!r}")
    weights = topic_gene_table(model)
    background = np.exp(model.topics.background.numpy())
    background /= background.sum()
    lift = weights.div(background, axis=0)
    rows = []
    for topic in weights.columns:
        order = np.argsort(-(weights if by == "weight" else lift)[topic].to_numpy(), kind="stable")[:n_genes]
        for rank, g in enumerate(order):
            rows.append((topic, rank, weights.index[g], weights[topic].iat[g], lift[topic].iat[g]))
    return pd.DataFrame(rows, columns=["topic", "rank", "gene", "weight", "lift"])


def class_topic_table(model):
    """Each class's topics ranked by how much they predict it: (class, topic, rank, weight, contrast, scale).

    weight: posterior mean regression weight; contrast: the weight minus its mean over classes (only
    differences between classes change a softmax, so this is what the topic says about the class);
    scale: the horseshoe's posterior scale for the weight (small = shrunk to zero).
    """
    model = single_model(model)
    weights = model.classifier.class_weights(None).numpy()
    scale = model.classifier.class_weights.shrinkage().numpy()
    contrast = weights - weights.mean(axis=0, keepdims=True)
    names = topic_names(model.n_topics)
    rows = []
    for c, cls in enumerate(model.class_names):
        for rank, k in enumerate(np.argsort(-contrast[c], kind="stable")):
            rows.append((cls, names[k], rank, weights[c, k], contrast[c, k], scale[c, k]))
    return pd.DataFrame(rows, columns=["class", "topic", "rank", "weight", "contrast", "scale"])


def class_genes(model, n_genes=30, by="lift"):
    """For each class, the top genes of its most predictive topic: (class, topic, rank, gene, weight, lift).

    Ranked by lift by default: by weight, every topic's top genes are the genes that are abundant in
    every cell (ribosomal, mitochondrial); lift ranks what the topic adds to an average cell, which is
    what tells one cell type from another (on pbmc3k it finds about twice as many canonical markers).
    """
    best = class_topic_table(model).query("rank == 0")[["class", "topic"]]
    return best.merge(top_genes(model, n_genes, by), on="topic")


def marker_score(model, markers, n_genes=30, by="lift"):
    """Fraction of canonical markers found among the top `n_genes` (ranked `by` lift or weight) of their
    class's most predictive topic.

    markers: {class name: [genes]}. Returns (score, DataFrame of class, marker, found).
    """
    table = class_genes(model, n_genes, by)
    rows = []
    for cls, genes in markers.items():
        top = set(table.loc[table["class"] == cls, "gene"])
        rows.extend((cls, g, g in top) for g in genes)
    found = pd.DataFrame(rows, columns=["class", "marker", "found"])
    return float(found["found"].mean()), found


def plot_class_topics(model, path, n_topics=None):
    """Heatmap of class x topic contrast weights (PNG); the `n_topics` most used topics when given."""
    model = single_model(model)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = class_topic_table(model).pivot(index="class", columns="topic", values="contrast")
    table = table.loc[model.class_names, topic_names(model.n_topics)]
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


def plot_topic_genes(model, path, n_genes=8):
    """Heatmap of each class's most predictive topic x its top genes (PNG)."""
    model = single_model(model)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    genes = class_genes(model, n_genes)
    topics = list(dict.fromkeys(genes["topic"]))
    gene_list = list(dict.fromkeys(genes["gene"]))
    weights = topic_gene_table(model).loc[gene_list, topics].T
    labels = [f"{t} ({', '.join(genes.loc[genes.topic == t, 'class'].unique())})" for t in topics]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(gene_list) + 3), 0.45 * len(topics) + 1.5))
    image = ax.imshow(np.log10(weights.to_numpy() + 1e-6), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(gene_list)), gene_list, rotation=90, fontsize=7)
    ax.set_yticks(range(len(topics)), labels, fontsize=8)
    ax.set_title("Top genes of class-predictive topics (log10 weight)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path):
    import matplotlib.pyplot as plt
    from tfp_scmix.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_explanations(model, folder, n_genes=30):
    """Write the explanation tables (CSV) and figures (PNG) into `folder`; returns the paths."""
    from pathlib import Path

    from tfp_scmix.io import write_csv

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "topic_genes": write_csv(top_genes(model, n_genes), folder / "topic_genes.csv"),
        "topic_genes_by_lift": write_csv(top_genes(model, n_genes, by="lift"), folder / "topic_genes_by_lift.csv"),
        "class_topics": write_csv(class_topic_table(model), folder / "class_topics.csv"),
        "class_genes": write_csv(class_genes(model, n_genes), folder / "class_genes.csv"),
        "class_genes_by_weight": write_csv(class_genes(model, n_genes, by="weight"),
                                           folder / "class_genes_by_weight.csv"),
    }
    plot_class_topics(model, folder / "class_topics.png")
    plot_topic_genes(model, folder / "topic_genes.png")
    paths.update(class_topics_png=folder / "class_topics.png", topic_genes_png=folder / "topic_genes.png")
    return paths
