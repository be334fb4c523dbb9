"""Datasets: the embedded pbmc68k_reduced counts (see SOURCE.md) and the real-data locator."""

from importlib import resources

from tfp_scmix.data import read_h5ad

EMBEDDED = "pbmc68k_reduced.h5ad"


def pbmc68k_reduced():
    """The embedded 700-cell x 765-gene PBMC dataset with 10 labelled types in `obs["cell_type"]`."""
    with resources.as_file(resources.files(__name__) / EMBEDDED) as path:
        return read_h5ad(path)
