"""One report from the few-shot runs: the main table against the goals, the ablation, label noise, budgets.

    ./run experiments.few_shot.report            # reads the results.csv files the runs wrote; writes report.md

Reads results.csv in this folder (the main table) and in its ablation/, label_noise/, budgets/ and
inductive/ folders (see run.py for the commands behind each); a folder that is missing is skipped.
Label noise is scored against the clean rows of the same method and seeds (main table or ablation).
"""

import argparse
import json
from pathlib import Path

import pandas as pd

from experiments.common import markdown_table, write_text
from experiments.few_shot.run import PEERS
from experiments.few_shot.run import mean_table as run_mean_table

HERE = Path(__file__).parent
KEYS = ["dataset", "setting", "labels", "method"]


def read(folder):
    path = folder / "results.csv"
    return pd.read_csv(path) if path.exists() else None


def mean_table(frame, extra=()):
    """Means over seeds per dataset, setting, budget and method (run.py's table, without the noise column)."""
    return run_mean_table(frame, KEYS, extra)


def verdicts(main):
    """Per dataset and budget: tfp_scmix against the best peer (errors and macro-F1) and the goal of half."""
    lines = []
    table = mean_table(main)
    for (dataset, setting, labels), group in table.groupby(["dataset", "setting", "labels"], sort=False):
        ours = group[group.method == "tfp_scmix"]
        peers = group[group.method.isin(list(PEERS))]
        if ours.empty or peers.empty:
            continue
        ours, best = ours.iloc[0], peers.sort_values("errors").iloc[0]
        best_f1 = peers.macro_f1.max()
        ahead = ours.errors < best.errors and ours.macro_f1 > best_f1
        lines.append(
            f"- {dataset}, {setting} setting, {labels} labels: tfp_scmix {ours.errors:g} errors "
            f"(macro-F1 {ours.macro_f1:.3f}); best peer {best.method} {best.errors:g} (best peer macro-F1 "
            f"{best_f1:.3f}): {'ahead of every peer' if ahead else 'NOT ahead of every peer'}; "
            f"{ours.errors / best.errors:.2f} x the best peer's errors (goal 0.5: "
            f"{'met' if ours.errors <= 0.5 * best.errors else 'not met'})."
        )
    return lines


def per_class(frame):
    """Mean per-class F1 over seeds `[method, class]` of one dataset."""
    rows = [{"method": r.method, **json.loads(r.per_class_f1)} for r in frame.itertuples()]
    return pd.DataFrame(rows).groupby("method", sort=False).mean().round(3).reset_index()


def noise_table(noisy, clean):
    """Errors with 10% of the training labels flipped against the same method and seeds without."""
    keys = KEYS + ["seed"]
    merged = noisy.merge(clean[keys + ["errors"]], on=keys, suffixes=("", "_clean"))
    merged["increase"] = merged["errors"] - merged["errors_clean"]
    return (
        merged.groupby(KEYS, sort=False)
        .agg(
            errors_clean=("errors_clean", "mean"),
            errors_noisy=("errors", "mean"),
            increase=("increase", "mean"),
            seeds=("seed", "count"),
        )
        .round(1)
        .reset_index()
    )


def report(folder=HERE):
    main, ablation = read(folder), read(folder / "ablation")
    noisy, budgets, inductive = (read(folder / name) for name in ("label_noise", "budgets", "inductive"))
    parts = [
        "# Few-shot benchmark report",
        "",
        "Written by `./run experiments.few_shot.report` from the results.csv files of the runs listed in "
        "`experiments/few_shot/run.py`. Errors are of 2000 test cells, means over seeds; tfp_scmix is the "
        "package default (3 restarts averaged) unless the method says otherwise.",
        "",
    ]
    if main is not None:
        parts += [
            "## Main setting: tfp_scmix against its peers",
            "",
            *verdicts(main),
            "",
            markdown_table(mean_table(main, ["marker_score", "marker_score_by_weight", "weights_above_0.1"])),
            "",
        ]
        for dataset, group in main.groupby("dataset", sort=False):
            parts += [f"Per-class F1 on {dataset}:", "", markdown_table(per_class(group)), ""]
        parts += [
            "`marker_score`: fraction of the design note's canonical pbmc3k markers among the top 30 genes "
            "(by lift over the background) of the most predictive topic of their class, averaged over the "
            "ensemble's members; `marker_score_by_weight` ranks genes by their weight in the topic instead. "
            "`weights_above_0.1`: fraction of class weights whose posterior mean exceeds 0.1 in size.",
            "",
        ]
    if ablation is not None:
        parts += [
            "## Ablation (single models; pbmc3k)",
            "",
            markdown_table(mean_table(ablation, ["marker_score", "weights_above_0.1"])),
            "",
        ]
    if noisy is not None:
        clean = pd.concat([f for f in (main, ablation) if f is not None])
        clean = clean[clean.label_noise == 0]
        parts += [
            "## Label noise: 10% of the training labels flipped",
            "",
            markdown_table(noise_table(noisy, clean)),
            "",
        ]
    for title, frame in (("Label budgets", budgets), ("Inductive setting (test cells held out)", inductive)):
        if frame is not None:
            parts += [f"## {title}", "", *verdicts(frame), "", markdown_table(mean_table(frame)), ""]
    text = "\n".join(parts)
    write_text(folder / "report.md", text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", default=str(HERE))
    print(report(Path(parser.parse_args(argv).folder)))


if __name__ == "__main__":
    main()
