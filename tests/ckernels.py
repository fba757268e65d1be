"""CuPy's generated-kernel APIs for the CPU stand-in (tests/strictxp.py): cupy.ElementwiseKernel
and cupy.ReductionKernel whose C++ expressions are compiled here by the C compiler (the same
expressions in C, `T` a typedef) and run over the stand-in's arrays, so that the engine's
generated kernels (trainer/kernels/ewfuse.py, trainer/kernels/rowfuse.py, the optimizer's) run
their own code in tests without a GPU. C's math functions (exp, erf, ...) compute in double
precision and round once, so results differ from NumPy's float32 ones in the last bits; a
reduction adds in order, where CuPy adds as a tree and NumPy pairwise."""

from __future__ import annotations

import atexit
import collections
import ctypes
import hashlib
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests import strictxp as sx

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler to build the generated kernels")
_BUILT: dict[str, ctypes.CDLL] = {}
_DIR = Path(tempfile.mkdtemp(prefix="ckernels_"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)  # (the built libraries)


class CElementwiseKernel:
    """cupy.ElementwiseKernel for the stand-in: the body compiled as C (T bound from the first
    float argument, as CuPy binds it; a `;` after it, as CuPy adds one), run over the broadcast
    arguments. As in CuPy: a parameter is `[raw] TYPE name`, TYPE `T` or a NumPy type name
    (int64, int32, bool, ...: C's long long, int, bool); a `raw` input is the whole array, read
    as `name[k]` with a flat (C-order) index, and takes no part in the loop's shape; `i` is the
    loop index (the output's flat index) and `_ind.size()` the loop's size; host scalars are
    kernel parameters (of their parameter's type), device arrays of a fixed-type parameter
    must have its dtype (CuPy raises TypeError otherwise), and a loop with raw inputs only takes
    its size from the outputs passed in."""

    made = 0
    calls = 0
    by_name: collections.Counter = collections.Counter()  # calls per kernel name

    def __init__(self, in_params: str, out_params: str, operation: str, name: str):
        self.params = [_param(p) for p in in_params.split(",")]
        self.outs = [_param(p) for p in out_params.split(",")]
        if any(raw for raw, _, _ in self.outs):
            raise NotImplementedError("the stand-in's ElementwiseKernel has no raw outputs")
        self.operation, self.name = operation, name
        CElementwiseKernel.made += 1

    def _library(self, ctype: str, scalar: list[bool]) -> ctypes.CDLL:
        loads = []
        for i, ((raw, kind, name), one) in enumerate(zip(self.params, scalar, strict=True)):
            c = _ctype(kind)
            if raw:
                loads.append(f"        const {c} *{name} = (const {c} *)_ins[{i}];")
            else:  # (a host scalar: one value; a device array: broadcast to the loop's shape)
                at = "0" if one else "i"
                loads.append(f"        {c} {name} = ((const {c} *)_ins[{i}])[{at}];")
        # (outputs start as the arrays' values: CuPy's output parameters are references, so
        # a kernel may read them before it writes them, as an optimizer's update does)
        decls = " ".join(f"{_ctype(kind)} {name} = (({_ctype(kind)} *)_outs[{j}])[i];"
                         for j, (_, kind, name) in enumerate(self.outs))
        stores = " ".join(f"(({_ctype(kind)} *)_outs[{j}])[i] = {name};"
                          for j, (_, kind, name) in enumerate(self.outs))
        operation = re.sub(r"\b_ind\.size\(\)", "_n", self.operation)
        src = f"""#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#define CUDART_INF ((double)INFINITY)
#define CUDART_INF_F ((float)INFINITY)
#define CUDART_NAN ((double)NAN)
#define CUDART_NAN_F ((float)NAN)
typedef {ctype} T;
void run(int64_t _n, void **_ins, void **_outs) {{
    for (ptrdiff_t i = 0; i < _n; i++) {{
{chr(10).join(loads)}
        {decls}
        {operation.replace(chr(10), chr(10) + '        ')};
        {stores}
    }}
}}
"""
        return build(src)

    def __call__(self, *args, size=None):
        """As a kernel launch: through the stand-in's _compute, so a capture records it."""
        if size is not None:
            raise NotImplementedError("the stand-in's ElementwiseKernel takes no size")
        if len(args) not in (len(self.params), len(self.params) + len(self.outs)):
            raise TypeError(f"Wrong number of arguments for {self.name!r}")
        ins, given = list(args[:len(self.params)]), list(args[len(self.params):])
        dev = [isinstance(a, sx.ndarray) for a in ins]
        host = [a._a if isinstance(a, sx.ndarray) else np.asarray(a) for a in ins]
        if any(not d and h.ndim for h, d in zip(host, dev, strict=True)):
            raise TypeError("Unsupported type <class 'numpy.ndarray'>")  # (as CuPy)
        for g in given:
            if not isinstance(g, sx.ndarray):
                raise TypeError("Output arguments type must be cupy.ndarray")
        if given:
            sx._compute(self._run, (host, dev, [g._a for g in given]), None, lambda _r: None)
            return given[0] if len(given) == 1 else tuple(given)
        made = sx._compute(self._run, (host, dev, None), None,
                           lambda rs: [sx._dev(r) for r in rs])
        return made[0] if len(made) == 1 else tuple(made)

    def _run(self, host: list, dev: list, given: list | None) -> list:
        # T: bound by the first array of a T parameter (scalars take its type, as in CuPy), or
        # by a T output passed in
        ts = [h.dtype for h, (_, kind, _) in sorted(zip(host, self.params, strict=True),
                                                    key=lambda hp: hp[0].ndim == 0)
              if kind == "T"]
        ts += [g.dtype for g, (_, kind, _) in zip(given or [], self.outs, strict=False)
               if kind == "T"]
        t = ts[0] if ts else np.dtype(np.float64)
        for h, d, (raw, kind, name) in zip(host, dev, self.params, strict=True):
            want = t if kind == "T" else np.dtype(kind)
            if ((d and kind != "T") or raw) and h.dtype != want:
                raise TypeError(f"Type is mismatched. {name} {h.dtype} {want}")
        for g, (_, kind, name) in zip(given or [], self.outs, strict=False):
            if g.dtype != (t if kind == "T" else np.dtype(kind)):
                raise TypeError(f"Type is mismatched. {name} {g.dtype} {kind}")
        loop = [h.shape for h, d, (raw, _, _) in zip(host, dev, self.params, strict=True)
                if d and not raw] + [g.shape for g in given or []]
        if not loop:
            raise ValueError("Loop size is undecided.")
        shape = np.broadcast_shapes(*loop)
        scalar = [not d for d in dev]
        flat = []
        for h, d, (raw, kind, _) in zip(host, dev, self.params, strict=True):
            as_type = h.astype(t if kind == "T" else np.dtype(kind), copy=False)
            flat.append(np.ascontiguousarray(as_type) if raw else
                        np.ascontiguousarray(np.broadcast_to(as_type, shape if d else ())))
        results = [np.empty(shape, t if kind == "T" else np.dtype(kind))
                   for _, kind, _ in self.outs] \
            if given is None else [np.ascontiguousarray(g) for g in given]
        ptrs = (ctypes.c_void_p * max(len(flat), 1))(*[f.ctypes.data for f in flat])
        optrs = (ctypes.c_void_p * len(results))(*[r.ctypes.data for r in results])
        self._library(_CTYPES[t], scalar).run(ctypes.c_int64(int(np.prod(shape))), ptrs,
                                              optrs)
        CElementwiseKernel.calls += 1
        CElementwiseKernel.by_name[self.name] += 1
        if given is not None:  # (CuPy: outputs passed in are written, and returned)
            for g, r in zip(given, results, strict=True):
                if r is not g:
                    g[...] = r
            return given
        return results


def _param(spec: str) -> tuple[bool, str, str]:
    """(raw, type, name) of an ElementwiseKernel parameter `[raw] TYPE name`."""
    words = spec.split()
    raw = words[0] == "raw"
    if len(words) != 2 + raw:
        raise ValueError(f"bad parameter {spec!r}")
    return raw, words[-2], words[-1]


_C_NAMES = {"bool": "bool", "int8": "signed char", "uint8": "unsigned char", "int16": "short",
            "uint16": "unsigned short", "int32": "int", "uint32": "unsigned int",
            "int64": "long long", "uint64": "unsigned long long", "float32": "float",
            "float64": "double"}


def _ctype(kind: str) -> str:
    """C's name of a parameter's type (CuPy's: long long for int64, ...)."""
    return "T" if kind == "T" else _C_NAMES[np.dtype(kind).name]



def build(src: str) -> ctypes.CDLL:
    """The C source compiled into a shared library (once per source)."""
    key = hashlib.sha1(src.encode()).hexdigest()[:16]
    lib = _BUILT.get(key)
    if lib is None:
        c, so = _DIR / f"{key}.c", _DIR / f"{key}.so"
        c.write_text(src)
        subprocess.run([CC, "-O1", "-shared", "-fPIC", "-o", str(so), str(c), "-lm"],
                       check=True, capture_output=True)
        lib = _BUILT[key] = ctypes.CDLL(str(so))
    return lib


_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


class CReductionKernel:
    """cupy.ReductionKernel for the stand-in: for each output element, `map_expr` of every
    input element it reduces (the inputs broadcast together, T bound by the first T input),
    combined by `reduce_expr` (of `a` and `b`) from `identity`, then `post_map_expr` with the
    result as `a` writes the output parameter. `_in_ind.size()` and `_out_ind.size()` are the
    broadcast input's and the output's sizes, `_type_reduce` the reduce type, as in CuPy."""

    made = 0
    calls = 0

    def __init__(self, in_params: str, out_params: str, map_expr: str, reduce_expr: str,
                 post_map_expr: str, identity: str, name: str = "reduce_kernel",
                 reduce_type: str | None = None):
        self.params = [p.split() for p in in_params.split(",")]
        self.outs = [p.split() for p in out_params.split(",")]
        if len(self.outs) != 1:
            raise NotImplementedError("the stand-in's ReductionKernel has one output")
        self.map_expr, self.reduce_expr, self.post = map_expr, reduce_expr, post_map_expr
        self.identity, self.name = identity, name
        self.reduce_type = reduce_type or self.outs[0][0]
        CReductionKernel.made += 1

    def _library(self, ctype: str) -> ctypes.CDLL:
        loads = "\n".join(
            f"            T {name} = ((const T *)_ins[{i}])[_p * _r + _j];"
            for i, (_, name) in enumerate(self.params))
        kind, out = self.outs[0]
        # (CuPy's index sizes as the loop's counts; C++'s functional casts as C casts)
        post = re.sub(r"_in_ind\.size\(\)", "(_p_count * _r)",
                      re.sub(r"_out_ind\.size\(\)", "_p_count", self.post))
        post = re.sub(r"\b_type_reduce\(", "(_type_reduce)(", post)
        src = f"""#include <math.h>
#include <stdint.h>
typedef {ctype} T;
typedef {self.reduce_type} _type_reduce;
#define REDUCE(a, b) ({self.reduce_expr})
void run(int64_t _p_count, int64_t _r, void **_ins, void *_result) {{
    for (int64_t _p = 0; _p < _p_count; _p++) {{
        _type_reduce _s = (_type_reduce)({self.identity});
        for (int64_t _j = 0; _j < _r; _j++) {{
{loads}
            _type_reduce _v = (_type_reduce)({self.map_expr});
            _s = REDUCE(_s, _v);
        }}
        {{
            _type_reduce a = _s;
            {kind} {out};
            {post};
            (({kind} *)_result)[_p] = {out};
        }}
    }}
}}
"""
        return build(src)

    def __call__(self, *args, axis=None, keepdims=False, out=None):
        if out is not None or len(args) != len(self.params):
            raise NotImplementedError("the stand-in's ReductionKernel returns a new array")
        host = [a._a if isinstance(a, sx.ndarray) else np.asarray(a) for a in args]
        return sx._compute(self._run, (host, axis, keepdims), None, sx._dev)

    def _run(self, host: list, axis, keepdims: bool) -> np.ndarray:
        t = next(h.dtype for h, (kind, _) in zip(host, self.params, strict=True)
                 if kind == "T" and h.ndim)
        shape = np.broadcast_shapes(*[h.shape for h in host])
        nd = len(shape)
        axes = tuple(range(nd)) if axis is None else tuple(
            sorted({a % nd for a in ((axis,) if isinstance(axis, int) else axis)}))
        keep = [d for d in range(nd) if d not in axes]
        order = keep + list(axes)  # (the reduced axes last: r consecutive elements each)
        p_count = math.prod(shape[d] for d in keep)
        r = math.prod(shape[d] for d in axes)
        flat = [np.ascontiguousarray(np.broadcast_to(h.astype(t), shape).transpose(order))
                for h in host]
        result = np.empty(p_count, t)
        ptrs = (ctypes.c_void_p * len(flat))(*[f.ctypes.data for f in flat])
        self._library(_CTYPES[t]).run(ctypes.c_int64(p_count), ctypes.c_int64(r), ptrs,
                                      ctypes.c_void_p(result.ctypes.data))
        CReductionKernel.calls += 1
        out_shape = tuple(1 if d in axes else shape[d] for d in range(nd)) if keepdims else \
            tuple(shape[d] for d in keep)
        return result.reshape(out_shape)


def install(monkeypatch):
    """The stand-in (one GPU) with both kernel APIs run as compiled C; skips without a C
    compiler."""
    if CC is None:
        pytest.skip("no C compiler to build the generated kernels")
    xp = sx.install(monkeypatch)
    monkeypatch.setattr(sx, "ElementwiseKernel", CElementwiseKernel, raising=False)
    monkeypatch.setattr(sx, "ReductionKernel", CReductionKernel, raising=False)
    return xp
