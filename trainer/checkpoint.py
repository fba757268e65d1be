"""Checkpoints: one folder per step, arrays in .npz (no pickle) and a JSON manifest, written to a
temporary folder, fsynced and renamed into place (so `step_NNNNNNNN` is always complete); also
the durable-write helpers export.py uses."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from trainer.errors import TrainerError

PREFIX = "step_"
ARRAYS = "arrays.npz"
MANIFEST = "manifest.json"
# A same-step checkpoint being swapped out is parked under this name; if a kill lands between
# the two renames it is the complete copy of that step, so complete() still finds it.
_REPLACED = ".replaced"
_TMP = ".tmp"
_DELETING = ".deleting"

_HINTS = {
    errno.ENOSPC: "free disk space or point it to another disk",
    errno.EDQUOT: "the disk quota is exhausted; free space or raise the quota",
    errno.EFBIG: "the file size limit is reached (ulimit -f or the filesystem's maximum)",
    errno.EACCES: "check the folder's permissions",
    errno.EPERM: "check the folder's permissions",
    errno.EROFS: "the filesystem is read-only; choose a writable folder",
}


class WriteError(TrainerError, OSError):
    """A checkpoint or exported model could not be written; earlier files are left intact."""


def write_error(exc: OSError, what: str, target: Path) -> WriteError:
    """One-line WriteError for an OSError met while writing `what` to `target`."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = _HINTS.get(exc.errno, "check the disk and the folder")
    return WriteError(f"cannot write {what} {target}: {reason}; {hint} (earlier files are "
                      "unchanged)")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in folder `path` durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows cannot open folders; renames there are as durable as it allows
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """mkdir -p, fsyncing the parent of every folder it creates."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for p in reversed(missing):
        fsync_dir(p.parent)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    """An .npz file (what np.savez writes) whose member of key k is always `k.npy`: np.savez
    leaves a key ending in .npy as it is, so tensors named `w` and `w.npy` were one member
    name twice, and np.load's lookup of `w.npy` gave `w`'s values."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for k, v in arrays.items():
            with z.open(f"{k}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(v), allow_pickle=False)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file by member name less its `.npy`, in the file's order (which
    is the checkpoint's order of the parameters: the flat buffers' before the layout was
    recorded); no pickled object is read."""
    arrays = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if not member.endswith(".npy"):
                raise ValueError(f"{ARRAYS} holds '{member}', which is no .npy array")
            with z.open(member) as f:
                arrays[member[:-4]] = np.lib.format.read_array(f, allow_pickle=False)
    return arrays


def save(directory: Path, step: int, arrays: dict[str, np.ndarray], meta: dict,
         keep: int) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep` (>= 1).

    Raises WriteError (a TrainerError) when the disk is full or the folder not writable; the
    earlier checkpoints and the folder are then as before (no temporary files are left).
    """
    directory = Path(directory)
    final = directory / f"{PREFIX}{step:08d}"
    try:
        make_dirs(directory)
        remove_leftovers(directory)
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{final.name}.", suffix=_TMP))
        try:
            # (mkdtemp makes it 0700 whatever the umask: the group could not read the
            # checkpoints a shared cluster folder holds, where the exported model is 0644)
            os.chmod(tmp, 0o777 & ~_umask())
            with open(tmp / ARRAYS, "wb") as f:
                _write_npz(f, arrays)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            manifest = {**meta, "step": step, "files": {ARRAYS: size}}  # (the folder's step)
            _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            fsync_dir(tmp)
            _install(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as exc:
        raise write_error(exc, "checkpoint", final) from None
    _retain(directory, max(keep, 1), final)
    return final


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`, parking an existing `final` meanwhile."""
    parked = final.with_name(f".{final.name}{_REPLACED}")
    if final.is_dir() and not (final / MANIFEST).is_file():
        # a step folder save did not write (incomplete() leaves them: a user's files may be
        # there): kept beside, under a name no checkpoint takes
        k, kept = 0, final.with_name(f"{final.name}.incomplete")
        while kept.exists():
            k += 1
            kept = final.with_name(f"{final.name}.incomplete.{k}")
        os.replace(final, kept)
    if final.exists():
        if parked.exists():  # left by an earlier kill after `final` was already in place
            shutil.rmtree(parked)
        os.replace(final, parked)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(parked, ignore_errors=True)


def remove_leftovers(directory: Path) -> None:
    """Delete temporary folders of writers that were killed (one writer per folder: call it
    while holding the folder, as `save` and a run holding checkpoint.dir's lock do)."""
    for p in directory.iterdir():
        name = p.name
        if not (name.startswith(f".{PREFIX}") and p.is_dir()):
            continue
        if name.endswith((_TMP, _DELETING)):
            shutil.rmtree(p, ignore_errors=True)
        elif name.endswith(_REPLACED) and (directory / name[1:-len(_REPLACED)]).is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _retain(directory: Path, keep: int, newest_written: Path) -> None:
    """Delete old checkpoints beyond `keep`; never the one just written nor the newest."""
    found = complete(directory)
    protect = {newest_written, found[-1]} if found else {newest_written}
    for old in found[:-keep]:
        if old in protect:
            continue
        trash = directory / f".{old.name.lstrip('.')}{_DELETING}"
        try:
            os.replace(old, trash)  # out of sight first, so a kill mid-delete leaves no husk
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)


def _step_of(name: str) -> int | None:
    digits = name[len(PREFIX):]
    if name.startswith(PREFIX) and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def complete(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found: dict[int, Path] = {}
    parked: dict[int, Path] = {}
    for p in directory.iterdir():
        name = p.name
        if name.startswith(".") and name.endswith(_REPLACED):
            step = _step_of(name[1:-len(_REPLACED)])
            target = parked
        else:
            step = _step_of(name)
            target = found
        if step is not None and p.is_dir() and (p / MANIFEST).is_file():
            target[step] = p
    for step, p in parked.items():
        found.setdefault(step, p)
    return [found[s] for s in sorted(found)]


def incomplete(directory: Path) -> list[Path]:
    """Step folders in `directory` without a manifest (not written by `save`, which renames a
    finished folder into place: a copy cut short, or an edited folder), oldest first. They are
    left as they are: they may hold a user's files (a checkpoint saved at that step moves such a
    folder to `<name>.incomplete` first)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step, p) for p in directory.iterdir() if (step := _step_of(p.name)) is not None
             and p.is_dir() and not (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def latest(directory: Path) -> Path | None:
    found = complete(directory)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, manifest) of the checkpoint folder `path`; TrainerError if it is damaged."""
    path = Path(path)
    try:
        meta = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("the manifest is not a JSON object")
        want = meta.get("files", {}).get(ARRAYS)
        if not (path / ARRAYS).is_file():  # (a pipe would be waited on for ever)
            raise ValueError(f"{ARRAYS} is not a regular file")
        size = (path / ARRAYS).stat().st_size
        if want is not None and size != want:
            raise ValueError(f"{ARRAYS} is {size} bytes, the manifest says {want}")
        arrays = _read_npz(path / ARRAYS)
    except RecursionError:  # (a manifest nested deeper than json reads)
        raise TrainerError(f"cannot read checkpoint {path}: its {MANIFEST} is nested too deeply "
                           "to read; delete this folder to resume from the previous "
                           "checkpoint") from None
    except (OSError, ValueError, EOFError, KeyError, AttributeError, zipfile.BadZipFile,
            zlib.error, tokenize.TokenError, SyntaxError, struct.error) as exc:
        raise TrainerError(f"cannot read checkpoint {path}: {exc}; delete this folder to resume "
                           "from the previous checkpoint") from None
    return arrays, meta
