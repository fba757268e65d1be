"""A CuPy kernel made from generated source (`cupy.ElementwiseKernel`, `cupy.ReductionKernel`),
built once per array module, that its callers can do without: `get` is None where the array
module has no such API (NumPy, the tests' CuPy stand-in) or once the kernel failed to build or
run, and the callers then run the xp operations it stands for. A failure warns once, saying what
runs instead."""

from __future__ import annotations

import warnings


class GeneratedKernel:
    """`kind` (the API's name on the array module) made with the constructor arguments `spec`;
    `what` names it in the warning, `fallback` says what runs instead."""

    def __init__(self, kind: str, spec: tuple, what: str, fallback: str):
        self.kind, self.spec, self.what, self.fallback = kind, spec, what, fallback
        self._built: dict[tuple[int, int], object] = {}
        self.error: str | None = None

    def get(self, xp):
        if self.error is not None:
            return None
        make = getattr(xp, self.kind, None)
        if make is None:  # (no such API now: a kernel built with another must not outlive it)
            return None
        key = (id(xp), id(make))
        k = self._built.get(key)
        if k is None:
            try:
                k = self._built[key] = make(*self.spec)
            except Exception as exc:  # noqa: BLE001 - the caller's xp operations run instead
                self.failed(exc)
                return None
        return k

    def failed(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"{self.what} failed ({self.error}); {self.fallback}", RuntimeWarning,
                      stacklevel=4)
