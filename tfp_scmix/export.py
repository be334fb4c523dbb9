"""Export stage: a trained `SCMix` (or `SCMixEnsemble`) -> TensorFlow SavedModel for serving, and a client.

The SavedModel holds only TensorFlow graphs and variables, so a server or client needs TensorFlow, not
tfp_scmix. Its signatures take raw counts in the model's gene order and return the deterministic
outputs of `SCMix.call` (posterior means):

  serving_default(counts float32 [batch, n_genes])
  serving_sparse(indices int64 [nnz, 2], values float32 [nnz], dense_shape int64 [2])
      -> {"probs" float32 [batch, n_classes], "label" string [batch], "label_id" int32 [batch],
          "confidence" float32 [batch], "cell_topic" float32 [batch, n_topics]}
  metadata() -> {"genes" string [n_genes], "class_names" string [n_classes], "gene_fingerprint" string,
                 "version" string}

The same metadata are in `assets/` as genes.txt, class_names.txt (one name a line) and tfp_scmix.json,
so a client can align its genes by reading files. `gene_fingerprint` is the first 16 hex digits of the
SHA-256 of the gene names joined by newlines (`tfp_scmix.data.gene_fingerprint`).

Usage: `python -m tfp_scmix.export MODEL.keras OUT_DIR [--overwrite] [--mlflow-experiment NAME [--max-cells N]]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tfp_scmix import __version__
from tfp_scmix.annotate import model_fingerprint
from tfp_scmix.data import (
    DataError,
    check_argument,
    check_counts,
    check_structure,
    export_target,
    from_anndata,
    gene_fingerprint,
)
from tfp_scmix.ensemble import as_ensemble
from tfp_scmix.io import ModelFileError, atomic_directory
from tfp_scmix.mlflow_serving import MAX_CELLS, UNASSIGNED, call_in_batches, outputs_frame

if TYPE_CHECKING:  # annotations only: TensorFlow and MLflow are imported when they are used
    import anndata
    import tensorflow as tf
    from mlflow.models.model import ModelInfo
    from numpy.typing import ArrayLike

    from tfp_scmix.ensemble import SCMixEnsemble
    from tfp_scmix.model import SCMix

SERVING_DENSE, SERVING_SPARSE, METADATA = "serving_default", "serving_sparse", "metadata"
GENES_FILE, CLASSES_FILE, METADATA_FILE = "genes.txt", "class_names.txt", "tfp_scmix.json"
OUTPUT_KEYS = ("probs", "label", "label_id", "confidence", "cell_topic", "empty")
MLFLOW_CODE = Path(__file__).with_name("mlflow_serving.py")


# --------------------------------------------------------------------------------------------
# SavedModel export
# --------------------------------------------------------------------------------------------


def _metadata(model: SCMix | SCMixEnsemble) -> dict[str, Any]:
    return {
        "genes": list(model.genes),
        "class_names": list(model.class_names),
        "gene_fingerprint": model.gene_fingerprint,
        "version": __version__,
        "n_genes": model.n_genes,
        "n_classes": model.n_classes,
        "n_topics": model.n_topics,
        # What ties the export to the runs that trained it: the training runs record the same two as tags.
        "model_fingerprint": model_fingerprint(model),
        "data_fingerprint": str(as_ensemble(model).members[0].provenance.get("data_fingerprint", "")),
        "signatures": {"dense": SERVING_DENSE, "sparse": SERVING_SPARSE, "metadata": METADATA},
        "settings": model.settings,
    }


def _serving_module(model: SCMix | SCMixEnsemble, asset_dir: Path) -> tuple[tf.Module, dict[str, Any]]:
    """A tf.Module holding the model's variables, the metadata assets and the serving functions."""
    import tensorflow as tf

    meta = _metadata(model)
    asset_dir.mkdir(parents=True, exist_ok=True)
    (asset_dir / GENES_FILE).write_text("\n".join(meta["genes"]) + "\n")
    (asset_dir / CLASSES_FILE).write_text("\n".join(meta["class_names"]) + "\n")
    (asset_dir / METADATA_FILE).write_text(json.dumps(meta, indent=1))

    module = tf.Module(name="tfp_scmix_serving")
    # Lists assigned to a tf.Module are tracked, so every variable the functions capture is saved.
    module.model_variables = list(model.variables)
    module.assets = [tf.saved_model.Asset(str(asset_dir / name)) for name in (GENES_FILE, CLASSES_FILE, METADATA_FILE)]
    n_genes = model.n_genes
    class_names = tf.constant(meta["class_names"])

    def predict(counts):
        out = model(counts, training=False)
        # A cell with no counts over the model's genes is called from the prior alone: "unassigned", label_id -1
        # and no confidence (NaN), as tfp_scmix.annotate and the MLflow server mark it.
        library = (
            tf.sparse.reduce_sum(counts, axis=1)
            if isinstance(counts, tf.SparseTensor)
            else tf.reduce_sum(counts, axis=1)
        )
        empty = tf.equal(library, 0.0)
        return {
            "probs": out["probs"],
            "label": tf.where(empty, tf.constant(UNASSIGNED), tf.gather(class_names, out["label"])),
            "label_id": tf.where(empty, tf.constant(-1, out["label"].dtype), out["label"]),
            "confidence": tf.where(empty, tf.constant(np.nan, out["confidence"].dtype), out["confidence"]),
            "cell_topic": out["cell_topic"],
            "empty": empty,
        }

    @tf.function(input_signature=[tf.TensorSpec([None, n_genes], tf.float32, name="counts")])
    def serve_dense(counts):
        with tf.control_dependencies(
            [tf.debugging.assert_non_negative(counts, message="counts must be raw (non-negative) counts")]
        ):
            return predict(tf.identity(counts))

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 2], tf.int64, name="indices"),
            tf.TensorSpec([None], tf.float32, name="values"),
            tf.TensorSpec([2], tf.int64, name="dense_shape"),
        ]
    )
    def serve_sparse(indices, values, dense_shape):
        checks = [
            tf.debugging.assert_equal(
                dense_shape[1],
                tf.constant(n_genes, tf.int64),
                message=(f"dense_shape[1] must be the model's number of genes ({n_genes})"),
            ),
            tf.debugging.assert_non_negative(values, message="counts must be raw (non-negative) counts"),
            tf.debugging.assert_non_negative(indices, message="indices must be (row, gene) pairs of non-negative ints"),
            tf.debugging.assert_less(
                indices[:, 0], dense_shape[0], message="row indices (column 0) must be below dense_shape[0]"
            ),
            tf.debugging.assert_less(
                indices[:, 1],
                tf.constant(n_genes, tf.int64),
                message=f"gene indices (column 1) must be below the number of genes of the model ({n_genes})",
            ),
        ]
        with tf.control_dependencies(checks):
            counts = tf.sparse.reorder(tf.SparseTensor(indices, values, dense_shape))
        repeated = tf.reduce_any(tf.reduce_all(tf.equal(counts.indices[1:], counts.indices[:-1]), axis=1))
        with tf.control_dependencies(
            [
                tf.debugging.assert_equal(
                    repeated, False, message="each (row, gene) pair must appear once in indices: sum repeated counts"
                )
            ]
        ):
            counts = tf.SparseTensor(tf.identity(counts.indices), counts.values, counts.dense_shape)
        return predict(counts)

    @tf.function(input_signature=[])
    def metadata():
        return {
            "genes": tf.constant(meta["genes"]),
            "class_names": class_names,
            "gene_fingerprint": tf.constant(meta["gene_fingerprint"]),
            "version": tf.constant(__version__),
        }

    module.serve_dense, module.serve_sparse, module.metadata = serve_dense, serve_sparse, metadata
    signatures = {SERVING_DENSE: serve_dense, SERVING_SPARSE: serve_sparse, METADATA: metadata}
    return module, signatures


def export_serving(model: SCMix | SCMixEnsemble, path: str | Path, overwrite: bool = False) -> Path:
    """Write `model` as a TensorFlow SavedModel at `path` (atomically) and return the path.

    Signatures and assets: see the module docstring. Outputs are deterministic posterior means. Raises
    FileExistsError when `path` exists and `overwrite` is false (`tfp_scmix.io.atomic_directory`), or when
    `overwrite` is true and `path` is something other than a SavedModel folder (a file, or a folder without
    saved_model.pb: what it holds is not ours to delete); TypeError when `overwrite` is not a bool. On any error
    `path` is left as it was. Raises NotTrainedError (a ValueError) for a model that has not been trained.
    """
    import tensorflow as tf

    from tfp_scmix.ensemble import trained

    export_target(path, overwrite)
    trained(model, "export")
    with atomic_directory(path, overwrite) as tmp:
        with tempfile.TemporaryDirectory(prefix="tfp_scmix_assets-") as asset_dir:
            module, signatures = _serving_module(model, Path(asset_dir))
            with _root_logging_left_alone():
                tf.saved_model.save(module, str(tmp), signatures=signatures)
    return Path(path)


@contextlib.contextmanager
def _root_logging_left_alone():
    """absl's logging functions, which TensorFlow's SavedModel writer calls, run `logging.basicConfig()` when the
    root logger has no handler: from then on the process printed every warning as "WARNING:tfp_scmix:..." and a
    user's own `basicConfig` was ignored. A handler that drops records stands on the root logger meanwhile."""
    import logging

    placeholder = logging.NullHandler()
    root = logging.getLogger()
    added = not root.handlers
    if added:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        if added:
            root.removeHandler(placeholder)


# --------------------------------------------------------------------------------------------
# Client: call an export from Python, aligning an AnnData to its genes
# --------------------------------------------------------------------------------------------


class ExportedAnnotator:
    """A loaded export: predicts from counts in the model's gene order or from an AnnData.

    annotator = ExportedAnnotator("export/1")
    annotator.predict(csr)          # [cells, n_genes] in annotator.genes order -> dict of numpy arrays
    annotator.annotate(adata)       # aligns adata's genes by name -> DataFrame indexed by obs_names
    """

    def __init__(self, path: str | os.PathLike[str], batch_size: int = 1024) -> None:
        """Load the SavedModel at `path`; `batch_size` cells go to the serving signature per call.

        Raises FileNotFoundError when `path` holds no saved_model.pb or no variables index (an incomplete copy);
        ValueError for a batch_size below 1.
        """
        import tensorflow as tf

        check_argument("batch_size", batch_size, 1, integer=True)
        path = Path(path)
        if not (path / "saved_model.pb").exists():
            raise FileNotFoundError(
                f"no SavedModel at {path} (saved_model.pb is missing); "
                "write one with tfp_scmix.export.export_serving(model, path)."
            )
        if not (path / "variables" / "variables.index").is_file():
            raise FileNotFoundError(
                f"the SavedModel at {path} is incomplete (variables/variables.index is missing: a copy or an export "
                "that did not finish); copy the whole folder again, or write it again with "
                "tfp_scmix.export.export_serving(model, path)."
            )
        self.path, self.batch_size = path, int(batch_size)
        try:
            self.loaded = tf.saved_model.load(str(path))
        except (OSError, ValueError, tf.errors.OpError) as err:  # a truncated or damaged saved_model.pb, say
            raise ModelFileError(
                f"the SavedModel at {path} cannot be loaded ({type(err).__name__}: {str(err).strip()[:200]}); it is "
                "damaged or not a whole copy: copy the whole folder again, or write it again with "
                "tfp_scmix.export.export_serving(model, path)."
            ) from None
        meta = {k: v.numpy() for k, v in self.loaded.signatures[METADATA]().items()}
        self.genes = [g.decode() for g in meta["genes"]]
        self.class_names = [c.decode() for c in meta["class_names"]]
        self.gene_fingerprint = meta["gene_fingerprint"].decode()
        self.version = meta["version"].decode()
        self.n_genes = len(self.genes)

    def check_genes(self, genes: Iterable[str] | None = None, fingerprint: str | None = None) -> None:
        """Raise `DataError` unless the gene list (or its fingerprint) is the model's, in its order."""
        if genes is not None:
            fingerprint = gene_fingerprint(genes)
        if fingerprint is not None and fingerprint != self.gene_fingerprint:
            raise DataError(
                f"gene fingerprint {fingerprint} does not match the exported model's "
                f"{self.gene_fingerprint}: the columns are not the model's {self.n_genes} genes "
                "in its order. Align them first (ExportedAnnotator.annotate(adata) does it by "
                f"name; the model's genes are in {self.path / 'assets' / GENES_FILE})."
            )

    def predict(
        self, counts: sp.spmatrix | ArrayLike, genes: Iterable[str] | None = None, fingerprint: str | None = None
    ) -> dict[str, np.ndarray]:
        """Outputs for raw counts `[cells, n_genes]` (CSR or dense) in the model's gene order.

        genes / fingerprint: the caller's column names or their fingerprint, checked against the model's.
        Returns {"probs" [cells, n_classes], "label" (str) [cells], "label_id" [cells], "confidence" [cells],
        "cell_topic" [cells, n_topics], "empty" (bool) [cells]}: a cell with no counts is "unassigned", label_id
        -1, confidence NaN (exports written before the "empty" output call it from the prior and lack the key).
        Raises DataError when the genes or fingerprint do not match, when
        counts are not `[cells, n_genes]` or not raw counts (`tfp_scmix.data.check_counts`: a damaged sparse
        matrix, NaN, infinite, negative or non-integer values), or when there are no cells.
        """
        import tensorflow as tf

        self.check_genes(genes, fingerprint)
        if sp.issparse(counts):
            check_structure(counts, "the count matrix")  # before scipy converts them
        counts = sp.csr_matrix(counts, dtype=np.float32)
        check_counts(counts, "the count matrix")
        if counts.ndim != 2 or counts.shape[1] != self.n_genes:
            raise DataError(
                f"counts have shape {counts.shape}, the exported model expects "
                f"[cells, {self.n_genes}] in its gene order; align them first "
                "(ExportedAnnotator.annotate(adata) aligns an AnnData by gene name)."
            )
        if counts.shape[0] == 0:
            raise DataError("no cells to predict (0 rows).")
        coo = counts.tocoo()  # rows then columns, as a SparseTensor wants them

        def block(start, stop):
            rows = slice(*np.searchsorted(coo.row, [start, stop]))
            return {
                "indices": tf.constant(np.stack([coo.row[rows] - start, coo.col[rows]], 1), tf.int64),
                "values": tf.constant(coo.data[rows], tf.float32),
                "dense_shape": tf.constant([stop - start, self.n_genes], tf.int64),
            }

        result = call_in_batches(self.loaded.signatures[SERVING_SPARSE], self.batch_size, counts.shape[0], block)
        result["label"] = np.char.decode(result["label"].astype(bytes))
        return result

    def annotate(
        self, adata: anndata.AnnData | str | os.PathLike[str], counts: str | None = None, min_gene_fraction: float = 0.5
    ) -> pd.DataFrame:
        """Align an AnnData (or .h5ad path) to the model's genes by name and predict every cell.

        counts: the slot of the raw counts, as in `tfp_scmix.data.from_anndata`; min_gene_fraction: the
        fraction of the model's genes that must be in the data (the rest count as zero).
        Returns a DataFrame indexed by obs_names: label, confidence, prob_<class>..., topic_<k>..., empty (no
        counts over the model's genes: label "unassigned", confidence NaN).
        Raises DataError as `from_anndata` does (no raw counts, too few of the model's genes, ...).
        """
        data = from_anndata(
            adata,
            counts=counts,
            label_key=None,
            genes=self.genes,
            min_gene_fraction=min_gene_fraction,
            allow_empty_cells=True,
        )
        out = self.predict(data.counts, genes=data.genes)
        return outputs_frame(out, self.class_names, index=data.obs_names)


def load_exported(path: str | os.PathLike[str], batch_size: int = 1024) -> ExportedAnnotator:
    """Load an export written by `export_serving` (see `ExportedAnnotator`; FileNotFoundError when absent or
    incomplete, ModelFileError (a ValueError) when damaged)."""
    return ExportedAnnotator(path, batch_size)


# --------------------------------------------------------------------------------------------
# MLflow: a pyfunc model that serves the SavedModel
# --------------------------------------------------------------------------------------------


def log_mlflow(
    model_or_export: SCMix | SCMixEnsemble | str | os.PathLike[str],
    name: str = "model",
    input_example_cells: int = 2,
    max_cells: int = MAX_CELLS,
    **log_kwargs: Any,
) -> ModelInfo:
    """Log a served model to the active MLflow run (one is started if none is); return its ModelInfo.

    `model_or_export`: an SCMix or SCMixEnsemble (exported to a temporary SavedModel first) or an export
    directory.
    The pyfunc model (tfp_scmix/mlflow_serving.py, logged as code) needs TensorFlow and pandas, not
    tfp_scmix. Serve it with `mlflow models serve -m <model_uri> --env-manager local`; its input is a
    DataFrame whose columns are the model's gene names (raw counts), its output one row per cell:
    label, confidence, prob_<class>..., topic_<k>..., empty. input_example_cells: rows of the logged input
    example; max_cells: the most cells one request may hold (the server answers 413 above it; the model
    config's "max_cells"); log_kwargs go to `mlflow.pyfunc.log_model`. Raises FileNotFoundError for a
    directory without an export, ValueError for max_cells below 1.
    """
    check_argument("max_cells", max_cells, 1, integer=True)
    import mlflow
    import tensorflow as tf
    from mlflow.models import ModelSignature, infer_signature

    with contextlib.ExitStack() as stack:
        export = model_or_export
        if not isinstance(model_or_export, (str, os.PathLike)):
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="tfp_scmix_export-"))
            export = export_serving(model_or_export, Path(tmp) / "saved_model")
        annotator = ExportedAnnotator(export)
        example = pd.DataFrame(np.zeros((input_example_cells, annotator.n_genes), np.float32), columns=annotator.genes)
        example.iloc[:, : min(10, annotator.n_genes)] = 1.0
        outputs = outputs_frame(annotator.predict(example.to_numpy()), annotator.class_names)
        outputs["empty"] = False
        # No input schema: MLflow's enforcement would refuse integer counts (int64 -> float is not a
        # "safe" cast for it) and bury a missing gene in a dump of the whole schema. SCMixServing checks
        # the columns itself and casts the counts to float32.
        signature = ModelSignature(inputs=None, outputs=infer_signature(outputs).inputs)
        requirements = [
            f"tensorflow=={tf.__version__}",
            f"pandas=={pd.__version__}",
            f"numpy=={np.__version__}",
            f"mlflow=={mlflow.__version__}",
        ]
        if mlflow.active_run() is None:
            stack.enter_context(mlflow.start_run())
        recorded = json.loads((Path(export) / "assets" / METADATA_FILE).read_text())
        mlflow.set_tags(
            {
                "tfp_scmix.version": annotator.version,
                "tfp_scmix.gene_fingerprint": annotator.gene_fingerprint,
                # the training run's tags of the same names (exports written before them have none)
                **{f"tfp_scmix.{k}": recorded[k] for k in ("model_fingerprint", "data_fingerprint") if recorded.get(k)},
            }
        )
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MLFLOW_CODE),
            artifacts={"saved_model": str(export)},
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
            model_config={"max_cells": int(max_cells), **log_kwargs.pop("model_config", {})},
            **log_kwargs,
        )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status. Exits with status 2 (argparse)
    when the model file cannot be loaded."""
    parser = argparse.ArgumentParser(
        prog="python -m tfp_scmix.export", description="Export a trained tfp_scmix model (.keras) as a SavedModel."
    )
    parser.add_argument("model", help="trained model file (MODEL.keras)")
    parser.add_argument("out_dir", help="SavedModel directory to write (e.g. export/1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument(
        "--mlflow-experiment",
        default=None,
        help="also log a served pyfunc model to this MLflow experiment (tracking store: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--max-cells",
        type=int,
        default=MAX_CELLS,
        help=f"with --mlflow-experiment: the most cells one request may hold; more get HTTP 413 (default {MAX_CELLS})",
    )
    args = parser.parse_args(argv)

    from tfp_scmix.io import ModelFileError, load_model

    try:
        model = load_model(args.model)
    except ModelFileError as err:
        parser.error(str(err))
    path = export_serving(model, args.out_dir, overwrite=args.overwrite)
    print(
        f"exported {model.n_genes} genes x {model.n_classes} classes (gene fingerprint "
        f"{model.gene_fingerprint}) to {path}"
    )
    if args.mlflow_experiment:
        print(f"logged MLflow model {log_to_experiment(path, args.mlflow_experiment, args.max_cells).model_uri}")
    return 0


def log_to_experiment(export_dir: str | os.PathLike[str], experiment: str, max_cells: int | None = None) -> ModelInfo:
    """`log_mlflow` of an export directory in a new run of the MLflow experiment `experiment` (created if needed,
    as the training runs' experiments are: `tracking.experiment_id`, its artifacts beside a SQLite store), at most
    `max_cells` cells a request (None: `MAX_CELLS`): what `--mlflow-experiment` of both command lines does."""
    import mlflow

    from tfp_scmix.tracking import experiment_id

    # One store, one place for its artifacts: MLflow's own set_experiment put them in ./mlruns of the working folder
    # while training runs of the same SQLite store had theirs beside it (a trial).
    mlflow.set_experiment(experiment_id=experiment_id(experiment))
    return log_mlflow(export_dir, max_cells=MAX_CELLS if max_cells is None else max_cells)


if __name__ == "__main__":
    sys.exit(main())
