"""Gradients of the signal ops (DFT, STFT) against float64 finite differences and onnxruntime,
and the catalogue of non-differentiable ops (random, windows, strings, ai.onnx.ml,
ai.onnx.preview.training)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from tests.gradcheck import (
    ATOL,
    RTOL,
    Case,
    CaseTable,
    check_case,
    finite_differences,
    gradients,
    loss_model,
    normal,
    rule_tests,
)
from tests.opcases import make_model, run_ort
from trainer.autodiff import build_training_graph, training_info
from trainer.autodiff.registry import NO_GRADIENT, RULES, get_rule
from trainer.errors import ModelError


def i64(v: int) -> np.ndarray:
    return np.array(v, np.int64)


table = CaseTable()
add = table.add

# -- DFT: opset 17 (axis attribute) and 20 (axis input) ------------------------------------------
_DFT = [  # id, input, attributes, dft_length
    ("c2c", normal(2, 5, 2), {}, None),
    ("r2c", normal(2, 5, 1), {}, None),
    ("inverse", normal(2, 5, 2), {"inverse": 1}, None),
    ("inverse-real", normal(2, 4, 1), {"inverse": 1}, None),
    ("c2c-cut", normal(2, 6, 2), {}, 4),
    ("c2c-pad", normal(2, 4, 2), {}, 7),
    ("inverse-pad", normal(2, 4, 2), {"inverse": 1}, 6),
    ("r2c-cut", normal(2, 5, 1), {}, 3),
    ("rfft-even", normal(2, 6, 1), {"onesided": 1}, None),
    ("rfft-odd", normal(2, 5, 1), {"onesided": 1}, None),
    ("rfft-pad", normal(2, 5, 1), {"onesided": 1}, 8),
    ("rfft-cut-odd", normal(2, 6, 1), {"onesided": 1}, 5),
    ("irfft", normal(2, 4, 2), {"onesided": 1, "inverse": 1}, None),
    ("irfft-odd", normal(2, 4, 2), {"onesided": 1, "inverse": 1}, 7),
    ("irfft-cut", normal(2, 4, 2), {"onesided": 1, "inverse": 1}, 4),
    ("irfft-pad", normal(2, 4, 2), {"onesided": 1, "inverse": 1}, 9),
]
for opset in (17, 20):
    for sid, x, attrs, n in _DFT:
        ins = [("X", x), ("N", None if n is None else i64(n))]
        if opset == 17:
            add("DFT", f"{sid}-opset17", ins, opset=17, axis=1, **attrs)
        else:
            add("DFT", f"{sid}-opset20", [*ins, ("axis", i64(1))], opset=20, **attrs)
for opset in (18, 19, 21):  # the DFT-17 form up to 19, the DFT-20 form from 20
    add("DFT", f"rfft-pad-opset{opset}", [("X", normal(2, 5, 1)), ("N", i64(8))], opset=opset,
        onesided=1, **({"axis": 1} if opset < 20 else {}))
    add("STFT", f"opset{opset}", [("S", normal(2, 10, 1)), ("step", i64(2)), ("W", normal(4))],
        opset=opset)
_x4 = normal(2, 3, 4, 2)
add("DFT", "axis2-opset17", [("X", _x4)], opset=17, axis=2)
add("DFT", "axis-3-opset17", [("X", _x4)], opset=17, axis=-3)
add("DFT", "axis0-opset17", [("X", normal(4, 3, 1))], opset=17, axis=0, onesided=1)
add("DFT", "default-axis-opset17", [("X", _x4)], opset=17)
add("DFT", "default-axis-opset20", [("X", _x4)], opset=20)
add("DFT", "axis-3-opset20", [("X", _x4), ("N", None), ("axis", i64(-3))], opset=20)
add("DFT", "axis2-rfft-pad-opset20", [("X", normal(2, 3, 4, 1)), ("N", i64(6)),
                                       ("axis", i64(2))], opset=20, onesided=1)
add("DFT", "axis1-irfft-opset20", [("X", normal(2, 3, 4, 2)), ("N", i64(5)),
                                    ("axis", i64(1))], opset=20, onesided=1, inverse=1)

# -- STFT: window and signal; frames overlapping (r = ceil(fl/step) chunks), touching, apart -----
_STFT = [  # id, signal length, complex, step, window length / frame_length, onesided
    ("step3-fl5", 13, False, 3, 5, 1),
    ("step2-fl6", 13, False, 2, 6, 1),
    ("step1-fl4", 9, False, 1, 4, 1),
    ("step4-fl4", 13, False, 4, 4, 1),
    ("step5-fl3", 14, False, 5, 3, 1),
    ("step3-fl7-odd", 16, False, 3, 7, 1),
    ("two-sided", 13, False, 3, 5, 0),
    ("complex-two-sided", 13, True, 3, 5, 0),
    ("complex-onesided", 12, True, 2, 5, 1),
    ("one-frame", 6, False, 2, 6, 1),
]
for sid, length, cplx, step, fl, ones in _STFT:
    sig = normal(2, length, 2 if cplx else 1)
    add("STFT", f"{sid}-window", [("S", sig), ("step", i64(step)), ("W", normal(fl))],
        opset=17, onesided=ones)
    add("STFT", f"{sid}-frame-length", [("S", sig), ("step", i64(step)), ("W", None),
                                        ("fl", i64(fl))], opset=17, onesided=ones)
add("STFT", "window-and-length", [("S", normal(2, 11, 1)), ("step", i64(2)), ("W", normal(4)),
                                  ("fl", i64(4))], opset=17)
add("STFT", "only-window", [("S", normal(1, 10, 1)), ("step", i64(3)), ("W", normal(4))],
    opset=17, wrt=["W"])
add("STFT", "only-signal", [("S", normal(1, 10, 2)), ("step", i64(3)), ("W", normal(4))],
    opset=17, onesided=0, wrt=["S"])

CASES = table.cases


test_rule_matches_finite_differences, test_rule_float32_training_graph = rule_tests(CASES)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(fl=st.integers(1, 7), step=st.integers(1, 8), extra=st.integers(0, 9),
       cplx=st.booleans(), onesided=st.integers(0, 1))
def test_stft_overlap_add_property(fl, step, extra, cplx, onesided) -> None:
    # Any frame length, hop and leftover tail: the adjoint of framing is exact.
    rng = np.random.default_rng(fl * 100 + step * 10 + extra)
    sig = rng.standard_normal((2, fl + extra, 2 if cplx else 1))
    check_case(Case(f"STFT-{fl}-{step}-{extra}", "STFT",
                    [("S", sig), ("step", i64(step)), ("W", rng.standard_normal(fl))],
                    {"onesided": onesided}, opset=17))


# -- cases onnxruntime does not run (our kernels are more lenient): finite differences only ------
def _check_fd(c: Case) -> None:
    model = loss_model(c)
    wrt = c.params()
    grads, _ = gradients(model, wrt)
    values = {n: a for n, a in c.inputs if n in wrt}
    fd = finite_differences(model, values)
    for p in wrt:
        np.testing.assert_allclose(grads[p], fd[p], rtol=RTOL, atol=ATOL, err_msg=p)


@pytest.mark.parametrize("c", [
    # STFT with neither window nor frame_length: one frame of the whole signal
    Case("STFT-whole-signal", "STFT", [("S", normal(2, 7, 1)), ("step", i64(2))], opset=17),
    # a one-sided spectrum of a complex signal (ONNX allows only real input there)
    Case("DFT-onesided-complex", "DFT", [("X", normal(2, 6, 2))], {"onesided": 1, "axis": 1},
         opset=17),
    Case("DFT-irfft-real-input", "DFT", [("X", normal(2, 4, 1))],
         {"onesided": 1, "inverse": 1, "axis": 1}, opset=17),
], ids=str)
def test_lenient_forms_match_finite_differences(c: Case) -> None:
    _check_fd(c)


def test_dft_gradient_matches_torch_fft() -> None:
    """rfft / irfft / fft adjoints agree with torch autograd (PyTorch's conventions)."""
    rng = np.random.default_rng(7)
    for attrs, shape, n, fn in [
        ({"onesided": 1}, (3, 8, 1), None, lambda t: torch.view_as_real(torch.fft.rfft(
            t[..., 0], dim=1))),
        ({"onesided": 1, "inverse": 1}, (3, 5, 2), 8, lambda t: torch.fft.irfft(
            torch.view_as_complex(t), n=8, dim=1)[..., None]),
        ({}, (3, 6, 2), 4, lambda t: torch.view_as_real(torch.fft.fft(
            torch.view_as_complex(t), n=4, dim=1))),
    ]:
        x = rng.standard_normal(shape)
        c = Case("DFT-torch", "DFT", [("X", x), ("N", None if n is None else i64(n))],
                 {"axis": 1, **attrs}, opset=17)
        model = loss_model(c)
        grads, _ = gradients(model, ["X"])
        r = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}["R0"]
        tx = torch.tensor(x, requires_grad=True)
        (fn(tx) * torch.tensor(r)).sum().backward()
        np.testing.assert_allclose(grads["X"], tx.grad.numpy(), rtol=1e-9, atol=1e-9,
                                   err_msg=str(attrs))


def _training_error(nodes, inits, wrt, opset=20) -> str:
    model = make_model(nodes, initializers=inits, outputs=["L"], opset=opset)
    with pytest.raises(ModelError) as err:
        build_training_graph(model, {"type": "output", "output": "L"}, wrt)
    return str(err.value)


def test_computed_axis_or_lengths_are_clear_errors() -> None:
    # An axis or length computed from a trained tensor cannot be read when the graph is built.
    x = normal(2, 6, 1)
    count = [helper.make_node("ReduceSum", ["X"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["z"]),
             helper.make_node("Cast", ["z"], ["zi"], to=onnx.TensorProto.INT64),
             helper.make_node("Add", ["zi", "k"], ["v"])]
    loss = [helper.make_node("ReduceSum", ["y"], ["L"], keepdims=0)]
    base = {"X": x, "zero": np.array(0.0)}
    msg = _training_error(count + [helper.make_node("DFT", ["X", "", "v"], ["y"])] + loss,
                          {**base, "k": i64(1)}, ["X"])
    assert "axis" in msg and "DFT" in msg
    msg = _training_error(count + [helper.make_node("DFT", ["X", "v"], ["y"], onesided=1,
                                                    axis=1)] + loss,
                          {**base, "k": i64(6)}, ["X"], opset=17)
    assert "dft_length" in msg
    msg = _training_error(count + [helper.make_node("STFT", ["X", "v", "W"], ["y"])] + loss,
                          {**base, "k": i64(2), "W": normal(3)}, ["X", "W"], opset=17)
    assert "frame_step" in msg


def test_stft_gradient_runs_in_onnxruntime_at_float32_for_a_real_size() -> None:
    # A realistic frame (512, hop 128) stays a handful of nodes: no per-tap or per-shift loops.
    rng = np.random.default_rng(3)
    c = Case("STFT-512", "STFT", [("S", rng.standard_normal((2, 2048, 1))),
                                  ("step", i64(128)), ("W", np.hanning(512))], opset=17)
    _, tm = gradients(loss_model(c), ["S", "W"])
    grad_nodes = [n for n in tm.graph.node if n.name.startswith("STFT_0/Grad/")]
    assert len(grad_nodes) <= 16, [n.op_type for n in grad_nodes]
    res = run_ort(tm)
    grads, _ = gradients(loss_model(c), ["S", "W"])
    for p, name in training_info(tm).gradients.items():
        np.testing.assert_allclose(res[name], grads[p], rtol=1e-7, atol=1e-7)


# -- the non-differentiable catalogue ---------------------------------------------------------
DECLARED = {  # ops this family declares, by domain
    "": {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
         "Multinomial", "HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix",
         "StringConcat", "StringNormalizer",
         "StringSplit", "RegexFullMatch", "TfIdfVectorizer", "ImageDecoder", "NonMaxSuppression",
         "Unique", "BitCast", "OptionalHasElement", "SequenceLength", "SequenceEmpty"},
    "ai.onnx.ml": {"Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "LabelEncoder",
                   "OneHotEncoder", "TreeEnsemble", "TreeEnsembleClassifier",
                   "TreeEnsembleRegressor", "ZipMap"},
    "ai.onnx.preview.training": {"Gradient"},
}
EXTRA_TESTED = {"ArrayFeatureExtractor", "Adagrad", "Adam", "Momentum"}


def test_declared_ops_exist_and_carry_no_gradient() -> None:
    schemas = {(s.domain, s.name) for s in onnx.defs.get_all_schemas_with_history()}
    for domain, ops in DECLARED.items():
        for op in sorted(ops):
            assert (domain, op) in schemas, (domain, op)
            assert op in NO_GRADIENT, op
            assert get_rule(op, domain) is None, op


def test_ops_with_float_results_of_the_catalogue_stop_the_gradient() -> None:
    # y = W + RandomNormalLike(W) + Bernoulli(sigmoid(W)): only the identity path carries dL/dW.
    w = normal(3, 4)
    nodes = [helper.make_node("RandomNormalLike", ["W"], ["r"]),
             helper.make_node("Sigmoid", ["W"], ["p"]),
             helper.make_node("Bernoulli", ["p"], ["b"]),
             helper.make_node("Sum", ["W", "r", "b"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers={"W": w}, outputs=["L"])
    grads, _ = gradients(model, ["W"])
    np.testing.assert_array_equal(grads["W"], np.ones_like(w))


@pytest.mark.parametrize("shape,idx,computed", [((3, 5), [4, 0, 4, 2], False),
                                                ((5,), [1, 3], False),
                                                ((2, 3, 4), [[0, 2], [2, 3]], False),
                                                ((3, 5), [4, 0, 4, 2], True)])
def test_array_feature_extractor_gradient(shape, idx, computed) -> None:
    # ai.onnx.ml ArrayFeatureExtractor is a gather on the last axis: repeated indices add up.
    # Indices computed from a float tensor are not known when the graph is built (Equal path).
    x = normal(*shape)
    index = np.array(idx, np.int64)
    k = index.size
    out_shape = (1, k) if len(shape) == 1 else shape[:-1] + (k,)
    inits = {"X": x, "R": normal(*out_shape)}
    pre = []
    if computed:
        inits["F"] = index.astype(np.float64)
        pre = [helper.make_node("Cast", ["F"], ["I"], to=onnx.TensorProto.INT64)]
    else:
        inits["I"] = index
    nodes = [*pre,
             helper.make_node("ArrayFeatureExtractor", ["X", "I"], ["y"], domain="ai.onnx.ml"),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers=inits, outputs=["L"], opset=18,
                       extra_opsets={"ai.onnx.ml": 3})
    grads, tm = gradients(model, ["X"])
    assert any(n.op_type == "Equal" for n in tm.graph.node) == computed
    fd = finite_differences(model, {"X": x})
    np.testing.assert_allclose(grads["X"], fd["X"], rtol=RTOL, atol=ATOL)
    res = run_ort(tm)
    np.testing.assert_allclose(res[training_info(tm).gradients["X"]], grads["X"], rtol=1e-6,
                               atol=1e-6)
    assert ("ai.onnx.ml", "ArrayFeatureExtractor") in RULES


# -- ai.onnx.preview.training optimizer steps ---------------------------------------------------
_STEPS = {  # name: (op, tensor roles in input order, attributes)
    "Adagrad": ("Adagrad", "XGH", {"decay_factor": 0.1, "epsilon": 1e-3,
                                   "norm_coefficient": 0.01}),
    "Adam": ("Adam", "XGVH", {"alpha": 0.8, "beta": 0.9, "epsilon": 1e-3,
                              "norm_coefficient": 0.01, "norm_coefficient_post": 0.02}),
    "Momentum": ("Momentum", "XGV", {"alpha": 0.9, "beta": 0.5, "mode": "standard",
                                     "norm_coefficient": 0.01}),
    "Momentum-nesterov": ("Momentum", "XGV", {"alpha": 0.9, "beta": 0.5, "mode": "nesterov",
                                              "norm_coefficient": 0.01}),
}


@pytest.mark.parametrize("step", [0, 3])
@pytest.mark.parametrize("name", sorted(_STEPS))
def test_optimizer_step_gradients(name, step) -> None:
    # d(one update step)/d(R, X, G, accumulators) for two tensors, against finite differences;
    # T == 0 switches Adam's bias correction and Momentum's beta off.
    op, roles, attrs = _STEPS[name]
    rng = np.random.default_rng(3)
    inits = {"R": np.array(0.3), "T": np.array(step, np.int64)}
    for role in roles:
        for i, shape in enumerate(((3, 2), (4,))):
            a = rng.standard_normal(shape)
            inits[f"{role}{i}"] = np.abs(a) + 0.5 if role == "H" else a
    ins = ["R", "T", *[f"{role}{i}" for role in roles for i in range(2)]]
    outs = [f"{role}{i}_new" for role in roles.replace("G", "") for i in range(2)]
    nodes = [helper.make_node(op, ins, outs, domain="ai.onnx.preview.training", **attrs)]
    for k, y in enumerate(outs):
        inits[f"W{k}"] = rng.standard_normal(inits[y[:-4]].shape)
        nodes += [helper.make_node("Mul", [y, f"W{k}"], [f"p{k}"]),
                  helper.make_node("ReduceSum", [f"p{k}"], [f"s{k}"], keepdims=0)]
    nodes.append(helper.make_node("Sum", [f"s{k}" for k in range(len(outs))], ["L"]))
    model = make_model(nodes, initializers=inits, outputs=["L"], opset=18,
                       extra_opsets={"ai.onnx.preview.training": 1})
    wrt = [n for n in ins if n != "T"]
    grads, _ = gradients(model, wrt)
    fd = finite_differences(model, {n: inits[n] for n in wrt})
    for n in wrt:
        np.testing.assert_allclose(grads[n], fd[n], rtol=RTOL, atol=ATOL, err_msg=n)
    assert get_rule(op, "ai.onnx.preview.training") is not None


@pytest.mark.parametrize("first", ["Identity", "Log"])
def test_a_weight_read_only_through_an_integer_cast_is_no_parameter(first):
    """A float initializer whose only way to the loss passes a Cast to an integer type gets
    no gradient there (PyTorch's .long()): it was taken for a parameter, and the training
    graph declared a gradient no node made (an invalid model) or blamed its types."""
    from onnx import TensorProto, numpy_helper

    from trainer.autodiff import build_training_graph, training_info
    from trainer.autodiff.params import UNUSED
    from trainer.report import model_report

    nodes = [helper.make_node(first, ["z"], ["lg"]),
             helper.make_node("Cast", ["lg"], ["li"], to=TensorProto.INT64),
             helper.make_node("Cast", ["li"], ["lf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "lf"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["logits"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 2])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(np.ones((2, 2), np.float32), "z"),
                           numpy_helper.from_array(np.ones((2, 2), np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    tm = build_training_graph(model, {"type": "cross_entropy", "output": "logits",
                                      "target": "label"}, batch_size=2)
    assert list(training_info(tm).gradients) == ["w"]
    rows = {p.name: p.role for p in model_report(model).params}
    assert rows["z"] == UNUSED and rows["w"] != UNUSED
