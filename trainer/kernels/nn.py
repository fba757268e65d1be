"""Neural-network kernels: Conv, ConvTranspose, Col2Im, CausalConvWithState, pooling, BatchNorm,
Dropout. Convolutions are one im2col copy (a strided window view) plus one matmul per call; the
padding geometry lives in helpers that the gradient rules reuse."""

from __future__ import annotations

import functools
import math

import numpy as np

from trainer.errors import ModelError
from trainer.kernels import (
    CUSTOM_DOMAIN,
    CUSTOM_SHAPES,
    cached_constant,
    compiled,
    host_ints,
    host_scalar,
    kernel,
    matmul,
    poolfuse,
)
from trainer.kernels.elementwise import low_float


def _auto_pad(auto_pad):
    """auto_pad as a str, refused where it is none of the spec's values."""
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in (None, "", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        raise ModelError(f"auto_pad '{auto_pad}' is none of NOTSET, SAME_UPPER, SAME_LOWER "
                         "and VALID")
    return auto_pad


def conv_pads(in_spatial, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode=0):
    """Explicit [begin..., end...] pads and output sizes for Conv/pool geometry."""
    k = len(in_spatial)
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    span = [(kernel_shape[i] - 1) * dilations[i] + 1 for i in range(k)]
    auto_pad = _auto_pad(auto_pad)
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
        if o < 1 and in_spatial[i] > 0:  # (onnxruntime refuses it too: "Invalid input shape")
            raise ModelError(f"the window (kernel {kernel_shape[i]}, dilation {dilations[i]}: "
                             f"{span[i]} wide) is wider than spatial axis {i} of the input, "
                             f"{in_spatial[i]} with pads {pads[i]} and {pads[i + k]}: no "
                             "output")
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


def im2col_wide(xp, x, kshape, dilations, pads, out):
    """Columns [C * K, N * OH * Wp] of a 2-D stride-1 convolution over rows of the padded
    width Wp (columns OW..Wp-1 of each output row are junk, cropped by the caller), and Wp.
    Tap (a, b) of every output row is one contiguous run of the flat padded plane starting at
    a*d0*Wp + b*d1, so the copy moves long rows instead of OW-element ones (the runs of the
    last plane overrun it by (kw - 1) * d1 elements: the buffer has that much slack)."""
    n, c, h, w = x.shape
    (kh, kw), (d0, d1) = kshape, dilations
    hp = max(h + pads[0] + pads[2], (out[0] - 1) + (kh - 1) * d0 + 1)
    wp = max(w + pads[1] + pads[3], (out[1] - 1) + (kw - 1) * d1 + 1)
    slack = (kw - 1) * d1
    flat = xp.zeros(n * c * hp * wp + slack, dtype=x.dtype)
    flat[:n * c * hp * wp].reshape(n, c, hp, wp)[:, :, pads[0]:pads[0] + h,
                                                 pads[1]:pads[1] + w] = x
    run = out[0] * wp
    item = flat.itemsize
    view = xp.lib.stride_tricks.as_strided(
        flat, shape=(c, kh, kw, n, run),
        strides=(hp * wp * item, d0 * wp * item, d1 * item, c * hp * wp * item, item))
    cols = xp.empty((c, kh, kw, n, run), dtype=x.dtype)
    cols[...] = view
    return cols.reshape(c * kh * kw, n * run), wp


def _wide(x, kshape, strides, dilations, pads) -> bool:
    """Whether the wide-row im2col applies (2-D, stride 1) and pays: output rows of fewer than
    64 columns (longer rows copy fast as they are) and padded rows at most 1.5x as long (the
    junk columns cost GEMM work and memory: a weight gradient computed as a Conv whose kernel
    is the whole image would be 75x larger)."""
    if len(kshape) != 2 or list(strides) != [1, 1] or min(pads) < 0:
        return False
    wp = x.shape[3] + pads[1] + pads[3]
    ow = wp - (kshape[1] - 1) * dilations[1]
    return 0 < ow < 64 and 2 * wp <= 3 * ow


# Host convolutions run over chunks of the batch whose im2col columns take about this many
# bytes: the columns are written and read by the GEMM while still in cache (2-D 16-channel
# 3x3 layers at 32x32: 2.8 -> 1.8 ms per call at batch 16 on one core; the whole batch's
# columns, 9x the input, go through memory twice otherwise).
CONV_CHUNK_BYTES = 2 << 20
# On a device the batch is split only to bound the columns' transient memory, in chunks large
# enough that each GEMM still fills the GPU: ResNet-50's first 3x3 stage at batch 256 would
# take 1.85 GB of columns at once (64 channels x 9 taps x 56 x 56 pixels x 256 images), its
# stride-2 input gradients as much again; in chunks of this size, 35 images at a time.
DEVICE_CONV_CHUNK_BYTES = 256 << 20


# The memory estimate (trainer/memory.py) runs kernels at small batches and extends what they
# allocate to the training batch; chunks make that extension non-linear. While CHUNK_LOG is a
# list, every chunking decision is appended to it as (images, bytes per image), and with
# CHUNK_AS_DEVICE the host kernels chunk as a device's do (an estimate for a GPU).
CHUNK_LOG: list[tuple[int, int]] | None = None
CHUNK_AS_DEVICE = False


def chunk_images(n: int, per_image: int, device: bool) -> int:
    """Images per chunk of a batch of n whose convolution columns take `per_image` bytes each
    (n when one chunk), on a device or on the host."""
    if n == 1:
        return n
    budget = DEVICE_CONV_CHUNK_BYTES if device else CONV_CHUNK_BYTES
    return max(1, min(n, budget // max(1, per_image)))


def _chunk_of(xp, n: int, per_image: int) -> int:
    if CHUNK_LOG is not None:
        CHUNK_LOG.append((n, per_image))
    return chunk_images(n, per_image, xp is not np or CHUNK_AS_DEVICE)


def _batch_chunk(xp, x, kshape, out_sp) -> int:
    """Images per chunk of a convolution over x (its whole batch when one chunk)."""
    return _chunk_of(xp, x.shape[0], x.shape[1] * math.prod(kshape) * math.prod(out_sp)
                     * x.itemsize)


def _pointwise(xp, x, kshape, strides, pads, group, out):
    """x as [N, C, pixels] when a convolution with these parameters is pointwise (1x1 kernel,
    no padding, one group, and the output `out` the strided pixels: a weight gradient's
    output may reach into end padding its pads leave out): the strided pixels, contiguous;
    else None. (Such a convolution is a product per image: no columns, and no transposition
    of the result.)"""
    if group != 1 or any(k != 1 for k in kshape) or any(pads) or any(
            -(-d // s) != o for d, s, o in zip(x.shape[2:], strides, out, strict=True)):
        return None
    if any(s != 1 for s in strides):
        x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
    return xp.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)


# Winograd's F(2x2, 3x3) (Lavin and Gray, 2016): each 2x2 block of outputs of a 3x3 stride-1
# convolution from the 4x4 input tile under it, with 16 products per tile and channel pair
# instead of 36, as 16 GEMMs [M, C] x [C, tiles] between the transforms of the kernel, the
# input and the output (the compiled loops of kernels/convloops.py). Below WINOGRAD_MIN_FLOPS
# (the im2col path's multiply-adds, times 2) the transforms' fixed cost is more than it saves.
WINOGRAD_MIN_FLOPS = 4_000_000


def _winograd(xp, x, w, strides, dilations, pads, group) -> bool:
    """Whether a Conv of x by w takes the Winograd path: on the host with the compiled loops,
    2-D, 3x3, stride 1, no dilation, one group, float32 or float64, WINOGRAD_MIN_FLOPS."""
    return _winograd_shape(xp, x, tuple(w.shape[2:]), w.dtype, w.shape[0], strides, dilations,
                           pads, group)


def _winograd_shape(xp, x, kshape, wdtype, m, strides, dilations, pads, group) -> bool:
    # (not while the memory estimate runs host kernels as a device's: a GPU takes im2col)
    return (xp is np and not CHUNK_AS_DEVICE and x.ndim == 4 and tuple(kshape) == (3, 3)
            and group == 1
            and list(strides) == [1, 1] and list(dilations) == [1, 1] and min(pads) >= 0
            and x.dtype in (np.float32, np.float64) and wdtype == x.dtype and x.size > 0
            and 18 * m * x.size >= WINOGRAD_MIN_FLOPS
            and compiled.conv_loops() is not None)


def _skewed(planes: int, rows: int, cols: int, dtype) -> np.ndarray:
    """An empty [planes, rows, cols] array (C-contiguous planes) whose planes do not start a
    multiple of 4 KiB apart: the transforms stream through several at once, and planes a power
    of two apart share cache sets (the input transform ran 10x slower at 64 KiB apart)."""
    item = np.dtype(dtype).itemsize
    plane = rows * cols
    while not 1024 <= (plane * item) % 4096 <= 3072:
        plane += max(1, 64 // item)
    flat = np.empty((planes - 1) * plane + rows * cols, dtype)
    return np.lib.stride_tricks.as_strided(flat, (planes, rows, cols),
                                           (plane * item, cols * item, item))


def _narrowed(planes: np.ndarray, cols: int) -> np.ndarray:
    """The first `cols` columns of a `_skewed` array's rows, as C-contiguous planes over the
    same memory (at the same skewed distance): the buffer of a batch's first, largest chunk
    serves the last one. (A fresh buffer per chunk costs page faults.)"""
    if cols == planes.shape[2]:
        return planes
    item = planes.itemsize
    return np.lib.stride_tricks.as_strided(planes, (planes.shape[0], planes.shape[1], cols),
                                           (planes.strides[0], cols * item, item))


def _input_tiles(loops, x, pads, m, th, tw):
    """(first image, images, V [PLANES, C, images th tw]) for each chunk of the batch: the
    input transform of the zero-padded tiles (th x tw tiles of TILE + 2 squared per image,
    stride TILE)."""
    n, c, h, wd = x.shape
    a, planes = loops.TILE, loops.PLANES
    chunk = _chunk_of(np, n, planes * (c + m) * th * tw * x.itemsize)
    padded = np.zeros((min(chunk, n), c, a * th + 2, a * tw + 2), x.dtype)
    whole = _skewed(planes, c, min(chunk, n) * th * tw, x.dtype)
    for i in range(0, n, chunk):
        nb = min(chunk, n - i)
        padded[:nb, :, pads[0]:pads[0] + h, pads[1]:pads[1] + wd] = x[i:i + nb]
        v = _narrowed(whole, nb * th * tw)
        loops.input_transform(padded[:nb], v, th, tw)
        yield i, nb, v


def winograd_into(x, w, b, pads, out_sp, y=None):
    """Y = Conv(x, w) + b for a 3x3 stride-1 host convolution (`_winograd`), into y when given:
    chunk by chunk of the batch, the zero-padded input's tiles transformed, multiplied by the
    transformed kernel (16 GEMMs; the kernel transform in float64, rounded once) and
    transformed back. Its rounding differs from the im2col path's (another order of products
    and sums) by as much as the two differ from the exact result: tests/test_kernels_image.py."""
    loops = compiled.conv_loops()
    n, c = x.shape[:2]
    m = w.shape[0]
    oh, ow = out_sp
    th, tw = -(-oh // loops.TILE), -(-ow // loops.TILE)
    u = np.empty((loops.PLANES, m, c), x.dtype)
    loops.kernel_transform(w, u)
    bias = np.zeros(m, x.dtype) if b is None else np.ascontiguousarray(b, x.dtype).reshape(m)
    target = y if y is not None and y.flags.c_contiguous and y.dtype == x.dtype else \
        np.empty((n, m, oh, ow), x.dtype)
    products = None
    for i, nb, v in _input_tiles(loops, x, pads, m, th, tw):
        # (the products skewed too: the output transform reads all planes at once, 2.7-5x
        # slower at 64 KiB apart on an AMD EPYC; NumPy's matmul writes skewed planes in place)
        if products is None:  # (the first chunk is the largest)
            products = _skewed(loops.PLANES, m, v.shape[2], x.dtype)
        prod = np.matmul(u, v, out=_narrowed(products, v.shape[2]))
        loops.output_transform(prod, bias, target[i:i + nb], th, tw)
    if y is not None and target is not y:
        y[...] = target
        return y
    return target


def winograd_weight_grad_into(x, dy, pads, dw=None):
    """dW [M, C, 3, 3] of a 3x3 stride-1 host convolution (`_winograd`) from dY, into dw when
    given: dW = G^T (sum over tiles of (A dY A^T) * V) G, with V the input transform of the
    forward pass, as 16 GEMMs [M, tiles] x [tiles, C] added over the batch's chunks (in
    float64 between chunks)."""
    loops = compiled.conv_loops()
    c = x.shape[1]
    m, oh, ow = dy.shape[1:]
    th, tw = -(-oh // loops.TILE), -(-ow // loops.TILE)
    total = np.zeros((loops.PLANES, m, c))
    dy = np.ascontiguousarray(dy)
    grads = None
    for i, _nb, v in _input_tiles(loops, x, pads, m, th, tw):
        if grads is None:  # (the first chunk is the largest)
            grads = _skewed(loops.PLANES, m, v.shape[2], x.dtype)
        g = _narrowed(grads, v.shape[2])
        loops.gradient_transform(dy, g, i, th, tw)
        total += np.matmul(g, v.transpose(0, 2, 1))
    if dw is None or not dw.flags.c_contiguous or dw.dtype != x.dtype:
        out = np.empty((m, c, 3, 3), x.dtype)
        loops.kernel_gradient(total, out)
        if dw is None:
            return out
        dw[...] = out
        return dw
    loops.kernel_gradient(total, dw)
    return dw


def conv_into(xp, x, w, b, strides, dilations, pads, out_sp, group, y=None):
    """Y = Conv(x, w) + b with explicit geometry, written into y [N, M, *out_sp] when given.
    A 1x1 convolution is one GEMM per image on its pixels (no columns); a 3x3 stride-1 one on
    the host with the compiled loops is Winograd's (`winograd_into`); others run chunk by
    chunk of the batch (`CONV_CHUNK_BYTES` on the host, `DEVICE_CONV_CHUNK_BYTES` on a
    device)."""
    if _winograd(xp, x, w, strides, dilations, pads, group):
        return winograd_into(x, w, b, pads, out_sp, y)
    n = x.shape[0]
    m, g = w.shape[0], group
    kshape = list(w.shape[2:])
    pixels = _pointwise(xp, x, kshape, strides, pads, group, out_sp)
    if pixels is not None:
        dt = np.result_type(x.dtype, w.dtype)
        target = y if y is not None and y.flags.c_contiguous and y.dtype == dt else \
            xp.empty((n, m) + tuple(out_sp), dtype=dt)
        if dt.itemsize > 2:
            xp.matmul(w.reshape(m, -1), pixels, out=target.reshape(n, m, -1))
        else:  # (CuPy batches 16-bit products nowhere: the helper goes through float32)
            target.reshape(n, m, -1)[...] = matmul(xp, w.reshape(m, -1), pixels)
        if b is not None:
            target += b.reshape((m,) + (1,) * len(out_sp))
        if y is not None and target is not y:
            y[...] = target
        return target if y is None else y
    chunk = _batch_chunk(xp, x, kshape, out_sp)
    if chunk < n:
        if y is None:
            y = xp.empty((n, m) + tuple(out_sp), dtype=xp.result_type(x, w))
        for i in range(0, n, chunk):
            conv_into(xp, x[i:i + chunk], w, b, strides, dilations, pads, out_sp, group,
                      y[i:i + chunk])
        return y
    wide = _wide(x, kshape, strides, dilations, pads)
    if wide:
        cols, wp = im2col_wide(xp, x, kshape, dilations, pads, out_sp)
        grid = [out_sp[0], wp]
    else:
        cols, grid = im2col(xp, x, kshape, strides, dilations, pads, out_sp), list(out_sp)
    po = math.prod(grid)
    if g == 1:
        y2 = xp.matmul(w.reshape(m, -1), cols)  # [M, N * O]
    else:
        y2 = matmul(xp, w.reshape(g, m // g, -1), cols.reshape(g, -1, n * po))
    y2 = y2.reshape((m, n) + tuple(grid))
    if wide:
        y2 = y2[..., :out_sp[1]]
    if b is not None:
        y2 += b.reshape((m, 1) + (1,) * len(grid))
    if y is None:
        y = xp.empty((n, m) + tuple(out_sp), dtype=y2.dtype)
    y[...] = y2.swapaxes(0, 1)
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
    if kernel_shape is not None and list(kernel_shape) != list(w.shape[2:]):
        raise ModelError(f"Conv: kernel_shape {list(kernel_shape)} does not match the weight's "
                         f"spatial shape {list(w.shape[2:])}")
    if x.ndim != w.ndim or x.shape[1] != w.shape[1] * group:
        raise ModelError(f"Conv: input of shape {list(x.shape)} and weight of shape "
                         f"{list(w.shape)} do not fit (the input needs {w.ndim} axes and "
                         f"{w.shape[1]} x group {group} = {w.shape[1] * group} channels)")
    strides, dilations, pads, out = conv_geometry(x.shape, list(w.shape[2:]), strides,
                                                  dilations, pads, auto_pad)
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"the bias has shape {list(b.shape)}, where Conv takes one value per "
                         f"output channel, [{w.shape[0]}] (PyTorch 2.13's default exporter with "
                         "optimize=False writes such a bias for a Conv3d without one: export "
                         "with dynamo=False instead)")
    low, (x, w, b) = _low_as_float32(x, w, b)
    y = conv_into(xp, x, w, b, strides, dilations, pads, out, group)
    return (y.astype(low) if low is not None else y,)


def _low_as_float32(*arrays):
    """(their dtype or None, the arrays in float32) for bfloat16/float16 operands, which have no
    BLAS on the host: a 16-bit convolution is the float32 one of the 16-bit values, rounded once
    (as 16-bit GEMMs accumulate in float32); (None, the arrays) otherwise."""
    first = arrays[0]
    if not low_float(first.dtype):
        return None, arrays
    return first.dtype, tuple(None if a is None else a.astype(np.float32) for a in arrays)


def conv_weight_grad_into(xp, x, dy, kshape, strides, dilations, pads, group, dw=None):
    """dW [M, C/G, *kshape] of Y = Conv(x, W) (explicit geometry) from dY, one matmul per
    call: the im2col columns of x times dY as [N * O, M/G] per group (this orientation is the
    faster one for OpenBLAS when M is small); written into dw when given."""
    n = x.shape[0]
    m, g = dy.shape[1], group
    out_sp = list(dy.shape[2:])
    if _winograd_shape(xp, x, kshape, dy.dtype, m, strides, dilations, pads, group):
        return winograd_weight_grad_into(x, dy, pads, dw)
    pixels = _pointwise(xp, x, kshape, strides, pads, group, out_sp)
    if pixels is not None:  # 1x1: the sum over images of dY[n] X[n]^T, one GEMM each
        prods = matmul(xp, dy.reshape(n, m, -1), pixels.transpose(0, 2, 1))  # [N, M, C]
        if dw is None:
            dw = xp.empty((m, x.shape[1]) + tuple(kshape), dtype=prods.dtype)
        dw.reshape(m, -1)[...] = prods.sum(axis=0)
        return dw
    chunk = _batch_chunk(xp, x, kshape, out_sp)
    if chunk < n:  # the chunks' sums, added
        part = conv_weight_grad_into(xp, x[:chunk], dy[:chunk], kshape, strides, dilations,
                                     pads, group, dw)
        more = None
        for i in range(chunk, n, chunk):
            more = conv_weight_grad_into(xp, x[i:i + chunk], dy[i:i + chunk], kshape, strides,
                                         dilations, pads, group, more)
            part += more
        return part
    if _wide(x, kshape, strides, dilations, pads):  # junk columns meet zeros in dY
        cols, wp = im2col_wide(xp, x, kshape, dilations, pads, out_sp)
        dyw = xp.zeros((m, n, out_sp[0], wp), dtype=dy.dtype)
        dyw[..., :out_sp[1]] = dy.swapaxes(0, 1)
        dy2 = dyw.reshape(g, m // g, -1)
    else:
        cols = im2col(xp, x, kshape, strides, dilations, pads, out_sp)  # [C * K, N * O]
        dy2 = xp.ascontiguousarray(xp.moveaxis(dy, 1, 0)).reshape(g, m // g,
                                                                   n * math.prod(out_sp))
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


def _transpose_rows(xp, x, w, g, dilations, full):
    """Uncropped 2-D stride-1 ConvTranspose [M, N, H, W]: x's rows widened to the output width
    W with zeros, one matmul gives every tap's contribution as [N, rows * W], and tap (a, b)
    adds it to one contiguous flat range of the output starting at a*d0*W + b*d1 (the widening
    zeros spill into the next row's start and add nothing)."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    mg, cg = w.shape[1], c // g
    hh, ww = full
    xw = xp.zeros((g, cg, n, h, ww), x.dtype)
    xw[..., :wd] = x.reshape(n, g, cg, h, wd).transpose(1, 2, 0, 3, 4)
    wk = xp.ascontiguousarray(w.reshape(g, cg, mg, kh, kw).transpose(0, 3, 4, 2, 1))
    cols = matmul(xp, wk.reshape(g, kh * kw * mg, cg), xw.reshape(g, cg, n * h * ww))
    cols = cols.reshape(g, kh, kw, mg, n, h * ww)
    y = xp.zeros((g, mg, n, hh * ww + (kw - 1) * dilations[1]), cols.dtype)
    for a in range(kh):
        for b in range(kw):
            at = a * dilations[0] * ww + b * dilations[1]
            y[..., at:at + h * ww] += cols[:, a, b]
    return y[..., :hh * ww].reshape(g * mg, n, hh, ww)


def conv_transpose_pads(in_spatial, kernel_shape, strides, dilations, pads, output_padding,
                        output_shape, auto_pad):
    k = len(in_spatial)
    auto_pad = _auto_pad(auto_pad)
    output_padding = list(output_padding or [0] * k)
    full = [strides[i] * (in_spatial[i] - 1) + output_padding[i]
            + (kernel_shape[i] - 1) * dilations[i] + 1 for i in range(k)]
    if output_shape is not None and len(output_shape) != k:
        raise ValueError(f"ConvTranspose: output_shape {list(output_shape)} must give the {k} "
                         f"spatial sizes only (not the batch and channel sizes)")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape) if output_shape is not None else [
            in_spatial[i] * strides[i] for i in range(k)]
        total = [full[i] - target[i] for i in range(k)]
        if auto_pad == "SAME_UPPER":
            begin = [t // 2 for t in total]
        elif auto_pad == "SAME_LOWER":
            begin = [t - t // 2 for t in total]
        else:  # (an output_shape beyond the full result: zeros at the end, as onnxruntime
            # and the ONNX reference add them; within it, the spec's split of the padding)
            begin = [t - t // 2 if t >= 0 else 0 for t in total]
        pads = begin + [t - b for t, b in zip(total, begin, strict=True)]
    elif not pads or auto_pad == "VALID":
        pads = [0] * (2 * k)
    return list(pads), output_padding, full


def conv_transpose_into(xp, x, w, b, strides, dilations, pads, output_padding, full, group,
                        y=None, method=None):
    """ConvTranspose with explicit geometry (pads from conv_transpose_pads, `full` the uncropped
    output size), by whichever of four schemes moves the fewest elements (or `method`):
    "conv", one Conv of x with the flipped, transposed kernel (stride 1; its im2col copy is
    C K N out); "phases", strides above 1 without dilation: that Conv for each phase of the
    output (the outputs at one offset modulo the strides, which one slice of the kernel's taps
    reaches), C K N out / prod(strides) in all; "rows", 2-D stride 1: one matmul to columns of
    row-widened x and one contiguous add per tap (2 M K N in_rows full_width); "fold", one
    matmul to columns folded back with one strided add per tap (any stride; 2 M K N in, but
    many short rows)."""
    n, c = x.shape[:2]
    k = x.ndim - 2
    kshape = list(w.shape[2:])
    g, mg = group, w.shape[1]
    cg = c // g
    span = [(kshape[i] - 1) * dilations[i] for i in range(k)]
    cpads = [span[i] - pads[i] for i in range(k)] + [
        span[i] - pads[i + k] + output_padding[i] for i in range(k)]
    out_sp = [full[i] - pads[i] - pads[i + k] for i in range(k)]
    taps = math.prod(kshape)
    unit = all(s == 1 for s in strides)
    costs = {"fold": 4 * g * mg * taps * n * math.prod(x.shape[2:])}  # (short rows: 2x)
    if unit and all(p >= 0 for p in cpads):
        costs["conv"] = c * taps * n * math.prod(out_sp)
    if unit and k == 2:
        costs["rows"] = 2 * g * mg * taps * n * x.shape[2] * full[1]
    if not unit and all(d == 1 for d in dilations):
        costs["phases"] = c * taps * n * math.prod(out_sp) // math.prod(strides)
    if method is None and "conv" in costs and _winograd(xp, x, w, [1] * k, dilations, cpads,
                                                          group):
        method = "conv"  # (a 3x3 stride-1 Conv on the host: Winograd's, fewer products)
    if method is None or method not in costs:
        method = min(costs, key=costs.get)
    if method == "phases":  # (each phase's Conv bounds its own columns by chunks)
        return _transpose_phases(xp, x, w, b, strides, pads, out_sp, g, y)
    if xp is not np or CHUNK_AS_DEVICE:  # a device: chunks bound the columns (as conv_into)
        per_image = {"conv": c * taps * math.prod(out_sp),
                     "rows": g * mg * taps * x.shape[2] * full[-1],
                     "fold": g * mg * taps * math.prod(x.shape[2:])}[method]
        chunk = _chunk_of(xp, n, per_image * x.itemsize)
        if chunk < n:
            if y is None:
                y = xp.empty((n, g * mg) + tuple(out_sp), dtype=xp.result_type(x, w))
            for i in range(0, n, chunk):
                conv_transpose_into(xp, x[i:i + chunk], w, b, strides, dilations, pads,
                                    output_padding, full, group, y[i:i + chunk], method=method)
            return y
    if method == "conv":
        wf = w.reshape((g, cg, mg) + tuple(kshape)).swapaxes(1, 2)
        wf = wf[(slice(None),) * 3 + (slice(None, None, -1),) * k]
        wf = xp.ascontiguousarray(wf).reshape((g * mg, cg) + tuple(kshape))
        return conv_into(xp, x, wf, b, [1] * k, dilations, cpads, out_sp, g, y)
    if method == "rows":
        yf = _transpose_rows(xp, x, w, g, dilations, full)
    else:
        # cols[G, Mg * K, N * in] = W_g^T x_g
        xg = xp.ascontiguousarray(xp.moveaxis(x, 1, 0)).reshape(g, cg, -1)
        wg = w.reshape(g, cg, mg * taps).transpose(0, 2, 1)
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


def _transpose_phases(xp, x, w, b, strides, pads, out_sp, g, y):
    """Cropped ConvTranspose [N, G * Mg, *out_sp] without dilation, as one stride-1 Conv per
    output phase. Along one axis (stride s, kernel K, begin pad p), output o is full position
    t = o + p, which taps k = t mod s, t mod s + s, ... reach from inputs i = (t - k) / s; the
    outputs o = rho, rho + s, ... (one phase) share those taps, and their sum over u of
    x[j - u] w[r + u s] (r = (rho + p) mod s, j = (rho + p) // s + j') is a stride-1 Conv of x
    with that slice of the kernel, flipped, its input padded (or cropped) to the window that
    the phase's outputs read. A phase that no tap reaches (s > K) is the bias alone."""
    n, c = x.shape[:2]
    k = x.ndim - 2
    kshape = tuple(w.shape[2:])
    mg, cg = w.shape[1], c // g
    if y is None:
        y = xp.empty((n, g * mg) + tuple(out_sp), dtype=xp.result_type(x, w))
    wt = w.reshape((g, cg, mg) + kshape).swapaxes(1, 2)  # [G, Mg, Cg, *K]
    for rho in np.ndindex(*[min(s, o) for s, o in zip(strides, out_sp, strict=True)]):
        taps, crop, begin, end, outs = [], [], [], [], []
        for i in range(k):
            s, t0 = strides[i], rho[i] + pads[i]
            r, j0 = t0 % s, t0 // s
            length = len(range(r, kshape[i], s))
            count = -(-(out_sp[i] - rho[i]) // s)
            first = j0 - (length - 1)  # the input index the phase's first output reads first
            lo, hi = max(0, first), max(0, min(x.shape[2 + i], j0 + count))
            taps.append(slice(r, None, s))
            crop.append(slice(lo, max(lo, hi)))
            begin.append(lo - first)
            end.append(count + length - 1 - (lo - first) - max(0, hi - lo))
            outs.append(count)
        view = y[(slice(None), slice(None)) + tuple(slice(r, None, s) for r, s in
                                                     zip(rho, strides, strict=True))]
        sub = wt[(slice(None),) * 3 + tuple(taps)]
        if 0 in sub.shape[3:] or 0 in x[(slice(None),) * 2 + tuple(crop)].shape[2:]:
            view[...] = 0 if b is None else b.reshape((-1,) + (1,) * k)
            continue
        sub = sub[(slice(None),) * 3 + (slice(None, None, -1),) * k]
        sub = xp.ascontiguousarray(sub).reshape((g * mg, cg) + sub.shape[3:])
        conv_into(xp, x[(slice(None),) * 2 + tuple(crop)], sub, b, [1] * k, [1] * k,
                  begin + end, outs, g, view)
    return y


def conv_transpose_geometry(x_shape, kshape, strides, dilations, pads, output_padding,
                            output_shape, auto_pad):
    """(strides, dilations, pads, output_padding, full) of a ConvTranspose."""
    k = len(kshape)
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    pads, output_padding, full = conv_transpose_pads(
        x_shape[2:], kshape, strides, dilations, pads, output_padding, output_shape, auto_pad)
    for i in range(k):  # (onnxruntime refuses it too: "Computed output dimension is <= 0")
        if x_shape[2 + i] > 0 and full[i] - pads[i] - pads[i + k] < 1:
            raise ModelError(f"ConvTranspose: the output's spatial axis {i} would be "
                             f"{full[i] - pads[i] - pads[i + k]} long (the full result "
                             f"{full[i]}, less pads {pads[i]} and {pads[i + k]})")
    return strides, dilations, pads, output_padding, full


@kernel("ConvTranspose")
def ConvTranspose(xp, x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1,
                  kernel_shape=None, output_padding=None, output_shape=None, pads=None,
                  strides=None):
    if output_padding is not None:
        k = len(w.shape) - 2
        for i, (op, s, d) in enumerate(zip(output_padding, strides or [1] * k,
                                           dilations or [1] * k, strict=False)):
            if not 0 <= op < max(s, d):
                raise ModelError(f"ConvTranspose: output_padding {list(output_padding)} must "
                                 f"lie below the stride or the dilation on each axis (axis "
                                 f"{i}: {op}, stride {s}, dilation {d})")
    geo = conv_transpose_geometry(x.shape, list(w.shape[2:]), strides, dilations, pads,
                                  output_padding, output_shape, auto_pad)
    low, (x, w, b) = _low_as_float32(x, w, b)
    y = conv_transpose_into(xp, x, w, b, *geo, group)
    return (y.astype(low) if low is not None else y,)


def _tap_views(xw, kernel_shape):
    """The window view [N, C, *O, *K] as one [N, C, *O] view per kernel tap."""
    return [xw[(Ellipsis,) + offs] for offs in np.ndindex(*kernel_shape)]


_TAP_LOOP_MAX = 16  # kernels with at most this many taps reduce over per-tap views


@kernel("MaxPoolIndices", domain=CUSTOM_DOMAIN)
def MaxPoolIndices(xp, x, y, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape,
                   pads=None, storage_order=0, strides=None):
    """ai.onnx_trainer.MaxPoolIndices(X, Y): the Indices output of MaxPool(X) (opset 8 on),
    Y its values, at any opset, for the gradient of a MaxPool of opsets 1-7, which has none
    (Y: the values, which give the Indices' shape to the memory estimate)."""
    return (MaxPool(xp, x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                    kernel_shape=kernel_shape, pads=pads, storage_order=storage_order,
                    strides=strides, n_outputs=2)[1],)


CUSTOM_SHAPES["MaxPoolIndices"] = lambda x, y: [(y[0], np.dtype(np.int64))]


@kernel("MaxPool", since=1)
def MaxPool(xp, x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape,
            pads=None, storage_order=0, strides=None, n_outputs=2):
    strides, dilations, pads, out = _geometry(x, kernel_shape, strides, dilations, pads,
                                              auto_pad, ceil_mode)
    if (fast := poolfuse.maxpool(xp, x, kernel_shape, strides, dilations, pads, out,
                                 storage_order, n_outputs > 1)) is not None:
        if len(fast) > 1:
            fast = (fast[0], _in_own_plane(xp, fast[1], x.shape, kernel_shape, strides,
                                           dilations, pads, out))
        return fast
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
        arg = xp.zeros(y.shape, dtype=np.uint8 if len(taps) < 256 else np.int64) \
            if n_outputs > 1 else None
        if xp is np and arg is not None:
            more, hit = np.empty(y.shape, np.bool_), np.empty(y.shape, arg.dtype)
        for t, v in enumerate(taps[1:], 1):
            if xp is np:  # no NaNs here: the maximum is the strictly-greater update
                if arg is not None:
                    # arg = t where v > y: taps come in increasing order, so that is
                    # max(arg, t * (v > y)), branch-free (a masked store, putmask or copyto,
                    # is 6-60x slower on data-dependent masks)
                    np.greater(v, y, out=more)
                    np.multiply(more, arg.dtype.type(t), out=hit)
                    np.maximum(arg, hit, out=arg)
                np.maximum(y, v, out=y)
                continue
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
    # ((n * C + c) * H + h) * W + w, or with storage_order=1 (n * C + c) * H * W + w * H + h;
    # = the window's corner index (fixed by the geometry: built once) + the tap's offset.
    geometry = (tuple(x.shape), tuple(kernel_shape), tuple(strides), tuple(dilations),
                tuple(pads), tuple(out), bool(storage_order))
    corner = cached_constant(xp, ("maxpool-corner", *geometry), lambda: _maxpool_corner(
        x.shape, kernel_shape, strides, dilations, pads, out, storage_order)[0])
    offsets = cached_constant(xp, ("maxpool-offsets", *geometry), lambda: _maxpool_corner(
        x.shape, kernel_shape, strides, dilations, pads, out, storage_order)[1])
    index = _in_own_plane(xp, corner + offsets[arg], x.shape, kernel_shape, strides, dilations,
                          pads, out)
    return (xp.ascontiguousarray(y), index)


def _in_own_plane(xp, index, shape, kernel_shape, strides, dilations, pads, out):
    """MaxPool's Indices, where a window of padding alone (which dilations, or pads of the
    kernel's size or more, allow) has no
    element to point at (its first tap's index lies outside x, -1, or is another row's
    element), kept in its own channel's plane, as a device's and the host's kernels both do:
    the backward's scatter stays in range, and the gradient rule passes such a window's dY
    nowhere (its output is -inf whatever x is). Other geometries: index as it is."""
    if padding_only_windows(tuple(shape[2:]), tuple(kernel_shape), tuple(strides),
                            tuple(dilations), tuple(pads), tuple(out)) is None:
        return index
    size = math.prod(shape[2:])
    plane = cached_constant(xp, ("maxpool-planes", tuple(shape[:2]), size, len(kernel_shape)),
                            lambda: (np.arange(shape[0] * shape[1], dtype=np.int64) * size)
                            .reshape(tuple(shape[:2]) + (1,) * len(kernel_shape)))
    return xp.clip(index, plane, plane + max(size - 1, 0))


@functools.lru_cache(maxsize=256)
def padding_only_windows(spatial: tuple, kernel_shape: tuple, strides: tuple, dilations: tuple,
                         pads: tuple, out: tuple) -> np.ndarray | None:
    """The pooling windows [*out] that hold no element of the input, only padding (dilations
    allow it, kernel 2, dilation 2, pads 1 on an axis of 1, and pads of the kernel's size or
    more), as a boolean mask; None where every window reads the input (nearly always)."""
    k = len(kernel_shape)
    axes = []
    for i in range(k):
        o = np.arange(out[i])[:, None] * strides[i] - pads[i]
        taps = o + np.arange(kernel_shape[i])[None, :] * dilations[i]
        axes.append(~((taps >= 0) & (taps < spatial[i])).any(axis=1))
    if not any(a.any() for a in axes):
        return None
    empty = np.zeros(tuple(out), bool)
    for i, a in enumerate(axes):
        empty |= a.reshape((1,) * i + (-1,) + (1,) * (k - i - 1))
    return empty


def _maxpool_corner(shape, kernel_shape, strides, dilations, pads, out, storage_order):
    """(flat index into x of each window's first tap [N, C, *out], offset of each tap [K])."""
    k = len(kernel_shape)
    spatial = list(shape[2:])
    # the flat stride of each spatial axis in the index (storage_order=1: first axis fastest)
    order = list(reversed(range(k))) if storage_order else list(range(k))
    step = [0] * k
    acc = 1
    for i in reversed(order):
        step[i] = acc
        acc *= spatial[i]
    n, c = shape[:2]
    corner = (np.arange(n)[:, None] * c + np.arange(c)[None, :]).reshape((n, c) + (1,) * k)
    corner = corner * math.prod(spatial)
    for i in range(k):
        o = np.arange(out[i]).reshape((1,) * (2 + i) + (-1,) + (1,) * (k - i - 1))
        corner = corner + (o * strides[i] - pads[i]) * step[i]
    taps = np.unravel_index(np.arange(math.prod(kernel_shape)), kernel_shape)
    offsets = sum(taps[i] * dilations[i] * step[i] for i in range(k))
    return corner.astype(np.int64), np.asarray(offsets, np.int64)


@kernel("AveragePool", since=1)
def AveragePool(xp, x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
                kernel_shape, pads=None, strides=None):
    strides, dilations, pads, out = _geometry(x, kernel_shape, strides, dilations, pads,
                                              auto_pad, ceil_mode)
    acc = _acc(x)
    if window_covers_input(x.shape[2:], kernel_shape, dilations, pads, out):
        # (one window over all of x: a sum, however far the kernel reaches past x; padded to
        # the full window, HF EfficientNet's AvgPool2d(1280, ceil_mode) of an 8x8 map took
        # 23 GiB)
        counts = avgpool_divisor(x.shape[2:], kernel_shape, strides, dilations, pads, out,
                                 count_include_pad).astype(acc)
        total = x.astype(acc).sum(axis=tuple(range(2, x.ndim)), keepdims=True)
        return ((total / xp.asarray(counts)).astype(x.dtype),)
    if (fast := poolfuse.averagepool(xp, x, kernel_shape, strides, dilations, pads, out,
                                     count_include_pad)) is not None:
        return (fast,)
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
    per = math.prod(block)
    if x.ndim != 3 or x.shape[2] != math.prod(blocks) or x.shape[1] % per:
        raise ValueError(f"Col2Im: the input has shape {list(x.shape)}; with image_shape "
                         f"{image}, block_shape {block} and these pads, strides and dilations it "
                         f"must be [N, C * {per}, {math.prod(blocks)}]")
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


def window_covers_input(in_spatial, kernel_shape, dilations, pads, out) -> bool:
    """One output position per axis whose window, without gaps, holds every input position
    and reaches past the padded input on some axis (a kernel larger than the map: a global
    pool in AveragePool's clothes, whose window padded in full can be huge; the windows that
    fit keep the general kernels)."""
    k = len(in_spatial)
    return all(out[i] == 1 and dilations[i] == 1 and pads[i] >= 0
               and kernel_shape[i] - pads[i] >= in_spatial[i] for i in range(k)) and any(
        kernel_shape[i] > in_spatial[i] + pads[i] + pads[i + k] for i in range(k))


def avgpool_divisor(in_spatial, kernel_shape, strides, dilations, pads, out, count_include_pad):
    """Per-output-position divisor of AveragePool (host array of shape `out`)."""
    k = len(in_spatial)
    if window_covers_input(in_spatial, kernel_shape, dilations, pads, out):
        # (the window's positions within the input, or within the padded input, without
        # building the window)
        inside = [min(kernel_shape[i], in_spatial[i] + pads[i] + pads[i + k])
                  if count_include_pad else in_spatial[i] for i in range(k)]
        return np.full(tuple(out), float(math.prod(inside)))
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
    if spatial:  # (opset 9's, with the mode said by the outputs)
        return BatchNormalization_9(xp, x, scale, b, mean, var, epsilon=epsilon,
                                    momentum=momentum, n_outputs=n_outputs if training else 1)
    eps = x.dtype.type(epsilon)
    if not training:
        return (((x - mean) / xp.sqrt(var + eps) * scale + b).astype(x.dtype),)
    m, v = x.mean(axis=0), x.var(axis=0)
    mom = x.dtype.type(momentum)
    y = (x - m) / xp.sqrt(v + eps) * scale + b
    return (y.astype(x.dtype), (mean * mom + m * (1 - mom)).astype(x.dtype),
            (var * mom + v * (1 - mom)).astype(x.dtype), m, v)


@kernel("BatchNormalization", since=9)
def BatchNormalization_9(xp, x, scale, b, mean, var, *, epsilon=1e-5, momentum=0.9, spatial=1,
                         n_outputs=1):
    """Opsets 9-13: the outputs say the mode, as the specification's two output cases do (and
    onnxruntime): Y alone in test mode; Y, running mean and var, and the batch's mean and var
    in training mode (PyTorch's exporter writes that form for a module in .train())."""
    training = n_outputs > 1
    out = BatchNormalization(xp, x, scale, b, mean, var, epsilon=epsilon, momentum=momentum,
                             training_mode=int(training))
    if not training:
        return out
    axes = (0,) + tuple(range(2, x.ndim))
    return (*out, x.mean(axis=axes), x.var(axis=axes))


@kernel("BatchNormalization", since=14)
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
