"""Datasets from .npz files (no pickle), mapped to graph inputs and loss targets; rank shards."""

from __future__ import annotations

import math
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from trainer.errors import DataError

# What a damaged or hostile .npz can raise while being read; all become one DataError line.
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, IndexError, TypeError, SyntaxError,
                NotImplementedError, RuntimeError, MemoryError, OverflowError, UnicodeError,
                zipfile.BadZipFile, zlib.error, struct.error)
_DEFLATE_RATIO = 1032  # deflate cannot expand data more than this
_REFUSED_KINDS = {"O": "Python objects (needs pickle)", "V": "structured or raw records",
                  "M": "datetimes", "m": "timedeltas"}


def load_arrays(path, mapping: Mapping[str, str], what: str) -> dict[str, np.ndarray]:
    """{graph name: array} for a {graph name: npz key} mapping; all arrays share dim 0.

    Never unpickles; refuses object, structured and empty arrays, arrays whose header declares
    more data than the file holds (before allocating), and NaN/Inf in floating-point arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: dataset file not found: {path}")
    out = {}
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            members = {}
            for n in zf.namelist():
                members.setdefault(n[:-4] if n.endswith(".npy") else n, n)
            for name, key in mapping.items():
                if key not in members:
                    raise DataError(f"{what}: array '{key}' (for '{name}') is not in {path}; "
                                    f"it has {_shown(sorted(members)) or 'no arrays'}")
                out[name] = _read_member(zf, members[key], f"{what}: array '{key}' in {path}",
                                         size)
    except zipfile.BadZipFile:
        hint = " (a .npy file: save datasets with np.savez)" if _is_npy(path) else ""
        raise DataError(f"{what}: cannot read {path} as .npz without pickle: not a zip "
                        f"archive{hint}") from None
    except DataError:
        raise
    except _READ_ERRORS as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{what}: cannot read {path} as .npz without pickle: {text}") from None
    for name, a in out.items():
        _check_values(a, f"{what}: array '{mapping[name]}' (for '{name}')")
    lengths = {name: a.shape[0] if a.ndim else None for name, a in out.items()}
    if len(set(lengths.values())) > 1 or None in lengths.values():
        raise DataError(f"{what}: arrays must share their first (sample) dimension; got "
                        + ", ".join(f"{k}: {v}" for k, v in lengths.items()))
    return out


def _shown(names: list[str]) -> str:
    """Names read from a file, escaped so that the message stays on one line."""
    return ", ".join("".join(c if c.isprintable() else repr(c)[1:-1] for c in n) for n in names)


def _is_npy(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(6) == b"\x93NUMPY"
    except OSError:
        return False


def _read_member(zf: zipfile.ZipFile, member: str, label: str, archive_size: int
                 ) -> np.ndarray:
    """One .npy member, its header checked against the stored size before reading."""
    info = zf.getinfo(member)
    if info.compress_type == zipfile.ZIP_STORED:
        most = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        most = _DEFLATE_RATIO * info.compress_size + 1024
    else:
        raise DataError(f"{label} is compressed with zip method {info.compress_type}; save the "
                        "dataset with np.savez or np.savez_compressed")
    if info.file_size > most or info.compress_size > archive_size:
        raise DataError(f"{label} claims {info.file_size} bytes, more than its archive can hold; "
                        "the file is damaged")
    with zf.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise DataError(f"{label} uses .npy format version {version}; re-save it with "
                            "np.savez")
        kind = _REFUSED_KINDS.get(dtype.kind) or ("Python objects (needs pickle)"
                                                  if dtype.hasobject else None)
        if kind:
            raise DataError(f"{label} holds {kind} (dtype {dtype}); datasets are read without "
                            "pickle: store plain numeric arrays")
        need = math.prod(shape) * dtype.itemsize
        have = info.file_size - fp.tell()
        if need != have:
            raise DataError(f"{label} declares shape {list(shape)} of {dtype} ({need} bytes) "
                            f"but stores {have} bytes; the file is damaged")
    with zf.open(info) as fp:
        return np.lib.format.read_array(fp, allow_pickle=False)


def _check_values(a: np.ndarray, label: str) -> None:
    if a.size == 0:
        raise DataError(f"{label} is empty (shape {list(a.shape)}); give at least one sample")
    if a.dtype.kind in "fc":
        bad = ~np.isfinite(a)
        if bad.any():
            idx = [int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape)]
            where = (f"sample {idx[0]}" + (f", position {idx[1:]}" if len(idx) > 1 else "")
                     if idx else "its only element")
            raise DataError(f"{label} holds {a[tuple(idx)]} at {where}; replace or drop "
                            "non-finite values (e.g. np.nan_to_num) before training")


def check_against_model(arrays: dict[str, np.ndarray], expected: Mapping[str, tuple],
                        what: str) -> None:
    """Per-sample shapes must match the model's inputs (dim 0 is the batch)."""
    for name, shape in expected.items():
        if name not in arrays:
            raise DataError(f"{what}: the model needs input '{name}' but the data config maps "
                            f"only {', '.join(arrays)}")
        got = arrays[name].shape[1:]
        want = tuple(shape[1:])
        if any(w not in (None, g) for w, g in zip(want, got, strict=False)) or \
                len(want) != len(got):
            raise DataError(f"{what}: array for '{name}' has per-sample shape {list(got)}, the "
                            f"model expects {['?' if w is None else w for w in want]}")


class Batches:
    """Global batches of a dataset, each split evenly across ranks; reproducible by epoch.

    Batch b of epoch e holds samples perm_e[b*B:(b+1)*B] (perm_e the identity without shuffle,
    else a permutation from the seed and e). Rank r takes the r-th contiguous slice of it.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, rank: int = 0,
                 world: int = 1, shuffle: bool = True, drop_last: bool = True, seed: int = 0):
        if batch_size % world:
            raise DataError(f"data.batch_size {batch_size} (global) must be divisible by the "
                            f"number of processes {world}")
        self.arrays = arrays
        self.n = next(iter(arrays.values())).shape[0]
        if self.n < batch_size and drop_last:
            raise DataError(f"dataset has {self.n} samples, fewer than one batch of "
                            f"{batch_size} (set data.drop_last: false or a smaller batch)")
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        full, rest = divmod(self.n, batch_size)
        # A last partial batch is kept only if every rank gets at least one sample of it.
        self.steps_per_epoch = full + (1 if (rest >= world and not drop_last) else 0)

    def local_sizes(self) -> set[int]:
        """The batch sizes this rank sees (a full share, and the last partial batch's)."""
        full, rest = divmod(self.n, self.batch_size)
        sizes = {self.batch_size // self.world} if full else set()
        if rest >= self.world and not self.drop_last:
            bounds = np.linspace(0, rest, self.world + 1).round().astype(int)
            sizes.add(int(bounds[self.rank + 1] - bounds[self.rank]))
        return sizes

    def global_indices(self, epoch: int, index: int, order: np.ndarray | None = None
                       ) -> np.ndarray:
        """Sample indices of the whole global batch (every rank can compute them)."""
        order = self.order(epoch) if order is None else order
        return order[index * self.batch_size:(index + 1) * self.batch_size]

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def get(self, epoch: int, index: int, order: np.ndarray | None = None
            ) -> tuple[dict[str, np.ndarray], int, int]:
        """(this rank's arrays, its sample count, the global batch's sample count)."""
        order = self.order(epoch) if order is None else order
        idx = order[index * self.batch_size:(index + 1) * self.batch_size]
        total = len(idx)
        bounds = np.linspace(0, total, self.world + 1).round().astype(int)
        mine = idx[bounds[self.rank]:bounds[self.rank + 1]]
        return {k: a[mine] for k, a in self.arrays.items()}, len(mine), total
