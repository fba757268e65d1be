"""Every registered gradient rule against float64 central finite differences: one op per case,
its outputs y feeding L = sum(y * R) with R fixed random; training graphs also run in onnxruntime.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from tests.gradcheck import (
    ATOL,
    EPS,
    FROM_PRE,
    RTOL,
    Case,
    CaseTable,
    check_case,
    finite_differences,
    gradients,
    ints,
    loss_model,
    nonzero,
    normal,
    positive,
    rule_tests,
)
from tests.opcases import away_from_zero, distinct, make_model, run
from trainer.autodiff import build_training_graph, training_info
from trainer.autodiff.registry import RULES
from trainer.errors import ModelError
from trainer.executor import Executor

_rng = np.random.default_rng(4321)

# -- the case table ---------------------------------------------------------------------------
_table = CaseTable()
add = _table.add
CASES = _table.cases


BROADCAST = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((3, 4), ()), ((), (2, 3)),
             ((1, 4), (3, 1)), ((4,), (2, 3, 4))]
for sa, sb in BROADCAST:
    sid = f"{list(sa)}&{list(sb)}"
    for op in ("Add", "Sub", "Mul"):
        add(op, sid, [("A", normal(*sa)), ("B", normal(*sb))])
    add("Div", sid, [("A", normal(*sa)), ("B", nonzero(*sb))])
    add("Pow", sid, [("A", positive(*sa)), ("B", normal(*sb))])
add("Pow", "int-exponent", [("A", nonzero(3, 2)), ("B", ints(2, 3))])
add("Pow", "only-base", [("A", positive(3, 4)), ("B", normal(4))], wrt=["A"])
add("Div", "only-denominator", [("A", normal(3, 4)), ("B", nonzero(3, 1))], wrt=["B"])
add("Sub", "only-second", [("A", normal(3, 4)), ("B", normal(1, 4))], wrt=["B"])

_cond = _rng.random((3, 4)) > 0.5
add("Where", "[3,4]&[4]&[3,1]", [("C", _cond), ("A", normal(4)), ("B", normal(3, 1))])
add("Where", "cond-broadcast", [("C", _rng.random(4) > 0.5), ("A", normal(2, 3, 4)),
                                ("B", normal())])
add("Where", "only-else", [("C", _cond), ("A", normal(3, 4)), ("B", normal(2, 3, 4))],
    wrt=["B"])
add("Sum", "three-broadcast", [("A", normal(3, 4)), ("B", normal(4)), ("C", normal(1))])
add("Sum", "[2,1,4]&[3,1]", [("A", normal(2, 1, 4)), ("B", normal(3, 1))])
add("Sum", "single", [("A", normal(2, 3))])
add("Sum", "scalar&matrix", [("A", normal()), ("B", normal(2, 3))])

M, K, N = 3, 4, 5
for ta, tb in itertools.product((0, 1), repeat=2):
    a = normal(K, M) if ta else normal(M, K)
    b = normal(N, K) if tb else normal(K, N)
    tid = f"tA{ta}tB{tb}"
    add("Gemm", f"{tid}-noC", [("A", a), ("B", b)], transA=ta, transB=tb)
    add("Gemm", f"{tid}-C[N]-alpha-beta", [("A", a), ("B", b), ("C", normal(N))], transA=ta,
        transB=tb, alpha=0.7, beta=1.3)
    add("Gemm", f"{tid}-C[1]", [("A", a), ("B", b), ("C", normal(1))], transA=ta, transB=tb,
        beta=0.5)
    add("Gemm", f"{tid}-C[M,N]", [("A", a), ("B", b), ("C", normal(M, N))], transA=ta,
        transB=tb, alpha=-1.5)
add("Gemm", "C[M,1]", [("A", normal(M, K)), ("B", normal(K, N)), ("C", normal(M, 1))])
add("Gemm", "only-C", [("A", normal(M, K)), ("B", normal(K, N)), ("C", normal(N))], wrt=["C"],
    beta=2.0)

for sa, sb in [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (3, 4, 5)),
               ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (2, 4, 5)), ((2, 3, 4), (4,)),
               ((4,), (4,)), ((3, 4), (2, 4, 5)), ((2, 3, 4), (4, 5))]:
    add("MatMul", f"{list(sa)}@{list(sb)}", [("A", normal(*sa)), ("B", normal(*sb))])

add("Conv", "2d-bias", [("X", normal(2, 3, 5, 5)), ("W", normal(4, 3, 3, 3)), ("B", normal(4))])
add("Conv", "stride2-pad1", [("X", normal(1, 2, 7, 6)), ("W", normal(3, 2, 3, 3))],
    strides=[2, 2], pads=[1, 1, 1, 1])
add("Conv", "stride2-uncovered", [("X", normal(1, 2, 6, 6)), ("W", normal(2, 2, 3, 3))],
    strides=[2, 2])
add("Conv", "dilation2-asym-pads", [("X", normal(1, 2, 7, 7)), ("W", normal(2, 2, 3, 3))],
    dilations=[2, 2], pads=[2, 1, 0, 1])
add("Conv", "group2-bias", [("X", normal(2, 4, 5, 5)), ("W", normal(6, 2, 3, 3)),
                            ("B", normal(6))], group=2, strides=[1, 2], pads=[1, 1, 1, 1])
add("Conv", "depthwise", [("X", normal(1, 3, 5, 5)), ("W", normal(3, 1, 3, 3))], group=3)
add("Conv", "1d", [("X", normal(2, 3, 9)), ("W", normal(4, 3, 3)), ("B", normal(4))],
    strides=[2], pads=[1, 0], dilations=[2])
add("Conv", "same-upper", [("X", normal(1, 2, 6, 5)), ("W", normal(3, 2, 3, 2))],
    strides=[2, 2], auto_pad="SAME_UPPER")
add("Conv", "same-lower", [("X", normal(1, 2, 5, 5)), ("W", normal(2, 2, 2, 3))],
    strides=[2, 1], auto_pad="SAME_LOWER")
add("Conv", "stride-exceeds-kernel", [("X", normal(1, 1, 7, 7)), ("W", normal(2, 1, 2, 2))],
    strides=[3, 3])
add("Conv", "3d", [("X", normal(1, 2, 4, 4, 3)), ("W", normal(2, 2, 2, 2, 2)),
                   ("B", normal(2))], strides=[2, 1, 2], pads=[1, 0, 0, 0, 1, 1])
add("Conv", "stride2-dilation2-pad", [("X", normal(1, 2, 8, 9)), ("W", normal(3, 2, 3, 2)),
                                     ("B", normal(3))], strides=[2, 2], dilations=[2, 2],
    pads=[1, 0, 1, 1])
add("Conv", "only-W", [("X", normal(2, 2, 5, 5)), ("W", normal(2, 2, 3, 3))], wrt=["W"],
    strides=[2, 2])


def pool_input(*shape: int) -> np.ndarray:
    return distinct(_rng, shape, spread=2.0)


add("MaxPool", "overlap", [("X", pool_input(1, 2, 5, 5))], kernel_shape=[3, 3], strides=[2, 2])
add("MaxPool", "pad", [("X", pool_input(1, 2, 5, 5))], kernel_shape=[3, 3], strides=[2, 2],
    pads=[1, 1, 1, 1])
add("MaxPool", "ceil", [("X", pool_input(1, 1, 6, 6))], kernel_shape=[3, 3], strides=[2, 2],
    ceil_mode=1)
add("MaxPool", "ceil-pad", [("X", pool_input(2, 1, 5, 6))], kernel_shape=[2, 3],
    strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1)
add("MaxPool", "1d", [("X", pool_input(2, 3, 8))], kernel_shape=[3], strides=[2], pads=[1, 1])
add("MaxPool", "dilation", [("X", pool_input(1, 1, 7, 7))], kernel_shape=[2, 2],
    dilations=[2, 2])
add("MaxPool", "same-upper", [("X", pool_input(1, 2, 5, 4))], kernel_shape=[2, 3],
    strides=[2, 2], auto_pad="SAME_UPPER")
add("MaxPool", "stride-exceeds-kernel", [("X", pool_input(1, 2, 7, 7))], kernel_shape=[2, 2],
    strides=[3, 3])
add("MaxPool", "with-indices", [("X", pool_input(1, 2, 4, 4))], n_out=2, kernel_shape=[2, 2],
    strides=[1, 1])

for inc in (0, 1):
    add("AveragePool", f"pad-stride-cip{inc}", [("X", normal(1, 2, 5, 5))], kernel_shape=[3, 3],
        strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=inc)
    add("AveragePool", f"ceil-pad-cip{inc}", [("X", normal(1, 1, 5, 5))], kernel_shape=[3, 3],
        strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1, count_include_pad=inc)
    add("AveragePool", f"asym-pad-cip{inc}", [("X", normal(2, 1, 4, 5))], kernel_shape=[2, 2],
        pads=[1, 0, 0, 1], count_include_pad=inc)
add("AveragePool", "stride-exceeds-kernel", [("X", normal(1, 2, 7, 7))], kernel_shape=[2, 2],
    strides=[3, 3])
add("AveragePool", "ceil", [("X", normal(1, 1, 6, 6))], kernel_shape=[3, 3], strides=[2, 2],
    ceil_mode=1)
add("AveragePool", "1d", [("X", normal(2, 2, 7))], kernel_shape=[3], strides=[2])
add("AveragePool", "2x2", [("X", normal(2, 3, 4, 4))], kernel_shape=[2, 2])
add("AveragePool", "dilation-opset19", [("X", normal(1, 1, 7, 6))], kernel_shape=[2, 2],
    dilations=[2, 2], strides=[1, 2], opset=19)
add("AveragePool", "same-upper", [("X", normal(1, 2, 5, 5))], kernel_shape=[3, 3],
    strides=[2, 2], auto_pad="SAME_UPPER")
add("GlobalAveragePool", "2d", [("X", normal(2, 3, 4, 5))])
add("GlobalAveragePool", "1d", [("X", normal(2, 3, 4))])
add("GlobalAveragePool", "opset7", [("X", normal(2, 3, 4, 5))], opset=7)

# Inference-form BatchNormalization. Statistics are never trainable parameters, so mean and
# var reach the node through Identity to let the test ask for their gradients.
for shape in ((3, 4, 2, 2), (5, 3)):
    c = shape[1]
    add("BatchNormalization", f"frozen-{list(shape)}",
        [("X", normal(*shape)), ("scale", normal(c)), ("B", normal(c)), ("mean", FROM_PRE),
         ("var", FROM_PRE)], epsilon=1e-3, build={"batchnorm": "frozen"},
        pre=[helper.make_node("Identity", ["mean0"], ["mean"]),
             helper.make_node("Identity", ["var0"], ["var"])],
        extra={"mean0": normal(c), "var0": positive(c)})

for red in ("mean", "sum", "none"):
    add("SoftmaxCrossEntropyLoss", f"{red}-[N]", [("S", normal(4, 5)),
                                                 ("lab", ints(0, 3, 4, 1))],
        n_out=2, reduction=red)
    add("SoftmaxCrossEntropyLoss", f"{red}-[N,d]-ignore", [("S", normal(3, 4, 2)),
                                                          ("lab", ints(0, 1, 3, 1, 2, 0)
                                                           .reshape(3, 2))],
        n_out=2, reduction=red, ignore_index=1)
    add("SoftmaxCrossEntropyLoss", f"{red}-loss-only", [("S", normal(2, 3, 2, 2)),
                                                        ("lab", _rng.integers(0, 3, (2, 2, 2)))],
        n_out=2, use=(0,), reduction=red)
    add("NegativeLogLikelihoodLoss", f"{red}-[N]", [("P", normal(4, 5)),
                                                   ("lab", ints(0, 3, 4, 1))], reduction=red)
    add("NegativeLogLikelihoodLoss", f"{red}-[N,d]-ignore",
        [("P", normal(3, 4, 2)), ("lab", ints(0, -1, 3, 1, -1, 0).reshape(3, 2))],
        reduction=red, ignore_index=-1)
add("SoftmaxCrossEntropyLoss", "log-prob-only", [("S", normal(3, 4)), ("lab", ints(0, 2, 3))],
    n_out=2, use=(1,))
add("SoftmaxCrossEntropyLoss", "ignore-negative", [("S", normal(4, 3)),
                                                  ("lab", ints(0, -100, 2, 1))],
    n_out=2, ignore_index=-100)

for op in ("Softmax", "LogSoftmax"):
    for opset, axes in ((13, (0, 1, -1, None)), (11, (0, 1, -1, None)), (18, (1,))):
        for axis in axes:
            kw = {} if axis is None else {"axis": axis}
            add(op, f"opset{opset}-axis{axis}", [("X", normal(2, 3, 4))], opset=opset, **kw)

for op, opsets in (("ReduceSum", (13, 11)), ("ReduceMean", (18, 13))):
    new, old = opsets
    for axes, keep in (([1], 1), ([0, 2], 0), ([-1], 1), ([-3, -1], 0), (None, 0), (None, 1)):
        x = normal(2, 3, 4)
        ax = "all" if axes is None else "".join(map(str, axes))
        add(op, f"opset{new}-axes{ax}-keep{keep}",
            [("X", x), ("axes", None if axes is None else ints(*axes))], opset=new,
            keepdims=keep)
        add(op, f"opset{old}-axes{ax}-keep{keep}", [("X", x)], opset=old, keepdims=keep,
            **({} if axes is None else {"axes": axes}))
    add(op, f"opset{new}-noop-empty-axes", [("X", normal(2, 3))], opset=new,
        noop_with_empty_axes=1)
    # Before opset 8 there is no Expand: the gradient broadcasts by adding zeros.
    add(op, "opset7-axes1-keep0", [("X", normal(2, 3, 4))], opset=7, axes=[1], keepdims=0)

add("Reshape", "minus-one", [("X", normal(2, 3, 4)), ("shape", ints(4, -1))])
add("Reshape", "zero-copies", [("X", normal(2, 3, 4)), ("shape", ints(0, 12))])
for axis in (0, 1, 2, -1):
    add("Flatten", f"axis{axis}", [("X", normal(2, 3, 4))], axis=axis)
add("Transpose", "default", [("X", normal(2, 3, 4))])
add("Transpose", "perm120", [("X", normal(2, 3, 4))], perm=[1, 2, 0])
add("Squeeze", "opset13-axes", [("X", normal(2, 1, 3, 1)), ("axes", ints(1, -1))], opset=13)
add("Squeeze", "opset13-all", [("X", normal(2, 1, 3, 1))], opset=13)
add("Squeeze", "opset11-attr", [("X", normal(2, 1, 3, 1))], opset=11, axes=[1])
add("Unsqueeze", "opset13", [("X", normal(2, 3)), ("axes", ints(0, -1))], opset=13)
add("Unsqueeze", "opset11-attr", [("X", normal(2, 3))], opset=11, axes=[1])
add("Expand", "[3,1]->[2,3,4]", [("X", normal(3, 1)), ("shape", ints(2, 3, 4))])
add("Expand", "[4]->[3,1]", [("X", normal(4)), ("shape", ints(3, 1))])
add("Expand", "same", [("X", normal(2, 3)), ("shape", ints(2, 3))])
add("Concat", "axis1", [("A", normal(2, 1, 3)), ("B", normal(2, 4, 3)), ("C", normal(2, 2, 3))],
    axis=1)
add("Concat", "axis-1-partial", [("A", normal(2, 3)), ("B", normal(2, 2))], axis=-1, wrt=["B"])
add("Concat", "opset11", [("A", normal(2, 3)), ("B", normal(1, 3))], axis=0, opset=11)
add("Split", "opset18-num-outputs", [("X", normal(2, 6))], n_out=3, axis=1, num_outputs=3)
add("Split", "opset13-split-input", [("X", normal(2, 3, 6)), ("split", ints(2, 4))], n_out=2,
    axis=-1, opset=13)
add("Split", "opset11-attr", [("X", normal(5, 2))], n_out=2, split=[3, 2], opset=11)
add("Split", "unused-output", [("X", normal(6, 2)), ("split", ints(1, 2, 3))], n_out=3,
    use=(0, 2))

for op, maker in (("Relu", nonzero), ("LeakyRelu", nonzero), ("Sigmoid", normal),
                  ("Tanh", normal), ("Exp", normal), ("Log", positive), ("Sqrt", positive),
                  ("Reciprocal", nonzero), ("Abs", nonzero), ("Neg", normal),
                  ("Identity", normal)):
    add(op, "[3,4]", [("X", maker(3, 4))])
add("LeakyRelu", "alpha", [("X", nonzero(2, 5))], alpha=0.2)
add("Sigmoid", "large", [("X", np.array([-30.0, -5.0, 0.0, 5.0, 30.0]))])
add("Cast", "f64-to-f64", [("X", normal(3, 4))], to=onnx.TensorProto.DOUBLE)
# The type template of CastLike is not differentiated even when it is a float tensor.
add("CastLike", "f64-like-f64", [("X", normal(3, 4)), ("T", normal(2))], wrt=["X"])


# One tensor feeding several inputs of a node: the engine sums the per-slot terms.
_sq = normal(3, 3)
add("Mul", "same-input", [("A", _sq), ("A", _sq)])
add("MatMul", "same-input", [("A", _sq), ("A", _sq)])
add("Concat", "same-input", [("A", _sq), ("A", _sq)], axis=0)
add("Where", "same-input", [("C", _cond[:3, :3]), ("A", _sq), ("A", _sq)])

# Older opsets: the rules must emit nodes valid there (Split/Reduce/Unsqueeze forms differ).
_OLD_OPSETS = {
    "Conv-group2-bias": (11, 13), "Conv-1d": (11,), "AveragePool-pad-stride-cip1": (11,),
    "GlobalAveragePool-2d": (11,), "BatchNormalization-frozen-[5, 3]": (13,),
    "Gemm-tA1tB1-C[N]-alpha-beta": (11,), "MatMul-[2, 1, 3, 4]@[3, 4, 5]": (11,),
    "Where-cond-broadcast": (11,), "Expand-[3,1]->[2,3,4]": (11,),
    "SoftmaxCrossEntropyLoss-mean-[N,d]-ignore": (13,), "SoftmaxCrossEntropyLoss-none-[N]": (13,),
    "NegativeLogLikelihoodLoss-sum-[N]": (13,), "Sum-three-broadcast": (11,),
    "Div-[2, 1, 4]&[3, 1]": (11,), "Pow-[3, 4]&[4]": (11,), "Sigmoid-[3,4]": (11,),
    "Relu-[3,4]": (11,), "Transpose-perm120": (11,), "Flatten-axis2": (11,),
    "Reshape-minus-one": (11,), "MaxPool-pad": (16,)}
_by_id = {c.id: c for c in CASES}
assert set(_OLD_OPSETS) <= set(_by_id), set(_OLD_OPSETS) - set(_by_id)
for _id, _opsets in _OLD_OPSETS.items():
    CASES += [dataclasses.replace(_by_id[_id], id=f"{_id}-opset{o}", opset=o) for o in _opsets]


# -- tests ------------------------------------------------------------------------------------
EXTRA_TESTED = {"Dropout"}  # rules tested by dedicated functions below


def test_every_rule_has_cases() -> None:
    # Cases of every tests/test_grad_*.py file (and of test_ml_linear.py, which tests the
    # ai.onnx.ml ops' kernels and rules together) count, plus their EXTRA_TESTED sets.
    import importlib
    import pathlib

    covered: set[str] = set()
    here = pathlib.Path(__file__).parent
    for path in sorted([*here.glob("test_grad_*.py"), here / "test_ml_linear.py"]):
        mod = importlib.import_module(f"tests.{path.stem}")
        covered |= {c.op for c in getattr(mod, "CASES", [])}
        covered |= set(getattr(mod, "EXTRA_TESTED", ()))
    missing = sorted(op for (_, op) in RULES if op not in covered)
    assert not missing, f"gradient rules without a finite-difference test: {missing}"


test_rule_matches_finite_differences, test_rule_float32_training_graph = rule_tests(CASES)


# Binary ops over random broadcast-compatible shapes.
@st.composite
def broadcast_shapes(draw, n: int = 2) -> list[tuple[int, ...]]:
    out = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))

    def operand() -> tuple[int, ...]:
        lead = draw(st.integers(0, len(out)))
        return tuple(1 if draw(st.booleans()) else d for d in out[lead:])
    return [operand() for _ in range(n)]


@settings(max_examples=8, deadline=None, derandomize=True)
@given(shapes=broadcast_shapes(), op=st.sampled_from(["Add", "Sub", "Mul", "Div", "Pow"]))
def test_binary_broadcast_property(shapes, op) -> None:
    sa, sb = shapes
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 2.0, sa) if op == "Pow" else rng.standard_normal(sa)
    b = away_from_zero(rng, sb) if op == "Div" else rng.standard_normal(sb)
    check_case(Case(f"{op}-{sa}-{sb}", op, [("A", a), ("B", b)]))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(shapes=broadcast_shapes(3))
def test_where_sum_broadcast_property(shapes) -> None:
    sc, sa, sb = shapes
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    check_case(Case("Where", "Where", [("C", rng.random(sc) > 0.5), ("A", a), ("B", b)]))
    check_case(Case("Sum", "Sum", [("A", a), ("B", b), ("C", rng.standard_normal(sc))]))


def _dropout_model(ratio: float, opset: int = 18) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(5)
    x, r = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    inits = {"X": x, "R": r}
    if opset >= 12:
        inits |= {"ratio": np.array(ratio), "training": np.array(True)}
        drop = helper.make_node("Dropout", ["X", "ratio", "training"], ["y", "mask"], seed=3)
    else:
        drop = helper.make_node("Dropout", ["X"], ["y", "mask"], ratio=ratio)
    nodes = [drop, helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    return make_model(nodes, initializers=inits, outputs=["L"], opset=opset), r


def test_dropout_training_uses_mask() -> None:
    # FD is ill-posed for a random mask: check dX = dY * mask / (1 - ratio) with the run's mask.
    ratio = 0.3
    model, r = _dropout_model(ratio)
    tm = build_training_graph(model, {"type": "output", "output": "L"}, ["X"])
    gname = training_info(tm).gradients["X"]
    res = Executor(tm, np, fetch=[gname, "mask", "y"], seed=7).run({})
    mask = res["mask"]
    assert mask.dtype == np.bool_ and 0 < mask.sum() < mask.size
    np.testing.assert_allclose(res[gname], r * mask / (1 - ratio), rtol=1e-12)
    x = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "X"))
    np.testing.assert_allclose(res["y"], x * mask / (1 - ratio), rtol=1e-12)


@pytest.mark.parametrize("ratio_dtype", [np.float64, np.float32])
def test_dropout_ratio_fed_at_run_time(ratio_dtype) -> None:
    """A ratio the graph computes or is fed (a graph input; an outer scope's value in a
    branch): dX = dY * mask / (1 - ratio) with the run's ratio, in X's dtype where the ratio's
    float type differs (the spec lets it)."""
    rng = np.random.default_rng(5)
    x, r = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    drop = helper.make_node("Dropout", ["X", "ratio", "training"], ["y", "mask"], seed=3)
    model = make_model([drop, helper.make_node("Mul", ["y", "R"], ["p"]),
                        helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)],
                       inputs={"ratio": np.array(0.25, ratio_dtype)},
                       initializers={"X": x, "R": r, "training": np.array(True)}, outputs=["L"])
    tm = build_training_graph(model, {"type": "output", "output": "L"}, ["X"])
    gname = training_info(tm).gradients["X"]
    for ratio in (0.25, 0.6):
        res = Executor(tm, np, fetch=[gname, "mask"], seed=7).run(
            {"ratio": np.array(ratio, ratio_dtype)})
        mask = res["mask"]
        assert 0 < mask.sum() < mask.size and res[gname].dtype == np.float64
        np.testing.assert_allclose(res[gname], r * mask / (1 - ratio_dtype(ratio)), rtol=1e-12)


def test_dropout_ratio_zero_is_identity() -> None:
    model = _dropout_model(0.0)[0]
    grads, _ = gradients(model, ["X"])
    fd = finite_differences(model, {"X": onnx.numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "X"))})
    np.testing.assert_allclose(grads["X"], fd["X"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("opset", [7, 10, 11])
def test_dropout_before_opset_12_drops_in_training(opset) -> None:
    # Dropout-7..11 has no training_mode input: the training graph draws its own mask.
    ratio = 0.4
    model, r = _dropout_model(ratio, opset=opset)
    tm = build_training_graph(model, {"type": "output", "output": "L"}, ["X"])
    gname = training_info(tm).gradients["X"]
    res = Executor(tm, np, fetch=[gname, "mask", "y"], seed=7).run({})
    keep = res["mask"].astype(bool)
    assert 0 < keep.sum() < keep.size
    np.testing.assert_allclose(res[gname], r * keep / (1 - ratio), rtol=1e-12)
    x = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "X"))
    np.testing.assert_allclose(res["y"], x * keep / (1 - ratio), rtol=1e-12)


def test_cast_gradient_returns_input_dtype() -> None:
    # float32 parameter cast to float64: dX = cast(dY, float32), here exactly R as float32.
    x, r = np.arange(6, dtype=np.float32).reshape(2, 3), normal(2, 3)
    nodes = [helper.make_node("Cast", ["X"], ["y"], to=onnx.TensorProto.DOUBLE),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    grads, _ = gradients(make_model(nodes, initializers={"X": x, "R": r}, outputs=["L"]), ["X"])
    assert grads["X"].dtype == np.float32
    np.testing.assert_array_equal(grads["X"], r.astype(np.float32))


@pytest.mark.parametrize("opset", [11, 12, 13, 15])
def test_maxpool_gradient_at_the_models_own_opset(opset) -> None:
    # Models exported at opset 11-15 train (no ScatterElements reduction needed).
    check_case(Case(f"MaxPool-opset{opset}", "MaxPool", [("X", pool_input(1, 2, 5, 5))],
                    {"kernel_shape": [2, 2], "strides": [2, 2]}, opset=opset))


def test_legacy_broadcast_of_a_product_along_a_middle_axis_is_a_clear_error() -> None:
    # Opsets < 7 broadcast through attributes: sums train (tests/test_grad_shape.py _PRE7);
    # a product's rule would read B as NumPy aligns it, so there an upgrade is asked for.
    c = Case("Mul-legacy", "Mul", [("A", normal(2, 3, 4)), ("B", normal(3))],
             {"broadcast": 1, "axis": 1}, opset=6)
    with pytest.raises(ModelError, match="along axis 1, not the last axes.*version_converter"):
        gradients(loss_model(c), ["A", "B"])


# -- BatchNormalization training-mode rewrite ---------------------------------------------------
def _bn_train_np(x, s, b, eps):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m, v = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * s.reshape(shape) + b.reshape(shape)


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (6, 2)], ids=str)
def test_batchnorm_training_rewrite(shape) -> None:
    rng = np.random.default_rng(11)
    c, eps, momentum = shape[1], 1e-3, 0.9
    vals = {"X": rng.standard_normal(shape) * 2 + 1, "s": rng.standard_normal(c),
            "b": rng.standard_normal(c), "rm": rng.standard_normal(c),
            "rv": rng.uniform(0.5, 2, c)}
    r = rng.standard_normal(shape)
    nodes = [helper.make_node("BatchNormalization", ["X", "s", "b", "rm", "rv"], ["Y"],
                              epsilon=eps, momentum=momentum, training_mode=0),
             helper.make_node("Mul", ["Y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers={**vals, "R": r}, outputs=["L"])
    tm = build_training_graph(model, {"type": "output", "output": "L"}, ["X", "s", "b"])
    info = training_info(tm)
    assert set(info.state) == {"rm", "rv"}
    res = run(tm, fetch=[*info.gradients.values(), *info.state.values()])

    def loss(v):
        return float((_bn_train_np(v["X"], v["s"], v["b"], eps) * r).sum())
    for p in ("X", "s", "b"):
        fd = np.zeros_like(vals[p])
        for idx in np.ndindex(fd.shape):
            hi, lo = {k: v.copy() for k, v in vals.items()}, {k: v.copy() for k, v in vals.items()}
            hi[p][idx] += EPS
            lo[p][idx] -= EPS
            fd[idx] = (loss(hi) - loss(lo)) / (2 * EPS)
        np.testing.assert_allclose(res[info.gradients[p]], fd, rtol=RTOL, atol=ATOL,
                                   err_msg=f"d/d{p}")

    rm, rv = torch.tensor(vals["rm"]), torch.tensor(vals["rv"])
    torch.nn.functional.batch_norm(torch.tensor(vals["X"]), rm, rv, torch.tensor(vals["s"]),
                                   torch.tensor(vals["b"]), training=True,
                                   momentum=1 - momentum, eps=eps)
    np.testing.assert_allclose(res[info.state["rm"]], rm.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res[info.state["rv"]], rv.numpy(), rtol=1e-12, atol=1e-14)


def test_every_op_with_a_kernel_has_a_gradient_story() -> None:
    """An op with a forward kernel has a rule, a non-differentiable entry, or is lowered to
    plain ops before differentiation; nothing is left "missing"."""
    from trainer.report import support_table

    rows = support_table()
    missing = [f"{r['domain']}:{r['op']}" for r in rows
               if r["forward"] and r["gradient"] == "missing"]
    assert not missing, f"ops with a kernel but no gradient story: {missing}"
    assert sum(r["gradient"] == "rule" for r in rows) >= 142
