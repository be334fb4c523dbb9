"""The data a run configuration names, split into training, validation and test cells, and its identity."""

import dataclasses
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

import tfp_scmix as scm
from tfp_scmix import datasets
from tfp_scmix.data import data_path, highly_variable_genes
from tfp_scmix.evaluate import few_shot_split
from training.config import ConfigError, DataConfig

EMBEDDED = "embedded"


@dataclasses.dataclass
class Splits:
    """train: the cells the model fits (labels only on the labelled training cells);
    validation: labelled cells scored each epoch; test: labelled cells scored once at the end (may be empty);
    identity: what identifies the data (file hash, cells, genes, classes, split sizes)."""

    train: scm.SCData
    validation: scm.SCData
    test: scm.SCData
    identity: dict


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(cfg: DataConfig):
    """(AnnData, the file it came from): "embedded" is the package's pbmc68k_reduced."""
    if cfg.path == EMBEDDED:
        with resources.as_file(resources.files(datasets) / datasets.EMBEDDED) as path:
            return datasets.pbmc68k_reduced(), path
    path = data_path(cfg.path)  # the path itself, else $TFP_SCMIX_DATA/path
    return scm.data.read_h5ad(path), path


def load(cfg: DataConfig) -> Splits:
    """Read the dataset and split it by the few-shot protocol described in `DataConfig`."""
    adata, path = _read(cfg)
    full = scm.from_anndata(
        adata, counts=cfg.counts, label_key=cfg.label_key, batch_key=cfg.batch_key, unknown=cfg.unknown
    )
    if cfg.n_test + cfg.n_labelled > full.n_cells:
        raise ConfigError(
            f"[data] n_test ({cfg.n_test}) + n_labelled ({cfg.n_labelled}) exceeds the "
            f"{full.n_cells} cells of {cfg.path}; lower them."
        )
    test, budget = few_shot_split(full.n_cells, cfg.n_test, cfg.n_labelled, cfg.seed)
    validation, labelled = budget[: cfg.n_validation], budget[cfg.n_validation :]
    kept = np.ones(full.n_cells, bool)
    if cfg.setting == "inductive":
        kept[test] = kept[validation] = False
    train = full.hide_labels(labelled).subset(np.flatnonzero(kept))
    if len(np.unique(train.labels[train.labels >= 0])) < 2:
        raise ConfigError(
            f"[data] the {len(labelled)} labelled training cells of {cfg.path} cover fewer than "
            f"two classes of {cfg.label_key!r}; raise n_labelled or check label_key."
        )
    if cfg.n_top_genes:
        # Chosen from the training cells' counts alone, so inductive test cells stay unseen.
        genes = highly_variable_genes(train.counts, train.genes, cfg.n_top_genes)
        train, full = train.select_genes(genes), full.select_genes(genes)
    scored = lambda index: full.subset(index[full.labels[index] >= 0])  # noqa: E731
    identity = {
        "data.name": Path(path).stem,
        "data.file": str(path) if cfg.path != EMBEDDED else f"{EMBEDDED}:{datasets.EMBEDDED}",
        "data.sha256": file_sha256(path),
        "data.fingerprint": full.fingerprint(),
        "data.n_cells": full.n_cells,
        "data.n_genes": full.n_genes,
        "data.n_classes": full.n_classes,
        "data.classes": ", ".join(full.classes),
        "data.n_train_cells": train.n_cells,
        "data.n_train_labelled": train.n_labelled,
        "data.n_validation_cells": len(validation),
        "data.n_test_cells": len(test),
    }
    return Splits(train, scored(validation), scored(test), identity)
