"""Math kernels (trigonometry, activations, bitwise, reductions, scans, Einsum, Det) against
onnxruntime or the ONNX reference evaluator, across opsets, attributes and dtypes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from tests.opcases import assert_same, node_model, run, run_ort, run_reference
from trainer.kernels import get_kernel
from trainer.kernels.elementwise import erf

F16, F32, F64, BF16 = np.float16, np.float32, np.float64, ml_dtypes.bfloat16
_rng = np.random.default_rng(11)


def normal(*shape: int, dtype=F32, scale: float = 1.0) -> np.ndarray:
    return np.asarray(_rng.standard_normal(shape) * scale).astype(dtype)


def uniform(lo: float, hi: float, *shape: int, dtype=F32) -> np.ndarray:
    return np.asarray(_rng.uniform(lo, hi, shape)).astype(dtype)


def ints(*values: int, dtype=np.int64) -> np.ndarray:
    return np.array(values, dtype)


def randint(lo: int, hi: int, *shape: int, dtype=np.int32) -> np.ndarray:
    return _rng.integers(lo, hi, shape).astype(dtype)



# -- table of single-node cases -----------------------------------------------------------------
@dataclass
class Case:
    id: str
    op: str
    inputs: list[tuple[str, np.ndarray | None]]
    attrs: dict = field(default_factory=dict)
    opset: int = 18
    # "ort"; "reference" (onnxruntime lacks the op/opset); "f32": onnxruntime on float32 copies
    # of the float inputs, rounded back (onnxruntime lacks the kernel for that dtype); or a
    # function of the input arrays giving the exact result
    ref: str | Callable = "ort"
    rtol: float = 1e-5
    atol: float = 1e-6

    def __str__(self) -> str:
        return self.id


CASES: list[Case] = []


def add(op: str, id: str, inputs, *, opset: int = 18, ref: str | Callable = "ort",
        rtol: float = 1e-5, atol: float = 1e-6, **attrs) -> None:
    CASES.append(Case(f"{op}-{id}-v{opset}", op, list(inputs), attrs, opset, ref, rtol, atol))


LOW = {"f16": (F16, 2e-3), "bf16": (BF16, 1.6e-2)}  # dtype, rtol/atol (about 2 ulp)

_domains = {"Asin": (-0.95, 0.95), "Acos": (-0.95, 0.95), "Atanh": (-0.95, 0.95),
            "Acosh": (1.05, 4.0), "Tan": (-1.3, 1.3)}
for op, since in [("Sin", 7), ("Cos", 7), ("Tan", 7), ("Asin", 7), ("Acos", 7), ("Atan", 7),
                  ("Sinh", 9), ("Cosh", 9), ("Asinh", 9), ("Acosh", 9), ("Atanh", 9)]:
    lo, hi = _domains.get(op, (-3.0, 3.0))
    add(op, "f32", [("X", uniform(lo, hi, 3, 4))], opset=since)
    add(op, "f64", [("X", uniform(lo, hi, 2, 5, dtype=F64))], opset=22, ref="reference")
    add(op, "f16", [("X", uniform(lo, hi, 7, dtype=F16))], opset=22, ref="f32", rtol=2e-3,
        atol=2e-3)
    add(op, "bf16", [("X", uniform(lo, hi, 7, dtype=BF16))], opset=22, ref="f32", rtol=1.6e-2,
        atol=1.6e-2)

_erf = np.vectorize(math.erf)
_EXACT = {("Erf", "default"): lambda x: _erf(x),
          ("Gelu", "default"): lambda x: 0.5 * x * np.vectorize(math.erfc)(-x / math.sqrt(2)),
          ("Gelu", "approximate=tanh"): lambda x: 0.5 * x * (1 + np.tanh(
              math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))}
_x = np.concatenate([normal(20, scale=3.0), np.array([-30, -1, 0, 1, 30], F32)]).reshape(5, 5)
_activations = [("Elu", 6, {}), ("Elu", 6, {"alpha": 0.4}), ("Elu", 22, {"alpha": 2.0}),
                ("Selu", 6, {}), ("Selu", 22, {"alpha": 1.5, "gamma": 0.7}),
                ("HardSigmoid", 6, {}), ("HardSigmoid", 22, {"alpha": 0.3, "beta": 0.4}),
                ("Softplus", 1, {}), ("Softplus", 22, {}), ("Softsign", 1, {}),
                ("Softsign", 22, {}), ("ThresholdedRelu", 10, {}),
                ("ThresholdedRelu", 22, {"alpha": 0.5}), ("Celu", 12, {}),
                ("Celu", 12, {"alpha": 2.5}), ("HardSwish", 14, {}), ("HardSwish", 22, {}),
                ("Mish", 18, {}), ("Mish", 22, {}), ("Gelu", 20, {}),
                ("Gelu", 20, {"approximate": "tanh"}), ("Swish", 24, {}),
                ("Swish", 24, {"alpha": 0.5}), ("LeakyRelu", 16, {"alpha": 0.2}),
                ("Sigmoid", 13, {}), ("Erf", 13, {})]
for op, opset, kw in _activations:
    tag = ",".join(f"{k}={v}" for k, v in kw.items()) or "default"
    # onnxruntime's Swish is off near x = -30 (1.07e-5 for 9.18e-6): atol 2e-6
    add(op, f"f32-{tag}", [("X", _x)], opset=opset, atol=2e-6 if op == "Swish" else 1e-6, **kw)
    # onnxruntime's float64 kernels take float32 attributes (alpha 0.4 -> 0.4000000059604645);
    # ours read the intended decimal (trainer.graph.attr_value), hence rtol 3e-7.
    if op == "Celu":  # float64 from opset 28, which onnxruntime does not run
        add(op, f"f64-{tag}", [("X", _x.astype(F64))], opset=28, ref="reference", **kw)
        continue
    add(op, f"f64-{tag}", [("X", _x.astype(F64))], opset=opset, ref=_EXACT.get((op, tag), "ort"),
        rtol=1e-13 if (op, tag) in _EXACT else 3e-7, atol=1e-13 if (op, tag) in _EXACT else 1e-9,
        **kw)
    for name, (dt, tol) in LOW.items():
        add(op, f"{name}-{tag}", [("X", _x.astype(dt))], opset=max(opset, 22), ref="f32",
            rtol=tol, atol=tol, **kw)
for name, (dt, tol) in LOW.items():
    add("Celu", name, [("X", _x.astype(dt))], opset=28, ref="reference", rtol=tol, atol=tol)
# Opset-1 forms: explicit defaults of that version (onnxruntime starts at opset 6/7).
add("Selu", "opset1-defaults", [("X", _x)], opset=1, ref="reference", alpha=1.6732,
    gamma=1.0507)
add("Selu", "opset1-implicit-defaults", [("X", _x)], opset=1,
    ref=lambda x: 1.0507 * np.where(x > 0, x, 1.6732 * np.expm1(x)))
add("Elu", "opset1", [("X", _x)], opset=1, ref="reference", alpha=0.7)
add("HardSigmoid", "opset1", [("X", _x)], opset=1, ref="reference", alpha=0.1)
add("SwiGLU", "default", [("A", _x), ("B", normal(5, 5))], opset=28, ref="reference")
add("SwiGLU", "alpha", [("A", _x), ("B", normal(5, 5))], opset=28, ref="reference", alpha=1.7)
add("SwiGLU", "f16", [("A", _x.astype(F16)), ("B", normal(5, 5, dtype=F16))], opset=28,
    ref="reference", rtol=2e-3, atol=2e-3)

for slope_shape in [(1,), (4,), (3, 1), (2, 3, 4), ()]:
    add("PRelu", f"slope{list(slope_shape)}", [("X", normal(2, 3, 4)),
                                               ("S", normal(*slope_shape))], opset=16)
add("PRelu", "int32", [("X", randint(-9, 9, 3, 4)), ("S", randint(-3, 3, 4))], opset=16)
add("PRelu", "int64", [("X", randint(-9, 9, 6, dtype=np.int64)), ("S", ints(3))], opset=16)
add("PRelu", "opset6-channels", [("X", normal(2, 3, 2, 2)), ("S", normal(3, 1, 1))], opset=6)
add("PRelu", "f16", [("X", normal(3, 4, dtype=F16)), ("S", normal(4, dtype=F16))], opset=16)
for dt in (np.int8, np.uint8, np.int32, np.int64, F32, F64):
    vals = randint(0 if np.dtype(dt).kind == "u" else -9, 9, 12, dtype=dt)
    add("Shrink", np.dtype(dt).name, [("X", vals)], opset=9, bias=1.0, lambd=2.0)
add("Shrink", "default", [("X", _x)], opset=9)
add("Shrink", "f16", [("X", _x.astype(F16))], opset=9, ref="reference", bias=0.5, lambd=1.0)

_special = np.array([np.inf, -np.inf, np.nan, 0.0, -1.5, 3.0], F32)
for pos in (0, 1):
    for neg in (0, 1):
        add("IsInf", f"pos{pos}neg{neg}", [("X", _special)], opset=10, detect_positive=pos,
            detect_negative=neg)
add("IsInf", "f64", [("X", _special.astype(F64))], opset=20)
add("IsInf", "f16", [("X", _special.astype(F16))], opset=20, ref="reference")
add("IsInf", "bf16", [("X", _special.astype(BF16))], opset=20, ref="reference")
add("IsNaN", "f32", [("X", _special)], opset=9)
add("IsNaN", "f16", [("X", _special.astype(F16))], opset=20)
add("IsNaN", "bf16", [("X", _special.astype(BF16))], opset=20, ref="reference")
add("IsNaN", "f8e4m3", [("X", _special.astype(ml_dtypes.float8_e4m3fn))], opset=20,
    ref="reference")

add("Mean", "broadcast", [("A", normal(3, 4)), ("B", normal(4)), ("C", normal(3, 1))], opset=13)
add("Mean", "single", [("A", normal(2, 3))], opset=13)
add("Mean", "opset6", [("A", normal(2, 3)), ("B", normal(2, 3))], opset=6)
add("Mean", "f16", [("A", normal(2, 3, dtype=F16)), ("B", normal(2, 3, dtype=F16))], opset=13,
    rtol=2e-3, atol=2e-3)
add("Mean", "bf16", [("A", normal(2, 3, dtype=BF16)), ("B", normal(3, dtype=BF16))], opset=13,
    ref="f32", rtol=1.6e-2, atol=1.6e-2)

_num = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
for dt in _num:
    signed = np.dtype(dt).kind == "i"
    a = randint(-40 if signed else 0, 40, 4, 6, dtype=dt)
    b = randint(1, 9, 6, dtype=dt) * (np.where(np.arange(6) % 2, -1, 1).astype(dt)
                                      if signed else 1)
    add("Mod", f"{np.dtype(dt).name}-fmod0", [("A", a), ("B", b)], opset=13)
    add("Mod", f"{np.dtype(dt).name}-fmod1", [("A", a), ("B", b)], opset=13, fmod=1)
for dt in (F16, F32, F64):
    a, b = normal(3, 5, dtype=dt, scale=5.0), normal(5, dtype=dt, scale=2.0)
    tol = 2e-3 if dt is F16 else 1e-5
    add("Mod", f"{np.dtype(dt).name}-fmod1", [("A", a), ("B", b)], opset=13, fmod=1, rtol=tol,
        atol=tol)
    add("Mod", f"{np.dtype(dt).name}-fmod0", [("A", a), ("B", b)], opset=28, ref="reference",
        rtol=tol, atol=tol)
add("Mod", "float-specials", [("A", np.array([0.0, -0.0, 3, -3, np.inf, 3, -3, np.nan], F32)),
                              ("B", np.array([-2, 2, np.inf, np.inf, 2, 0, -np.inf, 1], F32))],
    opset=28, ref="reference")

for sa, sb in [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((), (2, 2))]:
    sid = f"{list(sa)}&{list(sb)}"
    add("Xor", sid, [("A", np.asarray(normal(*sa) > 0)), ("B", np.asarray(normal(*sb) > 0))],
        opset=7)
    for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor"):
        for dt in (np.int8, np.uint16, np.int32, np.uint64):
            lo = 0 if np.dtype(dt).kind == "u" else -100
            add(op, f"{np.dtype(dt).name}-{sid}", [("A", randint(lo, 100, *sa, dtype=dt)),
                                                   ("B", randint(lo, 100, *sb, dtype=dt))])
for dt in _num:
    lo = 0 if np.dtype(dt).kind == "u" else -100
    add("BitwiseNot", np.dtype(dt).name, [("X", randint(lo, 100, 3, 4, dtype=dt))])

for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
    bits = np.dtype(dt).itemsize * 8
    x = randint(0, 200, 12, dtype=dt)
    y = randint(0, bits, 12, dtype=dt)
    for d in ("LEFT", "RIGHT"):
        add("BitShift", f"{np.dtype(dt).name}-{d}", [("X", x), ("Y", y)], opset=11, direction=d)
    add("BitShift", f"{np.dtype(dt).name}-bcast", [("X", x.reshape(3, 4)), ("Y", y[:4])],
        opset=11, direction="LEFT")
for dt in (np.int8, np.int16, np.int32, np.int64):
    bits = np.dtype(dt).itemsize * 8
    x = np.concatenate([randint(-120, 120, 10, dtype=dt), ints(-1, 1, dtype=dt)])
    y = np.concatenate([randint(-2, bits + 3, 10, dtype=dt), ints(bits - 1, bits, dtype=dt)])
    for d in ("LEFT", "RIGHT"):
        add("BitShift", f"{np.dtype(dt).name}-{d}", [("X", x), ("Y", y)], opset=28,
            ref="reference", direction=d)

_bitcast = [(F32, TensorProto.INT32), (np.int32, TensorProto.FLOAT), (F64, TensorProto.UINT64),
            (F16, TensorProto.INT16), (np.int16, TensorProto.BFLOAT16),
            (np.uint8, TensorProto.INT8), (np.bool_, TensorProto.UINT8)]
for dt, to in _bitcast:
    src = (normal(2, 3) * 50).astype(dt) if np.dtype(dt) != np.bool_ else normal(2, 3) > 0
    add("BitCast", f"{np.dtype(dt).name}-to{to}", [("X", src)], opset=26, to=to,
        ref="reference" if to == TensorProto.BFLOAT16 else "ort")
add("BitCast", "scalar", [("X", np.array(1.5, F32))], opset=26, to=TensorProto.UINT32)

# -- arg-extrema, reductions, scans --------------------------------------------------------------
_ties = np.array([[2, 1, 1, 5], [0, 0, 3, 3], [4, 4, 4, 4]], F32)
for op in ("ArgMin", "ArgMax"):
    for axis in (0, 1, -1):
        for keep in (0, 1):
            add(op, f"ax{axis}-k{keep}", [("X", _ties)], opset=11, axis=axis, keepdims=keep)
            add(op, f"ax{axis}-k{keep}-last", [("X", _ties)], opset=13, axis=axis,
                keepdims=keep, select_last_index=1)
    add(op, "3d", [("X", normal(2, 3, 4))], opset=13, axis=1)
    for dt in (np.int8, np.uint8, np.int32, np.int64, F64, F16):
        add(op, np.dtype(dt).name, [("X", _ties.astype(dt))], opset=13, axis=1)
    add(op, "bf16", [("X", _ties.astype(BF16))], opset=13, axis=1, ref="reference")

_REDUCE_SINCE = {"ReduceSum": 13}
_REDUCE_OPS = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
               "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp"]
_rx = uniform(0.5, 1.5, 2, 3, 4)
_signed = normal(2, 3)
for op in _REDUCE_OPS:
    since = _REDUCE_SINCE.get(op, 18)
    for axes in (None, [1], [0, 2], [-1, 0], [2, 1, 0]):
        for keep in (0, 1):
            tag = f"axes{axes}-k{keep}".replace(" ", "")
            add(op, f"attr-{tag}", [("X", _rx)], opset=since - 2, keepdims=keep,
                **({} if axes is None else {"axes": axes}))
            add(op, f"input-{tag}", [("X", _rx), ("A", None if axes is None else
                                                  np.array(axes, np.int64))],
                opset=since, keepdims=keep)
    add(op, "opset1-attr", [("X", _rx)], opset=1, ref="reference", axes=[1])
    # noop_with_empty_axes keeps the elementwise part (abs, square, log, exp...): signed data
    add(op, "noop-empty-axes", [("X", _signed), ("A", np.zeros(0, np.int64))], opset=since,
        noop_with_empty_axes=1)
    add(op, "noop-absent-axes", [("X", _signed)], opset=since, noop_with_empty_axes=1)
    add(op, "empty-axes-all", [("X", _rx), ("A", np.zeros(0, np.int64))], opset=since)
    add(op, "scalar", [("X", np.array(1.25, F32))], opset=since, keepdims=0)
    add(op, "f64", [("X", _rx.astype(F64)), ("A", ints(1))], opset=since)
    if op not in ("ReduceLogSum", "ReduceLogSumExp") or since < 28:
        add(op, "f16", [("X", _rx.astype(F16)), ("A", ints(1))], opset=since, ref="f32",
            rtol=2e-3, atol=2e-3)
        add(op, "bf16", [("X", _rx.astype(BF16)), ("A", ints(2))], opset=since, ref="f32",
            rtol=1.6e-2, atol=1.6e-2)
    if op not in ("ReduceLogSum", "ReduceLogSumExp"):
        add(op, "int32", [("X", randint(1, 5, 2, 3, 4)), ("A", ints(1))], opset=since)
        add(op, "int64", [("X", randint(1, 5, 3, 4, dtype=np.int64))], opset=since)
    for axes in ([1], [0]):
        empty = np.zeros((2, 0, 3), F32)
        add(op, f"empty-set-axes{axes}", [("X", empty), ("A", np.array(axes))], opset=since,
            ref="reference")
        add(op, f"empty-set-axes{axes}-k0", [("X", empty), ("A", np.array(axes))],
            opset=since, ref="reference", keepdims=0)
add("ReduceMax", "bool", [("X", normal(3, 4) > 0), ("A", ints(1))], opset=20)
add("ReduceMin", "bool", [("X", normal(3, 4) > 0), ("A", ints(0))], opset=20)
add("ReduceMax", "uint8", [("X", randint(0, 250, 3, 4, dtype=np.uint8)), ("A", ints(1))])
add("ReduceLogSumExp", "large", [("X", np.array([[1000, 999, -np.inf], [-np.inf] * 3], F32)),
                                 ("A", ints(1))])

for op, opset in (("CumSum", 14), ("CumProd", 26)):
    base = uniform(0.5, 1.5, 2, 3, 4)
    for ex in (0, 1):
        for rev in (0, 1):
            for axis in (0, 1, -1):
                add(op, f"ax{axis}-ex{ex}-rev{rev}", [("X", base), ("A", np.array(axis))],
                    opset=opset, exclusive=ex, reverse=rev)
    add(op, "axis-int32-1d", [("X", base), ("A", np.array([2], np.int32))], opset=opset)
    for dt in (np.int32, np.int64, np.uint32, np.uint64, F64):
        add(op, np.dtype(dt).name, [("X", randint(1, 4, 3, 5, dtype=dt)),
                                    ("A", np.array(1))], opset=opset, exclusive=1)
    add(op, "f16", [("X", base.astype(F16)), ("A", np.array(1))], opset=opset, ref="f32",
        rtol=2e-3, atol=2e-3)
    add(op, "bf16", [("X", base.astype(BF16)), ("A", np.array(2))], opset=opset, ref="f32",
        rtol=1.6e-2, atol=1.6e-2)
    add(op, "empty", [("X", np.zeros((2, 0), F32)), ("A", np.array(1))], opset=opset,
        exclusive=1, ref="reference")
add("CumSum", "opset11", [("X", normal(4, 3)), ("A", np.array(0))], opset=11, reverse=1)

_hm = np.array([[[1, 3, 3, 0], [2, 0, 5, 5], [0, 1, 1, 0]],
                [[7, 7, 1, 1], [0, 0, 0, 0], [2, 3, 9, 1]]], F32)
for opset in (11, 13):
    for axis in (0, 1, 2, -1):
        add("Hardmax", f"axis{axis}", [("X", _hm)], opset=opset, axis=axis)
    add("Hardmax", "default", [("X", _hm)], opset=opset)
    add("Hardmax", "f64", [("X", _hm.astype(F64))], opset=opset, ref="f32")
add("Hardmax", "f16", [("X", _hm.astype(F16))], opset=13, ref="reference")
add("Hardmax", "bf16", [("X", _hm.astype(BF16))], opset=13, ref="reference")

# -- linear algebra ---------------------------------------------------------------------------
_einsum = [("ij->ji", [(3, 4)]), ("ij", [(3, 4)]), ("ii->i", [(3, 3)]), ("ii", [(4, 4)]),
           ("ij->", [(3, 4)]), ("ij,jk->ik", [(2, 3), (3, 4)]), ("ij,jk", [(2, 3), (3, 4)]),
           ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]), ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 2)]),
           ("i,j->ij", [(3,), (4,)]), ("i,i", [(5,), (5,)]), ("bii->bi", [(2, 3, 3)]),
           ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]), ("...i->...", [(2, 3, 4)]),
           ("i j , j k -> i k", [(2, 3), (3, 2)]), (",->", [(), ()])]
for eq, shapes in _einsum:
    ins = [(f"X{i}", normal(*s)) for i, s in enumerate(shapes)]
    add("Einsum", eq, ins, opset=12, equation=eq)
add("Einsum", "upper-case", [("X", normal(2, 3)), ("Y", normal(3, 4))], opset=12,
    ref="reference", equation="Ab,bC->AC")
add("Einsum", "implicit-order", [("X", normal(2, 3)), ("Y", normal(3, 4))], opset=12,
    ref="reference", equation="bA,Ac")
add("Einsum", "int32", [("X", randint(-5, 5, 2, 3)), ("Y", randint(-5, 5, 3, 4))], opset=12,
    equation="ij,jk->ik")
add("Einsum", "int64-trace", [("X", randint(-5, 5, 3, 3, dtype=np.int64))], opset=12,
    equation="ii")
add("Einsum", "f64", [("X", normal(2, 3, dtype=F64)), ("Y", normal(3, dtype=F64))], opset=12,
    equation="ij,j->i")
add("Einsum", "f16", [("X", normal(2, 3, dtype=F16)), ("Y", normal(3, 4, dtype=F16))],
    opset=12, ref="f32", rtol=2e-3, atol=2e-3, equation="ij,jk->ik")
add("Einsum", "bf16", [("X", normal(2, 3, dtype=BF16)), ("Y", normal(3, 4, dtype=BF16))],
    opset=28, ref="f32", rtol=1.6e-2, atol=1.6e-2, equation="ij,jk->ik")

for shape in [(3, 3), (2, 4, 4), (2, 2, 1, 1), (3, 2, 2)]:
    add("Det", f"{list(shape)}", [("X", normal(*shape))], opset=11)
add("Det", "singular", [("X", np.array([[1, 2], [2, 4]], F32))], opset=11)
add("Det", "f64", [("X", normal(3, 3, dtype=F64))], opset=22, rtol=1e-10)
add("Det", "f16", [("X", normal(2, 3, 3, dtype=F16))], opset=22, ref="f32", rtol=5e-3,
    atol=5e-3)
add("Det", "bf16", [("X", normal(3, 3, dtype=BF16))], opset=22, ref="f32", rtol=2e-2, atol=2e-2)

# Existing elementwise/linalg kernels over the dtypes their schemas allow.
for dt, tol in ((F16, 2e-3), (BF16, 1.6e-2)):
    name = np.dtype(dt).name
    add("MatMul", name, [("A", normal(3, 4, dtype=dt)), ("B", normal(2, 4, 5, dtype=dt))],
        ref="f32", rtol=tol, atol=tol)
    add("Gemm", name, [("A", normal(4, 3, dtype=dt)), ("B", normal(4, 5, dtype=dt)),
                       ("C", normal(5, dtype=dt))], ref="f32", rtol=tol, atol=tol, transA=1,
        alpha=0.5, beta=2.0)
    add("Pow", name, [("A", uniform(0.5, 2, 6, dtype=dt)), ("B", uniform(-2, 2, 6))], opset=15,
        ref="f32", rtol=tol, atol=tol)
    for op in ("Relu", "Abs", "Neg", "Sign", "Floor", "Ceil", "Round", "Exp", "Tanh"):
        add(op, name, [("X", _x.astype(dt))], opset=13 if op != "Round" else 22, ref="f32",
            rtol=tol, atol=tol)
    add("Clip", name, [("X", _x.astype(dt)), ("lo", np.array(-1, dt)), ("hi", np.array(2, dt))],
        opset=13, ref="f32")
for dt in (np.int8, np.int16, np.int32, np.int64):
    add("Relu", np.dtype(dt).name, [("X", randint(-9, 9, 6, dtype=dt))], opset=14)
    add("Neg", np.dtype(dt).name, [("X", randint(-9, 9, 6, dtype=dt))], opset=13)
for dt in _num:
    lo = 0 if np.dtype(dt).kind == "u" else -9
    add("Abs", np.dtype(dt).name, [("X", randint(lo, 9, 6, dtype=dt))], opset=13)
    add("Sign", np.dtype(dt).name, [("X", randint(lo, 9, 6, dtype=dt))], opset=13)
    add("Clip", np.dtype(dt).name, [("X", randint(lo, 9, 6, dtype=dt)),
                                    ("lo", np.array(lo // 2 + 1, dt)), ("hi", np.array(5, dt))],
        opset=13)
    add("Max", np.dtype(dt).name, [("A", randint(lo, 9, 6, dtype=dt)),
                                   ("B", randint(lo, 9, 6, dtype=dt))], opset=13)
    add("Div", np.dtype(dt).name, [("A", randint(lo, 90, 6, dtype=dt)),
                                   ("B", randint(1, 9, 6, dtype=dt))], opset=14)
add("Pow", "int-negative-exponent", [("A", ints(2, 1, -1, -1, 0, 3, -2, dtype=np.int32)),
                                      ("B", ints(-1, -3, -3, -2, 2, 2, 3, dtype=np.int32))],
    opset=15)
add("Pow", "int64-int32", [("A", ints(2, 3, -4)), ("B", ints(3, 0, 2, dtype=np.int32))],
    opset=15)
add("Clip", "opset6-attrs", [("X", _x)], opset=6, min=-0.5, max=0.7)
add("Clip", "opset6-min-only", [("X", _x)], opset=6, min=0.1)
add("Clip", "min-above-max", [("X", _x), ("lo", np.array(2, F32)), ("hi", np.array(1, F32))],
    opset=13)
add("Erf", "int32-opset9", [("X", randint(-3, 3, 6))], opset=9, ref="reference")


def _ort_or_reference(model, feeds):
    """onnxruntime; the reference evaluator where this onnxruntime has no kernel for the
    op/opset/dtype (e.g. most float64 activations)."""
    try:
        return run_ort(model, feeds)["y0"]
    except Exception as exc:  # noqa: BLE001 - only a missing kernel falls back
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
    return run_reference(model, feeds)["y0"]


def _expected(case: Case, model, feeds):
    if case.ref == "reference":
        return run_reference(model, feeds)["y0"]
    if case.ref == "ort":
        return _ort_or_reference(model, feeds)
    if callable(case.ref):
        return np.asarray(case.ref(*feeds.values())).astype(case.inputs[0][1].dtype)
    # "f32": onnxruntime on float32 copies of the float inputs, rounded back.
    low = next(v.dtype for _, v in case.inputs if v is not None and v.dtype in (F16, BF16, F64))
    up = [(k, None if v is None else v.astype(F32) if v.dtype in (F16, BF16, F64) else v)
          for k, v in case.inputs]
    model32 = node_model(case.op, up, opset=case.opset, **case.attrs)
    want = _ort_or_reference(model32, {k: v for k, v in up if v is not None})
    return want.astype(low) if want.dtype == F32 else want


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel(case: Case):
    model = node_model(case.op, case.inputs, opset=case.opset, **case.attrs)
    feeds = {k: v for k, v in case.inputs if v is not None}
    got = run(model, feeds)["y0"]
    assert_same(got, _expected(case, model, feeds), case.rtol, case.atol, case.id)


# -- properties -----------------------------------------------------------------------------------
def test_erf_accuracy():
    """The host erf (series + continued fraction) against math.erf over the whole range."""
    xs = np.concatenate([np.linspace(-7, 7, 20001), [0.0, -0.0, 1e-300, 40, -40]])
    want = np.array([math.erf(v) for v in xs])
    np.testing.assert_allclose(erf(np, xs), want, rtol=2e-15, atol=2e-15)
    np.testing.assert_allclose(erf(np, xs.astype(F32)), want.astype(F32), rtol=2e-7, atol=1e-7)
    special = erf(np, np.array([np.inf, -np.inf, np.nan]))
    assert special[0] == 1 and special[1] == -1 and np.isnan(special[2])


def test_versions_registered():
    """Opset-specific semantics pick different kernels."""
    assert get_kernel("Hardmax", 11) is not get_kernel("Hardmax", 13)
    assert get_kernel("Selu", 1) is not get_kernel("Selu", 6)
    assert get_kernel("Clip", 6) is not get_kernel("Clip", 11)
    assert get_kernel("ReduceL2", 13) is not get_kernel("ReduceL2", 18)
    assert get_kernel("ReduceSum", 11) is not get_kernel("ReduceSum", 13)
    for op, first in [("Mod", 10), ("BitShift", 11), ("CumSum", 11), ("CumProd", 26),
                      ("Einsum", 12), ("Det", 11), ("BitCast", 26), ("SwiGLU", 28)]:
        assert get_kernel(op, first - 1) is None and get_kernel(op, first) is not None


_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=4).map(tuple)


@settings(max_examples=40, deadline=None)
@given(shape=_shapes, data=st.data(), keep=st.booleans(),
       op=st.sampled_from(["ReduceSum", "ReduceL1", "ReduceL2", "ReduceMax", "ReduceProd",
                           "ReduceLogSumExp", "ReduceMean"]))
def test_reduce_property(shape, data, keep, op):
    """Reduce* over random shapes (empty ones included) and axis subsets match NumPy."""
    x = np.asarray(_rng.uniform(0.5, 1.5, shape), F64)
    axes = data.draw(st.lists(st.integers(0, max(len(shape) - 1, 0)), unique=True,
                              max_size=len(shape)))
    feeds = {"X": x, "A": np.array(axes, np.int64)} if axes else {"X": x}
    model = node_model(op, [("X", x), ("A", feeds.get("A"))], opset=18, keepdims=int(keep))
    got = run(model, feeds)["y0"]
    ax = tuple(axes) or None
    ref = {"ReduceSum": lambda: x.sum(ax, keepdims=keep),
           "ReduceL1": lambda: np.abs(x).sum(ax, keepdims=keep),
           "ReduceL2": lambda: np.sqrt((x * x).sum(ax, keepdims=keep)),
           "ReduceMax": lambda: np.maximum.reduce(x, ax, keepdims=keep, initial=-np.inf),
           "ReduceProd": lambda: x.prod(ax, keepdims=keep),
           "ReduceLogSumExp": lambda: np.log(np.exp(x).sum(ax, keepdims=keep)),
           "ReduceMean": lambda: x.mean(ax, keepdims=keep)}[op]
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.asarray(ref())
    assert_same(got, want, 1e-12, 1e-12, op)


_int_types = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32])


@settings(max_examples=30, deadline=None)
@given(dt=_int_types, sa=st.lists(st.integers(1, 3), max_size=3).map(tuple), data=st.data(),
       left=st.booleans())
def test_bitshift_property(dt, sa, data, left):
    """BitShift (opset 28) against Python integers: shifts past the width give 0 or -1."""
    k = data.draw(st.integers(0, len(sa)))  # y broadcasts: a suffix of x's shape, some dims 1
    sb = tuple(d if data.draw(st.booleans()) else 1 for d in sa[len(sa) - k:])
    info, bits = np.iinfo(dt), np.dtype(dt).itemsize * 8
    x = _rng.integers(info.min, info.max, sa, endpoint=True).astype(dt)
    y = _rng.integers(max(info.min, -3), min(info.max, bits + 3), sb, endpoint=True).astype(dt)
    model = node_model("BitShift", [("X", x), ("Y", y)], opset=28,
                       direction="LEFT" if left else "RIGHT")
    got = run(model, {"X": x, "Y": y})["y0"]
    xb, yb = np.broadcast_arrays(x, y)
    want = []
    for a, s in zip(xb.ravel().tolist(), yb.ravel().tolist(), strict=True):
        if s < 0 or s >= bits:
            want.append(-1 if (not left and a < 0) else 0)
        elif left:
            v = (a << s) & ((1 << bits) - 1)  # two's complement wrap
            want.append(v - (1 << bits) if info.min < 0 and v >= 1 << (bits - 1) else v)
        else:
            want.append(a >> s)
    assert_same(got, np.array(want, dt).reshape(xb.shape), 0, 0, "BitShift")


@settings(max_examples=30, deadline=None)
@given(dt=_int_types, fmod=st.integers(0, 1), n=st.integers(1, 12))
def test_mod_property(dt, fmod, n):
    """Integer Mod against Python: fmod=0 takes the divisor's sign, fmod=1 the dividend's."""
    info = np.iinfo(dt)
    a = _rng.integers(info.min // 2, info.max // 2, n).astype(dt)
    b = _rng.integers(max(info.min, -50), min(info.max, 50), n).astype(dt)
    b[b == 0] = 1
    got = run(node_model("Mod", [("A", a), ("B", b)], opset=13, fmod=fmod),
              {"A": a, "B": b})["y0"]
    want = [_trunc_mod(p, q) if fmod else p % q for p, q in zip(a.tolist(), b.tolist(),
                                                                  strict=True)]
    assert_same(got, np.array(want).astype(dt), 0, 0, "Mod")


def _trunc_mod(p: int, q: int) -> int:
    quotient = abs(p) // abs(q) * (1 if (p < 0) == (q < 0) else -1)
    return p - q * quotient


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=4).map(tuple), data=st.data(),
       keep=st.booleans(), dt=st.sampled_from([np.float32, np.float64]),
       strided=st.booleans())
def test_blas_sums_match_numpy_and_the_exact_sum(shape, data, keep, dt, strided):
    """sum_of / mean_of (BLAS products for rows, columns and BatchNorm's statistics, NumPy
    elsewhere): NumPy's shapes, an error within NumPy's own bound against the float64 sum, the
    same bits with out= as without, and the ReduceSum/ReduceMean kernels give the same."""
    from trainer.kernels.reduce import mean_of, sum_of
    x = _rng.standard_normal(shape).astype(dt)
    if strided and x.ndim:
        x = np.repeat(x, 2, axis=-1)[..., ::2]  # (not C-contiguous: NumPy's path)
    axes = data.draw(st.lists(st.integers(0, max(x.ndim - 1, 0)), unique=True,
                              max_size=x.ndim)) if x.ndim else []
    ax = tuple(axes) or None
    got, want = sum_of(np, x, ax, keep), x.sum(ax, keepdims=keep)
    assert np.shape(got) == np.shape(want) and np.asarray(got).dtype == dt
    exact = x.astype(np.float64).sum(ax, keepdims=keep)
    bound = np.abs(x).astype(np.float64).sum(ax, keepdims=keep)
    n = x.size // max(np.size(exact), 1)
    eps = np.finfo(dt).eps
    assert np.all(np.abs(got - exact) <= 2 * n * eps * bound + 1e-30)
    out = np.empty(np.shape(want), dt)
    assert sum_of(np, x, ax, keep, out) is out
    np.testing.assert_array_equal(out, got)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the mean of an empty set)
        mean = mean_of(np, x, ax, keep)
        np.testing.assert_allclose(mean, x.mean(ax, keepdims=keep), rtol=4 * n * eps,
                                   atol=1e-6 if dt == np.float32 else 1e-12)
        feeds = {"X": x, "A": np.array(axes, np.int64)} if axes else {"X": x}
        for op, ref in (("ReduceSum", got), ("ReduceMean", mean)):
            model = node_model(op, [("X", x), ("A", feeds.get("A"))], opset=18,
                               keepdims=int(keep))
            np.testing.assert_array_equal(run(model, feeds)["y0"], ref)


@pytest.mark.parametrize("shape, axes, blas", [
    ((64, 128), (1,), True),  # rows (LayerNorm, softmax)
    ((16, 4, 64, 64), (3,), True),
    ((1024, 512), (0,), True),  # columns (bias gradients)
    ((16, 16, 32, 32), (0, 2, 3), True),  # BatchNorm's statistics
    ((4, 8, 2048), (2,), False),  # rows too long: NumPy's pairwise sum
    ((16, 128), (0,), True),  # small: the MLP's bias gradients
    ((4, 4), (1,), True),
    ((0, 4), (0,), False),  # empty: NumPy's sum
    ((8, 16, 64), (1,), False),  # a middle axis
])
def test_blas_sum_paths_and_layouts(shape, axes, blas):
    from trainer.kernels.reduce import sum_of, sum_plan
    dt = np.dtype(np.float32)
    assert (sum_plan(shape, dt, axes, False) is not None) == blas
    x = _rng.standard_normal(shape).astype(dt)
    got = sum_of(np, x, axes)
    exact = x.astype(np.float64).sum(axes)
    n = x.size // exact.size
    assert np.all(np.abs(got - exact) <= 2 * n * np.finfo(dt).eps
                  * np.abs(x).astype(np.float64).sum(axes))
    # any memory layout adds the same way (the planner may hand a view to the kernel's sum)
    view = np.asfortranarray(x)
    np.testing.assert_array_equal(sum_of(np, view, axes), got)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_matches_torch_to_a_few_ulps_at_every_range(dtype):
    """Sigmoid as 1 / (1 + e^-x), PyTorch's formula: within 4 ulps of torch.sigmoid from the
    saturated tails (e^-x overflows to inf below -88 in float32: the limit 0, no warning) to
    the middle, and inf, -inf and NaN pass through."""
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.linspace(-120, 120, 20001), [0.0, -0.0, np.inf, -np.inf, np.nan,
                                                      -88.7, -745.2, 36.0, -17.0]]).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = get_kernel("Sigmoid", 13)(np, x)[0]
    want = torch.sigmoid(torch.from_numpy(x)).numpy()
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    ulps = np.abs(got[ok] - want[ok]) / np.spacing(np.abs(want[ok]).astype(dtype))
    assert ulps.max() <= 4, ulps.max()


@settings(max_examples=150, deadline=None)
@given(rows=st.sampled_from([1, 7, 300, 5000]), n=st.sampled_from([2, 3, 10, 16, 17, 64, 512,
                                                                     513]),
       lead=st.booleans(), dtype=st.sampled_from([np.float32, np.float64, np.float16]),
       special=st.sampled_from(["none", "nan", "-inf row", "inf", "zeros"]),
       seed=st.integers(0, 2 ** 16))
def test_row_max_is_numpys_max(rows, n, lead, dtype, special, seed):
    """max_of (the softmax family's shift) gives x.max bit for bit, NaN and infinities
    included, on its fast paths (short trailing rows) and off them."""
    from trainer.kernels.reduce import max_of

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype(dtype)
    if special == "nan":
        x[rng.integers(0, rows, 3), rng.integers(0, n, 3)] = np.nan
    elif special == "-inf row":
        x[rng.integers(0, rows)] = -np.inf
    elif special == "inf":
        x[rng.integers(0, rows, 3), rng.integers(0, n, 3)] = np.inf
    elif special == "zeros":
        x[:] = np.where(rng.random(x.shape) < 0.5, -0.0, 0.0)
    if lead:
        x = x.reshape(1, rows, n)
    axes = (x.ndim - 1,)
    for keepdims in (True, False):
        got = max_of(np, x, axes, keepdims)
        want = x.max(axis=axes, keepdims=keepdims)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    if lead:  # the two trailing axes together
        np.testing.assert_array_equal(max_of(np, x, (1, 2)), x.max(axis=(1, 2), keepdims=True))
