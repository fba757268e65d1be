"""Quantization kernels: Quantize/DequantizeLinear, DynamicQuantizeLinear and the integer ops
(MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv). int4/uint4/int2/uint2, float8, float6
and float4 tensors are ml_dtypes arrays, so those types are host-only (NumPy) for now.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from trainer.graph import np_dtype
from trainer.kernels import kernel
from trainer.kernels.nn import Conv

_INT_RANGES = {np.dtype(t): r for t, r in [
    (np.uint8, (0, 255)), (np.int8, (-128, 127)), (np.uint16, (0, 65535)),
    (np.int16, (-32768, 32767)), (np.int32, (-2**31, 2**31 - 1)),
    (ml_dtypes.uint4, (0, 15)), (ml_dtypes.int4, (-8, 7)),
    (ml_dtypes.uint2, (0, 3)), (ml_dtypes.int2, (-2, 1))]}
# Low-precision float targets; the value is whether the type can hold inf or NaN (saturate
# matters only for those; the others always clip to their largest finite value).
_FLOAT_TARGETS = {np.dtype(t): special for t, special in [
    (ml_dtypes.float8_e4m3fn, True), (ml_dtypes.float8_e4m3fnuz, True),
    (ml_dtypes.float8_e5m2, True), (ml_dtypes.float8_e5m2fnuz, True),
    (ml_dtypes.float4_e2m1fn, False), (ml_dtypes.float6_e2m3fn, False),
    (ml_dtypes.float6_e3m2fn, False)]}
_STD_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def expand_param(xp, v, shape, axis: int, block_size: int = 0):
    """A scale or zero point reshaped (or, blocked, repeated) to broadcast against `shape`."""
    if v.ndim == 0 or v.size == 1:
        return v.reshape(())
    axis = axis % len(shape)
    if block_size:
        want = tuple(-(-d // block_size) if i == axis else d for i, d in enumerate(shape))
        if tuple(v.shape) != want:
            raise ValueError(f"blocked quantization (block_size {block_size} on axis {axis}) "
                             f"of an input of shape {tuple(shape)} needs a parameter of shape "
                             f"{want}, got {tuple(v.shape)}")
        full = xp.repeat(v, block_size, axis=axis)
        return full[(slice(None),) * axis + (slice(0, shape[axis]),)]
    if v.ndim != 1 or v.shape[0] != shape[axis]:
        raise ValueError(f"per-axis parameter of shape {v.shape} does not match axis {axis} "
                         f"of input shape {tuple(shape)}")
    return v.reshape((1,) * axis + (-1,) + (1,) * (len(shape) - axis - 1))


def quantize_values(xp, v, zero_point, out_dtype, saturate: int = 1):
    """Round and saturate v (a float array, already divided by the scale) into out_dtype."""
    out_dtype = np.dtype(out_dtype)
    if out_dtype in _INT_RANGES:
        lo, hi = _INT_RANGES[out_dtype]
        q = xp.rint(v)
        if zero_point is not None:
            q = q + zero_point.astype(q.dtype)
        return xp.asarray(xp.clip(q, lo, hi).astype(out_dtype))
    if out_dtype in _FLOAT_TARGETS:
        if zero_point is not None:
            v = v + zero_point.astype(v.dtype)
        if saturate or not _FLOAT_TARGETS[out_dtype]:
            top = float(ml_dtypes.finfo(out_dtype).max)
            v = xp.clip(v, -top, top)  # NaN stays NaN
        return xp.asarray(v.astype(out_dtype))
    raise ValueError(f"{out_dtype} is not a quantized type")


def _division_dtype(scale, precision):
    """The precision of x / scale: the `precision` attribute, else the scale's float type."""
    if precision:
        return np_dtype(precision)
    if scale.dtype in _STD_FLOATS or scale.dtype == ml_dtypes.bfloat16:
        return scale.dtype
    return np.dtype(np.float64 if scale.dtype.kind in "iu" else np.float32)


def quantize_linear(xp, x, scale, zero_point=None, *, axis=1, saturate=1, block_size=0,
                    output_dtype=0, precision=0):
    if zero_point is not None:
        out_dtype = zero_point.dtype
        if output_dtype and np_dtype(output_dtype) != out_dtype:
            raise ValueError(f"output_dtype {np_dtype(output_dtype)} differs from the zero "
                             f"point's type {out_dtype}")
        zero_point = expand_param(xp, zero_point, x.shape, axis, block_size)
    else:
        out_dtype = np_dtype(output_dtype) if output_dtype else np.dtype(np.uint8)
    div = _division_dtype(scale, precision)
    scale = expand_param(xp, scale, x.shape, axis, block_size)
    v = x.astype(div) / scale.astype(div)
    # Round and add the zero point in float32 at least (exact for every 16-bit zero point).
    v = v.astype(np.float64 if div == np.float64 else np.float32)
    return (quantize_values(xp, v, zero_point, out_dtype, saturate),)


@kernel("QuantizeLinear", since=10)
def QuantizeLinear_10(xp, x, y_scale, y_zero_point=None):
    return quantize_linear(xp, x, y_scale, y_zero_point)


@kernel("QuantizeLinear", since=13)
def QuantizeLinear_13(xp, x, y_scale, y_zero_point=None, *, axis=1):
    return quantize_linear(xp, x, y_scale, y_zero_point, axis=axis)


@kernel("QuantizeLinear", since=19)
def QuantizeLinear_19(xp, x, y_scale, y_zero_point=None, *, axis=1, saturate=1):
    return quantize_linear(xp, x, y_scale, y_zero_point, axis=axis, saturate=saturate)


@kernel("QuantizeLinear", since=21)
def QuantizeLinear_21(xp, x, y_scale, y_zero_point=None, *, axis=1, saturate=1, block_size=0,
                      output_dtype=0):
    return quantize_linear(xp, x, y_scale, y_zero_point, axis=axis, saturate=saturate,
                           block_size=block_size, output_dtype=output_dtype)


@kernel("QuantizeLinear", since=23)
def QuantizeLinear(xp, x, y_scale, y_zero_point=None, *, axis=1, saturate=1, block_size=0,
                   output_dtype=0, precision=0):
    return quantize_linear(xp, x, y_scale, y_zero_point, axis=axis, saturate=saturate,
                           block_size=block_size, output_dtype=output_dtype,
                           precision=precision)


def dequantize_linear(xp, x, scale, zero_point=None, *, axis=1, block_size=0, output_dtype=0):
    if output_dtype:
        out_dtype = np_dtype(output_dtype)
    elif scale.dtype in _STD_FLOATS or scale.dtype == ml_dtypes.bfloat16:
        out_dtype = scale.dtype
    else:
        out_dtype = np.dtype(np.float32)  # float8e8m0 scales need output_dtype; be lenient
    # float32 is at least as precise as every output type the spec allows; a float64 scale
    # (outside the spec, accepted) computes in float64.
    wide = np.float64 if out_dtype == np.float64 else np.float32
    if x.dtype in _INT_RANGES:
        # Integer differences are exact in int32, then one rounding into the working type.
        dx = x.astype(np.int32)
        if zero_point is not None:
            dx = dx - expand_param(xp, zero_point, x.shape, axis, block_size).astype(np.int32)
        dx = dx.astype(wide)
    else:  # float8/6/4: the zero point is zero in practice, the formula stays the same
        dx = x.astype(wide)
        if zero_point is not None:
            dx = dx - expand_param(xp, zero_point, x.shape, axis, block_size).astype(wide)
    # The product is rounded once from the working type.
    y = dx * expand_param(xp, scale, x.shape, axis, block_size).astype(wide)
    return (xp.asarray(y.astype(out_dtype)),)


@kernel("DequantizeLinear", since=10)
def DequantizeLinear_10(xp, x, x_scale, x_zero_point=None):
    return dequantize_linear(xp, x, x_scale, x_zero_point)


@kernel("DequantizeLinear", since=13)
def DequantizeLinear_13(xp, x, x_scale, x_zero_point=None, *, axis=1):
    return dequantize_linear(xp, x, x_scale, x_zero_point, axis=axis)


@kernel("DequantizeLinear", since=21)
def DequantizeLinear_21(xp, x, x_scale, x_zero_point=None, *, axis=1, block_size=0):
    return dequantize_linear(xp, x, x_scale, x_zero_point, axis=axis, block_size=block_size)


@kernel("DequantizeLinear", since=23)
def DequantizeLinear(xp, x, x_scale, x_zero_point=None, *, axis=1, block_size=0,
                     output_dtype=0):
    return dequantize_linear(xp, x, x_scale, x_zero_point, axis=axis, block_size=block_size,
                             output_dtype=output_dtype)


@kernel("DynamicQuantizeLinear", since=11)
def DynamicQuantizeLinear(xp, x):
    # The range is widened to include 0; an empty range gives scale 1, as in onnxruntime.
    f32 = np.float32
    if x.size:
        hi = xp.maximum(xp.asarray(x.max(), dtype=f32), f32(0))
        lo = xp.minimum(xp.asarray(x.min(), dtype=f32), f32(0))
    else:
        hi = lo = xp.zeros((), f32)
    scale = xp.where(hi == lo, f32(1), (hi - lo) / f32(255)).astype(f32)
    zero_point = xp.rint(xp.clip(f32(0) - lo / scale, 0, 255))
    y = xp.clip(xp.rint(x / scale) + zero_point, 0, 255).astype(np.uint8)
    return (y, scale, xp.asarray(zero_point.astype(np.uint8)))


def _row_param(v, a):
    """A per-row parameter of the left matmul operand: 1-D [M] becomes [M, 1]."""
    if v is not None and v.ndim == 1 and v.size > 1 and a.ndim >= 2:
        return v.reshape(-1, 1)
    return v


def _centered(a, zero_point, dtype):
    """a - zero_point in dtype (int32 for integer types: the exact products of the spec)."""
    d = a.astype(dtype)
    return d if zero_point is None else d - zero_point.astype(dtype)


@kernel("MatMulInteger", since=10)
def MatMulInteger(xp, a, b, a_zero_point=None, b_zero_point=None):
    # Per-row zero points of a are [M] (2-D) or [..., M, 1]; per-column ones of b [N] or
    # [..., 1, N]. Accumulation wraps in int32, as the spec allows.
    return (xp.matmul(_centered(a, _row_param(a_zero_point, a), np.int32),
                      _centered(b, b_zero_point, np.int32)),)


def _accum_dtype(*arrays):
    return np.int32 if all(a.dtype in _INT_RANGES for a in arrays) else np.float32


@kernel("QLinearMatMul", since=10)
def QLinearMatMul(xp, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale,
                  y_zero_point):
    acc = _accum_dtype(a, b)
    c = xp.matmul(_centered(a, _row_param(a_zero_point, a), acc),
                  _centered(b, b_zero_point, acc))
    f32 = np.float32
    mult = _row_param(a_scale, a).astype(f32) * b_scale.astype(f32) / y_scale.astype(f32)
    return (quantize_values(xp, c.astype(f32) * mult, y_zero_point, y_zero_point.dtype),)


@kernel("ConvInteger", since=10)
def ConvInteger(xp, x, w, x_zero_point=None, w_zero_point=None, *, auto_pad="NOTSET",
                dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    # Padding x with its zero point is padding (x - x_zero_point) with 0.
    if w_zero_point is not None and w_zero_point.ndim == 1 and w_zero_point.size > 1:
        w_zero_point = w_zero_point.reshape((-1,) + (1,) * (w.ndim - 1))
    return Conv(xp, _centered(x, x_zero_point, np.int32), _centered(w, w_zero_point, np.int32),
                auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape,
                pads=pads, strides=strides)


@kernel("QLinearConv", since=10)
def QLinearConv(xp, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point,
                b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                pads=None, strides=None):
    (acc,) = ConvInteger(xp, x, w, x_zero_point, w_zero_point, auto_pad=auto_pad,
                         dilations=dilations, group=group, kernel_shape=kernel_shape, pads=pads,
                         strides=strides)
    channel = (1, -1) + (1,) * (x.ndim - 2)
    if b is not None:
        acc = acc + b.astype(np.int32).reshape(channel)
    f32 = np.float32
    w_scale = w_scale.astype(f32)
    if w_scale.size > 1:
        w_scale = w_scale.reshape(channel)
    mult = x_scale.astype(f32) * w_scale / y_scale.astype(f32)
    return (quantize_values(xp, acc.astype(f32) * mult, y_zero_point, y_zero_point.dtype),)
