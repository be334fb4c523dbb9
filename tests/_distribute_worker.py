"""One process of the multi-worker test (tests/test_performance.py): train a few steps, save the weights.

Usage: python _distribute_worker.py STRATEGY DATA.h5ad OUT.npz STEPS BATCH_PER_REPLICA
Every replica reads every chunk (shard=False), so with the gradient mean over replicas the run must
match one worker on the same cells.
"""

import sys

import keras
import numpy as np

from tfp_scmix.distribute import build, fit, get_strategy, stream_dataset
from tfp_scmix.stream import H5ADStream, build_model


def main(strategy_name, path, out, steps, batch):
    strategy = get_strategy(strategy_name)
    stream = H5ADStream(path, chunk_cells=128)
    keras.utils.set_random_seed(0)
    model = build(strategy, lambda: build_model(stream, n_topics=4, hidden_units=32, seed=0))
    data = stream_dataset(strategy, stream, int(batch) * strategy.num_replicas_in_sync, shard=False)
    history = fit(model, strategy, data, epochs=1, steps_per_epoch=int(steps), verbose=0)
    np.savez(out, loss=np.asarray(history.history["loss"]), cells_seen=model.cells_seen.numpy(),
             **{f"w{i}": np.asarray(v.numpy()) for i, v in enumerate(model.weights)})


if __name__ == "__main__":
    main(*sys.argv[1:])
