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
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from trainer.autodiff.registry import grad, straight_through
from trainer.autodiff.rules.norm import Emit
from trainer.graph import elem_type

straight_through("QuantizeLinear", "DynamicQuantizeLinear")

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
