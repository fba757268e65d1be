"""Gradient rules for elementwise ops (broadcasting undone by ctx.to_input)."""

from __future__ import annotations

from trainer.autodiff.registry import grad
from trainer.graph import elem_type


@grad("Add")
def add_grad(ctx):
    # dA = dY, dB = dY (summed to each input's shape)
    return [n for i in (0, 1) if ctx.needs(i) for n in ctx.to_input(ctx.GO(0), i)]


@grad("Sub")
def sub_grad(ctx):
    # dA = dY, dB = -dY
    nodes = ctx.to_input(ctx.GO(0), 0) if ctx.needs(0) else []
    if ctx.needs(1):
        neg = ctx.tmp("neg")
        nodes += [ctx.node("Neg", [ctx.GO(0)], [neg]), *ctx.to_input(neg, 1)]
    return nodes


@grad("Mul")
def mul_grad(ctx):
    # dA = dY * B, dB = dY * A
    nodes = []
    for i in (0, 1):
        if ctx.needs(i):
            t = ctx.tmp(f"d{i}")
            nodes += [ctx.node("Mul", [ctx.GO(0), ctx.I(1 - i)], [t]), *ctx.to_input(t, i)]
    return nodes


@grad("Div")
def div_grad(ctx):
    # dA = dY / B, dB = -dY * Y / B
    nodes = []
    if ctx.needs(0):
        t = ctx.tmp("da")
        nodes += [ctx.node("Div", [ctx.GO(0), ctx.I(1)], [t]), *ctx.to_input(t, 0)]
    if ctx.needs(1):
        t1, t2, t3 = ctx.tmp("gy"), ctx.tmp("gyb"), ctx.tmp("db")
        nodes += [ctx.node("Mul", [ctx.GO(0), ctx.O(0)], [t1]),
                  ctx.node("Div", [t1, ctx.I(1)], [t2]),
                  ctx.node("Neg", [t2], [t3]), *ctx.to_input(t3, 1)]
    return nodes


@grad("Pow")
def pow_grad(ctx):
    # dA = dY * B * A^(B-1), dB = dY * Y * log(A)
    nodes = []
    if ctx.needs(0):
        bm1, p, t, d = ctx.tmp("bm1"), ctx.tmp("pow"), ctx.tmp("t"), ctx.tmp("da")
        exp_b = ctx.I(1)
        if ctx.dtype(exp_b) != ctx.dtype(ctx.I(0)):
            exp_b = ctx.tmp("b")
            nodes.append(ctx.node("Cast", [ctx.I(1)], [exp_b], to=elem_type(ctx.dtype(ctx.I(0)))))
        nodes += [ctx.node("Sub", [exp_b, ctx.scalar(1.0)], [bm1]),
                  ctx.node("Pow", [ctx.I(0), bm1], [p]),
                  ctx.node("Mul", [p, exp_b], [t]),
                  ctx.node("Mul", [ctx.GO(0), t], [d]), *ctx.to_input(d, 0)]
    if ctx.needs(1):
        lg, t, d = ctx.tmp("log"), ctx.tmp("t"), ctx.tmp("db")
        nodes += [ctx.node("Log", [ctx.I(0)], [lg]), ctx.node("Mul", [ctx.O(0), lg], [t]),
                  ctx.node("Mul", [ctx.GO(0), t], [d]), *ctx.to_input(d, 1)]
    return nodes


@grad("Neg")
def neg_grad(ctx):
    # dX = -dY
    return [ctx.node("Neg", [ctx.GO(0)], [ctx.GI(0)])]


@grad("Identity")
def identity_grad(ctx):
    # dX = dY
    return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]


@grad("Relu")
def relu_grad(ctx):
    # dX = dY where Y > 0 else 0
    pos, zero = ctx.tmp("pos"), ctx.scalar(0.0, ctx.O(0))
    return [ctx.node("Greater", [ctx.O(0), zero], [pos]),
            ctx.node("Where", [pos, ctx.GO(0), zero], [ctx.GI(0)])]


@grad("LeakyRelu")
def leaky_relu_grad(ctx):
    # dX = dY where X >= 0 else alpha * dY
    pos, scaled = ctx.tmp("pos"), ctx.tmp("scaled")
    return [ctx.node("GreaterOrEqual", [ctx.I(0), ctx.scalar(0.0)], [pos]),
            ctx.node("Mul", [ctx.GO(0), ctx.scalar(ctx.attr("alpha", 0.01))], [scaled]),
            ctx.node("Where", [pos, ctx.GO(0), scaled], [ctx.GI(0)])]


@grad("Sigmoid")
def sigmoid_grad(ctx):
    # dX = dY * Y * (1 - Y)
    one_m, t = ctx.tmp("one_minus"), ctx.tmp("t")
    return [ctx.node("Sub", [ctx.scalar(1.0), ctx.O(0)], [one_m]),
            ctx.node("Mul", [ctx.O(0), one_m], [t]),
            ctx.node("Mul", [ctx.GO(0), t], [ctx.GI(0)])]


@grad("Tanh")
def tanh_grad(ctx):
    # dX = dY * (1 - Y^2)
    sq, t = ctx.tmp("sq"), ctx.tmp("t")
    return [ctx.node("Mul", [ctx.O(0), ctx.O(0)], [sq]),
            ctx.node("Sub", [ctx.scalar(1.0), sq], [t]),
            ctx.node("Mul", [ctx.GO(0), t], [ctx.GI(0)])]


@grad("Exp")
def exp_grad(ctx):
    # dX = dY * Y
    return [ctx.node("Mul", [ctx.GO(0), ctx.O(0)], [ctx.GI(0)])]


@grad("Log")
def log_grad(ctx):
    # dX = dY / X
    return [ctx.node("Div", [ctx.GO(0), ctx.I(0)], [ctx.GI(0)])]


@grad("Sqrt")
def sqrt_grad(ctx):
    # dX = dY / (2 Y)
    t = ctx.tmp("two_y")
    return [ctx.node("Mul", [ctx.O(0), ctx.scalar(2.0)], [t]),
            ctx.node("Div", [ctx.GO(0), t], [ctx.GI(0)])]


@grad("Reciprocal")
def reciprocal_grad(ctx):
    # dX = -dY * Y^2
    sq, t = ctx.tmp("sq"), ctx.tmp("t")
    return [ctx.node("Mul", [ctx.O(0), ctx.O(0)], [sq]),
            ctx.node("Mul", [ctx.GO(0), sq], [t]),
            ctx.node("Neg", [t], [ctx.GI(0)])]


@grad("Abs")
def abs_grad(ctx):
    # dX = dY * sign(X)
    s = ctx.tmp("sign")
    return [ctx.node("Sign", [ctx.I(0)], [s]), ctx.node("Mul", [ctx.GO(0), s], [ctx.GI(0)])]


@grad("Sum")
def sum_grad(ctx):
    # dX_i = dY (summed to each input's shape)
    return [n for i in range(ctx.n_inputs()) if ctx.needs(i)
            for n in ctx.to_input(ctx.GO(0), i)]


@grad("Where", inputs=(1, 2))
def where_grad(ctx):
    # dA = dY where C else 0, dB = dY where not C else 0
    zero = ctx.scalar(0.0, ctx.O(0))
    nodes = []
    for i, pair in ((1, (ctx.GO(0), zero)), (2, (zero, ctx.GO(0)))):
        if ctx.needs(i):
            t = ctx.tmp(f"d{i}")
            nodes += [ctx.node("Where", [ctx.I(0), *pair], [t]), *ctx.to_input(t, i)]
    return nodes


@grad("Cast", inputs=(0,))
def cast_grad(ctx):
    # dX = cast(dY, dtype(X))
    return [ctx.node("Cast", [ctx.GO(0)], [ctx.GI(0)], to=elem_type(ctx.dtype(ctx.I(0))))]


@grad("CastLike", inputs=(0,))
def cast_like_grad(ctx):
    # dX = cast(dY, dtype(X)); the second input only gives the target type
    return [ctx.node("CastLike", [ctx.GO(0), ctx.I(0)], [ctx.GI(0)])]
