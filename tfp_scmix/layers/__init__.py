"""The model's branches as Keras 3 layers that build TensorFlow Probability distributions."""

from __future__ import annotations

from tfp_scmix.layers.batch import BatchOffsets
from tfp_scmix.layers.cell import CellEncoder
from tfp_scmix.layers.classifier import ClassBranch
from tfp_scmix.layers.horseshoe import PRIOR_VARIANTS, HorseshoePrior
from tfp_scmix.layers.topic import TopicBranch

__all__ = ["BatchOffsets", "CellEncoder", "ClassBranch", "HorseshoePrior", "PRIOR_VARIANTS", "TopicBranch"]
