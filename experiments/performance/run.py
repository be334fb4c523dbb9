"""Performance benchmark: training and prediction throughput and peak memory, tfp_scmix against its peers.

    ./run experiments.performance.run             # the full grid, 15 to 25 minutes on 2 cores
    ./run experiments.performance.run --quick     # tiny sizes in a minute or two (tests/test_performance.py)

Data. The Kang et al. 2018 files (kang_ctrl.h5ad + kang_stim.h5ad: 13,999 cells x 14,053 genes, raw UMI
counts) are the real reference. Genes are ranked by mean count: the top 2,000 hold 25% nonzero entries,
the density the issue's targets were set at (the package's dispersion-based `highly_variable_genes`
picks sparser genes, 2.7% nonzero, which would flatter sparse code). Larger sizes are drawn from the
real cells: 100k and 1M cells are cells resampled with replacement (same sparsity and library sizes);
20,000 genes are the 14,053 real genes plus 5,947 real low-expression gene columns resampled over
shuffled cells. Labels (needed by the model's classifier): the condition (ctrl / stim) of 2% of cells.

Measures. Training throughput is cell-passes per second over whole minibatches after warm-up steps
(tracing and the first batches excluded), input pipeline included; it is measured for a time budget of
steps rather than a full epoch where an epoch would be long (throughput is per cell-pass, so this does
not change it). Peak memory is the peak resident set of the process that trained (each measurement
runs in its own process), with the memory after imports as the baseline. Prediction throughput is cells
per second over the whole Kang data after a warm-up call, the best of five calls (`PREDICT_REPEATS`; scVI's
encoding alike). Peers on the same files, in the same run:
scikit-learn's LatentDirichletAllocation (online variational Bayes, one pass, its default minibatch of
128, same number of topics; `transform` for prediction) and scVI (scvi-tools 1.4.2, CPU PyTorch, in
its own environment .venv-scvi, latent dimension = number of topics, `get_latent_representation`
for prediction).

Writes results.md and results.json beside this file (atomically); generated .h5ad files go to runs/.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import PEER_ENVS, ensure_venv, peak_rss_mb, read_dataset, rss_mb, write_json, write_text
from tfp_scmix.config import Config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = HERE / "runs"
SCVI_ENV = PEER_ENVS / ".venv-scvi"
SCVI_PACKAGES = (["torch==2.13.0"], ["scvi-tools==1.4.2"])
LABELLED_FRACTION = 0.02


def cpu_s():
    """CPU seconds of this process and of its live descendants (e.g. joblib's worker processes), all threads."""
    own = time.process_time()
    children, tick = {}, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, frontier = own, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, used) in children.items():
            if ppid == parent:
                total += used
                frontier.append(pid)
    return total


# -- data --------------------------------------------------------------------------------------
def reference():
    """(CSR float32 [13,999, 14,053] raw counts, gene names, condition per cell) of the Kang files."""
    import anndata
    import scipy.sparse as sp

    from tfp_scmix.data import extract_counts

    parts = [read_dataset(f"kang_{c}") for c in ("ctrl", "stim")]
    adata = anndata.concat(parts, join="inner")
    counts, genes = extract_counts(adata, "X")
    return sp.csr_matrix(counts), np.asarray(genes), np.asarray(adata.obs["condition"].astype(str))


def gene_panel(counts, genes, n_genes, seed=0):
    """The `n_genes` genes with the highest mean count; past the real genes, resampled real columns."""
    import scipy.sparse as sp

    order = np.argsort(-np.asarray(counts.mean(axis=0)).ravel(), kind="stable")
    if n_genes <= len(genes):
        keep = np.sort(order[:n_genes])
        return counts[:, keep].tocsr(), genes[keep]
    rng = np.random.default_rng(seed)
    extra = n_genes - len(genes)
    low = order[len(order) // 2 :]  # extra genes are drawn from the low-expression half, as added genes would be
    columns = counts.tocsc()[:, rng.choice(low, extra)]
    shuffled = columns.tocsr()[rng.permutation(counts.shape[0])]
    names = np.concatenate([genes, [f"resampled_gene{i}" for i in range(extra)]])
    return sp.hstack([counts, shuffled], format="csr"), names


def selected_panel(counts, genes, n_genes):
    """The `n_genes` genes that `tfp_scmix.data.highly_variable_genes` selects (counts only, every cell): the
    package's own gene selection, sparser than the highest-mean genes of `gene_panel`."""
    from tfp_scmix.data import highly_variable_genes

    keep = np.flatnonzero(np.isin(genes, highly_variable_genes(counts, genes, n_genes)))
    return counts[:, keep].tocsr(), genes[keep]


def labels_for(condition, rng):
    """Condition as a label for LABELLED_FRACTION of the cells, unknown (NaN) elsewhere."""
    import pandas as pd

    hidden = rng.random(len(condition)) >= LABELLED_FRACTION
    return pd.Categorical(np.where(hidden, None, condition), categories=["ctrl", "stim"])


def write_h5ad(path, chunks, n_cells, genes):
    """Write an .h5ad (CSR X, obs["cell_type"], var names) from an iterator of (CSR, condition) chunks.

    Chunked, so a 1M-cell file never sits in memory; the file appears whole at `path` or not at all.
    """
    import anndata.io
    import h5py
    import pandas as pd

    from tfp_scmix.io import atomic_path

    rng = np.random.default_rng(1)
    conditions = []
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        x = f.create_group("X")
        x.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array([n_cells, len(genes)])}
        )
        data = x.create_dataset("data", (0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        indices = x.create_dataset("indices", (0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr = x.create_dataset("indptr", (n_cells + 1,), dtype=np.int64)
        row, nnz = 0, 0
        indptr[0] = 0
        for chunk, condition in chunks:
            n = chunk.nnz
            data.resize((nnz + n,))
            indices.resize((nnz + n,))
            data[nnz:] = chunk.data
            indices[nnz:] = chunk.indices
            indptr[row + 1 : row + 1 + chunk.shape[0]] = chunk.indptr[1:] + nnz
            row, nnz = row + chunk.shape[0], nnz + n
            conditions.append(condition)
        if row != n_cells:
            raise RuntimeError(f"wrote {row} cells, expected {n_cells}")
        condition = np.concatenate(conditions)
        obs = pd.DataFrame(
            {"cell_type": labels_for(condition, rng), "condition": condition},
            index=[f"cell{i}" for i in range(n_cells)],
        )
        anndata.io.write_elem(f, "obs", obs)
        anndata.io.write_elem(f, "var", pd.DataFrame(index=np.asarray(genes, dtype=str)))
    return path


def prepare_data(sizes, quick):
    """Write the benchmark's .h5ad files (cached in runs/); returns {name: (path, n_cells, n_genes, density)}."""
    counts, genes, condition = reference()
    if quick:
        keep = np.sort(np.random.default_rng(0).permutation(counts.shape[0])[:2000])
        counts, condition = counts[keep], condition[keep]
    out = RUNS / ("data-quick" if quick else "data")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, n_cells, n_genes in sizes:
        path = out / f"{name}.h5ad"
        if not path.exists():
            panel, names = (selected_panel if name.endswith(SELECTED) else gene_panel)(counts, genes, n_genes)
            if n_cells == panel.shape[0]:
                chunks = [(panel, condition)]
            else:
                rng = np.random.default_rng(2)

                def resample(panel=panel, rng=rng, n_cells=n_cells, step=50_000):
                    for start in range(0, n_cells, step):
                        rows = rng.integers(0, panel.shape[0], min(step, n_cells - start))
                        yield panel[rows], condition[rows]

                chunks = resample()
            print(f"writing {path.name}: {n_cells} cells x {n_genes} genes", flush=True)
            write_h5ad(path, chunks, n_cells, names)
        files[name] = str(path)
    return files


def file_stats(path):
    """(cells, genes, nonzero fraction, median library size) of an .h5ad written by write_h5ad."""
    import h5py

    with h5py.File(path, "r") as f:
        n_cells, n_genes = (int(s) for s in f["X"].attrs["shape"])
        nnz = f["X"]["data"].shape[0]
        sample = min(n_cells, 20_000)
        pointers = f["X"]["indptr"][: sample + 1]
        library = np.add.reduceat(f["X"]["data"][: pointers[-1]], pointers[:-1]) if sample else np.zeros(0)
    return n_cells, n_genes, nnz / (n_cells * n_genes), float(np.median(library))


# -- children: one measurement each, in its own process --------------------------------------
class StepTimer:
    """Keras callback: times whole training steps after `warmup` steps and stops after `budget_s` seconds."""

    def __new__(cls, warmup, budget_s):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times, self.cpu = [], []

            def on_train_batch_end(self, batch, logs=None):
                if batch + 1 >= warmup:
                    self.times.append(time.perf_counter())
                    self.cpu.append(time.process_time())
                    if self.times[-1] - self.times[0] > budget_s:
                        self.model.stop_training = True

        return _Timer()


def use_threads(threads):
    """TensorFlow's thread pools sized to `threads` (before any op runs)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


# Suffix of the data set over the package's own gene selection (`selected_panel`) instead of the highest-mean genes.
SELECTED = "hvg"
# The package's default minibatch size: the target row "training at the package default".
DEFAULT_BATCH = Config().batch_size
# Prediction rates are the best of this many calls on the same cells (ours and scVI's encoding alike): a call on
# the Kang cells lasts a tenth of a second, and this machine's rates move by a third from one call to the next.
PREDICT_REPEATS = 5


def child_ours(cfg):
    """Training steps of an SCMix timed by `StepTimer` (and prediction through `tfp_scmix.predict`).

    Times `model.fit` steps, not a training recipe: the model is built and compiled as `tfp_scmix.train`
    does (`SCMix.from_data`, Adam(config.learning_rate)), optionally with XLA (`jit`)."""
    import keras

    import tfp_scmix as scm
    from tfp_scmix.stream import H5ADStream

    use_threads(cfg["threads"])
    baseline = rss_mb()
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    config = scm.Config(n_topics=cfg["n_topics"], batch_size=cfg["batch_size"])
    if cfg["mode"] == "memory":
        data = scm.from_anndata(cfg["path"])
        model = scm.SCMix.from_data(data, config, seed=0)
        dataset = data.dataset(cfg["batch_size"], seed=0, repeat=True)
    else:
        stream = H5ADStream(cfg["path"])
        model = scm.SCMix.from_data(stream, config, seed=0)
        dataset = stream.dataset(cfg["batch_size"], seed=0, repeat=True)
    load_s = time.perf_counter() - start
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=cfg.get("jit", False))
    timer = StepTimer(cfg["warmup"], cfg["budget_s"])
    result = {"load_s": load_s, "baseline_rss_mb": baseline, "jit_effective": bool(model.jit_compile)}
    try:
        model.fit(dataset, epochs=1, steps_per_epoch=cfg["max_steps"], verbose=0, callbacks=[timer])
    except Exception as err:  # e.g. XLA refusing an op: recorded as the result of this measurement
        message = str(err)
        detail = next(
            (
                line
                for line in message.splitlines()
                if "unsupported" in line.lower() or "No registered" in line or "must be a compile-time constant" in line
            ),
            message[:300],
        )
        return {**result, "error": f"{type(err).__name__}: {detail.strip()[:400]}"}
    steps, cells = len(timer.times) - 1, (len(timer.times) - 1) * cfg["batch_size"]
    result.update(
        train_cells_per_s=cells / (timer.times[-1] - timer.times[0]),
        train_cells_per_cpu_s=cells / (timer.cpu[-1] - timer.cpu[0]),
        timed_steps=steps,
        train_peak_rss_mb=peak_rss_mb(),
    )
    if cfg.get("predict"):
        data = data if cfg["mode"] == "memory" else stream.to_data(np.arange(stream.n_cells))
        scm.predict(model, data.subset(np.arange(min(2048, data.n_cells))), batch_size=cfg["predict_batch_size"])

        def timed(source):  # the best of PREDICT_REPEATS calls, wall and CPU rates (as peer_scvi.py times scVI)
            rates = []
            for _ in range(cfg["predict_repeats"]):
                start, cpu = time.perf_counter(), time.process_time()
                scm.predict(model, source, batch_size=cfg["predict_batch_size"])
                rates.append((data.n_cells / (time.perf_counter() - start), data.n_cells / (time.process_time() - cpu)))
            return max(r[0] for r in rates), max(r[1] for r in rates)

        result["predict_cells_per_s"], result["predict_cells_per_cpu_s"] = timed(data)
        if cfg["mode"] == "memory":  # the public path on the file itself: an AnnData in memory, and streamed
            import anndata

            adata = anndata.read_h5ad(cfg["path"])
            result["predict_anndata_cells_per_s"], result["predict_anndata_cells_per_cpu_s"] = timed(adata)
            del adata
            result["predict_h5ad_cells_per_s"], result["predict_h5ad_cells_per_cpu_s"] = timed(str(cfg["path"]))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def child_lda(cfg):
    import anndata
    import scipy.sparse as sp
    from sklearn.decomposition import LatentDirichletAllocation

    baseline = rss_mb()
    counts = sp.csr_matrix(anndata.read_h5ad(cfg["path"]).X)
    train = counts[: cfg["max_cells"]] if cfg.get("max_cells") else counts
    # n_jobs: its E-step on every core, as the other methods use every thread (1.3x faster on 2 cores than 1 job).
    lda = LatentDirichletAllocation(
        n_components=cfg["n_topics"],
        learning_method="online",
        max_iter=1,
        total_samples=train.shape[0],
        random_state=0,
        n_jobs=cfg["threads"],
    )
    start, cpu = time.perf_counter(), cpu_s()
    lda.fit(train)
    result = {
        "train_cells_per_s": train.shape[0] / (time.perf_counter() - start),
        "train_cells": train.shape[0],
        "train_cells_per_cpu_s": train.shape[0] / (cpu_s() - cpu),
        "baseline_rss_mb": baseline,
    }
    if cfg.get("predict"):
        start, cpu = time.perf_counter(), cpu_s()
        lda.transform(counts)
        result["predict_cells_per_s"] = counts.shape[0] / (time.perf_counter() - start)
        result["predict_cells_per_cpu_s"] = counts.shape[0] / (cpu_s() - cpu)
    result["peak_rss_mb"] = peak_rss_mb()
    # joblib's worker processes (n_jobs) outlive this one for their idle timeout (300 s) holding its output pipes,
    # which kept the parent waiting five minutes after every LDA measurement (the grid of 2026-12-02 13:39).
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)
    return result


def child_kernel(cfg):
    """The count likelihood alone (forward + gradient) on one minibatch: graph mode against XLA; and the topic-rate
    product at `block_topics` topics in column blocks (the package's way) against one block of every topic."""
    import tensorflow as tf

    from tfp_scmix import sparse_ops
    from tfp_scmix.data import from_anndata
    from tfp_scmix.loss import multinomial_log_prob
    from tfp_scmix.sparse_ops import topic_rate

    use_threads(cfg["threads"])
    data = from_anndata(cfg["path"])
    batch = next(iter(data.dataset(cfg["batch_size"], shuffle=False)))
    counts, k = batch["counts"], cfg["n_topics"]
    rng = np.random.default_rng(0)
    log_cell_topic = tf.Variable(tf.nn.log_softmax(rng.normal(size=(cfg["batch_size"], k)).astype(np.float32)))
    log_topic_gene = tf.Variable(tf.nn.log_softmax(rng.normal(size=(k, data.n_genes)).astype(np.float32)))

    def likelihood(jit):
        def step():
            with tf.GradientTape() as tape:
                loss = -tf.reduce_sum(multinomial_log_prob(counts, log_cell_topic, log_topic_gene, jit=jit))
            return tape.gradient(loss, [log_cell_topic, log_topic_gene])

        return tf.function(step)

    def product(rate_fn):
        def run():
            with tf.GradientTape() as tape:
                rate = rate_fn(tf.exp(log_cell_topic), tf.exp(log_topic_gene), counts.indices)
                loss = -tf.reduce_sum(counts.values * tf.math.log(rate))
            return tape.gradient(loss, [log_cell_topic, log_topic_gene])

        return tf.function(run)

    def autodiff(cell_topic, topic_gene, indices):  # the plain product, differentiated by TensorFlow
        return tf.reduce_sum(
            tf.gather(cell_topic, indices[:, 0]) * tf.gather(tf.transpose(topic_gene), indices[:, 1]), axis=-1
        )

    def with_block(block, fn):  # traced (first call) with sparse_ops.COLUMN_BLOCK set to `block`
        from unittest import mock

        def run():
            with mock.patch.object(sparse_ops, "COLUMN_BLOCK", block):
                return fn()

        return run

    result = {
        "nnz": int(counts.values.shape[0]),
        "block_topics": cfg["block_topics"],
        "column_block": sparse_ops.COLUMN_BLOCK,
    }
    jobs = [
        ("graph", likelihood(False)),
        ("xla", likelihood(True)),
        ("rate_autodiff", product(autodiff)),
        ("rate_graph", product(lambda *a: topic_rate(*a, jit=False))),
        ("rate_xla", product(topic_rate)),
    ]
    k = cfg["block_topics"]  # the same minibatch with more topics
    log_cell_topic = tf.Variable(tf.nn.log_softmax(rng.normal(size=(cfg["batch_size"], k)).astype(np.float32)))
    log_topic_gene = tf.Variable(tf.nn.log_softmax(rng.normal(size=(k, data.n_genes)).astype(np.float32)))
    jobs += [
        ("blocks_rate_xla", with_block(sparse_ops.COLUMN_BLOCK, product(topic_rate))),
        ("one_block_rate_xla", with_block(k, product(topic_rate))),
    ]
    for name, fn in jobs:
        try:
            fn()
            start = time.perf_counter()
            for _ in range(cfg["repeats"]):
                fn()
            result[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / cfg["repeats"]
        except Exception as err:
            result[f"{name}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return result


CHILDREN = {"ours": child_ours, "lda": child_lda, "kernel": child_kernel}


# Set by `main` when other processes keep the machine busy: OpenMP threads (PyTorch's, scVI's) that spin while
# they wait for a descheduled sibling lose most of their time on a shared machine (an encoder product took
# 41 ms with spinning threads against 10 ms with sleeping ones at a load average of 9 on 2 cores).
OMP_ENV: dict[str, str] = {}


def other_cores_now(seconds=3.0):
    """Cores that other processes keep busy, sampled over `seconds` while this benchmark runs nothing."""
    busy, start = busy_cpu_s(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, busy_cpu_s() - busy) / (time.perf_counter() - start)


def run_child(kind, cfg, timeout):
    """Run one measurement in a fresh process; returns its result dict (or {"error": ...})."""
    if kind == "scvi":
        command = [str(SCVI_ENV / "bin" / "python"), str(HERE / "peer_scvi.py"), json.dumps(cfg)]
    else:
        command = [sys.executable, "-m", "experiments.performance.run", "--child", kind, json.dumps(cfg)]
    threads = str(cfg["threads"])
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        **OMP_ENV,
    }
    start, busy, own = time.perf_counter(), busy_cpu_s(), children_cpu_s()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - start
    # Cores that other processes kept busy meanwhile: the machine's busy CPU time less the measurement's own.
    other_cores = max(0.0, (busy_cpu_s() - busy) - (children_cpu_s() - own)) / wall
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)[:400]}", "other_cores": other_cores}
    return {**json.loads(lines[-1]), "wall_s": wall, "other_cores": other_cores}


def busy_cpu_s():
    """CPU seconds the whole machine has spent busy (every core; /proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s():
    """CPU seconds of this process's finished children (and theirs), user and system."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ensure_scvi(log):
    """Create the scVI environment if it is missing; returns None or why scVI cannot run."""
    return ensure_venv("scvi", SCVI_PACKAGES, "scvi", log)[1]


# -- the plan ----------------------------------------------------------------------------------
def plan(quick, targets_only=False):
    """(data sizes, measurements) of the full grid, of the quick check, or of the target rows alone."""
    if quick:
        cells, genes = (2000, 6000, 20_000), (300, 1000)
        budget, steps, warmup, topics, batch = 1.5, 30, 2, (5,), 256
    else:
        cells, genes = (13_999, 100_000, 1_000_000), (2000, 5000, 20_000)
        budget, steps, warmup, topics, batch = 8.0, 400, 3, (20, 100), 1024
    name = lambda n, g: f"{'kang' if n == cells[0] else 'resampled'}_{n}c_{g}g"  # noqa: E731
    sizes = [(name(n, genes[0]), n, genes[0]) for n in cells] + [(name(cells[0], g), cells[0], g) for g in genes[1:]]
    ref, by_cells, by_genes = sizes[0][0], [s[0] for s in sizes[:3]], [sizes[0][0]] + [s[0] for s in sizes[3:]]
    common = dict(
        warmup=warmup, budget_s=budget, max_steps=steps, predict_batch_size=1024, predict_repeats=PREDICT_REPEATS
    )
    jobs = []
    for k in topics:
        jobs.append(("ours", ref, dict(common, mode="memory", n_topics=k, batch_size=batch, predict=True)))
        if not quick and k == topics[0] and DEFAULT_BATCH != batch:  # the package's default, for the target row
            jobs.append(("ours", ref, dict(common, mode="memory", n_topics=k, batch_size=DEFAULT_BATCH, predict=True)))
        for name in by_cells[1:2] + by_genes[1:]:
            # Prediction also at the second number of cells, where the peer's fixed costs weigh less.
            at_scale = k == topics[0] and name == by_cells[1]
            jobs.append(("ours", name, dict(common, mode="memory", n_topics=k, batch_size=batch, predict=at_scale)))
        jobs.append(("lda", ref, dict(n_topics=k, predict=True)))
        for name in by_cells[1:2] + by_genes[1:]:
            jobs.append(("lda", name, dict(n_topics=k, max_cells=2000 if quick else 6000)))
        for batch_size in (128, 1024) if k == topics[0] else (128,):
            jobs.append(
                (
                    "scvi",
                    ref,
                    dict(
                        n_latent=k,
                        batch_size=batch_size,
                        epochs=2,
                        predict_batch_size=1024,
                        predict_repeats=PREDICT_REPEATS,
                    ),
                )
            )
        for name in by_cells[1:2] + by_genes[1:]:
            jobs.append(
                (
                    "scvi",
                    name,
                    dict(
                        n_latent=k,
                        batch_size=128,
                        epochs=2,
                        max_cells=20_000,
                        predict_batch_size=1024,
                        predict_repeats=PREDICT_REPEATS,
                    ),
                )
            )
    for name in by_cells:  # streaming from disk: memory should not grow with the cells
        jobs.append(("ours", name, dict(common, mode="stream", n_topics=topics[0], batch_size=batch)))
    # Prediction over the package's own gene selection (about 3% nonzero on the Kang cells, against 25% for the
    # highest-mean genes), where the product follows the nonzeros: ours and scVI's encoding, same file.
    selected = f"kang_{cells[0]}c_{genes[0]}{SELECTED}"
    sizes.append((selected, cells[0], genes[0]))
    jobs.append(("ours", selected, dict(common, mode="memory", n_topics=topics[0], batch_size=batch, predict=True)))
    jobs.append(
        (
            "scvi",
            selected,
            dict(
                n_latent=topics[0], batch_size=1024, epochs=2, predict_batch_size=1024, predict_repeats=PREDICT_REPEATS
            ),
        )
    )
    jobs.append(("ours", ref, dict(common, mode="memory", n_topics=topics[0], batch_size=batch, jit=True)))
    jobs.append(
        ("kernel", ref, dict(n_topics=topics[0], block_topics=topics[-1], batch_size=batch, repeats=5 if quick else 20))
    )
    if targets_only:  # the rows of the targets: the reference data, the first number of topics, every method
        jobs = [
            (kind, name, cfg)
            for kind, name, cfg in jobs
            if name in (ref, selected)
            and kind != "kernel"
            and cfg.get("n_topics", cfg.get("n_latent")) == topics[0]
            and cfg.get("mode", "memory") == "memory"
            and not cfg.get("jit")
        ]
        sizes = [sizes[0], sizes[-1]]
    return sizes, jobs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a check that the script works)")
    parser.add_argument(
        "--targets",
        action="store_true",
        help="only the target rows (Kang data, 20 topics, every method; about 2 minutes)",
    )
    parser.add_argument("--peers", default="lda,scvi", help="comma-separated peers to measure: lda, scvi (empty: none)")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for results.md and results.json (default: this folder; with --quick, runs/quick, so that a "
        "check never replaces the committed results)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="threads of every method (TensorFlow pools, PyTorch, BLAS/OpenMP); default all cores",
    )
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))), flush=True)
        # Out without the interpreter's teardown: a streaming measurement stopped by its time budget leaves a
        # tf.data iterator whose destruction during garbage collection can wait forever on its generator's thread
        # (it hung the 100,000-cell streaming row of 2026-12-02 08:33 after its result was measured).
        sys.stderr.flush()
        os._exit(0)

    peers = set(filter(None, args.peers.split(",")))
    if peers - {"lda", "scvi"}:
        parser.error(f"--peers {args.peers}: unknown {sorted(peers - {'lda', 'scvi'})}; choose among lda, scvi")
    args.out = Path(args.out or (RUNS / "quick" if args.quick else HERE))
    if args.out.exists() and not args.out.is_dir():  # before the measurements, not after them
        parser.error(f"--out {args.out} is a file; name a folder for the results")
    started = time.time()
    log = lambda message: print(f"[{time.time() - started:6.0f} s] {message}", flush=True)  # noqa: E731
    scvi_problem = ensure_scvi(log) if "scvi" in peers else None
    load_start = os.getloadavg()
    others_at_start = other_cores_now()
    if others_at_start > 0.5:
        OMP_ENV["OMP_WAIT_POLICY"] = "PASSIVE"
        log(
            f"other processes keep {others_at_start:.1f} cores busy: OpenMP threads will sleep, not spin, while waiting"
        )
    sizes, jobs = plan(args.quick, args.targets)
    files = prepare_data(sizes, args.quick)
    stats = {name: file_stats(path) for name, path in files.items()}
    log("data ready: " + ", ".join(f"{n} {s[0]}x{s[1]} {s[2]:.1%} nonzero" for n, s in stats.items()))
    results = []
    for kind, name, cfg in jobs:
        if kind in ("lda", "scvi") and kind not in peers:
            continue
        if kind == "scvi" and scvi_problem:
            results.append({"method": "scvi", "data": name, **cfg, "error": scvi_problem})
            continue
        result = run_child(kind, {**cfg, "path": files[name], "threads": args.threads}, timeout=900)
        results.append({"method": kind, "data": name, **cfg, **result})
        shown = {k: v for k, v in cfg.items() if k in ("mode", "n_topics", "n_latent", "batch_size", "jit")}
        log(
            f"{kind:6s} {name:16s} {json.dumps(shown)} -> "
            + (
                result.get("error")
                or f"train {result.get('train_cells_per_s', float('nan')):.0f} cells/s, "
                f"predict {result.get('predict_cells_per_s', float('nan')):.0f} cells/s, "
                f"peak {result.get('peak_rss_mb', float('nan')):.0f} MB"
            )
        )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "targets_only": args.targets,
        "machine": machine(),
        "threads": args.threads,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "other_cores_at_start": others_at_start,
        "omp_wait_policy": OMP_ENV.get("OMP_WAIT_POLICY", "default"),
        "minutes": (time.time() - started) / 60,
        "data": {n: dict(zip(("cells", "genes", "nonzero", "median_library"), s)) for n, s in stats.items()},
    }
    stem = "results_targets" if args.targets else "results"
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, meta, results, stem)
    log(f"wrote {args.out / (stem + '.md')}")
    return 0


def machine():
    import keras
    import sklearn
    import tensorflow as tf

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "scikit-learn": sklearn.__version__,
    }


# -- the results file --------------------------------------------------------------------------
def write_results(out, meta, results, stem="results"):
    write_json(out / f"{stem}.json", {"meta": meta, "results": results}, indent=1, default=float)
    write_text(out / f"{stem}.md", render(meta, results))


def machine_load(results, meta):
    """Whether other processes shared the machine during the measurements, from the cores they kept busy."""
    others = [r["other_cores"] for r in results if r.get("other_cores") is not None]
    load = (
        f"load average {meta['load_average_start'][0]:.1f} at the start, {meta['load_average_end'][0]:.1f} "
        "at the end, this benchmark's own processes included"
    )
    if not others:
        return f"{load}; the other processes' share was not measured"
    mean, most = sum(others) / len(others), max(others)
    if most < 0.25:
        return f"otherwise idle: other processes used at most {most:.2f} cores during any measurement ({load})"
    passive = (
        "; OpenMP threads (PyTorch's) were set to sleep while waiting (OMP_WAIT_POLICY=PASSIVE), since spinning "
        "ones lose most of their time on a busy machine"
        if meta.get("omp_wait_policy") == "PASSIVE"
        else ""
    )
    return (
        f"**shared**: other processes kept {mean:.1f} cores busy on average during the measurements, up to "
        f"{most:.1f} ({load}); absolute rates move with that load, the ratios are measured side by side{passive}"
    )


def _times(slow, fast, what=""):
    """ " (N.Nx<what>)": how many times `fast` (ms) beats `slow` (ms); empty when either is missing."""
    return f" ({slow / fast:.1f}x{what})" if slow and fast else ""


def _fmt(value, digits=0):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"


def render(meta, results):
    """results.md: the target check, the size grid with ratios, streaming memory, XLA."""

    def find(method, data, **keys):
        for r in results:
            if r["method"] == method and r["data"] == data and all(r.get(k) == v for k, v in keys.items()):
                return r
        return {}

    def rate(r, key="train_cells_per_s"):
        return r.get(key) if r and not r.get("error") else None

    def ratio(a, b):
        return a / b if a and b else None

    data = meta["data"]
    selected = next((name for name in data if name.endswith(SELECTED)), None)
    names = [name for name in data if name != selected]
    ref = names[0]
    topics = sorted({r["n_topics"] for r in results if r["method"] == "ours" and r.get("mode") == "memory"})
    k0 = topics[0]
    big_batch = max(r["batch_size"] for r in results if r["method"] == "ours")
    kind = "quick check" if meta["quick"] else "target rows" if meta.get("targets_only") else "full grid"
    lines = [
        f"# Performance benchmark ({kind})",
        "",
        f"Written by `experiments/performance/run.py` on {meta['date']} in {meta['minutes']:.1f} min. "
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, {machine_load(results, meta)}. "
        f"TensorFlow {meta['machine']['tensorflow']}, Keras {meta['machine']['keras']}, scikit-learn "
        f"{meta['machine']['scikit-learn']}. Every method ran with {meta['threads']} thread(s) "
        "(TensorFlow's pools, PyTorch, BLAS/OpenMP).",
        "",
        "Data (cells x genes, nonzero fraction, median library size):",
        "",
    ]
    for name, d in data.items():
        lines.append(
            f"- `{name}`: {d['cells']:,} x {d['genes']:,}, {d['nonzero']:.1%} nonzero, median library "
            f"{d['median_library']:,.0f}"
        )
    # Target check on the reference.
    ours = find("ours", ref, mode="memory", n_topics=k0, batch_size=big_batch, jit=None)
    ours_small = find("ours", ref, mode="memory", n_topics=k0, batch_size=DEFAULT_BATCH, jit=None)
    lda = find("lda", ref, n_topics=k0)
    scvi_default = find("scvi", ref, n_latent=k0, batch_size=128)
    scvi_big = find("scvi", ref, n_latent=k0, batch_size=1024)

    def best(key):
        return max((rate(r, key) or 0 for r in (scvi_default, scvi_big)), default=0) or None

    lines += [
        "",
        f"## Targets on `{ref}` with {k0} topics",
        "",
        "Wall-clock rates, and in brackets cells per CPU-second of the process (all its threads), which "
        "other jobs on a shared machine disturb much less: there the ratios by CPU time are the fairer "
        "comparison.",
        "",
        "| measure | tfp_scmix | LDA (sklearn, online) | scVI | ours / LDA | ours / scVI | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(label, key, ours_row, lda_row, target, check):
        cpu_key = key.replace("_per_s", "_per_cpu_s")
        a, b, c = rate(ours_row, key), rate(lda_row, key), best(key)
        a_cpu, b_cpu, c_cpu = rate(ours_row, cpu_key), rate(lda_row, cpu_key), best(cpu_key)
        met = [
            "not measured" if check(*v) is None else "yes" if check(*v) else "no"
            for v in ((a, b, c), (a_cpu, b_cpu, c_cpu))
        ]
        lines.append(
            f"| {label} | {_fmt(a)} ({_fmt(a_cpu)}) | {_fmt(b)} ({_fmt(b_cpu)}) | {_fmt(c)} ({_fmt(c_cpu)}) "
            f"| {_fmt(ratio(a, b), 1)} ({_fmt(ratio(a_cpu, b_cpu), 1)}) "
            f"| {_fmt(ratio(a, c), 2)} ({_fmt(ratio(a_cpu, c_cpu), 2)}) | {target} "
            f"| {met[0]} ({met[1]}) |"
        )

    row(
        f"training, cell-passes/s (ours: batch {big_batch}; scVI: best of batch 128 and 1024)",
        "train_cells_per_s",
        ours,
        lda,
        "ours >= 20 x LDA and >= 2.5 x scVI",
        lambda a, b, c: None if None in (a, b, c) else a >= 20 * b and a >= 2.5 * c,
    )
    if ours_small:
        row(
            f"training at the package default batch {DEFAULT_BATCH}",
            "train_cells_per_s",
            ours_small,
            lda,
            "ours >= 20 x LDA and >= 2.5 x scVI",
            lambda a, b, c: None if None in (a, b, c) else a >= 20 * b and a >= 2.5 * c,
        )
    for label, key in (
        ("prediction, cells/s (batch 1024; ours: `SCData` in memory)", "predict_cells_per_s"),
        ("prediction from an AnnData in memory (`tfp_scmix.predict(model, adata)`)", "predict_anndata_cells_per_s"),
        ("prediction streamed from the .h5ad file (`tfp_scmix.predict(model, path)`)", "predict_h5ad_cells_per_s"),
    ):
        if ours and (key == "predict_cells_per_s" or rate(ours, key)):
            # scVI encodes its AnnData in memory (`get_latent_representation`), LDA its matrix: the same rates.
            peer_key = "predict_cells_per_s"
            row_ours = dict(
                ours,
                **{peer_key: ours.get(key), "predict_cells_per_cpu_s": ours.get(key.replace("_per_s", "_per_cpu_s"))},
            )
            row(
                label,
                peer_key,
                row_ours,
                lda,
                "ours >= 1.5 x scVI's encoding",
                lambda a, b, c: None if None in (a, c) else a >= 1.5 * c,
            )
    scvi_rows = [r for r in results if r["method"] == "scvi" and r["data"] == ref and r.get("n_latent") == k0]
    lines += [
        "",
        f"scVI per batch size on `{ref}`: "
        + "; ".join(
            f"batch {r.get('batch_size')}: train {_fmt(rate(r))} ({_fmt(rate(r, 'train_cells_per_cpu_s'))} per CPU-s), "
            f"encode {_fmt(rate(r, 'predict_cells_per_s'))} cells/s"
            if not r.get("error")
            else f"batch {r.get('batch_size')}: {r['error']}"
            for r in scvi_rows
        )
        if scvi_rows
        else "scVI: not measured in this run (--peers)",
    ]

    def prediction_section(name, title, intro, last_column):
        """A table of our three prediction paths on `name` against scVI's encoding of the same file."""
        ours_row = find("ours", name, mode="memory", n_topics=k0, predict=True) if name else {}
        if not rate(ours_row, "predict_cells_per_s"):
            return
        scvi_row = find("scvi", name, n_latent=k0)
        lines.extend(
            ["", f"## {title} (`{name}`, {k0} topics)", "", intro, "", f"| prediction path | tfp_scmix | scVI | "
             f"ours / scVI | {last_column} |", "|---|---|---|---|---|"]
        )  # fmt: skip
        peer, peer_cpu = rate(scvi_row, "predict_cells_per_s"), rate(scvi_row, "predict_cells_per_cpu_s")
        for label, key in (
            ("`SCData` in memory", "predict_cells_per_s"),
            ("an AnnData in memory", "predict_anndata_cells_per_s"),
            ("streamed from the .h5ad file", "predict_h5ad_cells_per_s"),
        ):
            a, a_cpu = rate(ours_row, key), rate(ours_row, key.replace("_per_s", "_per_cpu_s"))
            met = ratio(a, peer)
            lines.append(
                f"| {label} | {_fmt(a)} ({_fmt(a_cpu)}) | {_fmt(peer)} ({_fmt(peer_cpu)}) | {_fmt(met, 2)} "
                f"({_fmt(ratio(a_cpu, peer_cpu), 2)}) | "
                f"{'not measured' if met is None else 'yes' if met >= 1.5 else 'no'} |"
            )

    scale = names[1] if len(names) > 1 else None
    if scale:
        prediction_section(
            scale,
            f"Prediction at {data[scale]['cells']:,} cells",
            "The same prediction paths on more cells, against scVI's `get_latent_representation` of the same file "
            "(batch 1,024), where fixed costs per call weigh less: wall-clock cells/s (per CPU-second).",
            "target 1.5 met",
        )
    if selected:
        prediction_section(
            selected,
            "Prediction over the package's own gene selection",
            f"The same cells over the {data[selected]['genes']:,} genes `tfp_scmix.data.highly_variable_genes` "
            f"selects ({data[selected]['nonzero']:.1%} nonzero, against {data[ref]['nonzero']:.1%} for the "
            "highest-mean genes of the targets): what a model trained with the package's defaults predicts. "
            "tfp_scmix multiplies such sparse minibatches as CSR (`predict.SPARSE_PRODUCT_DENSITY`); scVI's "
            "encoder, `get_latent_representation` of the same file (batch 1,024), densifies them. Wall-clock "
            "cells/s (per CPU-second).",
            "1.5 x scVI",
        )
    if meta.get("targets_only"):
        return "\n".join(lines) + "\n"
    # The grid.
    lines += [
        "",
        "## Size grid (training in memory; each row its own process)",
        "",
        "| data | topics | tfp_scmix cells/s | peak MB | LDA cells/s | peak MB | scVI cells/s | peak MB "
        "| ours / LDA (by CPU time) | ours / scVI (by CPU time) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cpu = "train_cells_per_cpu_s"
    for k in topics:
        for name in names:
            if name == names[2]:
                continue  # the largest cell count: streamed only (below)
            o = find("ours", name, mode="memory", n_topics=k, batch_size=big_batch, jit=None)
            lr, sr = find("lda", name, n_topics=k), find("scvi", name, n_latent=k, batch_size=128)
            if not o:
                continue
            lines.append(
                f"| `{name}` | {k} | {_fmt(rate(o))} | {_fmt(o.get('peak_rss_mb'))} | {_fmt(rate(lr))} "
                f"| {_fmt(lr.get('peak_rss_mb'))} | {_fmt(rate(sr))} | {_fmt(sr.get('peak_rss_mb'))} "
                f"| {_fmt(ratio(rate(o), rate(lr)), 1)} ({_fmt(ratio(rate(o, cpu), rate(lr, cpu)), 1)}) "
                f"| {_fmt(ratio(rate(o), rate(sr)), 2)} ({_fmt(ratio(rate(o, cpu), rate(sr, cpu)), 2)}) |"
            )
    errors = [r for r in results if r.get("error") and not r.get("jit")]
    if errors:
        lines += [
            "",
            "Measurements that did not complete: "
            + "; ".join(f"{r['method']} on `{r['data']}`: {r['error']}" for r in errors),
        ]
    # Streaming.
    lines += [
        "",
        f"## Streaming from disk (`H5ADStream`, {k0} topics, batch {big_batch})",
        "",
        "| data | cells | tfp_scmix cells/s | peak MB | after imports MB | peak minus baseline MB | "
        "counts in memory would be MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = find("ours", name, mode="stream")
        if not r:
            continue
        in_memory = data[name]["cells"] * data[name]["genes"] * data[name]["nonzero"] * 8 / 2**20
        peak, base = r.get("train_peak_rss_mb"), r.get("baseline_rss_mb")
        lines.append(
            f"| `{name}` | {data[name]['cells']:,} | {_fmt(rate(r))} | {_fmt(peak)} | {_fmt(base)} | "
            f"{_fmt(peak - base if peak and base else None)} | {_fmt(in_memory)} |"
        )
    # XLA.
    jit = find("ours", ref, jit=True)
    kernel = find("kernel", ref)
    lines += [
        "",
        "## XLA",
        "",
        "- `model.compile(jit_compile=True)`, full training step: "
        + (
            f"**fails**: {jit['error']}"
            if jit.get("error")
            else "Keras declined XLA for this model and trained without it"
            if not jit.get("jit_effective")
            else f"{_fmt(rate(jit))} cells/s (graph mode: {_fmt(rate(ours))})"
        ),
        f"- The count likelihood alone (`multinomial_log_prob` forward + gradient, one minibatch of "
        f"{big_batch} cells, {kernel.get('nnz', 0):,} nonzeros, {k0} topics): its nonzero product in graph mode "
        f"{_fmt(kernel.get('graph_ms'), 1)} ms, compiled with XLA {_fmt(kernel.get('xla_ms'), 1)} ms"
        + _times(kernel.get("graph_ms"), kernel.get("xla_ms"))
        + (f"; XLA error: {kernel['xla_error']}" if kernel.get("xla_error") else "")
        + ".",
        f"- Its topic-rate product (the gather-multiply-sum over nonzeros) with its gradient: differentiated by "
        f"TensorFlow {_fmt(kernel.get('rate_autodiff_ms'), 1)} ms; `tfp_scmix.sparse_ops.topic_rate` (gradient "
        f"by two sparse-dense products) {_fmt(kernel.get('rate_graph_ms'), 1)} ms in graph mode, "
        f"{_fmt(kernel.get('rate_xla_ms'), 1)} ms with its forward compiled by XLA (padded nonzeros)"
        + _times(kernel.get("rate_autodiff_ms"), kernel.get("rate_xla_ms"), " the automatic gradient")
        + ".",
        f"- Topics in blocks: the same product with its gradient at {kernel.get('block_topics')} topics, in column "
        f"blocks of at most {kernel.get('column_block')} (`sparse_ops.column_blocks`, the package's way) "
        f"{_fmt(kernel.get('blocks_rate_xla_ms'), 1)} ms, in one block of every topic "
        f"{_fmt(kernel.get('one_block_rate_xla_ms'), 1)} ms"
        + _times(kernel.get("one_block_rate_xla_ms"), kernel.get("blocks_rate_xla_ms"))
        + ".",
    ]
    lines += ["", "## How it was measured", "", __doc__.split("Measures.")[1].split("Writes results")[0].strip(), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
