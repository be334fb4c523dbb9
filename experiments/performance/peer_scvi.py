"""scVI peer of the performance benchmark; runs in its own environment (experiments/.venv-scvi).

    .venv-scvi/bin/python peer_scvi.py '{"path": "...h5ad", "n_latent": 20, "batch_size": 128, ...}'

Trains scvi-tools' SCVI (CPU PyTorch, default architecture: one 128-unit layer) on the counts in X and
prints one JSON line: training cell-passes per second (epochs after the first, so start-up is excluded),
encoding (latent representation) cells per second, and the peak resident memory of this process.
Imports nothing from tfp_scmix.
"""

import json
import sys
import time


def peak_rss_mb():
    """Peak resident memory of this process in MB (VmHWM restarts at exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main(config):
    import anndata
    import lightning.pytorch as pl
    import scvi
    import torch

    scvi.settings.seed = 0
    torch.set_num_threads(config.get("threads", torch.get_num_threads()))
    adata = anndata.read_h5ad(config["path"])
    if config.get("max_cells") and adata.n_obs > config["max_cells"]:
        adata = adata[: config["max_cells"]].copy()
    adata.obs = adata.obs[[]]
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, n_latent=config["n_latent"])

    class EpochTimer(pl.Callback):
        def __init__(self):
            self.times, self.cpu = [], []

        def on_train_epoch_start(self, trainer, module):
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer, module):
            self.times.append(time.perf_counter() - self.start)
            self.cpu.append(time.process_time() - self.start_cpu)

    timer = EpochTimer()
    model.train(
        max_epochs=config["epochs"],
        batch_size=config["batch_size"],
        accelerator="cpu",
        devices=1,
        train_size=1.0,
        early_stopping=False,
        enable_progress_bar=False,
        callbacks=[timer],
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    timed = timer.times[1:] or timer.times
    timed_cpu = timer.cpu[1:] or timer.cpu
    train_rate = adata.n_obs * len(timed) / sum(timed)
    model.get_latent_representation(adata[:1000], batch_size=config["predict_batch_size"])  # warm-up
    rates = []
    for _ in range(config["predict_repeats"]):  # the best of these calls, as run.py times ours (PREDICT_REPEATS)
        start, cpu = time.perf_counter(), time.process_time()
        model.get_latent_representation(batch_size=config["predict_batch_size"])
        rates.append((adata.n_obs / (time.perf_counter() - start), adata.n_obs / (time.process_time() - cpu)))
    predict_rate, predict_cpu_rate = max(r[0] for r in rates), max(r[1] for r in rates)
    print(
        json.dumps(
            {
                "train_cells_per_s": train_rate,
                "predict_cells_per_s": predict_rate,
                "train_cells_per_cpu_s": adata.n_obs * len(timed_cpu) / sum(timed_cpu),
                "predict_cells_per_cpu_s": predict_cpu_rate,
                "n_cells": adata.n_obs,
                "timed_epochs": len(timed),
                "epoch_seconds": timed,
                "peak_rss_mb": peak_rss_mb(),
                "version": scvi.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
