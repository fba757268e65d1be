"""Neural-network kernels: Conv, ConvTranspose, Col2Im, CausalConvWithState, pooling, BatchNorm,
Dropout. Convolutions are one im2col copy (a strided window view) plus one matmul per call; the
padding geometry lives in helpers that the gradient rules reuse."""

from __future__ import annotations

import math

import numpy as np

from trainer.kernels import cached_constant, host_ints, host_scalar, kernel, matmul


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
    if any(b < 0 or e < 0 for b, e in widths):
        return xp.pad(x, widths, mode="constant", constant_values=value)
    shape = tuple(d + b + e for d, (b, e) in zip(x.shape, widths, strict=True))
    y = xp.full(shape, value, dtype=x.dtype)
    y[tuple(slice(b, b + d) for d, (b, _) in zip(x.shape, widths, strict=True))] = x
    return y


def _geometry(x, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode=0):
    k = x.ndim - 2
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    pads, out = conv_pads(x.shape[2:], kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    return strides, dilations, pads, out


def im2col(xp, x, kshape, strides, dilations, pads, out):
    """Columns [C * prod(kshape), N * prod(out)] of x: row (c, k), column (n, o) holds the
    zero-padded x[n, c, o * stride + k * dilation]. One copy of a strided window view."""
    k = len(kshape)
    n, c = x.shape[:2]
    xw = _windows(xp, _pad(xp, x, pads, out, kshape, strides, dilations, 0), kshape, strides,
                  dilations, out)  # [N, C, *O, *K]
    perm = (1,) + tuple(range(2 + k, 2 + 2 * k)) + (0,) + tuple(range(2, 2 + k))
    cols = xp.empty((c,) + tuple(kshape) + (n,) + tuple(out), dtype=x.dtype)
    cols[...] = xw.transpose(perm)
    return cols.reshape(c * math.prod(kshape), n * math.prod(out))


def conv_into(xp, x, w, b, strides, dilations, pads, out_sp, group, y=None):
    """Y = Conv(x, w) + b with explicit geometry, written into y [N, M, *out_sp] when given."""
    n = x.shape[0]
    m, g = w.shape[0], group
    po = math.prod(out_sp)
    cols = im2col(xp, x, list(w.shape[2:]), strides, dilations, pads, out_sp)
    if g == 1:
        y2 = xp.matmul(w.reshape(m, -1), cols)  # [M, N * O]
    else:
        y2 = matmul(xp, w.reshape(g, m // g, -1), cols.reshape(g, -1, n * po))
    y2 = y2.reshape(m, n, po)
    if b is not None:
        y2 += b.reshape(m, 1, 1)
    if y is None:
        y = xp.empty((n, m) + tuple(out_sp), dtype=y2.dtype)
    y.reshape(n, m, po)[...] = y2.transpose(1, 0, 2)
    return y


def conv_geometry(x_shape, kshape, strides, dilations, pads, auto_pad):
    """(strides, dilations, explicit pads, output spatial sizes) of a Conv."""
    k = len(kshape)
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    pads, out = conv_pads(x_shape[2:], kshape, strides, dilations, pads, auto_pad)
    return strides, dilations, pads, out


@kernel("Conv")
def Conv(xp, x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
         pads=None, strides=None):
    strides, dilations, pads, out = conv_geometry(x.shape, list(w.shape[2:]), strides,
                                                  dilations, pads, auto_pad)
    return (conv_into(xp, x, w, b, strides, dilations, pads, out, group),)


def conv_weight_grad_into(xp, x, dy, kshape, strides, dilations, pads, group, dw=None):
    """dW [M, C/G, *kshape] of Y = Conv(x, W) (explicit geometry) from dY, one matmul per
    call: the im2col columns of x times dY as [N * O, M/G] per group (this orientation is the
    faster one for OpenBLAS when M is small); written into dw when given."""
    n = x.shape[0]
    m, g = dy.shape[1], group
    out_sp = list(dy.shape[2:])
    cols = im2col(xp, x, kshape, strides, dilations, pads, out_sp)  # [C * K, N * O]
    dy2 = xp.ascontiguousarray(xp.moveaxis(dy, 1, 0)).reshape(g, m // g, n * math.prod(out_sp))
    r = matmul(xp, cols.reshape(g, -1, cols.shape[1]), dy2.transpose(0, 2, 1))  # [G, CgK, Mg]
    if dw is None:
        dw = xp.empty((m, x.shape[1] // g) + tuple(kshape), dtype=r.dtype)
    dw.reshape(g, m // g, -1)[...] = r.transpose(0, 2, 1)
    return dw


def _fold(xp, cols, full, strides, dilations):
    """Sum window columns [N, C, *K, *L] back into an image [N, C, *full] (the adjoint of
    `_windows`): tap k of window l lands at l * stride + k * dilation. One add per tap."""
    k = len(full)
    kshape, blocks = cols.shape[2:2 + k], cols.shape[2 + k:]
    y = xp.zeros(cols.shape[:2] + tuple(full), dtype=cols.dtype)
    for offs in np.ndindex(*kshape):
        index = (slice(None), slice(None)) + tuple(
            slice(offs[i] * dilations[i], offs[i] * dilations[i]
                  + strides[i] * (blocks[i] - 1) + 1, strides[i]) for i in range(k))
        y[index] += cols[(slice(None), slice(None)) + offs]
    return y


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


def conv_transpose_into(xp, x, w, b, strides, dilations, pads, output_padding, full, group,
                        y=None, method=None):
    """ConvTranspose with explicit geometry (pads from conv_transpose_pads, `full` the uncropped
    output size). Either one Conv of x with the flipped, transposed kernel (stride 1, when its
    im2col copy is the smaller), or one matmul to columns folded back with one add per tap."""
    n, c = x.shape[:2]
    k = x.ndim - 2
    kshape = list(w.shape[2:])
    g, mg = group, w.shape[1]
    cg = c // g
    span = [(kshape[i] - 1) * dilations[i] for i in range(k)]
    cpads = [span[i] - pads[i] for i in range(k)] + [
        span[i] - pads[i + k] + output_padding[i] for i in range(k)]
    out_sp = [full[i] - pads[i] - pads[i + k] for i in range(k)]
    by_conv = all(s == 1 for s in strides) and all(p >= 0 for p in cpads)
    if method is None and by_conv:  # im2col copy of the output side vs columns of the input
        by_conv = mg * g * math.prod(out_sp) <= 2 * c * math.prod(x.shape[2:])
    if method is not None:
        by_conv = by_conv and method == "conv"
    if by_conv:
        wf = w.reshape((g, cg, mg) + tuple(kshape)).swapaxes(1, 2)
        wf = wf[(slice(None),) * 3 + (slice(None, None, -1),) * k]
        wf = xp.ascontiguousarray(wf).reshape((g * mg, cg) + tuple(kshape))
        return conv_into(xp, x, wf, b, [1] * k, dilations, cpads, out_sp, g, y)
    # cols[G, Mg * K, N * in] = W_g^T x_g
    xg = xp.ascontiguousarray(xp.moveaxis(x, 1, 0)).reshape(g, cg, -1)
    wg = w.reshape(g, cg, mg * math.prod(kshape)).transpose(0, 2, 1)
    cols = matmul(xp, wg, xg).reshape((g * mg,) + tuple(kshape) + (n,) + tuple(x.shape[2:]))
    perm = (0, k + 1) + tuple(range(1, k + 1)) + tuple(range(k + 2, 2 * k + 2))
    yf = _fold(xp, cols.transpose(perm), full, strides, dilations)  # [M, N, *full]
    if any(p < 0 for p in pads):  # output_shape beyond the full result: zeros at that side
        widths = [(0, 0), (0, 0)] + [(max(0, -pads[i]), max(0, -pads[i + k]))
                                     for i in range(k)]
        yf = xp.pad(yf, widths)
        full = [full[i] + widths[2 + i][0] + widths[2 + i][1] for i in range(k)]
        pads = [max(0, p) for p in pads]
    crop = (slice(None), slice(None)) + tuple(
        slice(pads[i], full[i] - pads[i + k]) for i in range(k))
    yf = yf[crop]
    if b is not None:
        yf += b.reshape((-1, 1) + (1,) * k)
    if y is None:
        y = xp.empty((n, yf.shape[0]) + yf.shape[2:], dtype=yf.dtype)
    y[...] = yf.swapaxes(0, 1)
    return y


def conv_transpose_geometry(x_shape, kshape, strides, dilations, pads, output_padding,
                            output_shape, auto_pad):
    """(strides, dilations, pads, output_padding, full) of a ConvTranspose."""
    k = len(kshape)
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    pads, output_padding, full = conv_transpose_pads(
        x_shape[2:], kshape, strides, dilations, pads, output_padding, output_shape, auto_pad)
    return strides, dilations, pads, output_padding, full


@kernel("ConvTranspose")
def ConvTranspose(xp, x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1,
                  kernel_shape=None, output_padding=None, output_shape=None, pads=None,
                  strides=None):
    geo = conv_transpose_geometry(x.shape, list(w.shape[2:]), strides, dilations, pads,
                                  output_padding, output_shape, auto_pad)
    return (conv_transpose_into(xp, x, w, b, *geo, group),)


def _tap_views(xw, kernel_shape):
    """The window view [N, C, *O, *K] as one [N, C, *O] view per kernel tap."""
    return [xw[(Ellipsis,) + offs] for offs in np.ndindex(*kernel_shape)]


_TAP_LOOP_MAX = 16  # kernels with at most this many taps reduce over per-tap views


@kernel("MaxPool", since=1)
def MaxPool(xp, x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape,
            pads=None, storage_order=0, strides=None, n_outputs=2):
    strides, dilations, pads, out = _geometry(x, kernel_shape, strides, dilations, pads,
                                              auto_pad, ceil_mode)
    k = len(kernel_shape)
    low = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    xw = _windows(xp, _pad(xp, x, pads, out, kernel_shape, strides, dilations, low),
                  kernel_shape, strides, dilations, out)
    y = arg = None
    # On the host, inputs with NaNs take argmax's path (one cheap check); a device keeps the
    # tap loop and lets a NaN tap win as argmax does, instead of reading the check back.
    nan_aware = xp is not np and x.dtype.kind == "f"
    nan = xp is np and x.dtype.kind == "f" and x.size and bool(xp.isnan(x.max()))
    if math.prod(kernel_shape) <= _TAP_LOOP_MAX and not nan:
        # Running maximum over the taps; a later tap wins only when strictly greater, so the
        # first maximal tap is kept, as argmax does.
        taps = _tap_views(xw, kernel_shape)
        y = taps[0].copy()
        arg = xp.zeros(y.shape, dtype=np.int64) if n_outputs > 1 else None
        for t, v in enumerate(taps[1:], 1):
            more = v > y
            if nan_aware:  # the first NaN wins and stays
                more |= xp.isnan(v) & ~xp.isnan(y)
            xp.copyto(y, v, where=more)
            if arg is not None:
                xp.copyto(arg, t, where=more)
    if y is None:
        flat = xw.reshape(x.shape[:2] + tuple(out) + (-1,))
        arg = flat.argmax(axis=-1)
        y = xp.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    if n_outputs < 2:
        return (xp.ascontiguousarray(y),)
    # Flattened index into x (padding excluded), the spec's optional Indices output:
    # ((n * C + c) * H + h) * W + w, or with storage_order=1 (n * C + c) * H * W + w * H + h.
    ntaps = math.prod(kernel_shape)
    n, c = x.shape[:2]
    index = (xp.arange(n)[:, None] * c + xp.arange(c)[None, :]).reshape((n, c) + (1,) * k)
    index = index * math.prod(x.shape[2:])
    spatial = 0
    for i in (reversed(range(k)) if storage_order else range(k)):
        koff = cached_constant(xp, ("maxpool-taps", tuple(kernel_shape), i), lambda i=i: (
            np.unravel_index(np.arange(ntaps), kernel_shape)[i]))
        kpos = koff[arg] * dilations[i]
        opos = xp.arange(out[i]).reshape((1,) * (2 + i) + (-1,) + (1,) * (k - i - 1))
        spatial = spatial * x.shape[2 + i] + (opos * strides[i] - pads[i] + kpos)
    return (xp.ascontiguousarray(y), (index + spatial).astype(np.int64))


@kernel("AveragePool", since=1)
def AveragePool(xp, x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
                kernel_shape, pads=None, strides=None):
    strides, dilations, pads, out = _geometry(x, kernel_shape, strides, dilations, pads,
                                              auto_pad, ceil_mode)
    acc = _acc(x)
    xw = _windows(xp, _pad(xp, x.astype(acc), pads, out, kernel_shape, strides, dilations, 0),
                  kernel_shape, strides, dilations, out)
    k = len(kernel_shape)
    if math.prod(kernel_shape) <= _TAP_LOOP_MAX:
        taps = _tap_views(xw, kernel_shape)
        total = taps[0].copy()
        for v in taps[1:]:
            total += v
    else:
        total = xw.sum(axis=tuple(range(2 + k, 2 + 2 * k)))
    geometry = (tuple(x.shape[2:]), tuple(kernel_shape), tuple(strides), tuple(dilations),
                tuple(pads), tuple(out), bool(count_include_pad), acc.str)
    counts = cached_constant(xp, ("avgpool-divisor", *geometry), lambda: avgpool_divisor(
        x.shape[2:], kernel_shape, strides, dilations, pads, out,
        count_include_pad).astype(acc))
    return ((total / counts).astype(x.dtype),)


def _acc(x) -> np.dtype:
    """Accumulation dtype: float32 for 16-bit floats (float16, bfloat16), else x's own."""
    return np.dtype(np.float32) if x.dtype.itemsize < 4 and x.dtype.kind in "fV" else x.dtype


@kernel("LpPool", since=1)
def LpPool(xp, x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape, p=2,
           pads=None, strides=None):
    # y = (sum over the window of |x|^p)^(1/p); padding contributes zeros (p is a float in
    # opset 1, an int since opset 2)
    strides, dilations, pads, out = _geometry(x, kernel_shape, strides, dilations, pads,
                                              auto_pad, ceil_mode)
    acc = _acc(x)
    xa = xp.abs(x.astype(acc)) ** acc.type(p)
    xw = _windows(xp, _pad(xp, xa, pads, out, kernel_shape, strides, dilations, 0),
                  kernel_shape, strides, dilations, out)
    total = xw.sum(axis=tuple(range(x.ndim, 2 * x.ndim - 2)))
    return ((total ** acc.type(1.0 / p)).astype(x.dtype),)


@kernel("GlobalLpPool", since=1)
def GlobalLpPool(xp, x, *, p=2):
    acc = _acc(x)
    total = (xp.abs(x.astype(acc)) ** acc.type(p)).sum(axis=tuple(range(2, x.ndim)),
                                                       keepdims=True)
    return ((total ** acc.type(1.0 / p)).astype(x.dtype),)


@kernel("MaxUnpool", since=9)
def MaxUnpool(xp, x, indices, output_shape=None, *, kernel_shape, pads=None, strides=None):
    """Scatter x to the flat positions `indices` of the unpooled shape implied by kernel_shape,
    strides and pads; an output_shape input pads that result with zeros at the end of each
    spatial axis (the ONNX reference and backend test semantics)."""
    k = len(kernel_shape)
    strides = list(strides or [1] * k)
    pads = list(pads or [0] * (2 * k))
    shape = tuple(x.shape[:2]) + tuple(
        (x.shape[2 + i] - 1) * strides[i] - pads[i] - pads[i + k] + kernel_shape[i]
        for i in range(k))
    y = xp.zeros(math.prod(shape), dtype=x.dtype)
    y[indices.reshape(-1)] = x.reshape(-1)
    y = y.reshape(shape)
    if output_shape is not None:
        target = host_ints(output_shape)
        if tuple(target) != shape:
            full = xp.zeros(tuple(target), dtype=x.dtype)
            full[tuple(slice(0, min(a, b)) for a, b in zip(shape, target, strict=True))] = \
                y[tuple(slice(0, min(a, b)) for a, b in zip(shape, target, strict=True))]
            y = full
    return (y,)


@kernel("Col2Im", since=18)
def Col2Im(xp, x, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    image, block = host_ints(image_shape), host_ints(block_shape)
    k = len(image)
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    pads = list(pads or [0] * (2 * k))
    full = [image[i] + pads[i] + pads[i + k] for i in range(k)]
    blocks = [(full[i] - (block[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(k)]
    n = x.shape[0]
    cols = x.reshape((n, -1) + tuple(block) + tuple(blocks))
    y = _fold(xp, cols, full, strides, dilations)
    crop = (slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + image[i])
                                              for i in range(k))
    return (xp.ascontiguousarray(y[crop]),)


@kernel("CausalConvWithState", since=27)
def CausalConvWithState(xp, x, w, b=None, past_state=None, *, activation="none"):
    """Depthwise causal Conv1d over [past_state (or zeros), x]; present_state is the last k-1
    positions of that concatenation. silu/swish: y * sigmoid(y)."""
    if activation not in ("none", "silu", "swish"):
        raise ValueError(f"CausalConvWithState: unknown activation {activation!r}")
    n, c, _ = x.shape
    k = w.shape[2]
    acc = _acc(x)
    past = (xp.zeros((n, c, k - 1), dtype=x.dtype) if past_state is None else past_state)
    padded = xp.concatenate([past, x], axis=2)
    y = Conv(xp, padded.astype(acc), w.astype(acc), None if b is None else b.astype(acc),
             group=c)[0]
    if activation != "none":
        y = y / (1 + xp.exp(-y))
    return (y.astype(x.dtype), xp.ascontiguousarray(padded[:, :, padded.shape[2] - (k - 1):]))


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


@kernel("BatchNormalization", since=1)
def BatchNormalization_1(xp, x, scale, b, mean, var, *, epsilon=1e-5, momentum=0.9, is_test=0,
                         spatial=1, consumed_inputs=None, n_outputs=1):
    """Opsets 1-8: `is_test` (until 7) and `spatial` (0: statistics per activation, scale and
    bias shaped like one sample); training outputs (n_outputs > 1) add the batch mean and var."""
    training = n_outputs > 1 and not is_test
    if spatial:
        out = BatchNormalization(xp, x, scale, b, mean, var, epsilon=epsilon, momentum=momentum,
                                 training_mode=int(training))
        if not training:
            return out
        axes = (0,) + tuple(range(2, x.ndim))
        return (*out, x.mean(axis=axes), x.var(axis=axes))
    eps = x.dtype.type(epsilon)
    if not training:
        return (((x - mean) / xp.sqrt(var + eps) * scale + b).astype(x.dtype),)
    m, v = x.mean(axis=0), x.var(axis=0)
    mom = x.dtype.type(momentum)
    y = (x - m) / xp.sqrt(v + eps) * scale + b
    return (y.astype(x.dtype), (mean * mom + m * (1 - mom)).astype(x.dtype),
            (var * mom + v * (1 - mom)).astype(x.dtype), m, v)


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
    # ratio and training_mode are host values when constant (device executors pass them so).
    r = 0.5 if ratio is None else float(host_scalar(ratio))
    training = training_mode is not None and bool(host_scalar(training_mode))
    if not training or r == 0.0:
        return (x, xp.ones(x.shape, dtype=bool))
    mask = rng.random(x.shape, dtype=np.float64 if x.dtype == np.float64 else np.float32) >= r
    return ((x * mask * x.dtype.type(1.0 / (1.0 - r))).astype(x.dtype), mask)
