"""Ensemble stage: the class probabilities of several independently trained `SCMix` restarts, averaged.

Variational inference of a topic model finds one local optimum per run: restarts from other seeds learn
other topics, and their errors differ. Averaging their posterior predictive class probabilities (a
uniform mixture over the restarts' posteriors) removes part of those errors (the restarts rows of
experiments/few_shot/report.md). `tfp_scmix.train` always returns an `SCMixEnsemble`, of one member
when `restarts=1`.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from tfp_scmix.data import FORMATS, gene_fingerprint
from tfp_scmix.model import SCMix, outputs
from tfp_scmix.novelty import TopicNovelty


@keras.saving.register_keras_serializable(package="tfp_scmix")
class SCMixEnsemble(keras.Model):
    """One or more `SCMix` restarts over the same genes and classes, predicting together.

    `call` returns {"probs" [batch, n_classes] (the members' posterior predictive probabilities averaged),
    "label" [batch], "confidence" [batch], "cell_topic" [batch, n_members * n_topics]}: member m's topic
    proportions fill columns m * n_topics to (m + 1) * n_topics (each block sums to one), since topics
    of different restarts are different topics. `topic_gene()` is the matching `[n_members * n_topics,
    n_genes]` table. With one member it predicts exactly as that member.
    novelty: the `TopicNovelty` detector of its training cells (`tfp_scmix.train` fits it; saved with the
    model), or None (then `annotate` flags no novel cells).
    Raises ValueError for no members, a member that is not an `SCMix`, or members of other genes or classes.
    """

    def __init__(self, members, novelty: TopicNovelty | dict | None = None, **kwargs):
        super().__init__(**kwargs)
        members = [keras.saving.deserialize_keras_object(m) if isinstance(m, dict) else m for m in members]
        if not members or not all(isinstance(m, SCMix) for m in members):
            raise ValueError(f"an ensemble needs one or more SCMix models, received {members!r}")
        first = members[0]
        for m in members[1:]:
            if m.genes != first.genes or m.class_names != first.class_names:
                raise ValueError(
                    "every member of an ensemble must have the same genes and classes, in the same "
                    "order: train them on the same data"
                )
        self.members = members  # a plain list attribute: Keras tracks and saves each member
        self.genes, self.class_names, self.provenance = first.genes, first.class_names, first.provenance
        self.n_genes, self.n_classes = first.n_genes, first.n_classes
        self.batch_names = first.batch_names  # the trained batches' names (`SCMix.batch_names`), the same data's
        self.n_topics = sum(m.n_topics for m in members)
        self.config = first.config
        self.settings = {**first.settings, "restarts": len(members)}
        self.novelty = TopicNovelty.from_dict(novelty) if isinstance(novelty, dict) else novelty
        self.built = True

    @property
    def gene_fingerprint(self) -> str:
        return gene_fingerprint(self.genes)

    def topic_gene(self) -> tf.Tensor:
        """Every member's posterior-mean topic-gene distributions, stacked: `[n_members * n_topics, n_genes]`."""
        return tf.concat([m.topic_gene() for m in self.members], axis=0)

    def predictive_tables(self) -> list[dict[str, tf.Tensor]]:
        """Every member's `SCMix.predictive_tables()`, for `predict_with`."""
        return [m.predictive_tables() for m in self.members]

    def predict_with(self, tables: list[dict[str, tf.Tensor]], inputs, training=False) -> dict[str, tf.Tensor]:
        """`call`'s outputs from `predictive_tables()` computed beforehand (see `SCMix.predict_with`)."""
        return self._average(
            [m.predict_with(t, inputs, training=training) for m, t in zip(self.members, tables, strict=True)]
        )

    def predict_from_product(
        self, tables: list[dict[str, tf.Tensor]], products, training=False
    ) -> dict[str, tf.Tensor]:
        """`predict_with`'s outputs from each member's first-layer product (a list of `[batch, kernel columns]`,
        see `SCMix.predict_from_product`: the members' batch offsets and kernels differ)."""
        members = [
            m.predict_from_product(t, p, training=training)
            for m, t, p in zip(self.members, tables, products, strict=True)
        ]
        return self._average(members)

    def _average(self, members: list[dict[str, tf.Tensor]]) -> dict[str, tf.Tensor]:
        if len(members) == 1:
            return members[0]
        probs = tf.add_n([o["probs"] for o in members]) / len(members)
        return outputs(probs, tf.concat([o["cell_topic"] for o in members], axis=-1))

    def call(self, inputs, training=False):
        return self.predict_with(self.predictive_tables(), inputs, training=training)

    save = SCMix.save  # atomic, through tfp_scmix.save_model

    def get_config(self):
        return {
            **super().get_config(),
            "members": [keras.saving.serialize_keras_object(m) for m in self.members],
            "provenance": self.provenance,
            "novelty": None if self.novelty is None else self.novelty.to_dict(),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("provenance", None)  # the members carry it
        return cls(**config)


# Endings of the paths of datasets (not models), for the message of a model and its data given the wrong way round:
# the files `tfp_scmix.data.read` reads (`FORMATS`, a 10x folder's .mtx(.gz)) and other tables of counts.
DATA_SUFFIXES = (*(s for s in FORMATS if s.startswith(".")), ".mtx", ".gz", ".csv", ".tsv", ".txt", ".zarr")


def as_ensemble(model: SCMix | SCMixEnsemble) -> SCMixEnsemble:
    """`model` itself if an ensemble, else an ensemble of the one `SCMix` (which predicts the same).

    Raises TypeError for anything else, with the fix for a model's path (`tfp_scmix.load_model`)."""
    if isinstance(model, SCMixEnsemble):
        return model
    if isinstance(model, SCMix):
        return SCMixEnsemble([model])
    if isinstance(model, (str, os.PathLike)) and (
        os.path.isdir(model) or os.path.splitext(str(model))[1].lower() in DATA_SUFFIXES
    ):
        hint = (
            f": {str(model)!r} is the path of a dataset, not of a model. The model comes first, the data second: "
            "predict(model, data), with model = tfp_scmix.load_model('model.keras')"
        )
    elif isinstance(model, (str, os.PathLike)):
        hint = f": load the saved model first, model = tfp_scmix.load_model({str(model)!r})"
    elif hasattr(model, "obs_names") or hasattr(model, "n_cells"):
        hint = ": that is a dataset. The model comes first, the data second: predict(model, data)"
    else:
        hint = " (tfp_scmix.train returns one; tfp_scmix.load_model reads one from a .keras file)"
    raise TypeError(f"expected a model (SCMix or SCMixEnsemble), received {type(model).__name__}{hint}")


class NotTrainedError(ValueError):
    """A model that has not been trained was given where a trained one is needed (`trained`)."""


def trained(model: SCMix | SCMixEnsemble, action: str) -> SCMix | SCMixEnsemble:
    """`model` itself once every member has been trained: has taken at least one training step (`SCMix.cells_seen`,
    the cells its training steps have read, above zero).

    action: what the caller does with the model, for the message ("predict", "explain", ...). An untrained
    model's calls are its random initial weights: confident-looking labels with no meaning, and gene weights of 0.
    Raises NotTrainedError (a ValueError) for a model with an untrained member, TypeError as `as_ensemble` for
    something that is not a model."""
    if isinstance(model, SCMixEnsemble):
        members = model.members
    elif isinstance(model, SCMix):
        members = [model]  # not wrapped in an ensemble: building a Keras model costs milliseconds a call
    else:
        members = as_ensemble(model).members  # raises its TypeError: not a model
    untrained = [i for i, m in enumerate(members) if not float(m.cells_seen.numpy()) > 0]
    if untrained:
        which = "the model" if len(members) == 1 else f"member(s) {untrained} of the ensemble"
        raise NotTrainedError(
            f"cannot {action}: {which} has not been trained (no training step has read a cell), so its calls "
            "would be its random initial weights. Train it first: model = tfp_scmix.train(data, ...), or on the "
            "plain Keras path model.fit(data.dataset(...), ...) (README), or load a trained one with "
            "tfp_scmix.load_model(path)."
        )
    return model
