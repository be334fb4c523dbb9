"""How much of the default model's call its topic term carries, on the suite's splits.

The classification branch's logits are W x + V (g - m) + c (`layers.classifier`): x the cell's centred log topic
proportions, g its log1p counts per 10k. For each member of the default model (`scm.train` with the package's
settings, the suite's split: main setting, 150 labels) this measures, over the test cells: the largest topic weight
|W| (posterior mean), the topic term's share of the logits' spread across classes (mean squared deviation from the
cell's mean logit, topic term against gene term), and how many calls change when the topic term is left out.

    ./run experiments.few_shot.topic_share [--datasets ...] [--seeds 0]

Writes experiments/few_shot/topic_share/results.csv (one row per dataset, seed and member) and summary.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

import tfp_scmix as scm
from experiments.common import most_variable
from experiments.few_shot.run import HERE, stand_in_main, test_size
from tfp_scmix.data import log_normalised
from tfp_scmix.evaluate import few_shot_split
from tfp_scmix.novelty import log_ratio_features

BUDGET = 150
RESTARTS = 1


def member_rows(full, name, seed):
    """Rows of each member of the default model of one split: the topic term's weights, share and effect."""
    test, labelled = few_shot_split(full.n_cells, test_size(name, full.n_cells, BUDGET), BUDGET, seed)
    data = most_variable(full, 2000)
    train = data.hide_labels(labelled)
    model = scm.train(train, restarts=RESTARTS, seed=seed * 100, verbose=0)
    cells = data.subset(test)
    genes = log_normalised(cells.counts).toarray().astype(np.float32)
    rows = []
    for i, member in enumerate(model.members):
        branch = member.classifier
        weights = branch.class_weights(None).numpy()  # [classes, topics], posterior mean
        topic = log_ratio_features(scm.predict(member, cells)["cell_topic"]) @ weights.T
        gene = branch.gene_logits(genes).numpy()
        bias = branch.bias.numpy()

        def spread(logits):
            return float(np.mean((logits - logits.mean(axis=1, keepdims=True)) ** 2))

        with_topics, without = (topic + gene + bias).argmax(1), (gene + bias).argmax(1)
        truth = cells.labels
        rows.append(
            {
                "dataset": name,
                "seed": seed,
                "member": i,
                "max_abs_topic_weight": float(np.abs(weights).max()),
                "max_abs_gene_weight": float(np.abs(branch.gene_weights.numpy()).max()),
                "topic_share": spread(topic) / (spread(topic) + spread(gene)),
                "calls_changed_without_topics": float(np.mean(with_topics != without)),
                "errors": int((with_topics != truth).sum()),
                "errors_without_topics": int((without != truth).sum()),
            }
        )
    return rows


def summary(frame: pd.DataFrame) -> str:
    lines = [
        "# The topic term's share of the default model's call",
        "",
        "Written by `./run experiments.few_shot.topic_share`: the suite's main split, 150 labels, the default "
        f"model ({RESTARTS} restart), its test cells. Share: the topic term's part of the logits' spread across "
        "classes.",
        "",
        "| dataset | seed | member | largest topic weight | largest gene weight | topic share | calls changed "
        "without the topic term | errors | errors without the topic term |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in frame.itertuples(index=False):
        lines.append(
            f"| {row.dataset} | {row.seed} | {row.member} | {row.max_abs_topic_weight:.2g} | "
            f"{row.max_abs_gene_weight:.2f} | {row.topic_share:.2g} | {row.calls_changed_without_topics:.4f} | "
            f"{row.errors} | {row.errors_without_topics} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    return stand_in_main(argv, __doc__, member_rows, summary, HERE / "topic_share", seeds=(0,))


if __name__ == "__main__":
    main()
