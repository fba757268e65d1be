"""Normalization kernels: Layer/Group/Instance/RMS normalization, MVN, LRN, LpNormalization.

Statistics are computed in float32 for float16/bfloat16 inputs (float64 stays float64), as
`stash_type` asks; results are cast back to the input's dtype once, at the end.
"""

from __future__ import annotations

import numpy as np
from onnx.helper import tensor_dtype_to_np_dtype

from trainer.errors import ModelError
from trainer.kernels import kernel, rowfuse
from trainer.kernels.reduce import mean_of


def compute_dtype(*dtypes) -> np.dtype:
    """float64 if any of the dtypes is float64, else float32 (never compute in 16 bits)."""
    return np.dtype(np.float64 if any(np.dtype(d) == np.float64 for d in dtypes)
                    else np.float32)


def _stash(stash_type: int) -> np.dtype:
    """The dtype of stash_type: 0 (UNDEFINED, which onnxruntime runs as the default) is the
    default's, float; a type that is no float is refused."""
    if stash_type == 0:
        return np.dtype(np.float32)
    try:
        dt = np.dtype(tensor_dtype_to_np_dtype(stash_type))
    except (KeyError, TypeError, ValueError):
        dt = None
    if dt is None or dt.kind != "f":
        raise ModelError(f"stash_type {stash_type} is not a float type (1: float, 11: "
                         "double)")
    return dt


def _standardize(xp, x, axes, epsilon, ct):
    """(x - mean) * inv_std over axes, computed in ct; also returns mean and inv_std."""
    xc = x.astype(ct, copy=False)
    mean = mean_of(xp, xc, axes, True)
    d = xc - mean
    var = mean_of(xp, d * d, axes, True)
    inv = 1 / xp.sqrt(var + ct.type(epsilon))
    return d * inv, mean, inv


@kernel("LayerNormalization", since=17)
def LayerNormalization(xp, x, scale, b=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    """Mean and InvStdDev come out in the stash_type dtype (as ONNX shape inference and
    onnxruntime give them); the statistics are computed in at least that precision."""
    stash = _stash(stash_type)
    ct = compute_dtype(x.dtype, stash)
    axes = tuple(range(axis % x.ndim, x.ndim))
    if x.dtype == ct and (fast := rowfuse.layer_norm(xp, x, scale, b, axes, epsilon)):
        y, mean, inv = fast  # (a device: three generated kernels)
        return y, mean.astype(stash, copy=False), inv.astype(stash, copy=False)
    y, mean, inv = _standardize(xp, x, axes, epsilon, ct)
    y = y * scale.astype(ct, copy=False)
    if b is not None:
        y = y + b.astype(ct, copy=False)
    return y.astype(x.dtype, copy=False), mean.astype(stash), inv.astype(stash)


@kernel("RMSNormalization", since=23)
def RMSNormalization(xp, x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    ct = compute_dtype(x.dtype, _stash(stash_type))
    axes = tuple(range(axis % x.ndim, x.ndim))
    if x.dtype == ct and (fast := rowfuse.rms_norm(xp, x, scale, axes, epsilon)) is not None:
        return (fast,)  # (a device: two generated kernels)
    xc = x.astype(ct, copy=False)
    inv = 1 / xp.sqrt((xc * xc).mean(axis=axes, keepdims=True) + ct.type(epsilon))
    return ((xc * inv * scale.astype(ct, copy=False)).astype(x.dtype, copy=False),)


def _group_norm(xp, x, scale, bias, num_groups, epsilon, ct, per_channel):
    n, c = x.shape[:2]
    g = num_groups
    y, _, _ = _standardize(xp, x.reshape(n, g, -1), (2,), epsilon, ct)
    if per_channel:  # opset 21: scale and bias per channel
        y = y.reshape(n, c, -1)
    # opset 18: scale and bias per group, broadcast over the group's channels
    y = y * scale.astype(ct, copy=False).reshape(1, -1, 1) + bias.astype(
        ct, copy=False).reshape(1, -1, 1)
    return (y.reshape(x.shape).astype(x.dtype, copy=False),)


@kernel("GroupNormalization", since=18)
def GroupNormalization_18(xp, x, scale, bias, *, num_groups, epsilon=1e-5):
    return _group_norm(xp, x, scale, bias, num_groups, epsilon, compute_dtype(x.dtype), False)


@kernel("GroupNormalization", since=21)
def GroupNormalization_21(xp, x, scale, bias, *, num_groups, epsilon=1e-5, stash_type=1):
    ct = compute_dtype(x.dtype, _stash(stash_type))
    return _group_norm(xp, x, scale, bias, num_groups, epsilon, ct, True)


@kernel("InstanceNormalization", since=1)
def InstanceNormalization(xp, x, scale, b, *, epsilon=1e-5, consumed_inputs=None):
    ct = compute_dtype(x.dtype)
    y, _, _ = _standardize(xp, x, tuple(range(2, x.ndim)), epsilon, ct)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = y * scale.astype(ct, copy=False).reshape(shape) + b.astype(ct, copy=False).reshape(shape)
    return (y.astype(x.dtype, copy=False),)


@kernel("MeanVarianceNormalization", since=9)
def MeanVarianceNormalization(xp, x, *, axes=(0, 2, 3)):
    # (X - E[X]) / (sqrt(E[(X - E[X])^2]) + 1e-9), the epsilon of the ONNX function body
    ct = compute_dtype(x.dtype)
    xc = x.astype(ct, copy=False)
    axes = tuple(a % x.ndim for a in axes)
    d = xc - xc.mean(axis=axes, keepdims=True)
    std = xp.sqrt((d * d).mean(axis=axes, keepdims=True))
    return ((d / (std + ct.type(1e-9))).astype(x.dtype, copy=False),)


@kernel("LRN", since=1)
def LRN(xp, x, *, size, alpha=1e-4, beta=0.75, bias=1.0):
    ct = compute_dtype(x.dtype)
    xc = x.astype(ct, copy=False)
    c = x.shape[1]
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = xp.pad(xc * xc, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
    total = sq[:, 0:c]
    for i in range(1, size):  # the window's taps along the channel axis
        total = total + sq[:, i:i + c]
    y = xc / (ct.type(bias) + ct.type(alpha / size) * total) ** ct.type(beta)
    return (y.astype(x.dtype, copy=False),)


@kernel("LpNormalization", since=1)
def LpNormalization(xp, x, *, axis=-1, p=2):
    ct = compute_dtype(x.dtype)
    xc = x.astype(ct, copy=False)
    if p == 1:
        norm = xp.abs(xc).sum(axis=axis, keepdims=True)
    elif p == 2:
        norm = xp.sqrt((xc * xc).sum(axis=axis, keepdims=True))
    else:
        raise ValueError(f"LpNormalization: p must be 1 or 2, got {p}")
    # an all-zero slice has norm 0 and stays 0 (0 / 1)
    y = xc / xp.where(norm == 0, ct.type(1), norm)
    return (y.astype(x.dtype, copy=False),)
