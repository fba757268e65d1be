"""Write trained values back into the original model (same graph and names), atomically: temp
folder beside the file, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from trainer.checkpoint import fsync_dir, fsync_file, make_dirs, write_error
from trainer.errors import ModelError
from trainer.graph import check_model, stored_tensors, without_initializers

TWO_GB = 2**31 - 1
_TMP = ".tmp"  # suffix of the temporary folder beside the output
_LOCK = ".lock"  # in it: locked while its export runs (a killed process's lock is released)


def export_model(model: onnx.ModelProto, values: Mapping[str, np.ndarray], path,
                 metadata: Mapping[str, str] | None = None,
                 keep: Iterable[os.PathLike] = ()) -> Path:
    """Copy of `model` with initializers replaced by `values` (cast to their dtype), saved to
    `path` atomically; models over 2 GB keep their tensors in `<name>.data` beside the file.
    Files in `keep` (what the run reads: the model it started from and its external data)
    are neither written nor removed.

    A full disk or an unwritable folder raises WriteError (a TrainerError) and leaves an
    earlier file at `path`, and the data file it refers to, unchanged.
    """
    inits = {t.name: t for t in model.graph.initializer}
    unknown = sorted(set(values) - set(inits))
    if unknown:
        raise ModelError(f"cannot export: {', '.join(unknown)} are not initializers of the model")
    m = without_initializers(model)  # (the replaced tensors' values not copied)
    for t in model.graph.initializer:
        if t.name not in values:
            m.graph.initializer.add().CopyFrom(t)
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        arr = np.asarray(values[t.name]).astype(dtype, copy=False).reshape(tuple(t.dims))
        new = m.graph.initializer.add()
        new.CopyFrom(numpy_helper.from_array(arr, t.name))
        new.doc_string = t.doc_string
    if metadata:
        props = {p.key: p.value for p in m.metadata_props}
        props.update(metadata)
        onnx.helper.set_model_props(m, props)
    # (checked as written, before it is renamed into place: checking the proto in memory
    # serialized it once more, and the checker parsed that copy, at the export's peak)
    return save_model(m, path, keep, check=True)


def save_model(m: onnx.ModelProto, path, keep: Iterable[os.PathLike] = (),
               check: bool = False) -> Path:
    """`m` saved to `path` atomically (as export_model saves; over 2 GB with external data);
    files in `keep` are neither written nor removed; with `check`, onnx.checker reads the
    written file before it replaces an earlier one (a ModelError if it is not valid)."""
    path = Path(path)
    large = m.ByteSize() > TWO_GB if _fits_bytesize(m) else True
    try:
        make_dirs(path.parent)
        _save(m, path, large, keep, check)
    except OSError as exc:
        raise write_error(exc, "model", path) from None
    return path


# .onnx files in the output's folder read for the external data they name: a model that keeps
# its weights outside is a small file (a large one holds them itself)
_SCANNED_BYTES = 64 << 20


@contextlib.contextmanager
def _holding(lock: Path):
    """An exclusive lock on the file `lock` (made) while the block runs."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _in_use(folder: Path) -> bool:
    """Whether another process's export still runs in the temporary folder `folder` (it
    holds the lock in it; one killed, or one of before the lock, holds none)."""
    try:
        fd = os.open(folder / _LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _resolved(path) -> Path | None:
    try:
        return Path(path).absolute().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _save(m: onnx.ModelProto, path: Path, large: bool, keep: Iterable[os.PathLike],
          check: bool) -> None:
    folder = path.parent
    # The data file gets a name the current file does not use, so until the model itself is
    # renamed into place the old model and its data stay a consistent pair.
    candidates = [f"{path.name}.data"] + [f"{path.name}.{k}.data" for k in range(1, 8)]
    # (names another model in the folder reads are neither written nor removed: the model
    # training started from may keep its weights in `<output>.data`)
    others = set().union(*(_external_locations(f) for f in folder.glob("*.onnx")
                           if f.name != path.name and f.is_file()
                           and f.stat().st_size < _SCANNED_BYTES))
    kept = {_resolved(f) for f in keep} - {None}
    candidates = [c for c in candidates
                  if c not in others and _resolved(folder / c) not in kept]
    data_name = None
    for stale in folder.glob(f".{glob.escape(path.name)}.*{_TMP}"):  # of a killed export
        if not _in_use(stale):  # (not another process's export in progress to this output)
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.", suffix=_TMP) as tmp, \
            _holding(Path(tmp) / _LOCK):
        tmp_model = Path(tmp) / path.name
        if large:
            in_use = _external_locations(path)
            data_name = next(c for c in candidates if c not in in_use)
            onnx.save_model(m, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name)
            if check:
                check_model(tmp_model, "exported model")
            fsync_file(Path(tmp) / data_name)
            os.replace(Path(tmp) / data_name, folder / data_name)
            fsync_dir(folder)
        else:
            onnx.save_model(m, str(tmp_model))
            if check:
                check_model(tmp_model, "exported model")
        fsync_file(tmp_model)
        os.replace(tmp_model, path)
        fsync_dir(folder)
    for stale in candidates:  # data of the replaced model, or of an export that was killed
        if stale != data_name and (folder / stale).is_file():
            (folder / stale).unlink()


def _external_locations(path: Path) -> set[str]:
    """External-data file names the model currently at `path` refers to (none if unreadable)."""
    if not path.is_file():
        return set()
    try:
        old = onnx.load(str(path), load_external_data=False)
        return {e.value for t, _ in stored_tensors(old)
                if t.data_location == onnx.TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}
    except Exception:  # noqa: BLE001 - a damaged or foreign file refers to nothing we wrote
        return set()


def _fits_bytesize(m: onnx.ModelProto) -> bool:
    try:
        m.ByteSize()
        return True
    except Exception:  # noqa: BLE001 - protobuf refuses to size messages over 2 GB
        return False
