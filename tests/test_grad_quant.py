"""Fake quantization (QuantizeLinear -> DequantizeLinear) gradients: the straight-through
estimator against PyTorch autograd (STE rounding and clamping, pinned to torch's own
fake-quantize ops), DequantizeLinear's scale gradient against float64 finite differences, the
default parameter set of a QDQ model, and quantization-aware training of a QDQ MLP against the
same training in PyTorch."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests.gradcheck import CaseTable, gradients, positive, rule_tests
from tests.opcases import make_model, run, run_ort
from trainer.autodiff import build_training_graph, training_info
from trainer.autodiff.params import CONSTANT, PARAMETER
from trainer.errors import ModelError

F32 = np.float32
_rng = np.random.default_rng(77)


def _ints(dtype, shape, lo, hi):
    return _rng.integers(lo, hi + 1, shape).astype(dtype)


# -- QuantizeLinear -> DequantizeLinear against torch ------------------------------------------
# id, opset, x shape, scale shape, zero point (None: absent), attributes
FQ_CASES = [
    ("tensor-int8", 13, (4, 6), (), np.array(3, np.int8), {}),
    ("tensor-uint8-no-zp-opset10", 10, (4, 6), (), None, {}),
    ("tensor-uint8-shape1", 13, (4, 6), (1,), np.array([128], np.uint8), {}),
    ("axis0-int8", 13, (3, 5), (3,), _ints(np.int8, (3,), -4, 4), {"axis": 0}),
    ("axis1-uint8", 13, (2, 4, 3), (4,), _ints(np.uint8, (4,), 100, 150), {}),
    ("axis-last-int16", 21, (2, 3, 4), (4,), _ints(np.int16, (4,), -9, 9), {"axis": -1}),
    ("blocked-int4-tail", 21, (2, 5, 3), (2, 3, 3), _ints(ml_dtypes.int4, (2, 3, 3), -2, 2),
     {"axis": 1, "block_size": 2}),
    ("blocked-uint8", 21, (4, 6), (4, 2), _ints(np.uint8, (4, 2), 120, 136),
     {"axis": 1, "block_size": 3}),
    ("output-dtype-int8", 21, (4, 6), (), None, {"output_dtype": TensorProto.INT8}),
    ("float8-e4m3fn", 19, (4, 6), (), np.array(0, ml_dtypes.float8_e4m3fn), {}),
    ("float8-e5m2-no-saturate", 19, (4, 6), (), np.array(0, ml_dtypes.float8_e5m2),
     {"saturate": 0}),
]
_TORCH_F8 = {np.dtype(ml_dtypes.float8_e4m3fn): torch.float8_e4m3fn,
             np.dtype(ml_dtypes.float8_e5m2): torch.float8_e5m2}


def _target(zp, attrs) -> np.dtype:
    if zp is not None:
        return zp.dtype
    return np.dtype(np.int8 if attrs.get("output_dtype") == TensorProto.INT8 else np.uint8)


def _case_values(x_shape, s_shape, target, saturate=1):
    """x spread well beyond the representable range at both ends, positive scales (float8
    without saturation stays inside the range, where it would overflow to inf)."""
    x = (_rng.standard_normal(x_shape) * 4).astype(F32)
    if target in _TORCH_F8:  # |x / s| up to a few times float8's largest value
        top = float(ml_dtypes.finfo(target).max)
        return x, _rng.uniform(2.0, 4.0, s_shape).astype(F32) / F32(top if saturate else 0.01)
    info = ml_dtypes.iinfo(target)
    s = _rng.uniform(0.6, 1.4, s_shape) * 8.0 / (info.max - info.min)
    return x, s.astype(F32)


def _torch_expand(p: torch.Tensor, x_shape, axis, block) -> torch.Tensor:
    if p.numel() == 1:
        return p.reshape(())
    axis %= len(x_shape)
    if block:
        return p.repeat_interleave(block, dim=axis).narrow(axis, 0, x_shape[axis])
    return p.reshape([1] * axis + [-1] + [1] * (len(x_shape) - axis - 1))


def torch_fake_quant(x, s, zp, target, attrs):
    """y = (q - zp) * s with q = saturate(round(x / s) + zp), rounding straight through and
    clamping passing gradients inside [lo, hi] (torch.clamp's own rule)."""
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    sf = _torch_expand(s, x.shape, axis, block)
    zf = _torch_expand(torch.tensor(np.asarray(zp, np.float32) if zp is not None else 0.0),
                       x.shape, axis, block)
    v = x / sf
    if target in _TORCH_F8:
        w = v + zf
        if attrs.get("saturate", 1):
            top = float(ml_dtypes.finfo(target).max)
            w = torch.clamp(w, -top, top)
        q = w + (w.to(_TORCH_F8[target]).float() - w).detach()
    else:
        r = v + (torch.round(v) - v).detach()
        info = ml_dtypes.iinfo(target)
        q = torch.clamp(r + zf, int(info.min), int(info.max))
    return (q - zf) * sf


def _fq_model(x, s, zp, attrs, opset, extra_nodes=()):
    inits = {"X": x, "S": s, "R": _rng.standard_normal(x.shape).astype(F32)}
    qin = ["X", "S"]
    if zp is not None:
        inits["Z"] = zp
        qin.append("Z")
    dq_attrs = {k: v for k, v in attrs.items() if k in ("axis", "block_size")}
    nodes = [helper.make_node("QuantizeLinear", qin, ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", *qin[1:]], ["y"], **dq_attrs),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    return make_model(nodes, initializers=inits, outputs=["L"], opset=opset), inits["R"]


@pytest.mark.parametrize("case", FQ_CASES, ids=[c[0] for c in FQ_CASES])
def test_fake_quantization_gradients_match_torch_ste(case) -> None:
    _, opset, x_shape, s_shape, zp, attrs = case
    target = _target(zp, attrs)
    x, s = _case_values(x_shape, s_shape, target, attrs.get("saturate", 1))
    model, r = _fq_model(x, s, zp, attrs, opset)
    grads, tm = gradients(model, ["X", "S"])

    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor(s, requires_grad=True)
    y = torch_fake_quant(xt, st, zp, target, attrs)
    (y * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(grads["X"], xt.grad.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads["S"], st.grad.numpy(), rtol=2e-5, atol=1e-4)
    assert grads["X"].dtype == F32 and grads["S"].dtype == F32
    assert np.isfinite(grads["S"]).all()
    # both clipping ends and the inside were exercised (float8 without saturation: no clip)
    kept = grads["X"] != 0
    if attrs.get("saturate", 1):
        assert kept.any() and not kept.all()
    # The training graph is standard ONNX that onnxruntime runs to the same gradients (it has
    # no kernels for the 4-bit types' casts).
    onnx.checker.check_model(tm, full_check=True)
    if target != ml_dtypes.int4:
        res = run_ort(tm)
        for p, name in training_info(tm).gradients.items():
            np.testing.assert_allclose(res[name], grads[p], rtol=1e-5, atol=1e-4, err_msg=p)


@pytest.mark.parametrize("case", [c for c in FQ_CASES if c[0] in (
    "tensor-int8", "tensor-uint8-shape1", "axis0-int8", "axis1-uint8")], ids=lambda c: c[0])
def test_the_reference_is_torchs_learnable_fake_quantize(case) -> None:
    # torch's LSQ fake-quantize (grad_factor 1) gives the reference's gradients, so the rules
    # match PyTorch's quantization-aware training, not only a formula of this file.
    _, _, x_shape, s_shape, zp, attrs = case
    target = _target(zp, attrs)
    x, s = _case_values(x_shape, s_shape, target)
    info = ml_dtypes.iinfo(target)
    g = torch.tensor(_rng.standard_normal(x_shape).astype(F32))
    out = []
    for builtin in (False, True):
        xt, st = torch.tensor(x, requires_grad=True), torch.tensor(s, requires_grad=True)
        if not builtin:
            y = torch_fake_quant(xt, st, zp, target, attrs)
        elif st.numel() == 1:
            y = torch._fake_quantize_learnable_per_tensor_affine(
                xt, st.reshape(1), torch.tensor(np.asarray(zp, F32).reshape(1)),
                int(info.min), int(info.max), 1.0)
        else:
            y = torch._fake_quantize_learnable_per_channel_affine(
                xt, st, torch.tensor(np.asarray(zp, F32)), attrs.get("axis", 1) % len(x_shape),
                int(info.min), int(info.max), 1.0)
        (y * g).sum().backward()
        out.append((y.detach().numpy(), xt.grad.numpy(), st.grad.numpy().reshape(s_shape)))
    for a, b in zip(*out, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gradients_through_shared_and_fanned_out_quantized_tensors() -> None:
    # One QuantizeLinear read by two DequantizeLinear nodes, and a scale shared by both sides:
    # the quantized tensor's two gradient terms add up, as do the scale's four.
    x = (_rng.standard_normal((3, 4)) * 2).astype(F32)
    s = np.array(0.04, F32)
    z = np.array(-5, np.int8)
    r1, r2 = (_rng.standard_normal((3, 4)).astype(F32) for _ in range(2))
    nodes = [helper.make_node("QuantizeLinear", ["X", "S", "Z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "S", "Z"], ["y1"]),
             helper.make_node("DequantizeLinear", ["q", "S"], ["y2"]),
             helper.make_node("Mul", ["y1", "R1"], ["p1"]),
             helper.make_node("Mul", ["y2", "R2"], ["p2"]),
             helper.make_node("Add", ["p1", "p2"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers={"X": x, "S": s, "Z": z, "R1": r1, "R2": r2},
                       outputs=["L"], opset=13)
    grads, _ = gradients(model, ["X", "S"])
    xt, st = torch.tensor(x, requires_grad=True), torch.tensor(s, requires_grad=True)
    v = xt / st
    q = torch.clamp(v + (torch.round(v) - v).detach() - 5, -128, 127)
    loss = ((q + 5) * st * torch.tensor(r1)).sum() + (q * st * torch.tensor(r2)).sum()
    loss.backward()
    np.testing.assert_allclose(grads["X"], xt.grad.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads["S"], st.grad.numpy(), rtol=2e-5, atol=1e-4)


def test_a_dequantization_written_as_cast_sub_mul_gets_the_same_gradients() -> None:
    # Some exporters dequantize by hand: Cast(q) - zp, times s. Cast passes the quantized
    # tensor's float gradient through (no cast to int8), so the gradients are DequantizeLinear's.
    x = (_rng.standard_normal((3, 4)) * 2).astype(F32)
    inits = {"X": x, "S": np.array(0.03, F32), "Z": np.array(7, np.int8),
             "R": _rng.standard_normal((3, 4)).astype(F32)}
    tail = [helper.make_node("Mul", ["y", "R"], ["p"]),
            helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    by_hand = [helper.make_node("QuantizeLinear", ["X", "S", "Z"], ["q"]),
               helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
               helper.make_node("Cast", ["Z"], ["zf"], to=TensorProto.FLOAT),
               helper.make_node("Sub", ["qf", "zf"], ["c"]),
               helper.make_node("Mul", ["c", "S"], ["y"]), *tail]
    qdq = [helper.make_node("QuantizeLinear", ["X", "S", "Z"], ["q"]),
           helper.make_node("DequantizeLinear", ["q", "S", "Z"], ["y"]), *tail]
    got, _ = gradients(make_model(by_hand, initializers=inits, outputs=["L"], opset=13),
                       ["X", "S"])
    want, _ = gradients(make_model(qdq, initializers=inits, outputs=["L"], opset=13),
                        ["X", "S"])
    assert (want["X"] != 0).sum() > 6
    for k in ("X", "S"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def _ste(v):
    return v + (torch.round(v) - v).detach()


def _dynamic_qdq_model(x, opset=13):
    """DynamicQuantizeLinear -> DequantizeLinear, with its scale and (cast) zero point also
    read directly: L = sum(y * R) + a * scale + b * zero_point."""
    inits = {"X": x, "R": _rng.standard_normal(x.shape).astype(F32),
             "a": np.array(0.7, F32), "b": np.array(-0.3, F32)}
    nodes = [helper.make_node("DynamicQuantizeLinear", ["X"], ["q", "s", "z"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
             helper.make_node("Cast", ["z"], ["zf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["ps"], keepdims=0),
             helper.make_node("Mul", ["s", "a"], ["sa"]),
             helper.make_node("Mul", ["zf", "b"], ["zb"]),
             helper.make_node("Sum", ["ps", "sa", "zb"], ["L"])]
    return make_model(nodes, initializers=inits, outputs=["L"], opset=opset), inits


@pytest.mark.parametrize("kind", ["mixed", "positive", "negative", "tied-extremes", "saturating"])
def test_dynamic_quantization_gradients_match_torch_ste(kind) -> None:
    x = _rng.standard_normal((3, 5)).astype(F32)
    if kind == "positive":
        x = np.abs(x) + F32(0.1)
    elif kind == "negative":
        x = -np.abs(x) - F32(0.1)
    elif kind == "tied-extremes":
        x.flat[[2, 9]] = x.max() + 1
        x.flat[[4, 11, 13]] = x.min() - 1
    elif kind == "saturating":  # s = 1/64, zp = rint(95.5) = 96, rint(159.5) + 96 = 256 at
        x = np.array([[-95.5 / 64, 0.3, 159.5 / 64]], F32)  # the maximum: saturated to 255
    model, inits = _dynamic_qdq_model(x)
    grads, tm = gradients(model, ["X"])
    if kind == "saturating":
        assert run(model, fetch=["q"])["q"][0, 2] == 255

    xt = torch.tensor(x, requires_grad=True)
    hi, lo = torch.clamp(xt.max(), min=0.0), torch.clamp(xt.min(), max=0.0)
    s = (hi - lo) / 255
    zp = _ste(-lo / s)
    q = torch.clamp(_ste(xt / s) + zp, 0, 255)
    loss = ((q - zp) * s * torch.tensor(inits["R"])).sum() + 0.7 * s - 0.3 * zp
    loss.backward()
    np.testing.assert_allclose(grads["X"], xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(tm, full_check=True)
    res = run_ort(tm)
    np.testing.assert_allclose(res[training_info(tm).gradients["X"]], grads["X"], rtol=1e-5,
                               atol=1e-5)


def test_a_scale_and_zero_point_computed_by_dynamic_quantization_quantize_another_tensor():
    # QuantizeLinear(X2, s, z) with s, z from DynamicQuantizeLinear(X): X gets gradients through
    # both (QuantizeLinear's and DequantizeLinear's zero-point terms), X2 the usual ones.
    x = _rng.standard_normal((3, 4)).astype(F32)
    x2 = (_rng.standard_normal((3, 4)) * 1.5).astype(F32)
    r = _rng.standard_normal((3, 4)).astype(F32)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["X"], ["q", "s", "z"]),
             helper.make_node("QuantizeLinear", ["X2", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"]),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers={"X": x, "X2": x2, "R": r}, outputs=["L"], opset=13)
    grads, _ = gradients(model, ["X", "X2"])
    xt, x2t = torch.tensor(x, requires_grad=True), torch.tensor(x2, requires_grad=True)
    hi, lo = torch.clamp(xt.max(), min=0.0), torch.clamp(xt.min(), max=0.0)
    s = (hi - lo) / 255
    zp = _ste(-lo / s)
    q2 = torch.clamp(_ste(x2t / s) + zp, 0, 255)
    ((q2 - zp) * s * torch.tensor(r)).sum().backward()
    assert (x2t.grad == 0).any() and (xt.grad != 0).sum() == 2  # saturation; max and min
    np.testing.assert_allclose(grads["X"], xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["X2"], x2t.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_dynamic_quantization_of_a_constant_input() -> None:
    # hi == lo: the kernel takes scale 1 and zero point 0, constants; only the rounding of x
    # passes its gradient (dy * 1).
    model, inits = _dynamic_qdq_model(np.zeros((2, 3), F32))
    grads, _ = gradients(model, ["X"])
    np.testing.assert_allclose(grads["X"], inits["R"], rtol=1e-6)


def test_integer_quantized_ops_still_stop_the_gradient_with_a_clear_error() -> None:
    # QLinearMatMul computes on integers: a weight reaching the loss only through it is named.
    nodes = [helper.make_node("QuantizeLinear", ["W", "s", "z"], ["q"]),
             helper.make_node("QLinearMatMul", ["q", "s", "z", "q", "s", "z", "s", "z"], ["m"]),
             helper.make_node("DequantizeLinear", ["m", "s", "z"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers={"W": _rng.standard_normal((3, 3)).astype(F32),
                                            "s": np.array(0.1, F32), "z": np.array(0, np.int8)},
                       outputs=["L"], opset=13)
    with pytest.raises(ModelError, match="W.*differentiable"):
        build_training_graph(model, {"type": "output", "output": "L"}, ["W"])


# -- DequantizeLinear alone: its scale gradient is exact, checked by finite differences -------
table = CaseTable()
table.add("DequantizeLinear", "tensor-int8-zp",
          [("x", _ints(np.int8, (3, 4), -128, 127)), ("s", positive()),
           ("z", np.array(-3, np.int8))],
          opset=13)
table.add("DequantizeLinear", "axis0-uint8",
          [("x", _ints(np.uint8, (3, 4), 0, 255)), ("s", positive(3)),
           ("z", _ints(np.uint8, (3,), 100, 150))], opset=13, axis=0)
table.add("DequantizeLinear", "int32-no-zp",
          [("x", _ints(np.int32, (2, 5), -1000, 1000)), ("s", positive(5))], opset=13, axis=-1)
table.add("DequantizeLinear", "blocked-int8-tail",
          [("x", _ints(np.int8, (2, 5, 3), -128, 127)), ("s", positive(2, 3, 3)),
           ("z", _ints(np.int8, (2, 3, 3), -4, 4))], opset=21, axis=1, block_size=2)
CASES = table.cases
EXTRA_TESTED = {"QuantizeLinear", "DynamicQuantizeLinear"}  # STE: no finite differences; torch

test_rule_matches_finite_differences, test_rule_float32_training_graph = rule_tests(CASES)


# -- quantization-aware training of a QDQ MLP, against the same training in PyTorch ----------
QAT_STEPS, QAT_BATCH, QAT_LR = 8, 16, 0.1
QAT_SCALE_LR = QAT_LR / 1000  # small for the scales, as LSQ's gradient scaling makes it


def qdq_mlp(rng, n_in: int = 8, hidden: int = 16, classes: int = 4):
    """x -> fq(uint8) -> Gemm(fq(W1, int8 per output channel)) -> Relu -> fq(uint8)
    -> Gemm(fq(W2, int8)) -> logits, every fake quantization a QuantizeLinear/DequantizeLinear
    pair with its own scale initializer (opset 13). Returns (model, initial values)."""
    w1 = (rng.standard_normal((hidden, n_in)) * 0.4).astype(F32)
    init = {
        "W1": w1, "B1": (rng.standard_normal(hidden) * 0.1).astype(F32),
        "W2": (rng.standard_normal((classes, hidden)) * 0.4).astype(F32),
        "B2": (rng.standard_normal(classes) * 0.1).astype(F32),
        "S_in": np.array(0.03, F32), "Z_in": np.array(128, np.uint8),
        "S1": (np.abs(w1).max(axis=1) / 100).astype(F32), "Z1": np.zeros(hidden, np.int8),
        "S_h": np.array(0.02, F32), "Z_h": np.array(0, np.uint8),
        "S2": np.array(0.006, F32), "Z2": np.array(0, np.int8),
    }

    def fq(x, s, z, y, **attrs):
        return [helper.make_node("QuantizeLinear", [x, s, z], [y + "_q"], **attrs),
                helper.make_node("DequantizeLinear", [y + "_q", s, z], [y], **attrs)]
    nodes = [*fq("x", "S_in", "Z_in", "xd"), *fq("W1", "S1", "Z1", "w1d", axis=0),
             helper.make_node("Gemm", ["xd", "w1d", "B1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["hr"]), *fq("hr", "S_h", "Z_h", "hd"),
             *fq("W2", "S2", "Z2", "w2d"),
             helper.make_node("Gemm", ["hd", "w2d", "B2"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "qdq_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [onnx.numpy_helper.from_array(v, k) for k, v in init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model, init


def _qat_setup(tmp_path):
    """qdq_mlp with 8 features and 4 classes in tmp_path/qat.onnx, and 64 samples."""
    rng = np.random.default_rng(5)
    model, init = qdq_mlp(rng)
    onnx.save(model, str(tmp_path / "qat.onnx"))
    x = (rng.standard_normal((64, 8)) * 1.5).astype(F32)
    y = rng.integers(0, 4, 64).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    return init, x, y


def _torch_qat(init, x, y, learned):
    """The same training in PyTorch, float64: STE fake quantization, cross entropy, SGD."""
    p = {k: torch.tensor(v.astype(np.float64) if v.dtype == F32 else v)
         for k, v in init.items()}
    for k in learned:
        p[k].requires_grad_(True)

    def fq(v, s, z, axis=1):
        return torch_fake_quant(v, s, init[z], init[z].dtype, {"axis": axis})
    losses = []
    for step in range(QAT_STEPS):
        lo = step * QAT_BATCH % len(x)
        xb, yb = torch.tensor(x[lo:lo + QAT_BATCH], dtype=torch.float64), torch.tensor(
            y[lo:lo + QAT_BATCH])
        h = fq(xb, p["S_in"], "Z_in") @ fq(p["W1"], p["S1"], "Z1", axis=0).T + p["B1"]
        hd = fq(torch.relu(h), p["S_h"], "Z_h")
        logits = hd @ fq(p["W2"], p["S2"], "Z2").T + p["B2"]
        loss = torch.nn.functional.cross_entropy(logits, yb)
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, [p[k] for k in learned])
        with torch.no_grad():
            for k, g in zip(learned, grads, strict=True):
                p[k] -= (QAT_SCALE_LR if k.startswith("S") else QAT_LR) * g
    return losses, {k: p[k].detach().numpy() for k in learned}


@pytest.mark.parametrize("learn_scales", [False, True], ids=["fixed-scales", "learned-scales"])
def test_quantization_aware_training_matches_torch(tmp_path, learn_scales) -> None:
    import io

    from trainer.config import config_from_dict
    from trainer.train import Trainer

    init, x, y = _qat_setup(tmp_path)
    weights = ["W1", "B1", "W2", "B2"]
    learned = weights + (["S1", "S_h"] if learn_scales else [])
    settings = {
        "model": "qat.onnx", "output": "out.onnx", "precision": "fp64", "device": "cpu",
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": QAT_BATCH, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": QAT_LR}, "steps": QAT_STEPS,
        "log": {"every_steps": 1}}
    if learn_scales:  # the weights and two scales, the scales at their own rate
        settings["trainable"] = learned
        settings["optimizer"]["groups"] = [{"params": "S*", "lr": QAT_SCALE_LR}]
    cfg = config_from_dict(settings, base_dir=tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    result = trainer.fit()
    losses = [r["loss"] for r in trainer.history if "step" in r and "loss" in r]
    t_losses, t_vals = _torch_qat(init, x, y, learned)
    values = trainer.trained_values()
    # Scales stay fixed unless listed, like PyTorch's observer-based fake quantization.
    assert set(values) == set(learned)
    np.testing.assert_allclose(losses, t_losses, rtol=1e-9)
    for k in learned:
        assert np.abs(t_vals[k] - init[k]).max() > 1e-3 * np.abs(init[k]).max(), k
        assert not k.startswith("S") or (t_vals[k] > 0).all(), (k, t_vals[k])
        np.testing.assert_allclose(values[k], t_vals[k], rtol=1e-9, atol=1e-12, err_msg=k)
    # The trained QDQ model runs in onnxruntime to the engine's own outputs (with ORT's graph
    # optimizations off: they turn QDQ groups into integer kernels that round differently).
    import onnxruntime as ort

    exported = onnx.load(result["output"])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(exported.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    from trainer.executor import Executor

    ours = Executor(exported, np).run({"x": x})["logits"]
    np.testing.assert_allclose(sess.run(["logits"], {"x": x})[0], ours, rtol=1e-5, atol=1e-5)


def test_a_qdq_models_parameters_leave_the_scales_out(tmp_path) -> None:
    # What `onnx-trainer check` lists: the weights train, every scale is a constant with the
    # reason and the way to learn it (zero points are integers, not candidates at all).
    from trainer.report import model_report

    _qat_setup(tmp_path)
    rows = {p.name: p for p in model_report(onnx.load(str(tmp_path / "qat.onnx"))).params}
    assert {k for k, p in rows.items() if p.role == PARAMETER} == {"W1", "B1", "W2", "B2"}
    for k in ("S_in", "S1", "S_h", "S2"):
        assert rows[k].role == CONSTANT and "quantization scale" in rows[k].reason, rows[k]
        assert "trainable" in rows[k].reason
