"""Gradient rules for RNN, GRU and LSTM: backpropagation through time unrolled into ONNX nodes
over the static sequence length, per direction, in processing order."""

# Forward values: when the node's Y output exists, the state entering every step is read from it
# and the gates of all steps are recomputed at once (one Gemm; none for RNN's output-derived
# derivatives); without Y the recurrence is recomputed step by step. Per step the backward does
# one [B, G*H] x [G*H, H] matmul and a few elementwise ops on precomputed [T*B, H] factors; the
# weight, bias and input gradients are one Gemm/MatMul each over all steps. Steps past a
# sequence's end (sequence_lens) pass the state gradient through and receive none themselves.

from __future__ import annotations

import numpy as np
import onnx

from trainer.autodiff.registry import grad
from trainer.autodiff.rules.norm import Emit
from trainer.errors import ModelError
from trainer.kernels.rnn import _ACTIVATIONS, directions_of

# Activations whose derivative is a function of their output (so Y alone gives it).
_POST_ONLY = {"relu", "tanh", "sigmoid", "affine", "hardsigmoid", "elu", "softsign", "softplus",
              "scaledtanh"}


def _activation_specs(ctx, defaults: list[str], n_dirs: int) -> list[list[tuple]]:
    """(name, alpha, beta) of each direction's activations, read as the kernel reads them:
    activation_alpha/beta are consumed in order by the functions that take them."""
    per = len(defaults)
    names = [n.lower() for n in (ctx.attr("activations") or defaults * n_dirs)]
    if len(names) == per and n_dirs == 2:
        names = names * 2
    alphas = list(ctx.attr("activation_alpha") or [])
    betas = list(ctx.attr("activation_beta") or [])
    specs = []
    for name in names[:per * n_dirs]:
        _, a, b = _ACTIVATIONS[name]
        if a is not None and alphas:
            a = alphas.pop(0)
        if b is not None and betas:
            b = betas.pop(0)
        specs.append((name, a, b))
    return [specs[d * per:(d + 1) * per] for d in range(n_dirs)]


def _plus(e: Emit, a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return e("Add", a, b)


class _Unroll:
    """What the three rules share: per-direction inputs in processing order, [T*B, .] <-> per
    step splitting, sequence masks, activations and their derivatives, gradient stacking."""

    def __init__(self, ctx, n_gates: int, defaults: list[str]):
        op = ctx.onnx_node.op_type
        if ctx.opset < 10:
            raise ModelError(f"{op} gradient (node '{ctx.name}') needs opset >= 10; the model has "
                             f"opset {ctx.opset}, which onnx.version_converter could not "
                             "convert to 11 keeping its initializers (convert it by hand)")
        self.ctx = ctx
        self.e = Emit(ctx)
        x_shape = ctx.shape(ctx.I(0))
        self.layout = ctx.attr("layout", 0) if ctx.opset >= 14 else 0
        self.T, self.B = (x_shape[1], x_shape[0]) if self.layout else tuple(x_shape[:2])
        self.I, self.H, self.G = x_shape[2], ctx.shape(ctx.I(2))[-1], n_gates
        self.dt = ctx.dtype(ctx.I(0))
        self.reverse = directions_of(ctx.attr("direction", "forward"))
        self.D = len(self.reverse)
        self.acts = _activation_specs(ctx, defaults, self.D)
        self.clip = ctx.attr("clip")
        self.y = ctx.onnx_node.output[0] if ctx.onnx_node.output else ""
        self.x_t = self.time_major(ctx.I(0), [1, 0, 2])
        self._steps: dict[str, list[str]] = {}
        self.lens = self.m = self.mn = self.mb = None
        if ctx.I(4):
            self._masks()

    # -- small builders -------------------------------------------------------------------------
    def const(self, value, name: str = "c") -> str:
        return self.ctx.const(value, np.int64, name)

    def time_major(self, x: str, perm) -> str:
        return self.e("Transpose", x, perm=perm) if self.layout else x

    def flat(self, x: str, width: int) -> str:
        return self.e.reshape(x, [self.T * self.B, width])

    def steps(self, x2: str) -> list[str]:
        """[T*B, w] -> T pieces [B, w] (one Split per tensor)."""
        if self.T == 1:
            return [x2]
        if x2 in self._steps:
            return self._steps[x2]
        ctx = self.ctx
        outs = self._steps[x2] = [ctx.tmp("step") for _ in range(self.T)]
        if ctx.opset >= 18:
            self.e.add(ctx.node("Split", [x2], outs, axis=0, num_outputs=self.T))
        elif ctx.opset >= 13:
            self.e.add(ctx.node("Split", [x2, self.const([self.B] * self.T, "split")], outs,
                                axis=0))
        else:
            self.e.add(ctx.node("Split", [x2], outs, axis=0, split=[self.B] * self.T))
        return outs

    def cols(self, x: str, widths: list[int]) -> list[str]:
        """x [N, sum(widths)] split along axis 1."""
        ctx = self.ctx
        outs = [ctx.tmp("col") for _ in widths]
        if ctx.opset >= 13:
            self.e.add(ctx.node("Split", [x, self.const(list(widths), "split")], outs, axis=1))
        else:
            self.e.add(ctx.node("Split", [x], outs, axis=1, split=list(widths)))
        return outs

    def concat(self, parts: list[str], axis: int = 0) -> str:
        return parts[0] if len(parts) == 1 else self.e("Concat", *parts, axis=axis)

    def rows(self, x: str, start: int, end: int) -> str:
        return self.e("Slice", x, self.const([start]), self.const([end]), self.const([0]))

    def gemm(self, a: str, b: str, c: str | None = None, trans_a: int = 0, trans_b: int = 0
             ) -> str:
        if c is None and self.ctx.opset < 11:
            c = self.e.k(0.0)
        return self.e("Gemm", *([a, b] + ([c] if c else [])), transA=trans_a or None,
                      transB=trans_b or None)

    def _masks(self) -> None:
        e, T, B = self.e, self.T, self.B
        self.lens = e("Cast", self.ctx.I(4), to=onnx.TensorProto.INT64, name="lens")
        t = self.ctx.const(np.arange(T, dtype=np.int64).reshape(T, 1), np.int64, "steps")
        valid = e.reshape(e("Less", t, e.reshape(self.lens, [1, B]), name="valid"), [T * B, 1])
        mf = e.cast(valid, self.dt)
        self.mb, self.m = self.steps(valid), self.steps(mf)
        self.mn = self.steps(e("Sub", e.k(1.0), mf))
        nonempty = e("Greater", self.lens, self.const(0), name="nonempty")
        self.nonempty = e.reshape(e.cast(nonempty, self.dt), [B, 1])

    def order(self, x: str, d: int) -> str:
        """A time-major [T, B, .] tensor in direction d's processing order (an involution)."""
        if not self.reverse[d] or (self.T == 1 and self.lens is None):
            return x
        if self.lens is not None:
            return self.e("ReverseSequence", x, self.lens, batch_axis=1, time_axis=0)
        return self.e("Slice", x, self.const([-1]), self.const([np.iinfo(np.int64).min]),
                      self.const([0]), self.const([-1]))

    # -- sequence masks -------------------------------------------------------------------------
    def keep(self, s: int, new: str, old: str) -> str:
        """The state after step s: new within the sequence, old past its end."""
        return new if self.mb is None else self.e("Where", self.mb[s], new, old)

    def masked(self, s: int, g: str | None) -> str | None:
        return g if g is None or self.m is None else self.e("Mul", g, self.m[s])

    def passed(self, s: int, dnew: str, dold: str | None) -> str:
        """dState entering step s: the cell's part plus, past the end, the carried gradient."""
        if dold is None or self.mn is None:
            return dnew
        return self.e("Add", dnew, self.e("Mul", dold, self.mn[s]))

    # -- activations ----------------------------------------------------------------------------
    def clipped(self, a: str) -> str:
        if self.clip is None:
            return a
        c = float(self.clip)
        if self.ctx.opset >= 11:
            return self.e("Clip", a, self.e.k(-c), self.e.k(c), name="clipped")
        return self.e("Clip", a, name="clipped", min=-c, max=c)

    def act(self, spec, a: str) -> str:
        name, al, be = spec
        e = self.e
        simple = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign",
                  "softplus": "Softplus"}
        if name in simple:
            return e(simple[name], a)
        if name == "affine":
            return e("Add", e("Mul", a, e.k(al)), e.k(be))
        if name == "scaledtanh":
            return e("Mul", e("Tanh", e("Mul", a, e.k(be))), e.k(al))
        if name == "hardsigmoid":
            return e("HardSigmoid", a, alpha=al, beta=be)
        op = {"leakyrelu": "LeakyRelu", "thresholdedrelu": "ThresholdedRelu", "elu": "Elu"}[name]
        return e(op, a, alpha=al)

    def dact(self, spec, a: str | None, post: str, clip: bool = True) -> str:
        """f'(clip(a)) * [|a| <= clip], from post = f(clip(a)) where the derivative allows
        (a may then be None); kinks take PyTorch's choice (relu'(0) = 0)."""
        name, al, be = spec
        e, k = self.e, self.e.k
        if name == "tanh":  # 1 - y^2
            d = e("Sub", k(1.0), e("Mul", post, post))
        elif name == "sigmoid":  # y (1 - y)
            d = e("Mul", post, e("Sub", k(1.0), post))
        elif name == "relu":
            d = e.cast(e("Greater", post, k(0.0)), self.dt)
        elif name == "affine":
            d = e("Expand", k(al), e("Shape", post))
        elif name == "scaledtanh":  # a b (1 - (y / a)^2)
            t = e("Mul", post, k(1.0 / al if al else 0.0))
            d = e("Mul", e("Sub", k(1.0), e("Mul", t, t)), k(al * be))
        elif name == "hardsigmoid":  # alpha where 0 < y < 1
            inside = e("And", e("Greater", post, k(0.0)), e("Less", post, k(1.0)))
            d = e("Mul", e.cast(inside, self.dt), k(al))
        elif name == "elu":  # 1 above 0, y + alpha below
            d = e("Where", e("Greater", post, k(0.0)), k(1.0), e("Add", post, k(al)))
        elif name == "softsign":  # (1 - |y|)^2
            t = e("Sub", k(1.0), e("Abs", post))
            d = e("Mul", t, t)
        elif name == "softplus":  # sigmoid(x) = 1 - exp(-y)
            d = e("Sub", k(1.0), e("Exp", e("Neg", post)))
        elif name == "leakyrelu":
            d = e("Where", e("Greater", a, k(0.0)), k(1.0), k(al))
        else:  # thresholdedrelu: 1 above the threshold
            d = e.cast(e("Greater", self.clipped(a) if clip else a, k(al)), self.dt)
        if not clip or self.clip is None:
            return d
        inside = e("Not", e("Greater", e("Abs", a), k(float(self.clip))))
        return e("Mul", e.cast(inside, self.dt), d)

    def gate(self, spec, a: str, with_grad: bool = True) -> tuple[str, str | None]:
        """(f(clip(a)), f'(clip(a)) * clip mask) over a batch of pre-activations."""
        post = self.act(spec, self.clipped(a))
        return post, (self.dact(spec, a, post) if with_grad else None)

    # -- per direction inputs and outputs -------------------------------------------------------
    def pick(self, slot: int, d: int, time_major: bool = False) -> str:
        """Input `slot` of direction d ([D, ...] -> [...]; [B, D, H] with layout 1)."""
        x = self.ctx.I(slot)
        shape = list(self.ctx.shape(x))
        if time_major and self.layout:
            shape = [shape[1], shape[0]] + shape[2:]
            x = self.e("Transpose", x, perm=[1, 0, 2])
        if self.D == 1:
            return self.e.reshape(x, shape[1:])
        return self.e("Gather", x, self.const(d, "dir"), axis=0)

    def weights(self, d: int):
        """W_d [G*H, I], R_d [G*H, H], and (Wb_d, Rb_d) [1, G*H] each or None."""
        w, r = self.pick(1, d), self.pick(2, d)
        bias = None
        if self.ctx.I(3):
            bias = self.cols(self.e.reshape(self.pick(3, d), [1, -1]), [self.G * self.H] * 2)
        return w, r, bias

    def initial(self, slot: int, d: int) -> str:
        if not self.ctx.I(slot):
            return self.e.fill((self.B, self.H), 0.0, self.dt, "zero_state")
        return self.pick(slot, d, time_major=True)

    def seq_of(self, yt: str, d: int) -> str:
        """Direction d of a Y-shaped tensor, [T*B, H] in processing order."""
        yt = self.time_major(yt, [1, 2, 0, 3])  # [T, D, B, H]
        if self.D == 1:
            yd = self.e.reshape(yt, [self.T, self.B, self.H])
        else:
            yd = self.e("Gather", yt, self.const(d, "dir"), axis=1)
        return self.flat(self.order(yd, d), self.H)

    def grad_steps(self, d: int) -> list[str | None]:
        """dY of direction d per processing step ([B, H] each), or Nones."""
        dy = self.ctx.GO(0)
        return [None] * self.T if dy is None else self.steps(self.seq_of(dy, d))

    def grad_final(self, slot: int, d: int) -> str | None:
        """dY_h / dY_c of direction d ([B, H]); an empty sequence's output is a constant 0."""
        g = self.ctx.GO(slot)
        if g is None:
            return None
        g = self.time_major(g, [1, 0, 2])
        if self.D == 1:
            g = self.e.reshape(g, [self.B, self.H])
        else:
            g = self.e("Gather", g, self.const(d, "dir"), axis=0)
        return g if self.lens is None else self.e("Mul", g, self.nonempty)

    def hidden_from_y(self, d: int, h0: str) -> str | None:
        """Hprev [T*B, H], the state entering each step, read from Y (None without Y). Past a
        sequence's end Y holds zeros, not the state: those steps get no gradient anyway."""
        if not self.y:
            return None
        if self.T == 1:
            return h0
        yd = self.seq_of(self.y, d)
        return self.e("Concat", h0, self.rows(yd, 0, (self.T - 1) * self.B), axis=0)

    def finish(self, per_dir: list[dict]) -> list:
        """Stack the directions' gradients into the GI tensors."""
        ctx, e = self.ctx, self.e
        if ctx.needs(0):
            direct = self.D == 1 and not self.reverse[0] and not self.layout
            parts = [self.order(e.reshape(p["x"], [self.T, self.B, self.I],
                                          out=ctx.GI(0) if direct else None), d)
                     for d, p in enumerate(per_dir)]
            if not direct:
                total = e.chain("Add", parts, out=None if self.layout else ctx.GI(0))
                if self.layout:
                    e("Transpose", total, out=ctx.GI(0), perm=[1, 0, 2])
        for slot, key in ((1, "w"), (2, "r"), (3, "b"), (5, "h0"), (6, "c0"), (7, "p")):
            if not ctx.needs(slot):
                continue
            layout_state = self.layout and slot in (5, 6)
            out = ctx.tmp("stacked") if layout_state else ctx.GI(slot)
            if self.D == 1:
                e.add(ctx.unsqueeze(per_dir[0][key], [0], out))
            else:
                parts = [ctx.tmp("dir_part") for _ in per_dir]
                e.add(*[ctx.unsqueeze(p[key], [0], t) for p, t in zip(per_dir, parts,
                                                                         strict=True)])
                e("Concat", *parts, out=out, axis=0)
            if layout_state:
                e("Transpose", out, out=ctx.GI(slot), perm=[1, 0, 2])
        return e.nodes

    def matrix_grads(self, da2: str, xd2: str, w: str, out: dict) -> None:
        """dW = sum_t dA_t^T X_t, dX_t = dA_t W, from dA [T*B, G*H]."""
        if self.ctx.needs(1):
            out["w"] = self.gemm(da2, xd2, trans_a=1)
        if self.ctx.needs(0):
            out["x"] = self.e("MatMul", da2, w)

    def sum_rows(self, x2: str) -> str:
        return self.e.reduce("ReduceSum", x2, [0], keepdims=0)


@grad("RNN", inputs=(0, 1, 2, 3, 5))
def rnn_grad(ctx):
    # Ht = f(clip(At)), At = Xt W^T + Ht-1 R^T + Wb + Rb:  dAt = (dYt + dHt) * f'(At),
    # dHt-1 = dAt R, dW = sum dAt^T Xt, dR = sum dAt^T Ht-1, dWb = dRb = sum dAt, dXt = dAt W
    u = _Unroll(ctx, 1, ["Tanh"])
    e = u.e
    per_dir = []
    for d in range(u.D):
        (spec,) = u.acts[d]
        w, r, bias = u.weights(d)
        h0 = u.initial(5, d)
        xd2 = u.flat(u.order(u.x_t, d), u.I)
        hprev2 = u.hidden_from_y(d, h0)
        if hprev2 is not None and u.clip is None and spec[0] in _POST_ONLY:
            dact2 = u.dact(spec, None, u.seq_of(u.y, d))  # f'(A) from Y, no recompute
        else:
            xw2 = u.gemm(xd2, w, e("Add", *bias) if bias else None, trans_b=1)
            if hprev2 is not None:
                a2 = u.gemm(hprev2, r, xw2, trans_b=1)
            else:  # the recurrence, step by step
                h, hs, pres = h0, [], []
                for s, xw in enumerate(u.steps(xw2)):
                    hs.append(h)
                    pres.append(u.gemm(h, r, xw, trans_b=1))
                    h = u.keep(s, u.act(spec, u.clipped(pres[-1])), h)
                hprev2, a2 = u.concat(hs), u.concat(pres)
            dact2 = u.gate(spec, a2)[1]
        dacts, dys = u.steps(dact2), u.grad_steps(d)
        dh = u.grad_final(1, d)
        das: list[str] = [""] * u.T
        for s in reversed(range(u.T)):
            das[s] = e("Mul", u.masked(s, _plus(e, dys[s], dh)), dacts[s])
            if s > 0 or ctx.needs(5):
                dh = u.passed(s, e("MatMul", das[s], r), dh)
        out = {"h0": dh}
        da2 = u.concat(das)
        u.matrix_grads(da2, xd2, w, out)
        if ctx.needs(2):
            out["r"] = u.gemm(da2, hprev2, trans_a=1)
        if ctx.needs(3):
            db = u.sum_rows(da2)
            out["b"] = e("Concat", db, db, axis=0)
        per_dir.append(out)
    return u.finish(per_dir)


@grad("GRU", inputs=(0, 1, 2, 3, 5))
def gru_grad(ctx):
    # z, r = f(A_zr), A_zr = X W_zr^T + H R_zr^T + b; c = g(A_h), A_h = X W_h^T + (r*H) R_h^T +
    # b_h, or with linear_before_reset X W_h^T + r * (H R_h^T + Rb_h) + Wb_h; H' = c + z (H - c):
    # dA_z = dH' (H - c) f'(z), dA_h = dH' (1 - z) g'(c), d(rH) = dA_h R_h (or d(HR) = dA_h r),
    # dA_r = d(rH) H f'(r) (or dA_h HR f'(r)), dH = dH' z + d(rH) r + dA_zr R_zr (or d(HR) R_h)
    u = _Unroll(ctx, 3, ["Sigmoid", "Tanh"])
    e, H = u.e, u.H
    lbr = ctx.attr("linear_before_reset", 0)
    per_dir = []
    for d in range(u.D):
        f, g = u.acts[d]
        w, r, bias = u.weights(d)
        r_zr, r_h = u.rows(r, 0, 2 * H), u.rows(r, 2 * H, 3 * H)
        h0 = u.initial(5, d)
        xd2 = u.flat(u.order(u.x_t, d), u.I)
        rbh = None
        bias_x = None
        if bias:
            wb, rb = bias
            if lbr:  # Rb_h is applied inside the reset product
                rb_zr, rbh = u.cols(rb, [2 * H, H])
                rb = u.concat([rb_zr, e.fill((1, H), 0.0, u.dt)], axis=1)
            bias_x = e("Add", wb, rb)
        xw_zr2, xw_h2 = u.cols(u.gemm(xd2, w, bias_x, trans_b=1), [2 * H, H])
        hprev2 = u.hidden_from_y(d, h0)
        if hprev2 is not None:
            a_zr2 = u.gemm(hprev2, r_zr, xw_zr2, trans_b=1)
            zr2, dzr2 = u.gate(f, a_zr2)
            z2, rg2 = u.cols(zr2, [H, H])
            if lbr:
                side2 = u.gemm(hprev2, r_h, rbh, trans_b=1)  # H R_h^T + Rb_h
                a_h2 = e("Add", xw_h2, e("Mul", rg2, side2))
            else:
                side2 = e("Mul", rg2, hprev2)  # r * H
                a_h2 = u.gemm(side2, r_h, xw_h2, trans_b=1)
        else:  # the recurrence, step by step
            h, hs, azrs, sides, ahs = h0, [], [], [], []
            for s, (xzr, xh) in enumerate(zip(u.steps(xw_zr2), u.steps(xw_h2), strict=True)):
                hs.append(h)
                azrs.append(u.gemm(h, r_zr, xzr, trans_b=1))
                z, rg = u.cols(u.act(f, u.clipped(azrs[-1])), [H, H])
                if lbr:
                    sides.append(u.gemm(h, r_h, rbh, trans_b=1))
                    ahs.append(e("Add", xh, e("Mul", rg, sides[-1])))
                else:
                    sides.append(e("Mul", rg, h))
                    ahs.append(u.gemm(sides[-1], r_h, xh, trans_b=1))
                c = u.act(g, u.clipped(ahs[-1]))
                h = u.keep(s, e("Add", c, e("Mul", z, e("Sub", h, c))), h)
            hprev2, a_zr2, side2, a_h2 = (u.concat(v) for v in (hs, azrs, sides, ahs))
            zr2, dzr2 = u.gate(f, a_zr2)
            z2, rg2 = u.cols(zr2, [H, H])
        c2, dh2 = u.gate(g, a_h2)
        dz2, dr2 = u.cols(dzr2, [H, H])
        # per-step factors: dA_z = dH' k_z, dA_h = dH' k_h, dA_r = (d(rH) or dA_h) k_r
        k_z = u.steps(e("Mul", e("Sub", hprev2, c2), dz2))
        k_h = u.steps(e("Mul", e("Sub", e.k(1.0), z2), dh2))
        k_r = u.steps(e("Mul", side2 if lbr else hprev2, dr2))
        zs, rgs, dys = u.steps(z2), u.steps(rg2), u.grad_steps(d)
        dh = u.grad_final(1, d)
        back, dahs = [""] * u.T, [""] * u.T  # back: what multiplies R_zr (R with lbr)
        for s in reversed(range(u.T)):
            gs = u.masked(s, _plus(e, dys[s], dh))
            daz, dahs[s] = e("Mul", gs, k_z[s]), e("Mul", gs, k_h[s])
            direct = e("Mul", gs, zs[s])
            if lbr:
                dhr = e("Mul", dahs[s], rgs[s])
                back[s] = e("Concat", daz, e("Mul", dahs[s], k_r[s]), dhr, axis=1)
                if s > 0 or ctx.needs(5):
                    dh = u.passed(s, e("Add", direct, e("MatMul", back[s], r)), dh)
            else:
                drh = e("MatMul", dahs[s], r_h)
                back[s] = e("Concat", daz, e("Mul", drh, k_r[s]), axis=1)
                if s > 0 or ctx.needs(5):
                    total = e.chain("Add", [direct, e("Mul", drh, rgs[s]),
                                            e("MatMul", back[s], r_zr)])
                    dh = u.passed(s, total, dh)
        out = {"h0": dh}
        back2, dah2 = u.concat(back), u.concat(dahs)
        if lbr:
            da2 = e("Concat", u.cols(back2, [2 * H, H])[0], dah2, axis=1)
        else:
            da2 = e("Concat", back2, dah2, axis=1)
        u.matrix_grads(da2, xd2, w, out)
        if ctx.needs(2):
            out["r"] = (u.gemm(back2, hprev2, trans_a=1) if lbr else
                        e("Concat", u.gemm(back2, hprev2, trans_a=1),
                          u.gemm(dah2, side2, trans_a=1), axis=0))
        if ctx.needs(3):
            dwb = u.sum_rows(da2)
            out["b"] = e("Concat", dwb, u.sum_rows(back2) if lbr else dwb, axis=0)
        per_dir.append(out)
    return u.finish(per_dir)


@grad("LSTM", inputs=(0, 1, 2, 3, 5, 6, 7))
def lstm_grad(ctx):
    # Gates (order i, o, f, c): i = f(A_i + P_i C), f likewise (or 1 - i with input_forget),
    # c~ = g(A_c), C' = f C + i c~, o = f(A_o + P_o C'), H' = o h(C'):
    # dA_o = dH' h(C') f'(o), dC' = dC'_carried + dH' o h'(C') + dA_o P_o,
    # dA_i = dC' c~ f'(i), dA_f = dC' C f'(f), dA_c = dC' i g'(c~),
    # dC = dC' f + dA_i P_i + dA_f P_f, dH = dA R, dP = sums of dA_{i,o,f} * (C, C', C)
    u = _Unroll(ctx, 4, ["Sigmoid", "Tanh", "Tanh"])
    e, H = u.e, u.H
    coupled = ctx.attr("input_forget", 0)
    per_dir = []
    for d in range(u.D):
        f, g, hact = u.acts[d]
        w, r, bias = u.weights(d)
        h0, c0 = u.initial(5, d), u.initial(6, d)
        peep = u.cols(e.reshape(u.pick(7, d), [1, 3 * H]), [H] * 3) if ctx.I(7) else None
        xd2 = u.flat(u.order(u.x_t, d), u.I)
        xw2 = u.gemm(xd2, w, e("Add", *bias) if bias else None, trans_b=1)
        hprev2 = u.hidden_from_y(d, h0)
        acts = {}  # batched gate values and derivatives, name -> (value, derivative)
        c, cprevs, cnews = c0, [], []
        if hprev2 is not None and peep is None:
            a_i, a_o, a_f, a_c = u.cols(u.gemm(hprev2, r, xw2, trans_b=1), [H] * 4)
            acts["i"], acts["c"] = u.gate(f, a_i), u.gate(g, a_c)
            acts["f"] = (e("Sub", e.k(1.0), acts["i"][0]), None) if coupled else u.gate(f, a_f)
            fs, ics = u.steps(acts["f"][0]), u.steps(e("Mul", acts["i"][0], acts["c"][0]))
            for s in range(u.T):  # only the cell state's recurrence is left
                cprevs.append(c)
                cnews.append(e("Add", e("Mul", fs[s], c), ics[s]))
                c = u.keep(s, cnews[-1], c)
        else:
            a_steps = (u.steps(u.gemm(hprev2, r, xw2, trans_b=1)) if hprev2 is not None
                       else u.steps(xw2))
            h, hs, pres = h0, [], []
            for s in range(u.T):
                hs.append(h)
                cprevs.append(c)
                a = a_steps[s] if hprev2 is not None else u.gemm(h, r, a_steps[s], trans_b=1)
                pres.append(a)
                gi, go, gf, gc = u.cols(a, [H] * 4)
                if peep:
                    gi, gf = e("Add", gi, e("Mul", peep[0], c)), e("Add", gf, e("Mul", peep[2], c))
                i = u.act(f, u.clipped(gi))
                fg = e("Sub", e.k(1.0), i) if coupled else u.act(f, u.clipped(gf))
                cnews.append(e("Add", e("Mul", fg, c), e("Mul", i, u.act(g, u.clipped(gc)))))
                if hprev2 is None:
                    if peep:
                        go = e("Add", go, e("Mul", peep[1], cnews[-1]))
                    h = u.keep(s, e("Mul", u.act(f, u.clipped(go)), u.act(hact, cnews[-1])), h)
                c = u.keep(s, cnews[-1], c)
            if hprev2 is None:
                hprev2 = u.concat(hs)
            a_i, a_o, a_f, a_c = u.cols(u.concat(pres), [H] * 4)
        cprev2, cnew2 = u.concat(cprevs), u.concat(cnews)
        if peep:
            a_i = e("Add", a_i, e("Mul", peep[0], cprev2))
            a_f = e("Add", a_f, e("Mul", peep[2], cprev2))
            a_o = e("Add", a_o, e("Mul", peep[1], cnew2))
        if "i" not in acts:
            acts["i"], acts["c"] = u.gate(f, a_i), u.gate(g, a_c)
            acts["f"] = (e("Sub", e.k(1.0), acts["i"][0]), None) if coupled else u.gate(f, a_f)
        o2, do2 = u.gate(f, a_o)
        hc2 = u.act(hact, cnew2)
        dhc2 = u.dact(hact, cnew2, hc2, clip=False)
        (i2, di2), (cc2, dc2), (f2, df2) = acts["i"], acts["c"], acts["f"]
        # per-step factors of the backward recursion
        k_o = u.steps(e("Mul", hc2, do2))
        k_c = u.steps(e("Mul", o2, dhc2))
        k_i = u.steps(e("Mul", e("Sub", cc2, cprev2) if coupled else cc2, di2))
        k_f = None if coupled else u.steps(e("Mul", cprev2, df2))
        k_cc, fs, dys = u.steps(e("Mul", i2, dc2)), u.steps(f2), u.grad_steps(d)
        dh, dc = u.grad_final(1, d), u.grad_final(2, d)
        zeros = e.fill((u.B, H), 0.0, u.dt, "zeros") if coupled else None
        das = [""] * u.T
        for s in reversed(range(u.T)):
            gh = u.masked(s, _plus(e, dys[s], dh))
            if gh is None:
                gh = e.fill((u.B, H), 0.0, u.dt, "zeros")
            da_o = e("Mul", gh, k_o[s])
            dcn = _plus(e, u.masked(s, dc), e("Mul", gh, k_c[s]))
            if peep:
                dcn = e("Add", dcn, e("Mul", da_o, peep[1]))
            da_i = e("Mul", dcn, k_i[s])
            da_f = zeros if coupled else e("Mul", dcn, k_f[s])
            das[s] = e("Concat", da_i, da_o, da_f, e("Mul", dcn, k_cc[s]), axis=1)
            if s > 0 or ctx.needs(6):
                dcp = e("Mul", dcn, fs[s])
                if peep:
                    dcp = e.chain("Add", [dcp, e("Mul", da_i, peep[0])] +
                                  ([] if coupled else [e("Mul", da_f, peep[2])]))
                dc = u.passed(s, dcp, dc)
            if s > 0 or ctx.needs(5):
                dh = u.passed(s, e("MatMul", das[s], r), dh)
        out = {"h0": dh, "c0": dc}
        da2 = u.concat(das)
        u.matrix_grads(da2, xd2, w, out)
        if ctx.needs(2):
            out["r"] = u.gemm(da2, hprev2, trans_a=1)
        if ctx.needs(3):
            db = u.sum_rows(da2)
            out["b"] = e("Concat", db, db, axis=0)
        if ctx.needs(7):
            states = e("Concat", cprev2, cnew2, cprev2, axis=1)  # what P_i, P_o, P_f multiply
            out["p"] = u.sum_rows(e("Mul", u.cols(da2, [3 * H, H])[0], states))
        per_dir.append(out)
    return u.finish(per_dir)
