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

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING

# Quiet by default (TFP_SCMIX_VERBOSE=1, or the command line's --verbose 2, shows TensorFlow's logs):
# level 3 hides the C++ log lines (oneDNN, CUDA probing on a CPU machine), and the lines TensorFlow
# writes to stderr before its logging starts ignore every setting, so the first import runs with
# stderr pointed at /dev/null. A failed import still raises its Python exception as usual.
VERBOSE_ENV = "TFP_SCMIX_VERBOSE"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if os.environ.get(VERBOSE_ENV) else "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@contextlib.contextmanager
def _stderr_hidden() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null for the block (TensorFlow's C++ start-up lines bypass Python's
    sys.stderr); nothing is hidden where there is no usable descriptor 2 (some embedded interpreters)."""
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow() -> None:
    """Import TensorFlow now, with its start-up lines (CUDA probing, CPU features) hidden unless
    $TFP_SCMIX_VERBOSE is set. tfp_scmix does this on first use of any name that needs TensorFlow, and when
    TensorFlow, Keras or TFP is first imported after tfp_scmix (`_QuietTensorFlowFirst`). No effect once
    TensorFlow is imported."""
    if os.environ.get(VERBOSE_ENV) or "tensorflow" in sys.modules:
        return
    with _stderr_hidden():
        import tensorflow as tf
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
    "NotTrainedError": "ensemble",
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


# Top-level modules that import TensorFlow: imported after tfp_scmix (`import tfp_scmix; import keras`), they
# get TensorFlow imported quietly first, as tfp_scmix's own stages do.
_TENSORFLOW_USERS = {"tensorflow", "keras", "tensorflow_probability", "tf_keras"}


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with its start-up lines hidden; the module keeps that loader."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        with _stderr_hidden():
            self.loader.exec_module(module)
        module.get_logger().setLevel("ERROR")


class _QuietTensorFlowFirst:
    """A `sys.meta_path` finder that only makes TensorFlow's first import quiet, then leaves: before the first
    submodule of tfp_scmix that needs it (`from tfp_scmix.model import SCMix` as much as `scm.train`), or the
    first import of TensorFlow, Keras or TFP after tfp_scmix (TensorFlow's own, through its loader wrapped)."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        parts = fullname.split(".")
        if parts[0] == "tfp_scmix":
            if len(parts) == 1 or parts[1] in _LIGHT:
                return None
        elif fullname not in _TENSORFLOW_USERS:
            return None
        if cls in sys.meta_path:
            sys.meta_path.remove(cls)
        if os.environ.get(VERBOSE_ENV) or "tensorflow" in sys.modules:
            return None
        if fullname == "tensorflow":  # its import under way: the same module must load, quietly
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _QuietLoader(spec.loader)
            return spec
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
    from tfp_scmix.ensemble import NotTrainedError, SCMixEnsemble
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


def __dir__() -> list[str]:
    """The public names, loaded or not (tab completion lists `train`, `from_anndata`, ... before first use)."""
    return sorted({*globals(), *__all__})


__all__ = [
    "Config",
    "DataError",
    "ModelFileError",
    "NotTrainedError",
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
