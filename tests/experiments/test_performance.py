"""Smoke test of experiments/performance/run.py: the benchmark's data files."""

import anndata
import numpy as np
import pytest
import scipy.sparse as sp


def test_benchmark_writes_readable_h5ad_in_chunks(tmp_path, synthetic_file):
    from experiments.performance.run import file_stats, gene_panel, write_h5ad

    data, _ = synthetic_file
    condition = np.where(np.arange(data.n_cells) % 2, "ctrl", "stim")
    panel, genes = gene_panel(data.counts, data.genes, 150)  # 120 real genes + 30 resampled columns
    assert panel.shape == (700, 150) and list(genes[:120]) == list(data.genes)
    chunks = [(panel[i : i + 256], condition[i : i + 256]) for i in range(0, 700, 256)]
    path = write_h5ad(tmp_path / "panel.h5ad", iter(chunks), 700, genes)
    adata = anndata.read_h5ad(path)
    assert abs(sp.csr_matrix(adata.X) - panel).sum() == 0 and list(adata.var_names) == list(genes)
    assert 0 < adata.obs["cell_type"].notna().sum() < 100
    cells, n_genes, density, _ = file_stats(path)
    assert (cells, n_genes) == (700, 150) and density == pytest.approx(panel.nnz / (700 * 150))
    top, _ = gene_panel(data.counts, data.genes, 40)
    assert top.sum() >= np.sort(np.asarray(data.counts.sum(axis=0)).ravel())[-40:].sum() - 1e-3


def test_the_selected_panel_is_the_packages_gene_selection(synthetic_file):
    from experiments.performance.run import selected_panel
    from tfp_scmix.data import highly_variable_genes

    data, _ = synthetic_file
    panel, genes = selected_panel(data.counts, data.genes, 50)
    assert panel.shape == (data.n_cells, 50)
    assert sorted(genes) == sorted(highly_variable_genes(data.counts, data.genes, 50))
    columns = [list(data.genes).index(g) for g in genes]
    assert abs(panel - data.counts[:, columns]).sum() == 0
