"""Matrix kernels: Gemm, MatMul, Einsum, Det (batched, broadcast; 16-bit floats in float32)."""

from __future__ import annotations

from trainer.kernels import kernel
from trainer.kernels.elementwise import wide


@kernel("Gemm")
def Gemm(xp, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0, broadcast=0):
    # `broadcast` (opsets < 7) allowed C to broadcast; NumPy broadcasting covers both forms.
    dtype = a.dtype
    y = wide(a.T if transA else a) @ wide(b.T if transB else b)
    if alpha != 1.0:
        y = y * y.dtype.type(alpha)
    if c is not None:
        c = wide(c)
        y = y + (c * c.dtype.type(beta) if beta != 1.0 else c)
    return (y.astype(dtype, copy=False),)


@kernel("MatMul")
def MatMul(xp, a, b):
    return (xp.matmul(wide(a), wide(b)).astype(a.dtype, copy=False),)


@kernel("Einsum", since=12)
def Einsum(xp, *xs, equation):
    """NumPy's einsum grammar is ONNX's (explicit/implicit output, ellipsis, upper case)."""
    out = xp.einsum(equation.replace(" ", ""), *[wide(x) for x in xs],
                    optimize=len(xs) > 1)
    return (xp.asarray(out).astype(xs[0].dtype, copy=False),)


@kernel("Det", since=11)
def Det(xp, x):
    return (xp.asarray(xp.linalg.det(wide(x))).astype(x.dtype, copy=False),)
