"""Gradient rules for reductions and the softmax family."""

from __future__ import annotations

import numpy as np

from trainer.autodiff.registry import grad
from trainer.errors import ModelError
from trainer.kernels.reduce import softmax_axes


def _reduced_axes(ctx) -> list[int] | None:
    rank = len(ctx.shape(ctx.I(0)))
    axes = ctx.attr("axes")
    if axes is None or len(axes) == 0:
        return None if ctx.attr("noop_with_empty_axes", 0) else list(range(rank))
    return sorted(int(a) % rank for a in axes)


def _broadcast_back(ctx, dy: str, scale: float | None):
    """dX = expand(reshape(dY, keepdims shape), shape(X)) * scale."""
    x_shape = ctx.shape(ctx.I(0))
    axes = ctx.static_axes
    if axes is None:  # no-op reduction
        return [ctx.node("Identity", [dy], [ctx.GI(0)])]
    kept = tuple(1 if i in axes else d for i, d in enumerate(x_shape))
    nodes, src = [], dy
    if ctx.shape(ctx.O(0)) != kept:
        src = ctx.tmp("kept")
        nodes.append(ctx.reshape(dy, kept, src))
    target = ctx.GI(0) if scale is None else ctx.tmp("expanded")
    nodes.append(ctx.expand(src, x_shape, target, ctx.dtype(ctx.I(0))))
    if scale is not None:
        nodes.append(ctx.node("Mul", [target, ctx.scalar(scale)], [ctx.GI(0)]))
    return nodes


def _axes_of(ctx):
    if len(ctx.onnx_node.input) > 1 and ctx.I(1):
        rank = len(ctx.shape(ctx.I(0)))
        values = ctx.static_value(ctx.I(1))
        if values is None:
            raise ModelError(f"node '{ctx.name}': reduction axes must be a constant to "
                             "differentiate")
        if values.size == 0:
            return None if ctx.attr("noop_with_empty_axes", 0) else list(range(rank))
        return sorted(int(a) % rank for a in values.reshape(-1))
    return _reduced_axes(ctx)


@grad("ReduceSum", inputs=(0,))
def reduce_sum_grad(ctx):
    # dX = broadcast(dY)
    ctx.static_axes = _axes_of(ctx)
    return _broadcast_back(ctx, ctx.GO(0), None)


@grad("ReduceMean", inputs=(0,))
def reduce_mean_grad(ctx):
    # dX = broadcast(dY) / n
    ctx.static_axes = _axes_of(ctx)
    x_shape = ctx.shape(ctx.I(0))
    n = int(np.prod([x_shape[a] for a in ctx.static_axes])) if ctx.static_axes else 1
    return _broadcast_back(ctx, ctx.GO(0), 1.0 / n if ctx.static_axes is not None else None)


def _softmax_axes(ctx):
    rank = len(ctx.shape(ctx.I(0)))
    return softmax_axes(rank, ctx.attr("axis", -1 if ctx.opset >= 13 else 1), ctx.opset)


@grad("Softmax")
def softmax_grad(ctx):
    # dX = Y * (dY - sum(dY * Y, axis))
    p, s, d = ctx.tmp("prod"), ctx.tmp("sum"), ctx.tmp("diff")
    return [ctx.node("Mul", [ctx.GO(0), ctx.O(0)], [p]),
            ctx.reduce("ReduceSum", p, _softmax_axes(ctx), s, keepdims=1),
            ctx.node("Sub", [ctx.GO(0), s], [d]),
            ctx.node("Mul", [ctx.O(0), d], [ctx.GI(0)])]


@grad("LogSoftmax")
def log_softmax_grad(ctx):
    # dX = dY - exp(Y) * sum(dY, axis)
    e, s, t = ctx.tmp("exp"), ctx.tmp("sum"), ctx.tmp("t")
    return [ctx.node("Exp", [ctx.O(0)], [e]),
            ctx.reduce("ReduceSum", ctx.GO(0), _softmax_axes(ctx), s, keepdims=1),
            ctx.node("Mul", [e, s], [t]),
            ctx.node("Sub", [ctx.GO(0), t], [ctx.GI(0)])]
