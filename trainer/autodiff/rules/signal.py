"""Gradient rules for signal ops. DFT and STFT are linear maps: their gradient is the adjoint map,
itself a DFT (complex values as a trailing [re, im] axis; dz = dL/dRe + i dL/dIm)."""

from __future__ import annotations

import numpy as np

from trainer.autodiff.registry import grad
from trainer.errors import ModelError


def _ints(ctx, name: str, what: str) -> int:
    value = ctx.static_value(name)
    if value is None:
        raise ModelError(f"node '{ctx.name}' ({ctx.onnx_node.op_type}): the {what} is computed "
                         "at run time; its gradient needs a constant (initializer or Constant)")
    return int(np.asarray(value).reshape(-1)[0])


def _dft(ctx, axis: int, inverse: int = 0, onesided: int = 0, length: int | None = None):
    """A DFT step for `_chain` in the model's opset form (axis attribute before 20)."""
    n = ctx.const(np.int64(length), np.int64, "dft_length") if length is not None else ""
    if ctx.opset >= 20:
        return "DFT", [n, ctx.const(np.int64(axis), np.int64, "axis")], dict(
            inverse=inverse or None, onesided=onesided or None)
    return "DFT", [n] if n else [], dict(axis=axis, inverse=inverse or None,
                                         onesided=onesided or None)


def _chain(ctx, src: str, steps, out: str):
    """Apply steps (op, extra inputs, attributes) to src in turn; the last one writes out."""
    nodes, cur = [], src
    for k, (op, extra, attrs) in enumerate(steps):
        dst = out if k == len(steps) - 1 else ctx.tmp(op.lower())
        nodes.append(ctx.node(op, [cur, *extra], [dst], **attrs))
        cur = dst
    return nodes or [ctx.node("Identity", [src], [out])]


def _i64(ctx, values, suffix: str) -> str:
    return ctx.const(np.asarray(values, np.int64), suffix=suffix)


def _slice(ctx, ends, axes) -> tuple:
    """A step keeping [0, end) on each axis."""
    return "Slice", [_i64(ctx, [0] * len(axes), "starts"), _i64(ctx, ends, "ends"),
                     _i64(ctx, axes, "axes")], {}


def _mul(ctx, value) -> tuple:
    return "Mul", [ctx.const(np.asarray(value, ctx.dtype(ctx.I(0))), suffix="scale")], {}


def _fit(ctx, rank: int, axis: int, have: int, want: int, real: bool, scale=None) -> list:
    """Steps that cut a complex tensor (length `have` on axis) to `want` and to its real part
    if `real`, multiply by `scale`, and zero-pad the axis up to `want`."""
    ends, axes = [], []
    if want < have:
        ends, axes = [want], [axis]
    if real:
        ends, axes = ends + [1], axes + [rank - 1]
    steps = []
    if axes:
        steps.append(_slice(ctx, ends, axes))
    if scale is not None:
        steps.append(_mul(ctx, scale))
    if want > have:
        pads = [0] * (2 * rank)
        pads[rank + axis] = want - have
        steps.append(("Pad", [_i64(ctx, pads, "pads")], {}))
    return steps


def _half_weights(n: int) -> np.ndarray:
    """c_k of a one-sided spectrum of length n//2+1: 1 at k=0 and at n/2 (n even), 2 elsewhere
    (how often bin k occurs in the full spectrum)."""
    c = np.full(n // 2 + 1, 2.0)
    c[0] = 1.0
    if n % 2 == 0:
        c[-1] = 1.0
    return c


def _along(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A vector shaped to broadcast along `axis` of a rank-`rank` tensor."""
    return values.reshape((-1,) + (1,) * (rank - 1 - axis))


@grad("DFT", inputs=(0,))
def dft_grad(ctx):
    # y = S F P x (P: pad/cut x to N, F: DFT matrix, S: keep N//2+1 bins when onesided), so
    # dx = P^T F^H S^T dy with F^H = N * IDFT, (1/N) conj(F)^H = DFT / N for the inverse.
    x, y = ctx.I(0), ctx.O(0)
    rank = len(ctx.shape(x))
    if ctx.opset >= 20:
        axis = _ints(ctx, ctx.I(2), "axis") if ctx.I(2) else -2
    else:
        axis = ctx.attr("axis", 1)
    axis %= rank
    inverse, onesided = ctx.attr("inverse", 0), ctx.attr("onesided", 0)
    n_in, n_out = ctx.shape(x)[axis], ctx.shape(y)[axis]
    real = ctx.shape(x)[-1] == 1
    if not onesided or inverse:
        n = n_out
    elif ctx.I(1):
        n = _ints(ctx, ctx.I(1), "dft_length of a one-sided DFT")
    else:
        n = n_in
    if not onesided:
        # forward: dx = N * IDFT(dy); inverse: dx = DFT(dy) / N
        steps = [_dft(ctx, axis, inverse=1 - inverse),
                 *_fit(ctx, rank, axis, n, n_in, real, float(n) if not inverse else 1.0 / n)]
    elif not inverse and real:
        # RFFT: dx = Re(F^H pad(dy)) = N * IRFFT(dy / c)  (bins 0 and N/2 occur once, others twice)
        w = _along(n / _half_weights(n), rank, axis)
        steps = [_mul(ctx, w), _dft(ctx, axis, inverse=1, onesided=1, length=n),
                 *_fit(ctx, rank, axis, n, n_in, False)]
    elif not inverse:
        # one-sided spectrum of a complex x: dx = N * IDFT(dy zero-padded to N)
        steps = [_dft(ctx, axis, inverse=1, length=n), *_fit(ctx, rank, axis, n, n_in, False, n)]
    else:
        # IRFFT: x = (1/N) sum_k c_k Re(y_k e^{2 pi i k t / N}) over k < N//2+1, so
        # dy = RFFT(dx) * c / N (zero imaginary part at bins 0 and N/2, as numpy drops them)
        m = n // 2 + 1
        w = _along(_half_weights(n) / n, rank, axis)
        steps = [_dft(ctx, axis, onesided=1), _mul(ctx, w), *_fit(ctx, rank, axis, m, n_in, real)]
    return _chain(ctx, ctx.GO(0), steps, ctx.GI(0))


def _overlap_add(ctx, frames: str, batch: int, n_frames: int, fl: int, step: int, comps: int,
                 length: int, out: str) -> list:
    """Adjoint of framing: sum frames [B, F, fl, C] (frame f starts at f*step) into [B, L, C].

    With r = ceil(fl/step) chunks of `step` per (zero-padded) frame, chunk j of frame f lands on
    block f + j. Laid out as [B, r, F, E] and padded to F + r columns, the flat index
    j (F + r) + f equals j (F + r - 1) + (f + j): reshaped to rows of F + r - 1, column f + j is
    the target block, so one ReduceSum over j overlaps every chunk (no per-shift nodes)."""
    r = -(-fl // step) if n_frames > 1 else 1
    width = r * step if n_frames > 1 else fl
    steps = []
    if width > fl:
        steps.append(("Pad", [_i64(ctx, [0, 0, 0, 0, 0, 0, width - fl, 0], "pads")], {}))
    e = step * comps
    if r > 1:
        steps += [("Reshape", [_i64(ctx, [batch, n_frames, r, e], "shape")], {}),
                  ("Transpose", [], dict(perm=[0, 2, 1, 3])),
                  ("Pad", [_i64(ctx, [0, 0, 0, 0, 0, 0, r, 0], "pads")], {}),
                  ("Reshape", [_i64(ctx, [batch, r * (n_frames + r), e], "shape")], {}),
                  _slice(ctx, [r * (n_frames + r - 1)], [1]),
                  ("Reshape", [_i64(ctx, [batch, r, n_frames + r - 1, e], "shape")], {}),
                  ("ReduceSum", [_i64(ctx, [1], "axes")], dict(keepdims=0))]
    total = (n_frames + r - 1) * width // r
    steps.append(("Reshape", [_i64(ctx, [batch, total, comps], "shape")], {}))
    if total > length:  # only zeros (padding) lie past the signal's end
        steps.append(_slice(ctx, [length], [1]))
    elif total < length:  # the signal's tail lies in no frame
        steps.append(("Pad", [_i64(ctx, [0, 0, 0, 0, length - total, 0], "pads")], {}))
    return _chain(ctx, frames, steps, out)


@grad("STFT", inputs=(0, 2))
def stft_grad(ctx):
    # y[b,f] = S F (w * x[b, f*step : f*step+fl]): dz = F^H S^T dy per frame (as DFT's rule),
    # dx = overlap-add of w * dz over the frames, dw = sum over b, f, re/im of dz * frames(x).
    sig, window, y = ctx.I(0), ctx.I(2), ctx.O(0)
    batch, length, comps = ctx.shape(sig)
    n_frames, bins = ctx.shape(y)[1:3]
    onesided = ctx.attr("onesided", 1)
    real = comps == 1
    if window:
        fl = ctx.shape(window)[0]
    elif ctx.I(3) and ctx.static_value(ctx.I(3)) is None and not onesided:
        fl = bins
    elif ctx.I(3):
        fl = _ints(ctx, ctx.I(3), "frame_length")
    else:
        fl = length
    step = _ints(ctx, ctx.I(1), "frame_step") if n_frames > 1 else fl
    dz = ctx.tmp("dz")
    if onesided and real:
        # dz = Re(F^H pad(dy)) = fl * IRFFT(dy / c)
        w = _along(fl / _half_weights(fl), 4, 2)
        steps = [_mul(ctx, w), _dft(ctx, 2, inverse=1, onesided=1, length=fl)]
    else:
        steps = [_dft(ctx, 2, inverse=1, length=fl if onesided else None),
                 *_fit(ctx, 4, 2, fl, fl, real, float(fl))]
    nodes = _chain(ctx, ctx.GO(0), steps, dz)
    if ctx.needs(0):
        framed = dz
        if window:
            col, framed = ctx.tmp("window"), ctx.tmp("dframes")
            nodes += [ctx.reshape(window, [fl, 1], col), ctx.node("Mul", [dz, col], [framed])]
        nodes += _overlap_add(ctx, framed, batch, n_frames, fl, step, comps, length, ctx.GI(0))
    if ctx.needs(2):
        idx = np.arange(n_frames)[:, None] * step + np.arange(fl)[None, :]
        frames, prod = ctx.tmp("frames"), ctx.tmp("prod")
        nodes += [ctx.node("Gather", [sig, ctx.const(idx, np.int64, "frame_index")], [frames],
                           axis=1),
                  ctx.node("Mul", [dz, frames], [prod]),
                  ctx.reduce("ReduceSum", prod, [0, 1, 3], ctx.GI(2), keepdims=0)]
    return nodes
