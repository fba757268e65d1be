"""Gradient rules for resampling and detection ops: Resize, Upsample, GridSample, AffineGrid,
CenterCropPad, DeformConv, RoiAlign, MaxRoiPool (NonMaxSuppression carries no gradient).

Resize is linear in X with per-axis interpolation matrices known from static shapes and
constant scales: dX applies their transposes (one MatMul per axis, a Reshape + ReduceSum for
integer nearest upsampling). Point sampling (GridSample, DeformConv) gathers the interpolation
taps of every point at once; dX is one ScatterND-add of the weighted dY, d(position) a MatMul
of the gathered taps with dY.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from onnx import numpy_helper

from trainer.autodiff.registry import grad, no_gradient
from trainer.errors import ModelError
from trainer.graph import elem_type
from trainer.kernels.image import _DENSE_LIMIT, _axis_table

no_gradient("NonMaxSuppression")

DENSE_LIMIT = _DENSE_LIMIT  # largest in * out axis whose adjoint is a dense MatMul


def _i64(ctx, values, suffix="i"):
    return ctx.const(np.asarray(values, np.int64), suffix=suffix)


def _static(ctx, i: int, what: str):
    """Value of the constant input i (None if absent or empty); ModelError if computed."""
    if len(ctx.onnx_node.input) <= i or not ctx.I(i):
        return None
    v = ctx.static_value(ctx.I(i))
    if v is None:
        raise ModelError(f"node '{ctx.name}' ({ctx.onnx_node.op_type}): {what} must be a "
                         "constant to differentiate")
    v = np.asarray(v)
    return v if v.size else None


def _zeros(ctx, shape, dtype, out: str):
    return ctx.node("ConstantOfShape", [_i64(ctx, list(shape), "shape")], [out],
                    value=numpy_helper.from_array(np.zeros(1, dtype)))


class _Emit:
    """Collects nodes; e(op, inputs, **attrs) adds one and returns its (fresh) output name."""

    def __init__(self, ctx):
        self.ctx, self.nodes = ctx, []

    def __call__(self, op: str, inputs: list[str], suffix: str = "t", out: str | None = None,
                 **attrs) -> str:
        out = out or self.ctx.tmp(suffix)
        self.nodes.append(self.ctx.node(op, list(inputs), [out], **attrs))
        return out

    def c(self, value, dtype, suffix: str = "c") -> str:
        return self.ctx.const(np.asarray(value, dtype), suffix=suffix)

    def reshape(self, x: str, shape, suffix: str = "r", out: str | None = None) -> str:
        return self("Reshape", [x, _i64(self.ctx, list(shape), "shape")], suffix, out)

    def cast(self, x: str, dtype, suffix: str = "cast") -> str:
        return self("Cast", [x], suffix, to=elem_type(np.dtype(dtype)))

    def sum(self, x: str, axes, suffix: str = "sum", out: str | None = None,
            keepdims: int = 0, op: str = "ReduceSum") -> str:
        out = out or self.ctx.tmp(suffix)
        self.nodes.append(self.ctx.reduce(op, x, axes, out, keepdims=keepdims))
        return out

    def ge(self, a: str, b: str, suffix: str = "ge") -> str:
        if self.ctx.opset >= 12:
            return self("GreaterOrEqual", [a, b], suffix)
        return self("Not", [self("Less", [a, b], "lt")], suffix)

    def le(self, a: str, b: str, suffix: str = "le") -> str:
        if self.ctx.opset >= 12:
            return self("LessOrEqual", [a, b], suffix)
        return self("Not", [self("Greater", [a, b], "gt")], suffix)

    def unsqueeze(self, x: str, axis: int, suffix: str = "unsq") -> str:
        if self.ctx.opset >= 13:
            return self("Unsqueeze", [x, _i64(self.ctx, [axis], "axes")], suffix)
        return self("Unsqueeze", [x], suffix, axes=[axis])



# -- Resize / Upsample ---------------------------------------------------------------------------
def _resize_axes(x_shape, *, scales, sizes, roi, axes, mode, ctm, nearest_mode, cubic_coeff_a,
                 exclude_outside, antialias, policy):
    """[(axis, (idx [out, taps], weights or None, outside or None))] for every axis the Resize
    kernel resamples (same geometry as trainer.kernels.image._resize)."""
    r = len(x_shape)
    axes = [a % r for a in axes] if axes else list(range(r))
    n = len(axes)
    inputs = [x_shape[a] for a in axes]
    if sizes is not None:
        sizes = [int(v) for v in sizes]
        ratios = [sizes[i] / inputs[i] for i in range(n)]
        if policy == "stretch":
            scale, out, width = ratios, sizes, [float(v) for v in sizes]
        else:
            s = min(ratios) if policy == "not_larger" else max(ratios)
            scale, out = [s] * n, [int(s * v + 0.5) for v in inputs]
            width = [s * v for v in inputs]
    else:
        scale = [float(v) for v in scales]
        width = [scale[i] * inputs[i] for i in range(n)]
        out = [int(w) for w in width]
    rois = [(float(roi[i]), float(roi[i + n])) for i in range(n)] if roi is not None else [
        None] * n
    plan = []
    for i, axis in enumerate(axes):
        crop = ctm == "tf_crop_and_resize" and rois[i] is not None and rois[i] != (0.0, 1.0)
        if scale[i] == 1.0 and out[i] == inputs[i] and not crop:
            continue
        plan.append((axis, _axis_table(
            inputs[i], out[i], scale[i], width[i], rois[i], mode=mode, ctm=ctm,
            nearest_mode=nearest_mode, cubic_coeff_a=cubic_coeff_a,
            exclude_outside=exclude_outside, antialias=antialias)))
    return plan


def _resize_adjoint(ctx, plan, dt) -> list:
    """dX = A_axis^T applied to dY along every resampled axis (A: [out, in] interpolation);
    nearest upsampling by an integer factor is a Reshape + ReduceSum instead."""
    x_shape, cur = list(ctx.shape(ctx.I(0))), list(ctx.shape(ctx.O(0)))
    r = len(cur)
    nodes, t = [], ctx.GO(0)
    repeat = {}  # axis -> factor: out = in * f, output o reads input o // f
    for axis, (idx, w, outside) in plan:
        n_in, n_out = x_shape[axis], cur[axis]
        f = n_out // n_in
        if (w is None and outside is None and n_out == n_in * f
                and np.array_equal(idx[:, 0], np.arange(n_out) // f)):
            repeat[axis] = f
            continue
        out = ctx.GI(0) if not repeat and axis == plan[-1][0] else ctx.tmp("resized")
        weights = np.ones(idx.shape) if w is None else w
        if outside is not None:  # extrapolated outputs do not depend on X
            weights = np.where(outside[:, None], 0.0, weights)
        if n_in * n_out <= DENSE_LIMIT:
            dense = np.zeros((n_out, n_in))
            np.add.at(dense, (np.arange(n_out)[:, None], idx), weights)
            nodes += _matmul_along(ctx, t, cur, axis, dense.astype(dt), out)
        else:
            nodes += _gather_along(ctx, t, cur, axis, idx, weights, n_in, dt, out)
        cur[axis] = n_in
        t = out
    if repeat:
        split, sum_axes = [], []
        for a in range(r):
            if a in repeat:
                split += [x_shape[a], repeat[a]]
                sum_axes.append(len(split) - 1)
            else:
                split.append(cur[a])
        s = ctx.tmp("blocks")
        nodes += [ctx.reshape(t, split, s),
                  ctx.reduce("ReduceSum", s, sum_axes, ctx.GI(0), keepdims=0)]
    elif t != ctx.GI(0):
        nodes.append(ctx.node("Identity", [t], [ctx.GI(0)]))
    return nodes


def _matmul_along(ctx, t, shape, axis, dense, out) -> list:
    """t (shape, `out` long at axis) times dense [out, in] contracted along that axis."""
    r = len(shape)
    if axis == r - 1:
        return [ctx.node("MatMul", [t, ctx.const(dense, suffix="interp")], [out])]
    at = ctx.const(np.ascontiguousarray(dense.T), suffix="interpT")
    if axis == r - 2:
        return [ctx.node("MatMul", [at, t], [out])]
    lead, trail = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    t3, m3 = ctx.tmp("t3"), ctx.tmp("m3")
    return [ctx.reshape(t, [lead, shape[axis], trail], t3), ctx.node("MatMul", [at, t3], [m3]),
            ctx.reshape(m3, shape[:axis] + [dense.shape[1]] + shape[axis + 1:], out)]


def _gather_along(ctx, t, shape, axis, idx, weights, n_in, dt, out) -> list:
    """The adjoint along one large axis without a dense matrix: every input position gathers
    the outputs that read it (padded to the most readers, weight 0) and sums them weighted."""
    readers: list[dict[int, float]] = [{} for _ in range(n_in)]
    for o, t_ in itertools.product(range(idx.shape[0]), range(idx.shape[1])):
        if weights[o, t_] != 0:
            d = readers[idx[o, t_]]
            d[o] = d.get(o, 0.0) + weights[o, t_]
    most = max(1, max(len(d) for d in readers))
    src, wt = np.zeros((n_in, most), np.int64), np.zeros((n_in, most))
    for i, d in enumerate(readers):
        src[i, :len(d)] = list(d)
        wt[i, :len(d)] = list(d.values())
    r = len(shape)
    g, g2, p = ctx.tmp("taps"), ctx.tmp("taps2"), ctx.tmp("weighted")
    return [ctx.node("Gather", [t, _i64(ctx, src.reshape(-1), "readers")], [g], axis=axis),
            ctx.reshape(g, shape[:axis] + [n_in, most] + shape[axis + 1:], g2),
            ctx.node("Mul", [g2, ctx.const(wt.reshape([n_in, most] + [1] * (r - axis - 1))
                                           .astype(dt), suffix="weights")], [p]),
            ctx.reduce("ReduceSum", p, [axis + 1], out, keepdims=0)]


@grad("Resize", inputs=(0,))
def resize_grad(ctx):
    # Y = X resampled along each axis by a constant matrix A (scales/sizes/roi constant):
    # dX = dY A^T per axis; extrapolated outputs (tf_crop_and_resize) get no gradient
    x_shape = ctx.shape(ctx.I(0))
    if ctx.opset < 11:
        plan = _resize_axes(x_shape, scales=_static(ctx, 1, "scales"), sizes=None, roi=None,
                            axes=None, mode=ctx.attr("mode", "nearest"), ctm="asymmetric",
                            nearest_mode="simple", cubic_coeff_a=-0.75, exclude_outside=0,
                            antialias=0, policy="stretch")
    else:
        ctm = ctx.attr("coordinate_transformation_mode", "half_pixel")
        roi = _static(ctx, 1, "roi") if ctm == "tf_crop_and_resize" else None
        plan = _resize_axes(
            x_shape, scales=_static(ctx, 2, "scales"), sizes=_static(ctx, 3, "sizes"), roi=roi,
            axes=ctx.attr("axes"), mode=ctx.attr("mode", "nearest"), ctm=ctm,
            nearest_mode=ctx.attr("nearest_mode", "round_prefer_floor"),
            cubic_coeff_a=ctx.attr("cubic_coeff_a", -0.75),
            exclude_outside=ctx.attr("exclude_outside", 0),
            antialias=ctx.attr("antialias", 0),
            policy=ctx.attr("keep_aspect_ratio_policy", "stretch"))
    return _resize_adjoint(ctx, plan, ctx.dtype(ctx.I(0)))


@grad("Upsample", inputs=(0,))
def upsample_grad(ctx):
    # as Resize (asymmetric coordinates): dX = dY A^T per axis
    if ctx.opset >= 9:
        scales = _static(ctx, 1, "scales")
    elif ctx.opset >= 7:
        scales = ctx.attr("scales")
    else:
        scales = [1.0, 1.0, ctx.attr("height_scale"), ctx.attr("width_scale")]
    mode = ctx.attr("mode", "nearest")
    plan = _resize_axes(ctx.shape(ctx.I(0)), scales=scales, sizes=None, roi=None, axes=None,
                        mode="linear" if mode in ("linear", "bilinear") else mode,
                        ctm="asymmetric", nearest_mode="simple", cubic_coeff_a=-0.75,
                        exclude_outside=0, antialias=0, policy="stretch")
    return _resize_adjoint(ctx, plan, ctx.dtype(ctx.I(0)))


# -- CenterCropPad / AffineGrid ------------------------------------------------------------------
@grad("CenterCropPad", inputs=(0,))
def center_crop_pad_grad(ctx):
    # cropping at offset (d - t) // 2 and padding at offset (t - d) // 2 are adjoint to each
    # other: dX = CenterCropPad(dY, shape(X))
    x_shape = ctx.shape(ctx.I(0))
    rank = len(x_shape)
    axes = [a % rank for a in (ctx.attr("axes") or range(rank))]
    return [ctx.node("CenterCropPad", [ctx.GO(0), _i64(ctx, [x_shape[a] for a in axes],
                                                       "shape")],
                     [ctx.GI(0)], axes=list(axes) if ctx.attr("axes") else None)]


@grad("AffineGrid", inputs=(0,))
def affine_grid_grad(ctx):
    # grid[n] = base @ theta[n]^T (base: [P, k+1] homogeneous coordinates): dtheta = dgrid^T base
    theta_shape, grid_shape = ctx.shape(ctx.I(0)), ctx.shape(ctx.O(0))
    n, k = theta_shape[0], theta_shape[1]
    spatial = list(grid_shape[1:-1])
    axes = []
    for length in reversed(spatial):
        if ctx.attr("align_corners", 0):
            axes.append(np.linspace(-1.0, 1.0, length) if length > 1 else np.zeros(length))
        else:
            axes.append((2 * np.arange(length) + 1) / length - 1)
    mesh = np.meshgrid(*axes[::-1], indexing="ij")
    base = np.stack([mesh[k - 1 - i] for i in range(k)] + [np.ones(spatial)], axis=-1)
    base = base.reshape(-1, k + 1).astype(ctx.dtype(ctx.I(0)))
    g, gt = ctx.tmp("dgrid"), ctx.tmp("dgridT")
    return [ctx.reshape(ctx.GO(0), [n, -1, k], g),
            ctx.node("Transpose", [g], [gt], perm=[0, 2, 1]),
            ctx.node("MatMul", [gt, ctx.const(base, suffix="base")], [ctx.GI(0)])]


# -- point sampling (GridSample, DeformConv) -------------------------------------------------------
def _reflect(e: _Emit, x: str, lo: float, hi: float, dt) -> tuple[str, str]:
    """x reflected at the borders lo and hi until it lies within them (the kernels' rule), and
    the derivative of that map (-1 where the reflected point runs against x, else 1)."""
    span = hi - lo
    if span <= 0:
        zero = e("Mul", [x, e.c(0.0, dt)], "zero")
        return e("Add", [zero, e.c(lo, dt)], "refl"), zero
    below = e("Less", [x, e.c(lo, dt)], "below")
    above = e("Greater", [x, e.c(hi, dt)], "above")
    d = e("Where", [below, e("Sub", [e.c(lo, dt), x], "dlo"), e("Sub", [x, e.c(hi, dt)], "dhi")],
          "d")
    flips = e("Floor", [e("Div", [d, e.c(span, dt)], "turns")], "flips")
    rest = e("Sub", [d, e("Mul", [flips, e.c(span, dt)], "span_n")], "rest")
    half = e("Mul", [flips, e.c(0.5, dt)], "half")
    even = e("Equal", [e("Floor", [half], "half_floor"), half], "even")
    from_lo = e("Add", [e.c(lo, dt), rest], "from_lo")
    from_hi = e("Sub", [e.c(hi, dt), rest], "from_hi")
    refl = e("Where", [below, e("Where", [even, from_lo, from_hi], "rb"),
                       e("Where", [even, from_hi, from_lo], "ra")], "refl")
    outside = e("Or", [below, above], "outside")
    flipped = e("And", [outside, even], "flipped")
    deriv = e("Where", [flipped, e.c(-1.0, dt), e.c(1.0, dt)], "deriv")
    return e("Where", [outside, refl, x], "reflected"), deriv


def _axis_taps(e: _Emit, v: str, size: int, mode: str, padding: str, border, dt, a: float):
    """Taps of one spatial dim at positions v [B, P]: (idx [B, P, T] int64 in [0, size),
    weight, d weight / d v), weights being [B, P, T] tensors, [T] arrays, or None (all ones)."""
    ctx = e.ctx
    if mode == "nearest":
        idx = e.unsqueeze(e.cast(e("Round", [v], "round"), np.int64, "idx"), 2, "idx1")
        w = dw = None
    else:
        lo = e("Floor", [v], "floor")
        f1 = e.unsqueeze(e("Sub", [v, lo], "frac"), 2, "frac1")
        lo1 = e.unsqueeze(e.cast(lo, np.int64, "floor_i"), 2, "floor1")
        if mode == "linear":  # taps lo, lo+1: w = (1 - f, f)
            offs, sgn, off = [0, 1], np.array([-1.0, 1.0]), [1.0, 0.0]
        else:  # Keys' cubic at distances D = (1 + f, f, 1 - f, 2 - f)
            offs, sgn, off = [-1, 0, 1, 2], np.array([1.0, 1.0, -1.0, -1.0]), [1.0, 0, 1, 2]
        idx = e("Add", [lo1, _i64(ctx, offs, "taps")], "idx")
        dist = e("Add", [e("Mul", [f1, e.c(sgn, dt)], "sf"), e.c(off, dt)], "dist")
        if mode == "linear":
            w, dw = dist, sgn.astype(dt)
        else:  # outer taps (1 <= D <= 2) and inner taps (D <= 1) as cubics in D (Horner)
            coef = np.array([[a, a + 2, a + 2, a], [-5 * a, -(a + 3), -(a + 3), -5 * a],
                             [8 * a, 0.0, 0.0, 8 * a], [-4 * a, 1.0, 1.0, -4 * a]])
            h = e("Mul", [dist, e.c(coef[0], dt)], "h")
            for i in (1, 2):
                h = e("Mul", [e("Add", [h, e.c(coef[i], dt)], "h"), dist], "h")
            w = e("Add", [h, e.c(coef[3], dt)], "w")
            g = e("Mul", [dist, e.c(3 * coef[0] * sgn, dt)], "g")
            g = e("Mul", [e("Add", [g, e.c(2 * coef[1] * sgn, dt)], "g"), dist], "g")
            dw = e("Add", [g, e.c(coef[2] * sgn, dt)], "dw")
    if padding == "zeros":  # taps outside read zeros: weight 0
        ok = e("And", [e.ge(idx, _i64(ctx, 0)), e("Less", [idx, _i64(ctx, size)], "lt")],
               "inside")
        okf = e.cast(ok, dt, "inside_f")
        if w is None:
            w = okf
        else:
            w = e("Mul", [w, okf], "w_in")
            dw = e("Mul", [okf, e.c(dw, dt) if isinstance(dw, np.ndarray) else dw], "dw_in")
    elif padding == "reflection" and mode == "cubic":  # each tap reflected on its own
        refl, _ = _reflect(e, e.cast(idx, dt, "idx_f"), *border, dt)
        idx = e.cast(refl, np.int64, "idx_r")
    idx = e("Clip", [idx, _i64(ctx, 0), _i64(ctx, size - 1)], "idx_c")
    return idx, w, dw


def _sample_taps(e: _Emit, coords, sizes, b: int, p: int, mode, padding, borders, dt,
                 a: float = -0.75):
    """All interpolation taps of B x P points at once: (rows [B, P * T^k] int64 into the
    [B * S, Cg] image rows, weights [B, P, T^k] or None, d weights / d coords[d] per dim)."""
    k = len(sizes)
    per_dim = [_axis_taps(e, coords[d], sizes[d], mode, padding, borders[d], dt, a)
               for d in range(k)]
    t = {"nearest": 1, "linear": 2, "cubic": 4}[mode]

    def combine(parts, op, scale=None):
        acc = None
        for d, x in enumerate(parts):
            if x is None:
                continue
            shape = [t if j == d else 1 for j in range(k)]
            if isinstance(x, np.ndarray):
                y = e.c(x.reshape([1, 1] + shape), x.dtype, "tap_c")
            else:
                if scale is not None and scale[d] != 1:
                    x = e("Mul", [x, _i64(e.ctx, scale[d])], "scaled")
                y = e.reshape(x, [b, p] + shape, "tap_grid")
            acc = y if acc is None else e(op, [acc, y], "tap_comb")
        return acc
    strides = [math.prod(sizes[d + 1:]) for d in range(k)]
    flat = combine([i for i, _, _ in per_dim], "Add", strides)
    base = (np.arange(b) * math.prod(sizes)).reshape([b, 1] + [1] * k)
    flat = e.reshape(e("Add", [flat, _i64(e.ctx, base, "image")], "rows"), [b, p * t ** k],
                     "rows_flat")
    weights = combine([w for _, w, _ in per_dim], "Mul")  # None, or a [B, P, ...] tensor
    if weights is not None:
        weights = e.reshape(weights, [b, p, t ** k], "weights")
    dws = []
    if mode != "nearest":
        for d in range(k):
            parts = [dw if j == d else w for j, (_, w, dw) in enumerate(per_dim)]
            dw = combine(parts, "Mul")
            if all(isinstance(x, np.ndarray) for x in parts):
                dw = e("Expand", [dw, _i64(e.ctx, [b, p] + [t] * k, "shape")], "dw_full")
            dws.append(e.reshape(dw, [b, p, t ** k], "dweights"))
    return flat, weights, dws, t ** k


def _scatter_rows(e: _Emit, flat, weights, dv, b, p, taps, rows: int, cg: int, dt) -> str:
    """Adjoint of the sampling: weights x dv ([B, P, Cg]) added into [rows, Cg] at the taps."""
    if weights is None:
        upd = e.reshape(dv, [b * p * taps, cg], "upd")
    else:
        upd = e("Mul", [e.reshape(weights, [b, p, taps, 1], "w4"),
                        e.reshape(dv, [b, p, 1, cg], "dv4")], "upd")
        upd = e.reshape(upd, [b * p * taps, cg], "upd2")
    zeros = e.ctx.tmp("zeros")
    e.nodes.append(_zeros(e.ctx, [rows, cg], dt, zeros))
    return e("ScatterND", [zeros, e.reshape(flat, [b * p * taps, 1], "idx2"), upd], "dx_rows",
             reduction="add")


def _tap_position_grads(e: _Emit, gathered, dv, dws, b, p, taps, cg) -> list[str]:
    """d coords[d] [B, P] = sum over taps and channels of dv * gathered * d weight / d coord."""
    g = e("MatMul", [e.reshape(gathered, [b, p, taps, cg], "g4"),
                     e.reshape(dv, [b, p, cg, 1], "dv4")], "g_dv")
    g = e.reshape(g, [b, p, taps], "g_dv3")
    return [e.sum(e("Mul", [g, dw], "gdw"), [2], "dpos") for dw in dws]


def _channels_last(e: _Emit, x: str, shape, rows: int, suffix: str) -> str:
    """[B, C, *S] -> [B * S, C] (image rows, channels last)."""
    k = len(shape) - 2
    t = e("Transpose", [x], suffix, perm=[0] + list(range(2, k + 2)) + [1])
    return e.reshape(t, [rows, shape[1]], suffix)


@grad("GridSample")
def grid_sample_grad(ctx):
    # Y[n, c, o] = sum_taps w(grid[n, o]) X[n, c, tap]: dX = scatter-add of w dY at the taps;
    # dgrid = sum_c dY X[tap] dw/dv * dv/dgrid, v the unnormalized (padded) position. Nearest
    # gives dgrid = 0 (PyTorch); clamped border positions and reflections chain as 0 and -1.
    x, grid = ctx.I(0), ctx.I(1)
    x_shape, g_shape = list(ctx.shape(x)), list(ctx.shape(grid))
    n, c, sizes = x_shape[0], x_shape[1], x_shape[2:]
    k, p = len(sizes), math.prod(g_shape[1:-1])
    mode = ctx.attr("mode", "linear" if ctx.opset >= 20 else "bilinear")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    padding = ctx.attr("padding_mode", "zeros")
    align = ctx.attr("align_corners", 0)
    xdt, gdt = ctx.dtype(x), ctx.dtype(grid)
    e = _Emit(ctx)
    if ctx.needs(1) and mode == "nearest":
        e.nodes.append(_zeros(ctx, g_shape, gdt, ctx.GI(1)))
        if not ctx.needs(0):
            return e.nodes
    g = e.reshape(grid, [n, p, k], "grid")
    coords, borders, chain = [], [], []
    for d, size in enumerate(sizes):
        gd = e("Gather", [g, _i64(ctx, k - 1 - d)], "g", axis=2)  # x (innermost) comes first
        scale = (size - 1) / 2 if align else size / 2
        v = e("Add", [e("Mul", [gd, e.c(scale, gdt)], "gs"), e.c((size - 1) / 2, gdt)], "v")
        lo, hi = (0.0, size - 1.0) if align else (-0.5, size - 0.5)
        if mode == "nearest":
            v = e("Round", [v], "v_round")
        deriv = None
        if padding == "border" and mode != "cubic":
            ins = e("And", [e.ge(v, e.c(lo, gdt)), e.le(v, e.c(hi, gdt))], "in")
            clipped = e("Clip", [v, e.c(0.0, gdt), e.c(size - 1.0, gdt)], "clip")
            v = e("Where", [ins, v, clipped], "v_border")
            deriv = e.cast(ins, gdt, "in_f")
        elif padding == "reflection" and mode != "cubic":
            v, deriv = _reflect(e, v, lo, hi, gdt)
        coords.append(v)
        borders.append((lo, hi))
        chain.append((deriv, scale))
    flat, weights, dws, taps = _sample_taps(e, coords, sizes, n, p, mode, padding, borders, gdt)
    if weights is not None and gdt != xdt:
        weights = e.cast(weights, xdt, "w_x")
    dv = e.reshape(e("Transpose", [ctx.GO(0)], "dyT", perm=[0] + list(range(2, k + 2)) + [1]),
                   [n, p, c], "dv")
    rows = n * math.prod(sizes)
    if ctx.needs(0):
        dxr = _scatter_rows(e, flat, weights, dv, n, p, taps, rows, c, xdt)
        dx = e.reshape(dxr, [n] + sizes + [c], "dx_last")
        e("Transpose", [dx], out=ctx.GI(0), perm=[0, k + 1] + list(range(1, k + 1)))
    if ctx.needs(1) and mode != "nearest":
        gathered = e("Gather", [_channels_last(e, x, x_shape, rows, "x_rows"), flat], "taps",
                     axis=0)
        if gdt != xdt:
            gathered, dv = e.cast(gathered, gdt, "taps_g"), e.cast(dv, gdt, "dv_g")
        dpos = _tap_position_grads(e, gathered, dv, dws, n, p, taps, c)
        parts = []
        for d in reversed(range(k)):  # grid order: innermost spatial dim first
            deriv, scale = chain[d]
            t = e("Mul", [dpos[d], e.c(scale, gdt)], "dg")
            if deriv is not None:
                t = e("Mul", [t, deriv], "dg_chain")
            parts.append(e.reshape(t, [n, p, 1], "dg1"))
        e.reshape(e("Concat", parts, "dgrid", axis=2), g_shape, out=ctx.GI(1))
    return e.nodes


@grad("DeformConv")
def deform_conv_grad(ctx):
    # cols = mask * bilinear(X at regular taps + offset); Y = W cols (grouped) + B:
    # dW = dY cols^T, dcols = W^T dY, dmask = sum_c dcols * samples, and the sampling adjoint
    # gives dX (scatter-add) and doffset (as GridSample's position gradient); dB = sum(dY)
    x, w, off = ctx.I(0), ctx.I(1), ctx.I(2)
    mask = ctx.I(4) if len(ctx.onnx_node.input) > 4 and ctx.I(4) else None
    x_shape, w_shape, o_shape = list(ctx.shape(x)), list(ctx.shape(w)), list(ctx.shape(off))
    n, c, sizes = x_shape[0], x_shape[1], x_shape[2:]
    k, m = len(sizes), w_shape[0]
    kshape = list(ctx.attr("kernel_shape") or w_shape[2:])
    strides = list(ctx.attr("strides") or [1] * k)
    dilations = list(ctx.attr("dilations") or [1] * k)
    pads = list(ctx.attr("pads") or [0] * (2 * k))
    group, og = ctx.attr("group", 1), ctx.attr("offset_group", 1)
    out = o_shape[2:]
    nk, po = math.prod(kshape), math.prod(out)
    b, p, cog, cg, mg = n * og, nk * po, c // og, c // group, m // group
    dt = ctx.dtype(x)
    e = _Emit(ctx)
    dy = ctx.GO(0)
    dy4 = e.reshape(dy, [n, group, mg, po], "dy4")
    if ctx.needs(3):
        e.sum(dy, [0] + list(range(2, k + 2)), out=ctx.GI(3))
    need_samples = ctx.needs(1) or ctx.needs(2) or ctx.needs(4)
    if not (need_samples or ctx.needs(0)):
        return e.nodes
    offs = e.reshape(off, [b, nk, k, po], "offsets")
    taps = np.stack(np.unravel_index(np.arange(nk), kshape))
    grid = np.stack(np.unravel_index(np.arange(po), out))
    coords = []
    for d in range(k):
        base = (grid[d][None, :] * strides[d] - pads[d] + taps[d][:, None] * dilations[d])
        od = e("Gather", [offs, _i64(ctx, d)], "offset_d", axis=2)
        coords.append(e.reshape(e("Add", [od, e.c(base, dt)], "pos"), [b, p], "pos2"))
    flat, weights, dws, t = _sample_taps(e, coords, sizes, b, p, "linear", "zeros",
                                         [None] * k, dt)
    maskp = e.reshape(mask, [b, p, 1], "mask3") if mask else None
    if need_samples:
        xr = e.reshape(x, [n, og, cog, math.prod(sizes)], "x_og")
        xr = e.reshape(e("Transpose", [xr], "x_og_last", perm=[0, 1, 3, 2]),
                       [b * math.prod(sizes), cog], "x_rows")
        gathered = e("Gather", [xr, flat], "taps", axis=0)  # [B, P * T, Cg]
        samples = e.reshape(e("MatMul", [e.reshape(weights, [b, p, 1, t], "w4"),
                                         e.reshape(gathered, [b, p, t, cog], "g4")],
                              "samples4"), [b, p, cog], "samples")
    if ctx.needs(1):  # cols as [N, G, Cg*K, O]: channel, then tap, then output position
        cols = e("Mul", [samples, maskp], "cols") if mask else samples
        cols = e("Transpose", [e.reshape(cols, [n, og, nk, po, cog], "cols5")], "colsT",
                 perm=[0, 1, 4, 2, 3])
        cols = e.reshape(cols, [n, group, cg * nk, po], "cols4")
        colsT = e("Transpose", [cols], "cols4T", perm=[0, 1, 3, 2])
        dw = e.sum(e("MatMul", [dy4, colsT], "dw_n"), [0], "dw_sum")
        e.reshape(dw, w_shape, out=ctx.GI(1))
    wt = e("Transpose", [e.reshape(w, [group, mg, cg * nk], "w3")], "w3T", perm=[0, 2, 1])
    dcols = e("MatMul", [wt, dy4], "dcols")  # [N, G, Cg*K, O]
    dcols = e("Transpose", [e.reshape(dcols, [n, og, cog, nk, po], "dcols5")], "dcolsT",
              perm=[0, 1, 3, 4, 2])
    dcols = e.reshape(dcols, [b, p, cog], "dcols3")
    if ctx.needs(4):
        dmask = e.sum(e("Mul", [dcols, samples], "dm"), [2], "dmask")
        e.reshape(dmask, ctx.shape(mask), out=ctx.GI(4))
    dv = e("Mul", [dcols, maskp], "dv") if mask else dcols
    if ctx.needs(0):
        dxr = _scatter_rows(e, flat, weights, dv, b, p, t, b * math.prod(sizes), cog, dt)
        dx = e("Transpose", [e.reshape(dxr, [n, og, math.prod(sizes), cog], "dx4")], "dxT",
               perm=[0, 1, 3, 2])
        e.reshape(dx, x_shape, out=ctx.GI(0))
    if ctx.needs(2):
        dpos = _tap_position_grads(e, gathered, dv, dws, b, p, t, cog)
        parts = [e.reshape(dp, [b, nk, 1, po], "dpos4") for dp in dpos]
        doff = e("Concat", parts, "doffset", axis=2) if k > 1 else parts[0]
        e.reshape(doff, o_shape, out=ctx.GI(2))
    return e.nodes


# -- RoiAlign / MaxRoiPool -------------------------------------------------------------------------
def _roi_samples(e: _Emit, box: str, cols, size: int, pooled: int, sr: int, half: bool, dt):
    """Sample positions along one axis of every RoI bin, placed as the RoiAlign kernel does:
    low, high, frac, inside, used ([R, pooled, M] with M samples per bin; used None when all
    are) and the samples per bin [R]. M is sampling_ratio, or else the most any RoI uses
    (ceil(bin size), data-dependent)."""
    ctx = e.ctx
    start = e("Gather", [box, _i64(ctx, cols[0])], "start", axis=1)
    length = e("Sub", [e("Gather", [box, _i64(ctx, cols[1])], "end", axis=1), start], "len")
    if not half:  # malformed RoIs are forced to 1x1
        length = e("Max", [length, e.c(1.0, dt)], "len1")
    bin_size = e("Div", [length, e.c(float(pooled), dt)], "bin")
    if sr > 0:
        grid = e.c(float(sr), dt, "grid")
        it = e.c(np.arange(sr).reshape(1, 1, sr), dt, "it")
        spacing = e("Div", [bin_size, grid], "spacing")
        used = None
    else:
        grid = e("Ceil", [bin_size], "grid")
        most = e("Max", [e.sum(grid, [0], "most0", op="ReduceMax"), e.c(1.0, dt)], "most")
        it = e.reshape(e("Range", [e.c(0.0, dt), most, e.c(1.0, dt)], "it0"), [1, 1, -1], "it")
        used = e("Less", [it, e.reshape(grid, [-1, 1, 1], "grid3")], "used")
        spacing = e("Div", [bin_size, e("Max", [grid, e.c(1.0, dt)], "gs")], "spacing")
    ph = e("Mul", [e.c(np.arange(pooled).reshape(1, pooled, 1), dt),
                   e.reshape(bin_size, [-1, 1, 1], "bin3")], "ph")
    offs = e("Mul", [e("Add", [it, e.c(0.5, dt)], "it_mid"),
                     e.reshape(spacing, [-1, 1, 1], "spacing3")], "offs")
    pos = e("Add", [e("Add", [e.reshape(start, [-1, 1, 1], "start3"), ph], "bin_start"), offs],
            "pos")
    inside = e("And", [e.ge(pos, e.c(-1.0, dt)), e.le(pos, e.c(float(size), dt))], "inside")
    pos = e("Max", [pos, e.c(0.0, dt)], "pos0")
    low = e("Min", [e("Floor", [pos], "fl"), e.c(size - 1.0, dt)], "low")
    high = e("Min", [e("Add", [low, e.c(1.0, dt)], "lo1"), e.c(size - 1.0, dt)], "high")
    edge = e.ge(low, e.c(size - 1.0, dt), "edge")
    frac = e("Sub", [e("Where", [edge, low, pos], "posc"), low], "frac")
    return {"low": low, "high": high, "frac": frac, "inside": inside, "used": used,
            "grid": grid}


def _bin_matrix(e: _Emit, s: dict, size: int, dt) -> str:
    """Dense [R, pooled, size]: the summed interpolation weights of each bin's samples."""
    ok = s["inside"] if s["used"] is None else e("And", [s["inside"], s["used"]], "ok")
    okf = e.cast(ok, dt, "ok_f")
    wh = e("Mul", [s["frac"], okf], "wh")
    wl = e("Sub", [okf, wh], "wl")
    grid = _i64(e.ctx, np.arange(size), "positions")
    total = None
    for idx, w in ((s["low"], wl), (s["high"], wh)):
        idx = e.unsqueeze(e.cast(idx, np.int64, "idx"), 3)
        hit = e.cast(e("Equal", [idx, grid], "hit"), dt, "hit_f")
        part = e("Mul", [hit, e.unsqueeze(w, 3)], "part")
        total = part if total is None else e("Add", [total, part], "both")
    return e.sum(total, [2], "bin_weights")


def _to_batches(e: _Emit, per_roi: str, batch_indices: str, n: int, r: int, x_shape, dt):
    """dX[b] = sum of per_roi [R, ...] over the RoIs of batch image b (a one-hot MatMul)."""
    rows = e.reshape(batch_indices, [1, r], "rows")
    onehot = e.cast(e("Equal", [rows, _i64(e.ctx, np.arange(n).reshape(n, 1), "images")],
                      "onehot"), dt, "onehot_f")
    flat = e.reshape(per_roi, [r, -1], "per_roi")
    return e.reshape(e("MatMul", [onehot, flat], "summed"), x_shape, out=e.ctx.GI(0))


def _check_scatter_opset(ctx, what: str) -> None:
    if ctx.opset < 16:
        raise ModelError(f"{what} gradient (node '{ctx.name}') needs opset >= 16 "
                         f"(ScatterElements with reduction=add); the model has opset "
                         f"{ctx.opset}: convert it with onnx.version_converter")


def _argmax_scatter(e: _Emit, cand, flat, weight, rows, x_shape) -> str:
    """Route dY [R, C, PH, PW] to the candidate that won each max: cand [R, C, PH, PW, K]
    (-inf where not a candidate), flat / weight [R, 1, PH, PW, K] (position in the image,
    interpolation weight or None), rows [R] the RoI's batch image. Ties go to the first."""
    ctx = e.ctx
    n, c = x_shape[:2]
    hw = math.prod(x_shape[2:])
    dt = ctx.dtype(ctx.I(0))
    r = ctx.shape(ctx.O(0))[0]
    win = e("ArgMax", [cand], "win", axis=4, keepdims=1)
    best = e("GatherElements", [cand, win], "best", axis=4)
    hit = e.cast(e("Not", [e("Equal", [best, e.c(-np.inf, dt)], "empty")], "found"), dt, "hit")
    shape = _i64(ctx, [1, c, 1, 1, 1], "shape")
    pos = e("GatherElements", [e("Expand", [flat, shape], "flat_c"), win], "pos", axis=4)
    upd = e("Mul", [e.unsqueeze(ctx.GO(0), 4), hit], "upd")
    if weight is not None:
        w = e("GatherElements", [e("Expand", [weight, shape], "w_c"), win], "w", axis=4)
        upd = e("Mul", [upd, w], "upd_w")
    plane = e("Add", [e("Mul", [e.reshape(rows, [r, 1, 1, 1, 1], "rows5"), _i64(ctx, c)], "bc"),
                      _i64(ctx, np.arange(c).reshape(1, c, 1, 1, 1), "channels")], "plane")
    idx = e("Add", [e("Mul", [plane, _i64(ctx, hw)], "plane_start"), pos], "target")
    zeros = ctx.tmp("zeros")
    e.nodes.append(_zeros(ctx, [n * c * hw], dt, zeros))
    dx = e("ScatterElements", [zeros, e.reshape(idx, [-1], "target_flat"),
                               e.reshape(upd, [-1], "upd_flat")], "dx_flat", axis=0,
           reduction="add")
    return e.reshape(dx, x_shape, out=ctx.GI(0))


def _candidates(e: _Emit, x: str, x_shape, rows: str, flat: str, perm, r: int, ph: int,
                pw: int) -> str:
    """Values x[rows[r], c, flat[r, ...]] laid out [R, C, PH, PW, K] (perm moves the
    [R, PH, ..., C] gather result there, K the flattened rest)."""
    n = x_shape[0]
    hw = math.prod(x_shape[2:])
    xr = _channels_last(e, x, x_shape, n * hw, "x_rows")
    rank = len(perm) - 1
    start = e("Mul", [e.reshape(rows, [r] + [1] * (rank - 1), "rows_b"), _i64(e.ctx, hw)],
              "row_start")
    v = e("Gather", [xr, e("Add", [start, flat], "global")], "values", axis=0)
    return e.reshape(e("Transpose", [v], "valuesT", perm=perm), [r, x_shape[1], ph, pw, -1],
                     "cand")


@grad("RoiAlign", inputs=(0,))
def roi_align_grad(ctx):
    # avg: Y[r, c] = Ay[r] X[b(r), c] Ax[r]^T / count[r] (Ay, Ax: each bin's summed bilinear
    # weights over the image rows / columns): dX[b] = sum_{r in b} Ay[r]^T dY[r] Ax[r] / count;
    # max: dY goes to the winning weighted corner of the winning sample, times its weight
    x, rois, bi = ctx.I(0), ctx.I(1), ctx.I(2)
    x_shape = list(ctx.shape(x))
    n, c, h, w = x_shape
    r = ctx.shape(rois)[0]
    ph, pw = ctx.attr("output_height", 1), ctx.attr("output_width", 1)
    sr = ctx.attr("sampling_ratio", 0)
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel") if ctx.opset >= 16 else \
        "output_half_pixel"
    half = ctm == "half_pixel"
    dt = ctx.dtype(x)
    avg = ctx.attr("mode", "avg") == "avg"
    if not avg:
        _check_scatter_opset(ctx, "RoiAlign (mode=max)")
    if sr <= 0 and ctx.opset < 11:
        raise ModelError(f"RoiAlign node '{ctx.name}': the gradient with adaptive sampling "
                         "(sampling_ratio=0) needs opset >= 11 (Range); convert the model "
                         "with onnx.version_converter or set sampling_ratio")
    e = _Emit(ctx)
    box = e("Mul", [rois, e.c(ctx.attr("spatial_scale", 1.0), dt)], "box")
    if half:
        box = e("Sub", [box, e.c(0.5, dt)], "box_shift")
    ys = _roi_samples(e, box, (1, 3), h, ph, sr, half, dt)
    xs = _roi_samples(e, box, (0, 2), w, pw, sr, half, dt)
    if avg:
        ay, ax = _bin_matrix(e, ys, h, dt), _bin_matrix(e, xs, w, dt)
        count = e("Max", [e("Mul", [ys["grid"], xs["grid"]], "count"), e.c(1.0, dt)], "count1")
        dy = e("Div", [ctx.GO(0), e.reshape(count, [-1, 1, 1, 1], "count4")], "dy_avg")
        u = e("MatMul", [dy, e.reshape(ax, [r, 1, pw, w], "ax4")], "u")  # [R, C, PH, W]
        ayt = e("Transpose", [e.reshape(ay, [r, 1, ph, h], "ay4")], "ayT", perm=[0, 1, 3, 2])
        per_roi = e("MatMul", [ayt, u], "per_roi")  # [R, C, H, W]
        _to_batches(e, per_roi, bi, n, r, x_shape, dt)
        return e.nodes
    # max: candidates are the 4 weighted corners of every sample, [R, PH, MH, PW, MW, 4]
    def along_y(t, s):
        return e.reshape(t, [r, ph, -1, 1, 1, 1], s)

    def along_x(t, s):
        return e.reshape(t, [r, 1, 1, pw, -1, 1], s)
    one = e.c(1.0, dt)
    wy = {"low": e("Sub", [one, ys["frac"]], "wy_lo"), "high": ys["frac"]}
    wx = {"low": e("Sub", [one, xs["frac"]], "wx_lo"), "high": xs["frac"]}
    inside = e("Mul", [along_y(e.cast(ys["inside"], dt, "yin"), "yin6"),
                       along_x(e.cast(xs["inside"], dt, "xin"), "xin6")], "inside")
    flats, weights = [], []
    for cy, cx in (("low", "low"), ("low", "high"), ("high", "low"), ("high", "high")):
        fy = e("Mul", [along_y(ys[cy], "fy"), e.c(float(w), dt)], "fy_w")
        flats.append(e("Add", [fy, along_x(xs[cx], "fx")], "corner"))
        wc = e("Mul", [along_y(wy[cy], "wy6"), along_x(wx[cx], "wx6")], "wc")
        weights.append(e("Mul", [wc, inside], "wc_in"))
    flat = e.cast(e("Concat", flats, "corners", axis=5), np.int64, "corners_i")
    weight = e("Concat", weights, "corner_w", axis=5)
    rows = e.cast(bi, np.int64, "rows")
    v = _candidates(e, x, x_shape, rows, flat, [0, 6, 1, 3, 2, 4, 5], r, ph, pw)
    wk = e.reshape(e("Transpose", [weight], "wT", perm=[0, 1, 3, 2, 4, 5]),
                   [r, 1, ph, pw, -1], "wk")
    cand = e("Mul", [v, wk], "weighted")
    if ys["used"] is not None:  # adaptive sampling: bins use their own sample counts
        used = e("And", [e.reshape(ys["used"], [r, 1, -1, 1, 1, 1], "yu6"),
                         e.reshape(xs["used"], [r, 1, 1, 1, -1, 1], "xu6")], "used")
        used = e("Expand", [used, _i64(ctx, [1, ph, 1, pw, 1, 1], "shape")], "used_bins")
        used = e("Expand", [used, _i64(ctx, [1] * 5 + [4], "shape")], "used4")
        used = e.reshape(e("Transpose", [used], "uT", perm=[0, 1, 3, 2, 4, 5]),
                         [r, 1, ph, pw, -1], "uk")
        cand = e("Where", [used, cand, e.c(-np.inf, dt)], "cand_used")
    fk = e.reshape(e("Transpose", [flat], "fT", perm=[0, 1, 3, 2, 4, 5]), [r, 1, ph, pw, -1],
                   "fk")
    _argmax_scatter(e, cand, fk, wk, rows, x_shape)
    return e.nodes


@grad("MaxRoiPool", inputs=(0,))
def max_roi_pool_grad(ctx):
    # dY of each bin goes to the bin's maximal element (the first one on ties, as PyTorch's
    # roi_pool); empty bins give nothing
    _check_scatter_opset(ctx, "MaxRoiPool")
    x, rois = ctx.I(0), ctx.I(1)
    x_shape = list(ctx.shape(x))
    n, c, h, w = x_shape
    r = ctx.shape(rois)[0]
    ph, pw = ctx.attr("pooled_shape")
    dt = ctx.dtype(x)
    e = _Emit(ctx)
    scaled = e("Mul", [rois, e.c(ctx.attr("spatial_scale", 1.0), dt)], "scaled")
    corner = e("Mul", [e("Sign", [scaled], "sign"),
                       e("Floor", [e("Add", [e("Abs", [scaled], "abs"), e.c(0.5, dt)], "h")],
                         "rounded")], "corner")  # rounded half away from zero
    bins = []
    for cols, size, pooled in (((2, 4), h, ph), ((1, 3), w, pw)):
        start = e("Gather", [corner, _i64(ctx, cols[0])], "start", axis=1)
        end = e("Gather", [corner, _i64(ctx, cols[1])], "end", axis=1)
        length = e("Max", [e("Add", [e("Sub", [end, start], "len0"), e.c(1.0, dt)], "len1"),
                           e.c(1.0, dt)], "len")
        bin_size = e.reshape(e("Div", [length, e.c(float(pooled), dt)], "bin"), [r, 1], "bin2")
        p = e.c(np.arange(pooled).reshape(1, pooled), dt, "p")
        start2 = e.reshape(start, [r, 1], "start2")
        lo = e("Add", [e("Floor", [e("Mul", [p, bin_size], "pb")], "fl"), start2], "lo0")
        hi = e("Add", [e("Ceil", [e("Mul", [e("Add", [p, e.c(1.0, dt)], "p1"), bin_size],
                                          "p1b")], "cl"), start2], "hi0")
        lo = e("Clip", [lo, e.c(0.0, dt), e.c(float(size), dt)], "lo")
        hi = e("Clip", [hi, e.c(0.0, dt), e.c(float(size), dt)], "hi")
        most = e("Max", [e.sum(e("Sub", [hi, lo], "extent"), [0, 1], "most0", op="ReduceMax"),
                         e.c(1.0, dt)], "most")
        it = e("Range", [e.c(0.0, dt), most, e.c(1.0, dt)], "it")
        idx = e("Add", [e.unsqueeze(lo, 2), it], "idx")
        ok = e("Less", [idx, e.unsqueeze(hi, 2)], "ok")
        idx = e("Clip", [idx, e.c(0.0, dt), e.c(size - 1.0, dt)], "idx_c")
        bins.append((idx, ok))
    (yi, yok), (xi, xok) = bins
    fy = e.reshape(e("Mul", [yi, e.c(float(w), dt)], "fy"), [r, ph, -1, 1, 1], "fy5")
    flat = e.cast(e("Add", [fy, e.reshape(xi, [r, 1, 1, pw, -1], "fx5")], "flat"), np.int64,
                  "flat_i")
    ok = e("And", [e.reshape(yok, [r, ph, -1, 1, 1], "yok5"),
                   e.reshape(xok, [r, 1, 1, pw, -1], "xok5")], "ok")
    rows = e.cast(e("Gather", [rois, _i64(ctx, 0)], "batch", axis=1), np.int64, "rows")
    v = _candidates(e, x, x_shape, rows, flat, [0, 5, 1, 3, 2, 4], r, ph, pw)
    okk = e.reshape(e("Transpose", [ok], "okT", perm=[0, 1, 3, 2, 4]), [r, 1, ph, pw, -1], "okk")
    cand = e("Where", [okk, v, e.c(-np.inf, dt)], "cand")
    fk = e.reshape(e("Transpose", [flat], "fT", perm=[0, 1, 3, 2, 4]), [r, 1, ph, pw, -1], "fk")
    _argmax_scatter(e, cand, fk, None, rows, x_shape)
    return e.nodes
