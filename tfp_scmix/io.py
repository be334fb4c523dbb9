"""Files stage: atomic writes, and models saved and loaded safely.

- `atomic_path` / `atomic_directory` / `write_csv`: a file or folder appears at its path whole, or not at all.
- `save_model`: a `.keras` archive written atomically (a kill leaves the old file or nothing).
- `load_model`: Keras's safe mode (no code from the file runs; no pickle in the format), with errors
  that name the file's versions.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import pandas as pd

from tfp_scmix.ensemble import SCMixEnsemble, as_ensemble
from tfp_scmix.model import SCMix, library_versions

logger = logging.getLogger("tfp_scmix")
MODEL_SUFFIX = ".keras"
# The JSON documents of a .keras archive (config.json, metadata.json) are read whole: a larger one is refused
# before it is read. A model's config is its settings and gene and class names: about 1.3 MB for an
# ensemble of three restarts over 30,000 genes.
MAX_CONFIG_BYTES = 64 * 2**20
# renameat2(2) flags (Linux): rename unless the target exists; swap two paths.
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


class ModelFileError(ValueError):
    """A model file that cannot be written or loaded safely; the message says why and how to fix it."""


class WriteError(OSError):
    """A file or folder that cannot be written where asked (a missing or read-only folder, a file where a folder
    should be): the message names the path asked for, not the temporary one beside it."""


def _writable_folder(path: Path) -> None:
    """Create `path`'s folder if missing; WriteError naming `path` when that fails or its folder is not one."""
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(
            errno.ENOTDIR,
            f"cannot write {path}: {existing} is a file, not a folder; choose another path (command line: --out)",
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(err.errno, f"cannot create the folder {folder} for {path}: {err.strerror}") from None


def _cannot_write(path: Path, err: OSError) -> WriteError:
    """WriteError for `path` from the OSError that creating its temporary sibling raised."""
    return WriteError(
        err.errno, f"cannot write {path}: {err.strerror}; choose a folder you can write to (command line: --out)"
    )


def _umask() -> int:
    """The process's file-mode creation mask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error remove it.

    The folder is created if missing. The temporary name keeps `path`'s suffix (Keras and h5py check it). A
    symbolic link at `path` stays a link: the file it points to is what is replaced (renaming onto the link itself
    turned it into a file of its own).
    Raises WriteError (an OSError) naming `path` when its folder cannot be created or written to.
    """
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    _writable_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    except OSError as err:
        raise _cannot_write(path, err) from None
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates the file readable by its owner only; the result gets a new file's usual mode.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(frame: pd.DataFrame, path: str | Path, **kwargs: Any) -> Path:
    """Write a DataFrame as CSV atomically; returns the path."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=kwargs.pop("index", False), **kwargs)
    return Path(path)


def _renameat2(source: Path, target: Path, flag: int) -> bool:
    """Rename `source` to `target` atomically with a renameat2 `flag`; False where the system lacks it.

    Raises FileExistsError (RENAME_NOREPLACE, `target` exists) or another OSError.
    """
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flag) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):  # an older kernel, or a filesystem without the flag
        return False
    raise OSError(code, os.strerror(code), str(target))


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path` that becomes `path` only when the block succeeds.

    A failure (or a crash) inside the block leaves `path` as it was: absent, or the previous export.
    Where the system has renameat2 (Linux), the commit is one atomic step: with `overwrite` the new folder
    and an existing `path` are swapped (a kill at any moment leaves one whole export at `path`), without it
    the rename fails if `path` appeared meanwhile (two writers to one path: one wins, the other gets
    FileExistsError). Elsewhere an existing `path` is moved aside, then replaced (a kill between the two
    renames leaves it in a hidden `.NAME.old-*` folder beside `path`).
    Raises FileExistsError when `path` exists and `overwrite` is false; WriteError (an OSError) naming `path`
    when its folder cannot be created or written to.
    """
    path = Path(path)

    def exists_error() -> FileExistsError:
        return FileExistsError(
            f"{path} already exists; pass overwrite=True (--overwrite) to replace it, "
            "or export to a new version directory (e.g. export/2)."
        )

    if path.exists() and not overwrite:
        raise exists_error()
    _writable_folder(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as err:
        raise _cannot_write(path, err) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is its owner's only
        if overwrite and path.exists():
            if _renameat2(tmp, path, _RENAME_EXCHANGE):
                shutil.rmtree(tmp, ignore_errors=True)  # it holds the previous export now
                return
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            committed = _renameat2(tmp, path, _RENAME_NOREPLACE)
        except FileExistsError:
            raise exists_error() from None
        if not committed:
            if path.exists():
                raise exists_error()
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_model_path(path: str | Path) -> Path:
    """`path` as a Path if a model can be saved there (before any training), else ModelFileError.

    A model file must end in ".keras" (Keras 3's archive, the only format `load_model` reads) and its
    folder must be a folder (or not exist yet, below one) that this process may write to.
    """
    path = Path(path)
    if path.suffix != MODEL_SUFFIX:
        raise ModelFileError(
            f"model path {path} must end in {MODEL_SUFFIX!r} (Keras 3's archive, the format "
            f"load_model reads): pass e.g. {path.with_suffix(MODEL_SUFFIX)}."
        )
    if path.is_dir():
        raise ModelFileError(f"model path {path} is a folder; pass a file name ending in {MODEL_SUFFIX!r}.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ModelFileError(
            f"cannot save {path}: {folder} is a file, not a folder; choose another path (command line: --out)."
        )
    if not os.access(folder, os.W_OK):
        raise ModelFileError(f"cannot write to {folder} (no permission); choose another path (command line: --out).")
    return path


def save_model(model: SCMix | SCMixEnsemble, path: str | Path) -> Path:
    """Save `model` as a .keras archive at `path`, atomically; returns the path. `model.save(path)` is this.

    Raises ModelFileError for a path `load_model` would not read or a folder it cannot be written to (see
    `check_model_path`; also when writing there fails, e.g. on a read-only file system).
    """
    path = check_model_path(path)
    for member in as_ensemble(model).members:
        if getattr(member, "optimizer", None) is not None:  # compiled, never trained (or weights copied in):
            member.build_optimizers()  # its optimizer state must be built to load back
    try:
        with atomic_path(path) as tmp:
            keras.Model.save(model, tmp)  # Keras's own writer (SCMix.save comes back here)
    except WriteError as err:
        raise ModelFileError(f"{err.strerror}.") from None
    return path


def _weight_floats(config: dict) -> int:
    """A lower bound on the number of float32 values the weights of a serialized SCMix or SCMixEnsemble hold.

    Per restart: the topic-gene means and scales (2 K G), the encoder's first layer (G H) and the batch
    offsets' means and scales (2 B G). Raises KeyError, TypeError or ValueError for a malformed config.
    """
    if config.get("registered_name") == "tfp_scmix>SCMixEnsemble":
        members = config["config"]["members"]
        if not isinstance(members, list):
            raise TypeError("members is not a list")
        return sum(_weight_floats(member) for member in members)
    inner = config["config"]
    settings = inner.get("config") or inner  # files from before Config kept the settings beside the sizes
    sizes = {
        "genes": len(inner["genes"]),
        "n_topics": settings.get("n_topics", 50),
        "hidden_units": settings.get("hidden_units", 256),
        "n_batches": inner.get("n_batches", 1),
    }
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} is {value!r}, not a positive whole number")
    genes = sizes["genes"]
    return genes * (2 * sizes["n_topics"] + sizes["hidden_units"] + 2 * sizes["n_batches"])


def _is_anndata(path: Path) -> bool:
    """Whether the HDF5 file at `path` holds an AnnData (its "obs" and "var" groups); False where it cannot be read."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return "obs" in f and "var" in f
    except (OSError, ValueError):
        return False


def _read_archive(path: Path) -> tuple[dict, dict]:
    """(config, metadata) of a .keras archive, or ModelFileError for a file that is not one."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"\x89HDF") and _is_anndata(path):
            raise ModelFileError(
                f"{path} is a dataset (an AnnData .h5ad file), not a model: pass the model (.keras) first and the "
                "data second (tfp-scmix annotate MODEL.keras DATA.h5ad; load_model reads the model)."
            )
        kind = (
            "an HDF5 file (the legacy .h5 format of Keras 2?)"
            if head.startswith(b"\x89HDF")
            else "not a .keras archive"
        )
        raise ModelFileError(
            f"{path} is {kind}: it may be truncated or corrupt, or not a tfp_scmix model. "
            "Save models with tfp_scmix.save_model(model, 'name.keras') and copy the whole file."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            for name in ("config.json", "metadata.json"):
                size = archive.getinfo(name).file_size
                if size > MAX_CONFIG_BYTES:
                    raise ModelFileError(
                        f"{path}: its {name} is {size / 2**20:.0f} MB, above the {MAX_CONFIG_BYTES / 2**20:.0f} MB "
                        "a tfp_scmix model's needs; it is not a model this package wrote. Refusing to read it."
                    )
            config = json.loads(archive.read("config.json"))
            metadata = json.loads(archive.read("metadata.json"))
            if not isinstance(config, dict) or not isinstance(metadata, dict):
                raise ValueError("config.json or metadata.json is not a JSON object")
            if archive.testzip() is not None:
                raise zipfile.BadZipFile("a member fails its CRC check")
            weights = archive.getinfo("model.weights.h5").file_size if "model.weights.h5" in archive.namelist() else 0
    except (KeyError, ValueError, RecursionError, zipfile.BadZipFile, OSError) as err:
        if isinstance(err, ModelFileError):
            raise
        raise ModelFileError(
            f"{path} is a damaged .keras archive ({type(err).__name__}: {str(err)[:300]}); it may be "
            "truncated or corrupt: copy it again or re-train."
        ) from err
    if config.get("registered_name") in ("tfp_scmix>SCMix", "tfp_scmix>SCMixEnsemble"):
        # Sizes in the config decide what is allocated when the model is built: check them against the
        # weights the file stores before building anything (a 7 MB file claiming n_topics 200000 reached
        # 15.8 GB before it was refused; issue 18).
        try:
            needed = 4 * _weight_floats(config)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ModelFileError(
                f"{path} has a malformed model config ({type(err).__name__}: {str(err)[:300]}); "
                "copy it again or re-train."
            ) from err
        if needed > weights:
            raise ModelFileError(
                f"{path}: its config describes weights of at least {needed / 2**20:.1f} MB but the file stores "
                f"{weights / 2**20:.1f} MB: the config was altered or the file is damaged. Refusing to build it."
            )
    return config, metadata


def load_model(path: str | Path, compile: bool = True) -> SCMix | SCMixEnsemble:
    """Load a saved SCMix or SCMixEnsemble in Keras's safe mode (no code from the file runs; no pickle in the format).

    Raises `ModelFileError` for a missing, truncated or corrupt file, another kind of model, a file that
    asks to run code, or one from another version that this version cannot read (the message names the
    versions that wrote it and these). A file from another version that loads is loaded with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {path}; train one with `tfp-scmix train ... --out {path}`.")
    config, metadata = _read_archive(path)
    if config.get("registered_name") not in ("tfp_scmix>SCMix", "tfp_scmix>SCMixEnsemble"):
        raise ModelFileError(
            f"{path} holds a {config.get('registered_name') or config.get('class_name')!r} "
            "model, not a tfp_scmix SCMix model."
        )
    recorded = dict(config.get("config", {}).get("provenance") or {})
    recorded["keras"] = metadata.get("keras_version", recorded.get("keras"))  # the Keras that wrote the file
    current = library_versions()
    written = f"tfp_scmix {recorded.get('tfp_scmix', '(version not recorded)')} with Keras {recorded['keras']}"
    running = f"tfp_scmix {current['tfp_scmix']} with Keras {current['keras']}"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as err:  # Keras raises many types; the message carries the cause
        text = str(err)
        if "safe_mode" in text or "unsafe" in text.lower():
            raise ModelFileError(
                f"{path} asks to run Python code stored in the file (e.g. a lambda); "
                "refusing it: loading is in safe mode. Load only models you trained, or "
                "re-save the model without custom code."
            ) from err
        raise ModelFileError(
            f"could not load {path}: it was written by {written}; this is {running}. "
            f"({type(err).__name__}: {text.splitlines()[0][:300]}) Install the version "
            "that wrote it, or re-train the model with this one."
        ) from err
    skipped = [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]
    if skipped:
        raise ModelFileError(
            f"{path} does not match this version's model (written by {written}; this is "
            f"{running}): {skipped[0]} Re-train the model, or install the version that wrote it."
        )
    differ = [
        k
        for k in ("tfp_scmix", "keras", "tensorflow", "tensorflow_probability")
        if k in recorded and recorded[k] != current[k]
    ]
    if differ:
        logger.warning(
            "%s was written by %s; loading it with %s (%s differ): predictions may differ slightly.",
            path,
            ", ".join(f"{k} {recorded[k]}" for k in differ),
            ", ".join(f"{k} {current[k]}" for k in differ),
            ", ".join(differ),
        )
    return model
