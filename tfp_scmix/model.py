"""Model stage: topic, cell and classification branches trained end to end on the negative ELBO."""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_scmix import __version__
from tfp_scmix.config import Config
from tfp_scmix.data import BATCH, COUNTS, LABEL, NEW_BATCH, DataError, SCData, gene_fingerprint, log_normalised
from tfp_scmix.layers import BatchOffsets, CellEncoder, ClassBranch, TopicBranch
from tfp_scmix.layers.cell import divide_offsets, normalise_counts
from tfp_scmix.layers.horseshoe import default_global_scale
from tfp_scmix.loss import ELBO_TERMS, as_sparse, multinomial_log_prob
from tfp_scmix.propagate import self_training_labels, with_known_labels
from tfp_scmix.stream import H5ADStream

# Sizes that come from the data: required by the constructor, never defaulted (they scale the loss).
DATA_SIZES = ("n_cells", "n_labelled", "total_counts", "n_batches")
# Cells the self-training refit of the classification branch reads at most (every labelled one and a
# sample of the others): the kNN graph and the full-batch fit stay small whatever the data's size.
SELF_TRAINING_CELLS = 5000
# The self-training fit starts from the fitted branch: a quarter of the refit's steps.
SELF_TRAINING_SHARE = 4
STEPS_PER_CALL = 100  # classifier refit steps per traced call (_fit_class_branch)


def balanced_class_weights(targets: np.ndarray) -> np.ndarray:
    """Weights `[n_classes]` of scikit-learn's `class_weight="balanced"` for class probabilities `targets`
    `[n_cells, n_classes]` (one-hot for known labels): n / (k n_c), n the cells, n_c the mass of class c
    among them, k the classes with any mass; 0 for a class without mass. One-hot targets times these weights
    keep their total mass n (King & Zeng 2001; scikit-learn's `compute_class_weight`)."""
    mass = np.asarray(targets, np.float64).sum(axis=0)
    present = mass > 0
    weights = np.zeros_like(mass)
    weights[present] = mass.sum() / (present.sum() * mass[present])
    return weights


def self_training_cells(labels: np.ndarray, seed: int) -> np.ndarray:
    """The cells `SCMix.fit_classifier`'s self-training reads (sorted index `[n]`): every labelled one
    (label >= 0) and a sample, seeded by `seed`, of the others, `SELF_TRAINING_CELLS` in all at most."""
    labels = np.asarray(labels)
    labelled, others = np.flatnonzero(labels >= 0), np.flatnonzero(labels < 0)
    sample = np.random.default_rng(seed).choice(
        others, min(others.size, max(SELF_TRAINING_CELLS - labelled.size, 0)), replace=False
    )
    return np.sort(np.concatenate([labelled, sample]))


def library_versions() -> dict[str, str]:
    """Versions of the package and of the libraries its numbers depend on."""
    return {
        "tfp_scmix": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tensorflow_probability": tfp.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def provenance(data: SCData | H5ADStream) -> dict[str, Any]:
    """What a model records about how it was made: `library_versions()` and the data it was trained on (its
    fingerprint, cells, and labelled cells per class: {class name: count}, which `explain` shows beside each class)."""
    counts = np.bincount(data.labels[data.labels >= 0], minlength=len(data.classes))
    return {
        **library_versions(),
        "data_fingerprint": data.fingerprint(),
        "n_cells": int(data.n_cells),
        "labelled_cells": {str(name): int(n) for name, n in zip(data.classes, counts)},
    }


def gene_mean(data: SCData | H5ADStream) -> np.ndarray:
    """Mean `[n_genes]` of log1p counts per 10k over the cells of `data` (a stream: one pass over its chunks,
    memory bounded by a chunk)."""
    chunks = data.chunks() if isinstance(data, H5ADStream) else [(None, data.counts)]
    total = np.zeros(len(data.genes))
    for _, counts in chunks:
        total += np.asarray(log_normalised(counts).sum(axis=0)).ravel()
    return total / data.n_cells


def topic_features(log_cell_topic: tf.Tensor | np.ndarray) -> tf.Tensor:
    """Classifier input: centred log topic proportions `[batch, n_topics]` (the centred log-ratio).

    Centring removes each cell's arbitrary log-scale offset, so that the prior on the class weights
    sees features of comparable size (rarely used topics have log proportions down to about -15).
    """
    return log_cell_topic - tf.reduce_mean(log_cell_topic, axis=-1, keepdims=True)


def outputs(probs: tf.Tensor, cell_topic: tf.Tensor) -> dict[str, tf.Tensor]:
    """A model's outputs from its class probabilities `[batch, n_classes]` and topic proportions `[batch, topics]`:
    {"probs", "label" [batch], "confidence" [batch], "cell_topic"}."""
    return {
        "probs": probs,
        "label": tf.argmax(probs, axis=-1, output_type=tf.int32),
        "confidence": tf.reduce_max(probs, axis=-1),
        "cell_topic": cell_topic,
    }


@keras.saving.register_keras_serializable(package="tfp_scmix")
class SCMix(keras.Model):
    """Joint topic model and few-shot classifier of single-cell counts (one restart).

    Generative model: topic_gene_k ~ logistic-normal around the background profile; cell_topic_n ~
    logistic-normal(Laplace approximation of Dirichlet(prior_alpha)); counts_n ~ Multinomial(library_n,
    cell_topic_n @ topic_gene); label_n ~ Categorical(softmax(W log cell_topic_n + c)) where known,
    W under the `prior` of the horseshoe family.

    Loss (per minibatch; each branch's terms scaled by the size of the data it explains):
      reconstruction + warm-up * (kl_cell + kl_topic)   per count
      + label_weight * (label_nll + kl_class)           per labelled cell
    label_mode says how labels reach the topics: "joint" (the default: the label term trains the encoder
    too), "cut" (the classifier reads the topics, its gradient stops there), or "class_prior" (each class has its
    own centre of the topic prior, so labels shape topics generatively).

    Build it with `SCMix.from_data(data, config)`, which reads the sizes from the data. The constructor
    takes them explicitly (keyword-only, no defaults): n_cells (cells trained on), n_labelled (labelled
    cells), total_counts (sum of all counts), n_batches (batch rows of the offsets). `adapted_batch`: the
    batch row used for every input (set by `tfp_scmix.train.adapt`; None: the input's own batch ids).
    `batch_names`: the names of the trained batches, in the order of their rows (`from_data` keeps the data's);
    prediction divides each cell's own batch's offsets out when its dataset names it (`batch_rows`), and the
    centre of the trained batches' offsets out of cells of any other dataset (`prediction_offsets`). None (files
    written before the names were kept): batch ids are taken as rows as they stand.

    `call` is deterministic: {"probs" [batch, n_classes] (posterior predictive over fixed draws of W),
    "label" [batch], "confidence" [batch], "cell_topic" [batch, n_topics]}.
    Raises ValueError for fewer than two classes or a data size below 1.
    """

    def __init__(
        self,
        genes: Sequence[str],
        class_names: Sequence[str],
        config: Config | dict | None = None,
        *,
        n_cells: int,
        n_labelled: int,
        total_counts: float,
        n_batches: int,
        seed: int = 0,
        adapted_batch: int | None = None,
        batch_names: Sequence[str] | None = None,
        provenance: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # The training step has sparse ops without XLA kernels (sparse-dense products, sorted segment sums):
        # Keras's jit_compile="auto", which turns XLA on where there is a GPU, must leave it off. The nonzero
        # product of the likelihood is compiled with XLA on its own (tfp_scmix.sparse_ops).
        self.supports_jit = False
        config = config if isinstance(config, Config) else Config.from_dict(dict(config or {}))
        if len(class_names) < 2:
            raise ValueError(f"a classifier needs at least two classes, received {list(class_names)}")
        sizes = {"n_cells": n_cells, "n_labelled": n_labelled, "total_counts": total_counts, "n_batches": n_batches}
        small = {k: v for k, v in sizes.items() if not float(v) >= (1 if k != "n_labelled" else 0)}
        if small:
            raise ValueError(
                f"data sizes must be positive, received {small}: build the model with "
                "SCMix.from_data(data, config), which reads them from the data"
            )
        self.genes, self.class_names = [str(g) for g in genes], [str(c) for c in class_names]
        # Library versions and the fingerprint of the training data (`provenance`).
        self.provenance = dict(provenance or {})
        self.n_genes, self.n_classes, self.n_topics = len(self.genes), len(self.class_names), int(config.n_topics)
        self.config = config
        self.seed = int(seed)
        self.adapted_batch = None if adapted_batch is None else int(adapted_batch)
        self.batch_names = None if batch_names is None else [str(b) for b in batch_names]
        if self.batch_names is not None and len(self.batch_names) > int(n_batches):
            raise ValueError(f"{len(self.batch_names)} batch names for {n_batches} rows of batch offsets")
        # Unlabelled cells the last `fit_classifier` added by self-training (None: it did not self-train).
        self.self_trained_cells: int | None = None
        self.sizes = {
            "n_cells": int(n_cells),
            "n_labelled": int(n_labelled),
            "total_counts": float(total_counts),
            "n_batches": int(n_batches),
        }
        expected_active_topics = config.expected_active_topics
        if expected_active_topics is None:
            expected_active_topics = self.n_topics / 2
        global_scale = config.global_scale
        if global_scale is None:
            global_scale = default_global_scale(self.n_topics, n_labelled, expected_active_topics)
        # The settings with the defaults resolved, and the data sizes (what MLflow logs and the loss reads).
        n_class_genes = self.n_genes if config.classifier_genes else 0
        self.settings = {
            **config.to_dict(),
            "expected_active_topics": float(expected_active_topics),
            "global_scale": float(global_scale),
            **self.sizes,
            "seed": self.seed,
        }
        # The label terms are means over the labelled cells: at least one, so that a model of unlabelled
        # data (adapting, streaming) still has a finite loss.
        self.settings["n_labelled"] = max(self.sizes["n_labelled"], 1)
        self.topics = TopicBranch(self.n_topics, self.n_genes, config.topic_prior_scale, name="topic_branch")
        self.encoder = CellEncoder(
            self.n_genes,
            self.n_topics,
            config.hidden_units,
            config.dropout,
            config.prior_alpha,
            config.learn_alpha,
            name="cell_branch",
        )
        self.classifier = ClassBranch(
            self.n_classes,
            self.n_topics,
            config.prior,
            global_scale,
            config.slab_scale,
            config.slab_df,
            config.label_noise,
            config.n_predictive_samples,
            n_genes=n_class_genes,
            gene_prior_scale=config.gene_prior_scale,
            name="class_branch",
        )
        self.batch_offsets = BatchOffsets(int(self.sizes["n_batches"]), self.n_genes, name="batch_offsets")
        if config.label_mode == "class_prior":
            self.class_centres = self.add_weight(
                shape=(self.n_classes, self.n_topics), initializer="zeros", name="class_centres"
            )
        self.cells_seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="cells_seen")
        self.seed_generator = keras.random.SeedGenerator(self.seed, name="seed_generator")
        # The classification branch sees ~150 labelled cells a few at a time: it gets its own, faster
        # optimizer so that it converges within the epochs the topics need.
        self.classifier_optimizer = keras.optimizers.Adam(config.classifier_learning_rate, name="classifier_optimizer")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in ELBO_TERMS + ("label_accuracy", "topic_usage")}
        self.built = True

    @classmethod
    def from_data(cls, data: SCData | H5ADStream, config: Config | dict | None = None, *, seed: int = 0) -> SCMix:
        """A model sized for `data` (in memory or streamed from disk), topic background from its mean expression.

        data: `SCData` or `H5ADStream` (one pass over the file). Raises DataError when a cell has no counts
        over the genes: checked here, after any gene selection (`select_genes`, highly variable genes, a
        stream's `genes=`), since a cell can lose all its counts there though `from_anndata` accepted it.
        """
        if isinstance(data, H5ADStream):
            library, gene_sums = data.summary()
            background = gene_sums / data.n_cells
        else:
            library = data.library_size
            background = np.asarray(data.counts.mean(axis=0)).ravel()
        empty = library == 0
        if empty.any():
            labelled = int((empty & (np.asarray(data.labels) >= 0)).sum())
            raise DataError(
                f"{int(empty.sum())} cells ({labelled} of them labelled) have no counts over the "
                f"{data.n_genes} genes trained on: a selection of genes can leave cells empty. Select more "
                "genes (the command line: a larger --n-genes, or 0 for all), or remove those cells "
                "(data.subset(data.library_size > 0))."
            )
        model = cls(
            list(data.genes),
            list(data.classes),
            config,
            n_cells=data.n_cells,
            n_labelled=data.n_labelled,
            total_counts=float(library.sum()),
            n_batches=len(data.batch_names),
            seed=seed,
            batch_names=list(data.batch_names),
            provenance=provenance(data),
        )
        model.topics.set_background(background)
        # Sparse data are multiplied by the CSR kernel in the encoder (speed only: the same products within float
        # rounding; `CellEncoder.CSR_DENSITY`).
        model.encoder.sparse_product = data.nonzero_fraction <= CellEncoder.CSR_DENSITY
        if model.classifier.n_genes:
            model.classifier.set_gene_mean(gene_mean(data))
        return model

    @property
    def gene_fingerprint(self) -> str:
        return gene_fingerprint(self.genes)

    def topic_gene(self) -> tf.Tensor:
        """Posterior-mean topic-gene distributions `[n_topics, n_genes]` (rows sum to one)."""
        return self.topics(None)

    @property
    def metrics(self):
        return list(self.trackers.values())

    # -- the deterministic forward pass --------------------------------------------------------
    def _unpack(self, inputs, training_rows: bool = False):
        """(counts, batch rows `[batch]`) from a minibatch dict or a bare count matrix. Prediction's rows index
        `prediction_offsets()`: a bare matrix's cells, and ids of `NEW_BATCH` (or past the trained batches), get
        the centre row `new_batch`; an adapted model's cells all get `adapted_batch`. `training_rows`: the
        training step's, which indexes the trained rows only (a bare matrix is batch 0)."""
        counts = inputs[COUNTS] if isinstance(inputs, dict) else inputs
        batch_ids = inputs.get(BATCH) if isinstance(inputs, dict) else None
        fill = 0 if training_rows else self.new_batch
        if self.adapted_batch is not None:
            fill, batch_ids = self.adapted_batch, None
        if batch_ids is None:
            return counts, tf.fill(tf.shape(counts, out_type=tf.int32)[:1], fill)
        batch_ids = tf.cast(batch_ids, tf.int32)
        if training_rows:
            return counts, batch_ids
        return counts, tf.where((batch_ids < 0) | (batch_ids >= self.new_batch), self.new_batch, batch_ids)

    @property
    def new_batch(self) -> int:
        """The row of `prediction_offsets()` for cells of a dataset the model was not trained on: after the
        trained batches' rows."""
        return int(self.sizes["n_batches"])

    def prediction_offsets(self) -> tf.Tensor:
        """Offsets `[n_batches + 1, n_genes]` (posterior means) that prediction divides out: each trained batch's
        row, then `new_batch`'s, the mean of the trained batches' rows (of the reference rows, for an adapted
        model). Under the prior a new batch's offsets are N(0, sigma^2) around no shift at all; the rows learned
        from the training batches share a part that topic_gene does not carry (with one batch, that whole row),
        and their mean keeps it without favouring any one batch: a model of one batch predicts every dataset as
        it predicts its training cells, and one of several predicts a new dataset through none of them in
        particular. Measured on the transfer matrix's two-source row (docs/cross_dataset.md, "A new dataset
        through the centre of the batches")."""
        loc = tf.convert_to_tensor(self.batch_offsets.loc)
        reference = loc if self.adapted_batch is None else loc[: self.adapted_batch]
        return tf.concat([loc, tf.reduce_mean(reference, axis=0, keepdims=True)], axis=0)

    def batch_rows(self, batch_names: Sequence[str], batches: np.ndarray) -> np.ndarray:
        """Batch ids `batches` `[n_cells]` of a dataset whose batches are `batch_names` as rows of the model's
        offsets `[n_cells]` (int32): the trained batch of the same name, `NEW_BATCH` where the model has no batch
        of that name (prediction then divides out the centre, `prediction_offsets`). A model without
        `batch_names` (files from before they were kept) takes the ids as they stand."""
        batches = np.asarray(batches, np.int32)
        if self.batch_names is None:
            return batches
        rows = {name: i for i, name in enumerate(self.batch_names)}
        lookup = np.array([rows.get(str(name), NEW_BATCH) for name in batch_names] or [NEW_BATCH], np.int32)
        known = (batches >= 0) & (batches < len(lookup))  # ids already `NEW_BATCH` stay so
        return np.where(known, lookup[np.where(known, batches, 0)], NEW_BATCH).astype(np.int32)

    def encode(
        self, counts: tf.Tensor | tf.SparseTensor, batch_ids: tf.Tensor, training: bool = False
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """q(cell_topic) (loc, scale) `[batch, n_topics]` from counts with their batch's offsets divided out
        (batch_ids: rows of `prediction_offsets()`, `NEW_BATCH` for a dataset the model was not trained on)."""
        counts, rows = self._unpack({COUNTS: counts, BATCH: batch_ids})
        return self.encoder(counts, rows, self.prediction_offsets(), training=training)

    def class_genes(self, counts: tf.Tensor | tf.SparseTensor, batch_ids: tf.Tensor) -> tf.Tensor | None:
        """The classification branch's gene input `[batch, n_genes]`: log1p CP10k of the counts with their
        batch's offsets divided out (batch_ids as for `encode`; sparse stays sparse); None when the branch reads
        topics only."""
        if not self.classifier.n_genes:
            return None
        counts, rows = self._unpack({COUNTS: counts, BATCH: batch_ids})
        return normalise_counts(divide_offsets(counts, rows, self.prediction_offsets()))

    def predictive_tables(self) -> dict[str, tf.Tensor]:
        """What prediction reads that does not depend on the cells, computed once per prediction rather than per
        minibatch: the classification branch's fixed posterior draws (`ClassBranch.predictive_tables`), with its
        gene kernel placed beside the encoder's first-layer kernel: "kernel" `[n_genes, hidden_units (+ S *
        n_classes)]`. Both branches read the same normalised counts, so one product serves both."""
        tables = self.classifier.predictive_tables()
        gene_kernel = tables.pop("gene_kernel", None)
        kernel = tf.convert_to_tensor(self.encoder.kernel)
        tables["kernel"] = kernel if gene_kernel is None else tf.concat([kernel, gene_kernel], axis=1)
        return tables

    def predict_with(self, tables: dict[str, tf.Tensor], inputs, training=False) -> dict[str, tf.Tensor]:
        """`call`'s outputs from `predictive_tables()` computed beforehand (`tfp_scmix.predict` takes them once per
        call, not once per minibatch). inputs: as for `call`, a minibatch dict or a count matrix."""
        counts, batch_ids = self._unpack(inputs)
        product = self.encoder.first_layer(counts, batch_ids, self.prediction_offsets(), kernel=tables["kernel"])
        return self.predict_from_product(tables, product, training)

    def offset_factors(self) -> np.ndarray:
        """exp(-offsets) `[n_batches + 1, n_genes]` float32 of `prediction_offsets()`: what each batch's counts, and
        a new dataset's (the last row), are multiplied by before normalisation
        (`tfp_scmix.layers.cell.divide_offsets`)."""
        return np.exp(-self.prediction_offsets().numpy()).astype(np.float32)

    def prediction_batches(self, batch_ids: np.ndarray) -> np.ndarray:
        """The row of `offset_factors()` `[n_cells]` (int32) that prediction divides out of each cell (as `call`
        does): its own batch's; `new_batch`'s for `NEW_BATCH` (or an id past the trained batches); `adapted_batch`
        for every cell once the model has been adapted to a new dataset."""
        if self.adapted_batch is not None:
            return np.full(len(batch_ids), self.adapted_batch, np.int32)
        batch_ids = np.asarray(batch_ids, dtype=np.int32)
        return np.where((batch_ids < 0) | (batch_ids >= self.new_batch), self.new_batch, batch_ids).astype(np.int32)

    def predict_from_product(
        self, tables: dict[str, tf.Tensor], product: tf.Tensor, training=False
    ) -> dict[str, tf.Tensor]:
        """`predict_with`'s outputs from the first layer's product `[batch, tables["kernel"].shape[1]]`: x @
        tables["kernel"], where x `[batch, n_genes]` is the cells' counts normalised as the first layer reads them,
        `tfp_scmix.data.log_normalised_values(counts, self.offset_factors(), self.prediction_batches(batch_ids))` on
        the counts' nonzeros (float32). `tfp_scmix.predict` normalises and multiplies in numpy (as CSR or dense), so
        that TensorFlow's work per minibatch is what follows the product (docs/performance.md, "The product in
        numpy"). Also the last step of `predict_with`, which computes the product in TensorFlow."""
        first, gene_products = self.encoder.split(product)
        loc, _ = self.encoder.topics_from_first_layer(first, training=training)
        probs = self.classifier.predictive_probs(
            topic_features(loc), gene_products if self.classifier.n_genes else None, tables
        )
        return outputs(probs, tf.nn.softmax(loc, axis=-1))

    def call(self, inputs, training=False):
        return self.predict_with(self.predictive_tables(), inputs, training=training)

    # -- the classification branch to convergence ----------------------------------------------
    def fit_classifier(self, data: SCData, steps: int | None = None, batch_size: int = 1024, verbose: int = 0) -> float:
        """Fit the classification branch to convergence on the cells of `data`, topics fixed.

        Minimises the label part of the loss (mean label_nll + kl_class; with `config.balanced_classes`
        each labelled cell's label_nll weighted by `balanced_class_weights`) on the posterior-mean topics,
        full batch, `steps` Adam steps (default `config.classifier_steps`) at `config.classifier_learning_rate`
        with cosine decay. In the "cut" mode the classifier never changes the topics, so this is exact
        coordinate ascent on the same objective; the minibatch updates during `fit` see only the few
        labelled cells of each batch and stop short of convergence.

        With `config.self_training` and unlabelled cells in `data`, a second fit follows (self-training):
        the branch's probabilities for up to `SELF_TRAINING_CELLS` cells (every labelled one and a seeded
        sample of the others) are combined with the known labels spread over those cells, as `annotate` does
        with known labels (`propagate.with_known_labels`, then `self_training_labels`), and the branch is fitted
        again, warm, for 1 / `SELF_TRAINING_SHARE` of the steps, on the labelled cells and the unlabelled ones
        whose combined call is confident, each with that call as its label (the KL is then per fitted cell).
        The number of unlabelled cells that joined is kept in `self_trained_cells` (the training summary's).
        `data`'s batches are matched to the model's by name (`batch_rows`): a dataset the model was not trained on
        (`annotate`'s refit on known labels) is read through the centre of the batches' offsets, as prediction
        reads it. Returns the final loss. Raises DataError when `data` has no labelled cell.
        """
        self.self_trained_cells = None
        data = dataclasses.replace(data, batches=self.batch_rows(data.batch_names, data.batches))
        steps = self.config.classifier_steps if steps is None else int(steps)
        labelled = np.flatnonzero(data.labels >= 0)
        if labelled.size == 0:
            raise DataError("fit_classifier needs labelled cells; every label in the data is unknown (-1)")
        topics = self.predict(data.subset(labelled).dataset(batch_size, shuffle=False), verbose=0)["cell_topic"]
        targets = np.eye(self.n_classes)[data.labels[labelled]]
        loss = self._fit_class_branch(data, labelled, topics, targets, steps, verbose)
        if not (self.config.self_training and steps and labelled.size < data.n_cells):
            return loss
        cells = self_training_cells(data.labels, self.seed)
        outputs = self.predict(data.subset(cells).dataset(batch_size, shuffle=False), verbose=0)
        features = np.asarray(topic_features(np.log(np.maximum(outputs["cell_topic"], 1e-30))))
        known = data.labels[cells]
        combined = with_known_labels(outputs["probs"], known, data.counts[cells], features, seed=self.seed)
        labels = self_training_labels(combined, known)
        fitted = labels >= 0
        self.self_trained_cells = int(fitted.sum() - (known >= 0).sum())
        targets = np.eye(self.n_classes)[labels[fitted]]
        steps = max(steps // SELF_TRAINING_SHARE, 1)
        return self._fit_class_branch(data, cells[fitted], outputs["cell_topic"][fitted], targets, steps, verbose)

    def _fit_class_branch(
        self, data: SCData, cells: np.ndarray, topics: np.ndarray, targets: np.ndarray, steps: int, verbose: int
    ) -> float:
        """`steps` full-batch Adam steps of the classification branch on `cells` of `data`, whose topic
        proportions are `topics` `[n_cells, n_topics]`, against `targets` `[n_cells, n_classes]` (class
        probabilities; with `config.balanced_classes` each class's targets are weighted by
        `balanced_class_weights`); returns the final loss."""
        features = topic_features(tf.constant(np.log(np.maximum(topics, 1e-30)), tf.float32))
        genes = self.class_genes(as_sparse(data.counts[cells]), tf.constant(data.batches[cells], tf.int32))
        if self.config.balanced_classes:
            targets = targets * balanced_class_weights(targets)
        targets = tf.constant(targets, tf.float32)
        # Decaying the step size lets the Monte Carlo gradients settle on the optimum.
        schedule = keras.optimizers.schedules.CosineDecay(self.config.classifier_learning_rate, steps)
        optimizer = keras.optimizers.Adam(schedule)
        variables = self.classifier.trainable_variables
        n_fitted = float(max(self.settings["n_labelled"], len(cells)))

        optimizer.build(variables)
        seed = tf.constant(self.seed, tf.int32)

        # The steps run inside one traced loop, STEPS_PER_CALL at a time: one Python call per step cost more
        # than the step itself on a few hundred cells.
        @tf.function
        def run(start, stop):
            loss = tf.constant(float("nan"))
            for i in tf.range(start, stop):
                with tf.GradientTape() as tape:
                    log_probs, kl = self.classifier.sample_log_probs(features, tf.stack([seed, i]), genes)
                    loss = -tf.reduce_mean(tf.reduce_sum(targets * log_probs, axis=-1)) + kl / n_fitted
                optimizer.apply(tape.gradient(loss, variables), variables)
            return loss

        progress = keras.utils.Progbar(steps, verbose=verbose, unit_name="step")
        loss = tf.constant(float("nan"))
        for start in range(0, steps, STEPS_PER_CALL):
            stop = min(start + STEPS_PER_CALL, steps)
            loss = run(tf.constant(start, tf.int32), tf.constant(stop, tf.int32))
            if verbose:
                progress.update(stop, [("classifier_loss", float(loss))])
        return float(loss)

    # -- the loss -------------------------------------------------------------------------------
    def elbo_terms(self, inputs: dict, training: bool = False) -> dict[str, Any]:
        """Named terms of the negative ELBO for one minibatch (scalars), plus diagnostics.

        inputs: a minibatch dict {"counts" [batch, n_genes], "label" [batch] (-1 unknown), "batch" [batch]}.
        Returns {"reconstruction", "kl_cell", "kl_topic", "kl_class", "kl_batch", "label_nll", "loss"} (nats per
        count for the count terms, per labelled cell for the label terms; see the class docstring),
        "label_accuracy" (hits, labelled cells) and "topic_usage" (exp of the entropy of the mean topic use).
        """
        s = self.settings
        counts, batch_ids = self._unpack(inputs, training_rows=True)
        counts = as_sparse(counts)
        seeds = tfp.random.split_seed(tf.cast(self.seed_generator.next(), tf.int32), n=4)
        joint = s["label_mode"] == "joint"
        # One draw of the classification branch. Its gene weights read the normalised counts x of the encoder's
        # first layer, in the same product. x carries no gradient (the batch offsets learn from the likelihood
        # alone), so in every label mode the label term reaches the gene weights through it and nothing else.
        draw = self.classifier.draw(seeds[2])
        offsets, gene_logits = self.batch_offsets.loc, None
        if not self.classifier.n_genes:
            first = self.encoder.first_layer(counts, batch_ids, offsets)
        else:
            gene_kernel, gene_offset = self.classifier.gene_kernel()
            kernel = tf.concat([self.encoder.kernel, gene_kernel], axis=1)
            first, gene_products = self.encoder.split(
                self.encoder.first_layer(counts, batch_ids, offsets, kernel=kernel)
            )
            gene_logits = gene_products - gene_offset
        loc, scale = self.encoder.topics_from_first_layer(first, training=training)
        n_cells = tf.shape(loc)[0]
        labels = inputs.get(LABEL, tf.fill([n_cells], -1))

        # Cell and topic branches: one reparameterized draw each.
        z = loc + scale * tf.random.stateless_normal(tf.shape(loc), seed=seeds[0])
        log_cell_topic = tf.nn.log_softmax(z, axis=-1)
        log_likelihood = multinomial_log_prob(
            counts,
            log_cell_topic,
            self.topics.sample_log_topic_gene(seeds[1]),
            self.batch_offsets.sample(seeds[3]),
            batch_ids,
        )
        n_counts = tf.reduce_sum(counts.values)

        # Classification branch, on the posterior-mean topics and on the draw, with one draw of W.
        features = topic_features(tf.concat([loc, z], axis=0))
        if not joint:
            features = tf.stop_gradient(features)
        log_probs, kl_class = self.classifier.draw_log_probs(features, gene_logits, draw), draw["kl"]
        labelled = labels >= 0
        safe_labels = tf.maximum(labels, 0)
        nll = -tf.gather(log_probs, tf.tile(safe_labels, [2]), batch_dims=1)
        mask = tf.cast(tf.tile(labelled, [2]), tf.float32)
        n_labelled = tf.reduce_sum(mask)
        label_nll = tf.math.divide_no_nan(tf.reduce_sum(nll * mask), n_labelled)

        prior_shift = 0.0
        if s["label_mode"] == "class_prior":
            # Known labels pick their class centre; other cells use the classifier's expectation.
            responsibility = tf.where(
                labelled[:, None],
                tf.one_hot(safe_labels, self.n_classes),
                tf.stop_gradient(tf.exp(log_probs[:n_cells])),
            )
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
        terms["loss"] = (
            terms["reconstruction"]
            + warmup * (terms["kl_cell"] + terms["kl_topic"])
            + terms["kl_batch"]
            + s["label_weight"] * (terms["label_nll"] + terms["kl_class"])
        )
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

    def make_train_function(self, force=False):
        # Both optimizers built over their own variables first: their slots made inside the first training
        # step would make tf.function trace the step twice.
        self.build_optimizers()
        return super().make_train_function(force)

    def compile_from_config(self, config):
        # Keras would build the optimizer over every variable; build each optimizer over its own group
        # so that a saved optimizer state (needed to resume training) loads back.
        built, self.built = self.built, False
        super().compile_from_config(config)
        self.built = built
        self.build_optimizers()

    def build_optimizers(self) -> None:
        """Build both optimizers over their own variable groups (so a saved optimizer state loads); idempotent."""
        others, classifier = self._variable_groups()
        if not self.optimizer.built:
            self.optimizer.build(others)
        if not self.classifier_optimizer.built:
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

    def save(self, filepath, overwrite=True, **kwargs):
        """Save as a .keras archive, atomically (a kill leaves the old file or nothing): `tfp_scmix.save_model`.

        Raises ModelFileError for a path that does not end in ".keras" (Keras would write a legacy .h5 file
        that `load_model` refuses), FileExistsError when the file exists and `overwrite` is false.
        """
        # The files stage comes after the model: the import is deferred so that `model.save`, which Keras
        # users call, takes the package's one atomic path.
        from tfp_scmix.io import save_model

        if not overwrite and os.path.exists(filepath):
            raise FileExistsError(f"{filepath} exists; pass overwrite=True to replace it")
        save_model(self, filepath)

    def get_config(self):
        return {
            **super().get_config(),
            "genes": self.genes,
            "class_names": self.class_names,
            "config": self.config.to_dict(),
            **self.sizes,
            "seed": self.seed,
            "adapted_batch": self.adapted_batch,
            "batch_names": self.batch_names,
            "provenance": self.provenance,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "config" not in config:  # files written before the settings became one Config
            settings = {k: config.pop(k) for k in list(config) if k in Config.__dataclass_fields__}
            settings.pop("classifier_steps", None)
            config["config"] = settings
        # Files written before the classification branch read genes: topics only.
        config["config"] = {"classifier_genes": False, **config["config"]}
        # Files that do not state the hidden layer's width were written when it was 256 units.
        # Files that do not state balanced_classes were refitted unweighted.
        config["config"] = {"hidden_units": 256, "balanced_classes": False, **config["config"]}
        if config["config"].get("expected_active_genes") is not None and config["config"]["classifier_genes"]:
            raise ValueError(
                "the file's classification branch reads standardised genes under a horseshoe "
                "(expected_active_genes), the gene term before the ridge one of this version, and its weights "
                "do not fit it (docs/few_shot.md, 'The gene term')"
            )
        config["config"].pop("expected_active_genes", None)  # a topics-only file loads as it was
        return cls(**config)
