"""Gradient rules for Gemm and MatMul."""

from __future__ import annotations

from trainer.autodiff.registry import grad


@grad("Gemm")
def gemm_grad(ctx):
    # Y = alpha op(A) op(B) + beta C:  dA = alpha dY op(B)^T (op-transposed),
    # dB = alpha op(A)^T dY (op-transposed), dC = beta dY summed to C
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    ta, tb = ctx.attr("transA", 0), ctx.attr("transB", 0)
    a, b, dy = ctx.I(0), ctx.I(1), ctx.GO(0)
    nodes = []
    if ctx.needs(0):
        if ta:  # dA = alpha op(B) dY^T
            nodes.append(ctx.node("Gemm", [b, dy], [ctx.GI(0)], alpha=alpha, transA=tb,
                                  transB=1))
        else:  # dA = alpha dY op(B)^T
            nodes.append(ctx.node("Gemm", [dy, b], [ctx.GI(0)], alpha=alpha, transB=1 - tb))
    if ctx.needs(1):
        if tb:  # dB = alpha dY^T op(A)
            nodes.append(ctx.node("Gemm", [dy, a], [ctx.GI(1)], alpha=alpha, transA=1,
                                  transB=ta))
        else:  # dB = alpha op(A)^T dY
            nodes.append(ctx.node("Gemm", [a, dy], [ctx.GI(1)], alpha=alpha, transA=1 - ta))
    if ctx.needs(2):
        src = dy
        if beta != 1.0:
            src = ctx.tmp("beta_dy")
            nodes.append(ctx.node("Mul", [dy, ctx.scalar(beta, a)], [src]))
        nodes += ctx.to_input(src, 2)
    return nodes


@grad("MatMul")
def matmul_grad(ctx):
    # dA = dY B^T, dB = A^T dY (batch dims summed; 1-D operands promoted as NumPy does)
    a, b, dy = ctx.I(0), ctx.I(1), ctx.GO(0)
    sa, sb, sy = ctx.shape(a), ctx.shape(b), ctx.shape(ctx.O(0))
    nodes = []
    if len(sa) == 1:
        sa2, a2 = (1,) + sa, ctx.tmp("a2")
        nodes.append(ctx.reshape(a, sa2, a2))
        sy = sy[:-1] + (1,) + sy[-1:] if len(sb) > 1 else (1,)
        a, sa_eff = a2, sa2
    else:
        sa_eff = sa
    if len(sb) == 1:
        sb2, b2 = sb + (1,), ctx.tmp("b2")
        nodes.append(ctx.reshape(b, sb2, b2))
        sy = sy + (1,)
        b, sb_eff = b2, sb2
    else:
        sb_eff = sb
    if sy != ctx.shape(ctx.O(0)):
        dy2 = ctx.tmp("dy2")
        nodes.append(ctx.reshape(dy, sy, dy2))
        dy = dy2

    def swap(name, rank):
        t = ctx.tmp("T")
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        nodes.append(ctx.node("Transpose", [name], [t], perm=perm))
        return t

    if ctx.needs(0):
        t = ctx.tmp("da")
        nodes.append(ctx.node("MatMul", [dy, swap(b, len(sb_eff))], [t]))
        full = sy[:-2] + (sy[-2], sb_eff[-2])
        nodes += ctx.sum_to(t, full, sa_eff, ctx.GI(0) if sa_eff == sa else ctx.tmp("da2"))
        if sa_eff != sa:
            nodes.append(ctx.reshape(nodes[-1].output[0], sa, ctx.GI(0)))
    if ctx.needs(1):
        t = ctx.tmp("db")
        nodes.append(ctx.node("MatMul", [swap(a, len(sa_eff)), dy], [t]))
        full = sy[:-2] + (sa_eff[-1], sy[-1])
        nodes += ctx.sum_to(t, full, sb_eff, ctx.GI(1) if sb_eff == sb else ctx.tmp("db2"))
        if sb_eff != sb:
            nodes.append(ctx.reshape(nodes[-1].output[0], sb, ctx.GI(1)))
    return nodes
