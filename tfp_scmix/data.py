"""Data stage: AnnData -> validated raw counts, gene vocabulary, labels, batches -> tf.data.

Everything the model sees passes through `SCData`: a sparse CSR count matrix `[n_cells, n_genes]`,
the gene vocabulary, integer labels (`-1` where unknown) and integer batch ids. Minibatches are
`tf.SparseTensor`s gathered row by row from the CSR arrays, so the whole matrix is never densified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import logging
import math
import numbers
import os
import re
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:  # annotations only: importing this module stays free of TensorFlow and anndata
    import anndata
    import tensorflow as tf
    from numpy.typing import ArrayLike, DTypeLike

logger = logging.getLogger("tfp_scmix")

DATA_DIR_ENV = "TFP_SCMIX_DATA"
UNLABELLED = -1
# Keys of the dict that every minibatch is.
COUNTS, LABEL, BATCH = "counts", "label", "batch"
# The batch id of cells from a dataset the model was not trained on (`SCMix.batch_rows`): prediction divides out
# the centre of the trained batches' offsets (`SCMix.prediction_offsets`).
NEW_BATCH = -1


def did_you_mean(unknown: Iterable[str], known: Iterable[str]) -> str:
    """ " (did you mean 'Cell_Type'?)" for the known names closest to the unknown ones, or "": the same name in
    another case first, else difflib's closest match above 0.7 similarity. For messages about a name given wrong
    (an obs column, a setting)."""
    known = [str(k) for k in known]
    by_case = {k.lower(): k for k in known}
    close = set()
    for name in unknown:
        match = by_case.get(str(name).lower()) or next(
            iter(difflib.get_close_matches(str(name), known, n=1, cutoff=0.7)), None
        )
        if match is not None and match != name:
            close.add(match)
    return f" (did you mean {', '.join(repr(m) for m in sorted(close))}?)" if close else ""


class OncePerMessage(logging.Filter):
    """A logging filter that lets each distinct message through once (a warning repeated for every chunk of a
    prediction, a status line repeated by the steps of one command)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = record.getMessage()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class DataError(ValueError):
    """Input data that the model cannot use; the message says what is wrong and how to fix it."""


def check_argument(
    name: str, value: Any, low: float, high: float = math.inf, *, integer: bool = False, hint: str = ""
) -> None:
    """Raise ValueError naming `name` and `value` unless `value` is a number in [low, high] (a whole one with
    `integer`). Every public numeric argument of the package goes through it; `hint` is added to the message."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not low <= float(value) <= high
        or (integer and not float(value).is_integer())
    ):
        kind = "a whole number" if integer else "a number"
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {kind} {bounds}, received {value!r}{hint}")


# --------------------------------------------------------------------------------------------
# Reading and locating counts
# --------------------------------------------------------------------------------------------


def data_path(name: str) -> Path:
    """Path of a dataset file: `name` itself if it exists, else `$TFP_SCMIX_DATA/name`; a relative `name` without a
    suffix is also looked for as `name`.h5ad in both places ("pbmc3k" finds $TFP_SCMIX_DATA/pbmc3k.h5ad).

    Raises DataError when none exists; the message says where it looked (for an absolute path, only there).
    """
    path = Path(name)
    if path.exists():
        return path
    if path.is_absolute():
        folder = "" if path.parent.is_dir() else f"; its folder {path.parent} does not exist either"
        raise DataError(f"no file at {name}{folder}. Check the path.")
    root = os.environ.get(DATA_DIR_ENV)
    names = [path] if path.suffix else [path, path.with_name(path.name + ".h5ad")]
    for candidate in [*names[1:], *(Path(root) / n for n in names if root)]:
        if candidate.exists():
            return candidate
    where = f"${DATA_DIR_ENV}={root}" if root else f"${DATA_DIR_ENV} is not set"
    raise DataError(
        f"dataset {name!r} not found (looked in the working directory; {where}). "
        f"Pass a path to an .h5ad file or set {DATA_DIR_ENV} to its folder."
    )


def export_target(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Check that a SavedModel export may be written at `path`: absent, or (with `overwrite`) an earlier export
    (a folder with saved_model.pb), never another folder or file. Here, beside `data_path`, so that the command
    line checks it before TensorFlow's import (`tfp_scmix.export.export_serving` checks it again).

    Raises TypeError when `overwrite` is not a bool (a string such as "no" would count as true),
    FileExistsError naming what is there and what to do."""
    if not isinstance(overwrite, (bool, np.bool_)):
        raise TypeError(f"overwrite must be True or False, received {overwrite!r}.")
    path = Path(path)
    if not (overwrite and (path.exists() or path.is_symlink())):
        return
    if not path.is_dir() or not (path / "saved_model.pb").is_file():
        what = "a folder that is not a SavedModel export (no saved_model.pb)" if path.is_dir() else "a file"
        raise FileExistsError(
            f"{path} is {what}; overwrite replaces an earlier export only, so it is left as it is. "
            "Export to a new folder (e.g. export/2), or move it away first."
        )


@contextlib.contextmanager
def duplicate_gene_names_unsaid() -> Iterator[None]:
    """anndata's warning of duplicated var names, hidden: `align_genes` refuses such data with an error that names
    the genes and the fix, and anndata warned once for each AnnData the package read or made of them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        yield


def read_h5ad(path: str | os.PathLike[str], backed: str | None = None) -> anndata.AnnData:
    """Read an .h5ad file (`backed="r"`: leave the counts on disk); `path` as for `data_path`.

    Raises DataError, naming the file, when it is missing, truncated or corrupt.
    """
    import anndata

    path = data_path(str(path))
    if path.is_dir() or path.suffix.lower() in (".h5", ".loom", ".mtx", ".gz"):
        raise DataError(
            f"{path} is {'a folder' if path.is_dir() else _describe(path)}, not an .h5ad file; "
            "read it with tfp_scmix.read (10x folders and .h5, .loom) and pass the AnnData."
        )
    try:
        with duplicate_gene_names_unsaid():
            return anndata.read_h5ad(path, backed=backed)
    except Exception as err:  # h5py/anndata raise many types for damaged files
        described = _describe(path)
        hint = (
            "The file may be truncated or corrupt: copy or download it again."
            if "HDF5" in described
            else f"It is {described}, not an HDF5 file: tfp_scmix.read lists the formats it reads."
        )
        raise DataError(f"could not read {path} as an .h5ad file ({type(err).__name__}: {err}). {hint}") from err


# What each supported file holds and how `read` reads it (the field's own readers).
FORMATS = {
    ".h5ad": "AnnData (anndata.read_h5ad)",
    ".h5": "10x Genomics HDF5 matrix (scanpy.read_10x_h5)",
    ".loom": "Loom (anndata.io.read_loom, needs loompy)",
    "10x directory": "10x matrix.mtx(.gz) with barcodes and features/genes .tsv(.gz) (anndata.io.read_mtx)",
}
_MAGIC = {b"\x89HDF": "an HDF5 file", b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive"}


def read(path: str | os.PathLike[str], backed: str | None = None) -> anndata.AnnData:
    """Read counts from any of `FORMATS` into an AnnData: .h5ad, 10x .h5, .loom, or a 10x folder
    (or its matrix.mtx file) of matrix.mtx, barcodes.tsv and features.tsv / genes.tsv, gzipped or not.
    backed="r": an .h5ad's counts stay on disk (`read_h5ad`); the other formats are read into memory.

    10x files get gene symbols as var_names (made unique, as scanpy does) and the Ensembl ids in
    var["gene_ids"]; of a features.tsv with feature types only "Gene Expression" rows are kept.
    Raises DataError naming the file, its format and what to do, for a missing file, a format outside
    `FORMATS`, a missing optional reader (scanpy for .h5, loompy for .loom) or a damaged file.
    """
    path = data_path(str(path))
    if path.is_dir() or path.name.startswith("matrix.mtx"):
        return _read_10x_mtx(path if path.is_dir() else path.parent)
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        return read_h5ad(path, backed=backed)
    if suffix == ".h5":
        return _with_optional_reader(path, "scanpy", lambda: __import__("scanpy").read_10x_h5(path))
    if suffix == ".loom":
        import anndata

        with warnings.catch_warnings():  # a file without loompy's names: numbered, then named by `_loom_names`
            warnings.filterwarnings("ignore", message="Transforming to str index")
            adata = _with_optional_reader(path, "loompy", lambda: anndata.io.read_loom(path, sparse=True, X_name=""))
        return _loom_names(adata, path)
    raise DataError(
        f"{path} is {_describe(path)}, which tfp_scmix does not read. It reads: "
        + "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
        + ". Convert other formats with anndata or scanpy (e.g. sc.read(...).write_h5ad('data.h5ad'))."
    )


# The attributes a .loom names its genes and cells by: loompy's and velocyto's ("Gene", "CellID", what anndata's
# reader looks for), then those anndata's `write_loom` writes (the index's name, "var_names"/"obs_names" without one).
LOOM_NAMES = {"var": ("Gene", "var_names", "index", "gene_symbols"), "obs": ("CellID", "obs_names", "index")}


def _loom_names(adata: anndata.AnnData, path: Path) -> anndata.AnnData:
    """Genes and cells of a .loom named by its attributes (`LOOM_NAMES`) where anndata's reader left them numbered
    0, 1, ... (a file written by anndata's own `write_loom`: a trial's model then matched no gene). Gene names are
    made unique as scanpy does. Raises DataError when the genes have no names at all."""
    import anndata

    for axis, columns in LOOM_NAMES.items():
        frame = getattr(adata, axis)
        if not np.array_equal(frame.index.astype(str), np.arange(len(frame)).astype(str)):
            continue
        column = next((c for c in columns if c in frame), None)
        if column is None:
            if axis == "var":
                raise DataError(
                    f"{path} names no genes (row attributes: {list(frame.columns)}; expected one of {list(columns)}): "
                    "write it with the gene names as a row attribute (loompy's 'Gene'), or convert it to .h5ad."
                )
            continue
        names = pd.Index(frame[column].astype(str).tolist(), dtype=object)
        frame = frame.drop(columns=column)
        frame.index = anndata.utils.make_index_unique(names) if axis == "var" else names
        setattr(adata, axis, frame)
    return adata


def _describe(path: Path) -> str:
    """What a file looks like, for error messages: its suffix and, from its first bytes, its container."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return f"unreadable ({err})"
    kind = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
    if kind is None:
        kind = "a text file" if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "a binary file"
    return f"a {path.suffix or 'suffix-less'} file ({kind})"


def _with_optional_reader(path: Path, package: str, reader: Callable[[], Any]) -> anndata.AnnData:
    try:
        return reader()
    except ImportError as err:
        raise DataError(
            f"reading {path} needs the {package} package ({err}); install it (pip install {package}) or "
            "convert the file to .h5ad elsewhere."
        ) from err
    except Exception as err:  # the readers raise many types for damaged files
        raise DataError(f"could not read {path} ({type(err).__name__}: {err}); {_describe(path)}.") from err


def _read_10x_mtx(folder: Path) -> anndata.AnnData:
    """A 10x Genomics matrix folder (Cell Ranger 2: genes.tsv, 3+: features.tsv; gzipped or not)."""
    import anndata

    def find(*names: str) -> Path | None:
        return next((folder / n for name in names for n in (name, name + ".gz") if (folder / n).exists()), None)

    matrix, barcodes, features = find("matrix.mtx"), find("barcodes.tsv"), find("features.tsv", "genes.tsv")
    if matrix is None or barcodes is None or features is None:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise DataError(
            f"{folder} is not a 10x matrix folder: it needs matrix.mtx, barcodes.tsv and features.tsv (or "
            f"genes.tsv), gzipped or not; it holds {found}. Point at the folder Cell Ranger wrote "
            "(filtered_feature_bc_matrix)."
        )
    try:
        adata = anndata.io.read_mtx(matrix).T  # 10x stores genes x cells
        genes = pd.read_csv(features, sep="\t", header=None, dtype=str)
        cells = pd.read_csv(barcodes, sep="\t", header=None, dtype=str)[0]
    except Exception as err:
        raise DataError(f"could not read the 10x folder {folder} ({type(err).__name__}: {err}).") from err
    if genes.shape[0] != adata.n_vars or len(cells) != adata.n_obs:
        raise DataError(
            f"the 10x folder {folder} does not fit together: matrix.mtx is {adata.n_vars} genes x "
            f"{adata.n_obs} cells, {features.name} lists {genes.shape[0]} genes and {barcodes.name} "
            f"{len(cells)} barcodes."
        )
    symbols = genes[1] if genes.shape[1] > 1 else genes[0]
    adata.obs_names = pd.Index(cells.to_numpy())
    adata.var_names = anndata.utils.make_index_unique(pd.Index(symbols.to_numpy()))  # as scanpy's reader
    adata.var["gene_ids"] = genes[0].to_numpy()
    if genes.shape[1] > 2:
        adata.var["feature_types"] = genes[2].to_numpy()
        adata = adata[:, adata.var["feature_types"].to_numpy() == "Gene Expression"].copy()
    adata.X = sp.csr_matrix(adata.X)
    return adata


class Workspace:
    """Arrays reused from one call to the next, for work on many minibatches in turn (one per thread: not
    thread-safe). Each of a minibatch's temporaries would otherwise be new memory, and the first write to new memory
    costs the kernel's zeroing of each page: on the benchmark's virtual machines normalising 1,024 Kang cells took
    4.7 ms in new temporaries and 1.5 ms in a workspace (docs/performance.md, "Scratch memory reused, the posterior
    draws traced")."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, size: int, dtype: Any) -> np.ndarray:
        """A 1-D array `[size]` of `dtype` with undefined contents: the memory held under `name`, made larger (by
        half again) when it is too small. The next request under the same name returns the same memory."""
        dtype = np.dtype(dtype)
        held = self._arrays.get(name)
        if held is None or held.dtype != dtype or held.size < size:
            held = np.empty(max(size + size // 2, 1), dtype)
            self._arrays[name] = held
        return held[:size]


def check_structure(matrix: Any, where: str, full: bool = True) -> None:
    """Check the arrays of a compressed sparse matrix (CSR, CSC, BSR) before any arithmetic reads them.

    A gene index out of range or pointers that go backwards (a damaged file, hand-built arrays) would make
    scipy's compiled products read or write out of bounds: a segmentation fault or heap corruption instead
    of an error. O(nnz); full=False checks the pointers only, O(rows): the arrays' lengths and pointers that
    start at 0, never go backwards and stay within the entries, so that row views of a CSR matrix are in bounds
    (their indices still to be checked). CSR and CSC are checked by numpy on the arrays as they are (scipy's
    `check_format` copies arrays that are views of larger ones, as row views of a chunk are), other compressed
    formats by scipy. Raises DataError naming `where`; other matrices pass (COO checks its own indices).
    """
    if not hasattr(matrix, "check_format"):
        return
    try:
        if getattr(matrix, "format", None) in ("csr", "csc"):
            _check_compressed(matrix, full)
        else:
            matrix.check_format(full_check=full)
    except ValueError as err:
        raise DataError(
            f"the sparse matrix of {where} is damaged ({err}): its index arrays do not describe a "
            f"{matrix.shape[0]} x {matrix.shape[1]} matrix. The file may be corrupt: copy or write it again."
        ) from err


def _check_compressed(matrix: Any, full: bool) -> None:
    """The checks of scipy's `check_format` on a CSR or CSC matrix's arrays (its messages), without its copies.
    Raises ValueError."""
    major, minor = matrix.shape if matrix.format == "csr" else matrix.shape[::-1]
    indptr, indices = np.asarray(matrix.indptr), np.asarray(matrix.indices)
    if indptr.ndim != 1 or indices.ndim != 1 or np.ndim(matrix.data) != 1:
        raise ValueError("data, indices, and indptr should be 1-D")
    if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        raise ValueError(f"indices and indptr must be integers, not {indices.dtype} and {indptr.dtype}")
    if len(indptr) != major + 1:
        raise ValueError(f"index pointer size {len(indptr)} should be {major + 1}")
    if indptr[0] != 0:
        raise ValueError("index pointer should start with 0")
    if len(indices) != len(matrix.data):
        raise ValueError("indices and data should have the same size")
    if indptr[-1] > len(indices):
        raise ValueError("Last value of index pointer should be less than the size of index and data arrays")
    if major and np.diff(indptr).min() < 0:
        raise ValueError("indptr must be a non-decreasing sequence")
    nnz = int(indptr[-1])
    if full and nnz:
        stored = indices[:nnz]
        if stored.max() >= minor:
            raise ValueError(f"indices must be < {minor}")
        if stored.min() < 0:
            raise ValueError("indices must be >= 0")


def _as_csr(matrix: Any, where: str) -> sp.csr_matrix:
    if sp.issparse(matrix):
        check_structure(matrix, where)  # before scipy converts or copies it
        return sp.csr_matrix(matrix)
    if hasattr(matrix, "to_memory"):  # anndata backed datasets
        return _as_csr(matrix.to_memory(), where)
    return sp.csr_matrix(np.asarray(matrix))


def _bad_cells(counts: sp.csr_matrix, bad: np.ndarray, row_offset: int) -> str:
    """Which cells hold the stored entries flagged in `bad` `[nnz]`: "1 cell (row 1500)", "12 cells (the first
    at row 1500)" or, when every cell of the matrix does, "all 1,000 cells read" (the matrix may be one chunk of a
    larger dataset, as prediction reads it), rows counted from `row_offset` (the matrix's first row in its
    dataset)."""
    n_cells = counts.shape[0]
    stored = int(counts.indptr[-1])  # entries past the last pointer belong to no cell
    rows = np.unique(np.repeat(np.arange(n_cells), np.diff(counts.indptr))[np.asarray(bad[:stored], bool)])
    if len(rows) == 0:
        return "no cell"
    first = int(rows[0]) + int(row_offset)
    if len(rows) == n_cells and n_cells > 1:
        return f"all {n_cells:,} cells read"
    return f"1 cell (row {first})" if len(rows) == 1 else f"{len(rows)} cells (the first at row {first})"


def _non_integer_message(counts: sp.csr_matrix, where: str, row_offset: int = 0) -> str:
    """What non-integer counts look like, from how many values have decimals, their largest value and the cells'
    totals, where they are, and what to do."""
    values = counts.data
    bad = ~np.isclose(values, np.rint(values))
    n_bad = int(bad.sum())
    share = n_bad / values.size
    amount = f"{share:.0%} of the stored values" if share >= 0.01 else f"{n_bad:,} of the {values.size:,} stored values"
    found = (
        f"counts in {where} are not integers (max {values.max():.3g}; {amount} have decimals, in "
        f"{_bad_cells(counts, bad, row_offset)})"
    )
    if share < 0.01:  # a few values among integer counts: not a transformation of the whole matrix
        return (
            f"{found}; the rest are integers, so these few values look edited or damaged, not normalized. Check "
            "those cells, or round the counts to integers first (np.rint)."
        )
    library = np.asarray(counts.sum(axis=1)).ravel()
    library = library[library > 0]
    if values.max() <= 20:  # log1p of counts per 10,000 (or per million) stays below ~14
        looks = "they look log-normalized"
    elif library.size > 1 and library.std() <= 1e-3 * library.mean():
        looks = (
            f"they look normalized but not log-transformed (every cell sums to {library.mean():.4g}, as after "
            "sc.pp.normalize_total)"
        )
    else:
        looks = (
            "they look like corrected counts (e.g. after ambient-RNA removal such as SoupX) or otherwise "
            "rescaled counts"
        )
    fix = _raw_counts_fix(where)
    return f"{found}; {looks}. {fix} To use corrected counts, round them to integers first (np.rint)."


def _raw_counts_fix(where: str) -> str:
    """Where to find raw counts, for a message about the counts of `where`: an AnnData's or a file's other slots,
    or (a count matrix, which has none) the raw counts themselves."""
    if "count matrix" not in where:
        return (
            "Point `counts` at the raw counts: a layer such as counts='counts', or counts='raw' for adata.raw.X "
            "(command line: --counts counts, --counts raw)."
        )
    return "Pass the raw integer counts (UMI counts before any normalization) instead."


# Negative values below this are not scaled data (z-scores of sc.pp.scale stay within tens) but a damaged matrix.
DAMAGED_BELOW = -1e6


def check_counts(counts: sp.csr_matrix, where: str, row_offset: int = 0, workspace: Workspace | None = None) -> None:
    """Check that `counts` (CSR `[n_cells, n_genes]`) are raw counts: finite, non-negative integers.

    The index arrays are checked first (`check_structure`), then the stored entries. `where` names the
    matrix in the messages, which also say how many cells hold the faulty values and the first one's row,
    counted from `row_offset` (the matrix's first row in its dataset). Raises DataError for a damaged sparse
    matrix, NaN or infinite values, negative values (scaled data) or non-integers (log-normalized, normalized or
    corrected counts, or a few edited values: the message says which they look like). workspace: where the check's
    temporary is written (`Workspace`; None: new memory).
    """
    check_structure(counts, where)
    values = counts.data
    if values.size == 0:
        return
    lowest, highest = values.min(), values.max()  # NaN if any is: one pass each, no array of flags
    if not (np.isfinite(lowest) and np.isfinite(highest)):
        bad = ~np.isfinite(values)
        raise DataError(
            f"counts in {where} contain NaN or infinite values ({int(bad.sum())} entries, in "
            f"{_bad_cells(counts, bad, row_offset)}); raw UMI counts are finite integers."
        )
    if lowest < 0:
        looks = (
            "values this far below zero are neither counts nor scaled data: the matrix may be damaged (a file: copy "
            "or write it again)."
            if lowest < DAMAGED_BELOW
            else "they look scaled (e.g. sc.pp.scale)."
        )
        raise DataError(
            f"counts in {where} are negative (min {lowest:.3g}, in {_bad_cells(counts, values < 0, row_offset)}); "
            f"{looks} {_raw_counts_fix(where)}"
        )
    if values.dtype.kind in "iu":
        return
    # Exact integers (the usual case: every difference from the nearest integer is 0) are told apart without
    # allclose's slower pass.
    differences = np.rint(values, out=(workspace or Workspace()).array("rounded", values.size, values.dtype))
    if np.subtract(values, differences, out=differences).any() and not np.allclose(values, np.rint(values)):
        raise DataError(_non_integer_message(counts, where, row_offset))


# How the messages name the count slots other than layers (`adata.layers['name']`).
SLOT_NAMES = {"X": "adata.X", "raw": "adata.raw.X"}
# The layers that raw-count detection tries after X and before raw, in this order (`find_counts`).
COUNT_LAYERS = ("counts", "raw_counts", "umi")


def _count_candidates(adata: anndata.AnnData, counts: str | None) -> Iterator[tuple[str, str, Any, Any]]:
    """Yield (slot, description, matrix, var_names) for the count slot(s) to try, in order; slot is the
    value of `counts` that names it ("X", "raw" or a layer)."""
    if counts == "X":
        yield "X", SLOT_NAMES["X"], adata.X, adata.var_names
    elif counts == "raw":
        if adata.raw is None:
            raise DataError("counts='raw' but adata.raw is empty; pass counts='X' or a layer name.")
        yield "raw", SLOT_NAMES["raw"], adata.raw.X, adata.raw.var_names
    elif counts is not None:
        if counts not in adata.layers:
            raise DataError(
                f"no layer {counts!r} in the AnnData (layers: {list(adata.layers)}); "
                "pass counts='X', 'raw' or one of those layers."
            )
        yield counts, f"adata.layers[{counts!r}]", adata.layers[counts], adata.var_names
    else:
        yield "X", "adata.X", adata.X, adata.var_names
        for name in COUNT_LAYERS:
            if name in adata.layers:
                yield name, f"adata.layers[{name!r}]", adata.layers[name], adata.var_names
        if adata.raw is not None:
            yield "raw", "adata.raw.X", adata.raw.X, adata.raw.var_names


def find_counts(
    adata: anndata.AnnData, counts: str | None = None, copy: bool = True
) -> tuple[str, sp.csr_matrix, np.ndarray]:
    """Find raw counts in an AnnData: `counts` names the slot ("X", "raw" or a layer), else detect.

    Detection tries adata.X, then the layers "counts", "raw_counts" and "umi", then adata.raw.X, and takes
    the first that holds raw counts. Returns (the slot found, as `counts` would name it; CSR float32
    `[n_cells, n_genes]`; that slot's gene names `[n_genes]`: adata.raw's own for "raw").
    Raises DataError when the named slot is missing or holds non-count data (or, when detecting, when no
    slot holds counts: the error of adata.X); the message says how to point at the counts.
    copy: False lets the counts share memory with the AnnData's when they are float32 CSR already (for data
    used at once, as prediction reads a chunk: the AnnData's later changes would show through).
    """
    first_error: DataError | None = None
    for slot, where, matrix, var_names in _count_candidates(adata, counts):
        csr = _as_csr(matrix, where)
        try:
            check_counts(csr, where)
        except DataError as err:
            if counts is not None:
                raise _with_slots_named(err, adata, where) from None
            first_error = first_error or err
            continue
        if where != "adata.X":
            logger.info("using raw counts from %s", where)
        csr = csr.astype(np.float32, copy=copy)
        return slot, csr_on(csr.data, csr.indices, csr.indptr, csr.shape), np.asarray(var_names, dtype=str)
    assert first_error is not None  # the first candidate, adata.X, always exists
    raise _with_slots_named(first_error, adata, "adata.X") from None


def _with_slots_named(error: DataError, adata: anndata.AnnData, where: str) -> DataError:
    """`error` (of the counts in `where`) with its general advice on where raw counts may be replaced by what this
    AnnData holds: the other slots (X, every layer, raw) that hold raw counts, or that none does (a trial was told
    to pass counts='raw', the slot it had passed, with its integer counts in a layer the message did not name)."""
    slots = [("X", SLOT_NAMES["X"], adata.X), *((n, f"adata.layers[{n!r}]", m) for n, m in adata.layers.items())]
    slots += [("raw", SLOT_NAMES["raw"], adata.raw.X)] if adata.raw is not None else []
    holding = []
    for slot, name, matrix in slots:
        if name == where:
            continue
        try:
            check_counts(_as_csr(matrix, name), name)
        except DataError:
            continue
        holding.append((slot, name))
    if holding:
        slot, name = holding[0]
        specific = f"Raw counts are in {name}: pass counts={slot!r} (command line: --counts {slot})."
    else:
        names = ", ".join(name for _, name, _ in slots)
        specific = (
            f"No slot of this AnnData holds raw counts ({names}): read the raw counts from the original file (e.g. "
            "Cell Ranger's filtered_feature_bc_matrix.h5, with tfp_scmix.read) and put them in a layer "
            "(adata.layers['counts'])."
        )
    return DataError(str(error).replace(_raw_counts_fix(where), specific))


def extract_counts(
    adata: anndata.AnnData, counts: str | None = None, copy: bool = True
) -> tuple[sp.csr_matrix, np.ndarray]:
    """(CSR float32 `[n_cells, n_genes]`, gene names `[n_genes]`) of the raw counts `find_counts` finds."""
    return find_counts(adata, counts, copy)[1:]


# --------------------------------------------------------------------------------------------
# Gene vocabulary
# --------------------------------------------------------------------------------------------


def gene_fingerprint(genes: Iterable[str]) -> str:
    """A short hash of the ordered gene list, so a client can check that its genes match.

    The first 16 hex digits of the SHA-256 of the gene names joined by newlines (UTF-8).
    """
    return hashlib.sha256("\n".join(map(str, genes)).encode()).hexdigest()[:16]


def _looks_like_ensembl(genes: Any) -> float:
    return float(np.mean([str(g).startswith("ENS") for g in genes[:2000]])) if len(genes) else 0.0


def _case(names: Any) -> str:
    """How most of `names` (a pandas Index of gene names) are written: "upper" (CD3E), "lower" (cd3e), "title"
    (Cd3e, mouse symbols) or "mixed"; names without letters do not count."""
    names = names[names.str.contains("[A-Za-z]", regex=True)]
    shares = {
        "upper": float((names == names.str.upper()).mean()),
        "lower": float((names == names.str.lower()).mean()),
        "title": float((names == names.str[:1].str.upper() + names.str[1:].str.lower()).mean()),
    }
    case, share = max(shares.items(), key=lambda item: item[1])
    return case if len(names) and share > 0.8 else "mixed"


def _case_hint(genes: Any, vocabulary: np.ndarray) -> str:
    """The hint of `align_genes` when the data's genes match the model's once case is ignored: mouse symbols (Cd3e)
    against human ones (CD3E) mean another species; the same symbols written in another case are renamed."""
    data_case, model_case = _case(genes), _case(pd.Index(vocabulary))
    if {data_case, model_case} == {"upper", "title"}:
        return (
            f" Many genes match only when case is ignored, and the data's symbols are {data_case}-case where the "
            f"model's are {model_case}-case, as mouse symbols (Cd3e) are against human ones (CD3E): the data may be "
            "from another species than the model (map the genes to the model's species' orthologues first). If they "
            f"are the same species written in another case, rename them (adata.var_names = adata.var_names"
            f"{'.str.upper()' if model_case == 'upper' else '.str.capitalize()'})."
        )
    rename = {"upper": ".str.upper()", "lower": ".str.lower()", "title": ".str.capitalize()"}.get(model_case)
    fix = f"rename them first (adata.var_names = adata.var_names{rename})" if rename else "rename them to the model's"
    return (
        f" Many genes match only when case is ignored: the data write the same symbols in another case "
        f"({data_case}-case against the model's {model_case}-case); {fix}."
    )


def naming_hint(genes: Any, vocabulary: Sequence[str] | np.ndarray) -> str:
    """Why few of `vocabulary`'s gene names `[n]` are in `genes` `[m]` when the two name genes differently: one
    uses Ensembl IDs and the other symbols, or many names match only when case is ignored (another species, or
    the same symbols in another case; `_case_hint`). A sentence starting with a space, or "" when neither is so."""
    genes, vocabulary = pd.Index(np.asarray(genes, dtype=str)), np.asarray(vocabulary, dtype=str)
    if abs(_looks_like_ensembl(genes) - _looks_like_ensembl(vocabulary)) > 0.5:
        return (
            " The data and the model use different kinds of gene identifiers (Ensembl IDs "
            "against symbols): map them to the model's kind first."
        )
    if genes.str.upper().isin(pd.Index(vocabulary).str.upper()).sum() > 2 * genes.isin(vocabulary).sum():
        return _case_hint(genes, vocabulary)
    return ""


# A dataset with at most this many genes may be a subset of its own (highly variable genes): `align_genes` says so
# when it lacks a model's genes.
SUBSET_GENES = 5_000


def align_genes(
    counts: sp.csr_matrix, genes: Any, vocabulary: Sequence[str] | np.ndarray, min_fraction: float = 0.5
) -> tuple[sp.csr_matrix, float]:
    """Reorder `counts` columns to `vocabulary`; genes the data lacks are zero columns.

    counts: CSR `[n_cells, n_genes]` whose columns are `genes` `[n_genes]` (a list, array or pandas Index
    of names); vocabulary: `[n_vocabulary]` names. Returns (CSR float32 `[n_cells, n_vocabulary]` with
    sorted indices, fraction of the vocabulary present, in [0, 1]), the result `counts` itself when it already
    is that (float32 CSR in canonical order, columns in the vocabulary's order); logs a warning when that fraction is
    below 1. Raises DataError when a name of `vocabulary` is duplicated in `genes` (other duplicates are not read),
    or when fewer than `min_fraction` of the
    vocabulary's genes are in the data (with a hint when the two use different identifiers or look like
    different species).
    """
    check_argument("min_fraction", min_fraction, 0, 1)
    # `genes` is typed Any: it is rebound to a pandas Index here, and pandas has no type stubs in this setup.
    genes = pd.Index(np.asarray(genes, dtype=str))
    vocabulary = np.asarray(vocabulary, dtype=str)
    if genes.has_duplicates:
        # Only a duplicated name that is asked for is ambiguous: real data often repeat names (symbols of two
        # loci) among genes a model does not read, and those columns are simply not taken.
        repeated = genes.duplicated(keep=False)
        ambiguous = genes[repeated].unique()
        ambiguous = ambiguous[ambiguous.isin(vocabulary)]
        if len(ambiguous):
            raise DataError(
                f"duplicated gene names in the data ({ambiguous[:5].tolist()}...); make them unique "
                "(adata.var_names_make_unique()) or sum the duplicates first: these are genes read, so which column "
                "is meant is ambiguous."
            )
        kept = np.flatnonzero(~repeated)
        position = genes[kept].get_indexer(vocabulary)
        position = np.where(position >= 0, kept[np.maximum(position, 0)], -1)
    else:
        position = genes.get_indexer(vocabulary)
    present = position >= 0
    fraction = float(present.mean()) if len(vocabulary) else 0.0
    if fraction < min_fraction:
        # A query of a few thousand genes is likely subset to its own highly variable ones (scanpy's tutorials do):
        # its full matrix holds the model's genes.
        subset = (
            f" The data hold {len(genes):,} genes: if they were subset to their own highly variable genes, annotate "
            "the full matrix (after scanpy's subsetting it is in adata.raw: counts='raw')."
            if len(genes) <= SUBSET_GENES
            else ""
        )
        hint = naming_hint(genes, vocabulary) or subset + (
            " If the data measure fewer genes (another panel or lab), train the model on the genes both "
            "datasets measure (command line: train --shared-genes QUERY; in Python, subset the training AnnData "
            "to them before `from_anndata`, the README's 'Across datasets'), or accept the missing genes as zero "
            "counts with a lower `min_gene_fraction=` (`--min-gene-fraction`): the calls then rest on the genes "
            "present."
        )
        raise DataError(
            f"only {present.sum()} of the model's {len(vocabulary)} genes "
            f"({100 * fraction:.1f}%) are in the data; at least {100 * min_fraction:g}% are needed.{hint}"
        )
    if fraction < 1.0:
        logger.warning(
            "%d of %d model genes (%.1f%%) found in the data; the rest are set to zero%s",
            present.sum(),
            len(vocabulary),
            100 * fraction,
            ""
            if fraction >= SHARED_GENES_HINT
            else (
                ", which moves the cells away from the training cells (more are flagged novel). Train the model on the "
                "genes both datasets measure (command line: train --shared-genes QUERY; the README's 'Across "
                "datasets' shows it in Python)"
            ),
        )
    if len(genes) == len(vocabulary) and np.array_equal(position, np.arange(len(vocabulary))):
        # The model's genes in its order (the usual case in prediction): `counts` itself when it is float32 CSR
        # in canonical order, else a copy put in that order; no product.
        if sp.isspmatrix_csr(counts) and counts.dtype == np.float32 and counts.has_canonical_format:
            return counts, fraction
        same = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        same.sum_duplicates()  # sorts the indices, as the product's result is sorted
        return same, fraction
    # Column selection matrix: data genes -> vocabulary positions.
    select = sp.csr_matrix(
        (np.ones(present.sum(), np.float32), (position[present], np.flatnonzero(present))),
        shape=(len(genes), len(vocabulary)),
    )
    aligned = (counts @ select).tocsr()
    aligned.sort_indices()
    return aligned.astype(np.float32), fraction


def gene_selection(
    genes: Any, vocabulary: Sequence[str] | np.ndarray, min_fraction: float = 0.5
) -> sp.csr_matrix | None:
    """The matrix `[len(genes), len(vocabulary)]` that takes counts over `genes` to `vocabulary` (`counts @ it`;
    `align_genes` of an identity matrix: genes the data lacks are zero columns), or None where `genes` are the
    vocabulary in its order. For data read in pieces (a stream's or a prediction's chunks): the names are matched
    once. Raises DataError as `align_genes` does (duplicated names, too few of the vocabulary's genes)."""
    names = np.asarray(genes, dtype=str)
    if np.array_equal(names, np.asarray(vocabulary, dtype=str)):
        return None
    return align_genes(sp.identity(len(names), np.float32, format="csr"), names, vocabulary, min_fraction)[0]


def log_normalised(counts: sp.spmatrix, dtype: DTypeLike | None = None) -> sp.csr_matrix:
    """log1p(counts per 10,000) of a sparse count matrix `[n_cells, n_genes]`, as CSR (stays sparse).

    Counts per 10k: counts * 10,000 / the cell's total (a total below 1 counts as 1), the usual CP10k scaling
    (scanpy's normalize_total(target_sum=1e4) then log1p), computed in the counts' precision (float32 counts:
    float32; integers: float64) and stored as `dtype` (default: that precision). Computed in blocks of cells into
    one new array of values beside a copy of the counts' index arrays: no temporary of the whole matrix (a million
    cells' counts are gigabytes)."""
    counts = sp.csr_matrix(counts)
    library = np.asarray(counts.sum(axis=1)).ravel()
    scale = 1e4 / np.maximum(library, 1)
    computed = np.result_type(counts.dtype, scale.dtype)
    data = np.empty(counts.nnz, computed if dtype is None else dtype)
    indptr, step = counts.indptr, 8192
    for start in range(0, counts.shape[0], step):
        stop = min(start + step, counts.shape[0])
        lo, hi = indptr[start], indptr[stop]
        block = counts.data[lo:hi] * np.repeat(scale[start:stop], np.diff(indptr[start : stop + 1]))
        data[lo:hi] = np.log1p(block.astype(computed, copy=False))
    return sp.csr_matrix((data, counts.indices.copy(), indptr.copy()), shape=counts.shape)


INT32_MAX = int(np.iinfo(np.int32).max)


def csr_on(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A CSR matrix on these arrays themselves, unchecked: scipy's constructor copies an array that is a view
    of less than half of another (a few rows of a larger matrix). The arrays must describe valid CSR.

    int64 row pointers beside int32 indices (as anndata writes them) become int32 where they fit: with mixed types
    scipy casts the whole matrix's indices to int64, a copy of the largest array, on every row selection, and its
    constructor keeps them int64 (twice the memory)."""
    matrix = sp.csr_matrix(shape, dtype=data.dtype)
    matrix.data, matrix.indices, matrix.indptr = data, indices, index_pointers(indptr, indices)
    return matrix


def index_pointers(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """CSR row pointers `[n_rows + 1]` in the integer type of the `indices`: int32 when the indices are int32 and
    the pointers fit (a copy of the pointers), else `indptr` itself. See `csr_on` for why."""
    if indices.dtype == np.int32 and indptr.dtype != np.int32 and (len(indptr) == 0 or indptr[-1] <= INT32_MAX):
        return indptr.astype(np.int32)
    return indptr


def csr_rows(csr: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows `start:stop` of `csr` as a CSR matrix on views of its data and indices (scipy's row slicing copies
    them). No check: `csr` is valid CSR."""
    first, last = csr.indptr[start], csr.indptr[stop]
    indptr = csr.indptr[start : stop + 1] - first
    return csr_on(csr.data[first:last], csr.indices[first:last], indptr, (stop - start, csr.shape[1]))


def value_rows(indptr: np.ndarray, workspace: Workspace | None = None) -> np.ndarray:
    """The row of each stored entry of a CSR matrix with these row pointers `[n_rows + 1]`: intp `[nnz]` (what
    `np.repeat(np.arange(n_rows), np.diff(indptr))` gives), written into the workspace's "rows" array when given."""
    nnz = int(indptr[-1])
    rows = (workspace or Workspace()).array("rows", nnz, np.intp)
    rows.fill(0)
    starts = indptr[1:-1]
    np.add.at(rows, starts[starts < nnz], 1)  # a row starts one past each row pointer (empty rows add up)
    return np.cumsum(rows, out=rows)


def log_normalised_values(
    counts: sp.csr_matrix,
    factors: np.ndarray | None = None,
    batch_ids: np.ndarray | None = None,
    workspace: Workspace | None = None,
) -> np.ndarray:
    """The stored entries of CSR counts `[n_cells, n_genes]`, normalised as the encoder's first layer reads them:
    log1p(CP10k) with each cell's counts first multiplied by its batch's gene factors. float32 `[counts.nnz]`, in
    the order of `counts.data` (with `counts.indices` and `counts.indptr` the normalised matrix).

    factors `[n_batches, n_genes]` (the model's exp(-offsets), `SCMix.offset_factors`; None: all ones);
    batch_ids `[n_cells]` integers into its rows (None: batch 0). workspace: where the result and the temporaries
    are written (the result is then the workspace's "values" array, overwritten by its next use); None: new
    arrays. The same numbers as the model's TensorFlow `normalise_counts(divide_offsets(...))` to float32 rounding,
    computed on the nonzeros only."""
    work = workspace or Workspace()
    n_cells, n_genes = counts.shape
    nnz = int(counts.indptr[-1])
    data, indices = counts.data[:nnz], counts.indices[:nnz]
    values = work.array("values", nnz, np.float32)
    gathered = work.array("gathered", nnz, np.float32)
    rows = None
    if factors is None:
        values[:] = data
    else:
        factors = np.asarray(factors, dtype=np.float32)
        ids = None if batch_ids is None or factors.shape[0] == 1 else np.asarray(batch_ids)
        if ids is None or not ids.size or (ids == ids[0]).all():  # one batch's factors for every cell
            np.take(factors[0 if ids is None or not ids.size else int(ids[0])], indices, out=gathered, mode="clip")
        else:
            rows = value_rows(counts.indptr, work)
            flat = work.array("flat", nnz, np.intp)
            np.take(ids.astype(np.intp) * n_genes, rows, out=flat, mode="clip")
            flat += indices
            np.take(factors.ravel(), flat, out=gathered, mode="clip")
        np.multiply(data, gathered, out=values)
    # Each cell's total: sums of its run of values (reduceat needs a nonempty run; empty cells sum to 0).
    lengths = np.diff(counts.indptr)
    library = np.zeros(n_cells, np.float32)
    filled = lengths > 0
    if nnz:
        library[filled] = np.add.reduceat(values, counts.indptr[:-1][filled])
    scale = np.float32(1e4) / np.maximum(library, np.float32(1.0))
    np.take(scale, value_rows(counts.indptr, work) if rows is None else rows, out=gathered, mode="clip")
    values *= gathered
    np.log1p(values, out=values)
    return values


def log_normalised_dense(
    counts: sp.csr_matrix,
    factors: np.ndarray | None = None,
    batch_ids: np.ndarray | None = None,
    out: np.ndarray | None = None,
    workspace: Workspace | None = None,
) -> np.ndarray:
    """`log_normalised_values` written into a dense float32 array `[n_cells, n_genes]`: the input of the encoder's
    first layer (computed on the nonzeros, a quarter of the entries of typical counts or fewer, and written straight
    into the dense array by scipy; docs/performance.md, "Prediction normalised in numpy"). out: a C-contiguous
    float32 array of that shape to fill (overwritten) instead of a new one; workspace: as for
    `log_normalised_values`.
    """
    values = log_normalised_values(counts, factors, batch_ids, workspace)
    if out is None:
        dense = np.zeros(counts.shape, np.float32)
    else:
        dense = out
        dense.fill(0)
    # scipy adds the entries into the zeroed array (duplicates, which canonical CSR has none of, would add up).
    nnz = values.size
    csr_on(values, counts.indices[:nnz], counts.indptr, counts.shape).toarray(out=dense)
    return dense


def highly_variable_genes(
    counts: sp.csr_matrix, genes: Sequence[str] | np.ndarray, n_top: int = 2000, n_bins: int = 20
) -> np.ndarray:
    """Names of the `n_top` most variable genes `[min(n_top, n_genes)]`, in their order in `genes`.

    counts: CSR `[n_cells, n_genes]` raw counts; genes: `[n_genes]` names. The score is the Seurat-style normalised
    dispersion (Satija et al. 2015) of log1p counts per 10,000 (CP10k): the log of variance / mean of
    each gene, standardised within `n_bins` equal-width bins of the mean. A gene alone in its bin scores 1, as in
    scanpy's `pp.highly_variable_genes(flavor="seurat")`: the few genes of the highest means (insulin in a
    pancreas, where Ins1, Ins2 and Iapp each sit alone in a bin) would otherwise score 0, their bin's own mean,
    and be dropped (tests/test_data.py).
    Only counts are used, never labels, so it is safe on every cell of a dataset.
    Raises ValueError when `n_top` or `n_bins` is not a positive whole number.
    """
    check_argument("n_top", n_top, 1, integer=True)
    check_argument("n_bins", n_bins, 1, integer=True)
    norm = log_normalised(counts)
    mean = np.asarray(norm.mean(axis=0)).ravel()
    mean_sq = np.asarray(norm.multiply(norm).mean(axis=0)).ravel()
    var = np.maximum(mean_sq - mean**2, 0) * counts.shape[0] / max(counts.shape[0] - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(var / mean)
    dispersion[~np.isfinite(dispersion)] = -np.inf
    bins = pd.cut(mean, n_bins)
    frame = pd.DataFrame({"d": dispersion, "bin": bins})
    finite = frame[np.isfinite(frame.d)]
    stats = finite.groupby("bin", observed=False)["d"].agg(["mean", "std"])
    centre = stats["mean"].reindex(bins).to_numpy()
    spread = stats["std"].reindex(bins).to_numpy()
    alone = np.isnan(spread) & np.isfinite(centre)  # scanpy: (d - 0) / d
    spread, centre = np.where(alone, centre, spread), np.where(alone, 0.0, centre)
    spread = np.where(np.isnan(spread) | (spread == 0), 1.0, spread)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (dispersion - centre) / spread
    score[~np.isfinite(score)] = -np.inf
    order = np.argsort(-score, kind="stable")[: min(n_top, len(genes))]
    return np.asarray(genes)[np.sort(order)]


# --------------------------------------------------------------------------------------------
# Labels and batches
# --------------------------------------------------------------------------------------------


def missing_values(series: pd.Series) -> pd.Series:
    """Which values of an obs column are missing: NaN, None, "" or the strings "nan", "NaN", "None"."""
    return series.isna() | series.astype(str).str.strip().isin({"", "nan", "NaN", "None"})


def label_name(value: Any) -> str:
    """A label value as a class name: `str(value)`, but a whole number stored as a float without its ".0"
    (pandas stores integer labels with missing values as floats: 3.0 is class "3", as 3 is)."""
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _natural_order(name: str) -> tuple[int, int | str]:
    """Sort key of class names: integer names (cluster ids such as "2" and "10") by their value, before other names."""
    try:
        return (0, int(name))
    except ValueError:
        return (1, name)


def encode_labels(
    values: ArrayLike | pd.Series | pd.Categorical, classes: Sequence[str] | None = None, unknown: ArrayLike = ()
) -> tuple[np.ndarray, list[str]]:
    """Map label values `[n_cells]` to class ids; NaN, None, "" and any value in `unknown` become -1.

    Returns (int32 ids `[n_cells]`, class names). `classes` fixes the class order (for a model's classes);
    without it the classes are the categories of a categorical column (in their order) or the sorted
    labels (integer names by value: "2" before "10"). Raises DataError when, without `classes`, fewer than two
    classes are labelled or a placeholder label ("Unknown", ...) holds more than half of the labelled cells
    (`_check_placeholders`), or when a label is not among `classes`.
    """
    series = pd.Series(np.asarray(values, dtype=object))
    missing = missing_values(series)
    as_names = series.map(label_name)
    missing |= as_names.isin({label_name(u) for u in np.atleast_1d(np.asarray(unknown, dtype=object))})
    names = as_names[~missing]
    if classes is None:
        _check_placeholders(names)
        if isinstance(values, pd.Categorical) or hasattr(values, "cat"):
            cats = [str(c) for c in pd.Categorical(values).categories]
            classes = [c for c in cats if c in set(names)]
        else:
            classes = sorted(set(names), key=_natural_order)
        if len(classes) < 2:
            found = (
                f"every one of its {len(series):,} cells is unlabelled (missing, or the unlabeled_category)"
                if not classes
                else f"its labelled cells ({len(names):,}) are all of one class, {classes[0]!r}"
            )
            raise DataError(
                f"the label column has {len(classes)} class(es) among labelled cells: {found}; a classifier needs at "
                "least two. Check label_key (the obs column of the cell types) and unlabeled_category (the value "
                "that marks cells without a label)."
            )
    classes = [str(c) for c in classes]
    lookup = {c: i for i, c in enumerate(classes)}
    outside = sorted(set(names) - set(lookup))
    if outside:
        raise DataError(
            f"labels {outside[:5]}{f' and {len(outside) - 5} more' if len(outside) > 5 else ''} are not among the "
            f"model's classes {classes}; "
            "mark them as unknown (unknown=[...]) or train a model with those classes."
        )
    ids = np.full(len(series), UNLABELLED, np.int32)
    ids[~missing.to_numpy()] = [lookup[n] for n in names]
    return ids, classes


# Label values that usually mean "not labelled" (scANVI's "Unknown", CellTypist's "Unassigned", scikit-learn's -1
# in semi-supervised estimators, ...).
PLACEHOLDER_LABELS = frozenset(
    {"unknown", "unlabelled", "unlabeled", "unassigned", "nan", "na", "n/a", "none", "null", "?", "-", "-1", "other"}
)


def _spelling(name: str) -> str:
    """A class name reduced to its letters and digits, lower-case, without a plural s ("NK  cells" and "NK cell":
    "nkcell"): names equal under it are likely one type written two ways."""
    key = re.sub(r"[^0-9a-z+]", "", name.lower())
    return key[:-1] if key.endswith("s") and len(key) > 3 else key


def spelled_as(names: Iterable[str], classes: Iterable[str]) -> dict[str, str]:
    """{name: class} for each of `names` that is one of `classes` written another way (case, spacing, punctuation
    or a plural s: "B cells " for "B cells"), so that a message can name the class meant."""
    by_spelling = {_spelling(c): c for c in classes if any(ch.isalpha() for ch in c)}
    return {n: by_spelling[_spelling(n)] for n in names if _spelling(n) in by_spelling and n not in set(classes)}


# Classes with fewer labelled cells than this are warned about by `tfp_scmix.train`, and their explanations flagged
# (`tfp_scmix.explain`): such a class is called and explained from what those few cells happen to share. With
# 150 random labels a class labelled twice may not be called at all (docs/few_shot.md, "Not done": cbmc seed
# 3's 50 CD8 T test cells, 2 of them labelled, were all called CD4 T).
FEW_LABELS = 5
# Below this fraction of a model's genes found in the data, the coverage warning says how to train on shared genes: a
# fresh-user trial saw 8.0% of a donor's cells flagged novel at 65% coverage and 3.5% with a model of the shared genes.
SHARED_GENES_HINT = 0.9

# A class with a placeholder name (`PLACEHOLDER_LABELS`) holding more than this share of the labelled cells is
# refused: it is the marker of the unlabelled cells left out, not a cell type (a fresh user's likeliest slip).
PLACEHOLDER_MAJORITY = 0.5


def _check_placeholders(names: pd.Series) -> None:
    """Refuse a class with a placeholder name that holds most of the labelled cells (more than
    `PLACEHOLDER_MAJORITY`: DataError). Warn (once per call) about a smaller class that looks like a marker of
    unlabelled cells, a placeholder name or one class holding more than 80% of the labelled cells, and about
    classes whose names differ only in case, spacing, punctuation or a plural s (typos that would train one type
    as two classes)."""
    counts = names.value_counts()
    if counts.empty:
        return
    top, share = counts.index[0], counts.iloc[0] / counts.sum()
    if top.strip().lower() in PLACEHOLDER_LABELS and share > PLACEHOLDER_MAJORITY:
        raise DataError(
            f"the label {top!r} holds {counts.iloc[0]} of the {counts.sum()} cells with a label value "
            f"({100 * share:.0f}%) and "
            f"looks like the marker of unlabelled cells: pass unlabeled_category={top!r} (command line: "
            f"--unlabeled-category {top!r}). If it is a cell type, give it a name of its own in the label column."
        )
    spellings: dict[str, list[str]] = {}
    for name in counts.index:
        if any(ch.isalpha() for ch in name):  # numbers ("-1", "1") are ids, not spellings of one name
            spellings.setdefault(_spelling(name), []).append(name)
    for variants in (v for v in spellings.values() if len(v) > 1):
        logger.warning(
            "the labels %s look like one type written %d ways; they train as separate classes: write them alike",
            " and ".join(f"{v!r} ({counts[v]} cells)" for v in variants),
            len(variants),
        )
    placeholders = [c for c in counts.index if c.strip().lower() in PLACEHOLDER_LABELS]
    for name in placeholders:
        logger.warning(
            "the label %r (%d cells) looks like a marker of unlabelled cells but is trained as a class; "
            "if it marks unlabelled cells, pass unlabeled_category=%r (command line: --unlabeled-category)",
            name,
            counts[name],
            name,
        )
    if share > 0.8 and top not in placeholders and len(names) >= 50 and len(counts) > 1:  # one class: refused
        logger.warning(
            "the label %r holds %.0f%% of the labelled cells (%d of %d); if it marks unlabelled cells, pass "
            "unlabeled_category=%r (command line: --unlabeled-category)",
            top,
            100 * share,
            counts.iloc[0],
            counts.sum(),
            top,
        )


def encode_batches(values: ArrayLike) -> tuple[np.ndarray, list[str]]:
    """Map batch values (dataset, donor) to ids: (int32 ids `[n_cells]`, batch names in sorted order).

    Raises DataError when a value is missing (NaN, None, ""): a missing batch is not a batch of its own.
    """
    missing = missing_values(pd.Series(np.asarray(values, dtype=object)))
    if missing.any():
        raise DataError(
            f"{int(missing.sum())} cells have no batch (NaN or empty) in the batch column; every cell needs "
            "one. Fill them with a name of their own (e.g. 'unknown') if they share one, or remove those cells."
        )
    codes = pd.Categorical(np.asarray(values).astype(str))
    return codes.codes.astype(np.int32), [str(c) for c in codes.categories]


def check_unlabeled_category(values: Any, unlabeled_category: Any, label_key: str) -> None:
    """Check `unlabeled_category` against a label column's `values` `[n_cells]`, both compared as class names
    (`label_name`: -1 matches -1, -1.0 and "-1"). A value that matches no label raises DataError where the
    unlabelled cells would otherwise train as a class: a label that matches it but for case, or a label that
    looks like a marker of unlabelled cells (`PLACEHOLDER_LABELS`: "Unknown", ...). One that matches nothing, with
    no such label, is logged as a warning (every cell with a label is then labelled)."""
    counts = pd.Series(np.asarray(values, dtype=object)).dropna().map(label_name).value_counts()
    present, wanted = counts.index, label_name(unlabeled_category)
    if wanted in present:
        return
    near = [v for v in present if v.casefold() == wanted.casefold()]
    if near:
        raise DataError(
            f"unlabeled_category {unlabeled_category!r} matches no value of obs[{label_key!r}]; {near[0]!r} "
            f"does when case is ignored: pass unlabeled_category={near[0]!r} (command line: --unlabeled-category "
            f"{near[0]!r}), or the {near[0]!r} cells become a class of their own."
        )
    markers = [v for v in present if v.strip().lower() in PLACEHOLDER_LABELS]
    if markers:
        raise DataError(
            f"unlabeled_category {unlabeled_category!r} matches no value of obs[{label_key!r}], whose label "
            f"{markers[0]!r} ({counts[markers[0]]} cells) looks like the marker of unlabelled cells: pass "
            f"unlabeled_category={markers[0]!r} (command line: --unlabeled-category {markers[0]!r}), or the "
            f"{markers[0]!r} cells become a class of their own."
        )
    logger.warning(
        "unlabeled_category %r matches no value of obs[%r] (values: %s), so it marks no cell: only cells with a "
        "missing value (NaN or empty) are unlabelled",
        unlabeled_category,
        label_key,
        list(present[:10]),
    )


def encode_obs(
    columns: Collection[str],
    column: Callable[[str], Any],
    n_cells: int,
    label_key: str | None,
    batch_key: str | None,
    unknown: ArrayLike = (),
    classes: Sequence[str] | None = None,
    where: str = "the data",
    unlabeled_category: str | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Labels and batches from a dataset's obs columns, the one place both AnnData and streams encode them.

    columns: the obs column names; column(name): that column's values `[n_cells]`. Returns (labels int32
    `[n_cells]` (-1 unknown), class names, batch ids int32 `[n_cells]`, batch names); without `batch_key`
    every cell is in batch "0". unlabeled_category: the value that marks unlabelled cells (also in `unknown`),
    checked against the labels (`check_unlabeled_category`). Raises DataError for a missing column, a label
    column of fewer than two classes, labels outside `classes` (see `encode_labels`), or an unlabeled_category
    that differs from a label only in case. `where` names the dataset in the messages.
    """
    if label_key is not None:
        if label_key not in columns:
            raise DataError(
                f"no obs column {label_key!r} in {where}{did_you_mean([label_key], columns)} (columns: "
                f"{list(columns)}); name the column of cell "
                "types with label_key= (command line: --label-key). Data without cell types can be annotated or "
                "adapted to with label_key=None (the command line's annotate reads none by default), not trained on."
            )
        values = column(label_key)
        if unlabeled_category is not None:
            check_unlabeled_category(values, unlabeled_category, label_key)
            unknown = [*np.atleast_1d(np.asarray(unknown, dtype=object)), unlabeled_category]
        labels, classes = encode_labels(values, classes, unknown)
    else:
        labels, classes = np.full(n_cells, UNLABELLED, np.int32), list(classes or [])
    if batch_key is not None:
        if batch_key not in columns:
            raise DataError(
                f"no obs column {batch_key!r} for batches in {where}{did_you_mean([batch_key], columns)} (columns: "
                f"{list(columns)}); name the column of "
                "each cell's batch (dataset, donor, sample) with batch_key= (command line: --batch-key), or leave "
                "batch_key out: training then takes every cell as one batch, and prediction reads every cell through "
                "the centre of the model's batches."
            )
        batches, batch_names = encode_batches(column(batch_key))
    else:
        batches, batch_names = np.zeros(n_cells, np.int32), ["0"]
    return labels, list(classes), batches, batch_names


# --------------------------------------------------------------------------------------------
# The dataset container
# --------------------------------------------------------------------------------------------


def sparse_entries(counts: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 `[nnz, 2]` (cell, gene), values float32 `[nnz]`) of a CSR minibatch, in canonical order."""
    cells = np.repeat(np.arange(counts.shape[0], dtype=np.int64), np.diff(counts.indptr))
    return np.stack([cells, counts.indices.astype(np.int64)], axis=1), counts.data.astype(np.float32, copy=False)


def data_fingerprint(
    chunks: Iterable[sp.csr_matrix], labels: np.ndarray, batches: np.ndarray, genes: Iterable[str]
) -> str:
    """16 hex digits of SHA-256 over the counts (row lengths, gene indices, values), labels, batch ids and genes.

    chunks: consecutive row blocks of one CSR matrix with sorted indices (the whole matrix, or a stream's
    chunks): the hash is the same however the rows are split, so data in memory and streamed agree.
    """
    lengths, indices, values = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for chunk in chunks:
        lengths.update(np.diff(chunk.indptr).astype(np.int64).tobytes())
        indices.update(np.ascontiguousarray(chunk.indices, dtype=np.int64).tobytes())
        values.update(np.ascontiguousarray(chunk.data, dtype=np.float32).tobytes())
    h = hashlib.sha256(lengths.digest() + indices.digest() + values.digest())
    h.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(batches, dtype=np.int32).tobytes())
    h.update(gene_fingerprint(genes).encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class SCData:
    """Validated counts with labels and batches.

    counts: CSR float32 `[n_cells, n_genes]` raw counts (UMIs); genes: `[n_genes]` names;
    labels: int32 `[n_cells]` class ids, -1 where unknown; classes: class names;
    batches: int32 `[n_cells]` batch ids; batch_names: names of the batches; obs_names: `[n_cells]`.
    """

    counts: sp.csr_matrix
    genes: np.ndarray
    labels: np.ndarray
    classes: list[str]
    batches: np.ndarray
    batch_names: list[str]
    obs_names: np.ndarray

    def __repr__(self) -> str:
        """One line, as AnnData prints itself: sizes, labels and batches, not every name."""
        return (
            f"SCData: {self.n_cells} cells x {self.n_genes} genes, {self.n_labelled} labelled of "
            f"{self.n_classes} classes, {len(self.batch_names)} batch(es), {self.counts.nnz} nonzero counts"
        )

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    @property
    def nonzero_fraction(self) -> float:
        """The fraction of stored nonzero entries of the counts, in [0, 1]."""
        return self.counts.nnz / max(1, self.n_cells * self.n_genes)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_labelled(self) -> int:
        return int((self.labels >= 0).sum())

    @property
    def library_size(self) -> np.ndarray:
        """`[n_cells]` total counts (UMIs) per cell."""
        return np.asarray(self.counts.sum(axis=1)).ravel()

    def fingerprint(self) -> str:
        """Hash of the counts, genes, labels and batches: identifies the data a model was trained on.

        The same cells read from disk by `H5ADStream.fingerprint` give the same hash (`data_fingerprint`).
        """
        return data_fingerprint([self.counts], self.labels, self.batches, self.genes)

    def subset(self, index: ArrayLike) -> SCData:
        """The cells at `index` (an integer array or boolean mask)."""
        index = np.asarray(index)
        return dataclasses.replace(
            self,
            counts=self.counts[index],
            labels=self.labels[index],
            batches=self.batches[index],
            obs_names=self.obs_names[index],
        )

    def rows(self, start: int, stop: int) -> SCData:
        """Cells `start:stop`, sharing this data's arrays (views, nothing copied, unlike `subset`)."""
        return dataclasses.replace(
            self,
            counts=csr_rows(self.counts, start, stop),
            labels=self.labels[start:stop],
            batches=self.batches[start:stop],
            obs_names=self.obs_names[start:stop],
        )

    def hide_labels(self, keep: ArrayLike) -> SCData:
        """A copy in which only the cells in `keep` (index or mask) keep their labels."""
        keep = np.asarray(keep)
        mask = np.zeros(self.n_cells, bool)
        mask[keep if keep.dtype == bool else keep.astype(np.int64)] = True  # [] is a float array
        return dataclasses.replace(self, labels=np.where(mask, self.labels, UNLABELLED).astype(np.int32))

    def select_genes(self, genes: Sequence[str] | np.ndarray, min_fraction: float = 0.5) -> SCData:
        """Align to a gene vocabulary `[n_vocabulary]` (a model's genes, or highly variable genes).

        Raises DataError as `align_genes` does (fewer than `min_fraction` of the genes present).
        """
        counts, _ = align_genes(self.counts, self.genes, genes, min_fraction)
        return dataclasses.replace(self, counts=counts, genes=np.asarray(genes, dtype=str))

    def minibatches(self, index_batches: tf.data.Dataset) -> tf.data.Dataset:
        """Minibatch dicts {"counts": SparseTensor [B, G], "label": [B], "batch": [B]} for a tf.data of
        cell-index batches `[B]` (int64), in their order."""
        import tensorflow as tf

        self.counts.sort_indices()
        csr = csr_on(self.counts.data, self.counts.indices, self.counts.indptr, self.counts.shape)
        labels = tf.constant(self.labels, tf.int32)
        batches = tf.constant(self.batches, tf.int32)
        n_genes = self.n_genes

        # scipy's row indexing of the CSR matrix: less CPU than gathering ragged tensors (measured in
        # docs/performance.md, "What changed since the first grid").
        def rows(index):
            return sparse_entries(csr[index])

        def gather(index):
            indices, values = tf.numpy_function(rows, [index], [tf.int64, tf.float32], stateful=False)
            indices.set_shape([None, 2])
            values.set_shape([None])
            shape = tf.stack([tf.size(index, out_type=tf.int64), tf.constant(n_genes, tf.int64)])
            return {
                COUNTS: tf.SparseTensor(indices, values, shape),
                LABEL: tf.gather(labels, index),
                BATCH: tf.gather(batches, index),
            }

        return index_batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)

    def dataset(
        self, batch_size: int = 256, shuffle: bool = True, seed: int = 0, repeat: bool = False
    ) -> tf.data.Dataset:
        """tf.data of minibatch dicts {"counts": float32 SparseTensor [B, n_genes], "label": int32 [B],
        "batch": int32 [B]}, B = `batch_size` (the last batch of a pass may be smaller).

        shuffle: a new order of the cells every pass p over the dataset (each epoch of a `fit`): `cell_order`'s for
        (seed, p), what `epoch_batches` gives epoch p, whatever TensorFlow's global seed; repeat: pass over the cells
        forever.
        Raises ValueError when `batch_size` is not a positive whole number.
        """
        import tensorflow as tf

        check_argument("batch_size", batch_size, 1, integer=True)
        if not shuffle:
            ds = tf.data.Dataset.range(self.n_cells)
            return self.minibatches((ds.repeat() if repeat else ds).batch(batch_size))
        if repeat:
            return self.minibatches(_order_batches(self.n_cells, batch_size, seed, tf.data.Dataset.range(2**62)))
        # Each iteration of the dataset (each epoch of a fit) takes the next pass number from this counter.
        passes = tf.Variable(-1, dtype=tf.int64, trainable=False)
        pass_number = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).map(lambda _: passes.assign_add(1))
        ds = _order_batches(self.n_cells, batch_size, seed, pass_number)
        return self.minibatches(ds.apply(tf.data.experimental.assert_cardinality(-(-self.n_cells // batch_size))))


def from_anndata(
    adata: anndata.AnnData | str | os.PathLike[str],
    counts: str | None = None,
    label_key: str | None = "cell_type",
    batch_key: str | None = None,
    unknown: ArrayLike = (),
    genes: Sequence[str] | np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    min_gene_fraction: float = 0.5,
    allow_empty_cells: bool = False,
    unlabeled_category: str | None = None,
    copy: bool = True,
) -> SCData:
    """Validated `SCData` from an AnnData object or a path (`read`: .h5ad, 10x folder or .h5, .loom).

    counts: "X", "raw", a layer name, or None to detect raw counts. label_key: obs column with cell
    types (missing labels: NaN, "" or values in `unknown`); None for no labels. unlabeled_category: the
    label value that marks unlabelled cells (scvi-tools' name; added to `unknown`). A class that looks
    like such a marker ("Unknown", "nan", ...: `PLACEHOLDER_LABELS`, or more than 80% of the labelled
    cells) is trained as a class, with a logged warning; one with a placeholder name holding more than half of
    the labelled cells is refused (DataError: it is the marker left out). batch_key: obs column
    with batch/dataset ids. genes: align to this vocabulary (a model's `genes`); classes: fix the class
    order (a model's `class_names`). min_gene_fraction: with `genes`, the fraction of them that must be in
    the data; allow_empty_cells: keep cells with no counts over the genes. copy: False lets the counts share
    memory with the AnnData's (`find_counts`), for data used at once.

    Raises DataError when the file cannot be read, the dataset is empty, no raw counts are found
    (`extract_counts`), gene names are duplicated or too few of `genes` are present (`align_genes`),
    some cells have no counts (unless `allow_empty_cells`), or the obs columns or labels are unusable
    (`encode_obs`).
    """
    if isinstance(adata, (str, os.PathLike)):
        adata = read(adata)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(f"the dataset is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    slot, matrix, var_names = find_counts(adata, counts, copy)
    if genes is not None:
        matrix, _ = align_genes(matrix, var_names, genes, min_gene_fraction)
        var_names = np.asarray(genes, dtype=str)
    elif pd.Index(var_names).has_duplicates:
        align_genes(matrix, var_names, var_names)  # raises the duplicated-genes error
    empty = 0 if allow_empty_cells else int((np.asarray(matrix.sum(axis=1)).ravel() == 0).sum())
    if empty:
        # The fix reads the slot the counts came from (a layer, raw), over the genes asked for, whatever the matrix.
        over = "[:, genes]" if genes is not None else ""
        matrix_of = {"X": f"adata{over}.X", "raw": f"adata.raw{over}.X"}.get(slot, f"adata{over}.layers[{slot!r}]")
        raise DataError(
            f"{'1 cell has' if empty == 1 else f'{empty} cells have'} no counts over the "
            f"{'model' if genes is not None else 'dataset'}'s genes; remove them first (e.g. "
            f"adata = adata[np.asarray({matrix_of}.sum(axis=1)).ravel() > 0])."
        )
    labels, classes, batches, batch_names = encode_obs(
        list(adata.obs.columns),
        lambda key: adata.obs[key].values,
        adata.n_obs,
        label_key,
        batch_key,
        unknown,
        classes,
        "the AnnData",
        unlabeled_category,
    )
    return SCData(
        matrix,
        np.asarray(var_names, dtype=str),
        labels,
        list(classes),
        batches,
        batch_names,
        np.asarray(adata.obs_names, dtype=str),
    )


def epoch_batches(data: SCData, batch_size: int, seed: int, epochs: int, initial_epoch: int = 0) -> tf.data.Dataset:
    """tf.data of the minibatches of epochs `initial_epoch` .. `epochs - 1`, one epoch after another.

    Epoch e visits the cells in `cell_order(n_cells, seed, e)`, whatever ran before it, so a run resumed at epoch e
    sees the batches an uninterrupted run would, and a `fit` of `SCData.dataset(shuffle=True, seed=seed)` (pass e:
    the same order) the same batches too. Each epoch has `ceil(n_cells / batch_size)` batches: pass that as
    `steps_per_epoch` to `fit`. Elements are those of `SCData.dataset`: {"counts": SparseTensor [B, n_genes],
    "label" [B], "batch" [B]}.
    """
    import tensorflow as tf

    return data.minibatches(
        _order_batches(data.n_cells, batch_size, seed, tf.data.Dataset.range(initial_epoch, epochs))
    )


def cell_order(n_cells: int, seed: int, epoch: int | tf.Tensor) -> tf.Tensor:
    """The order `[n_cells]` (int64) in which epoch `epoch` of a run seeded `seed` visits the cells: TensorFlow's
    stateless shuffle keyed by (seed, epoch) alone (`SCData.dataset`, `epoch_batches`)."""
    import tensorflow as tf

    key = tf.stack([tf.constant(int(seed), tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(n_cells, dtype=tf.int64), seed=key)


def _order_batches(n_cells: int, batch_size: int, seed: int, epochs: tf.data.Dataset) -> tf.data.Dataset:
    """tf.data of cell-index minibatches `[<= batch_size]` (int64): for each epoch number that `epochs` yields, the
    cells in `cell_order`, cut into batches (none straddles two epochs)."""
    import tensorflow as tf

    return epochs.flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(cell_order(n_cells, seed, epoch)).batch(batch_size)
    )
