"""training/data.py: the few-shot split of a run configuration's data, and the data's identity."""

from importlib import resources

import numpy as np

from tfp_scmix import datasets, from_anndata
from tfp_scmix.evaluate import few_shot_split
from training import data as run_data


def test_splits_follow_the_few_shot_protocol(splits, small_config):
    full = from_anndata(datasets.pbmc68k_reduced())
    test, budget = few_shot_split(full.n_cells, 200, 150, 0)
    # main setting: all 700 cells are trained on; only the 120 training labels remain
    assert splits.train.n_cells == 700 and splits.train.n_labelled == 120
    kept = splits.train.labels >= 0
    assert set(splits.train.obs_names[kept]) == set(full.obs_names[budget[30:]])
    assert np.array_equal(splits.train.labels[kept], full.labels[np.isin(full.obs_names, splits.train.obs_names[kept])])
    assert list(splits.validation.obs_names) == list(full.obs_names[budget[:30]])
    assert list(splits.test.obs_names) == list(full.obs_names[test])
    assert (splits.test.labels >= 0).all() and (splits.validation.labels >= 0).all()
    with resources.as_file(resources.files(datasets) / datasets.EMBEDDED) as path:
        assert splits.identity["data.sha256"] == run_data.file_sha256(path)
    assert (splits.identity["data.n_cells"], splits.identity["data.n_genes"], splits.identity["data.n_classes"]) == (
        700,
        765,
        10,
    )

    inductive = run_data.load(small_config("data.setting='inductive'").data)
    assert inductive.train.n_cells == 700 - 230
    assert not set(inductive.train.obs_names) & set(full.obs_names[np.concatenate([test, budget[:30]])])
