"""Training stage: the one recipe that trains a model, and `adapt` for a new dataset.

`train` is the only place the package trains: every restart is an `SCMix` built by `SCMix.from_data`,
compiled with Adam(config.learning_rate), fitted for config.epochs epochs with the callbacks of
`tfp_scmix.callbacks.default` (divergence guard, classifier refit after the last epoch), optionally
resumable (`checkpoint_dir`) and optionally under a `tf.distribute` strategy. The command line,
`training/` (tracked runs, searches), `experiments/` and the tests call it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_scmix import distribute
from tfp_scmix.callbacks import ProgressBar, ResumableCheckpoint, StopOnDivergence, TrainingDiverged, default
from tfp_scmix.config import Config
from tfp_scmix.data import FEW_LABELS, DataError, SCData, check_argument, epoch_batches, from_anndata
from tfp_scmix.ensemble import SCMixEnsemble, as_ensemble
from tfp_scmix.io import ModelFileError, load_model, save_model
from tfp_scmix.model import SCMix, self_training_cells
from tfp_scmix.novelty import TopicNovelty
from tfp_scmix.stream import H5ADStream

logger = logging.getLogger("tfp_scmix")


def make_deterministic(seed: int = 0) -> None:
    """Seed Python, NumPy, TensorFlow and Keras and turn on TensorFlow's op determinism (process-wide).

    With it, the same data, settings and seed give bit-identical weights and predictions on CPU.
    Op determinism cannot be turned off again through TensorFlow's public API; call it in the process
    (script, subprocess) that trains.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _config(config: Config | dict | None, overrides: dict[str, Any]) -> Config:
    if config is None:
        config = Config()
    elif isinstance(config, dict):
        config = Config.from_dict(config)
    elif not isinstance(config, Config):
        raise TypeError(
            f"config must be a tfp_scmix.Config, a dict of settings or None, received {type(config).__name__}"
        )
    return config.replace(**overrides) if overrides else config


def train(
    data: SCData | H5ADStream,
    config: Config | dict | None = None,
    *,
    restarts: int = 3,
    epochs: int | None = None,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    strategy: str | tf.distribute.Strategy | None = None,
    callbacks=(),
    verbose: int = 1,
) -> SCMixEnsemble:
    """Train `restarts` models on `data` (labels where known) and return them as one `SCMixEnsemble`.

    data: `SCData` (in memory) or `H5ADStream` (read from disk in chunks; its labelled cells are read into
    memory for the classifier refit). config: `Config` (None: the package defaults); `epochs` overrides
    config.epochs. Restart r is seeded `seed + r`; the ensemble averages their class probabilities (one
    member when `restarts=1`, which predicts exactly as that `SCMix`).
    checkpoint_dir: each restart backs up every epoch into `checkpoint_dir/restart-r`; calling `train`
    again with the same arguments after a kill resumes from the last finished epoch to the same result
    (with `make_deterministic`); minibatches then come from `epoch_batches`. A finished restart's epoch backups are
    replaced by the restart itself, `checkpoint_dir/restart-r.keras`, kept after `train` returns: the same call
    again loads it instead of training. Delete the folder once the model is saved (`tfp-scmix train` does).
    strategy: None (one device), a name of `distribute.STRATEGIES` or a `tf.distribute.Strategy`
    (streams only; config.batch_size is the global batch).
    callbacks: Keras callbacks added after the recipe's own (`callbacks.default`).
    verbose: 0 silent; 1 one progress bar over restarts x epochs (`callbacks.ProgressBar`) and a summary
    line; 2 Keras's line per epoch (every loss term) and the summary.
    The returned ensemble carries `novelty`, a `TopicNovelty` fitted on (up to 20,000 of) the labelled
    training cells, and `training_summary` (seconds, cells, labelled cells per class, accuracy on the
    labelled training cells). A class with fewer than `FEW_LABELS` labelled cells is named in a logged warning.

    Raises ValueError for restarts < 1, a seed that is not a whole number >= 0 or an unknown setting;
    DataError for data without two classes or with cells that have no counts over its genes (after a gene
    selection, say); TrainingDiverged when a restart's loss becomes NaN or infinite or explodes
    (`StopOnDivergence`: the message names the restart, the batch and the learning rate).
    """
    config = _config(config, {} if epochs is None else {"epochs": epochs})
    check_argument("restarts", restarts, 1, integer=True)
    check_argument("seed", seed, 0, integer=True)
    if not isinstance(data, (SCData, H5ADStream)):
        raise TypeError(
            f"train takes SCData (tfp_scmix.from_anndata) or an H5ADStream, received "
            f"{type(data).__name__}; read an AnnData with tfp_scmix.from_anndata(adata)"
        )
    if data.n_classes < 2:
        raise DataError(
            f"training needs labelled cells of at least two classes; the data has {data.n_classes}. "
            "Pass label_key= the obs column of cell types to from_anndata."
        )
    if strategy is not None and isinstance(data, SCData):
        raise ValueError(
            "strategy= trains from a stream (tfp_scmix.stream.H5ADStream) so that each worker reads "
            "its own chunks; pass the .h5ad as H5ADStream(path, ...)"
        )
    _warn_few_labels(data)
    _warn_short_training(config)
    members = []
    started = time.time()
    # Named for its first restart from the start (a bar drawn as "training" and renamed at once shows both in a log).
    bar = ProgressBar(int(restarts) * config.epochs, _restart_name(0, restarts)) if verbose == 1 else None
    keras_verbose = 0 if verbose == 1 else verbose
    try:
        for restart in range(int(restarts)):
            member_seed = seed + restart
            if bar is not None:  # the first restart's name is the bar's own: no second draw of it, no line
                if restart:
                    bar.bar.set_description(_restart_name(restart, restarts))
            elif verbose and restarts > 1:
                print(f"restart {restart + 1} of {restarts} (seed {member_seed})")
            fit_callbacks = [*callbacks, bar] if bar is not None else list(callbacks)
            finished = None if checkpoint_dir is None else Path(checkpoint_dir) / f"restart-{restart}.keras"
            try:
                if finished is not None and finished.exists():
                    model = _finished_restart(finished, data, config, member_seed)
                    if bar is not None:
                        bar.bar.update(config.epochs)
                elif isinstance(data, H5ADStream):
                    model = _fit_stream(data, config, member_seed, strategy, fit_callbacks, keras_verbose)
                else:
                    backup = None if checkpoint_dir is None else Path(checkpoint_dir) / f"restart-{restart}"
                    model = _fit(data, config, member_seed, backup, fit_callbacks, keras_verbose)
            except TrainingDiverged as err:
                raise TrainingDiverged(f"restart {restart + 1} of {restarts} (seed {member_seed}): {err}") from None
            if finished is not None:
                save_model(model, finished)  # a kill during a later restart does not train this one again
                # Its epoch backup goes only now: a kill after the last epoch and before this save (the refit, the
                # save itself) resumes after the last epoch instead of losing the restart (a trial's Ctrl-C there
                # left an empty folder).
                shutil.rmtree(finished.with_suffix(""), ignore_errors=True)  # restart-r beside restart-r.keras
            members.append(model)
    finally:
        if bar is not None:
            bar.close()
    # The finished restarts stay in checkpoint_dir until the caller has saved the model (the command line then deletes
    # the folder): a kill in the summary below, or before the model is written, loses no training (a trial's Ctrl-C
    # just after the last epoch lost both restarts).
    ensemble = SCMixEnsemble(members)
    # `explain.write_explanations` then does not name the same few-label classes a second time in this process; a
    # model loaded from its file has no such mark and is warned about there.
    ensemble.warned_few_labels = True
    _summarise(ensemble, data, time.time() - started, seed)
    if verbose:
        print(summary_line(ensemble.training_summary))
    return ensemble


def _warn_few_labels(data: SCData | H5ADStream) -> None:
    """Warn about the classes with fewer than `FEW_LABELS` labelled cells: the model may seldom call them and explains
    them by what those few cells share; one without any is hardly ever called."""
    counts = np.bincount(data.labels[data.labels >= 0], minlength=data.n_classes)
    few = {c: int(n) for c, n in zip(data.classes, counts) if 0 < n < FEW_LABELS}
    none = [c for c, n in zip(data.classes, counts) if n == 0]
    if few:
        many = len(few) > 1
        logger.warning(
            "%s: fewer than %d labelled cells; the model may seldom call %s, and explains %s by what those few "
            "cells share. Label a few more cells of %s, or merge %s with a related type",
            ", ".join(f"{name!r} ({n} cell{'' if n == 1 else 's'})" for name, n in few.items()),
            FEW_LABELS,
            "these classes" if many else "this class",
            "them" if many else "it",
            "each" if many else "it",
            "them" if many else "it",
        )
    if none:
        logger.warning(
            "%s: no labelled cell; the model will hardly ever call %s. Label some cells of %s, or drop %s from the "
            "label column's categories",
            ", ".join(repr(name) for name in none),
            "these classes" if len(none) > 1 else "this class",
            "each" if len(none) > 1 else "it",
            "them" if len(none) > 1 else "it",
        )


def _warn_short_training(config: Config) -> None:
    """Warn when the KL terms' warm-up (`Config.kl_warmup_epochs`) outlasts the training: the model then ends
    before its KL weight reaches 1, fitted to a tempered objective whose topics and cell-topic posteriors are less
    regularised than the ELBO's (`SCMix.elbo_terms`)."""
    if config.kl_warmup_epochs > config.epochs:
        logger.warning(
            "kl_warmup_epochs (%g) is longer than the training (%d epochs): the KL terms never reach their full "
            "weight, so the model is less regularised than the ELBO asks. Train for at least %g epochs (command "
            "line: --epochs), or set kl_warmup_epochs to at most the epochs (Config(kl_warmup_epochs=...); command "
            "line: --kl-warmup-epochs; a run configuration's [model] kl_warmup_epochs)",
            config.kl_warmup_epochs,
            config.epochs,
            config.kl_warmup_epochs,
        )


def _restart_name(restart: int, restarts: int) -> str:
    """The progress bar's description during `restart` (from 0) of `restarts`."""
    return f"restart {restart + 1}/{restarts}" if restarts > 1 else "training"


# Labelled training cells that fit the novelty detector and score the training accuracy: a sample, so that
# a fully labelled atlas costs one bounded prediction.
SUMMARY_CELLS = 20_000


def _summarise(ensemble: SCMixEnsemble, data: SCData | H5ADStream, seconds: float, seed: int) -> None:
    """Set `ensemble.training_summary` and `ensemble.novelty` from (a sample of) the labelled training cells."""
    labelled = np.flatnonzero(data.labels >= 0)
    if len(labelled) > SUMMARY_CELLS:
        labelled = np.sort(np.random.default_rng(seed).choice(labelled, SUMMARY_CELLS, replace=False))
    cells = data.subset(labelled) if isinstance(data, SCData) else data.to_data(labelled)
    counts = np.bincount(data.labels[data.labels >= 0], minlength=data.n_classes)
    summary: dict[str, Any] = {
        "seconds": float(seconds),
        "restarts": len(ensemble.members),
        "epochs": int(ensemble.config.epochs),
        "n_cells": int(data.n_cells),
        "n_genes": int(data.n_genes),
        "n_labelled": int(counts.sum()),
        "labelled_per_class": {c: int(n) for c, n in zip(data.classes, counts)},
        "training_accuracy": None,
    }
    added = [member.self_trained_cells for member in ensemble.members]
    if any(n is not None for n in added):  # Config.self_training ran (members loaded from a backup lack it)
        summary["self_trained_cells"] = added
    if cells.n_cells:
        out = ensemble.predict(cells.dataset(1024, shuffle=False), verbose=0)
        summary["training_accuracy"] = float((out["label"] == cells.labels).mean())
        if len(np.unique(cells.labels)) >= 2 and cells.n_cells > data.n_classes:
            ensemble.novelty = TopicNovelty.fit(out["cell_topic"], cells.labels, blocks=len(ensemble.members))
    if ensemble.novelty is None:
        logger.info("too few labelled cells to fit the novelty detector: annotate will flag no novel cells")
    ensemble.training_summary = summary


def summary_line(summary: dict[str, Any]) -> str:
    """One line saying what `train` did, from `SCMixEnsemble.training_summary`."""
    per_class = ", ".join(f"{c} {n}" for c, n in summary["labelled_per_class"].items())
    accuracy = summary["training_accuracy"]
    return (
        f"trained {summary['restarts']} model(s) x {summary['epochs']} epochs on {summary['n_cells']} cells x "
        f"{summary['n_genes']} genes in {summary['seconds']:.0f} s; {summary['n_labelled']} labelled cells "
        f"({per_class}); accuracy on them after the classifier's refit {'-' if accuracy is None else f'{accuracy:.3f}'}"
        + _self_training_words(summary.get("self_trained_cells"))
    )


def _self_training_words(added: list[int | None] | None) -> str:
    """The summary line's account of self-training: unlabelled cells each model's refit added."""
    if not added:
        return ""
    counts = ", ".join("-" if n is None else str(n) for n in added)
    return f"; self-training added confident unlabelled cells per model: {counts}"


def _finished_restart(path: Path, data, config: Config, seed: int) -> SCMix:
    """A restart that an interrupted `train` finished and saved, if it is this run's; else ModelFileError."""
    model = load_model(path)
    if (
        not isinstance(model, SCMix)
        or model.seed != seed
        or model.config != config
        or model.provenance.get("data_fingerprint") != data.fingerprint()
    ):
        raise ModelFileError(
            f"{path} holds a restart of another training run (other data, settings or seed); "
            "delete it, or pass this run's checkpoint_dir (command line: --checkpoint-dir)."
        )
    logger.info("restart with seed %d was finished by an earlier run: loaded from %s", seed, path)
    return model


def _compiled(data, config: Config, seed: int) -> SCMix:
    keras.utils.set_random_seed(seed)
    model = SCMix.from_data(data, config, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    return model


def _fit(data: SCData, config: Config, seed: int, backup: Path | None, callbacks, verbose: int) -> SCMix:
    model = _compiled(data, config, seed)
    recipe = default(data)
    checkpoint = None
    if backup is not None:
        checkpoint = ResumableCheckpoint(
            backup,
            delete_checkpoint=False,  # `train` deletes it once the finished restart is saved
            run={"data_fingerprint": data.fingerprint(), "seed": int(seed), "batch_size": int(config.batch_size)},
        )
    initial_epoch = 0 if checkpoint is None else checkpoint.resume_epoch
    # One order of minibatches with or without backups (`epoch_batches`: epoch e's order keyed by (seed, e), not by
    # TensorFlow's global seed), so that the command line, which backs up, and scm.train give the same model. The
    # guard first (later callbacks save the restored state), the backup before the refit so that a kill during the
    # refit resumes at the last epoch and refits again.
    model.fit(
        epoch_batches(data, config.batch_size, seed, config.epochs, initial_epoch),
        epochs=config.epochs,
        steps_per_epoch=math.ceil(data.n_cells / config.batch_size),
        verbose=verbose,
        callbacks=[recipe[0], *([checkpoint] if checkpoint else []), *recipe[1:], *callbacks],
        shuffle=False,  # the dataset shuffles; Keras warns when asked to shuffle a tf.data.Dataset
    )
    return model


def _fit_stream(stream: H5ADStream, config: Config, seed: int, strategy, callbacks, verbose: int) -> SCMix:
    strategy = (
        distribute.get_strategy(strategy or "default") if not isinstance(strategy, tf.distribute.Strategy) else strategy
    )
    resolver = getattr(strategy, "cluster_resolver", None)
    workers = max(1, len(resolver.cluster_spec().as_dict().get("worker", []))) if resolver is not None else 1
    if stream.n_cells < 2 * workers * stream.chunk_cells:  # at least two chunks per worker, so that none is idle
        stream = stream.rechunked(max(1, stream.n_cells // (2 * workers)))
    keras.utils.set_random_seed(seed)
    model = distribute.build(strategy, lambda: SCMix.from_data(stream, config, seed=seed), config.learning_rate)
    batches = distribute.stream_dataset(strategy, stream, config.batch_size, seed=seed)
    distribute.fit(
        model,
        strategy,
        batches,
        epochs=config.epochs,
        steps_per_epoch=distribute.steps_per_epoch(stream.n_cells, config.batch_size),
        callbacks=[StopOnDivergence(raise_error=True), *callbacks],
        verbose=verbose,
    )
    if strategy is not tf.distribute.get_strategy():
        # The trained weights in a plain model: fit_classifier and saving run ordinary TensorFlow code,
        # which cannot update distributed variables outside a replica context.
        trained, model = model, SCMix.from_data(stream, config, seed=seed)
        model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
        model.set_weights(trained.get_weights())
    if config.classifier_steps and stream.n_labelled:
        cells = self_training_cells(stream.labels, seed) if config.self_training else None
        model.fit_classifier(stream.to_data(cells), verbose=verbose)
    return model


def adapt(
    model: SCMix | SCMixEnsemble,
    query: SCData | Any,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    learning_rate: float = 5e-2,
    shrinkage: float | None = None,
    counts: str | None = None,
    min_gene_fraction: float = 0.5,
    seed: int = 0,
    verbose: int = 0,
) -> SCMixEnsemble:
    """A copy of `model` adapted to the `query` dataset: each member gets the query's own batch offsets.

    Every global parameter (topics, encoder, classifier, the offsets' shrinkage scale and the reference
    batches' offsets) stays frozen; only a new offset row for the query is fitted on its unlabelled counts
    by the same ELBO (count terms). `model` itself is not changed. The adapted model uses that row for
    every cell it predicts (`SCMix.adapted_batch`), and saves, explains, exports and predicts like any other.
    query: the query's cells, as `predict` takes them: an AnnData (in memory or backed), the path of a file
    `tfp_scmix.read` reads, or an `SCData`. Its genes are aligned to the model's by name (`align_genes`: at least
    `min_gene_fraction` of them present, the rest zero counts); `counts` names the slot of raw counts of an AnnData
    or file ("X", "raw" or a layer; None: detected, as `from_anndata` does). Labels are not read. Cells with no
    counts over the model's genes say nothing about the offsets and are left out.
    shrinkage: the offsets' prior scale. By default the learned one; a model trained on a single batch
    has learned nothing about differences between datasets (its scale shrinks to near zero), so there
    the default is a weakly informative 1.0 (a factor of e per standard deviation).
    seed: the order of the query's minibatches (`epoch_batches`), so that the same call gives the same model
    whatever ran before it in the process (before, TensorFlow's global seed entered the order).
    The adapted members record the query in their provenance (`provenance["adapted_to"]`: one entry per
    adaptation, with the query's fingerprint and cells).
    Raises DataError when the query has too few of the model's genes, no raw counts or no cell with counts over
    them; TypeError for a query of another type; ValueError for epochs, batch_size, learning_rate, shrinkage or
    min_gene_fraction out of range.
    """
    check_argument("epochs", epochs, 1, integer=True)
    check_argument("batch_size", batch_size, 1, integer=True)
    check_argument("learning_rate", learning_rate, 1e-12)
    check_argument("min_gene_fraction", min_gene_fraction, 0, 1)
    check_argument("seed", seed, 0, integer=True)
    if shrinkage is not None:
        check_argument("shrinkage", shrinkage, 1e-12)
    query = _query_cells(model, query, counts, min_gene_fraction)
    return SCMixEnsemble(
        [
            _adapt_member(m, query, epochs, batch_size, learning_rate, shrinkage, int(seed), verbose)
            for m in as_ensemble(model).members
        ],
        novelty=as_ensemble(model).novelty,
    )


def _query_cells(model: SCMix | SCMixEnsemble, query: Any, counts: str | None, min_gene_fraction: float) -> SCData:
    """The cells `adapt` fits the offsets on: `query` (an AnnData, a path or an SCData) over the model's genes,
    without its labels, the cells with no counts over those genes left out."""
    if isinstance(query, SCData):
        if counts is not None:
            raise ValueError("counts= names the raw-count slot of an AnnData or a file; an SCData holds its counts")
        if list(query.genes) != list(model.genes):
            query = query.select_genes(model.genes, min_gene_fraction)
    elif isinstance(query, (str, os.PathLike)) or hasattr(query, "obs_names"):  # a path, an AnnData (or backed)
        query = from_anndata(
            query,
            counts=counts,
            label_key=None,
            genes=model.genes,
            min_gene_fraction=min_gene_fraction,
            allow_empty_cells=True,
            copy=False,
        )
    else:
        raise TypeError(
            f"adapt takes the query as an AnnData, the path of a file that tfp_scmix.read reads, or an SCData; "
            f"received {type(query).__name__}"
        )
    query = dataclasses.replace(query, labels=np.full(query.n_cells, -1, query.labels.dtype))
    empty = query.library_size == 0
    if empty.all():
        raise DataError(
            f"none of the query's {query.n_cells} cells has counts over the model's genes: nothing to adapt to"
        )
    if empty.any():
        logger.info(
            "adapt: %d of %d cells have no counts over the model's genes and are left out", empty.sum(), empty.size
        )
        query = query.subset(~empty)
    return query


def _adapt_member(member: SCMix, query: SCData, epochs, batch_size, learning_rate, shrinkage, seed, verbose) -> SCMix:
    row = member.sizes["n_batches"]
    config = {**member.get_config(), "n_batches": row + 1, "adapted_batch": row}
    adaptation = {"data_fingerprint": query.fingerprint(), "n_cells": int(query.n_cells)}
    provenance = dict(config.get("provenance") or {})
    config["provenance"] = {**provenance, "adapted_to": [*provenance.get("adapted_to", []), adaptation]}
    adapted = SCMix.from_config(config)
    reference = {w.path: w for w in member.weights}
    for weight in adapted.weights:
        value = reference[weight.path].numpy()
        if weight.shape != value.shape:  # the offsets: reference rows, then a zero row for the query
            value = np.concatenate([value, weight.numpy()[-1:]], axis=0)
        weight.assign(value)
    query = dataclasses.replace(query, batches=np.full(query.n_cells, row, np.int32))
    offsets = adapted.batch_offsets
    if shrinkage is None and row == 1:
        shrinkage = 1.0
    if shrinkage is not None:
        offsets.shrinkage_raw.assign(float(tfp.math.softplus_inverse(float(shrinkage))))
    variables = [offsets.loc, offsets.scale_raw]
    only_query = tf.one_hot(row, row + 1)[:, None]
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(variables)  # its slots made inside the first step would trace the step twice
    total_counts = float(query.library_size.sum())

    @tf.function
    def step(batch):
        with tf.GradientTape() as tape:
            terms = adapted.elbo_terms(batch, training=False)
            loss = terms["reconstruction"] + terms["kl_cell"] + offsets.kl() / total_counts
        optimizer.apply([g * only_query for g in tape.gradient(loss, variables)], variables)
        return loss

    progress = keras.utils.Progbar(epochs, verbose=verbose, unit_name="epoch")
    steps = math.ceil(query.n_cells / batch_size)
    for index, batch in enumerate(epoch_batches(query, batch_size, seed, epochs)):
        loss = step(batch)
        if (index + 1) % steps == 0:
            progress.update((index + 1) // steps, [("loss", float(loss))])
    return adapted
