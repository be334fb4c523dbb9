"""Why pbmc3k -> sorted Zheng transfer stops near 0.87: the two datasets define some cell types differently.

    ./run experiments.cross_dataset.label_definitions

Writes label_definitions.csv (for each population of both datasets, the fraction of its cells in which
each marker gene is detected) and label_definitions.md (that table, plus the coarse accuracy that
logistic regression reaches when it learns the sorted set's own labels, 5-fold cross-validated: how
separable the coarse classes are when the labels define them the sorted set's way).
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.common import load_dataset, log_normalised, markdown_table, most_variable, write_text
from experiments.cross_dataset.run import QUERY, QUERY_COARSE, REFERENCE
from tfp_scmix.io import write_csv

HERE = Path(__file__).parent
# Naive versus effector CD8 T, CD4 T, NK, monocytes versus dendritic cells.
MARKERS = [
    "CD8A",
    "CD8B",
    "CD4",
    "IL7R",
    "CCR7",
    "CCL5",
    "NKG7",
    "GZMK",
    "FCGR3A",
    "CD14",
    "LYZ",
    "S100A8",
    "FCER1A",
    "CLEC10A",
    "CD1C",
]


def detection(data, markers):
    """Fraction of each population's cells with a nonzero count of each marker `[populations, markers]`."""
    genes = list(data.genes)
    present = [g for g in markers if g in genes]
    counts = data.counts[:, [genes.index(g) for g in present]].toarray() > 0
    frame = pd.DataFrame(counts, columns=present)
    frame.insert(0, "population", np.asarray(data.classes)[data.labels])
    return frame.groupby("population").mean().round(2)


def own_label_accuracy(data, seed=0):
    """5-fold cross-validated coarse accuracy of logistic regression trained on the sorted set's own labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    data = most_variable(data, 2000)
    coarse = np.asarray([QUERY_COARSE[c] for c in data.classes])[data.labels]
    predicted = cross_val_predict(LogisticRegression(max_iter=3000), log_normalised(data.counts), coarse, cv=5)
    return float((predicted == coarse).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)
    out = Path(args.out)
    reference, query = (load_dataset(name) for name in (REFERENCE, QUERY))
    table = pd.concat(
        {REFERENCE: detection(reference, MARKERS), QUERY: detection(query, MARKERS)}, names=["dataset"]
    ).reset_index()
    write_csv(table, out / "label_definitions.csv")
    accuracy = own_label_accuracy(query)
    text = (
        "# Marker detection by population (fraction of cells with a nonzero count)\n\n"
        f"Coarse accuracy of logistic regression trained on {QUERY}'s own labels (5-fold CV): "
        f"{accuracy:.3f}\n\n" + markdown_table(table) + "\n"
    )
    write_text(out / "label_definitions.md", text)
    print(text)


if __name__ == "__main__":
    main()
