"""CellTypist and scANVI peers of the few-shot suite; each runs in its own environment (experiments/.venv-<name>).

    experiments/.venv-celltypist/bin/python peer_env.py celltypist split.h5ad
    experiments/.venv-celltypist/bin/python peer_env.py celltypist_majority_voting split.h5ad
    experiments/.venv-scvi/bin/python peer_env.py scanvi split.h5ad
    experiments/.venv-scvi/bin/python peer_env.py scanvi_scarches split.h5ad

split.h5ad (written by run.py): raw counts in X over the suite's genes, the cells the setting may see plus
the test cells; obs["label"] the known labels, "Unknown" elsewhere; obs["is_test"]; obs["batch"] when the
dataset has batches; uns["seed"]. Prints one JSON line: the predicted labels of the test cells, in order.
Each peer is run the way its own documentation recommends for this task:
- CellTypist 1.7.1: `celltypist.train` on the labelled cells' log1p(counts per 10k) (all genes of the
  split, no extra feature selection, as its docs advise for small custom models), `celltypist.annotate`
  of the test cells: best match ("celltypist") or with `majority_voting=True` over its default
  over-clustering ("celltypist_majority_voting"), the option its tutorials use.
- scANVI (scvi-tools 1.4.2): `SCVI` on every visible cell's counts (batch_key when the data has batches),
  then `SCANVI.from_scvi_model(..., unlabeled_category="Unknown")`, both with the library's default epochs,
  `predict` on the test cells (the scvi-tools tutorial's route).
- scANVI with scArches query mapping ("scanvi_scarches", the cross-dataset matrix: the test cells are another
  dataset): scvi-tools' reference-mapping tutorial, step by step. `SCVI` on the reference cells only (the
  non-test cells, batch_key "batch") with the architecture that tutorial recommends for scArches
  (`use_layer_norm="both", use_batch_norm="none", encode_covariates=True, dropout_rate=0.2, n_layers=2`) and the
  library's default epochs, `SCANVI.from_scvi_model` trained for 20 epochs with `n_samples_per_label=100`; then
  `SCANVI.prepare_query_anndata` and `SCANVI.load_query_data` of the test cells (their own batch, every label
  "Unknown"), trained 100 epochs with `weight_decay=0.0`, and `predict`.
Imports nothing from tfp_scmix.
"""

import json
import sys


def celltypist_peer(adata, majority_voting=False):
    import celltypist
    import numpy as np
    import scanpy as sc

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    known = (adata.obs["label"] != "Unknown").to_numpy()
    model = celltypist.train(adata[known], labels="label", feature_selection=False, n_jobs=1)
    test = adata[adata.obs["is_test"].to_numpy()].copy()
    predicted = celltypist.annotate(test, model=model, majority_voting=majority_voting).predicted_labels
    return np.asarray(predicted["majority_voting" if majority_voting else "predicted_labels"]).tolist()


def scanvi_peer(adata):
    import scvi

    scvi.settings.seed = int(adata.uns["seed"])
    batch_key = "batch" if "batch" in adata.obs else None
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key, labels_key="label")
    vae = scvi.model.SCVI(adata)
    vae.train(accelerator="cpu", enable_progress_bar=False)
    scanvi = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown", labels_key="label")
    scanvi.train(accelerator="cpu", enable_progress_bar=False)
    predicted = scanvi.predict(adata[adata.obs["is_test"].to_numpy()])
    return [str(p) for p in predicted]


def scanvi_scarches_peer(adata):
    import scvi

    scvi.settings.seed = int(adata.uns["seed"])
    is_query = adata.obs["is_test"].to_numpy()
    reference, query = adata[~is_query].copy(), adata[is_query].copy()
    scvi.model.SCVI.setup_anndata(reference, batch_key="batch", labels_key="label")
    architecture = dict(use_layer_norm="both", use_batch_norm="none", encode_covariates=True, dropout_rate=0.2)
    vae = scvi.model.SCVI(reference, n_layers=2, **architecture)
    vae.train(accelerator="cpu", enable_progress_bar=False)
    scanvi = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    scanvi.train(max_epochs=20, n_samples_per_label=100, accelerator="cpu", enable_progress_bar=False)
    query.obs["label"] = "Unknown"
    scvi.model.SCANVI.prepare_query_anndata(query, scanvi)
    mapped = scvi.model.SCANVI.load_query_data(query, scanvi, accelerator="cpu")
    mapped.train(
        max_epochs=100,
        plan_kwargs=dict(weight_decay=0.0),
        check_val_every_n_epoch=10,
        accelerator="cpu",
        enable_progress_bar=False,
    )
    return [str(p) for p in mapped.predict()]


def main(peer, path):
    import anndata

    adata = anndata.read_h5ad(path)
    peers = {
        "celltypist": celltypist_peer,
        "celltypist_majority_voting": lambda a: celltypist_peer(a, majority_voting=True),
        "scanvi": scanvi_peer,
        "scanvi_scarches": scanvi_scarches_peer,
    }
    predicted = peers[peer](adata)
    print(json.dumps(predicted))


if __name__ == "__main__":
    main(*sys.argv[1:3])
