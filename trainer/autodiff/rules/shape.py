"""Gradient rules for shape, slicing, padding, gather/scatter and selection ops: the gradient
is the adjoint data movement (gathers become scatter-adds, slices become pads, and so on)."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from trainer.autodiff.registry import FREQ_KEY, PADDING_KEY, grad, no_gradient
from trainer.errors import ModelError
from trainer.graph import elem_type
from trainer.kernels.shape import spec_slice

no_gradient("Shape", "Size", "NonZero", "Unique", "OneHot", "Range", "EyeLike",
            "ConstantOfShape", "Constant")

_INT64_MIN = int(np.iinfo(np.int64).min)
_INT64_MAX = int(np.iinfo(np.int64).max)


# -- opset-aware building blocks -------------------------------------------------------------
def _zeros(ctx, shape, dtype, nodes: list, fill: float = 0.0) -> str:
    """A constant tensor (zeros) made at run time by ConstantOfShape, not stored in the graph."""
    shape = [int(d) for d in shape]
    if ctx.opset < 9 or int(np.prod(shape)) <= 16:
        return ctx.const(np.full(shape, fill, dtype), suffix="filled")
    out = ctx.tmp("filled")
    value = numpy_helper.from_array(np.full(1, fill, dtype))
    nodes.append(ctx.node("ConstantOfShape", [ctx.const(shape, np.int64, "shape")], [out],
                          value=value))
    return out


def _reshape(ctx, x: str, shape, nodes: list, out: str | None = None) -> str:
    out = out or ctx.tmp("reshaped")
    if ctx.opset < 5:
        nodes.append(ctx.node("Reshape", [x], [out], shape=[int(d) for d in shape]))
    else:
        nodes.append(ctx.reshape(x, shape, out))
    return out


def _slice(ctx, x: str, starts, ends, axes, nodes: list, steps=None, out: str | None = None
           ) -> str:
    out = out or ctx.tmp("slice")
    if ctx.opset < 10:
        assert steps is None or all(s == 1 for s in steps)
        nodes.append(ctx.node("Slice", [x], [out], starts=list(starts), ends=list(ends),
                              axes=list(axes)))
        return out
    ins = [ctx.const(list(v), np.int64, n) for v, n in ((starts, "starts"), (ends, "ends"),
                                                       (axes, "axes"))]
    if steps is not None:
        ins.append(ctx.const(list(steps), np.int64, "steps"))
    nodes.append(ctx.node("Slice", [x, *ins], [out]))
    return out


def _pad(ctx, x: str, pads, nodes: list, out: str | None = None) -> str:
    """Zero padding; pads = [begin_0.., end_0..] over every axis (negative values crop)."""
    out = out or ctx.tmp("pad")
    pads = [int(p) for p in pads]
    if ctx.opset >= 11:
        nodes.append(ctx.node("Pad", [x, ctx.const(pads, np.int64, "pads")], [out]))
    else:
        nodes.append(ctx.node("Pad", [x], [out], **{"pads" if ctx.opset >= 2 else "paddings":
                                                      pads}))
    return out


def _to_int64(ctx, name: str, nodes: list) -> str:
    if ctx.dtype(name) == np.int64:
        return name
    out = ctx.tmp("i64")
    nodes.append(ctx.node("Cast", [name], [out], to=elem_type(np.int64)))
    return out


def _static(ctx, i: int, what: str) -> np.ndarray:
    """The value of a shape-like input the gradient needs at build time."""
    value = ctx.static_value(ctx.I(i))
    if value is None:
        raise ModelError(f"node '{ctx.name}' ({ctx.onnx_node.op_type}): its {what} input must be "
                         "a constant (or computed from shapes) to differentiate")
    return np.asarray(value)


def _scatter_add_rows(ctx, rows: str, upd: str, m: int, width: int, n_rows: int, out: str,
                      nodes: list, static_rows: np.ndarray | None = None) -> None:
    """out[r] = sum of upd[j] over j with rows[j] == r; rows [m] int64 in [0, n_rows), upd
    [m, D], out [n_rows, D]. Scatter-add from opset 16; before it a sort-based segment sum
    (opset 11) or a one-hot matmul (opset < 11)."""
    dt = ctx.dtype(ctx.O(0))
    unique = static_rows is not None and len(np.unique(static_rows)) == len(static_rows)
    if ctx.opset >= 11 and (ctx.opset >= 16 or unique):
        rows2 = _reshape(ctx, rows, [-1, 1], nodes)
        zeros = _zeros(ctx, [n_rows, width], dt, nodes)
        reduction = None if unique else "add"
        nodes.append(ctx.node("ScatterND", [zeros, rows2, upd], [out], reduction=reduction))
        return
    if ctx.opset < 11:  # one-hot rows: out = onehot(rows)^T @ upd
        hit, oh, oht = ctx.tmp("hit"), ctx.tmp("onehot"), ctx.tmp("onehot_T")
        classes = ctx.const(np.arange(n_rows, dtype=np.int64).reshape(1, -1), suffix="rows")
        nodes += [ctx.node("Equal", [_reshape(ctx, rows, [-1, 1], nodes), classes], [hit]),
                  ctx.node("Cast", [hit], [oh], to=elem_type(dt)),
                  ctx.node("Transpose", [oh], [oht], perm=[1, 0]),
                  ctx.node("MatMul", [oht, upd], [out])]
        return
    # Sort rows, prefix-sum the sorted updates (in float64: differences of prefix sums stay
    # exact to ~1e-16), keep each run's last prefix sum, difference them, scatter once.
    if static_rows is not None:
        perm = np.argsort(static_rows, kind="stable")
        s = static_rows[perm]
        last = np.append(s[1:] != s[:-1], True)
        order = ctx.const(perm.astype(np.int64), suffix="perm")
        ends = ctx.const(np.nonzero(last)[0].astype(np.int64), suffix="run_ends")
        targets = ctx.const(s[last].astype(np.int64), suffix="targets")
    else:
        s, order = ctx.tmp("sorted"), ctx.tmp("perm")
        nodes.append(ctx.node("TopK", [rows, ctx.const([m], np.int64, "k")], [s, order],
                              axis=0, largest=0, sorted=1))
    su = ctx.tmp("sorted_upd")
    nodes.append(ctx.node("Gather", [upd, order], [su], axis=0))
    if dt != np.float64:
        su64 = ctx.tmp("f64")
        nodes.append(ctx.node("Cast", [su], [su64], to=elem_type(np.float64)))
        su = su64
    csum, cend = ctx.tmp("cumsum"), ctx.tmp("run_sums")
    nodes.append(ctx.node("CumSum", [su, ctx.const(0, np.int64, "axis")], [csum]))
    if static_rows is not None:
        nodes.append(ctx.node("Gather", [csum, ends], [cend], axis=0))
        n_runs = int(last.sum())
    else:
        nxt, same, last_t, targets = (ctx.tmp("next"), ctx.tmp("same"), ctx.tmp("last"),
                                      ctx.tmp("targets"))
        tail = _slice(ctx, s, [1], [m], [0], nodes)
        nodes += [ctx.node("Concat", [tail, ctx.const([-1], np.int64, "end")], [nxt], axis=0),
                  ctx.node("Equal", [s, nxt], [same]), ctx.node("Not", [same], [last_t]),
                  ctx.node("Compress", [csum, last_t], [cend], axis=0),
                  ctx.node("Compress", [s, last_t], [targets], axis=0)]
        n_runs = None
    shifted, prev, seg = ctx.tmp("shifted"), ctx.tmp("prev"), ctx.tmp("run_totals")
    nodes.append(ctx.node("Concat", [ctx.const(np.zeros((1, width)), suffix="zero_row"), cend],
                          [shifted], axis=0))
    _slice(ctx, shifted, [0], [n_runs if n_runs is not None else -1], [0], nodes, out=prev)
    nodes.append(ctx.node("Sub", [cend, prev], [seg]))
    if dt != np.float64:
        back = ctx.tmp("cast")
        nodes.append(ctx.node("Cast", [seg], [back], to=elem_type(dt)))
        seg = back
    zeros = _zeros(ctx, [n_rows, width], dt, nodes)
    nodes.append(ctx.node("ScatterND", [zeros, _reshape(ctx, targets, [-1, 1], nodes), seg],
                          [out]))


def _rows_grad(ctx, rows: str, static_rows, m: int, n_rows: int, dy: str, x_shape, nodes):
    """GI(0) = reshape(scatter_add_rows(rows, reshape(dy, [m, -1])), x_shape)."""
    width = int(np.prod(x_shape)) // max(n_rows, 1)
    upd = _reshape(ctx, dy, [m, width], nodes)
    flat = ctx.tmp("rows_grad")
    _scatter_add_rows(ctx, rows, upd, m, width, n_rows, flat, nodes, static_rows)
    _reshape(ctx, flat, x_shape, nodes, ctx.GI(0))
    return nodes


def _normalized(ctx, i: int, dims, nodes: list) -> tuple[str | None, np.ndarray | None]:
    """Indices input i as int64 in [0, dims) (negative ones wrapped): (None, value) when it is
    a constant, else (the tensor's name, None)."""
    value = ctx.static_value(ctx.I(i))
    if value is not None:
        return None, np.asarray(value).astype(np.int64) % np.maximum(np.asarray(dims, np.int64),
                                                                      1)
    idx = _to_int64(ctx, ctx.I(i), nodes)
    if ctx.opset < 10:  # Mod arrives at 10; negative indices arrive at 11
        return idx, None
    out = ctx.tmp("wrapped")
    nodes.append(ctx.node("Mod", [idx, ctx.const(np.asarray(dims, np.int64), suffix="dims")],
                          [out]))
    return out, None


# -- reshaping, joining, splitting -----------------------------------------------------------
def _reshape_back(ctx):
    # dX = reshape(dY, shape(X)) (X's shape at run time where it follows the data)
    return ctx.reshape_as(ctx.GO(0), ctx.I(0), ctx.GI(0))


for _op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
    grad(_op, inputs=(0,))(_reshape_back)


@grad("Transpose")
def transpose_grad(ctx):
    # dX = transpose(dY, inverse(perm))
    rank = len(ctx.shape(ctx.I(0)))
    if rank == 0:  # (a scalar's transpose is itself: no perm to write)
        return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]
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
    axis = ctx.attr("axis", 1) % rank  # the attribute is optional (default 1) before opset 4
    inputs = list(range(len(ctx.onnx_node.input)))
    sizes = [ctx.shape(ctx.I(i))[axis] for i in inputs]
    outs = [ctx.GI(i) if ctx.needs(i) else ctx.tmp(f"unused{i}") for i in inputs]
    if ctx.opset >= 13 and any(ctx.I(i) in ctx.data_sized for i in inputs):
        # (each input's length along the axis as it is at run time)
        nodes, lengths = [], []
        for i in inputs:
            shape, n = ctx.tmp("shape"), ctx.tmp("length")
            nodes += [ctx.node("Shape", [ctx.I(i)], [shape]),
                      ctx.node("Gather", [shape, ctx.const([axis], np.int64, "axis")], [n],
                               axis=0)]
            lengths.append(n)
        split = ctx.tmp("split")
        nodes += [ctx.node("Concat", lengths, [split], axis=0),
                  ctx.node("Split", [ctx.GO(0), split], outs, axis=axis)]
        return nodes
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
        elif out in ctx.data_sized and ctx.opset >= 9:  # (zeros of its size at run time)
            shape, zeros = ctx.tmp("shape"), ctx.tmp("zeros")
            nodes += [ctx.node("Shape", [out], [shape]),
                      ctx.node("ConstantOfShape", [shape], [zeros], value=numpy_helper.from_array(
                          np.zeros(1, ctx.dtype(out))))]
            parts.append(zeros)
        else:
            parts.append(_zeros(ctx, ctx.shape(out), ctx.dtype(out), nodes))
    nodes.append(ctx.node("Concat", parts, [ctx.GI(0)], axis=axis))
    return nodes


@grad("Tile", inputs=(0,))
def tile_grad(ctx):
    # dX = sum over the tiles: reshape dY to [r0, n0, r1, n1, ...] and sum the r axes
    x_shape = ctx.shape(ctx.I(0))
    if ctx.opset < 6:  # Tile-1: scalar `tiles` along scalar `axis`
        reps = [1] * len(x_shape)
        reps[int(_static(ctx, 2, "axis").reshape(-1)[0]) % len(x_shape)] = int(
            _static(ctx, 1, "tiles").reshape(-1)[0])
    else:
        reps = [int(r) for r in _static(ctx, 1, "repeats").reshape(-1)]
    if all(r == 1 for r in reps):
        return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]
    split, axes = [], []
    for r, n in zip(reps, x_shape, strict=True):
        if r != 1:
            axes.append(len(split))
            split.append(r)
        split.append(n)
    nodes: list = []
    if ctx.I(0) in ctx.data_sized and ctx.opset >= 11:  # (X's sizes at run time)
        dims, parts = ctx.tmp("x_dims"), []
        nodes.append(ctx.node("Shape", [ctx.I(0)], [dims]))
        for i, r in enumerate(reps):
            if r != 1:
                parts.append(ctx.const([r], np.int64, "reps"))
            parts.append(ctx.tmp("dim"))
            nodes.append(ctx.node("Slice", [dims, ctx.const([i], np.int64, "at"),
                                            ctx.const([i + 1], np.int64, "at")], [parts[-1]]))
        split = ctx.tmp("split")
        nodes.append(ctx.node("Concat", parts, [split], axis=0))
        t = ctx.tmp("tiles")
        nodes.append(ctx.node("Reshape", [ctx.GO(0), split], [t]))
    else:
        t = _reshape(ctx, ctx.GO(0), split, nodes)
    nodes.append(ctx.reduce("ReduceSum", t, axes, ctx.GI(0), keepdims=0))
    return nodes


_DEPTH_SPACE = {  # (op, mode) -> (the forward's intermediate shape, its permutation)
    ("DepthToSpace", "DCR"): (lambda b, c, h, w, s: (b, s, s, c // s**2, h, w),
                              (0, 3, 4, 1, 5, 2)),
    ("DepthToSpace", "CRD"): (lambda b, c, h, w, s: (b, c // s**2, s, s, h, w),
                              (0, 1, 4, 2, 5, 3)),
    ("SpaceToDepth", "DCR"): (lambda b, c, h, w, s: (b, c, h // s, s, w // s, s),
                              (0, 3, 5, 1, 2, 4)),
    ("SpaceToDepth", "CRD"): (lambda b, c, h, w, s: (b, c, h // s, s, w // s, s),
                              (0, 1, 3, 5, 2, 4)),
}


def _depth_space_grad(ctx):
    # Y = reshape(transpose(reshape(X, mid), perm)): dX = reshape(transpose(reshape(dY,
    # perm(mid)), perm^-1), shape(X))
    mid_of, perm = _DEPTH_SPACE[(ctx.onnx_node.op_type, ctx.attr("mode", "DCR"))]
    mid = mid_of(*ctx.shape(ctx.I(0)), ctx.attr("blocksize"))
    nodes: list = []
    t = _reshape(ctx, ctx.GO(0), [mid[p] for p in perm], nodes)
    u = ctx.tmp("T")
    nodes.append(ctx.node("Transpose", [t], [u], perm=np.argsort(perm).tolist()))
    _reshape(ctx, u, ctx.shape(ctx.I(0)), nodes, ctx.GI(0))
    return nodes


grad("DepthToSpace")(_depth_space_grad)
grad("SpaceToDepth")(_depth_space_grad)


# -- slicing and padding ---------------------------------------------------------------------
@grad("Slice", inputs=(0,))
def slice_grad(ctx):
    # dX = dY placed at the sliced positions, zeros elsewhere: one Pad for unit steps; negative
    # steps reverse dY first, steps s > 1 interleave s - 1 zeros (pad a new axis, merge it)
    x_shape = ctx.shape(ctx.I(0))
    rank = len(x_shape)
    if ctx.opset < 10:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes, steps = ctx.attr("axes") or list(range(len(starts))), [1] * len(starts)
    elif ctx.opset >= 11 and (ctx.I(0) in ctx.data_sized or any(
            ctx.I(i) and ctx.static_value(ctx.I(i)) is None for i in (1, 2, 4))):
        return _slice_grad_at_run_time(ctx)
    else:
        starts = _static(ctx, 1, "starts").reshape(-1).tolist()
        ends = _static(ctx, 2, "ends").reshape(-1).tolist()
        axes = (_static(ctx, 3, "axes").reshape(-1).tolist() if ctx.I(3)
                else list(range(len(starts))))
        steps = _static(ctx, 4, "steps").reshape(-1).tolist() if ctx.I(4) else [1] * len(starts)
    nodes: list = []
    if int(np.prod(ctx.shape(ctx.O(0)))) == 0:
        nodes.append(ctx.node("Identity", [_zeros(ctx, x_shape, ctx.dtype(ctx.I(0)), nodes)],
                              [ctx.GI(0)]))
        return nodes
    lo, step, count = [0] * rank, [1] * rank, list(x_shape)
    rev = []
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = int(a) % rank
        pos = range(*spec_slice(s, e, st, x_shape[a]).indices(x_shape[a]))
        lo[a], step[a], count[a] = min(pos), abs(int(st)), len(pos)
        if st < 0 and len(pos) > 1:
            rev.append(a)
    g = ctx.GO(0)
    if rev:
        g = _slice(ctx, g, [-1] * len(rev), [_INT64_MIN] * len(rev), rev, nodes,
                   steps=[-1] * len(rev))
    strided = [a for a in range(rank) if step[a] > 1 and count[a] > 1]
    extent = list(count)
    if strided:
        inner = []
        for a in range(rank):
            inner += [count[a], 1] if a in strided else [count[a]]
        pads = [0] * (2 * len(inner))
        k = 0
        for a in range(rank):
            if a in strided:
                pads[len(inner) + k + 1] = step[a] - 1
                extent[a] = count[a] * step[a]
            k += 2 if a in strided else 1
        g = _reshape(ctx, _pad(ctx, _reshape(ctx, g, inner, nodes), pads, nodes), extent, nodes)
    over = [a for a in range(rank) if lo[a] + extent[a] > x_shape[a]]
    if over:
        g = _slice(ctx, g, [0] * len(over), [x_shape[a] - lo[a] for a in over], over, nodes)
        for a in over:
            extent[a] = x_shape[a] - lo[a]
    _pad(ctx, g, lo + [x_shape[a] - lo[a] - extent[a] for a in range(rank)], nodes, ctx.GI(0))
    return nodes


def _slice_grad_at_run_time(ctx) -> list:
    """Slice's gradient where its starts, ends or steps are computed from the data, or X's size
    follows the data: axis by axis (the last sliced first), dY scattered into zeros of X's size
    along that axis at the positions the same Slice takes from Range(0, X's size there) (so
    clamping, negative starts and steps are Slice's own). The axes must be constants."""
    rank = len(ctx.shape(ctx.I(0)))
    n = int(np.prod(ctx.shape(ctx.I(1)))) if ctx.shape(ctx.I(1)) else 1
    axes = ([int(a) % rank for a in _static(ctx, 3, "axes").reshape(-1)] if ctx.I(3)
            else list(range(n)))
    nodes: list = []
    made: dict[int, str] = {}

    def at(k: int) -> str:  # (the 1-D int64 constant [k])
        if k not in made:
            made[k] = ctx.const([k], np.int64, "at")
        return made[k]
    x_dims = ctx.tmp("x_dims")
    nodes.append(ctx.node("Shape", [ctx.I(0)], [x_dims]))
    zero = numpy_helper.from_array(np.zeros(1, ctx.dtype(ctx.I(0))))
    g = ctx.GO(0)
    for j in reversed(range(len(axes))):
        a = axes[j]
        t = {k: ctx.tmp(k) for k in ("dim", "size", "positions", "taken", "g_dims", "dims",
                                      "filled", "rows", "index")}
        bounds = []
        for i in (1, 2, 4):  # (this axis's start, end and step)
            if i == 4 and not ctx.I(4):
                break
            b = ctx.tmp("bound")
            nodes.append(ctx.node("Slice", [_to_int64(ctx, ctx.I(i), nodes), at(j), at(j + 1)],
                                  [b]))
            bounds.append(b)
        nodes += [ctx.node("Slice", [x_dims, at(a), at(a + 1)], [t["dim"]]),
                  ctx.node("Squeeze", [t["dim"]], [t["size"]]),
                  ctx.node("Range", [ctx.const(0, np.int64, "zero"), t["size"],
                                     ctx.const(1, np.int64, "one")], [t["positions"]]),
                  ctx.node("Slice", [t["positions"], bounds[0], bounds[1], at(0)]
                           + bounds[2:], [t["taken"]]),
                  ctx.node("Shape", [g], [t["g_dims"]]),
                  ctx.node("ScatterElements", [t["g_dims"], at(a), t["dim"]], [t["dims"]]),
                  ctx.node("ConstantOfShape", [t["dims"]], [t["filled"]], value=zero)]
        _reshape(ctx, t["taken"], [1] * a + [-1] + [1] * (rank - a - 1), nodes, t["rows"])
        nodes.append(ctx.node("Expand", [t["rows"], t["g_dims"]], [t["index"]]))
        out = ctx.GI(0) if j == 0 else ctx.tmp("scattered")
        nodes.append(ctx.node("ScatterElements", [t["filled"], t["index"], g], [out], axis=a))
        g = out
    return nodes


def _pad_params(ctx):
    """(pads before, pads after, mode, value input) of a Pad node, over every axis."""
    rank = len(ctx.shape(ctx.I(0)))
    mode = ctx.attr("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if ctx.opset < 11:
        pads = list(ctx.attr("pads" if ctx.opset >= 2 else "paddings"))
        axes = list(range(rank))
    else:
        pads = _static(ctx, 1, "pads").reshape(-1).tolist()
        axes = ([int(a) % rank for a in _static(ctx, 3, "axes").reshape(-1)] if ctx.I(3)
                else list(range(rank)))
    before, after = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        before[a], after[a] = int(pads[i]), int(pads[i + len(axes)])
    return before, after, mode


def _pad_runs(n: int, b: int, e: int, mode: str) -> list[tuple[int, int, int, int]]:
    """Output positions of one axis as runs (o_start, o_stop, x_start, x_step), x_step in
    {1, -1, 0}: output o in [o_start, o_stop) copies input x_start + (o - o_start) * x_step."""
    lead, trail = max(-b, 0), max(-e, 0)  # negative pads crop the input first
    kept = n - lead - trail
    idx = np.arange(-max(b, 0), kept + max(e, 0))
    if mode == "constant":
        src = np.where((idx >= 0) & (idx < kept), idx, -1)
    elif mode == "edge":
        src = np.clip(idx, 0, kept - 1)
    elif mode == "wrap":
        src = idx % kept
    elif mode == "reflect":
        if kept == 1:
            src = np.zeros_like(idx)
        else:
            m = idx % (2 * (kept - 1))
            src = np.where(m >= kept, 2 * (kept - 1) - m, m)
    else:
        raise ModelError(f"Pad: unknown mode '{mode}'")
    runs, o = [], 0
    while o < len(src):
        if src[o] < 0:
            o += 1
            continue
        stop, step = o + 1, 1
        if stop < len(src) and src[stop] >= 0 and abs(int(src[stop] - src[o])) <= 1:
            step = int(src[stop] - src[o])
            while stop < len(src) and src[stop] >= 0 and src[stop] - src[stop - 1] == step:
                stop += 1
        runs.append((o, stop, int(src[o]) + lead, step))
        o = stop
    return runs


@grad("Pad", inputs=(0, 2))
def pad_grad(ctx):
    # constant: dX = the interior slice of dY (zeros where negative pads cropped X),
    # dValue = sum(dY) - sum(interior); edge/reflect/wrap: per padded axis, every output run
    # that copies X (straight, mirrored or repeated) is added back onto its source positions
    x_shape = ctx.shape(ctx.I(0))
    rank = len(x_shape)
    before, after, mode = _pad_params(ctx)
    nodes: list = []
    if ctx.needs(2) and mode != "constant":  # the value is unused by the other modes
        nodes.append(ctx.node("Identity", [ctx.const(np.zeros(ctx.shape(ctx.I(2)), ctx.dtype(
            ctx.I(2))), suffix="zeros")], [ctx.GI(2)]))
    elif ctx.needs(2):  # only the opset >= 11 input form differentiates the value
        total, inner, dv = ctx.tmp("total"), ctx.tmp("inner"), ctx.tmp("dvalue")
        interior = _slice(ctx, ctx.GO(0), [max(b, 0) for b in before],
                          [max(b, 0) + max(0, n - max(-b, 0) - max(-e, 0))
                           for b, e, n in zip(before, after, x_shape, strict=True)],
                          list(range(rank)), nodes)
        nodes += [ctx.reduce("ReduceSum", ctx.GO(0), list(range(rank)), total, keepdims=0),
                  ctx.reduce("ReduceSum", interior, list(range(rank)), inner, keepdims=0),
                  ctx.node("Sub", [total, inner], [dv])]
        _reshape(ctx, dv, ctx.shape(ctx.I(2)), nodes, ctx.GI(2))
    if not ctx.needs(0):
        return nodes
    if mode == "constant" or all(b <= 0 and e <= 0 for b, e in zip(before, after, strict=True)):
        lead = [max(-b, 0) for b in before]
        # (none where negative pads remove more than X holds, eating into the other side's
        # padding)
        kept = [max(0, n - max(-b, 0) - max(-e, 0)) for b, e, n in zip(before, after, x_shape,
                                                                       strict=True)]
        start = [max(b, 0) for b in before]
        crop = any(lead) or any(k != n for k, n in zip(kept, x_shape, strict=True))
        if not crop:  # (ends counted from the end: no size of X is baked in)
            axes = [a for a in range(rank) if before[a] or after[a]]
            if not axes:
                return nodes + [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]
            _slice(ctx, ctx.GO(0), [before[a] for a in axes],
                   [-after[a] if after[a] else _INT64_MAX for a in axes], axes, nodes,
                   out=ctx.GI(0))
            return nodes
        g = _slice(ctx, ctx.GO(0), start, [s + k for s, k in zip(start, kept, strict=True)],
                   list(range(rank)), nodes, out=None if crop else ctx.GI(0))
        if crop:
            _pad(ctx, g, lead + [n - ld - k for n, ld, k in zip(x_shape, lead, kept,
                                                                 strict=True)], nodes, ctx.GI(0))
        return nodes
    padded = [a for a in range(rank) if before[a] or after[a]]
    g = ctx.GO(0)
    g_shape = [n + b + e for n, b, e in zip(x_shape, before, after, strict=True)]
    for a in padded:
        out = ctx.GI(0) if a == padded[-1] else ctx.tmp("axis_grad")
        g_shape[a] = x_shape[a]  # (g's shape once this axis is summed back)
        _pad_axis_grad(ctx, g, a, g_shape, _pad_runs(x_shape[a], before[a], after[a], mode),
                       nodes, out)
        g = out
    return nodes


def _pad_axis_grad(ctx, g: str, a: int, out_shape, runs, nodes: list, out: str) -> None:
    """Sum the runs of g along axis a back onto their sources, into `out` of out_shape (X's
    size on axis a and the axes before it, the padded sizes after it): X's positions are cut
    into segments at every run boundary; each segment is the Sum of the run pieces covering it
    (slices of g; mirrored runs read backwards with Gather; repeated ones summed), and the
    segments are concatenated."""
    n = out_shape[a]
    targets = []  # (x_lo, x_hi, run)
    for o0, o1, x0, st in runs:
        lo = x0 - (o1 - o0) + 1 if st < 0 else x0
        targets.append((lo, x0 + 1 if st <= 0 else x0 + (o1 - o0), (o0, o1, x0, st)))
    cuts = sorted({0, n} | {t for lo, hi, _ in targets for t in (lo, hi)})
    segments = []
    for s, e in zip(cuts[:-1], cuts[1:], strict=True):
        parts = []
        for lo, hi, (o0, o1, x0, st) in targets:
            if not (lo <= s and e <= hi):
                continue
            piece = ctx.tmp("piece")
            if st == 0:
                nodes.append(ctx.reduce("ReduceSum", _slice(ctx, g, [o0], [o1], [a], nodes), [a],
                                        piece, keepdims=1))
            elif st > 0:
                _slice(ctx, g, [o0 + s - x0], [o0 + e - x0], [a], nodes, out=piece)
            else:  # x = x0 - (o - o0): o from o0 + x0 - s down to o0 + x0 - e + 1
                rev = np.arange(o0 + x0 - s, o0 + x0 - e, -1, dtype=np.int64)
                nodes.append(ctx.node("Gather", [g, ctx.const(rev, suffix="mirror")], [piece],
                                      axis=a))
            parts.append(piece)
        if not parts:  # positions cropped away by a negative pad
            shape = list(out_shape)
            shape[a] = e - s
            parts.append(_zeros(ctx, shape, ctx.dtype(ctx.I(0)), nodes))
        if len(cuts) > 2 and len(parts) == 1:
            segments.append(parts[0])
            continue
        seg = ctx.tmp("segment") if len(cuts) > 2 else out
        nodes.append(ctx.node("Sum" if len(parts) > 1 else "Identity", parts, [seg]))
        segments.append(seg)
    if len(segments) > 1:
        nodes.append(ctx.node("Concat", segments, [out], axis=a))


@grad("Trilu", inputs=(0,))
def trilu_grad(ctx):
    # dX = trilu(dY): the same mask
    ins = [ctx.GO(0)] + ([ctx.I(1)] if ctx.I(1) else [])
    return [ctx.node("Trilu", ins, [ctx.GI(0)], upper=ctx.attr("upper", 1))]


@grad("ReverseSequence", inputs=(0,))
def reverse_sequence_grad(ctx):
    # dX = reverse_sequence(dY): the reversal is its own inverse
    return [ctx.node("ReverseSequence", [ctx.GO(0), ctx.I(1)], [ctx.GI(0)],
                     batch_axis=ctx.attr("batch_axis", 1), time_axis=ctx.attr("time_axis", 0))]


@grad("Compress", inputs=(0,))
def compress_grad(ctx):
    # dX[j] = dY[k] when condition[j] is the k-th true one, else 0: gather from [0, dY] at
    # cumsum(condition) * condition along the axis
    x_shape = ctx.shape(ctx.I(0))
    axis = ctx.attr("axis")
    flat = axis is None
    a = 0 if flat else axis % len(x_shape)
    n = int(np.prod(x_shape)) if flat else x_shape[a]
    y_shape = ctx.shape(ctx.O(0))
    nodes: list = []
    cond = ctx.static_value(ctx.I(1))
    if cond is not None:
        c = np.zeros(n, bool)
        v = np.asarray(cond).reshape(-1).astype(bool)[:n]
        c[:len(v)] = v
        where = ctx.const(np.where(c, np.cumsum(c), 0).astype(np.int64), suffix="where")
    else:
        if ctx.opset < 11:
            raise ModelError(f"node '{ctx.name}' (Compress): differentiating a computed "
                             "condition needs opset >= 11 (CumSum); convert the model with "
                             "onnx.version_converter")
        length = ctx.shape(ctx.I(1))[0]
        ci = ctx.tmp("cond")
        nodes.append(ctx.node("Cast", [ctx.I(1)], [ci], to=elem_type(np.int64)))
        if length > n:
            ci = _slice(ctx, ci, [0], [n], [0], nodes)
        elif length < n:
            ci = _pad(ctx, ci, [0, n - length], nodes)
        cs, where = ctx.tmp("cumsum"), ctx.tmp("where")
        nodes += [ctx.node("CumSum", [ci, ctx.const(0, np.int64, "axis")], [cs]),
                  ctx.node("Mul", [cs, ci], [where])]
    slab = list(y_shape)
    slab[a] = 1
    padded, out = ctx.tmp("padded"), ctx.GI(0) if not flat else ctx.tmp("flat")
    nodes += [ctx.node("Concat", [_zeros(ctx, slab, ctx.dtype(ctx.O(0)), nodes), ctx.GO(0)],
                       [padded], axis=a),
              ctx.node("Gather", [padded, where], [out], axis=a)]
    if flat:
        _reshape(ctx, out, x_shape, nodes, ctx.GI(0))
    return nodes


@grad("TopK", inputs=(0,))
def topk_grad(ctx):
    # dX = zeros with dValues scattered at Indices along the axis (indices are distinct)
    x_shape = ctx.shape(ctx.I(0))
    a = ctx.attr("axis", -1) % len(x_shape)
    nodes: list = []
    dt = ctx.dtype(ctx.I(0))
    if ctx.opset >= 11:
        zeros = _zeros(ctx, x_shape, dt, nodes)
        nodes.append(ctx.node("ScatterElements", [zeros, ctx.O(1), ctx.GO(0)], [ctx.GI(0)],
                              axis=a))
        return nodes
    # Before ScatterElements: dX = sum_k onehot(Indices)[.., k, j, ..] * dValues[.., k, ..]
    n = x_shape[a]
    rank = len(x_shape)
    classes = np.arange(n, dtype=np.int64).reshape([1] * (a + 1) + [n] + [1] * (rank - a - 1))
    i1, hit, oh, d1, prod = (ctx.tmp(s) for s in ("idx", "hit", "onehot", "dv", "prod"))
    nodes += [ctx.unsqueeze(ctx.O(1), [a + 1], i1),
              ctx.node("Equal", [i1, ctx.const(classes, suffix="classes")], [hit]),
              ctx.node("Cast", [hit], [oh], to=elem_type(dt)),
              ctx.unsqueeze(ctx.GO(0), [a + 1], d1),
              ctx.node("Mul", [oh, d1], [prod]),
              ctx.reduce("ReduceSum", prod, [a], ctx.GI(0), keepdims=0)]
    return nodes


# -- gathering -------------------------------------------------------------------------------
@grad("Gather", inputs=(0,))
def gather_grad(ctx):
    # dX[.., idx[j], ..] += dY[.., j, ..] along the axis (duplicate indices accumulate):
    # rows p * n + idx[j] over the leading dims p, a segment sum of dY rows
    x_shape = ctx.shape(ctx.I(0))
    a = ctx.attr("axis", 0) % len(x_shape)
    n = x_shape[a]
    lead = int(np.prod(x_shape[:a]))
    k = int(np.prod(ctx.shape(ctx.I(1))))
    if ctx.I(1) in ctx.data_sized:  # (as many indices as the data picked: counted at run time)
        k = -1
    nodes: list = []
    idx, static = _normalized(ctx, 1, n, nodes)
    if a > 0 and ctx.I(0) in ctx.data_sized and k >= 0:  # (the rows before the axis follow
        return _gather_grad_axis_first(ctx, a, n, k, idx, static, nodes)  # the data)
    dy = ctx.GO(0)
    pad = next((p.value for p in ctx.onnx_node.metadata_props if p.key == PADDING_KEY), "")
    if pad and a == 0:  # nn.Embedding(padding_idx=pad): that row's positions pass nothing
        dy = _without_row(ctx, dy, idx, static, int(pad) % n, nodes)
    if a == 0 and lead == 1 and k >= 0 and any(p.key == FREQ_KEY and p.value == "1"
                                                for p in ctx.onnx_node.metadata_props):
        # nn.Embedding(scale_grad_by_freq=True): each row's gradient over the count of its
        # lookups in the batch, i.e. each position's dY over its index's count
        dy = _over_counts(ctx, dy, idx, static, k, n, x_shape, nodes)
    if static is not None:
        static = (np.arange(lead).reshape(-1, 1) * n + static.reshape(1, -1)).reshape(-1)
        rows = ctx.const(static, suffix="rows")
    elif lead == 1:
        rows = _reshape(ctx, idx, [k], nodes)
    else:
        t, rows = ctx.tmp("rows"), ctx.tmp("rows_flat")
        offsets = ctx.const(np.arange(lead, dtype=np.int64).reshape(-1, 1) * n, suffix="offsets")
        nodes.append(ctx.node("Add", [offsets, _reshape(ctx, idx, [1, k], nodes)], [t]))
        _reshape(ctx, t, [lead * k if k >= 0 else -1], nodes, rows)
    return _rows_grad(ctx, rows, static, lead * k if k >= 0 else -1, lead * n, dy, x_shape,
                      nodes)


def _over_counts(ctx, dy: str, idx: str | None, static, k: int, n: int, x_shape,
                 nodes: list) -> str:
    """dY [.., width] with the rows of its k positions divided by how many of the k indices
    equal each one's index (counted by a scatter-add of ones into [n, 1], read back)."""
    dt = ctx.dtype(ctx.O(0))  # (dY's: the output's type)
    width = int(np.prod(x_shape[1:]))
    flat = _reshape(ctx, dy, [k, width], nodes)
    if static is not None:
        counts = np.bincount(static.reshape(-1), minlength=n)[static.reshape(-1)]
        inv = ctx.const((1.0 / counts).reshape(k, 1).astype(dt), suffix="inv_counts")
    else:
        rows = _reshape(ctx, idx, [k], nodes)
        per_row, each, inv = ctx.tmp("counts"), ctx.tmp("counts_each"), ctx.tmp("inv_counts")
        _scatter_add_rows(ctx, rows, ctx.const(np.ones((k, 1), dt), suffix="ones"), k, 1, n,
                          per_row, nodes)
        nodes += [ctx.node("Gather", [per_row, rows], [each], axis=0),
                  ctx.node("Reciprocal", [each], [inv])]
    out = ctx.tmp("dy_over_counts")
    nodes.append(ctx.node("Mul", [flat, inv], [out]))
    return out


def _gather_grad_axis_first(ctx, a: int, n: int, k: int, idx: str | None, static,
                            nodes: list) -> list:
    """Gather's gradient along axis a > 0 of an X whose other sizes follow the data: with the
    axis moved to the front, the rows idx of zeros [n, -1] get dY's rows added (X's size read
    at run time), then the axis goes back."""
    rank, ki = len(ctx.shape(ctx.I(0))), len(ctx.shape(ctx.I(1)))
    unique = static is not None and len(np.unique(static)) == static.size
    if ctx.opset < 16 and not (unique and ctx.opset >= 11):
        raise ModelError(f"node '{ctx.name}' (Gather): the gradient along axis {a} of a tensor "
                         "whose size follows the data needs opset 16 (ScatterND's add); convert "
                         "the model with onnx.version_converter")
    front = [a] + [i for i in range(rank) if i != a]
    y_front = list(range(a, a + ki)) + list(range(a)) + list(range(a + ki, rank - 1 + ki))
    t = {s: ctx.tmp(s) for s in ("dy_front", "rows", "x_dims", "front_dims", "x_size",
                                  "width", "zeros_dims", "zeros", "scattered", "front")}
    rows = ctx.const(static.reshape(-1, 1), suffix="rows") if static is not None else \
        _reshape(ctx, idx, [-1, 1], nodes)
    nodes += [ctx.node("Transpose", [ctx.GO(0)], [t["dy_front"]], perm=y_front),
              ctx.reshape(t["dy_front"], [k, -1], t["rows"]),
              ctx.node("Shape", [ctx.I(0)], [t["x_dims"]]),
              ctx.node("Gather", [t["x_dims"], ctx.const(front, np.int64, "perm")],
                       [t["front_dims"]], axis=0),
              ctx.node("Size", [ctx.I(0)], [t["x_size"]]),
              ctx.node("Div", [t["x_size"], ctx.const(n, np.int64, "n")], [t["width"]])]
    width = _reshape(ctx, t["width"], [1], nodes)
    nodes += [ctx.node("Concat", [ctx.const([n], np.int64, "n"), width], [t["zeros_dims"]],
                       axis=0),
              ctx.node("ConstantOfShape", [t["zeros_dims"]], [t["zeros"]],
                       value=numpy_helper.from_array(np.zeros(1, ctx.dtype(ctx.I(0))))),
              ctx.node("ScatterND", [t["zeros"], rows, t["rows"]], [t["scattered"]],
                       reduction=None if unique else "add"),
              ctx.node("Reshape", [t["scattered"], t["front_dims"]], [t["front"]]),
              ctx.node("Transpose", [t["front"]], [ctx.GI(0)],
                       perm=[int(i) for i in np.argsort(front)])]
    return nodes


def _without_row(ctx, dy: str, idx: str | None, static, row: int, nodes: list) -> str:
    """dY with zeros wherever the (axis-0) index is `row`."""
    i_shape = ctx.shape(ctx.I(1))
    ones = [1] * (len(ctx.shape(ctx.O(0))) - len(i_shape))
    dtype = ctx.dtype(ctx.O(0))
    out = ctx.tmp("unpadded")
    if static is not None:
        keep = (static.reshape(tuple(i_shape) + tuple(ones)) != row)
        nodes.append(ctx.node("Mul", [dy, ctx.const(keep.astype(dtype), suffix="keep")], [out]))
        return out
    hit = ctx.tmp("padding")
    nodes.append(ctx.node("Equal", [idx, ctx.const(np.array(row, np.int64), suffix="pad")],
                          [hit]))
    hit = _reshape(ctx, hit, list(i_shape) + ones, nodes)
    nodes.append(ctx.node("Where", [hit, ctx.const(np.zeros((), dtype), suffix="zero"), dy],
                          [out]))
    return out


def _element_rows(ctx, idx: str, static, axis: int, nodes: list):
    """Flat positions in X (row-major) of each element of a GatherElements-style index."""
    x_shape, i_shape = ctx.shape(ctx.I(0)), ctx.shape(ctx.I(1))
    strides = np.cumprod((list(x_shape[1:]) + [1])[::-1])[::-1].astype(np.int64)
    grids = np.meshgrid(*[np.arange(d) for d in i_shape], indexing="ij")
    base = sum((g * s for d, (g, s) in enumerate(zip(grids, strides, strict=True)) if d != axis),
               np.zeros(i_shape, np.int64))
    if static is not None:
        v = (base + static * strides[axis]).reshape(-1)
        return ctx.const(v, suffix="rows"), v
    scaled, rows = ctx.tmp("scaled"), ctx.tmp("rows")
    nodes += [ctx.node("Mul", [idx, ctx.const(strides[axis], np.int64, "stride")], [scaled]),
              ctx.node("Add", [scaled, ctx.const(base, np.int64, "base")], [rows])]
    return _reshape(ctx, rows, [-1], nodes), None


@grad("GatherElements", inputs=(0,))
def gather_elements_grad(ctx):
    # dX = scatter_add(zeros, indices, dY) along the axis
    x_shape = ctx.shape(ctx.I(0))
    a = ctx.attr("axis", 0) % len(x_shape)
    nodes: list = []
    if ctx.opset >= 16:
        zeros = _zeros(ctx, x_shape, ctx.dtype(ctx.O(0)), nodes)
        nodes.append(ctx.node("ScatterElements", [zeros, ctx.I(1), ctx.GO(0)], [ctx.GI(0)],
                              axis=a, reduction="add"))
        return nodes
    idx, static = _normalized(ctx, 1, x_shape[a], nodes)
    rows, static = _element_rows(ctx, idx, static, a, nodes)
    m = int(np.prod(ctx.shape(ctx.I(1))))
    return _rows_grad(ctx, rows, static, m, int(np.prod(x_shape)), ctx.GO(0), x_shape, nodes)


@grad("GatherND", inputs=(0,))
def gather_nd_grad(ctx):
    # dX = scatter_nd_add(zeros, indices, dY); with batch_dims, flat rows
    # batch * prod(indexed dims) + ravel(index)
    x_shape, i_shape = ctx.shape(ctx.I(0)), ctx.shape(ctx.I(1))
    b, k = ctx.attr("batch_dims", 0), i_shape[-1]
    nodes: list = []
    if ctx.opset >= 16 and b == 0:
        zeros = _zeros(ctx, x_shape, ctx.dtype(ctx.O(0)), nodes)
        nodes.append(ctx.node("ScatterND", [zeros, ctx.I(1), ctx.GO(0)], [ctx.GI(0)],
                              reduction="add"))
        return nodes
    nb = int(np.prod(x_shape[:b]))
    dims = list(x_shape[b:b + k])
    per = int(np.prod(dims))
    m = int(np.prod(i_shape[:-1]))
    strides = np.cumprod((dims[1:] + [1])[::-1])[::-1].astype(np.int64)
    offsets = (np.arange(nb, dtype=np.int64) * per).reshape(-1, 1)
    idx, static = _normalized(ctx, 1, dims, nodes)
    rows_per = m // nb if nb else 0  # (index rows per batch entry; an empty batch has none)
    if static is not None:
        static = ((static.reshape(nb, rows_per, k) * strides).sum(-1) + offsets).reshape(-1)
        rows = ctx.const(static, suffix="rows")
    else:
        t, s, r = ctx.tmp("scaled"), ctx.tmp("ravel"), ctx.tmp("rows")
        nodes += [ctx.node("Mul", [_reshape(ctx, idx, [nb, rows_per, k], nodes),
                                   ctx.const(strides, suffix="strides")], [t]),
                  ctx.reduce("ReduceSum", t, [2], s, keepdims=0),
                  ctx.node("Add", [s, ctx.const(offsets, suffix="offsets")], [r])]
        rows = _reshape(ctx, r, [m], nodes)
    return _rows_grad(ctx, rows, static, m, nb * per, ctx.GO(0), x_shape, nodes)


# -- scattering ------------------------------------------------------------------------------
def _gather_like(ctx, op: str, src: str, nodes: list, out: str | None = None) -> str:
    """The gather that reads, for every update, the position it was scattered to."""
    out = out or ctx.tmp("gathered")
    if op == "ScatterND":
        nodes.append(ctx.node("GatherND", [src, ctx.I(1)], [out]))
    elif ctx.opset >= 11:
        nodes.append(ctx.node("GatherElements", [src, ctx.I(1)], [out],
                              axis=ctx.attr("axis", 0)))
    else:  # Scatter at opset 9-10: gather flat positions
        x_shape = ctx.shape(ctx.I(0))
        a = ctx.attr("axis", 0) % len(x_shape)
        idx, static = _normalized(ctx, 1, x_shape[a], nodes)
        rows, _ = _element_rows(ctx, idx, static, a, nodes)
        flat = _reshape(ctx, src, [-1], nodes)
        t = ctx.tmp("flat_gathered")
        nodes.append(ctx.node("Gather", [flat, rows], [t], axis=0))
        _reshape(ctx, t, ctx.shape(ctx.I(1)), nodes, out)
    return out


def _scatter_like(ctx, op: str, data: str, upd: str, nodes: list, reduction=None,
                  out: str | None = None) -> str:
    out = out or ctx.tmp("scattered")
    kw = {} if op == "ScatterND" else {"axis": ctx.attr("axis", 0)}
    nodes.append(ctx.node(op, [data, ctx.I(1), upd], [out], reduction=reduction, **kw))
    return out


def _scatter_grad(ctx):
    # none: dData = dY with scattered positions zeroed, dUpdates = gather(dY);
    # add: dData = dY; mul: dData = dY * prod(updates at the position),
    #   dU_j = gather(dY * data * prod_{i != j} U_i) (zeros handled by counting them);
    # max/min: the gradient is split evenly among data and updates equal to the result
    op = ctx.onnx_node.op_type
    reduction = ctx.attr("reduction", "none")
    if isinstance(reduction, bytes):
        reduction = reduction.decode()
    dy, data, upd = ctx.GO(0), ctx.I(0), ctx.I(2)
    dt = ctx.dtype(ctx.O(0))
    x_shape = ctx.shape(data)
    nodes: list = []
    if reduction in ("none", "add"):
        if ctx.needs(0):
            if reduction == "add":
                nodes.append(ctx.node("Identity", [dy], [ctx.GI(0)]))
            else:  # (zeros shaped like the updates at run time: a boolean-mask assignment
                # `h[~mask] = 0` scatters as many updates as the mask selects, NonZero's count)
                shape, zeros = ctx.tmp("updates_shape"), ctx.tmp("updates_zeros")
                nodes += [ctx.node("Shape", [upd], [shape]),
                          ctx.node("ConstantOfShape", [shape], [zeros],
                                   value=numpy_helper.from_array(np.zeros(1, dt)))]
                _scatter_like(ctx, op, dy, zeros, nodes, out=ctx.GI(0))
        if ctx.needs(2):
            _gather_like(ctx, op, dy, nodes, ctx.GI(2))
        return nodes
    if reduction == "mul":
        one, zero = ctx.scalar(1.0), ctx.scalar(0.0)
        ones = _zeros(ctx, x_shape, dt, nodes, fill=1.0)
        if ctx.needs(0):
            prod = _scatter_like(ctx, op, ones, upd, nodes, "mul")
            nodes.append(ctx.node("Mul", [dy, prod], [ctx.GI(0)]))
        if ctx.needs(2):
            z, nzu, zf = ctx.tmp("u_zero"), ctx.tmp("u_nonzero"), ctx.tmp("u_zero_f")
            nodes += [ctx.node("Equal", [upd, zero], [z]),
                      ctx.node("Where", [z, one, upd], [nzu]),
                      ctx.node("Cast", [z], [zf], to=elem_type(dt))]
            prod_nz = _scatter_like(ctx, op, ones, nzu, nodes, "mul")
            n_zero = _scatter_like(ctx, op, _zeros(ctx, x_shape, dt, nodes), zf, nodes, "add")
            t, gt, gz = ctx.tmp("dy_data"), ctx.tmp("dy_data_prod"), ctx.tmp("zeros_at")
            nodes += [ctx.node("Mul", [dy, data], [t]), ctx.node("Mul", [t, prod_nz], [gt])]
            g = _gather_like(ctx, op, gt, nodes)
            _gather_like(ctx, op, n_zero, nodes, gz)
            div, e0, e1, f0, f1, a0, a1 = (ctx.tmp(s) for s in ("div", "no_zero", "one_zero",
                                                               "no_zero_f", "one_zero_f",
                                                               "if_nonzero", "if_zero"))
            nodes += [ctx.node("Div", [g, nzu], [div]),
                      ctx.node("Equal", [gz, zero], [e0]), ctx.node("Equal", [gz, one], [e1]),
                      ctx.node("Cast", [e0], [f0], to=elem_type(dt)),
                      ctx.node("Cast", [e1], [f1], to=elem_type(dt)),
                      ctx.node("Mul", [div, f0], [a0]), ctx.node("Mul", [g, f1], [a1]),
                      ctx.node("Where", [z, a1, a0], [ctx.GI(2)])]
        return nodes
    if reduction in ("max", "min"):
        yu, eu, ed, euf, edf = (ctx.tmp(s) for s in ("y_at_u", "u_wins", "data_wins",
                                                     "u_wins_f", "data_wins_f"))
        _gather_like(ctx, op, ctx.O(0), nodes, yu)
        nodes += [ctx.node("Equal", [upd, yu], [eu]), ctx.node("Equal", [data, ctx.O(0)], [ed]),
                  ctx.node("Cast", [eu], [euf], to=elem_type(dt)),
                  ctx.node("Cast", [ed], [edf], to=elem_type(dt))]
        count, share = ctx.tmp("count"), ctx.tmp("share")
        _scatter_like(ctx, op, edf, euf, nodes, "add", count)
        nodes.append(ctx.node("Div", [dy, count], [share]))
        if ctx.needs(0):
            nodes.append(ctx.node("Mul", [share, edf], [ctx.GI(0)]))
        if ctx.needs(2):
            gs = _gather_like(ctx, op, share, nodes)
            nodes.append(ctx.node("Mul", [gs, euf], [ctx.GI(2)]))
        return nodes
    raise ModelError(f"node '{ctx.name}' ({op}): no gradient for reduction '{reduction}'")


for _op in ("ScatterElements", "ScatterND", "Scatter"):
    grad(_op, inputs=(0, 2))(_scatter_grad)


@grad("TensorScatter", inputs=(0, 1))
def tensor_scatter_grad(ctx):
    # dPast = dY with the written positions zeroed (the same scatter of zeros);
    # dUpdate = dY read at the written positions (the update is no longer than the cache)
    past, upd = ctx.shape(ctx.I(0)), ctx.shape(ctx.I(1))
    rank = len(past)
    a = ctx.attr("axis", -2) % rank
    mode = ctx.attr("mode", "linear")
    if isinstance(mode, bytes):
        mode = mode.decode()
    seq, cap, batch = upd[a], past[a], upd[0]
    dt = ctx.dtype(ctx.O(0))
    nodes: list = []
    if ctx.needs(0):
        ins = [ctx.GO(0), _zeros(ctx, upd, dt, nodes)] + ([ctx.I(2)] if ctx.I(2) else [])
        nodes.append(ctx.node("TensorScatter", ins, [ctx.GI(0)], mode=mode, axis=a))
    if not ctx.needs(1):
        return nodes
    out = ctx.GI(1)
    if not ctx.I(2) and seq <= cap:
        _slice(ctx, ctx.GO(0), [0], [seq], [a], nodes, out=out)
    else:
        shape = [1] * rank
        shape[a] = seq
        steps = ctx.const(np.arange(seq, dtype=np.int64).reshape(shape), suffix="steps")
        pos = steps
        if ctx.I(2):
            bshape = [1] * rank
            bshape[0] = batch
            pos = ctx.tmp("pos")
            nodes.append(ctx.node("Add", [_reshape(ctx, _to_int64(ctx, ctx.I(2), nodes), bshape,
                                                   nodes), steps], [pos]))
        if mode == "circular":
            wrapped_pos = ctx.tmp("wrapped")
            nodes.append(ctx.node("Mod", [pos, ctx.const(cap, np.int64, "cap")], [wrapped_pos]))
            pos = wrapped_pos
        full = ctx.tmp("positions")
        nodes += [ctx.node("Expand", [pos, ctx.const(list(upd), np.int64, "shape")], [full]),
                  ctx.node("GatherElements", [ctx.GO(0), full], [out], axis=a)]
    return nodes
