"""Array-module selection: NumPy on CPU, CuPy on GPU; host/device transfer and RNG."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from trainer.errors import TrainerError


def cupy_or_none() -> ModuleType | None:
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # noqa: BLE001 - any CUDA/CuPy import or driver failure means "no GPU"
        return None
    return None


def get_xp(device: str = "auto") -> ModuleType:
    """The array module for a config's `device`: auto picks CuPy when a GPU is usable."""
    if device == "cpu":
        return np
    cp = cupy_or_none()
    if device == "gpu" and cp is None:
        raise TrainerError("device: gpu was requested but CuPy or a CUDA device is not available "
                           "(install the 'gpu' extra, or set device: cpu)")
    return cp if cp is not None else np


def to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def to_device(xp: ModuleType, a):
    """a on xp's device; string (object) arrays stay on the host (string ops are host-only)."""
    if xp is np or (isinstance(a, np.ndarray) and a.dtype == object):
        return a
    return xp.asarray(a)


class StepRNG:
    """Random source of stochastic kernels (Dropout), re-seeded from (seed, rank, step) keys.

    Deriving each step's stream from its keys makes runs reproducible and resumable without
    saving generator state.
    """

    def __init__(self, xp: ModuleType, *keys: int):
        self.xp = xp
        self.reseed(*keys)

    def reseed(self, *keys: int) -> None:
        seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
        self.gen = (np.random.default_rng(seed) if self.xp is np
                    else self.xp.random.default_rng(seed))

    def random(self, shape, dtype=np.float64):
        return self.gen.random(shape, dtype=dtype)


def device_name(xp: ModuleType) -> str:
    if xp is np:
        return "cpu (numpy)"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    return f"gpu {props['name'].decode()} (cupy)"
