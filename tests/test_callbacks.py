"""Callbacks of the training recipe: divergence guard, exact backups, the classifier refit."""

import math
import re

import keras
import numpy as np
import pytest

import tfp_scmix as scm
from tests.helpers import few_labels
from tfp_scmix.callbacks import RefitClassifier, ResumableCheckpoint, StopOnDivergence, TrainingDiverged, default
from tfp_scmix.config import Config
from tfp_scmix.data import epoch_batches
from tfp_scmix.io import ModelFileError
from tfp_scmix.model import SCMix

CONFIG = Config(n_topics=8, batch_size=128, classifier_steps=0)


def fit(data, epochs=2, seed=0, optimizer=None, backup=None, callbacks=()):
    """A small SCMix fitted on `epoch_batches` behind a StopOnDivergence, with a ResumableCheckpoint in
    `backup` (if given): the resumable path of `scm.train`, without its classifier refit."""
    keras.utils.set_random_seed(seed)
    model = SCMix.from_data(data, CONFIG.replace(epochs=epochs), seed=seed)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(2e-3))
    own, initial_epoch = [StopOnDivergence()], 0
    if backup is not None:
        checkpoint = ResumableCheckpoint(backup, run={"data_fingerprint": data.fingerprint(), "seed": seed})
        own.append(checkpoint)
        initial_epoch = checkpoint.resume_epoch
    model.fit(
        epoch_batches(data, CONFIG.batch_size, seed, epochs, initial_epoch),
        epochs=epochs,
        steps_per_epoch=math.ceil(data.n_cells / CONFIG.batch_size),
        callbacks=[*own, *callbacks],
        verbose=0,
    )
    return model


def test_backup_commit_is_atomic_and_belongs_to_its_run(embedded, tmp_path):
    data = few_labels(embedded)
    backup = tmp_path / "backup"

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(data, epochs=3, backup=backup, callbacks=[Interrupt()])
    assert ResumableCheckpoint(backup).resume_epoch == 2
    with pytest.raises(ModelFileError, match=r"another training run .*'seed'"):
        fit(data, epochs=3, seed=1, backup=backup)
    # What a kill while writing the next backup leaves: a half-written staging file and weights that no
    # committed state names. Resuming ignores both.
    (backup / ".staging.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    (backup / "epoch-3.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    resumed = fit(data, epochs=3, backup=backup)
    whole = fit(data, epochs=3)
    assert all(np.array_equal(a, b) for a, b in zip(resumed.get_weights(), whole.get_weights()))
    assert not backup.exists()  # deleted once fit ends


class Recorder(keras.callbacks.Callback):
    """Keeps the weights before each batch and the loss after it."""

    def __init__(self):
        super().__init__()
        self.before, self.losses = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append(self.model.get_weights())

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(logs["loss"])


def test_divergence_stops_with_a_message_and_keeps_the_last_good_weights(embedded, caplog):
    data = few_labels(embedded)
    recorder = Recorder()
    # SGD at learning rate 1000: the loss becomes infinite within the first epoch.
    model = fit(data, epochs=3, optimizer=keras.optimizers.SGD(1000.0), callbacks=[recorder])
    losses = np.array(recorder.losses)
    bad = int(np.flatnonzero(~np.isfinite(losses))[0])
    assert bad > 0 and len(losses) == bad + 1  # stopped at the first non-finite loss
    assert re.search(
        r"training diverged: the loss became (inf|nan) at epoch \d+, batch \d+\. The model keeps its "
        r"state from the last batch with a good loss\. Lower the learning rate \(it is 1000\)",
        caplog.text,
    )
    last_good = recorder.before[bad - 1]  # the weights that gave the last finite loss
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), last_good))
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert np.isfinite(scm.predict(model, data)["probs"]).all()
    # raise_error=True: the same, then an exception.
    guard = StopOnDivergence(raise_error=True)
    guard.set_model(model)
    good = model.get_weights()
    guard.on_train_begin()
    guard.on_train_batch_begin(0)
    model.topics.loc.assign(model.topics.loc * np.nan)
    with pytest.raises(TrainingDiverged, match="became nan at epoch 1, batch 1.*before the first batch"):
        guard.on_train_batch_end(0, {"loss": float("nan")})
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), good))
    # A last batch with a finite loss whose update wrote NaN: caught when training ends.
    guard = StopOnDivergence()
    guard.set_model(model)
    guard.on_train_begin()
    guard.on_train_batch_begin(0)
    guard.on_train_batch_end(0, {"loss": 3.0})
    model.topics.loc.assign(model.topics.loc * np.nan)
    guard.on_train_end()
    assert "the last batch wrote non-finite weights" in guard.message
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), good))


def test_an_exploding_loss_stops_training_like_a_nan(embedded):
    """A finite loss that jumps above 100 times the first batch's stops as a NaN does, with the state from
    before the last good batch; each batch's own loss is recovered from Keras's running means."""
    model = SCMix.from_data(few_labels(embedded), CONFIG)
    model.compile(optimizer=keras.optimizers.Adam(1.0))
    guard = StopOnDivergence()
    guard.set_model(model)
    guard.on_train_begin()
    states = []
    # Epoch 1: batch losses 5, 4, 6 (running means 5, 4.5, 5); epoch 2: 4, then 4000 (running mean 2002).
    for epoch, means in enumerate(([5.0, 4.5, 5.0], [4.0, 2002.0])):
        guard.on_epoch_begin(epoch)
        for batch, mean in enumerate(means):
            guard.on_train_batch_begin(batch)
            states.append(model.get_weights())
            model.topics.loc.assign(model.topics.loc + 1.0)  # what the batch's update writes
            guard.on_train_batch_end(batch, {"loss": mean})
            if model.stop_training:
                break
    assert guard.message.startswith(
        "training diverged: the loss exploded at epoch 2, batch 2: 4000, more than 100 times that of the first "
        "batch (5). The model keeps its state from the last batch with a good loss. Lower the learning rate (it is 1)"
    )
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), states[3]))  # before epoch 2, batch 1
    with pytest.raises(ValueError, match="max_ratio must be above 1"):
        StopOnDivergence(max_ratio=0.5)
    assert default(embedded)[0].raise_error  # the recipe raises: a diverged model is not a trained one


class EpochLogs(keras.callbacks.Callback):
    """Keeps each epoch's logs and the classifier's weights as later callbacks see them; stops after
    `stop_after` epochs if given."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.logs, self.classifier, self.stop_after = [], [], stop_after

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))
        self.classifier.append([v.numpy() for v in self.model.classifier.weights])
        if self.stop_after is not None and epoch + 1 == self.stop_after:
            self.model.stop_training = True


def test_refit_classifier_runs_after_the_last_epoch_or_when_training_stops_early(embedded):
    data = embedded.subset(np.arange(300)).hide_labels(np.arange(100))
    recipe = default(data, classifier_steps=30)
    assert [type(c) for c in recipe] == [StopOnDivergence, RefitClassifier]

    def run(epochs, stop_after=None):
        keras.utils.set_random_seed(0)
        model = SCMix.from_data(data, CONFIG.replace(n_topics=4, hidden_units=32, classifier_steps=30))
        model.compile(optimizer=keras.optimizers.Adam(2e-3))
        probe = EpochLogs(stop_after)
        model.fit(data.dataset(128), epochs=epochs, callbacks=[*default(data), probe], verbose=0)
        return model, probe

    model, probe = run(epochs=2)
    # The refit runs at the end of the last epoch, before the callbacks after it read that epoch.
    assert "classifier_loss" not in probe.logs[0] and np.isfinite(probe.logs[1]["classifier_loss"])
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(probe.classifier[-1], model.classifier.weights))
    # Stopped after the first of three epochs: the refit runs when training ends.
    model, probe = run(epochs=3, stop_after=1)
    assert len(probe.logs) == 1 and "classifier_loss" not in probe.logs[0]
    assert not all(np.array_equal(a, b.numpy()) for a, b in zip(probe.classifier[0], model.classifier.weights))
    # steps=0, or data without labels: nothing to refit (no error).
    for refit in (RefitClassifier(data, steps=0), RefitClassifier(data.hide_labels(np.array([], int)), steps=30)):
        refit.set_model(model)
        before = [v.numpy() for v in model.classifier.weights]
        refit.on_train_begin()
        refit.on_train_end()
        assert refit.done and all(np.array_equal(a, b.numpy()) for a, b in zip(before, model.classifier.weights))


def test_progress_bar_into_a_log_writes_its_start_and_end_not_every_epoch(capsys):
    """stderr is not a terminal here (as in a pipe or a batch job's log): tqdm's ten redraws a second would
    each be a record; the bar writes at most once a minute, and its last state at close."""
    from tfp_scmix.callbacks import ProgressBar

    bar = ProgressBar(200)
    bar.on_train_begin()
    for epoch in range(200):
        bar.on_epoch_begin(epoch)
        bar.on_epoch_end(epoch, {"loss": 1.0, "label_accuracy": 0.5})
    bar.close()
    records = [r for r in capsys.readouterr().err.replace("\r", "\n").splitlines() if r.strip()]
    assert len(records) == 2, records
    assert "200/200" in records[-1] and "acc=0.500" in records[-1]


def test_progress_bar_into_a_log_writes_its_last_state_once(capsys, monkeypatch):
    """With every epoch due a record (an interval of 0 s), the last state is still written once, by `close`: the
    last epoch's update does not draw it (a log showed the 100% line twice)."""
    from tfp_scmix import callbacks

    monkeypatch.setattr(callbacks, "LOG_INTERVAL_SECONDS", 0.0)
    bar = callbacks.ProgressBar(5)
    bar.on_train_begin()
    for epoch in range(5):
        bar.on_epoch_begin(epoch)
        bar.on_epoch_end(epoch, {"loss": 1.0})
    bar.close()
    records = [r for r in capsys.readouterr().err.replace("\r", "\n").splitlines() if r.strip()]
    assert sum("5/5" in r for r in records) == 1 and "5/5" in records[-1], records
    assert any("4/5" in r for r in records), records


def test_progress_bar_counts_the_epochs_of_a_fit_that_had_none_left(capsys):
    """A run resumed after all its epochs had finished fits no epoch: its bar ended at 0/60 (a trial's log), it now
    counts them as done."""
    from tfp_scmix.callbacks import ProgressBar

    bar = ProgressBar(60)
    bar.set_params({"epochs": 60, "steps": 3, "verbose": 0})
    bar.on_train_begin()
    bar.on_train_end()  # Keras, with initial_epoch == epochs: no epoch begins
    bar.close()
    assert "60/60" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]


def test_a_backup_of_another_run_names_the_settings_that_differ():
    """The message said only "it differs in ['model']" (a trial could not tell which setting it was)."""
    import json

    from tfp_scmix.callbacks import _differences

    saved = {"model": json.dumps({"config": {"epochs": 100, "n_topics": 50}, "seed": 0}), "data": "a"}
    now = {"model": json.dumps({"config": {"epochs": 5, "n_topics": 50}, "seed": 0}), "data": "b"}
    said = _differences(saved, now, ["data", "model"])
    assert said == "'data'; model's config.epochs: 100 in the backup, 5 now"
