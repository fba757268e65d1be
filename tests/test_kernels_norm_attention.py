"""Normalization and attention kernels against onnxruntime (or the ONNX reference evaluator),
over the opsets, attributes and dtypes ONNX's node suite leaves out, plus bfloat16 checks."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.opcases import (
    KernelCase,
    KernelTable,
    node_model,
    ours_and_reference,
    run,
    run_ort,
)
from trainer.kernels import get_kernel
from trainer.kernels.attention import Attention_23, LinearAttention, RotaryEmbedding
from trainer.kernels.norm import (
    LRN,
    GroupNormalization_18,
    GroupNormalization_21,
    LayerNormalization,
    RMSNormalization,
)

F16, F32, F64 = np.float16, np.float32, np.float64
BF16 = ml_dtypes.bfloat16
_rng = np.random.default_rng(11)


def normal(*shape: int, dtype=F32) -> np.ndarray:
    return _rng.standard_normal(shape).astype(dtype)


def uniform(*shape: int, low=-1.0, high=1.0, dtype=F32) -> np.ndarray:
    return _rng.uniform(low, high, shape).astype(dtype)


def coin(*shape: int, p: float = 0.7) -> np.ndarray:
    return _rng.random(shape) < p


def i64(*values) -> np.ndarray:
    return np.array(values, np.int64)


def assert_close(got, want, rtol, atol, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    np.testing.assert_allclose(got.astype(F64), want.astype(F64), rtol=rtol, atol=atol,
                               err_msg=what)


_table = KernelTable(opset=23, atol=1e-06, suffix="")
CASES = _table.cases
add = _table.add
Case = KernelCase


# -- normalization ----------------------------------------------------------------------------
LN = "LayerNormalization"
add(LN, "axis0-noB", [("x", normal(2, 3, 4)), ("s", normal(2, 3, 4))], opset=17, n_out=3,
    axis=0)
add(LN, "axis1-B-broadcast", [("x", normal(2, 3, 4)), ("s", normal(3, 4)), ("b", normal(4))],
    opset=17, n_out=3, axis=1)
add(LN, "fp16", [("x", normal(3, 8, dtype=F16)), ("s", normal(8, dtype=F16)),
                 ("b", normal(8, dtype=F16))], opset=17, n_out=3)
add(LN, "fp64-stash-float", [("x", normal(2, 5, dtype=F64)), ("s", normal(5, dtype=F64))],
    opset=17, n_out=3, epsilon=1e-3)
add(LN, "y-only", [("x", normal(4, 6)), ("s", normal(6)), ("b", normal(6))], opset=17)

RMS = "RMSNormalization"
add(RMS, "axis1-3d", [("x", normal(2, 3, 4)), ("s", normal(3, 4))], opset=23, axis=1)
add(RMS, "scale-broadcast", [("x", normal(2, 3, 4)), ("s", normal(1, 4))], opset=23, axis=-2)
add(RMS, "fp16", [("x", normal(3, 16, dtype=F16)), ("s", normal(16, dtype=F16))], opset=23)
add(RMS, "fp64", [("x", normal(3, 7, dtype=F64)), ("s", normal(7, dtype=F64))], opset=23,
    epsilon=0.5)

GN = "GroupNormalization"
add(GN, "21-one-group-3d", [("x", normal(2, 6, 5)), ("s", normal(6)), ("b", normal(6))],
    opset=21, num_groups=1)
add(GN, "21-per-channel-5d", [("x", normal(2, 4, 2, 3, 2)), ("s", normal(4)), ("b", normal(4))],
    opset=21, num_groups=4, epsilon=1e-2)
add(GN, "21-fp16", [("x", normal(2, 6, 4, dtype=F16)), ("s", normal(6, dtype=F16)),
                    ("b", normal(6, dtype=F16))], opset=21, num_groups=3, ref="reference")

IN = "InstanceNormalization"
add(IN, "3d", [("x", normal(2, 3, 7)), ("s", normal(3)), ("b", normal(3))], opset=22)
add(IN, "5d-opset6", [("x", normal(1, 2, 3, 2, 4)), ("s", normal(2)), ("b", normal(2))],
    opset=6, epsilon=0.1)
add(IN, "fp16", [("x", normal(2, 3, 9, dtype=F16)), ("s", normal(3, dtype=F16)),
                 ("b", normal(3, dtype=F16))], opset=22)
add(IN, "fp64", [("x", normal(2, 3, 4, 4, dtype=F64)), ("s", normal(3, dtype=F64)),
                 ("b", normal(3, dtype=F64))], opset=22, ref="reference")

MVN = "MeanVarianceNormalization"
add(MVN, "axes-1-3", [("x", normal(2, 3, 4, 5))], opset=13, axes=[1, 3])
add(MVN, "axes-last-3d", [("x", normal(3, 4, 6))], opset=13, axes=[-1])
add(MVN, "opset9-default", [("x", normal(2, 3, 4, 2))], opset=9)

add("LRN", "size5", [("x", normal(2, 7, 3, 2))], opset=13, size=5, alpha=1e-2, beta=0.6,
    bias=1.5)
add("LRN", "opset1-size1", [("x", normal(1, 3, 2, 2))], opset=1, size=1, alpha=0.5)
add("LRN", "fp16", [("x", normal(2, 5, 3, 3, dtype=F16))], opset=13, size=3, alpha=0.1)

LP = "LpNormalization"
add(LP, "p1-negative", [("x", normal(3, 4))], opset=22, p=1, axis=0)
add(LP, "p2-zero-row", [("x", np.array([[0, 0, 0], [3, -4, 0]], F32))], opset=22, p=2)
add(LP, "p1-zero-row", [("x", np.array([[0, 0], [-3, 4]], F32))], opset=22, p=1)
add(LP, "opset1-fp64", [("x", normal(2, 3, 4, dtype=F64))], opset=1, axis=1)
add(LP, "fp16", [("x", normal(4, 5, dtype=F16))], opset=22)

# -- attention --------------------------------------------------------------------------------
AT = "Attention"


def qkv(b, hq, hkv, sq, sk, d, dv=None, dtype=F32, three_d=False):
    dv = dv or d
    if three_d:
        return [("Q", normal(b, sq, hq * d, dtype=dtype)),
                ("K", normal(b, sk, hkv * d, dtype=dtype)),
                ("V", normal(b, sk, hkv * dv, dtype=dtype))]
    return [("Q", normal(b, hq, sq, d, dtype=dtype)), ("K", normal(b, hkv, sk, d, dtype=dtype)),
            ("V", normal(b, hkv, sk, dv, dtype=dtype))]


def past(b, hkv, sp, d, dv=None, dtype=F32):
    return [("past_key", normal(b, hkv, sp, d, dtype=dtype)),
            ("past_value", normal(b, hkv, sp, dv or d, dtype=dtype))]


NONE = ("", None)
add(AT, "mha", qkv(2, 2, 2, 3, 5, 4), opset=23)
add(AT, "gqa-causal-rect", qkv(1, 6, 2, 3, 5, 4), opset=23, is_causal=1)
add(AT, "mqa-3d-diff-v", qkv(2, 4, 1, 3, 4, 4, dv=6, three_d=True), opset=23, q_num_heads=4,
    kv_num_heads=1)
add(AT, "bool-mask-4d", qkv(2, 2, 2, 3, 5, 4) + [("m", coin(2, 1, 3, 5))], opset=23)
add(AT, "float-mask-3d", qkv(2, 3, 3, 3, 5, 4) + [("m", normal(3, 3, 5))], opset=23)
add(AT, "bool-mask-causal", qkv(1, 2, 1, 4, 4, 8) + [("m", coin(4, 4))], opset=23, is_causal=1)
add(AT, "past-causal-gqa", qkv(2, 4, 2, 3, 3, 4) + [NONE] + past(2, 2, 5, 4), opset=23,
    n_out=3, is_causal=1)
add(AT, "past-3d-mask", qkv(1, 2, 2, 2, 3, 4, dv=5, three_d=True) + [("m", normal(2, 7))]
    + past(1, 2, 4, 4, dv=5), opset=23, n_out=3, q_num_heads=2, kv_num_heads=2)
for mode in range(4):
    add(AT, f"softcap-mode{mode}", qkv(1, 2, 2, 3, 4, 8) + [("m", normal(3, 4))], opset=23,
        n_out=4, softcap=1.5, qk_matmul_output_mode=mode)
add(AT, "scale-causal-mode3", qkv(2, 2, 2, 4, 4, 4), opset=23, n_out=4, scale=0.3, is_causal=1,
    qk_matmul_output_mode=3)
add(AT, "softmax-fp64", qkv(1, 2, 2, 3, 4, 4) + [("m", normal(3, 4))], opset=23, n_out=4,
    softmax_precision=11)
add(AT, "fp16-gqa-mask", qkv(2, 4, 2, 3, 6, 8, dtype=F16) + [("m", normal(3, 6, dtype=F16))],
    opset=23)
add(AT, "fp64-causal", qkv(2, 2, 2, 5, 5, 4, dtype=F64), opset=23, is_causal=1)
add(AT, "24-nonpad", qkv(2, 2, 2, 3, 6, 4) + [NONE, NONE, NONE, ("n", i64(6, 2))], opset=24)
add(AT, "24-nonpad-causal-mask", qkv(2, 4, 2, 2, 6, 4)
    + [("m", coin(2, 1, 2, 6)), NONE, NONE, ("n", i64(5, 3))], opset=24, is_causal=1)
add(AT, "25-window-bidirectional", qkv(1, 2, 2, 6, 6, 4), opset=25, left_window_size=1,
    right_window_size=2)
add(AT, "25-window-past", qkv(1, 2, 2, 2, 2, 4) + [NONE] + past(1, 2, 4, 4), opset=25, n_out=3,
    is_causal=1, left_window_size=3)
add(AT, "25-window-nonpad", qkv(2, 2, 1, 3, 6, 4) + [NONE, NONE, NONE, ("n", i64(6, 4))],
    opset=25, is_causal=1, left_window_size=1)
# onnxruntime lacks these; the reference evaluator has them
add(AT, "short-bool-mask-padded", qkv(1, 2, 2, 3, 5, 4) + [("m", coin(3, 3))], opset=23,
    ref="reference")
add(AT, "short-float-mask-mode2", qkv(1, 2, 2, 3, 5, 4) + [("m", normal(3, 2))], opset=23,
    n_out=4, qk_matmul_output_mode=2, ref="reference")
add(AT, "fully-masked-row-mode3", qkv(1, 1, 1, 3, 3, 4)
    + [("m", np.array([[1, 1, 0], [0, 0, 0], [1, 0, 1]], bool))], opset=24, n_out=4,
    qk_matmul_output_mode=3, ref="reference")
add(AT, "softmax-fp32-of-fp16-mode3", qkv(1, 2, 2, 2, 3, 8, dtype=F16), opset=24, n_out=4,
    softmax_precision=1, qk_matmul_output_mode=3, ref="reference")
# (mode 2 without a mask is the softcapped product: it was the raw one)
add(AT, "softcap-mode2-no-mask", qkv(1, 2, 2, 3, 4, 8), opset=23, n_out=4, softcap=1.5,
    qk_matmul_output_mode=2, ref="reference")

# -- rotary embedding, linear attention -------------------------------------------------------
RE = "RotaryEmbedding"
POS = i64([0, 5, 2], [7, 1, 3])
add(RE, "3d-interleaved-partial", [("x", normal(2, 3, 24)), ("c", normal(10, 2)),
                                   ("s", normal(10, 2)), ("p", POS)], opset=23, num_heads=3,
    rotary_embedding_dim=4, interleaved=1)
add(RE, "4d-partial", [("x", normal(2, 2, 3, 8)), ("c", normal(10, 3)), ("s", normal(10, 3)),
                       ("p", POS)], opset=23, rotary_embedding_dim=6)
add(RE, "3d-no-position-ids", [("x", normal(2, 3, 16)), ("c", normal(2, 3, 4)),
                               ("s", normal(2, 3, 4))], opset=23, num_heads=2)
add(RE, "fp16", [("x", normal(2, 2, 3, 8, dtype=F16)), ("c", normal(10, 4, dtype=F16)),
                 ("s", normal(10, 4, dtype=F16)), ("p", POS)], opset=23)

LA = "LinearAttention"


def la_inputs(b, t, hq, hkv, dk, dv, decay=None, beta=None, state=False, dtype=F32):
    # keys L2-normalized and gates in (0, 1] as the delta rules expect
    k = normal(b, t, hkv, dk)
    k = (k / np.linalg.norm(k, axis=-1, keepdims=True)).reshape(b, t, hkv * dk)
    ins = [("q", normal(b, t, hq * dk, dtype=dtype)), ("k", k.astype(dtype)),
           ("v", normal(b, t, hkv * dv, dtype=dtype)),
           ("S", normal(b, hkv, dk, dv, dtype=dtype)) if state else NONE,
           ("g", uniform(b, t, decay, low=-0.5, high=0.0, dtype=dtype)) if decay else NONE,
           ("beta", uniform(b, t, beta, low=0.1, high=1.0, dtype=dtype)) if beta else NONE]
    return ins


add(LA, "linear-gqa", la_inputs(2, 5, 4, 2, 4, 3), opset=27, n_out=2, q_num_heads=4,
    kv_num_heads=2, update_rule="linear")
add(LA, "gated-per-dim-past", la_inputs(1, 4, 2, 2, 4, 4, decay=8, state=True), opset=27,
    n_out=2, q_num_heads=2, kv_num_heads=2, update_rule="gated")
add(LA, "delta-beta-scalar", la_inputs(2, 3, 2, 2, 4, 5, beta=1), opset=27, n_out=2,
    q_num_heads=2, kv_num_heads=2, update_rule="delta")
add(LA, "gated-delta-mqa-head-decay", la_inputs(1, 6, 3, 1, 4, 4, decay=1, beta=1, state=True),
    opset=27, n_out=2, q_num_heads=3, kv_num_heads=1, scale=0.7)
add(LA, "gated-delta-t1", la_inputs(2, 1, 2, 2, 8, 8, decay=16, beta=2, state=True), opset=27,
    n_out=2, q_num_heads=2, kv_num_heads=2)
add(LA, "fp16", la_inputs(1, 4, 4, 2, 4, 4, decay=2, beta=2, dtype=F16), opset=27, n_out=2,
    q_num_heads=4, kv_num_heads=2)


def tolerance(inputs) -> tuple[float, float]:
    if any(a is not None and a.dtype == F16 for _, a in inputs):
        return 4e-3, 4e-3
    return 1e-5, 1e-5


@pytest.mark.parametrize("c", CASES, ids=str)
def test_kernel_matches_reference(c: Case) -> None:
    ours, want = ours_and_reference(c)
    rtol, atol = tolerance(c.inputs)
    for name in want:
        assert_close(ours[name], want[name], rtol, atol, f"{c.id} {name}")


def test_every_op_and_version_registered() -> None:
    for op, versions in {LN: [17], RMS: [23], GN: [18, 21], IN: [1, 6, 22], MVN: [9, 13],
                         "LRN": [1, 13], LP: [1, 22], AT: [23, 24, 25], LA: [27],
                         RE: [23]}.items():
        for v in versions:
            assert get_kernel(op, v) is not None, (op, v)
    assert get_kernel(GN, 18) is not get_kernel(GN, 21)
    assert len({get_kernel(AT, v) for v in (23, 24, 25)}) == 3


# -- kernels called directly: opset-18 GroupNormalization (deprecated for the checker), LRN
# beyond 4-D odd sizes (onnxruntime refuses them), bfloat16 (no onnxruntime CPU kernels) ---
def test_group_normalization_18_scales_per_group() -> None:
    x, s, b = normal(2, 6, 3), normal(3), normal(3)
    (y,) = GroupNormalization_18(np, x, s, b, num_groups=3, epsilon=1e-3)
    xg = x.astype(F64).reshape(2, 3, -1)
    z = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-3)
    want = (z * s[:, None] + b[:, None]).reshape(x.shape)
    assert_close(y, want.astype(F32), 1e-5, 1e-5)
    (y21,) = GroupNormalization_21(np, x, np.repeat(s, 2), np.repeat(b, 2), num_groups=3,
                                   epsilon=1e-3)
    assert_close(y21, y, 1e-6, 1e-6)


@pytest.mark.parametrize("size,shape", [(2, (2, 5, 3)), (4, (2, 5, 3)), (5, (1, 7, 2, 2, 2))])
def test_lrn_any_size_and_rank_follows_spec_window(size: int, shape: tuple) -> None:
    x = normal(*shape)
    (y,) = LRN(np, x, size=size, alpha=0.3, beta=0.7, bias=1.2)
    c = x.shape[1]
    sq = np.zeros(x.shape, F64)
    for ch in range(c):
        lo, hi = max(0, ch - (size - 1) // 2), min(c - 1, ch + -(-(size - 1) // 2))
        sq[:, ch] = (x[:, lo:hi + 1].astype(F64) ** 2).sum(axis=1)
    want = x / (1.2 + 0.3 / size * sq) ** 0.7
    assert_close(y, want.astype(F32), 1e-5, 1e-6)


def _bf16_matches_float32(fn, arrays, *args, **attrs) -> None:
    """A bfloat16 run equals the float32 run on the same values, rounded once at the end."""
    low = [a.astype(BF16) if a is not None and a.dtype == F32 else a for a in arrays]
    high = [a.astype(F32) if a is not None and a.dtype == BF16 else a for a in low]
    got, want = fn(np, *low, *args, **attrs), fn(np, *high, *args, **attrs)
    for g, w in zip(got, want, strict=True):
        if w.dtype == F32 and g.dtype == BF16:
            w = w.astype(BF16)
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g.astype(F32), w.astype(F32))


def test_bfloat16_computes_in_float32(monkeypatch) -> None:
    # (on the NumPy path both: float32 inputs may take the compiled loops, whose float64
    # statistics are as accurate, not the same bits)
    monkeypatch.setenv("ONNX_TRAINER_COMPILED", "0")
    x = normal(3, 8)
    _bf16_matches_float32(LayerNormalization, [x, normal(8), normal(8)])
    _bf16_matches_float32(RMSNormalization, [x, normal(8)], axis=0)
    _bf16_matches_float32(GroupNormalization_21, [normal(2, 4, 3), normal(4), normal(4)],
                          num_groups=2)
    q, k, v = (a for _, a in qkv(1, 4, 2, 3, 5, 8))
    _bf16_matches_float32(Attention_23, [q, k, v, normal(3, 5)], is_causal=1, n_outputs=4,
                          qk_matmul_output_mode=2)
    _bf16_matches_float32(RotaryEmbedding, [normal(1, 2, 3, 8), normal(10, 4), normal(10, 4),
                                            POS[:1]])
    la = [a for _, a in la_inputs(1, 3, 2, 1, 4, 4, decay=4, beta=1, state=True)]
    _bf16_matches_float32(LinearAttention, la, q_num_heads=2, kv_num_heads=1)


def test_layer_norm_statistics_dtype_follows_stash_type() -> None:
    x = normal(2, 6, dtype=F16)
    y, mean, inv = LayerNormalization(np, x, normal(6, dtype=F16))
    assert (y.dtype, mean.dtype, inv.dtype) == (F16, F32, F32)
    y, mean, inv = LayerNormalization(np, x.astype(F64), normal(6, dtype=F64), stash_type=11)
    assert (y.dtype, mean.dtype, inv.dtype) == (F64, F64, F64)
    want = x.astype(F64).mean(-1, keepdims=True)
    np.testing.assert_allclose(mean, want, rtol=1e-12)


def test_linear_attention_state_carries_across_calls() -> None:
    # a prefill of T tokens equals a prefill of the first part continued from present_state
    ins = [a for _, a in la_inputs(2, 6, 4, 2, 4, 3, decay=2, beta=2)]
    q, k, v, _, g, beta = ins
    attrs = {"q_num_heads": 4, "kv_num_heads": 2}
    y, s = LinearAttention(np, q, k, v, None, g, beta, **attrs)
    y1, s1 = LinearAttention(np, q[:, :4], k[:, :4], v[:, :4], None, g[:, :4], beta[:, :4],
                             **attrs)
    y2, s2 = LinearAttention(np, q[:, 4:], k[:, 4:], v[:, 4:], s1, g[:, 4:], beta[:, 4:],
                             **attrs)
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s2, s, rtol=1e-5, atol=1e-6)


# -- properties over shapes -------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), group=st.integers(1, 3),
       sq=st.integers(1, 5), sk=st.integers(1, 6), d=st.sampled_from([1, 4, 8]),
       dv=st.sampled_from([2, 4]), causal=st.booleans(), three_d=st.booleans(),
       mask=st.sampled_from(["none", "bool-2d", "float-4d", "bool-heads"]))
def test_attention_shapes_match_onnxruntime(b, hkv, group, sq, sk, d, dv, causal, three_d,
                                            mask) -> None:
    hq = hkv * group
    ins = qkv(b, hq, hkv, sq, sk, d, dv, three_d=three_d)
    if mask == "bool-2d":
        ins.append(("m", coin(sq, sk)))
    elif mask == "float-4d":
        ins.append(("m", normal(b, 1, sq, sk)))
    elif mask == "bool-heads":
        ins.append(("m", coin(hq, sq, sk)))
    attrs = {"is_causal": int(causal)}
    if three_d:
        attrs.update(q_num_heads=hq, kv_num_heads=hkv)
    model = node_model(AT, ins, 1, opset=23, **attrs)
    feeds = {n: a for n, a in ins}
    assert_close(run(model, feeds)["y0"], run_ort(model, feeds)["y0"], 1e-5, 1e-5)


@settings(max_examples=12, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_layer_and_rms_norm_axes_match_onnxruntime(shape, data) -> None:
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    first = axis % len(shape)
    trail = data.draw(st.integers(first, len(shape)))  # scale broadcasts from the right
    x, s = normal(*shape), normal(*shape[trail:])
    for op, opset, n in ((LN, 17, 3), (RMS, 23, 1)):
        model = node_model(op, [("x", x), ("s", s)], n, opset=opset, axis=axis)
        ours, want = run(model, {"x": x, "s": s}), run_ort(model, {"x": x, "s": s})
        for name in want:
            assert_close(ours[name], want[name], 1e-5, 1e-5, f"{op} {shape} axis={axis}")


@pytest.mark.parametrize("op", ["LayerNormalization", "RMSNormalization"])
def test_stash_type_0_computes_as_the_default_and_other_types_are_refused(op):
    """stash_type 0 (UNDEFINED; onnxruntime runs such a LayerNormalization) failed with a bare
    KeyError: it is the default, float; an integer stash type gets a clear error."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    fn = get_kernel(op, 23)
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    s = np.ones(6, np.float32)
    for got, want in zip(fn(np, x, s, stash_type=0), fn(np, x, s, stash_type=1), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ModelError, match="stash_type 7 is not a float type"):
        fn(np, x, s, stash_type=7)
