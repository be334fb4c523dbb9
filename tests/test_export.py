"""SavedModel export, the client that aligns an AnnData to it, atomic writes and MLflow serving."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import tfp_scmix as scm
from tfp_scmix import datasets, export
from tfp_scmix.annotate import model_fingerprint
from tfp_scmix.data import DataError, gene_fingerprint
from tfp_scmix.io import atomic_directory as io_atomic_directory

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adata():
    return datasets.pbmc68k_reduced()


@pytest.fixture(scope="module")
def trained(adata, tmp_path_factory):
    """(model, data, model.keras path, export dir): a tiny model trained for 2 epochs and its export."""
    keras.utils.set_random_seed(0)
    data = scm.from_anndata(adata, label_key="cell_type")
    model = scm.SCMix.from_data(data, scm.Config(n_topics=10))
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    model.fit(data.dataset(128), epochs=2, verbose=0)
    root = tmp_path_factory.mktemp("export")
    scm.save_model(model, root / "model.keras")
    return model, data, root / "model.keras", export.export_serving(model, root / "serving" / "1")


@pytest.fixture(scope="module")
def expected(trained):
    """In-process predictions on every cell (dense counts in the model's gene order)."""
    model, data, _, _ = trained
    out = model.predict(data.counts.toarray(), verbose=0)
    return {**out, "label_name": np.asarray(model.class_names)[out["label"]]}


def test_export_holds_genes_classes_version_and_fingerprint(trained):
    model, _, _, path = trained
    assets = path / "assets"
    assert (assets / export.GENES_FILE).read_text().split("\n")[:-1] == model.genes
    assert (assets / export.CLASSES_FILE).read_text().split("\n")[:-1] == model.class_names
    meta = json.loads((assets / export.METADATA_FILE).read_text())
    assert meta["gene_fingerprint"] == gene_fingerprint(model.genes) == model.gene_fingerprint
    assert meta["version"] == scm.__version__ and meta["n_topics"] == 10
    annotator = export.load_exported(path)
    assert annotator.genes == model.genes and annotator.class_names == model.class_names
    assert annotator.gene_fingerprint == model.gene_fingerprint and annotator.version == scm.__version__
    # Nothing but the export is left in the parent folder (no temporary directories).
    assert sorted(p.name for p in path.parent.iterdir()) == ["1"]


def test_exporting_leaves_the_logging_of_the_process_as_it_was(trained, tmp_path):
    """TensorFlow's SavedModel writer logs through absl, which configures the root logger when it has no handler:
    the process then printed the package's warnings as "WARNING:tfp_scmix:..." and ignored the user's own
    basicConfig. pytest's own handlers are taken off the root logger meanwhile, as in a user's fresh process."""
    import logging

    model = trained[0]
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        export.export_serving(model, tmp_path / "out")
        assert root.handlers == []
    finally:
        root.handlers[:] = saved


def test_an_incomplete_copy_of_an_export_is_named_as_such(trained, tmp_path):
    """An export copied without its variables: a clear error (it was TensorFlow's "Unsuccessful TensorSliceReader
    constructor ... You may be trying to load on a different device")."""
    import shutil

    copy = tmp_path / "half"
    shutil.copytree(trained[3], copy)
    shutil.rmtree(copy / "variables")
    with pytest.raises(FileNotFoundError, match=r"SavedModel at .*half is incomplete \(variables/variables.index is"):
        export.load_exported(copy)
    with pytest.raises(FileNotFoundError, match=r"no SavedModel at .*nope \(saved_model.pb is missing\)"):
        export.load_exported(tmp_path / "nope")
    # A truncated saved_model.pb: a ModelFileError that names the fix (a trial got protobuf's bare OSError).
    truncated = tmp_path / "truncated"
    shutil.copytree(trained[3], truncated)
    pb = truncated / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 3])
    with pytest.raises(scm.io.ModelFileError, match=r"SavedModel at .*truncated cannot be loaded .* copy the whole"):
        export.load_exported(truncated)


FRESH_PROCESS = textwrap.dedent("""
    import sys

    class Block:  # tfp_scmix (and TFP, which the model was built with) must not be needed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"tfp_scmix", "tensorflow_probability"}:
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
    try:
        import tfp_scmix
        raise SystemExit("tfp_scmix was importable")
    except ImportError:
        pass

    import numpy as np
    import tensorflow as tf

    export, inputs, result = sys.argv[1:4]
    x = np.load(inputs)["counts"]
    loaded = tf.saved_model.load(export)
    dense = loaded.signatures["serving_default"](counts=tf.constant(x))
    rows, cols = np.nonzero(x)
    sparse = loaded.signatures["serving_sparse"](
        indices=tf.constant(np.stack([rows, cols], 1), tf.int64), values=tf.constant(x[rows, cols]),
        dense_shape=tf.constant(x.shape, tf.int64))
    genes = [g.decode() for g in loaded.signatures["metadata"]()["genes"].numpy()]
    assert "tfp_scmix" not in sys.modules and "tensorflow_probability" not in sys.modules
    as_numpy = lambda v: np.char.decode(v.numpy().astype(bytes)) if v.dtype == tf.string else v.numpy()
    np.savez(result, genes=np.array(genes), **{f"dense_{k}": as_numpy(v) for k, v in dense.items()},
             **{f"sparse_{k}": as_numpy(v) for k, v in sparse.items()})
""")


def test_fresh_process_without_tfp_scmix_gets_the_same_predictions(trained, expected, tmp_path):
    model, data, _, path = trained
    n = 64
    np.savez(tmp_path / "inputs.npz", counts=data.counts[:n].toarray())
    (tmp_path / "client.py").write_text(FRESH_PROCESS)
    run = subprocess.run(
        [sys.executable, "client.py", str(path), "inputs.npz", "result.npz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(tmp_path / "result.npz")
    assert list(got["genes"]) == model.genes
    for form in ("dense", "sparse"):
        assert {k[len(form) + 1 :] for k in got.files if k.startswith(f"{form}_")} == set(export.OUTPUT_KEYS)
    for form in ("dense", "sparse"):
        np.testing.assert_allclose(got[f"{form}_probs"], expected["probs"][:n], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got[f"{form}_cell_topic"], expected["cell_topic"][:n], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got[f"{form}_confidence"], expected["confidence"][:n], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(got[f"{form}_label_id"], expected["label"][:n])
        np.testing.assert_array_equal(got[f"{form}_label"], expected["label_name"][:n])


def test_annotator_aligns_anndata_genes_by_name(trained, expected, adata):
    model, _, _, path = trained
    # Shuffle the gene order and drop 5% of the genes: alignment must put them back by name.
    rng = np.random.default_rng(0)
    keep = np.sort(rng.permutation(adata.n_vars)[: int(0.95 * adata.n_vars)])
    shuffled = adata[:, rng.permutation(keep)].copy()
    frame = export.load_exported(path, batch_size=100).annotate(shuffled)
    reference = model.predict(scm.from_anndata(shuffled, label_key=None, genes=model.genes).counts.toarray(), verbose=0)
    assert list(frame.index) == list(adata.obs_names)
    np.testing.assert_allclose(
        frame[[f"prob_{c}" for c in model.class_names]].to_numpy(), reference["probs"], rtol=1e-4, atol=1e-6
    )
    np.testing.assert_array_equal(frame["label"].to_numpy(), np.asarray(model.class_names)[reference["label"]])
    # With every gene present, the annotator reproduces the in-process model on the full data.
    full = export.load_exported(path).annotate(adata)
    np.testing.assert_allclose(full["confidence"].to_numpy(), expected["confidence"], rtol=1e-4, atol=1e-6)
    assert list(full.columns[:2]) == ["label", "confidence"] and full.shape[1] == 2 + model.n_classes + 10 + 1
    assert full.columns[-1] == "empty" and not full["empty"].any()


def test_wrong_width_or_genes_give_clear_errors(trained, adata):
    model, data, _, path = trained
    annotator = export.load_exported(path)
    with pytest.raises(DataError, match=rf"expects \[cells, {model.n_genes}\]"):
        annotator.predict(data.counts[:5, :-1])
    with pytest.raises(DataError, match="fingerprint .* does not match"):
        annotator.predict(data.counts[:5], genes=model.genes[::-1])
    with pytest.raises(DataError, match="fingerprint .* does not match"):
        annotator.predict(data.counts[:5], fingerprint="0123456789abcdef")
    renamed = adata.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    with pytest.raises(DataError, match="different kinds of gene identifiers"):
        annotator.annotate(renamed)
    # A client calling the sparse signature directly gets the model's gene count in the error.
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"number of genes \\({model.n_genes}\\)"):
        annotator.loaded.signatures[export.SERVING_SPARSE](
            indices=tf.constant([[0, 0]], tf.int64),
            values=tf.constant([1.0]),
            dense_shape=tf.constant([1, model.n_genes - 1], tf.int64),
        )
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-negative"):
        annotator.loaded.signatures[export.SERVING_DENSE](counts=-tf.ones([1, model.n_genes]))
    # Indices out of range or repeated: what is wrong in the client's terms (a trial got gather's "indices[0] =
    # 7000 is not in [0, 4000)" and "is repeated").
    for indices, message in (
        (
            [[0, model.n_genes]],
            rf"gene indices \(column 1\) must be below the number of genes of the model \({model.n_genes}\)",
        ),
        ([[0, 0], [5, 1]], r"row indices \(column 0\) must be below dense_shape\[0\]"),
        ([[0, 3], [0, 3]], r"each \(row, gene\) pair must appear once"),
    ):
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            annotator.loaded.signatures[export.SERVING_SPARSE](
                indices=tf.constant(indices, tf.int64),
                values=tf.ones([len(indices)]),
                dense_shape=tf.constant([1, model.n_genes], tf.int64),
            )


def _failing_save(real_save):
    def save(obj, export_dir, *args, **kwargs):
        real_save(obj, export_dir, *args, **kwargs)  # files written ...
        (Path(export_dir) / "variables" / "variables.data-00000-of-00001").write_bytes(b"truncated")
        raise OSError("disk full")  # ... then the write fails midway

    return save


def test_failed_export_leaves_no_model_and_keeps_the_old_one(trained, tmp_path, monkeypatch):
    model, _, _, _ = trained
    target = tmp_path / "serving" / "1"
    monkeypatch.setattr(tf.saved_model, "save", _failing_save(tf.saved_model.save))
    with pytest.raises(OSError, match="disk full"):
        export.export_serving(model, target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    monkeypatch.undo()

    export.export_serving(model, target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_serving(model, target)
    monkeypatch.setattr(tf.saved_model, "save", _failing_save(tf.saved_model.save))
    with pytest.raises(OSError, match="disk full"):
        export.export_serving(model, target, overwrite=True)
    monkeypatch.undo()
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in target.parent.iterdir()] == ["1"]
    export.export_serving(model, target, overwrite=True)
    assert export.load_exported(target).gene_fingerprint == model.gene_fingerprint
    assert [p.name for p in target.parent.iterdir()] == ["1"]


def test_overwrite_replaces_an_export_only(trained, tmp_path):
    """overwrite=True replaces an earlier export; a folder that is not one (a trial's results folder, deleted
    whole before) and a file are refused and left as they were, and so is an overwrite that is not a bool."""
    model, _, _, _ = trained
    notes = tmp_path / "results"
    notes.mkdir()
    (notes / "notes.txt").write_text("important")
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    for target, what in ((notes, "not a SavedModel export"), (a_file, "is a file")):
        with pytest.raises(FileExistsError, match=f"{what}.*left as it is"):
            export.export_serving(model, target, overwrite=True)
    assert (notes / "notes.txt").read_text() == "important" and a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "results"]  # no temporary folder left
    with pytest.raises(TypeError, match="overwrite must be True or False, received 'no'"):
        export.export_serving(model, tmp_path / "new", overwrite="no")  # type: ignore[arg-type]
    assert not (tmp_path / "new").exists()


def test_a_cell_without_counts_is_unassigned_on_every_route(trained):
    """The signatures (dense and sparse, loaded by TensorFlow alone) and `ExportedAnnotator` mark a cell with
    no counts over the model's genes as `annotate` and the MLflow server do: "unassigned", label_id -1, no
    confidence (NaN), empty; the other cells' outputs are those of the model."""
    model, data, _, path = trained
    counts = data.counts[:4].toarray()
    counts[1] = 0
    loaded = tf.saved_model.load(str(path))
    dense = {k: v.numpy() for k, v in loaded.signatures["serving_default"](counts=tf.constant(counts)).items()}
    coo = scipy_coo(counts)
    sparse = loaded.signatures["serving_sparse"](
        indices=tf.constant(np.stack([coo.row, coo.col], 1), tf.int64),
        values=tf.constant(coo.data, tf.float32),
        dense_shape=tf.constant(counts.shape, tf.int64),
    )
    annotator = export.load_exported(path).predict(counts)
    own = model.predict(counts, verbose=0)
    for out in (dense, {k: v.numpy() for k, v in sparse.items()}, annotator):
        labels = [x.decode() if isinstance(x, bytes) else str(x) for x in out["label"]]
        assert labels[1] == "unassigned" and out["label_id"][1] == -1 and np.isnan(out["confidence"][1])
        assert list(out["empty"]) == [False, True, False, False]
        keep = [0, 2, 3]
        assert [labels[i] for i in keep] == [model.class_names[i] for i in own["label"][keep]]
        np.testing.assert_allclose(out["confidence"][keep], own["confidence"][keep], rtol=1e-4, atol=1e-6)


def scipy_coo(dense):
    import scipy.sparse as sp

    return sp.coo_matrix(dense.astype(np.float32))


CRASHING_CLI = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import tensorflow as tf
    from tfp_scmix import export

    real_save = tf.saved_model.save
    def save(obj, export_dir, *args, **kwargs):
        real_save(obj, export_dir, *args, **kwargs)
        os._exit(3)  # the process dies midway: no exception handler, no cleanup runs
    tf.saved_model.save = save
    export.main(sys.argv[1:])
""")


def test_cli_exports_and_a_crash_midway_leaves_nothing_at_the_target(trained, expected, tmp_path):
    model, data, model_file, _ = trained
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    (tmp_path / "crash.py").write_text(CRASHING_CLI)
    crash = subprocess.run(
        [sys.executable, "crash.py", str(model_file), "out/1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert crash.returncode == 3, crash.stderr[-3000:]
    assert not (tmp_path / "out" / "1").exists()

    run = subprocess.run(
        [sys.executable, "-m", "tfp_scmix.export", str(model_file), "out/1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert model.gene_fingerprint in run.stdout
    out = export.load_exported(tmp_path / "out" / "1").predict(data.counts[:20])
    np.testing.assert_allclose(out["probs"], expected["probs"][:20], rtol=1e-4, atol=1e-6)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url, payload):
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_mlflow_served_model_answers_rest_requests(trained, expected, tmp_path):
    pytest.importorskip("mlflow")
    model, data, model_file, _ = trained
    # An explicit tracking store in tmp_path; the experiment's artifacts go beside it, as training runs' do.
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The server execs `uvicorn` from PATH: put this environment's scripts first, as an activated venv does.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(REPO),  # this checkout, wherever the subprocess runs
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfp_scmix",  # the package's command line (`tfp-scmix export`), as the README gives it
            "export",
            str(model_file),
            "export/1",
            "--mlflow-experiment",
            "serving-test",
            "--max-cells",
            "50",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    model_uri = run.stdout.split("logged MLflow model ")[1].split()[0]
    assert (tmp_path / "artifacts" / "serving-test").is_dir() and not (tmp_path / "mlruns").exists()
    # The served model's run names the model it was exported from, as its training run does (a trial could not
    # link the two).
    import mlflow

    mlflow.set_tracking_uri(tracking)
    served = mlflow.get_run(mlflow.get_logged_model(model_uri.split("/")[-1]).source_run_id).data.tags
    assert served["tfp_scmix.model_fingerprint"] == model_fingerprint(model)
    assert served["tfp_scmix.data_fingerprint"] == model.provenance["data_fingerprint"]
    cells = [3, 10, 200, 450, 699]
    counts = data.counts[cells].toarray()

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "w"),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, (
                "server not ready in 120 s:\n" + (tmp_path / "server.log").read_text()[-3000:]
            )
            time.sleep(1)

        def check(rows):
            assert [r["label"] for r in rows] == list(expected["label_name"][cells])
            probs = np.array([[r[f"prob_{c}"] for c in model.class_names] for r in rows])
            np.testing.assert_allclose(probs, expected["probs"][cells], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(
                [r["confidence"] for r in rows], expected["confidence"][cells], rtol=1e-4, atol=1e-6
            )
            np.testing.assert_allclose(
                [[r[f"topic_{k}"] for k in range(10)] for r in rows],
                expected["cell_topic"][cells],
                rtol=1e-4,
                atol=1e-6,
            )

        url = f"http://127.0.0.1:{port}/invocations"
        # Integer counts, every gene, columns in a shuffled order: the served model aligns them by name.
        order = np.random.default_rng(0).permutation(model.n_genes)
        status, body = _post(
            url,
            {
                "dataframe_split": {
                    "columns": [model.genes[i] for i in order],
                    "data": counts[:, order].astype(int).tolist(),
                }
            },
        )
        assert status == 200, body
        check(body["predictions"])
        # Records that list only each cell's nonzero genes.
        records = [{g: int(c) for g, c in zip(model.genes, row) if c} for row in counts]
        status, body = _post(url, {"dataframe_records": records})
        assert status == 200, body
        check(body["predictions"])

        status, body = _post(url, {"dataframe_records": [{**records[0], "CD3D_typo": 1}]})
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
        assert "1 columns are not genes of the model (e.g. ['CD3D_typo'])" in body["message"], body
        status, body = _post(url, {"dataframe_records": [{g: -c for g, c in records[0].items()}]})
        assert status == 400 and "non-negative" in body["message"], body
        status, body = _post(url, {"dataframe_split": {"columns": ["CD3D", "CD3D"], "data": [[1, 2]]}})
        assert status == 400 and "duplicated gene columns ['CD3D']" in body["message"], body
        status, body = _post(url, {"dataframe_split": {"columns": ["CD3D"], "data": [["many"]]}})
        assert status == 400 and "counts must be numbers" in body["message"], body

        # Issue 18: every invalid input gets a 4xx with a message, as the library's checks would give.
        gene = model.genes[0]
        for value, message in (
            (float("inf"), "infinite or too large"),
            (1e39, "infinite or too large"),  # beyond float32: it was read as inf, answered with NaN tokens
            (231.5, "not integers.*normalized or corrected"),
        ):
            status, body = _post(url, {"dataframe_records": [{**records[0], gene: value}]})
            assert status == 400 and re.search(message, body["message"]), (value, body)
        logged = [{g: float(np.log1p(c)) for g, c in record.items()} for record in records]
        status, body = _post(url, {"dataframe_records": logged})
        assert status == 400 and re.search("not integers.*log-normalized", body["message"]), body
        # Nested values, a deeply nested document and a string that is not a number.
        for payload in (
            {"dataframe_records": [{gene: [[[[1]]]]}]},
            {"dataframe_split": {"columns": [gene], "data": [[{"a": {"b": [1]}}]]}},
        ):
            status, body = _post(url, payload)
            assert 400 <= status < 500 and body.get("message"), (payload, status, body)
        # A cell with no counts over the model's genes gets no label: "unassigned", flagged empty.
        status, body = _post(url, {"dataframe_records": [records[1], {gene: 0}]})
        assert status == 200, body
        assert [r["empty"] for r in body["predictions"]] == [False, True]
        assert body["predictions"][1]["label"] == "unassigned" and body["predictions"][1]["confidence"] is None
        # The documented request limit (--max-cells 50 here): 413, with what to do.
        status, body = _post(url, {"dataframe_records": [records[0]] * 51})
        assert status == 413 and "51 cells; this server takes at most 50" in body["message"], body
        assert _post(url, {"dataframe_records": [records[0]] * 50})[0] == 200
    finally:
        _stop(server)


def test_serving_checks_are_the_library_checks():
    """The served model's own copy of the raw-count checks (mlflow_serving runs without tfp_scmix) refuses
    what tfp_scmix.data.check_counts refuses."""
    import scipy.sparse as sp

    from tfp_scmix.data import check_counts
    from tfp_scmix.mlflow_serving import count_problem

    good = np.array([[0.0, 3.0], [7.0, 1.0]])
    assert count_problem(good) is None
    check_counts(sp.csr_matrix(good), "x")
    for bad in (np.inf, np.nan, -1.0, 2.5, 231.5):
        values = good.copy()
        values[1, 0] = bad
        with pytest.raises(DataError):
            check_counts(sp.csr_matrix(values), "x")
        assert count_problem(values), bad


def test_two_exports_to_one_path_and_a_kill_during_overwrite(trained, tmp_path):
    """Two exports to one path without overwrite: one wins, the other gets FileExistsError and leaves the
    winner alone (before: both succeeded). `--overwrite` swaps the new export in with one atomic step: a
    kill right after it leaves the new export whole (before, between its two renames: no export)."""
    model, data, model_file, _ = trained
    target = tmp_path / "serving" / "1"
    with pytest.raises(FileExistsError, match="already exists"):
        with io_atomic_directory(target) as first:
            (first / "from_first").write_text("x")
            export.export_serving(model, target)  # a second writer finishes while the first is writing
    assert not (target / "from_first").exists() and export.load_exported(target).n_genes == model.n_genes
    assert [p.name for p in target.parent.iterdir()] == ["1"]

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
                import os, shutil, sys
                from tfp_scmix import io
                from tfp_scmix.export import main
                shutil.rmtree = lambda *args, **kwargs: os._exit(3)  # dies right after the swap
                main(sys.argv[1:])
            """),
            str(model_file),
            str(target),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 3, done.stderr[-3000:]
    assert export.load_exported(target).predict(data.counts[:5])["probs"].shape == (5, model.n_classes)


def test_annotator_refuses_damaged_sparse_counts_without_crashing(trained):
    """A sparse matrix whose gene index is out of range reaches the export client: a DataError, not a crash
    inside TensorFlow's sparse ops (in a fresh process, so that a crash fails this test only)."""
    _, _, _, path = trained
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
                import sys
                import numpy as np, scipy.sparse as sp
                from tfp_scmix.data import DataError
                from tfp_scmix.export import load_exported
                annotator = load_exported(sys.argv[1])
                for indices, indptr in (([0, 5, 10**6], [0, 1, 3]), ([0, 5, 7], [0, 3, 1])):
                    bad = sp.csr_matrix((np.ones(3, np.float32), indices, indptr), shape=(2, annotator.n_genes))
                    try:
                        annotator.predict(bad)
                        print("no error")
                    except DataError as err:
                        print("DataError", "damaged" in str(err))
            """),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["DataError True", "DataError True"], done.stdout


def _stop(server):
    """End the server's process group (mlflow starts uvicorn as a child)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def test_every_file_the_package_writes_honours_the_umask(trained, adata, tmp_path):
    """Models, annotated .h5ad files (in memory and backed), CSV tables and exports get a new file's usual
    mode under the process's umask, so that colleagues on shared storage can read them (before: 0600 /
    0700 whatever the umask, issue 18)."""
    import anndata

    from tfp_scmix.annotate import write_h5ad
    from tfp_scmix.io import write_csv

    model, _, _, _ = trained
    previous = os.umask(0o027)
    try:
        scm.save_model(model, tmp_path / "a.keras")
        model.save(tmp_path / "b.keras")
        write_csv(pd.DataFrame({"x": [1]}), tmp_path / "table.csv")
        query = adata[:40].copy()
        query.write_h5ad(tmp_path / "query.h5ad")
        write_h5ad(scm.annotate(model, query), tmp_path / "memory.h5ad")
        backed = anndata.read_h5ad(tmp_path / "query.h5ad", backed="r")
        write_h5ad(scm.annotate(model, backed), tmp_path / "backed.h5ad")
        backed.file.close()
        export.export_serving(model, tmp_path / "export" / "1")
    finally:
        os.umask(previous)
    written = [tmp_path / n for n in ("a.keras", "b.keras", "table.csv", "memory.h5ad", "backed.h5ad")]
    exported = list((tmp_path / "export" / "1").rglob("*"))
    assert {oct(p.stat().st_mode & 0o777) for p in written + exported if p.is_file()} == {"0o640"}
    assert {oct(p.stat().st_mode & 0o777) for p in [tmp_path / "export" / "1", *exported] if p.is_dir()} == {"0o750"}
