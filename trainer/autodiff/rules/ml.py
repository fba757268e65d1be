"""Gradient rules of the ai.onnx.ml linear models, SVMs and feature ops with respect to their
float input X (coefficients are attributes: constants); class labels carry no gradient. The
backward runs in X's dtype (the float32 scores are cast to float64 for a float64 X).
"""

from __future__ import annotations

import math

import numpy as np

from trainer.autodiff.registry import grad
from trainer.errors import ModelError
from trainer.graph import elem_type
from trainer.kernels.ml_linear import (
    imputer_values,
    linear_classifier_classes,
    svm_kernel_params,
    svm_pair_matrix,
    svm_pairs,
)

ML = "ai.onnx.ml"
MIN_OPSET = 11  # Equal on floats, Where, negative reduce axes


class _Emit:
    """Node list and dtype of one backward: `op(...)` appends a node and returns its output."""

    def __init__(self, ctx):
        if ctx.opset < MIN_OPSET:
            raise ModelError(f"node '{ctx.name}' ({ctx.onnx_node.op_type}): gradients of "
                             f"ai.onnx.ml ops need a default-domain opset >= {MIN_OPSET}, the "
                             f"model has {ctx.opset}; convert it with onnx.version_converter")
        self.ctx, self.nodes = ctx, []
        self.dt = np.dtype(ctx.dtype(ctx.I(0)))

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self.ctx.tmp(op_type.lower())
        self.nodes.append(self.ctx.node(op_type, list(inputs), [out], **attrs))
        return out

    def c(self, value, dtype=None) -> str:
        return self.ctx.const(np.asarray(value, dtype or self.dt))

    def cast(self, name: str) -> str:
        """A forward tensor (or its gradient) in the backward's dtype."""
        if np.dtype(self.ctx.dtype(name)) == self.dt:
            return name
        return self.op("Cast", name, to=elem_type(self.dt))

    def go(self, i: int) -> str:
        go = self.ctx.GO(i)
        if np.dtype(self.ctx.dtype(self.ctx.O(i))) == self.dt:
            return go
        return self.op("Cast", go, to=elem_type(self.dt))

    def rsum(self, x: str, axis: int = -1) -> str:
        out = self.ctx.tmp("sum")
        self.nodes.append(self.ctx.reduce("ReduceSum", x, [axis], out, keepdims=1))
        return out

    def reshape(self, x: str, shape, out: str | None = None) -> str:
        out = out or self.ctx.tmp("reshape")
        self.nodes.append(self.ctx.reshape(x, list(shape), out))
        return out

    def rows(self, x: str) -> str:
        """X as [N, F] (a 1-D X is one row)."""
        shape = self.ctx.shape(x)
        return self.reshape(x, [1, shape[0]]) if len(shape) == 1 else x

    def into(self, i: int, op_type: str, *inputs: str, shape=None, **attrs) -> list:
        """The last node, written into GI(i); see `finish`."""
        return self.finish(i, self.op(op_type, *inputs, **attrs), shape)

    def finish(self, i: int, name: str, shape=None) -> list:
        """Make `name` (the last node's output, of `shape`; default: X's [N, F] rows) GI(i),
        reshaped to input i's shape where that differs."""
        target = tuple(self.ctx.shape(self.ctx.I(i)))
        if shape is None:
            shape = (1, target[0]) if len(target) == 1 else target
        if tuple(shape) != target:
            self.reshape(name, target, self.ctx.GI(i))
        elif self.nodes and list(self.nodes[-1].output) == [name]:
            self.nodes[-1].output[0] = self.ctx.GI(i)
        else:
            self.op("Identity", name, out=self.ctx.GI(i))
        return self.nodes

    def zeros_into(self, i: int) -> list:
        shape = list(self.ctx.shape(self.ctx.I(i)))
        self.nodes.append(self.ctx.expand(self.c(0.0), shape, self.ctx.GI(i), self.dt))
        return self.nodes


def _probit_slope(e: _Emit, z: str) -> str:
    # d/dp sqrt(2) erfinv(2p - 1) = sqrt(2 pi) exp(z^2 / 2), z the probit (the erfinv
    # derivative at the forward's value; the forward uses Winitzki's erfinv approximation)
    half = e.op("Mul", e.op("Mul", z, z), e.c(0.5))
    return e.op("Exp", e.op("Add", half, e.c(0.5 * math.log(2 * math.pi))))


def _post_backward(e: _Emit, kind: str, dz: str, z: str, n_cols: int) -> str:
    """dS of Z = post_transform(S) over [N, C] scores (one column: PROBIT only)."""
    if kind == "NONE" or (n_cols == 1 and kind != "PROBIT"):
        return dz
    if kind == "PROBIT":
        return e.op("Mul", dz, _probit_slope(e, z))
    if kind == "LOGISTIC":  # dS = dZ * Z * (1 - Z)
        return e.op("Mul", dz, e.op("Mul", z, e.op("Sub", e.c(1.0), z)))
    # SOFTMAX: dS = Z * (dZ - sum(dZ * Z)). SOFTMAX_ZERO is a softmax over the non-zero scores
    # whose zero scores give Z = 0 (|s| <= 1e-7: Z ~ s exp(-max) / sum): the same formula gives
    # them no gradient and leaves them out of the sum (zero scores count as constants).
    return e.op("Mul", z, e.op("Sub", dz, e.rsum(e.op("Mul", dz, z))))


def _weights(e: _Emit, coefficients, rows: int, f: int) -> str:
    return e.c(np.asarray(coefficients[: rows * f], np.float64).reshape(rows, f))


@grad("Scaler", domain=ML)
def scaler_grad(ctx):
    # dX = dY * scale (scale repeats with period F along the flat data)
    e = _Emit(ctx)
    dy = e.go(0)
    shape = tuple(ctx.shape(ctx.I(0)))
    scale = list(ctx.attr("scale") or [1.0])
    if all(s == 1.0 for s in scale):
        return e.into(0, "Identity", dy, shape=shape)
    f = shape[0] if len(shape) == 1 else shape[1]
    if len(scale) > 1 and len(shape) > 2:
        return e.into(0, "Mul", e.reshape(dy, [-1, f]), e.c(scale), shape=(-1, f))
    return e.into(0, "Mul", dy, e.c(scale), shape=shape)


@grad("Normalizer", domain=ML)
def normalizer_grad(ctx):
    # Y = X / d per row, d = max(X), sum|X| or |X|_2 (a row with d == 0 is copied: dX = dY):
    # dX = (dY - sum(dY Y) dd/dX) / d, dd/dX = ties / #ties (MAX: tied maxima share, as
    # torch.amax), sign(X) (L1: sign(0) = 0, as torch.abs) or Y (L2)
    e = _Emit(ctx)
    x, dy, y = ctx.I(0), e.go(0), e.cast(ctx.O(0))
    norm = ctx.attr("norm", "MAX")
    if norm == "MAX":
        d = ctx.tmp("max")
        e.nodes.append(ctx.reduce("ReduceMax", x, [-1], d, keepdims=1))
        tie = e.op("Cast", e.op("Equal", x, d), to=elem_type(e.dt))
        direction = e.op("Div", tie, e.rsum(tie))
    elif norm == "L1":
        d = e.rsum(e.op("Abs", x))
        direction = e.op("Sign", x)
    elif norm == "L2":
        d = e.op("Sqrt", e.rsum(e.op("Mul", x, x)))
        direction = y
    else:
        raise ModelError(f"node '{ctx.name}' (Normalizer): unknown norm '{norm}'")
    zero = e.op("Equal", d, e.c(0.0))
    inner = e.op("Where", zero, e.c(0.0), e.rsum(e.op("Mul", dy, y)))
    num = e.op("Sub", dy, e.op("Mul", inner, direction))
    return e.into(0, "Div", num, e.op("Where", zero, e.c(1.0), d),
                  shape=ctx.shape(x))


@grad("Imputer", domain=ML)
def imputer_grad(ctx):
    # Y = where(X == replaced, imputed, X): dX = dY where kept, 0 where replaced (NaN: IsNaN)
    e = _Emit(ctx)
    x = ctx.I(0)
    _, replaced = imputer_values(True, ctx.attr("imputed_value_floats"),
                                 ctx.attr("imputed_value_int64s"),
                                 ctx.attr("replaced_value_float", 0.0),
                                 ctx.attr("replaced_value_int64", 0))
    hit = (e.op("IsNaN", x) if math.isnan(replaced)
           else e.op("Equal", x, e.c(replaced)))
    return e.into(0, "Where", hit, e.c(0.0), e.go(0), shape=ctx.shape(x))


@grad("FeatureVectorizer", domain=ML)
def feature_vectorizer_grad(ctx):
    # Y = concat(cut-or-padded rows of each X_i): dX_i = its columns of dY, zeros where X_i
    # was cut (padding columns get nothing back)
    e = _Emit(ctx)
    dims = [int(d) for d in ctx.attr("inputdimensions") or []]
    dy = e.go(0)
    offset = 0
    for i, width in enumerate(dims):
        shape = tuple(ctx.shape(ctx.I(i)))
        n = 1 if len(shape) <= 1 else shape[0]
        f = int(np.prod(shape[1:] if len(shape) > 1 else shape, dtype=np.int64))
        keep = min(f, width)
        if ctx.needs(i):
            if keep == 0:
                e.zeros_into(i)
            else:
                part = e.op("Slice", dy, e.c([offset], np.int64), e.c([offset + keep], np.int64),
                            e.c([1], np.int64))
                if keep < f:
                    e.into(i, "Concat", part, e.c(np.zeros((n, f - keep))), axis=1,
                           shape=(n, f))
                else:
                    e.into(i, "Identity", part, shape=(n, f))
        offset += width
    return e.nodes


@grad("LinearRegressor", domain=ML)
def linear_regressor_grad(ctx):
    # S = X W^T + b, Y = post_transform(S): dX = dS W
    e = _Emit(ctx)
    f = ctx.shape(ctx.I(0))[-1]
    targets = int(ctx.attr("targets", 1))
    w = _weights(e, list(ctx.attr("coefficients") or []), targets, f)
    ds = _post_backward(e, ctx.attr("post_transform", "NONE"), e.go(0), e.cast(ctx.O(0)),
                        targets)
    return e.into(0, "MatMul", ds, w)


@grad("LinearClassifier", domain=ML)
def linear_classifier_grad(ctx):
    # S = X W^T + b, Z = post_transform(S); one weight row with two labels: Z = [1 - t, t],
    # t = T(S) (LOGISTIC / PROBIT, else S), so dt = dZ1 - dZ0: dX = dS W
    e = _Emit(ctx)
    f = ctx.shape(ctx.I(0))[-1]
    coefficients = list(ctx.attr("coefficients") or [])
    intercepts = list(ctx.attr("intercepts") or [])
    labels = ctx.attr("classlabels_strings") or ctx.attr("classlabels_ints")
    classes = linear_classifier_classes(coefficients, intercepts, f)
    w = _weights(e, coefficients, classes, f)
    kind = ctx.attr("post_transform", "NONE")
    dz, z = e.go(1), e.cast(ctx.O(1))
    if classes == 1 and labels is not None and len(labels) == 2:
        dt = e.op("MatMul", dz, e.c([[-1.0], [1.0]]))
        t = e.op("Gather", z, e.c([1], np.int64), axis=1)
        kind = kind if kind in ("LOGISTIC", "PROBIT") else "NONE"
        ds = _post_backward(e, kind, dt, t, 2)
    else:
        ds = _post_backward(e, kind, dz, z, classes)
    return e.into(0, "MatMul", ds, w)


def _gram_backward(e: _Emit, xr: str, sv: np.ndarray, kernel: str, params, dk: str) -> str:
    """dX [N, F] of K = k(X, SV) [N, V] from dK."""
    gamma, coef0, degree = svm_kernel_params(params)
    if kernel == "LINEAR":  # K = X SV^T
        return e.op("MatMul", dk, e.c(sv))
    if kernel == "RBF":
        # K = exp(-gamma |x - sv|^2), recomputed with |x - sv|^2 = |x|^2 + |sv|^2 - 2 x.sv
        # (clipped at 0): dX = 2 gamma ((dK K) SV - rowsum(dK K) X)
        d2 = e.op("Add", e.rsum(e.op("Mul", xr, xr)),
                  e.op("Sub", e.c((sv * sv).sum(axis=1)[None, :]),
                       e.op("MatMul", xr, e.c(2.0 * sv.T))))
        g = e.op("Mul", dk, e.op("Exp", e.op("Mul", e.op("Relu", d2), e.c(-gamma))))
        inner = e.op("Sub", e.op("MatMul", g, e.c(sv)), e.op("Mul", e.rsum(g), xr))
        return e.op("Mul", inner, e.c(2.0 * gamma))
    if kernel not in ("POLY", "SIGMOID"):
        raise ModelError(f"node '{e.ctx.name}' ({e.ctx.onnx_node.op_type}): unknown "
                         f"kernel_type '{kernel}'")
    if kernel == "POLY" and degree in (0, 1):  # K = 1 or K = B
        return e.op("MatMul", dk, e.c(gamma * degree * sv))
    base = e.op("Add", e.op("MatMul", xr, e.c(gamma * sv.T)), e.c(coef0))
    if kernel == "SIGMOID":  # K = tanh(B), B = gamma X SV^T + coef0: dB = dK (1 - K^2)
        k = e.op("Tanh", base)
        db = e.op("Mul", dk, e.op("Sub", e.c(1.0), e.op("Mul", k, k)))
        return e.op("MatMul", db, e.c(gamma * sv))
    # POLY: K = B^d: dB = dK d B^(d-1), dX = gamma dB SV
    slope = base if degree == 2 else e.op("Pow", base, e.c(degree - 1))
    return e.op("MatMul", e.op("Mul", dk, slope), e.c(gamma * degree * sv))


@grad("SVMRegressor", domain=ML)
def svm_regressor_grad(ctx):
    # Y = K(X, SV) c + rho (or X w + rho), post_transform of one column (PROBIT only):
    # dK = dS c^T; one_class (+1/-1) is piecewise constant: dX = 0
    e = _Emit(ctx)
    if ctx.attr("one_class", 0):
        return e.zeros_into(0)
    f = ctx.shape(ctx.I(0))[-1]
    coefficients = np.asarray(ctx.attr("coefficients") or [], np.float64)
    ds = _post_backward(e, ctx.attr("post_transform", "NONE"), e.go(0), e.cast(ctx.O(0)), 1)
    v = int(ctx.attr("n_supports", 0))
    if v <= 0:
        return e.into(0, "MatMul", ds, e.c(coefficients[:f].reshape(1, f)))
    sv = np.asarray(ctx.attr("support_vectors") or [], np.float64)[: v * f].reshape(v, f)
    dk = e.op("MatMul", ds, e.c(coefficients[:v].reshape(1, v)))
    return e.finish(0, _gram_backward(e, e.rows(ctx.I(0)), sv, ctx.attr("kernel_type", "LINEAR"),
                                      ctx.attr("kernel_params"), dk))


@grad("SVMClassifier", domain=ML)
def svm_classifier_grad(ctx):
    # linear SVM: S = X W^T + rho, Z = post_transform(S); SVC: pair scores S = K(X, SV) A +
    # rho, Z = post_transform(S) (two classes: [-s, s], [1 - t, t] or [probit(s), s]),
    # dK = dS A^T. Platt probabilities (prob_a) come from an early-stopped iteration: refused.
    e = _Emit(ctx)
    f = ctx.shape(ctx.I(0))[-1]
    labels = ctx.attr("classlabels_strings") or ctx.attr("classlabels_ints") or []
    c = len(labels)
    coefficients = list(ctx.attr("coefficients") or [])
    kind = ctx.attr("post_transform", "NONE")
    kernel, params = ctx.attr("kernel_type", "LINEAR"), ctx.attr("kernel_params")
    counts = [int(v) for v in ctx.attr("vectors_per_class") or []]
    dz, z = e.go(1), e.cast(ctx.O(1))
    if sum(counts) == 0:
        w = _weights(e, coefficients, c, f)
        return e.into(0, "MatMul", _post_backward(e, kind, dz, z, c), w)
    if ctx.attr("prob_a"):
        raise ModelError(
            f"node '{ctx.name}' (SVMClassifier): the Platt probabilities (prob_a/prob_b) come "
            "from libsvm's early-stopped pairwise coupling, which has no usable gradient; drop "
            "prob_a/prob_b to train through the one-vs-one scores")
    v = sum(counts)
    sv = np.asarray(ctx.attr("support_vectors") or [], np.float64)[: v * f].reshape(v, f)
    a = svm_pair_matrix(coefficients, counts)
    xr = e.rows(ctx.I(0))
    if c == 2:
        # [-s, s] / [1 - s, s]: ds = dZ1 - dZ0; [1 - t, t], t = logistic(s): ds = dt t (1 - t)
        if kind == "PROBIT":  # [probit(s), s]: ds = dZ0 sqrt(2 pi) exp(Z0^2 / 2) + dZ1
            first, second = e.c([0], np.int64), e.c([1], np.int64)
            p = e.op("Gather", z, first, axis=1)
            ds = e.op("Add", e.op("Mul", e.op("Gather", dz, first, axis=1), _probit_slope(e, p)),
                      e.op("Gather", dz, second, axis=1))
        else:
            dt = e.op("MatMul", dz, e.c([[-1.0], [1.0]]))
            t = e.op("Gather", z, e.c([1], np.int64), axis=1)
            ds = _post_backward(e, "LOGISTIC" if kind == "LOGISTIC" else "NONE", dt, t, 2)
    else:
        ds = _post_backward(e, kind, dz, z, len(svm_pairs(c)))
    dk = e.op("MatMul", ds, e.c(a.T))
    return e.finish(0, _gram_backward(e, xr, sv, kernel, params, dk))
