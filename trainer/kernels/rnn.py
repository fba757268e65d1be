"""Recurrent kernels: RNN, GRU and LSTM (all directions, activations, layouts, sequence_lens).

The input projection of every time step is one matmul; the time loop is a plain Python loop per
direction with the gate math vectorized over batch and hidden units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np

from trainer.kernels import kernel, matmul
from trainer.kernels.elementwise import _sigmoid

# name -> (function of (xp, x, alpha, beta), default alpha or None if it takes none, default
# beta or None). Defaults are those of the ONNX operators of the same name.
_ACTIVATIONS: dict[str, tuple[Callable, float | None, float | None]] = {
    "relu": (lambda xp, x, a, b: xp.maximum(x, 0), None, None),
    "tanh": (lambda xp, x, a, b: xp.tanh(x), None, None),
    "sigmoid": (lambda xp, x, a, b: _sigmoid(xp, x), None, None),
    "affine": (lambda xp, x, a, b: a * x + b, 1.0, 0.0),
    "leakyrelu": (lambda xp, x, a, b: xp.where(x >= 0, x, a * x), 0.01, None),
    "thresholdedrelu": (lambda xp, x, a, b: xp.where(x >= a, x, 0), 1.0, None),
    "scaledtanh": (lambda xp, x, a, b: a * xp.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda xp, x, a, b: xp.clip(a * x + b, 0, 1), 0.2, 0.5),
    "elu": (lambda xp, x, a, b: xp.where(x >= 0, x, a * xp.expm1(xp.minimum(x, 0))), 1.0, None),
    "softsign": (lambda xp, x, a, b: x / (1 + xp.abs(x)), None, None),
    "softplus": (lambda xp, x, a, b: xp.logaddexp(0, x), None, None),
}


def activations_of(xp, names: Sequence[str] | None, alphas: Sequence[float] | None,
                   betas: Sequence[float] | None, defaults: Sequence[str],
                   num_directions: int) -> list[list[Callable]]:
    """The activation functions of each direction.

    As in onnxruntime, activation_alpha/beta are consumed in order only by the functions that
    take an alpha/beta; the others use their operator's default.
    """
    per_dir = len(defaults)
    names = list(names) if names else list(defaults) * num_directions
    if len(names) == per_dir and num_directions == 2:
        names = names * 2
    if len(names) < per_dir * num_directions:
        raise ValueError(f"{per_dir * num_directions} activations needed, got {names}")
    alphas, betas = list(alphas or []), list(betas or [])
    funcs = []
    for name in names[:per_dir * num_directions]:
        if name.lower() not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}")
        fn, a, b = _ACTIVATIONS[name.lower()]
        if a is not None and alphas:
            a = alphas.pop(0)
        if b is not None and betas:
            b = betas.pop(0)
        funcs.append(lambda x, fn=fn, a=a, b=b: fn(xp, x, a, b))
    return [funcs[d * per_dir:(d + 1) * per_dir] for d in range(num_directions)]


def directions_of(direction: str) -> list[bool]:
    """Whether each direction runs reversed ("foward" is the GRU-1 default's spelling)."""
    table = {"forward": [False], "foward": [False], "reverse": [True],
             "bidirectional": [False, True]}
    if direction not in table:
        raise ValueError(f"unknown direction {direction!r}")
    return table[direction]


def _clip(xp, v, clip):
    return v if clip is None else xp.clip(v, -clip, clip)


class Sequences:
    """A recurrent node's input in time-major order, with its sequence lengths.

    float16/bfloat16 inputs are computed in float32 and rounded once at the end. With
    sequence_lens, steps past each sequence's end leave the state alone and output zeros, and
    a reversed direction reads each sequence backwards from its own last step.
    """

    def __init__(self, xp, x, sequence_lens, layout: int):
        self.xp = xp
        self.layout = layout
        self.dtype = x.dtype
        low = x.dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
        self.compute = np.dtype(np.float32) if low else x.dtype
        x = x.transpose(1, 0, 2) if layout else x
        self.x = x.astype(self.compute)
        self.steps, self.batch = x.shape[:2]
        self.mask = self.rev = self.empty = None
        if sequence_lens is not None:
            lens = sequence_lens.astype(np.int64).reshape(1, -1)
            t = xp.arange(self.steps).reshape(-1, 1)
            self.mask = (t < lens)[..., None]  # [T, B, 1]
            self.rev = xp.where(t < lens, lens - 1 - t, t)  # [T, B]; an involution
            self.empty = (lens == 0).reshape(-1, 1)  # [B, 1]

    def inputs(self, reverse: bool):
        """x in processing order of one direction: [T, B, input_size]."""
        return self._order(self.x, reverse)

    def _order(self, v, reverse):
        if not reverse:
            return v
        if self.rev is None:
            return v[::-1]
        return v[self.rev, self.xp.arange(self.batch).reshape(1, -1)]

    def state(self, initial, num_directions: int, hidden: int):
        """Initial state [D, B, H] (zeros when absent), in compute precision."""
        if initial is None:
            return self.xp.zeros((num_directions, self.batch, hidden), dtype=self.compute)
        initial = initial.transpose(1, 0, 2) if self.layout else initial
        return initial.astype(self.compute)

    def step(self, t: int, new, old):
        """(next state, output) of step t: past a sequence's end, (old, 0)."""
        if self.mask is None:
            return new, new
        m = self.mask[t]
        return self.xp.where(m, new, old), self.xp.where(m, new, 0)

    def sequence(self, outs, reverse: bool):
        """Per-step outputs of one direction back in time order: [T, B, H]."""
        return self._order(self.xp.stack(outs), reverse)

    def outputs(self, ys, *finals):
        """Y [T, D, B, H] and final states [D, B, H] (batch-first with layout 1).

        An empty sequence's final states are zeros, as in onnxruntime (the spec is silent)."""
        xp = self.xp
        y = xp.stack(ys, axis=1)
        finals = [xp.stack(f) for f in finals]
        if self.empty is not None:
            finals = [xp.where(self.empty, 0, f) for f in finals]
        if self.layout:
            y = y.transpose(2, 0, 1, 3)
            finals = [f.transpose(1, 0, 2) for f in finals]
        return tuple(xp.ascontiguousarray(v.astype(self.dtype)) for v in [y, *finals])


def _params(seq: Sequences, w, r, b, n_gates: int, hidden: int):
    """W, R in compute precision and B (zeros when absent) split into (Wb, Rb)."""
    xp = seq.xp
    if b is None:
        b = xp.zeros((w.shape[0], 2 * n_gates * hidden), dtype=seq.compute)
    b = b.astype(seq.compute)
    return (w.astype(seq.compute), r.astype(seq.compute), b[:, :n_gates * hidden],
            b[:, n_gates * hidden:])


@kernel("RNN", since=14)
def RNN(xp, x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
        activation_beta=None, activations=None, clip=None, direction="forward",
        hidden_size=None, layout=0):
    # Ht = f(Xt W^T + Ht-1 R^T + Wb + Rb)
    seq = Sequences(xp, x, sequence_lens, layout)
    dirs = directions_of(direction)
    acts = activations_of(xp, activations, activation_alpha, activation_beta, ["Tanh"],
                          len(dirs))
    hidden = r.shape[-1]
    w, r, wb, rb = _params(seq, w, r, b, 1, hidden)
    h0 = seq.state(initial_h, len(dirs), hidden)
    ys, hs = [], []
    for d, reverse in enumerate(dirs):
        (f,) = acts[d]
        xw = matmul(xp, seq.inputs(reverse), w[d].T) + (wb[d] + rb[d])
        rt = r[d].T
        h, outs = h0[d], []
        for t in range(seq.steps):
            h, y = seq.step(t, f(_clip(xp, xw[t] + h @ rt, clip)), h)
            outs.append(y)
        ys.append(seq.sequence(outs, reverse))
        hs.append(h)
    return seq.outputs(ys, hs)


@kernel("RNN", since=7)
def RNN_7(xp, x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
          activation_beta=None, activations=None, clip=None, direction="forward",
          hidden_size=None):
    return RNN(xp, x, w, r, b, sequence_lens, initial_h, activation_alpha=activation_alpha,
               activation_beta=activation_beta, activations=activations, clip=clip,
               direction=direction, hidden_size=hidden_size)


@kernel("RNN", since=1)
def RNN_1(xp, x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
          activation_beta=None, activations=None, clip=None, direction="forward",
          hidden_size=None, output_sequence=0):
    # output_sequence only said whether Y is wanted; the node's outputs say that already.
    return RNN_7(xp, x, w, r, b, sequence_lens, initial_h, activation_alpha=activation_alpha,
                 activation_beta=activation_beta, activations=activations, clip=clip,
                 direction=direction, hidden_size=hidden_size)


@kernel("GRU", since=14)
def GRU(xp, x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
        activation_beta=None, activations=None, clip=None, direction="forward",
        hidden_size=None, layout=0, linear_before_reset=0):
    # zt = f(Xt Wz^T + Ht-1 Rz^T + Wbz + Rbz), rt likewise with r
    # ht = g(Xt Wh^T + (rt * Ht-1) Rh^T + Rbh + Wbh), or with linear_before_reset
    # ht = g(Xt Wh^T + rt * (Ht-1 Rh^T + Rbh) + Wbh);  Ht = (1 - zt) * ht + zt * Ht-1
    seq = Sequences(xp, x, sequence_lens, layout)
    dirs = directions_of(direction)
    acts = activations_of(xp, activations, activation_alpha, activation_beta,
                          ["Sigmoid", "Tanh"], len(dirs))
    n = r.shape[-1]
    w, r, wb, rb = _params(seq, w, r, b, 3, n)
    h0 = seq.state(initial_h, len(dirs), n)
    ys, hs = [], []
    for d, reverse in enumerate(dirs):
        f, g = acts[d]
        rbh = rb[d, 2 * n:]
        rb_x = xp.concatenate([rb[d, :2 * n], xp.zeros_like(rbh)]) if linear_before_reset else rb[d]
        bias = wb[d] + rb_x
        xw = matmul(xp, seq.inputs(reverse), w[d].T) + bias
        r_zr, r_h = r[d, :2 * n].T, r[d, 2 * n:].T
        h, outs = h0[d], []
        for t in range(seq.steps):
            zr = f(_clip(xp, xw[t, :, :2 * n] + h @ r_zr, clip))
            z, rg = zr[:, :n], zr[:, n:]
            if linear_before_reset:
                cand = g(_clip(xp, xw[t, :, 2 * n:] + rg * (h @ r_h + rbh), clip))
            else:
                cand = g(_clip(xp, xw[t, :, 2 * n:] + (rg * h) @ r_h, clip))
            h, y = seq.step(t, (1 - z) * cand + z * h, h)
            outs.append(y)
        ys.append(seq.sequence(outs, reverse))
        hs.append(h)
    return seq.outputs(ys, hs)


@kernel("GRU", since=7)
def GRU_7(xp, x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
          activation_beta=None, activations=None, clip=None, direction="forward",
          hidden_size=None, linear_before_reset=0):
    return GRU(xp, x, w, r, b, sequence_lens, initial_h, activation_alpha=activation_alpha,
               activation_beta=activation_beta, activations=activations, clip=clip,
               direction=direction, hidden_size=hidden_size,
               linear_before_reset=linear_before_reset)


@kernel("GRU", since=3)
def GRU_3(xp, x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
          activation_beta=None, activations=None, clip=None, direction="forward",
          hidden_size=None, linear_before_reset=0, output_sequence=0):
    return GRU_7(xp, x, w, r, b, sequence_lens, initial_h, activation_alpha=activation_alpha,
                 activation_beta=activation_beta, activations=activations, clip=clip,
                 direction=direction, hidden_size=hidden_size,
                 linear_before_reset=linear_before_reset)


@kernel("GRU", since=1)
def GRU_1(xp, x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None,
          activation_beta=None, activations=None, clip=None, direction="foward",
          hidden_size=None, output_sequence=0):
    return GRU_7(xp, x, w, r, b, sequence_lens, initial_h, activation_alpha=activation_alpha,
                 activation_beta=activation_beta, activations=activations, clip=clip,
                 direction=direction, hidden_size=hidden_size)


@kernel("LSTM", since=14)
def LSTM(xp, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None, *,
         activation_alpha=None, activation_beta=None, activations=None, clip=None,
         direction="forward", hidden_size=None, input_forget=0, layout=0):
    # it = f(Xt Wi^T + Ht-1 Ri^T + Pi * Ct-1 + Wbi + Rbi), ft likewise (or 1 - it with
    # input_forget), ct = g(Xt Wc^T + Ht-1 Rc^T + Wbc + Rbc), Ct = ft * Ct-1 + it * ct,
    # ot = f(Xt Wo^T + Ht-1 Ro^T + Po * Ct + Wbo + Rbo), Ht = ot * h(Ct). Gate order: i, o, f, c.
    seq = Sequences(xp, x, sequence_lens, layout)
    dirs = directions_of(direction)
    acts = activations_of(xp, activations, activation_alpha, activation_beta,
                          ["Sigmoid", "Tanh", "Tanh"], len(dirs))
    n = r.shape[-1]
    w, r, wb, rb = _params(seq, w, r, b, 4, n)
    h0 = seq.state(initial_h, len(dirs), n)
    c0 = seq.state(initial_c, len(dirs), n)
    ys, hs, cs = [], [], []
    for d, reverse in enumerate(dirs):
        f, g, hact = acts[d]
        xw = matmul(xp, seq.inputs(reverse), w[d].T) + (wb[d] + rb[d])
        rt = r[d].T
        peep = None if p is None else p[d].astype(seq.compute)
        h, c, outs = h0[d], c0[d], []
        for t in range(seq.steps):
            gates = xw[t] + h @ rt
            gi, go, gf, gc = (gates[:, k * n:(k + 1) * n] for k in range(4))
            if peep is not None:
                gi, gf = gi + peep[:n] * c, gf + peep[2 * n:] * c
            i = f(_clip(xp, gi, clip))
            fg = 1 - i if input_forget else f(_clip(xp, gf, clip))
            c_new = fg * c + i * g(_clip(xp, gc, clip))
            if peep is not None:
                go = go + peep[n:2 * n] * c_new
            h_new = f(_clip(xp, go, clip)) * hact(c_new)
            c, _ = seq.step(t, c_new, c)
            h, y = seq.step(t, h_new, h)
            outs.append(y)
        ys.append(seq.sequence(outs, reverse))
        hs.append(h)
        cs.append(c)
    return seq.outputs(ys, hs, cs)


@kernel("LSTM", since=7)
def LSTM_7(xp, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None, *,
           activation_alpha=None, activation_beta=None, activations=None, clip=None,
           direction="forward", hidden_size=None, input_forget=0):
    return LSTM(xp, x, w, r, b, sequence_lens, initial_h, initial_c, p,
                activation_alpha=activation_alpha, activation_beta=activation_beta,
                activations=activations, clip=clip, direction=direction,
                hidden_size=hidden_size, input_forget=input_forget)


@kernel("LSTM", since=1)
def LSTM_1(xp, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None, *,
           activation_alpha=None, activation_beta=None, activations=None, clip=None,
           direction="forward", hidden_size=None, input_forget=0, output_sequence=0):
    return LSTM_7(xp, x, w, r, b, sequence_lens, initial_h, initial_c, p,
                  activation_alpha=activation_alpha, activation_beta=activation_beta,
                  activations=activations, clip=clip, direction=direction,
                  hidden_size=hidden_size, input_forget=input_forget)
