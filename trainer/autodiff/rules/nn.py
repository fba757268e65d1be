"""Gradient rules for Conv, pooling, BatchNormalization (inference form) and Dropout.

Convolution gradients use standard ops: dX is a ConvTranspose of dY, dW a Conv of the
transposed input with the transposed dY (per group), so training graphs still run in onnxruntime.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from trainer.autodiff.registry import grad
from trainer.errors import ModelError
from trainer.graph import elem_type
from trainer.kernels.nn import avgpool_divisor, conv_pads


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


def _spatial_axes(ctx):
    return list(range(2, len(ctx.shape(ctx.I(0)))))


@grad("Conv")
def conv_grad(ctx):
    # dX = ConvTranspose(dY, W), dW[g] = Conv(X[g]^T, dY[g]^T)^T, dB = sum(dY over N, spatial)
    w_shape = ctx.shape(ctx.I(1))
    kernel = list(w_shape[2:])
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
        swap = [1, 0] + list(range(2, 2 + k))
        xs, dys = [ctx.I(0)], [dy]
        if group > 1:
            xs = [ctx.tmp(f"x{g}") for g in range(group)]
            dys = [ctx.tmp(f"dy{g}") for g in range(group)]
            nodes.append(_split(ctx, ctx.I(0), xs, x_shape[1]))
            nodes.append(_split(ctx, dy, dys, ctx.shape(ctx.O(0))[1]))
        parts = []
        for g in range(group):
            xt, dyt, full = ctx.tmp("xT"), ctx.tmp("dyT"), ctx.tmp("dw_full")
            nodes += [ctx.node("Transpose", [xs[g]], [xt], perm=swap),
                      ctx.node("Transpose", [dys[g]], [dyt], perm=swap),
                      ctx.node("Conv", [xt, dyt], [full], strides=dilations, dilations=strides,
                               pads=pads, kernel_shape=list(out))]
            # Output is [C/G, M/G, k'] with k' >= kernel: crop, then swap to [M/G, C/G, k].
            span = [(x_shape[2 + i] + pads[i] + pads[i + k] - (out[i] - 1) * strides[i] - 1)
                    // dilations[i] + 1 for i in range(k)]
            src = full
            if span != kernel:
                src = ctx.tmp("dw_crop")
                nodes.append(ctx.node("Slice", [full, ctx.const([0] * k, np.int64, "starts"),
                                                ctx.const(kernel, np.int64, "ends"),
                                                ctx.const(list(range(2, 2 + k)), np.int64,
                                                          "axes")], [src]))
            part = ctx.GI(1) if group == 1 else ctx.tmp(f"dw{g}")
            nodes.append(ctx.node("Transpose", [src], [part], perm=swap))
            parts.append(part)
        if group > 1:
            nodes.append(ctx.node("Concat", parts, [ctx.GI(1)], axis=0))
    if ctx.needs(2):
        nodes.append(ctx.reduce("ReduceSum", dy, [0] + _spatial_axes(ctx), ctx.GI(2),
                                keepdims=0))
    return nodes


def _split(ctx, x, outs, channels: int):
    """Split x ([N, channels, ...]; x may be a gradient with no recorded shape) into equal parts
    along axis 1."""
    if ctx.opset >= 18:
        return ctx.node("Split", [x], outs, axis=1, num_outputs=len(outs))
    size = channels // len(outs)
    if ctx.opset >= 13:
        return ctx.node("Split", [x, ctx.const([size] * len(outs), np.int64, "split")], outs,
                        axis=1)
    return ctx.node("Split", [x], outs, axis=1, split=[size] * len(outs))


@grad("MaxPool")
def maxpool_grad(ctx):
    # dX = scatter-add of dY at the argmax indices (the node's Indices output)
    if ctx.opset < 16:
        raise ModelError(f"MaxPool gradient (node '{ctx.name}') needs opset >= 16 "
                         f"(ScatterElements with reduction=add); the model has opset "
                         f"{ctx.opset}: convert it with onnx.version_converter")
    if len(ctx.onnx_node.output) < 2:
        raise ModelError(f"MaxPool node '{ctx.name}' has no Indices output to differentiate")
    x_shape = ctx.shape(ctx.I(0))
    total = int(np.prod(x_shape))
    zeros, idx, upd, flat = ctx.tmp("zeros"), ctx.tmp("idx"), ctx.tmp("upd"), ctx.tmp("flat")
    zero = np.zeros(1, ctx.dtype(ctx.I(0)))
    return [ctx.node("ConstantOfShape", [ctx.const([total], np.int64, "n")], [zeros],
                     value=numpy_helper.from_array(zero)),
            ctx.reshape(ctx.O(1), [-1], idx), ctx.reshape(ctx.GO(0), [-1], upd),
            ctx.node("ScatterElements", [zeros, idx, upd], [flat], axis=0, reduction="add"),
            ctx.reshape(flat, x_shape, ctx.GI(0))]


@grad("AveragePool")
def averagepool_grad(ctx):
    # dX = ConvTranspose(dY / divisor, ones[C,1,k], group=C): each input gets its windows' share
    kernel = list(ctx.attr("kernel_shape"))
    x_shape, k, strides, dilations, pads, out = _geometry(ctx, kernel)
    divisor = avgpool_divisor(x_shape[2:], kernel, strides, dilations, pads, out,
                              ctx.attr("count_include_pad", 0))
    dt = ctx.dtype(ctx.I(0))
    c = x_shape[1]
    scaled = ctx.tmp("scaled")
    tpads, extra = transpose_geometry(x_shape[2:], out, kernel, strides, dilations, pads)
    ones = ctx.const(np.ones([c, 1] + kernel, dt), suffix="ones")
    return [ctx.node("Div", [ctx.GO(0), ctx.const(divisor.astype(dt), suffix="divisor")],
                     [scaled]),
            ctx.node("ConvTranspose", [scaled, ones], [ctx.GI(0)], strides=strides,
                     dilations=dilations, group=c, pads=tpads, kernel_shape=kernel,
                     output_padding=extra if any(extra) else None)]


@grad("GlobalAveragePool")
def global_averagepool_grad(ctx):
    # dX = expand(dY) / prod(spatial)
    x_shape = ctx.shape(ctx.I(0))
    t = ctx.tmp("expanded")
    return [ctx.expand(ctx.GO(0), x_shape, t, ctx.dtype(ctx.I(0))),
            ctx.node("Mul", [t, ctx.scalar(1.0 / float(np.prod(x_shape[2:])))], [ctx.GI(0)])]


@grad("BatchNormalization")
def batchnorm_grad(ctx):
    # Inference form (fixed statistics): Y = (X - mean) * s / sqrt(var + eps) + B:
    # dX = dY s/sd, dS = sum(dY (X-mean)/sd), dB = sum(dY), dMean = -sum(dY) s/sd,
    # dVar = -0.5 sum(dY (X-mean)) s / sd^3    (sd = sqrt(var + eps); sums over N, spatial)
    if ctx.attr("training_mode", 0):
        raise ModelError(f"BatchNormalization node '{ctx.name}' is in training mode; the "
                         "training-graph builder rewrites those before differentiation")
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
    if ratio is None:
        raise ModelError(f"Dropout node '{ctx.name}': ratio must be a constant to train")
    ratio = float(np.asarray(ratio).reshape(-1)[0])
    if len(ctx.onnx_node.output) < 2 or not ctx.O(1):
        raise ModelError(f"Dropout node '{ctx.name}' has no mask output to differentiate")
    m, t = ctx.tmp("mask"), ctx.tmp("masked")
    return [ctx.node("Cast", [ctx.O(1)], [m], to=elem_type(ctx.dtype(ctx.I(0)))),
            ctx.node("Mul", [ctx.GO(0), m], [t]),
            ctx.node("Mul", [t, ctx.scalar(1.0 / (1.0 - ratio))], [ctx.GI(0)])]
