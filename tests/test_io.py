"""Files: models saved atomically and loaded safely (other versions, damaged files, code in the file, no
pickle), and atomic writes of results. The catalogue these tests back is docs/reliability.md."""

import codecs
import json
import logging
import marshal
import signal
import zipfile
from pathlib import Path

import anndata
import h5py
import keras
import numpy as np
import pandas as pd
import pytest

from tests.helpers import few_labels, rewrite_archive, run_python
from tfp_scmix.config import Config
from tfp_scmix.io import ModelFileError, WriteError, atomic_directory, load_model, save_model, write_csv
from tfp_scmix.model import SCMix, library_versions, provenance
from tfp_scmix.predict import predict

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved(small_model, tmp_path_factory):
    """The shared small model's one SCMix, saved with save_model."""
    return save_model(small_model.members[0], tmp_path_factory.mktemp("model") / "model.keras")


def test_load_model_round_trip_and_model_files_from_another_version(small_model, saved, embedded, tmp_path, caplog):
    expected = predict(small_model.members[0], embedded)["probs"]
    assert np.array_equal(predict(load_model(saved), embedded)["probs"], expected)

    # A file written by a later version that has a setting this one does not know.
    def newer(config):
        config["config"]["topic_kernel"] = "gaussian"
        if "provenance" in config["config"]:
            config["config"]["provenance"]["tfp_scmix"] = "0.99.0"
        return config

    later = rewrite_archive(
        saved, tmp_path / "later.keras", config=newer, metadata=lambda m: {**m, "keras_version": "3.99.0"}
    )
    this = library_versions()
    with pytest.raises(
        ModelFileError,
        match=rf"written by tfp_scmix (0\.99\.0|\(version not recorded\)) with Keras "
        rf"3\.99\.0; this is tfp_scmix {this['tfp_scmix']} with Keras "
        rf"{this['keras']}\..*Install the version that wrote it",
    ):
        load_model(later)

    # A file from before the gene term became a ridge one: refused with the reason.
    def standardised_genes(config):
        config["config"]["config"] = {**config["config"]["config"], "expected_active_genes": 20.0}
        config["config"]["config"].pop("gene_prior_scale")
        return config

    with pytest.raises(ModelFileError, match="standardised genes under a horseshoe.*re-train the model"):
        load_model(rewrite_archive(saved, tmp_path / "genes.keras", config=standardised_genes))

    # A file whose weights are laid out differently (a variable missing).
    def drop_variable(content):
        path = tmp_path / "w.h5"
        path.write_bytes(content)
        with h5py.File(path, "a") as f:
            del f["layers/topic_branch/vars/1"]
        return path.read_bytes()

    with pytest.raises(ModelFileError, match="could not load .*written by"):
        load_model(rewrite_archive(saved, tmp_path / "layout.keras", weights=drop_variable))

    # A file from another Keras version that still loads: loaded, with a warning that names both.
    older = rewrite_archive(saved, tmp_path / "older.keras", metadata=lambda m: {**m, "keras_version": "3.14.0"})
    with caplog.at_level(logging.WARNING, logger="tfp_scmix"):
        assert np.array_equal(predict(load_model(older), embedded)["probs"], expected)
    assert "keras 3.14.0" in caplog.text and f"keras {keras.__version__}" in caplog.text


def test_load_model_refuses_missing_truncated_foreign_and_legacy_files(saved, tmp_path):
    with pytest.raises(ModelFileError, match="no model file"):
        load_model(tmp_path / "missing.keras")
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model(truncated)
    legacy = tmp_path / "legacy.keras"
    with h5py.File(legacy, "w") as f:
        f["model_weights"] = np.zeros(3)
    with pytest.raises(ModelFileError, match="HDF5 file"):
        load_model(legacy)
    # The data given where the model goes (the command line's arguments swapped): said so, not "corrupt".
    data = tmp_path / "data.h5ad"
    anndata.AnnData(np.ones((3, 2), np.float32)).write_h5ad(data)
    with pytest.raises(ModelFileError, match="is a dataset .* not a model: pass the model .* first"):
        load_model(data)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.save(tmp_path / "other.keras")
    with pytest.raises(ModelFileError, match="not a tfp_scmix SCMix model"):
        load_model(tmp_path / "other.keras")


def test_safe_mode_refuses_code_in_the_file_and_formats_hold_no_pickle(saved, tmp_path):
    marker = tmp_path / "code-ran"
    would_run = eval(f"lambda *args: open({str(marker)!r}, 'w').write('x')")
    # Keras's serialized form of a Python lambda: its marshalled bytecode.
    code = {
        "class_name": "__lambda__",
        "config": {"value": [codecs.encode(marshal.dumps(would_run.__code__), "base64").decode("ascii"), None, None]},
    }
    tampered = rewrite_archive(
        saved,
        tmp_path / "tampered.keras",
        config=lambda c: {**c, "compile_config": {**c["compile_config"], "loss": code}},
    )
    with pytest.raises(ModelFileError, match="asks to run Python code"):
        load_model(tampered)
    assert not marker.exists()
    unsafe = keras.saving.load_model(tampered, safe_mode=False)  # what safe mode prevents: the code comes back
    unsafe.loss()
    assert marker.exists()

    # The format: two JSON documents and an HDF5 file of plain numeric arrays (no object or opaque dtypes,
    # which is where pickles would hide).
    with zipfile.ZipFile(saved) as archive:
        assert sorted(archive.namelist()) == ["config.json", "metadata.json", "model.weights.h5"]
        json.loads(archive.read("config.json")), json.loads(archive.read("metadata.json"))
        (tmp_path / "w.h5").write_bytes(archive.read("model.weights.h5"))
    kinds = []
    with h5py.File(tmp_path / "w.h5") as f:
        f.visititems(lambda name, obj: kinds.append(obj.dtype.kind) if isinstance(obj, h5py.Dataset) else None)
    assert kinds and set(kinds) <= set("fiub")
    # No pickle-based serialization anywhere in the package's code.
    for path in (ROOT / "tfp_scmix").rglob("*.py"):
        source = path.read_text()
        for word in ("import pickle", "cloudpickle", "import dill", "joblib", "allow_pickle=True", "safe_mode=False"):
            assert word not in source, f"{path} uses {word}"


def test_saved_model_records_versions_and_data_fingerprint(embedded, tmp_path, caplog):
    data = few_labels(embedded)
    model = SCMix.from_data(data, Config(n_topics=4))
    assert model.provenance == provenance(data)
    assert model.provenance["data_fingerprint"] == data.fingerprint()
    assert {"tfp_scmix", "tensorflow", "keras", "tensorflow_probability"} <= set(model.provenance)
    assert "provenance" not in model.settings  # settings stay plain scalars (MLflow params, tuner space)
    path = save_model(model, tmp_path / "m.keras")
    assert load_model(path).provenance == model.provenance
    # A loaded model reports what it was made with, not the versions that load it.
    old = rewrite_archive(
        path,
        tmp_path / "old.keras",
        config=lambda c: {
            **c,
            "config": {**c["config"], "provenance": {**c["config"]["provenance"], "tfp_scmix": "0.0.9"}},
        },
    )
    with caplog.at_level(logging.WARNING, logger="tfp_scmix"):
        assert load_model(old).provenance["tfp_scmix"] == "0.0.9"
    assert "tfp_scmix 0.0.9" in caplog.text


def test_killed_save_leaves_the_previous_model_whole(saved, embedded, tmp_path):
    """`model.save(path)`, as Keras users write it, is the atomic `save_model` (before: 6 of 6 kills left a
    damaged 24 KB file where the model had been, issue 18)."""
    target = tmp_path / "model.keras"
    target.write_bytes(saved.read_bytes())
    # A process that dies (SIGKILL) halfway through writing the model's archive over `target`.
    done = run_python(f"""
        import os, signal, zipfile
        import keras
        from tfp_scmix.io import load_model
        model = load_model({str(saved)!r})
        model.topics.loc.assign(model.topics.loc * 0)
        write = zipfile.ZipFile.writestr
        def dying_write(self, name, data, *args, **kwargs):
            write(self, name, data, *args, **kwargs)
            if str(name).endswith("weights.h5"):  # the archive's central directory is not written yet
                os.kill(os.getpid(), signal.SIGKILL)
        zipfile.ZipFile.writestr = dying_write
        model.save({str(target)!r})
    """)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert target.read_bytes() == saved.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name != "model.keras"]  # the dead write's temp, not the target
    # A results file whose writing fails midway: the old one stays, no partial file appears.
    results = tmp_path / "results.csv"
    write_csv(pd.DataFrame({"cell": ["a"], "label": ["B"]}), results)

    class Unprintable:
        def __str__(self):
            raise OSError("disk full")

    frame = pd.DataFrame({"cell": [f"c{i}" for i in range(5000)], "label": ["T"] * 4999 + [Unprintable()]})
    with pytest.raises(OSError, match="disk full"):
        write_csv(frame, results, chunksize=100)
    assert results.read_text() == "cell,label\na,B\n"


@pytest.mark.parametrize("name", ["model", "model.h5", "model.keras.tmp", "weights.h5"])
def test_save_model_refuses_other_suffixes_before_writing_anything(small_model, tmp_path, name):
    with pytest.raises(ModelFileError, match=r"must end in '\.keras'.*pass e\.g\. .*\.keras"):
        save_model(small_model, tmp_path / "out" / name)
    assert list(tmp_path.iterdir()) == []  # not even the folder
    (tmp_path / "folder.keras").mkdir()
    with pytest.raises(ModelFileError, match="is a folder"):
        save_model(small_model, tmp_path / "folder.keras")
    assert list((tmp_path / "folder.keras").iterdir()) == []


def test_a_folder_that_cannot_hold_the_file_is_named_in_a_clear_error(small_model, tmp_path):
    """A file where the folder should be, or a folder where no file can be made (/proc refuses new files even to
    root, whom os.access lets write anywhere): ModelFileError naming the path asked for, WriteError (an OSError)
    from the other writers. They raised FileExistsError from pathlib and FileNotFoundError naming the temporary
    file."""
    (tmp_path / "afile").write_text("x")
    for path in (tmp_path / "afile" / "m.keras", tmp_path / "afile" / "sub" / "m.keras"):
        with pytest.raises(ModelFileError, match=r"afile is a file, not a folder; choose another path"):
            save_model(small_model, path)
        with pytest.raises(WriteError, match=r"cannot write .*m\.csv: .*afile is a file, not a folder"):
            write_csv(pd.DataFrame({"a": [1]}), path.with_suffix(".csv"))
    with pytest.raises(WriteError, match="afile is a file"):
        with atomic_directory(tmp_path / "afile" / "export"):
            pass
    if Path("/proc/self").is_dir():
        with pytest.raises(ModelFileError, match=r"cannot write /proc/m\.keras: .*choose a folder you can write to"):
            save_model(small_model, "/proc/m.keras")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_model_save_is_save_model(small_model, embedded, tmp_path):
    """Keras's `model.save` on an SCMix or SCMixEnsemble takes the package's atomic path: a .keras file
    that loads and predicts the same, and no legacy .h5 file that load_model would refuse."""
    for model in (small_model, small_model.members[0]):
        with pytest.raises(ModelFileError, match=r"must end in '\.keras'"):
            model.save(tmp_path / "model.h5")
        model.save(tmp_path / "model.keras")
        np.testing.assert_array_equal(
            predict(load_model(tmp_path / "model.keras"), embedded)["probs"], predict(model, embedded)["probs"]
        )
        with pytest.raises(FileExistsError):
            model.save(tmp_path / "model.keras", overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


def test_sizes_in_the_config_are_checked_before_anything_is_built(saved, tmp_path, monkeypatch):
    """A config whose sizes claim more weights than the file stores (n_topics 200000 in a 7 MB file reached
    15.8 GB before it was refused, issue 18), an oversized or deeply nested config.json, or a malformed
    one, is refused from the archive's directory and JSON alone: nothing is built."""
    from tfp_scmix import io

    built = []
    monkeypatch.setattr(SCMix, "from_config", classmethod(lambda cls, config: built.append(config)))

    def set_config(**changes):
        def change(config):
            config["config"]["config"].update(changes)
            return config

        return change

    huge = rewrite_archive(saved, tmp_path / "huge.keras", config=set_config(n_topics=200_000))
    with pytest.raises(ModelFileError, match=r"describes weights of at least 1167\.7 MB but the file stores"):
        load_model(huge)
    wide = rewrite_archive(saved, tmp_path / "wide.keras", config=set_config(hidden_units=10**7))
    with pytest.raises(ModelFileError, match="describes weights of at least"):
        load_model(wide)
    bad = rewrite_archive(saved, tmp_path / "bad.keras", config=set_config(n_topics="many"))
    with pytest.raises(ModelFileError, match="malformed model config.*n_topics is 'many'"):
        load_model(bad)
    nested = tmp_path / "nested.keras"
    with zipfile.ZipFile(saved) as old, zipfile.ZipFile(nested, "w") as new:
        for name in old.namelist():
            new.writestr(name, "[" * 100_000 + "]" * 100_000 if name == "config.json" else old.read(name))
    with pytest.raises(ModelFileError, match="damaged .keras archive .RecursionError"):
        load_model(nested)
    monkeypatch.setattr(io, "MAX_CONFIG_BYTES", 1000)
    with pytest.raises(ModelFileError, match=r"its config.json is 0 MB, above the 0 MB.*Refusing to read it"):
        load_model(saved)
    assert built == []


def test_save_model_writes_one_loadable_file_and_nothing_else(small_model, embedded, tmp_path):
    path = save_model(small_model, tmp_path / "deep" / "er" / "ensemble.keras")
    assert path == tmp_path / "deep" / "er" / "ensemble.keras"
    assert [p.name for p in path.parent.iterdir()] == ["ensemble.keras"]  # no temporary file left
    np.testing.assert_array_equal(predict(load_model(path), embedded)["probs"], predict(small_model, embedded)["probs"])


def test_atomic_writes_get_a_new_file_s_usual_mode(tmp_path):
    import os

    from tfp_scmix.io import atomic_directory, atomic_path

    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "table.csv") as tmp:
            Path(tmp).write_text("a\n")
        with atomic_directory(tmp_path / "export") as folder:
            (folder / "x").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "table.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755


def test_an_atomic_write_through_a_symbolic_link_keeps_the_link(tmp_path):
    """`annotate --out link.h5ad` (a trial's output was a link into a shared folder) replaced the link with a file."""
    from tfp_scmix.io import atomic_path

    target = tmp_path / "shared" / "annotated.h5ad"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "annotated.h5ad"
    link.symlink_to(target)
    with atomic_path(link) as tmp:
        Path(tmp).write_text("new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["annotated.h5ad"]  # no temporary file left
