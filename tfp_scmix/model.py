"""The model: topic, cell and classification branches trained end to end on the negative ELBO."""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_scmix.data import BATCH, COUNTS, LABEL, SCData, gene_fingerprint
from tfp_scmix.layers import PRIOR_VARIANTS, BatchOffsets, CellEncoder, ClassBranch, TopicBranch
from tfp_scmix.layers.horseshoe import default_global_scale
from tfp_scmix.loss import ELBO_TERMS, as_sparse, multinomial_log_prob

LABEL_MODES = ("cut", "joint", "class_prior")


def topic_features(log_cell_topic):
    """Classifier input: centred log topic proportions `[batch, n_topics]` (the centred log-ratio).

    Centring removes each cell's arbitrary log-scale offset, so that the prior on the class weights
    sees features of comparable size (rarely used topics have log proportions down to about -15).
    """
    return log_cell_topic - tf.reduce_mean(log_cell_topic, axis=-1, keepdims=True)


@keras.saving.register_keras_serializable(package="tfp_scmix")
class SCMix(keras.Model):
    """Joint topic model and few-shot classifier of single-cell counts.

    Generative model: topic_gene_k ~ logistic-normal around the background profile; cell_topic_n ~
    logistic-normal(Laplace approximation of Dirichlet(prior_alpha)); counts_n ~ Multinomial(library_n,
    cell_topic_n @ topic_gene); label_n ~ Categorical(softmax(W log cell_topic_n + c)) where known,
    W under the `prior` of the horseshoe family.

    Loss (per minibatch; each branch's terms scaled by the size of the data it explains):
      reconstruction + warm-up * (kl_cell + kl_topic)   per count
      + label_weight * (label_nll + kl_class)           per labelled cell
    label_mode says how labels reach the topics: "cut" (the classifier reads the topics, its gradient
    stops there), "joint" (the label term trains the encoder too), or "class_prior" (each class has its
    own centre of the topic prior, so labels shape topics generatively).

    `call` is deterministic: {"probs" [batch, n_classes] (posterior predictive over fixed draws of W),
    "label" [batch], "confidence" [batch], "topics" [batch, n_topics]}.
    """

    def __init__(self, genes, class_names, n_topics=50, hidden_units=256, dropout=0.2, prior="regularized",
                 label_mode="cut", label_weight=1.0, prior_alpha=0.5, learn_alpha=False, kl_warmup_epochs=20,
                 n_cells=1, n_labelled=1, total_counts=1.0, expected_active_topics=None, global_scale=None,
                 slab_scale=2.0, slab_df=None, label_noise=None, topic_prior_scale=1.0,
                 n_predictive_samples=32, classifier_learning_rate=0.02, n_batches=1, seed=0, provenance=None,
                 **kwargs):
        super().__init__(**kwargs)
        # The training step has sparse ops without XLA kernels (sparse-dense products, sorted segment sums):
        # Keras's jit_compile="auto", which turns XLA on where there is a GPU, must leave it off. The nonzero
        # product of the likelihood is compiled with XLA on its own (tfp_scmix.sparse_ops).
        self.supports_jit = False
        if prior not in PRIOR_VARIANTS:
            raise ValueError(f"prior must be one of {PRIOR_VARIANTS}, received {prior!r}")
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, received {label_mode!r}")
        if len(class_names) < 2:
            raise ValueError(f"a classifier needs at least two classes, received {list(class_names)}")
        self.genes, self.class_names = [str(g) for g in genes], [str(c) for c in class_names]
        # Library versions and the fingerprint of the training data (tfp_scmix.reliability.provenance).
        self.provenance = dict(provenance or {})
        self.n_genes, self.n_classes, self.n_topics = len(self.genes), len(self.class_names), int(n_topics)
        if expected_active_topics is None:
            expected_active_topics = self.n_topics / 2
        if global_scale is None:
            global_scale = default_global_scale(self.n_topics, n_labelled, expected_active_topics)
        self.settings = dict(
            n_topics=self.n_topics, hidden_units=int(hidden_units), dropout=float(dropout), prior=prior,
            label_mode=label_mode, label_weight=float(label_weight), prior_alpha=float(prior_alpha),
            learn_alpha=bool(learn_alpha), kl_warmup_epochs=float(kl_warmup_epochs), n_cells=int(n_cells),
            n_labelled=int(max(n_labelled, 1)), total_counts=float(total_counts),
            expected_active_topics=float(expected_active_topics), global_scale=float(global_scale),
            slab_scale=float(slab_scale), slab_df=slab_df, label_noise=label_noise,
            topic_prior_scale=float(topic_prior_scale), n_predictive_samples=int(n_predictive_samples),
            classifier_learning_rate=float(classifier_learning_rate), n_batches=int(n_batches), seed=int(seed))
        self.topics = TopicBranch(self.n_topics, self.n_genes, topic_prior_scale, name="topic_branch")
        self.encoder = CellEncoder(self.n_genes, self.n_topics, hidden_units, dropout, prior_alpha, learn_alpha,
                                   name="cell_branch")
        self.classifier = ClassBranch(self.n_classes, self.n_topics, prior, global_scale, slab_scale, slab_df,
                                      label_noise, n_predictive_samples, name="class_branch")
        self.batch_offsets = BatchOffsets(n_batches, self.n_genes, name="batch_offsets")
        if label_mode == "class_prior":
            self.class_centres = self.add_weight(shape=(self.n_classes, self.n_topics), initializer="zeros",
                                                 name="class_centres")
        self.cells_seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="cells_seen")
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")
        # The classification branch sees ~150 labelled cells a few at a time: it gets its own, faster
        # optimizer so that it converges within the epochs the topics need.
        self.classifier_optimizer = keras.optimizers.Adam(classifier_learning_rate, name="classifier_optimizer")
        self.trackers = {name: keras.metrics.Mean(name=name)
                         for name in ELBO_TERMS + ("label_accuracy", "topic_usage")}
        self.built = True

    @classmethod
    def from_data(cls, data: SCData, **settings):
        """A model sized for `data`, with the topic background set from its mean expression."""
        from tfp_scmix.reliability import provenance  # reliability imports the package root, which imports us

        settings.setdefault("provenance", provenance(data))
        model = cls(genes=list(data.genes), class_names=list(data.classes), n_cells=data.n_cells,
                    n_labelled=data.n_labelled, total_counts=float(data.library_size.sum()),
                    n_batches=len(data.batch_names), **settings)
        model.topics.set_background(np.asarray(data.counts.mean(axis=0)).ravel())
        return model

    def export_serving(self, path, overwrite=False):
        """Write a TensorFlow SavedModel for serving at `path` (atomically); see tfp_scmix.export."""
        from tfp_scmix.export import export_serving

        return export_serving(self, path, overwrite=overwrite)

    @property
    def gene_fingerprint(self):
        return gene_fingerprint(self.genes)

    @property
    def metrics(self):
        return list(self.trackers.values())

    # -- the deterministic forward pass --------------------------------------------------------
    @staticmethod
    def _unpack(inputs):
        """(counts, batch ids `[batch]`) from a minibatch dict or a bare count matrix (batch 0)."""
        counts = inputs[COUNTS] if isinstance(inputs, dict) else inputs
        batch_ids = inputs.get(BATCH) if isinstance(inputs, dict) else None
        if batch_ids is None:
            batch_ids = tf.zeros(tf.shape(counts, out_type=tf.int64)[:1], tf.int32)
        return counts, tf.cast(batch_ids, tf.int32)

    def encode(self, counts, batch_ids, training=False):
        """q(cell_topic) (loc, scale) `[batch, n_topics]` from counts with their batch's offsets divided out."""
        return self.encoder(counts, batch_ids, self.batch_offsets.loc, training=training)

    def call(self, inputs, training=False):
        counts, batch_ids = self._unpack(inputs)
        loc, _ = self.encode(counts, batch_ids, training=training)
        probs = self.classifier(topic_features(loc))
        return {"probs": probs, "label": tf.argmax(probs, axis=-1, output_type=tf.int32),
                "confidence": tf.reduce_max(probs, axis=-1), "topics": tf.nn.softmax(loc, axis=-1)}

    # -- a new dataset ----------------------------------------------------------------------------
    def adapt(self, query: SCData, epochs=30, batch_size=256, learning_rate=5e-2, shrinkage=None, verbose=0):
        """Fit the query dataset's own batch offsets on its unlabelled counts, then predict it.

        Every global parameter (topics, encoder, classifier, the offsets' shrinkage scale and the
        reference batches' offsets) stays frozen; only a new offset row for the query is fitted by the
        same ELBO (count terms). The model itself is not changed: a copy with one more batch is fitted.
        shrinkage: the offsets' prior scale. By default the learned one; a model trained on a single batch
        has learned nothing about differences between datasets (its scale shrinks to near zero), so there
        the default is a weakly informative 1.0 (a factor of e per standard deviation).
        Returns the predictions for the query cells (the dict of `predict`).
        """
        if list(query.genes) != self.genes:
            raise ValueError("adapt needs the query in the model's gene order: build it with "
                             "from_anndata(adata, genes=model.genes, label_key=None)")
        config = {**self.get_config(), "n_batches": self.settings["n_batches"] + 1}
        adapted = type(self).from_config(config)
        reference = {w.path: w for w in self.weights}
        for weight in adapted.weights:
            value = reference[weight.path].numpy()
            if weight.shape != value.shape:  # the offsets: reference rows, then a zero row for the query
                value = np.concatenate([value, weight.numpy()[-1:]], axis=0)
            weight.assign(value)
        row = self.settings["n_batches"]
        query = dataclasses.replace(query, batches=np.full(query.n_cells, row, np.int32))
        offsets = adapted.batch_offsets
        if shrinkage is None and row == 1:
            shrinkage = 1.0
        if shrinkage is not None:
            offsets.shrinkage_raw.assign(float(tfp.math.softplus_inverse(float(shrinkage))))
        variables = [offsets.loc, offsets.scale_raw]
        only_query = tf.one_hot(row, row + 1)[:, None]
        optimizer = keras.optimizers.Adam(learning_rate)
        total_counts = float(query.library_size.sum())

        @tf.function
        def step(batch):
            with tf.GradientTape() as tape:
                terms = adapted.elbo_terms(batch, training=False)
                loss = terms["reconstruction"] + terms["kl_cell"] + offsets.kl() / total_counts
            optimizer.apply([g * only_query for g in tape.gradient(loss, variables)], variables)
            return loss

        progress = keras.utils.Progbar(epochs, verbose=verbose, unit_name="epoch")
        for epoch in range(epochs):
            for batch in query.dataset(batch_size, seed=epoch):
                loss = step(batch)
            progress.update(epoch + 1, [("loss", float(loss))])
        return adapted.predict(query.dataset(batch_size, shuffle=False), verbose=0)

    # -- the classification branch to convergence ----------------------------------------------
    def fit_classifier(self, data: SCData, steps=2000, learning_rate=0.02, batch_size=1024, verbose=0):
        """Fit the classification branch to convergence on the labelled cells of `data`, topics fixed.

        Minimises the label part of the loss (mean label_nll + kl_class) on the posterior-mean topics,
        full batch. In the "cut" mode the classifier never changes the topics, so this is exact
        coordinate ascent on the same objective; the minibatch updates during `fit` see only the few
        labelled cells of each batch and stop short of convergence. Returns the final loss.
        """
        labelled = np.flatnonzero(data.labels >= 0)
        if labelled.size == 0:
            raise ValueError("fit_classifier needs labelled cells; every label in the data is unknown (-1)")
        topics = self.predict(data.subset(labelled).dataset(batch_size, shuffle=False), verbose=0)["topics"]
        features = topic_features(tf.constant(np.log(np.maximum(topics, 1e-30)), tf.float32))
        labels = tf.constant(data.labels[labelled], tf.int32)
        # Decaying the step size lets the Monte Carlo gradients settle on the optimum.
        optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps))
        variables = self.classifier.trainable_variables
        n_labelled = float(self.settings["n_labelled"])

        @tf.function
        def step(seed):
            with tf.GradientTape() as tape:
                log_probs, kl = self.classifier.sample_log_probs(features, seed)
                loss = -tf.reduce_mean(tf.gather(log_probs, labels, batch_dims=1)) + kl / n_labelled
            optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

        progress = keras.utils.Progbar(steps, verbose=verbose, unit_name="step")
        for i in range(steps):
            loss = step(tf.constant([self.settings["seed"], i], tf.int32))
            if verbose and (i + 1) % 100 == 0:
                progress.update(i + 1, [("classifier_loss", float(loss))])
        return float(loss)

    # -- the loss -------------------------------------------------------------------------------
    def elbo_terms(self, inputs, training=False):
        """Named terms of the negative ELBO for one minibatch (scalars), plus diagnostics."""
        s = self.settings
        counts, batch_ids = self._unpack(inputs)
        counts = as_sparse(counts)
        loc, scale = self.encode(counts, batch_ids, training=training)
        n_cells = tf.shape(loc)[0]
        labels = inputs.get(LABEL, tf.fill([n_cells], -1))
        seeds = tfp.random.split_seed(tf.cast(self.seed_generator.next(), tf.int32), n=4)

        # Cell and topic branches: one reparameterized draw each.
        z = loc + scale * tf.random.stateless_normal(tf.shape(loc), seed=seeds[0])
        log_cell_topic = tf.nn.log_softmax(z, axis=-1)
        log_likelihood = multinomial_log_prob(counts, log_cell_topic, self.topics.sample_log_topic_gene(seeds[1]),
                                              self.batch_offsets.sample(seeds[3]), batch_ids)
        n_counts = tf.reduce_sum(counts.values)

        # Classification branch, on the posterior-mean topics and on the draw, with one draw of W.
        features = topic_features(tf.concat([loc, z], axis=0))
        if s["label_mode"] != "joint":
            features = tf.stop_gradient(features)
        log_probs, kl_class = self.classifier.sample_log_probs(features, seeds[2])
        labelled = labels >= 0
        safe_labels = tf.maximum(labels, 0)
        nll = -tf.gather(log_probs, tf.tile(safe_labels, [2]), batch_dims=1)
        mask = tf.cast(tf.tile(labelled, [2]), tf.float32)
        n_labelled = tf.reduce_sum(mask)
        label_nll = tf.math.divide_no_nan(tf.reduce_sum(nll * mask), n_labelled)

        prior_shift = 0.0
        if s["label_mode"] == "class_prior":
            # Known labels pick their class centre; other cells use the classifier's expectation.
            responsibility = tf.where(labelled[:, None], tf.one_hot(safe_labels, self.n_classes),
                                      tf.stop_gradient(tf.exp(log_probs[:n_cells])))
            prior_shift = tf.matmul(responsibility, self.class_centres)
        kl_cell = tf.reduce_sum(self.encoder.kl(loc, scale, prior_shift)) / n_counts

        warmup = 1.0
        if s["kl_warmup_epochs"] > 0:
            warmup = tf.minimum(1.0, (self.cells_seen + 1.0) / (s["kl_warmup_epochs"] * s["n_cells"]))
        terms = {
            "reconstruction": -tf.reduce_sum(log_likelihood) / n_counts,
            "kl_cell": kl_cell,
            "kl_topic": self.topics.kl() / s["total_counts"],
            "kl_class": kl_class / s["n_labelled"],
            "kl_batch": self.batch_offsets.kl() / s["total_counts"],
            "label_nll": label_nll,
        }
        terms["loss"] = (terms["reconstruction"] + warmup * (terms["kl_cell"] + terms["kl_topic"]) + terms["kl_batch"]
                         + s["label_weight"] * (terms["label_nll"] + terms["kl_class"]))
        correct = tf.cast(tf.equal(tf.argmax(log_probs[:n_cells], -1, output_type=tf.int32), labels), tf.float32)
        terms["label_accuracy"] = (tf.reduce_sum(correct), tf.reduce_sum(tf.cast(labelled, tf.float32)))
        mean_topic = tf.reduce_mean(tf.nn.softmax(loc, axis=-1), axis=0)
        terms["topic_usage"] = tf.exp(-tf.reduce_sum(mean_topic * tf.math.log(mean_topic + 1e-12)))
        return terms

    def _update_metrics(self, terms):
        for name, tracker in self.trackers.items():
            if name == "label_accuracy":
                hits, total = terms[name]
                tracker.update_state(tf.math.divide_no_nan(hits, total), sample_weight=total)
            else:
                tracker.update_state(terms[name])
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    @staticmethod
    def _inputs(data):
        return data[0] if isinstance(data, (tuple, list)) else data

    def _variable_groups(self):
        """(variables of the main optimizer, variables of the classifier optimizer)."""
        classifier_ids = {id(v) for v in self.classifier.trainable_variables}
        others = [v for v in self.trainable_variables if id(v) not in classifier_ids]
        return others, self.classifier.trainable_variables

    def compile_from_config(self, config):
        # Keras would build the optimizer over every variable; build each optimizer over its own group
        # so that a saved optimizer state (needed to resume training) loads back.
        built, self.built = self.built, False
        super().compile_from_config(config)
        self.built = built
        self.build_optimizers()

    def build_optimizers(self):
        """Build both optimizers over their own variable groups (so a saved optimizer state loads)."""
        others, classifier = self._variable_groups()
        self.optimizer.build(others)
        self.classifier_optimizer.build(classifier)

    def train_step(self, data):
        inputs = self._inputs(data)
        with tf.GradientTape() as tape:
            terms = self.elbo_terms(inputs, training=True)
        others, classifier = self._variable_groups()
        gradients = tape.gradient(terms["loss"], [others, classifier])
        self.optimizer.apply(gradients[0], others)
        self.classifier_optimizer.apply(gradients[1], classifier)
        self.cells_seen.assign_add(tf.cast(tf.shape(inputs[LABEL])[0], tf.float32))
        return self._update_metrics(terms)

    def test_step(self, data):
        return self._update_metrics(self.elbo_terms(self._inputs(data), training=False))

    def get_config(self):
        return {**super().get_config(), "genes": self.genes, "class_names": self.class_names,
                "provenance": self.provenance, **self.settings}



