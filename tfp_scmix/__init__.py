"""tfp_scmix: few-shot single-cell annotation with a joint topic model (TensorFlow Probability + Keras 3).

Where things happen: data enters in `data` (`from_anndata`; `stream` reads from disk), the loss is in
`loss` (and `SCMix.elbo_terms`), training happens in `train` (the one recipe), prediction in `predict`
(the one door; `annotate` writes it into an AnnData).

    import tfp_scmix as scm
    data = scm.from_anndata("pbmc3k.h5ad", label_key="cell_type")   # NaN labels: unlabelled
    model = scm.train(data)                    # SCMixEnsemble of 3 restarts (the package default)
    out = scm.predict(model, "query.h5ad")     # {"probs", "label", "confidence", "cell_topic"}
    scm.annotate(model, query_adata)           # obs["scmix_label"], ...
    scm.explain.class_genes(model)             # each class's most predictive topic and its genes
    scm.save_model(model, "model.keras"); scm.load_model("model.keras")
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

# Stages in the order data flows through them; each imports only the ones before it.
from tfp_scmix import data
from tfp_scmix.data import DataError, SCData, from_anndata
from tfp_scmix import config, stream
from tfp_scmix.config import Config
from tfp_scmix.model import SCMix
from tfp_scmix.ensemble import SCMixEnsemble
from tfp_scmix.io import ModelFileError, load_model, save_model
from tfp_scmix import callbacks, distribute
from tfp_scmix.train import adapt, train
from tfp_scmix.predict import predict
from tfp_scmix.annotate import annotate
from tfp_scmix import evaluate, explain

__all__ = [
    "Config",
    "DataError",
    "ModelFileError",
    "SCData",
    "SCMix",
    "SCMixEnsemble",
    "adapt",
    "annotate",
    "callbacks",
    "config",
    "data",
    "distribute",
    "evaluate",
    "explain",
    "from_anndata",
    "load_model",
    "predict",
    "save_model",
    "stream",
    "train",
    "__version__",
]
