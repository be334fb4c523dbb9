"""Several devices and workers: strategies by name, and synchronous training that matches one device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_and_two_devices_agree_with_one(tmp_path, synthetic_file):
    """MultiWorkerMirroredStrategy over two CPU workers on 127.0.0.1 (TF_CONFIG) and MirroredStrategy over two
    logical CPUs, each replica fed the same cells as one worker: after 3 steps every weight equals the
    one-worker run's. Then the workers train on their own shards and their trainable weights stay in sync
    (batch-normalisation moving statistics are each replica's own, as in Keras)."""
    _, path = synthetic_file
    worker = str(HERE / "_distribute_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    runs = {"single": ("reference", env)}
    for index in range(2):
        runs[f"worker{index}"] = (
            "multi_worker",
            {**env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})},
        )
    processes = {
        name: subprocess.Popen(
            [sys.executable, worker, strategy, str(path), str(tmp_path / f"{name}.npz"), "3", "32"],
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (strategy, run_env) in runs.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=400)
        assert process.returncode == 0, f"{name} failed:\n{stderr[-3000:]}"
    out = {name: np.load(tmp_path / f"{name}.npz") for name in [*runs, "single_mirrored"]}
    assert [int(out[n]["replicas"]) for n in ("single", "single_mirrored", "worker0", "worker1")] == [1, 2, 2, 2]
    # cells_seen (the KL warm-up's clock) counts one replica's cells or all replicas' (with aggregation="sum").
    counter = [f"w{i}" for i, path in enumerate(out["single"]["names"]) if "cells_seen" in str(path)]
    for run in ("single_mirrored", "worker0", "worker1"):
        assert out[run][counter[0]] / out["single"][counter[0]] in (1.0, int(out[run]["replicas"]))
    names = [k for k in out["single"].files if k.startswith("w") and k not in counter]
    assert len(names) > 10
    changed = [not np.allclose(out["single"][n], out["single"]["init" + n[1:]]) for n in names]
    assert sum(changed) > len(names) // 2  # the steps did train
    for run in ("single_mirrored", "worker0", "worker1"):
        for name in names:
            # atol: the encoder's first-layer bias sits before batch normalisation, so its gradient is zero up to
            # float noise, which the replicas sum in another order and Adam scales to ~1e-6 in 3 steps.
            np.testing.assert_allclose(out[run][name], out["single"][name], rtol=1e-5, atol=1e-5, err_msg=run)
    trainable = out["worker0"]["trainable"]
    sharded = [k for k in out["worker0"].files if k.startswith("sharded") and trainable[int(k[7:])]]
    for name in sharded:
        np.testing.assert_array_equal(out["worker0"][name], out["worker1"][name])
    assert any(not np.allclose(out["worker0"][n], out["worker0"]["w" + n[7:]]) for n in sharded)


def test_strategy_setting_is_checked(monkeypatch):
    from tfp_scmix.distribute import get_strategy

    with pytest.raises(ValueError, match="strategy must be one of"):
        get_strategy("ring")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{cluster")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_strategy("multi_worker")


def test_steps_and_chief():
    from tfp_scmix.distribute import get_strategy, is_chief, steps_per_epoch

    assert [steps_per_epoch(n, 256) for n in (10, 256, 700, 1024)] == [1, 1, 2, 4]
    assert is_chief(get_strategy("default"))


@pytest.fixture(scope="module")
def mirrored(synthetic_file):
    """(stream, model) trained by scm.train under MirroredStrategy (one CPU device here)."""
    import tfp_scmix as scm
    from tfp_scmix.stream import H5ADStream

    _, path = synthetic_file
    stream = H5ADStream(path, batch_key="donor", chunk_cells=128)
    config = scm.Config(n_topics=4, hidden_units=32, epochs=2, batch_size=128, classifier_steps=20)
    return stream, scm.train(stream, config, strategy="mirrored", restarts=1, verbose=0)


def test_train_under_a_strategy_returns_a_plain_model(mirrored, synthetic_file):
    import tensorflow as tf

    import tfp_scmix as scm

    stream, model = mirrored
    data, path = synthetic_file
    (member,) = model.members
    assert isinstance(member, scm.SCMix) and member.sizes["n_batches"] == 2
    # The weights were copied out of the strategy's distributed variables into ordinary ones.
    assert not any(isinstance(v.value, tf.distribute.DistributedValues) for v in member.weights)
    assert member.provenance["data_fingerprint"] == stream.fingerprint()
    out = scm.predict(model, scm.from_anndata(path, batch_key="donor"))
    assert out["probs"].shape == (data.n_cells, 3) and np.isfinite(out["probs"]).all()


def test_a_model_trained_under_a_strategy_saves_and_loads(mirrored, synthetic_file, tmp_path):
    import tfp_scmix as scm

    _, model = mirrored
    data = scm.from_anndata(synthetic_file[1], batch_key="donor")
    scm.save_model(model, tmp_path / "mirrored.keras")
    loaded = scm.load_model(tmp_path / "mirrored.keras")
    np.testing.assert_array_equal(scm.predict(loaded, data)["probs"], scm.predict(model, data)["probs"])


def test_sparse_data_train_under_a_strategy_through_the_csr_product(synthetic_file, tmp_path):
    """Counts with at most CSR_DENSITY nonzero entries train through the encoder's CSR product under
    MirroredStrategy too (its ops inside the replica context), and the model saves and loads to the same
    predictions."""
    import scipy.sparse as sp

    import tfp_scmix as scm
    from tfp_scmix.layers import CellEncoder
    from tfp_scmix.stream import H5ADStream
    from tfp_scmix.synthetic import to_anndata

    data, _ = synthetic_file
    keep = np.random.default_rng(0).random(data.counts.shape) < 0.08
    counts = sp.csr_matrix(data.counts.toarray() * keep)
    adata = to_anndata(data)
    adata.X = counts
    adata = adata[counts.getnnz(axis=1) > 0].copy()
    path = tmp_path / "sparse.h5ad"
    adata.write_h5ad(path)
    stream = H5ADStream(path, chunk_cells=128)
    assert stream.nonzero_fraction <= CellEncoder.CSR_DENSITY
    config = scm.Config(n_topics=4, hidden_units=32, epochs=2, batch_size=128, classifier_steps=20)
    model = scm.train(stream, config, strategy="mirrored", restarts=1, verbose=0)
    assert model.members[0].encoder.sparse_product
    scm.save_model(model, tmp_path / "sparse.keras")
    loaded = scm.load_model(tmp_path / "sparse.keras")
    cells = scm.from_anndata(path)
    probs = scm.predict(model, cells)["probs"]
    assert np.isfinite(probs).all()
    np.testing.assert_array_equal(scm.predict(loaded, cells)["probs"], probs)
