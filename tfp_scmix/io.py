"""Atomic writes: a file appears at its path whole, or not at all."""

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(frame, path, **kwargs):
    """Write a DataFrame as CSV atomically; returns the path."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=kwargs.pop("index", False), **kwargs)
    return Path(path)
