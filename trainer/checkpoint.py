"""Checkpoints: one directory per step with arrays in .npz (no pickle) and a JSON manifest.

A checkpoint is written into a temporary directory and renamed into place, so a directory named
`step_NNNNNNNN` is always complete; `latest()` finds the newest one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from trainer.errors import TrainerError

PREFIX = "step_"


def save(directory: Path, step: int, arrays: dict[str, np.ndarray], meta: dict,
         keep: int) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{final.name}."))
    try:
        with open(tmp / "arrays.npz", "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / "manifest.json", "w") as f:
            json.dump({"step": step, **meta}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(directory: Path) -> Path | None:
    found = complete(directory)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    try:
        meta = json.loads((path / "manifest.json").read_text())
        with np.load(path / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise TrainerError(f"cannot read checkpoint {path}: {exc}") from None
    return arrays, meta
