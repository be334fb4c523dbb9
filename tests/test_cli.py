"""The command line: `tfp-scmix demo | train | annotate | explain`."""

import importlib
import json
import os
import re
import signal
import time

import numpy as np
import pytest
import scipy.sparse as sp

import tfp_scmix as scm
from tfp_scmix import explain
from tfp_scmix.cli import main


def test_cli_demo_trains_the_package_default():
    """The demo shows the model a user gets: Config()'s topics, minibatch and epochs, three restarts."""
    from tfp_scmix.cli import build_parser
    from tfp_scmix.config import Config

    args, defaults = build_parser().parse_args(["demo"]), Config()
    assert (args.topics, args.batch_size, args.epochs) == (defaults.n_topics, defaults.batch_size, defaults.epochs)
    assert args.restarts == 3 and args.classifier_steps == defaults.classifier_steps


def test_cli_demo_runs_end_to_end(tmp_path, capsys):
    assert (
        main(
            ["demo", "--epochs", "2", "--topics", "8", "--restarts", "2", "--classifier-steps", "300"]
            + ["--verbose", "0", "--out", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "held-out cells: accuracy" in out and "Top genes" in out and "Genes that weigh most" in out
    # each class's labelled cells beside its genes, the classes of too few to rely on starred (the rare types)
    section = out.split("Genes that weigh most")[1].split("Top genes")[0]
    counted = re.findall(r"^  .+? \((\d+)(\*?)\) ", section, flags=re.M)
    assert len(counted) == 10 and sum(int(n) for n, _ in counted) == 150
    assert all((star == "*") == (int(n) < explain.FEW_LABELS) for n, star in counted)
    assert any(star for _, star in counted)
    assert "peer logistic regression: accuracy" in out and "peer linear svm: accuracy" in out
    assert "peer label spreading: accuracy" in out and "peer knn pca k5: accuracy" in out
    assert "with the known labels and the neighbours' pooled counts (annotate label_key): accuracy" in out
    assert (tmp_path / "model.keras").exists() and (tmp_path / "explanations" / "class_topics.csv").exists()
    # The demo's model (an ensemble of 2 restarts) annotates and explains from the command line.
    from tfp_scmix.datasets import pbmc68k_reduced

    demo_model = scm.load_model(tmp_path / "model.keras")
    assert len(demo_model.members) == 2 and demo_model.members[0].config.classifier_steps == 300
    query = pbmc68k_reduced()
    query.obs["known"] = query.obs["cell_type"].astype(str).where(np.arange(700) % 5 == 0, "Unknown")
    query.write_h5ad(tmp_path / "query.h5ad")
    assert (
        main(
            [
                "annotate",
                str(tmp_path / "model.keras"),
                str(tmp_path / "query.h5ad"),
                "--out",
                str(tmp_path / "annotated.h5ad"),
                "--label-key",
                "known",
                "--unlabeled-category",
                "Unknown",
            ]
        )
        == 0
    )
    assert "calls differ (obs scmix_with_labels)" in capsys.readouterr().out
    annotated = scm.data.read_h5ad(tmp_path / "annotated.h5ad")
    assert annotated.obsm["scmix_with_labels_probs"].shape == (700, 10)
    known = annotated.obs["known"] != "Unknown"
    assert (annotated.obs["scmix_with_labels"][known].astype(str) == annotated.obs["known"][known]).all()
    assert annotated.obsm["scmix_cell_topic"].shape == (700, 16)
    assert annotated.obs["scmix_label"].cat.categories.isin(annotated.obs["scmix_label"]).all()
    assert "scmix_novel" in annotated.obs and annotated.obsm["X_scmix"].shape == (700, 16)
    # A stored 2-D embedding is drawn as it is (t-SNE of 700 cells would take half a minute here:
    # tests/test_explain.py embeds a few cells).
    annotated.obsm["X_scmix_umap"] = annotated.obsm["X_scmix"][:, :2]
    annotated.write_h5ad(tmp_path / "annotated.h5ad")
    args = ["explain", str(tmp_path / "model.keras"), "--out", str(tmp_path / "explained")]
    assert main([*args, "--data", str(tmp_path / "annotated.h5ad"), "--label-key", "cell_type"]) == 0
    assert (tmp_path / "explained" / "class_genes.csv").exists()
    for figure in ("embedding", "confusion", "reliability", "confidence", "dotplot", "topic_genes", "class_topics"):
        assert (tmp_path / "explained" / f"{figure}.png").stat().st_size > 10_000
    # A file annotated by another model: annotated again with this one for the figures (a trial's dotplot mixed two
    # models), and said.
    annotated.uns["scmix"]["model_data_fingerprint"] = "another-training-set"
    annotated.write_h5ad(tmp_path / "other_model.h5ad")
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "explained_again"), "--data", str(tmp_path / "other_model.h5ad")]) == 0
    assert "was annotated by another model: annotated with" in capsys.readouterr().out
    assert (tmp_path / "explained_again" / "dotplot.png").is_file()
    assert main(["export", str(tmp_path / "model.keras"), str(tmp_path / "export" / "1")]) == 0
    assert (tmp_path / "export" / "1" / "saved_model.pb").exists()
    (tmp_path / "broken.keras").write_bytes(b"not a model")
    capsys.readouterr()
    assert (
        main(
            [
                "annotate",
                str(tmp_path / "broken.keras"),
                str(tmp_path / "query.h5ad"),
                "--out",
                str(tmp_path / "never.h5ad"),
            ]
        )
        == 2
    )
    assert "broken.keras" in capsys.readouterr().err and not (tmp_path / "never.h5ad").exists()
    args = ["annotate", str(tmp_path / "model.keras"), str(tmp_path / "query.h5ad"), "--out", str(tmp_path / "a.csv")]
    assert main(args) == 2
    assert "must end in .h5ad" in capsys.readouterr().err and not (tmp_path / "a.csv").exists()
    # Errors of the file system are one line too (exit 2), not a traceback.
    assert main(["export", str(tmp_path / "model.keras"), str(tmp_path / "export" / "1")]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    # Data that cannot be annotated stop explain before it writes anything.
    query.X = sp.csr_matrix(np.log1p(query.X.toarray()))
    query.write_h5ad(tmp_path / "lognorm.h5ad")
    args = ["explain", str(tmp_path / "model.keras"), "--out", str(tmp_path / "never_explained")]
    assert main([*args, "--data", str(tmp_path / "lognorm.h5ad")]) == 2
    assert "not integers" in capsys.readouterr().err and not (tmp_path / "never_explained").exists()


def test_cli_ctrl_c_says_what_was_kept(tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    from tfp_scmix.datasets import pbmc68k_reduced

    pbmc68k_reduced().write_h5ad(tmp_path / "query.h5ad")
    (tmp_path / "model.keras").write_bytes(b"stands in")
    monkeypatch.setattr(scm, "load_model", interrupt)
    out = str(tmp_path / "annotated.h5ad")
    assert main(["annotate", str(tmp_path / "model.keras"), str(tmp_path / "query.h5ad"), "--out", out]) == 130
    assert f"interrupted: nothing was written to {out}" in capsys.readouterr().err
    monkeypatch.setattr(scm, "train", interrupt)
    model = tmp_path / "new.keras"
    assert main(["train", str(tmp_path / "query.h5ad"), "--out", str(model), "--n-genes", "0"]) == 130
    assert "before the first epoch finished: nothing was written" in capsys.readouterr().err
    backup = tmp_path / ".new.keras.checkpoints"
    backup.mkdir()
    (backup / "epoch_3").write_text("")
    assert main(["train", str(tmp_path / "query.h5ad"), "--out", str(model), "--n-genes", "0"]) == 130
    err = capsys.readouterr().err
    assert f"backed up in {backup}; run the same command again to resume" in err and "Traceback" not in err

    # SIGTERM (kill, a scheduler's stop) is handled as Ctrl-C, with the shell's code 143 (before: a silent death).
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; this is never reached

    monkeypatch.setattr(scm, "train", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", str(tmp_path / "query.h5ad"), "--out", str(model), "--n-genes", "0"]) == 143
    assert f"backed up in {backup}; run the same command again to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is taken off again


def test_cli_trains_in_memory_and_streamed(synthetic_file, tmp_path, capsys):
    data, path = synthetic_file
    common = ["--epochs", "1", "--topics", "4", "--restarts", "1", "--batch-key", "donor", "--verbose", "0"]
    common += ["--classifier-steps", "50"]
    assert main(["train", str(path), "--out", str(tmp_path / "memory.keras"), "--n-genes", "0", *common]) == 0
    assert capsys.readouterr().out == ""  # --verbose 0: quiet
    stream = ["train", str(path), "--out", str(tmp_path / "stream.keras"), "--stream", *common, "--verbose", "1"]
    assert main([*stream, "--n-genes", "60"]) == 0  # the genes chosen on cells read from the file (it was ignored)
    printed = capsys.readouterr().out
    assert "60 highly variable genes, chosen on 700 cells of the file" in printed
    assert "700 cells x 60 genes; 200 labelled cells of 3 types" in printed
    assert scm.load_model(tmp_path / "stream.keras").n_genes == 60
    for name in ("memory", "stream"):
        model = scm.load_model(tmp_path / f"{name}.keras")
        (member,) = model.members
        assert member.config.n_topics == 4 and member.config.epochs == 1 and member.sizes["n_batches"] == 2
        assert np.isfinite(scm.predict(model, path)["probs"]).all()


def test_cli_trains_on_the_genes_another_dataset_shares_and_annotates_it_adapted(synthetic_file, tmp_path, capsys):
    """The README's cross-dataset recipe from the command line: train on the genes a second dataset also measures
    (--shared-genes), then annotate that dataset with its own batch offsets fitted first (--adapt)."""
    import anndata

    data, path = synthetic_file
    other = anndata.read_h5ad(path)[::2, 30:].copy()  # another "lab": half the cells, 90 of the 120 genes
    other_path = tmp_path / "other.h5ad"
    other.write_h5ad(other_path)
    model_path = tmp_path / "shared.keras"
    common = ["--epochs", "1", "--topics", "4", "--restarts", "1", "--verbose", "0", "--n-genes", "0"]
    common += ["--classifier-steps", "50"]
    train = ["train", str(path), "--out", str(model_path), "--shared-genes", str(other_path), *common, "--verbose", "1"]
    assert main(train) == 0
    assert f"90 of 120 genes are also in {other_path}" in capsys.readouterr().out
    model = scm.load_model(model_path)
    assert model.genes == list(other.var_names)
    out = tmp_path / "other_annotated.h5ad"
    assert main(["annotate", str(model_path), str(other_path), "--out", str(out), "--adapt"]) == 0
    assert "model adapted to the 350 cells" in capsys.readouterr().out
    annotated = anndata.read_h5ad(out)
    assert annotated.obs["scmix_label"].notna().all() and annotated.uns["scmix"]["gene_coverage"] == 1.0
    assert len(annotated.uns["scmix"]["model_adapted_to"]) == 1  # the call says its model was adapted
    assert scm.load_model(model_path).members[0].sizes["n_batches"] == 1  # the file is unchanged
    # A second annotation under another prefix keeps the first's results; what smoothing changed is said.
    again = ["annotate", str(model_path), str(out), "--out", str(out), "--key-added", "second", "--smooth"]
    assert main([*again, "--unassign-flagged"]) == 2  # the file exists (it is the input): refused, unchanged
    assert "(it is the input): pass --overwrite" in capsys.readouterr().err
    assert main([*again, "--unassign-flagged", "--overwrite"]) == 0
    said = capsys.readouterr().out
    assert "smoothed over the neighbours:" in said and "calls differ (obs second_smoothed)" in said
    assert "--unassign-flagged makes them" not in said
    both = anndata.read_h5ad(out)
    assert {"scmix_label", "second_label", "second_smoothed"} <= set(both.obs) and "second" in both.uns
    # Too few shared genes are refused with the reason, before training: none; or two, where the other dataset
    # writes the rest in another case (another species' symbols: it trained on 2 genes and failed midway);
    # --stream cannot select genes.
    none = anndata.AnnData(X=other.X[:, :3], obs=other.obs, var=other.var.iloc[:3].set_axis(["a", "b", "c"]))
    none.write_h5ad(tmp_path / "none.h5ad")
    cased = other.copy()
    cased.var_names = [name if i < 2 else name.capitalize() for i, name in enumerate(other.var_names)]
    cased.write_h5ad(tmp_path / "cased.h5ad")
    for extra, message in [
        (["--shared-genes", str(tmp_path / "none.h5ad")], "only 0 of the training data's 120 genes are in"),
        (["--shared-genes", str(tmp_path / "cased.h5ad")], "Many genes match only when case is ignored"),
        (["--shared-genes", str(other_path), "--stream"], "--shared-genes selects genes in memory"),
    ]:
        assert main(["train", str(path), "--out", str(tmp_path / "x.keras"), *extra, *common]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.keras").exists()


def test_cli_train_refuses_a_bad_model_path_or_data_before_training(synthetic_file, tmp_path, capsys):
    _, path = synthetic_file
    assert main(["train", str(path), "--out", str(tmp_path / "model.h5"), "--epochs", "1"]) == 2
    assert "must end in '.keras'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "model.keras")]) == 2
    assert "missing.h5ad" in capsys.readouterr().err
    assert main(["train", str(path), "--out", str(tmp_path / "model.keras"), "--label-key", "celltype"]) == 2
    assert "no obs column 'celltype' in " in (err := capsys.readouterr().err) and "(did you mean 'cell_type'?)" in err
    # Counts out of range are refused as the command line is read, before any data (argparse: exit status 2).
    for option, value, message in [
        ("--restarts", "0", "must be at least 1, received 0"),
        ("--epochs", "-1", "must be at least 1, received -1"),
        ("--topics", "ten", "must be a whole number, received 'ten'"),
        ("--seed", "-3", "must be at least 0, received -3"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["train", str(path), "--out", str(tmp_path / "model.keras"), option, value])
        assert exit_.value.code == 2 and f"argument {option}: {message}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # before the export is written, not after
        main(
            [
                "export",
                str(tmp_path / "model.keras"),
                str(tmp_path / "out"),
                "--mlflow-experiment",
                "x",
                "--max-cells",
                "0",
            ]
        )
    assert exit_.value.code == 2 and "argument --max-cells: must be at least 1, received 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # An existing model is not replaced by a new training unless asked (a trial lost a model to a typo in --out).
    existing = tmp_path / "kept.keras"
    existing.write_bytes(b"a model of hours")
    assert main(["train", str(path), "--out", str(existing), "--epochs", "1"]) == 2
    assert "kept.keras already exists: pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"a model of hours"
    # explain's --out onto a file: what to name instead (was "[Errno 17] File exists").
    assert main(["explain", str(existing), "--out", str(existing)]) == 2
    assert "is a file: name a folder" in capsys.readouterr().err


def test_a_missing_model_or_data_file_fails_before_tensorflow_is_imported(synthetic_file, tmp_path):
    """A mistyped path is named at once: no TensorFlow import (seconds) before the error."""
    from tests.helpers import run_python

    _, path = synthetic_file
    script = """
        import sys
        from tfp_scmix.cli import main
        code = main(sys.argv[1:])
        print(code, "tensorflow" in sys.modules)
        """
    exported = tmp_path / "export" / "1"
    exported.mkdir(parents=True)
    (exported / "saved_model.pb").write_bytes(b"")
    model = tmp_path / "m.keras"
    model.write_bytes(b"")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("kept")
    for argv, named in (
        (["annotate", tmp_path / "none.keras", path, "--out", tmp_path / "a.h5ad"], "no model file at"),
        (["annotate", tmp_path / "none", path, "--out", tmp_path / "a.h5ad"], "--out MODEL.keras"),
        (["train", tmp_path / "missing.h5ad", "--out", tmp_path / "new.keras"], "missing.h5ad"),
        (["explain", tmp_path / "none.keras", "--out", tmp_path / "e"], "no model file at"),
        # A SavedModel folder given as the model: what it is, and what the command reads instead.
        (["annotate", exported, path, "--out", tmp_path / "a.h5ad"], "is a SavedModel export, for serving"),
        # An export onto an existing folder without --overwrite: refused before the model is loaded (7 s).
        (["export", model, exported], "already exists: pass --overwrite to replace the export"),
        # Without --overwrite onto a folder that is not an export: not told to pass --overwrite, which refuses it too.
        (["export", model, tmp_path / "results"], "already exists and is not a SavedModel export"),
        # --overwrite onto a folder of the user's that is not an export: refused at once too, and left as it is.
        (["export", model, tmp_path / "results", "--overwrite"], "is a folder that is not a SavedModel export"),
        # annotate onto an existing file, as train: refused without --overwrite (a trial's was replaced silently).
        (["annotate", model, path, "--out", path], "already exists (it is the input): pass --overwrite to replace it"),
    ):
        run = run_python(script, *argv)
        assert run.stdout.split() == ["2", "False"], (argv, run.stdout, run.stderr)
        assert named in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "m.keras", "results"]
    assert (tmp_path / "results" / "table.csv").read_text() == "kept"


def test_an_interrupt_between_the_last_epoch_and_the_save_keeps_the_training(
    synthetic_file, tmp_path, monkeypatch, capsys
):
    """Ctrl-C after the last epoch, before the model is written (a trial: "interrupted before the first epoch
    finished: nothing was written", every restart lost): the finished restarts stay backed up, the message says
    so, and the same command loads them instead of training again."""
    from tfp_scmix.cli import main

    _, path = synthetic_file
    out = tmp_path / "model.keras"
    argv = ["train", str(path), "--out", str(out), "--epochs", "2", "--topics", "4", "--restarts", "2"]
    argv += ["--batch-size", "64", "--n-genes", "0", "--classifier-steps", "20", "--kl-warmup-epochs", "2"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scm, "save_model", interrupted)
    assert main([*argv, "--verbose", "0"]) == 130
    assert "backed up in" in capsys.readouterr().err
    checkpoints = tmp_path / ".model.keras.checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["restart-0.keras", "restart-1.keras"]
    monkeypatch.undo()
    assert main(argv) == 0  # with its INFO lines (the default --verbose 1)
    said = capsys.readouterr().err
    assert said.count("was finished by an earlier run: loaded from") == 2
    # --kl-warmup-epochs within the epochs: no warning that the KL terms never reach their weight (a trial: the
    # warning named options only Python and run configurations had).
    assert "kl_warmup_epochs" not in said and scm.load_model(out).members[0].config.kl_warmup_epochs == 2
    assert out.is_file() and not checkpoints.exists()


def test_an_interrupt_while_a_finished_restart_is_saved_resumes_after_its_last_epoch(
    synthetic_file, tmp_path, monkeypatch, capsys
):
    """Ctrl-C after a restart's last epoch, before the restart itself is saved (a trial: "interrupted before the first
    epoch finished: nothing was written", an empty checkpoint folder, the whole restart trained again): its epoch
    backup stays until the restart is saved, the message says so, and the same command goes on after the last epoch
    to the model of an uninterrupted run."""
    from tfp_scmix.cli import main

    train_module = importlib.import_module("tfp_scmix.train")  # the package's `train` is the function

    _, path = synthetic_file
    argv = ["train", str(path), "--epochs", "2", "--topics", "4", "--restarts", "1", "--batch-size", "64"]
    argv += ["--n-genes", "0", "--classifier-steps", "20", "--kl-warmup-epochs", "2"]
    out, reference = tmp_path / "model.keras", tmp_path / "reference.keras"
    assert main([*argv, "--out", str(reference), "--verbose", "0"]) == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_model", interrupted)
    assert main([*argv, "--out", str(out), "--verbose", "0"]) == 130
    assert "backed up in" in capsys.readouterr().err
    backup = tmp_path / ".model.keras.checkpoints" / "restart-0"
    assert json.loads((backup / "state.json").read_text())["epoch"] == 2
    monkeypatch.undo()
    assert main([*argv, "--out", str(out)]) == 0
    assert "all 2 epochs were finished before" in capsys.readouterr().err
    assert out.is_file() and not (tmp_path / ".model.keras.checkpoints").exists()
    counts = scm.from_anndata(str(path)).counts
    expected, resumed = scm.predict(scm.load_model(reference), counts), scm.predict(scm.load_model(out), counts)
    np.testing.assert_array_equal(resumed["probs"], expected["probs"])


def test_cli_train_killed_and_run_again_resumes_then_annotates_in_bounded_memory(synthetic_file, tmp_path, capsys):
    """`tfp-scmix train`, killed after some epochs and run again with the same command, resumes from its last
    finished epoch (before: from epoch 1, issue 18): its backups are in `.model.keras.checkpoints` beside
    --out by default, removed once the model is saved. `annotate` then reads the file backed and writes
    what the in-memory annotate gives."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import anndata

    from tests.helpers import ROOT

    _, path = synthetic_file
    out = tmp_path / "model.keras"
    command = [sys.executable, "-m", "tfp_scmix", "train", str(path), "--out", str(out), "--epochs", "10"]
    command += ["--topics", "4", "--restarts", "1", "--batch-size", "64", "--n-genes", "0", "--verbose", "0"]
    command += ["--classifier-steps", "50"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    state = tmp_path / ".model.keras.checkpoints" / "restart-0" / "state.json"
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (state.exists() and json.loads(state.read_text())["epoch"] >= 2):
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no backup of epoch 2 within 180 s"
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not out.exists()
    killed_at = json.loads(state.read_text())["epoch"]
    rerun = command.copy()
    rerun[rerun.index("--verbose") + 1] = "1"  # the resuming line is a status line: --verbose 0 hides it
    again = subprocess.run(rerun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming training at epoch {killed_at + 1} from" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]

    annotated = tmp_path / "annotated.h5ad"
    assert main(["annotate", str(out), str(path), "--out", str(annotated), "--min-confidence", "0.5"]) == 0
    expected = scm.annotate(scm.load_model(out), anndata.read_h5ad(path), min_confidence=0.5)
    written = anndata.read_h5ad(annotated)
    np.testing.assert_array_equal(written.obs["scmix_label"].to_numpy(), expected.obs["scmix_label"].to_numpy())
    assert (written.X != expected.X).nnz == 0
    capsys.readouterr()
    assert main(["annotate", str(out), str(path), "--out", str(tmp_path / "x.h5ad"), "--min-confidence", "95"]) == 2
    assert "min_confidence must be a number in [0, 1], received 95.0 (a probability: 95% is 0.95)" in (
        capsys.readouterr().err
    )
    assert main(["train", str(path), "--out", str(tmp_path / "few.keras"), "--n-genes", "1", "--epochs", "1"]) == 2
    assert "have no counts over the 1 genes trained on" in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists() and not (tmp_path / "few.keras").exists()


def test_help_and_version_answer_without_tensorflow_and_runs_are_quiet(synthetic_file, tmp_path):
    """`--help` / `--version` import no TensorFlow; a training run writes one progress bar and a summary,
    and none of TensorFlow's log lines or Keras's warnings."""
    from tests.helpers import run_python

    check = run_python(
        """
        import sys
        from tfp_scmix.cli import main
        try:
            main(sys.argv[1:])
        except SystemExit:
            pass
        print("tensorflow" in sys.modules, "keras" in sys.modules)
        """,
        "--version",
    )
    assert check.returncode == 0 and check.stdout.split() == ["tfp-scmix", scm.__version__, "False", "False"]
    _, path = synthetic_file
    # A model train would replace is refused before TensorFlow's import too (a trial waited 6 s for the refusal).
    (tmp_path / "kept.keras").write_bytes(b"a model")
    refused = run_python(
        "import sys; from tfp_scmix.cli import main; print(main(sys.argv[1:]), 'tensorflow' in sys.modules)",
        "train", path, "--out", tmp_path / "kept.keras",
    )  # fmt: skip
    assert refused.stdout.split() == ["2", "False"] and "kept.keras already exists" in refused.stderr, refused
    run = run_python(
        "import sys; from tfp_scmix.cli import main; sys.exit(main(sys.argv[1:]))",
        "train", path, "--out", tmp_path / "m.keras", "--epochs", "1", "--topics", "4", "--restarts", "2",
        "--n-genes", "0", "--classifier-steps", "50",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "trained 2 model(s) x 1 epochs on 700 cells x 120 genes" in run.stdout
    noise = [line for line in run.stderr.replace("\r", "\n").splitlines() if line and "epoch" not in line]
    assert noise == [], noise  # the progress bar's updates only
    assert "2/2" in run.stderr  # one bar over restarts x epochs
    # TensorFlow imported by the user after tfp_scmix, directly or through Keras, starts quietly too (it wrote
    # absl's and CUDA probing's lines twice), and is TensorFlow as usual.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TFP_SCMIX_VERBOSE")}
    user = run_python(
        "import tfp_scmix; import tensorflow as tf; import keras; print(int(tf.constant(2) + 1), type(tf.__loader__))",
        env=env,
    )
    assert user.returncode == 0 and user.stdout.split()[0] == "3" and "Quiet" not in user.stdout, user.stderr
    assert user.stderr == "", user.stderr


def test_run_script_help_lists_the_commands_without_installing():
    """`./run --help` prints the commands of the README's entry script (it used to be taken for a module name);
    another option is refused with a pointer to --help. Both exit before the environment is touched."""
    import subprocess

    from tests.helpers import ROOT

    help_text = subprocess.run(["bash", "run", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "./run demo" in help_text.stdout and "./run test" in help_text.stdout and not help_text.stderr
    refused = subprocess.run(["bash", "run", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown option --bogus; ./run --help lists the commands" in refused.stderr


def test_ctrl_c_while_tensorflow_loads_is_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C in a command's first seconds, while TensorFlow is imported, printed an 80-line traceback."""
    import builtins

    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "tfp_scmix.callbacks":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    (tmp_path / "model.keras").write_bytes(b"stands in")
    (tmp_path / "data.h5ad").write_bytes(b"stands in")
    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    out = str(tmp_path / "annotated.h5ad")
    assert main(["annotate", str(tmp_path / "model.keras"), str(tmp_path / "data.h5ad"), "--out", out]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: nothing was written to {out}" in err and "Traceback" not in err


def test_ctrl_c_before_any_backup_says_nothing_was_written(tmp_path):
    """A checkpoint folder holding only the empty folder of a restart (made when training starts) has no finished
    epoch: Ctrl-C then says so (it said the finished epochs were backed up)."""
    import argparse

    from tfp_scmix.cli import interrupted

    args = argparse.Namespace(command="train", checkpoint_dir=str(tmp_path / "ck"), out=str(tmp_path / "m.keras"))
    (tmp_path / "ck" / "restart-0").mkdir(parents=True)
    assert interrupted(args) == "interrupted before the first epoch finished: nothing was written"
    (tmp_path / "ck" / "restart-0" / "state.json").write_text("{}")
    assert interrupted(args).startswith("interrupted: the finished epochs and restarts are backed up in")


def test_a_status_line_during_a_progress_bar_gets_a_line_of_its_own(capsys):
    """The command line's INFO and WARNING lines go through tqdm: a line logged while the bar is drawn starts its own
    line (a trial's log read "...0/60 [00:00<?, ?epoch/s]INFO: resuming training at epoch 20")."""
    import logging

    from tfp_scmix.callbacks import ProgressBar
    from tfp_scmix.cli import _log_to_stderr

    with _log_to_stderr():
        bar = ProgressBar(60)
        logging.getLogger("tfp_scmix").info("resuming training at epoch 20")
        bar.close()
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "INFO: resuming training at epoch 20" in lines, lines


def test_status_lines_show_once_and_not_at_verbose_0(capsys):
    """A command's INFO line repeated by its steps (a trial saw "INFO: using raw counts from adata.raw.X" three
    times) shows once; `--verbose 0` hides the INFO lines and keeps the warnings."""
    import logging

    from tfp_scmix.cli import _log_to_stderr

    log = logging.getLogger("tfp_scmix")
    for verbose, expected in ((1, ["INFO: using raw counts from adata.raw.X", "WARNING: few genes"]), (0, None)):
        with _log_to_stderr(verbose):
            for _ in range(3):
                log.info("using raw counts from adata.raw.X")
                log.warning("few genes")
        lines = capsys.readouterr().err.splitlines()
        assert lines == (expected or ["WARNING: few genes"]), lines


def test_an_unknown_option_is_reported_by_its_command_with_the_closest_one(capsys):
    """A typo in a command's option printed the top-level usage (the list of commands) and no suggestion."""
    for argv, command, closest in [
        (["annotate", "m.keras", "d.h5ad", "--out", "x.h5ad", "--smoth"], "annotate", "--smooth"),
        (["train", "d.h5ad", "--out", "x.keras", "--unlabelled-category", "Unknown"], "train", "--unlabeled-category"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"tfp-scmix {command}: error: unrecognized arguments" in err
        assert f"(did you mean {closest!r}?)" in err and f"usage: tfp-scmix {command}" in err


def test_an_interrupt_while_logging_to_mlflow_says_what_was_written(synthetic_file, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the model or export is written, while it is logged to MLflow (a trial: "nothing was written",
    beside a whole model file): the message names what was written and how to log it."""
    from tfp_scmix import export, tracking
    from tfp_scmix.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "log_training", interrupted)
    monkeypatch.setattr(export, "log_to_experiment", interrupted)
    _, path = synthetic_file
    out = tmp_path / "model.keras"
    argv = ["train", str(path), "--out", str(out), "--epochs", "1", "--topics", "4", "--restarts", "1"]
    assert main([*argv, "--n-genes", "0", "--classifier-steps", "5", "--mlflow", "--verbose", "0"]) == 130
    said = capsys.readouterr().err
    assert f"{out} was written whole; its MLflow run is marked KILLED" in said and "nothing was written" not in said
    assert scm.load_model(out).n_genes == 120
    exported = tmp_path / "export" / "1"
    assert main(["export", str(out), str(exported), "--mlflow-experiment", "serving", "--verbose", "0"]) == 130
    said = capsys.readouterr().err
    assert f"{exported} was written whole; the MLflow model was not logged" in said
    assert (exported / "saved_model.pb").is_file()
