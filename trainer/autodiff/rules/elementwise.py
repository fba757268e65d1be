"""Gradient rules for elementwise ops: arithmetic, math functions, activations, Clip, Max/Min/Mean.

Broadcasting is undone by ctx.to_input. Emitted nodes are valid at the model's opset: the helpers
below stand in for Where (opset 9), Sign (9), float Equal (11) and GreaterOrEqual (12) before
those exist, and give binary nodes the `broadcast` attribute before opset 7.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from trainer.autodiff.registry import grad, no_gradient
from trainer.graph import FLOAT_TYPES, elem_type

no_gradient("Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf", "Not", "And", "Or", "Xor",
            "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "BitwiseNot",
            "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitShift", "BitCast")


# -- opset-aware building blocks (shared with the reduction rules) ------------------------------
def binop(ctx, op: str, a: str, b: str, out: str):
    """`a op b` with NumPy broadcasting; before opset 7 `b` (a scalar or a suffix of a's shape,
    or equal) broadcasts through the `broadcast` attribute."""
    return ctx.node(op, [a, b], [out], broadcast=1 if ctx.opset < 7 else None)


def rsub(ctx, c: float, x: str, out: str, like: str | None = None) -> list:
    """c - x for a scalar c (the scalar cannot come first before opset 7)."""
    if ctx.opset >= 7:
        return [ctx.node("Sub", [ctx.scalar(c, like), x], [out])]
    neg = ctx.tmp("neg")
    return [ctx.node("Neg", [x], [neg]), binop(ctx, "Add", neg, ctx.scalar(c, like), out)]


def cast(ctx, x: str, out: str, dtype):
    to = elem_type(dtype)
    # Cast-1 names the type as a string.
    return ctx.node("Cast", [x], [out],
                    to=TensorProto.DataType.Name(to) if ctx.opset < 6 else to)


def where(ctx, cond: str, a: str | None, b: str | None, out: str, like: str) -> list:
    """Where(cond, a, b); None stands for zero. Before opset 9 a 0/1 mask of `like`'s dtype
    selects (a and b must then be finite)."""
    if ctx.opset >= 9:
        zero = ctx.scalar(0.0, like)
        return [ctx.node("Where", [cond, a or zero, b or zero], [out])]
    nodes, m = [], ctx.tmp("mask")
    if a is None:
        inv = ctx.tmp("not")
        nodes.append(ctx.node("Not", [cond], [inv]))
        cond, a, b = inv, b, None
    nodes.append(cast(ctx, cond, m, ctx.dtype(like)))
    if b is None:
        return [*nodes, ctx.node("Mul", [a, m], [out])]
    d, t = ctx.tmp("diff"), ctx.tmp("t")
    return [*nodes, binop(ctx, "Sub", a, b, d), ctx.node("Mul", [m, d], [t]),
            binop(ctx, "Add", t, b, out)]


def sign(ctx, x: str, out: str) -> list:
    if ctx.opset >= 9:
        return [ctx.node("Sign", [x], [out])]
    zero, dt = ctx.scalar(0.0, x), ctx.dtype(x)
    p, n, pf, nf = ctx.tmp("pos"), ctx.tmp("neg"), ctx.tmp("posf"), ctx.tmp("negf")
    return [binop(ctx, "Greater", x, zero, p), binop(ctx, "Less", x, zero, n),
            cast(ctx, p, pf, dt), cast(ctx, n, nf, dt), ctx.node("Sub", [pf, nf], [out])]


def equal_extreme(ctx, x: str, y: str, out: str, largest: bool) -> list:
    """x == y where y = max (largest) or min over values including x; float Equal needs
    opset 11, before it x == max is not(x < max)."""
    if ctx.opset >= 11:
        return [ctx.node("Equal", [x, y], [out])]
    t = ctx.tmp("strict")
    return [binop(ctx, "Less" if largest else "Greater", x, y, t), ctx.node("Not", [t], [out])]


def compare_or_equal(ctx, op: str, a: str, b: str, out: str) -> list:
    """GreaterOrEqual / LessOrEqual (opset 12) or the negated strict comparison."""
    if ctx.opset >= 12:
        return [binop(ctx, op, a, b, out)]
    t = ctx.tmp("strict")
    strict = "Less" if op == "GreaterOrEqual" else "Greater"
    return [binop(ctx, strict, a, b, t), ctx.node("Not", [t], [out])]


def is_zero(ctx, x: str, out: str, dtype) -> list:
    """x == 0 for a float x of `dtype` (float Equal from opset 11; before it, not(bool(x)))."""
    if ctx.opset >= 11:
        return [ctx.node("Equal", [x, ctx.const(0, dtype, "zero")], [out])]
    b = ctx.tmp("bool")
    return [cast(ctx, x, b, np.bool_), ctx.node("Not", [b], [out])]


def _mul_dy(ctx, factor: str) -> list:
    # dX = dY * factor
    return [ctx.node("Mul", [ctx.GO(0), factor], [ctx.GI(0)])]


# -- arithmetic ---------------------------------------------------------------------------------
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
    # dA = dY * B * A^(B-1), dB = dY * Y * log(A); as torch, dA = 0 where B == 0 and
    # dB = 0 where A == 0 and B >= 0 (instead of 0 * inf).
    a, b, nodes = ctx.I(0), ctx.I(1), []
    dt = ctx.dtype(a)
    if ctx.needs(0):
        t, d = ctx.tmp("t"), ctx.tmp("da")
        fixed = None if ctx.needs(1) else ctx.static_value(b)  # a frozen exponent
        if fixed is not None and fixed.size == 1 and float(fixed.reshape(-1)[0]) == 2.0:
            nodes.append(binop(ctx, "Mul", a, ctx.scalar(2.0), t))
        elif fixed is not None:
            p = ctx.tmp("pow")
            bm1 = np.where(fixed == 0, 0, fixed - 1)  # A^0 keeps B * A^(B-1) finite at A == 0
            nodes += [binop(ctx, "Pow", a, ctx.const(bm1, dt, "bm1"), p),
                      binop(ctx, "Mul", p, ctx.const(fixed, dt, "b"), t)]
        else:
            exp_b = b
            if ctx.dtype(b) != dt:
                exp_b = ctx.tmp("b")
                nodes.append(cast(ctx, b, exp_b, dt))
            bz, bzf, bm1, bm1z, p = (ctx.tmp(s) for s in ("b_zero", "b_zero_f", "bm1", "bm1z",
                                                          "pow"))
            nodes += [*is_zero(ctx, exp_b, bz, dt), cast(ctx, bz, bzf, dt),
                      binop(ctx, "Sub", exp_b, ctx.scalar(1.0), bm1),
                      ctx.node("Add", [bm1, bzf], [bm1z]),  # B == 0: A^0, times B is 0
                      ctx.node("Pow", [a, bm1z], [p]), ctx.node("Mul", [p, exp_b], [t])]
        nodes += [ctx.node("Mul", [ctx.GO(0), t], [d]), *ctx.to_input(d, 0)]
    if ctx.needs(1):
        az, bnn, fix, fixf, safe, lg, t, d = (ctx.tmp(s) for s in (
            "a_zero", "b_nonneg", "fix", "fix_f", "safe", "log", "t", "db"))
        nodes += [*is_zero(ctx, a, az, dt),
                  *compare_or_equal(ctx, "GreaterOrEqual", b, ctx.scalar(0.0, b), bnn),
                  ctx.node("And", [az, bnn], [fix]), cast(ctx, fix, fixf, dt),
                  ctx.node("Add", [a, fixf], [safe]),  # log(1) = 0 where the term is 0
                  ctx.node("Log", [safe], [lg]), ctx.node("Mul", [ctx.O(0), lg], [t]),
                  ctx.node("Mul", [ctx.GO(0), t], [d]), *ctx.to_input(d, 1)]
    return nodes


@grad("Mod")
def mod_grad(ctx):
    # Y = A - n * B, n = trunc(A / B) (fmod=1) or floor(A / B) (fmod=0): dA = dY, dB = -dY * n,
    # as torch.fmod / torch.remainder; n = (A - Y) / B rounded to the integer it is.
    nodes = ctx.to_input(ctx.GO(0), 0) if ctx.needs(0) else []
    if ctx.needs(1):
        diff, q, n, t, d = (ctx.tmp(s) for s in ("diff", "q", "n", "t", "db"))
        nodes += [ctx.node("Sub", [ctx.I(0), ctx.O(0)], [diff]),
                  ctx.node("Div", [diff, ctx.I(1)], [q])]
        if ctx.opset >= 11:
            nodes.append(ctx.node("Round", [q], [n]))
        else:
            h = ctx.tmp("half")
            nodes += [ctx.node("Add", [q, ctx.scalar(0.5, ctx.O(0))], [h]),
                      ctx.node("Floor", [h], [n])]
        nodes += [ctx.node("Mul", [ctx.GO(0), n], [t]), ctx.node("Neg", [t], [d]),
                  *ctx.to_input(d, 1)]
    return nodes


@grad("Sum")
def sum_grad(ctx):
    # dX_i = dY (summed to each input's shape)
    return [n for i in range(ctx.n_inputs()) if ctx.needs(i)
            for n in ctx.to_input(ctx.GO(0), i)]


@grad("Mean")
def mean_grad(ctx):
    # dX_i = dY / n (summed to each input's shape)
    n, g = ctx.n_inputs(), ctx.tmp("scaled")
    nodes = [binop(ctx, "Mul", ctx.GO(0), ctx.scalar(1.0 / n, ctx.O(0)), g)]
    return nodes + [x for i in range(n) if ctx.needs(i) for x in ctx.to_input(g, i)]


def _extremum_grad(ctx, largest: bool):
    # dX_i = dY * [X_i == Y] / #{j : X_j == Y}: ties split evenly (torch.maximum, amax)
    n, y, dt = ctx.n_inputs(), ctx.O(0), ctx.dtype(ctx.O(0))
    if n == 1:
        return ctx.to_input(ctx.GO(0), 0)
    nodes, masks = [], []
    for i in range(n):
        eq, m = ctx.tmp(f"eq{i}"), ctx.tmp(f"mask{i}")
        nodes += [*equal_extreme(ctx, ctx.I(i), y, eq, largest), cast(ctx, eq, m, dt)]
        masks.append(m)
    count, g = ctx.tmp("count"), ctx.tmp("share")
    nodes += [ctx.node("Sum", masks, [count]), ctx.node("Div", [ctx.GO(0), count], [g])]
    for i in range(n):
        if ctx.needs(i):
            t = ctx.tmp(f"d{i}")
            nodes += [ctx.node("Mul", [g, masks[i]], [t]), *ctx.to_input(t, i)]
    return nodes


@grad("Max")
def max_grad(ctx):
    return _extremum_grad(ctx, True)


@grad("Min")
def min_grad(ctx):
    return _extremum_grad(ctx, False)


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


def _quantized(ctx, x: str) -> bool:
    """A non-float input on a gradient path: a quantized tensor (QuantizeLinear's output,
    straight through), whose gradient stays a float."""
    return elem_type(ctx.dtype(x)) not in FLOAT_TYPES


@grad("Cast", inputs=(0,))
def cast_grad(ctx):
    # dX = cast(dY, dtype(X)), or dY itself for a quantized X
    if _quantized(ctx, ctx.I(0)):
        return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]
    return [cast(ctx, ctx.GO(0), ctx.GI(0), ctx.dtype(ctx.I(0)))]


@grad("CastLike", inputs=(0,))
def cast_like_grad(ctx):
    # dX = cast(dY, dtype(X)) (dY for a quantized X); the second input only gives the type
    if _quantized(ctx, ctx.I(0)):
        return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]
    return [ctx.node("CastLike", [ctx.GO(0), ctx.I(0)], [ctx.GI(0)])]


@grad("Clip")
def clip_grad(ctx):
    # As torch.clamp with tensor bounds: dX = dY where min <= X <= max,
    # dmin = sum(dY where X < min and min < max), dmax = sum(dY where X > max or max < min).
    x, dy = ctx.I(0), ctx.GO(0)
    if ctx.opset < 11:
        lo, hi = (None if ctx.attr(k) is None else ctx.scalar(ctx.attr(k)) for k in ("min",
                                                                                    "max"))
    else:
        lo, hi = (ctx.I(i) or None for i in (1, 2))
    nodes = []
    if ctx.needs(0):
        tests = []
        for op, bound in (("GreaterOrEqual", lo), ("LessOrEqual", hi)):
            if bound is not None:
                tests.append(ctx.tmp("inside"))
                nodes += compare_or_equal(ctx, op, x, bound, tests[-1])
        if not tests:
            nodes.append(ctx.node("Identity", [dy], [ctx.GI(0)]))
        elif len(tests) == 1:
            nodes += where(ctx, tests[0], dy, None, ctx.GI(0), x)
        else:
            mask = ctx.tmp("mask")
            nodes += [ctx.node("And", tests, [mask]), *where(ctx, mask, dy, None, ctx.GI(0), x)]
    for i, bound, other, op, join in ((1, lo, hi, "Less", "And"), (2, hi, lo, "Greater", "Or")):
        if not ctx.needs(i):
            continue
        m, t = ctx.tmp("mask"), ctx.tmp("d")
        nodes.append(binop(ctx, op, x, bound, m))
        if other is not None:  # min < max (for dmin) or max < min (for dmax)
            order, both = ctx.tmp("order"), ctx.tmp("both")
            nodes += [ctx.node("Less", [bound, other], [order]),
                      binop(ctx, join, m, order, both)]
            m = both
        nodes += [*where(ctx, m, dy, None, t, x), *ctx.to_input(t, i)]
    return nodes


# -- unary math ---------------------------------------------------------------------------------
@grad("Neg")
def neg_grad(ctx):
    # dX = -dY
    return [ctx.node("Neg", [ctx.GO(0)], [ctx.GI(0)])]


@grad("Identity")
def identity_grad(ctx):
    # dX = dY
    return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]


@grad("Exp")
def exp_grad(ctx):
    # dX = dY * Y
    return _mul_dy(ctx, ctx.O(0))


@grad("Log")
def log_grad(ctx):
    # dX = dY / X
    return [ctx.node("Div", [ctx.GO(0), ctx.I(0)], [ctx.GI(0)])]


@grad("Sqrt")
def sqrt_grad(ctx):
    # dX = dY / (2 Y)
    t = ctx.tmp("two_y")
    return [binop(ctx, "Mul", ctx.O(0), ctx.scalar(2.0), t),
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
    # dX = dY * sign(X) (0 at 0, as torch)
    s = ctx.tmp("sign")
    return [*sign(ctx, ctx.I(0), s), *_mul_dy(ctx, s)]


@grad("Sin")
def sin_grad(ctx):
    # dX = dY * cos(X)
    c = ctx.tmp("cos")
    return [ctx.node("Cos", [ctx.I(0)], [c]), *_mul_dy(ctx, c)]


@grad("Cos")
def cos_grad(ctx):
    # dX = -dY * sin(X)
    s, t = ctx.tmp("sin"), ctx.tmp("t")
    return [ctx.node("Sin", [ctx.I(0)], [s]), ctx.node("Mul", [ctx.GO(0), s], [t]),
            ctx.node("Neg", [t], [ctx.GI(0)])]


@grad("Tan")
def tan_grad(ctx):
    # dX = dY * (1 + Y^2)
    sq, t = ctx.tmp("sq"), ctx.tmp("t")
    return [ctx.node("Mul", [ctx.O(0), ctx.O(0)], [sq]),
            ctx.node("Add", [sq, ctx.scalar(1.0)], [t]), *_mul_dy(ctx, t)]


def _over_root(ctx, c: float, minus_square: bool, negate: bool = False):
    # dX = dY / sqrt(c - X^2) (minus_square) or dY / sqrt(X^2 + c), negated with `negate`
    sq, t, r, q = ctx.tmp("sq"), ctx.tmp("t"), ctx.tmp("root"), ctx.tmp("q")
    nodes = [ctx.node("Mul", [ctx.I(0), ctx.I(0)], [sq])]
    nodes += (rsub(ctx, c, sq, t) if minus_square
              else [ctx.node("Add", [sq, ctx.scalar(c)], [t])])
    nodes.append(ctx.node("Sqrt", [t], [r]))
    if not negate:
        return [*nodes, ctx.node("Div", [ctx.GO(0), r], [ctx.GI(0)])]
    return [*nodes, ctx.node("Div", [ctx.GO(0), r], [q]), ctx.node("Neg", [q], [ctx.GI(0)])]


@grad("Asin")
def asin_grad(ctx):
    # dX = dY / sqrt(1 - X^2)
    return _over_root(ctx, 1.0, True)


@grad("Acos")
def acos_grad(ctx):
    # dX = -dY / sqrt(1 - X^2)
    return _over_root(ctx, 1.0, True, negate=True)


@grad("Asinh")
def asinh_grad(ctx):
    # dX = dY / sqrt(X^2 + 1)
    return _over_root(ctx, 1.0, False)


@grad("Acosh")
def acosh_grad(ctx):
    # dX = dY / sqrt(X^2 - 1)
    return _over_root(ctx, -1.0, False)


@grad("Atan")
def atan_grad(ctx):
    # dX = dY / (1 + X^2)
    sq, t = ctx.tmp("sq"), ctx.tmp("t")
    return [ctx.node("Mul", [ctx.I(0), ctx.I(0)], [sq]),
            ctx.node("Add", [sq, ctx.scalar(1.0)], [t]),
            ctx.node("Div", [ctx.GO(0), t], [ctx.GI(0)])]


@grad("Atanh")
def atanh_grad(ctx):
    # dX = dY / (1 - X^2)
    sq, t = ctx.tmp("sq"), ctx.tmp("t")
    return [ctx.node("Mul", [ctx.I(0), ctx.I(0)], [sq]), *rsub(ctx, 1.0, sq, t),
            ctx.node("Div", [ctx.GO(0), t], [ctx.GI(0)])]


@grad("Sinh")
def sinh_grad(ctx):
    # dX = dY * cosh(X)
    c = ctx.tmp("cosh")
    return [ctx.node("Cosh", [ctx.I(0)], [c]), *_mul_dy(ctx, c)]


@grad("Cosh")
def cosh_grad(ctx):
    # dX = dY * sinh(X)
    s = ctx.tmp("sinh")
    return [ctx.node("Sinh", [ctx.I(0)], [s]), *_mul_dy(ctx, s)]


@grad("Erf")
def erf_grad(ctx):
    # dX = dY * 2/sqrt(pi) * exp(-X^2)
    sq, n, e, t = ctx.tmp("sq"), ctx.tmp("neg"), ctx.tmp("exp"), ctx.tmp("t")
    return [ctx.node("Mul", [ctx.I(0), ctx.I(0)], [sq]), ctx.node("Neg", [sq], [n]),
            ctx.node("Exp", [n], [e]),
            ctx.node("Mul", [e, ctx.scalar(2 / math.sqrt(math.pi))], [t]), *_mul_dy(ctx, t)]


# -- activations --------------------------------------------------------------------------------
@grad("Relu")
def relu_grad(ctx):
    # dX = dY where Y > 0 else 0 (0 at X = 0, as torch)
    pos = ctx.tmp("pos")
    return [binop(ctx, "Greater", ctx.O(0), ctx.scalar(0.0, ctx.O(0)), pos),
            *where(ctx, pos, ctx.GO(0), None, ctx.GI(0), ctx.O(0))]


@grad("LeakyRelu")
def leaky_relu_grad(ctx):
    # dX = dY where X > 0 else alpha * dY (alpha * dY at X = 0, as torch)
    pos, scaled = ctx.tmp("pos"), ctx.tmp("scaled")
    return [binop(ctx, "Greater", ctx.I(0), ctx.scalar(0.0), pos),
            binop(ctx, "Mul", ctx.GO(0), ctx.scalar(ctx.attr("alpha", 0.01)), scaled),
            *where(ctx, pos, ctx.GO(0), scaled, ctx.GI(0), ctx.I(0))]


@grad("PRelu")
def prelu_grad(ctx):
    # dX = dY where X > 0 else slope * dY, dslope = sum(dY * X where X <= 0) (torch)
    x, slope, dy = ctx.I(0), ctx.I(1), ctx.GO(0)
    x_shape, s_shape = ctx.shape(x), ctx.shape(slope)
    # Before opset 7 a 1-D slope of C values applies along axis 1.
    channel = ctx.opset < 7 and len(s_shape) == 1 and s_shape[0] > 1 and len(x_shape) > 2
    pos, nodes = ctx.tmp("pos"), []
    nodes.append(binop(ctx, "Greater", x, ctx.scalar(0.0), pos))
    if ctx.needs(0):
        scaled = ctx.tmp("scaled")
        nodes += [ctx.node("Mul", [dy, slope], [scaled], broadcast=1 if ctx.opset < 7 else None,
                           axis=1 if channel else None),
                  *where(ctx, pos, dy, scaled, ctx.GI(0), x)]
    if ctx.needs(1):
        p, t = ctx.tmp("dy_x"), ctx.tmp("d")
        nodes += [ctx.node("Mul", [dy, x], [p]), *where(ctx, pos, None, p, t, x)]
        if channel:
            axes = [a for a in range(len(x_shape)) if a != 1]
            nodes.append(ctx.reduce("ReduceSum", t, axes, ctx.GI(1), keepdims=0))
        else:
            nodes += ctx.to_input(t, 1)
    return nodes


@grad("Sigmoid")
def sigmoid_grad(ctx):
    # dX = dY * Y * (1 - Y)
    om, t = ctx.tmp("one_minus"), ctx.tmp("t")
    return [*rsub(ctx, 1.0, ctx.O(0), om), ctx.node("Mul", [ctx.O(0), om], [t]),
            *_mul_dy(ctx, t)]


@grad("Tanh")
def tanh_grad(ctx):
    # dX = dY * (1 - Y^2)
    sq, t = ctx.tmp("sq"), ctx.tmp("t")
    return [ctx.node("Mul", [ctx.O(0), ctx.O(0)], [sq]), *rsub(ctx, 1.0, sq, t),
            *_mul_dy(ctx, t)]


def _exp_linear(ctx, pos_scale: float, neg_offset: float, neg_scale: float):
    # dX = pos_scale * dY where X > 0 else neg_scale * (Y + neg_offset) * dY
    y, dy = ctx.O(0), ctx.GO(0)
    pos, off, neg = ctx.tmp("pos"), ctx.tmp("offset"), ctx.tmp("neg")
    nodes = [binop(ctx, "Greater", ctx.I(0), ctx.scalar(0.0), pos),
             binop(ctx, "Add", y, ctx.scalar(neg_offset), off)]
    if neg_scale != 1.0:
        s = ctx.tmp("scaled")
        nodes.append(binop(ctx, "Mul", off, ctx.scalar(neg_scale), s))
        off = s
    nodes.append(ctx.node("Mul", [dy, off], [neg]))
    if pos_scale != 1.0:
        s = ctx.tmp("pos_dy")
        nodes.append(binop(ctx, "Mul", dy, ctx.scalar(pos_scale), s))
        dy = s
    return nodes + where(ctx, pos, dy, neg, ctx.GI(0), ctx.I(0))


@grad("Elu")
def elu_grad(ctx):
    # dX = dY where X > 0 else dY * (Y + alpha) (= alpha e^X; the left limit at 0, as torch)
    return _exp_linear(ctx, 1.0, ctx.attr("alpha", 1.0), 1.0)


@grad("Selu")
def selu_grad(ctx):
    # dX = gamma * dY where X > 0 else dY * (Y + gamma * alpha) (left limit at 0, as torch)
    if ctx.opset >= 6:
        alpha = ctx.attr("alpha", 1.67326319217681884765625)
        gamma = ctx.attr("gamma", 1.05070102214813232421875)
    else:
        alpha, gamma = ctx.attr("alpha", 1.6732), ctx.attr("gamma", 1.0507)
    return _exp_linear(ctx, gamma, gamma * alpha, 1.0)


@grad("Celu")
def celu_grad(ctx):
    # dX = dY where X > 0 else dY * (Y / alpha + 1) (= e^(X/alpha))
    alpha = ctx.attr("alpha", 1.0)
    return _exp_linear(ctx, 1.0, alpha, 1.0 / alpha)


@grad("ThresholdedRelu")
def thresholded_relu_grad(ctx):
    # dX = dY where X > alpha else 0
    m = ctx.tmp("above")
    return [binop(ctx, "Greater", ctx.I(0), ctx.scalar(ctx.attr("alpha", 1.0)), m),
            *where(ctx, m, ctx.GO(0), None, ctx.GI(0), ctx.I(0))]


@grad("Shrink")
def shrink_grad(ctx):
    # dX = dY where |X| > lambd else 0
    a, m = ctx.tmp("abs"), ctx.tmp("outside")
    return [ctx.node("Abs", [ctx.I(0)], [a]),
            ctx.node("Greater", [a, ctx.scalar(ctx.attr("lambd", 0.5))], [m]),
            *where(ctx, m, ctx.GO(0), None, ctx.GI(0), ctx.I(0))]


@grad("HardSigmoid")
def hard_sigmoid_grad(ctx):
    # dX = alpha * dY where 0 < alpha X + beta < 1 (i.e. 0 < Y < 1) else 0
    y = ctx.O(0)
    lo, hi, m, s = ctx.tmp("above"), ctx.tmp("below"), ctx.tmp("inside"), ctx.tmp("scaled")
    return [binop(ctx, "Greater", y, ctx.scalar(0.0, y), lo),
            binop(ctx, "Less", y, ctx.scalar(1.0, y), hi), ctx.node("And", [lo, hi], [m]),
            binop(ctx, "Mul", ctx.GO(0), ctx.scalar(ctx.attr("alpha", 0.2), y), s),
            *where(ctx, m, s, None, ctx.GI(0), y)]


@grad("HardSwish")
def hard_swish_grad(ctx):
    # dX = dY * (0 if X <= -3, X/3 + 1/2 if X < 3, 1 from 3 on) (torch's choice at +-3)
    x = ctx.I(0)
    s, h, lt, mid, le, d = (ctx.tmp(k) for k in ("third", "slope", "lt", "mid", "le", "d"))
    return [ctx.node("Mul", [x, ctx.scalar(1 / 3)], [s]),
            ctx.node("Add", [s, ctx.scalar(0.5)], [h]),
            ctx.node("Less", [x, ctx.scalar(3.0)], [lt]),
            ctx.node("Where", [lt, h, ctx.scalar(1.0)], [mid]),
            ctx.node("LessOrEqual", [x, ctx.scalar(-3.0)], [le]),
            ctx.node("Where", [le, ctx.scalar(0.0), mid], [d]), *_mul_dy(ctx, d)]


@grad("Softplus")
def softplus_grad(ctx):
    # dX = dY * sigmoid(X)
    s = ctx.tmp("sigmoid")
    return [ctx.node("Sigmoid", [ctx.I(0)], [s]), *_mul_dy(ctx, s)]


@grad("Softsign")
def softsign_grad(ctx):
    # dX = dY / (1 + |X|)^2
    a, d, sq = ctx.tmp("abs"), ctx.tmp("den"), ctx.tmp("sq")
    return [ctx.node("Abs", [ctx.I(0)], [a]), binop(ctx, "Add", a, ctx.scalar(1.0), d),
            ctx.node("Mul", [d, d], [sq]), ctx.node("Div", [ctx.GO(0), sq], [ctx.GI(0)])]


@grad("Mish")
def mish_grad(ctx):
    # dX = dY * (t + X * (1 - t^2) * sigmoid(X)), t = tanh(softplus(X))
    x = ctx.I(0)
    sp, t, t2, sech2, sg, xs, u, d = (ctx.tmp(k) for k in (
        "softplus", "tanh", "tanh2", "sech2", "sigmoid", "x_sigmoid", "u", "d"))
    return [ctx.node("Softplus", [x], [sp]), ctx.node("Tanh", [sp], [t]),
            ctx.node("Mul", [t, t], [t2]), *rsub(ctx, 1.0, t2, sech2),
            ctx.node("Sigmoid", [x], [sg]), ctx.node("Mul", [x, sg], [xs]),
            ctx.node("Mul", [xs, sech2], [u]), ctx.node("Add", [t, u], [d]), *_mul_dy(ctx, d)]


def _swish_parts(ctx, x: str, alpha: float, g: str | None) -> tuple[list, str, str]:
    """s = sigmoid(alpha x) and d = s + alpha g (1 - s), the derivative of g = x s (Swish);
    g is computed when not given."""
    nodes, ax = [], x
    if alpha != 1.0:
        ax = ctx.tmp("ax")
        nodes.append(ctx.node("Mul", [x, ctx.scalar(alpha, x)], [ax]))
    s, oms, u, d = ctx.tmp("sigmoid"), ctx.tmp("one_minus"), ctx.tmp("u"), ctx.tmp("dswish")
    nodes.append(ctx.node("Sigmoid", [ax], [s]))
    if g is None:
        g = ctx.tmp("swish")
        nodes.append(ctx.node("Mul", [x, s], [g]))
    nodes += [*rsub(ctx, 1.0, s, oms, like=x), ctx.node("Mul", [g, oms], [u])]
    if alpha != 1.0:
        ua = ctx.tmp("u_alpha")
        nodes.append(ctx.node("Mul", [u, ctx.scalar(alpha, x)], [ua]))
        u = ua
    nodes.append(ctx.node("Add", [s, u], [d]))
    return nodes, d, g


@grad("Swish")
def swish_grad(ctx):
    # dX = dY * (s + alpha * Y * (1 - s)), s = sigmoid(alpha X)
    nodes, d, _ = _swish_parts(ctx, ctx.I(0), ctx.attr("alpha", 1.0), ctx.O(0))
    return nodes + _mul_dy(ctx, d)


@grad("SwiGLU")
def swiglu_grad(ctx):
    # Y = g * B, g = A sigmoid(alpha A): dA = dY * B * (s + alpha g (1 - s)), dB = dY * g
    a, b, dy = ctx.I(0), ctx.I(1), ctx.GO(0)
    nodes, d, g = _swish_parts(ctx, a, ctx.attr("alpha", 1.0), None)
    if ctx.needs(0):
        t = ctx.tmp("dy_b")
        nodes += [ctx.node("Mul", [dy, b], [t]), ctx.node("Mul", [t, d], [ctx.GI(0)])]
    if ctx.needs(1):
        nodes.append(ctx.node("Mul", [dy, g], [ctx.GI(1)]))
    return nodes


@grad("Gelu")
def gelu_grad(ctx):
    x = ctx.I(0)
    if ctx.attr("approximate", "none") == "tanh":
        # Y = X/2 (1 + t), t = tanh(c (X + k X^3)):
        # dX = dY/2 (1 + t + X (1 - t^2) c (1 + 3k X^2))
        c, k = math.sqrt(2 / math.pi), 0.044715
        sq, a, b, u, t, t2, sech2, e, du, f, p, q, r, h = (ctx.tmp(s) for s in (
            "sq", "a", "b", "u", "tanh", "tanh2", "sech2", "e", "du", "f", "p", "q", "r",
            "half"))
        return [ctx.node("Mul", [x, x], [sq]), ctx.node("Mul", [sq, ctx.scalar(c * k)], [a]),
                ctx.node("Add", [a, ctx.scalar(c)], [b]), ctx.node("Mul", [x, b], [u]),
                ctx.node("Tanh", [u], [t]), ctx.node("Mul", [t, t], [t2]),
                *rsub(ctx, 1.0, t2, sech2),
                ctx.node("Mul", [sq, ctx.scalar(3 * c * k)], [e]),
                ctx.node("Add", [e, ctx.scalar(c)], [du]),
                ctx.node("Mul", [x, sech2], [f]), ctx.node("Mul", [f, du], [p]),
                ctx.node("Add", [t, p], [q]), ctx.node("Add", [q, ctx.scalar(1.0)], [r]),
                ctx.node("Mul", [r, ctx.scalar(0.5)], [h]), *_mul_dy(ctx, h)]
    # dX = dY (Phi(X) + X phi(X)) = dY/2 (1 + erf(z) + 2/sqrt(pi) z e^(-z^2)), z = X/sqrt(2)
    z, er, z2, nz, e, ze, s, a, b, h = (ctx.tmp(k) for k in (
        "z", "erf", "z2", "neg", "exp", "ze", "s", "a", "b", "half"))
    return [ctx.node("Mul", [x, ctx.scalar(1 / math.sqrt(2))], [z]), ctx.node("Erf", [z], [er]),
            ctx.node("Mul", [z, z], [z2]), ctx.node("Neg", [z2], [nz]),
            ctx.node("Exp", [nz], [e]), ctx.node("Mul", [z, e], [ze]),
            ctx.node("Mul", [ze, ctx.scalar(2 / math.sqrt(math.pi))], [s]),
            ctx.node("Add", [er, s], [a]), ctx.node("Add", [a, ctx.scalar(1.0)], [b]),
            ctx.node("Mul", [b, ctx.scalar(0.5)], [h]), *_mul_dy(ctx, h)]
