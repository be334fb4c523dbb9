"""Streaming stage: minibatches read chunk by chunk from an .h5ad file that stays on disk.

`H5ADStream` reads the CSR arrays of the counts (`X/data`, `X/indices`, `X/indptr`, or those of a layer
or of `raw/X`) with h5py, a chunk of rows at a time, aligns the genes to a vocabulary and feeds tf.data
with the same minibatch dicts as `SCData.dataset`: {"counts": SparseTensor [B, G], "label": int32 [B],
"batch": int32 [B]}. Memory is bounded by the chunk, buffer and batch sizes, not by the dataset: of each
cell only its label and batch id (8 bytes) are held in memory, and its library size (8 more) once
`summary` has run.

Shuffling is two-level, as for data too large to permute in memory: the order of the chunks is permuted
every epoch, and the rows of each buffer of `buffer_chunks` chunks are permuted before they are batched.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import scipy.sparse as sp

from tfp_scmix.data import (
    BATCH,
    COUNT_LAYERS,
    COUNTS,
    LABEL,
    DataError,
    SCData,
    align_genes,
    check_counts,
    data_fingerprint,
    data_path,
    encode_obs,
    gene_selection,
    index_pointers,
    sparse_entries,
)

logger = logging.getLogger("tfp_scmix")
# Cells whose counts decide which slot holds the raw counts: a stream's (`detect_counts`) and prediction's
# (`predict.counts_slot`, the file path), so that both read the same slot of the same file.
SLOT_SAMPLE = 1000

if TYPE_CHECKING:  # annotations only: TensorFlow is imported when a dataset is built
    import os

    import tensorflow as tf
    from numpy.typing import ArrayLike

    # One minibatch as numpy: (indices int64 [nnz, 2], values float32 [nnz], labels int32 [B], batches int32 [B]).
    NumpyBatch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _read_elem(element: Any) -> Any:
    import anndata.io

    return anndata.io.read_elem(element)


def frame_index(group: h5py.Group) -> np.ndarray:
    """The index (obs or var names) of an AnnData dataframe group in an .h5ad file `[n_rows]` (str)."""
    return np.asarray(_read_elem(group[group.attrs["_index"]]), dtype=str)


def frame_columns(group: h5py.Group) -> tuple[list[str], Any]:
    """(the column names of an AnnData dataframe group in an .h5ad file, a function reading one column's values
    `[n_rows]` by name), as `tfp_scmix.data.encode_obs` takes them: only the columns asked for are read."""
    return [k for k in group if k != group.attrs["_index"]], lambda key: _read_elem(group[key])


def _counts_element(f: h5py.File, counts: str | None) -> tuple[Any, h5py.Group, str]:
    """(h5py element of the count matrix, var group holding its gene names, description).

    Raises DataError when `counts` names a raw matrix or a layer that the file lacks.
    """
    if counts in (None, "X"):
        return f["X"], f["var"], "X"
    if counts == "raw":
        if "raw" not in f or "X" not in f["raw"]:
            raise DataError("counts='raw' but the file has no raw/X; pass counts='X' or a layer name.")
        return f["raw"]["X"], f["raw"]["var"], "raw/X"
    layers = f["layers"] if "layers" in f else {}
    if counts not in layers:
        raise DataError(
            f"no layer {counts!r} in the file (layers: {list(layers)}); pass counts='X', 'raw' or one of those layers."
        )
    return layers[counts], f["var"], f"layers/{counts}"


def _rows(matrix: Any, start: int, stop: int, n_genes: int) -> sp.csr_matrix:
    """Rows `start:stop` of a count matrix in a file (a CSR group or a dense dataset) as CSR float32, unchecked."""
    if isinstance(matrix, h5py.Group):
        pointers = matrix["indptr"][start : stop + 1].astype(np.int64)
        lo, hi = int(pointers[0]), int(pointers[-1])
        indices = matrix["indices"][lo:hi]
        return sp.csr_matrix(
            (matrix["data"][lo:hi].astype(np.float32, copy=False), indices, index_pointers(pointers - lo, indices)),
            shape=(stop - start, n_genes),
        )
    return sp.csr_matrix(np.asarray(matrix[start:stop], np.float32))


def _check_csr(matrix: Any, where: str) -> None:
    """Raise DataError when `matrix` is stored sparse but not as CSR (streaming reads rows)."""
    encoding = matrix.attrs.get("encoding-type", "") if isinstance(matrix, h5py.Group) else ""
    if isinstance(matrix, h5py.Group) and encoding != "csr_matrix":
        raise DataError(
            f"{where} is stored as {encoding or 'an unknown group'}; streaming reads rows, so it needs CSR: "
            "rewrite the file with adata.X = adata.X.tocsr(); adata.write_h5ad(path)."
        )


def _shape(matrix: Any) -> tuple[int, int]:
    if isinstance(matrix, h5py.Group):
        n_rows, n_columns = (int(v) for v in matrix.attrs["shape"])
        return n_rows, n_columns
    return int(matrix.shape[0]), int(matrix.shape[1])


def detect_counts(f: h5py.File, path: str = "the file") -> str:
    """The slot of an open .h5ad file (`f`) that holds raw counts, as `counts=` names it: X, then the layers of
    `tfp_scmix.data.COUNT_LAYERS`, then raw, the first whose first `SLOT_SAMPLE` cells are raw counts
    (`check_counts`), the order of `tfp_scmix.data.find_counts`. Later rows are checked as they are read.
    Raises DataError when none is: the error of X (what it looks like, and how to point at the counts)."""
    layers = f["layers"] if "layers" in f else {}
    candidates = ["X", *(name for name in COUNT_LAYERS if name in layers)]
    if "raw" in f and "X" in f["raw"]:
        candidates.append("raw")
    first_error: DataError | None = None
    for slot in candidates:
        matrix, _, where = _counts_element(f, slot)
        try:
            _check_csr(matrix, f"{path}:{where}")
            n_rows, n_genes = _shape(matrix)
            check_counts(_rows(matrix, 0, min(n_rows, SLOT_SAMPLE), n_genes), f"{path}:{where}")
        except DataError as err:
            first_error = first_error or err
            continue
        if slot != "X":
            logger.info("using raw counts from %s", where)
        return slot
    assert first_error is not None  # X is always a candidate
    raise first_error


class H5ADStream:
    """Counts of an .h5ad file read from disk in chunks of `chunk_cells` rows.

    path: an .h5ad file (HDF5, not zarr), or a name found by `tfp_scmix.data.data_path`.
    counts: "X", "raw" or a layer name, holding raw integer counts stored as CSR (or dense); None (default):
    detected on the first cells as `from_anndata` detects them (`detect_counts`).
    label_key / unknown / unlabeled_category / classes / batch_key: as in `tfp_scmix.data.from_anndata`.
    genes: align to this vocabulary (a model's `genes`); genes the file lacks are zero columns; min_gene_fraction:
    the fraction of them that must be in the file. chunk_cells: rows (cells) read at a time.

    Attributes: genes `[n_genes]`, classes, labels int32 `[n_cells]` (-1 where unknown), batches int32
    `[n_cells]`, batch_names, n_cells, n_genes, n_classes, n_labelled.

    Raises ValueError when `chunk_cells` < 1; DataError when the file is missing or cannot be opened as
    HDF5, the raw matrix or layer named by `counts` is missing, the counts are stored sparse but not as
    CSR, gene names are duplicated or too few of `genes` are in the file, or the obs columns or labels are
    unusable (`encode_obs`). The counts themselves are checked chunk by chunk as they are read
    (`tfp_scmix.data.check_counts`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        counts: str | None = None,
        label_key: str | None = "cell_type",
        batch_key: str | None = None,
        unknown: ArrayLike = (),
        genes: Sequence[str] | np.ndarray | None = None,
        classes: Sequence[str] | None = None,
        min_gene_fraction: float = 0.5,
        chunk_cells: int = 8192,
        unlabeled_category: str | None = None,
    ) -> None:
        self.path = data_path(str(path))
        if chunk_cells < 1:
            raise ValueError(f"chunk_cells must be positive, received {chunk_cells}")
        self.chunk_cells = int(chunk_cells)
        try:
            f = h5py.File(self.path, "r")
        except OSError as err:
            raise DataError(
                f"could not open {self.path} as an .h5ad (HDF5) file ({err}). Streaming needs an "
                "uncorrupted .h5ad; zarr stores are not supported."
            ) from err
        with f:
            self.counts_key = detect_counts(f, str(self.path)) if counts is None else counts
            matrix, var, self.where = _counts_element(f, self.counts_key)
            _check_csr(matrix, self.where)
            file_genes = frame_index(var)
            n_cells = _shape(matrix)[0]
            self._select = None
            if genes is None:
                align_genes(sp.csr_matrix((0, len(file_genes)), dtype=np.float32), file_genes, file_genes)
                genes = file_genes
            else:
                # The selection matrix [file genes, vocabulary], None where they are the vocabulary in its order.
                self._select = gene_selection(file_genes, genes, min_gene_fraction)
            self._file_genes = len(file_genes)
            names, column = frame_columns(f["obs"])
            self.labels, self.classes, self.batches, self.batch_names = encode_obs(
                names,
                column,
                n_cells,
                label_key,
                batch_key,
                unknown,
                classes,
                str(self.path),
                unlabeled_category,
            )
        self.genes = np.asarray(genes, dtype=str)
        # Cached by `summary`, both at once; _gene_sums is typed Any as mypy cannot tie its None to _library's.
        self._library: np.ndarray | None = None  # [n_cells]
        self._gene_sums: Any = None  # [n_genes]
        self._fingerprint = ""
        self._nonzero_fraction = 0.0

    @property
    def n_cells(self) -> int:
        return len(self.labels)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_labelled(self) -> int:
        return int((self.labels >= 0).sum())

    def rechunked(self, chunk_cells: int) -> H5ADStream:
        """The same stream read in chunks of `chunk_cells` rows (ValueError below 1)."""
        if chunk_cells < 1:
            raise ValueError(f"chunk_cells must be positive, received {chunk_cells}")
        stream = copy.copy(self)
        stream.chunk_cells = int(chunk_cells)
        return stream

    # -- reading ---------------------------------------------------------------------------------
    def _open(self) -> tuple[h5py.File, Any]:
        f = h5py.File(self.path, "r")
        return f, _counts_element(f, self.counts_key)[0]

    def _read(self, matrix: Any, start: int, stop: int) -> sp.csr_matrix:
        """Rows `start:stop` as CSR float32 `[stop - start, n_genes]` in the vocabulary's gene order.

        Raises DataError when they are not raw counts (`check_counts`).
        """
        rows = _rows(matrix, start, stop, self._file_genes)
        check_counts(rows, f"{self.path}:{self.where} rows {start}-{stop - 1}", start)
        if self._select is not None:
            rows = (rows @ self._select).tocsr()
        rows.sum_duplicates()  # canonical order (sorted, duplicates summed), as the selection's product gives
        return rows

    def chunks(self, order: Sequence[int] | np.ndarray | None = None) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Yield (row ids `[rows]`, CSR float32 `[rows, n_genes]`) chunk by chunk; `order` lists chunk starts.

        Raises DataError for a chunk that is not raw counts (`check_counts`).
        """
        starts = np.arange(0, self.n_cells, self.chunk_cells) if order is None else order
        f, matrix = self._open()
        with f:
            for start in starts:
                stop = min(int(start) + self.chunk_cells, self.n_cells)
                yield np.arange(start, stop), self._read(matrix, int(start), stop)

    def summary(self) -> tuple[np.ndarray, np.ndarray]:
        """(library sizes `[n_cells]`, total counts per gene `[n_genes]`), float64 counts (UMIs), from one
        pass over the file on the first call (which also computes `fingerprint` and `nonzero_fraction`), then
        cached."""
        if self._library is None:
            library = np.zeros(self.n_cells, np.float64)
            gene_sums = np.zeros(self.n_genes, np.float64)
            nonzero = 0

            def counted():
                nonlocal nonzero
                for rows, chunk in self.chunks():
                    library[rows] = np.asarray(chunk.sum(axis=1)).ravel()
                    gene_sums[:] += np.asarray(chunk.sum(axis=0)).ravel()
                    nonzero += chunk.nnz
                    yield chunk

            self._fingerprint = data_fingerprint(counted(), self.labels, self.batches, self.genes)
            self._library, self._gene_sums = library, gene_sums
            self._nonzero_fraction = nonzero / max(1, self.n_cells * self.n_genes)
        return self._library, self._gene_sums

    @property
    def nonzero_fraction(self) -> float:
        """The fraction of stored nonzero entries of the counts over the vocabulary, in [0, 1] (`summary`'s pass)."""
        self.summary()
        return self._nonzero_fraction

    def fingerprint(self) -> str:
        """`data.data_fingerprint` of the file's counts (in the vocabulary's gene order), labels, batches and genes:
        equal to `SCData.fingerprint` of the same cells read into memory. Computed by `summary`'s pass."""
        self.summary()
        return self._fingerprint

    @property
    def library_size(self) -> np.ndarray:
        """`[n_cells]` total counts per cell (one pass over the file, then cached)."""
        return self.summary()[0]

    def to_data(self, index: ArrayLike | None = None) -> SCData:
        """The cells at `index` (row ids; default: every labelled cell) read into memory as `SCData`.

        The cells come in increasing row order, whatever the order of `index`. Meant for small subsets,
        e.g. the labelled cells for `SCMix.fit_classifier`.
        """
        index = np.flatnonzero(self.labels >= 0) if index is None else np.sort(np.asarray(index))
        parts = []
        for rows, chunk in self.chunks(np.unique(index // self.chunk_cells) * self.chunk_cells):
            parts.append(chunk[np.searchsorted(rows, index[(index >= rows[0]) & (index <= rows[-1])])])
        counts = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        with h5py.File(self.path, "r") as f:
            names = frame_index(f["obs"])[index]
        return SCData(
            counts.astype(np.float32),
            self.genes,
            self.labels[index],
            list(self.classes),
            self.batches[index],
            list(self.batch_names),
            names,
        )

    # -- minibatches -----------------------------------------------------------------------------
    def batches_numpy(
        self,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int | Sequence[int] = 0,
        buffer_chunks: int = 4,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> Iterator[NumpyBatch]:
        """Yield minibatches as numpy (indices int64 `[nnz, 2]`, values float32 `[nnz]`, labels int32 `[B]`,
        batches int32 `[B]`), B = `batch_size` except perhaps for the last of the pass.

        With `num_shards` > 1 this shard reads only every `num_shards`-th chunk (a worker's share).
        `seed` may be a sequence, e.g. (seed, epoch). Raises ValueError when the file has fewer chunks than
        `num_shards`, and DataError for a chunk that is not raw counts.
        """
        rng = np.random.default_rng(seed)
        starts = np.arange(0, self.n_cells, self.chunk_cells)
        if len(starts) < num_shards:
            raise ValueError(
                f"{self.path} has {len(starts)} chunk(s) of {self.chunk_cells} cells for {num_shards} "
                f"shards (workers), so some would get no cells; use chunk_cells <= "
                f"{max(1, self.n_cells // num_shards)}."
            )
        order = starts[shard_index::num_shards]
        if shuffle:
            order = rng.permutation(order)
        pending = None  # rows left over from the previous buffer: (row ids, CSR)
        for i in range(0, len(order), buffer_chunks):
            parts = list(self.chunks(order[i : i + buffer_chunks]))
            if pending is not None:
                parts.insert(0, pending)
            rows = np.concatenate([p[0] for p in parts])
            counts = sp.vstack([p[1] for p in parts], format="csr") if len(parts) > 1 else parts[0][1]
            if shuffle:
                permutation = rng.permutation(len(rows))
                rows, counts = rows[permutation], counts[permutation]
            n_full = len(rows) // batch_size * batch_size
            for start in range(0, n_full, batch_size):
                yield self._pack(rows[start : start + batch_size], counts[start : start + batch_size])
            pending = (rows[n_full:], counts[n_full:]) if n_full < len(rows) else None
        if pending is not None:
            yield self._pack(*pending)

    def _pack(self, rows: np.ndarray, counts: sp.csr_matrix) -> NumpyBatch:
        counts.sort_indices()
        return (*sparse_entries(counts), self.labels[rows], self.batches[rows])

    def dataset(
        self,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        buffer_chunks: int = 4,
        repeat: bool = False,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> tf.data.Dataset:
        """tf.data of minibatch dicts {"counts": float32 SparseTensor [B, n_genes], "label": int32 [B],
        "batch": int32 [B]}, as `batches_numpy` yields them.

        Each pass (each epoch when `repeat`) reshuffles with seed (seed, pass number). Peak memory: about
        `buffer_chunks * chunk_cells` cells of counts, plus the prefetched batches. Errors of
        `batches_numpy` are raised when the dataset is iterated.
        """
        import tensorflow as tf

        passes = itertools.count()
        n_genes = self.n_genes

        def generate():
            yield from self.batches_numpy(
                batch_size, shuffle, (seed, next(passes)), buffer_chunks, num_shards, shard_index
            )

        signature = (
            tf.TensorSpec([None, 2], tf.int64),
            tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.int32),
        )

        def as_dict(indices, values, labels, batches):
            shape = tf.stack([tf.shape(labels, out_type=tf.int64)[0], tf.constant(n_genes, tf.int64)])
            return {COUNTS: tf.SparseTensor(indices, values, shape), LABEL: labels, BATCH: batches}

        ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
        if repeat:
            ds = ds.repeat()
        return ds.map(as_dict).prefetch(2)
