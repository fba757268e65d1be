"""Gradient rules of normalization, attention and recurrent ops against float64 central finite
differences (the executor), and their training graphs in onnxruntime: in float64 where it has
the kernels, otherwise in float32 (check_float32), which every case runs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from tests.gradcheck import (
    ATOL,
    RTOL,
    Case,
    CaseTable,
    finite_differences,
    gradients,
    loss_model,
    normal,
)
from tests.opcases import run_ort, to_float32
from trainer.autodiff import training_info

_rng = np.random.default_rng(777)
table = CaseTable()
add = table.add
CASES = table.cases

# Ops and cases onnxruntime cannot run in float64 (no kernel, or float64 outside the op's
# types): their training graphs run in onnxruntime only in float32.
NO_ORT64 = {"GroupNormalization", "InstanceNormalization", "MeanVarianceNormalization",
            "RotaryEmbedding", "LinearAttention", "RNN", "GRU", "LSTM", "Attention"}
# Cases onnxruntime cannot run at all (a kernel variant it lacks): executor-only, where the
# float32 graph is checked against the float64 gradients.
NO_ORT: set[str] = set()


def uniform(low: float, high: float, *shape: int) -> np.ndarray:
    return np.asarray(_rng.uniform(low, high, shape))


# -- normalization ----------------------------------------------------------------------------
LN = "LayerNormalization"
add(LN, "axis-1-S-B", [("X", normal(2, 3, 4)), ("S", normal(4)), ("B", normal(4))])
add(LN, "axis1-S[3,4]-B[4]", [("X", normal(2, 3, 4)), ("S", normal(3, 4)), ("B", normal(4))],
    axis=1, epsilon=1e-3)
add(LN, "axis0-noB", [("X", normal(2, 3, 2)), ("S", normal(2, 3, 2))], axis=0)
add(LN, "only-X", [("X", normal(3, 5)), ("S", normal(5)), ("B", normal(5))], wrt=["X"])
add(LN, "opset17", [("X", normal(2, 5)), ("S", normal(5)), ("B", normal(5))], opset=17)
# Mean and InvStdDev feed the loss too: computed in float64 (stash_type 11), or reused from
# the node's outputs in float32 (stash_type 1, float32 check).
add(LN, "mean-invstd-outputs", [("X", normal(2, 3, 4)), ("S", normal(3, 4)), ("B", normal(4))],
    n_out=3, axis=-2, stash_type=11)
add(LN, "only-stats", [("X", normal(3, 4)), ("S", normal(4))], n_out=3, use=(1, 2),
    stash_type=11)
add(LN, "only-invstd", [("X", normal(3, 4)), ("S", normal(4))], n_out=3, use=(0, 2),
    stash_type=11)
add(LN, "only-mean", [("X", normal(3, 4)), ("S", normal(4))], n_out=3, use=(1,),
    stash_type=11)
add(LN, "unused-stats-f32", [("X", normal(2, 6)), ("S", normal(6)), ("B", normal(6))],
    n_out=3, use=(0,))

RMS = "RMSNormalization"
add(RMS, "axis-1", [("X", normal(3, 5)), ("S", normal(5))], opset=23)
add(RMS, "axis1-S[3,4]", [("X", normal(2, 3, 4)), ("S", normal(3, 4))], opset=23, axis=1,
    epsilon=1e-2)
add(RMS, "S-broadcast[1]", [("X", normal(2, 4)), ("S", normal(1))], opset=23)

GN = "GroupNormalization"
add(GN, "groups2", [("X", normal(2, 4, 3)), ("S", normal(4)), ("B", normal(4))], opset=21,
    num_groups=2)
add(GN, "groups1-2d", [("X", normal(2, 3, 2, 2)), ("S", normal(3)), ("B", normal(3))],
    opset=21, num_groups=1, epsilon=1e-3)
add(GN, "groups-per-channel", [("X", normal(2, 3, 4)), ("S", normal(3)), ("B", normal(3))],
    opset=21, num_groups=3)

add("InstanceNormalization", "2d", [("X", normal(2, 3, 2, 3)), ("S", normal(3)),
                                    ("B", normal(3))], epsilon=1e-3)
add("InstanceNormalization", "1d-opset11", [("X", normal(2, 2, 5)), ("S", normal(2)),
                                            ("B", normal(2))], opset=11)

MVN = "MeanVarianceNormalization"
add(MVN, "default-axes", [("X", normal(2, 3, 2, 2))])
add(MVN, "axes-1", [("X", normal(3, 4))], axes=[-1])
add(MVN, "axes02-opset11", [("X", normal(2, 3, 4))], axes=[0, 2], opset=11)

LP = "LpNormalization"
add(LP, "p2-axis-1", [("X", normal(3, 4))])
add(LP, "p2-axis0", [("X", normal(3, 4))], axis=0)
add(LP, "p1", [("X", normal(2, 5))], p=1, axis=1)
add(LP, "p1-axis0-opset11", [("X", normal(4, 3))], p=1, axis=0, opset=11)
add(LP, "p1-opset8", [("X", normal(2, 5))], p=1, axis=1, opset=8)  # (no Sign before opset 9)


# -- attention --------------------------------------------------------------------------------
ATT = "Attention"


def qkv(b=2, hq=2, hkv=2, sq=3, sk=4, d=4, dv=3, three_d=False):
    if three_d:
        return [("Q", normal(b, sq, hq * d)), ("K", normal(b, sk, hkv * d)),
                ("V", normal(b, sk, hkv * dv))]
    return [("Q", normal(b, hq, sq, d)), ("K", normal(b, hkv, sk, d)),
            ("V", normal(b, hkv, sk, dv))]


add(ATT, "4d", qkv(), opset=23)
add(ATT, "4d-gqa-scale", qkv(hq=4, hkv=2), opset=23, scale=0.3)
add(ATT, "3d-gqa", qkv(hq=4, hkv=2, three_d=True), opset=23, q_num_heads=4, kv_num_heads=2)
add(ATT, "4d-causal", qkv(sq=4, sk=4), opset=23, is_causal=1)
add(ATT, "4d-causal-sq<sk", qkv(sq=2, sk=4), opset=23, is_causal=1)
add(ATT, "mask[Sq,Sk]", qkv(hq=4, hkv=1) + [("M", normal(3, 4))], opset=23)
add(ATT, "mask[B,1,Sq,Sk]-3d", qkv(three_d=True) + [("M", normal(2, 1, 3, 4))], opset=23,
    q_num_heads=2, kv_num_heads=2)
add(ATT, "mask[B,H,Sq,Sk]-causal", qkv() + [("M", normal(2, 2, 3, 4))], opset=23, is_causal=1)
_bool_mask = _rng.random((2, 1, 3, 4)) > 0.4
_bool_mask[0, 0, 1] = False  # a row with no allowed key: zero output, zero gradient
add(ATT, "bool-mask-empty-row", qkv() + [("M", _bool_mask)], opset=23)
add(ATT, "short-mask", qkv() + [("M", normal(3, 2))], opset=23)
NO_ORT.add("Attention-short-mask")  # onnxruntime wants the mask to cover every key
_past = [("pk", normal(2, 2, 2, 4)), ("pv", normal(2, 2, 2, 3))]
add(ATT, "past-present", qkv() + [("M", None)] + _past, opset=23, n_out=3, is_causal=1)
add(ATT, "past-3d-gqa-present-only", qkv(hq=4, three_d=True) + [("M", None)] + _past,
    opset=23, n_out=3, use=(1, 2), q_num_heads=4, kv_num_heads=2)
add(ATT, "past-mask-no-present", qkv(sq=2) + [("M", normal(2, 6))] + _past, opset=23)
NO_ORT.add("Attention-past-mask-no-present")  # onnxruntime wants present_key with past_key
for mode in (0, 1, 2, 3):
    add(ATT, f"qk-mode{mode}", qkv() + [("M", normal(3, 4))], opset=23, n_out=4,
        qk_matmul_output_mode=mode)
    add(ATT, f"softcap-qk-mode{mode}", qkv(hq=4, hkv=2), opset=23, n_out=4,
        qk_matmul_output_mode=mode, softcap=1.5, scale=0.8)
add(ATT, "softcap-causal", qkv(), opset=23, softcap=2.0, is_causal=1)
add(ATT, "qk-mode3-only", qkv(), opset=23, n_out=4, use=(3,), qk_matmul_output_mode=3)
add(ATT, "opset24-nonpad", qkv(sk=5) + [("M", None), ("pk", None), ("pv", None),
                                         ("nonpad", np.array([5, 2], np.int64))],
    opset=24, is_causal=1)
add(ATT, "opset25-window", qkv(sq=4, sk=6), opset=25, is_causal=1, left_window_size=2)
add(ATT, "opset25-window-both", qkv(sq=4, sk=5) + [("M", normal(4, 5))], opset=25,
    left_window_size=1, right_window_size=1)

ROT = "RotaryEmbedding"
add(ROT, "4d", [("X", normal(2, 2, 3, 4)), ("cos", normal(2, 3, 2)), ("sin", normal(2, 3, 2))],
    opset=23)
add(ROT, "4d-position-ids", [("X", normal(2, 2, 3, 4)), ("cos", normal(5, 2)),
                             ("sin", normal(5, 2)),
                             ("pos", np.array([[0, 1, 1], [4, 2, 1]], np.int64))], opset=23)
add(ROT, "3d-interleaved", [("X", normal(2, 3, 8)), ("cos", normal(2, 3, 2)),
                            ("sin", normal(2, 3, 2))], opset=23, num_heads=2, interleaved=1)
for inter in (0, 1):
    add(ROT, f"partial-rotary-interleaved{inter}",
        [("X", normal(1, 3, 2 * 6)), ("cos", normal(4, 2)), ("sin", normal(4, 2)),
         ("pos", np.array([[3, 0, 2]], np.int64))], opset=23, num_heads=2,
        rotary_embedding_dim=4, interleaved=inter)
add(ROT, "only-X", [("X", normal(1, 2, 3, 4)), ("cos", normal(1, 3, 2)),
                    ("sin", normal(1, 3, 2))], opset=23, wrt=["X"])


LIN = "LinearAttention"


def lin_inputs(hq=2, hkv=2, dk=2, dv=3, t=3, past=False, decay=None, beta=None):
    b = 2
    ins = [("Q", normal(b, t, hq * dk)), ("K", normal(b, t, hkv * dk) * 0.5),
           ("V", normal(b, t, hkv * dv)), ("S0", normal(b, hkv, dk, dv) if past else None)]
    ins.append(("decay", None if decay is None else uniform(-0.6, 0.0, b, t, hkv * decay)))
    if beta is not None:
        ins.append(("beta", uniform(0.2, 0.9, b, t, beta)))
    return ins


add(LIN, "linear", lin_inputs(), n_out=2, opset=27, q_num_heads=2, kv_num_heads=2,
    update_rule="linear")
add(LIN, "linear-gqa-past-scale-y-only", lin_inputs(hq=4, past=True), n_out=2, use=(0,),
    opset=27, q_num_heads=4, kv_num_heads=2, update_rule="linear", scale=0.3)
add(LIN, "gated-per-dim-decay", lin_inputs(past=True, decay=2), n_out=2, opset=27,
    q_num_heads=2, kv_num_heads=2, update_rule="gated")
add(LIN, "gated-head-decay-state-only", lin_inputs(hq=4, decay=1), n_out=2, use=(1,),
    opset=27, q_num_heads=4, kv_num_heads=2, update_rule="gated")
add(LIN, "delta", lin_inputs(beta=2), n_out=2, opset=27, q_num_heads=2, kv_num_heads=2,
    update_rule="delta")
add(LIN, "gated-delta-shared-beta", lin_inputs(hq=4, past=True, decay=1, beta=1), n_out=2,
    opset=27, q_num_heads=4, kv_num_heads=2)
add(LIN, "gated-delta-one-step", lin_inputs(t=1, past=True, decay=2, beta=2), n_out=2,
    opset=27, q_num_heads=2, kv_num_heads=2)


# -- recurrent networks -----------------------------------------------------------------------
# Cases whose node has no Y output: the rule recomputes the recurrence step by step.
NO_Y: set[str] = set()
T, B, I, H = 3, 2, 3, 2


def rec_inputs(op: str, d: int = 1, *, bias=True, h0=True, c0=True, lens=None, peep=False,
               layout=0):
    g = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    x = normal(B, T, I) if layout else normal(T, B, I)
    ins = [("X", x), ("W", normal(d, g * H, I)), ("R", normal(d, g * H, H)),
           ("Bias", normal(d, 2 * g * H) if bias else None),
           ("lens", None if lens is None else np.array(lens, np.int32)),
           ("h0", (normal(B, d, H) if layout else normal(d, B, H)) if h0 else None)]
    if op == "LSTM":
        ins += [("c0", (normal(B, d, H) if layout else normal(d, B, H)) if c0 else None),
                ("P", normal(d, 3 * H) if peep else None)]
    return ins


def add_rec(op, id, *, no_y=False, n_out=None, use=None, opset=18, ins=None, **attrs):
    n_out = n_out or (3 if op == "LSTM" else 2)
    if no_y and use is None:
        use = tuple(range(1, n_out))
    add(op, id, ins or rec_inputs(op), n_out=n_out, use=use, opset=opset, hidden_size=H,
        **attrs)
    if no_y:
        NO_Y.add(f"{op}-{id}")
    if attrs.get("layout"):
        NO_ORT.add(f"{op}-{id}")  # onnxruntime has no batch-first recurrences


add_rec("RNN", "forward")
add_rec("RNN", "reverse-no-bias-no-h0", ins=rec_inputs("RNN", bias=False, h0=False),
        direction="reverse")
add_rec("RNN", "bidirectional-tanh-sigmoid", ins=rec_inputs("RNN", 2),
        direction="bidirectional", activations=["Tanh", "Sigmoid"])
add_rec("RNN", "clip", clip=0.8)
add_rec("RNN", "layout1", ins=rec_inputs("RNN", layout=1), layout=1)
add_rec("RNN", "lens-bidirectional", ins=rec_inputs("RNN", 2, lens=[3, 1]),
        direction="bidirectional")
add_rec("RNN", "lens-with-empty", ins=rec_inputs("RNN", lens=[2, 0]), direction="reverse")
add_rec("RNN", "no-Y", no_y=True)
add_rec("RNN", "no-Y-lens-reverse-clip", ins=rec_inputs("RNN", lens=[1, 3]), no_y=True,
        direction="reverse", clip=1.0)
add_rec("RNN", "only-Y", use=(0,))
add_rec("RNN", "opset10", opset=10, clip=1.5)
add_rec("RNN", "opset11-bidirectional", ins=rec_inputs("RNN", 2), opset=11,
        direction="bidirectional")
for act, alpha, beta in (("Relu", None, None), ("LeakyRelu", 0.3, None),
                         ("ThresholdedRelu", 0.1, None), ("Affine", 0.7, 0.2),
                         ("ScaledTanh", 0.8, 1.3), ("HardSigmoid", 0.3, 0.4),
                         ("Elu", 0.6, None), ("Softsign", None, None),
                         ("Softplus", None, None)):
    kw = {"activations": [act]}
    if alpha is not None:
        kw["activation_alpha"] = [alpha]
    if beta is not None:
        kw["activation_beta"] = [beta]
    add_rec("RNN", f"act-{act}", **kw)
    add_rec("RNN", f"act-{act}-no-Y", no_y=True, **kw)

add_rec("GRU", "forward")
add_rec("GRU", "linear-before-reset", linear_before_reset=1)
add_rec("GRU", "no-bias-no-h0", ins=rec_inputs("GRU", bias=False, h0=False))
add_rec("GRU", "lbr-no-bias", ins=rec_inputs("GRU", bias=False), linear_before_reset=1)
add_rec("GRU", "bidirectional-lens-lbr", ins=rec_inputs("GRU", 2, lens=[2, 3]),
        direction="bidirectional", linear_before_reset=1)
add_rec("GRU", "reverse-lens", ins=rec_inputs("GRU", lens=[3, 1]), direction="reverse")
add_rec("GRU", "no-Y", no_y=True)
add_rec("GRU", "no-Y-lbr-lens", ins=rec_inputs("GRU", lens=[1, 3]), no_y=True,
        linear_before_reset=1)
add_rec("GRU", "layout1", ins=rec_inputs("GRU", layout=1), layout=1)
add_rec("GRU", "clip-activations", clip=0.9, activations=["HardSigmoid", "Softsign"],
        activation_alpha=[0.3], activation_beta=[0.45])
add_rec("GRU", "only-Y", use=(0,))
add_rec("GRU", "opset11", opset=11)

add_rec("LSTM", "forward")
add_rec("LSTM", "peephole", ins=rec_inputs("LSTM", peep=True))
add_rec("LSTM", "input-forget-peephole", ins=rec_inputs("LSTM", peep=True), input_forget=1)
add_rec("LSTM", "bidirectional-lens-peephole",
        ins=rec_inputs("LSTM", 2, lens=[3, 2], peep=True), direction="bidirectional")
add_rec("LSTM", "reverse-lens-empty", ins=rec_inputs("LSTM", lens=[0, 2]), direction="reverse")
add_rec("LSTM", "no-Y", no_y=True)
add_rec("LSTM", "no-Y-peephole-lens", ins=rec_inputs("LSTM", lens=[3, 1], peep=True),
        no_y=True)
add_rec("LSTM", "no-Y-input-forget", no_y=True, input_forget=1)
add_rec("LSTM", "only-Yc", use=(2,))
add_rec("LSTM", "only-Yh-no-states", ins=rec_inputs("LSTM", h0=False, c0=False, bias=False),
        use=(1,))
add_rec("LSTM", "layout1", ins=rec_inputs("LSTM", layout=1, peep=True), layout=1)
add_rec("LSTM", "clip-activations", clip=0.7,
        activations=["Sigmoid", "Softsign", "ScaledTanh"], activation_alpha=[1.1],
        activation_beta=[0.9])
add_rec("LSTM", "opset11", opset=11)
# The cell output activation is not clipped: a threshold above the clip must still be reached.
add_rec("LSTM", "clip-thresholded-cell-output", no_y=True, clip=0.5,
        activations=["Sigmoid", "Tanh", "ThresholdedRelu"], activation_alpha=[0.6])
add_rec("GRU", "clip-leakyrelu-bidirectional", ins=rec_inputs("GRU", 2), clip=1.2,
        direction="bidirectional", activations=["Sigmoid", "LeakyRelu", "Sigmoid", "Tanh"],
        activation_alpha=[0.2])


# -- checks -----------------------------------------------------------------------------------
def case_model(c: Case, float32: bool = False) -> onnx.ModelProto:
    model = loss_model(c)
    if c.id in NO_Y:
        next(n for n in model.graph.node if n.op_type == c.op).output[0] = ""
    return to_float32(model) if float32 else model


def check64(c: Case) -> None:
    """Float64 gradients against finite differences, and onnxruntime on the same graph where
    it runs float64 (gradcheck.check_case without its float32 fallback)."""
    model = case_model(c)
    wrt = c.params()
    grads, tm = gradients(model, wrt, **c.build)
    values = {n: a for n, a in [*c.inputs, *c.extra.items()] if n in wrt}
    fd = finite_differences(model, values)
    for p in wrt:
        assert grads[p].shape == values[p].shape, (p, grads[p].shape, values[p].shape)
        assert grads[p].dtype == np.float64, (p, grads[p].dtype)
        np.testing.assert_allclose(grads[p], fd[p], rtol=RTOL, atol=ATOL, err_msg=f"d/d{p}")
    if c.op in NO_ORT64 or c.id in NO_ORT or c.attrs.get("stash_type") == 11:
        return  # (onnxruntime has no float64-statistics LayerNormalization)
    res = run_ort(tm)
    for p, name in training_info(tm).gradients.items():
        np.testing.assert_allclose(res[name], grads[p], rtol=1e-6, atol=1e-6,
                                   err_msg=f"onnxruntime d/d{p}")


def check32(c: Case) -> None:
    """The float32 training graph (as trained) in onnxruntime against the executor, as
    gradcheck.check_float32; a float64 statistic (stash_type 11) becomes float32. Cases
    onnxruntime cannot run compare the float32 gradients with the float64 ones."""
    if c.attrs.get("stash_type") == 11:
        c = dataclasses.replace(c, attrs={**c.attrs, "stash_type": 1})
    wrt = c.params()
    grads, tm = gradients(case_model(c, float32=True), wrt, **c.build)
    if c.id in NO_ORT:
        want, _ = gradients(case_model(c), wrt, **c.build)
        for p in wrt:
            assert grads[p].dtype == np.float32
            np.testing.assert_allclose(grads[p], want[p], rtol=1e-3, atol=1e-4, err_msg=p)
        return
    res = run_ort(tm)
    for p, name in training_info(tm).gradients.items():
        assert grads[p].dtype == np.float32, (p, grads[p].dtype)
        np.testing.assert_allclose(res[name], grads[p], rtol=1e-4, atol=1e-4, err_msg=p)


@pytest.mark.parametrize("c", CASES, ids=str)
def test_rule_matches_finite_differences(c: Case) -> None:
    check64(c)


@pytest.mark.parametrize("c", CASES, ids=str)
def test_rule_float32_training_graph(c: Case) -> None:
    check32(c)


def test_group_norm_opset18_per_group_scale(monkeypatch) -> None:
    # GroupNormalization-18 (scale and bias per group) is deprecated: onnx.checker rejects
    # models using it, so this checks the rule with the checker switched off.
    monkeypatch.setattr(onnx.checker, "check_model", lambda *a, **k: None)
    monkeypatch.setattr("trainer.autodiff.build.check_model", lambda *a, **k: None)
    c = Case("GN-18", GN, [("X", normal(2, 4, 3)), ("S", normal(2)), ("B", normal(2))],
             {"num_groups": 2}, opset=18)
    model = loss_model(c)
    grads, _ = gradients(model, ["X", "S", "B"])
    fd = finite_differences(model, {n: a for n, a in c.inputs})
    for p in ("X", "S", "B"):
        np.testing.assert_allclose(grads[p], fd[p], rtol=RTOL, atol=ATOL, err_msg=p)



@pytest.mark.parametrize("stash", [1, 11])
def test_layer_norm_float16_gradient_through_inv_std_dev_is_taken_in_the_stash_type(stash):
    """A float16 LayerNormalization's gradient through its InvStdDev output (float32 or float64,
    the stash type) was taken in float16, where dInvStdDev * inv^2 of a row of small variance
    overflows: inf and NaN for a gradient of about 1e4. Now in the stash type, dX rounded once:
    torch's float32 autograd on the float16 input."""
    import torch
    from onnx import TensorProto, helper

    from trainer.autodiff import reverse
    from trainer.executor import Executor

    stats = TensorProto.FLOAT if stash == 1 else TensorProto.DOUBLE
    x = np.array([[0.5012, 0.4986, 0.5021, 0.4993], [0.1, -0.3, 0.7, 0.2]], np.float16)
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"],
                            stash_type=stash, epsilon=1e-5)
    g = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4]),
         helper.make_tensor_value_info("inv", stats, [2, 1])],
        [helper.make_tensor("s", TensorProto.FLOAT16, [4], np.ones(4, np.float16)),
         helper.make_tensor("b", TensorProto.FLOAT16, [4], np.zeros(4, np.float16))])
    model = reverse(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                    ["x"], ["y", "inv"], shapes={"x": (2, 4)})
    u = np.array([[1.0], [-0.5]])
    got = Executor(model, np).run({"x": x, "y_grad": np.zeros((2, 4), np.float16),
                                   "inv_grad": u.astype(np.float32 if stash == 1 else
                                                        np.float64)})["x_grad"]
    tx = torch.tensor(x.astype(np.float32), requires_grad=True)
    inv = 1 / torch.sqrt(tx.var(-1, unbiased=False, keepdim=True) + 1e-5)
    inv.backward(torch.tensor(u, dtype=torch.float32))
    assert got.dtype == np.float16 and np.isfinite(got).all()
    np.testing.assert_allclose(got.astype(np.float32), tx.grad.numpy(), rtol=3e-3, atol=1e-3)


def test_layer_norm_float16_gradients_are_taken_in_float32():
    """A float16 LayerNormalization's gradients were taken in float16: for a row whose variance
    is near float16's spacing (x = 0.5 +- 1e-3) xhat lost its digits, dScale 10-40% and dX
    1.5% off (found by a regression sweep). In float32 now, each rounded once: float16's own
    precision against float64 autograd."""
    import torch
    from onnx import TensorProto, helper

    from trainer.autodiff import reverse
    from trainer.executor import Executor

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 8)) * 1e-3 + 0.5).astype(np.float16)
    s = (rng.standard_normal(8) * 0.5 + 1).astype(np.float16)
    b = rng.standard_normal(8).astype(np.float16)
    u = rng.standard_normal((4, 8)).astype(np.float16)
    vi = [helper.make_tensor_value_info(k, TensorProto.FLOAT16, shape)
          for k, shape in (("x", [4, 8]), ("s", [8]), ("b", [8]))]
    g = helper.make_graph([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"],
                                            epsilon=1e-5)], "g", vi,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 8])])
    model = reverse(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                    ["x", "s", "b"], ["y"], shapes={"x": (4, 8), "s": (8,), "b": (8,)})
    got = Executor(model, np).run({"x": x, "s": s, "b": b, "y_grad": u})
    t = {k: torch.tensor(v.astype(np.float64), requires_grad=True)
         for k, v in (("x", x), ("s", s), ("b", b))}
    y = torch.nn.functional.layer_norm(t["x"], (8,), t["s"], t["b"], eps=1e-5)
    y.backward(torch.tensor(u.astype(np.float64)))
    for k in ("x", "s", "b"):
        ref = t[k].grad.numpy()
        assert got[f"{k}_grad"].dtype == np.float16
        err = np.abs(got[f"{k}_grad"].astype(np.float64) - ref).max() / np.abs(ref).max()
        assert err < 2e-3, (k, err)
