"""One process of the distribution tests (tests/test_distribute.py): train a few steps, save the weights.

Usage: python _distribute_worker.py MODE DATA.h5ad OUT.npz STEPS BATCH_PER_REPLICA
MODE reference: one device (default strategy, written to OUT), then MirroredStrategy over two logical CPUs
(written to OUT with _mirrored); multi_worker: MultiWorkerMirroredStrategy over the cluster in TF_CONFIG.
Every replica is fed the same cells as the one-device run: with the gradient mean over replicas the
weights must match it. A multi-worker run then trains 2 more steps on its own shard of the chunks.
"""

import sys

import keras
import numpy as np
import tensorflow as tf

from tfp_scmix.config import Config
from tfp_scmix.distribute import build, fit, get_strategy, stream_dataset
from tfp_scmix.model import SCMix
from tfp_scmix.stream import H5ADStream


def weights(model, prefix):
    return {f"{prefix}{i}": np.asarray(v.numpy()) for i, v in enumerate(model.weights)}


def train(strategy, stream, steps, batch, duplicate=False):
    """Model built under `strategy` from seed 0, trained `steps` steps with `batch` cells per replica."""
    keras.utils.set_random_seed(0)
    # No KL warm-up: its clock (cells_seen) counts the duplicated cells of the replicas too.
    config = Config(n_topics=4, hidden_units=32, kl_warmup_epochs=0)
    model = build(strategy, lambda: SCMix.from_data(stream, config, seed=0))
    saved = {
        "replicas": strategy.num_replicas_in_sync,
        "trainable": np.array([v.trainable for v in model.weights]),
        "names": np.array([v.path for v in model.weights]),
        **weights(model, "init"),
    }
    if duplicate:  # one input pipeline deals its batches to the replicas in turn: give each a copy

        def make(context):
            return stream.dataset(batch, seed=0, repeat=True).flat_map(
                lambda b: tf.data.Dataset.from_tensors(b).repeat(context.num_replicas_in_sync)
            )

        data = strategy.distribute_datasets_from_function(make)
    else:
        data = stream_dataset(strategy, stream, batch * strategy.num_replicas_in_sync, shard=False)
    history = fit(model, strategy, data, epochs=1, steps_per_epoch=steps, verbose=0)
    saved.update(loss=np.asarray(history.history["loss"]), **weights(model, "w"))
    return model, saved


def main(mode, path, out, steps, batch):
    steps, batch = int(steps), int(batch)
    stream = H5ADStream(path, chunk_cells=128)
    if mode == "reference":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        np.savez(out, **train(get_strategy("default"), stream, steps, batch)[1])
        mirrored = get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
        np.savez(out.replace(".npz", "_mirrored.npz"), **train(mirrored, stream, steps, batch, duplicate=True)[1])
        return
    strategy = get_strategy(mode)
    model, saved = train(strategy, stream, steps, batch)
    fit(
        model,
        strategy,
        stream_dataset(strategy, stream, batch * strategy.num_replicas_in_sync, seed=1, shard=True),
        epochs=1,
        steps_per_epoch=2,
        verbose=0,
    )
    np.savez(out, **saved, **weights(model, "sharded"))


if __name__ == "__main__":
    main(*sys.argv[1:])
