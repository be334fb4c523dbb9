"""Prediction stage: the one door through which a trained model labels cells, at any number of cells.

`predict(model, source)` takes `SCData`, an AnnData (in memory or backed), an .h5ad path (read backed,
chunk by chunk), another path `tfp_scmix.read` reads, or a count matrix in the model's gene order, checks each
minibatch as `from_anndata` does, and predicts it with the model's deterministic `call`: memory is bounded by three
chunks (the
one predicted, the one whose outputs are gathered, the next one read meanwhile) plus the outputs.
`annotate`, the command line, the export client and the experiments predict through it.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import weakref
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tfp_scmix.data import (
    NEW_BATCH,
    SLOT_NAMES,
    UNLABELLED,
    DataError,
    OncePerMessage,
    SCData,
    Workspace,
    check_argument,
    check_counts,
    check_structure,
    csr_on,
    csr_rows,
    data_path,
    duplicate_gene_names_unsaid,
    encode_obs,
    find_counts,
    from_anndata,
    gene_selection,
    log_normalised_dense,
    log_normalised_values,
    read,
)
from tfp_scmix.ensemble import SCMixEnsemble, trained
from tfp_scmix.model import SCMix
from tfp_scmix.stream import SLOT_SAMPLE, H5ADStream, frame_columns, frame_index

logger = logging.getLogger("tfp_scmix")
OUTPUT_KEYS = ("probs", "label", "confidence", "cell_topic")
# Minibatches predicted at once, each on its own thread (`_Minibatches`).
WORKERS = 2
# How much larger each chunk is than the one before, up to `chunk_size` (`_chunk_bounds`).
CHUNK_GROWTH = 1.5
# The fewest rows a minibatch is padded to (`_padded_rows`).
MIN_PADDED_ROWS = 64
# Whether the counts of an .h5ad path are read from the file mapped into memory where they can be (`_FileMap`).
MAP_FILES = True
# Fraction of nonzero entries at or below which a minibatch is multiplied by the first layer's kernel as CSR
# (scipy) rather than dense (BLAS): per 1,024 cells x 2,000 genes and 130 kernel columns, one thread each,
# normalisation included, 1.3 against 7.1 ms at 2.7% nonzero (the density of the package's own gene selection),
# 5.0 against 7.2 ms at 10%, 8.2 against 8.5 at 15% and 11.5 against 9.0 at 25% (docs/performance.md, "The
# product in numpy"). The encoder's training path switches at the same density (`CellEncoder.CSR_DENSITY`).
SPARSE_PRODUCT_DENSITY = 0.1
# The label `annotate` gives a cell it does not call (no counts over the model's genes, or a flag asked for).
UNASSIGNED = "unassigned"


def counts_slot(adata, counts: str | None = None) -> tuple[str, np.ndarray]:
    """(slot, its gene names) of the raw counts of an AnnData (in memory or backed), found in its first cells.

    The slot is what `counts=` names ("X", "raw" or a layer): given, or detected as `find_counts` does on
    the first `SLOT_SAMPLE` cells, so that every chunk of a prediction reads the same slot. Raises DataError
    as `find_counts` does.
    """
    with duplicate_gene_names_unsaid():  # the sample repeats the data's gene names; align_genes names duplicates
        sample = _first_cells(adata, min(adata.n_obs, SLOT_SAMPLE))
    slot, _, genes = find_counts(sample, counts)
    return slot, genes


def _first_cells(adata, n: int):
    """The first `n` cells of an AnnData, in memory, with the slots that `find_counts` may read. Where every slot
    is CSR (in memory, or in the file of a backed AnnData), an AnnData of its own on those slots' first rows
    (anndata's row slicing makes scipy copy them entry by entry, and reads a backed file through a view: longer
    than predicting them)."""

    def first_rows(matrix):
        if sp.issparse(matrix) and matrix.format == "csr":
            return csr_rows(matrix, 0, n)
        if adata.isbacked and getattr(matrix, "format", None) == "csr" and hasattr(matrix, "group"):
            return _file_rows(matrix.group, 0, n, matrix.shape[1])
        return None

    rows = None if adata.is_view else [first_rows(adata.X), *map(first_rows, adata.layers.values())]
    raw = None if adata.raw is None or rows is None else first_rows(adata.raw.X)
    if rows is None or any(r is None for r in rows) or (adata.raw is not None and raw is None):
        sample = adata[:n]
        return sample.to_memory() if sample.isbacked else sample
    import anndata

    obs, var = pd.DataFrame(index=adata.obs_names[:n]), pd.DataFrame(index=adata.var_names)
    sample = anndata.AnnData(X=rows[0], obs=obs, var=var, layers=dict(zip(adata.layers.keys(), rows[1:])))
    if raw is not None:
        sample.raw = anndata.AnnData(X=raw, obs=obs, var=pd.DataFrame(index=adata.raw.var_names))
    return sample


class _H5ADFile:
    """An .h5ad file opened with h5py alone, for prediction: the CSR group of its raw-count slot, that slot's gene
    names and the number of cells. anndata's backed open reads the whole obs and var tables first, none of which
    prediction needs: a cost per call that grows with the cells (docs/performance.md, "the file opened with
    h5py")."""

    def __init__(self, file, group, var_names: np.ndarray, n_obs: int, slot: str) -> None:
        self.file, self.group, self.var_names, self.n_obs, self.slot = file, group, var_names, n_obs, slot
        self.mapped = _FileMap.of(file.filename, group) if MAP_FILES else None

    @classmethod
    def open(cls, path, counts: str | None) -> _H5ADFile | None:
        """The file's raw-count slot (`counts`, or detected on its first cells as `counts_slot` does), or None
        where the file is not one whose slots are all CSR in anndata's layout: the caller opens it with
        anndata, whose errors name what is wrong with the file. Raises DataError as `find_counts` does."""
        import h5py

        try:
            file = h5py.File(data_path(str(path)), "r")
        except (OSError, DataError):
            return None
        try:
            slots = {"X": file["X"], **{name: group for name, group in file.get("layers", {}).items()}}
            if "raw" in file:
                slots["raw"] = file["raw"]["X"]
            if not all(_is_csr(group) for group in slots.values()):
                file.close()
                return None
            names = {"X": frame_index(file["var"])}
            if "raw" in slots:
                names["raw"] = frame_index(file["raw"]["var"])
            n_obs = int(slots["X"].attrs["shape"][0])
        except (KeyError, ValueError, TypeError, OSError):  # not anndata's layout: anndata's open says what it is
            file.close()
            return None
        try:
            slot = find_counts(_file_sample(slots, names, min(n_obs, SLOT_SAMPLE)), counts)[0] if n_obs else "X"
        except BaseException:
            file.close()
            raise
        return cls(file, slots[slot], names.get(slot, names["X"]), n_obs, slot)

    def rows(self, start: int, stop: int, lease: _Lease | None = None) -> sp.csr_matrix:
        """Rows `start:stop` of the slot (`_file_rows`: unchecked until `from_anndata` reads them)."""
        return _file_rows(self.group, start, stop, len(self.var_names), lease, self.mapped)

    def close(self) -> None:
        self.file.close()
        if self.mapped is not None:
            self.mapped.close()


class _FileMap:
    """The data and indices of a CSR slot of an .h5ad file, mapped into memory: rows read from the file are views of
    the operating system's cache of the file instead of copies (h5py reads into new memory: on the Kang file,
    prediction streamed from the file ran at 74,000-105,000 cells/s where views of the same arrays in memory ran at
    114,000-135,000; docs/performance.md, "The file's counts mapped into memory").

    HDF5 stores an uncompressed array as raw values, all at one offset or in chunks at offsets that the file records;
    chunks written one after another lie back to back, and a range of entries within such a run is one view
    (anndata writes the last chunk apart: ranges that reach into it are copied). Where the arrays cannot be read as
    raw memory (compression or any other filter, a byte order not the machine's, chunks not all written), `of` gives
    None and h5py reads them. Pages a chunk of cells has been read from are handed back to the cache once its
    outputs are gathered (`drop`), so that the process's resident memory stays that of a few chunks. A file
    truncated by another program while it is mapped stops the process (SIGBUS), as with any memory-mapped file."""

    def __init__(self, memory, runs: dict[str, list[tuple[int, int, np.ndarray]]]) -> None:
        self.memory, self.runs = memory, runs  # per array: (first entry, byte offset, view) of each run

    @classmethod
    def of(cls, filename: str, group) -> _FileMap | None:
        import mmap

        try:
            with open(filename, "rb") as handle:
                memory = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # not a mappable file (a pipe, an empty file): h5py reads it
            return None
        runs = {name: _raw_runs(group[name], memory) for name in ("data", "indices")}
        if any(r is None for r in runs.values()):
            memory.close()
            return None
        return cls(memory, {name: r for name, r in runs.items() if r is not None})

    def read(self, name: str, first: int, last: int, lease: _Lease | None) -> np.ndarray | None:
        """Entries `first:last` of the array `name`: a view where they lie in one run, else copied from the runs into
        the lease's memory (or new memory); None where the range reaches past the runs (h5py then reads short)."""
        runs = self.runs[name]
        i = bisect.bisect_right([r[0] for r in runs], first) - 1
        if i < 0:
            return None
        start, _, view = runs[i]
        if last - start <= view.size:
            return view[first - start : last - start]
        if last > runs[-1][0] + runs[-1][2].size:
            return None
        dtype = view.dtype
        nbytes = (last - first) * dtype.itemsize
        out = (np.empty(nbytes, np.uint8) if lease is None else lease.take(nbytes)[:nbytes]).view(dtype)
        for start, _, view in runs[i:]:
            lo, hi = max(first, start), min(last, start + view.size)
            if lo < hi:
                out[lo - first : hi - first] = view[lo - start : hi - start]
        return out

    def drop(self, name: str, first: int, last: int) -> None:
        """Hand the pages that hold only entries `first:last` of `name` back to the cache (madvise MADV_DONTNEED):
        the views stay valid, a later read maps them again from the cache."""
        import mmap

        if not hasattr(mmap, "MADV_DONTNEED") or not hasattr(self.memory, "madvise"):
            return
        page = mmap.PAGESIZE
        for start, offset, view in self.runs[name]:
            lo, hi = max(first, start), min(last, start + view.size)
            if lo >= hi:
                continue
            begin = -(-(offset + (lo - start) * view.itemsize) // page) * page
            end = (offset + (hi - start) * view.itemsize) // page * page
            if end > begin:
                self.memory.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def close(self) -> None:
        try:
            self.memory.close()
        except BufferError:  # views of it are still held (an error's traceback): it closes once they are gone
            pass


def _raw_runs(dataset, memory) -> list[tuple[int, int, np.ndarray]] | None:
    """(first entry, byte offset, view) of each run of a one-dimensional HDF5 dataset's entries stored back to back
    in the mapped file, in the entries' order; None where the entries are not raw values in the file (see
    `_FileMap`)."""
    dtype = np.dtype(dataset.dtype)
    n = int(dataset.shape[0]) if len(dataset.shape) == 1 else -1
    if n < 0 or not dtype.isnative or dtype.hasobject or dataset.id.get_create_plist().get_nfilters():
        return None
    if n == 0:
        return []
    if dataset.chunks is None:
        offset = dataset.id.get_offset()
        pieces = None if offset is None else [(0, int(offset), n)]
    else:
        pieces = _chunk_pieces(dataset, n, dtype.itemsize)
    if pieces is None or any(offset + size * dtype.itemsize > len(memory) for _, offset, size in pieces):
        return None
    return [(start, offset, np.frombuffer(memory, dtype, size, offset)) for start, offset, size in pieces]


def _is_csr(element) -> bool:
    return hasattr(element, "attrs") and element.attrs.get("encoding-type", "") == "csr_matrix"


def _file_sample(slots: dict, names: dict, n: int):
    """The first `n` cells of a file's slots as an AnnData in memory (X, its layers, raw), for `find_counts`."""
    import anndata

    rows = {slot: _file_rows(group, 0, n, len(names.get(slot, names["X"]))) for slot, group in slots.items()}
    obs = pd.DataFrame(index=pd.RangeIndex(n).astype(str))
    layers = {slot: matrix for slot, matrix in rows.items() if slot not in ("X", "raw")}
    with duplicate_gene_names_unsaid():  # align_genes names them, with the fix
        sample = anndata.AnnData(X=rows["X"], obs=obs, var=pd.DataFrame(index=names["X"]), layers=layers)
        if "raw" in rows:
            sample.raw = anndata.AnnData(X=rows["raw"], obs=obs, var=pd.DataFrame(index=names["raw"]))
    return sample


def _open(source, model, counts, min_gene_fraction) -> tuple[int, Any, str | None, sp.csr_matrix | None]:
    """The number of cells of `source`, the source ready to slice (a path opened with h5py, or backed by anndata
    where its slots are not all CSR; an `SCData` aligned to the model's genes; a matrix checked against the model's
    width, as CSR if sparse), for an AnnData or a file the slot of its raw counts, and the selection of the model's
    genes from that slot's (`tfp_scmix.data.gene_selection`; None where they are the model's, in its order).
    Raises DataError as `align_genes` does for the slot's genes."""
    if isinstance(source, (str, os.PathLike)):
        opened = _H5ADFile.open(source, counts)
        if opened is not None:
            if opened.n_obs == 0:
                opened.close()
                raise DataError("the dataset is empty (0 cells).")
            try:
                select = gene_selection(opened.var_names, model.genes, min_gene_fraction)
            except BaseException:
                opened.close()
                raise
            return opened.n_obs, opened, opened.slot, select
        source = read(source, backed="r")  # an .h5ad backed; a 10x folder or .h5, a .loom in memory
    select = None
    if isinstance(source, SCData):
        if list(source.genes) != list(model.genes):
            source = source.select_genes(model.genes, min_gene_fraction)
        n_cells = source.n_cells
    elif hasattr(source, "obs_names"):  # AnnData, in memory or backed
        n_cells = source.n_obs
        if n_cells:
            counts, names = counts_slot(source, counts)
            select = gene_selection(names, model.genes, min_gene_fraction)
    elif isinstance(source, pd.DataFrame):  # cells x genes with the genes' names as columns (adata.to_df())
        return _open(_frame_anndata(source), model, counts, min_gene_fraction)
    elif isinstance(source, H5ADStream):
        raise TypeError(
            f"predict reads an .h5ad file itself, a chunk of cells at a time: pass the file's path ({source.path}) "
            "rather than an H5ADStream, which is a training input"
        )
    else:
        if not (sp.issparse(source) or isinstance(source, (np.ndarray, list, tuple)) or hasattr(source, "__array__")):
            raise TypeError(
                f"predict takes an AnnData, the path of an .h5ad file, an SCData or a count matrix (numpy or scipy "
                f"sparse) [n_cells, n_genes]; received {type(source).__name__}"
            )
        if sp.issparse(source):
            check_structure(source, "the count matrix")  # before scipy slices it
            source = sp.csr_matrix(source)  # any sparse format (COO has no rows to slice)
        else:
            source = np.asarray(source)
        if source.ndim != 2 or source.shape[1] != model.n_genes:
            raise DataError(
                f"the count matrix has shape {source.shape}; the model reads {model.n_genes} genes "
                "in its own order (model.genes). Pass an AnnData to align genes by name."
            )
        n_cells = source.shape[0]
        _check_gene_order(source, model)
    if n_cells == 0:
        raise DataError("the dataset is empty (0 cells).")
    return n_cells, source, counts, select


# A count matrix whose genes' mean expression correlates less than this with the training data's (log scale) is
# warned of as not in the model's gene order. On pbmc3k's model, matrices of the model's genes from five PBMC
# datasets gave 0.84 to 0.995 (mouse pancreas, another tissue: 0.34), and the same data in other columns (the
# file's first genes, a permutation) -0.09 to 0.06 (probe, 2026-12-05: a trial's matrix of the wrong genes got 17%
# of the right calls, unwarned).
GENE_ORDER_CORRELATION = 0.2
# The cells (at most) and the genes with counts (at least) that the check reads.
GENE_ORDER_CELLS, GENE_ORDER_MIN_GENES = 5_000, 50


def _check_gene_order(matrix, model) -> None:
    """Warn when a count matrix `[n_cells, n_genes]` (numpy or CSR) does not look like counts over the model's genes
    in its order: the log mean expression of its first `GENE_ORDER_CELLS` cells, over the genes with any count,
    against the model's background (the training data's, `TopicBranch.background`)."""
    sample = matrix[:GENE_ORDER_CELLS]
    if sample.shape[0] < 2:
        return
    mean = np.asarray(sample.mean(axis=0), dtype=np.float64).ravel()
    seen = mean > 0
    if seen.sum() < GENE_ORDER_MIN_GENES:
        return
    background = _members(model)[0].topics.background.numpy()
    correlation = float(np.corrcoef(np.log(mean[seen] / mean.sum()), background[seen])[0, 1])
    if correlation < GENE_ORDER_CORRELATION:
        logger.warning(
            "the count matrix's genes do not look like the model's in its order: their mean expression correlates "
            "%.2f with the training data's (counts over model.genes in order: above %.1f). A matrix is read by "
            "position; pass an AnnData (or adata.to_df()) to align genes by name",
            correlation,
            GENE_ORDER_CORRELATION,
        )


def _frame_anndata(frame: pd.DataFrame):
    """An AnnData of a pandas DataFrame of counts (cells as rows, gene names as columns, as `adata.to_df()` gives),
    so that its genes are matched to the model's by name, not by position. Raises DataError for columns that are
    not numbers."""
    import anndata

    if not all(pd.api.types.is_numeric_dtype(dtype) for dtype in frame.dtypes):
        wrong = [str(c) for c, dtype in frame.dtypes.items() if not pd.api.types.is_numeric_dtype(dtype)]
        raise DataError(
            f"the DataFrame's columns must all hold counts (numbers): {', '.join(wrong[:5])} do not. Pass cells as "
            "rows and genes as columns, named by gene (adata.to_df()), or the AnnData itself."
        )
    obs, var = pd.DataFrame(index=frame.index.astype(str)), pd.DataFrame(index=frame.columns.astype(str))
    return anndata.AnnData(X=sp.csr_matrix(frame.to_numpy()), obs=obs, var=var)


def _slot_rows(
    adata, slot: str | None, start: int, stop: int, lease: _Lease | None = None
) -> tuple[sp.csr_matrix, Any] | None:
    """(rows `start:stop` of the CSR matrix in `slot` ("X", "raw" or a layer), that slot's gene names), without
    slicing the AnnData: for an AnnData in memory, on views of the slot's arrays (anndata's row slicing makes scipy
    copy them entry by entry: most of the time of a prediction); for a backed one's X, read from the file by
    anndata's sparse dataset (not through a view of the AnnData and its `to_memory`). None otherwise (a view of
    an AnnData, another slot of a backed one, a slot that is not CSR): the caller slices the AnnData."""
    if slot is None or adata.is_view:
        return None
    if adata.isbacked:
        backed = adata.X  # anndata's sparse dataset on the file, for a sparse X
        if slot != "X" or sp.issparse(backed) or getattr(backed, "format", None) != "csr":
            return None
        return _file_rows(backed.group, start, stop, backed.shape[1], lease), adata.var_names
    if slot == "raw":
        matrix, names = adata.raw.X, adata.raw.var_names
    else:
        matrix, names = (adata.X if slot == "X" else adata.layers[slot]), adata.var_names
    if not (sp.issparse(matrix) and matrix.format == "csr"):
        return None
    return csr_rows(matrix, start, stop), names


def _chunk_pieces(dataset, n: int, itemsize: int) -> list[tuple[int, int, int]] | None:
    """(first entry, byte offset, entries) of each run of a chunked dataset's chunks stored back to back, or None
    where a chunk is filtered or was never written (its entries read as the fill value), or where h5py cannot list
    the chunks in one pass (`chunk_iter`: h5py 3.8 and later with HDF5 1.14)."""
    if not hasattr(dataset.id, "chunk_iter"):
        return None
    chunk = int(dataset.chunks[0])
    infos: list[Any] = []  # h5py's StoreInfo of each chunk
    dataset.id.chunk_iter(infos.append)
    infos.sort(key=lambda info: info.chunk_offset[0])
    if [info.chunk_offset[0] for info in infos] != list(range(0, n, chunk)):
        return None
    pieces: list[tuple[int, int, int]] = []
    for info in infos:
        start, offset = int(info.chunk_offset[0]), int(info.byte_offset)
        if info.filter_mask or info.size != chunk * itemsize:
            return None
        size = min(chunk, n - start)
        if pieces and pieces[-1][1] + pieces[-1][2] * itemsize == offset:
            pieces[-1] = (pieces[-1][0], pieces[-1][1], pieces[-1][2] + size)
        else:
            pieces.append((start, offset, size))
    return pieces


def _file_rows(
    group, start: int, stop: int, n_genes: int, lease: _Lease | None = None, mapped: _FileMap | None = None
) -> sp.csr_matrix:
    """Rows `start:stop` of a CSR matrix in an HDF5 group (anndata's layout: data, indices, indptr), read with
    h5py: only those rows' entries, the pointers in the indices' integer type where they fit (anndata writes
    int64 pointers beside int32 indices, and scipy's checks would then cast the indices, a copy of the largest
    array). Unchecked here: `from_anndata` checks the structure before anything reads it. Half the time of
    anndata's own row slicing of a backed matrix (docs/performance.md). With a `lease`, data and indices are read
    into its memory (`_Buffers`): the matrix holds it until the lease is released. With `mapped` (`_FileMap`), data
    and indices are views of the mapped file where they can be, whose pages the lease hands back on release.
    Raises DataError for a part of the file h5py cannot read (a damaged compressed block)."""
    try:
        indptr = group["indptr"][start : stop + 1]
        first, last = int(indptr[0]), int(indptr[-1])
        data, indices = (_read_range(group[name], first, last, lease, mapped) for name in ("data", "indices"))
    except OSError as err:  # h5py's error for a damaged block of the file (a failed filter or checksum)
        raise DataError(
            f"could not read cells {start}-{stop - 1} of {group.file.filename} ({err}). The file may be truncated or "
            "corrupt: copy or download it again."
        ) from None
    return csr_on(data, indices, indptr - first, (stop - start, n_genes))


@dataclasses.dataclass
class _Chunk:
    """Cells of a source as read for prediction, before the per-minibatch checks (`rows`).

    counts: CSR `[n_cells, source genes]` whose pointers are checked (`check_structure(full=False)`); batches:
    int32 `[n_cells]` batch ids; source: how messages name the matrix ("adata.X", "the count matrix"), None
    where the counts are already checked and in the model's genes (an `SCData`'s rows, or `from_anndata`'s);
    select: `tfp_scmix.data.gene_selection`, None where the genes are the model's in its order; lease: the memory
    the counts were read into from a file (`_Buffers`), released once the chunk's outputs are gathered."""

    counts: sp.csr_matrix
    batches: np.ndarray
    start: int
    source: str | None = None
    select: sp.csr_matrix | None = None
    lease: _Lease | None = None

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    def rows(self, start: int, stop: int, workspace: Workspace | None = None) -> sp.csr_matrix:
        """Rows `start:stop` of the chunk as the model reads them: checked as `from_anndata` checks counts
        (`check_counts`; the messages name the rows by their position in the source), float32, over the model's
        genes in its order, in canonical order (duplicate entries summed, as a dense matrix would hold them).
        Raises DataError as `check_counts` does. workspace: the checks' (`tfp_scmix.data.Workspace`)."""
        rows = csr_rows(self.counts, start, stop)
        if self.source is not None:
            first, last = self.start + start, self.start + stop - 1
            check_counts(rows, f"rows {first}-{last} of {self.source}", first, workspace)
            rows = rows if rows.dtype == np.float32 else rows.astype(np.float32)
        if self.select is not None:
            rows = (rows @ self.select).tocsr()
            rows.sort_indices()
        elif not rows.has_canonical_format:
            rows = rows.copy()
            rows.sum_duplicates()
        return rows


def _read(source, model, start, stop, counts, min_gene_fraction, select, lease: _Lease | None = None) -> _Chunk:
    """Cells `start:stop` of an opened source (`_open`) as read for prediction. The values are checked later, a
    minibatch at a time on the prediction threads (`_Chunk.rows`). Checked here, on the reading thread beside the
    two predicting ones, a 4,608-cell chunk of an AnnData took 60 ms to read (a few ms on an idle thread), and
    an AnnData was predicted at two thirds of an `SCData`'s rate (docs/performance.md, "The counts checked where
    they are predicted")."""
    n = stop - start
    if isinstance(source, SCData):  # its batches, by name, as rows of the model's offsets (`SCMix.batch_rows`)
        rows = _members(model)[0].batch_rows(source.batch_names, source.batches[start:stop])
        return _Chunk(csr_rows(source.counts, start, stop), rows, start)
    if isinstance(source, _H5ADFile) or hasattr(source, "obs_names"):
        slot_rows = (
            (source.rows(start, stop, lease), None)
            if isinstance(source, _H5ADFile)
            else _slot_rows(source, counts, start, stop, lease)
        )
        if slot_rows is None:  # a view, a slot that is not CSR: anndata slices it, `from_anndata` checks it
            chunk = source[start:stop]
            data = from_anndata(
                chunk.to_memory() if source.isbacked else chunk,
                counts=counts,
                label_key=None,
                genes=model.genes,
                min_gene_fraction=min_gene_fraction,
                allow_empty_cells=True,
                copy=False,  # the chunk is predicted at once
            )
            return _Chunk(data.counts, np.full(n, NEW_BATCH, np.int32), start)
        matrix, where = slot_rows[0], SLOT_NAMES.get(counts or "X", f"adata.layers[{counts!r}]")
    elif sp.issparse(source):  # CSR since `_open`, checked whole there
        matrix, where = csr_rows(source, start, stop), "the count matrix"
    else:
        matrix, where = sp.csr_matrix(source[start:stop]), "the count matrix"
    check_structure(matrix, where, full=False)  # O(cells): the minibatches' row views are then in bounds
    return _Chunk(matrix, np.full(n, NEW_BATCH, np.int32), start, where, select, lease)


def _read_range(
    dataset, first: int, last: int, lease: _Lease | None = None, mapped: _FileMap | None = None
) -> np.ndarray:
    """Entries `first:last` of a one-dimensional HDF5 dataset, read straight into a new array, or into memory of
    a `lease` (h5py's slicing takes twice as long: about 7 against 4 ms for the 2.3 million entries of 4,608 Kang
    cells; probe). A range past the dataset's end reads short, as slicing does: `from_anndata`'s checks then
    refuse the pointers. With `mapped`, the entries are read from the mapped file (`_FileMap.read`) and the lease
    drops their pages when it is released."""
    last = max(first, min(last, dataset.shape[0]))
    name = dataset.name.rsplit("/", 1)[-1]
    if mapped is not None and name in mapped.runs:
        entries = mapped.read(name, first, last, lease)
        if entries is not None:
            if lease is not None:
                lease.mapped.append((mapped, name, first, last))
            return entries
    dtype = np.dtype(dataset.dtype)
    if lease is None:
        out = np.empty(last - first, dtype)
    else:
        out = lease.take((last - first) * dtype.itemsize)[: (last - first) * dtype.itemsize].view(dtype)
    if last > first:
        dataset.read_direct(out, np.s_[first:last])
    return out


class _Buffers:
    """Memory for the chunks read from a file, reused from one chunk to a later one within a `predict` call.

    A new array for every chunk costs the kernel a page fault for every 4 KB page it is written to, and where
    numpy asks for huge pages (arrays of 4 MB and more), their zeroing and at times memory compaction: reading a
    10,000-cell chunk of the Kang file (40 MB) took 21 ms into new arrays, 98-103 ms with huge pages, and 11 ms
    into memory already written (probes; docs/performance.md, "Chunks read into reused memory"). A chunk reads
    into a `lease`; once its outputs are gathered, `release` gives its memory back for a later chunk. `take`
    hands out a byte array of at least the size asked for from what was given back where one is large enough;
    otherwise it lets go of what was given back and allocates, with `HEADROOM` for later chunks' larger sizes.
    The memory in use is therefore at most that of the chunks being read, predicted and gathered (three), as
    without the pool. Thread-safe: the reading thread takes, the calling thread releases."""

    HEADROOM = 1.1

    def __init__(self) -> None:
        self.free: list[np.ndarray] = []
        self.lock = threading.Lock()
        self.allocated = 0  # arrays allocated (tests: later chunks reuse memory)

    def lease(self) -> _Lease:
        return _Lease(self)

    def take(self, nbytes: int) -> np.ndarray:
        with self.lock:
            fits = [i for i, buffer in enumerate(self.free) if buffer.nbytes >= nbytes]
            if fits:
                return self.free.pop(min(fits, key=lambda i: self.free[i].nbytes))
            self.free.clear()  # too small for this chunk, and chunks grow: let go before allocating
            self.allocated += 1
        return np.empty(int(nbytes * self.HEADROOM) + 64, np.uint8)

    def give(self, buffers: list[np.ndarray]) -> None:
        with self.lock:
            self.free.extend(buffers)


class _Lease:
    """The memory one chunk reads into (`_Buffers.lease`): `take` as the pool's, `release` gives it all back."""

    def __init__(self, pool: _Buffers) -> None:
        self.pool = pool
        self.held: list[np.ndarray] = []
        self.mapped: list[tuple[_FileMap, str, int, int]] = []  # ranges read from a mapped file (`_FileMap.drop`)

    def take(self, nbytes: int) -> np.ndarray:
        buffer = self.pool.take(nbytes)
        self.held.append(buffer)
        return buffer

    def release(self) -> None:
        self.pool.give(self.held)
        self.held = []
        for mapped, name, first, last in self.mapped:
            mapped.drop(name, first, last)
        self.mapped = []


def _chunk_bounds(n_cells: int, chunk_size: int, first: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of `n_cells`: the first of `first` cells (so that prediction starts once a few
    minibatches are read), then each `CHUNK_GROWTH` times the one before, up to `chunk_size`. A chunk is read while
    the one before is predicted: reading a chunk from a file takes about two thirds of the time to predict as many
    cells on the other cores, so a chunk much larger than the one before would leave the workers waiting for it
    (with one chunk of 2,048 cells then 10,000, a third of a call on the Kang file; docs/performance.md)."""
    bounds, start, size = [], 0, min(chunk_size, first)
    while start < n_cells:
        stop = min(n_cells, start + size)
        bounds.append((start, stop))
        start, size = stop, min(chunk_size, int(size * CHUNK_GROWTH))
    return bounds


# One traced function per model (keyed weakly, so that it goes with the model), reused for every batch of
# every chunk and call. Keras's own predict loop over a tf.data pipeline per chunk traced again for each and
# kept about 5.6 MB per 10,000-cell chunk (issue 18).
_PREDICT_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _members(model: SCMix | SCMixEnsemble) -> list[SCMix]:
    return list(model.members) if isinstance(model, SCMixEnsemble) else [model]


def _member_tables(tables) -> list:
    """Each member's `predictive_tables()`: an ensemble's list, or a single model's dictionary in a list."""
    return tables if isinstance(tables, list) else [tables]


def _predict_function(model: SCMix | SCMixEnsemble, tables):
    """The model's prediction from its members' first-layer products (a list of `[cells, kernel columns]`, each
    member's normalised minibatch times its `predictive_tables()["kernel"]`, computed in numpy by `_Minibatches`)
    and its `predictive_tables()`, traced once and compiled by XLA once per number of rows (`_padded_rows` keeps
    those few): XLA fuses the small operations after the product, which TensorFlow's graph runs one kernel each
    (docs/performance.md, "Prediction compiled by XLA")."""
    function = _PREDICT_FUNCTIONS.get(model)
    if function is None:
        import tensorflow as tf

        owner = weakref.ref(model)  # the function must not keep its model (the dictionary's key) alive
        table_specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), tables)
        product_specs = [tf.TensorSpec([None, t["kernel"].shape[1]], tf.float32) for t in _member_tables(tables)]

        @tf.function(input_signature=[product_specs, table_specs], jit_compile=True)
        def function(products, tables):
            traced = owner()
            assert traced is not None  # traced while its model is alive: the dictionary holds it only then
            if isinstance(traced, SCMixEnsemble):
                return traced.predict_from_product(tables, products)
            return traced.predict_from_product(tables, products[0])

        _PREDICT_FUNCTIONS[model] = function
    return function


# One traced `predictive_tables` per member model, kept like `_PREDICT_FUNCTIONS`.
_TABLE_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _predictive_tables(model: SCMix | SCMixEnsemble):
    """`model.predictive_tables()` (a dictionary, or an ensemble's list of its members'), each member's from its
    traced function (`_table_function`)."""
    tables = [_table_function(member)() for member in _members(model)]
    return tables if isinstance(model, SCMixEnsemble) else tables[0]


def _table_function(member: SCMix):
    """The member's `predictive_tables()`, traced once: the same stateless draws, taken in about 0.5 ms a call
    instead of the 4 to 9 ms of TensorFlow Probability's eager sampling, a fixed cost of every `predict` call
    (docs/performance.md, "Scratch memory reused, the posterior draws traced"). The function reads the model's
    variables when it runs: training or loading weights after a call changes its tables as it changes the model."""
    function = _TABLE_FUNCTIONS.get(member)
    if function is None:
        import tensorflow as tf

        owner = weakref.ref(member)  # as in `_predict_function`: the dictionary must not keep its key alive

        @tf.function(input_signature=[])
        def function():
            traced = owner()
            assert traced is not None
            return traced.predictive_tables()

        _TABLE_FUNCTIONS[member] = function
    return function


def _padded_rows(n_rows: int, batch_size: int) -> int:
    """The number of rows a minibatch of `n_rows` cells is predicted with: the next power of two from
    `MIN_PADDED_ROWS`, at most `batch_size` (the extra rows are zeros, their outputs dropped). XLA compiles the
    prediction once per shape: a handful of shapes serve every chunk and dataset size."""
    padded = MIN_PADDED_ROWS
    while padded < n_rows:
        padded *= 2
    return min(padded, batch_size)


def _aligned(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialised float32 array of `shape` whose data start on a 64-byte boundary, as TensorFlow's kernels
    require of memory they are handed without a copy (`_as_tensor`)."""
    size = shape[0] * shape[1] * 4
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + size].view(np.float32).reshape(shape)


def _as_tensor(array: np.ndarray):
    """The 64-byte aligned C-contiguous float32 `array` as a TensorFlow tensor that shares its memory (DLPack).
    `tf.constant` would copy it into memory that TensorFlow's allocator maps afresh for every large minibatch:
    about as long as computing it (docs/performance.md, "Prediction normalised in numpy")."""
    import tensorflow as tf

    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


@functools.cache
def _blas_controller():
    """threadpoolctl's controller of the process's BLAS libraries, made once: it lists the loaded libraries (about
    5 ms)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _one_blas_thread():
    """A context in which numpy's BLAS runs each product on the thread that calls it, as `predict`'s workers do
    (`_Minibatches`): `WORKERS` products on one thread each predicted about 10% more cells a second than products
    on BLAS's own threads, which competed with the workers and TensorFlow's for the cores (docs/performance.md, "The
    product in numpy"). threadpoolctl's limit holds for the process while the context is open."""
    return _blas_controller().limit(limits=1, user_api="blas")


# The key of `_Minibatches`' outputs that marks the cells without counts over the model's genes (not an output of
# `predict`: their confidence and novelty are NaN).
_EMPTY = "_empty"


def _without_counts(rows: sp.csr_matrix) -> np.ndarray:
    """Which rows of a CSR minibatch of counts hold no count `[n_rows]` (bool): no stored entry, or only zeros."""
    stored = np.diff(rows.indptr) > 0
    if rows.data.size and not rows.data.all():  # zeros stored as entries: sum them
        stored = np.asarray(rows.sum(axis=1)).ravel() > 0
    return ~stored


class _Minibatches:
    """Schedules the minibatches of chunks on a pool of threads, `batch_size` cells each, and gathers their outputs
    `keys`; tables, their kernels and factors (each member's `offset_factors()`) are taken once per `predict` call.

    Each minibatch is normalised for every member on its nonzeros (`log_normalised_values`) and multiplied by the
    member's kernel: as CSR by scipy where at most `SPARSE_PRODUCT_DENSITY` of its entries are nonzero (the cost
    follows the nonzeros), otherwise written dense (`log_normalised_dense`) and multiplied by numpy's BLAS on one
    thread per worker (`_one_blas_thread`). A minibatch holds at most `CellEncoder.DENSE_BATCH_LIMIT` entries: fewer
    cells per minibatch for very many genes. The traced function (`_predict_function`) computes the rest. The
    pool's threads each normalise and predict a minibatch (numpy and TensorFlow release the GIL; scipy's sparse
    product does not), so that one's normalisation overlaps another's product (docs/performance.md, "The product in
    numpy")."""

    def __init__(self, model, tables, factors, batch_size: int, keys, pool: concurrent.futures.Executor):
        from tfp_scmix.layers.cell import CellEncoder

        self.model, self.tables, self.factors, self.keys, self.pool = model, tables, factors, keys, pool
        self.function = _predict_function(model, tables)
        self.kernels = [np.ascontiguousarray(t["kernel"].numpy(), dtype=np.float32) for t in _member_tables(tables)]
        self.batch_size = max(1, min(batch_size, CellEncoder.DENSE_BATCH_LIMIT // model.n_genes))
        # Each thread writes its minibatches into its own buffers (the dense minibatch, reused for every member, and
        # one product per member), reused from one minibatch to the next: TensorFlow reads the products without a
        # copy, and is done with them when the outputs are read back.
        self.local = threading.local()

    def submit(self, chunk: _Chunk) -> list[concurrent.futures.Future]:
        """The futures of the outputs of the minibatches of `chunk`, in order."""
        normalisers = [
            (f, m.prediction_batches(chunk.batches)) for m, f in zip(_members(self.model), self.factors, strict=True)
        ]
        return [
            self.pool.submit(self._predicted, chunk, normalisers, start, min(start + self.batch_size, chunk.n_cells))
            for start in range(0, chunk.n_cells, self.batch_size)
        ]

    def _predicted(self, chunk: _Chunk, normalisers, start: int, stop: int) -> dict[str, np.ndarray]:
        if not hasattr(self.local, "products"):
            self.local.dense = None  # made on the first dense minibatch
            self.local.workspace = Workspace()  # the checks' and the normalisation's temporaries
            self.local.products = [_aligned((self.batch_size, k.shape[1])) for k in self.kernels]
        rows = chunk.rows(start, stop, self.local.workspace)
        n, padded = stop - start, _padded_rows(stop - start, self.batch_size)
        sparse = rows.nnz <= SPARSE_PRODUCT_DENSITY * n * self.model.n_genes
        products = []
        for (f, b), kernel, product in zip(normalisers, self.kernels, self.local.products, strict=True):
            if sparse:
                values = log_normalised_values(rows, f, b[start:stop], self.local.workspace)
                product[:n] = csr_on(values, rows.indices, rows.indptr, rows.shape) @ kernel
            else:
                if self.local.dense is None:
                    self.local.dense = np.empty((self.batch_size, self.model.n_genes), np.float32)
                dense = self.local.dense[:n]
                log_normalised_dense(rows, f, b[start:stop], out=dense, workspace=self.local.workspace)
                np.matmul(dense, kernel, out=product[:n])
            product[n:padded] = 0  # the padding: cells without counts, predicted and dropped
            products.append(_as_tensor(product[:padded]))
        out = self.function(products, self.tables)
        result = {key: out[key].numpy()[:n] for key in self.keys if key in out}
        if "library_size" in self.keys:
            result["library_size"] = np.asarray(rows.sum(axis=1), dtype=np.float32).ravel()
        result[_EMPTY] = _without_counts(rows)
        if "confidence" in result:
            result["confidence"][result[_EMPTY]] = np.nan
        return result

    @staticmethod
    def gather(futures: list[concurrent.futures.Future]) -> dict[str, np.ndarray]:
        """The outputs of a chunk's minibatches (`submit`), concatenated in the cells' order."""
        parts = [future.result() for future in futures]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def model_counts(
    source,
    model: SCMix | SCMixEnsemble,
    counts: str | None = None,
    min_gene_fraction: float = 0.5,
    batch_key: str | None = None,
) -> SCData:
    """Every cell of `source` (what `predict` accepts) as a validated `SCData` over the model's genes, in
    their order, read as `predict` reads it (the same slot, a backed file's rows through h5py, no copy of an
    AnnData's counts), with the batches of obs[batch_key] (`predict`'s; without it every cell is of a dataset
    the model was not trained on, `NEW_BATCH`). The whole matrix enters memory: for a source that does not fit,
    `predict` in chunks. Raises DataError and ValueError as `predict` does."""
    n_cells, opened, slot, select = _open(source, model, counts, min_gene_fraction)
    try:
        batches, batch_names = _obs_batches(opened, batch_key, n_cells)
        if isinstance(opened, SCData):  # checked, and over the model's genes since `_open`
            return opened
        chunk = _read(opened, model, 0, n_cells, slot, min_gene_fraction, select)
        obs_names = opened.obs_names if hasattr(opened, "obs_names") else np.arange(n_cells).astype(str)
        return SCData(
            chunk.rows(0, n_cells),
            np.asarray(model.genes, dtype=str),
            np.full(n_cells, UNLABELLED, np.int32),
            list(model.class_names),
            batches,
            batch_names,
            np.asarray(obs_names, dtype=str),
        )
    finally:
        if isinstance(opened, _H5ADFile):
            opened.close()


def _warn_new_batches(model, batch_names: list[str], batches: np.ndarray, rows: np.ndarray, batch_key: str) -> None:
    """A warning naming the batches of obs[batch_key] that the model was not trained on (their cells are read through
    the centre of the trained batches' offsets): a misspelt or renamed batch would otherwise pass unnoticed."""
    new = rows == NEW_BATCH
    member = _members(model)[0]
    trained = member.batch_names
    if member.adapted_batch is not None:  # `adapt`'s model reads every cell through the query's own offsets
        logger.warning(
            "the model is adapted to one dataset (scm.adapt): batch_key=%r changes nothing, every cell is read "
            "through that dataset's offsets; predict with the model before adapting to read obs[%r]'s batches",
            batch_key,
            batch_key,
        )
        return
    if trained is not None and len(trained) == 1:  # one row of offsets, which is also the centre
        logger.warning(
            "the model was trained on one batch (%s): batch_key=%r changes nothing, every cell is read through its "
            "one row of offsets",
            "no batch_key" if trained == ["0"] else repr(trained[0]),
            batch_key,
        )
        return
    if new.any() and trained is not None:
        names = sorted({batch_names[b] for b in np.unique(batches[new])})
        logger.warning(
            "%d cells of obs[%r] batches %s that the model was not trained on (its batches: %s) are read through the "
            "centre of the trained batches' offsets",
            int(new.sum()),
            batch_key,
            names[:5],
            trained[:5],
        )


def _obs_batches(source, batch_key: str | None, n_cells: int) -> tuple[np.ndarray, list[str]]:
    """(batch ids int32 `[n_cells]`, batch names) of an opened source's obs[batch_key] (`encode_obs`); without
    `batch_key`, every cell `NEW_BATCH`. Raises DataError for a missing column or a cell without a batch, and
    ValueError for `batch_key` with an `SCData` (its batches are its own) or a matrix (no obs)."""
    if batch_key is None:
        return np.full(n_cells, NEW_BATCH, np.int32), ["0"]
    if isinstance(source, _H5ADFile):
        columns, column = frame_columns(source.file["obs"])
        where = f"the file {source.file.filename}"
    elif hasattr(source, "obs_names") and not isinstance(source, SCData):
        columns, column, where = list(source.obs.columns), lambda key: source.obs[key].to_numpy(), "the AnnData"
    else:
        raise ValueError(
            "batch_key names an obs column of an AnnData or .h5ad file; an SCData carries its own batches "
            "(from_anndata(..., batch_key=...)) and a count matrix has none: leave batch_key out."
        )
    _, _, batches, batch_names = encode_obs(columns, column, n_cells, None, batch_key, where=where)
    return batches, batch_names


# A call shows its progress bar only once it has run this long (seconds): most calls end before, quietly.
PROGRESS_DELAY = 5.0


def progress_bar(n_cells: int, desc: str, disable: bool = False):
    """A tqdm bar over `n_cells` cells for long work (`predict`'s chunks, `annotate`'s pooled call): drawn only after
    `PROGRESS_DELAY` seconds and only on a terminal or in a notebook (tqdm's `disable=None`), so that short calls,
    logs and tests stay quiet; never with `disable` (a call inside another's bar). Call `update(cells)` and
    `close()`."""
    from tqdm.auto import tqdm

    return tqdm(
        total=n_cells, desc=desc, unit="cell", unit_scale=True, delay=PROGRESS_DELAY, disable=True if disable else None
    )


def predict(
    model: SCMix | SCMixEnsemble,
    source,
    *,
    counts: str | None = None,
    chunk_size: int = 10_000,
    batch_size: int = 1024,
    min_gene_fraction: float = 0.5,
    keys=None,
    batch_key: str | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Model outputs for any number of cells, read and predicted `chunk_size` cells at a time.

    source: an AnnData (genes aligned by name; a backed one is read chunk by chunk from disk), an .h5ad
    path (read chunk by chunk; an uncompressed file through a memory map, `_FileMap`), the path of another format
    `tfp_scmix.read` reads (a 10x folder or .h5, a .loom: read into memory), an `SCData`, a pandas
    DataFrame of counts with cells as rows and genes as named columns (`adata.to_df()`; aligned by name), or a
    scipy sparse / numpy matrix `[n_cells, n_genes]` in the model's gene order. Each minibatch is checked like
    `from_anndata` input, on the thread that predicts it. Memory is bounded by three chunks plus the outputs:
    {"probs" [n_cells, n_classes], "label" [n_cells] (int32 indices into `model.class_names`), "confidence"
    [n_cells], "cell_topic" [n_cells, n_topics]}, and "novelty" [n_cells] (the `TopicNovelty` score in [0, 1]) when
    the model carries a detector (`tfp_scmix.train` fits one); `keys` keeps only some of them; "library_size"
    [n_cells], each cell's total counts over the model's genes, is there on request. Cells without counts over
    the model's genes are predicted from no evidence: their "probs" and "label" are the model's call of an empty
    cell, their "confidence" and "novelty" NaN (warned); `annotate` marks them unassigned. With `counts=None` the
    slot of an AnnData's raw counts is detected once, on its first cells (`counts_slot`), and read for every
    chunk. Peak memory: three chunks and the outputs (experiments/reliability/memory_1m.py,
    results_memory_1m.json). progress: a tqdm bar over the cells, drawn once a call has run `PROGRESS_DELAY`
    seconds, on a terminal or in a notebook only (`progress_bar`); False for none.
    Batches: the model divides each cell's batch's gene-wise offsets out (`SCMix.batch_rows`). An `SCData`'s
    batches are matched to the model's by name; an AnnData's or a file's by the names in obs[batch_key], the column
    the model was trained with (as `from_anndata(..., batch_key=)`). Cells of a batch the model was not trained on
    (a warning names those of obs[batch_key]), and every cell without `batch_key` or of a matrix, are read through
    the centre of the trained batches' offsets (`SCMix.prediction_offsets`: for a model of one batch, that batch's).
    Raises DataError for an unreadable or damaged file, a damaged sparse matrix, a DataFrame column that is not
    numbers, counts that are not raw counts, too few
    of the model's genes, a matrix of the wrong width, no cells, a `batch_key` that is not an obs column or a
    cell without a batch there; ValueError for a `chunk_size`, `batch_size` or `min_gene_fraction` out of range,
    an unknown key, or `batch_key` with an `SCData` or a matrix; NotTrainedError (a ValueError) for a model that
    has not been trained; TypeError for a `source` of another kind (an `H5ADStream`: pass its path) or a `model`
    that is not one.
    """
    trained(model, "predict")
    check_argument("chunk_size", chunk_size, 1, integer=True)
    check_argument("batch_size", batch_size, 1, integer=True)
    check_argument("min_gene_fraction", min_gene_fraction, 0, 1)
    novelty = getattr(model, "novelty", None)
    keys = tuple(keys or (OUTPUT_KEYS if novelty is None else (*OUTPUT_KEYS, "novelty")))
    known = [*OUTPUT_KEYS, "library_size", *(["novelty"] if novelty is not None else [])]
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise ValueError(f"keys {unknown} are not outputs of predict for this model; outputs are {known}")
    # The model's own outputs to compute: those asked for, and the topics when the novelty score needs them.
    model_keys = tuple(k for k in OUTPUT_KEYS if k in keys or (k == "cell_topic" and "novelty" in keys))
    model_keys += ("library_size",) if "library_size" in keys else ()
    n_cells, source, counts, select = _open(source, model, counts, min_gene_fraction)
    cell_rows = None  # with batch_key: each cell's row of the model's offsets, for every chunk
    if batch_key is not None:
        try:
            batches, batch_names = _obs_batches(source, batch_key, n_cells)
        except BaseException:
            if isinstance(source, _H5ADFile):
                source.close()
            raise
        cell_rows = _members(model)[0].batch_rows(batch_names, batches)
        _warn_new_batches(model, batch_names, batches, cell_rows, batch_key)
    outputs: dict[str, np.ndarray] = {}
    once = OncePerMessage()  # the same gene-coverage warning for every chunk: once
    logger.addFilter(once)
    chunk_size = int(chunk_size)
    bounds = _chunk_bounds(n_cells, chunk_size, WORKERS * int(batch_size))

    memory = _Buffers()  # chunks read from a file reuse the memory of those gathered (`_Buffers`)
    empty = [0]  # cells without counts over the model's genes, counted as the chunks are gathered
    bar = progress_bar(n_cells, "predict", disable=not progress)

    def read(start, stop):
        chunk = _read(source, model, start, stop, counts, min_gene_fraction, select, memory.lease())
        if cell_rows is not None:
            chunk.batches = cell_rows[start:stop]
        return chunk

    def finish(start, stop, futures, chunk):
        out = _Minibatches.gather(futures)
        if chunk.lease is not None:  # every minibatch of the chunk is predicted: its memory is free
            chunk.lease.release()
        if novelty is not None and "novelty" in keys:
            out["novelty"] = novelty.score(out["cell_topic"])
            out["novelty"][out[_EMPTY]] = np.nan  # no counts, no topics to be novel in
        empty[0] += int(out[_EMPTY].sum())
        for key in keys:
            if key not in outputs:  # filled in place: no second copy of the outputs
                outputs[key] = np.empty((n_cells,) + out[key].shape[1:], out[key].dtype)
            outputs[key][start:stop] = out[key]
        bar.update(stop - start)

    # A pipeline of three stages on threads: the next chunk is read (reading from disk waits) while the minibatches
    # of this chunk are checked and predicted by the workers and the outputs of the previous chunk are gathered, so
    # that no core waits at a chunk's end. At most three chunks in memory.
    reader = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    workers = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS)
    blas = _one_blas_thread()
    try:
        pending = reader.submit(read, *bounds[0])
        tables = _predictive_tables(model)  # the posterior draws, once per call
        factors = [m.offset_factors() for m in _members(model)]  # and each member's batch factors
        minibatches = _Minibatches(model, tables, factors, int(batch_size), model_keys, workers)
        in_flight = None
        for i, (start, stop) in enumerate(bounds):
            chunk = pending.result()
            if i + 1 < len(bounds):
                pending = reader.submit(read, *bounds[i + 1])
            queued = (start, stop, minibatches.submit(chunk), chunk)
            if in_flight is not None:
                finish(*in_flight)
            in_flight = queued
        assert in_flight is not None  # there is at least one chunk: n_cells > 0
        finish(*in_flight)
    finally:
        reader.shutdown(cancel_futures=True)
        workers.shutdown(cancel_futures=True)
        blas.restore_original_limits()
        bar.close()
        logger.removeFilter(once)
        if isinstance(source, _H5ADFile):  # after the reader has stopped
            source.close()
    if empty[0]:
        logger.warning(
            "%s no counts over the model's genes: called from no evidence (the model's call of an empty cell), "
            "with confidence%s NaN; annotate marks such cells %r",
            "1 cell has" if empty[0] == 1 else f"{empty[0]:,} cells have",
            " and novelty" if "novelty" in keys else "",
            UNASSIGNED,
        )
    return outputs
