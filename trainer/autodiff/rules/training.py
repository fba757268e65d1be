"""Gradients of the ai.onnx.preview.training optimizer ops (Adagrad, Adam, Momentum).

One update step is a smooth function of the learning rate R, the tensors X, their gradients G
and the accumulators (V, H); T, the step count, is an integer. Differentiating through a step is
what meta-learning and hyper-gradient methods do, so each rule recomputes the step as standard
ops (subgraph.Region, as the control-flow rules do) and differentiates that.
"""

from __future__ import annotations

import numpy as np

from trainer.autodiff.registry import grad
from trainer.autodiff.subgraph import Region
from trainer.graph import elem_type

TRAINING = "ai.onnx.preview.training"
_SLOTS = (0, *range(2, 1 << 12))  # R and every tensor input; T (slot 1) is an integer


class _Step:
    """Builds one optimizer step as plain nodes inside a Region."""

    def __init__(self, ctx, roles: int):
        self.ctx, self.r = ctx, Region(ctx)
        self.k = (len(ctx.onnx_node.input) - 2) // roles
        self.t = self.r.input(1)
        self.dtypes: dict[str, np.dtype] = {}  # region alias -> the outer tensor's dtype

    def op(self, op: str, *inputs: str, **attrs) -> str:
        out = self.ctx.tmp(op)
        self.r.nodes.append(self.ctx.node(op, list(inputs), [out], **attrs))
        return out

    def const(self, value, like: str) -> str:
        return self.ctx.const(np.asarray(value, self.dtypes[like]), suffix="c")

    def tensor(self, role: int, i: int) -> str:
        slot = 2 + role * self.k + i
        alias = self.r.input(slot)
        self.dtypes[alias] = self.ctx.dtype(self.ctx.I(slot))
        return alias

    def like(self, name: str, x: str) -> str:
        """name (R or the step count) cast to x's dtype."""
        return self.op("Cast", name, to=elem_type(self.dtypes[x]))

    def started(self, x: str, value, otherwise) -> str:
        """`value` where T > 0, `otherwise` at T == 0 (x's dtype)."""
        positive = self.op("Greater", self.t, self.ctx.const(np.asarray(0, np.int64),
                                                             suffix="zero"))
        return self.op("Where", positive, value, otherwise)

    def regularized(self, x: str, g: str) -> str:
        coef = self.ctx.attr("norm_coefficient", 0.0)
        return self.op("Add", self.op("Mul", self.const(coef, x), x), g)

    def emit(self, outputs: list[str]) -> list:
        return self.r.emit(outputs)


@grad("Adagrad", domain=TRAINING, inputs=_SLOTS)
def adagrad_grad(ctx):
    # r = R / (1 + T decay); g = c X + G; H' = H + g^2; X' = X - r g / (sqrt(H') + eps)
    s = _Step(ctx, 3)
    xs, hs = [], []
    for i in range(s.k):
        x, g, h = (s.tensor(role, i) for role in range(3))
        t = s.op("Mul", s.like(s.t, x), s.const(ctx.attr("decay_factor", 0.0), x))
        lr = s.op("Div", s.like(s.r.input(0), x), s.op("Add", s.const(1.0, x), t))
        g = s.regularized(x, g)
        h_new = s.op("Add", h, s.op("Mul", g, g))
        den = s.op("Add", s.op("Sqrt", h_new), s.const(ctx.attr("epsilon", 1e-6), x))
        xs.append(s.op("Sub", x, s.op("Div", s.op("Mul", lr, g), den)))
        hs.append(h_new)
    return s.emit(xs + hs)


@grad("Adam", domain=TRAINING, inputs=_SLOTS)
def adam_grad(ctx):
    # g = c X + G; V' = a V + (1-a) g; H' = b H + (1-b) g^2;
    # r = R sqrt(1 - b^T) / (1 - a^T) when T > 0 (else R);
    # X' = (1 - c_post) (X - r V' / (sqrt(H') + eps))
    s = _Step(ctx, 4)
    a, b = ctx.attr("alpha", 0.9), ctx.attr("beta", 0.999)
    post = ctx.attr("norm_coefficient_post", 0.0)
    xs, vs, hs = [], [], []
    for i in range(s.k):
        x, g, v, h = (s.tensor(role, i) for role in range(4))
        steps = s.op("Max", s.like(s.t, x), s.const(1.0, x))  # (T == 0: 0/0 not computed)
        corr = s.op("Div", s.op("Sqrt", s.op("Sub", s.const(1.0, x),
                                             s.op("Pow", s.const(b, x), steps))),
                    s.op("Sub", s.const(1.0, x), s.op("Pow", s.const(a, x), steps)))
        lr = s.op("Mul", s.like(s.r.input(0), x), s.started(x, corr, s.const(1.0, x)))
        g = s.regularized(x, g)
        v_new = s.op("Add", s.op("Mul", s.const(a, x), v), s.op("Mul", s.const(1 - a, x), g))
        h_new = s.op("Add", s.op("Mul", s.const(b, x), h),
                     s.op("Mul", s.const(1 - b, x), s.op("Mul", g, g)))
        den = s.op("Add", s.op("Sqrt", h_new), s.const(ctx.attr("epsilon", 1e-6), x))
        x_new = s.op("Sub", x, s.op("Div", s.op("Mul", lr, v_new), den))
        xs.append(s.op("Mul", s.const(1 - post, x), x_new))
        vs.append(v_new)
        hs.append(h_new)
    return s.emit(xs + vs + hs)


@grad("Momentum", domain=TRAINING, inputs=_SLOTS)
def momentum_grad(ctx):
    # g = c X + G; V' = a V + b_T g (b_T = beta, or 1 at T == 0);
    # X' = X - R V' (standard) or X - R (g + a V') (nesterov)
    s = _Step(ctx, 3)
    a, mode = ctx.attr("alpha"), ctx.attr("mode")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    xs, vs = [], []
    for i in range(s.k):
        x, g, v = (s.tensor(role, i) for role in range(3))
        beta = s.started(x, s.const(ctx.attr("beta"), x), s.const(1.0, x))
        g = s.regularized(x, g)
        v_new = s.op("Add", s.op("Mul", s.const(a, x), v), s.op("Mul", beta, g))
        step = s.op("Add", g, s.op("Mul", s.const(a, x), v_new)) if mode == "nesterov" \
            else v_new
        xs.append(s.op("Sub", x, s.op("Mul", s.like(s.r.input(0), x), step)))
        vs.append(v_new)
    return s.emit(xs + vs)
