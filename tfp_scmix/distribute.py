"""Several devices and machines: a `tf.distribute` strategy chosen by a setting.

- "default": TensorFlow's default strategy (one device; what `fit` does without a scope).
- "mirrored": `MirroredStrategy`, synchronous data parallelism over the GPUs of one machine (or the
  devices named in `devices`); gradients are all-reduced every step.
- "multi_worker": `MultiWorkerMirroredStrategy` over the machines listed in the `TF_CONFIG` environment
  variable (every machine runs the same program with its own task index); collective all-reduce
  (ring on CPU, NCCL on GPU).

The model is built and compiled inside `strategy.scope()` (`build`), and `prepare` adapts it to
several replicas: each replica's loss is the mean over its own cells, and the optimizers all-reduce
(sum) the gradients, so they are scaled by 1/replicas to give the mean over the global batch.
Each worker reads only its own chunks of an .h5ad (`stream_dataset`).

`tfp_scmix.train(stream, strategy=...)` uses them. Command line (one per machine, see docs/performance.md):
  TF_CONFIG='{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}' \\
  tfp-scmix train data.h5ad --stream --strategy multi_worker --out model.keras
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: TensorFlow and Keras are imported when a strategy is used
    import keras
    import tensorflow as tf

    from tfp_scmix.model import SCMix
    from tfp_scmix.stream import H5ADStream

STRATEGIES = ("default", "mirrored", "multi_worker")


def get_strategy(name: str = "default", devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
    """The `tf.distribute.Strategy` for a setting in STRATEGIES; `devices` (e.g. ["/gpu:0", "/gpu:1"]) only for
    "mirrored", where None means every GPU of the machine (or the CPU without one).

    Raises ValueError for a name outside STRATEGIES, and for "multi_worker" when the TF_CONFIG environment
    variable is unset or not valid JSON.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        config = os.environ.get("TF_CONFIG")
        if not config:
            raise ValueError(
                "strategy 'multi_worker' reads the cluster from the TF_CONFIG environment variable, "
                'which is not set. Set it on every machine, e.g. TF_CONFIG=\'{"cluster": {"worker": '
                '["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}\' '
                "(index 1 on the second machine), or use strategy='mirrored' for one machine."
            )
        try:
            json.loads(config)
        except json.JSONDecodeError as err:
            raise ValueError(f"TF_CONFIG is not valid JSON ({err}): {config[:200]}") from err
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be one of {STRATEGIES}, received {name!r}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process is the chief (worker 0 when the cluster names no chief): the one that writes."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def prepare(model: SCMix, strategy: tf.distribute.Strategy) -> SCMix:
    """Make a compiled `SCMix` (built in `strategy.scope()`) train correctly on several replicas.

    Both optimizers are built over their own variables inside the scope (Keras would otherwise build them
    lazily inside a replica, where variables cannot be created). The optimizers sum the gradients over
    replicas, and each replica's loss is a mean over its own cells: `loss_scale_factor` = replicas
    divides the sum back to the mean over the global batch. Returns the same model, changed in place.
    """
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model.build_optimizers()
    if replicas > 1:
        model.optimizer.loss_scale_factor = float(replicas)
        model.classifier_optimizer.loss_scale_factor = float(replicas)
    return model


def fit(
    model: SCMix,
    strategy: tf.distribute.Strategy,
    dataset: tf.data.Dataset | tf.distribute.DistributedDataset,
    epochs: int = 1,
    steps_per_epoch: int = 1,
    callbacks: Iterable[keras.callbacks.Callback] = (),
    verbose: int = 1,
) -> keras.callbacks.History:
    """Train `model` under `strategy` on a distributed `dataset`; returns the Keras `History`.

    dataset: a repeating tf.data.Dataset or distributed dataset (`stream_dataset`) of minibatch dicts;
    `steps_per_epoch` steps make an epoch.

    One replica: `model.fit`. Several: a loop of `strategy.run(model.train_step)` with the logs averaged
    over replicas and Keras callbacks called as `fit` calls them. Keras 3's `fit` cannot be used there:
    it averages the first batch over replicas to build the model, which fails on sparse counts, and
    under MultiWorkerMirroredStrategy it reduces scalar logs over an axis they lack
    (tensorflow/tensorflow#72388).
    """
    import keras
    import tensorflow as tf

    if strategy.num_replicas_in_sync == 1 and getattr(strategy, "cluster_resolver", None) is None:
        return model.fit(
            dataset,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=list(callbacks),
            verbose=verbose,
            shuffle=False,  # the dataset shuffles; Keras warns when asked to shuffle a tf.data.Dataset
        )

    @tf.function
    def step(iterator):
        logs = strategy.run(model.train_step, args=(next(iterator),))
        return {name: strategy.reduce("MEAN", value, axis=None) for name, value in logs.items()}

    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=True,
        add_progbar=verbose != 0,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
    )
    iterator = iter(dataset)
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        for batch in range(steps_per_epoch):
            callback_list.on_train_batch_begin(batch)
            logs = {name: float(value) for name, value in step(iterator).items()}
            callback_list.on_train_batch_end(batch, logs)
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    return model.history


def build(
    strategy: tf.distribute.Strategy,
    make_model: Callable[[], SCMix],
    learning_rate: float = 2e-3,
    jit_compile: bool | str = False,
) -> SCMix:
    """`make_model()` (an uncompiled SCMix) built and compiled inside `strategy.scope()`, then `prepare`d.

    Compiled with Adam(learning_rate); `jit_compile` goes to `compile` (SCMix declines XLA for the whole
    step: docs/performance.md, "XLA").
    """
    import keras

    with strategy.scope():
        model = make_model()
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=jit_compile)
    return prepare(model, strategy)


def stream_dataset(
    strategy: tf.distribute.Strategy,
    stream: H5ADStream,
    global_batch_size: int,
    seed: int = 0,
    shard: bool = True,
    **kwargs: Any,
) -> tf.distribute.DistributedDataset:
    """A distributed dataset of `stream` (an `H5ADStream`) in which each worker reads its own chunks.

    Each replica gets `global_batch_size / replicas` cells per step. The dataset repeats: pass
    `steps_per_epoch` to `fit` (`steps_per_epoch(...)`), so that every worker runs the same number of steps.
    shard=False gives every worker every chunk (all replicas see the same cells; for tests). kwargs go to
    `H5ADStream.dataset` (e.g. shuffle, buffer_chunks). Raises ValueError, when iterated, if the file has
    fewer chunks than input pipelines (`H5ADStream.batches_numpy`).
    """
    import tensorflow as tf  # noqa: F401  (only `make`'s annotation reads it; kept to leave the code as it was)

    def make(context: tf.distribute.InputContext):
        batch = context.get_per_replica_batch_size(global_batch_size)
        shards = context.num_input_pipelines if shard else 1
        index = context.input_pipeline_id if shard else 0
        return stream.dataset(batch, seed=seed, repeat=True, num_shards=shards, shard_index=index, **kwargs)

    return strategy.distribute_datasets_from_function(make)


def steps_per_epoch(n_cells: int, global_batch_size: int) -> int:
    """Whole global batches in one pass over `n_cells` cells (at least 1)."""
    return max(1, n_cells // global_batch_size)
