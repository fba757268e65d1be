"""Device fast paths of the normalizations: LayerNormalization and BatchNormalization's training
form (forward and backward), RMSNormalization, Softmax, LogSoftmax (and so the fused cross
entropy's log-softmax) as a few generated CuPy kernels each (`cupy.ReductionKernel` for a
statistic, `cupy.ElementwiseKernel` for the result) instead of one xp call per operation: each
kernel reads its inputs once and writes no intermediate array. Kernels over the whole input,
counted through the tests' CuPy stand-in:

| kernel | xp code | here |
|---|---|---|
| LayerNormalization forward | 7 | 3: mean, variance, result |
| its backward (dX, dScale, dBias) | 16 | 7 |
| BatchNormalization training forward (xhat, y) | 7 | 3: mean, variance, xhat and y |
| its backward | 7 | 3 |
| RMSNormalization | 4 | 2: mean square, result |
| Softmax, LogSoftmax | 5 | 3: maximum, sum of exponentials, result |

Each kernel computes the operations of the xp code it replaces in the same order (so it rounds
alike, up to the GPU compiler contracting a product and a sum into one FMA). float32 and float64
only (16-bit inputs, and mixed dtypes, keep the xp code). Where the array module has no such
kernel API (the tests' CuPy stand-in) the callers run their xp code; where a kernel fails
to build or run, they do too, after one RuntimeWarning that names it.

On the host (NumPy), the same fast paths are numba loops (kernels/rowloops.py) where the
compiled host kernels are on (trainer.kernels.compiled): one loop per normalization, its
statistics summed in float64. Measured on one core (Intel Xeon, float32, NumPy code -> loop):
LayerNormalization [1024, 128] (the GPT bench's) forward 0.18 -> 0.05 ms, backward 0.35 -> 0.13
ms; BatchNormalization training [16, 16, 32, 32] forward 0.45 -> 0.15 ms, backward 0.37 -> 0.12
ms (BENCHMARKS.md, 2026-12-06)."""

from __future__ import annotations

import math

import numpy as np

from trainer.kernels import compiled
from trainer.kernels.generated import GeneratedKernel

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_MEAN = "out0 = a / _type_reduce(_in_ind.size() / _out_ind.size())"  # (CuPy's own mean's)


def _kernel(kind: str, *spec: str) -> GeneratedKernel:
    return GeneratedKernel(kind, spec, f"generated kernel {spec[-1]}",
                           "the xp operations it fuses run instead")


def _reduction(params: str, map_expr: str, post: str, name: str) -> GeneratedKernel:
    # (the output is out0, as CuPy names its own: a one-input reduction takes CuPy's CUB path,
    # which renames the output to out0 by replacing its name in the post expression's text,
    # and an `r` there became `_type_out0educe`; compile error, the fast path off for the run)
    return _kernel("ReductionKernel", params, "T out0", map_expr, "a + b", post, "0",
                   f"onnx_trainer_{name}")


def _elementwise(params: str, body: str, name: str) -> GeneratedKernel:
    return _kernel("ElementwiseKernel", params, "T y", body, f"onnx_trainer_{name}")


# LayerNormalization: the statistics of kernels/norm.py's _standardize, its result, and the
# backward of kernels/fused.py's layer_norm_backward (xhat = (x - mean) * inv, g = dy * scale)
VARIANCE = _reduction("T x, T m", "(x - m) * (x - m)", _MEAN, "ln_var")
LN_Y = _elementwise("T x, T m, T inv, T s, T b", "y = (x - m) * inv * s + b", "ln_y")
LN_Y_NO_BIAS = _elementwise("T x, T m, T inv, T s", "y = (x - m) * inv * s", "ln_y_nb")
MEAN_G = _reduction("T dy, T s", "dy * s", _MEAN, "ln_mean_g")
MEAN_G_XHAT = _reduction("T dy, T s, T x, T m, T inv", "(dy * s) * ((x - m) * inv)", _MEAN,
                         "ln_mean_gx")
LN_DX = _elementwise("T dy, T s, T x, T m, T inv, T mg, T mgx",
                     "y = ((dy * s - mg) - ((x - m) * inv) * mgx) * inv", "ln_dx")
SUM_DY_XHAT = _reduction("T dy, T x, T m, T inv", "dy * ((x - m) * inv)", "out0 = a",
                         "ln_sum_dy_xhat")
# RMSNormalization (kernels/norm.py)
MEAN_SQUARE = _reduction("T x", "x * x", _MEAN, "mean_square")
RMS_Y = _elementwise("T x, T inv, T s", "y = x * inv * s", "rms_y")
# BatchNormalization's training rewrite (kernels/fused.py's bn_train_forward and backward)
BN_XHAT_Y = _kernel("ElementwiseKernel", "T x, T m, T sd, T s, T b", "T xhat, T y",
                    "xhat = (x - m) / sd; y = xhat * s + b", "onnx_trainer_bn_xhat_y")
SUM_PRODUCT = _reduction("T u, T v", "u * v", "out0 = a", "sum_product")
BN_DX = _elementwise("T dy, T xhat, T dsi, T dbi, T k", "y = ((dy - xhat * dsi) - dbi) * k",
                     "bn_dx")
# Softmax and LogSoftmax (kernels/reduce.py's _softmax and _log_softmax), m the row maximum
SUM_EXP = _reduction("T x, T m", "exp(x - m)", "out0 = a", "sum_exp")
SOFTMAX_Y = _elementwise("T x, T m, T s", "y = exp(x - m) / s", "softmax_y")
LOG_SOFTMAX_Y = _elementwise("T x, T m, T ls", "y = (x - m) - ls", "log_softmax_y")
KERNELS = (VARIANCE, LN_Y, LN_Y_NO_BIAS, MEAN_G, MEAN_G_XHAT, LN_DX, SUM_DY_XHAT, MEAN_SQUARE,
           RMS_Y, BN_XHAT_Y, SUM_PRODUCT, BN_DX, SUM_EXP, SOFTMAX_Y, LOG_SOFTMAX_Y)


def _run(xp, *steps):
    """`steps` ((kernel or plain callable, args, kwargs) each) run in order, an `_r(k)` among
    a step's args standing for the k-th step's result: the results, or None where a kernel
    is missing or fails (that kernel then warns, once)."""
    made = [k.get(xp) if isinstance(k, GeneratedKernel) else k for k, _, _ in steps]
    if any(m is None for m in made):
        return None
    results: list = []
    for (kernel, args, kwargs), fn in zip(steps, made, strict=True):
        args = [results[a] if isinstance(a, _r) else a for a in args]
        try:
            results.append(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the caller's xp code runs instead
            if not isinstance(kernel, GeneratedKernel):
                raise
            kernel.failed(exc)
            return None
    return results


def _ok(*arrays) -> bool:
    first = arrays[0].dtype
    return first in _FLOATS and all(a is None or a.dtype == first for a in arrays)


class _r(int):  # noqa: N801 - reads as a reference in the steps' argument lists
    """An argument of a `_run` step that is the k-th result of the steps before it."""


def _mean_var(xp, x, axes: tuple[int, ...]):
    """(mean, variance) of x over `axes`, keepdims, as mean_of(x) and mean_of((x - mean)^2)
    compute them: CuPy's mean and the VARIANCE kernel; None where the kernel is missing."""
    return _run(xp, (lambda v: v.mean(axis=axes, keepdims=True), (x,), {}),
                (VARIANCE, (x, _r(0)), {"axis": axes, "keepdims": True}))


def layer_norm(xp, x, scale, bias, axes: tuple[int, ...], eps: float):
    """(y, mean, inv_std) of LayerNormalization over trailing `axes` (keepdims statistics), or
    None where the fast path does not apply."""
    if xp is np:
        return _host_layer_norm(x, scale, bias, axes, eps)
    if not _ok(x, scale, bias):
        return None
    stats = _mean_var(xp, x, axes)
    if stats is None:
        return None
    mean, var = stats
    inv = 1 / xp.sqrt(var + x.dtype.type(eps))
    # (scale and bias broadcast against x, as in the xp code)
    y = _run(xp, (LN_Y_NO_BIAS, (x, mean, inv, scale), {}) if bias is None else
             (LN_Y, (x, mean, inv, scale, bias), {}))
    return None if y is None else (y[0], mean, inv)


def rms_norm(xp, x, scale, axes: tuple[int, ...], eps: float):
    """RMSNormalization's result over trailing `axes`, or None where the fast path does not
    apply."""
    if xp is np or not _ok(x, scale):
        return None
    ms = _run(xp, (MEAN_SQUARE, (x,), {"axis": axes, "keepdims": True}))
    if ms is None:
        return None
    inv = 1 / xp.sqrt(ms[0] + x.dtype.type(eps))
    y = _run(xp, (RMS_Y, (x, inv, scale), {}))
    return None if y is None else y[0]


def layer_norm_backward(xp, dy, x, scale, *, axes, eps, want_dx, want_ds, want_db, ds_shape,
                        db_shape):
    """The outputs of kernels/fused.py's layer_norm_backward, or None where the fast path does
    not apply."""
    if xp is np:
        return _host_layer_norm_backward(dy, x, scale, axes, eps, want_dx, want_ds, want_db,
                                         ds_shape, db_shape)
    if not _ok(dy, x, scale):
        return None
    lead = tuple(range(axes[0]))
    s = scale.reshape(x.shape[axes[0]:])
    red = {"axis": axes, "keepdims": True}
    stats = _mean_var(xp, x, axes)
    if stats is None:
        return None
    mean, var = stats
    inv = 1 / xp.sqrt(var + x.dtype.type(eps))
    steps = []
    if want_dx:
        steps += [(MEAN_G, (dy, s), red), (MEAN_G_XHAT, (dy, s, x, mean, inv), red),
                  (LN_DX, (dy, s, x, mean, inv, _r(0), _r(1)), {})]
    if want_ds:
        steps.append((SUM_DY_XHAT, (dy, x, mean, inv), {"axis": lead}))
    got = _run(xp, *steps)
    if got is None:
        return None
    result = []
    if want_dx:
        result.append(got[2])
    if want_ds:
        result.append(got[-1].reshape(ds_shape))
    if want_db:
        result.append(dy.sum(axis=lead).reshape(db_shape))
    return tuple(result)


def softmax(xp, x, axes: tuple[int, ...], log: bool = False):
    """Softmax (or LogSoftmax) of x over `axes`, or None where the fast path does not apply."""
    if xp is np or not _ok(x):
        return None
    red = {"axis": axes, "keepdims": True}
    steps = [(lambda v: v.max(axis=axes, keepdims=True), (x,), {}),
             (SUM_EXP, (x, _r(0)), red)]
    out = _run(xp, *steps)
    if out is None:
        return None
    m, s = out
    y = _run(xp, (LOG_SOFTMAX_Y, (x, m, xp.log(s)), {})) if log else \
        _run(xp, (SOFTMAX_Y, (x, m, s), {}))
    return None if y is None else y[0]


def bn_train(xp, x, s_b, b_b, *, axes, eps, want):
    """The values `want` of kernels/fused.py's bn_train_forward (the batch statistics over
    `axes`, keepdims), or None where the fast path does not apply (it gives mean, var, ve, sd,
    xhat and y; xc, sq and scaled, which no gradient rule reads, keep the xp code)."""
    if s_b is None or b_b is None or not _ok(x, s_b, b_b) or {"xc", "sq", "scaled"} & set(want):
        return None
    if xp is np:
        return _host_bn_train(x, s_b, b_b, axes, eps, want)
    stats = _mean_var(xp, x, axes)
    if stats is None:
        return None
    mean, var = stats
    ve = var + eps
    sd = xp.sqrt(ve)
    made = _run(xp, (BN_XHAT_Y, (x, mean, sd, s_b, b_b), {}))
    if made is None:
        return None
    xhat, y = made[0]
    local = {"mean": mean, "var": var, "ve": ve, "sd": sd, "xhat": xhat, "y": y}
    return tuple(local[k] for k in want)


def bn_train_backward(xp, dy, xhat, sd, s_b, *, axes, count, want_dx, want_ds, want_db,
                      ds_shape, db_shape):
    """The outputs of kernels/fused.py's bn_train_backward, or None where the fast path does
    not apply."""
    if not _ok(dy, xhat, sd, s_b):
        return None
    if xp is np:
        return _host_bn_train_backward(dy, xhat, sd, s_b, axes, count, want_dx, want_ds,
                                       want_db, ds_shape, db_shape)
    got = _run(xp, (SUM_PRODUCT, (dy, xhat), {"axis": axes, "keepdims": True}))
    if got is None:
        return None
    ds = got[0]
    db = dy.sum(axis=axes, keepdims=True)
    out = []
    if want_dx:
        inv = dy.dtype.type(1.0 / count)
        k = s_b / sd if s_b is not None else 1 / sd
        dx = _run(xp, (BN_DX, (dy, xhat, ds * inv, db * inv, k), {}))
        if dx is None:
            return None
        out.append(dx[0])
    if want_ds:
        out.append(ds.reshape(ds_shape))
    if want_db:
        out.append(db.reshape(db_shape))
    return tuple(out)


# -- the host: numba loops (kernels/rowloops.py) -------------------------------------------------
def _rows(x, axes):
    """(rows, row length) of x over trailing `axes`, or None where the loops do not apply (an
    empty x: the NumPy code's warnings and NaNs are its own)."""
    d = math.prod(x.shape[axes[0]:]) if axes else 1
    if not x.size or list(axes) != list(range(axes[0], x.ndim)):
        return None
    return x.size // d, d


def _flat(v, size: int, dtype):
    """v as a contiguous [size] vector (None where v is not one value per position of the
    row or channel: a broadcast the loops do not take)."""
    if v is None:
        return np.empty(0, dtype)
    return np.ascontiguousarray(v).reshape(-1) if v.size == size else None


def _host_layer_norm(x, scale, bias, axes, eps):
    loops = compiled.row_loops()
    shape = _rows(x, axes) if loops is not None and _ok(x, scale, bias) else None
    if shape is None:
        return None
    rows, d = shape
    s, b = _flat(scale, d, x.dtype), _flat(bias, d, x.dtype)
    if s is None or b is None:
        return None
    x2 = np.ascontiguousarray(x).reshape(rows, d)
    y = np.empty_like(x2)
    mean, inv = np.empty(rows, x.dtype), np.empty(rows, x.dtype)
    loops.layer_norm(x2, s, b, np.array([1, eps], x.dtype), y, mean, inv)
    keep = x.shape[:axes[0]] + (1,) * len(axes)
    return y.reshape(x.shape), mean.reshape(keep), inv.reshape(keep)


def _host_layer_norm_backward(dy, x, scale, axes, eps, want_dx, want_ds, want_db, ds_shape,
                              db_shape):
    loops = compiled.row_loops()
    shape = _rows(x, axes) if loops is not None and _ok(dy, x, scale) and \
        dy.shape == x.shape else None
    if shape is None:
        return None
    rows, d = shape
    s = _flat(scale, d, x.dtype)
    if s is None:
        return None
    x2 = np.ascontiguousarray(x).reshape(rows, d)
    dy2 = np.ascontiguousarray(dy).reshape(rows, d)
    dx = np.empty_like(x2) if want_dx else np.empty((0, 0), x.dtype)
    ds, db = np.zeros(d), np.zeros(d)
    loops.layer_norm_backward(dy2, x2, s, np.array([1, eps], x.dtype), dx, ds, db,
                              bool(want_dx))
    out = [dx.reshape(x.shape)] if want_dx else []
    if want_ds:
        out.append(ds.astype(x.dtype).reshape(ds_shape))
    if want_db:
        out.append(db.astype(x.dtype).reshape(db_shape))
    return tuple(out)


def _channels(x, axes):
    """(N, C, L) of x whose BatchNormalization statistics are over `axes` = all but axis 1, or
    None where the loops do not apply."""
    if x.ndim < 2 or not x.size or tuple(axes) != (0,) + tuple(range(2, x.ndim)):
        return None
    return x.shape[0], x.shape[1], x.size // (x.shape[0] * x.shape[1])


def _host_bn_train(x, s_b, b_b, axes, eps, want):
    loops = compiled.row_loops()
    shape = _channels(x, axes) if loops is not None else None
    if shape is None:
        return None
    n, ch, length = shape
    s, b = _flat(s_b, ch, x.dtype), _flat(b_b, ch, x.dtype)
    if s is None or b is None:
        return None
    x3 = np.ascontiguousarray(x).reshape(n, ch, length)
    xhat, y = np.empty_like(x3), np.empty_like(x3)
    stats = np.empty((4, ch), x.dtype)
    loops.bn_train(x3, s, b, np.array([eps], x.dtype), xhat, y, stats)
    keep = (1, ch) + (1,) * (x.ndim - 2)
    local = {"mean": stats[0].reshape(keep), "var": stats[1].reshape(keep),
             "ve": stats[2].reshape(keep), "sd": stats[3].reshape(keep),
             "xhat": xhat.reshape(x.shape), "y": y.reshape(x.shape)}
    return tuple(local[k] for k in want)


def _host_bn_train_backward(dy, xhat, sd, s_b, axes, count, want_dx, want_ds, want_db,
                            ds_shape, db_shape):
    loops = compiled.row_loops()
    shape = _channels(dy, axes) if loops is not None and xhat.shape == dy.shape else None
    if shape is None:
        return None
    n, ch, length = shape
    if sd.size != ch or (s_b is not None and s_b.size != ch):
        return None
    k = (s_b / sd) if s_b is not None else 1 / sd  # (as the NumPy code computes it)
    dy3 = np.ascontiguousarray(dy).reshape(n, ch, length)
    h3 = np.ascontiguousarray(xhat).reshape(n, ch, length)
    dx = np.empty_like(dy3) if want_dx else np.empty((0, 0, 0), dy.dtype)
    sums = np.empty((2, ch), dy.dtype)
    loops.bn_train_backward(dy3, h3, np.ascontiguousarray(k).reshape(-1),
                            np.array([1.0 / count], dy.dtype), dx, sums, bool(want_dx))
    out = [dx.reshape(dy.shape)] if want_dx else []
    if want_ds:
        out.append(sums[0].reshape(ds_shape))
    if want_db:
        out.append(sums[1].reshape(db_shape))
    return tuple(out)
