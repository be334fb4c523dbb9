"""Reliability: training that survives a kill or a divergence, reproducible runs, safe loading, big predictions.

- `fit_resumable` trains with `ResumableCheckpoint` (keras.callbacks.BackupAndRestore, made exact) and
  `StopOnDivergence`, on `epoch_batches` whose minibatches depend only on (seed, epoch): a run killed
  midway and started again ends with the same weights as an uninterrupted one.
- `make_deterministic` seeds everything and turns on TensorFlow's op determinism.
- `load_model` loads a saved model in Keras's safe mode, with errors that name the file's versions.
- `predict_in_batches` predicts any number of cells (an AnnData, backed or not, an .h5ad path, a CSR) a
  chunk at a time, so memory is bounded by the chunk and the outputs.
- `library_versions` / `provenance` say what a model was made with and from.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import platform
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import scipy.sparse as sp
import tensorflow as tf

from tfp_scmix import __version__
from tfp_scmix.data import UNLABELLED, DataError, SCData, check_counts, from_anndata
from tfp_scmix.io import atomic_path

logger = logging.getLogger("tfp_scmix")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message says where and what to change."""


class ModelFileError(ValueError):
    """A model file that cannot be loaded safely; the message says why and how to fix it."""


# --------------------------------------------------------------------------------------------
# Provenance and determinism
# --------------------------------------------------------------------------------------------


def library_versions() -> dict:
    """Versions of the package and of the libraries its numbers depend on."""
    import tensorflow_probability as tfp

    return {"tfp_scmix": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "tensorflow_probability": tfp.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def provenance(data: SCData) -> dict:
    """What a model records about how it was made: `library_versions()` and the data it was trained on."""
    return {**library_versions(), "data_fingerprint": data.fingerprint(), "n_cells": int(data.n_cells)}


def make_deterministic(seed: int = 0) -> None:
    """Seed Python, NumPy, TensorFlow and Keras and turn on TensorFlow's op determinism (process-wide).

    With it, the same data, settings and seed give bit-identical weights and predictions on CPU.
    Op determinism cannot be turned off again through TensorFlow's public API; call it in the process
    (script, subprocess) that trains.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


# --------------------------------------------------------------------------------------------
# Training that survives interruptions and divergence
# --------------------------------------------------------------------------------------------


def epoch_batches(data: SCData, batch_size: int, seed: int, epochs: int, initial_epoch: int = 0):
    """tf.data of the minibatches of epochs `initial_epoch` .. `epochs - 1`, one epoch after another.

    Epoch e visits the cells in the order of TensorFlow's stateless shuffle keyed by (seed, e), whatever
    ran before it, so a run resumed at epoch e sees the batches an uninterrupted run would.
    (`SCData.dataset(shuffle=True)` reshuffles from a counter that restarts with the process.) Each epoch
    has `ceil(n_cells / batch_size)` batches: pass that as `steps_per_epoch` to `fit`. Elements are those
    of `SCData.dataset`: {"counts": SparseTensor [B, n_genes], "label" [B], "batch" [B]}.
    """
    def epoch_order(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(data.n_cells, dtype=tf.int64),
                                                         seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    return data.minibatches(tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_order))


def _optimizers(model) -> list:
    """The model's optimizers: `model.optimizer` and any other optimizer it holds (SCMix's classifier's)."""
    found = [model.optimizer] if model.optimizer is not None else []
    for value in vars(model).values():
        if isinstance(value, keras.optimizers.Optimizer) and all(value is not o for o in found):
            found.append(value)
    return found


def _training_state(model) -> list:
    """Every variable that decides how training goes on: weights, random-generator states, optimizer slots."""
    return list(model.variables) + [v for o in _optimizers(model) for v in o.variables]


def _random_states(model) -> list:
    """Random-generator states (keras SeedGenerator) of the model, which `save_weights` leaves out."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _build_optimizers(model) -> None:
    """Create the optimizers' slots so that a checkpoint's optimizer state loads instead of being skipped."""
    if model.optimizer is None or model.optimizer.built:
        return
    if hasattr(model, "build_optimizers"):  # SCMix: two optimizers, each over its own variables
        model.build_optimizers()
    else:
        model.optimizer.build(model.trainable_variables)


class StopOnDivergence(keras.callbacks.Callback):
    """Stop `fit` when the loss becomes NaN or infinite, and put back the last good training state.

    The state (weights, random-generator states and optimizer slots) is copied before each batch; a batch
    whose loss comes out finite makes that copy the last good state. On a non-finite loss the model gets
    the last good state back (the initial one if no batch was finite), training stops, `message` says
    where it happened and what to change, and with `raise_error` a `TrainingDiverged` is raised.
    Put it first in the callback list, so that later callbacks save the restored weights.
    """

    def __init__(self, monitor: str = "loss", raise_error: bool = False):
        super().__init__()
        self.monitor, self.raise_error = monitor, raise_error
        self.message = None
        self._epoch, self._pending, self._good, self._state = 0, None, None, []

    def on_train_begin(self, logs=None):
        self.message, self._good = None, None
        self._state = _training_state(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._pending = [v.numpy() for v in self._state]

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get(self.monitor)
        if loss is None or np.isfinite(loss):
            self._good = self._pending
            return
        self._stop(f"the {self.monitor} became {loss} at epoch {self._epoch + 1}, batch {batch + 1}")

    def on_train_end(self, logs=None):
        # The last batch's finite loss does not vouch for the weights its update wrote; no batch follows.
        if self.message is None and self._good is not None and not all(
                np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in self._state):
            self._stop("the last batch wrote non-finite weights")

    def _stop(self, what):
        restored = self._good if self._good is not None else self._pending
        for variable, value in zip(self._state, restored):
            variable.assign(value)
        rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        where = "the last batch with a finite loss" if self._good is not None else "before the first batch"
        self.message = (f"training diverged: {what}. The model keeps its state from {where}. Lower the "
                        f"learning rate (it is {rate:g}), or check the counts for extreme values.")
        logger.error(self.message)
        self.model.stop_training = True
        if self.raise_error:
            raise TrainingDiverged(self.message)


class ResumableCheckpoint(keras.callbacks.BackupAndRestore):
    """Resume an interrupted `fit` from its last finished epoch: keras's BackupAndRestore, made exact.

    What it adds, and why:
    - a backup is committed by the atomic rename of its state file, which names its weights file: a kill
      at any moment leaves the previous backup or the new one, never the weights of one epoch with the
      epoch count of another;
    - the optimizers (SCMix has two) are built over their own variables before loading, so their state
      is restored; BackupAndRestore builds one optimizer over every variable and Keras then skips the
      saved state with a warning (that is turned into an error here);
    - the random-generator states (the model's sampling draws, dropout), which `save_weights` leaves out,
      are saved and restored;
    - the backup records which run it belongs to (the model's config and `run`, e.g. the data fingerprint
      and seed); resuming another run's backup is refused.
    A resumed run equals an uninterrupted one only if each epoch's minibatches depend on the epoch
    alone: train on `epoch_batches`, as `fit_resumable` does.
    """

    STATE = "state.json"

    def __init__(self, backup_dir, run: dict | None = None, delete_checkpoint: bool = True):
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=delete_checkpoint)
        self.run = dict(run or {})
        self.root = Path(backup_dir)

    def saved_state(self) -> dict | None:
        """The committed backup's state ({"epoch", "weights", "run", "random_states"}), or None."""
        path = self.root / self.STATE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ModelFileError(f"the backup state {path} is unreadable ({err}); delete {self.root} to "
                                 "train from the start.") from err

    @property
    def resume_epoch(self) -> int:
        """The epoch a `fit` with this callback starts at: that of the last backup, 0 if none."""
        state = self.saved_state()
        return int(state["epoch"]) if state else 0

    def _run_key(self) -> dict:
        config = {k: v for k, v in self.model.get_config().items() if k != "name"}
        return {"model": json.dumps(config, sort_keys=True, default=str), **self.run}

    def _save_model(self):
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{self._current_epoch}.weights.h5"
        staging = self.root / ".staging.weights.h5"  # save_weights wants the .weights.h5 suffix
        self.model.save_weights(str(staging), overwrite=True)
        os.replace(staging, self.root / name)
        state = {"epoch": self._current_epoch, "weights": name, "run": self._run_key(),
                 "random_states": [keras.ops.convert_to_numpy(v).tolist() for v in _random_states(self.model)]}
        with atomic_path(self.root / self.STATE) as tmp:
            Path(tmp).write_text(json.dumps(state))
        for old in self.root.glob("epoch-*.weights.h5"):
            if old.name != name:
                old.unlink()

    def _load_model(self):
        state = self.saved_state()
        if state is None:
            return
        key = self._run_key()
        if state["run"] != key:
            differ = sorted(k for k in set(key) | set(state["run"]) if key.get(k) != state["run"].get(k))
            raise ModelFileError(f"{self.root} holds the backup of another training run (it differs in "
                                 f"{differ}); delete it to train from the start, or pass this run's backup_dir.")
        _build_optimizers(self.model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.model.load_weights(str(self.root / state["weights"]))
        skipped = [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]
        if skipped:
            raise ModelFileError(f"the backup in {self.root} does not fit this model: {skipped[0]}")
        randoms = _random_states(self.model)
        if len(randoms) != len(state["random_states"]):
            raise ModelFileError(f"the backup in {self.root} has {len(state['random_states'])} random-generator "
                                 f"states, the model {len(randoms)}; delete it to train from the start.")
        for variable, value in zip(randoms, state["random_states"]):
            variable.assign(np.asarray(value, dtype=variable.dtype))
        self.model._initial_epoch = int(state["epoch"])  # how BackupAndRestore tells fit where to start
        logger.info("resuming training at epoch %d from %s", state["epoch"] + 1, self.root)


def fit_resumable(model, data: SCData, epochs: int, batch_size: int = 256, seed: int = 0, backup_dir=None,
                  callbacks=(), verbose=1, delete_checkpoint: bool = True, **fit_kwargs):
    """`model.fit` on `data` that a kill or a divergence cannot spoil; returns the History.

    Minibatches come from `epoch_batches(data, batch_size, seed, ...)`; `StopOnDivergence` runs first;
    with `backup_dir`, a `ResumableCheckpoint` there saves every epoch, and a second call after a kill
    goes on from the last finished epoch to the same result as an uninterrupted run (with
    `make_deterministic`). `delete_checkpoint=False` keeps the backup after `fit` (remove it once the
    model is saved, so that a kill after `fit` does not train again). The model must be compiled.
    """
    guard = StopOnDivergence()
    extra, initial_epoch = [guard], 0
    if backup_dir is not None:
        backup = ResumableCheckpoint(backup_dir, run={"data_fingerprint": data.fingerprint(), "seed": int(seed),
                                                      "batch_size": int(batch_size)},
                                     delete_checkpoint=delete_checkpoint)
        extra.append(backup)
        initial_epoch = backup.resume_epoch
    steps = math.ceil(data.n_cells / batch_size)
    history = model.fit(epoch_batches(data, batch_size, seed, epochs, initial_epoch), epochs=epochs,
                        steps_per_epoch=steps, callbacks=extra + list(callbacks), verbose=verbose, **fit_kwargs)
    history.divergence = guard.message
    return history


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_archive(path: Path):
    """(config, metadata) of a .keras archive, or ModelFileError for a file that is not one."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(8)
        kind = ("an HDF5 file (the legacy .h5 format of Keras 2?)" if head.startswith(b"\x89HDF")
                else "not a .keras archive")
        raise ModelFileError(f"{path} is {kind}: it may be truncated or corrupt, or not a tfp_scmix model. "
                             "Save models with model.save('name.keras') and copy the whole file.")
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            metadata = json.loads(archive.read("metadata.json"))
            if archive.testzip() is not None:
                raise zipfile.BadZipFile("a member fails its CRC check")
    except (KeyError, ValueError, zipfile.BadZipFile, OSError) as err:
        raise ModelFileError(f"{path} is a damaged .keras archive ({type(err).__name__}: {err}); it may be "
                             "truncated or corrupt: copy it again or re-train.") from err
    return config, metadata


def load_model(path, compile: bool = True):
    """Load a saved SCMix (or SCMixEnsemble) with Keras's safe mode (no code from the file runs; no pickle in the format).

    Raises `ModelFileError` for a missing, truncated or corrupt file, another kind of model, a file that
    asks to run code, or one from another version that this version cannot read (the message names the
    versions that wrote it and these). A file from another version that loads is loaded with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {path}; train one with `tfp-scmix train ... --out {path}`.")
    config, metadata = _read_archive(path)
    if config.get("registered_name") not in ("tfp_scmix>SCMix", "tfp_scmix>SCMixEnsemble"):
        raise ModelFileError(f"{path} holds a {config.get('registered_name') or config.get('class_name')!r} "
                             "model, not a tfp_scmix SCMix model.")
    recorded = dict(config.get("config", {}).get("provenance") or {})
    recorded["keras"] = metadata.get("keras_version", recorded.get("keras"))  # the Keras that wrote the file
    current = library_versions()
    written = f"tfp_scmix {recorded.get('tfp_scmix', '(version not recorded)')} with Keras {recorded['keras']}"
    running = f"tfp_scmix {current['tfp_scmix']} with Keras {current['keras']}"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as err:  # Keras raises many types; the message carries the cause
        text = str(err)
        if "safe_mode" in text or "unsafe" in text.lower():
            raise ModelFileError(f"{path} asks to run Python code stored in the file (e.g. a lambda); "
                                 "refusing it: loading is in safe mode. Load only models you trained, or "
                                 "re-save the model without custom code.") from err
        raise ModelFileError(f"could not load {path}: it was written by {written}; this is {running}. "
                             f"({type(err).__name__}: {text.splitlines()[0][:300]}) Install the version "
                             "that wrote it, or re-train the model with this one.") from err
    skipped = [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]
    if skipped:
        raise ModelFileError(f"{path} does not match this version's model (written by {written}; this is "
                             f"{running}): {skipped[0]} Re-train the model, or install the version that wrote it.")
    differ = [k for k in ("tfp_scmix", "keras", "tensorflow", "tensorflow_probability")
              if k in recorded and recorded[k] != current[k]]
    if differ:
        logger.warning("%s was written by %s; loading it with %s (%s differ): predictions may differ slightly.",
                       path, ", ".join(f"{k} {recorded[k]}" for k in differ),
                       ", ".join(f"{k} {current[k]}" for k in differ), ", ".join(differ))
    return model


# --------------------------------------------------------------------------------------------
# Predicting many cells
# --------------------------------------------------------------------------------------------


def _open(source, model, min_gene_fraction):
    """The number of cells of `source` and the source ready to slice (a path opened backed, an
    `SCData` aligned to the model's genes, a matrix checked against the model's width)."""
    if isinstance(source, (str, os.PathLike)):
        import anndata

        from tfp_scmix.data import data_path

        path = data_path(str(source))
        try:
            source = anndata.read_h5ad(path, backed="r")
        except Exception as err:  # h5py/anndata raise many types for damaged files
            raise DataError(f"could not read {path} as an .h5ad file ({type(err).__name__}: {err}). The file "
                            "may be truncated or corrupt: copy or download it again.") from err
    if isinstance(source, SCData):
        if list(source.genes) != list(model.genes):
            source = source.select_genes(model.genes, min_gene_fraction)
        n_cells = source.n_cells
    elif hasattr(source, "obs_names"):  # AnnData, in memory or backed
        n_cells = source.n_obs
    else:
        source = source if sp.issparse(source) else np.asarray(source)
        if source.ndim != 2 or source.shape[1] != model.n_genes:
            raise DataError(f"the count matrix has shape {source.shape}; the model reads {model.n_genes} genes "
                            "in its own order (model.genes). Pass an AnnData to align genes by name.")
        n_cells = source.shape[0]
    if n_cells == 0:
        raise DataError("the dataset is empty (0 cells).")
    return n_cells, source


def _chunk(source, model, start, stop, counts, min_gene_fraction) -> SCData:
    """Cells `start:stop` of an opened source as validated `SCData` in the model's gene order."""
    if isinstance(source, SCData):
        return source.subset(np.arange(start, stop))
    if hasattr(source, "obs_names"):
        chunk = source[start:stop]
        chunk = chunk.to_memory() if source.isbacked else chunk
        return from_anndata(chunk, counts=counts, label_key=None, genes=model.genes,
                            min_gene_fraction=min_gene_fraction, allow_empty_cells=True)
    csr = sp.csr_matrix(source[start:stop], dtype=np.float32)
    check_counts(csr, f"rows {start}-{stop} of the count matrix")
    n = csr.shape[0]
    return SCData(csr, np.asarray(model.genes, dtype=str), np.full(n, UNLABELLED, np.int32),
                  list(model.class_names), np.zeros(n, np.int32), ["0"], np.arange(start, stop).astype(str))


class _OncePerMessage(logging.Filter):
    """Let each distinct log message through once (the same gene-coverage warning for every chunk)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        key = record.getMessage()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def predict_in_batches(model, source, counts: str | None = None, chunk_size: int = 10_000,
                       batch_size: int = 1024, min_gene_fraction: float = 0.5, keys=None) -> dict:
    """Model outputs for any number of cells, read and predicted `chunk_size` cells at a time.

    source: an AnnData (genes aligned by name; a backed one is read chunk by chunk from disk), an .h5ad
    path (opened backed), an `SCData`, or a scipy sparse / numpy matrix `[n_cells, n_genes]` in the
    model's gene order. Each chunk is validated like `from_anndata` input. Memory is bounded by one chunk
    plus the outputs: {"probs" [n_cells, n_classes], "label" [n_cells], "confidence" [n_cells],
    "topics" [n_cells, n_topics]} (`keys` keeps only some of them). Cells without counts over the model's
    genes are predicted from no evidence: `annotate` marks them unassigned.
    """
    from tfp_scmix.annotate import predict_data

    n_cells, source = _open(source, model, min_gene_fraction)
    keys = tuple(keys or ("probs", "label", "confidence", "topics"))
    outputs = {}
    once = _OncePerMessage()
    logger.addFilter(once)
    try:
        for start in range(0, n_cells, chunk_size):
            stop = min(start + chunk_size, n_cells)
            out = predict_data(model, _chunk(source, model, start, stop, counts, min_gene_fraction), batch_size)
            for key in keys:
                if key not in outputs:  # filled in place: no second copy of the outputs
                    outputs[key] = np.empty((n_cells,) + out[key].shape[1:], out[key].dtype)
                outputs[key][start:stop] = out[key]
            # A chunk's tf.data pipeline and Keras's predict loop leave reference cycles that hold its
            # tensors; left to the collector's schedule they kept memory creeping 1.3 MB per chunk.
            del out
            gc.collect(1)
    finally:
        logger.removeFilter(once)
    return outputs
