"""Matrix kernels: Gemm and MatMul (NumPy semantics, batched and broadcast)."""

from __future__ import annotations

from trainer.kernels import kernel


@kernel("Gemm")
def Gemm(xp, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0, broadcast=0):
    # `broadcast` (opsets < 7) allowed C to broadcast; NumPy broadcasting covers both forms.
    y = (a.T if transA else a) @ (b.T if transB else b)
    if alpha != 1.0:
        y *= y.dtype.type(alpha)
    if c is not None:
        y += c * c.dtype.type(beta) if beta != 1.0 else c
    return (y,)


@kernel("MatMul")
def MatMul(xp, a, b):
    return (xp.matmul(a, b),)
