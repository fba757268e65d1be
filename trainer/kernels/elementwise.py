"""Elementwise kernels: arithmetic, trigonometry, activations, comparisons, bitwise ops, casts.

Composite float16/bfloat16 activations compute in float32 and round once, as onnxruntime does.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from trainer.backend import cupyx_module, device_dtype_ok
from trainer.errors import ModelError
from trainer.graph import np_dtype
from trainer.kernels import CUSTOM_DOMAIN, CUSTOM_SHAPES, compiled, kernel


def low_float(dtype) -> bool:
    """float16 or bfloat16 (ml_dtypes' kind 'V'): attribute tests, ~40x faster than
    `dtype.name`, which runs Python code in NumPy 2 and is asked at every kernel call."""
    return dtype.itemsize == 2 and dtype.kind in "fV"


def wide(x):
    """float16/bfloat16 as float32 (compute type); every other dtype unchanged."""
    return x.astype(np.float32) if low_float(x.dtype) else x


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
Xor = _binary("Xor", lambda xp, a, b: xp.logical_xor(a, b))


@kernel("Div", since=1)
def Div_1(xp, a, b, *, broadcast=0, axis=None, consumed_inputs=None):
    return Div(xp, a, legacy_broadcast(a, b, broadcast, axis))


@kernel("Div", since=7)
def Div(xp, a, b):
    if a.dtype.kind in "iu":
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
    if a.dtype.kind in "iu" and b.dtype.kind == "u":
        return (xp.power(a, b.astype(a.dtype)),)
    if a.dtype.kind in "iu" and b.dtype.kind == "i":
        # A negative integer power truncates 1 / a**n: 0 except for the bases 1 and -1.
        neg = b < 0
        pos = xp.power(a, xp.where(neg, 0, b).astype(a.dtype))
        inv = xp.where(a == 1, 1, xp.where(a == -1, 1 - 2 * (b % 2), 0))
        return (xp.where(neg, inv, pos).astype(a.dtype),)
    if a.dtype.kind in "iu":
        return (xp.power(a.astype(np.float64), wide(b)).astype(a.dtype),)
    return (xp.power(wide(a), wide(b)).astype(a.dtype),)


@kernel("Mod", since=10)
def Mod(xp, a, b, *, fmod=0):
    """fmod=0: the remainder has the divisor's sign (floored); fmod=1: the dividend's (C fmod)."""
    out = xp.fmod(a, b) if fmod else xp.mod(a, b)
    return (out.astype(a.dtype, copy=False),)


def _unary(name, fn, since=1, low=False):
    """A one-input kernel; with low=True float16/bfloat16 compute in float32."""
    @kernel(name, since=since)
    def op(xp, x, *, consumed_inputs=None):
        if low and low_float(x.dtype):
            return (fn(xp, x.astype(np.float32)).astype(x.dtype),)
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


@kernel("StopGradient", domain=CUSTOM_DOMAIN)
def StopGradient(xp, x):
    """ai.onnx_trainer.StopGradient: the identity, through which no gradient flows back
    (PyTorch's .detach(), which ONNX has no op for: params.stop_detached puts it back)."""
    return (x,)


CUSTOM_SHAPES["StopGradient"] = lambda x: [x]

Sin = _unary("Sin", lambda xp, x: xp.sin(x), 7)
Cos = _unary("Cos", lambda xp, x: xp.cos(x), 7)
Tan = _unary("Tan", lambda xp, x: xp.tan(x), 7)
Asin = _unary("Asin", lambda xp, x: xp.arcsin(x), 7)
Acos = _unary("Acos", lambda xp, x: xp.arccos(x), 7)
Atan = _unary("Atan", lambda xp, x: xp.arctan(x), 7)
Sinh = _unary("Sinh", lambda xp, x: xp.sinh(x), 9)
Cosh = _unary("Cosh", lambda xp, x: xp.cosh(x), 9)
Asinh = _unary("Asinh", lambda xp, x: xp.arcsinh(x), 9)
Acosh = _unary("Acosh", lambda xp, x: xp.arccosh(x), 9)
Atanh = _unary("Atanh", lambda xp, x: xp.arctanh(x), 9)

BitwiseNot = _unary("BitwiseNot", lambda xp, x: xp.invert(x), 18)
BitwiseAnd = kernel("BitwiseAnd", since=18)(lambda xp, a, b: (xp.bitwise_and(a, b),))
BitwiseOr = kernel("BitwiseOr", since=18)(lambda xp, a, b: (xp.bitwise_or(a, b),))
BitwiseXor = kernel("BitwiseXor", since=18)(lambda xp, a, b: (xp.bitwise_xor(a, b),))


def _sigmoid(xp, x):
    """1 / (1 + e^-x) in four in-place passes over one buffer, as PyTorch computes it: below
    -88 (float32) e^-x overflows to inf and the result is its limit, 0 (a few ulps from
    PyTorch's everywhere; the old split by sign took ten passes and lost up to 27 ulps)."""
    e = xp.negative(x, out=xp.empty_like(x))
    with np.errstate(over="ignore"):
        xp.exp(e, out=e)
    e += e.dtype.type(1)
    return xp.reciprocal(e, out=e)


def _softplus(xp, x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow for large |x|.
    return xp.maximum(x, x.dtype.type(0)) + xp.log1p(xp.exp(-xp.abs(x)))


Sigmoid = _unary("Sigmoid", _sigmoid, low=True)
Softplus = _unary("Softplus", _softplus, low=True)
Softsign = _unary("Softsign", lambda xp, x: x / (1 + xp.abs(x)), low=True)
Mish = _unary("Mish", lambda xp, x: x * xp.tanh(_softplus(xp, x)), 18, low=True)
# alpha = 1/6 and beta = 0.5 are fixed by the spec.
HardSwish = _unary("HardSwish", lambda xp, x: x * xp.clip(x / 6 + 0.5, 0, 1).astype(x.dtype),
                   14, low=True)


def _float_act(xp, x, fn):
    """fn on x, float16/bfloat16 computed in float32, the result in x's dtype."""
    return (fn(wide(x)).astype(x.dtype, copy=False),)


@kernel("Elu")
def Elu(xp, x, *, alpha=1.0, consumed_inputs=None):
    return _float_act(xp, x, lambda v: xp.where(v < 0, alpha * xp.expm1(v), v))


@kernel("Celu", since=12)
def Celu(xp, x, *, alpha=1.0):
    # max(0, x) + min(0, alpha * (exp(x / alpha) - 1))
    return _float_act(xp, x, lambda v: xp.where(v < 0, alpha * xp.expm1(v / alpha), v))


def _selu(xp, x, alpha, gamma):
    return _float_act(xp, x, lambda v: gamma * xp.where(v > 0, v, alpha * xp.expm1(v)))


@kernel("Selu", since=1)
def Selu_1(xp, x, *, alpha=1.6732, gamma=1.0507, consumed_inputs=None):
    return _selu(xp, x, alpha, gamma)


@kernel("Selu", since=6)
def Selu(xp, x, *, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return _selu(xp, x, alpha, gamma)


@kernel("HardSigmoid")
def HardSigmoid(xp, x, *, alpha=0.2, beta=0.5, consumed_inputs=None):
    return _float_act(xp, x, lambda v: xp.clip(alpha * v + beta, 0, 1))


@kernel("ThresholdedRelu", since=10)
def ThresholdedRelu(xp, x, *, alpha=1.0):
    return (xp.where(x > alpha, x, x.dtype.type(0)),)


@kernel("LeakyRelu")
def LeakyRelu(xp, x, *, alpha=0.01, consumed_inputs=None):
    return (xp.where(x >= 0, x, x * x.dtype.type(alpha)),)


@kernel("PRelu", since=1)
def PRelu_1(xp, x, slope, *, consumed_inputs=None):
    # Before opset 7 a 1-D slope of C values applies along the channel axis (axis 1).
    if slope.ndim == 1 and slope.size > 1 and x.ndim > 2:
        slope = slope.reshape((-1,) + (1,) * (x.ndim - 2))
    return PRelu(xp, x, slope)


@kernel("PRelu", since=7)
def PRelu(xp, x, slope):
    return (xp.where(x < 0, x * slope, x).astype(x.dtype, copy=False),)


@kernel("Shrink", since=9)
def Shrink(xp, x, *, bias=0.0, lambd=0.5):
    v = x.astype(np.float64) if x.dtype.kind in "iu" else wide(x)
    out = xp.where(v < -lambd, v + bias, xp.where(v > lambd, v - bias, 0))
    return (out.astype(x.dtype),)


@kernel("Swish", since=24)
def Swish(xp, x, *, alpha=1.0):
    return _float_act(xp, x, lambda v: v * _sigmoid(xp, v * v.dtype.type(alpha)))


@kernel("SwiGLU", since=28)
def SwiGLU(xp, a, b, *, alpha=1.0):
    if a.shape != b.shape:
        raise ValueError(f"SwiGLU needs equal shapes, got {a.shape} and {b.shape}")
    g = wide(a)
    return ((g * _sigmoid(xp, g * g.dtype.type(alpha)) * wide(b)).astype(a.dtype),)


def _erf_host(x, double: bool, complement: bool = False):
    """erf(x), or erfc(x) = 1 - erf(x) without cancellation, in float64 with NumPy ufuncs.

    |x| < 2: erf = 2/sqrt(pi) e^{-x^2} sum_n (2x^2)^n x / (2n+1)!!  (positive terms);
    |x| >= 2: erfc(|x|) = e^{-x^2} / sqrt(pi) / (x + (1/2) / (x + 1 / (x + (3/2) / (x + ...)))).
    Absolute error about 1e-15 with `double`, 1e-9 otherwise (enough for float32 results).
    """
    n_series, n_fraction = (30, 40) if double else (20, 16)
    v = np.asarray(x, np.float64)
    a = np.abs(v)
    out = np.empty_like(a)
    near = a < 2
    s = a[near]
    term, total, z = s, s, 2 * s * s
    for n in range(n_series):
        term = term * z / (2 * n + 3)
        total = total + term
    out[near] = (2 / math.sqrt(math.pi)) * np.exp(-s * s) * total
    far = ~near
    b = a[far]
    f = b
    for k in range(n_fraction, 0, -1):
        f = b + (k / 2) / f
    with np.errstate(over="ignore"):
        tail = np.exp(-b * b) / math.sqrt(math.pi) / f  # erfc(|x|)
    if not complement:
        out[far] = 1 - tail
        return np.copysign(out, v)
    out[near] = 1 - np.copysign(out[near], v[near])
    out[far] = np.where(v[far] > 0, tail, 2 - tail)
    return out


# erf(x) ~ x P(x^2) / Q(x^2) on |x| <= 4 (erf(4) rounds to 1 in float32), P of degree 6 and
# Q of degree 5 in x^2, fitted to erf by weighted least squares on the relative error with
# Lawson reweighting (max relative error 2.0e-9); evaluated in float64, the float32 result is
# within 0.53 ulp (so the correctly rounded value but within 0.03 ulp of a tie; measured on
# 4.2 million points over [-6, 6] and 2e5 down to 1e-37), erf(+-inf) = +-1. 26 array
# operations in all: 5x faster than the two-branch series it replaced.
_ERF_P = (1.1283791693619338, 0.1852029552658354, 0.05431745739698722, 0.0038496804759659184,
          0.0003796341300167021, 4.6854330579324325e-06, -1.3205506707822213e-08)
_ERF_Q = (1.0, 0.4974652593468077, 0.11395882134534997, 0.01546230985506286,
          0.0013076186767167276, 6.311689640796649e-05)


_ERF_CHUNK = 1 << 15  # elements per pass on the host: the float64 temporaries stay in L2


def erf_rational(xp, x):
    """erf of a float32/float16/bfloat16 array, in its dtype, as one rational function (the
    float16/bfloat16 results round the float64 value once). On the host, in chunks through
    four reused float64 buffers (2x faster than whole-array passes inside a training step,
    where the inputs come from memory rather than cache)."""
    if xp is not np:
        return _erf_rational_into(xp, x.astype(np.float64), None).astype(x.dtype)
    if x.dtype == np.float32 and compiled.enabled():  # (the same steps, one loop: 4x)
        return compiled.erf_rational(x, _ERF_P, _ERF_Q)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, x.dtype)
    k = max(1, min(flat.size, _ERF_CHUNK))  # (an empty input: no chunk)
    bufs = [np.empty(k) for _ in range(3)]
    for lo in range(0, flat.size, k):
        m = min(k, flat.size - lo)
        v = bufs[0][:m]
        np.copyto(v, flat[lo:lo + m])
        _erf_rational_into(np, v, [b[:m] for b in bufs[1:]], out[lo:lo + m])
    return out.reshape(x.shape)


def _erf_rational_into(xp, v, bufs, out=None):
    """x P(x^2) / Q(x^2) of the float64 array v (clipped in place) into `out` (any float
    dtype; a new float64 array when None), with `bufs` two float64 scratch arrays like v."""
    xp.clip(v, -4.0, 4.0, out=v)
    u = xp.multiply(v, v, out=bufs[0] if bufs else None)
    num = bufs[1] if bufs else xp.empty_like(u)
    num.fill(_ERF_P[-1])
    for c in _ERF_P[-2::-1]:
        num *= u
        num += c
    num *= v
    den = xp.multiply(u, _ERF_Q[-1], out=v)  # (v is no longer needed: Q's Horner sum in it)
    den += _ERF_Q[-2]
    for c in _ERF_Q[-3::-1]:
        den *= u
        den += c
    return xp.divide(num, den, out=out if out is not None else num)


def erf(xp, x):
    """erf in x's float dtype (float32 compute for float16/bfloat16)."""
    if xp is np:
        return _erf_host(x, True) if x.dtype == np.float64 else erf_rational(np, x)
    return cupyx_module().scipy.special.erf(x)


def erfc(xp, x):
    """1 - erf(x), accurate where erf(x) is close to 1."""
    if xp is np:
        x = wide(x)
        return _erf_host(x, x.dtype == np.float64, complement=True).astype(x.dtype)
    return cupyx_module().scipy.special.erfc(x)


@kernel("Erf")
def Erf(xp, x):
    if x.dtype.kind in "iu":  # opset 9-12 also took integers: the erf, truncated
        return (erf(xp, x.astype(np.float64)).astype(x.dtype),)
    return (erf(xp, wide(x)).astype(x.dtype),)


@kernel("Gelu", since=20)
def Gelu(xp, x, *, approximate="none"):
    v = wide(x)
    if approximate == "tanh":
        c = v.dtype.type(math.sqrt(2 / math.pi))
        y = 0.5 * v * (1 + xp.tanh(c * (v + v.dtype.type(0.044715) * v * v * v)))
    elif approximate == "none":
        # 1 + erf(x / sqrt(2)) = erfc(-x / sqrt(2)): no cancellation for large negative x
        y = 0.5 * v * erfc(xp, v * v.dtype.type(-1 / math.sqrt(2)))
    else:
        raise ValueError(f"Gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return (y.astype(x.dtype),)


@kernel("IsNaN", since=9)
def IsNaN(xp, x):
    return (xp.isnan(x),)


@kernel("IsInf", since=10)
def IsInf(xp, x, *, detect_negative=1, detect_positive=1):
    if x.dtype.kind not in "fV" or not (detect_negative or detect_positive):
        return (xp.zeros(x.shape, dtype=bool),)
    inf = xp.isinf(x)
    if detect_negative and detect_positive:
        return (inf,)
    return (inf & ((x > 0) if detect_positive else (x < 0)),)


@kernel("BitShift", since=11)
def BitShift(xp, x, y, *, direction):
    """Shifts by y bits; y < 0 or y >= width gives 0 (-1 for a right shift of a negative x)."""
    if direction not in ("LEFT", "RIGHT"):
        raise ValueError(f"BitShift: direction must be LEFT or RIGHT, got {direction!r}")
    bits = x.dtype.itemsize * 8
    out_of_range = (y < 0) | (y >= bits)
    shift = xp.where(out_of_range, 0, y).astype(x.dtype)
    if direction == "RIGHT":
        out = xp.right_shift(x, shift)  # arithmetic for signed types
        fill = xp.where(x < 0, -1, 0).astype(x.dtype) if x.dtype.kind == "i" else 0
    else:
        # Shift the unsigned view so bits past the sign bit drop off without overflow.
        unsigned = np.dtype(f"u{x.dtype.itemsize}")
        out = xp.left_shift(x.view(unsigned), shift.view(unsigned)).view(x.dtype)
        fill = 0
    return (xp.where(out_of_range, fill, out).astype(x.dtype),)


_SUB_BYTE_BITS = {"int4": 4, "uint4": 4, "float4_e2m1fn": 4, "int2": 2, "uint2": 2}


@kernel("BitCast", since=26)
def BitCast(xp, x, *, to):
    """Same bits read as another type of equal width (sub-byte types are stored one per byte)."""
    dtype = np_dtype(to)
    if xp is not np and not device_dtype_ok(dtype):
        raise ModelError(f"BitCast to {dtype} is not available on the GPU: CuPy has no {dtype} "
                         "type; run with device: cpu")
    width_in = _SUB_BYTE_BITS.get(x.dtype.name, x.dtype.itemsize * 8)
    width_out = _SUB_BYTE_BITS.get(dtype.name, dtype.itemsize * 8)
    if width_in != width_out:
        raise ValueError(f"BitCast: {x.dtype} ({width_in} bits) to {dtype} ({width_out} bits)")
    return (x.view(dtype),)  # equal widths: equal item sizes, any layout


@kernel("Where")
def Where(xp, cond, a, b):
    return (xp.where(cond, a, b),)


_FLOAT8 = {"float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"}


def _cast(xp, x, dtype, saturate, round_mode):
    if np.dtype(dtype).kind == "O" and x.dtype.kind != "O":
        # to STRING: each number's text, as onnx's reference evaluator writes it
        host = x.get() if xp is not np and hasattr(x, "get") else x
        return np.asarray(host).astype(np.str_).astype(object)
    if xp is not np and not device_dtype_ok(dtype):
        raise ModelError(f"Cast to {dtype} is not available on the GPU: CuPy has no {dtype} "
                         "type; run with device: cpu")
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
    # Cast-1 (until opset 6) names the type as a string, e.g. "FLOAT" or "DOUBLE".
    code = getattr(onnx.TensorProto, to.upper()) if isinstance(to, str) else to
    return (_cast(xp, x, np_dtype(code), saturate, round_mode),)


@kernel("CastLike")
def CastLike(xp, x, like, *, saturate=1, round_mode="up"):
    return (_cast(xp, x, like.dtype, saturate, round_mode),)


def _variadic(name, fn):
    @kernel(name)
    def op(xp, *xs, consumed_inputs=None):
        out = xs[0]
        for x in xs[1:]:
            out = fn(xp, out, x)
        return (out if len(xs) > 1 else out.copy(),)
    op.__name__ = name
    return op


Sum = _variadic("Sum", lambda xp, a, b: a + b)
Max = _variadic("Max", lambda xp, a, b: xp.maximum(a, b))
Min = _variadic("Min", lambda xp, a, b: xp.minimum(a, b))


@kernel("Mean")
def Mean(xp, *xs, consumed_inputs=None):
    total = wide(xs[0])
    for x in xs[1:]:
        total = total + wide(x)
    return ((total / len(xs)).astype(xs[0].dtype),)


@kernel("Clip", since=1)
def Clip_1(xp, x, *, min=None, max=None, consumed_inputs=None):
    """Opsets 1-10: the bounds are attributes (absent: unbounded)."""
    lo = None if min is None else xp.asarray(min, dtype=x.dtype)
    hi = None if max is None else xp.asarray(max, dtype=x.dtype)
    return Clip(xp, x, lo, hi)


@kernel("Clip", since=11)
def Clip(xp, x, lo=None, hi=None):
    # Min(max, Max(x, min)): with min > max every value becomes max, as the spec says.
    if lo is not None:
        x = xp.maximum(x, lo)
    if hi is not None:
        x = xp.minimum(x, hi)
    return (x,)
