"""Forward kernels by op family, written once against an array module `xp` (NumPy or CuPy).

A kernel is a plain function named like the op: `Op(xp, *inputs, *, attr=default)` returning a
tuple. Attributes are keyword-only with the spec's defaults; a kernel that needs randomness takes
a keyword-only `rng`. Versions that differ by opset are registered with `since=`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

KERNELS: dict[tuple[str, str], list[tuple[int, Callable]]] = {}
CUSTOM_DOMAIN = "ai.onnx_trainer"
# The engine's own ops (CUSTOM_DOMAIN), which ONNX shape inference has no schema for: op ->
# f(*input (shape, dtype) pairs, None for an absent one) -> output (shape, dtype) pairs (the
# memory estimate infers shapes without running kernels).
CUSTOM_SHAPES: dict[str, Callable] = {}


def kernel(op_type: str, since: int = 1, domain: str = ""):
    def register(fn: Callable) -> Callable:
        versions = KERNELS.setdefault((domain, op_type), [])
        versions.append((since, fn))
        versions.sort(key=lambda v: v[0])
        return fn
    return register


def host_ints(a) -> list[int]:
    """A shape-like input (shape, axes, pads, sizes, k...) read on the host as Python ints."""
    if hasattr(a, "reshape"):
        a = a.reshape(-1).tolist()
    return [int(v) for v in (a if isinstance(a, list | tuple) else [a])]


_CACHE: dict[tuple, object] = {}
_CACHE_MAX = 512


def cached_constant(xp, key: tuple, make: Callable):
    """make() (a host array that depends only on `key`, e.g. a pooling divisor of one geometry)
    on xp's device, built and copied there once per key rather than at every call."""
    full = (id(xp), *key)
    value = _CACHE.get(full)
    if value is None:
        if len(_CACHE) >= _CACHE_MAX:
            try:  # (ranks emulated as threads share the cache: another may evict first)
                _CACHE.pop(next(iter(_CACHE)), None)
            except (StopIteration, RuntimeError):
                pass
        value = make()
        if xp is not np:
            value = xp.asarray(value)
        _CACHE[full] = value
    return value


def axis_in(axis: int, rank: int, op: str, what: str = "axis") -> int:
    """axis counted from 0, where it lies in [-rank, rank) (a rank-0 input takes 0 or -1);
    a ModelError otherwise (ONNX requires it; wrapping it around, as % would, reads another
    axis silently)."""
    r = max(rank, 1)
    if not -r <= int(axis) < r:
        from trainer.errors import ModelError
        raise ModelError(f"{op}: {what} {int(axis)} is out of range for an input of rank "
                         f"{rank} (it must lie in [{-r}, {r - 1}])")
    return int(axis) % r


def host_scalar(a):
    """A one-element input read on the host as a Python scalar (no transfer for host values;
    one device read for a device value)."""
    return a.reshape(-1)[0].item() if hasattr(a, "reshape") else a


def matmul(xp, a, b):
    """xp.matmul; on a device, 16-bit floats above 2-D go through float32 (CuPy 14 batches
    float32/float64/complex only: TypeError for float16 and bfloat16)."""
    if xp is not np and (a.ndim > 2 or b.ndim > 2) and a.dtype.itemsize == 2 \
            and a.dtype.kind in "fV":
        return xp.matmul(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype)
    return xp.matmul(a, b)


def get_kernel(op_type: str, opset: int, domain: str = "") -> Callable | None:
    """The kernel for op_type at the given opset of its domain, or None if there is none."""
    domain = "" if domain == "ai.onnx" else domain
    best = None
    for since, fn in KERNELS.get((domain, op_type), []):
        if since <= max(opset, 1):
            best = fn
    return best


# The compiled loops (numba, optional: the `fast` extra), imported by kernels.compiled only
# where the compiled path is on: importing them here failed every command without numba.
_COMPILED_ONLY = {"rowloops", "convloops"}


def _load_all() -> None:
    """Import every kernel module of this package (one file per op family), but the compiled
    loops, which need numba."""
    import importlib
    import pkgutil

    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if mod not in _COMPILED_ONLY:
            importlib.import_module(f"{__name__}.{mod}")


_load_all()
