"""Compiled host kernels (numba), where one loop over the data beats a chain of NumPy passes.

Optional: installed with the `fast` extra (`pip install -e ".[fast]"`); without numba, or with
ONNX_TRAINER_COMPILED=0 in the environment, every caller takes its NumPy path. Each elementwise
kernel computes what that NumPy path computes, in the same order and precision (no fastmath,
NumPy's error model), so the results are bit-identical to it; the normalizations' loops
(kernels/rowloops.py) sum their statistics in float64 instead, and are bit-identical given the
same statistics. The tests compare the two paths over edge values (tests/test_compiled.py).

A kernel is compiled on its first call (about a second) and cached on disk by numba
(`cache=True`: next to this file, or in NUMBA_CACHE_DIR), so later processes load it.
Measured on one core of an idle machine (AMD EPYC Zen 4, float32 [16, 64, 512], the GPT
bench's GELU input): erf 3.2 ms through NumPy (26 passes over float64 chunks), 0.78 ms compiled;
the GPT bench's step 60.9 -> 55.2 ms. numba and llvmlite add about 120 MB to the process's
resident memory once the first kernel runs (BENCHMARKS.md).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ENV = "ONNX_TRAINER_COMPILED"


_NUMBA: object = None  # the numba module once imported; a str (why not) once that failed


def _numba():
    """numba, or None where it is not installed or fails to import (a numba built for another
    NumPy refuses it at import); tried once per process (enabled() asks at every kernel)."""
    global _NUMBA
    if _NUMBA is None:
        try:
            import numba
        except ModuleNotFoundError as exc:
            _NUMBA = ("" if exc.name == "numba" else
                      f"numba cannot be imported: {type(exc).__name__}: {str(exc).rstrip('.')}")
        except Exception as exc:  # noqa: BLE001 - any failure of its import: run without it
            _NUMBA = f"numba cannot be imported: {type(exc).__name__}: {str(exc).rstrip('.')}"
        else:
            _NUMBA = numba
    return None if isinstance(_NUMBA, str) else _NUMBA


try:  # (os.environ's own store: its .get encodes the key at each call, 0.7 us, and the
    # executor asks at every step of a small model's kernels)
    _STORE, _KEY, _OFF = os.environ._data, os.environ.encodekey(ENV), os.environ.encodevalue("0")
except AttributeError:  # pragma: no cover - another os.environ
    _STORE = None


def enabled() -> bool:
    """numba is importable and ONNX_TRAINER_COMPILED is not 0 (read at each call: tests and
    users switch the compiled path off without a restart)."""
    if _STORE is not None:
        return _STORE.get(_KEY) != _OFF and _numba() is not None
    return os.environ.get(ENV, "1") != "0" and _numba() is not None


def status() -> str:
    """One line for the pre-flight and the bench: whether host kernels run compiled (numba is
    imported to know: one that is installed may still refuse the installed NumPy; a run
    imports it at its first compiled kernel anyway; not where ONNX_TRAINER_COMPILED=0 says no
    kernel runs compiled: that run never loads numba's 120 MB)."""
    if os.environ.get(ENV, "1") == "0":
        return f"compiled host kernels: off ({ENV}=0)"
    numba = _numba()
    if numba is None and not _NUMBA:
        return "compiled host kernels: off (numba not installed; pip install 'onnx-trainer[fast]')"
    if numba is None:
        return (f"compiled host kernels: off ({_NUMBA}; pip install -U numba, or "
                "'onnx-trainer[fast]', for a numba that fits this NumPy)")
    return f"compiled host kernels: numba {getattr(numba, '__version__', '')}".rstrip()


def _jit(fn):
    return _numba().njit(cache=True, nogil=True, error_model="numpy")(fn)


def _erf(flat, out, P, Q):
    # (degrees fixed and Horner's steps written out: loops over the coefficients, or a branch
    # for NaN, keep LLVM from vectorizing the outer loop, 4-9x slower)
    p0, p1, p2, p3, p4, p5, p6 = P[0], P[1], P[2], P[3], P[4], P[5], P[6]
    q0, q1, q2, q3, q4, q5 = Q[0], Q[1], Q[2], Q[3], Q[4], Q[5]
    for i in range(flat.size):
        x = np.float64(flat[i])
        v = -4.0 if x < -4.0 else (4.0 if x > 4.0 else x)  # (NaN stays NaN, as in np.clip)
        u = v * v
        num = ((((((p6 * u + p5) * u + p4) * u + p3) * u + p2) * u + p1) * u + p0) * v
        den = (((u * q5 + q4) * u + q3) * u + q2) * u + q1
        out[i] = num / (den * u + q0)


@functools.cache
def _kernel(name: str):
    """The compiled form of module function `name` (coefficients are arguments, not closure
    constants: numba's disk cache would keep stale ones after an edit elsewhere)."""
    return _jit(globals()[name])


def erf_rational(x: np.ndarray, p: tuple, q: tuple) -> np.ndarray:
    """x P(x^2) / Q(x^2) of a float32 array, evaluated in float64 after clipping x to [-4, 4]
    (trainer.kernels.elementwise.erf_rational's NumPy form, step by step), as float32."""
    assert len(p) == 7 and len(q) == 6, "the compiled erf is written for these degrees"
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.shape, np.float32)
    _kernel("_erf")(flat, out, np.array(p), np.array(q))
    return out.reshape(x.shape)


def row_loops():
    """The compiled normalization loops (trainer.kernels.rowloops), or None where the compiled
    path is off."""
    if not enabled():
        return None
    return _rowloops()


@functools.cache
def _rowloops():
    from trainer.kernels import rowloops
    return rowloops


def conv_loops():
    """The compiled Winograd transforms (trainer.kernels.convloops), or None where the compiled
    path is off."""
    if not enabled():
        return None
    from trainer.kernels import convloops
    return convloops


def cache_dir() -> Path:
    """Where generated kernels' sources (and numba's cache of them) are kept:
    $ONNX_TRAINER_CACHE, else $XDG_CACHE_HOME/onnx-trainer, else ~/.cache/onnx-trainer."""
    base = os.environ.get("ONNX_TRAINER_CACHE")
    if base:
        return Path(base) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "onnx-trainer" / "kernels"


_JIT = 'JIT = njit(cache=True, nogil=True, error_model="numpy")\n'


def generated(name: str, source: str):
    """Function `run` of generated module source (its functions decorated @JIT; made by the
    engine from a fixed table of operations, never from a model's strings), compiled by numba:
    imported from a file in cache_dir() so that numba's disk cache keeps the machine code for
    later processes (where that folder cannot be written, from a temporary one)."""
    return _generated(name, source)


@functools.cache
def _generated(name: str, source: str):
    import tempfile

    _numba()
    text = "import numpy as np\nfrom numba import njit\n\n" + _JIT + "\n" + source
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = _written(folder, name, text)
    except OSError:
        temporary = Path(tempfile.mkdtemp(prefix="onnx-trainer-kernels-"))
        # (removed at exit: the module is imported from it while the process runs)
        atexit.register(shutil.rmtree, temporary, ignore_errors=True)
        path = _written(temporary, name, text)
    spec = importlib.util.spec_from_file_location(f"onnx_trainer_kernels_{name}", path)
    module = importlib.util.module_from_spec(spec)
    # (registered: numba's cache rebuilds a kernel's environment by importing its module)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.run


def _written(folder: Path, name: str, text: str) -> Path:
    """folder/name.py holding text (rewritten where it holds anything else)."""
    path = folder / f"{name}.py"
    if not path.is_file() or path.read_text() != text:
        tmp = folder / f".{name}.{os.getpid()}.tmp"  # (ranks may write it at once)
        tmp.write_text(text)
        os.replace(tmp, path)
    return path
