"""The one training recipe (`scm.train`): what it returns, that it is the Keras path, resuming after a kill,
adapting to a new dataset, and long runs in bounded memory."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import scipy.sparse as sp

import tfp_scmix as scm
from tests.helpers import ROOT, few_labels
from tfp_scmix.config import Config
from tfp_scmix.data import BATCH, COUNTS, DataError
from tfp_scmix.ensemble import SCMixEnsemble
from tfp_scmix.io import ModelFileError
from tfp_scmix.predict import OUTPUT_KEYS
from tfp_scmix.train import _warn_few_labels, _warn_short_training

TINY = Config(n_topics=4, hidden_units=32, epochs=2, batch_size=128, classifier_steps=30)


def test_train_is_the_keras_path(embedded, caplog):
    """scm.train(restarts=1) and the documented Keras path (set_random_seed, from_data, compile, fit with
    callbacks.default) give the same model: equal weights and identical predictions. train warns first about the
    classes with fewer than FEW_LABELS labelled cells (the fixture's 150 labels have two)."""
    data, seed = few_labels(embedded), 3
    counts = dict(zip(data.classes, np.bincount(data.labels[data.labels >= 0], minlength=data.n_classes)))
    few = [f"{c!r} ({n} cell{'' if n == 1 else 's'})" for c, n in counts.items() if n < scm.data.FEW_LABELS]
    assert len(few) >= 2
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        trained = scm.train(data, TINY, restarts=1, seed=seed, verbose=0)
    assert f"{', '.join(few)}: fewer than 5 labelled cells" in caplog.text
    keras.utils.set_random_seed(seed)
    model = scm.SCMix.from_data(data, TINY, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(TINY.learning_rate))
    model.fit(
        data.dataset(TINY.batch_size, seed=seed), epochs=TINY.epochs, callbacks=scm.callbacks.default(data), verbose=0
    )
    (member,) = trained.members
    assert member.seed == model.seed == seed and member.config == model.config == TINY
    assert all(np.array_equal(a, b) for a, b in zip(member.get_weights(), model.get_weights(), strict=True))
    np.testing.assert_array_equal(scm.predict(trained, data)["probs"], scm.predict(model, data)["probs"])


def test_train_always_returns_an_ensemble(small_model, two_restarts, embedded):
    for model, restarts, seeds, epochs in ((small_model, 1, [0], 5), (two_restarts, 2, [5, 6], 4)):
        assert type(model) is SCMixEnsemble and len(model.members) == restarts
        assert [m.seed for m in model.members] == seeds  # restart r is seeded seed + r
        assert all(type(m) is scm.SCMix and m.config.epochs == epochs for m in model.members)  # epochs= override
        assert model.settings["restarts"] == restarts
    # One restart predicts exactly as its one SCMix.
    (member,) = small_model.members
    ours, its = scm.predict(small_model, embedded), scm.predict(member, embedded)
    assert set(ours) - set(its) == {"novelty"}  # the ensemble carries train's novelty detector
    for key in its:
        np.testing.assert_array_equal(ours[key], its[key])


def test_the_progress_bar_is_named_for_each_restart_from_its_first_draw(synthetic, capsys):
    """verbose=1: one bar over every restart's epochs, named "restart 1/2" from its first draw (it was drawn as
    "training" and renamed at once, so a log showed both), then "restart 2/2", and no "restart 1 of 2" line
    printed into it (verbose=2's line); "training" with one restart."""
    data, _ = synthetic
    config = TINY.replace(epochs=1, classifier_steps=5)
    scm.train(data, config, restarts=2, seed=0, verbose=1)
    captured = capsys.readouterr()
    assert "restart 1 of 2" not in captured.out + captured.err  # the bar names the restart: no line beside it
    records = [r for r in captured.err.replace("\r", "\n").splitlines() if "epoch" in r]
    assert records and records[0].startswith("restart 1/2") and records[-1].startswith("restart 2/2"), records
    assert not any(r.startswith("training") for r in records), records
    zero = [r for r in records if r.startswith("restart 1/2") and " 0/" in r]
    assert len(zero) == 1, records  # the first restart's empty bar is drawn once, not again when named
    scm.train(data, config, restarts=1, seed=0, verbose=1)
    records = [r for r in capsys.readouterr().err.replace("\r", "\n").splitlines() if "epoch" in r]
    assert records and all(r.startswith("training") for r in records), records


def test_bad_arguments_are_refused_before_training(embedded, embedded_adata):
    data = few_labels(embedded)
    with pytest.raises(ValueError, match="restarts must be a whole number >= 1, received 0"):
        scm.train(data, TINY, restarts=0)
    with pytest.raises(ValueError, match="seed must be a whole number >= 0, received 1.5"):
        scm.train(data, TINY, seed=1.5)
    with pytest.raises(ValueError, match="epochs must be a positive whole number, received 0"):
        scm.train(data, TINY, epochs=0)
    # A gene selection that leaves cells without counts (before: 13 of 300 labelled cells trained on, silently).
    few_genes = data.select_genes(data.genes[:3])
    empty = int((few_genes.library_size == 0).sum())
    labelled_empty = int(((few_genes.library_size == 0) & (few_genes.labels >= 0)).sum())
    assert empty > 0
    with pytest.raises(
        DataError, match=f"{empty} cells \\({labelled_empty} of them labelled\\) have no counts over the 3 genes"
    ):
        scm.train(few_genes, TINY, restarts=1)
    unlabelled = scm.from_anndata(embedded_adata, label_key=None)
    with pytest.raises(DataError, match="at least two classes; the data has 0.*label_key="):
        scm.train(unlabelled, TINY, restarts=1)
    with pytest.raises(TypeError, match="from_anndata"):
        scm.train(embedded_adata, TINY, restarts=1)
    with pytest.raises(TypeError, match="config must be a tfp_scmix.Config.*received str"):
        scm.train(data, "fast", restarts=1)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['topics'\]"):
        scm.train(data, {"topics": 4}, restarts=1)
    with pytest.raises(ValueError, match="strategy= trains from a stream"):
        scm.train(data, TINY, restarts=1, strategy="mirrored")


def test_classes_with_few_labelled_cells_are_warned_about(embedded, caplog):
    """A class with fewer than FEW_LABELS labelled cells is named in a warning, one without any in another (train
    calls this before training: test_train_is_the_keras_path checks it there)."""
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        _warn_few_labels(embedded)  # every cell labelled: at least 8 of each class
    assert not caplog.text
    first, second = np.flatnonzero(embedded.labels == 0), np.flatnonzero(embedded.labels == 1)
    data = embedded.hide_labels(np.setdiff1d(np.arange(embedded.n_cells), np.concatenate([first[2:], second])))
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        _warn_few_labels(data)
    a, b = data.classes[:2]
    assert f"{a!r} (2 cells): fewer than 5 labelled cells; the model may seldom call this class" in caplog.text
    assert f"{b!r}: no labelled cell; the model will hardly ever call this class" in caplog.text


def test_a_kl_warm_up_longer_than_the_training_is_warned_about(caplog):
    """The KL terms scale up over kl_warmup_epochs: training for fewer epochs ends before they reach their full weight
    (a tempered objective), which train says before training; a warm-up that ends by the last epoch is not named."""
    for config in (
        Config(),
        Config(epochs=20),
        Config(epochs=5, kl_warmup_epochs=5.0),
        Config(epochs=3, kl_warmup_epochs=0.0),
    ):
        caplog.clear()
        with caplog.at_level("WARNING", logger="tfp_scmix"):
            _warn_short_training(config)
        assert not caplog.text, config
    with caplog.at_level("WARNING", logger="tfp_scmix"):
        _warn_short_training(Config(epochs=10))
    assert "kl_warmup_epochs (20) is longer than the training (10 epochs)" in caplog.text
    assert "Train for at least 20 epochs (command line: --epochs), or set kl_warmup_epochs" in caplog.text


def test_a_diverging_run_stops_with_a_clear_error(embedded):
    """At learning rate 10 the loss jumps from about 5 to millions in one batch (before: every weight NaN and
    every cell labelled class 0, no message): scm.train raises TrainingDiverged naming the restart."""
    with pytest.raises(
        scm.callbacks.TrainingDiverged,
        match=r"restart 1 of 1 \(seed 0\): training diverged: the loss (exploded|became)",
    ):
        scm.train(few_labels(embedded), TINY.replace(learning_rate=10.0), restarts=1, verbose=0)


def test_genes_no_cell_expresses_are_harmless(embedded):
    """Training data with genes no cell expresses: the loss stays finite and those genes get no weight."""
    n_zero = 40
    padded = few_labels(embedded)
    padded = dataclasses.replace(
        padded,
        counts=sp.hstack([padded.counts, sp.csr_matrix((padded.n_cells, n_zero), dtype=np.float32)]).tocsr(),
        genes=np.concatenate([padded.genes, [f"ZERO{i}" for i in range(n_zero)]]),
    )
    losses = []

    class Losses(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(logs["loss"])

    model = scm.train(
        padded,
        Config(n_topics=6, batch_size=128, classifier_steps=0),
        epochs=1,
        restarts=1,
        callbacks=[Losses()],
        verbose=0,
    )
    assert len(losses) == 6 and np.isfinite(losses).all()  # no batch diverged: the guard would have stopped
    topic_gene = model.topic_gene().numpy()
    assert topic_gene[:, -n_zero:].max() < 1e-5 < topic_gene[:, :-n_zero].max()


# -- interrupted runs -------------------------------------------------------------------------------------

RUN = """
import logging, sys, time
import keras, numpy as np
import tfp_scmix as scm
from tfp_scmix.datasets import pbmc68k_reduced
from tfp_scmix.io import atomic_path
from tfp_scmix.train import make_deterministic

logging.basicConfig(level=logging.INFO, format="%(message)s")
checkpoint_dir, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
make_deterministic(0)
data = scm.from_anndata(pbmc68k_reduced())
data = data.hide_labels(np.random.default_rng(0).permutation(data.n_cells)[:150])


class Pause(keras.callbacks.Callback):  # after the epoch's backup, so that a kill lands mid-run; changes no number
    def on_epoch_end(self, epoch, logs=None):
        time.sleep(delay)


config = scm.Config(n_topics=8, batch_size=128, epochs=4, classifier_steps=50)
model = scm.train(data, config, restarts=2, seed=0, checkpoint_dir=checkpoint_dir, callbacks=[Pause()], verbose=0)
with atomic_path(out) as tmp:
    np.savez(tmp, **scm.predict(model, data))
"""


def start(checkpoint_dir, out, delay):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(checkpoint_dir), str(out), str(delay)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process, timeout=400):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def backup_epoch(path):
    try:
        return json.loads((path / "state.json").read_text())["epoch"]
    except (OSError, ValueError):
        return 0


def test_killed_run_resumes_to_the_predictions_of_an_uninterrupted_run(tmp_path):
    """Two restarts with checkpoint_dir, killed (SIGKILL) in the second restart after its epoch-2 backup and
    started again with the same arguments: the first restart is loaded from its saved file, the second
    resumes at its backup, and the predictions are bit-identical to an uninterrupted run in another process."""
    reference = start(tmp_path / "reference", tmp_path / "reference.npz", 0.0)
    work = tmp_path / "work"
    killed = start(work, tmp_path / "resumed.npz", 0.5)
    deadline = time.monotonic() + 400
    while backup_epoch(work / "restart-1") < 2:
        assert killed.poll() is None, f"the run to kill ended first:\n{killed.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "no backup of the second restart in time"
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    at_kill = backup_epoch(work / "restart-1")
    assert 2 <= at_kill < 4 and (work / "restart-0.keras").is_file() and not (tmp_path / "resumed.npz").exists()
    output = finish(start(work, tmp_path / "resumed.npz", 0.0))
    assert f"was finished by an earlier run: loaded from {work / 'restart-0.keras'}" in output, output[-3000:]
    assert f"resuming training at epoch {at_kill + 1} from {work / 'restart-1'}" in output, output[-3000:]
    finish(reference)
    expected, resumed = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "resumed.npz")
    for key in OUTPUT_KEYS:
        np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)
    # The epoch backups are gone; the finished restarts are kept until the caller has saved the model (a trial's
    # Ctrl-C between the last epoch and the save lost them), and deletes the folder (the command line does).
    for folder in (work, tmp_path / "reference"):
        assert sorted(p.name for p in folder.iterdir()) == ["restart-0.keras", "restart-1.keras"]


def test_checkpoint_dir_refuses_a_finished_restart_of_another_run(small_model, embedded, tmp_path):
    scm.save_model(small_model.members[0], tmp_path / "restart-0.keras")
    with pytest.raises(ModelFileError, match="restart-0.keras holds a restart of another training run"):
        scm.train(few_labels(embedded), small_model.members[0].config, restarts=1, seed=99, checkpoint_dir=tmp_path)
    assert (tmp_path / "restart-0.keras").is_file()


# -- long runs ------------------------------------------------------------------------------------------------


def rss_mb():
    """Resident memory of this process now, in MB (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def settled_rss_mb():
    """Resident memory in MB after returning the C allocator's free pages to the system (malloc_trim), so
    that what is left is what the process holds, not what the allocator happens to cache."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mb()


def test_long_training_does_not_grow_memory(embedded, tmp_path):
    # Many short epochs (256 cells, 2 batches each) through the whole resumable path: minibatches, divergence
    # guard, a backup per epoch. After the allocator settles, a leak shows as a steady climb: building a
    # tf.data pipeline per epoch inside fit climbed 0.37 MB/epoch here (7 MB over the last 20 epochs).
    # The peer: Keras's own `save_weights`, which the backup calls once an epoch, holds on to about 0.13 MB
    # of native memory per call (TF 2.21, Keras 3.15); the path may add no more than 0.15 MB/epoch to that
    # (training alone, no backup: 0.02-0.07 MB/epoch, the XLA programs of new nonzero-count buckets).
    data = embedded.subset(np.arange(256)).hide_labels(np.arange(100))
    rss = []

    class Memory(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            rss.append(settled_rss_mb())

    model = scm.train(
        data,
        Config(n_topics=8, batch_size=128, classifier_steps=0),
        epochs=40,
        restarts=1,
        checkpoint_dir=tmp_path / "checkpoints",
        callbacks=[Memory()],
        verbose=0,
    ).members[0]
    assert len(rss) == 40
    settled = np.array(rss[20:])
    slope = np.polyfit(np.arange(settled.size), settled, 1)[0]
    saves = []
    for _ in range(40):
        model.save_weights(str(tmp_path / "peer.weights.h5"), overwrite=True)
        saves.append(settled_rss_mb())
    per_save = max(0.0, np.polyfit(np.arange(20), saves[20:], 1)[0])
    assert slope < per_save + 0.15, (slope, per_save, np.round(rss, 1))  # MB per epoch
    assert settled.max() - settled[0] < 4 + 20 * per_save, np.round(rss, 1)  # MB over 20 epochs


# -- adapting to a new dataset ---------------------------------------------------------------------------------


def shifted_query(data, seed=1):
    """`data`'s cells with every gene's counts scaled by a log-normal factor and resampled (a batch effect)."""
    rng = np.random.default_rng(seed)
    log_factor = rng.normal(0, 1.0, data.n_genes)
    shifted = (data.counts @ sp.diags(np.exp(log_factor).astype(np.float32))).tocsr()
    shifted.data = rng.poisson(shifted.data).astype(np.float32)
    keep = np.asarray(shifted.sum(axis=1)).ravel() > 0
    return dataclasses.replace(data, counts=shifted).subset(keep)


def test_adapt_returns_an_ensemble_that_saves_loads_and_predicts_with_its_offsets(small_model, embedded, tmp_path):
    reference = scm.predict(small_model, embedded)
    weights = small_model.get_weights()
    query = shifted_query(embedded)
    adapted = scm.adapt(small_model, query, epochs=10)
    assert type(adapted) is SCMixEnsemble and adapted is not small_model
    (member,) = adapted.members
    original = small_model.members[0]
    assert member.adapted_batch == 1 and member.sizes["n_batches"] == 2
    # Only the query's offset row was fitted: every other weight is the reference model's.
    offsets = member.batch_offsets.loc.numpy()
    np.testing.assert_array_equal(offsets[:1], original.batch_offsets.loc.numpy())
    assert np.abs(offsets[1]).max() > 0.1
    np.testing.assert_array_equal(member.topic_gene().numpy(), original.topic_gene().numpy())
    out = scm.predict(adapted, query)
    assert out["probs"].shape == (query.n_cells, small_model.n_classes) and np.isfinite(out["probs"]).all()
    assert not np.allclose(out["probs"], scm.predict(small_model, query)["probs"])  # the offsets are used
    # predict (numpy normalisation with the query's offsets) is the model's own call (TensorFlow's).
    called = adapted({COUNTS: query.counts.toarray(), BATCH: query.batches})
    np.testing.assert_allclose(out["probs"], called["probs"].numpy(), atol=1e-5)
    # Saved and loaded, it predicts the same.
    path = scm.save_model(adapted, tmp_path / "adapted.keras")
    loaded = scm.load_model(path)
    assert type(loaded) is SCMixEnsemble and loaded.members[0].adapted_batch == 1
    np.testing.assert_array_equal(scm.predict(loaded, query)["probs"], out["probs"])
    # The reference model and its predictions are untouched.
    after = scm.predict(small_model, embedded)
    for key in reference:
        np.testing.assert_array_equal(reference[key], after[key])
    assert all(np.array_equal(a, b) for a, b in zip(weights, small_model.get_weights(), strict=True))
    assert original.sizes["n_batches"] == 1 and original.adapted_batch is None


def test_adapt_gives_the_same_model_whatever_ran_before_and_its_seed_orders_the_minibatches(small_model, embedded):
    """A trial's adapt gave other offsets (7 labels of 2,000 changed) after an unrelated training in the same
    process: TensorFlow's global seed entered the order of the query's minibatches. It no longer does."""
    query = shifted_query(embedded)
    first = scm.adapt(small_model, query, epochs=2).members[0].batch_offsets.loc.numpy()
    keras.utils.set_random_seed(123)
    again = scm.adapt(small_model, query, epochs=2).members[0].batch_offsets.loc.numpy()
    np.testing.assert_array_equal(first, again)
    other = scm.adapt(small_model, query, epochs=2, seed=1).members[0].batch_offsets.loc.numpy()
    assert not np.array_equal(first, other)
    with pytest.raises(ValueError, match="seed"):
        scm.adapt(small_model, query, seed=-1)


def test_adapt_reads_an_anndata_or_a_file_as_predict_does_and_records_the_query(small_model, embedded, tmp_path):
    import anndata
    import pandas as pd

    from tfp_scmix.stream import H5ADStream

    query = shifted_query(embedded)
    expected = scm.adapt(small_model, query, epochs=2).members[0]
    # An AnnData with the genes in another order, labels in obs, and two cells with counts only in a gene the
    # model lacks: the same offsets (the genes aligned by name, the labels unread, the empty cells left out).
    extra = sp.csr_matrix(
        (np.ones(2, np.float32), ([query.n_cells, query.n_cells + 1], [0, 0])), (query.n_cells + 2, 1)
    )
    counts = sp.hstack([sp.vstack([query.counts, sp.csr_matrix((2, query.n_genes))]), extra]).tocsr()
    genes = [*query.genes, "NOT_IN_MODEL"]
    order = np.random.default_rng(0).permutation(len(genes))
    obs = pd.DataFrame(
        {"cell_type": np.resize(["B", "T"], counts.shape[0])}, index=[f"c{i}" for i in range(counts.shape[0])]
    )
    adata = anndata.AnnData(X=counts[:, order], obs=obs, var=pd.DataFrame(index=np.asarray(genes)[order]))
    path = tmp_path / "query.h5ad"
    adata.write_h5ad(path)
    records = []
    for source in (adata, str(path), query.select_genes(list(reversed(small_model.genes)))):
        member = scm.adapt(small_model, source, epochs=2).members[0]
        np.testing.assert_allclose(member.batch_offsets.loc.numpy(), expected.batch_offsets.loc.numpy(), atol=1e-5)
        records += member.provenance["adapted_to"]
    assert records[0] == records[1] and [r["n_cells"] for r in records] == [query.n_cells] * 3  # the file is the data
    assert expected.provenance["data_fingerprint"] not in {r["data_fingerprint"] for r in records}  # not the training
    twice = scm.adapt(scm.adapt(small_model, adata, epochs=1), query, epochs=1).members[0]
    assert len(twice.provenance["adapted_to"]) == 2 and twice.sizes["n_batches"] == 3
    with pytest.raises(TypeError, match="adapt takes the query as an AnnData, the path of a file"):
        scm.adapt(small_model, H5ADStream(path), epochs=1)
    with pytest.raises(DataError, match="only 0 of the model's"):
        scm.adapt(small_model, adata[:, ["NOT_IN_MODEL"]].copy(), epochs=1)
