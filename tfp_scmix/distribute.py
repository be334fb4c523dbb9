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

STRATEGIES = ("default", "mirrored", "multi_worker")


def get_strategy(name="default", devices=None):
    """The `tf.distribute.Strategy` for a setting in STRATEGIES; `devices` only for "mirrored"."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        config = os.environ.get("TF_CONFIG")
        if not config:
            raise ValueError("strategy 'multi_worker' reads the cluster from the TF_CONFIG environment variable, "
                             "which is not set. Set it on every machine, e.g. TF_CONFIG='{\"cluster\": {\"worker\": "
                             "[\"host1:2222\", \"host2:2222\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}' "
                             "(index 1 on the second machine), or use strategy='mirrored' for one machine.")
        try:
            json.loads(config)
        except json.JSONDecodeError as err:
            raise ValueError(f"TF_CONFIG is not valid JSON ({err}): {config[:200]}") from err
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be one of {STRATEGIES}, received {name!r}")


def is_chief(strategy) -> bool:
    """Whether this process is the chief (worker 0 when the cluster names no chief): the one that writes."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def prepare(model, strategy):
    """Make a compiled `SCMix` (built in `strategy.scope()`) train correctly on several replicas.

    Both optimizers are built over their own variables inside the scope (Keras would otherwise build them
    lazily inside a replica, where variables cannot be created). The optimizers sum the gradients over
    replicas, and each replica's loss is a mean over its own cells: `loss_scale_factor` = replicas
    divides the sum back to the mean over the global batch.
    """
    replicas = strategy.num_replicas_in_sync
    others, classifier = model._variable_groups()
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(others)
        if not model.classifier_optimizer.built:
            model.classifier_optimizer.build(classifier)
    if replicas > 1:
        model.optimizer.loss_scale_factor = float(replicas)
        model.classifier_optimizer.loss_scale_factor = float(replicas)
    return model


def fit(model, strategy, dataset, epochs=1, steps_per_epoch=1, callbacks=(), verbose=1):
    """Train `model` under `strategy` on a distributed `dataset`; returns the Keras `History`.

    One replica: `model.fit`. Several: a loop of `strategy.run(model.train_step)` with the logs averaged
    over replicas and Keras callbacks called as `fit` calls them. Keras 3's `fit` cannot be used there:
    it averages the first batch over replicas to build the model, which fails on sparse counts, and
    under MultiWorkerMirroredStrategy it reduces scalar logs over an axis they lack
    (tensorflow/tensorflow#72388).
    """
    import keras
    import tensorflow as tf

    if strategy.num_replicas_in_sync == 1 and getattr(strategy, "cluster_resolver", None) is None:
        return model.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=list(callbacks),
                         verbose=verbose)

    @tf.function
    def step(iterator):
        logs = strategy.run(model.train_step, args=(next(iterator),))
        return {name: strategy.reduce("MEAN", value, axis=None) for name, value in logs.items()}

    callback_list = keras.callbacks.CallbackList(list(callbacks), add_history=True, add_progbar=verbose != 0,
                                                 model=model, verbose=verbose, epochs=epochs, steps=steps_per_epoch)
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


def build(strategy, make_model, learning_rate=2e-3, jit_compile=False):
    """`make_model()` (an uncompiled SCMix) built and compiled inside `strategy.scope()`, then `prepare`d."""
    import keras

    with strategy.scope():
        model = make_model()
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=jit_compile)
    return prepare(model, strategy)


def stream_dataset(strategy, stream, global_batch_size, seed=0, shard=True, **kwargs):
    """A distributed dataset of `stream` (an `H5ADStream`) in which each worker reads its own chunks.

    Each replica gets `global_batch_size / replicas` cells per step. The dataset repeats: pass
    `steps_per_epoch` to `fit` (`steps_per_epoch(...)`), so that every worker runs the same number of steps.
    shard=False gives every worker every chunk (all replicas see the same cells; for tests).
    """
    import tensorflow as tf

    def make(context: tf.distribute.InputContext):
        batch = context.get_per_replica_batch_size(global_batch_size)
        shards = context.num_input_pipelines if shard else 1
        index = context.input_pipeline_id if shard else 0
        return stream.dataset(batch, seed=seed, repeat=True, num_shards=shards, shard_index=index, **kwargs)

    return strategy.distribute_datasets_from_function(make)


def steps_per_epoch(n_cells, global_batch_size):
    """Whole global batches in one pass over `n_cells` cells (at least 1)."""
    return max(1, n_cells // global_batch_size)
