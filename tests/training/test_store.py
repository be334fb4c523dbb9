"""training/store.py: where runs are recorded, and a tracked run against a real MLflow tracking server."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import tfp_scmix as scm
from training import run as tracked
from training import store


def test_store_defaults_to_mlruns_and_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(store.TRACKING_URI_ENV, raising=False)
    assert store.tracking_uri() == f"sqlite:///{store.REPO / 'mlruns' / 'mlflow.db'}"
    assert store.uses_default_store()
    store.configure()  # sets $MLFLOW_TRACKING_URI to the default store (mlflow.set_tracking_uri): still the default
    assert store.uses_default_store()
    assert store._artifact_location("few shot") == (store.REPO / "mlruns" / "artifacts" / "few shot").as_uri()
    monkeypatch.setenv(store.TRACKING_URI_ENV, f"sqlite:///{tmp_path / 'other.db'}")
    assert not store.uses_default_store()
    assert store.configure() == mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'other.db'}"
    assert store._artifact_location("x") == (tmp_path / "artifacts" / "x").as_uri()
    monkeypatch.setenv(store.TRACKING_URI_ENV, "http://127.0.0.1:5000")
    assert store._artifact_location("x") is None  # the server decides


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracked_run_against_an_mlflow_server(tmp_path, monkeypatch, small_config):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
            "--default-artifact-root",
            str(tmp_path / "art"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group
        env={k: v for k, v in os.environ.items() if k != store.TRACKING_URI_ENV},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(0.5)
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv(store.TRACKING_URI_ENV, uri)
        run_id, _, scores = tracked.train(small_config("training.epochs=1", "experiment='server'"))
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["data.n_cells"] == "700"
        assert run.data.metrics["test_macro_f1"] == pytest.approx(scores["test_macro_f1"])
        assert [m.step for m in client.get_metric_history(run_id, "restart_0/val_macro_f1")] == [0]
        assert "model/scmix.keras" in {a.path for a in client.list_artifacts(run_id, "model")}
        assert {"confusion_matrix.csv", "confusion_matrix.png"} <= {
            Path(a.path).name for a in client.list_artifacts(run_id, "evaluation/test")
        }
        (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
        assert logged.source_run_id == run_id
        assert isinstance(mlflow.keras.load_model(logged.model_uri), scm.SCMixEnsemble)
        assert str(tmp_path / "art") in run.info.artifact_uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # any worker that outlived it
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=20)
        log.close()
