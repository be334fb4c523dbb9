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
    scm.explain.class_gene_weights(model)      # each class's genes by the classifier's gene weights
    scm.save_model(model, "model.keras"); scm.load_model("model.keras")
"""

import os
import sys
import types
from typing import TYPE_CHECKING

# Quiet by default (TFP_SCMIX_VERBOSE=1, or the command line's --verbose 2, shows TensorFlow's logs):
# level 3 hides the C++ log lines (oneDNN, CUDA probing on a CPU machine), and the lines TensorFlow
# writes to stderr before its logging starts ignore every setting, so the first import runs with
# stderr pointed at /dev/null. A failed import still raises its Python exception as usual.
VERBOSE_ENV = "TFP_SCMIX_VERBOSE"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if os.environ.get(VERBOSE_ENV) else "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def import_tensorflow() -> None:
    """Import TensorFlow now, with its start-up lines (CUDA probing, CPU features) hidden unless
    $TFP_SCMIX_VERBOSE is set. tfp_scmix does this on first use of any name that needs TensorFlow; an application
    that imports keras or TensorFlow itself calls it first (training/__init__.py does). No effect once TensorFlow
    is imported."""
    if os.environ.get(VERBOSE_ENV) or "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # no usable file descriptor 2 (some embedded interpreters)
        return
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    tf.get_logger().setLevel("ERROR")


__version__ = "0.1.0"

# Stages in the order data flows through them; each imports only the ones before it. They load on first
# use (PEP 562), so that `tfp-scmix --help`, `--version` and `tfp_scmix.__version__` answer without
# TensorFlow; the first name that needs it imports it, quietly.
_SUBMODULES = (
    "data", "stream", "config", "model", "novelty", "ensemble", "io", "callbacks", "distribute", "train",
    "predict", "annotate", "evaluate", "explain", "tracking", "export", "propagate", "datasets",
)  # fmt: skip
_NAMES = {
    "DataError": "data",
    "SCData": "data",
    "from_anndata": "data",
    "read": "data",
    "Config": "config",
    "SCMix": "model",
    "SCMixEnsemble": "ensemble",
    "ModelFileError": "io",
    "load_model": "io",
    "save_model": "io",
    "adapt": "train",
    "train": "train",
    "predict": "predict",
    "annotate": "annotate",
}
# Modules that import no TensorFlow; the first import of any other submodule imports it first, quietly.
_LIGHT = {
    "__main__", "cli", "config", "data", "datasets", "distribute", "novelty", "propagate", "stream", "synthetic",
    "tracking",
}  # fmt: skip


class _QuietTensorFlowFirst:
    """A `sys.meta_path` finder that finds nothing: it only imports TensorFlow quietly before the first
    submodule that needs it (`from tfp_scmix.model import SCMix` as much as `scm.train`), then leaves."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        parts = fullname.split(".")
        if parts[0] == "tfp_scmix" and len(parts) > 1 and parts[1] not in _LIGHT:
            if cls in sys.meta_path:
                sys.meta_path.remove(cls)
            import_tensorflow()
        return None


sys.meta_path.insert(0, _QuietTensorFlowFirst)


class _Package(types.ModuleType):
    """Keeps `tfp_scmix.train`, `.predict` and `.annotate` the functions when their stages load: the
    import system binds each loaded submodule to the package attribute of the same name."""

    def __setattr__(self, name, value):
        if name in ("train", "predict", "annotate") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:
    from tfp_scmix import callbacks, config, data, datasets, distribute, evaluate, explain, propagate, stream
    from tfp_scmix.annotate import annotate
    from tfp_scmix.config import Config
    from tfp_scmix.data import DataError, SCData, from_anndata, read
    from tfp_scmix.ensemble import SCMixEnsemble
    from tfp_scmix.io import ModelFileError, load_model, save_model
    from tfp_scmix.model import SCMix
    from tfp_scmix.predict import predict
    from tfp_scmix.train import adapt, train


def __getattr__(name: str):
    import importlib

    module = _NAMES.get(name, name if name in _SUBMODULES else None)
    if module is None:
        raise AttributeError(f"module 'tfp_scmix' has no attribute {name!r}")
    value = importlib.import_module(f"tfp_scmix.{module}")
    if name in _NAMES:
        value = getattr(value, name)
    globals()[name] = value
    return value


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
    "datasets",
    "distribute",
    "evaluate",
    "explain",
    "from_anndata",
    "import_tensorflow",
    "load_model",
    "predict",
    "propagate",
    "read",
    "save_model",
    "stream",
    "train",
    "__version__",
]
