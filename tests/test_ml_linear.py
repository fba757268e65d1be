"""ai.onnx.ml Scaler, Normalizer, Imputer, FeatureVectorizer, LinearRegressor/Classifier and
SVMRegressor/Classifier: forward against onnxruntime, gradients against PyTorch autograd
(float64), central differences, and the training graph in onnxruntime (float64 and float32)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

from tests.gradcheck import Case, CaseTable, gradients
from tests.opcases import make_model, run, run_ort, to_float32
from trainer.autodiff import training_info
from trainer.errors import ModelError

ML = "ai.onnx.ml"
F32, F64 = np.float32, np.float64
POSTS = ("NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO", "PROBIT")
KERNELS = {"LINEAR": [0.0, 0.0, 0.0], "POLY": [0.5, 0.3, 3.0], "RBF": [0.4, 0.0, 0.0],
           "SIGMOID": [0.5, 0.1, 0.0]}
_rng = np.random.default_rng(7)


def rand(*shape, scale=1.0) -> np.ndarray:
    return _rng.standard_normal(shape) * scale


def attr_list(*shape, scale=1.0) -> list[float]:
    """Attribute values (float32-exact, so both runtimes see the same numbers)."""
    return [float(v) for v in rand(*shape, scale=scale).astype(F32).ravel()]


def ml_model(op: str, inputs: dict, n_out: int = 1, opset: int = 18, **attrs):
    names = list(inputs)
    node = helper.make_node(op, names, [f"y{i}" for i in range(n_out)], domain=ML, **attrs)
    model = make_model([node], inputs=inputs, outputs=list(node.output), opset=opset,
                       extra_opsets={ML: 3})
    if op == "Imputer":  # ONNX infers no output type for it: Y has X's type
        model.graph.output[0].type.tensor_type.elem_type = \
            model.graph.input[0].type.tensor_type.elem_type
    return model


def ours(op: str, inputs: dict, n_out: int = 1, **attrs) -> list:
    res = run(ml_model(op, inputs, n_out, **attrs), inputs)
    return [res[f"y{i}"] for i in range(n_out)]


def theirs(op: str, inputs: dict, n_out: int = 1, **attrs) -> list:
    res = run_ort(ml_model(op, inputs, n_out, **attrs), inputs)
    return [res[f"y{i}"] for i in range(n_out)]


def same(got, want, rtol=1e-5, atol=1e-5) -> None:
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(g, w)


# -- forward against onnxruntime ---------------------------------------------------------------
X = rand(7, 3).astype(F32)
X[5] = [0.2, 0.2, -0.1]  # a tied max (Normalizer)
X[6] = 0.0               # a zero row
SMALL = (np.abs(rand(7, 3)) * 0.1).astype(F32)  # scores in (0, 1) for PROBIT
FWD: list[tuple] = []  # (id, op, inputs, n_out, attrs, tolerance)


def fwd(id_: str, op: str, inputs: dict, n_out: int = 1, tol: float = 1e-5, **attrs) -> None:
    FWD.append((f"{op}-{id_}", op, inputs, n_out, attrs, tol))


for dt in (F32, F64, np.int64, np.int32):
    xs = {"x": (X * 3).astype(dt)}
    fwd(f"{dt.__name__}", "Scaler", xs, offset=[0.1, -0.2, 0.3], scale=[2.0, 0.5, -1.0])
    fwd(f"one-{dt.__name__}", "Scaler", xs, offset=[0.5], scale=[-2.0])
    for norm in ("MAX", "L1", "L2"):
        fwd(f"{norm}-{dt.__name__}", "Normalizer", xs, norm=norm)
    fwd(f"LC3-{dt.__name__}", "LinearClassifier", xs, 2, coefficients=attr_list(9),
        intercepts=[0.2, 0.1, 0.0], classlabels_ints=[4, 5, 6], post_transform="SOFTMAX")
    fwd(f"SVC-{dt.__name__}", "SVMClassifier", xs, 2, coefficients=attr_list(5),
        support_vectors=attr_list(9), vectors_per_class=[2, 1], rho=[0.3],
        classlabels_ints=[1, 2], kernel_type="RBF", kernel_params=KERNELS["RBF"])
fwd("3d", "Scaler", {"x": rand(2, 3, 4).astype(F32)}, offset=[0.1, -0.2, 0.3],
    scale=[2.0, 0.5, -1.0])
fwd("1d", "Scaler", {"x": X[0]}, offset=[0.1, -0.2, 0.3], scale=[2.0, 0.5, -1.0])
for norm in ("MAX", "L1", "L2"):
    fwd(f"{norm}-1d", "Normalizer", {"x": X[0]}, norm=norm)
    fwd(f"{norm}-negative", "Normalizer", {"x": -np.abs(X)}, norm=norm)

XI = np.array([[1, -2, np.nan], [np.nan, 5, -2], [0, -2, -2.0]], F32)
fwd("value", "Imputer", {"x": XI}, imputed_value_floats=[9.0], replaced_value_float=-2.0)
fwd("nan", "Imputer", {"x": XI}, imputed_value_floats=[7.0, 8.0, 9.0],
    replaced_value_float=float("nan"))
fwd("default-zero", "Imputer", {"x": XI}, imputed_value_floats=[7.0, 8.0, 9.0])
fwd("other-count", "Imputer", {"x": XI}, imputed_value_floats=[7.0, 8.0, 9.0, 4.0],
    replaced_value_float=-2.0)
fwd("int64", "Imputer", {"x": np.array([[1, -2, 3], [3, 5, -2]])},
    imputed_value_int64s=[7, 8, 9], replaced_value_int64=-2)
fwd("3d", "Imputer", {"x": (np.arange(24, dtype=F32) % 5).reshape(2, 3, 4)},
    imputed_value_floats=[7.0, 8.0, 9.0], replaced_value_float=1.0)
fwd("1d", "Imputer", {"x": np.array([1, 2, 1], F32)}, imputed_value_floats=[7.0, 8.0, 9.0],
    replaced_value_float=1.0)

A, B = np.arange(6, dtype=F32).reshape(2, 3), np.arange(8, dtype=F32).reshape(2, 4) + 10
for name, xs, dims in [("exact", [A, B], [3, 4]), ("cut-pad", [A, B], [2, 6]),
                       ("pad-cut", [A, B], [5, 1]), ("1d", [A[0], B[0]], [2, 5]),
                       ("int32", [A.astype(np.int32)], [3]),
                       ("int64", [A.astype(np.int64), B.astype(np.int64)], [1, 7]),
                       ("double", [A.astype(F64)], [4]),
                       ("3d", [np.arange(24, dtype=F32).reshape(2, 3, 4)], [5])]:
    fwd(name, "FeatureVectorizer", {f"x{i}": x for i, x in enumerate(xs)},
        inputdimensions=dims)

W1, W2, W3 = attr_list(3), attr_list(6), attr_list(9)
for pt in POSTS:
    xs = {"x": SMALL if pt == "PROBIT" else X}
    fwd(f"1-{pt}", "LinearRegressor", xs, coefficients=W1, intercepts=[0.2], post_transform=pt)
    fwd(f"2-{pt}", "LinearRegressor", xs, coefficients=W2, intercepts=[0.2, 0.1], targets=2,
        post_transform=pt)
    fwd(f"3-{pt}", "LinearClassifier", xs, 2, coefficients=W3, intercepts=[0.2, 0.1, 0.0],
        classlabels_ints=[4, 5, 6], post_transform=pt)
    fwd(f"3s-{pt}", "LinearClassifier", xs, 2, coefficients=W3, intercepts=[0.2, 0.1, 0.0],
        classlabels_strings=["a", "b", "c"], post_transform=pt)
    fwd(f"2-{pt}", "LinearClassifier", xs, 2, coefficients=W2, intercepts=[0.2, -0.1],
        classlabels_ints=[4, 5], post_transform=pt)
    fwd(f"binary-{pt}", "LinearClassifier", xs, 2, coefficients=W1, intercepts=[0.2],
        post_transform=pt)
    if pt != "PROBIT":  # onnxruntime's binary PROBIT scores are garbage: tested below
        fwd(f"binary-labels-{pt}", "LinearClassifier", xs, 2, coefficients=W1,
            intercepts=[0.2], classlabels_ints=[4, 5], post_transform=pt)
        fwd(f"binary-strings-{pt}", "LinearClassifier", xs, 2, coefficients=W1,
            intercepts=[0.2], classlabels_strings=["no", "yes"], post_transform=pt)
fwd("extra-coefficients", "LinearRegressor", {"x": X}, coefficients=W2)
fwd("mismatched-intercepts", "LinearRegressor", {"x": X}, coefficients=W2, targets=2,
    intercepts=[5.0])
fwd("1d", "LinearRegressor", {"x": X[0]}, coefficients=W3, targets=3)
fwd("1d", "LinearClassifier", {"x": X[0]}, 2, coefficients=W3, intercepts=[0.2, 0.1, 0.0],
    classlabels_ints=[4, 5, 6])
fwd("zero-scores", "LinearClassifier", {"x": np.ones((2, 3), F32)}, 2,
    coefficients=[1.0, 1, 1, 0, 0, 0, -1, -1, -2], intercepts=[0.0, 0, 0],
    classlabels_ints=[4, 5, 6], post_transform="SOFTMAX_ZERO")
fwd("tiny-score", "LinearClassifier", {"x": np.ones((2, 3), F32)}, 2,  # out of the sum
    coefficients=[0.0] * 9, intercepts=[-20.0, 5e-8, -21.0], classlabels_ints=[4, 5, 6],
    post_transform="SOFTMAX_ZERO")
fwd("all-zero-scores", "LinearClassifier", {"x": np.zeros((2, 3), F32)}, 2,
    coefficients=W3, intercepts=[0.0, 0, 0], classlabels_ints=[4, 5, 6],
    post_transform="SOFTMAX_ZERO")

SV = attr_list(12)
for k, params in KERNELS.items():
    svr = dict(coefficients=[0.7, -0.4, 0.2, 0.5], support_vectors=SV, n_supports=4, rho=[0.2],
               kernel_type=k, kernel_params=params)
    fwd(k, "SVMRegressor", {"x": X}, **svr)
    fwd(f"{k}-one-class", "SVMRegressor", {"x": X}, one_class=1, **svr)
fwd("POLY-2.5", "SVMRegressor", {"x": X}, coefficients=[0.7, -0.4, 0.2, 0.5],
    support_vectors=SV, n_supports=4, rho=[0.2], kernel_type="POLY",
    kernel_params=[0.5, 0.3, 2.5])
fwd("linear", "SVMRegressor", {"x": X}, coefficients=[0.7, -0.4, 0.2], rho=[0.2],
    kernel_params=[0.0, 0.0, 0.0])
fwd("1d", "SVMRegressor", {"x": X[0]}, coefficients=[0.7, -0.4, 0.2, 0.5], support_vectors=SV,
    n_supports=4, rho=[0.2], kernel_type="RBF", kernel_params=KERNELS["RBF"])
for c in (1, 2, 3):
    for pt in POSTS:
        xs = {"x": SMALL if pt == "PROBIT" else X * 0.5}
        w = attr_list(3 * c)
        base = dict(rho=[0.1], classlabels_ints=list(range(3, 3 + c)), post_transform=pt,
                    kernel_params=[0.0, 0.0, 0.0])
        fwd(f"linear{c}-{pt}", "SVMClassifier", xs, 2, coefficients=w, **base)
        fwd(f"linear{c}-positive-{pt}", "SVMClassifier", xs, 2,
            coefficients=[abs(v) for v in w], **base)
        fwd(f"linear{c}-prob-{pt}", "SVMClassifier", xs, 2, coefficients=w, prob_a=[-1.0],
            prob_b=[0.1], **base)
for c, counts in ((2, [2, 3]), (3, [2, 1, 2]), (4, [1, 2, 1, 2])):
    v, pairs = sum(counts), c * (c - 1) // 2
    svc = dict(coefficients=attr_list((c - 1) * v), support_vectors=attr_list(v * 3),
               vectors_per_class=counts, rho=attr_list(pairs), classlabels_ints=list(range(c)))
    platt = dict(prob_a=[-abs(a) - 0.5 for a in attr_list(pairs)], prob_b=attr_list(pairs))
    for k, params in KERNELS.items():
        for pt in POSTS:
            if not (c == 2 and pt == "PROBIT"):  # onnxruntime leaves a column unset: below
                fwd(f"{c}-{k}-{pt}", "SVMClassifier", {"x": X}, 2, kernel_type=k,
                    kernel_params=params, post_transform=pt, **svc)
            fwd(f"{c}-{k}-{pt}-prob", "SVMClassifier", {"x": X}, 2, tol=1e-4, kernel_type=k,
                kernel_params=params, post_transform=pt, **svc, **platt)
    fwd(f"{c}-strings", "SVMClassifier", {"x": X}, 2, kernel_type="SIGMOID",
        kernel_params=KERNELS["SIGMOID"],
        **{**svc, "classlabels_ints": None, "classlabels_strings": list("abcd"[:c])})


@pytest.mark.parametrize("case", FWD, ids=[c[0] for c in FWD])
def test_forward_against_onnxruntime(case) -> None:
    _, op, inputs, n_out, attrs, tol = case
    attrs = {k: v for k, v in attrs.items() if v is not None}
    same(ours(op, inputs, n_out, **attrs), theirs(op, inputs, n_out, **attrs), tol, tol)


GPU_PATH = ["Scaler-3d", "Normalizer-MAX-float64", "Imputer-nan", "Imputer-int64",
            "FeatureVectorizer-cut-pad", "LinearRegressor-2-SOFTMAX_ZERO",
            "LinearClassifier-3s-PROBIT", "LinearClassifier-binary-labels-LOGISTIC",
            "SVMRegressor-RBF-one-class", "SVMClassifier-linear2-NONE",
            "SVMClassifier-3-POLY-SOFTMAX-prob", "SVMClassifier-2-strings",
            "SVMClassifier-4-RBF-LOGISTIC"]


@pytest.mark.parametrize("case", [c for c in FWD if c[0] in GPU_PATH], ids=lambda c: c[0])
def test_forward_on_the_gpu_path(monkeypatch, case) -> None:
    # CuPy's API only (tests/strictxp.py: no host/device mixing), same results as NumPy
    from tests import strictxp as sx
    from trainer.backend import to_host
    from trainer.executor import Executor

    xp = sx.install(monkeypatch)
    _, op, inputs, n_out, attrs, _ = case
    model = ml_model(op, inputs, n_out, **{k: v for k, v in attrs.items() if v is not None})
    want = Executor(model, np).run(dict(inputs))
    got = Executor(model, xp).run({k: xp.asarray(v) for k, v in inputs.items()})
    same([got[k] if want[k].dtype == object else to_host(got[k]) for k in want],
         list(want.values()), 1e-6, 1e-6)


def test_forward_where_onnxruntime_lacks_the_type_or_attribute() -> None:
    # onnxruntime: LinearRegressor and SVMRegressor float32 only, Imputer float32/int64 only;
    # intercepts required by its LinearClassifier, offset by its Scaler.
    x64 = X.astype(F64)
    svr = dict(coefficients=[0.7, -0.4, 0.2, 0.5], support_vectors=SV, n_supports=4,
               rho=[0.2], kernel_type="POLY", kernel_params=KERNELS["POLY"])
    for op, attrs in (("LinearRegressor", dict(coefficients=W2, targets=2)),
                      ("SVMRegressor", svr)):
        for dt in (F64, np.int64, np.int32):
            xs = (X * 3).astype(dt)
            same(ours(op, {"x": xs}, **attrs), theirs(op, {"x": xs.astype(F32)}, **attrs))
    xi = XI.astype(F64)
    got = ours("Imputer", {"x": xi}, imputed_value_floats=[9.0], replaced_value_float=-2.0)
    same(got, [np.where(xi == -2, 9.0, xi)])
    xi32 = np.array([[1, -2], [-2, 4]], np.int32)
    got = ours("Imputer", {"x": xi32}, imputed_value_int64s=[7, 8], replaced_value_int64=-2)
    same(got, [np.array([[1, 8], [7, 4]], np.int32)])
    same(ours("LinearClassifier", {"x": x64}, 2, coefficients=W3, classlabels_ints=[1, 2, 3]),
         theirs("LinearClassifier", {"x": X}, 2, coefficients=W3, intercepts=[0.0, 0, 0],
                classlabels_ints=[1, 2, 3]))
    same(ours("Scaler", {"x": X}, scale=[2.0, 3.0, 4.0]),
         theirs("Scaler", {"x": X}, scale=[2.0, 3.0, 4.0], offset=[0.0, 0, 0]))
    # one score column: only PROBIT transforms it (onnxruntime's SVMRegressor ignores it)
    y = ours("SVMRegressor", {"x": SMALL}, coefficients=[0.2, 0.3, 0.1], rho=[0.1],
             post_transform="PROBIT")[0]
    s = SMALL.astype(F64) @ np.array([[0.2], [0.3], [0.1]]) + 0.1
    np.testing.assert_allclose(y, math.sqrt(2) * torch.erfinv(torch.tensor(2 * s - 1)).numpy(),
                               rtol=5e-3)


def test_binary_probit_scores_where_onnxruntime_leaves_memory_unset() -> None:
    # LinearClassifier with one weight row and two labels: [1 - t, t], t = probit(s);
    # two-class SVC: [probit(s), s] (onnxruntime sets the first column only).
    labels, z = ours("LinearClassifier", {"x": SMALL}, 2, coefficients=W1, intercepts=[0.2],
                     classlabels_ints=[4, 5], post_transform="PROBIT")
    s = SMALL.astype(F64) @ np.array(W1)[:, None] + 0.2
    t = math.sqrt(2) * torch.erfinv(torch.tensor(2 * s - 1)).numpy()
    np.testing.assert_allclose(z, np.concatenate([1 - t, t], axis=1), rtol=5e-3, atol=1e-3)
    np.testing.assert_array_equal(labels, np.where(s[:, 0] > 0, 5, 4))
    svc = dict(coefficients=attr_list(3), support_vectors=attr_list(9), vectors_per_class=[2, 1],
               rho=[0.3], classlabels_ints=[0, 1], kernel_type="LINEAR",
               kernel_params=[0.0, 0.0, 0.0])
    _, raw = ours("SVMClassifier", {"x": X}, 2, **svc)
    _, z = ours("SVMClassifier", {"x": X}, 2, post_transform="PROBIT", **svc)
    _, z_ort = theirs("SVMClassifier", {"x": X}, 2, post_transform="PROBIT", **svc)
    np.testing.assert_allclose(z[:, 1], raw[:, 1], rtol=1e-6)
    np.testing.assert_allclose(z[:, 0], z_ort[:, 0], rtol=1e-5, equal_nan=True)


def test_bad_attributes_are_clear_errors() -> None:
    with pytest.raises(Exception, match="offset has 2 values"):
        ours("Scaler", {"x": X}, offset=[1.0, 2.0], scale=[1.0])
    with pytest.raises(Exception, match="2 class labels"):
        ours("LinearClassifier", {"x": X}, 2, coefficients=W1, classlabels_ints=[1, 2, 3])
    with pytest.raises(Exception, match="inputdimensions"):
        ours("FeatureVectorizer", {"x0": A}, inputdimensions=[3, 4])
    with pytest.raises(Exception, match="coefficients"):
        ours("LinearRegressor", {"x": X}, coefficients=[1.0, 2.0])


# -- gradients ---------------------------------------------------------------------------------
def loss_model(c: Case) -> onnx.ModelProto:
    """X -> op -> L = sum_i sum(float64(y_i) * R_i) over the used outputs (the ml ops give
    float32 scores, so each is cast to float64 first)."""
    inits = {n: a for n, a in c.inputs}
    outs = [f"y{i}" for i in range(c.n_out)]
    node = helper.make_node(c.op, [n for n, _ in c.inputs], outs, **c.attrs)
    probe = run(make_model([node], initializers=inits, outputs=outs, opset=c.opset,
                           extra_opsets={ML: 3}), fetch=outs)
    nodes, terms = [node], []
    rng = np.random.default_rng(0)
    for i in c.use or (0,):
        inits[f"R{i}"] = rng.standard_normal(probe[f"y{i}"].shape)
        nodes += [helper.make_node("Cast", [f"y{i}"], [f"d{i}"], to=onnx.TensorProto.DOUBLE),
                  helper.make_node("Mul", [f"d{i}", f"R{i}"], [f"p{i}"]),
                  helper.make_node("ReduceSum", [f"p{i}"], [f"s{i}"], keepdims=0)]
        terms.append(f"s{i}")
    nodes.append(helper.make_node("Sum", terms, ["L"]))
    return make_model(nodes, initializers=inits, outputs=["L"], opset=c.opset,
                      extra_opsets={ML: 3})


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _tpost(s, kind: str):
    if kind == "PROBIT":
        return math.sqrt(2) * torch.erfinv(2 * s - 1)
    if kind == "NONE" or s.shape[1] == 1:
        return s
    if kind == "LOGISTIC":
        return torch.sigmoid(s)
    if kind == "SOFTMAX":
        return torch.softmax(s, dim=1)
    live = (s.abs() > 1e-7).to(s.dtype)  # SOFTMAX_ZERO: zero scores stay (constant) zero
    e = torch.exp(s - s.max(dim=1, keepdim=True).values) * live
    return e / e.sum(dim=1, keepdim=True)


def _tgram(x, sv, kind: str, params):
    gamma, coef0, degree = params
    if kind == "RBF":
        return torch.exp(-gamma * ((x[:, None, :] - sv[None]) ** 2).sum(-1))
    if kind == "LINEAR":
        return x @ sv.T
    b = gamma * (x @ sv.T) + coef0
    return b ** degree if kind == "POLY" else torch.tanh(b)


def torch_forward(c: Case, xs: list) -> list:
    """The used float outputs of the case's op, written independently in PyTorch."""
    a = c.attrs
    x = xs[0]
    rows = x.reshape(1, -1) if x.ndim == 1 else x
    pt = a.get("post_transform", "NONE")
    if c.op == "Scaler":
        f = x.shape[0] if x.ndim == 1 else x.shape[1]
        off, sc = _t(a.get("offset", [0.0])), _t(a.get("scale", [1.0]))
        return [((x.reshape(-1, f) - off) * sc).reshape(x.shape)]
    if c.op == "Normalizer":
        if a["norm"] == "MAX":
            d = rows.amax(dim=1, keepdim=True)
        elif a["norm"] == "L1":
            d = rows.abs().sum(dim=1, keepdim=True)
        else:
            d = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        return [torch.where(d == 0, rows, rows / torch.where(d == 0, 1, d)).reshape(x.shape)]
    if c.op == "Imputer":
        r = a.get("replaced_value_float", 0.0)
        hit = torch.isnan(x) if math.isnan(r) else x == r
        return [torch.where(hit, _t(a["imputed_value_floats"][0]), x)]
    if c.op == "FeatureVectorizer":
        parts = []
        for t, d in zip(xs, a["inputdimensions"], strict=True):
            t = t.reshape(1, -1) if t.ndim == 1 else t.reshape(t.shape[0], -1)
            parts.append(torch.nn.functional.pad(t[:, :d], (0, d - min(d, t.shape[1]))))
        return [torch.cat(parts, dim=1)]
    f = rows.shape[1]
    if c.op == "LinearRegressor":
        k = a.get("targets", 1)
        s = rows @ _t(a["coefficients"][: k * f]).reshape(k, f).T
        return [_tpost(s + _t(a.get("intercepts", [0.0] * k)), pt)]
    if c.op == "LinearClassifier":
        b = _t(a["intercepts"])
        s = rows @ _t(a["coefficients"]).reshape(len(b), f).T + b
        if len(b) == 1 and len(a.get("classlabels_ints", [])) == 2:
            t = torch.sigmoid(s) if pt == "LOGISTIC" else _tpost(s, pt if pt == "PROBIT"
                                                                 else "NONE")
            return [torch.cat([1 - t, t], dim=1)]
        return [_tpost(s, pt)]
    params = a.get("kernel_params", [0.0, 0.0, 0.0])
    if c.op == "SVMRegressor":
        n = a.get("n_supports", 0)
        coef = _t(a["coefficients"])
        if n == 0:
            return [_tpost(rows @ coef[:f, None] + a["rho"][0], pt)]
        sv = _t(a["support_vectors"]).reshape(n, f)
        s = _tgram(rows, sv, a["kernel_type"], params) @ coef[:n, None] + a["rho"][0]
        if a.get("one_class"):  # +1 / -1: no gradient
            return [torch.where(s > 0, 1.0, -1.0).to(s.dtype) + 0 * s]
        return [_tpost(s, pt)]
    labels = a["classlabels_ints"]
    counts = a.get("vectors_per_class", [])
    coef = _t(a["coefficients"])
    if not counts:
        return [_tpost(rows @ coef.reshape(len(labels), f).T + a["rho"][0], pt)]
    v = sum(counts)
    coef = coef.reshape(len(labels) - 1, v)
    k = _tgram(rows, _t(a["support_vectors"]).reshape(v, f), a["kernel_type"], params)
    start = np.concatenate([[0], np.cumsum(counts)])
    scores = []
    for i in range(len(labels)):  # libsvm's one-vs-one sums, pair by pair
        for j in range(i + 1, len(labels)):
            si, sj = slice(start[i], start[i + 1]), slice(start[j], start[j + 1])
            scores.append(k[:, si] @ coef[j - 1, si] + k[:, sj] @ coef[i, sj]
                          + a["rho"][len(scores)])
    s = torch.stack(scores, dim=1)
    if len(labels) > 2:
        return [_tpost(s, pt)]
    if pt == "PROBIT":
        return [torch.cat([_tpost(s, pt), s], dim=1)]
    t = torch.sigmoid(s) if pt == "LOGISTIC" else s
    return [torch.cat([-s if pt == "NONE" else 1 - t, t], dim=1)]


def torch_gradients(c: Case, model: onnx.ModelProto) -> tuple[dict, list]:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    xs = [torch.tensor(a, requires_grad=True) for _, a in c.inputs]
    ys = torch_forward(c, xs)
    loss = sum((y * _t(inits[f"R{i}"])).sum() for y, i in zip(ys, c.use or (0,),
                                                                           strict=True))
    grads = torch.autograd.grad(loss, xs, allow_unused=True)
    return ({n: (torch.zeros_like(x) if g is None else g).numpy()
             for (n, _), x, g in zip(c.inputs, xs, grads, strict=True)},
            [y.detach().numpy() for y in ys])


table = CaseTable()
# case id -> (central differences apply, rtol against PyTorch, onnxruntime runs the forward)
OPTS: dict[str, tuple[bool, float, bool]] = {}


def gcase(op: str, id_: str, inputs, use=(0,), n_out=1, rtol=2e-5, fd=True, ort=True,
          **attrs) -> None:
    table.add(op, id_, inputs, domain=ML, use=use, n_out=n_out, **attrs)
    OPTS[f"{op}-{id_}"] = (fd, rtol, ort)


XG = rand(4, 3)
XP = np.abs(rand(4, 3)) * 0.1  # PROBIT scores in (0, 1)
gcase("Scaler", "per-feature", [("X", XG)], offset=[0.1, -0.2, 0.3], scale=[2.0, 0.5, -1.5])
gcase("Scaler", "one", [("X", XG)], offset=[0.5], scale=[-2.0])
gcase("Scaler", "unit-scale", [("X", XG)], offset=[0.5, 0.1, 0.2], scale=[1.0, 1.0, 1.0])
gcase("Scaler", "3d", [("X", rand(2, 3, 2))], offset=[0.1, -0.2, 0.3], scale=[2.0, 0.5, -1.5])
gcase("Scaler", "1d", [("X", rand(3))], offset=[0.1, -0.2, 0.3], scale=[2.0, 0.5, -1.5])
XT = rand(5, 3)
XT[1] = [0.3, 0.3, -0.2]   # tied max: shared evenly (torch.amax)
XT[2] = [0.0, -0.5, -0.2]  # max 0: copied, dX = dY
XT[3] = [0.0, 0.7, -0.2]   # L1 kink at 0: sign(0) = 0 (torch.abs)
XT[4] = 0.0                # zero row: copied
for norm in ("MAX", "L1", "L2"):
    gcase("Normalizer", norm, [("X", XG)], norm=norm)
    gcase("Normalizer", f"{norm}-ties-zeros", [("X", XT)], fd=False, norm=norm)
    gcase("Normalizer", f"{norm}-1d", [("X", rand(4))], norm=norm)
XN = rand(4, 3)
XN[0, 1] = XN[2, 2] = np.nan
XR = rand(4, 3)
XR[1, 0] = XR[3, 2] = -2.0
gcase("Imputer", "nan", [("X", XN)], imputed_value_floats=[7.0],
      replaced_value_float=float("nan"))
gcase("Imputer", "value", [("X", XR)], fd=False, imputed_value_floats=[7.0],
      replaced_value_float=-2.0)
gcase("FeatureVectorizer", "cut-pad", [("X0", rand(3, 4)), ("X1", rand(3, 2)),
                                        ("X2", rand(3, 2))], inputdimensions=[2, 3, 0])
gcase("FeatureVectorizer", "reshape", [("X0", rand(2, 2, 2)), ("X1", rand(2, 1))],
      inputdimensions=[8, 2])
gcase("FeatureVectorizer", "1d", [("X0", rand(3)), ("X1", rand(2))], inputdimensions=[2, 4])
for pt in POSTS:
    x = XP if pt == "PROBIT" else XG
    tol = 1e-2 if pt == "PROBIT" else 2e-5  # our probit is onnxruntime's approximation
    gcase("LinearRegressor", f"1-{pt}", [("X", x)], rtol=tol, coefficients=W1,
          intercepts=[0.2], post_transform=pt)
    gcase("LinearRegressor", f"2-{pt}", [("X", x)], rtol=tol, coefficients=W2,
          intercepts=[0.2, 0.1], targets=2, post_transform=pt)
    gcase("LinearClassifier", f"3-{pt}", [("X", x)], (1,), 2, tol, coefficients=W3,
          intercepts=[0.2, 0.1, 0.0], classlabels_ints=[4, 5, 6], post_transform=pt)
    gcase("LinearClassifier", f"binary-{pt}", [("X", x)], (1,), 2, tol, coefficients=W1,
          intercepts=[0.2], classlabels_ints=[4, 5], post_transform=pt,
          ort=pt != "PROBIT")  # onnxruntime's binary PROBIT scores are unset memory
gcase("LinearClassifier", "zero-scores", [("X", XG)], (1,), 2, fd=False,
      coefficients=[*W1, 0.0, 0.0, 0.0, *W1[::-1]], intercepts=[0.2, 0.0, -0.1],
      classlabels_ints=[4, 5, 6], post_transform="SOFTMAX_ZERO")
gcase("LinearRegressor", "1d", [("X", rand(3))], coefficients=W2, targets=2,
      intercepts=[0.1, 0.2], post_transform="SOFTMAX")
SVG = attr_list(12, scale=0.5)
for k, params in KERNELS.items():
    gcase("SVMRegressor", k, [("X", XG)], coefficients=[0.7, -0.4, 0.2, 0.5],
          support_vectors=SVG, n_supports=4, rho=[0.2], kernel_type=k, kernel_params=params)
gcase("SVMRegressor", "POLY-2.5", [("X", np.abs(XG))], coefficients=[0.7, -0.4, 0.2, 0.5],
      support_vectors=[abs(v) for v in SVG], n_supports=4, rho=[0.2], kernel_type="POLY",
      kernel_params=[0.5, 0.3, 2.5])
gcase("SVMRegressor", "POLY-1", [("X", XG)], coefficients=[0.7, -0.4, 0.2, 0.5],
      support_vectors=SVG, n_supports=4, rho=[0.2], kernel_type="POLY",
      kernel_params=[0.5, 0.3, 1.0])
gcase("SVMRegressor", "POLY-2", [("X", XG)], coefficients=[0.7, -0.4, 0.2, 0.5],
      support_vectors=SVG, n_supports=4, rho=[0.2], kernel_type="POLY",
      kernel_params=[0.5, 0.3, 2.0])
gcase("SVMRegressor", "one-class", [("X", XG)], fd=False, coefficients=[0.7, -0.4, 0.2, 0.5],
      support_vectors=SVG, n_supports=4, rho=[0.2], kernel_type="RBF",
      kernel_params=KERNELS["RBF"], one_class=1)
gcase("SVMRegressor", "linear-PROBIT", [("X", XP)], rtol=1e-2, ort=False,  # ignored there
      coefficients=[0.2, 0.3, 0.1], rho=[0.1], post_transform="PROBIT",
      kernel_params=[0.0, 0.0, 0.0])
gcase("SVMRegressor", "1d", [("X", rand(3))], coefficients=[0.7, -0.4, 0.2, 0.5],
      support_vectors=SVG, n_supports=4, rho=[0.2], kernel_type="SIGMOID",
      kernel_params=KERNELS["SIGMOID"])
for pt in POSTS:
    x, tol = (XP, 1e-2) if pt == "PROBIT" else (XG, 2e-5)
    gcase("SVMClassifier", f"linear-{pt}", [("X", x)], (1,), 2, tol, coefficients=W3,
          rho=[0.1], classlabels_ints=[1, 2, 3], kernel_params=[0.0, 0.0, 0.0],
          post_transform=pt)
for c, counts in ((2, [2, 1]), (3, [2, 1, 1])):
    v = sum(counts)
    svc = dict(coefficients=attr_list((c - 1) * v), support_vectors=attr_list(v * 3, scale=0.5),
               vectors_per_class=counts, rho=attr_list(c * (c - 1) // 2),
               classlabels_ints=list(range(c)))
    for k, params in KERNELS.items():
        gcase("SVMClassifier", f"{c}-{k}", [("X", XG)], (1,), 2, kernel_type=k,
              kernel_params=params, **svc)
    for pt in POSTS[1:]:
        x, tol = (XP, 1e-2) if pt == "PROBIT" else (XG, 2e-5)
        gcase("SVMClassifier", f"{c}-RBF-{pt}", [("X", x)], (1,), 2, tol, kernel_type="RBF",
              kernel_params=KERNELS["RBF"], post_transform=pt, **svc)
# the emitted nodes are opset-dependent (ReduceSum/ReduceMax axes, Slice): older opsets too
for _id in ("Scaler-per-feature", "Normalizer-MAX", "Normalizer-L2-1d", "Imputer-nan",
            "FeatureVectorizer-cut-pad", "LinearRegressor-2-SOFTMAX",
            "LinearClassifier-3-SOFTMAX_ZERO", "SVMRegressor-RBF", "SVMClassifier-3-RBF-SOFTMAX"):
    base = next(c for c in table.cases if c.id == _id)
    for o in (11, 13):
        table.cases.append(Case(f"{_id}-opset{o}", base.op, base.inputs, base.attrs, opset=o,
                                n_out=base.n_out, use=base.use))
        OPTS[f"{_id}-opset{o}"] = OPTS[_id]
CASES = table.cases


def _training_graph(c: Case, model: onnx.ModelProto):
    wrt = [n for n, _ in c.inputs]
    grads, tm = gradients(model, wrt)
    onnx.checker.check_model(tm)
    return wrt, grads, tm


def _central_differences(model: onnx.ModelProto, values: dict, eps: float = 1e-3) -> dict:
    """dL/dX by central differences; the scores are float32, hence the large step."""
    from trainer.executor import Executor

    ex = Executor(model, np, feeds=list(values))
    out = {}
    for name, value in values.items():
        g = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            hi, lo = value.copy(), value.copy()
            hi[idx] += eps
            lo[idx] -= eps
            g[idx] = (float(ex.run({**values, name: hi})["L"])
                      - float(ex.run({**values, name: lo})["L"])) / (2 * eps)
        out[name] = g
    return out


@pytest.mark.parametrize("c", CASES, ids=str)
def test_gradient_float64(c: Case) -> None:
    fd, rtol, ort = OPTS[c.id]
    model = loss_model(c)
    wrt, grads, tm = _training_graph(c, model)
    want, ys = torch_gradients(c, model)
    got_y = run(model, fetch=[f"y{i}" for i in c.use])
    for y, i in zip(ys, c.use, strict=True):  # the PyTorch forward is ours
        np.testing.assert_allclose(got_y[f"y{i}"], y, rtol=max(rtol, 1e-5) * 10, atol=1e-5,
                                   err_msg=f"forward y{i}")
    for p in wrt:
        assert grads[p].dtype == F64 and grads[p].shape == want[p].shape
        np.testing.assert_allclose(grads[p], want[p], rtol=rtol, atol=rtol / 10,
                                   err_msg=f"torch d/d{p}")
    if ort:  # onnxruntime lacks float64 LinearRegressor, SVMRegressor, Imputer: float32 there
        try:
            res, tol = run_ort(tm), 1e-6
        except OrtNotImplemented:
            res, tol = run_ort(to_float32(tm)), 1e-4
        for p in wrt:
            np.testing.assert_allclose(res[training_info(tm).gradients[p]], grads[p], rtol=tol,
                                       atol=tol / 10, err_msg=f"onnxruntime d/d{p}")
    if fd:
        numeric = _central_differences(model, {n: a for n, a in c.inputs})
        for p in wrt:
            np.testing.assert_allclose(grads[p], numeric[p], rtol=2e-2, atol=2e-3,
                                       err_msg=f"central differences d/d{p}")


@pytest.mark.parametrize("c", CASES, ids=str)
def test_gradient_float32(c: Case) -> None:
    model = to_float32(loss_model(c))
    wrt, grads, tm = _training_graph(c, model)
    _, rtol, ort = OPTS[c.id]
    want, _ = torch_gradients(c, loss_model(c))
    res = run_ort(tm) if ort else {}
    for p, name in training_info(tm).gradients.items():
        assert grads[p].dtype == F32
        np.testing.assert_allclose(grads[p], want[p], rtol=max(rtol, 1e-3), atol=1e-3,
                                   err_msg=f"torch d/d{p}")
        if ort:
            np.testing.assert_allclose(res[name], grads[p], rtol=1e-4, atol=1e-5, err_msg=p)


def _svc_case(**extra) -> Case:
    return Case("svc", "SVMClassifier", [("X", XG)],
                dict(domain=ML, coefficients=attr_list(3), support_vectors=attr_list(9),
                     vectors_per_class=[2, 1], rho=[0.3], classlabels_ints=[0, 1],
                     kernel_type="RBF", kernel_params=KERNELS["RBF"], **extra),
                n_out=2, use=(1,))


def test_platt_probabilities_are_refused_clearly() -> None:
    model = loss_model(_svc_case(prob_a=[-1.5], prob_b=[0.2]))
    with pytest.raises(ModelError, match="prob_a"):
        gradients(model, ["X"])


def test_old_default_opset_is_a_clear_error() -> None:
    c = next(c for c in CASES if c.id == "Scaler-per-feature")
    model = loss_model(Case(c.id, c.op, c.inputs, c.attrs, opset=10, use=c.use))
    with pytest.raises(ModelError, match="opset >= 11"):
        gradients(model, ["X"])


def test_the_eight_ops_have_a_kernel_and_a_rule() -> None:
    from trainer.report import support_table

    rows = {r["op"]: r for r in support_table() if r["domain"] == ML}
    for op in ("Scaler", "Normalizer", "LinearRegressor", "LinearClassifier", "SVMRegressor",
               "SVMClassifier", "Imputer", "FeatureVectorizer"):
        assert rows[op]["forward"] == [1] and rows[op]["gradient"] == "rule", rows[op]
