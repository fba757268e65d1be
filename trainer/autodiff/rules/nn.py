"""Gradient rules for convolutions, pooling, LRN, BatchNormalization (inference form), Dropout.

Standard ops only, so training graphs still run in onnxruntime: dX of a Conv is a ConvTranspose
of dY (of a ConvTranspose, a Conv), dW one grouped Conv that correlates the input with dY over
the batch; window adjoints (AveragePool, LpPool, MaxPool before opset 16, Col2Im) are grouped
ConvTransposes or Convs with constant 0/1 kernels.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from trainer.autodiff.registry import grad
from trainer.errors import ModelError
from trainer.graph import elem_type
from trainer.kernels import CUSTOM_DOMAIN
from trainer.kernels.nn import (
    avgpool_divisor,
    conv_pads,
    conv_transpose_pads,
    padding_only_windows,
    window_covers_input,
)


def transpose_geometry(in_spatial, out_spatial, kernel, strides, dilations, pads):
    """Pads and output_padding for a ConvTranspose that maps an `out`-sized dY back to `in`."""
    k = len(in_spatial)
    begin, end, extra = list(pads[:k]), [], []
    for i in range(k):
        full = strides[i] * (out_spatial[i] - 1) + (kernel[i] - 1) * dilations[i] + 1
        r = in_spatial[i] + begin[i] - full
        end.append(0 if r >= 0 else -r)
        extra.append(r if r >= 0 else 0)
    return begin + end, extra


def _geometry(ctx, kernel):
    x_shape = ctx.shape(ctx.I(0))
    k = len(x_shape) - 2
    strides = list(ctx.attr("strides") or [1] * k)
    dilations = list(ctx.attr("dilations") or [1] * k)
    pads, out = conv_pads(x_shape[2:], kernel, strides, dilations, ctx.attr("pads"),
                          ctx.attr("auto_pad", "NOTSET"), ctx.attr("ceil_mode", 0))
    return x_shape, k, strides, dilations, pads, out


def _perm_swap01(rank: int) -> list[int]:
    return [1, 0] + list(range(2, rank))


def _slice(ctx, x: str, starts, ends, axes, out: str):
    """Slice with static bounds (attributes before opset 10, inputs from it)."""
    starts, ends, axes = [int(v) for v in starts], [int(v) for v in ends], [int(v) for v in axes]
    if ctx.opset < 10:
        return ctx.node("Slice", [x], [out], starts=starts, ends=ends, axes=axes)
    return ctx.node("Slice", [x, ctx.const(starts, np.int64, "starts"),
                              ctx.const(ends, np.int64, "ends"),
                              ctx.const(axes, np.int64, "axes")], [out])


def _pad(ctx, x: str, pads, out: str):
    """Zero padding with static [begin..., end...] amounts over every axis."""
    pads = [int(v) for v in pads]
    if ctx.opset < 11:
        return ctx.node("Pad", [x], [out], pads=pads)
    return ctx.node("Pad", [x, ctx.const(pads, np.int64, "pads")], [out])


def conv_weight_grad(ctx, x: str, x_shape, dy: str, dy_shape, kernel, strides, dilations,
                     pads, group: int, out: str) -> list:
    """dW [M, C/G, *kernel] of Y = Conv(x, W, ...) as one Conv with group G: the input as
    [C/G, G*N, *S] images, dY as [M, N, *O] kernels (the batch is the reduction axis), strides and
    dilations swapped; the end padding is chosen so that exactly `kernel` taps come out."""
    n, c = x_shape[:2]
    sp, o = list(x_shape[2:]), list(dy_shape[2:])
    k, cg = len(sp), c // group
    nodes, xt, dyt = [], ctx.tmp("xT"), ctx.tmp("dyT")
    if group == 1:
        nodes.append(ctx.node("Transpose", [x], [xt], perm=_perm_swap01(k + 2)))
    else:
        r, t = ctx.tmp("x_groups"), ctx.tmp("x_groupsT")
        nodes += [ctx.reshape(x, [n, group, cg] + sp, r),
                  ctx.node("Transpose", [r], [t], perm=[2, 1, 0] + list(range(3, k + 3))),
                  ctx.reshape(t, [cg, group * n] + sp, xt)]
    nodes.append(ctx.node("Transpose", [dy], [dyt], perm=_perm_swap01(k + 2)))
    ends, crop = [], False
    for i in range(k):
        need = (o[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - sp[i] - pads[i]
        # padded lengths in [need, need + dilation) give `kernel` outputs; below, crop the rest
        ends.append(max(need, 0))
        crop |= need + dilations[i] - 1 < 0
    full = ctx.tmp("dw_full")
    nodes.append(ctx.node("Conv", [xt, dyt], [full], strides=list(dilations),
                          dilations=list(strides), pads=list(pads[:k]) + ends, group=group,
                          kernel_shape=o))
    if crop:
        cropped = ctx.tmp("dw_crop")
        nodes.append(_slice(ctx, full, [0] * k, kernel, range(2, k + 2), cropped))
        full = cropped
    nodes.append(ctx.node("Transpose", [full], [out], perm=_perm_swap01(k + 2)))
    return nodes


def _bias_grad(ctx, dy: str, rank: int, out: str):
    return ctx.reduce("ReduceSum", dy, [0] + list(range(2, rank)), out, keepdims=0)


@grad("Conv")
def conv_grad(ctx):
    # dX = ConvTranspose(dY, W); dW = Conv(X^T, dY^T) per group (over the batch); dB = sum(dY)
    kernel = list(ctx.shape(ctx.I(1))[2:])
    x_shape, k, strides, dilations, pads, out = _geometry(ctx, kernel)
    group = ctx.attr("group", 1)
    dy, nodes = ctx.GO(0), []
    if ctx.needs(0):
        tpads, extra = transpose_geometry(x_shape[2:], out, kernel, strides, dilations, pads)
        nodes.append(ctx.node("ConvTranspose", [dy, ctx.I(1)], [ctx.GI(0)], strides=strides,
                              dilations=dilations, group=group, pads=tpads,
                              output_padding=extra if any(extra) else None,
                              kernel_shape=kernel))
    if ctx.needs(1):
        nodes += conv_weight_grad(ctx, ctx.I(0), x_shape, dy, ctx.shape(ctx.O(0)), kernel,
                                  strides, dilations, pads, group, ctx.GI(1))
    if ctx.needs(2):
        nodes.append(_bias_grad(ctx, dy, k + 2, ctx.GI(2)))
    return nodes


@grad("ConvTranspose")
def conv_transpose_grad(ctx):
    # ConvTranspose(., W) is the adjoint of Conv(., W): dX = Conv(dY, W), dW = that Conv's
    # weight gradient with dY as its input and X as its output gradient, dB = sum(dY)
    x_shape, y_shape = ctx.shape(ctx.I(0)), ctx.shape(ctx.O(0))
    kernel = list(ctx.shape(ctx.I(1))[2:])
    k = len(kernel)
    strides = list(ctx.attr("strides") or [1] * k)
    dilations = list(ctx.attr("dilations") or [1] * k)
    group = ctx.attr("group", 1)
    pads, opad, _ = conv_transpose_pads(
        x_shape[2:], kernel, strides, dilations, ctx.attr("pads"), ctx.attr("output_padding"),
        ctx.attr("output_shape"), ctx.attr("auto_pad", "NOTSET"))
    # X reaches [0, s*(in-1) + span) of the unpadded result; Y is that frame shifted by the begin
    # pads (negative: zeros X never reaches) and ending output_padding - end pad past it.
    starts = [max(-pads[i], 0) for i in range(k)]
    ends = [y_shape[2 + i] - max(opad[i] - pads[i + k], 0) for i in range(k)]
    cpads = [max(p, 0) for p in pads[:k]] + [max(pads[i + k] - opad[i], 0) for i in range(k)]
    dy, nodes = ctx.GO(0), []
    src, src_shape = dy, list(y_shape)
    if any(starts) or ends != list(y_shape[2:]):
        src = ctx.tmp("dy_reached")
        nodes.append(_slice(ctx, dy, starts, ends, range(2, k + 2), src))
        src_shape = list(y_shape[:2]) + [e - s for s, e in zip(starts, ends, strict=True)]
    if ctx.needs(0):
        nodes.append(ctx.node("Conv", [src, ctx.I(1)], [ctx.GI(0)], strides=strides,
                              dilations=dilations, group=group, pads=cpads, kernel_shape=kernel))
    if ctx.needs(1):
        nodes += conv_weight_grad(ctx, src, src_shape, ctx.I(0), x_shape, kernel, strides,
                                  dilations, cpads, group, ctx.GI(1))
    if ctx.needs(2):
        nodes.append(_bias_grad(ctx, dy, k + 2, ctx.GI(2)))
    return nodes


def _window_adjoint(ctx, t: str, x_shape, weight: np.ndarray, kernel, strides, dilations,
                    pads, out, dst: str):
    """ConvTranspose(t, weight, group=C) back onto x's grid: each window's values (weight per
    channel: [C * per, 1, *kernel]) summed into the inputs they cover; padding is cropped."""
    tpads, extra = transpose_geometry(x_shape[2:], out, kernel, strides, dilations, pads)
    return ctx.node("ConvTranspose", [t, ctx.const(weight, suffix="window")], [dst],
                    strides=strides, dilations=dilations, group=x_shape[1], pads=tpads,
                    kernel_shape=list(kernel), output_padding=extra if any(extra) else None)


def _ones_kernel(ctx, x_shape, kernel) -> np.ndarray:
    return np.ones([x_shape[1], 1] + list(kernel), ctx.dtype(ctx.I(0)))


@grad("MaxPool")
def maxpool_grad(ctx):
    # dX[i] = sum of dY over the windows whose argmax (the Indices output) is i. As in PyTorch a
    # tie goes to the window's first maximal element (the one Indices names).
    pre = []
    if len(ctx.onnx_node.output) > 1 and ctx.O(1):
        indices = ctx.O(1)
    else:  # the node does not output Indices: recompute them in the backward (before opset
        # 8, which has none, as the engine's own ai.onnx_trainer.MaxPoolIndices)
        indices = ctx.tmp("indices")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ctx.onnx_node.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        if ctx.opset >= 8:
            pre.append(ctx.node("MaxPool", [ctx.I(0)], [ctx.tmp("values"), indices], **attrs))
        else:
            pre.append(ctx.node("MaxPoolIndices", [ctx.I(0), ctx.O(0)], [indices],
                                domain=CUSTOM_DOMAIN, **attrs))
    kernel = list(ctx.attr("kernel_shape"))
    x_shape, k, strides, dilations, pads, out = _geometry(ctx, kernel)
    overlap = any(out[i] > 1 and strides[i] < (kernel[i] - 1) * dilations[i] + 1
                  for i in range(k))
    dy = ctx.GO(0)
    empty = padding_only_windows(tuple(x_shape[2:]), tuple(kernel), tuple(strides),
                                 tuple(dilations), tuple(pads), tuple(out))
    if empty is not None:  # (windows of padding alone: -inf whatever x is, no gradient)
        dy = ctx.tmp("dy_kept")
        keep = (~empty).astype(ctx.dtype(ctx.I(0))).reshape((1, 1) + tuple(out))
        pre.append(ctx.node("Mul", [ctx.GO(0), ctx.const(keep, suffix="kept")], [dy]))
        # (their Indices, kept in the plane, may name an element another window took, pads of
        # a kernel's size or more: their zeros must add, not overwrite)
        overlap = True
    if ctx.opset >= 16 or (ctx.opset >= 11 and not overlap):
        return pre + _scatter_at_indices(ctx, x_shape, "add" if overlap else None, indices, dy)
    return pre + _maxpool_taps(ctx, x_shape, kernel, strides, dilations, pads, out, indices, dy)


def _scatter_at_indices(ctx, x_shape, reduction, indices, dy=None):
    """dY scattered into zeros at the flat Indices (duplicates added when windows overlap)."""
    dy = dy or ctx.GO(0)
    k = len(x_shape) - 2
    order = ctx.attr("storage_order", 0)
    total = math.prod(x_shape)
    zeros, idx, upd, flat = ctx.tmp("zeros"), ctx.tmp("idx"), ctx.tmp("upd"), ctx.tmp("flat")
    zero = np.zeros(1, ctx.dtype(ctx.I(0)))
    nodes = []
    if ctx.I(0) in ctx.data_sized:  # (X's size at run time)
        size, n = ctx.tmp("x_size"), ctx.tmp("n")
        nodes += [ctx.node("Size", [ctx.I(0)], [size]), ctx.reshape(size, [1], n)]
    else:
        n = ctx.const([total], np.int64, "n")
    nodes += [ctx.node("ConstantOfShape", [n], [zeros], value=numpy_helper.from_array(zero)),
              ctx.reshape(indices, [-1], idx), ctx.reshape(dy, [-1], upd),
              ctx.node("ScatterElements", [zeros, idx, upd], [flat], axis=0,
                       reduction=reduction)]
    if not order:
        return nodes + ctx.reshape_as(flat, ctx.I(0), ctx.GI(0))
    # storage_order=1: Indices count the spatial axes in column-major order
    grid = ctx.tmp("colmajor")
    return nodes + [ctx.reshape(flat, list(x_shape[:2]) + list(x_shape[2:])[::-1], grid),
                    ctx.node("Transpose", [grid], [ctx.GI(0)],
                             perm=[0, 1] + [1 + k - i for i in range(k)])]


def _maxpool_taps(ctx, x_shape, kernel, strides, dilations, pads, out, indices, dy=None):
    """MaxPool adjoint without a scatter-add (opset < 16): the window tap of each argmax as a
    one-hot over the taps (Indices minus the window origin, compared with each tap's offset),
    times dY, then folded back by a grouped ConvTranspose with one-hot tap kernels. A tap offset
    may also match a tap outside x (the flat offsets alias across rows); those land in the
    padding, which the ConvTranspose crops."""
    n, c = x_shape[:2]
    sp = list(x_shape[2:])
    k, taps = len(sp), math.prod(kernel)
    order = list(reversed(range(k))) if ctx.attr("storage_order", 0) else list(range(k))

    def flat(coords):
        f = 0
        for i in order:
            f = f * sp[i] + coords[i]
        return np.asarray(f, np.int64)

    tap = np.unravel_index(np.arange(taps), kernel)
    offsets = flat([tap[i] * dilations[i] for i in range(k)]).reshape([taps] + [1] * k)
    grid = np.meshgrid(*[np.arange(out[i]) * strides[i] - pads[i] for i in range(k)],
                       indexing="ij")
    origin = flat(grid).reshape([1, 1] + list(out))
    base = ((np.arange(n)[:, None] * c + np.arange(c)[None, :]) * math.prod(sp))
    base = base.astype(np.int64).reshape([n, c] + [1] * k)
    dt = ctx.dtype(ctx.I(0))
    t = {s: ctx.tmp(s) for s in ("local", "rel", "rel1", "hit", "hitf", "dy1", "z", "zf")}
    onehot = np.tile(np.eye(taps, dtype=dt).reshape([taps, 1] + list(kernel)),
                     [c, 1] + [1] * k)
    return [ctx.node("Sub", [indices, ctx.const(base, suffix="base")], [t["local"]]),
            ctx.node("Sub", [t["local"], ctx.const(origin, suffix="origin")], [t["rel"]]),
            ctx.unsqueeze(t["rel"], [2], t["rel1"]),
            ctx.node("Equal", [t["rel1"], ctx.const(offsets, suffix="taps")], [t["hit"]]),
            ctx.node("Cast", [t["hit"]], [t["hitf"]], to=elem_type(dt)),
            ctx.unsqueeze(dy or ctx.GO(0), [2], t["dy1"]),
            ctx.node("Mul", [t["hitf"], t["dy1"]], [t["z"]]),
            ctx.reshape(t["z"], [n, c * taps] + list(out), t["zf"]),
            _window_adjoint(ctx, t["zf"], x_shape, onehot, kernel, strides, dilations, pads,
                            out, ctx.GI(0))]


@grad("AveragePool")
def averagepool_grad(ctx):
    # dX = ConvTranspose(dY / divisor, ones[C,1,k], group=C): each input gets its windows' share
    kernel = list(ctx.attr("kernel_shape"))
    x_shape, k, strides, dilations, pads, out = _geometry(ctx, kernel)
    divisor = avgpool_divisor(x_shape[2:], kernel, strides, dilations, pads, out,
                              ctx.attr("count_include_pad", 0))
    dt = ctx.dtype(ctx.I(0))
    scaled = ctx.tmp("scaled")
    if window_covers_input(x_shape[2:], kernel, dilations, pads, out):
        # (one window over all of x: dY / divisor everywhere, no kernel-sized ConvTranspose)
        return [ctx.node("Div", [ctx.GO(0), ctx.const(divisor.astype(dt), suffix="divisor")],
                         [scaled]),
                ctx.node("Expand", [scaled, ctx.const(np.array(x_shape, np.int64),
                                                      suffix="shape")], [ctx.GI(0)])]
    return [ctx.node("Div", [ctx.GO(0), ctx.const(divisor.astype(dt), suffix="divisor")],
                     [scaled]),
            _window_adjoint(ctx, scaled, x_shape, _ones_kernel(ctx, x_shape, kernel), kernel,
                            strides, dilations, pads, out, ctx.GI(0))]


def _lp_parts(ctx, p: float):
    """(nodes, s, g) with s = dY * Y^(1-p) (Y = 0 read as 1: such windows are all zeros, where
    g vanishes) and g = sign(X) |X|^(p-1), the two factors of dX."""
    x, y, dy = ctx.I(0), ctx.O(0), ctx.GO(0)
    dt = ctx.dtype(x)
    nodes, s = [], dy
    if p != 1:
        t = {n: ctx.tmp(n) for n in ("y0", "y0f", "safe", "pw", "s", "pos")}
        if ctx.opset >= 11:
            nodes.append(ctx.node("Equal", [y, ctx.scalar(0.0)], [t["y0"]]))
        else:  # (no float Equal before opset 11: Y >= 0, so Y == 0 is not Y > 0)
            nodes += [ctx.node("Greater", [y, ctx.scalar(0.0)], [t["pos"]]),
                      ctx.node("Not", [t["pos"]], [t["y0"]])]
        nodes += [ctx.node("Cast", [t["y0"]], [t["y0f"]], to=elem_type(dt)),
                  ctx.node("Add", [y, t["y0f"]], [t["safe"]])]
        if p == 2:
            nodes.append(ctx.node("Div", [dy, t["safe"]], [t["s"]]))
        else:
            nodes += [ctx.node("Pow", [t["safe"], ctx.scalar(1.0 - p)], [t["pw"]]),
                      ctx.node("Mul", [dy, t["pw"]], [t["s"]])]
        s = t["s"]
    if p == 2:
        return nodes, s, x
    from trainer.autodiff.rules.elementwise import sign as sign_of  # (Sign from opset 9)

    sign = ctx.tmp("sign")
    nodes += sign_of(ctx, x, sign)
    if p == 1:
        return nodes, s, sign
    a, pw, g = ctx.tmp("abs"), ctx.tmp("abs_pow"), ctx.tmp("g")
    nodes += [ctx.node("Abs", [x], [a]), ctx.node("Pow", [a, ctx.scalar(p - 1.0)], [pw]),
              ctx.node("Mul", [sign, pw], [g])]
    return nodes, s, g


@grad("LpPool")
def lppool_grad(ctx):
    # Y = (sum_window |X|^p)^(1/p): dX = sign(X) |X|^(p-1) * fold(dY Y^(1-p)), fold summing each
    # window's value into the inputs it covers; an all-zero window gives 0
    kernel = list(ctx.attr("kernel_shape"))
    x_shape, k, strides, dilations, pads, out = _geometry(ctx, kernel)
    nodes, s, g = _lp_parts(ctx, float(ctx.attr("p", 2)))
    folded = ctx.tmp("folded")
    nodes.append(_window_adjoint(ctx, s, x_shape, _ones_kernel(ctx, x_shape, kernel), kernel,
                                 strides, dilations, pads, out, folded))
    return nodes + [ctx.node("Mul", [g, folded], [ctx.GI(0)])]


@grad("GlobalLpPool")
def global_lppool_grad(ctx):
    # dX = sign(X) |X|^(p-1) * dY Y^(1-p) (broadcast over the spatial axes)
    nodes, s, g = _lp_parts(ctx, float(ctx.attr("p", 2)))
    return nodes + [ctx.node("Mul", [g, s], [ctx.GI(0)])]


@grad("GlobalAveragePool")
def global_averagepool_grad(ctx):
    # dX = expand(dY) / prod(spatial)
    x_shape = ctx.shape(ctx.I(0))
    t = ctx.tmp("expanded")
    if ctx.I(0) in ctx.data_sized and ctx.opset >= 8:  # (X's sizes at run time)
        d = {k: ctx.tmp(k) for k in ("x_dims", "x_size", "y_size", "nx", "ny", "scale")}
        to = elem_type(ctx.dtype(ctx.I(0)))
        return [ctx.node("Shape", [ctx.I(0)], [d["x_dims"]]),
                ctx.node("Expand", [ctx.GO(0), d["x_dims"]], [t]),
                ctx.node("Size", [ctx.I(0)], [d["x_size"]]),
                ctx.node("Size", [ctx.GO(0)], [d["y_size"]]),
                ctx.node("Cast", [d["x_size"]], [d["nx"]], to=to),
                ctx.node("Cast", [d["y_size"]], [d["ny"]], to=to),
                ctx.node("Div", [d["ny"], d["nx"]], [d["scale"]]),
                ctx.node("Mul", [t, d["scale"]], [ctx.GI(0)])]
    return [ctx.expand(ctx.GO(0), x_shape, t, ctx.dtype(ctx.I(0))),
            ctx.node("Mul", [t, ctx.scalar(1.0 / float(np.prod(x_shape[2:])))], [ctx.GI(0)])]


@grad("GlobalMaxPool")
def global_maxpool_grad(ctx):
    # dX = dY * [X == Y] / #ties: tied maxima share the gradient evenly (as torch.amax)
    x_shape = ctx.shape(ctx.I(0))
    t = {n: ctx.tmp(n) for n in ("eq", "mask", "count", "share")}
    return [ctx.node("Equal", [ctx.I(0), ctx.O(0)], [t["eq"]]),
            ctx.node("Cast", [t["eq"]], [t["mask"]], to=elem_type(ctx.dtype(ctx.I(0)))),
            ctx.reduce("ReduceSum", t["mask"], range(2, len(x_shape)), t["count"]),
            ctx.node("Div", [ctx.GO(0), t["count"]], [t["share"]]),
            ctx.node("Mul", [t["mask"], t["share"]], [ctx.GI(0)])]


@grad("MaxUnpool", inputs=(0,))
def maxunpool_grad(ctx):
    # dX = dY gathered at the indices (flat positions in the unpooled shape the attributes give;
    # an output_shape input only pads or cuts that shape at the end of each spatial axis)
    x_shape, y_shape = ctx.shape(ctx.I(0)), list(ctx.shape(ctx.O(0)))
    kernel = list(ctx.attr("kernel_shape"))
    k = len(kernel)
    strides = list(ctx.attr("strides") or [1] * k)
    pads = list(ctx.attr("pads") or [0] * (2 * k))
    shape = list(x_shape[:2]) + [(x_shape[2 + i] - 1) * strides[i] - pads[i] - pads[i + k]
                                 + kernel[i] for i in range(k)]
    nodes, src = [], ctx.GO(0)
    if y_shape != shape:
        common = [min(a, b) for a, b in zip(shape, y_shape, strict=True)]
        if common != y_shape:
            cut = ctx.tmp("cut")
            nodes.append(_slice(ctx, src, [0] * len(shape), common, range(len(shape)), cut))
            src = cut
        if common != shape:
            padded = ctx.tmp("padded")
            nodes.append(_pad(ctx, src, [0] * len(shape) + [a - b for a, b in
                                                             zip(shape, common, strict=True)],
                              padded))
            src = padded
    flat, idx, picked = ctx.tmp("flat"), ctx.tmp("idx"), ctx.tmp("picked")
    return nodes + [ctx.reshape(src, [-1], flat), ctx.reshape(ctx.I(1), [-1], idx),
                    ctx.node("Gather", [flat, idx], [picked], axis=0),
                    ctx.reshape(picked, x_shape, ctx.GI(0))]


@grad("Col2Im", inputs=(0,))
def col2im_grad(ctx):
    # Col2Im sums blocks into an image; its adjoint is im2col: dX = Conv(dY, one-hot taps,
    # group=C), each output channel c*K + t reading tap t of every block of channel c
    x_shape, y_shape = ctx.shape(ctx.I(0)), ctx.shape(ctx.O(0))
    block = ctx.static_value(ctx.I(2))
    if block is None:
        raise ModelError(f"Col2Im node '{ctx.name}': block_shape must be a constant to "
                         "differentiate")
    block = [int(v) for v in np.asarray(block).reshape(-1)]
    k, taps, c = len(block), math.prod(block), y_shape[1]
    eye = np.eye(taps, dtype=ctx.dtype(ctx.I(0))).reshape([taps, 1] + block)
    cols = ctx.tmp("cols")
    return [ctx.node("Conv", [ctx.GO(0), ctx.const(np.tile(eye, [c, 1] + [1] * k),
                                                   suffix="taps")], [cols],
                     strides=list(ctx.attr("strides") or [1] * k),
                     dilations=list(ctx.attr("dilations") or [1] * k),
                     pads=list(ctx.attr("pads") or [0] * (2 * k)), group=c, kernel_shape=block),
            ctx.reshape(cols, x_shape, ctx.GI(0))]


@grad("LRN")
def lrn_grad(ctx):
    # Y = X d^-b, d = bias + alpha/size * S, S = sum of X^2 over the channel window:
    # dX = dY d^-b - (2 alpha b / size) X * W^T(dY Y / d), W^T the adjoint window sum
    x, y, dy = ctx.I(0), ctx.O(0), ctx.GO(0)
    x_shape = list(ctx.shape(x))
    size = int(ctx.attr("size"))
    alpha, beta = float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75))
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    col = [x_shape[0], 1, x_shape[1], math.prod(x_shape[2:])]
    ones = ctx.const(np.ones([1, 1, size, 1], ctx.dtype(x)), suffix="window")
    t = {n: ctx.tmp(n) for n in ("sq", "sq4", "s4", "s", "as", "d", "pw", "t1", "u", "ud",
                                 "u4", "v4", "v", "vx", "t2")}
    return [ctx.node("Mul", [x, x], [t["sq"]]), ctx.reshape(t["sq"], col, t["sq4"]),
            ctx.node("Conv", [t["sq4"], ones], [t["s4"]], pads=[before, 0, after, 0],
                     kernel_shape=[size, 1]),
            ctx.reshape(t["s4"], x_shape, t["s"]),
            ctx.node("Mul", [t["s"], ctx.scalar(alpha / size)], [t["as"]]),
            ctx.node("Add", [t["as"], ctx.scalar(float(ctx.attr("bias", 1.0)))], [t["d"]]),
            ctx.node("Pow", [t["d"], ctx.scalar(-beta)], [t["pw"]]),
            ctx.node("Mul", [dy, t["pw"]], [t["t1"]]),
            ctx.node("Mul", [dy, y], [t["u"]]), ctx.node("Div", [t["u"], t["d"]], [t["ud"]]),
            ctx.reshape(t["ud"], col, t["u4"]),
            ctx.node("Conv", [t["u4"], ones], [t["v4"]], pads=[after, 0, before, 0],
                     kernel_shape=[size, 1]),
            ctx.reshape(t["v4"], x_shape, t["v"]),
            ctx.node("Mul", [t["v"], x], [t["vx"]]),
            ctx.node("Mul", [t["vx"], ctx.scalar(2.0 * alpha * beta / size)], [t["t2"]]),
            ctx.node("Sub", [t["t1"], t["t2"]], [ctx.GI(0)])]


@grad("CausalConvWithState")
def causal_conv_grad(ctx):
    # P = [past_state (or zeros), X], Z = Conv(P, W, B, group=C), Y = act(Z), present = P[-(k-1):]
    # dZ = dY act'(Z) (silu: s (1 + Z (1 - s)), s = sigmoid(Z)); dP = ConvTranspose(dZ, W) plus
    # d(present) on the tail; dX, d(past) = split(dP); dW, dB as for Conv
    x, w = ctx.I(0), ctx.I(1)
    n, c, length = ctx.shape(x)
    kw = ctx.shape(w)[2]
    act = ctx.attr("activation", "none")
    b = ctx.I(2) if ctx.I(2) else None
    past = ctx.I(3) if len(ctx.onnx_node.input) > 3 and ctx.I(3) else None
    nodes, p = [], x
    needs_p = ctx.needs(1) or act != "none"
    if needs_p and kw > 1:
        p = ctx.tmp("P")
        nodes.append(ctx.node("Concat", [past, x], [p], axis=2) if past else
                     _pad(ctx, x, [0, 0, kw - 1, 0, 0, 0], p))
    dz = ctx.GO(0)
    if dz is not None and act != "none":
        z, s, one_s, zs, t, ds, dz = (ctx.tmp(v) for v in ("Z", "s", "1-s", "Z(1-s)", "1+Z(1-s)",
                                                           "dsilu", "dZ"))
        nodes += [ctx.node("Conv", [p, w] + ([b] if b else []), [z], group=c,
                           kernel_shape=[kw]),
                  ctx.node("Sigmoid", [z], [s]),
                  ctx.node("Sub", [ctx.scalar(1.0, x), s], [one_s]),
                  ctx.node("Mul", [z, one_s], [zs]),
                  ctx.node("Add", [zs, ctx.scalar(1.0, x)], [t]),
                  ctx.node("Mul", [s, t], [ds]),
                  ctx.node("Mul", [ctx.GO(0), ds], [dz])]
    if ctx.needs(0) or ctx.needs(3):
        parts = []
        if dz is not None:
            dp = ctx.tmp("dP_conv")
            nodes.append(ctx.node("ConvTranspose", [dz, w], [dp], group=c, kernel_shape=[kw]))
            parts.append(dp)
        if ctx.GO(1) is not None and kw > 1:
            tail = ctx.tmp("dP_state")
            nodes.append(_pad(ctx, ctx.GO(1), [0, 0, length, 0, 0, 0], tail))
            parts.append(tail)
        dp = ctx.tmp("dP")
        nodes.append(ctx.node("Sum", parts, [dp]) if len(parts) > 1 else
                     ctx.node("Identity", parts, [dp]))
        if ctx.needs(3):
            nodes.append(_slice(ctx, dp, [0], [kw - 1], [2], ctx.GI(3)))
        if ctx.needs(0):
            nodes.append(_slice(ctx, dp, [kw - 1], [kw - 1 + length], [2], ctx.GI(0)))
    if dz is None:  # only present_state reaches the loss
        dt = ctx.dtype(x)
        if ctx.needs(1):
            nodes.append(ctx.node("Identity", [ctx.const(np.zeros(ctx.shape(w), dt))],
                                  [ctx.GI(1)]))
        if ctx.needs(2):
            nodes.append(ctx.node("Identity", [ctx.const(np.zeros([c], dt))], [ctx.GI(2)]))
        return nodes
    if ctx.needs(1):
        nodes += conv_weight_grad(ctx, p, [n, c, length + kw - 1], dz, [n, c, length], [kw],
                                  [1], [1], [0, 0], c, ctx.GI(1))
    if ctx.needs(2):
        nodes.append(_bias_grad(ctx, dz, 3, ctx.GI(2)))
    return nodes


def _batchnorm_batch_stats_grad(ctx):
    # Training mode (batch statistics, as in a model exported in training form):
    # xhat = (X - mu) / sd over N and spatial axes (biased var), Y = xhat s + B:
    # dX = s/sd (dY - mean(dY) - xhat mean(dY xhat)), dS = sum(dY xhat), dB = sum(dY).
    # The running-statistic outputs R_mean = mom mean_in + (1-mom) mu, R_var = mom var_in +
    # (1-mom) var pass mom * d(out) to the input statistics and, through the batch statistics,
    # dX += (1-mom)/M (dR_mean + 2 (X - mu) dR_var)  (M elements per channel; in a training step
    # they only feed the next step, so these gradients are absent there).
    nodes = []
    mom = ctx.attr("momentum", 0.9)
    for i, o in ((3, 1), (4, 2)):
        if ctx.needs(i):
            if ctx.GO(o) is not None:
                nodes.append(ctx.node("Mul", [ctx.GO(o), ctx.scalar(mom, ctx.I(i))],
                                      [ctx.GI(i)]))
            else:
                zero = np.zeros(1, ctx.dtype(ctx.I(i)))
                nodes.append(ctx.node("ConstantOfShape",
                                      [ctx.const(list(ctx.shape(ctx.I(i))), np.int64, "n")],
                                      [ctx.GI(i)], value=numpy_helper.from_array(zero)))
    x, s, dy = ctx.I(0), ctx.I(1), ctx.GO(0)
    rank = len(ctx.shape(x))
    axes = [0] + list(range(2, rank))
    bshape = [-1] + [1] * (rank - 2)
    t = {k: ctx.tmp(k) for k in ("mu", "xc", "sq", "var", "ve", "sd", "xhat", "p", "mdy", "mp",
                                 "term", "d1", "d2", "s_b", "inv", "sum_p")}
    stats = [o for o in (1, 2) if len(ctx.onnx_node.output) > o and ctx.GO(o) is not None]
    if dy is None and not (stats and ctx.needs(0)):
        return nodes
    nodes += [ctx.reduce("ReduceMean", x, axes, t["mu"]),
              ctx.node("Sub", [x, t["mu"]], [t["xc"]])]
    parts = []  # contributions to dX
    if ctx.needs(0) and stats:
        m = int(np.prod([ctx.shape(x)[a] for a in axes]))
        c = (1.0 - mom) / m
        for o in stats:
            go_b, part = ctx.tmp(f"dstat{o}_b"), ctx.tmp(f"dx_stat{o}")
            nodes.append(ctx.reshape(ctx.GO(o), bshape, go_b))
            if o == 1:
                nodes.append(ctx.node("Mul", [go_b, ctx.scalar(c, x)], [ctx.tmp("u")]))
                nodes.append(ctx.node("Expand", [nodes[-1].output[0], ctx.const(
                    list(ctx.shape(x)), np.int64, "shape")], [part]))
            else:
                w = ctx.tmp("w")
                nodes += [ctx.node("Mul", [go_b, ctx.scalar(2.0 * c, x)], [w]),
                          ctx.node("Mul", [t["xc"], w], [part])]
            parts.append(part)
    if dy is None:
        if ctx.needs(0):
            nodes.append(ctx.node("Sum", parts, [ctx.GI(0)]))
        return nodes
    nodes += [ctx.node("Mul", [t["xc"], t["xc"]], [t["sq"]]),
              ctx.reduce("ReduceMean", t["sq"], axes, t["var"]),
              ctx.node("Add", [t["var"], ctx.scalar(ctx.attr("epsilon", 1e-5))], [t["ve"]]),
              ctx.node("Sqrt", [t["ve"]], [t["sd"]]),
              ctx.node("Div", [t["xc"], t["sd"]], [t["xhat"]]),
              ctx.node("Mul", [dy, t["xhat"]], [t["p"]])]
    if ctx.needs(0):
        nodes += [ctx.reduce("ReduceMean", dy, axes, t["mdy"]),
                  ctx.reduce("ReduceMean", t["p"], axes, t["mp"]),
                  ctx.node("Mul", [t["xhat"], t["mp"]], [t["term"]]),
                  ctx.node("Sub", [dy, t["mdy"]], [t["d1"]]),
                  ctx.node("Sub", [t["d1"], t["term"]], [t["d2"]]),
                  ctx.reshape(s, bshape, t["s_b"]),
                  ctx.node("Div", [t["s_b"], t["sd"]], [t["inv"]])]
        if parts:
            main = ctx.tmp("dx_y")
            nodes += [ctx.node("Mul", [t["d2"], t["inv"]], [main]),
                      ctx.node("Sum", [main, *parts], [ctx.GI(0)])]
        else:
            nodes.append(ctx.node("Mul", [t["d2"], t["inv"]], [ctx.GI(0)]))
    if ctx.needs(1):
        nodes.append(ctx.reduce("ReduceSum", t["p"], axes, ctx.GI(1), keepdims=0))
    if ctx.needs(2):
        nodes.append(ctx.reduce("ReduceSum", dy, axes, ctx.GI(2), keepdims=0))
    return nodes


@grad("BatchNormalization")
def batchnorm_grad(ctx):
    # Inference form (fixed statistics): Y = (X - mean) * s / sqrt(var + eps) + B:
    # dX = dY s/sd, dS = sum(dY (X-mean)/sd), dB = sum(dY), dMean = -sum(dY) s/sd,
    # dVar = -0.5 sum(dY (X-mean)) s / sd^3    (sd = sqrt(var + eps); sums over N, spatial)
    if ctx.attr("training_mode", 0):
        return _batchnorm_batch_stats_grad(ctx)
    rank = len(ctx.shape(ctx.I(0)))
    axes = [0] + list(range(2, rank))
    bshape = [-1] + [1] * (rank - 2)
    x, s, mean, var, dy = ctx.I(0), ctx.I(1), ctx.I(3), ctx.I(4), ctx.GO(0)
    ve, sd, inv, inv_b = ctx.tmp("var_eps"), ctx.tmp("sd"), ctx.tmp("inv"), ctx.tmp("inv_b")
    nodes = [ctx.node("Add", [var, ctx.scalar(ctx.attr("epsilon", 1e-5))], [ve]),
             ctx.node("Sqrt", [ve], [sd]),
             ctx.node("Div", [s, sd], [inv]),
             ctx.reshape(inv, bshape, inv_b)]
    if ctx.needs(0):
        nodes.append(ctx.node("Mul", [dy, inv_b], [ctx.GI(0)]))
    if ctx.needs(2) or ctx.needs(3):
        sum_dy = ctx.GI(2) if ctx.needs(2) else ctx.tmp("sum_dy")
        nodes.append(ctx.reduce("ReduceSum", dy, axes, sum_dy, keepdims=0))
        if ctx.needs(3):
            t = ctx.tmp("t")
            nodes += [ctx.node("Mul", [sum_dy, inv], [t]), ctx.node("Neg", [t], [ctx.GI(3)])]
    if ctx.needs(1) or ctx.needs(4):
        mean_b, xc, p, sp = ctx.tmp("mean_b"), ctx.tmp("xc"), ctx.tmp("p"), ctx.tmp("sum_p")
        nodes += [ctx.reshape(mean, bshape, mean_b), ctx.node("Sub", [x, mean_b], [xc]),
                  ctx.node("Mul", [dy, xc], [p]),
                  ctx.reduce("ReduceSum", p, axes, sp, keepdims=0)]
        if ctx.needs(1):
            nodes.append(ctx.node("Div", [sp, sd], [ctx.GI(1)]))
        if ctx.needs(4):
            t1, t2, t3 = ctx.tmp("t1"), ctx.tmp("t2"), ctx.tmp("t3")
            nodes += [ctx.node("Mul", [sp, s], [t1]), ctx.node("Div", [t1, ve], [t2]),
                      ctx.node("Div", [t2, sd], [t3]),
                      ctx.node("Mul", [t3, ctx.scalar(-0.5, x)], [ctx.GI(4)])]
    return nodes


@grad("Dropout", inputs=(0,))
def dropout_grad(ctx):
    # dX = dY * mask / (1 - ratio)   (identity when not training)
    training = ctx.static_value(ctx.I(2)) if ctx.I(2) else None
    if training is None or not bool(np.asarray(training).reshape(-1)[0]):
        return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]
    ratio = ctx.static_value(ctx.I(1)) if ctx.I(1) else np.array(0.5)
    if len(ctx.onnx_node.output) < 2 or not ctx.O(1):
        raise ModelError(f"Dropout node '{ctx.name}' has no mask output to differentiate")
    x_type = elem_type(ctx.dtype(ctx.I(0)))
    m, t = ctx.tmp("mask"), ctx.tmp("masked")
    nodes = [ctx.node("Cast", [ctx.O(1)], [m], to=x_type), ctx.node("Mul", [ctx.GO(0), m], [t])]
    if ratio is not None:
        ratio = float(np.asarray(ratio).reshape(-1)[0])
        return nodes + [ctx.node("Mul", [t, ctx.scalar(1.0 / (1.0 - ratio))], [ctx.GI(0)])]
    # a ratio the run gives (a graph input, a value computed or from an outer scope): divided
    # by 1 - ratio in X's type (the ratio may be another float type)
    r, keep = ctx.tmp("ratio"), ctx.tmp("keep")
    return nodes + [ctx.node("Cast", [ctx.I(1)], [r], to=x_type),
                    ctx.node("Sub", [ctx.scalar(1.0), r], [keep]),
                    ctx.node("Div", [t, keep], [ctx.GI(0)])]
