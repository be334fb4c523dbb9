"""Kill-and-resume check: a training run killed by SIGKILL midway and started again ends with the same
predictions as an uninterrupted run with the same seed.

    ./run experiments.reliability.resume                          # 30 topics, 40 epochs, kill after epoch 10
    ./run experiments.reliability.resume --epochs 6 --topics 8 --kill-after 2   # the size the tests use
    ./run experiments.reliability.resume --keras-backup           # plain BackupAndRestore, for comparison

Starts this file with --train three times on the embedded dataset (150 labels), each training one model
with `tfp_scmix.train(..., restarts=1, checkpoint_dir=...)` after `make_deterministic`: uninterrupted (or
takes --reference, the predictions of an uninterrupted run made elsewhere); killed (SIGKILL) as soon as
its backup of epoch --kill-after is committed; the same command again, which resumes from that backup.
Writes results.json beside this file (or at --out): where the kill landed, the epoch the second run
resumed at, whether the predictions are identical, the largest difference, timings.
--keras-backup passes keras.callbacks.BackupAndRestore to `tfp_scmix.train` instead of a checkpoint_dir
(so minibatches come from SCData.dataset), to show what that alone gives.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import write_json

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def train(args):
    """One training run through `tfp_scmix.train` (one restart, resumable from `args.backup_dir`: its
    checkpoint_dir, or a temporary one when none is given so that minibatches come from the same
    `epoch_batches`); returns the predictions for every cell ({"probs", "label", "confidence", "cell_topic"})."""
    import tempfile

    import keras

    import tfp_scmix as scm
    from tfp_scmix.datasets import pbmc68k_reduced
    from tfp_scmix.train import make_deterministic

    make_deterministic(args.seed)
    data = scm.from_anndata(pbmc68k_reduced())
    data = data.hide_labels(np.random.default_rng(args.seed).permutation(data.n_cells)[:150])
    config = scm.Config(n_topics=args.topics, batch_size=args.batch_size, classifier_steps=args.classifier_steps)

    class Pause(keras.callbacks.Callback):
        """Sleeps after each epoch's backup so that a kill lands mid-run; changes no number."""

        def on_epoch_end(self, epoch, logs=None):
            time.sleep(args.epoch_delay)

    options = dict(restarts=1, epochs=args.epochs, seed=args.seed, verbose=0)
    if args.keras_backup:
        backup = [keras.callbacks.BackupAndRestore(args.backup_dir, delete_checkpoint=False)] if args.backup_dir else []
        print(f"starting at epoch {backup_epoch(args.backup_dir or '-', keras_backup=True)}", flush=True)
        model = scm.train(data, config, callbacks=backup + [Pause()], **options)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint_dir = args.backup_dir or scratch
            print(f"starting at epoch {backup_epoch(checkpoint_dir, keras_backup=False)}", flush=True)
            model = scm.train(data, config, checkpoint_dir=checkpoint_dir, callbacks=[Pause()], **options)
    return scm.predict(model, data)


def train_and_save(args):
    """The child process: `train`, write the predictions, then drop what is left of the backup folder.
    (`tfp_scmix.train` deletes its own backups once it finishes; a kill before the predictions are
    written then trains again from the start.)"""
    from tfp_scmix.io import atomic_path

    predictions = train(args)
    with atomic_path(args.predictions) as tmp:
        np.savez(tmp, **predictions)
    shutil.rmtree(args.backup_dir, ignore_errors=True)


def backup_epoch(backup_dir, keras_backup):
    """The epoch of the committed backup in `backup_dir`, 0 if none (yet): keras's own metadata, or the state
    of the one restart that `tfp_scmix.train(..., checkpoint_dir=backup_dir)` backs up in restart-0/."""
    path = Path(backup_dir) / ("training_metadata.json" if keras_backup else "restart-0/state.json")
    try:
        return json.loads(path.read_text())["epoch"]
    except (OSError, ValueError):
        return 0


def child(args, work, name, delay):
    command = [
        sys.executable,
        "-m",
        "experiments.reliability.resume",
        "--train",
        "--backup-dir",
        str(work / f"backup-{name}"),
        "--predictions",
        str(work / f"{name}.npz"),
        "--epochs",
        str(args.epochs),
        "--topics",
        str(args.topics),
        "--seed",
        str(args.seed),
        "--batch-size",
        str(args.batch_size),
        "--classifier-steps",
        str(args.classifier_steps),
        "--epoch-delay",
        str(delay),
    ] + (["--keras-backup"] if args.keras_backup else [])
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout):
    output, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"training process failed ({process.returncode}):\n{output[-3000:]}")
    return output


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--topics", type=int, default=30)
    parser.add_argument("--kill-after", type=int, default=10, help="kill once this epoch's backup exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--classifier-steps", type=int, default=500)
    parser.add_argument("--epoch-delay", type=float, default=0.3, help="pause of the killed run after each epoch")
    parser.add_argument("--keras-backup", action="store_true")
    parser.add_argument(
        "--reference",
        default=None,
        help="predictions (.npz) of an uninterrupted run made elsewhere; default: run one here",
    )
    parser.add_argument("--work", default=None, help="folder for backups and predictions (default: a temporary one)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--timeout", type=float, default=900)
    # the child process
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backup-dir", help=argparse.SUPPRESS)
    parser.add_argument("--predictions", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train:
        return train_and_save(args)
    if not 0 < args.kill_after < args.epochs:
        parser.error("--kill-after must be between 0 and --epochs")
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        start = time.time()
        reference = None if args.reference else child(args, work, "uninterrupted", 0.0)
        killed = child(args, work, "resumed", args.epoch_delay)
        while backup_epoch(work / "backup-resumed", args.keras_backup) < args.kill_after:
            if killed.poll() is not None:
                raise RuntimeError(f"the run to kill ended first:\n{killed.communicate()[0][-3000:]}")
            if time.time() - start > args.timeout:
                killed.kill()
                raise TimeoutError("no backup appeared in time")
            time.sleep(0.02)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        killed_at = backup_epoch(work / "backup-resumed", args.keras_backup)
        left_results = (work / "resumed.npz").exists()
        resumed = child(args, work, "resumed", 0.0)
        resumed_output = finish(resumed, args.timeout)
        if reference is not None:
            finish(reference, args.timeout)
        a, b = np.load(args.reference or work / "uninterrupted.npz"), np.load(work / "resumed.npz")
        result = {
            "method": (
                "keras BackupAndRestore + SCData.dataset"
                if args.keras_backup
                else "tfp_scmix.train(checkpoint_dir=...)"
            ),
            "epochs": args.epochs,
            "topics": args.topics,
            "seed": args.seed,
            "reference": args.reference or "an uninterrupted process",
            "kill_signal": "SIGKILL",
            "killed_returncode": killed.returncode,
            "backup_epoch_at_kill": killed_at,
            "results_file_after_kill": left_results,
            "resumed_at_epoch": int(resumed_output.split("starting at epoch ")[1].split()[0]),
            "identical_probs": bool(np.array_equal(a["probs"], b["probs"])),
            "identical_labels": bool(np.array_equal(a["label"], b["label"])),
            "max_abs_prob_difference": float(np.abs(a["probs"] - b["probs"]).max()),
            "labels_differing": int((a["label"] != b["label"]).sum()),
            "n_cells": int(a["label"].size),
            "seconds": round(time.time() - start, 1),
        }
    out = Path(args.out) if args.out else HERE / ("results_keras_backup.json" if args.keras_backup else "results.json")
    write_json(out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
