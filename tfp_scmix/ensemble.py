"""Ensemble stage: the class probabilities of several independently trained `SCMix` restarts, averaged.

Variational inference of a topic model finds one local optimum per run: restarts from other seeds learn
other topics, and their errors differ. Averaging their posterior predictive class probabilities (a
uniform mixture over the restarts' posteriors) removes part of those errors: on the pbmc3k few-shot
benchmark (150 labels, seeds 0-4) three restarts make 145 errors of 2000 where one model makes 156
(experiments/few_shot). This is why `train_model` trains three by default.
"""

import keras
import tensorflow as tf

from tfp_scmix.data import gene_fingerprint
from tfp_scmix.model import SCMix


@keras.saving.register_keras_serializable(package="tfp_scmix")
class SCMixEnsemble(keras.Model):
    """Several `SCMix` models over the same genes and classes, predicting together.

    `call` returns {"probs" [batch, n_classes] (the members' posterior predictive probabilities averaged),
    "label" [batch], "confidence" [batch], "topics" [batch, n_members * n_topics]}: member m's topic
    proportions fill columns m * n_topics to (m + 1) * n_topics (each block sums to one), since topics
    of different restarts are different topics. `topics(None)` is the matching `[n_members * n_topics,
    n_genes]` topic-gene table. Explanations read one member (`members[0]` by default): each member's
    class-predictive topics are its own.
    """

    def __init__(self, members, **kwargs):
        super().__init__(**kwargs)
        members = [keras.saving.deserialize_keras_object(m) if isinstance(m, dict) else m for m in members]
        if not members or not all(isinstance(m, SCMix) for m in members):
            raise ValueError(f"an ensemble needs one or more SCMix models, received {members!r}")
        first = members[0]
        for m in members[1:]:
            if m.genes != first.genes or m.class_names != first.class_names:
                raise ValueError("every member of an ensemble must have the same genes and classes, in the same "
                                 "order: train them on the same data")
        self.members = members
        self.genes, self.class_names, self.provenance = first.genes, first.class_names, first.provenance
        self.n_genes, self.n_classes = first.n_genes, first.n_classes
        self.n_topics = sum(m.n_topics for m in members)
        self.settings = {**first.settings, "n_members": len(members)}
        self.built = True

    @property
    def gene_fingerprint(self):
        return gene_fingerprint(self.genes)

    def topics(self, inputs=None):
        """Every member's posterior-mean topic-gene distributions, stacked: `[n_members * n_topics, n_genes]`."""
        return tf.concat([m.topics(inputs) for m in self.members], axis=0)

    def call(self, inputs, training=False):
        outputs = [m(inputs, training=training) for m in self.members]
        probs = tf.add_n([o["probs"] for o in outputs]) / len(outputs)
        return {"probs": probs, "label": tf.argmax(probs, axis=-1, output_type=tf.int32),
                "confidence": tf.reduce_max(probs, axis=-1),
                "topics": tf.concat([o["topics"] for o in outputs], axis=-1)}

    def adapt(self, query, **kwargs):
        """Each member's `adapt` on the query (its own batch offsets fitted), class probabilities averaged."""
        outputs = [m.adapt(query, **kwargs) for m in self.members]
        probs = sum(o["probs"] for o in outputs) / len(outputs)
        return {"probs": probs, "label": probs.argmax(axis=1).astype("int32"), "confidence": probs.max(axis=1),
                "topics": tf.concat([o["topics"] for o in outputs], axis=-1).numpy()}

    def export_serving(self, path, overwrite=False):
        """Write a TensorFlow SavedModel for serving at `path` (atomically); see tfp_scmix.export."""
        from tfp_scmix.export import export_serving

        return export_serving(self, path, overwrite=overwrite)

    def get_config(self):
        return {**super().get_config(), "members": [keras.saving.serialize_keras_object(m) for m in self.members],
                "provenance": self.provenance}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("provenance", None)  # the members carry it
        return cls(**config)


def single_model(model, member=0):
    """The `SCMix` to explain: the model itself, or one member of an ensemble."""
    return model.members[member] if isinstance(model, SCMixEnsemble) else model
