"""CuPy's generated-kernel APIs for the CPU stand-in (tests/strictxp.py): cupy.ElementwiseKernel
and cupy.ReductionKernel whose C++ expressions are compiled here by the C compiler (the same
expressions in C, `T` a typedef) and run over the stand-in's arrays, so that the engine's
generated kernels (trainer/kernels/ewfuse.py, trainer/kernels/rowfuse.py, the optimizer's) run
their own code in tests without a GPU. C's math functions (exp, erf, ...) compute in double
precision and round once, so results differ from NumPy's float32 ones in the last bits; a
reduction adds in order, where CuPy adds as a tree and NumPy pairwise."""

from __future__ import annotations

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


class CElementwiseKernel:
    """cupy.ElementwiseKernel for the stand-in: the body compiled as C (T bound from the first
    float argument, as CuPy binds it; a `;` after it, as CuPy adds one), run over the broadcast
    arguments."""

    made = 0
    calls = 0

    def __init__(self, in_params: str, out_params: str, operation: str, name: str):
        self.params = [p.split() for p in in_params.split(",")]
        self.outs = [p.split() for p in out_params.split(",")]
        self.operation, self.name = operation, name
        CElementwiseKernel.made += 1

    def _library(self, ctype: str) -> ctypes.CDLL:
        loads = "\n".join(
            f"        {kind} {name} = ((const {'T' if kind == 'T' else 'bool'}*)ins[{i}])[i];"
            for i, (kind, name) in enumerate(self.params))
        # (outputs start as the arrays' values: CuPy's output parameters are references, so
        # a kernel may read them before it writes them, as an optimizer's update does)
        decls = " ".join(f"{kind} {name} = (({kind} *)outs[{j}])[i];"
                         for j, (kind, name) in enumerate(self.outs))
        stores = " ".join(f"(({kind} *)outs[{j}])[i] = {name};"
                          for j, (kind, name) in enumerate(self.outs))
        src = f"""#include <math.h>
#include <stdbool.h>
#include <stdint.h>
typedef {ctype} T;
void run(int64_t n, void **ins, void **outs) {{
    for (int64_t i = 0; i < n; i++) {{
{loads}
        {decls}
        {self.operation.replace(chr(10), chr(10) + '        ')};
        {stores}
    }}
}}
"""
        return build(src)

    def __call__(self, *args):
        """As a kernel launch: through the stand-in's _compute, so a capture records it."""
        ins, given = list(args[:len(self.params)]), list(args[len(self.params):])
        host = [a._a if isinstance(a, sx.ndarray) else np.asarray(a) for a in ins]
        if given:
            sx._compute(self._run, (host, [g._a for g in given]), None, lambda _r: None)
            return given[0] if len(given) == 1 else tuple(given)
        made = sx._compute(self._run, (host, None), None,
                           lambda rs: [sx._dev(r) for r in rs])
        return made[0] if len(made) == 1 else tuple(made)

    def _run(self, host: list, given: list | None) -> list:
        # T: bound by the first array of a T parameter (scalars take its type, as in CuPy)
        t = next(h.dtype for h, (kind, _) in sorted(zip(host, self.params, strict=True),
                                                     key=lambda hp: hp[0].ndim == 0)
                 if kind == "T")
        ctype = _CTYPES[t]
        shape = np.broadcast_shapes(*[h.shape for h in host])
        flat = [np.ascontiguousarray(np.broadcast_to(h.astype(t if k == "T" else np.bool_),
                                                     shape)) for h, (k, _) in
                zip(host, self.params, strict=True)]
        results = [np.empty(shape, t if kind == "T" else np.bool_) for kind, _ in self.outs] \
            if given is None else [np.ascontiguousarray(g) for g in given]
        ptrs = (ctypes.c_void_p * len(flat))(*[f.ctypes.data for f in flat])
        optrs = (ctypes.c_void_p * len(results))(*[r.ctypes.data for r in results])
        self._library(ctype).run(ctypes.c_int64(int(np.prod(shape))), ptrs, optrs)
        CElementwiseKernel.calls += 1
        if given is not None:  # (CuPy: outputs passed in are written, and returned)
            for g, r in zip(given, results, strict=True):
                if r is not g:
                    g[...] = r
            return given
        return results



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
