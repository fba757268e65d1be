"""Gradient rules for reductions, scans (CumSum/CumProd) and the softmax family.

A reduction's gradient works on dY and Y reshaped to the keepdims shape and broadcast back to X;
with noop_with_empty_axes and no axes the op is elementwise (ReduceL1 is |X|) and so is its rule.
"""

from __future__ import annotations

import numpy as np

from trainer.autodiff.registry import grad, no_gradient
from trainer.autodiff.rules.elementwise import (
    binop,
    cast,
    equal_extreme,
    is_zero,
    sign,
    where,
)
from trainer.errors import ModelError
from trainer.graph import elem_type, is_float_dtype
from trainer.kernels.reduce import softmax_axes

no_gradient("ArgMax", "ArgMin", "Hardmax")


def _axes_of(ctx) -> list[int]:
    """The reduced axes, sorted; [] when nothing is reduced (noop_with_empty_axes)."""
    rank = len(ctx.shape(ctx.I(0)))
    if len(ctx.onnx_node.input) > 1 and ctx.I(1):
        values = ctx.static_value(ctx.I(1))
        if values is None:
            raise ModelError(f"node '{ctx.name}' ({ctx.onnx_node.op_type}): the reduction axes "
                             "are computed at run time; gradients need them constant (make "
                             "them an initializer or Constant)")
        axes = [int(a) for a in values.reshape(-1)]
    else:
        axes = list(ctx.attr("axes") or [])
    if not axes:
        return [] if ctx.attr("noop_with_empty_axes", 0) else list(range(rank))
    return sorted({a % rank for a in axes}) if rank else []


class _Reduction:
    """Shapes of one reduction node, and its dY and Y in the keepdims shape."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.x = ctx.I(0)
        self.x_shape = tuple(ctx.shape(self.x))
        self.dtype = ctx.dtype(self.x)
        self.axes = _axes_of(ctx)
        self.kept = tuple(1 if i in self.axes else d for i, d in enumerate(self.x_shape))
        self.count = int(np.prod([self.x_shape[a] for a in self.axes]))
        # X's size follows the data (graph.data_sized): shapes and counts read at run time
        self.sized = self.x in ctx.data_sized and ctx.opset >= 11
        self.nodes: list = []

    def keep(self, name: str) -> str:
        """`name` (a tensor of Y's shape) reshaped to the keepdims shape."""
        if not self.ctx.attr("keepdims", 1) and self.axes and self.sized:
            out = self.ctx.tmp("kept")  # (Y's other dims as they are at run time)
            self.nodes.append(self.ctx.unsqueeze(name, self.axes, out))
            return out
        if tuple(self.ctx.shape(self.ctx.O(0))) == self.kept:
            return name
        out = self.ctx.tmp("kept")
        self.nodes.append(self.ctx.reshape(name, self.kept, out))
        return out

    def x_dims(self) -> str:
        """X's shape at run time (a Shape node)."""
        out = self.ctx.tmp("x_dims")
        self.nodes.append(self.ctx.node("Shape", [self.x], [out]))
        return out

    def mean_scale(self) -> str:
        """1 / (the count of values each output averages): Size(Y) / Size(X) at run time."""
        ctx, t = self.ctx, {k: self.ctx.tmp(k) for k in ("x_size", "y_size", "nx", "ny")}
        ratio = ctx.tmp("ratio")
        self.nodes += [ctx.node("Size", [self.x], [t["x_size"]]),
                       ctx.node("Size", [ctx.O(0)], [t["y_size"]]),
                       ctx.node("Cast", [t["x_size"]], [t["nx"]], to=elem_type(self.dtype)),
                       ctx.node("Cast", [t["y_size"]], [t["ny"]], to=elem_type(self.dtype)),
                       ctx.node("Div", [t["ny"], t["nx"]], [ratio])]
        return ratio

    def dy(self) -> str:
        return self.keep(self.ctx.GO(0))

    def y(self) -> str:
        return self.keep(self.ctx.O(0))

    def wide(self, name: str) -> str:
        """A keepdims-shaped tensor ready for a binary op with X: NumPy broadcasting from
        opset 7; before it, expanded to X's shape."""
        if self.ctx.opset >= 7 or self.kept == self.x_shape:
            return name
        out = self.ctx.tmp("wide")
        self.nodes.append(self.ctx.expand(name, self.x_shape, out, self.dtype))
        return out

    def expand(self, name: str, out: str) -> list:
        """A keepdims-shaped tensor broadcast to X's shape, into `out`."""
        if self.sized:
            dims = self.x_dims()
            return self.nodes + [self.ctx.node("Expand", [name, dims], [out])]
        if self.kept == self.x_shape:
            return self.nodes + [self.ctx.node("Identity", [name], [out])]
        return self.nodes + [self.ctx.expand(name, self.x_shape, out, self.dtype)]

    def sum(self, name: str, out: str):
        """ReduceSum over the reduced axes, keeping dims (Identity when none)."""
        if not self.axes:
            return self.ctx.node("Identity", [name], [out])
        return self.ctx.reduce("ReduceSum", name, self.axes, out, keepdims=1)

    def scalar(self, value: float) -> str:
        return self.ctx.const(value, self.dtype, "c")


@grad("ReduceSum", inputs=(0,))
def reduce_sum_grad(ctx):
    # dX = broadcast(dY)
    r = _Reduction(ctx)
    return r.expand(r.dy(), ctx.GI(0))


@grad("ReduceMean", inputs=(0,))
def reduce_mean_grad(ctx):
    # dX = broadcast(dY / n)
    r = _Reduction(ctx)
    dy = r.dy()
    if r.sized and r.axes:  # (how many values each mean takes follows the data)
        s = ctx.tmp("scaled")
        r.nodes.append(ctx.node("Mul", [dy, r.mean_scale()], [s]))
        return r.expand(s, ctx.GI(0))
    if r.count == 1:
        return r.expand(dy, ctx.GI(0))
    s = ctx.tmp("scaled")
    r.nodes.append(binop(ctx, "Mul", dy, r.scalar(1.0 / max(r.count, 1)), s))
    return r.expand(s, ctx.GI(0))


@grad("ReduceSumSquare", inputs=(0,))
def reduce_sum_square_grad(ctx):
    # dX = 2 X broadcast(dY)
    r = _Reduction(ctx)
    s = ctx.tmp("twice")
    r.nodes.append(binop(ctx, "Mul", r.dy(), r.scalar(2.0), s))
    return r.nodes + [ctx.node("Mul", [r.x, r.wide(s)], [ctx.GI(0)])]


@grad("ReduceL1", inputs=(0,))
def reduce_l1_grad(ctx):
    # dX = sign(X) broadcast(dY) (0 at X = 0, as torch)
    r = _Reduction(ctx)
    s, dy = ctx.tmp("sign"), r.dy()
    dy = r.wide(dy)
    return r.nodes + sign(ctx, r.x, s) + [ctx.node("Mul", [s, dy], [ctx.GI(0)])]


@grad("ReduceL2", inputs=(0,))
def reduce_l2_grad(ctx):
    # dX = X broadcast(dY / Y), 0 where Y == 0 (as torch's norm)
    r = _Reduction(ctx)
    y, dy = r.y(), r.dy()
    pos, den, q = ctx.tmp("pos"), ctx.tmp("den"), ctx.tmp("ratio")
    # Y == 0 only when its X are all 0: dividing by 1 there keeps X * ratio == 0.
    r.nodes += [binop(ctx, "Greater", y, r.scalar(0.0), pos),
                *where(ctx, pos, y, r.scalar(1.0), den, r.x),
                ctx.node("Div", [dy, den], [q])]
    return r.nodes + [ctx.node("Mul", [r.x, r.wide(q)], [ctx.GI(0)])]


@grad("ReduceLogSum", inputs=(0,))
def reduce_log_sum_grad(ctx):
    # dX = broadcast(dY / exp(Y)) (exp(Y) is the sum)
    r = _Reduction(ctx)
    e, q = ctx.tmp("sum"), ctx.tmp("ratio")
    r.nodes += [ctx.node("Exp", [r.y()], [e]), ctx.node("Div", [r.dy(), e], [q])]
    return r.expand(q, ctx.GI(0))


@grad("ReduceLogSumExp", inputs=(0,))
def reduce_log_sum_exp_grad(ctx):
    # dX = broadcast(dY) * exp(X - Y) (softmax over the reduced axes)
    r = _Reduction(ctx)
    d, e = ctx.tmp("diff"), ctx.tmp("softmax")
    y, dy = r.wide(r.y()), r.wide(r.dy())
    return r.nodes + [binop(ctx, "Sub", r.x, y, d), ctx.node("Exp", [d], [e]),
                      ctx.node("Mul", [e, dy], [ctx.GI(0)])]


def _extreme_grad(ctx, largest: bool):
    # dX = broadcast(dY) * [X == Y] / #{X == Y}: ties split evenly (as torch.amax / amin)
    r = _Reduction(ctx)
    if not r.axes:
        return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]
    eq, m, cnt, share = ctx.tmp("eq"), ctx.tmp("mask"), ctx.tmp("count"), ctx.tmp("share")
    y, dy = r.wide(r.y()), r.dy()
    r.nodes += [*equal_extreme(ctx, r.x, y, eq, largest), cast(ctx, eq, m, r.dtype),
                r.sum(m, cnt), ctx.node("Div", [dy, cnt], [share])]
    return r.nodes + [ctx.node("Mul", [m, r.wide(share)], [ctx.GI(0)])]


@grad("ReduceMax", inputs=(0,))
def reduce_max_grad(ctx):
    return _extreme_grad(ctx, True)


@grad("ReduceMin", inputs=(0,))
def reduce_min_grad(ctx):
    return _extreme_grad(ctx, False)


@grad("ReduceProd", inputs=(0,))
def reduce_prod_grad(ctx):
    # dX_i = dY * prod_{j != i} X_j, safe with zeros: with z zeros in the slice, P the product
    # of its nonzero values and X' = X with zeros read as 1, dX_i = dY P / X'_i where the
    # slice has no zero other than X_i, else 0 (torch computes the same prod_{j != i}).
    r = _Reduction(ctx)
    if not r.axes:
        return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]
    x, dy = r.x, r.dy()
    isz, zf, z, xs, p, q, g, others, ok = (ctx.tmp(s) for s in (
        "is_zero", "zero_f", "zeros", "x_safe", "prod", "q", "g", "others", "ok"))
    r.nodes += [*is_zero(ctx, x, isz, r.dtype), cast(ctx, isz, zf, r.dtype), r.sum(zf, z),
                ctx.node("Add", [x, zf], [xs]),
                ctx.reduce("ReduceProd", xs, r.axes, p, keepdims=1)]
    p, z, dy = r.wide(p), r.wide(z), r.wide(dy)
    return r.nodes + [
        ctx.node("Div", [p, xs], [q]), ctx.node("Mul", [q, dy], [g]),
        ctx.node("Sub", [z, zf], [others]),  # zeros in the slice besides X_i
        binop(ctx, "Less", others, r.scalar(0.5), ok),
        *where(ctx, ok, g, None, ctx.GI(0), x)]


# -- scans --------------------------------------------------------------------------------------
@grad("CumSum", inputs=(0,))
def cumsum_grad(ctx):
    # dX = cumsum of dY in the opposite direction, same exclusive flag
    return [ctx.node("CumSum", [ctx.GO(0), ctx.I(1)], [ctx.GI(0)],
                     exclusive=ctx.attr("exclusive", 0), reverse=1 - ctx.attr("reverse", 0))]


@grad("CumProd", inputs=(0,))
def cumprod_grad(ctx):
    # dX_j = sum_{i scanned after j} dY_i prod_{k in scan(i), k != j} X_k. With no zero scanned
    # before X_j: X_j != 0 gives rcumsum(dY * Y)_j / X_j; X_j = 0 (the first zero) gives
    # rcumsum(dY * Y')_j, Y' = cumprod of X with that zero read as 1. After it: 0.
    x, axis, dy, y = ctx.I(0), ctx.I(1), ctx.GO(0), ctx.O(0)
    excl, rev = ctx.attr("exclusive", 0), ctx.attr("reverse", 0)
    dt = ctx.dtype(x)
    isz, zf, before, ok, first, xs, ys, p, a, den, ax, ps, b, nz = (ctx.tmp(s) for s in (
        "is_zero", "zero_f", "zeros_before", "ok", "first_zero", "x_first_one", "y_first_one",
        "dy_y", "a", "den", "a_x", "dy_ys", "b", "inner"))
    return [*is_zero(ctx, x, isz, dt), cast(ctx, isz, zf, dt),
            ctx.node("CumSum", [zf, axis], [before], exclusive=1, reverse=rev),
            ctx.node("Less", [before, ctx.scalar(0.5)], [ok]),
            *where(ctx, ok, zf, None, first, x),  # 1 at the first zero of each line
            ctx.node("Add", [x, first], [xs]),
            ctx.node("CumProd", [xs, axis], [ys], exclusive=excl, reverse=rev),
            ctx.node("Mul", [dy, y], [p]),
            ctx.node("CumSum", [p, axis], [a], exclusive=excl, reverse=1 - rev),
            ctx.node("Add", [x, zf], [den]),  # no 0 / 0 at the later zeros
            ctx.node("Div", [a, den], [ax]), ctx.node("Mul", [dy, ys], [ps]),
            ctx.node("CumSum", [ps, axis], [b], exclusive=excl, reverse=1 - rev),
            ctx.node("Where", [isz, b, ax], [nz]),
            ctx.node("Where", [ok, nz, ctx.scalar(0.0)], [ctx.GI(0)])]


# -- softmax family -----------------------------------------------------------------------------
def _softmax_axes(ctx):
    rank = len(ctx.shape(ctx.I(0)))
    return softmax_axes(rank, ctx.attr("axis", -1 if ctx.opset >= 13 else 1), ctx.opset)


def _wide_to(ctx, name: str, like: str) -> tuple[list, str]:
    """Before opset 7, a keepdims-shaped `name` expanded to `like`'s shape."""
    if ctx.opset >= 7:
        return [], name
    out = ctx.tmp("wide")
    return [ctx.expand(name, ctx.shape(like), out, ctx.dtype(like))], out


@grad("Softmax")
def softmax_grad(ctx):
    # dX = Y * (dY - sum(dY * Y, axis)); before opset 13 over all axes from `axis` on.
    # A row of -inf (a fully masked attention row) has Y = NaN, which a later Where usually
    # replaces (the "safe softmax" of ONNX's Attention function body): its dY is then 0 and
    # its dX is taken as 0 (Y read as 0 where NaN), instead of NaN poisoning every gradient.
    y = ctx.O(0)
    guard = []
    if ctx.opset >= 9 and is_float_dtype(ctx.dtype(y)):
        nan, y = ctx.tmp("nan"), ctx.tmp("y_safe")
        guard = [ctx.node("IsNaN", [ctx.O(0)], [nan]),
                 ctx.node("Where", [nan, ctx.scalar(0.0, ctx.O(0)), ctx.O(0)], [y])]
    p, s, d = ctx.tmp("prod"), ctx.tmp("sum"), ctx.tmp("diff")
    nodes, s_wide = _wide_to(ctx, s, y)
    return [*guard, ctx.node("Mul", [ctx.GO(0), y], [p]),
            ctx.reduce("ReduceSum", p, _softmax_axes(ctx), s, keepdims=1), *nodes,
            ctx.node("Sub", [ctx.GO(0), s_wide], [d]),
            ctx.node("Mul", [y, d], [ctx.GI(0)])]


@grad("LogSoftmax")
def log_softmax_grad(ctx):
    # dX = dY - exp(Y) * sum(dY, axis); before opset 13 over all axes from `axis` on
    e, s, t = ctx.tmp("exp"), ctx.tmp("sum"), ctx.tmp("t")
    nodes, s_wide = _wide_to(ctx, s, ctx.O(0))
    return [ctx.node("Exp", [ctx.O(0)], [e]),
            ctx.reduce("ReduceSum", ctx.GO(0), _softmax_axes(ctx), s, keepdims=1), *nodes,
            ctx.node("Mul", [e, s_wide], [t]),
            ctx.node("Sub", [ctx.GO(0), t], [ctx.GI(0)])]
