"""Callbacks stage: what a `fit` of an `SCMix` needs beyond Keras's loop.

- `RefitClassifier`: after the last epoch, the classification branch fitted to convergence
  (`SCMix.fit_classifier`); part of the package's recipe.
- `StopOnDivergence`: a NaN, infinite or exploding loss stops training and puts back the last good state.
- `ResumableCheckpoint`: keras's BackupAndRestore made exact, so a killed run resumes to the same result.
- `ProgressBar`: one tqdm bar over every restart's epochs, with the loss and the labelled cells' accuracy.
- `default(data)`: the callbacks that make `model.fit(..., callbacks=default(data))` train what
  `tfp_scmix.train(data, restarts=1)` trains.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import keras
import numpy as np

from tfp_scmix.data import SCData
from tfp_scmix.io import ModelFileError, atomic_path

logger = logging.getLogger("tfp_scmix")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message says where and what to change."""


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
    """Stop `fit` when the loss becomes NaN or infinite or explodes, and put back the last good training state.

    A batch's loss explodes when it exceeds `max_ratio` times the loss of the first batch (in absolute
    value): at learning rate 10 the loss of the embedded dataset went from 5.5 to about 6e6 in one batch
    (issue 18), where a healthy run's loss only falls. Keras logs the epoch's running mean; each batch's own
    loss is recovered from two successive means.
    The state (weights, random-generator states and optimizer slots) is copied before each batch; a batch
    whose loss comes out finite and not exploded makes that copy the last good state. Otherwise the model
    gets the last good state back (the initial one if no batch was good), training stops, `message` says
    where it happened and what to change, and with `raise_error` a `TrainingDiverged` is raised (the
    package's recipe, `default`, raises). Put it first in the callback list, so that later callbacks save
    the restored weights.
    """

    def __init__(self, monitor: str = "loss", raise_error: bool = False, max_ratio: float = 100.0):
        super().__init__()
        if not max_ratio > 1:
            raise ValueError(f"max_ratio must be above 1, received {max_ratio!r}")
        self.monitor, self.raise_error, self.max_ratio = monitor, raise_error, float(max_ratio)
        self.message: str | None = None
        self._epoch = 0
        self._pending: list[np.ndarray] = []  # the state before the current batch
        self._good: list[np.ndarray] | None = None  # the state before the last good batch
        self._state: list = []
        self._first: float | None = None  # the loss of the first batch
        self._mean = 0.0  # the epoch's running mean after the previous batch

    def on_train_begin(self, logs=None):
        self.message, self._good, self._first = None, None, None
        self._state = _training_state(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._mean = epoch, 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._pending = [v.numpy() for v in self._state]

    def on_train_batch_end(self, batch, logs=None):
        mean = (logs or {}).get(self.monitor)
        if mean is None:
            self._good = self._pending
            return
        mean = float(mean)
        loss = (batch + 1) * mean - batch * self._mean  # this batch's own loss, from the running means
        self._mean = mean
        where = f"at epoch {self._epoch + 1}, batch {batch + 1}"
        if not np.isfinite(mean):
            self._stop(f"the {self.monitor} became {mean} {where}")
        elif self._first is not None and abs(loss) > self.max_ratio * abs(self._first):
            self._stop(
                f"the {self.monitor} exploded {where}: {loss:.4g}, more than {self.max_ratio:g} times that of "
                f"the first batch ({self._first:.4g})"
            )
        else:
            self._first = loss if self._first is None else self._first
            self._good = self._pending

    def on_train_end(self, logs=None):
        # The last batch's finite loss does not vouch for the weights its update wrote; no batch follows.
        if (
            self.message is None
            and self._good is not None
            and not all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in self._state)
        ):
            self._stop("the last batch wrote non-finite weights")

    def _stop(self, what):
        restored = self._good if self._good is not None else self._pending
        for variable, value in zip(self._state, restored, strict=True):
            variable.assign(value)
        rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        where = "the last batch with a good loss" if self._good is not None else "before the first batch"
        self.message = (
            f"training diverged: {what}. The model keeps its state from {where}. Lower the "
            f"learning rate (it is {rate:g}), or check the counts for extreme values."
        )
        logger.error(self.message)
        self.model.stop_training = True
        if self.raise_error:
            raise TrainingDiverged(self.message)


def _differences(saved: dict, now: dict, keys: list[str]) -> str:
    """What differs between a backup's run and this one, for a message: the model's settings by name with their two
    values ("model's config.epochs: 100 in the backup, 5 now"), the other parts of the run by name."""
    parts = []
    for key in keys:
        if key != "model":
            parts.append(repr(key))
            continue
        try:
            before, after = json.loads(saved.get("model") or "{}"), json.loads(now.get("model") or "{}")
        except (TypeError, ValueError):
            parts.append("'model'")
            continue
        flat_before, flat_after = _flat(before), _flat(after)
        changed = [k for k in sorted(set(flat_before) | set(flat_after)) if flat_before.get(k) != flat_after.get(k)]
        parts.extend(
            f"model's {k}: {flat_before.get(k)!r} in the backup, {flat_after.get(k)!r} now" for k in changed[:5]
        )
        if len(changed) > 5:
            parts.append(f"{len(changed) - 5} more of the model's settings")
    return "; ".join(parts)


def _flat(config, prefix: str = "") -> dict:
    """A nested configuration as {"config.epochs": 100, ...}: the settings a backup records, by their paths."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict = {}
    for key, value in config.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


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
    alone: train on `epoch_batches`, as `tfp_scmix.train(..., checkpoint_dir=...)` does.
    """

    STATE = "state.json"

    def __init__(self, backup_dir: str | Path, run: dict | None = None, delete_checkpoint: bool = True):
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
            raise ModelFileError(
                f"the backup state {path} is unreadable ({err}); delete {self.root} to train from the start."
            ) from err

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
        state = {
            "epoch": self._current_epoch,
            "weights": name,
            "run": self._run_key(),
            "random_states": [keras.ops.convert_to_numpy(v).tolist() for v in _random_states(self.model)],
        }
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
            raise ModelFileError(
                f"{self.root} holds the backup of another training run (it differs in "
                f"{_differences(state['run'], key, differ)}); delete it to train from the start, or pass this run's "
                "backup_dir (command line: --checkpoint-dir)."
            )
        _build_optimizers(self.model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.model.load_weights(str(self.root / state["weights"]))
        skipped = [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]
        if skipped:
            raise ModelFileError(f"the backup in {self.root} does not fit this model: {skipped[0]}")
        randoms = _random_states(self.model)
        if len(randoms) != len(state["random_states"]):
            raise ModelFileError(
                f"the backup in {self.root} has {len(state['random_states'])} random-generator "
                f"states, the model {len(randoms)}; delete it to train from the start."
            )
        for variable, value in zip(randoms, state["random_states"], strict=True):
            variable.assign(np.asarray(value, dtype=variable.dtype))
        self.model._initial_epoch = int(state["epoch"])  # how BackupAndRestore tells fit where to start
        epochs = getattr(getattr(self.model, "config", None), "epochs", None)
        if epochs is not None and state["epoch"] >= epochs:  # killed after the last epoch: the refit is left
            logger.info("all %d epochs were finished before (backup in %s): going on after them", epochs, self.root)
        else:
            logger.info("resuming training at epoch %d from %s", state["epoch"] + 1, self.root)


class RefitClassifier(keras.callbacks.Callback):
    """Fits an SCMix's classification branch to convergence (`SCMix.fit_classifier`) after the last epoch.

    It runs at the end of the last scheduled epoch, before the callbacks after it score that epoch (list it
    before loggers and checkpoints), so the last epoch's validation scores, checkpoints and keras-tuner see
    the final model; when training stops early (not by divergence) it runs when training ends.
    data: the training cells (their labelled ones are used); steps: full-batch steps (default: the model's
    `config.classifier_steps`). Adds "classifier_loss" to the logs.
    """

    def __init__(self, data: SCData, steps: int | None = None):
        super().__init__()
        self.data, self.steps, self.done = data, steps, False

    def on_train_begin(self, logs=None):
        self.done = False

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.params["epochs"]:
            self._refit(logs)

    def on_train_end(self, logs=None):
        # After a divergence too: StopOnDivergence has put back the last good state, which is refitted.
        if not self.done:
            self._refit(logs)

    def _refit(self, logs):
        steps = self.model.config.classifier_steps if self.steps is None else self.steps
        self.done = True
        if not steps or self.data.n_labelled == 0:
            return
        loss = self.model.fit_classifier(self.data, steps=steps)
        if logs is not None:
            logs["classifier_loss"] = loss


# Seconds between progress-bar updates when stderr is not a terminal (a log file, a pipe, a batch job).
LOG_INTERVAL_SECONDS = 60.0


class ProgressBar(keras.callbacks.Callback):
    """One tqdm progress bar over `total` epochs, shared by the fits it is passed to (a run's restarts).

    Shows the elapsed time, the ETA, and the last epoch's loss and `label_accuracy` (the labelled cells of
    the minibatches, a running mean over the epoch); updated at most once a minute when stderr is not a
    terminal. `close()` ends the bar. Used by `tfp_scmix.train` at
    verbose=1 in place of Keras's per-epoch lines.
    """

    def __init__(self, total: int, desc: str = "training"):
        super().__init__()
        import sys

        from tqdm.auto import tqdm

        # Redrawn in place on a terminal; into a log file or pipe, each redraw is a new record: one a minute.
        self._terminal = sys.stderr.isatty()
        interval = 0.1 if self._terminal else LOG_INTERVAL_SECONDS
        self.bar = tqdm(total=total, desc=desc, unit="epoch", dynamic_ncols=True, mininterval=interval)

    def on_train_begin(self, logs=None):
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._first:  # a resumed fit starts past its first epochs: count those as done
            self._first = False
            self.bar.update(epoch)

    def on_train_end(self, logs=None):
        if self._first:  # a resumed fit whose epochs had all finished before: they are done, not left to do
            self.bar.update((self.params or {}).get("epochs", 0))

    def on_epoch_end(self, epoch, logs=None):
        shown = {"loss": "loss", "label_accuracy": "acc"}
        postfix = {short: f"{logs[key]:.3f}" for key, short in shown.items() if key in (logs or {})}
        self.bar.set_postfix(postfix, refresh=False)  # drawn by update, at its interval
        if not self._terminal and self.bar.total is not None and self.bar.n + 1 >= self.bar.total:
            self.bar.n += 1  # the last epoch: into a log, drawn once by `close` rather than twice
        else:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def default(data: SCData, classifier_steps: int | None = None) -> list[keras.callbacks.Callback]:
    """The package recipe's callbacks for `model.fit` on `data`: [StopOnDivergence, RefitClassifier].

    The guard raises `TrainingDiverged` (a diverged model is not a trained one: no classifier is refitted
    on it and nothing is returned).

    `model.fit(data.dataset(config.batch_size, seed=seed), epochs=config.epochs, callbacks=default(data))`
    on `SCMix.from_data(data, config, seed=seed)` compiled with Adam(config.learning_rate), after
    `keras.utils.set_random_seed(seed)`, trains what `tfp_scmix.train(data, config, restarts=1, seed=seed)`
    trains (tests/test_train.py checks the predictions are equal). Add your own callbacks after these.
    """
    return [StopOnDivergence(raise_error=True), RefitClassifier(data, classifier_steps)]
