"""Elementwise kernels: arithmetic, activations, comparisons, casts (NumPy broadcasting)."""

from __future__ import annotations

import numpy as np

from trainer.graph import np_dtype
from trainer.kernels import kernel


def legacy_broadcast(a, b, broadcast, axis):
    """Opsets < 7: with `broadcast` and `axis`, b's dims align with a's from `axis` on."""
    if broadcast and axis is not None:
        return b.reshape(b.shape + (1,) * (a.ndim - axis % a.ndim - b.ndim))
    return b


def _binary(name, fn):
    @kernel(name, since=1)
    def legacy(xp, a, b, *, broadcast=0, axis=None, consumed_inputs=None):
        return (fn(xp, a, legacy_broadcast(a, b, broadcast, axis)),)

    @kernel(name, since=7)
    def op(xp, a, b):
        return (fn(xp, a, b),)
    op.__name__ = legacy.__name__ = name
    return op


Add = _binary("Add", lambda xp, a, b: a + b)
Sub = _binary("Sub", lambda xp, a, b: a - b)
Mul = _binary("Mul", lambda xp, a, b: a * b)
Equal = _binary("Equal", lambda xp, a, b: a == b)
Greater = _binary("Greater", lambda xp, a, b: a > b)
Less = _binary("Less", lambda xp, a, b: a < b)
GreaterOrEqual = _binary("GreaterOrEqual", lambda xp, a, b: a >= b)
LessOrEqual = _binary("LessOrEqual", lambda xp, a, b: a <= b)
And = _binary("And", lambda xp, a, b: xp.logical_and(a, b))
Or = _binary("Or", lambda xp, a, b: xp.logical_or(a, b))


@kernel("Div", since=1)
def Div_1(xp, a, b, *, broadcast=0, axis=None, consumed_inputs=None):
    return Div(xp, a, legacy_broadcast(a, b, broadcast, axis))


@kernel("Div", since=7)
def Div(xp, a, b):
    if xp.issubdtype(a.dtype, xp.integer):
        # ONNX integer division truncates toward zero (C semantics).
        q = xp.abs(a) // xp.abs(b)
        return ((q * xp.sign(a) * xp.sign(b)).astype(a.dtype),)
    return (a / b,)


@kernel("Pow", since=1)
def Pow_1(xp, a, b, *, broadcast=0, axis=None):
    return Pow(xp, a, legacy_broadcast(a, b, broadcast, axis))


@kernel("Pow", since=7)
def Pow(xp, a, b):
    # The result has the base's type; an integer base with a float exponent computes in float.
    if a.dtype.kind in "iu" and b.dtype.kind == "f":
        return (xp.power(a.astype(np.float64), b).astype(a.dtype),)
    return (xp.power(a, b.astype(a.dtype) if a.dtype != b.dtype else b).astype(a.dtype),)


def _unary(name, fn):
    @kernel(name)
    def op(xp, x):
        return (fn(xp, x),)
    op.__name__ = name
    return op


Neg = _unary("Neg", lambda xp, x: -x)
Abs = _unary("Abs", lambda xp, x: xp.abs(x))
Exp = _unary("Exp", lambda xp, x: xp.exp(x))
Log = _unary("Log", lambda xp, x: xp.log(x))
Sqrt = _unary("Sqrt", lambda xp, x: xp.sqrt(x))
Reciprocal = _unary("Reciprocal", lambda xp, x: xp.reciprocal(x))
Tanh = _unary("Tanh", lambda xp, x: xp.tanh(x))
Relu = _unary("Relu", lambda xp, x: xp.maximum(x, x.dtype.type(0)))
Not = _unary("Not", lambda xp, x: xp.logical_not(x))
Floor = _unary("Floor", lambda xp, x: xp.floor(x))
Ceil = _unary("Ceil", lambda xp, x: xp.ceil(x))
Sign = _unary("Sign", lambda xp, x: xp.sign(x))
Round = _unary("Round", lambda xp, x: xp.round(x))  # half to even, as the spec
Identity = _unary("Identity", lambda xp, x: x)


@kernel("Sigmoid")
def Sigmoid(xp, x):
    # Split by sign so exp never overflows.
    e = xp.exp(-xp.abs(x))
    return (xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype),)


@kernel("Where")
def Where(xp, cond, a, b):
    return (xp.where(cond, a, b),)


_FLOAT8 = {"float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"}


def _cast(xp, x, dtype, saturate, round_mode):
    if dtype.name == "float8_e8m0fnu":  # exponent-only type: ONNX's rounding rules (host side)
        from onnx.numpy_helper import to_float8e8m0
        host = x.get() if xp is not np else x
        return xp.asarray(to_float8e8m0(np.asarray(host, np.float32), bool(saturate),
                                        round_mode))
    if saturate and dtype.name in _FLOAT8 and x.dtype.kind == "f":
        # Saturating float8 cast: out-of-range values (infinities included) clip to +-max.
        import ml_dtypes
        top = float(ml_dtypes.finfo(dtype).max)
        x = xp.clip(x, -top, top)
    return x.astype(dtype)


@kernel("Cast")
def Cast(xp, x, *, to, saturate=1, round_mode="up"):
    return (_cast(xp, x, np_dtype(to), saturate, round_mode),)


@kernel("CastLike")
def CastLike(xp, x, like, *, saturate=1, round_mode="up"):
    return (_cast(xp, x, like.dtype, saturate, round_mode),)


def _variadic(name, fn):
    @kernel(name)
    def op(xp, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(xp, out, x)
        return (out if len(xs) > 1 else out.copy(),)
    op.__name__ = name
    return op


Sum = _variadic("Sum", lambda xp, a, b: a + b)
Max = _variadic("Max", lambda xp, a, b: xp.maximum(a, b))
Min = _variadic("Min", lambda xp, a, b: xp.minimum(a, b))


@kernel("Clip", since=11)
def Clip(xp, x, lo=None, hi=None):
    if lo is not None:
        x = xp.maximum(x, lo)
    if hi is not None:
        x = xp.minimum(x, hi)
    return (x,)


@kernel("LeakyRelu")
def LeakyRelu(xp, x, *, alpha=0.01):
    return (xp.where(x >= 0, x, x * x.dtype.type(alpha)),)


@kernel("Erf")
def Erf(xp, x):
    if xp is np:
        import math
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)
    import cupyx.scipy.special  # pragma: no cover - GPU only
    return (cupyx.scipy.special.erf(x),)  # pragma: no cover
