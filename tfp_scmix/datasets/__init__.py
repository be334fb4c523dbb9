"""Datasets: the embedded pbmc68k_reduced counts (see SOURCE.md).

Real datasets are located by `tfp_scmix.data.data_path` (a path, or a name under $TFP_SCMIX_DATA).
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from tfp_scmix.data import read_h5ad

if TYPE_CHECKING:
    import anndata

EMBEDDED = "pbmc68k_reduced.h5ad"


def pbmc68k_reduced() -> anndata.AnnData:
    """The embedded 700-cell x 765-gene PBMC dataset with 10 labelled types in `obs["cell_type"]`.

    Raw integer UMI counts (CSR) in X, `[700, 765]`; origin and licence in tfp_scmix/datasets/SOURCE.md.
    Raises DataError if the packaged file is damaged (`tfp_scmix.data.read_h5ad`).
    """
    with resources.as_file(resources.files(__name__) / EMBEDDED) as path:
        return read_h5ad(path)
