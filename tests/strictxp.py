"""A strict CPU stand-in for CuPy 14.2 in tests: NumPy arrays wrapped as "device" arrays that refuse
implicit host/device mixing and what CuPy lacks, and count every transfer (TRANSFERS, with sites).
`install(monkeypatch)` makes trainer.backend find it as CuPy."""

from __future__ import annotations

import builtins
import contextlib
import math
import sys
import threading
import types
import weakref
from collections.abc import Callable

import numpy as np

__version__ = "14.2.0 (strictxp stand-in)"
_SEAM = "/trainer/backend.py"
# CuPy 14 holds ml_dtypes' bfloat16 where NumPy is 2.1.2 or later (cupy/cupy#9494, in v14.0.0:
# elementwise kernels, casts, reductions, 2-D matmul; batched matmul refuses it, as below)
BFLOAT16 = np.lib.NumpyVersion(np.__version__) >= "2.1.2"


# -- transfers ------------------------------------------------------------------------------------
class Transfers:
    """Device-to-host and host-to-device copies since the last reset, with the first code site
    outside this file that made each one (file, line, function)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.d2h = 0
        self.h2d = 0
        self.d2h_sites: list[tuple[str, int, str]] = []
        self.h2d_sites: list[tuple[str, int, str]] = []

    def record(self, kind: str) -> None:
        if _capturing():
            raise StreamCaptureUnsupported(
                f"a {'device-to-host' if kind == 'd2h' else 'host-to-device'} copy while the "
                "stream captures (cudaErrorStreamCaptureUnsupported)")
        if kind == "d2h" and not _SYNC.allowed:
            raise DeviceSynchronized()
        frame = sys._getframe(1)
        # attribute a transfer to the code that asked for it: skip this file and the backend
        # seam's helpers (to_host, to_device), which only carry out the caller's request
        while frame is not None and (frame.f_code.co_filename == __file__
                                     or frame.f_code.co_filename.endswith(_SEAM)):
            frame = frame.f_back
        site = (frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name) if frame \
            else ("?", 0, "?")
        if kind == "d2h":
            self.d2h += 1
            self.d2h_sites.append(site)
        else:
            self.h2d += 1
            self.h2d_sites.append(site)

    def where(self, kind: str = "d2h") -> list[str]:
        """The sites as 'path:line (function)' strings, for assertion messages."""
        sites = self.d2h_sites if kind == "d2h" else self.h2d_sites
        return [f"{f}:{ln} ({fn})" for f, ln, fn in sites]


TRANSFERS = Transfers()


class DeviceSynchronized(RuntimeError):
    """cupyx.DeviceSynchronized: a device read while cupyx.allow_synchronize(False)."""

    def __init__(self, message=None):
        super().__init__(message or "Device synchronization was detected while disallowed.")


class _Sync(threading.local):
    allowed = True


_SYNC = _Sync()


@contextlib.contextmanager
def allow_synchronize(allow: bool):
    """cupyx.allow_synchronize: with False, a device read raises DeviceSynchronized."""
    old = _SYNC.allowed
    _SYNC.allowed = allow
    try:
        yield
    finally:
        _SYNC.allowed = old


def reset() -> None:
    TRANSFERS.reset()


# -- CUDA graph capture ---------------------------------------------------------------------------
class StreamCaptureUnsupported(RuntimeError):
    """What CUDA refuses while a stream captures: a device-host transfer, a synchronization,
    or work of the capturing thread on another stream (the legacy null stream)."""


class _Capture(threading.local):
    """This thread's capture under way: its stream and recorded operations (CUDA captures per
    stream; threads emulating ranks capture on their own streams)."""
    ops: list | None = None
    stream = None
    depth = 0


_CAPTURE = _Capture()


def _capturing() -> bool:
    return _CAPTURE.ops is not None


def _compute(fn: Callable, args=(), kwargs=None, post: Callable | None = None):
    """post(fn(*args, **kwargs)): device work on the underlying host arrays, its result made
    device arrays by `post` (_wrap by default). While this thread captures a stream, the call
    is also recorded, as a kernel launch is captured: a launch of the graph recomputes it with
    the same arguments (the same arrays, read as they are then; host scalars as they were at
    capture, as a real graph freezes kernel parameters) into the same result arrays."""
    kwargs = kwargs or {}
    post = _wrap if post is None else post
    if _CAPTURE.depth or not _capturing():
        return post(fn(*args, **kwargs))
    if cuda._stream is not _CAPTURE.stream:
        raise StreamCaptureUnsupported("operation not permitted when stream is capturing: the "
                                       "capturing thread ran work on another stream")
    _CAPTURE.depth += 1
    try:
        result = post(fn(*args, **kwargs))
    finally:
        _CAPTURE.depth -= 1
    _CAPTURE.ops.append((fn, args, kwargs, result))
    return result


def _settle(dev, new) -> None:
    """Write a recomputed result into the device array(s) captured for it."""
    if isinstance(dev, ndarray):
        a, new = dev._a, np.asarray(new)
        if new is a or (new.shape == a.shape and new.strides == a.strides and
                        new.__array_interface__["data"][0] == a.__array_interface__["data"][0]):
            return  # (a view of the same memory: already there)
        np.copyto(a, new.reshape(a.shape), casting="unsafe")
    elif isinstance(dev, tuple | list) and isinstance(new, tuple | list):
        for d, n in zip(dev, new, strict=False):
            _settle(d, n)


class Graph:
    """cupy.cuda.Graph: `launch` replays the captured operations (not the Python around them)."""

    def __init__(self, ops: list) -> None:
        self._ops = ops
        self.launches = 0

    def launch(self, stream=None) -> None:
        if _capturing():
            raise StreamCaptureUnsupported("a graph launch while the stream captures")
        self.launches += 1
        for fn, args, kwargs, result in self._ops:
            _settle(result, fn(*args, **kwargs))

    def __len__(self) -> int:
        return len(self._ops)


# -- dtypes ---------------------------------------------------------------------------------------
def _check_dtype(dt) -> np.dtype:
    """dt as a NumPy dtype, or CuPy's ValueError for dtypes it cannot hold (object, strings,
    datetimes, float8 / int4 / float4 and, unless BFLOAT16, bfloat16 from ml_dtypes)."""
    dt = np.dtype(dt)
    if dt.kind in "OUSMm" or (dt.kind == "V" and not (BFLOAT16 and dt.name == "bfloat16")):
        raise ValueError(f"Unsupported dtype {dt}")
    return dt


# -- the device array -----------------------------------------------------------------------------
class _Memory:
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


class ndarray:  # noqa: N801 - CuPy's name
    """A device array: a NumPy array that only this module's functions may read."""

    __slots__ = ("_a",)
    __array_priority__ = 1000
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = np.empty(shape, _check_dtype(dtype), order=order)

    # metadata (no transfer)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _dev(self._a.T))
    mT = property(lambda self: _dev(np.swapaxes(self._a, -1, -2)))
    real = property(lambda self: _dev(self._a.real))
    imag = property(lambda self: _dev(self._a.imag))
    data = property(lambda self: _Memory(self._a.__array_interface__["data"][0]))
    device = property(lambda self: cuda.Device(cuda._current))
    base = property(lambda self: None if self._a.base is None else _dev(self._a.base))

    # explicit transfers (counted)
    def get(self, stream=None, order="C", out=None, blocking=True):
        TRANSFERS.record("d2h")
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError("Only numpy.ndarray can be set to the `out` of get()")
            if out.shape != self.shape:
                raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: "
                                 f"{out.shape}")
            np.copyto(out, self._a, casting="no")
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None) -> None:
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"Shape mismatch or dtype mismatch: {self.shape} {self.dtype} vs "
                             f"{arr.shape} {arr.dtype}")
        TRANSFERS.record("h2d")
        np.copyto(self._a, arr)

    def item(self):
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        TRANSFERS.record("d2h")
        return self._a.item()

    def tolist(self):
        TRANSFERS.record("d2h")
        return self._a.tolist()

    def tobytes(self, order="C") -> bytes:
        TRANSFERS.record("d2h")
        return self._a.tobytes(order)

    def __bool__(self) -> bool:
        TRANSFERS.record("d2h")
        return bool(self._a)

    def __float__(self) -> float:
        TRANSFERS.record("d2h")
        return float(self._a)

    def __int__(self) -> int:
        TRANSFERS.record("d2h")
        return int(self._a)

    def __complex__(self) -> complex:
        TRANSFERS.record("d2h")
        return complex(self._a)

    def __repr__(self) -> str:
        TRANSFERS.record("d2h")
        return f"strictxp.{self._a!r}"

    def __str__(self) -> str:
        TRANSFERS.record("d2h")
        return str(self._a)

    def __format__(self, spec: str) -> str:
        TRANSFERS.record("d2h")
        return format(self._a, spec)

    def __reduce__(self):
        return (_from_host, (self.get(),))

    @property
    def __cuda_array_interface__(self) -> dict:
        # What a CUDA-aware MPI reads (mpi4py takes the pointer as a device address): the
        # stand-in's "device" memory is host memory, so an MPI without CUDA moves it as well.
        a = self._a.__array_interface__
        return {"shape": self.shape, "typestr": a["typestr"], "data": a["data"],
                "strides": a["strides"], "version": 3, "stream": 1}

    # what CuPy refuses
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def __iter__(self):
        # CuPy iterates (each element a 0-d device array, read back one by one); host-side loops
        # over device data are always a bug in the engine, so the stand-in refuses them.
        raise TypeError("strictxp: Python iteration over a device array (one device round trip "
                        "per element); use array operations, or .get() once")

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    # indexing
    def __getitem__(self, key):
        key, advanced = _index(key)

        def view(out):
            if isinstance(out, np.generic):  # CuPy gives a 0-d view, not a host scalar
                out = self._a[(key if isinstance(key, tuple) else (key,)) + (Ellipsis,)]
            return _dev(out)
        return _compute(self._a.__getitem__, (key,), None, view)

    def __setitem__(self, key, value) -> None:
        key, advanced = _index(key)
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, np.ndarray | list | tuple) and np.ndim(value) > 0:
            if not advanced:  # CuPy fills basic slices from scalars only (gh-2079)
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            TRANSFERS.record("h2d")
        _compute(self._a.__setitem__, (key, value), None, _nothing)

    # NumPy protocols: dispatch to this module, as CuPy dispatches to cupy
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _ufunc_apply(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        mod = func.__module__ or "numpy"
        target: object = sys.modules[__name__]
        for part in mod.split(".")[1:]:
            target = getattr(target, part, None)
            if target is None:
                return NotImplemented
        try:
            fn = getattr(target, func.__name__)
        except AttributeError:
            return NotImplemented
        return fn(*args, **kwargs)

    # methods with CuPy's restrictions; the rest forward to NumPy's
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        kw = {} if casting is None else {"casting": casting}
        return _compute(self._a.astype, (_check_dtype(dtype),), {"order": order, "copy": copy,
                                                                  **kw}, _dev)

    def view(self, dtype=None, array_class=None):
        if dtype is None:
            return _dev(self._a.view())
        return _dev(self._a.view(_check_dtype(dtype)))

    def copy(self, order="C"):
        return _compute(self._a.copy, (), {"order": order}, _dev)

    def fill(self, value) -> None:
        if isinstance(value, np.ndarray) and value.ndim:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        _compute(self._a.fill, (value._a if isinstance(value, ndarray) else value,), None,
                 _nothing)

    def __getattr__(self, name: str):
        if name in _MISSING_METHODS or name.startswith("__"):
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        meth = getattr(self._a, name)
        check = _KWARG_LIMITS.get(name)

        def method(*args, **kwargs):
            if check is not None:
                _limit_kwargs(name, kwargs, check)
            return _compute(meth, _unwrap(args, name), _unwrap_kw(kwargs, name))
        return method


def _operators() -> None:
    """Arithmetic, comparison and bitwise operators of ndarray, through the ufuncs."""
    binary = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
              "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power,
              "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
              "lshift": np.left_shift, "rshift": np.right_shift}
    for name, uf in binary.items():
        def op(self, other, uf=uf):
            return _ufunc_apply(uf, "__call__", (self, other), {})

        def rop(self, other, uf=uf):
            return _ufunc_apply(uf, "__call__", (other, self), {})

        def iop(self, other, uf=uf):
            _ufunc_apply(uf, "__call__", (self, other), {"out": (self,)})
            return self
        setattr(ndarray, f"__{name}__", op)
        setattr(ndarray, f"__r{name}__", rop)
        setattr(ndarray, f"__i{name}__", iop)
    compare = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
               "eq": np.equal, "ne": np.not_equal}
    for name, uf in compare.items():
        def cmp(self, other, uf=uf):
            return _ufunc_apply(uf, "__call__", (self, other), {})
        setattr(ndarray, f"__{name}__", cmp)
    unary = {"neg": np.negative, "pos": np.positive, "abs": np.absolute, "invert": np.invert}
    for name, uf in unary.items():
        def un(self, uf=uf):
            return _ufunc_apply(uf, "__call__", (self,), {})
        setattr(ndarray, f"__{name}__", un)
    ndarray.__matmul__ = lambda self, other: matmul(self, other)
    ndarray.__rmatmul__ = lambda self, other: matmul(other, self)


def _dev(a) -> ndarray:
    out = object.__new__(ndarray)
    if isinstance(a, np.generic):
        a = np.asarray(a)
    _check_dtype(a.dtype)
    out._a = a
    if _HOOKS and a.base is None:  # a new allocation (not a view) under a memory hook
        _allocated(a)
    return out


_HOOKS: dict[str, object] = {}


def _allocated(a: np.ndarray) -> None:
    size = builtins.max(a.nbytes, 1)
    for hook in list(_HOOKS.values()):
        hook.malloc_postprocess(device_id=cuda._current, size=size, mem_size=size,
                                mem_ptr=id(a), pmem_id=id(a))
    hooks = list(_HOOKS.values())

    def freed() -> None:
        for hook in hooks:
            hook.free_postprocess(device_id=0, mem_size=size, mem_ptr=0, pmem_id=0)
    weakref.finalize(a, freed)


def _from_host(a: np.ndarray) -> ndarray:
    TRANSFERS.record("h2d")
    return _dev(np.array(a, copy=True))


def _index(key):
    """An index with device arrays unwrapped; host index arrays are copied up (as CuPy does).
    Also whether it is an advanced index."""
    parts = key if isinstance(key, tuple) else (key,)
    out, advanced = [], False
    for k in parts:
        if isinstance(k, ndarray):
            k, advanced = k._a, True
        elif isinstance(k, np.ndarray | list):
            TRANSFERS.record("h2d")
            advanced = True
        out.append(k)
    return (tuple(out) if isinstance(key, tuple) else out[0]), advanced


def _wrap(x):
    if isinstance(x, np.ndarray | np.generic):
        return _dev(x)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _unwrap(args, where: str, host_ok: bool = False):
    """Arguments with device arrays unwrapped; a host (NumPy) array is CuPy's TypeError."""
    out = []
    for a in args:
        if isinstance(a, ndarray):
            out.append(a._a)
        elif isinstance(a, np.ndarray):
            if not host_ok:
                raise TypeError(f"Unsupported type {type(a)} (a host array passed to "
                                f"cupy.{where}; copy it with cupy.asarray first)")
            out.append(a)
        elif isinstance(a, list | tuple):
            out.append(type(a)(_unwrap(a, where, host_ok)))
        else:
            out.append(a)
    return out


def _unwrap_kw(kwargs: dict, where: str) -> dict:
    out = {}
    for k, v in kwargs.items():
        if k == "dtype" and v is not None:
            v = _check_dtype(v)
        out[k] = _unwrap([v], where)[0]
    return out


# Keyword arguments CuPy's functions and methods do not take (NumPy's do).
_REDUCE_KW = ("where",)
_EXTREMA_KW = ("initial", "where")
_KWARG_LIMITS = {"max": _EXTREMA_KW, "min": _EXTREMA_KW, "amax": _EXTREMA_KW,
                 "amin": _EXTREMA_KW, "nanmax": _EXTREMA_KW, "nanmin": _EXTREMA_KW,
                 "sum": _REDUCE_KW, "prod": _REDUCE_KW, "mean": _REDUCE_KW, "var": _REDUCE_KW,
                 "std": _REDUCE_KW, "all": _REDUCE_KW, "any": _REDUCE_KW, "nansum": _REDUCE_KW,
                 "nanmean": _REDUCE_KW, "indices": ("sparse",)}
_MISSING_METHODS = {"itemset", "newbyteorder", "ptp", "tofile", "dump", "dumps", "byteswap",
                    "setflags", "getfield", "setfield", "resize"}


def _limit_kwargs(name: str, kwargs: dict, refused: tuple[str, ...]) -> None:
    for k in refused:
        if k in kwargs:
            raise TypeError(f"{name}() got an unexpected keyword argument '{k}'")


# -- ufuncs ---------------------------------------------------------------------------------------
_COMPARISONS = {"greater", "greater_equal", "less", "less_equal", "equal", "not_equal"}
# ufunc methods CuPy 14.2 implements (cupy/_core/_kernel.pyx: ufunc.reduce/accumulate/...)
_UFUNC_METHODS = {"reduce": {"add", "multiply"}, "accumulate": {"add", "multiply"},
                  "reduceat": {"add"},
                  "at": {"add", "subtract", "bitwise_and", "bitwise_or", "bitwise_xor"}}
# dtypes of CuPy's atomic scatters (cupy/_core/_routines_indexing.pyx, _scatter_op_single)
_SCATTER_DTYPES = {
    "add": {np.int32, np.int64, np.float16, np.float32, np.float64, np.uint32, np.uint64},
    "subtract": {np.int32, np.uint32},
    "max": {np.int32, np.int64, np.float32, np.float64, np.uint32, np.uint64},
    "min": {np.int32, np.int64, np.float32, np.float64, np.uint32, np.uint64},
    "bitwise_and": {np.int32, np.int64, np.uint32, np.uint64},
    "bitwise_or": {np.int32, np.int64, np.uint32, np.uint64},
    "bitwise_xor": {np.int32, np.int64, np.uint32, np.uint64}}


def _scatter(a, slices, value, op: str, uf: np.ufunc) -> None:
    """a[slices] op= value with CuPy's atomic scatter (a cupy.ndarray; its dtypes only)."""
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    if a.dtype.type not in _SCATTER_DTYPES[op]:
        raise TypeError(f"cupy scatter {op} does not support {a.dtype} as data type")
    _compute(uf.at, (a._a, _index(slices)[0], value._a if isinstance(value, ndarray) else value),
             None, _nothing)


def _ufunc_apply(uf: np.ufunc, method: str, inputs, kwargs):
    name = uf.__name__
    if name in _MISSING:
        return NotImplemented
    if method in _UFUNC_METHODS and name not in _UFUNC_METHODS[method]:
        raise NotImplementedError(f"`cupy_{name}.{method}` is not supported yet")
    args = []
    for x in inputs:
        if isinstance(x, ndarray):
            args.append(x._a)
        elif isinstance(x, np.ndarray):
            if x.ndim == 0 and name in _COMPARISONS:
                args.append(x.item())
            else:
                raise TypeError(f"Unsupported type {type(x)} (a host array in cupy.{name})")
        elif isinstance(x, bool | int | float | complex | np.generic) or x is None:
            args.append(x)
        elif isinstance(x, list | tuple) and method in ("at", "reduceat"):
            args.append(x)
        else:
            return NotImplemented
    out = kwargs.get("out")
    if out is not None:
        outs = out if isinstance(out, tuple) else (out,)
        if not all(isinstance(o, ndarray) for o in outs):
            raise TypeError("cupy ufunc 'out' must be a cupy.ndarray")
        kwargs = {**kwargs, "out": tuple(o._a for o in outs)}
    if kwargs.get("dtype") is not None:
        kwargs = {**kwargs, "dtype": _check_dtype(kwargs["dtype"])}
    if "where" in kwargs:
        raise TypeError(f"Wrong arguments {{'where'}} for cupy_{name}")
    call = uf if method == "__call__" else getattr(uf, method)
    if out is not None:
        _compute(call, args, kwargs, _nothing)  # (written into out)
        return out if isinstance(out, ndarray) or len(out) > 1 else out[0]
    return _compute(call, args, kwargs)


class _Ufunc:
    """cupy.<ufunc>: a callable with CuPy's subset of the ufunc methods."""

    def __init__(self, uf: np.ufunc):
        self._uf = uf
        self.__name__ = uf.__name__

    def __call__(self, *args, **kwargs):
        return _ufunc_apply(self._uf, "__call__", args, kwargs)

    def reduce(self, a, axis=0, dtype=None, out=None, keepdims=False):
        return _ufunc_apply(self._uf, "reduce", (a,), _some(axis=axis, dtype=dtype, out=out,
                                                           keepdims=keepdims))

    def accumulate(self, a, axis=0, dtype=None, out=None):
        return _ufunc_apply(self._uf, "accumulate", (a,), _some(axis=axis, dtype=dtype,
                                                               out=out))

    def reduceat(self, a, indices, axis=0, dtype=None, out=None):
        return _ufunc_apply(self._uf, "reduceat", (a, indices), _some(axis=axis, dtype=dtype,
                                                                     out=out))

    def at(self, a, indices, b=None):
        name = self._uf.__name__
        if name not in _UFUNC_METHODS["at"]:
            raise NotImplementedError(f"`cupy_{name}.at` is not supported yet")
        _scatter(a, indices, b, name, self._uf)

    def outer(self, a, b, **kwargs):
        return _ufunc_apply(self._uf, "outer", (a, b), kwargs)

    def __getattr__(self, name: str):
        return getattr(self._uf, name)


def _some(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


# -- module-level functions ---------------------------------------------------------------------
# NumPy functions CuPy 14.2 does not have (from cupy/__init__.py of v14.2.0).
_MISSING = {
    "asmatrix", "block", "bmat", "busday_count", "busday_offset", "busdaycalendar",
    "datetime_as_string", "datetime_data", "einsum_path", "errstate", "frompyfunc", "fromregex",
    "geomspace", "getbufsize", "geterr", "geterrcall", "histogram_bin_edges", "insert",
    "is_busday", "isnat", "matrix", "matvec", "memmap", "nanpercentile", "nanquantile",
    "ndenumerate", "nditer", "nested_iters", "polyder", "polydiv", "polyint", "recarray",
    "record", "setbufsize", "seterr", "seterrcall", "spacing", "unstack", "vecdot", "vecmat",
    "object_", "str_", "bytes_", "void", "longdouble", "clongdouble", "float128", "complex256",
    "datetime64", "timedelta64", "apply_along_axis", "apply_over_axes", "vectorize",
    "piecewise", "fromfunction", "fromiter", "loadtxt", "genfromtxt", "save", "savez", "load",
}
# Functions that read only metadata (dtypes, shapes): results stay host values.
_HOST_FUNCS = {"result_type", "can_cast", "promote_types", "min_scalar_type", "issubdtype",
               "isdtype", "dtype", "finfo", "iinfo", "shape", "ndim", "size", "broadcast_shapes",
               "isscalar", "common_type", "iscomplexobj", "isrealobj", "get_printoptions",
               "set_printoptions", "printoptions", "typename", "mintypecode",
               "normalize_axis_index", "ascontiguousarray_shape"}
_FN_CACHE: dict[str, Callable] = {}
_NO_WORK = {"empty", "empty_like"}  # allocations only: no kernel to capture


def _wrap_scalar(result):
    if isinstance(result, bool | int | float | complex):  # CuPy answers with 0-d arrays
        return _dev(np.asarray(result))
    return _wrap(result)


def _nothing(_result) -> None:
    return None


def _function(name: str, fn: Callable, namespace: str = "") -> Callable:
    where = f"{namespace}{name}"
    limit = _KWARG_LIMITS.get(name)
    host = name in _HOST_FUNCS

    def call(*args, **kwargs):
        if limit is not None:
            _limit_kwargs(name, kwargs, limit)
        if host:
            return fn(*[a._a if isinstance(a, ndarray) else a for a in args], **kwargs)
        uargs, ukw = _unwrap(args, where), _unwrap_kw(kwargs, where)
        if name in _NO_WORK:
            return _wrap(fn(*uargs, **ukw))
        return _compute(fn, uargs, ukw, _wrap_scalar)
    call.__name__ = name
    return call


def asarray(a, dtype=None, order=None, *, blocking=False):
    """A device array: a host array, list or scalar is copied up (counted)."""
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    if isinstance(a, list | tuple) and builtins.any(isinstance(v, ndarray) for v in a):
        return _compute(np.asarray, (_unwrap(a, "asarray"),), {"dtype": dtype})
    host = np.asarray(a, dtype=dtype, order=order)
    _check_dtype(host.dtype)
    TRANSFERS.record("h2d")
    return _dev(np.array(host, copy=True, order="C" if order in (None, "K", "A") else order))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        out = _compute(obj._a.astype, (_check_dtype(dtype) if dtype is not None else obj.dtype,),
                       {"order": order if order != "K" else "K", "copy": copy is not False},
                       _dev)
        if ndmin > out.ndim:
            out = out.reshape((1,) * (ndmin - out.ndim) + out.shape)
        return out
    host = np.array(_unwrap([obj], "array")[0] if isinstance(obj, list | tuple) else obj,
                    dtype=dtype, order=order, ndmin=ndmin, copy=True)
    _check_dtype(host.dtype)
    TRANSFERS.record("h2d")
    return _dev(host)


asanyarray = asarray


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out)
    if out is not None:
        out[...] = a
        return out
    return np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if builtins.any(isinstance(a, ndarray) for a in args) else np


class _RoutinesLinalg:
    """cupy._core._routines_linalg's compute types: with COMPUTE_TYPE_TF32 set for float32,
    float32 matmuls round their operands to TF32 (a 10-bit mantissa) as tensor cores do."""

    COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32 = 1, 7

    def __init__(self) -> None:
        self.float32 = self.COMPUTE_TYPE_DEFAULT

    def set_compute_type(self, dtype, compute_type) -> None:
        if np.dtype(dtype) == np.float32:
            self.float32 = compute_type


_core = types.SimpleNamespace(_routines_linalg=_RoutinesLinalg())


def _tf32(x):
    """float32 x rounded to TF32's 10-bit mantissa (nearest, ties away from zero)."""
    bits = np.ascontiguousarray(x).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def matmul(a, b, out=None, **kwargs):
    """CuPy 14.2 batches matmul (either operand above 2-D) only for float32/64 and complex
    (cupy/_core/_routines_linalg.pyx: TypeError for float16 and bfloat16)."""
    if isinstance(a, ndarray) and isinstance(b, ndarray) and (a.ndim > 2 or b.ndim > 2):
        dt = np.result_type(a.dtype, b.dtype)
        if dt.char == "e" or dt.name == "bfloat16":
            raise TypeError((dt, a.dtype, b.dtype))
    if _core._routines_linalg.float32 == _RoutinesLinalg.COMPUTE_TYPE_TF32 and \
            isinstance(a, ndarray) and isinstance(b, ndarray) and \
            a.dtype == np.float32 and b.dtype == np.float32:
        a, b = _compute(_tf32, (a._a,), None, _dev), _compute(_tf32, (b._a,), None, _dev)
    return _ufunc_apply(np.matmul, "__call__", (a, b), _some(out=out, **kwargs))


def __getattr__(name: str):  # module-level NumPy mirror (PEP 562)
    fn = _FN_CACHE.get(name)
    if fn is not None:
        return fn
    if name in _MISSING or name.startswith("__"):
        raise AttributeError(f"module 'cupy' has no attribute '{name}'")
    obj = getattr(np, name)
    if isinstance(obj, np.ufunc):
        fn = _Ufunc(obj)
    elif callable(obj) and not isinstance(obj, type):
        fn = _function(name, obj)
    else:
        return obj  # dtypes, constants (pi, inf, newaxis)
    _FN_CACHE[name] = fn
    return fn


class _Namespace(types.SimpleNamespace):
    """A NumPy submodule (linalg, fft) mirrored with device-array wrapping."""

    def __init__(self, module, prefix: str, **extra):
        super().__init__(**extra)
        self._module, self._prefix = module, prefix

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        fn = _function(name, getattr(self._module, name), self._prefix)
        setattr(self, name, fn)
        return fn


linalg = _Namespace(np.linalg, "linalg.")
fft = _Namespace(np.fft, "fft.")


def _as_strided(x, shape=None, strides=None):
    if not isinstance(x, ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    return _dev(np.lib.stride_tricks.as_strided(x._a, shape=shape, strides=strides))


lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
    as_strided=_as_strided,
    sliding_window_view=_function("sliding_window_view",
                                  np.lib.stride_tricks.sliding_window_view)))


# -- random ---------------------------------------------------------------------------------------
class _RandomStats:
    generators = 0  # default_rng / RandomState constructions
    reseeds = 0     # RandomState.seed calls


class Generator:
    """cupy.random.Generator: draws differ from NumPy's for the same seed (another bit
    generator, as CuPy's XORWOW differs), so CPU/GPU equality of random draws cannot pass."""

    def __init__(self, seed=None):
        _RandomStats.generators += 1
        self._g = np.random.Generator(np.random.Philox(seed))

    def random(self, size=None, dtype=np.float64, out=None):
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise TypeError(f"Unsupported dtype {dt} for random")
        return _dev(np.asarray(self._g.random(size, dtype=dt)))

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        return _dev(np.asarray(self._g.standard_normal(size, dtype=np.dtype(dtype))))

    def uniform(self, low=0.0, high=1.0, size=None, dtype=np.float64):
        return _dev(np.asarray(self._g.uniform(low, high, size)).astype(dtype))

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        return _dev(np.asarray(self._g.integers(low, high, size, dtype=dtype,
                                                endpoint=endpoint)))


class RandomState:
    """cupy.random.RandomState (cuRAND host API): reseeding is cheap, unlike a new Generator."""

    def __init__(self, seed=None, method=None):
        _RandomStats.generators += 1
        self.method = method
        self.seed(seed)

    def seed(self, seed=None) -> None:
        _RandomStats.reseeds += 1
        self._g = np.random.Generator(np.random.Philox(seed))

    def random_sample(self, size=None, dtype=float):
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise TypeError(f"Unsupported dtype {dt} for random_sample")
        return _dev(np.asarray(self._g.random(size, dtype=dt)))

    def standard_normal(self, size=None, dtype=float):
        return _dev(np.asarray(self._g.standard_normal(size, dtype=np.dtype(dtype))))


random = types.SimpleNamespace(default_rng=Generator, Generator=Generator,
                               RandomState=RandomState, stats=_RandomStats)


# -- cuda -----------------------------------------------------------------------------------------
class _Pool:
    def used_bytes(self) -> int:
        return 0

    def total_bytes(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        pass

    def set_limit(self, size=None, fraction=None) -> None:
        pass


class _Cuda:
    """cupy.cuda stubs: devices, streams, events, pinned memory, memory pools, curand ids."""

    DEVICES = 1

    def __init__(self) -> None:
        self._devices = threading.local()  # the current device is per thread, as CUDA's
        self.uses: list[int] = []  # Device(i).use() calls, in order
        self.pinned_allocations = 0
        me = self

        class Device:
            def __init__(self, device=None):
                self.id = me._current if device is None else int(device)
                if not 0 <= self.id < me.DEVICES:
                    raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal "
                                       f"{self.id}")
                self.compute_capability = "90"

            def use(self):
                me._current = self.id
                me.uses.append(self.id)
                return self

            def synchronize(self) -> None:
                pass

            def __enter__(self):
                self._prev = me._current
                me._current = self.id
                return self

            def __exit__(self, *exc):
                me._current = self._prev
                return False

            mem_info = property(lambda self: (64 << 30, 80 << 30))
            # (the GPU as the machine knows it, the same in every process: what tells whether
            # two ranks drive one GPU; a test may give each rank its own)
            pci_bus_id = property(lambda self: f"0000:{0x18 + self.id:02X}:00.0")

        class Event:
            def __init__(self, block=False, disable_timing=False, interprocess=False):
                self.done = True

            def record(self, stream=None) -> None:
                self.done = True

            def synchronize(self) -> None:
                pass

        class Stream:
            null = None

            def __init__(self, null=False, non_blocking=False, ptds=False):
                self.ptr = 0 if null else id(self)

            def synchronize(self) -> None:
                if _CAPTURE.stream is self:
                    raise StreamCaptureUnsupported("a capturing stream cannot synchronize")

            def begin_capture(self, mode=None) -> None:
                if self.ptr == 0:
                    raise RuntimeError("cannot capture on the default (legacy) stream")
                if _CAPTURE.ops is not None:
                    raise RuntimeError("cudaErrorIllegalState: a capture is under way")
                _CAPTURE.ops, _CAPTURE.stream = [], self
                me.captures += 1

            def end_capture(self):
                if _CAPTURE.stream is not self:
                    raise RuntimeError("cudaErrorIllegalState: the stream is not capturing")
                ops = _CAPTURE.ops
                _CAPTURE.ops = _CAPTURE.stream = None
                return Graph(ops)

            def is_capturing(self) -> bool:
                return _CAPTURE.stream is self

            def record(self, event=None):
                event = event or Event()
                event.record(self)
                return event

            def wait_event(self, event) -> None:
                pass

            def use(self):
                me._stream = self
                return self

            def __enter__(self):
                self._prev = me._stream
                me._stream = self
                return self

            def __exit__(self, *exc):
                me._stream = self._prev
                return False

            @property
            def done(self) -> bool:
                return True

        class MemoryHook:
            """cupy.cuda.MemoryHook: malloc/free callbacks of device arrays (the stand-in
            reports every new array, not only pool misses)."""

            name = "MemoryHook"

            def __enter__(self):
                if self.name in _HOOKS:
                    raise KeyError(f"memory hook {self.name} already exists")
                _HOOKS[self.name] = self
                return self

            def __exit__(self, *exc):
                del _HOOKS[self.name]

            def malloc_postprocess(self, **kwargs):
                pass

            def free_postprocess(self, **kwargs):
                pass

        class MemoryPool(_Pool):
            """cupy.cuda.MemoryPool: a private pool (for a graph's memory); the stand-in
            allocates from NumPy whatever the pool."""

            def __init__(self, allocator=None):
                me.private_pools += 1

            def malloc(self, nbytes):
                return None

        @contextlib.contextmanager
        def using_allocator(allocator=None):
            yield

        self.Device, self.Event, self.Stream = Device, Event, Stream
        self.MemoryHook, self.MemoryPool, self.using_allocator = (MemoryHook, MemoryPool,
                                                                  using_allocator)
        self.Graph = Graph
        self.captures = 0  # begin_capture calls
        self.private_pools = 0
        self._null = Stream(null=True)
        self._streams = threading.local()  # the current stream is per thread, as CuPy's
        self.runtime = types.SimpleNamespace(
            getDeviceCount=lambda: me.DEVICES,
            getDevice=lambda: me._current,
            getDeviceProperties=lambda i: {"name": b"strictxp stand-in", "totalGlobalMem":
                                           80 << 30, "major": 9, "minor": 0,
                                           "multiProcessorCount": 132},
            memGetInfo=lambda: (64 << 30, 80 << 30),
            runtimeGetVersion=lambda: 13000,
            deviceSynchronize=lambda: None,
            is_hip=False)
        self.curand = types.SimpleNamespace(CURAND_RNG_PSEUDO_DEFAULT=100,
                                            CURAND_RNG_PSEUDO_XORWOW=101,
                                            CURAND_RNG_PSEUDO_MRG32K3A=121,
                                            CURAND_RNG_PSEUDO_PHILOX4_32_10=161)

    @property
    def _stream(self):
        return getattr(self._streams, "current", self._null)

    @_stream.setter
    def _stream(self, stream) -> None:
        self._streams.current = stream

    @property
    def _current(self) -> int:
        """This thread's device (a new thread starts on device 0, as with CUDA)."""
        return getattr(self._devices, "current", 0)

    @_current.setter
    def _current(self, device: int) -> None:
        self._devices.current = device

    def get_current_stream(self):
        return self._stream

    def alloc_pinned_memory(self, nbytes: int):
        self.pinned_allocations += 1
        return bytearray(nbytes)

    def is_available(self) -> bool:
        return self.DEVICES > 0

    def get_device_id(self) -> int:
        return self._current


cuda = _Cuda()


_POOL = _Pool()


def get_default_memory_pool() -> _Pool:
    return _POOL


def get_default_pinned_memory_pool() -> _Pool:
    return _POOL


def fuse(*args, **kwargs):
    raise NotImplementedError("strictxp: cupy.fuse (GPU code generation) has no CPU stand-in")


# -- cupyx ----------------------------------------------------------------------------------------
def _special(fn: Callable) -> Callable:
    vec = np.vectorize(fn, otypes=[np.float64])

    def call(x, out=None):
        if not isinstance(x, ndarray):
            raise TypeError(f"Unsupported type {type(x)}")
        dt = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
        return _compute(lambda v: vec(v.astype(np.float64)).astype(dt), (x._a,), None, _dev)
    return call




def _pinned(maker):
    def make(shape, dtype=float, order="C"):
        cuda.pinned_allocations += 1
        return maker(shape, dtype=dtype, order=order)
    return make


x = types.SimpleNamespace(  # cupyx
    scipy=types.SimpleNamespace(special=types.SimpleNamespace(erf=_special(math.erf),
                                                              erfc=_special(math.erfc))),
    scatter_add=lambda a, slices, value: _scatter(a, slices, value, "add", np.add),
    scatter_max=lambda a, slices, value: _scatter(a, slices, value, "max", np.maximum),
    scatter_min=lambda a, slices, value: _scatter(a, slices, value, "min", np.minimum),
    empty_pinned=_pinned(np.empty), zeros_pinned=_pinned(np.zeros),
    allow_synchronize=allow_synchronize, DeviceSynchronized=DeviceSynchronized)


def install(monkeypatch, devices: int = 1):
    """Make trainer.backend find this module as CuPy (and `x` as cupyx) with `devices` GPUs;
    transfers and device selections start from zero. Returns the module."""
    import trainer.backend as backend

    module = sys.modules[__name__]
    monkeypatch.setattr(backend, "_import_cupy", lambda: (module, x))
    monkeypatch.setattr(cuda, "DEVICES", devices)
    cuda._current = 0
    cuda.uses.clear()
    reset()
    return module


_operators()
