"""Gradients through quantization, straight through the rounding: fake quantization
(QuantizeLinear -> DequantizeLinear), DynamicQuantizeLinear and the integer ops (MatMulInteger,
ConvInteger, QLinearMatMul, QLinearConv) against PyTorch autograd of the same computation with
STE rounding and clamping (pinned to torch's own fake-quantize ops); DequantizeLinear's scale
gradient against float64 finite differences; the default parameter set of a QDQ model; and
training against PyTorch: quantization-aware training of a QDQ MLP, fine-tuning an onnxruntime
quantize_dynamic model."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests.gradcheck import CaseTable, gradients, positive, rule_tests
from tests.opcases import make_model, ort_u8s8_saturates, run, run_ort
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


def _fq_model(x, s, zp, attrs, opset):
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
    # A scale's gradient sums terms as large as the biggest component while the sum can be
    # small (int16 ranges: components 3e4, one of them 0.25): float32 sums in another order
    # (BLAS kernels differ between CPUs) differ by eps times the terms, not the result; with
    # up to 8 terms per scale, 2 x 8 x eps ~ 1e-6 of the largest component.
    s_atol = max(1e-4, 1e-6 * float(np.abs(st.grad.numpy()).max()))
    np.testing.assert_allclose(grads["S"], st.grad.numpy(), rtol=2e-5, atol=s_atol)
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
            np.testing.assert_allclose(res[name], grads[p], rtol=1e-5,
                                       atol=s_atol if p == "S" else 1e-4, err_msg=p)


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
    # A scale's gradient sums terms as large as the biggest component while the sum can be
    # small (int16 ranges: components 3e4, one of them 0.25): float32 sums in another order
    # (BLAS kernels differ between CPUs) differ by eps times the terms, not the result; with
    # up to 8 terms per scale, 2 x 8 x eps ~ 1e-6 of the largest component.
    s_atol = max(1e-4, 1e-6 * float(np.abs(st.grad.numpy()).max()))
    np.testing.assert_allclose(grads["S"], st.grad.numpy(), rtol=2e-5, atol=s_atol)


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


def _torch_dynq(v):
    """DynamicQuantizeLinear with straight-through rounding: (q, scale, zero point)."""
    hi, lo = torch.clamp(v.max(), min=0.0), torch.clamp(v.min(), max=0.0)
    s = (hi - lo) / 255
    zp = _ste(-lo / s)
    return torch.clamp(_ste(v / s) + zp, 0, 255), s, zp


@pytest.mark.parametrize("kind", ["2d-per-column-zp", "batched", "per-row-zp"])
def test_matmul_integer_passes_gradients_straight_through(kind) -> None:
    # A dynamically quantized linear layer as onnxruntime's quantize_dynamic writes it:
    # DynamicQuantizeLinear(X) -> MatMulInteger(q, Wq, zp, Wzp) -> Cast -> * (s * Ws) -> + B.
    # With per-row zero points, A comes from a per-axis QuantizeLinear instead.
    x_shape = (2, 3, 5) if kind == "batched" else (3, 5)
    x = _rng.standard_normal(x_shape).astype(F32)
    wq = _ints(np.int8, (5, 4), -127, 127)
    wzp = _ints(np.int8, (4,), -3, 3) if kind != "batched" else np.array(2, np.int8)
    ws = _rng.uniform(0.005, 0.02, wzp.shape).astype(F32)
    b = _rng.standard_normal(4).astype(F32)
    r = _rng.standard_normal(x_shape[:-1] + (4,)).astype(F32)
    inits = {"X": x, "Wq": wq, "Wzp": wzp, "Ws": ws, "B": b, "R": r}
    if kind == "per-row-zp":
        inits.update(S=np.array([0.02, 0.03, 0.025], F32), Z=np.array([3, -2, 0], np.int8))
        quantize = [helper.make_node("QuantizeLinear", ["X", "S", "Z"], ["q"], axis=0),
                    helper.make_node("Reshape", ["S", "col"], ["s"])]
        inits["col"] = np.array([3, 1], np.int64)
    else:
        quantize = [helper.make_node("DynamicQuantizeLinear", ["X"], ["q", "s", "Z"])]
    nodes = [*quantize,
             helper.make_node("MatMulInteger", ["q", "Wq", "Z", "Wzp"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["s", "Ws"], ["scale"]),
             helper.make_node("Mul", ["accf", "scale"], ["m"]),
             helper.make_node("Add", ["m", "B"], ["y"]),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers=inits, outputs=["L"], opset=13)
    wrt = ["X", "Ws", "B"] + (["S"] if kind == "per-row-zp" else [])
    grads, tm = gradients(model, wrt)

    t = {k: torch.tensor(inits[k], requires_grad=True) for k in wrt}
    xt = t["X"]
    if kind == "per-row-zp":
        zf = torch.tensor(inits["Z"], dtype=torch.float32)[:, None]
        st = t["S"][:, None]
        q, s, zp = torch.clamp(_ste(xt / st) + zf, -128, 127), st, zf
    else:
        q, s, zp = _torch_dynq(xt)
    w = torch.tensor(wq, dtype=torch.float32) - torch.tensor(wzp, dtype=torch.float32)
    y = ((q - zp) @ w) * (s * t["Ws"]) + t["B"]
    (y * torch.tensor(r)).sum().backward()
    for k in wrt:
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
    onnx.checker.check_model(tm, full_check=True)
    # (onnxruntime's MatMulInteger takes one zero point for A, and its uint8 x int8 products
    # saturate on CPUs without VNNI: opcases.ort_u8s8_saturates)
    if kind != "per-row-zp" and not ort_u8s8_saturates():
        res = run_ort(tm)
        for k, name in training_info(tm).gradients.items():
            np.testing.assert_allclose(res[name], grads[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_conv_integer_passes_gradients_straight_through() -> None:
    x = _rng.standard_normal((2, 3, 6, 5)).astype(F32)
    wq = _ints(np.int8, (4, 3, 3, 3), -127, 127)
    wzp = _ints(np.int8, (4,), -3, 3)
    ws = _rng.uniform(0.005, 0.02, (4, 1, 1)).astype(F32)
    r = _rng.standard_normal((2, 4, 3, 2)).astype(F32)
    inits = {"X": x, "Wq": wq, "Wzp": wzp, "Ws": ws, "R": r}
    nodes = [helper.make_node("DynamicQuantizeLinear", ["X"], ["q", "s", "z"]),
             helper.make_node("ConvInteger", ["q", "Wq", "z", "Wzp"], ["acc"],
                              strides=[2, 2], pads=[1, 0, 1, 1], dilations=[1, 1]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["s", "Ws"], ["scale"]),
             helper.make_node("Mul", ["accf", "scale"], ["y"]),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers=inits, outputs=["L"], opset=13)
    grads, tm = gradients(model, ["X", "Ws"])
    xt, wst = (torch.tensor(inits[k], requires_grad=True) for k in ("X", "Ws"))
    q, s, zp = _torch_dynq(xt)
    w = torch.tensor(wq, dtype=torch.float32) - torch.tensor(wzp, dtype=torch.float32)[
        :, None, None, None]
    acc = torch.nn.functional.conv2d(torch.nn.functional.pad(q - zp, (0, 1, 1, 1)), w,
                                     stride=2)
    ((acc * (s * wst)) * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(grads["X"], xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["Ws"], wst.grad.numpy(), rtol=1e-4, atol=1e-4)
    onnx.checker.check_model(tm, full_check=True)  # (onnxruntime's ConvInteger takes no
    # per-channel zero points, so it cannot run this graph)


def _torch_fq(v, s, zp, lo, hi):
    """(dequantized value, quantized value) of v with straight-through rounding."""
    q = torch.clamp(_ste(v / s) + zp, lo, hi)
    return (q - zp) * s, q


def test_qlinear_matmul_passes_gradients_through_its_qdq_form() -> None:
    # QLinearMatMul = QuantizeLinear(MatMul(DequantizeLinear(a), DequantizeLinear(b))): the
    # input's, the weight's and the output's scales (a's shared with the QuantizeLinear that
    # made a) and the input all get their straight-through gradients.
    x = (_rng.standard_normal((3, 5)) * 2).astype(F32)
    inits = {"X": x, "As": np.array(0.03, F32), "Az": np.array(4, np.int8),
             "Wq": _ints(np.int8, (5, 4), -127, 127), "Ws": np.array(0.01, F32),
             "Wz": np.array(0, np.int8), "Ys": np.array(0.05, F32),
             "Yz": np.array(-3, np.int8), "R": _rng.standard_normal((3, 4)).astype(F32)}
    nodes = [helper.make_node("QuantizeLinear", ["X", "As", "Az"], ["a"]),
             helper.make_node("QLinearMatMul", ["a", "As", "Az", "Wq", "Ws", "Wz", "Ys", "Yz"],
                              ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "Ys", "Yz"], ["y"]),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers=inits, outputs=["L"], opset=13)
    wrt = ["X", "As", "Ws", "Ys"]
    grads, tm = gradients(model, wrt)
    t = {k: torch.tensor(inits[k], requires_grad=True) for k in wrt}
    f = {k: torch.tensor(inits[k], dtype=torch.float32) for k in ("Az", "Wq", "Wz", "Yz", "R")}
    a, _ = _torch_fq(t["X"], t["As"], f["Az"], -128, 127)
    w = (f["Wq"] - f["Wz"]) * t["Ws"]
    y, q = _torch_fq(a @ w, t["Ys"], f["Yz"], -128, 127)
    (y * f["R"]).sum().backward()
    assert 0 < int((q.detach().abs() == 127).sum() + (q.detach() == -128).sum()) < q.numel()
    for k in wrt:
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-4, atol=1e-4,
                                   err_msg=k)
    onnx.checker.check_model(tm, full_check=True)
    res = run_ort(tm)
    for k, name in training_info(tm).gradients.items():
        np.testing.assert_allclose(res[name], grads[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_qlinear_conv_passes_gradients_through_its_qdq_form() -> None:
    # QLinearConv with per-channel weight scales and an int32 bias (scaled by x_scale *
    # w_scale): gradients for the input and every scale.
    x = _rng.standard_normal((2, 3, 5, 5)).astype(F32)
    inits = {"X": x, "Xs": np.array(0.02, F32), "Xz": np.array(128, np.uint8),
             "Wq": _ints(np.int8, (4, 3, 3, 3), -127, 127),
             "Ws": _rng.uniform(0.005, 0.01, 4).astype(F32), "Wz": np.zeros(4, np.int8),
             "Ys": np.array(0.04, F32), "Yz": np.array(128, np.uint8),
             "B": _ints(np.int32, (4,), -2000, 2000),
             "R": _rng.standard_normal((2, 4, 3, 3)).astype(F32)}
    nodes = [helper.make_node("QuantizeLinear", ["X", "Xs", "Xz"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "Xs", "Xz", "Wq", "Ws", "Wz", "Ys", "Yz",
                                              "B"], ["yq"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["yq", "Ys", "Yz"], ["y"]),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers=inits, outputs=["L"], opset=13)
    wrt = ["X", "Xs", "Ws", "Ys"]
    grads, tm = gradients(model, wrt)
    t = {k: torch.tensor(inits[k], requires_grad=True) for k in wrt}
    f = {k: torch.tensor(inits[k].astype(F32)) for k in ("Xz", "Wq", "Wz", "Yz", "B", "R")}
    xd, _ = _torch_fq(t["X"], t["Xs"], f["Xz"], 0, 255)
    w = (f["Wq"] - f["Wz"][:, None, None, None]) * t["Ws"][:, None, None, None]
    conv = torch.nn.functional.conv2d(xd, w, f["B"] * t["Xs"] * t["Ws"], stride=2, padding=1)
    y, _ = _torch_fq(conv, t["Ys"], f["Yz"], 0, 255)
    (y * f["R"]).sum().backward()
    for k in wrt:
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-4, atol=1e-4,
                                   err_msg=k)
    onnx.checker.check_model(tm, full_check=True)


def test_per_row_parameters_before_opset_13_are_a_clear_error() -> None:
    nodes = [helper.make_node("QuantizeLinear", ["X", "As", "Az"], ["a"]),
             helper.make_node("QLinearMatMul", ["a", "As", "Az", "Wq", "Ws", "Wz", "Ys", "Yz"],
                              ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "Ys", "Yz"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["L"], keepdims=0)]
    inits = {"X": _rng.standard_normal((3, 5)).astype(F32), "As": np.array(0.03, F32),
             "Az": np.array(0, np.int8), "Wq": _ints(np.int8, (5, 4), -9, 9),
             "Ws": np.full(4, 0.01, F32), "Wz": np.zeros(4, np.int8),
             "Ys": np.array(0.05, F32), "Yz": np.array(0, np.int8)}
    model = make_model(nodes, initializers=inits, outputs=["L"], opset=10)
    with pytest.raises(ModelError, match="QLinearMatMul.*opset >= 13"):
        build_training_graph(model, {"type": "output", "output": "L"}, ["X"])


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
# Straight-through rules have no finite-difference reference: they are checked against torch.
EXTRA_TESTED = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                "QLinearMatMul", "QLinearConv"}

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


def test_learned_scales_stay_positive(tmp_path) -> None:
    # A scale rate far too large drives scales through zero; like PyTorch's learnable fake
    # quantization, each update clamps them to float32's eps, and the export holds them so.
    import io

    from trainer.config import config_from_dict
    from trainer.train import SCALE_MIN, Trainer

    init, _, _ = _qat_setup(tmp_path)
    scales = ["S_in", "S1", "S_h", "S2"]
    cfg = config_from_dict({
        "model": "qat.onnx", "output": "out.onnx", "device": "cpu",
        "trainable": ["W*", "B*", *scales],
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": QAT_BATCH, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": QAT_LR, "groups": [{"params": "S*", "lr": 1e4}]},
        "steps": 3, "on_nan": "skip"}, base_dir=tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    result = trainer.fit()
    values = trainer.trained_values()
    assert all((values[k] >= np.float32(SCALE_MIN)).all() for k in scales), values
    assert any((values[k] == np.float32(SCALE_MIN)).any() for k in scales), values
    exported = {t.name: onnx.numpy_helper.to_array(t)
                for t in onnx.load(result["output"]).graph.initializer}
    assert all((exported[k] > 0).all() for k in scales)


def test_trainable_all_plus_globs_adds_the_scales_to_the_default_parameters() -> None:
    from trainer.autodiff.params import select

    model, _ = qdq_mlp(np.random.default_rng(5))
    loss = {"type": "cross_entropy", "output": "logits", "target": "label"}
    info = training_info(build_training_graph(model, loss, ["all", "S1", "S_h"],
                                              batch_size=4))
    assert set(info.gradients) == {"W1", "B1", "W2", "B2", "S1", "S_h"}
    # ("all" once, wherever it stands; frozen still applies)
    from trainer.autodiff.params import ParamInfo
    table = [ParamInfo("W", (2,), PARAMETER), ParamInfo("S", (), CONSTANT, "scale")]
    assert select(table, ["S", "all"]) == ["S", "W"]
    assert select(table, ["all", "S"], frozen=["W"]) == ["S"]


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


def _sgd_fit(tmp_path, model: str, steps: int, batch: int, lr: float, **settings):
    """Train tmp_path/model on tmp_path/data.npz (x, y) with SGD, cross entropy on 'logits',
    unshuffled batches: (trainer, fit result, per-step losses)."""
    import io

    from trainer.config import config_from_dict
    from trainer.train import Trainer

    cfg = config_from_dict({
        "model": model, "output": "out.onnx", "device": "cpu",
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": batch, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": lr}, "steps": steps, "log": {"every_steps": 1},
        **settings}, base_dir=tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    result = trainer.fit()
    return trainer, result, [r["loss"] for r in trainer.history if "step" in r and "loss" in r]


def _float_mlp(rng, path) -> dict[str, np.ndarray]:
    """A float MLP 8-16-4 (MatMul, Add, Relu) saved at path, opset 13; returns its weights."""
    from onnx import numpy_helper

    w = {"W1": (rng.standard_normal((8, 16)) * 0.4).astype(F32),
         "B1": (rng.standard_normal(16) * 0.1).astype(F32),
         "W2": (rng.standard_normal((16, 4)) * 0.4).astype(F32),
         "B2": (rng.standard_normal(4) * 0.1).astype(F32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]),
             helper.make_node("Add", ["h0", "B1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["l0"]),
             helper.make_node("Add", ["l0", "B2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return w


def test_a_dynamically_quantized_model_from_onnxruntime_fine_tunes_its_float_parameters(
        tmp_path) -> None:
    # onnxruntime.quantization.quantize_dynamic stores the weights as int8 and quantizes the
    # activations at run time (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add).
    # Its float parameters, the biases, train through the straight-through rules exactly as
    # the same computation does in PyTorch.

    from onnx import numpy_helper
    from onnxruntime.quantization import quantize_dynamic


    rng = np.random.default_rng(11)
    w = _float_mlp(rng, tmp_path / "float.onnx")
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "dyn.onnx"))
    dyn = onnx.load(str(tmp_path / "dyn.onnx"))
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in dyn.graph.node}
    q = {t.name: numpy_helper.to_array(t) for t in dyn.graph.initializer}
    x = (rng.standard_normal((64, 8)) * 1.5).astype(F32)
    y = rng.integers(0, 4, 64).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    steps, batch, lr = 6, 16, 0.1
    trainer, _, losses = _sgd_fit(tmp_path, "dyn.onnx", steps, batch, lr)
    values = trainer.trained_values()
    assert set(values) == {"B1", "B2"}  # the int8 weights are data; the scales constants

    def centered(name):
        return torch.tensor(q[name + "_quantized"], dtype=torch.float32) - float(
            q[name + "_zero_point"])
    b = {k: torch.tensor(w[k], requires_grad=True) for k in ("B1", "B2")}
    t_losses = []
    for step in range(steps):
        lo = step * batch % len(x)
        xq, xs, xz = _torch_dynq(torch.tensor(x[lo:lo + batch]))
        h = torch.relu((xq - xz) @ centered("W1") * (xs * float(q["W1_scale"])) + b["B1"])
        hq, hs, hz = _torch_dynq(h)
        logits = (hq - hz) @ centered("W2") * (hs * float(q["W2_scale"])) + b["B2"]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y[lo:lo + batch]))
        t_losses.append(loss.item())
        grads = torch.autograd.grad(loss, [b["B1"], b["B2"]])
        with torch.no_grad():
            for k, g in zip(("B1", "B2"), grads, strict=True):
                b[k] -= lr * g
    np.testing.assert_allclose(losses, t_losses, rtol=1e-5)
    for k in ("B1", "B2"):
        assert np.abs(values[k] - w[k]).max() > 1e-3, k
        np.testing.assert_allclose(values[k], b[k].detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=k)


def _torch_qdq_forward(model: onnx.ModelProto, p: dict, x: torch.Tensor) -> torch.Tensor:
    """The QDQ graph's output in PyTorch: each QuantizeLinear/DequantizeLinear pair as
    straight-through fake quantization (per tensor or per axis), MatMul, Gemm, Add, Relu."""
    from onnx import numpy_helper

    const = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    env = {"x": x, **p}
    quantized = {}
    for n in model.graph.node:
        a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
        ins = [env.get(k) for k in n.input]
        if n.op_type == "QuantizeLinear":  # kept until its DequantizeLinear
            quantized[n.output[0]] = (ins[0], n.input[1], n.input[2], a.get("axis", 1))
            continue
        if n.op_type == "DequantizeLinear":
            v, s_name, z_name, axis = quantized[n.input[0]]
            zp = const[z_name]
            info = np.iinfo(zp.dtype)
            shape = [1] * v.dim()
            if np.ndim(zp):
                shape[axis % v.dim()] = -1
            s = torch.tensor(const[s_name], dtype=v.dtype).reshape(shape)
            z = torch.tensor(zp.astype(np.float64), dtype=v.dtype).reshape(shape)
            out = _torch_fq(v, s, z, info.min, info.max)[0]
        elif n.op_type == "MatMul":
            out = ins[0] @ ins[1]
        elif n.op_type == "Gemm":
            out = ins[0] @ (ins[1].T if a.get("transB") else ins[1]) + ins[2]
        elif n.op_type == "Add":
            out = ins[0] + ins[1]
        elif n.op_type == "Relu":
            out = torch.relu(ins[0])
        else:
            raise AssertionError(f"the reference has no {n.op_type}")
        env[n.output[0]] = out
    return env[model.graph.output[0].name]


def test_a_static_qdq_model_from_onnxruntime_with_float_weights_trains_as_in_pytorch(
        tmp_path) -> None:
    # Quantization-aware training from a float model: onnxruntime's quantize_static, QDQ
    # format, calibrated on the data, keeping the weights float (AddQDQPairToWeight) and the
    # biases unquantized (QuantizeBias off; here the Add inputs get activation QDQ pairs).
    # The engine trains the weights through every fake quantization as PyTorch's STE does,
    # and the exported QDQ model deploys with onnxruntime's integer kernels.


    rng = np.random.default_rng(12)
    w = _float_mlp(rng, tmp_path / "float.onnx")
    x = (rng.standard_normal((64, 8)) * 1.5).astype(F32)
    y = rng.integers(0, 4, 64).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)

    _quantize_static_qdq(tmp_path / "float.onnx", tmp_path / "qdq.onnx", x)
    qdq = onnx.load(str(tmp_path / "qdq.onnx"))
    ops = [n.op_type for n in qdq.graph.node]
    assert ops.count("QuantizeLinear") >= 7 and "Relu" not in ops  # (uint8 clamps instead)
    steps, batch, lr = 8, 16, 0.2
    trainer, result, losses = _sgd_fit(tmp_path, "qdq.onnx", steps, batch, lr,
                                       precision="fp64")
    values = trainer.trained_values()
    assert set(values) == set(w)  # the float model's own tensors; scales stay constants

    p = {k: torch.tensor(v.astype(np.float64), requires_grad=True) for k, v in w.items()}
    t_losses = []
    for step in range(steps):
        lo = step * batch % len(x)
        logits = _torch_qdq_forward(qdq, p, torch.tensor(x[lo:lo + batch], dtype=torch.float64))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y[lo:lo + batch]))
        t_losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(p.values()))
        with torch.no_grad():
            for v, g in zip(p.values(), grads, strict=True):
                v -= lr * g
    np.testing.assert_allclose(losses, t_losses, rtol=1e-9)
    for k in w:
        assert np.abs(values[k] - w[k]).max() > 1e-3, k
        np.testing.assert_allclose(values[k], p[k].detach().numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=k)
    # The export is the same QDQ graph with the trained weights: onnxruntime runs it as float
    # QDQ (optimizations off) to our outputs, and with its integer kernels (the default) within
    # a step of the output's quantization.
    exported = onnx.load(result["output"])
    assert [n.op_type for n in exported.graph.node] == ops
    _deploys_with_onnxruntime(exported, x, steps=2)


def _quantize_static_qdq(src, dst, x) -> None:
    """onnxruntime's quantize_static into QDQ form with float weights (the README's recipe),
    calibrated on x in batches of 16."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": x[i:i + 16]} for i in range(0, len(x), 16)])

        def get_next(self):
            return next(self.feeds, None)
    quantize_static(str(src), str(dst), Batches(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8,
                    extra_options={"AddQDQPairToWeight": True, "QuantizeBias": False})


@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_static_qdq_cnns_from_onnxruntime_fit_a_batch_and_deploy(tmp_path, kind) -> None:
    # The same recipe on the BatchNorm CNN and the ResNet (inference-form exports): the
    # convolution weights train through their per-channel fake quantization and the scales as
    # LSQ does, the loss on a repeated batch falls, and onnxruntime runs the export to our
    # outputs (float QDQ) and close to them with its integer kernels.
    import io

    from trainer.config import config_from_dict
    from trainer.train import Trainer

    tm = pytest.importorskip("tests.torch_models")
    pytest.importorskip("onnxscript")
    sample = tm.ZOO[kind][1]
    onnx.save(tm.export_form(tm.zoo_model(kind, seed=3), sample, "inference"),
              str(tmp_path / "float.onnx"))
    rng = np.random.default_rng(13)
    x = rng.standard_normal((16,) + sample).astype(F32)
    np.savez(tmp_path / "data.npz", x=x, y=rng.integers(0, 10, 16).astype(np.int64))
    _quantize_static_qdq(tmp_path / "float.onnx", tmp_path / "qdq.onnx", x)
    qdq = onnx.load(str(tmp_path / "qdq.onnx"))
    conv_weights = {n.input[1] for n in onnx.load(str(tmp_path / "float.onnx")).graph.node
                    if n.op_type == "Conv"}
    cfg = config_from_dict({
        "model": "qdq.onnx", "output": "out.onnx", "device": "cpu",
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": 16, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "trainable": ["all", "*_scale"],  # the parameters and (LSQ) the scales: fixed, the
        # calibrated range of the logits' QDQ pair would cap them
        "optimizer": {"type": "adam", "lr": 0.01, "groups": [{"params": "*_scale",
                                                               "lr": 1e-4}]},
        "steps": 60, "log": {"every_steps": 1}},
        base_dir=tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    result = trainer.fit()
    losses = [r["loss"] for r in trainer.history if "step" in r and "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    values = trainer.trained_values()
    assert conv_weights <= set(values), conv_weights - set(values)
    exported = onnx.load(result["output"])
    assert {t.name for t in exported.graph.initializer} == {t.name for t in qdq.graph.initializer}
    before = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    for k in conv_weights:
        assert np.abs(values[k] - before[k]).max() > 1e-3, k
    _deploys_with_onnxruntime(exported, x, steps=4)


def _deploys_with_onnxruntime(exported: onnx.ModelProto, x: np.ndarray, steps: int) -> None:
    """onnxruntime runs the exported QDQ model to our logits: as float QDQ (optimizations off)
    to float rounding, and with its integer kernels (the default) within `steps` steps of the
    logits' quantization (where its uint8 x int8 kernels are exact: ort_u8s8_saturates)."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from trainer.executor import Executor

    ours = Executor(exported, np).run({"x": x})["logits"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(exported.SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(plain.run(["logits"], {"x": x})[0], ours, rtol=1e-5, atol=1e-5)
    if ort_u8s8_saturates():  # its integer kernels are not exact on this CPU
        return
    fused = ort.InferenceSession(exported.SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    last = next(n for n in exported.graph.node if n.output[0] == "logits")
    scale = next(numpy_helper.to_array(t) for t in exported.graph.initializer
                 if t.name == last.input[1])
    assert np.abs(fused.run(["logits"], {"x": x})[0] - ours).max() <= steps * float(scale) + 1e-6


def test_an_integer_weight_model_names_what_it_could_train(tmp_path) -> None:
    # Static QDQ quantization stores weights as int8 with a DequantizeLinear: nothing float is
    # left to train by default but the scales, and the error says so.
    x = onnx.numpy_helper.from_array(_rng.standard_normal((2, 3)).astype(F32))
    nodes = [helper.make_node("Constant", [], ["x"], value=x),
             helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"]),
             helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers={"Wq": _ints(np.int8, (3, 4), -9, 9),
                                            "Ws": np.array(0.1, F32)}, outputs=["L"], opset=13)
    with pytest.raises(ModelError, match=r"every float initializer that reaches the loss is "
                                         r"left out \(Ws: quantization scale\)"):
        build_training_graph(model, {"type": "output", "output": "L"}, "all")


def fake_quantize_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose Conv weights (per output channel) and MatMul/Gemm weights (per
    tensor) go through QuantizeLinear -> DequantizeLinear (int8, symmetric), as a QAT export
    writes them."""
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    done: dict[str, str] = {}
    new_nodes, extra = [], []
    for node in g.node:
        w = node.input[1] if node.op_type in ("Conv", "MatMul", "Gemm") and len(
            node.input) > 1 else ""
        if w in inits and inits[w].dtype == F32 and inits[w].ndim >= 2:
            if w not in done:
                v = inits[w]
                conv = node.op_type == "Conv"
                top = np.abs(v).reshape(len(v), -1).max(axis=1) if conv else np.abs(v).max()
                scale = (np.maximum(top, 1e-8) / 127).astype(F32)
                zp = np.zeros(scale.shape, np.int8)
                extra += [numpy_helper.from_array(scale, w + "_qscale"),
                          numpy_helper.from_array(zp, w + "_qzp")]
                ins = [w, w + "_qscale", w + "_qzp"]
                axis = {"axis": 0} if conv else {}
                new_nodes += [helper.make_node("QuantizeLinear", ins, [w + "_q"], **axis),
                              helper.make_node("DequantizeLinear", [w + "_q", *ins[1:]],
                                               [w + "_fq"], **axis)]
                done[w] = w + "_fq"
            node.input[1] = done[w]
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(extra)
    return m


@pytest.mark.parametrize("kind", ["cnn", "gpt"])
def test_qat_of_a_batchnorm_cnn_and_a_transformer(tmp_path, kind) -> None:
    # The other model families with their weights fake-quantized (Conv per channel, MatMul per
    # tensor): they fit one batch (finite, falling loss, moved weights, fixed scales); the exported
    # QDQ model runs in onnxruntime to the engine's outputs.
    import io
    import warnings

    import onnxruntime as ort

    from tests import torch_models, transformer_models
    from trainer.config import config_from_dict
    from trainer.executor import Executor
    from trainer.train import Trainer

    pytest.importorskip("onnxscript")
    rng = np.random.default_rng(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "cnn":
            float_model = torch_models.export_onnx(torch_models.make_model("cnn", seed=3), "cnn")
            x = rng.normal(size=(48, 1, 16, 16)).astype(F32)
            y = rng.integers(0, 10, 48)
        else:
            x = transformer_models.sample_input("gpt", 32, rng)
            float_model = transformer_models.export(transformer_models.make_model("gpt", seed=4),
                                                    x, "dynamo")
            y = transformer_models.sample_target("gpt", x, rng)
    model = fake_quantize_weights(float_model)
    n_fq = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert n_fq >= 3
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=x[:8], y=y[:8])  # one batch, seen every step
    cfg = config_from_dict({
        "model": "m.onnx", "output": "out.onnx", "device": "cpu",
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": 8, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "adamw", "lr": 3e-3}, "steps": 6, "log": {"every_steps": 1}},
        base_dir=tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    result = trainer.fit()
    losses = [r["loss"] for r in trainer.history if "step" in r and "loss" in r]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    values = trainer.trained_values()
    assert not any(k.endswith("_qscale") for k in values)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    quantized = [k for k in values if k + "_qscale" in init]
    assert len(quantized) == n_fq
    assert all(np.abs(values[k] - init[k]).max() > 0 for k in quantized)
    exported = onnx.load(result["output"])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(exported.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    ours = Executor(exported, np).run({"x": x[:4]})["logits"]
    np.testing.assert_allclose(sess.run(["logits"], {"x": x[:4]})[0], ours, rtol=1e-4,
                               atol=1e-4)
