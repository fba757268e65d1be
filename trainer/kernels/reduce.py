"""Reductions, scans (CumSum/CumProd), arg-extrema and the softmax family.

Reduce* take axes as an attribute before opset 13 (ReduceSum) or 18 (the others), as an input
after; float16/bfloat16 accumulate in float32.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.kernels import axis_in, host_ints, kernel, rowfuse
from trainer.kernels.elementwise import wide

# Host sums as BLAS matrix-vector products with a vector of ones: 2-5x faster than NumPy's
# reduction for the short rows of normalization and softmax statistics and for column sums.
# BLAS adds each row in a few float lanes, as NumPy adds runs of up to 128 elements in 8
# accumulators (pairwise above that); rows longer than BLAS_SUM_RUN keep NumPy's pairwise sum.
# Column sums (a leading block of axes) add row after row in both. Small arrays take BLAS too:
# with the plan bound once, a [16, 128] column sum is 0.5 us against NumPy's 1.3 (the MLP's
# bias gradients; [4, 4] 0.5 against 0.9). Empty arrays keep NumPy's sum. The choice depends on
# the shape, dtype and axes only, so every path (kernels, fused kernels, the planner's in-place
# form, any memory layout) adds a value the same way.
BLAS_SUM_RUN = 1024
BLAS_SUM_MIN = 1
_BLAS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_ONES: dict[tuple[int, np.dtype], np.ndarray] = {}
_SUM_PLANS: dict[tuple, object] = {}


def _ones(n: int, dtype) -> np.ndarray:
    v = _ONES.get((n, dtype))
    if v is None:
        v = np.ones(n, dtype)
        v.flags.writeable = False
        _ONES[(n, dtype)] = v
    return v


def sum_plan(shape: tuple[int, ...], dtype, axes: tuple[int, ...], keepdims: bool):
    """f(x, out=None) summing a C-contiguous host array of this shape and dtype over `axes` (a
    sorted tuple) with BLAS, into `out` (C-contiguous) when given; None where NumPy's sum is
    kept. Decided once per signature."""
    key = (shape, dtype, axes, keepdims)
    if key in _SUM_PLANS:
        return _SUM_PLANS[key]
    if len(_SUM_PLANS) > 4096:
        _SUM_PLANS.clear()
    f = _SUM_PLANS[key] = _make_sum_plan(shape, np.dtype(dtype), axes, keepdims)
    return f


def _make_sum_plan(shape, dtype, axes, keepdims):
    r, k = len(shape), len(axes)
    size = math.prod(shape)
    if dtype not in _BLAS_FLOATS or not k or size < BLAS_SUM_MIN:
        return None
    final = _reduced_shape(shape, axes, keepdims)
    if axes == tuple(range(r - k, r)):  # rows
        n = math.prod(shape[r - k:])
        if n > BLAS_SUM_RUN:
            return None
        ones, m = _ones(n, dtype), size // n

        def rows(x, out=None):
            if out is None:
                return np.dot(x.reshape(m, n), ones).reshape(final)
            np.dot(x.reshape(m, n), ones, out=out.reshape(m))
            return out
        return rows
    if axes == tuple(range(k)):  # columns
        n = math.prod(shape[:k])
        ones, m = _ones(n, dtype), size // n

        def columns(x, out=None):
            if out is None:
                return np.dot(ones, x.reshape(n, m)).reshape(final)
            np.dot(ones, x.reshape(n, m), out=out.reshape(m))
            return out
        return columns
    if axes[0] == 0 and axes[1:] == tuple(range(r - k + 1, r)):  # (BatchNorm's statistics)
        n = math.prod(shape[r - k + 1:])
        if n > BLAS_SUM_RUN:
            return None
        ones, lead = _ones(n, dtype), shape[0]

        def statistics(x, out=None):
            part = np.dot(x.reshape(-1, n), ones).reshape(lead, -1)
            if out is None:
                return np.add.reduce(part, axis=0).reshape(final)
            np.add.reduce(part, axis=0, out=out.reshape(-1))
            return out
        return statistics
    return None


def _sorted_axes(x, axes) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(x.ndim))
    if isinstance(axes, int | np.integer):
        axes = (axes,)
    return tuple(sorted({int(a) % max(x.ndim, 1) for a in axes}))


def sum_of(xp, x, axes=None, keepdims=False, out=None):
    """x.sum(axis=axes, keepdims=keepdims) (into `out` when given); on the host through BLAS
    where sum_plan says so, over a C-contiguous copy of a strided x (NumPy's order of addition
    follows the memory layout). The ReduceSum/ReduceMean, softmax and normalization kernels,
    the fused kernels and the planner's in-place reductions sum through here, so such a value
    comes out the same on every path (ReduceL1/L2/SumSquare/LogSum keep NumPy's sum)."""
    if xp is np and x.dtype in _BLAS_FLOATS:
        x = x if x.flags.c_contiguous else np.ascontiguousarray(x)  # (NumPy's order: layout's)
        f = sum_plan(x.shape, x.dtype, _sorted_axes(x, axes), bool(keepdims)) \
            if x.size >= BLAS_SUM_MIN else None
        if f is not None:
            if out is None or out.flags.c_contiguous:
                return f(x, out)
            np.copyto(out, f(x))
            return out
    if out is not None:
        return np.add.reduce(x, axis=axes, keepdims=keepdims, out=out)
    return x.sum(axis=axes, keepdims=keepdims)


ROW_MAX_MIN = 4096  # elements: below, NumPy's own reduction is as fast


def max_of(xp, x, axes, keepdims=True):
    """x.max(axis=axes, keepdims=keepdims) where it is a shift (softmax, log-softmax, cross
    entropy, attention): the same value, NaN propagated alike. On the host, over the trailing
    axes of a C-contiguous x with short rows, NumPy's reduction pays per row; there rows of up
    to 16 go through whole-array np.maximum calls over their columns and rows of up to 512
    through argmax ([16384, 10] float32: 0.71 -> 0.08 ms; [4096, 64]: 0.24 -> 0.10 ms)."""
    axes = tuple(sorted(a % x.ndim for a in axes)) if x.ndim else ()
    k = len(axes)
    if x.size == 0:  # (rows of no values, as a batch trimmed to no tokens: a shift of -inf)
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keepdims
                      or i not in axes)
        return xp.full(shape, -np.inf, x.dtype)
    if (xp is np and x.size >= ROW_MAX_MIN and k and x.flags.c_contiguous
            and axes == tuple(range(x.ndim - k, x.ndim)) and x.dtype.kind == "f"):
        n = math.prod(x.shape[x.ndim - k:])
        if 1 < n <= 512:
            rows = x.reshape(-1, n)
            if n <= 16:
                m = rows[:, 0].copy()
                for j in range(1, n):
                    np.maximum(m, rows[:, j], out=m)
            else:
                m = np.take_along_axis(rows, rows.argmax(axis=1)[:, None], axis=1)
            return m.reshape(x.shape[:x.ndim - k] + ((1,) * k if keepdims else ()))
    return x.max(axis=axes, keepdims=keepdims)


def squares_finite(x, quiet: bool = True) -> bool:
    """Whether the sum of squares of host float array x is finite, in one pass (a BLAS dot,
    3x faster than NumPy's sum): then every element is finite, since a non-finite one makes
    it inf or NaN. False may also mean the squares overflowed: callers check exactly then.
    quiet=False skips silencing NumPy's overflow warning (2-4 us; for values that do not come
    near 1e19, such as gradients that are still training)."""
    if x.dtype in _BLAS_FLOATS and x.size:
        v = x.reshape(-1) if x.flags.c_contiguous else x.ravel()
        if not quiet:
            return math.isfinite(np.dot(v, v))
        with np.errstate(invalid="ignore", over="ignore"):
            return math.isfinite(np.dot(v, v))
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.isfinite(np.add.reduce(x, axis=None)))


def mean_of(xp, x, axes=None, keepdims=False, out=None):
    """x.mean(axis=axes, keepdims=keepdims) as sum_of, then one division by the count."""
    if xp is not np or x.dtype not in _BLAS_FLOATS:
        res = x.mean(axis=axes, keepdims=keepdims)
        if out is None:
            return res
        np.copyto(out, res)
        return out
    total = sum_of(xp, x, axes, keepdims, out)
    count = math.prod(x.shape[a] for a in _sorted_axes(x, axes)) if x.ndim else 1
    if isinstance(total, np.ndarray):
        return np.true_divide(total, count, out=total)
    return total.dtype.type(total / count)


def _axes(x, axes, noop_with_empty_axes):
    """Normalized axes: None (all), () (noop_with_empty_axes with no axes) or a tuple."""
    if axes is None or len(axes) == 0:
        return None if not noop_with_empty_axes else ()
    # (out of range is an error, not wrapped around; a scalar accepts axis 0 / -1)
    return tuple(sorted({axis_in(a, x.ndim, "Reduce") for a in host_ints(axes)}
                        & set(range(x.ndim))))


def _reduced_shape(shape, axes, keepdims: bool) -> tuple[int, ...]:
    axes = range(len(shape)) if axes is None else axes
    return tuple(1 if i in axes else d for i, d in enumerate(shape)
                 if keepdims or i not in axes)


def _reducer(name, fn, input_axes_since):
    def impl(xp, x, axes, keepdims, noop):
        ax = _axes(x, axes, noop)
        # An empty tuple reduces nothing: the elementwise part alone (ReduceSumSquare squares).
        out = fn(xp, x, ax, bool(keepdims))
        # NumPy widens integer sums/products and averages integers in float: keep x's dtype.
        return (xp.asarray(out).astype(x.dtype, copy=False),)

    @kernel(name, since=1)
    def attr_form(xp, x, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        return impl(xp, x, axes, keepdims, noop_with_empty_axes)

    @kernel(name, since=input_axes_since)
    def input_form(xp, x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        return impl(xp, x, axes, keepdims, noop_with_empty_axes)

    attr_form.__name__ = f"{name}_1"
    input_form.__name__ = name
    return input_form


def _extreme(xp, x, axes, keepdims, largest: bool):
    """max (largest=True) or min over axes; an empty set gives the identity (-inf / +inf)."""
    if x.size:
        return x.max(axis=axes, keepdims=keepdims) if largest else x.min(axis=axes,
                                                                          keepdims=keepdims)
    if x.dtype == bool:
        start = not largest
    elif x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        start = info.min if largest else info.max
    else:
        start = -np.inf if largest else np.inf
    return xp.full(_reduced_shape(x.shape, axes, keepdims), start, dtype=x.dtype)


def _float(x):
    """Compute type for log/sqrt reductions: float32 for 16-bit floats, float64 for ints."""
    return x.astype(np.float64) if x.dtype.kind in "iub" else wide(x)


def _log_sum_exp(xp, x, axes, keepdims):
    v = _float(x)
    m = _extreme(xp, v, axes, True, True)
    m = xp.where(xp.isfinite(m), m, 0)  # empty or all -inf/+inf: no shift
    out = xp.log(sum_of(xp, xp.exp(v - m), axes, keepdims))
    return out + (m if keepdims else m.reshape(out.shape))


ReduceSum = _reducer("ReduceSum", lambda xp, x, a, k: sum_of(xp, wide(x), a, k), 13)
ReduceMean = _reducer("ReduceMean", lambda xp, x, a, k: mean_of(xp, wide(x), a, k), 18)
ReduceMax = _reducer("ReduceMax", lambda xp, x, a, k: _extreme(xp, x, a, k, True), 18)
ReduceMin = _reducer("ReduceMin", lambda xp, x, a, k: _extreme(xp, x, a, k, False), 18)
ReduceProd = _reducer("ReduceProd", lambda xp, x, a, k: wide(x).prod(axis=a, keepdims=k), 18)
ReduceSumSquare = _reducer(
    "ReduceSumSquare", lambda xp, x, a, k: (wide(x) * wide(x)).sum(axis=a, keepdims=k), 18)
ReduceL1 = _reducer("ReduceL1", lambda xp, x, a, k: xp.abs(wide(x)).sum(axis=a, keepdims=k), 18)
ReduceL2 = _reducer(
    "ReduceL2", lambda xp, x, a, k: xp.sqrt((_float(x) ** 2).sum(axis=a, keepdims=k)), 18)
ReduceLogSum = _reducer(
    "ReduceLogSum", lambda xp, x, a, k: xp.log(_float(x).sum(axis=a, keepdims=k)), 18)
ReduceLogSumExp = _reducer("ReduceLogSumExp", _log_sum_exp, 18)


def _scan(xp, x, axis, exclusive, reverse, product: bool):
    ax = axis_in(host_ints(axis.reshape(-1))[0], x.ndim, "CumProd" if product else "CumSum")
    v = wide(x)
    if reverse:
        v = xp.flip(v, axis=ax)
    out = (xp.cumprod if product else xp.cumsum)(v, axis=ax, dtype=v.dtype)
    if exclusive and out.shape[ax]:
        # Shift by one along the axis, the identity (0 or 1) first.
        first = xp.full(out.shape[:ax] + (1,) + out.shape[ax + 1:], int(product), out.dtype)
        head = (slice(None),) * ax + (slice(0, out.shape[ax] - 1),)
        out = xp.concatenate([first, out[head]], axis=ax)
    if reverse:
        out = xp.flip(out, axis=ax)
    return (out.astype(x.dtype, copy=False),)


@kernel("CumSum", since=11)
def CumSum(xp, x, axis, *, exclusive=0, reverse=0):
    return _scan(xp, x, axis, exclusive, reverse, False)


@kernel("CumProd", since=26)
def CumProd(xp, x, axis, *, exclusive=0, reverse=0):
    return _scan(xp, x, axis, exclusive, reverse, True)


def softmax_axes(ndim: int, axis: int, opset: int) -> tuple[int, ...]:
    """Axes a (Log)Softmax normalizes over: one axis from opset 13, all trailing ones before."""
    axis = axis_in(axis, ndim, "Softmax")
    return (axis,) if opset >= 13 else tuple(range(axis, ndim))


# The softmax family computes in x's own dtype: ONNX's float16 expectations (e.g. the expanded
# fp16 attention cases) are rounded step by step, and float32 compute misses them by 2 ulp.
def _log_softmax(xp, x, axes):
    if x.size == 0:  # (rows of no values: a batch trimmed to no tokens)
        return xp.empty_like(x)
    if (fast := rowfuse.softmax(xp, x, axes, log=True)) is not None:
        return fast  # (a device: generated kernels)
    m = max_of(xp, x, axes)
    z = x - m
    return z - xp.log(sum_of(xp, xp.exp(z), axes, True))


def _softmax(xp, x, axes):
    if x.size == 0:
        return xp.empty_like(x)
    if (fast := rowfuse.softmax(xp, x, axes)) is not None:
        return fast  # (a device: generated kernels)
    e = xp.subtract(x, max_of(xp, x, axes))
    e = xp.exp(e, out=e)
    e /= sum_of(xp, e, axes, True)
    return e


@kernel("Softmax", since=1)
def Softmax_1(xp, x, *, axis=1):
    return (_softmax(xp, x, softmax_axes(x.ndim, axis, 1)),)


@kernel("Softmax", since=13)
def Softmax_13(xp, x, *, axis=-1):
    return (_softmax(xp, x, softmax_axes(x.ndim, axis, 13)),)


@kernel("LogSoftmax", since=1)
def LogSoftmax_1(xp, x, *, axis=1):
    return (_log_softmax(xp, x, softmax_axes(x.ndim, axis, 1)),)


@kernel("LogSoftmax", since=13)
def LogSoftmax_13(xp, x, *, axis=-1):
    return (_log_softmax(xp, x, softmax_axes(x.ndim, axis, 13)),)


def _hardmax(xp, x, axis):
    """1 at the first maximum along axis, 0 elsewhere."""
    if x.size == 0:
        return xp.zeros_like(x)
    first = xp.expand_dims(x.argmax(axis=axis), axis)
    pos = xp.arange(x.shape[axis]).reshape((-1,) + (1,) * (x.ndim - 1 - axis))
    return (pos == first).astype(x.dtype)


@kernel("Hardmax", since=1)
def Hardmax_1(xp, x, *, axis=1):
    """Opsets 1-12: x coerced to 2-D [prod(shape[:axis]), prod(shape[axis:])]."""
    axis = axis_in(axis, x.ndim, "Hardmax")
    rows = int(np.prod(x.shape[:axis], dtype=np.int64))
    flat = x.reshape(rows, int(np.prod(x.shape[axis:], dtype=np.int64)))
    return (_hardmax(xp, flat, 1).reshape(x.shape),)


@kernel("Hardmax", since=13)
def Hardmax(xp, x, *, axis=-1):
    return (_hardmax(xp, x, axis_in(axis, x.ndim, "Hardmax")),)


def _arg_extreme(xp, x, axis, keepdims, select_last_index, largest: bool):
    axis = axis_in(axis, x.ndim, "ArgMax" if largest else "ArgMin")
    if select_last_index:
        flipped = xp.flip(x, axis=axis)
        pick = flipped.argmax(axis=axis) if largest else flipped.argmin(axis=axis)
        out = x.shape[axis] - 1 - pick
    else:
        out = x.argmax(axis=axis) if largest else x.argmin(axis=axis)
    if keepdims:
        out = xp.expand_dims(out, axis)
    return (xp.asarray(out).astype(np.int64),)


@kernel("ArgMax")
def ArgMax(xp, x, *, axis=0, keepdims=1, select_last_index=0):
    return _arg_extreme(xp, x, axis, keepdims, select_last_index, True)


@kernel("ArgMin")
def ArgMin(xp, x, *, axis=0, keepdims=1, select_last_index=0):
    return _arg_extreme(xp, x, axis, keepdims, select_last_index, False)
