"""Gradient rules for Gemm, MatMul, Einsum and Det."""

from __future__ import annotations

import string

import numpy as np

from trainer.autodiff.registry import grad


def _gemm(ctx, a: str, b: str, out: str, alpha: float = 1.0, trans_a: int = 0,
          trans_b: int = 0):
    """out = alpha op(a) op(b); Gemm's C is required before opset 11 (a zero scalar then)."""
    ins = [a, b]
    if ctx.opset < 11:
        ins.append(ctx.scalar(0.0, ctx.O(0)))
    return ctx.node("Gemm", ins, [out], alpha=None if alpha == 1.0 else alpha,
                    transA=trans_a or None, transB=trans_b or None,
                    broadcast=1 if ctx.opset < 7 else None)


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
            nodes.append(_gemm(ctx, b, dy, ctx.GI(0), alpha, tb, 1))
        else:  # dA = alpha dY op(B)^T
            nodes.append(_gemm(ctx, dy, b, ctx.GI(0), alpha, 0, 1 - tb))
    if ctx.needs(1):
        if tb:  # dB = alpha dY^T op(A)
            nodes.append(_gemm(ctx, dy, a, ctx.GI(1), alpha, 1, ta))
        else:  # dB = alpha op(A)^T dY
            nodes.append(_gemm(ctx, a, dy, ctx.GI(1), alpha, 1 - ta, 0))
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
    if len(sa) >= 2 and len(sb) == 2:
        return _matmul_2d_weight(ctx, sa, sb)
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


def _matmul_2d_weight(ctx, sa, sb):
    """A [..., M, K] @ B [K, N] (a Linear layer): rows of A and dY are one [-1, K] / [-1, N]
    matrix, so dA = dY B^T and dB = A^T dY are single Gemms (no batched intermediate)."""
    a, b, dy = ctx.I(0), ctx.I(1), ctx.GO(0)
    k, n = sb
    nodes = []
    batched = len(sa) > 2
    # (-1 rows cannot be inferred from an empty K or N: the count itself then)
    rows = int(np.prod(sa[:-1])) if 0 in (k, n) else -1
    dy2 = dy
    if batched:
        dy2 = ctx.tmp("dy_rows")
        nodes.append(ctx.reshape(dy, (rows, n), dy2))
    if ctx.needs(0):
        out = ctx.tmp("da_rows") if batched else ctx.GI(0)
        nodes.append(_gemm(ctx, dy2, b, out, trans_b=1))
        if batched:
            nodes += ctx.reshape_as(out, a, ctx.GI(0))
    if ctx.needs(1):
        a2 = a
        if batched:
            a2 = ctx.tmp("a_rows")
            nodes.append(ctx.reshape(a, (rows, k), a2))
        nodes.append(_gemm(ctx, a2, dy2, ctx.GI(1), trans_a=1))
    return nodes


# -- Einsum ----------------------------------------------------------------------------------
def _einsum_terms(equation: str, shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]):
    """Explicit subscripts: ellipses become letters, and a dimension that broadcasts (size 1
    against a larger size of its label) gets a letter of its own. Returns (input terms,
    output term, {letter: size}, a generator of unused letters)."""
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    free = iter(c for c in string.ascii_letters if c not in eq)
    n_ell = max((len(s) - (len(t) - 3) for t, s in zip(terms, shapes, strict=True)
                 if "..." in t), default=0)
    ell = "".join(next(free) for _ in range(n_ell))

    def expand(term: str, rank: int) -> str:
        if "..." not in term:
            return term
        head, tail = term.split("...")
        return head + ell[n_ell - (rank - len(head) - len(tail)):] + tail

    terms = [expand(t, len(s)) for t, s in zip(terms, shapes, strict=True)]
    if "->" in eq:
        out = expand(rhs, len(out_shape)) if "..." in rhs else rhs
    else:  # implicit output: the ellipsis, then labels seen once, in alphabetical order
        counts = {c: "".join(terms).count(c) for c in "".join(terms)}
        out = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    sizes: dict[str, int] = {}
    for t, s in zip(terms, shapes, strict=True):
        for c, d in zip(t, s, strict=True):  # (a size other than 1 is the label's: 0 too)
            sizes[c] = d if sizes.get(c, 1) == 1 else sizes[c]
    fixed = []
    for t, s in zip(terms, shapes, strict=True):
        letters = []
        for c, d in zip(t, s, strict=True):
            if d == 1 and sizes[c] != 1:
                c = next(free)
                sizes[c] = 1
            letters.append(c)
        fixed.append("".join(letters))
    return fixed, out, sizes, free


@grad("Einsum")
def einsum_grad(ctx):
    # dX_i = einsum(dY, X_j (j != i) -> labels of X_i); labels only X_i has are broadcast back
    # (Expand), repeated labels (diagonals) are placed back by an einsum with identity tensors
    n_in = len(ctx.onnx_node.input)
    shapes = [tuple(ctx.shape(ctx.I(i))) for i in range(n_in)]
    terms, out, sizes, free = _einsum_terms(ctx.attr("equation"), shapes,
                                            tuple(ctx.shape(ctx.O(0))))
    dt = ctx.dtype(ctx.I(0))
    nodes = []
    for i in range(n_in):
        if not ctx.needs(i):
            continue
        term = terms[i]
        unique = "".join(dict.fromkeys(term))
        others = [out] + [t for j, t in enumerate(terms) if j != i]
        seen = set("".join(others))
        kept = "".join(c for c in unique if c in seen)
        g = ctx.GO(0)
        ins = [ctx.GO(0)] + [ctx.I(j) for j in range(n_in) if j != i]
        if len(ins) > 1 or others[0] != kept:
            g = ctx.tmp(f"d{i}")
            nodes.append(ctx.node("Einsum", ins, [g], equation=",".join(others) + "->" + kept))
        if kept != unique:  # labels summed away in the forward: broadcast back
            r = ctx.tmp(f"d{i}_kept")
            nodes.append(ctx.reshape(g, [sizes[c] if c in kept else 1 for c in unique], r))
            g = ctx.tmp(f"d{i}_expanded")
            nodes.append(ctx.expand(r, [sizes[c] for c in unique], g, dt))
        if unique != term:  # repeated labels: dX = dG on the diagonal, zero elsewhere
            full, eyes, deltas = [], [], []
            for c in term:
                if c in full:
                    extra = next(free)
                    full.append(extra)
                    eyes.append(c + extra)
                    deltas.append(ctx.const(np.eye(sizes[c], dtype=dt), suffix="eye"))
                else:
                    full.append(c)
            eq = ",".join([unique] + eyes) + "->" + "".join(full)
            nodes.append(ctx.node("Einsum", [g] + deltas, [ctx.GI(i)], equation=eq))
        else:
            nodes.append(ctx.node("Identity", [g], [ctx.GI(i)]))
    return nodes


# -- Det -------------------------------------------------------------------------------------
@grad("Det")
def det_grad(ctx):
    # dX = dY * cofactor(X): cofactor_ij = (-1)^(i+j) det(X without row i and column j), the
    # adjugate transposed, exact for singular X too (no inverse op in standard ONNX)
    shape = ctx.shape(ctx.I(0))
    rank, n = len(shape), shape[-1]
    nodes = []
    dy = ctx.tmp("dy")
    nodes.append(ctx.reshape(ctx.GO(0), list(shape[:-2]) + [1, 1], dy))
    if n == 1:
        nodes.append(ctx.node("Expand", [dy, ctx.const(list(shape), np.int64, "shape")],
                              [ctx.GI(0)]))
        return nodes
    rest = ctx.const(np.array([[j for j in range(n) if j != i] for i in range(n)], np.int64),
                     suffix="others")
    rows, minors, moved, dets, sign = (ctx.tmp(s) for s in ("rows", "minors", "moved", "dets",
                                                            "sign"))
    batch = list(range(rank - 2))
    checker = (-1.0) ** np.add.outer(np.arange(n), np.arange(n))
    nodes += [ctx.node("Gather", [ctx.I(0), rest], [rows], axis=rank - 2),
              ctx.node("Gather", [rows, rest], [minors], axis=rank),
              ctx.node("Transpose", [minors], [moved],
                       perm=batch + [rank - 2, rank, rank - 1, rank + 1]),
              ctx.node("Det", [moved], [dets]),
              ctx.node("Mul", [dy, ctx.const(checker.astype(ctx.dtype(ctx.I(0))),
                                             suffix="checker")], [sign]),
              ctx.node("Mul", [dets, sign], [ctx.GI(0)])]
    return nodes
