"""Neural-network kernels: Conv, ConvTranspose, pooling, BatchNormalization, Dropout.

Convolutions use im2col over strided window views and one batched matmul per call, for any
number of spatial dims; padding geometry lives in helpers the gradient rules reuse.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.kernels import kernel


def conv_pads(in_spatial, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode=0):
    """Explicit [begin..., end...] pads and output sizes for Conv/pool geometry."""
    k = len(in_spatial)
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    span = [(kernel_shape[i] - 1) * dilations[i] + 1 for i in range(k)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-in_spatial[i] // strides[i]) for i in range(k)]
        total = [max(0, (out[i] - 1) * strides[i] + span[i] - in_spatial[i]) for i in range(k)]
        lower = auto_pad == "SAME_LOWER"
        begin = [t - t // 2 if lower else t // 2 for t in total]
        return begin + [t - b for t, b in zip(total, begin, strict=True)], out
    pads = [0] * (2 * k) if auto_pad == "VALID" or not pads else list(pads)
    out = []
    for i in range(k):
        full = in_spatial[i] + pads[i] + pads[i + k] - span[i]
        if ceil_mode:
            o = -(-full // strides[i]) + 1
            if (o - 1) * strides[i] >= in_spatial[i] + pads[i]:
                o -= 1  # the last window would start in the end padding
        else:
            o = full // strides[i] + 1
        out.append(o)
    return pads, out


def _windows(xp, x, kernel_shape, strides, dilations, out):
    """Strided view [N, C, *out, *kernel] of an already padded x."""
    k = len(kernel_shape)
    sp = x.strides[2:]
    shape = x.shape[:2] + tuple(out) + tuple(kernel_shape)
    st = x.strides[:2] + tuple(sp[i] * strides[i] for i in range(k)) + tuple(
        sp[i] * dilations[i] for i in range(k))
    return xp.lib.stride_tricks.as_strided(x, shape=shape, strides=st)


def _pad(xp, x, pads, out, kernel_shape, strides, dilations, value):
    """Pad x with pads, plus whatever end padding ceil-mode windows need."""
    k = len(kernel_shape)
    widths = [(0, 0), (0, 0)]
    for i in range(k):
        need = (out[i] - 1) * strides[i] + (kernel_shape[i] - 1) * dilations[i] + 1
        end = max(pads[i + k], need - x.shape[2 + i] - pads[i])
        widths.append((pads[i], end))
    if all(w == (0, 0) for w in widths):
        return x
    return xp.pad(x, widths, mode="constant", constant_values=value)


def _geometry(x, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode=0):
    k = x.ndim - 2
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    pads, out = conv_pads(x.shape[2:], kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    return strides, dilations, pads, out


@kernel("Conv")
def Conv(xp, x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
         pads=None, strides=None):
    kshape = list(w.shape[2:])
    strides, dilations, pads, out = _geometry(x, kshape, strides, dilations, pads, auto_pad)
    n, c = x.shape[:2]
    m, g = w.shape[0], group
    xw = _windows(xp, _pad(xp, x, pads, out, kshape, strides, dilations, 0), kshape, strides,
                  dilations, out)
    k = len(kshape)
    po, pk = math.prod(out), math.prod(kshape)
    # [N, G, Cg, *O, *K] -> [G, N, *O, Cg, *K] -> [G, N*O, Cg*K]
    xw = xw.reshape((n, g, c // g) + tuple(out) + tuple(kshape))
    order = (1, 0) + tuple(range(3, 3 + k)) + (2,) + tuple(range(3 + k, 3 + 2 * k))
    cols = xw.transpose(order).reshape(g, n * po, (c // g) * pk)
    wm = w.reshape(g, m // g, (c // g) * pk).transpose(0, 2, 1)
    y = xp.matmul(cols, wm).reshape((g, n, po, m // g)).transpose(1, 0, 3, 2)
    y = y.reshape((n, m) + tuple(out))
    if b is not None:
        y += b.reshape((1, m) + (1,) * k)
    return (xp.ascontiguousarray(y),)


def conv_transpose_pads(in_spatial, kernel_shape, strides, dilations, pads, output_padding,
                        output_shape, auto_pad):
    k = len(in_spatial)
    output_padding = list(output_padding or [0] * k)
    full = [strides[i] * (in_spatial[i] - 1) + output_padding[i]
            + (kernel_shape[i] - 1) * dilations[i] + 1 for i in range(k)]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape) if output_shape is not None else [
            in_spatial[i] * strides[i] for i in range(k)]
        total = [full[i] - target[i] for i in range(k)]
        if auto_pad == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        pads = begin + [t - b for t, b in zip(total, begin, strict=True)]
    elif not pads or auto_pad == "VALID":
        pads = [0] * (2 * k)
    return list(pads), output_padding, full


@kernel("ConvTranspose")
def ConvTranspose(xp, x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1,
                  kernel_shape=None, output_padding=None, output_shape=None, pads=None,
                  strides=None):
    n, c = x.shape[:2]
    k = x.ndim - 2
    kshape = list(w.shape[2:])
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    pads, output_padding, full = conv_transpose_pads(
        x.shape[2:], kshape, strides, dilations, pads, output_padding, output_shape, auto_pad)
    g = group
    mg = w.shape[1]
    cg = c // g
    # cols[N, G, Mg, *K, *in] = sum_c x[N, G, c, *in] * w[G, c, Mg, *K]
    xg = x.reshape((n, g, cg, -1))
    wg = w.reshape(g, cg, mg * math.prod(kshape))
    cols = xp.matmul(wg.transpose(0, 2, 1)[None], xg)  # [N, G, Mg*K, in]
    cols = cols.reshape((n, g * mg) + tuple(kshape) + tuple(x.shape[2:]))
    y = xp.zeros((n, g * mg) + tuple(full), dtype=x.dtype)
    for offs in np.ndindex(*kshape):
        index = (slice(None), slice(None)) + tuple(
            slice(offs[i] * dilations[i], offs[i] * dilations[i]
                  + strides[i] * (x.shape[2 + i] - 1) + 1, strides[i]) for i in range(k))
        y[index] += cols[(slice(None), slice(None)) + offs]
    if any(p < 0 for p in pads):  # output_shape beyond the full result: zeros at that side
        widths = [(0, 0), (0, 0)] + [(max(0, -pads[i]), max(0, -pads[i + k]))
                                     for i in range(k)]
        y = xp.pad(y, widths)
        full = [full[i] + widths[2 + i][0] + widths[2 + i][1] for i in range(k)]
        pads = [max(0, p) for p in pads]
    crop = (slice(None), slice(None)) + tuple(
        slice(pads[i], full[i] - pads[i + k]) for i in range(k))
    y = y[crop]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * k)
    return (xp.ascontiguousarray(y),)


@kernel("MaxPool", since=8)
def MaxPool(xp, x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape,
            pads=None, storage_order=0, strides=None):
    strides, dilations, pads, out = _geometry(x, kernel_shape, strides, dilations, pads,
                                              auto_pad, ceil_mode)
    k = len(kernel_shape)
    low = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    xw = _windows(xp, _pad(xp, x, pads, out, kernel_shape, strides, dilations, low),
                  kernel_shape, strides, dilations, out)
    flat = xw.reshape(x.shape[:2] + tuple(out) + (-1,))
    arg = flat.argmax(axis=-1)
    y = xp.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    # Flattened index into x (padding excluded), the spec's optional Indices output:
    # ((n * C + c) * H + h) * W + w, or with storage_order=1 (n * C + c) * H * W + w * H + h.
    koffs = np.unravel_index(np.arange(math.prod(kernel_shape)), kernel_shape)
    n, c = x.shape[:2]
    index = (xp.arange(n)[:, None] * c + xp.arange(c)[None, :]).reshape((n, c) + (1,) * k)
    index = index * math.prod(x.shape[2:])
    spatial = 0
    for i in (reversed(range(k)) if storage_order else range(k)):
        kpos = xp.asarray(koffs[i])[arg] * dilations[i]
        opos = xp.arange(out[i]).reshape((1,) * (2 + i) + (-1,) + (1,) * (k - i - 1))
        spatial = spatial * x.shape[2 + i] + (opos * strides[i] - pads[i] + kpos)
    return (xp.ascontiguousarray(y), (index + spatial).astype(np.int64))


@kernel("AveragePool", since=7)
def AveragePool(xp, x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
                kernel_shape, pads=None, strides=None):
    strides, dilations, pads, out = _geometry(x, kernel_shape, strides, dilations, pads,
                                              auto_pad, ceil_mode)
    xw = _windows(xp, _pad(xp, x, pads, out, kernel_shape, strides, dilations, 0),
                  kernel_shape, strides, dilations, out)
    k = len(kernel_shape)
    total = xw.sum(axis=tuple(range(2 + k, 2 + 2 * k)))
    counts = avgpool_divisor(x.shape[2:], kernel_shape, strides, dilations, pads, out,
                             count_include_pad)
    return ((total / xp.asarray(counts.astype(x.dtype))).astype(x.dtype),)


def avgpool_divisor(in_spatial, kernel_shape, strides, dilations, pads, out, count_include_pad):
    """Per-output-position divisor of AveragePool (host array of shape `out`)."""
    k = len(in_spatial)
    if count_include_pad:
        ones = np.ones((1, 1) + tuple(in_spatial[i] + pads[i] + pads[i + k] for i in range(k)))
        no_pad = [0] * (2 * k)
    else:
        ones = np.ones((1, 1) + tuple(in_spatial))
        no_pad = pads
    padded = _pad(np, ones, no_pad, out, kernel_shape, strides, dilations, 0)
    win = _windows(np, padded, kernel_shape, strides, dilations, out)
    return win.sum(axis=tuple(range(2 + k, 2 + 2 * k)))[0, 0]


@kernel("GlobalAveragePool")
def GlobalAveragePool(xp, x):
    return (x.mean(axis=tuple(range(2, x.ndim)), keepdims=True),)


@kernel("GlobalMaxPool")
def GlobalMaxPool(xp, x):
    return (x.max(axis=tuple(range(2, x.ndim)), keepdims=True),)


def _bn_shape(x, v):
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


@kernel("BatchNormalization", since=9)
def BatchNormalization(xp, x, scale, b, mean, var, *, epsilon=1e-5, momentum=0.9,
                       training_mode=0, spatial=1):
    if not training_mode:
        inv = scale / xp.sqrt(var + x.dtype.type(epsilon))
        y = x * _bn_shape(x, inv) + _bn_shape(x, b - mean * inv)
        return (y.astype(x.dtype),)
    axes = (0,) + tuple(range(2, x.ndim))
    m = x.mean(axis=axes)
    v = x.var(axis=axes)
    y = (x - _bn_shape(x, m)) / xp.sqrt(_bn_shape(x, v) + x.dtype.type(epsilon))
    y = y * _bn_shape(x, scale) + _bn_shape(x, b)
    mom = x.dtype.type(momentum)
    return (y.astype(x.dtype), (mean * mom + m * (1 - mom)).astype(x.dtype),
            (var * mom + v * (1 - mom)).astype(x.dtype))


@kernel("Dropout", since=1)
def Dropout_1(xp, x, *, ratio=0.5, is_test=0, consumed_inputs=None, seed=None, rng=None):
    return (x, xp.ones(x.shape, dtype=bool))


@kernel("Dropout", since=12)
def Dropout_12(xp, x, ratio=None, training_mode=None, *, seed=None, rng):
    r = 0.5 if ratio is None else float(np.asarray(ratio).reshape(-1)[0] if xp is np
                                        else ratio.item())
    training = training_mode is not None and bool(np.asarray(training_mode).reshape(-1)[0]
                                                  if xp is np else training_mode.item())
    if not training or r == 0.0:
        return (x, xp.ones(x.shape, dtype=bool))
    mask = rng.random(x.shape, dtype=np.float64 if x.dtype == np.float64 else np.float32) >= r
    return ((x * mask * x.dtype.type(1.0 / (1.0 - r))).astype(x.dtype), mask)
