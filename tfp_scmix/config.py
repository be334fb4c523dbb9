"""Settings stage: the one frozen record of what a user may choose about a model and its training.

`Config` holds plain scalars and `Literal` options only. The same record feeds the model's `get_config`
(and so every saved model), the MLflow parameters of a tracked run and the keras-tuner search space
(`training/`). Sizes that come from the data (cells, labelled cells, total counts, batches, genes,
classes) are not settings: `SCMix.from_data` reads them from the data.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Any, Literal

Prior = Literal["normal", "horseshoe", "regularized", "santa_barbara"]
LabelMode = Literal["cut", "joint", "class_prior"]
PRIORS: tuple[str, ...] = typing.get_args(Prior)
LABEL_MODES: tuple[str, ...] = typing.get_args(LabelMode)


def _is_number(value: Any) -> bool:
    """A real number, not a bool and not a string ("20" from a command line or a file must be converted first)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Config:
    """Model and training settings (defaults: the package's; their source is docs/few_shot.md).

    Model:
      n_topics: topics K. hidden_units / dropout: the cell encoder's one hidden layer (128 units, as scVI's
        encoder: the few-shot suite ties the earlier 256 and prediction and training get faster,
        docs/few_shot.md "A first layer of 128 units"; model files that do not state it load with 256).
      prior: the class weights' prior (`PRIORS`). label_mode: how labels reach the topics (`LABEL_MODES`;
        "joint" since it tied "cut" on the few-shot suite, experiments/few_shot/report.md).
      label_weight: weight of the label terms (label_nll + kl_class per labelled cell) against the
        count terms (per count). prior_alpha: the Dirichlet concentration whose Laplace approximation is
        the cell-topic prior; learn_alpha: learn it. kl_warmup_epochs: epochs over which the KL terms of
        the cells and topics are scaled up from 0 to 1.
      expected_active_topics / global_scale / slab_scale / slab_df: the horseshoe's p0, tau0, s and nu
        (None: p0 = n_topics / 2 and tau0 from Piironen & Vehtari 2017, eq. 3.12, with the labelled cells;
        slab_df None: the variant's own). label_noise: the label-noise mixture with a
        learned error rate eps ~ Beta(1, 19) on or off (None: on for santa_barbara only).
      classifier_genes: the classification branch reads the genes too (log1p CP10k, centred), with point-
        estimated weights under a Gaussian prior of standard deviation gene_prior_scale (1: the ridge penalty
        of scikit-learn's LogisticRegression at C = 1); off: topics only, as before version 0.2
        (docs/few_shot.md, "The gene term").
      topic_prior_scale: standard deviation of the topic logits' prior around the background profile.
      n_predictive_samples: draws of the class weights averaged by the posterior predictive.
    Training (`tfp_scmix.train`):
      epochs, batch_size (cells per minibatch: 512, as many errors or fewer than 256 on the few-shot suite in
        half the steps, docs/few_shot.md "Minibatches of 512 cells"), learning_rate (Adam, topics and encoder),
      classifier_learning_rate (the classification branch's own Adam during the epochs and its refit),
      classifier_steps (full-batch steps of the classifier refit after the last epoch; 0: none).
      balanced_classes: the refit weighs each labelled cell by n / (k n_c) (n labelled cells, k classes among
        them, n_c of its class), scikit-learn's `class_weight="balanced"`, so that a class with few labels is
        not shrunk away by the gene and topic priors. On the few-shot suite the model made fewer or equal errors
        with it on 13 of 15 dataset-seeds, as logistic regression weighted so did on all five datasets
        (docs/few_shot.md, "Balanced classes"; experiments/few_shot/balanced_classes/).
      self_training: after the refit, fit the classification branch again on the labelled cells and on the
        unlabelled cells whose call, combined with the known labels spread over the cells
        (`tfp_scmix.propagate.with_known_labels`), is confident (`SCMix.fit_classifier`,
        `tfp_scmix.propagate.self_training_labels`). Off by default: on the few-shot suite it made fewer errors on
        four datasets and more on pbmc68k_reduced, the demo's dataset (docs/few_shot.md, "Self-training from the
        combined call").

    Raises ValueError for a value out of range, and for an unknown option given to `replace` or `from_dict`
    (the message names both and lists the settings); `Config(unknown=...)` raises Python's TypeError.
    """

    n_topics: int = 50
    hidden_units: int = 128
    dropout: float = 0.2
    prior: Prior = "regularized"
    label_mode: LabelMode = "joint"
    label_weight: float = 1.0
    prior_alpha: float = 0.5
    learn_alpha: bool = False
    kl_warmup_epochs: float = 20.0
    expected_active_topics: float | None = None
    global_scale: float | None = None
    slab_scale: float = 2.0
    slab_df: float | None = None
    label_noise: bool | None = None
    classifier_genes: bool = True
    gene_prior_scale: float = 1.0
    topic_prior_scale: float = 1.0
    n_predictive_samples: int = 32
    epochs: int = 100
    batch_size: int = 512
    learning_rate: float = 2e-3
    classifier_learning_rate: float = 0.02
    classifier_steps: int = 2000
    balanced_classes: bool = True
    self_training: bool = False

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, received {self.prior!r}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, received {self.label_mode!r}")
        for name in ("n_topics", "hidden_units", "n_predictive_samples", "epochs", "batch_size", "classifier_steps"):
            value, least = getattr(self, name), 0 if name == "classifier_steps" else 1
            if not _is_number(value) or not float(value).is_integer() or value < least:
                kind = "whole number that must not be negative" if least == 0 else "positive whole number"
                raise ValueError(f"{name} must be a {kind}, received {value!r}")
            # 20.0 (from a TOML file or a tuner) is stored as 20: the model's saved config must load again
            object.__setattr__(self, name, int(value))
        for name in ("expected_active_topics", "global_scale", "slab_df"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and float(value) > 0):
                raise ValueError(f"{name} must be positive (or None for its default), received {value!r}")
        if self.label_noise is not None and not isinstance(self.label_noise, bool):
            raise ValueError(
                "label_noise switches the learned label-noise mixture on or off: True, False or None "
                f"(the variant's default), received {self.label_noise!r}"
            )
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), received {self.dropout!r}")
        for name in ("self_training", "classifier_genes", "balanced_classes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, received {getattr(self, name)!r}")
        for name in (
            "learning_rate",
            "classifier_learning_rate",
            "prior_alpha",
            "topic_prior_scale",
            "slab_scale",
            "gene_prior_scale",
        ):
            if not (_is_number(getattr(self, name)) and float(getattr(self, name)) > 0):
                raise ValueError(f"{name} must be positive, received {getattr(self, name)!r}")
        for name in ("kl_warmup_epochs", "label_weight"):
            if not _is_number(getattr(self, name)) or float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must not be negative, received {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes` applied (ValueError for a name that is not a setting)."""
        unknown = sorted(set(changes) - set(names()))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; settings are {sorted(names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (what `get_config` and MLflow record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """A `Config` from a dict of settings (ValueError for a key that is not a setting)."""
        return cls().replace(**values)


def names() -> tuple[str, ...]:
    """The names of every setting, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(Config))


MODEL_SETTINGS: tuple[str, ...] = names()[: names().index("epochs")]
TRAINING_SETTINGS: tuple[str, ...] = names()[names().index("epochs") :]
