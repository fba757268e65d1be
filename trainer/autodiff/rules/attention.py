"""Gradient rules for Attention (opsets 23-25), RotaryEmbedding and LinearAttention."""

# Attention recomputes the softmax probabilities with one Attention node (qk_matmul_output_mode
# 3 and a zero value tensor of head size 1, so every mask variant matches the forward exactly),
# then runs the backward as four batched matmuls in the grouped-query layout [B, Hkv, G*Sq, .],
# where the sums over the query heads sharing a key/value head fall out of the matmuls. Rows
# with no allowed key have P = 0 and output 0: they get no gradient.

from __future__ import annotations

import math

import numpy as np

from trainer.autodiff.registry import grad
from trainer.autodiff.rules.norm import Emit


def _swap_last(e: Emit, x: str, name: str = "T") -> str:
    return e("Transpose", x, name=name, perm=[0, 1, 3, 2])


def _to_heads(e: Emit, x: str, b: int, s: int, h: int, d: int) -> str:
    """[B, S, H*D] -> [B, H, S, D]."""
    return e("Transpose", e.reshape(x, [b, s, h, d]), perm=[0, 2, 1, 3])


def _from_heads(e: Emit, x: str, b: int, s: int, h: int, d: int, out: str) -> str:
    """[B, H, S, D] -> [B, S, H*D]."""
    return e.reshape(e("Transpose", x, perm=[0, 2, 1, 3]), [b, s, h * d], out=out)


def _plus(e: Emit, a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return e("Add", a, b)


@grad("Attention", inputs=(0, 1, 2, 3, 4, 5))
def attention_grad(ctx):
    # P = softmax(cap(scale * Q K^T) + mask), Y = P V; dV = P^T dY, dP = dY V^T,
    # dS = P * (dP - sum(dP * P)), dMask = sum_to(dS), dRaw = dS * (1 - tanh^2(raw / cap)),
    # dQ = scale * dRaw K, dK = scale * dRaw^T Q  (past/present: slices of the full K and V)
    e = Emit(ctx)
    q, k, v = ctx.I(0), ctx.I(1), ctx.I(2)
    q_shape, k_shape, v_shape = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    three_d = len(q_shape) == 3
    if three_d:
        hq, hkv = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
        b, sq, d = q_shape[0], q_shape[1], q_shape[2] // hq
        sk, dv = k_shape[1], v_shape[2] // hkv
    else:
        b, hq, sq, d = q_shape
        hkv, sk, dv = k_shape[1], k_shape[2], v_shape[3]
    g = hq // hkv
    past = ctx.I(4) or None
    sp = ctx.shape(past)[2] if past else 0
    skt = sp + sk
    scale = ctx.attr("scale") or 1.0 / math.sqrt(d)
    cap = max(ctx.attr("softcap", 0.0) or 0.0, 0.0)  # the kernel ignores softcap <= 0
    mode = ctx.attr("qk_matmul_output_mode", 0)
    outs = list(ctx.onnx_node.output) + [""] * 3
    dt = ctx.dtype(q)
    has_bias = bool(ctx.I(3) or ctx.attr("is_causal", 0) or ctx.I(6)
                    or ctx.attr("left_window_size", -1) >= 0
                    or ctx.attr("right_window_size", -1) >= 0)
    qk_grad = ctx.GO(3) if outs[3] else None
    # where qk_matmul_output's gradient joins: at P, after the mask (mode 2; without a mask,
    # after the softcap, as mode 1), after the softcap, or at the raw scores
    capped = "capped" if cap else "raw"
    qk_at = {3: "probs", 2: "masked" if has_bias else capped, 1: capped, 0: "raw"}[mode]

    def grouped(x: str, last: int) -> str:
        return e.reshape(x, [b, hkv, g * sq, last])

    # -- forward values the backward reads ----------------------------------------------
    if outs[3] and mode == 3:
        probs = outs[3]
    else:
        zv = (b, sk, hkv) if three_d else (b, hkv, sk, 1)
        ins = [q, k, e.fill(zv, 0.0, dt, "zero_v"), ctx.I(3), "", "", ctx.I(6)]
        if past:
            ins[4:6] = [past, e.fill((b, hkv, sp, 1), 0.0, dt, "zero_pv")]
        while ins and not ins[-1]:
            ins.pop()
        attrs = {a: ctx.attr(a) for a in ctx.attrs if a != "qk_matmul_output_mode"}
        probs = ctx.tmp("probs")
        rec = [ctx.tmp("y_unused"), ctx.tmp("pk_unused"), ctx.tmp("pv_unused")] if past else \
            [ctx.tmp("y_unused"), "", ""]
        e.add(ctx.node("Attention", ins, rec + [probs], qk_matmul_output_mode=3, **attrs))
    q4 = _to_heads(e, q, b, sq, hq, d) if three_d else q
    qg = grouped(q4, d)
    p_g = grouped(probs, skt)

    def full(i: int, shape_d: int) -> str:  # K or V with the past, [B, Hkv, Skt, D]
        if outs[i]:
            return outs[i]
        x = _to_heads(e, ctx.I(i), b, sk, hkv, shape_d) if three_d else ctx.I(i)
        return e("Concat", ctx.I(i + 3), x, axis=2) if past else x

    def full_t(i: int, shape_d: int) -> str:  # K or V transposed, [B, Hkv, D, Skt]
        if three_d and not past and not outs[i]:  # one Transpose from [B, S, H, D]
            return e("Transpose", e.reshape(ctx.I(i), [b, sk, hkv, shape_d]), perm=[0, 2, 3, 1])
        return _swap_last(e, full(i, shape_d))

    need_kq = any(ctx.needs(i) for i in (0, 1, 3, 4))
    need_v = ctx.needs(2) or ctx.needs(5)
    dy = ctx.GO(0)
    dyg = None
    if dy is not None:
        dyg = grouped(_to_heads(e, dy, b, sq, hq, dv) if three_d else dy, dv)
    # -- value side -----------------------------------------------------------------------
    if need_v:
        dv_full = e("MatMul", _swap_last(e, p_g), dyg) if dyg else None
        dv_full = _plus(e, dv_full, ctx.GO(2) if outs[2] else None)
        if dv_full:
            _split_kv(ctx, e, dv_full, 2, 5, sp, sk, three_d, b, hkv, dv)
    if not need_kq:
        return e.zero_fill()
    # -- score side -----------------------------------------------------------------------
    dp = e("MatMul", dyg, full_t(2, dv)) if dyg else None
    if qk_grad and qk_at == "probs":
        dp = _plus(e, dp, grouped(qk_grad, skt))
    ds = None
    if dp is not None:
        t = e("Mul", dp, p_g)
        ds = e("Sub", t, e("Mul", p_g, e.reduce("ReduceSum", t, [-1])), name="dS")
    if qk_grad and qk_at == "masked":
        ds = _plus(e, ds, grouped(qk_grad, skt))
    if ctx.needs(3) and ds:
        m_shape = ctx.shape(ctx.I(3))
        src, src_shape = e.reshape(ds, [b, hq, sq, skt]), (b, hq, sq, skt)
        if m_shape[-1] < skt:  # a short mask was padded with -inf: no gradient there
            src = e("Slice", src, ctx.const([0], np.int64, "starts"),
                    ctx.const([m_shape[-1]], np.int64, "ends"), ctx.const([3], np.int64, "axes"))
            src_shape = (b, hq, sq, m_shape[-1])
        e.sum_to(src, src_shape, m_shape, ctx.GI(3))
    if not any(ctx.needs(i) for i in (0, 1, 4)):
        return e.zero_fill()
    if qk_grad and qk_at == "capped":
        ds = _plus(e, ds, grouped(qk_grad, skt))
    k_full = full(1, d)
    if cap and ds is not None:
        if outs[3] and mode == 1:  # the capped scores are an output: tanh = capped / cap
            th = grouped(e("Mul", outs[3], e.k(1.0 / cap), name="tanh"), skt)
        elif outs[3] and mode == 0:  # the raw scores are an output
            th = grouped(e("Tanh", e("Mul", outs[3], e.k(1.0 / cap))), skt)
        else:
            raw = e("MatMul", qg, full_t(1, d))
            th = e("Tanh", e("Mul", raw, e.k(scale / cap)), name="tanh")
        ds = e("Sub", ds, e("Mul", ds, e("Mul", th, th)))
    if qk_grad and qk_at == "raw":
        ds = _plus(e, ds, grouped(qk_grad, skt))
    if ds is None:  # only present_key/present_value carry gradients
        pass
    elif ctx.needs(0):
        dq = e("Mul", e("MatMul", ds, k_full), e.k(scale))
        if three_d:
            _from_heads(e, e.reshape(dq, [b, hq, sq, d]), b, sq, hq, d, ctx.GI(0))
        else:
            e.reshape(dq, [b, hq, sq, d], out=ctx.GI(0))
    if ctx.needs(1) or ctx.needs(4):
        dk_full = e("Mul", e("MatMul", _swap_last(e, ds), qg), e.k(scale)) if ds else None
        dk_full = _plus(e, dk_full, ctx.GO(1) if outs[1] else None)
        if dk_full:
            _split_kv(ctx, e, dk_full, 1, 4, sp, sk, three_d, b, hkv, d)
    return e.zero_fill()


def _split_kv(ctx, e: Emit, grad_full: str, cur: int, past: int, sp: int, sk: int,
              three_d: bool, b: int, hkv: int, d: int) -> None:
    """Gradient of the concatenated [B, Hkv, Sp+Sk, D] cache into past (4-D) and current."""
    def part(start: int, end: int) -> str:
        if sp == 0:
            return grad_full
        return e("Slice", grad_full, ctx.const([start], np.int64, "starts"),
                 ctx.const([end], np.int64, "ends"), ctx.const([2], np.int64, "axes"))
    if ctx.needs(past):
        e("Identity", part(0, sp), out=ctx.GI(past))
    if ctx.needs(cur):
        if three_d:
            _from_heads(e, part(sp, sp + sk), b, sk, hkv, d, ctx.GI(cur))
        else:
            e("Identity", part(sp, sp + sk), out=ctx.GI(cur))


@grad("RotaryEmbedding", inputs=(0, 1, 2))
def rotary_grad(ctx):
    # The rotation is orthogonal: dX = RotaryEmbedding(dY, cos, -sin);
    # dCos = sum over heads and pairs of dY * X, dSin = the same with X rotated by 90 degrees,
    # RotaryEmbedding(X, cos=0, sin=1) = (-x2, x1); with position_ids both scatter-add to rows
    e, x, dy = Emit(ctx), ctx.I(0), ctx.GO(0)
    cos, sin, pos = ctx.I(1), ctx.I(2), ctx.I(3)
    attrs = {a: ctx.attr(a) for a in ctx.attrs}
    if ctx.needs(0):
        e.add(ctx.node("RotaryEmbedding", [dy, cos, e("Neg", sin)] + ([pos] if pos else []),
                       [ctx.GI(0)], **attrs))
    if not (ctx.needs(1) or ctx.needs(2)):
        return e.nodes
    shape, dt = ctx.shape(x), ctx.dtype(x)
    if len(shape) == 4:
        bsz, _, s, hd = shape
        view, head_axis = list(shape), 1
    else:
        heads = ctx.attr("num_heads")
        bsz, s, hd = shape[0], shape[1], shape[2] // heads
        view, head_axis = [bsz, s, heads, hd], 2
    r = ctx.attr("rotary_embedding_dim", 0) or hd
    pairs = [r // 2, 2] if ctx.attr("interleaved", 0) else [2, r // 2]
    pair_axis = 4 if ctx.attr("interleaved", 0) else 3

    scatter = []  # (zeros, indices), shared by dCos and dSin

    def per_position(prod: str, out: str) -> None:
        src = prod
        if r < hd:
            src = e("Slice", e.reshape(prod, view), ctx.const([0], np.int64, "starts"),
                    ctx.const([r], np.int64, "ends"), ctx.const([3], np.int64, "axes"))
        src = e.reshape(src, view[:3] + pairs)
        if not pos:
            e.reduce("ReduceSum", src, [head_axis, pair_axis], keepdims=0, out=out)
            return
        rows = e.reduce("ReduceSum", src, [head_axis, pair_axis], keepdims=0)
        if not scatter:
            scatter.extend([e.fill(ctx.shape(cos), 0.0, dt, "zeros"),
                            e("Unsqueeze", pos, ctx.const([-1], np.int64, "axes"))])
        e("ScatterND", *scatter, rows, out=out, reduction="add")

    if ctx.needs(1):
        per_position(e("Mul", dy, x), ctx.GI(1))
    if ctx.needs(2):
        cache = (bsz, s, r // 2)
        rot = e("RotaryEmbedding", x, e.fill(cache, 0.0, dt, "zeros"),
                e.fill(cache, 1.0, dt, "ones"), name="rot90",
                **{a: v for a, v in attrs.items()})
        per_position(e("Mul", dy, rot), ctx.GI(2))
    return e.nodes


@grad("LinearAttention", inputs=(0, 1, 2, 3, 4, 5))
def linear_attention_grad(ctx):
    # Per step (batched over B, Hkv): S' = a_t S (a = exp(decay), gated), u = v (linear) or
    # beta (v - k^T S') (delta), S_t = S' + k u^T, o_t = scale q_t S_t. Backward through time:
    # dq = do S_t^T, dS += q^T do, du = k^T dS, dk = dS u (+ dS'^T... see delta), dv = beta du,
    # dbeta = sum(du (v - k^T S')), dS' = dS - k (beta du)^T, dk -= S' (beta du),
    # ddecay = sum(dS' * S'), dS_prev = a_t dS'. The states are recomputed step by step.
    e = Emit(ctx)
    q, k, v = ctx.I(0), ctx.I(1), ctx.I(2)
    b, t, _ = ctx.shape(q)
    hq, hkv = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
    g = hq // hkv
    dk, dv = ctx.shape(q)[2] // hq, ctx.shape(v)[2] // hkv
    rule = ctx.attr("update_rule", "gated_delta")
    gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    scale = ctx.attr("scale", 0.0) or 1.0 / math.sqrt(dk)
    dt = ctx.dtype(q)

    def steps(x: str, axis: int, shape) -> list[str]:
        """Split along the time axis; each step reshaped to `shape`."""
        if t == 1:
            return [e.reshape(x, shape)]
        outs = [ctx.tmp("step") for _ in range(t)]
        e.add(ctx.node("Split", [x], outs, axis=axis, num_outputs=t))
        return [e.reshape(o, shape) for o in outs]

    def heads(x: str, h: int, d: int) -> str:  # [B, T, h*d] -> [B, h, T, d]
        return _to_heads(e, x, b, t, h, d)

    qs = steps(e("Transpose", e.reshape(q, [b, t, hkv, g, dk]), perm=[0, 2, 1, 3, 4]), 2,
               [b, hkv, g, dk])
    ks = steps(heads(k, hkv, dk), 2, [b, hkv, 1, dk])  # rows
    vs = steps(heads(v, hkv, dv), 2, [b, hkv, 1, dv])
    w = ctx.shape(ctx.I(4))[-1] // hkv if gated else 0
    decays = steps(heads(e("Exp", ctx.I(4)), hkv, w), 2, [b, hkv, w, 1]) if gated else []
    hb = ctx.shape(ctx.I(5))[-1] if delta else 0
    betas = steps(e("Transpose", ctx.I(5), perm=[0, 2, 1]), 2, [b, hb, 1, 1]) if delta else []

    def as_state(x: str, slot_dtype) -> str:
        return x if np.dtype(slot_dtype) == np.dtype(dt) else e.cast(x, dt)

    past = ctx.I(3)
    s = as_state(past, ctx.dtype(past)) if past else e.fill((b, hkv, dk, dv), 0.0, dt, "S0")
    prevs, decayed, us, rs, states = [], [], [], [], []
    for i in range(t):  # the forward recurrence, keeping what the backward reads
        prevs.append(s)
        sd = e("Mul", s, decays[i]) if gated else s
        decayed.append(sd)
        u = vs[i]
        if delta:
            rs.append(e("Sub", vs[i], e("MatMul", ks[i], sd)))
            u = e("Mul", betas[i], rs[-1])
        us.append(u)
        s = e("Add", sd, e("Mul", e.reshape(ks[i], [b, hkv, dk, 1]), u))
        states.append(s)

    dys = [None] * t
    if ctx.GO(0) is not None:
        do = e("Mul", ctx.GO(0), e.k(scale))
        dys = steps(e("Transpose", e.reshape(do, [b, t, hkv, g, dv]), perm=[0, 2, 1, 3, 4]),
                    2, [b, hkv, g, dv])
    ds = ctx.GO(1)
    if ds is not None:
        ds = as_state(ds, ctx.dtype(ctx.O(1)))
    dq, dkk, dvv, ddecay, dbeta = ([None] * t for _ in range(5))
    for i in reversed(range(t)):
        if dys[i] is not None:
            dq[i] = e("MatMul", dys[i], _swap_last(e, states[i]))
            ds = _plus(e, ds, e("MatMul", _swap_last(e, qs[i]), dys[i]))
        if ds is None:  # no gradient reaches this step yet
            continue
        du = e("MatMul", ks[i], ds)  # [B, Hkv, 1, dv]
        dkk[i] = e("MatMul", us[i], _swap_last(e, ds))
        dsd = ds
        dvv[i] = du
        if delta:
            dbeta[i] = e.reduce("ReduceSum", e("Mul", du, rs[i]), [1, 3] if hb == 1 else [3])
            bdu = e("Mul", betas[i], du)
            dvv[i] = bdu
            dkk[i] = e("Sub", dkk[i], e("MatMul", bdu, _swap_last(e, decayed[i])))
            dsd = e("Sub", ds, e("Mul", e.reshape(ks[i], [b, hkv, dk, 1]), bdu))
        if gated:
            ddecay[i] = e.reduce("ReduceSum", e("Mul", dsd, decayed[i]), [3] if w > 1 else [2, 3])
            ds = e("Mul", dsd, decays[i])
        else:
            ds = dsd

    def gather(parts, shape, dims, perm, out):
        """Per-step gradients (None = 0) -> the input's [B, T, ...] layout."""
        full = [e.reshape(p, shape) if p else e.fill(shape, 0.0, dt) for p in parts]
        x = e("Concat", *full, axis=2) if t > 1 else full[0]
        e.reshape(e("Transpose", e.reshape(x, dims), perm=perm), ctx.shape(ctx.I(out)),
                  out=ctx.GI(out))

    if ctx.needs(0):
        gather(dq, [b, hkv, 1, g * dk], [b, hkv, t, g * dk], [0, 2, 1, 3], 0)
    if ctx.needs(1):
        gather(dkk, [b, hkv, 1, dk], [b, hkv, t, dk], [0, 2, 1, 3], 1)
    if ctx.needs(2):
        gather(dvv, [b, hkv, 1, dv], [b, hkv, t, dv], [0, 2, 1, 3], 2)
    if ctx.needs(3):
        dpast = ds if ds is not None else e.fill((b, hkv, dk, dv), 0.0, dt)
        if np.dtype(ctx.dtype(past)) != np.dtype(dt):
            dpast = e.cast(dpast, ctx.dtype(past))
        e("Identity", dpast, out=ctx.GI(3))
    if gated and ctx.needs(4):
        gather(ddecay, [b, hkv, 1, w], [b, hkv, t, w], [0, 2, 1, 3], 4)
    if delta and ctx.needs(5):
        gather(dbeta, [b, hb, 1], [b, hb, t], [0, 2, 1], 5)
    return e.zero_fill()
