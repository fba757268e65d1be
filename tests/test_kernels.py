"""Forward kernels against onnxruntime / the ONNX reference evaluator, and the ONNX backend
node test cases (plus the bundled PyTorch-exported ones) run through the executor."""

from __future__ import annotations

import glob
import importlib
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.opcases import (
    KernelCase,
    KernelTable,
    assert_same,
    distinct,
    node_model,
    ours_and_reference,
    run,
)
from trainer.executor import Executor
from trainer.kernels import KERNELS

F32 = np.float32
_rng = np.random.default_rng(7)


def normal(*shape: int, dtype=F32) -> np.ndarray:
    return np.asarray(_rng.standard_normal(shape), dtype=dtype)


def positive(*shape: int) -> np.ndarray:
    return np.asarray(_rng.uniform(0.5, 2.0, shape), dtype=F32)


def coin(shape) -> np.ndarray:
    return np.asarray(_rng.random(shape) > 0.5)


def ints(*values: int, dtype=np.int64) -> np.ndarray:
    return np.array(values, dtype)


_table = KernelTable()
KCASES = _table.cases
add = _table.add
KCase = KernelCase


BROADCAST = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((3, 4), ()), ((), (2, 3)),
             ((1, 4), (3, 1)), ((4,), (2, 3, 4)), ((2, 0, 3), (3,))]
for sa, sb in BROADCAST:
    sid = f"{list(sa)}&{list(sb)}"
    for op in ("Add", "Sub", "Mul", "Max", "Min", "Equal", "Greater", "Less"):
        add(op, sid, [("A", normal(*sa)), ("B", normal(*sb))])
    add("Div", sid, [("A", normal(*sa)), ("B", positive(*sb))])
    add("Pow", sid, [("A", positive(*sa)), ("B", normal(*sb))])
    add("Where", sid, [("C", coin(sa)), ("A", normal(*sb)), ("B", normal(*sa))])
    add("Sum", sid, [("A", normal(*sa)), ("B", normal(*sb)), ("C", normal(1))])
    add("And", sid, [("A", coin(sa)), ("B", coin(sb))])
    add("Or", sid, [("A", coin(sa)), ("B", coin(sb))])
add("Equal", "int", [("A", ints(1, 2, 3)), ("B", ints(3, 2, 1))])
add("Greater", "int32", [("A", ints(1, 5, 3, dtype=np.int32)), ("B", ints(2, dtype=np.int32))])
add("Div", "int-truncates", [("A", ints(7, -7, 7, -7, 0)), ("B", ints(2, 2, -2, -2, 3))])
add("Div", "int32", [("A", ints(9, -9, 5, dtype=np.int32)), ("B", ints(4, 4, -5,
                                                                      dtype=np.int32))])
add("Pow", "int-exponent", [("A", normal(3, 2)), ("B", ints(2, 3))])
add("Pow", "int-base-float-exp", [("A", ints(4, 3, 9, 2)), ("B", np.array([1.5, 0.5, 0.5, 3],
                                                                          F32))])
add("Pow", "float-base-int32-exp", [("A", normal(4)), ("B", ints(3, dtype=np.int32))])
add("Max", "three", [("A", normal(3, 4)), ("B", normal(4)), ("C", normal(3, 1))])
add("Min", "single", [("A", normal(2, 3))])
add("Max", "int", [("A", ints(1, 5, -3)), ("B", ints(2, 2, 2))])
add("Sum", "single", [("A", normal(2, 3))])
add("Not", "bool", [("X", coin((2, 3)))])

_x = normal(3, 5) * 3
for op in ("Relu", "Sigmoid", "Tanh", "Exp", "Abs", "Neg", "Identity", "Erf", "Floor", "Ceil",
           "Sign", "Round"):
    add(op, "[3,5]", [("X", _x)])
add("Round", "halves", [("X", np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.4999], F32))])
add("Sigmoid", "extremes", [("X", np.array([-100, -20, -1, 0, 1, 20, 100], F32))])
for op in ("Log", "Sqrt", "Reciprocal"):
    add(op, "[3,5]", [("X", positive(3, 5))])
add("LeakyRelu", "default", [("X", _x)])
add("LeakyRelu", "alpha", [("X", _x)], alpha=0.3)
add("Relu", "int32", [("X", ints(-2, 0, 3, dtype=np.int32))], opset=14)
add("Abs", "int", [("X", ints(-2, 0, 3))])
add("Neg", "int", [("X", ints(-2, 0, 3))])
add("Clip", "both", [("X", _x), ("lo", np.array(-0.5, F32)), ("hi", np.array(1.5, F32))])
add("Clip", "min-only", [("X", _x), ("lo", np.array(0.2, F32))])
add("Clip", "max-only", [("X", _x), ("lo", None), ("hi", np.array(0.0, F32))])
add("Clip", "none", [("X", _x)])
add("Clip", "int", [("X", ints(-5, 0, 5, 9)), ("lo", np.array(-1)), ("hi", np.array(6))])

_castx = np.array([[-2.7, -0.5, 0.0, 0.5, 1.5, 2.5, 1e3]], F32)
for to, name in ((TensorProto.INT64, "f32-i64"), (TensorProto.DOUBLE, "f32-f64"),
                 (TensorProto.FLOAT16, "f32-f16"), (TensorProto.BOOL, "f32-bool"),
                 (TensorProto.INT32, "f32-i32"), (TensorProto.FLOAT, "f32-f32")):
    add("Cast", name, [("X", _castx)], to=to)
add("Cast", "i64-f32", [("X", ints(-3, 0, 7))], to=TensorProto.FLOAT)
add("Cast", "bool-f32", [("X", np.array([True, False]))], to=TensorProto.FLOAT)
add("Cast", "bool-i64", [("X", np.array([True, False]))], to=TensorProto.INT64)

M, K, N = 3, 4, 5
for ta in (0, 1):
    for tb in (0, 1):
        a = normal(K, M) if ta else normal(M, K)
        b = normal(N, K) if tb else normal(K, N)
        tid = f"tA{ta}tB{tb}"
        add("Gemm", f"{tid}", [("A", a), ("B", b)], transA=ta, transB=tb)
        add("Gemm", f"{tid}-C[N]", [("A", a), ("B", b), ("C", normal(N))], transA=ta,
            transB=tb, alpha=0.5, beta=2.0)
        add("Gemm", f"{tid}-C[M,1]", [("A", a), ("B", b), ("C", normal(M, 1))], transA=ta,
            transB=tb, beta=-1.0)
add("Gemm", "C[1]", [("A", normal(M, K)), ("B", normal(K, N)), ("C", normal(1))])
add("Gemm", "C-scalar", [("A", normal(M, K)), ("B", normal(K, N)), ("C", normal())])
add("Gemm", "C[M,N]", [("A", normal(M, K)), ("B", normal(K, N)), ("C", normal(M, N))],
    alpha=2.0)
for sa, sb in [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (3, 4, 5)),
               ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (2, 4, 5)), ((2, 3, 4), (4,)),
               ((4,), (4,)), ((3, 4), (2, 4, 5)), ((0, 4), (4, 2))]:
    add("MatMul", f"{list(sa)}@{list(sb)}", [("A", normal(*sa)), ("B", normal(*sb))])

_conv_cases = [
    ("basic-bias", (2, 3, 5, 5), (4, 3, 3, 3), True, {}),
    ("stride2-pad1", (1, 2, 7, 6), (3, 2, 3, 3), False, {"strides": [2, 2],
                                                          "pads": [1, 1, 1, 1]}),
    ("dilation-asym", (1, 2, 7, 7), (2, 2, 3, 3), False, {"dilations": [2, 2],
                                                           "pads": [2, 1, 0, 1]}),
    ("group2", (2, 4, 5, 5), (6, 2, 3, 3), True, {"group": 2, "strides": [1, 2],
                                                  "pads": [1, 1, 1, 1]}),
    ("depthwise", (1, 3, 5, 5), (3, 1, 3, 3), False, {"group": 3}),
    ("1d", (2, 3, 9), (4, 3, 3), True, {"strides": [2], "pads": [1, 0], "dilations": [2]}),
    ("same-upper", (1, 2, 6, 5), (3, 2, 3, 2), False, {"strides": [2, 2],
                                                        "auto_pad": "SAME_UPPER"}),
    ("same-lower", (1, 2, 5, 5), (2, 2, 2, 3), False, {"strides": [2, 1],
                                                        "auto_pad": "SAME_LOWER"}),
    ("valid", (1, 2, 5, 5), (2, 2, 3, 3), False, {"auto_pad": "VALID", "pads": None}),
    ("3d", (1, 2, 4, 4, 3), (2, 2, 2, 2, 2), True, {"strides": [2, 1, 2],
                                                     "pads": [1, 0, 0, 0, 1, 1]}),
    ("1x1-stride3", (1, 3, 7, 7), (2, 3, 1, 1), False, {"strides": [3, 3]}),
]
for cid, xs, ws, bias, kw in _conv_cases:
    kw = {k: v for k, v in kw.items() if v is not None}
    ins = [("X", normal(*xs)), ("W", normal(*ws))] + ([("B", normal(ws[0]))] if bias else [])
    add("Conv", cid, ins, **kw)

_ct_cases = [
    ("basic", (1, 2, 3, 3), (2, 3, 3, 3), True, {}),
    ("strides", (1, 2, 3, 4), (2, 2, 3, 3), False, {"strides": [3, 2]}),
    ("pads", (1, 1, 3, 3), (1, 2, 3, 3), False, {"strides": [3, 2], "pads": [1, 2, 1, 2]}),
    ("output-padding", (2, 2, 3, 3), (2, 1, 3, 3), True, {"strides": [3, 2],
                                                           "output_padding": [1, 1]}),
    ("group2", (1, 4, 3, 3), (4, 3, 2, 2), True, {"group": 2, "strides": [2, 2]}),
    ("dilations", (1, 1, 3, 3), (1, 1, 2, 2), False, {"dilations": [2, 2]}),
    ("output-shape", (1, 1, 3, 3), (1, 2, 3, 3), False, {"strides": [3, 2],
                                                          "output_shape": [10, 8]}),
    ("output-shape-odd", (1, 1, 3, 3), (1, 1, 3, 3), False, {"strides": [2, 2],
                                                              "output_shape": [6, 6]}),
    ("same-upper", (1, 1, 3, 3), (1, 1, 3, 3), False, {"strides": [2, 2],
                                                        "auto_pad": "SAME_UPPER"}),
    ("same-lower", (1, 1, 3, 3), (1, 1, 3, 3), False, {"strides": [2, 2],
                                                        "auto_pad": "SAME_LOWER"}),
    ("1d", (1, 2, 5), (2, 3, 3), True, {"strides": [2], "pads": [1, 0]}),
    ("3d", (1, 1, 2, 3, 2), (1, 2, 2, 2, 2), False, {"strides": [2, 1, 2]}),
]
for cid, xs, ws, bias, kw in _ct_cases:
    ins = [("X", normal(*xs)), ("W", normal(*ws))]
    if bias:
        ins.append(("B", normal(ws[1] * kw.get("group", 1))))
    add("ConvTranspose", cid, ins, **kw)

_pool = [
    ("overlap", (1, 2, 5, 5), {"kernel_shape": [3, 3], "strides": [2, 2]}),
    ("pad", (1, 2, 5, 5), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("ceil", (1, 1, 6, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ("ceil-pad", (2, 1, 5, 6), {"kernel_shape": [2, 3], "strides": [2, 2],
                                "pads": [0, 1, 1, 0], "ceil_mode": 1}),
    ("1d", (2, 3, 8), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    ("same-upper", (1, 2, 5, 4), {"kernel_shape": [2, 3], "strides": [2, 2],
                                  "auto_pad": "SAME_UPPER"}),
    ("same-lower", (1, 2, 5, 4), {"kernel_shape": [3, 2], "strides": [2, 1],
                                  "auto_pad": "SAME_LOWER"}),
    ("3d", (1, 2, 4, 4, 4), {"kernel_shape": [2, 2, 2], "strides": [2, 1, 2]}),
]
for cid, xs, kw in _pool:
    x = distinct(_rng, xs, dtype=F32)
    add("MaxPool", cid, [("X", x)], **kw)
    add("MaxPool", f"{cid}-indices", [("X", x)], n_out=2, **kw)
    for inc in (0, 1):
        add("AveragePool", f"{cid}-cip{inc}", [("X", x)], count_include_pad=inc, **kw)
_xd = distinct(_rng, (1, 2, 7, 7), dtype=F32)
add("MaxPool", "dilation-indices", [("X", _xd)], n_out=2, kernel_shape=[2, 2],
    dilations=[2, 2])
add("MaxPool", "storage-order1-indices", [("X", distinct(_rng, (2, 2, 4, 5), dtype=F32))],
    n_out=2, kernel_shape=[2, 2], strides=[1, 2], storage_order=1)
add("MaxPool", "int8", [("X", ints(*range(-8, 10), dtype=np.int8).reshape(1, 2, 3, 3))],
    kernel_shape=[2, 2], pads=[1, 1, 0, 0])
add("AveragePool", "dilation-opset19", [("X", _xd)], kernel_shape=[2, 2], dilations=[2, 2],
    strides=[1, 2], opset=19)
add("GlobalAveragePool", "2d", [("X", normal(2, 3, 4, 5))])
add("GlobalAveragePool", "1d", [("X", normal(2, 3, 4))])
add("GlobalMaxPool", "2d", [("X", normal(2, 3, 4, 5))])

for shape in ((3, 4, 2, 2), (5, 3), (2, 3, 4)):
    c = shape[1]
    bn = [("X", normal(*shape)), ("s", normal(c)), ("b", normal(c)), ("m", normal(c)),
          ("v", positive(c))]
    add("BatchNormalization", f"inference-{list(shape)}", bn, epsilon=1e-3)
    # onnxruntime's CPU kernel has no training mode: the reference evaluator checks it.
    add("BatchNormalization", f"training-{list(shape)}", bn, n_out=3, training_mode=1,
        momentum=0.8, ref="reference")
add("GatherElements", "indices-smaller-than-data",
    [("X", normal(2, 4, 3)), ("I", np.array([[[1, 2]]] * 2, np.int64))], axis=1)
_bnx = normal(4, 3, 2)
add("BatchNormalization", "opset7-spatial0", [("X", _bnx), ("s", normal(3, 2)),
                                              ("b", normal(3, 2)), ("m", normal(3, 2)),
                                              ("v", positive(3, 2))], opset=7, spatial=0)
add("BatchNormalization", "opset7-spatial1", [("X", _bnx), ("s", normal(3)), ("b", normal(3)),
                                              ("m", normal(3)), ("v", positive(3))], opset=7,
    epsilon=1e-3)
add("Dropout", "inference", [("X", _x), ("ratio", np.array(0.3, F32))])
add("Dropout", "inference-mask", [("X", _x), ("ratio", np.array(0.3, F32)),
                                  ("t", np.array(False))], n_out=2)
add("Dropout", "opset10", [("X", _x)], opset=10, ratio=0.2)

for red in ("mean", "sum", "none"):
    add("SoftmaxCrossEntropyLoss", f"{red}-[N]", [("S", normal(4, 5)), ("L", ints(0, 3, 4, 1))],
        n_out=2, reduction=red)
    add("SoftmaxCrossEntropyLoss", f"{red}-[N,d]-ignore",
        [("S", normal(3, 4, 2)), ("L", ints(0, 1, 3, 1, 2, 0).reshape(3, 2))], n_out=2,
        reduction=red, ignore_index=1)
    add("SoftmaxCrossEntropyLoss", f"{red}-weights",
        [("S", normal(2, 3, 2, 2)), ("L", _rng.integers(0, 3, (2, 2, 2))),
         ("W", positive(3))], reduction=red)
    add("NegativeLogLikelihoodLoss", f"{red}-[N]", [("P", normal(4, 5)),
                                                   ("L", ints(0, 3, 4, 1))], reduction=red)
    add("NegativeLogLikelihoodLoss", f"{red}-weights-ignore",
        [("P", normal(3, 4, 2)), ("L", ints(0, -1, 3, 1, -1, 0).reshape(3, 2)),
         ("W", positive(4))], reduction=red, ignore_index=-1)

for op in ("Softmax", "LogSoftmax"):
    for opset, axes in ((13, (0, 1, -1, None)), (11, (0, 1, -1, None))):
        for axis in axes:
            kw = {} if axis is None else {"axis": axis}
            add(op, f"opset{opset}-axis{axis}", [("X", normal(2, 3, 4) * 5)], opset=opset, **kw)

_rx = normal(2, 3, 4)
for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare"):
    new = 13 if op == "ReduceSum" else 18
    for axes, keep in (([1], 1), ([0, 2], 0), ([-1], 1), (None, 0), (None, 1)):
        ax = "all" if axes is None else "".join(map(str, axes))
        add(op, f"opset{new}-axes{ax}-keep{keep}",
            [("X", _rx), ("axes", None if axes is None else ints(*axes))], opset=new,
            keepdims=keep)
        add(op, f"opset11-axes{ax}-keep{keep}", [("X", _rx)], opset=11, keepdims=keep,
            **({} if axes is None else {"axes": axes}))
    add(op, "noop-empty-axes", [("X", _rx), ("axes", np.zeros(0, np.int64))], opset=new,
        noop_with_empty_axes=1)
for op in ("ReduceSum", "ReduceMean", "ReduceProd", "ReduceSumSquare", "ReduceMin"):
    add(op, "int32", [("X", ints(1, 2, 3, -4, 5, -7, dtype=np.int32).reshape(2, 3)),
                      ("axes", ints(1))], opset=13 if op == "ReduceSum" else 18)
add("ReduceMax", "int", [("X", ints(3, -1, 7, 2).reshape(2, 2)), ("axes", ints(1))])
add("ReduceMax", "empty-set", [("X", normal(2, 0, 4)), ("axes", ints(1))], ref="reference")
add("ReduceMin", "empty-set", [("X", normal(2, 0, 4)), ("axes", ints(1))], ref="reference")

_ties = np.array([[1, 3, 3, 0], [2, 2, 1, 2], [0, 0, 0, 0]], F32)
for axis in (0, 1, -1):
    for keep in (0, 1):
        for last in (0, 1):
            add("ArgMax", f"axis{axis}-keep{keep}-last{last}", [("X", _ties)], axis=axis,
                keepdims=keep, select_last_index=last)
add("ArgMax", "default-3d", [("X", normal(2, 3, 4))])

_s = normal(2, 3, 4)
add("Reshape", "minus-one", [("X", _s), ("shape", ints(4, -1))])
add("Reshape", "zero-copies", [("X", _s), ("shape", ints(0, 12))])
add("Reshape", "allowzero", [("X", np.zeros((0, 3), F32)), ("shape", ints(3, 0))], allowzero=1)
add("Reshape", "scalar", [("X", normal(1, 1)), ("shape", np.zeros(0, np.int64))])
for axis in (0, 1, 2, 3, -1, -3):
    add("Flatten", f"axis{axis}", [("X", _s)], axis=axis)
add("Transpose", "default", [("X", _s)])
add("Transpose", "perm", [("X", _s)], perm=[1, 2, 0])
add("Shape", "full", [("X", _s)])
add("Shape", "start-end", [("X", _s)], opset=15, start=1, end=-1)
add("Shape", "negative-start", [("X", _s)], opset=15, start=-2)
add("Size", "3d", [("X", _s)])
add("Squeeze", "opset13-axes", [("X", normal(2, 1, 3, 1)), ("axes", ints(1, -1))], opset=13)
add("Squeeze", "opset13-all", [("X", normal(2, 1, 3, 1))], opset=13)
add("Squeeze", "opset11", [("X", normal(2, 1, 3, 1))], opset=11, axes=[1])
add("Unsqueeze", "opset13", [("X", normal(2, 3)), ("axes", ints(0, -1))], opset=13)
add("Unsqueeze", "opset13-middle", [("X", normal(2, 3)), ("axes", ints(3, 1))], opset=13)
add("Unsqueeze", "opset11", [("X", normal(2, 3))], opset=11, axes=[1])
add("Expand", "[3,1]->[2,3,4]", [("X", normal(3, 1)), ("shape", ints(2, 3, 4))])
add("Expand", "[4]->[3,1]", [("X", normal(4)), ("shape", ints(3, 1))])
add("Expand", "higher-rank-input", [("X", normal(2, 3, 1)), ("shape", ints(3, 4))])
add("Concat", "axis1", [("A", normal(2, 1, 3)), ("B", normal(2, 4, 3)), ("C", normal(2, 0, 3))],
    axis=1)
add("Concat", "axis-1", [("A", normal(2, 3)), ("B", normal(2, 2))], axis=-1)
add("Concat", "int", [("A", ints(1, 2)), ("B", ints(3))], axis=0)
add("Split", "num-outputs", [("X", normal(2, 6))], n_out=3, axis=1, num_outputs=3)
add("Split", "num-outputs-uneven", [("X", normal(7, 2))], n_out=3, num_outputs=3)
add("Split", "opset13-input", [("X", normal(2, 3, 6)), ("split", ints(2, 4))], n_out=2,
    axis=-1, opset=13)
add("Split", "opset11-attr", [("X", normal(5, 2))], n_out=2, split=[3, 2], opset=11)
add("Split", "opset13-equal", [("X", normal(4, 2))], n_out=2, opset=13)

_g = normal(5, 4, 3)
add("Gather", "axis0", [("X", _g), ("i", ints(0, 4, 2))])
add("Gather", "axis1-2d-indices", [("X", _g), ("i", ints(0, 3, 1, 1).reshape(2, 2))], axis=1)
add("Gather", "negative", [("X", _g), ("i", ints(-1, -5, 2))], axis=0)
add("Gather", "scalar-index", [("X", _g), ("i", np.array(2, np.int64))], axis=-1)
add("Gather", "int32-indices", [("X", _g), ("i", ints(1, 0, dtype=np.int32))])
add("Gather", "empty-indices", [("X", _g), ("i", np.zeros(0, np.int64))])
_sl = normal(5, 6, 4)
for sid, st_, en, ax, sp in (
        ("basic", (1, 0), (3, 4), None, None), ("axes", (1,), (5,), (2,), None),
        ("negative", (-3, -4), (-1, 100), (0, 1), None), ("steps", (0, 5), (5, 0), (0, 1),
                                                          (2, -2)),
        ("neg-step-full", (-1,), (-1000,), (1,), (-1,)), ("clamped", (-100,), (100,), (-1,),
                                                          None),
        ("empty", (3,), (1,), (0,), None)):
    ins = [("X", _sl), ("starts", ints(*st_)), ("ends", ints(*en)),
           ("axes", None if ax is None else ints(*ax)), ("steps", None if sp is None
                                                         else ints(*sp))]
    add("Slice", sid, ins)
add("ConstantOfShape", "default", [("shape", ints(2, 3))])
add("ConstantOfShape", "int-value", [("shape", ints(3))],
    value=numpy_helper.from_array(np.array([7], np.int64)))
add("ConstantOfShape", "float-value", [("shape", ints(2, 1, 2))],
    value=numpy_helper.from_array(np.array([1.5], F32)))
add("ConstantOfShape", "empty-shape", [("shape", np.zeros(0, np.int64))],
    value=numpy_helper.from_array(np.array([2.0], F32)))
_vals = np.array([-1.0, 3.0], F32)
add("OneHot", "axis-1", [("i", ints(0, 2, 1, 4)), ("d", np.array(5, np.int64)), ("v", _vals)])
add("OneHot", "axis0-negative", [("i", ints(0, -1, -5, 2).reshape(2, 2)),
                                 ("d", np.array([5], np.int64)), ("v", _vals)], axis=0)
add("OneHot", "axis1-float-depth", [("i", ints(1, 0, 2).reshape(3, 1)),
                                    ("d", np.array(3.0, F32)), ("v", _vals)], axis=1)
_data = normal(3, 4)
for red in ("none", "add", "mul", "max", "min"):
    dup = red != "none"  # duplicate indices only where the result is order-independent
    idx = ints(1, 0, 2, 1, 1, -3, 2, 0) if dup else ints(1, 0, 2, 1, 0, 2, 1, 0)
    add("ScatterElements", f"{red}-axis0", [("X", _data), ("i", idx.reshape(2, 4)),
                                            ("u", normal(2, 4))], reduction=red)
    idx = ints(-1, 0, 2, 1, -4, -3) if dup else ints(-1, 0, 2, 1, 3, -3)
    add("ScatterElements", f"{red}-axis1-negative",
        [("X", _data), ("i", idx.reshape(3, 2)), ("u", normal(3, 2))], axis=1, reduction=red)
add("Range", "int", [("a", np.array(1, np.int64)), ("b", np.array(10, np.int64)),
                     ("d", np.array(3, np.int64))])
add("Range", "float", [("a", np.array(0.5, F32)), ("b", np.array(-2.0, F32)),
                       ("d", np.array(-0.75, F32))])
add("Range", "empty", [("a", np.array(5, np.int32)), ("b", np.array(1, np.int32)),
                       ("d", np.array(2, np.int32))])
add("EyeLike", "k1", [("X", normal(3, 4))], k=1)
add("EyeLike", "dtype", [("X", normal(4, 3))], k=-1, dtype=TensorProto.INT64)


@pytest.mark.parametrize("c", KCASES, ids=str)
def test_kernel_matches_reference(c: KCase) -> None:
    ours, want = ours_and_reference(c)
    for name in want:
        assert_same(ours[name], want[name], what=f"{c.id} {name}")


def test_cast_before_opset_6_names_the_type() -> None:
    x = normal(3)
    model = node_model("Cast", [("X", x)], opset=5, to="DOUBLE")
    got = run(model, {"X": x})["y0"]
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, x.astype(np.float64))


def test_dropout_training_kernel() -> None:
    x = np.ones((200, 50), F32)
    model = node_model("Dropout", [("X", x), ("r", np.array(0.25, F32)),
                                   ("t", np.array(True))], 2)
    out = Executor(model, np, seed=3).run({"X": x, "r": np.array(0.25, F32),
                                          "t": np.array(True)})
    y, mask = out["y0"], out["y1"]
    assert mask.dtype == np.bool_ and abs(mask.mean() - 0.75) < 0.02
    np.testing.assert_array_equal(y, np.where(mask, np.float32(1 / 0.75), np.float32(0)))


def test_kernels_registered_for_every_tested_op() -> None:
    # Every kernel has a case here, in a tests/test_kernels_*.py file (CASES of objects with an
    # `op`, or a TESTED_OPS set), or in ONNX's node suite (tests/test_onnx_backend.py).
    import pathlib

    from tests.onnx_conformance import _ops, collect

    tested = set().union(*(_ops(c.model.graph) for c in collect())) | {c.op for c in KCASES}
    here = pathlib.Path(__file__).parent
    for path in sorted([*here.glob("test_kernels_*.py"), here / "test_control_flow.py",
                        here / "test_grad_collective.py", here / "test_grad_ctc.py",
                        here / "test_grad_bce.py",
                        here / "test_ml_linear.py"]):
        mod = importlib.import_module(f"tests.{path.stem}")
        tested |= {getattr(c, "op", None) for c in getattr(mod, "CASES", [])}
        tested |= set(getattr(mod, "TESTED_OPS", ()))
    ours = {op for (domain, op) in KERNELS}
    untested = sorted(ours - tested)
    assert not untested, f"kernels without a reference test: {untested}"


_DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
# Models from opset < 7 with the legacy `broadcast`/`axis` attributes of Add/Gemm, which
# predate NumPy broadcasting; the kernels implement the opset-7+ semantics only.
def _model_dirs() -> list[str]:
    """Every model directory of onnx's test data (real models exported by PyTorch, and simple
    ones): all of them must run forward and match their stored outputs."""
    return [d for kind in ("pytorch-converted", "pytorch-operator", "simple")
            for d in sorted(glob.glob(os.path.join(_DATA, kind, "test_*")))]


def _read_pb(path: str) -> np.ndarray:
    t = TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the "simple" cases feed NaN on purpose
@pytest.mark.parametrize("path", [pytest.param(d, id=os.path.basename(d))
                                  for d in _model_dirs()])
def test_onnx_backend_model_dir(path: str) -> None:
    name = os.path.basename(path)
    m = onnx.load(os.path.join(path, "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    data_inputs = [vi.name for vi in m.graph.input if vi.name not in inits]
    ex = Executor(m, np)
    for ds in sorted(glob.glob(os.path.join(path, "test_data_set_*"))):
        # Old (IR < 4) models list initializers among the graph inputs: they stay defaults.
        feeds = {n: _read_pb(os.path.join(ds, f"input_{i}.pb"))
                 for i, n in enumerate(data_inputs)}
        got = ex.run(feeds)
        for i, vi in enumerate(m.graph.output):
            want = _read_pb(os.path.join(ds, f"output_{i}.pb"))
            assert_same(got[vi.name], want, 1e-4, 1e-5, f"{name} {vi.name}")


def test_initializer_listed_as_graph_input_is_a_default() -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x, w], [y],
                          [numpy_helper.from_array(np.ones(2, np.float32), "w")])
    ex = Executor(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    np.testing.assert_array_equal(ex.run({"x": np.zeros(2, np.float32)})["y"], [1, 1])
    np.testing.assert_array_equal(
        ex.run({"x": np.zeros(2, np.float32), "w": np.full(2, 3, np.float32)})["y"], [3, 3])
