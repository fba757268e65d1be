"""Reductions and softmax-family kernels; axes as attribute (old opsets) or input (new)."""

from __future__ import annotations

import numpy as np

from trainer.kernels import kernel


def _axes(x, axes, noop_with_empty_axes):
    if axes is None or len(axes) == 0:
        return None if not noop_with_empty_axes else ()
    return tuple(int(a) % x.ndim for a in (axes.tolist() if hasattr(axes, "tolist") else axes))


def _reducer(name, fn, input_axes_since):
    def impl(xp, x, axes, keepdims, noop):
        ax = _axes(x, axes, noop)
        if ax == ():  # noop_with_empty_axes: nothing reduced, but ReduceSumSquare still squares
            return (x * x if name == "ReduceSumSquare" else x,)
        # NumPy widens integer sums/products and averages integers in float: keep x's dtype.
        out = fn(xp, x, ax, bool(keepdims))
        return (out if out.dtype == x.dtype else out.astype(x.dtype),)

    @kernel(name, since=1)
    def attr_form(xp, x, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        return impl(xp, x, axes, keepdims, noop_with_empty_axes)

    @kernel(name, since=input_axes_since)
    def input_form(xp, x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        return impl(xp, x, axes, keepdims, noop_with_empty_axes)

    return input_form


def _extreme(x, axes, keepdims, lowest: bool):
    """max (lowest=True) or min over axes; an empty set gives the identity (-inf / +inf)."""
    fn = x.max if lowest else x.min
    if x.size:
        return fn(axis=axes, keepdims=keepdims)
    if x.dtype == bool:
        start = not lowest
    elif x.dtype.kind == "f":
        start = -float("inf") if lowest else float("inf")
    else:
        info = np.iinfo(x.dtype)
        start = info.min if lowest else info.max
    return fn(axis=axes, keepdims=keepdims, initial=start)


ReduceSum = _reducer("ReduceSum", lambda xp, x, a, k: x.sum(axis=a, keepdims=k), 13)
ReduceMean = _reducer("ReduceMean", lambda xp, x, a, k: x.mean(axis=a, keepdims=k), 18)
ReduceMax = _reducer("ReduceMax", lambda xp, x, a, k: _extreme(x, a, k, True), 18)
ReduceMin = _reducer("ReduceMin", lambda xp, x, a, k: _extreme(x, a, k, False), 18)
ReduceProd = _reducer("ReduceProd", lambda xp, x, a, k: x.prod(axis=a, keepdims=k), 18)
ReduceSumSquare = _reducer("ReduceSumSquare", lambda xp, x, a, k: (x * x).sum(axis=a, keepdims=k),
                           18)


def softmax_axes(ndim: int, axis: int, opset: int) -> tuple[int, ...]:
    """Axes a (Log)Softmax normalizes over: one axis from opset 13, all trailing ones before."""
    axis %= ndim
    return (axis,) if opset >= 13 else tuple(range(axis, ndim))


def _log_softmax(xp, x, axes):
    m = x.max(axis=axes, keepdims=True)
    z = x - m
    return z - xp.log(xp.exp(z).sum(axis=axes, keepdims=True))


def _softmax(xp, x, axes):
    e = xp.exp(x - x.max(axis=axes, keepdims=True))
    return e / e.sum(axis=axes, keepdims=True)


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


@kernel("ArgMax")
def ArgMax(xp, x, *, axis=0, keepdims=1, select_last_index=0):
    if select_last_index:
        flipped = xp.flip(x, axis=axis)
        out = x.shape[axis] - 1 - flipped.argmax(axis=axis)
    else:
        out = x.argmax(axis=axis)
    if keepdims:
        out = xp.expand_dims(out, axis)
    return (out.astype(xp.int64),)
