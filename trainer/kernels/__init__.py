"""Forward kernels by op family, written once against an array module `xp` (NumPy or CuPy).

A kernel is a plain function named like the op: `Op(xp, *inputs, *, attr=default)` returning a
tuple. Attributes are keyword-only with the spec's defaults; a kernel that needs randomness takes
a keyword-only `rng`. Versions that differ by opset are registered with `since=`.
"""

from __future__ import annotations

from collections.abc import Callable

KERNELS: dict[tuple[str, str], list[tuple[int, Callable]]] = {}
CUSTOM_DOMAIN = "ai.onnx_trainer"


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


def get_kernel(op_type: str, opset: int, domain: str = "") -> Callable | None:
    """The kernel for op_type at the given opset of its domain, or None if there is none."""
    domain = "" if domain == "ai.onnx" else domain
    best = None
    for since, fn in KERNELS.get((domain, op_type), []):
        if since <= max(opset, 1):
            best = fn
    return best


def _load_all() -> None:
    """Import every kernel module of this package (one file per op family)."""
    import importlib
    import pkgutil

    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{mod}")


_load_all()
