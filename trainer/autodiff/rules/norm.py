"""Gradient rules for Layer/Group/Instance/RMS normalization, MeanVarianceNormalization and
LpNormalization. Statistics are recomputed in the input's dtype (or read from the node's own
Mean/InvStdDev outputs when they have it); dX is one fused expression per op.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from trainer.autodiff.registry import grad
from trainer.graph import elem_type


class Emit:
    """Collects the nodes of a rule; each call emits one single-output node, returns its name."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.nodes = []

    def __call__(self, op: str, *inputs: str, out: str | None = None, name: str = "t",
                 **attrs) -> str:
        out = out or self.ctx.tmp(name)
        self.nodes.append(self.ctx.node(op, list(inputs), [out], **attrs))
        return out

    def add(self, *nodes) -> None:
        self.nodes.extend(nodes)

    def reduce(self, op: str, x: str, axes, keepdims: int = 1, out: str | None = None,
               name: str = "red") -> str:
        out = out or self.ctx.tmp(name)
        self.nodes.append(self.ctx.reduce(op, x, axes, out, keepdims=keepdims))
        return out

    def reshape(self, x: str, shape, out: str | None = None, name: str = "rs") -> str:
        out = out or self.ctx.tmp(name)
        self.nodes.append(self.ctx.reshape(x, shape, out))
        return out

    def sum_to(self, x: str, shape_from, shape_to, out: str) -> str:
        self.nodes.extend(self.ctx.sum_to(x, shape_from, shape_to, out))
        return out

    def cast(self, x: str, dtype, name: str = "cast") -> str:
        return self("Cast", x, name=name, to=elem_type(dtype))

    def zero_fill(self) -> list:
        """The nodes, plus zeros for every wanted input gradient no term reached."""
        ctx = self.ctx
        made = {o for n in self.nodes for o in n.output}
        for i in range(len(ctx.onnx_node.input)):
            if ctx.needs(i) and ctx.GI(i) not in made:
                self.fill(ctx.shape(ctx.I(i)), 0.0, ctx.dtype(ctx.I(i)))
                self.nodes[-1].output[0] = ctx.GI(i)
        return self.nodes

    def fill(self, shape, value: float, dtype, name: str = "fill") -> str:
        """A tensor of a static shape filled with `value` (ConstantOfShape: nothing stored)."""
        return self("ConstantOfShape", self.ctx.const(list(shape), np.int64, "shape"), name=name,
                    value=numpy_helper.from_array(np.array([value], dtype)))

    def k(self, value, like: str | None = None, dtype=None) -> str:
        """A scalar constant of `dtype`, or with the dtype of `like` (default: the node's
        first input)."""
        if dtype is not None:
            return self.ctx.const(value, dtype, "c")
        return self.ctx.scalar(value, like)

    def chain(self, op: str, names: list[str], out: str | None = None) -> str:
        """names[0] op names[1] op ...; a single name is copied into `out` (if given)."""
        acc = names[0]
        for i, n in enumerate(names[1:]):
            acc = self(op, acc, n, out=out if i == len(names) - 2 else None)
        if len(names) == 1 and out:
            acc = self("Identity", acc, out=out)
        return acc


def _inv_std(e: Emit, var: str, eps: float, dtype=None) -> str:
    return e("Reciprocal", e("Sqrt", e("Add", var, e.k(eps, dtype=dtype))))


def standardized(e: Emit, x: str, axes, eps: float, dtype=None) -> tuple[str, str]:
    """(xhat, inv) of x over axes (keepdims): xhat = (x - mean) * inv, inv = (var + eps)^-1/2
    (x of `dtype`; default: the node's first input's)."""
    xc = e("Sub", x, e.reduce("ReduceMean", x, axes), name="xc")
    inv = _inv_std(e, e.reduce("ReduceMean", e("Mul", xc, xc), axes), eps, dtype)
    return e("Mul", xc, inv, name="xhat"), inv


def standardize_grad(e: Emit, g: str | None, xhat: str, inv: str, axes, n: int, out: str,
                     d_mean: str | None = None, d_inv: str | None = None,
                     full_shape=None, dtype=None) -> None:
    """dX of xhat = (x - mean) * inv given g = dL/dxhat (plus dL/dmean, dL/dinv if any), in
    `dtype` (default: the node's first input's):
    dX = g*inv - (inv*mean(g) - dMean/n) - xhat*(inv*mean(g*xhat) + dInv*inv^2/n)."""
    c, d = [], []
    if g is not None:
        c.append(e("Mul", e.reduce("ReduceMean", g, axes), inv))
        d.append(e("Mul", e.reduce("ReduceMean", e("Mul", g, xhat), axes), inv))
    if d_mean is not None:
        c.append(e("Neg", e("Mul", d_mean, e.k(1.0 / n, dtype=dtype))))
    if d_inv is not None:
        d.append(e("Mul", e("Mul", d_inv, e("Mul", inv, inv)), e.k(1.0 / n, dtype=dtype)))
    terms = [e("Mul", g, inv)] if g is not None else []
    if d:
        terms.append(e("Neg", e("Mul", xhat, e.chain("Add", d))))
    if c:
        terms.append(e("Neg", e.chain("Add", c)))
    if g is None and not d:  # only dMean: broadcast it to the input's shape
        terms[0] = e("Expand", terms[0], e.ctx.const(list(full_shape), np.int64, "shape"))
    e.chain("Add", terms, out=out)


def _norm_axes(ctx) -> tuple[list[int], int]:
    shape = ctx.shape(ctx.I(0))
    axis = ctx.attr("axis", -1) % len(shape)
    return list(range(axis, len(shape))), int(np.prod(shape[axis:]))


def _affine_grads(ctx, e: Emit, xhat: str, scale: int, bias: int | None) -> str | None:
    """dScale = sum_to(dY * xhat), dB = sum_to(dY); returns g = dY * Scale (None without dY)."""
    dy = ctx.GO(0)
    if dy is None:
        return None
    y_shape = ctx.shape(ctx.O(0))
    if ctx.needs(scale):
        e.sum_to(e("Mul", dy, xhat), y_shape, ctx.shape(ctx.I(scale)), ctx.GI(scale))
    if bias is not None and ctx.needs(bias):
        e.sum_to(dy, y_shape, ctx.shape(ctx.I(bias)), ctx.GI(bias))
    return e("Mul", dy, ctx.I(scale), name="g") if ctx.needs(0) else None


@grad("LayerNormalization")
def layer_norm_grad(ctx):
    # Y = xhat * S + B over axes >= axis; dX = standardize_grad(g = dY * S, dMean, dInvStdDev),
    # dS = sum_to(dY * xhat), dB = sum_to(dY). Mean/InvStdDev are reused when in X's dtype.
    e, x = Emit(ctx), ctx.I(0)
    dt = ctx.dtype(x)
    axes, n = _norm_axes(ctx)
    outs = list(ctx.onnx_node.output) + ["", ""]
    if np.dtype(dt).itemsize == 2:
        return _layer_norm_grad_wide(ctx, e, dt, axes, n, outs)
    if outs[1] and outs[2] and ctx.dtype(outs[1]) == dt and ctx.dtype(outs[2]) == dt:
        inv = outs[2]
        xhat = e("Mul", e("Sub", x, outs[1]), inv, name="xhat")
    else:
        xhat, inv = standardized(e, x, axes, ctx.attr("epsilon", 1e-5))
    g = _affine_grads(ctx, e, xhat, 1, 2)
    if ctx.needs(0):
        d_stats = [ctx.GO(i) for i in (1, 2)]
        stash = [ctx.dtype(outs[i + 1]) for i, s in enumerate(d_stats) if s is not None]
        if stash and np.dtype(stash[0]).itemsize > np.dtype(dt).itemsize:
            # (gradients through Mean/InvStdDev in their stash type, float32 for a 16-bit X:
            # dInvStdDev * inv^2 of a small variance is past float16's range; dX rounded once)
            sx, sinv = standardized(e, e.cast(x, stash[0]), axes, ctx.attr("epsilon", 1e-5),
                                    stash[0])
            d_stats = [s if s is None or ctx.dtype(outs[i + 1]) == stash[0]
                       else e.cast(s, stash[0]) for i, s in enumerate(d_stats)]
            dx = ctx.tmp("dx_stash")
            standardize_grad(e, None if g is None else e.cast(g, stash[0]), sx, sinv, axes, n,
                             dx, *d_stats, full_shape=ctx.shape(x), dtype=stash[0])
            e("Cast", dx, out=ctx.GI(0), to=elem_type(dt))
            return e.zero_fill()
        d_stats = [s if s is None or ctx.dtype(outs[i + 1]) == dt else e.cast(s, dt)
                   for i, s in enumerate(d_stats)]
        standardize_grad(e, g, xhat, inv, axes, n, ctx.GI(0), *d_stats,
                         full_shape=ctx.shape(x))
    return e.zero_fill()  # Scale and B get zeros when only Mean/InvStdDev carry gradients


def _layer_norm_grad_wide(ctx, e: Emit, dt, axes, n: int, outs: list[str]) -> list:
    """LayerNormalization's gradients for a 16-bit X, taken in its stash type (float32, or
    float64 for stash_type 11), as the forward computes, each rounded to its input's type
    once: in float16, xhat of a row whose variance is near float16's spacing lost its digits
    (dScale 10-40% off), and dInvStdDev * inv^2 overflowed."""
    wide = np.dtype(np.float64) if ctx.attr("stash_type", 1) == 11 else np.dtype(np.float32)
    xhat, inv = standardized(e, e.cast(ctx.I(0), wide), axes, ctx.attr("epsilon", 1e-5), wide)
    dy, g = ctx.GO(0), None
    if dy is not None:
        dyw, y_shape = e.cast(dy, wide), ctx.shape(ctx.O(0))
        for i, term in ((1, e("Mul", dyw, xhat)), (2, dyw)):
            if ctx.needs(i):
                t = e.sum_to(term, y_shape, ctx.shape(ctx.I(i)), ctx.tmp("wide_grad"))
                e("Cast", t, out=ctx.GI(i), to=elem_type(ctx.dtype(ctx.I(i))))
        if ctx.needs(0):
            g = e("Mul", dyw, e.cast(ctx.I(1), wide), name="g")
    d_stats = [ctx.GO(i) for i in (1, 2)]
    if ctx.needs(0) and (g is not None or any(s is not None for s in d_stats)):
        d_stats = [s if s is None or ctx.dtype(outs[i + 1]) == wide else e.cast(s, wide)
                   for i, s in enumerate(d_stats)]
        dx = ctx.tmp("dx_wide")
        standardize_grad(e, g, xhat, inv, axes, n, dx, *d_stats, full_shape=ctx.shape(ctx.I(0)),
                         dtype=wide)
        e("Cast", dx, out=ctx.GI(0), to=elem_type(dt))
    return e.zero_fill()


@grad("RMSNormalization")
def rms_norm_grad(ctx):
    # Y = xhat * S, xhat = X * inv, inv = (mean(X^2) + eps)^-1/2:
    # dX = g*inv - xhat * (inv * mean(g * xhat)) with g = dY * S; dS = sum_to(dY * xhat)
    e, x = Emit(ctx), ctx.I(0)
    axes, _ = _norm_axes(ctx)
    inv = _inv_std(e, e.reduce("ReduceMean", e("Mul", x, x), axes), ctx.attr("epsilon", 1e-5))
    xhat = e("Mul", x, inv, name="xhat")
    g = _affine_grads(ctx, e, xhat, 1, None)
    if g is not None:
        m = e("Mul", e.reduce("ReduceMean", e("Mul", g, xhat), axes), inv)
        e("Sub", e("Mul", g, inv), e("Mul", xhat, m), out=ctx.GI(0))
    return e.nodes


@grad("GroupNormalization")
def group_norm_grad(ctx):
    # Standardize X viewed as [N, G, M]; Scale/B are per channel from opset 21, per group
    # before: dS = sum(dY * xhat), dB = sum(dY) over N and M; dX = standardize_grad(dY * S)
    e, x, dy = Emit(ctx), ctx.I(0), ctx.GO(0)
    shape = ctx.shape(x)
    n, c, groups = shape[0], shape[1], ctx.attr("num_groups")
    m = int(np.prod(shape[1:])) // groups
    xhat, inv = standardized(e, e.reshape(x, [n, groups, m]), [2],
                             ctx.attr("epsilon", 1e-5))
    per = c if ctx.opset >= 21 else groups  # rows that share one scale/bias value
    view = [n, per, -1]
    dyv, xv = e.reshape(dy, view), (e.reshape(xhat, view) if per != groups else xhat)
    if ctx.needs(1):
        e.reduce("ReduceSum", e("Mul", dyv, xv), [0, 2], keepdims=0, out=ctx.GI(1))
    if ctx.needs(2):
        e.reduce("ReduceSum", dyv, [0, 2], keepdims=0, out=ctx.GI(2))
    if ctx.needs(0):
        g = e("Mul", dyv, e.reshape(ctx.I(1), [per, 1]), name="g")
        if per != groups:
            g = e.reshape(g, [n, groups, m])
        dx = ctx.tmp("dx")
        standardize_grad(e, g, xhat, inv, [2], m, dx)
        e.reshape(dx, shape, out=ctx.GI(0))
    return e.nodes


@grad("InstanceNormalization")
def instance_norm_grad(ctx):
    # Standardize over spatial axes per (n, c): dS = sum(dY * xhat), dB = sum(dY) over N and
    # spatial; dX = standardize_grad(dY * S)
    e, x, dy = Emit(ctx), ctx.I(0), ctx.GO(0)
    shape = ctx.shape(x)
    spatial = list(range(2, len(shape)))
    xhat, inv = standardized(e, x, spatial, ctx.attr("epsilon", 1e-5))
    if ctx.needs(1):
        e.reduce("ReduceSum", e("Mul", dy, xhat), [0] + spatial, keepdims=0, out=ctx.GI(1))
    if ctx.needs(2):
        e.reduce("ReduceSum", dy, [0] + spatial, keepdims=0, out=ctx.GI(2))
    if ctx.needs(0):
        g = e("Mul", dy, e.reshape(ctx.I(1), [-1] + [1] * len(spatial)), name="g")
        standardize_grad(e, g, xhat, inv, spatial, int(np.prod(shape[2:])), ctx.GI(0))
    return e.nodes


@grad("MeanVarianceNormalization")
def mvn_grad(ctx):
    # Y = (X - mean) / s, s = std + 1e-9: dX = (dY - mean(dY) - Y * mean(dY * Y) * s / std) / s
    # (a constant slice, std = 0, gets dX = (dY - mean(dY)) / s)
    e, x, y, dy = Emit(ctx), ctx.I(0), ctx.O(0), ctx.GO(0)
    rank = len(ctx.shape(x))
    axes = sorted(int(a) % rank for a in ctx.attr("axes", [0, 2, 3]))
    xc = e("Sub", x, e.reduce("ReduceMean", x, axes), name="xc")
    std = e("Sqrt", e.reduce("ReduceMean", e("Mul", xc, xc), axes), name="std")
    s = e("Add", std, e.k(1e-9))
    tiny = e.k(float(np.finfo(ctx.dtype(x)).tiny))
    k = e("Mul", e.reduce("ReduceMean", e("Mul", dy, y), axes), e("Div", s, e("Max", std, tiny)))
    t = e("Sub", e("Sub", dy, e.reduce("ReduceMean", dy, axes)), e("Mul", y, k))
    e("Div", t, s, out=ctx.GI(0))
    return e.nodes


@grad("LpNormalization")
def lp_norm_grad(ctx):
    # p = 2: dX = (dY - Y * sum(dY * Y)) / |X|_2;  p = 1: dX = (dY - sign(X) * sum(dY * Y)) / |X|_1
    # (an all-zero slice, divided by 1 in the forward, gets dX = dY)
    e, x, y, dy = Emit(ctx), ctx.I(0), ctx.O(0), ctx.GO(0)
    axis = [ctx.attr("axis", -1) % len(ctx.shape(x))]
    if ctx.attr("p", 2) == 1:
        from trainer.autodiff.rules.elementwise import sign  # (Sign from opset 9)

        norm, direction = e.reduce("ReduceSum", e("Abs", x), axis), ctx.tmp("sign")
        e.add(*sign(ctx, x, direction))
    else:
        norm, direction = e("Sqrt", e.reduce("ReduceSum", e("Mul", x, x), axis)), y
    # norm + (norm == 0), with ops valid at every opset
    is_zero = e("Not", e("Cast", norm, to=onnx.TensorProto.BOOL))
    norm = e("Add", norm, e.cast(is_zero, ctx.dtype(x)))
    t = e("Sub", dy, e("Mul", direction, e.reduce("ReduceSum", e("Mul", dy, y), axis)))
    e("Div", t, norm, out=ctx.GI(0))
    return e.nodes
