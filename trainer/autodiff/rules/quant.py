"""Gradient rules for fake quantization: QuantizeLinear -> DequantizeLinear (QDQ) pairs train
with the straight-through estimator, as PyTorch's FakeQuantize does.

    q = saturate(round(x / s) + zp)        QuantizeLinear
    y = (q - zp) * s                       DequantizeLinear

Rounding has a zero derivative almost everywhere; the straight-through estimator (STE) takes it
as 1 where q was not saturated and 0 where it was. q is an integer (or float8/6/4) tensor, so the
engine lets QuantizeLinear's output carry a float gradient (registry.straight_through): its
gradient is in DequantizeLinear's output type, in units of quantization steps.

- DequantizeLinear: dq = dy * s;  ds = sum(dy * (q - zp)), exact (y is linear in s).
- QuantizeLinear:   dx = dq * m / s;  ds = -sum(dq * m * x / s^2), m = 1 where not saturated.

Chained, dx = dy * m and ds = sum(dy * ((q - zp) - m * x / s)): the learned step size (LSQ)
gradient of torch._fake_quantize_learnable_per_tensor_affine (with grad_factor 1). Per-tensor,
per-axis and blocked (opset 21) scales. A zero point given as data carries no gradient; one
computed from x (DynamicQuantizeLinear's, which also computes the scale from x's range) gets its
straight-through gradient: dzp = sum(dq * m) from QuantizeLinear, -sum(dy * s) from
DequantizeLinear.

The integer ops pass gradients straight through as well: MatMulInteger and ConvInteger as the
float op on the centered operands (their int32 result's gradient reaches them through Cast),
QLinearMatMul and QLinearConv through their QDQ form (DequantizeLinear, the float op,
QuantizeLinear), differentiated by the engine. Integer tensors are data: they carry gradients
only downstream of a straight-through op, never as parameters.
"""

from __future__ import annotations

import math
from collections import ChainMap

import ml_dtypes
import numpy as np

from trainer.autodiff.registry import grad, straight_through
from trainer.autodiff.rules.norm import Emit
from trainer.graph import elem_type

straight_through("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "QLinearMatMul", "QLinearConv")

# Integer target ranges; for float targets the largest finite value (see kernels/quant.py).
_INT_RANGES = {np.dtype(t): (int(ml_dtypes.iinfo(t).min), int(ml_dtypes.iinfo(t).max))
               for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, ml_dtypes.uint4,
                         ml_dtypes.int4, ml_dtypes.uint2, ml_dtypes.int2)}
_SPECIAL_FLOATS = {np.dtype(t) for t in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz,
                                        ml_dtypes.float8_e5m2, ml_dtypes.float8_e5m2fnuz)}


def _layout(p_shape: tuple, block: int) -> str:
    """How a scale or zero point lines up with x: 'scalar', 'axis' or 'block'."""
    if math.prod(p_shape) == 1:
        return "scalar"
    return "block" if block else "axis"


def _expand(e: Emit, p: str, p_shape: tuple, x_shape: tuple, axis: int, block: int) -> str:
    """p (of shape p_shape) shaped to broadcast against x: a scalar, [1, .., C, .., 1], or
    blocks repeated along the axis (and cut to x's length there)."""
    ctx = e.ctx
    kind = _layout(p_shape, block)
    rank = len(x_shape)
    if kind == "scalar":
        return e.reshape(p, [], name="scalar")
    if kind == "axis":
        return e.reshape(p, [1] * axis + [-1] + [1] * (rank - axis - 1), name="per_axis")
    shape = list(p_shape)
    blocks = shape[:axis + 1] + [block] + shape[axis + 1:]
    t = e.reshape(p, shape[:axis + 1] + [1] + shape[axis + 1:], name="blocks")
    t = e("Expand", t, ctx.const(blocks, np.int64, "shape"), name="repeated")
    full = shape[:axis] + [shape[axis] * block] + shape[axis + 1:]
    t = e.reshape(t, full, name="flat")
    if full[axis] == x_shape[axis]:
        return t
    return e("Slice", t, ctx.const([0], np.int64, "starts"),
             ctx.const([x_shape[axis]], np.int64, "ends"), ctx.const([axis], np.int64, "axes"),
             name="cut")


def _reduce(e: Emit, d: str, p: str, x_shape: tuple, axis: int, block: int, out: str) -> str:
    """The adjoint of _expand: d (x's shape) summed into p's shape, written to `out`."""
    ctx = e.ctx
    p_shape = tuple(ctx.shape(p))
    kind = _layout(p_shape, block)
    if kind == "scalar":
        s = e.reduce("ReduceSum", d, list(range(len(x_shape))), keepdims=0, name="sum")
        return e.reshape(s, list(p_shape), out=out)
    if kind == "axis":
        others = [a for a in range(len(x_shape)) if a != axis]
        s = e.reduce("ReduceSum", d, others, keepdims=0, name="sum") if others else d
        return e.reshape(s, list(p_shape), out=out)
    nb = p_shape[axis]
    if nb * block != x_shape[axis]:  # zeros for the cut tail of the last block
        pads = [0] * (2 * len(x_shape))
        pads[len(x_shape) + axis] = nb * block - x_shape[axis]
        d = e("Pad", d, ctx.const(pads, np.int64, "pads"), name="padded")
    split = list(p_shape[:axis + 1]) + [block] + list(p_shape[axis + 1:])
    t = e.reshape(d, split, name="blocks")
    return e.reduce("ReduceSum", t, [axis + 1], keepdims=0, out=out)


def _geometry(ctx, x: str) -> tuple[tuple, int, int]:
    x_shape = tuple(ctx.shape(x))
    axis = ctx.attr("axis", 1)
    axis = axis % len(x_shape) if x_shape else 0
    return x_shape, axis, ctx.attr("block_size", 0)


def _math_dtype(*dtypes) -> np.dtype:
    """float64 when any operand is float64, else float32 (the kernels round in float32 at
    least)."""
    return np.dtype(np.float64 if np.dtype(np.float64) in dtypes else np.float32)


@grad("DequantizeLinear", inputs=(0, 1, 2))
def dequantize_linear_grad(ctx):
    x, s, zp = ctx.I(0), ctx.I(1), ctx.I(2)
    dy, y_dtype = ctx.GO(0), ctx.dtype(ctx.O(0))
    x_shape, axis, block = _geometry(ctx, x)
    e = Emit(ctx)
    sf = None
    if ctx.needs(0) or ctx.needs(2):  # s in y's type, shaped against x
        sf = _expand(e, e.cast(s, y_dtype, "scale"), ctx.shape(s), x_shape, axis, block)
    if ctx.needs(0):  # dq = dy * s
        e("Mul", dy, sf, out=ctx.GI(0))
    if ctx.needs(1):  # ds = sum(dy * (q - zp))
        centered = e.cast(x, y_dtype, "q")
        if zp:
            zpf = _expand(e, e.cast(zp, y_dtype, "zero_point"), ctx.shape(zp), x_shape, axis,
                          block)
            centered = e("Sub", centered, zpf, name="centered")
        ds = _reduce(e, e("Mul", dy, centered, name="prod"), s, x_shape, axis, block,
                     ctx.tmp("ds"))
        e("Cast", ds, out=ctx.GI(1), to=elem_type(ctx.dtype(s)))
    if ctx.needs(2):  # a computed zero point (DynamicQuantizeLinear's): dzp = -sum(dy * s)
        t = e("Neg", e("Mul", dy, sf, name="dys"), name="neg")
        _reduce(e, t, zp, x_shape, axis, block, ctx.GI(2))
    return e.nodes


@grad("QuantizeLinear", inputs=(0, 1, 2))
def quantize_linear_grad(ctx):
    x, s, zp, q = ctx.I(0), ctx.I(1), ctx.I(2), ctx.O(0)
    x_shape, axis, block = _geometry(ctx, x)
    x_dtype, s_dtype = ctx.dtype(x), ctx.dtype(s)
    m_dtype = _math_dtype(x_dtype, s_dtype)
    e = Emit(ctx)
    sf = _expand(e, e.cast(s, m_dtype, "scale"), ctx.shape(s), x_shape, axis, block)
    xf = e.cast(x, m_dtype, "x")
    v = e("Div", xf, sf, name="v")
    # The mask of unsaturated elements, from v the way the kernel rounds and saturates.
    target = np.dtype(ctx.dtype(q))
    r = v
    if target in _INT_RANGES:  # Round from opset 11; before it, floor(v + 1/2) (ties differ)
        r = (e("Round", v, name="rounded") if ctx.opset >= 11 else
             e("Floor", e("Add", v, ctx.const(0.5, m_dtype, "half"), name="v_half"),
               name="rounded"))
    if zp:
        r = e("Add", r, _expand(e, e.cast(zp, m_dtype, "zero_point"), ctx.shape(zp),
                                  x_shape, axis, block),
              name="shifted")
    if target in _INT_RANGES:
        lo, hi = _INT_RANGES[target]
    elif target not in _SPECIAL_FLOATS or ctx.attr("saturate", 1):
        hi = float(ml_dtypes.finfo(target).max)
        lo = -hi
    else:  # saturate=0 into a type with inf: nothing saturates
        lo = hi = None
    g = e.cast(ctx.GO(0), m_dtype, "dq")
    if lo is not None:
        below = e("Less", r, ctx.const(lo, m_dtype, "lo"), name="below")
        above = e("Greater", r, ctx.const(hi, m_dtype, "hi"), name="above")
        sat = e("Or", below, above, name="saturated")
        keep = e.cast(e("Not", sat, name="kept"), m_dtype, "mask")
        g = e("Mul", g, keep, name="dq_kept")
    dx = e("Div", g, sf, name="dx")
    if ctx.needs(0):
        e("Cast", dx, out=ctx.GI(0), to=elem_type(x_dtype))
    if ctx.needs(1):  # ds = -sum(dx * v)
        t = e("Neg", e("Mul", dx, v, name="dxv"), name="neg")
        ds = _reduce(e, t, s, x_shape, axis, block, ctx.tmp("ds"))
        e("Cast", ds, out=ctx.GI(1), to=elem_type(s_dtype))
    if ctx.needs(2):  # a computed zero point: dzp = sum(dq * m)
        _reduce(e, g, zp, x_shape, axis, block, ctx.GI(2))
    return e.nodes


@grad("DynamicQuantizeLinear", inputs=(0,))
def dynamic_quantize_linear_grad(ctx):
    # hi = max(max(x), 0), lo = min(min(x), 0), s = (hi - lo) / 255, zp = round(-lo / s),
    # q = saturate(round(x / s) + zp): straight through every rounding. With G_zp and G_s the
    # totals reaching zp and s (from the outputs and through q):
    #   G_zp = g_zp + sum(g_q m),  G_s = g_s - sum(g_q m x) / s^2 + G_zp lo / s^2,
    #   dx = g_q m / s + (G_s / 255) at the maximum (if > 0)
    #        - (G_zp / s + G_s / 255) at the minimum (if < 0),
    # ties at an extreme sharing its gradient equally (as torch's max() does); a constant x
    # (hi == lo, where the kernel takes s = 1) gets no range terms.
    x = ctx.I(0)
    dt = ctx.dtype(x)
    rank = len(ctx.shape(x))
    e = Emit(ctx)
    axes = list(range(rank))
    zero, one = e.k(0.0), e.k(1.0)
    mx = e.reduce("ReduceMax", x, axes, keepdims=0, name="max")
    mn = e.reduce("ReduceMin", x, axes, keepdims=0, name="min")
    hi, lo = e("Max", mx, zero, name="hi"), e("Min", mn, zero, name="lo")
    flat = e("Equal", hi, lo, name="flat")
    s = e("Where", flat, one, e("Div", e("Sub", hi, lo, name="range"), e.k(255.0), name="s_"),
          name="s")
    v = e("Div", x, s, name="v")
    zp = e("Round", e("Neg", e("Div", lo, s, name="lo_s"), name="zp_"), name="zp")
    r = e("Add", e("Round", v, name="rounded"), zp, name="shifted")
    sat = e("Or", e("Less", r, zero, name="below"), e("Greater", r, e.k(255.0), name="above"),
            name="saturated")
    m = e.cast(e("Not", sat, name="kept"), dt, "mask")
    s2 = e("Mul", s, s, name="s2")

    def total(names: list[str], label: str, out: str | None = None) -> str:
        names = [e.cast(g, dt, label) for g in names]
        if len(names) == 1:
            return e("Identity", names[0], out=out, name=label) if out else names[0]
        return e("Sum", *names, out=out, name=label)

    g_zp = [ctx.GO(2)] if ctx.GO(2) else []
    g_s = [ctx.GO(1)] if ctx.GO(1) else []
    terms = []
    if ctx.GO(0):
        gm = e("Mul", e.cast(ctx.GO(0), dt, "dq"), m, name="dq_kept")
        terms.append(e("Div", gm, s, name="dx_q"))
        g_zp.append(e.reduce("ReduceSum", gm, axes, keepdims=0, name="g_zp_q"))
        gx = e.reduce("ReduceSum", e("Mul", gm, x, name="gx"), axes, keepdims=0, name="gx_sum")
        g_s.append(e("Neg", e("Div", gx, s2, name="gx_s2"), name="g_s_q"))
    G_zp = total(g_zp, "G_zp") if g_zp else None
    if G_zp:
        g_s.append(e("Div", e("Mul", G_zp, lo, name="zp_lo"), s2, name="g_s_zp"))
    if g_s:
        G_s = e("Where", flat, zero, total(g_s, "G_s"), name="G_s_live")  # s = 1 when flat
        d_hi = e("Div", G_s, e.k(255.0), name="d_hi")
        d_lo = e("Neg", d_hi, name="d_lo_s")
        if G_zp:
            d_lo = e("Sub", d_lo, e("Div", G_zp, s, name="zp_s"), name="d_lo")
        for extreme, d, beyond in ((mx, d_hi, "Greater"), (mn, d_lo, "Less")):
            at = e.cast(e("Equal", x, extreme, name="at"), dt, "at_f")
            ties = e.reduce("ReduceSum", at, axes, keepdims=0, name="ties")
            live = e.cast(e(beyond, extreme, zero, name="beyond_zero"), dt, "live")
            share = e("Div", e("Mul", d, live, name="d_live"), ties, name="share")
            terms.append(e("Mul", at, share, name="d_extreme"))
    total(terms, "dx", out=ctx.GI(0))
    return e.nodes


# -- integer arithmetic, straight through: the float op on the dequantized-but-unscaled values --
def _twin_grad(ctx, e: Emit, op: str, ins: list[tuple[str, str, int]], attrs: dict,
               wanted: list[bool]) -> list[str | None]:
    """The gradients of the float op `op` over (integer input, zero point, the zero point's axis
    when it has one value per slice) triples, each input taken as a real number minus its zero
    point, from the integer op's output gradient; the float op's own rule builds them. Returns
    each input's gradient name (None where not wanted)."""
    from trainer.autodiff.context import GradContext
    from trainer.autodiff.registry import get_rule

    f32 = np.dtype(np.float32)
    shapes = {}
    floats = []
    for i, (x, zp, axis) in enumerate(ins):
        xf = e.cast(x, f32, f"in{i}")
        if zp:
            z = e.cast(zp, f32, f"zero_point{i}")
            if math.prod(ctx.shape(zp)) > 1:  # one per row of A, column of B, channel of W
                rank = len(ctx.shape(x))
                axis %= rank
                z = e.reshape(z, [1] * axis + [-1] + [1] * (rank - axis - 1), name="zp_axis")
            xf = e("Sub", xf, z, name=f"centered{i}")
        shapes[xf] = (tuple(ctx.shape(x)), f32)
        floats.append(xf)
    y = ctx.tmp("float_y")
    shapes[y] = (tuple(ctx.shape(ctx.O(0))), f32)
    gis = [ctx.tmp(f"d{i}") if w else None for i, w in enumerate(wanted)]
    twin = ctx.node(op, floats, [y], **attrs)
    sub = GradContext(twin, ctx.name + "/float", [e.cast(ctx.GO(0), f32, "dy")], gis, ctx.scope,
                      ctx.opset, ChainMap(shapes, ctx.shapes), ctx.constants)
    e.add(*get_rule(op)(sub))
    ctx.initializers.extend(sub.initializers)
    return gis


def _zero_point_grad(ctx, e: Emit, d: str, x: str, zp: str, keep_axis: int, out: str) -> None:
    """d(zp) = -sum(dx) over every axis but keep_axis (a per-row/per-channel zero point) or all
    of them (a scalar one), shaped like zp."""
    rank = len(ctx.shape(x))
    keep = keep_axis % rank if math.prod(ctx.shape(zp)) > 1 else None
    axes = [a for a in range(rank) if a != keep]
    s = e.reduce("ReduceSum", d, axes, keepdims=0, name="dzp_sum") if axes else d
    e.reshape(e("Neg", s, name="dzp_neg"), list(ctx.shape(zp)), out=out)


def _integer_op_grad(ctx, op: str, attrs: dict, zp_axes: tuple[int, int]):
    ins = [(ctx.I(0), ctx.I(2), zp_axes[0]), (ctx.I(1), ctx.I(3), zp_axes[1])]
    e = Emit(ctx)
    wanted = [ctx.needs(0) or ctx.needs(2), ctx.needs(1) or ctx.needs(3)]
    grads = _twin_grad(ctx, e, op, ins, attrs, wanted)
    for i in (0, 1):
        if ctx.needs(i):
            e("Identity", grads[i], out=ctx.GI(i))
        if ctx.needs(i + 2):
            _zero_point_grad(ctx, e, grads[i], *ins[i], ctx.GI(i + 2))
    return e.nodes


@grad("MatMulInteger")
def matmul_integer_grad(ctx):
    # Y = (A - a_zp) @ (B - b_zp) in int32, straight through: MatMul's gradients of the
    # centered operands; a_zp is per row of A (or scalar), b_zp per column of B.
    return _integer_op_grad(ctx, "MatMul", {}, (-2, -1))


@grad("ConvInteger")
def conv_integer_grad(ctx):
    # Y = Conv(X - x_zp, W - w_zp) in int32, straight through: Conv's gradients; w_zp is per
    # output channel (or scalar).
    return _integer_op_grad(ctx, "Conv", dict(ctx.attrs), (1, 0))


# -- requantizing ops, through the QDQ form they stand for -----------------------------------
def _through_decomposition(ctx, nodes: list, out: str, shapes: dict) -> list:
    """The op's gradient as that of `nodes`, its decomposition into DequantizeLinear, the float
    op and QuantizeLinear (whose rules pass the rounding straight through): the decomposition
    (fresh names; `out` stands for the op's output) and its backward, seeded with GO(0)."""
    from trainer.autodiff.engine import build_backward

    wrt = [ctx.I(i) for i in range(len(ctx.onnx_node.input)) if ctx.needs(i)]
    bwd, inits, grads = build_backward(nodes, {out: ctx.GO(0)}, list(dict.fromkeys(wrt)),
                                       ChainMap(shapes, ctx.shapes), ctx.opset, ctx.scope,
                                       ctx.constants)
    ctx.initializers.extend(inits)
    done = [*nodes, *bwd]
    for i in range(len(ctx.onnx_node.input)):
        if ctx.needs(i):
            done.append(ctx.node("Identity", [grads[ctx.I(i)]], [ctx.GI(i)]))
    return done


def _dq(ctx, x: str, s: str, zp: str, axis: int, shapes: dict, name: str) -> tuple:
    """DequantizeLinear(x, s, zp) into a fresh float32 tensor (its shape recorded in
    `shapes`); `axis` is for 1-D parameters with more than one value (which need opset 13)."""
    look = ChainMap(shapes, ctx.shapes)
    y = ctx.tmp(name)
    per_axis = math.prod(look[s][0]) > 1 or bool(zp and math.prod(look[zp][0]) > 1)
    if per_axis and ctx.opset < 13:
        from trainer.errors import ModelError
        raise ModelError(f"node '{ctx.name}' ({ctx.onnx_node.op_type}): gradients through "
                         f"per-row or per-channel quantization parameters need opset >= 13 "
                         f"(the model has {ctx.opset}); convert it with "
                         "onnx.version_converter")
    attrs = {"axis": axis % max(len(look[x][0]), 1)} if per_axis else {}
    shapes[y] = (tuple(look[x][0]), np.dtype(np.float32))
    return ctx.node("DequantizeLinear", [x, s] + ([zp] if zp else []), [y], **attrs), y


def _requantized(ctx, nodes: list, op: str, ins: list[str], attrs: dict, shapes: dict,
                 axis: int | None) -> list:
    """The float op over the dequantized inputs, then QuantizeLinear with y's parameters (per
    `axis` when they have several values): the gradient through that decomposition."""
    y_s, y_zp = ctx.I(6), ctx.I(7)
    out_shape = tuple(ctx.shape(ctx.O(0)))
    y, q = ctx.tmp("y_real"), ctx.tmp("y_quantized")
    shapes[y] = (out_shape, np.dtype(np.float32))
    shapes[q] = (out_shape, np.dtype(ctx.dtype(ctx.O(0))))
    per_axis = axis is not None and math.prod(ctx.shape(y_s)) > 1
    nodes += [ctx.node(op, ins, [y], **attrs),
              ctx.node("QuantizeLinear", [y, y_s, y_zp], [q],
                       axis=axis % len(out_shape) if per_axis else None)]
    return _through_decomposition(ctx, nodes, q, shapes)


@grad("QLinearMatMul", inputs=(0, 1, 2, 3, 4, 5, 6, 7))
def qlinear_matmul_grad(ctx):
    # y = QuantizeLinear(MatMul(DequantizeLinear(a), DequantizeLinear(b)), y_scale, y_zp):
    # a's parameters per row, b's and y's per column (or per tensor).
    shapes: dict = {}
    na, af = _dq(ctx, ctx.I(0), ctx.I(1), ctx.I(2), -2, shapes, "a_real")
    nb, bf = _dq(ctx, ctx.I(3), ctx.I(4), ctx.I(5), -1, shapes, "b_real")
    return _requantized(ctx, [na, nb], "MatMul", [af, bf], {}, shapes, -1)


@grad("QLinearConv", inputs=(0, 1, 2, 3, 4, 5, 6, 7))
def qlinear_conv_grad(ctx):
    # y = QuantizeLinear(Conv(DequantizeLinear(x), DequantizeLinear(w), B * x_scale * w_scale),
    # y_scale, y_zp); w's parameters per output channel (or per tensor); B is int32 data.
    shapes: dict = {}
    nx, xf = _dq(ctx, ctx.I(0), ctx.I(1), ctx.I(2), 0, shapes, "x_real")
    nw, wf = _dq(ctx, ctx.I(3), ctx.I(4), ctx.I(5), 0, shapes, "w_real")
    nodes, ins = [nx, nw], [xf, wf]
    if ctx.I(8):
        b_s = ctx.tmp("bias_scale")
        shapes[b_s] = (tuple(ctx.shape(ctx.I(4))), np.dtype(np.float32))
        nodes.append(ctx.node("Mul", [ctx.I(1), ctx.I(4)], [b_s]))
        nbias, bias = _dq(ctx, ctx.I(8), b_s, "", 0, shapes, "bias_real")
        nodes.append(nbias)
        ins.append(bias)
    return _requantized(ctx, nodes, "Conv", ins, dict(ctx.attrs), shapes, None)
