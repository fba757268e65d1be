"""Datasets from .npz files (no pickle), mapped to graph inputs and loss targets; rank shards."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping

import numpy as np

from trainer.errors import DataError


def load_arrays(path, mapping: Mapping[str, str], what: str) -> dict[str, np.ndarray]:
    """{graph name: array} for a {graph name: npz key} mapping; all arrays share dim 0."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            out = {}
            for name, key in mapping.items():
                if key not in keys:
                    raise DataError(f"{what}: array '{key}' (for '{name}') is not in {path}; "
                                    f"it has {', '.join(keys)}")
                out[name] = npz[key]
    except FileNotFoundError:
        raise DataError(f"{what}: dataset file not found: {path}") from None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what}: cannot read {path} as .npz without pickle: {exc}") from None
    lengths = {name: a.shape[0] if a.ndim else None for name, a in out.items()}
    if len(set(lengths.values())) > 1 or None in lengths.values():
        raise DataError(f"{what}: arrays must share their first (sample) dimension; got "
                        + ", ".join(f"{k}: {v}" for k, v in lengths.items()))
    return out


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
