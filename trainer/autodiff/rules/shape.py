"""Gradient rules for shape ops: the gradient is the inverse data movement."""

from __future__ import annotations

import numpy as np

from trainer.autodiff.registry import grad


def _reshape_back(ctx):
    # dX = reshape(dY, shape(X))
    return [ctx.reshape(ctx.GO(0), ctx.shape(ctx.I(0)), ctx.GI(0))]


for _op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
    grad(_op, inputs=(0,))(_reshape_back)


@grad("Transpose")
def transpose_grad(ctx):
    # dX = transpose(dY, inverse(perm))
    rank = len(ctx.shape(ctx.I(0)))
    perm = ctx.attr("perm") or list(reversed(range(rank)))
    return [ctx.node("Transpose", [ctx.GO(0)], [ctx.GI(0)], perm=np.argsort(perm).tolist())]


@grad("Expand", inputs=(0,))
def expand_grad(ctx):
    # dX = dY summed to shape(X)
    return ctx.to_input(ctx.GO(0), 0)


@grad("Concat")
def concat_grad(ctx):
    # dX_i = slice of dY along axis
    rank = len(ctx.shape(ctx.O(0)))
    axis = ctx.attr("axis") % rank
    inputs = [i for i in range(len(ctx.onnx_node.input))]
    sizes = [ctx.shape(ctx.I(i))[axis] for i in inputs]
    outs = [ctx.GI(i) if ctx.needs(i) else ctx.tmp(f"unused{i}") for i in inputs]
    if ctx.opset >= 13:
        return [ctx.node("Split", [ctx.GO(0), ctx.const(sizes, np.int64, "split")], outs,
                         axis=axis)]
    return [ctx.node("Split", [ctx.GO(0)], outs, axis=axis, split=sizes)]


@grad("Split", inputs=(0,))
def split_grad(ctx):
    # dX = concat(dY_i) along axis, zeros for outputs with no gradient
    rank = len(ctx.shape(ctx.I(0)))
    axis = ctx.attr("axis", 0) % rank
    parts, nodes = [], []
    for i, out in enumerate(ctx.onnx_node.output):
        if ctx.GO(i) is not None:
            parts.append(ctx.GO(i))
        else:
            parts.append(ctx.const(np.zeros(ctx.shape(out), ctx.dtype(out)), suffix="zeros"))
    nodes.append(ctx.node("Concat", parts, [ctx.GI(0)], axis=axis))
    return nodes
