"""MLflow pyfunc model that serves a tfp_scmix SavedModel (logged as code by `export.log_mlflow`).

Self-contained on purpose: MLflow copies this file into the logged model, where it runs with only
TensorFlow, pandas and MLflow installed. Request: a DataFrame of raw counts whose columns are gene
names of the model (any order; a gene not sent, or null, counts as zero; a column that is not a
model gene is refused). Response: one row per cell with label,
confidence, prob_<class>... and topic_<k>.... `outputs_frame` also shapes `ExportedAnnotator.annotate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # annotations only: this file must run with TensorFlow, pandas and MLflow alone
    from types import ModuleType

    import tensorflow as tf


def outputs_frame(
    out: Mapping[str, np.ndarray], class_names: Sequence[str], index: Sequence[str] | pd.Index | None = None
) -> pd.DataFrame:
    """Serving outputs (dict of arrays) as a DataFrame: label, confidence, prob_<class>..., topic_<k>...

    out: "label" `[n_cells]` (str, or bytes as a SavedModel returns them), "confidence" `[n_cells]`,
    "probs" `[n_cells, n_classes]` in the order of `class_names`, "cell_topic" `[n_cells, n_topics]`;
    index: the row labels (default 0 .. n_cells - 1).
    """
    label = np.asarray(out["label"])
    label = np.char.decode(label.astype(bytes)) if label.dtype.kind in "OS" else label.astype(str)
    frame = pd.DataFrame({"label": label, "confidence": out["confidence"]}, index=index)
    probs = pd.DataFrame(out["probs"], columns=[f"prob_{c}" for c in class_names], index=frame.index)
    topics = pd.DataFrame(
        out["cell_topic"], columns=[f"topic_{k}" for k in range(out["cell_topic"].shape[1])], index=frame.index
    )
    return pd.concat([frame, probs, topics], axis=1)


def call_in_batches(
    signature: Callable[..., Mapping[str, tf.Tensor]],
    batch_size: int,
    n_rows: int,
    make_inputs: Callable[[int, int], Mapping[str, tf.Tensor]],
) -> dict[str, np.ndarray]:
    """Run a serving signature over rows [0, n_rows) in blocks; concatenated numpy outputs.

    make_inputs(start, stop) gives the signature's keyword arguments for rows start:stop (at most
    `batch_size` rows). Each output is concatenated along its first axis (`[n_rows, ...]`). Raises
    IndexError when n_rows is 0 (no block to run).
    """
    parts = [
        {k: v.numpy() for k, v in signature(**make_inputs(start, min(start + batch_size, n_rows))).items()}
        for start in range(0, n_rows, batch_size)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


mlflow: ModuleType | None
try:
    import mlflow
except ImportError:  # tfp_scmix.export uses the helpers above without MLflow installed
    mlflow = None

if mlflow is not None:
    from mlflow.exceptions import MlflowException

    # mlflow.pyfunc is a LazyLoader attribute, whose module mypy cannot see through; it is a module at run time.
    class SCMixServing(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
        """Pyfunc wrapper of the SavedModel artifact "saved_model" (dense signature).

        `load_context` and `predict` keep MLflow's signatures unannotated beyond `predict`'s DataFrames:
        MLflow reads `predict`'s type hints (typing.get_type_hints) for its schema validation.
        """

        batch_size = 1024

        def load_context(self, context):
            """Load the SavedModel artifact and the model's genes and class names from its metadata."""
            import tensorflow as tf

            loaded = tf.saved_model.load(context.artifacts["saved_model"])
            self.serve = loaded.signatures["serving_default"]
            meta = loaded.signatures["metadata"]()
            self.genes = [g.decode() for g in meta["genes"].numpy()]
            self.class_names = [c.decode() for c in meta["class_names"].numpy()]

        def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
            """Outputs for raw counts `[n_cells, genes sent]` whose columns are gene names of the model.

            Returns one row per cell, indexed as the request: label, confidence, prob_<class>...,
            topic_<k>.... Raises MlflowException (INVALID_PARAMETER_VALUE, HTTP 400) for duplicated or
            unknown columns, a request with no rows, or counts that are not non-negative numbers.
            """
            import tensorflow as tf

            frame = pd.DataFrame(model_input)
            if frame.columns.has_duplicates:
                raise MlflowException.invalid_parameter_value(
                    f"duplicated gene columns {list(frame.columns[frame.columns.duplicated()][:5])}: send each once."
                )
            unknown = frame.columns.difference(pd.Index(self.genes))
            if len(unknown):
                raise MlflowException.invalid_parameter_value(
                    f"{len(unknown)} columns are not genes of the model (e.g. {list(unknown[:5])}); send only "
                    f"columns named as in the model's assets/genes.txt ({len(self.genes)} genes; genes not "
                    "sent count as zero)."
                )
            if len(frame) == 0:
                raise MlflowException.invalid_parameter_value("the request has no rows (cells).")
            try:
                # A gene not sent, or null in a record, is a zero count (records can list nonzeros only).
                counts = frame.reindex(columns=self.genes).fillna(0).to_numpy(np.float32)
                out = call_in_batches(
                    self.serve, self.batch_size, len(counts), lambda i, j: {"counts": tf.constant(counts[i:j])}
                )
            except (ValueError, TypeError, tf.errors.InvalidArgumentError) as err:
                raise MlflowException.invalid_parameter_value(
                    f"counts must be numbers (raw, non-negative counts): {getattr(err, 'message', err)}"
                ) from err
            return outputs_frame(out, self.class_names, index=frame.index)

    mlflow.models.set_model(SCMixServing())
