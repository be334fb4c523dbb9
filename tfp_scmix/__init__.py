"""tfp_scmix: few-shot single-cell annotation with a joint topic model (TensorFlow Probability + Keras 3)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

from tfp_scmix import data  # noqa: E402
from tfp_scmix.data import DataError, SCData, from_anndata  # noqa: E402
from tfp_scmix.model import SCMix  # noqa: E402
from tfp_scmix.ensemble import SCMixEnsemble  # noqa: E402

__all__ = ["DataError", "SCData", "SCMix", "SCMixEnsemble", "data", "from_anndata", "__version__"]
