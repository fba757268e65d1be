"""Datasets from .npz files or directories of memory-mapped .npy files (no pickle), mapped to
graph inputs and loss targets; rank shards, and the next batch prefetched in a background thread
(on a GPU, also copied up there on a stream of its own: `DeviceUploads`)."""

from __future__ import annotations

import math
import os
import struct
import threading
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from trainer.errors import DataError

# What a damaged or hostile .npz can raise while being read; all become one DataError line.
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, IndexError, TypeError, SyntaxError,
                NotImplementedError, RuntimeError, MemoryError, OverflowError, UnicodeError,
                zipfile.BadZipFile, zlib.error, struct.error, tokenize.TokenError)
_DEFLATE_RATIO = 1032  # deflate cannot expand data more than this
_REFUSED_KINDS = {"O": "Python objects (needs pickle)", "V": "structured or raw records",
                  "M": "datetimes", "m": "timedeltas"}


def load_arrays(path, mapping: Mapping[str, str], what: str) -> dict[str, np.ndarray]:
    """{graph name: array} for a {graph name: key} mapping; all arrays share dim 0.

    `path` is an .npz archive (read into memory) or a directory of `<key>.npy` files (opened
    with mmap_mode="r": only the batches in use are read, so data larger than RAM works). Never
    unpickles; refuses object, structured and empty arrays, arrays whose header declares more
    data than the file holds (before allocating), and NaN/Inf in floating-point arrays.
    """
    path = Path(path)
    if path.is_dir():
        out = {name: _open_npy(path, key, name, what) for name, key in mapping.items()}
        _check_lengths(out, what)
        return out
    if not path.is_file():
        raise DataError(f"{what}: dataset file not found: {path}")
    out = {}
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            members = _members(zf)
            for name, key in mapping.items():
                _need(key, name, members, path, what)
                out[name] = _read_member(zf, members[key], f"{what}: array '{key}' in {path}",
                                         size)
    except zipfile.BadZipFile as exc:
        raise _bad_zip(path, what, exc) from None
    except DataError:
        raise
    except _READ_ERRORS as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{what}: cannot read {path} as .npz without pickle: {text}") from None
    for name, a in out.items():
        _check_values(a, f"{what}: array '{mapping[name]}' (for '{name}')")
    _check_lengths(out, what)
    return out


def describe_arrays(path, mapping: Mapping[str, str], what: str
                    ) -> dict[str, tuple[tuple[int, ...], np.dtype, bool]]:
    """{graph name: (shape, dtype, memory-mapped)} from the array headers only (nothing is
    read into memory): what the pre-flight report needs before any allocation."""
    path = Path(path)
    if path.is_dir():
        out = {}
        for name, key in mapping.items():
            a = _open_npy(path, key, name, what, check=False)
            out[name] = (tuple(a.shape), a.dtype, True)
    elif not path.is_file():
        raise DataError(f"{what}: dataset file not found: {path}")
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                members = _members(zf)
                out = {}
                for name, key in mapping.items():
                    _need(key, name, members, path, what)
                    label = f"{what}: array '{key}' in {path}"
                    info = zf.getinfo(members[key])
                    with zf.open(info) as fp:
                        shape, dtype = _header(fp, label)
                    out[name] = (tuple(shape), dtype, False)
        except zipfile.BadZipFile as exc:
            raise _bad_zip(path, what, exc) from None
        except DataError:
            raise
        except _READ_ERRORS as exc:
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise DataError(f"{what}: cannot read {path} as .npz without pickle: {text}") from None
    _same_lengths({name: (s[0] if s else None) for name, (s, _, _) in out.items()}, what)
    return out


def _bad_zip(path: Path, what: str, exc: Exception) -> DataError:
    """The error for a .npz that zipfile refused: not a zip archive at all, or a damaged
    member of one (zipfile's words name it: "Bad CRC-32 for file 'x.npy'")."""
    if zipfile.is_zipfile(path):
        return DataError(f"{what}: {path} is damaged: {' '.join(str(exc).split())[:200]} (copy "
                         "or write it again)")
    try:  # (a zip's first member header, without the directory at its end: cut off)
        with open(path, "rb") as f:
            truncated = f.read(4) == b"PK\x03\x04"
    except OSError:
        truncated = False
    if truncated:
        return DataError(f"{what}: {path} is truncated: a zip archive (.npz) whose end is "
                         "missing (an interrupted copy or download: copy or write it again)")
    return DataError(f"{what}: cannot read {path} as .npz: not a zip archive"
                     f"{_npy_hint(path)}")


def _npy_hint(path: Path) -> str:
    return (" (a .npy file: save datasets with np.savez, or as one <key>.npy file per array in "
            "a directory)") if _is_npy(path) else ""


def _same_lengths(lengths: Mapping[str, int | None], what: str) -> None:
    """Every array's first (sample) axis of one length; a scalar (no axis) is named."""
    scalars = [k for k, v in lengths.items() if v is None]
    if scalars:
        raise DataError(f"{what}: {', '.join(map(repr, scalars))} "
                        f"{'is a scalar' if len(scalars) == 1 else 'are scalars'} (0-d "
                        "arrays): every array needs a first axis of one entry per sample")
    if len(set(lengths.values())) > 1:
        raise DataError(f"{what}: arrays must share their first (sample) dimension; got "
                        + ", ".join(f"{k}: {v}" for k, v in lengths.items()))


def _members(zf: zipfile.ZipFile) -> dict[str, str]:
    members: dict[str, str] = {}
    for n in zf.namelist():
        members.setdefault(n[:-4] if n.endswith(".npy") else n, n)
    return members


def _need(key: str, name: str, members: Mapping[str, str], path: Path, what: str) -> None:
    if key not in members:
        raise DataError(f"{what}: array '{key}' (for '{name}') is not in {path}; "
                        f"it has {_shown(sorted(members)) or 'no arrays'}")


def _check_lengths(out: Mapping[str, np.ndarray], what: str) -> None:
    _same_lengths({name: a.shape[0] if a.ndim else None for name, a in out.items()}, what)


def _open_npy(folder: Path, key: str, name: str, what: str, check: bool = True) -> np.ndarray:
    """`<folder>/<key>.npy` memory-mapped read-only, its header checked against the file's
    size first; with `check`, also its values (in chunks, so a large file is never loaded)."""
    if not key or key in (".", "..") or any(c in key for c in "/\\\0"):
        raise DataError(f"{what}: array key {key!r} (for '{name}') must be a plain file name in "
                        f"{folder}")
    path = folder / f"{key}.npy"
    label = f"{what}: array '{key}' (for '{name}') in {folder}"
    if not path.is_file():
        if os.path.lexists(path):  # (a pipe, a device, a broken link: "no x.npy; it has x")
            raise DataError(f"{label}: {path.name} is not a regular file (a device, a pipe or "
                            "a broken or looping link)")
        have = sorted(p.stem for p in folder.glob("*.npy"))
        raise DataError(f"{what}: array '{key}' (for '{name}') is not in {folder}: no "
                        f"{path.name}; it has {_shown(have) or 'no .npy files'}")
    if path.resolve().parent != folder.resolve():
        raise DataError(f"{label}: {path.name} links outside the dataset folder; copy the file "
                        "into it")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fp:
            shape, dtype = _header(fp, label)
            offset = fp.tell()
        need = math.prod(shape) * dtype.itemsize
        if need != size - offset:
            raise DataError(f"{label} declares shape {list(shape)} of {dtype} ({need} bytes) "
                            f"but stores {size - offset} bytes; the file is damaged")
        a = np.load(path, mmap_mode="r", allow_pickle=False) if need else \
            np.zeros(shape, dtype)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{label}: cannot read {path.name} as .npy without pickle: "
                        f"{text}") from None
    if check:
        _check_values(a, label)
    return a


def _header(fp, label: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header; refuses versions and dtypes that are not plain."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise DataError(f"{label} uses .npy format version {version}; re-save it with "
                        "np.save or np.savez")
    kind = _REFUSED_KINDS.get(dtype.kind) or ("Python objects (needs pickle)"
                                              if dtype.hasobject else None)
    if kind:
        raw16 = dtype.kind == "V" and dtype.itemsize == 2 and dtype.names is None
        raise DataError(f"{label} holds {kind} (dtype {dtype}); datasets are read without "
                        "pickle: store plain numeric arrays" + (
                            " (NumPy saves a bfloat16 array as raw 2-byte records: save it as "
                            "float32, which a bfloat16 input takes too)" if raw16 else ""))
    return tuple(shape), dtype


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
        shape, dtype = _header(fp, label)
        need = math.prod(shape) * dtype.itemsize
        have = info.file_size - fp.tell()
        if need != have:
            raise DataError(f"{label} declares shape {list(shape)} of {dtype} ({need} bytes) "
                            f"but stores {have} bytes; the file is damaged")
    with zf.open(info) as fp:
        return np.lib.format.read_array(fp, allow_pickle=False)


_CHECK_CHUNK = 1 << 24  # bytes of a memory-mapped array checked at a time


def _check_values(a: np.ndarray, label: str) -> None:
    if a.size == 0:
        raise DataError(f"{label} is empty (shape {list(a.shape)}); give at least one sample")
    if a.dtype.kind in "fc":
        if isinstance(a, np.memmap) and a.ndim and a.nbytes > _CHECK_CHUNK:
            step = max(1, _CHECK_CHUNK // max(a[:1].nbytes, 1))
            for lo in range(0, a.shape[0], step):
                chunk = np.asarray(a[lo:lo + step])
                if not np.isfinite(chunk).all():
                    bad = ~np.isfinite(chunk)
                    idx = [int(i) for i in np.unravel_index(int(np.argmax(bad)), chunk.shape)]
                    idx[0] += lo
                    _non_finite(a, idx, label)
            return
        bad = ~np.isfinite(a)
        if bad.any():
            _non_finite(a, [int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape)],
                        label)


def _non_finite(a: np.ndarray, idx: list[int], label: str) -> None:
    where = (f"sample {idx[0]}" + (f", position {idx[1:]}" if len(idx) > 1 else "")
             if idx else "its only element")
    raise DataError(f"{label} holds {a[tuple(idx)]} at {where}; replace or drop "
                    "non-finite values (e.g. np.nan_to_num) before training")


def check_input_keys(mapped: Mapping[str, str], expected: Mapping[str, tuple],
                     defaults: set[str], constants: set[str], what: str) -> None:
    """Every key of `what`.inputs names an input the data feeds: not one whose initializer the
    model holds (a default, trained as a parameter: the data would never reach it), not one of
    data.constants, not a name the model lacks (a typo that the run would ignore)."""
    import difflib

    for key in mapped:
        if key in expected:
            continue
        if key in defaults:
            raise DataError(f"{what}.inputs maps '{key}', an input that the model also holds as "
                            "an initializer (a default value, which the engine trains as a "
                            "parameter), so the data would never reach it: remove it from "
                            f"{what}.inputs to train that value, or remove its initializer from "
                            "the model to feed it")
        if key in constants:
            raise DataError(f"{what}.inputs maps '{key}', which data.constants also sets: keep "
                            "one of them")
        close = difflib.get_close_matches(key, list(expected), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"{what}.inputs maps '{key}', which is not an input of the model (its "
                        f"inputs: {', '.join(expected) or 'none'}){hint}")


def check_against_model(arrays: dict[str, np.ndarray], expected: Mapping[str, tuple],
                        what: str) -> None:
    """Per-sample shapes must match the model's inputs (dim 0 is the batch)."""
    for name, shape in expected.items():
        if name not in arrays:
            import difflib

            strays = [k for k in arrays if k not in expected]
            close = difflib.get_close_matches(name, strays, n=1, cutoff=0.0) if strays else []
            if close:
                raise DataError(f"{what}: the model needs input '{name}', which {what}.inputs "
                                f"does not map; it maps '{close[0]}', which is not an input of "
                                f"the model (its inputs: {', '.join(expected)}): write "
                                f"{name}: <array name> in {what}.inputs")
            raise DataError(f"{what}: the model needs input '{name}' but the data config maps "
                            f"only {', '.join(arrays) or 'nothing'} (an input that takes the "
                            "same value at every step, such as a sample rate or an initial "
                            "state, goes in data.constants)")
        if len(shape) == 0:
            raise DataError(f"{what}: the model's input '{name}' is a scalar (shape []), with no "
                            f"sample axis to take a value of each sample: give its one value "
                            f"in data.constants instead of {what}.inputs")
        got = arrays[name].shape[1:]
        want = tuple(shape[1:])
        if any(w not in (None, g) for w, g in zip(want, got, strict=False)) or \
                len(want) != len(got):
            raise DataError(f"{what}: array for '{name}' has per-sample shape {list(got)}, the "
                            f"model expects {['?' if w is None else w for w in want]}")


RESIDENT_BYTES = 1 << 30  # data.on_device: auto keeps in-memory training sets up to this size


def keep_on_device(choice: bool | str, nbytes: int, mapped: bool, gpu: bool) -> bool:
    """data.on_device for a training set of nbytes (`mapped`: some array is memory-mapped):
    only on a GPU; auto when the set is in memory and at most RESIDENT_BYTES."""
    if not gpu:
        return False
    if choice != "auto":
        return bool(choice)
    return not mapped and nbytes <= RESIDENT_BYTES


PREFETCH_BYTES = 1 << 20  # data.prefetch auto: batches from this size are gathered ahead


def prefetching(choice: bool | str, batch_bytes: int, mapped: bool) -> bool:
    """data.prefetch for a rank's batches of `batch_bytes`, with auto: for memory-mapped data
    (`mapped`) or batches of PREFETCH_BYTES or more."""
    if choice != "auto":
        return bool(choice)
    return mapped or batch_bytes >= PREFETCH_BYTES


class DeviceUploads:
    """Batches gathered on the host, copied to the GPU ahead of their step: the prefetch thread
    writes a batch into pinned host memory and copies it up on a stream of its own while the
    compute stream runs the step before, so no host-to-device copy waits on the step's path.

    Device buffers are rings of `held` + 1 per input and shape, allocated once, for a caller
    that asks for `held` batches (the micro-batches of one step) before it queues their work:
    upload u writes slot u % (held + 1) only after the compute stream has passed `release`, an
    event recorded when the batch before it was asked for. By then every step but the one
    being gathered is queued, and the batch that slot held belongs to an earlier step. The
    thread waits for its own copy before it ends, so the batch is on the device when handed
    over, and the pinned buffer is free for the next upload. It selects the caller's GPU
    first (a new thread starts on GPU 0). String arrays stay on the host."""

    def __init__(self, xp, held: int = 1):
        from trainer.backend import cupyx_module

        self.ring = held + 1
        self.xp, self.cupyx = xp, cupyx_module()
        self.device = xp.cuda.Device().id
        self.stream = xp.cuda.Stream(non_blocking=True)
        self._pinned: dict[tuple, np.ndarray] = {}
        self._rings: dict[tuple, list] = {}
        self._turn = 0

    def release(self):
        """An event on the caller's stream after the work queued so far."""
        event = self.xp.cuda.Event(disable_timing=True)
        event.record(self.xp.cuda.get_current_stream())
        return event

    def pinned(self, key: str, shape: tuple, dtype) -> np.ndarray:
        """The pinned host buffer of one input at one shape (reused by every upload)."""
        k = (key, tuple(shape), np.dtype(dtype).str)
        buf = self._pinned.get(k)
        if buf is None:
            buf = self._pinned[k] = self.cupyx.empty_pinned(tuple(shape), dtype=np.dtype(dtype))
        return buf

    def upload(self, arrays: Mapping[str, np.ndarray], release) -> dict:
        """(In the prefetch thread.) The arrays on the device, each in the next slot of its
        ring (strings: as they are)."""
        xp = self.xp
        slot = self._turn % self.ring
        self._turn += 1
        out = {}
        with xp.cuda.Device(self.device), self.stream:
            if release is not None:
                self.stream.wait_event(release)
            for k, a in arrays.items():
                if a.dtype.kind in "OUS":
                    out[k] = a
                    continue
                host = self.pinned(k, a.shape, a.dtype)
                if host is not a:  # (gathered elsewhere: into the pinned buffer first)
                    np.copyto(host, a)
                ring = self._rings.setdefault((k, a.shape, a.dtype.str), [None] * self.ring)
                if ring[slot] is None:
                    ring[slot] = xp.empty(a.shape, a.dtype)
                ring[slot].set(host, stream=self.stream)
                out[k] = ring[slot]
            self.stream.synchronize()
        return out


class Batches:
    """Global batches of a dataset, each split evenly across ranks; reproducible by epoch.

    Batch b of epoch e holds samples perm_e[b*B:(b+1)*B] (perm_e the identity without shuffle,
    else a permutation from the seed and e). Rank r takes the r-th contiguous slice of it.
    `dtypes` converts arrays per batch (memory-mapped data stays on disk in its own type).
    With `prefetch`, the batch after the one returned by `get` is gathered in a background
    thread while the caller computes; `get` returns exactly what it would without it. With
    `xp` a device module, `arrays` are device arrays (data.on_device) and each batch is
    gathered on the device: the sample order stays on the host, and only the batch's indices
    are uploaded. With `uploads` (a GPU, the data on the host, `prefetch`), the prefetched batch
    comes as device arrays (DeviceUploads); a batch gathered on the spot stays on the host.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, rank: int = 0,
                 world: int = 1, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 dtypes: Mapping[str, np.dtype] | None = None, prefetch: bool = False,
                 xp=np, uploads: DeviceUploads | None = None):
        if batch_size % world:
            raise DataError(f"data.batch_size {batch_size} (global) must be divisible by the "
                            f"number of processes {world}")
        self.arrays = arrays
        self.n = next(iter(arrays.values())).shape[0]
        if self.n < batch_size and drop_last:
            if self.n == 0:
                raise DataError("data.train is empty (0 samples)")
            raise DataError(f"data.train has {self.n} sample(s), fewer than one batch of "
                            f"{batch_size} (set data.drop_last: false or a smaller batch)")
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.dtypes = {k: np.dtype(v) for k, v in (dtypes or {}).items()}
        full, rest = divmod(self.n, batch_size)
        # A last partial batch is kept only if every rank gets at least one sample of it.
        self.steps_per_epoch = full + (1 if (rest >= world and not drop_last) else 0)
        self.dropped = rest if (drop_last or rest < world) else 0  # samples left out per epoch
        self.prefetch = prefetch
        self.xp = xp
        self.uploads = uploads if prefetch else None
        self._ahead: _Ahead | None = None
        self._shares: dict[int, tuple[int, int]] = {}

    def dropped_text(self) -> str:
        """Why samples of each epoch are left out ('' when none are), for the pre-flight."""
        if not self.dropped:
            return ""
        why = ("data.drop_last: true" if self.drop_last else
               f"drop_last: false keeps a last partial batch only when each of the {self.world} "
               "processes gets a sample of it")
        return f"the last {self.dropped} sample(s) of each epoch are left out ({why})"

    def empty_epoch_error(self, accumulate: int, epochs: int | None = None) -> DataError:
        """The error for a run without an optimizer step: an epoch without a batch, or (a run
        of `epochs`) fewer batches in all than `accumulate`."""
        spe = self.steps_per_epoch
        if spe == 0 and self.n == 0:
            return DataError("data.train is empty (0 samples)")
        if spe == 0 and self.n < self.world:
            return DataError(f"data.train has {self.n} sample(s), fewer than one per process "
                             f"({self.world} processes); run fewer processes or give more data")
        if spe == 0 or epochs is None:
            why = self.dropped_text()
            return DataError(f"one epoch has {spe} batches, fewer than accumulate={accumulate}; "
                             "nothing to train" + (f" ({why})" if why else ""))
        need = -(-accumulate // spe)
        return DataError(f"{epochs} epoch(s) of {spe} batches make {epochs * spe}, fewer than "
                         f"the {accumulate} micro-batches of one optimizer step (accumulate); "
                         f"nothing to train: set epochs to {need} or more, lower accumulate, or "
                         "set steps (a step draws its micro-batches across an epoch's end)")

    def _share(self, total: int) -> tuple[int, int]:
        """[lo, hi) of this rank's samples within a global batch of `total` (memoized: the
        same few sizes recur every step)."""
        got = self._shares.get(total)
        if got is None:
            bounds = np.linspace(0, total, self.world + 1).round().astype(int)
            got = self._shares[total] = (int(bounds[self.rank]), int(bounds[self.rank + 1]))
        return got

    def local_sizes(self) -> set[int]:
        """The batch sizes this rank sees (a full share, and the last partial batch's)."""
        full, rest = divmod(self.n, self.batch_size)
        sizes = {self.batch_size // self.world} if full else set()
        if rest >= self.world and not self.drop_last:
            bounds = np.linspace(0, rest, self.world + 1).round().astype(int)
            sizes.add(int(bounds[self.rank + 1] - bounds[self.rank]))
        return sizes

    def any_rank_sizes(self) -> set[int]:
        """The batch sizes some rank sees (the same set on every rank)."""
        full, rest = divmod(self.n, self.batch_size)
        sizes = {self.batch_size // self.world} if full else set()
        if rest >= self.world and not self.drop_last:
            sizes.update(int(k) for k in np.diff(np.linspace(0, rest, self.world + 1).round()))
        return sizes

    def one_sample_why(self) -> str:
        """Why some rank gets a batch of 1 sample (any_rank_sizes holds 1)."""
        if self.batch_size // self.world == 1 and self.n >= self.batch_size:
            return (f"data.batch_size {self.batch_size} over {self.world} process(es) gives "
                    "each 1 sample a step" + (" (distributed.sync_batchnorm: true takes the "
                                              "statistics over every process's samples)"
                                              if self.world > 1 else ""))
        rest = self.n % self.batch_size
        return (f"data.drop_last: false keeps each epoch's last batch of {rest} sample(s), "
                + ("a batch of 1" if self.world == 1 else
                   f"1 sample for some of the {self.world} processes")
                + " (set data.drop_last: true)")

    def global_indices(self, epoch: int, index: int, order: np.ndarray | None = None
                       ) -> np.ndarray:
        """Sample indices of the whole global batch (every rank can compute them)."""
        order = self.order(epoch) if order is None else order
        return order[index * self.batch_size:(index + 1) * self.batch_size]

    def local_indices(self, epoch: int, index: int, order: np.ndarray | None = None
                      ) -> np.ndarray:
        """Sample indices of this rank's share of a global batch (host values)."""
        idx = self.global_indices(epoch, index, order)
        lo, hi = self._share(len(idx))
        return idx[lo:hi]

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def get(self, epoch: int, index: int, order: np.ndarray | None = None
            ) -> tuple[dict[str, np.ndarray], int, int]:
        """(this rank's arrays, its sample count, the global batch's sample count)."""
        if not self.prefetch:
            return self._gather(epoch, index, order)
        ahead, self._ahead = self._ahead, None
        got = ahead.result((epoch, index), order) if ahead is not None else None
        if got is None:
            got = self._gather(epoch, index, order)
        nxt = (epoch, index + 1) if index + 1 < self.steps_per_epoch else (epoch + 1, 0)
        release = self.uploads.release() if self.uploads is not None else None
        self._ahead = _Ahead(self, nxt, order if nxt[0] == epoch else None, release)
        return got

    def close(self) -> None:
        """Wait for a batch being prefetched (the thread ends with it)."""
        if self._ahead is not None:
            self._ahead.thread.join()
            self._ahead = None

    def _gather(self, epoch: int, index: int, order: np.ndarray | None, pinned=None
                ) -> tuple[dict[str, np.ndarray], int, int]:
        """This rank's share of a batch; with `pinned` (DeviceUploads.pinned), in-memory arrays
        that need no conversion are gathered straight into their pinned buffers."""
        order = self.order(epoch) if order is None else order
        idx = order[index * self.batch_size:(index + 1) * self.batch_size]
        total = len(idx)
        lo, hi = self._share(total)
        mine = idx[lo:hi]
        out = {}
        if self.xp is not np:  # device-resident data: one small upload, the gathers there
            at = self.xp.asarray(mine)
            for k, a in self.arrays.items():
                out[k] = a.take(at, axis=0)
            return out, len(mine), total
        for k, a in self.arrays.items():
            # sorted reads of a memory-mapped file are sequential; the batch keeps its order
            dt = self.dtypes.get(k)
            if pinned is not None and not isinstance(a, np.memmap) and dt in (None, a.dtype) \
                    and a.dtype.kind not in "OUS":
                out[k] = np.take(a, mine, axis=0,
                                 out=pinned(k, (len(mine),) + a.shape[1:], a.dtype))
                continue
            b = _take(a, mine) if isinstance(a, np.memmap) else a[mine]
            out[k] = b.astype(dt, copy=False) if dt is not None else b
        return out, len(mine), total


def _take(a: np.memmap, idx: np.ndarray) -> np.ndarray:
    """a[idx] as a plain in-memory array, read from the file in ascending index order."""
    if len(idx) < 2 or bool((np.diff(idx) > 0).all()):
        return np.asarray(a[idx])
    order = np.argsort(idx, kind="stable")
    out = np.empty((len(idx),) + a.shape[1:], a.dtype)
    out[order] = a[idx[order]]
    return out


PREFETCH_THREAD = "onnx-trainer-prefetch"


class _Ahead:
    """One batch gathered in a background thread; `result` hands it over if it is the one
    asked for (same position and order), else None (the caller gathers it itself)."""

    def __init__(self, batches: Batches, key: tuple[int, int], order: np.ndarray | None,
                 release=None):
        self.key, self.order, self.release = key, order, release
        self.value: tuple | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(batches,), daemon=True,
                                       name=PREFETCH_THREAD)
        self.thread.start()

    def _run(self, batches: Batches) -> None:
        epoch, index = self.key
        try:
            if self.order is None:
                self.order = batches.order(epoch)
            if index < batches.steps_per_epoch:
                up = batches.uploads
                value = batches._gather(epoch, index, self.order,
                                        up.pinned if up is not None else None)
                if up is not None:
                    try:
                        value = (up.upload(value[0], self.release),) + value[1:]
                    except Exception as exc:  # noqa: BLE001 - the host batch, copied in the step
                        batches.uploads = None
                        warnings.warn(f"copying batches to the GPU ahead of their step failed "
                                      f"({type(exc).__name__}: {exc}); each batch is copied "
                                      "in its step instead", RuntimeWarning, stacklevel=1)
                self.value = value
        except BaseException as exc:  # noqa: BLE001 - the caller gathers again and raises
            self.error = exc

    def result(self, key: tuple[int, int], order: np.ndarray | None):
        self.thread.join()
        if key != self.key or self.value is None:
            return None
        if order is not None and order is not self.order and not np.array_equal(order,
                                                                                self.order):
            return None
        return self.value
