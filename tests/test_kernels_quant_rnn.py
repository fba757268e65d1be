"""Quantization (QuantizeLinear ... QLinearConv) and recurrent (RNN, GRU, LSTM) kernels against
onnxruntime, or ONNX's reference evaluator where onnxruntime lacks the case, plus properties."""

from __future__ import annotations

import ml_dtypes as md
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from tests.opcases import node_model, run, run_ort, run_reference

F32, U8, I8 = np.float32, np.uint8, np.int8
_rng = np.random.default_rng(11)


def normal(*shape, scale=1.0, dtype=F32):
    return (_rng.standard_normal(shape) * scale).astype(dtype)


def uniform(lo, hi, *shape, dtype=F32):
    return _rng.uniform(lo, hi, shape).astype(dtype)


def ints(lo, hi, *shape, dtype=U8):
    return _rng.integers(lo, hi, shape, endpoint=True).astype(dtype)


def as_comparable(a: np.ndarray) -> np.ndarray:
    return a.astype(F32) if a.dtype.kind == "V" else a  # ml_dtypes types compare as float32


def assert_same(got, want, rtol, atol, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    got, want = as_comparable(got), as_comparable(want)
    if want.dtype.kind == "f" and rtol:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)  # NaN == NaN here


def check(op, inputs, *, n_out=1, opset=21, ref="ort", rtol=0.0, atol=0.0, **attrs):
    """Run one node with the executor and the reference; integer results must match exactly."""
    model = node_model(op, inputs, n_out, opset=opset, **attrs)
    feeds = {k: v for k, v in inputs if v is not None}
    want = (run_ort if ref == "ort" else run_reference)(model, feeds)
    got = run(model, feeds)
    for name, w in want.items():
        assert_same(got[name], w, rtol, atol, f"{op} {name}")


# -- QuantizeLinear / DequantizeLinear ------------------------------------------------------------
X = normal(2, 5, 4, scale=40)
S_BLOCK = uniform(0.5, 2, 2, 2, 4)
Q8 = ints(-100, 100, 2, 5, 4, dtype=I8)
F8 = [md.float8_e4m3fn, md.float8_e4m3fnuz, md.float8_e5m2, md.float8_e5m2fnuz]
X_SPECIAL = np.concatenate([X.ravel() * 10, [np.inf, -np.inf, np.nan, 1e6, -1e6]]).astype(F32)

QUANT = [
    # (id, op, inputs, opset, ref, attrs)
    ("q10-default-uint8", "QuantizeLinear", [("x", X), ("s", np.array(0.37, F32))], 10, "ort", {}),
    ("q13-axis-neg", "QuantizeLinear",
     [("x", X), ("s", uniform(0.5, 2, 4)), ("z", ints(0, 255, 4))], 13, "ort", {"axis": -1}),
    ("q13-int32-x", "QuantizeLinear",
     [("x", (X * 100).astype(np.int32)), ("s", np.array(37.0, F32)), ("z", np.array(3, I8))],
     13, "reference", {}),
    ("q21-blocked-remainder", "QuantizeLinear",
     [("x", X), ("s", S_BLOCK), ("z", ints(-5, 5, 2, 2, 4, dtype=I8))], 21, "ort",
     {"axis": 1, "block_size": 3}),
    ("q21-int16", "QuantizeLinear",
     [("x", X * 300), ("s", uniform(0.5, 2, 2)), ("z", np.array([1, -7], np.int16))], 21, "ort",
     {"axis": 0}),
    ("q21-uint16", "QuantizeLinear",
     [("x", X * 300), ("s", np.array(0.1, F32)), ("z", np.array(30000, np.uint16))], 21, "ort",
     {}),
    ("q21-fp16", "QuantizeLinear",  # onnxruntime divides in float32, the spec in float16
     [("x", X.astype(np.float16)), ("s", np.array(0.3, np.float16)), ("z", np.array(3, I8))],
     21, "reference", {}),
    ("q21-bf16", "QuantizeLinear",
     [("x", X.astype(md.bfloat16)), ("s", np.array(0.3, md.bfloat16)), ("z", np.array(3, I8))],
     21, "reference", {}),
    ("q21-output-dtype-int4", "QuantizeLinear", [("x", X), ("s", np.array(7.0, F32))], 21,
     "reference", {"output_dtype": TensorProto.INT4}),
    ("q23-fp16-x-f32-scale", "QuantizeLinear",
     [("x", X.astype(np.float16)), ("s", np.array(0.3, F32)), ("z", np.array(3, I8))], 23,
     "ort", {}),
    ("q23-precision", "QuantizeLinear",
     [("x", X), ("s", np.array(0.3, F32)), ("z", np.array(3, I8))], 23, "ort",
     {"precision": TensorProto.FLOAT16}),
    ("q23-float4", "QuantizeLinear",
     [("x", X), ("s", np.array(4.0, F32)), ("z", np.array(0, md.float4_e2m1fn))], 23,
     "reference", {}),
    ("dq10-int32", "DequantizeLinear",
     [("x", ints(-10**6, 10**6, 7, dtype=np.int32)), ("s", np.array(0.01, F32))], 10, "ort", {}),
    ("dq13-axis", "DequantizeLinear",
     [("x", Q8), ("s", uniform(0.5, 2, 5)), ("z", ints(-5, 5, 5, dtype=I8))], 13, "ort",
     {"axis": -2}),
    ("dq21-blocked", "DequantizeLinear",
     [("x", Q8), ("s", S_BLOCK), ("z", ints(-5, 5, 2, 2, 4, dtype=I8))], 21, "ort",
     {"axis": 1, "block_size": 3}),
    ("dq21-fp16-scale", "DequantizeLinear",
     [("x", Q8), ("s", np.array(0.0123, np.float16)), ("z", np.array(4, I8))], 21, "ort", {}),
    ("dq23-output-dtype", "DequantizeLinear",
     [("x", Q8), ("s", np.array(0.0123, F32)), ("z", np.array(4, I8))], 23, "ort",
     {"output_dtype": TensorProto.FLOAT16}),
    ("q21-int32-x-and-scale", "QuantizeLinear",
     [("x", (X * 10).astype(np.int32)), ("s", np.array(3, np.int32)), ("z", np.array(0, I8))],
     21, "reference", {}),
    ("q24-e8m0-scale", "QuantizeLinear",
     [("x", X), ("s", np.array([2.0, 4.0, 8.0, 0.5], md.float8_e8m0fnu)),
      ("z", np.zeros(4, I8))], 24, "reference", {"axis": -1}),
    ("dq24-e8m0-scale", "DequantizeLinear",
     [("x", Q8), ("s", np.array([2.0, 4.0, 8.0, 0.5], md.float8_e8m0fnu))], 24, "reference",
     {"axis": 2, "output_dtype": TensorProto.FLOAT}),
    ("q28-float6-e2m3", "QuantizeLinear",
     [("x", X), ("s", np.array(4.0, F32)), ("z", np.array(0, md.float6_e2m3fn))], 28,
     "reference", {}),
    ("q28-float6-e3m2", "QuantizeLinear",
     [("x", X), ("s", np.array(2.0, F32)), ("z", np.array(0, md.float6_e3m2fn))], 28,
     "reference", {}),
    ("dq28-float6", "DequantizeLinear",
     [("x", X.astype(md.float6_e3m2fn)), ("s", np.array(2.0, F32))], 28, "reference", {}),
    ("dq21-uint16", "DequantizeLinear",
     [("x", ints(0, 65535, 9, dtype=np.uint16)), ("s", np.array(0.5, F32)),
      ("z", np.array(40000, np.uint16))], 21, "ort", {}),
]
for dt in (md.int4, md.uint4):
    zp = np.array([1, 2], dt)
    QUANT.append((f"q21-{np.dtype(dt)}-axis", "QuantizeLinear",
                  [("x", X), ("s", uniform(2, 6, 2)), ("z", zp)], 21, "reference", {"axis": 0}))
    QUANT.append((f"dq21-{np.dtype(dt)}", "DequantizeLinear",
                  [("x", np.arange(16).astype(dt)), ("s", np.array(0.5, F32)),
                   ("z", np.array(2, dt))], 21, "reference", {}))
for dt in (md.int2, md.uint2):
    QUANT.append((f"q25-{np.dtype(dt)}", "QuantizeLinear",
                  [("x", X), ("s", np.array(20.0, F32)), ("z", np.array(1, dt))], 25,
                  "reference", {}))
for dt in F8:
    for sat in (0, 1):
        QUANT.append((f"q19-{np.dtype(dt)}-saturate{sat}", "QuantizeLinear",
                      [("x", X_SPECIAL), ("s", np.array(0.25, F32)), ("z", np.array(0, dt))],
                      19, "reference", {"saturate": sat}))
    QUANT.append((f"dq19-{np.dtype(dt)}", "DequantizeLinear",
                  [("x", X_SPECIAL.astype(dt)), ("s", np.array(0.5, F32))], 19, "reference", {}))


@pytest.mark.parametrize("case", QUANT, ids=[c[0] for c in QUANT])
def test_quantize_dequantize(case) -> None:
    _, op, inputs, opset, ref, attrs = case
    with np.errstate(invalid="ignore", over="ignore"):
        check(op, inputs, opset=opset, ref=ref, **attrs)


def test_quantize_output_dtype_must_match_zero_point() -> None:
    model = node_model("QuantizeLinear", [("x", X), ("s", np.array(1.0, F32)),
                                          ("z", np.array(0, U8))], opset=21)
    model.graph.node[0].attribute.append(helper.make_attribute("output_dtype", TensorProto.INT8))
    with pytest.raises(Exception, match="output_dtype"):
        run(model, {"x": X, "s": np.array(1.0, F32), "z": np.array(0, U8)})


@settings(max_examples=25, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), data=st.data())
def test_blocked_quantization_round_trip(shape, data) -> None:
    # Blocked == per-element scale (block 1) after repeating, and dequantize(quantize(x)) is
    # within half a step of x wherever x is in range.
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    block = data.draw(st.integers(1, shape[axis]))
    sshape = list(shape)
    sshape[axis] = -(-shape[axis] // block)
    rng = np.random.default_rng(len(shape) * 100 + block)
    scale = rng.uniform(0.1, 1.0, sshape).astype(F32)
    zp = rng.integers(-20, 20, sshape).astype(I8)
    x = rng.uniform(-30, 30, shape).astype(F32)
    feeds = {"x": x, "s": scale, "z": zp}
    ins = list(feeds.items())
    q = run(node_model("QuantizeLinear", ins, opset=21, axis=axis, block_size=block), feeds)["y0"]
    full = [np.repeat(v, block, axis=axis).take(range(shape[axis]), axis=axis)
            for v in (scale, zp)]
    ins1 = [("x", x), ("s", full[0]), ("z", full[1])]
    q1 = run(node_model("QuantizeLinear", ins1, opset=21, axis=axis, block_size=1),
             dict(ins1))["y0"]
    np.testing.assert_array_equal(q, q1)
    back = run(node_model("DequantizeLinear", [("q", q), ("s", scale), ("z", zp)], opset=21,
                          axis=axis, block_size=block), {"q": q, "s": scale, "z": zp})["y0"]
    in_range = (x / full[0] + full[1] > -128) & (x / full[0] + full[1] < 127)
    assert np.all(np.abs(back - x)[in_range] <= full[0][in_range] * 0.5 + 1e-5)


@pytest.mark.parametrize("x", [normal(3, 4), uniform(1, 3, 5), uniform(-3, -1, 5),
                               np.zeros((2, 2), F32), np.array(2.5, F32)],
                         ids=["mixed", "positive", "negative", "zeros", "scalar"])
def test_dynamic_quantize_linear(x) -> None:
    check("DynamicQuantizeLinear", [("x", x)], n_out=3, opset=11)


# -- integer matmul / conv ------------------------------------------------------------------------
def _q(dtype, *shape):
    return ints(0, 255, *shape) if dtype == U8 else ints(-128, 127, *shape, dtype=I8)


def _ref(a_dtype, b_dtype) -> str:
    """The reference for an integer product of these operand types: onnxruntime, except where
    one is uint8 and the other int8. On x86 CPUs without AVX-512 VNNI, onnxruntime's u8s8
    kernels add pairs of products in saturating int16 (vpmaddubsw), so their sums can be off
    (measured: 4 of 24 MatMulInteger results on an AVX2 machine); ONNX's reference evaluator
    computes the exact int32 sums the spec defines."""
    return "reference" if {a_dtype, b_dtype} == {U8, I8} else "ort"


INTEGER = [
    ("mmi-scalar-zp", "MatMulInteger",
     [("a", _q(U8, 2, 3, 5)), ("b", _q(I8, 5, 4)), ("az", np.array(7, U8)),
      ("bz", np.array(-3, I8))], _ref(U8, I8), {}),
    ("mmi-no-zp", "MatMulInteger", [("a", _q(I8, 3, 5)), ("b", _q(U8, 2, 5, 4))],
     _ref(I8, U8), {}),
    ("mmi-per-row-col", "MatMulInteger",
     [("a", _q(U8, 2, 3, 5)), ("b", _q(U8, 5, 4)), ("az", _q(U8, 2, 3, 1)),
      ("bz", _q(U8, 1, 4))], "reference", {}),
    ("conv-int-group-dilation", "ConvInteger",
     [("x", _q(U8, 2, 4, 7, 6)), ("w", _q(U8, 6, 2, 3, 3)), ("xz", np.array(100, U8)),
      ("wz", np.array(120, U8))], "ort", {"group": 2, "dilations": [2, 1]}),
    ("conv-int-pads-strides", "ConvInteger",
     [("x", _q(U8, 1, 2, 7, 6)), ("w", _q(U8, 3, 2, 3, 2)), ("xz", np.array(9, U8))], "ort",
     {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ("conv-int-same-1d", "ConvInteger",
     [("x", _q(U8, 2, 3, 9)), ("w", _q(U8, 4, 3, 4)), ("xz", np.array(128, U8)),
      ("wz", np.array(100, U8))], "ort", {"auto_pad": "SAME_LOWER"}),
    ("conv-int-per-channel-zp", "ConvInteger",
     [("x", _q(U8, 2, 4, 5, 5)), ("w", _q(U8, 6, 2, 3, 3)), ("xz", np.array(100, U8)),
      ("wz", _q(U8, 6))], "reference", {"group": 2, "pads": [1, 1, 1, 1]}),
]
for ad, bd in ((U8, U8), (I8, I8), (U8, I8)):
    a, b = _q(ad, 2, 3, 6), _q(bd, 6, 4)
    common = [("as", np.array(0.02, F32)), ("az", np.array(3, ad)), ("b", b)]
    yq = [("ys", np.array(0.05, F32)), ("yz", np.array(2, ad))]
    name = f"{np.dtype(ad)}-{np.dtype(bd)}"
    INTEGER.append((f"qlmm-{name}", "QLinearMatMul",
                    [("a", a), *common, ("bs", np.array(0.03, F32)), ("bz", np.array(5, bd)),
                     *yq], _ref(ad, bd), {}))
    INTEGER.append((f"qlmm-{name}-per-column", "QLinearMatMul",
                    [("a", a), *common, ("bs", uniform(0.01, 0.05, 4)), ("bz", _q(bd, 4)),
                     *yq], _ref(ad, bd), {}))
    INTEGER.append((f"qlmm-{name}-per-row", "QLinearMatMul",
                    [("a", a[0]), ("as", uniform(0.01, 0.05, 3, 1)), ("az", _q(ad, 3, 1)),
                     ("b", b), ("bs", np.array(0.03, F32)), ("bz", np.array(5, bd)), *yq],
                    "reference", {}))
    for wd in (U8, I8):
        for attrs in ({}, {"group": 2, "strides": [2, 1], "pads": [0, 1, 1, 2]}):
            INTEGER.append((f"qlconv-{name}-{np.dtype(wd)}-{len(attrs)}", "QLinearConv",
                            [("x", _q(ad, 2, 4, 6, 5)), ("xs", np.array(0.01, F32)),
                             ("xz", np.array(10, ad)), ("w", _q(wd, 6, 4 // attrs.get("group", 1),
                                                                3, 3)),
                             ("ws", uniform(0.001, 0.003, 6)), ("wz", np.zeros(6, wd)),
                             ("ys", np.array(0.2, F32)), ("yz", np.array(7, ad)),
                             ("b", ints(-3000, 3000, 6, dtype=np.int32))],
                            _ref(ad, wd), attrs))
INTEGER.append(("qlmm-fp16-scales", "QLinearMatMul",
                [("a", _q(U8, 3, 6)), ("as", np.array(0.02, np.float16)), ("az", np.array(3, U8)),
                 ("b", _q(U8, 6, 4)), ("bs", np.array(0.03, np.float16)),
                 ("bz", np.array(5, U8)), ("ys", np.array(0.05, np.float16)),
                 ("yz", np.array(2, U8))], "ort", {}))


@pytest.mark.parametrize("case", INTEGER, ids=[c[0] for c in INTEGER])
def test_integer_ops(case) -> None:
    _, op, inputs, ref, attrs = case
    check(op, inputs, opset=21 if op == "QLinearMatMul" else 10, ref=ref, **attrs)


def test_qlinearmatmul_per_row_vector_means_rows() -> None:
    # The spec's per-row parameters of a 2-D `a` are M-vectors; they mean the same as [M, 1].
    a, b = _q(U8, 3, 6), _q(U8, 6, 3)
    rows = [uniform(0.01, 0.05, 3), _q(U8, 3)]
    tail = [("b", b), ("bs", np.array(0.03, F32)), ("bz", np.array(5, U8)),
            ("ys", np.array(0.05, F32)), ("yz", np.array(2, U8))]
    got = [run(node_model("QLinearMatMul", ins, opset=21), dict(ins))["y0"] for ins in (
        [("a", a), ("as", rows[0]), ("az", rows[1]), *tail],
        [("a", a), ("as", rows[0][:, None]), ("az", rows[1][:, None]), *tail])]
    np.testing.assert_array_equal(*got)
    mmi = [("a", a), ("b", b), ("az", rows[1])]
    want = (a.astype(np.int32) - rows[1][:, None]) @ b.astype(np.int32)
    np.testing.assert_array_equal(run(node_model("MatMulInteger", mmi, opset=10),
                                      dict(mmi))["y0"], want)


def test_qlinearmatmul_float8() -> None:
    # float8 operands (opset 21): exact products in float32, saturated into the output type.
    e4 = md.float8_e4m3fn
    a, b = normal(3, 5).astype(e4), normal(5, 2).astype(e4)
    ins = [("a", a), ("as", np.array(2.0, F32)), ("az", np.array(0, e4)), ("b", b),
           ("bs", np.array(3.0, F32)), ("bz", np.array(0, e4)), ("ys", np.array(0.01, F32)),
           ("yz", np.array(0, e4))]
    got = run(node_model("QLinearMatMul", ins, opset=21), dict(ins))["y0"]
    full = (a.astype(F32) @ b.astype(F32)) * F32(600.0)
    want = np.clip(full, -448, 448).astype(e4)
    assert got.dtype == e4
    np.testing.assert_array_equal(got.astype(F32), want.astype(F32))


# -- RNN / GRU / LSTM -----------------------------------------------------------------------------
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def rnn_inputs(op, *, T=4, B=3, I=2, H=3, dirs=1, seq=None, init=False, bias=True,
               peep=False, layout=0, dtype=F32):
    g = GATES[op]
    x = normal(T, B, I)
    hshape = (B, dirs, H) if layout else (dirs, B, H)
    ins = [("X", x.transpose(1, 0, 2).copy() if layout else x),
           ("W", normal(dirs, g * H, I)), ("R", normal(dirs, g * H, H, scale=0.7)),
           ("B", normal(dirs, 2 * g * H) if bias else None),
           ("sequence_lens", None if seq is None else np.array(seq, np.int32)),
           ("initial_h", normal(*hshape) if init else None)]
    if op == "LSTM":
        ins += [("initial_c", normal(*hshape) if init else None),
                ("P", normal(dirs, 3 * H) if peep else None)]
    return [(k, v if v is None or v.dtype.kind == "i" else v.astype(dtype)) for k, v in ins]


def rnn_check(op, ins, *, opset=14, ref="ort", rtol=1e-5, atol=1e-6, **attrs):
    check(op, ins, n_out=3 if op == "LSTM" else 2, opset=opset, ref=ref, rtol=rtol, atol=atol,
          **attrs)


RNN_CASES = []
for op in GATES:
    RNN_CASES += [
        (f"{op}-plain", op, {}, {}),
        (f"{op}-init-no-bias", op, {"init": True, "bias": False}, {}),
        (f"{op}-seq-forward", op, {"seq": [4, 2, 1], "init": True}, {}),
        (f"{op}-seq-reverse", op, {"seq": [4, 2, 1], "init": True}, {"direction": "reverse"}),
        (f"{op}-seq-bidirectional", op, {"seq": [3, 2, 4], "init": True, "dirs": 2},
         {"direction": "bidirectional"}),
        (f"{op}-empty-sequence", op, {"seq": [3, 0, 4], "init": True, "dirs": 2},
         {"direction": "bidirectional"}),
        (f"{op}-clip", op, {"init": True}, {"clip": 0.5}),
        (f"{op}-opset7", op, {"init": True, "seq": [1, 4, 3]}, {"opset": 7}),
    ]
RNN_CASES += [
    ("RNN-relu", "RNN", {}, {"activations": ["Relu"]}),
    ("RNN-leakyrelu-alpha", "RNN", {"dirs": 2},
     {"direction": "bidirectional", "activations": ["Tanh", "LeakyRelu"],
      "activation_alpha": [0.3]}),
    ("GRU-hardsigmoid-softsign", "GRU", {},
     {"activations": ["HardSigmoid", "Softsign"], "activation_alpha": [0.3],
      "activation_beta": [0.6]}),
    ("GRU-linear-before-reset", "GRU", {"init": True}, {"linear_before_reset": 1}),
    ("GRU-lbr-clip-bidirectional", "GRU", {"dirs": 2, "seq": [2, 4, 3]},
     {"linear_before_reset": 1, "clip": 0.7, "direction": "bidirectional"}),
    ("LSTM-elu-softplus", "LSTM", {},
     {"activations": ["HardSigmoid", "Elu", "Softplus"], "activation_alpha": [0.3, 0.7],
      "activation_beta": [0.6]}),
    ("LSTM-scaledtanh-affine", "LSTM", {},
     {"activations": ["Sigmoid", "ScaledTanh", "Affine"], "activation_alpha": [0.7, 0.4],
      "activation_beta": [0.6, 0.2]}),
    ("LSTM-peepholes", "LSTM", {"init": True, "peep": True}, {}),
    ("LSTM-input-forget", "LSTM", {"init": True}, {"input_forget": 1}),
    ("LSTM-all", "LSTM", {"init": True, "peep": True, "seq": [2, 4, 3], "dirs": 2},
     {"input_forget": 1, "clip": 0.4, "direction": "bidirectional",
      "activations": ["Sigmoid", "Tanh", "Tanh", "HardSigmoid", "Relu", "Softsign"]}),
]


@pytest.mark.parametrize("case", RNN_CASES, ids=[c[0] for c in RNN_CASES])
def test_recurrent_against_onnxruntime(case) -> None:
    _, op, shape_kw, attrs = case
    attrs = dict(attrs)
    opset = attrs.pop("opset", 14)
    rnn_check(op, rnn_inputs(op, **shape_kw), opset=opset, hidden_size=3, **attrs)


@pytest.mark.parametrize("op", list(GATES))
def test_recurrent_layout_1_against_reference(op) -> None:
    ins = rnn_inputs(op, init=True, layout=1, dirs=2)
    rnn_check(op, ins, ref="reference", layout=1, direction="bidirectional")


@pytest.mark.parametrize("op", list(GATES))
def test_recurrent_layout_1_is_transposed_layout_0(op) -> None:
    kw = {"init": True, "dirs": 2, "seq": [3, 1, 4], "peep": op == "LSTM"}
    base = rnn_inputs(op, **kw)
    swapped = [(k, None if v is None else v.swapaxes(0, 1) if k in ("X", "initial_h",
                                                                    "initial_c") else v)
               for k, v in base]
    n = 3 if op == "LSTM" else 2
    got0 = run(node_model(op, base, n, opset=14, direction="bidirectional"),
               {k: v for k, v in base if v is not None})
    got1 = run(node_model(op, swapped, n, opset=14, direction="bidirectional", layout=1),
               {k: v for k, v in swapped if v is not None})
    np.testing.assert_allclose(got1["y0"], got0["y0"].transpose(2, 0, 1, 3), rtol=1e-6)
    for k in list(got0)[1:]:
        np.testing.assert_allclose(got1[k], got0[k].swapaxes(0, 1), rtol=1e-6)


@pytest.mark.parametrize("op", list(GATES))
@pytest.mark.parametrize("dtype", [np.float64, np.float16, md.bfloat16])
def test_recurrent_dtypes(op, dtype) -> None:
    ins32 = rnn_inputs(op, init=True, seq=[2, 4, 3], dirs=2)
    ins = [(k, v if v is None or v.dtype.kind == "i" else v.astype(dtype)) for k, v in ins32]
    n = 3 if op == "LSTM" else 2
    attrs = {"direction": "bidirectional", "hidden_size": 3}
    want = run_ort(node_model(op, ins32, n, opset=14, **attrs),
                   {k: v for k, v in ins32 if v is not None})
    got = run(node_model(op, ins, n, opset=22, **attrs), {k: v for k, v in ins if v is not None})
    tol = 1e-5 if dtype == np.float64 else 3e-2
    for k, w in want.items():
        assert got[k].dtype == np.dtype(dtype)
        np.testing.assert_allclose(got[k].astype(F32), w, rtol=tol, atol=tol)


def test_gru_opset1_default_direction_and_old_attributes() -> None:
    # GRU-1's direction default is spelled "foward"; output_sequence (opsets 1-6) is accepted.
    ins = rnn_inputs("GRU", init=True)
    feeds = {k: v for k, v in ins if v is not None}
    want = run(node_model("GRU", ins, 2, opset=7), feeds)
    for opset, attrs in ((1, {"output_sequence": 1}), (3, {"linear_before_reset": 0})):
        got = run(node_model("GRU", ins, 2, opset=opset, **attrs), feeds)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    ins = rnn_inputs("LSTM", init=True, peep=True)
    feeds = {k: v for k, v in ins if v is not None}
    want = run(node_model("LSTM", ins, 3, opset=7), feeds)
    got = run(node_model("LSTM", ins, 3, opset=1, output_sequence=1), feeds)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@settings(max_examples=12, deadline=None, derandomize=True)
@given(op=st.sampled_from(list(GATES)), lens=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       direction=st.sampled_from(["forward", "reverse", "bidirectional"]))
def test_sequence_lens_equals_truncated_runs(op, lens, direction) -> None:
    # Each batch entry with sequence_lens gives the same outputs as running it alone, cut to its
    # length (and zeros in Y past its end).
    dirs = 2 if direction == "bidirectional" else 1
    ins = dict(rnn_inputs(op, T=max(lens), B=len(lens), dirs=dirs, seq=lens, init=True))
    n = 3 if op == "LSTM" else 2
    model = node_model(op, list(ins.items()), n, opset=14, direction=direction)
    got = run(model, {k: v for k, v in ins.items() if v is not None})
    for b, length in enumerate(lens):
        one = dict(ins)
        one["X"] = ins["X"][:length, b:b + 1]
        one["sequence_lens"] = None
        for k in ("initial_h", "initial_c"):
            if one.get(k) is not None:
                one[k] = ins[k][:, b:b + 1]
        alone = run(node_model(op, list(one.items()), n, opset=14, direction=direction),
                    {k: v for k, v in one.items() if v is not None})
        np.testing.assert_allclose(got["y0"][:length, :, b], alone["y0"][:, :, 0], rtol=1e-5,
                                   atol=1e-6)
        assert not got["y0"][length:, :, b].any()
        for k in list(got)[1:]:
            np.testing.assert_allclose(got[k][:, b], alone[k][:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act, alpha, beta", [("ThresholdedRelu", [1.0], None),
                                              ("Affine", [1.0], [0.0]),
                                              ("ScaledTanh", [1.0], [1.0]),
                                              ("LeakyRelu", [0.01], None)])
def test_activation_defaults_are_the_operators_defaults(act, alpha, beta) -> None:
    # onnxruntime uses 0 for some of these; the spec says "the same as of corresponding ONNX
    # operators" (ThresholdedRelu alpha 1, Affine 1/0, ScaledTanh 1/1, LeakyRelu 0.01).
    ins = rnn_inputs("RNN", init=True)
    feeds = {k: v for k, v in ins if v is not None}
    got = run(node_model("RNN", ins, 2, opset=14, activations=[act]), feeds)
    extra = {"activation_alpha": alpha} | ({"activation_beta": beta} if beta else {})
    want = run(node_model("RNN", ins, 2, opset=14, activations=[act], **extra), feeds)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("scale_shape", [(2, 3), (2, 4), (2, 1), (3, 2)])
def test_blocked_quantization_refuses_a_scale_of_another_shape(scale_shape):
    """With block_size 2 on axis 1 of a (2, 4) input the scale must be (2, 2); a (2, 3) or
    (2, 4) one was taken and its blocks misassigned (onnxruntime refuses it)."""
    from trainer.kernels import get_kernel

    x = np.arange(8, dtype=np.int8).reshape(2, 4)
    with pytest.raises(ValueError, match=r"needs a parameter of shape \(2, 2\)"):
        get_kernel("DequantizeLinear", 21)(np, x, np.ones(scale_shape, np.float32), axis=1,
                                            block_size=2)
    y = get_kernel("DequantizeLinear", 21)(np, x, np.array([[1, 2], [3, 4]], np.float32),
                                           axis=1, block_size=2)[0]
    np.testing.assert_array_equal(y, [[0, 1, 4, 6], [12, 15, 24, 28]])
