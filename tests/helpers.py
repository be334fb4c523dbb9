"""Small helpers shared by several test files."""

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def few_labels(data, n=150, seed=0):
    """`data` with the labels of `n` random cells kept, the others hidden."""
    return data.hide_labels(np.random.default_rng(seed).permutation(data.n_cells)[:n])


def rewrite_archive(source, target, config=None, metadata=None, weights=None):
    """Copy a .keras archive, changing its config / metadata (functions of the parsed JSON) or weights file."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            content = old.read(name)
            if name == "config.json" and config:
                content = json.dumps(config(json.loads(content)))
            if name == "metadata.json" and metadata:
                content = json.dumps(metadata(json.loads(content)))
            if name == "model.weights.h5" and weights:
                content = weights(content)
            new.writestr(name, content)
    return target


def run_python(code, *args, timeout=300, env=None):
    """Run `code` in a fresh Python process (in the repository root); returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
