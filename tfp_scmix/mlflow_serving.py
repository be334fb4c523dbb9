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
    "probs" `[n_cells, n_classes]` in the order of `class_names`, "cell_topic" `[n_cells, n_topics]`, and
    optionally "empty" `[n_cells]` (bool: no counts over the model's genes), the last column when given;
    index: the row labels (default 0 .. n_cells - 1).
    """
    label = np.asarray(out["label"])
    label = np.char.decode(label.astype(bytes)) if label.dtype.kind in "OS" else label.astype(str)
    frame = pd.DataFrame({"label": label, "confidence": out["confidence"]}, index=index)
    probs = pd.DataFrame(out["probs"], columns=[f"prob_{c}" for c in class_names], index=frame.index)
    topics = pd.DataFrame(
        out["cell_topic"], columns=[f"topic_{k}" for k in range(out["cell_topic"].shape[1])], index=frame.index
    )
    parts = [frame, probs, topics]
    if "empty" in out:
        parts.append(pd.DataFrame({"empty": np.asarray(out["empty"], bool)}, index=frame.index))
    return pd.concat(parts, axis=1)


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


# Cells one request may hold (HTTP 413 above): a request is parsed whole by MLflow before the model sees it
# (100,000 cells took 54.5 s and 5.5 GB; issue 18). Set per model with export.log_mlflow(max_cells=...).
MAX_CELLS = 10_000
UNASSIGNED = "unassigned"  # as tfp_scmix.annotate marks cells without counts

mlflow: ModuleType | None
try:
    import mlflow
except ImportError:  # tfp_scmix.export uses the helpers above without MLflow installed
    mlflow = None


def count_problem(counts: np.ndarray) -> str | None:
    """What makes `counts` (float64 `[cells, genes]`) not raw counts, or None: the checks of
    `tfp_scmix.data.check_counts` (repeated here, as this file runs without tfp_scmix; tests/test_export.py
    checks both refuse the same values). Values at or above float32's largest (3.4e38) count as infinite."""
    finite = np.isfinite(counts) & (np.abs(counts) < np.finfo(np.float32).max)
    if not finite.all():
        return (
            f"{int((~finite).sum())} counts are infinite or too large for float32; raw UMI counts are finite integers."
        )
    if counts.size and counts.min() < 0:
        return f"counts are negative (min {counts.min():.3g}); send raw (non-negative) counts, not scaled values."
    if not np.array_equal(counts, np.round(counts)):
        kind = "log-normalized" if counts.max() <= 20 else "normalized or corrected"
        return (
            f"counts are not integers (max {counts.max():.3g}); they look {kind}. Send the raw UMI counts "
            "(round corrected counts to integers first)."
        )
    return None


if mlflow is not None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_EXHAUSTED

    class RequestTooLarge(MlflowException):
        """A request of more cells than the served model's limit: HTTP 413 (Payload Too Large)."""

        def __init__(self, message: str):
            super().__init__(message, error_code=RESOURCE_EXHAUSTED)

        def get_http_status_code(self):
            return 413

    # mlflow.pyfunc is a LazyLoader attribute, whose module mypy cannot see through; it is a module at run time.
    class SCMixServing(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
        """Pyfunc wrapper of the SavedModel artifact "saved_model" (dense signature).

        `load_context` and `predict` keep MLflow's signatures unannotated beyond `predict`'s DataFrames:
        MLflow reads `predict`'s type hints (typing.get_type_hints) for its schema validation.
        The model config's "max_cells" (`export.log_mlflow(max_cells=...)`, default `MAX_CELLS`) limits the
        cells of one request.
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
            self.max_cells = int((getattr(context, "model_config", None) or {}).get("max_cells", MAX_CELLS))

        def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
            """Outputs for raw counts `[n_cells, genes sent]` whose columns are gene names of the model.

            Returns one row per cell, indexed as the request: label, confidence, prob_<class>...,
            topic_<k>..., empty (the cell has no counts over the model's genes: its label is "unassigned",
            as `tfp_scmix.annotate` marks it). Raises MlflowException (INVALID_PARAMETER_VALUE, HTTP 400) for
            duplicated or unknown columns, a request with no rows, or counts that are not raw counts (not
            numbers, infinite, negative or not integers); `RequestTooLarge` (HTTP 413) above `max_cells` rows.
            """
            import tensorflow as tf

            frame = pd.DataFrame(model_input)
            if len(frame) > self.max_cells:
                raise RequestTooLarge(
                    f"the request has {len(frame)} cells; this server takes at most {self.max_cells} per request. "
                    "Split the cells over several requests."
                )
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

            def block(start, stop):
                # A gene not sent, or null in a record, is a zero count (records can list nonzeros only): JSON
                # has no other way to leave a gene out, and once parsed the two cannot be told apart.
                try:
                    counts = frame.iloc[start:stop].reindex(columns=self.genes).fillna(0).to_numpy(np.float64)
                except (ValueError, TypeError) as err:
                    raise MlflowException.invalid_parameter_value(
                        f"counts must be numbers (raw, non-negative counts): {err}"
                    ) from err
                problem = count_problem(counts)
                if problem:
                    raise MlflowException.invalid_parameter_value(f"cells {start}-{stop - 1}: {problem}")
                return {"counts": tf.constant(counts, tf.float32)}, counts.sum(axis=1) == 0

            empty = []

            def inputs(start, stop):
                counts, none = block(start, stop)
                empty.append(none)
                return counts

            try:
                out = call_in_batches(self.serve, self.batch_size, len(frame), inputs)
            except tf.errors.InvalidArgumentError as err:
                raise MlflowException.invalid_parameter_value(
                    f"counts must be numbers (raw, non-negative counts): {getattr(err, 'message', err)}"
                ) from err
            result = outputs_frame(out, self.class_names, index=frame.index)
            result["empty"] = np.concatenate(empty)
            result.loc[result["empty"], "label"] = UNASSIGNED
            # Called from no counts: no confidence. None (JSON null), not NaN, which strict JSON parsers refuse.
            result["confidence"] = result["confidence"].astype(object).where(~result["empty"], None)
            return result

    mlflow.models.set_model(SCMixServing())
