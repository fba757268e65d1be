"""Shape, indexing and loss kernels against onnxruntime / the ONNX reference evaluator, over the
opsets, attributes and dtypes the ONNX node suite leaves out, plus property tests."""

from __future__ import annotations

import types

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from tests.opcases import (
    KernelCase,
    KernelTable,
    make_model,
    ours_and_reference,
    run,
)
from tests.opcases import assert_same as same
from trainer.kernels import shape as K

F32, F16, BF16 = np.float32, np.float16, ml_dtypes.bfloat16
_rng = np.random.default_rng(11)


def normal(*shape: int, dtype=F32) -> np.ndarray:
    return np.asarray(_rng.standard_normal(shape), dtype=dtype)


def randint(low: int, high: int, *shape: int, dtype=np.int64) -> np.ndarray:
    return _rng.integers(low, high, shape).astype(dtype)


def ints(*values: int, dtype=np.int64) -> np.ndarray:
    return np.array(values, dtype)


def assert_same(got, want, what: str = "", rtol: float = 1e-5, atol: float = 1e-6) -> None:
    # half precision compares in float64 at 4e-3
    same(got, want, rtol, atol, what, low_tol=4e-3)


_table = KernelTable(opset=18, atol=1e-06, suffix="-op{opset}")
CASES = _table.cases
add = _table.add
Case = KernelCase


# -- Pad: every mode, attribute (opset 2) and input forms, axes, negative pads, dtypes ---------
_x = normal(3, 4)
for mode in ("constant", "edge", "reflect"):
    add("Pad", f"attr-{mode}", [("X", _x)], opset=2, pads=[1, 0, 0, 2], mode=mode, value=1.5)
    add("Pad", f"crop-{mode}", [("X", _x), ("p", ints(-1, 1, 1, -2))], opset=13, mode=mode)
    add("Pad", f"int32-{mode}", [("X", randint(-9, 9, 2, 3, 4, dtype=np.int32)),
                                 ("p", ints(0, 1, 2, 1, 2, 0))], opset=11, mode=mode)
    add("Pad", f"axes-{mode}", [("X", _x), ("p", ints(2, 1)), ("c", None),
                                ("a", ints(-1, dtype=np.int32))], opset=18, mode=mode)
for opset in (19, 21, 23, 24, 25):
    add("Pad", "wrap", [("X", _x), ("p", ints(2, 1, 1, 3))], opset=opset, mode="wrap")
add("Pad", "wrap-crop", [("X", _x), ("p", ints(2, -1, 1, 1))], opset=19, mode="wrap")
add("Pad", "wrap-axes", [("X", normal(2, 3, 4)), ("p", ints(1, 4, 0, 2)), ("c", None),
                         ("a", ints(0, 2))], opset=19, mode="wrap")
add("Pad", "value", [("X", _x), ("p", ints(1, 2, 0, 1)), ("c", np.array(-3.5, F32))], opset=11)
add("Pad", "value-f16", [("X", _x.astype(F16)), ("p", ints(1, 2, 0, 1)),
                         ("c", np.array(2, F16))], opset=13)
add("Pad", "f64-reflect", [("X", normal(4, 5, dtype=np.float64)), ("p", ints(3, 4, 3, 4))],
    opset=13, mode="reflect")
add("Pad", "bool", [("X", _x > 0), ("p", ints(1, 2)), ("c", np.array(True)), ("a", ints(1))],
    opset=18)
add("Pad", "uint8-edge", [("X", randint(0, 200, 5, dtype=np.uint8)), ("p", ints(3, 2))],
    opset=21, mode="edge")
add("Pad", "bf16", [("X", _x.astype(BF16)), ("p", ints(1, 0, 0, 2))], opset=21,
    ref="reference")
add("Pad", "attr-opset1", [("X", _x)], opset=1, paddings=[1, 0, 0, 2], value=2.0,
    ref="reference")

# -- Tile ------------------------------------------------------------------------------------
add("Tile", "2d", [("X", _x), ("r", ints(2, 3))], opset=13)
add("Tile", "bool-zero", [("X", _x > 0), ("r", ints(0, 2))], opset=6)
add("Tile", "int8-3d", [("X", randint(-5, 5, 2, 1, 3, dtype=np.int8)), ("r", ints(1, 3, 2))])

# -- GatherElements / GatherND --------------------------------------------------------------
_g = normal(3, 4, 5)
add("GatherElements", "axis1-neg", [("X", _g), ("i", randint(-4, 4, 3, 2, 5))], axis=1)
add("GatherElements", "axis-last-int32",
    [("X", _g), ("i", randint(-5, 5, 3, 4, 7, dtype=np.int32))], axis=-1, opset=11)
add("GatherElements", "int64-data", [("X", randint(0, 99, 4, 3)), ("i", randint(0, 4, 2, 3))])
add("GatherND", "b0-slices", [("X", _g), ("i", randint(-3, 3, 2, 2, 1))])
add("GatherND", "b0-elements", [("X", _g), ("i", np.stack([randint(-3, 3, 6), randint(0, 4, 6),
                                                          randint(-5, 5, 6)], -1))], opset=11)
add("GatherND", "b1", [("X", _g), ("i", np.stack([randint(0, 4, 3, 2), randint(-5, 5, 3, 2)],
                                                  -1))], batch_dims=1, opset=12)
add("GatherND", "b2", [("X", _g), ("i", randint(0, 5, 3, 4, 2, 1))], batch_dims=2)
add("GatherND", "bool", [("X", _g > 0), ("i", randint(0, 3, 4, 1))])

# -- ScatterND / ScatterElements / Scatter / TensorScatter ------------------------------------
_d = normal(4, 3, 2)
_dup = ints(0, 2, 0, -1, 2, 0).reshape(6, 1)  # row 0 three times, row 2 twice (-1 == 3)
for red in ("none", "add", "mul", "max", "min"):
    idx = _dup if red != "none" else ints(0, 2, -1).reshape(3, 1)
    add("ScatterND", f"rows-{red}", [("X", _d), ("i", idx), ("u", normal(idx.shape[0], 3, 2))],
        reduction=red, opset=18 if red in ("max", "min") else 16)
    add("ScatterND", f"elements-{red}-int32",
        [("X", randint(-9, 9, 4, 3, dtype=np.int32)), ("i", ints(1, 2, 1, 2, 3, 0).reshape(3, 2)),
         ("u", randint(-9, 9, 3, dtype=np.int32))], reduction=red, opset=18)
    add("ScatterElements", f"dup-{red}",
        [("X", _d), ("i", randint(-4, 4, 5, 3, 2)), ("u", normal(5, 3, 2))],
        reduction=red if red != "none" else "add", axis=0)
add("ScatterND", "k2-slices", [("X", _d), ("i", ints(0, 1, 3, -1).reshape(2, 2)),
                               ("u", normal(2, 2))], opset=13)
add("ScatterND", "opset11", [("X", _d), ("i", ints(1, 0).reshape(2, 1)), ("u", normal(2, 3, 2))],
    opset=11)
add("ScatterElements", "axis-neg-none", [("X", _d), ("i", ints(0, -2, 1, 0).reshape(2, 2, 1)),
                                         ("u", normal(2, 2, 1))], axis=-1, opset=11)
add("Scatter", "opset9", [("X", _x), ("i", ints(1, 0, 2, 2, 1, 0).reshape(2, 3)),
                          ("u", normal(2, 3))], opset=9)
add("Scatter", "opset10-axis1", [("X", _x), ("i", ints(3, 1, 0).reshape(1, 3)),
                                 ("u", normal(1, 3))], axis=1, opset=10)
_cache = normal(2, 3, 6, 4)
for mode in ("linear", "circular"):
    add("TensorScatter", f"{mode}", [("P", _cache), ("U", normal(2, 3, 3, 4)),
                                    ("w", ints(1, 3 if mode == "linear" else 5))],
        mode=mode, opset=24)
add("TensorScatter", "no-indices", [("P", _cache), ("U", normal(2, 3, 2, 4))], opset=24)
add("TensorScatter", "axis1", [("P", normal(2, 5, 3)), ("U", normal(2, 2, 3)),
                               ("w", ints(4, 0))], axis=1, mode="circular", opset=24)

# -- TopK: every opset, largest/smallest, ties, dtypes ----------------------------------------
_ties = np.array([[3, 1, 3, 2, 1, 3], [0, 0, 5, 5, 0, 1]], np.int32)
add("TopK", "opset1", [("X", _x)], n_out=2, opset=1, k=2)
add("TopK", "opset10-axis0", [("X", _x), ("k", ints(2))], n_out=2, opset=10, axis=0)
for opset in (11, 24):
    for largest in (0, 1):
        add("TopK", f"ties-largest{largest}", [("X", _ties), ("k", ints(4))], n_out=2,
            opset=opset, largest=largest)
        add("TopK", f"f64-axis0-largest{largest}", [("X", normal(5, 3, dtype=np.float64)),
                                                    ("k", ints(5))], n_out=2, opset=opset,
            axis=0, largest=largest)
add("TopK", "uint64-smallest", [("X", _ties.astype(np.uint64)), ("k", ints(3))], n_out=2,
    opset=11, largest=0, ref="reference")
add("TopK", "f16-k0", [("X", normal(2, 5, dtype=F16)), ("k", ints(0))], n_out=2, opset=11)
add("TopK", "bf16", [("X", normal(3, 5, dtype=BF16)), ("k", ints(2))], n_out=2, opset=24,
    ref="reference")

# -- Unique ----------------------------------------------------------------------------------
_u = np.array([[1, 0, 0], [1, 0, 0], [2, 3, 4], [0, 5, 0]], np.int64)
for srt in (0, 1):
    add("Unique", f"flat-sorted{srt}", [("X", randint(0, 5, 3, 4))], n_out=4, opset=11,
        sorted=srt)
    add("Unique", f"int32-sorted{srt}", [("X", randint(0, 5, 9, dtype=np.int32))], n_out=4,
        opset=11, sorted=srt, ref="reference")
    add("Unique", f"float-sorted{srt}", [("X", np.array([2.5, -1, 2.5, 0, -1, 7], F32))],
        n_out=4, opset=11, sorted=srt)
    for axis in (0, 1, -1):
        add("Unique", f"axis{axis}-sorted{srt}", [("X", _u)], n_out=4, opset=11, sorted=srt,
            axis=axis)
add("Unique", "axis-3d", [("X", randint(0, 2, 2, 5, 2, dtype=np.int8))], n_out=4, opset=11,
    axis=1)
add("Unique", "y-only", [("X", randint(0, 5, 7))], opset=11)
add("Unique", "nan-is-one-value", [("X", np.array([1.5, np.nan, 0, np.nan, 1.5], F32))],
    n_out=4, opset=11, ref="reference")

# -- string tensors (host-only NumPy object arrays) -------------------------------------------
_str = np.array([["a", "bb", "a"], ["c", "a", "dd"]], dtype=object)
add("Tile", "string", [("X", _str), ("r", ints(2, 1))], opset=13)
add("Compress", "string", [("X", _str), ("c", np.array([True, False, True]))], axis=1, opset=11)
add("ReverseSequence", "string", [("X", _str), ("l", ints(2, 1, 1))], opset=10)
add("ScatterND", "string", [("X", _str), ("i", ints(1).reshape(1, 1)),
                            ("u", np.array([["q", "r", "s"]], dtype=object))], opset=13)
add("Pad", "string-value", [("X", _str), ("p", ints(1, 0, 0, 1)),
                            ("c", np.array("z", dtype=object))], opset=18, ref="reference")
add("Unique", "string", [("X", _str.reshape(-1))], n_out=4, opset=11, ref="reference")

# -- NonZero, Trilu, ReverseSequence, Compress ------------------------------------------------
add("NonZero", "3d-int", [("X", randint(-1, 2, 2, 3, 4))], opset=9)
add("NonZero", "bool", [("X", _x > 0)], opset=13)
add("NonZero", "scalar", [("X", np.array(3.0, F32))], opset=13, ref="reference")  # spec: (0, N)
for upper in (0, 1):
    for k in (-2, -1, 0, 1, 3, 9):
        add("Trilu", f"upper{upper}-k{k}", [("X", normal(2, 3, 5)), ("k", ints(k))],
            opset=14, upper=upper)
    add("Trilu", f"upper{upper}-int-nok", [("X", randint(1, 9, 4, 3, dtype=np.int32))],
        opset=14, upper=upper)
add("ReverseSequence", "batch0-3d", [("X", normal(3, 5, 2)), ("l", ints(5, 1, 3))], opset=10,
    batch_axis=0, time_axis=1)
add("ReverseSequence", "time0-int", [("X", randint(0, 9, 4, 3, dtype=np.int32)),
                                     ("l", ints(2, 4, 1))], opset=10)
add("Compress", "axis-none", [("X", _g), ("c", _rng.random(60) > 0.5)], opset=11)
add("Compress", "axis1-short", [("X", _g), ("c", np.array([True, False, True]))], axis=1,
    opset=11)
add("Compress", "axis-neg", [("X", _g), ("c", np.array([False, True, True, False, True]))],
    axis=-1, opset=11)

# -- DepthToSpace / SpaceToDepth --------------------------------------------------------------
_ds = normal(2, 8, 2, 3)
add("DepthToSpace", "opset1", [("X", _ds)], opset=1, blocksize=2)
for mode in ("DCR", "CRD"):
    add("DepthToSpace", mode, [("X", _ds)], opset=13, blocksize=2, mode=mode)
add("DepthToSpace", "int", [("X", randint(0, 9, 1, 9, 2, 2))], opset=11, blocksize=3,
    ref="reference")
add("SpaceToDepth", "opset1", [("X", normal(2, 3, 4, 6))], opset=1, blocksize=2)
add("SpaceToDepth", "int", [("X", randint(0, 9, 1, 2, 3, 6, dtype=np.int32))], opset=13,
    blocksize=3, ref="reference")
for mode in ("DCR", "CRD"):  # mode is opset 28
    add("SpaceToDepth", mode, [("X", normal(2, 3, 4, 6))], opset=28, blocksize=2, mode=mode,
        ref="reference")

# -- existing shape kernels at older opsets and other dtypes ----------------------------------
add("Slice", "opset1", [("X", _g)], opset=1, starts=[1, -1], ends=[100, -4], axes=[0, 2])
add("Slice", "neg-steps", [("X", _g), ("s", ints(-1, 10)), ("e", ints(-100, 0)),
                           ("a", ints(0, 2)), ("st", ints(-1, -2))], opset=13)
add("Slice", "neg-step-int32", [("X", _g), ("s", ints(2, dtype=np.int32)),
                                ("e", ints(-2**31, dtype=np.int32)), ("a", ints(1, dtype=np.int32)),
                                ("st", ints(-3, dtype=np.int32))], opset=13)
add("Split", "opset2-attr", [("X", _x)], n_out=2, opset=2, axis=1, split=[1, 3])
add("Split", "opset11-equal", [("X", normal(4, 6))], n_out=3, opset=11, axis=-1)
add("Split", "num-outputs-5-of-7", [("X", normal(7, 2))], n_out=4, opset=18, num_outputs=4)
add("Gather", "neg-int32", [("X", _g), ("i", ints(-1, 0, -3, dtype=np.int32))], axis=1, opset=13)
add("Reshape", "opset4-attr", [("X", _g)], opset=4, shape=[0, -1])
add("Reshape", "allowzero", [("X", np.zeros((0, 3), F32)), ("s", ints(3, 0))], opset=14,
    allowzero=1)
add("Squeeze", "opset11-neg", [("X", normal(1, 3, 1))], opset=11, axes=[-1])
add("Unsqueeze", "opset11-neg", [("X", normal(3, 2))], opset=11, axes=[-1, 0])
add("Unsqueeze", "scalar-axes", [("X", normal(3, 2)), ("a", np.array(1, np.int64))], opset=13,
    ref="reference")
add("Flatten", "neg-axis", [("X", _g)], opset=13, axis=-2)
add("Flatten", "axis0-int", [("X", randint(0, 5, 2, 3))], opset=9, axis=0)
add("Shape", "start-end", [("X", _g)], opset=15, start=-2, end=10)
add("Transpose", "default", [("X", _g.astype(F16))], opset=13)
add("Expand", "int", [("X", randint(0, 5, 3, 1)), ("s", ints(2, 1, 4))], opset=13)
add("ConstantOfShape", "int32", [("s", ints(2, 3))], opset=9,
    value=numpy_helper.from_array(np.array([7], np.int32)))
add("ConstantOfShape", "scalar", [("s", np.zeros(0, np.int64))], opset=9)
add("OneHot", "float-depth-neg", [("i", ints(0, -1, 3, -5, 2)), ("d", np.array(4.0, F32)),
                                  ("v", np.array([0, 5], np.int32))], opset=11, axis=0)
add("OneHot", "int32-indices", [("i", randint(0, 3, 2, 2, dtype=np.int32)),
                                ("d", np.array(3)), ("v", np.array([-1.0, 1.0], F32))], opset=11,
    ref="reference")
add("Range", "int16-neg", [("a", np.array(3, np.int16)), ("b", np.array(-9, np.int16)),
                           ("d", np.array(-4, np.int16))], opset=11)
add("Range", "f64", [("a", np.array(0.1)), ("b", np.array(1.0)), ("d", np.array(0.3))],
    opset=11)
add("Range", "f32-long", [("a", np.array(0.1, F32)), ("b", np.array(100.0, F32)),
                          ("d", np.array(0.3, F32))], opset=11)
add("Range", "f16-stash", [("a", np.array(0, F16)), ("b", np.array(9.5, F16)),
                           ("d", np.array(0.7, F16))], opset=27, ref="reference")
add("EyeLike", "int-k-neg", [("X", randint(0, 2, 3, 5, dtype=np.int32))], opset=9, k=-2)

# -- losses: every reduction, weights, ignore_index, rank, dtype --------------------------------
_s = normal(3, 4, 2)
_lab = ints(0, 3, 1, 2, 2, 0).reshape(3, 2)
_w = np.array([0.5, 1, 2, 3], F32)
for red in ("none", "sum", "mean"):
    for opset in (12, 13):
        add("SoftmaxCrossEntropyLoss", f"{red}-w-ii", [("S", _s), ("L", _lab), ("W", _w)],
            opset=opset, n_out=2, reduction=red, ignore_index=2)
        add("SoftmaxCrossEntropyLoss", f"{red}-neg-ii-int32",
            [("S", _s), ("L", np.where(_lab == 1, -1, _lab).astype(np.int32))],
            opset=opset, reduction=red, ignore_index=-1)
    add("SoftmaxCrossEntropyLoss", f"{red}-f64-N", [("S", normal(5, 3, dtype=np.float64)),
                                                    ("L", ints(0, 2, 1, 1, 0))], reduction=red,
        opset=13)
    add("SoftmaxCrossEntropyLoss", f"{red}-f16-w", [("S", _s.astype(F16)), ("L", _lab),
                                                    ("W", _w.astype(F16))], reduction=red,
        opset=13)
    for opset in (12, 13, 22):
        add("NegativeLogLikelihoodLoss", f"{red}-w-ii", [("P", _s), ("L", _lab), ("W", _w)],
            opset=opset, reduction=red, ignore_index=0)
    add("NegativeLogLikelihoodLoss", f"{red}-f16", [("P", _s.astype(F16)), ("L", _lab)],
        opset=13, reduction=red)
    add("NegativeLogLikelihoodLoss", f"{red}-d3", [("P", normal(2, 3, 2, 2, 2)),
                                                   ("L", randint(0, 3, 2, 2, 2, 2))],
        opset=13, reduction=red)
add("NegativeLogLikelihoodLoss", "all-ignored-mean", [("P", _s), ("L", np.ones((3, 2), np.int64))],
    opset=13, ignore_index=1)
add("NegativeLogLikelihoodLoss", "bf16", [("P", _s.astype(BF16)), ("L", _lab)], opset=22,
    ref="reference")


@pytest.mark.parametrize("c", CASES, ids=str)
def test_kernel_matches_reference(c: Case) -> None:
    ours, want = ours_and_reference(c)
    for name in want:
        got, exp = np.asarray(ours[name]), np.asarray(want[name])
        if got.dtype.kind == "f" and np.isnan(exp).all():
            assert np.isnan(got).all(), f"{c.id} {name}: expected NaN"
            continue
        assert_same(got, exp, what=f"{c.id} {name}")


# -- opsets no runtime implements: checked against their definition ---------------------------
def _run_node(op: str, inputs, opset: int, n_out: int = 1, **attrs):
    """Build the node without ONNX's checker (old opsets whose type rules it rejects) and run."""
    names = [n for n, _ in inputs]
    outs = [f"y{i}" for i in range(n_out)]
    graph = helper.make_graph(
        [helper.make_node(op, names, outs, **attrs)], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in inputs],
        [helper.make_empty_tensor_value_info(o) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return [run(model, dict(inputs))[o] for o in outs]


def test_legacy_opsets() -> None:
    x = normal(2, 3)
    (y,) = _run_node("Tile", [("X", x), ("t", np.array(3, F32)), ("a", np.array(1, F32))], 1)
    assert_same(y, np.tile(x, (1, 3)), "Tile-1")
    (y,) = _run_node("Reshape", [("X", x)], 1, shape=[3, -1])
    assert_same(y, x.reshape(3, 2), "Reshape-1")
    (y,) = _run_node("Concat", [("A", x), ("B", x[:, :1])], 1)  # axis defaults to 1
    assert_same(y, np.concatenate([x, x[:, :1]], 1), "Concat-1")
    a, b = _run_node("Split", [("X", x), ("s", ints(1, 2))], 1, n_out=2, axis=1)
    assert_same(a, x[:, :1], "Split-1 input")
    assert_same(b, x[:, 1:], "Split-1 input")
    a, b = _run_node("Split", [("X", normal(4, 2))], 1, n_out=2)
    assert a.shape == b.shape == (2, 2)


def test_constant_sparse_and_strings() -> None:
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.5, -2.0], F32), "v"),
        numpy_helper.from_array(ints(1, 5), "i"), [2, 3])
    node = helper.make_node("Constant", [], ["y"], sparse_value=sparse)
    (y,) = run(make_model([node], outputs=["y"], opset=13)).values()
    assert_same(y, np.array([[0, 1.5, 0], [0, 0, -2.0]], F32), "sparse")
    node = helper.make_node("Constant", [], ["y"], value_strings=["ab", "c"])
    (y,) = run(make_model([node], outputs=["y"], opset=13)).values()
    assert y.tolist() == ["ab", "c"]


def test_pad_string_default_is_empty() -> None:
    # The spec pads strings with "" (the reference evaluator writes 0).
    (y,) = K.Pad(np, np.array(["a", "b"], dtype=object), ints(1, 1))
    assert y.tolist() == ["", "a", "b", ""]


def test_gather_on_host_shape_values() -> None:
    # Shape -> Gather -> Concat stays on the host even when xp is another module.
    fake = types.SimpleNamespace()  # any xp call would fail: host arrays must use NumPy
    shp = K.Shape(np, normal(2, 3, 4))[0]
    (g,) = K.Gather(fake, shp, ints(-1, 0))
    (c,) = K.Concat(fake, g, ints(5), axis=0)
    assert c.tolist() == [4, 2, 5]


# -- properties ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.data(),
       st.sampled_from(["constant", "edge", "reflect", "wrap"]))
def test_pad_matches_numpy(shape, data, mode) -> None:
    x = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    hi = 9 if mode != "reflect" else None
    pads = [data.draw(st.integers(0, hi if hi is not None else shape[i % len(shape)] - 1))
            for i in range(2 * len(shape))]
    (got,) = K.Pad(np, x, ints(*pads), None, None, mode=mode)
    r = len(shape)
    want = np.pad(x, [(pads[i], pads[i + r]) for i in range(r)], mode=mode)
    assert_same(got, want, f"{mode} {pads}")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.booleans(), st.data())
def test_topk_orders_ties_by_index(values, largest, data) -> None:
    x = np.array(values, np.int32)
    k = data.draw(st.integers(0, len(values)))
    vals, idx = K.TopK(np, x, ints(k), largest=int(largest))
    want = sorted(range(len(values)), key=lambda i: (-values[i] if largest else values[i], i))[:k]
    assert idx.tolist() == want and vals.tolist() == [values[i] for i in want]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.data())
def test_unique_matches_numpy(shape, data) -> None:
    x = np.array(data.draw(st.lists(st.integers(0, 2), min_size=int(np.prod(shape)),
                                    max_size=int(np.prod(shape))))).reshape(shape)
    axis = data.draw(st.sampled_from([None, *range(len(shape))]))
    y, first, inverse, counts = K.Unique(np, x, axis=axis)
    wy, wfirst, winv, wcounts = np.unique(x, True, True, True, axis=axis)
    assert_same(y, wy)
    assert_same(first, wfirst)
    assert_same(inverse, winv.reshape(-1))
    assert_same(counts, wcounts)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=20),
       st.sampled_from(["add", "mul", "max", "min"]))
def test_scatter_rounds_match_ufunc_at(rows, reduction) -> None:
    out = np.linspace(-1, 1, 10).reshape(5, 2)
    upd = np.arange(2 * len(rows), dtype=np.float64).reshape(-1, 2) / 7 - 1
    want = out.copy()
    getattr(np, K._REDUCE[reduction]).at(want, np.array(rows, np.int64), upd)
    K._scatter_rows(np, out, np.array(rows, np.int64), upd, reduction)
    np.testing.assert_array_equal(out, want)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2), st.integers(1, 3), st.data())
def test_gathernd_matches_definition(b, k, data) -> None:
    shape = (2, 3, 2, 3, 2)[:b + k + 1]
    x = np.arange(int(np.prod(shape))).reshape(shape)
    k = min(k, len(shape) - b)
    idx = np.stack([_rng.integers(-shape[b + j], shape[b + j], (*shape[:b], 2))
                    for j in range(k)], -1)
    (got,) = K.GatherND(np, x, idx, batch_dims=b)
    want = np.stack([x[bi][tuple(idx[bi][m])] for bi in np.ndindex(shape[:b])
                     for m in range(2)]).reshape(got.shape)
    assert_same(got, want)


@pytest.mark.parametrize("op", ["Gather", "GatherElements"])
def test_gather_refuses_an_index_out_of_range_on_the_host(op):
    """An index outside [-n, n) is an error (onnxruntime's too), not a wrap-around: a token id
    past an embedding table would read another row."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    fn = get_kernel(op, 13)
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    ok = np.array([[0, 1], [-5, 4]], np.int64)
    np.testing.assert_array_equal(fn(np, x, ok, axis=0)[0],
                                  np.take(x, ok % 5, axis=0) if op == "Gather" else
                                  np.take_along_axis(x, ok % 5, axis=0))
    for bad in (5, -6):
        idx = ok.copy()
        idx[1, 0] = bad
        with pytest.raises(ModelError, match=f"{op}: index {bad} is out of range for axis 0 of "
                                             "size 5"):
            fn(np, x, idx, axis=0)


@pytest.mark.parametrize("op", ["GatherND", "ScatterND", "ScatterElements"])
def test_nd_gathers_and_scatters_refuse_an_index_out_of_range_on_the_host(op):
    """GatherND read [3, 0] of a 3x4 tensor as row 0, and the scatters wrote a row or column
    5 (or 4) to another: an index outside [-n, n) is an error, naming its axis, as Gather's is
    (onnxruntime refuses them too)."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    fn = get_kernel(op, 16)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    if op == "GatherND":
        calls = [(np.array([[2, -4], [-3, 3]]), None),
                 (np.array([[3, 0]]), "axis 0 of size 3"), (np.array([[0, 7]]), "axis 1 of size 4")]
        run = lambda idx: fn(np, x, idx)  # noqa: E731
    elif op == "ScatterND":
        calls = [(np.array([[2], [-3]]), None), (np.array([[5]]), "axis 0 of size 3")]
        run = lambda idx: fn(np, x, idx, np.ones((len(idx), 4), np.float32))  # noqa: E731
    else:
        calls = [(np.array([[0, 3, -4]]), None), (np.array([[0, 4, 1]]), "axis 1 of size 4")]
        run = lambda idx: fn(np, x, idx, np.ones(idx.shape, np.float32), axis=1)  # noqa: E731
    for idx, bad in calls:
        if bad is None:
            run(idx)
        else:
            with pytest.raises(ModelError, match=f"{op}: index .* is out of range for {bad}"):
                run(idx)


@pytest.mark.parametrize("op,call,message", [
    ("Softmax", lambda f, x: f(np, x, axis=2), "Softmax: axis 2 is out of range for an input "
                                                 r"of rank 2 \(it must lie in \[-2, 1\]\)"),
    ("CumSum", lambda f, x: f(np, x, np.array(-3)), "CumSum: axis -3 is out of range"),
    ("ArgMax", lambda f, x: f(np, x, axis=2), "ArgMax: axis 2 is out of range"),
    ("Gather", lambda f, x: f(np, x, np.array([0]), axis=2), "Gather: axis 2 is out of range"),
    ("TopK", lambda f, x: f(np, x, np.array([5]), axis=1), "TopK: k 5 is out of range for an "
                                                            "axis of size 4"),
])
def test_an_axis_or_k_out_of_range_is_refused_not_wrapped(op, call, message):
    """An axis attribute outside [-r, r) read another axis (x % r) and TopK's k past the axis
    returned fewer values, silently; onnxruntime refuses both."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with pytest.raises(ModelError, match=message):
        call(get_kernel(op, 13), x)


def test_tile_refuses_repeats_that_are_not_one_count_per_axis():
    """Repeats [2] on a [2, 3] input gave (2, 6), [2, 1, 3] gave (2, 2, 9) and [[2, 1]] gave
    (4, 3), NumPy's tile rules; ONNX (and onnxruntime) take exactly one count per axis. A
    TorchScript export of Mamba carries such a Tile: it failed later, at an unrelated Gather."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    x = np.ones((2, 3), np.float32)
    for bad in ([2], [2, 1, 3], [[2, 1]]):
        with pytest.raises(ModelError, match="one count per axis: shape \\[2\\]"):
            get_kernel("Tile", 13)(np, x, np.array(bad))
    assert get_kernel("Tile", 13)(np, x, np.array([2, 1]))[0].shape == (4, 3)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 5), start=st.integers(-12, 12), end=st.integers(-12, 12),
       step=st.sampled_from([-3, -2, -1, 1, 2, 3]))
def test_slice_clamps_starts_and_ends_as_the_spec_says(n, start, end, step):
    """A negative step's start is clamped into [0, n - 1] after adding n (the spec, and
    onnxruntime): x[-5:-10:-1] of 3 items is [x0], where NumPy's slicing gives [] (the kernel
    used Python's slice). The gradient follows the same positions."""
    from tests.opcases import run_ort
    from trainer.autodiff.rules.shape import spec_slice

    x = np.arange(float(n)).astype(np.float32)
    i64 = lambda v: np.array([v], np.int64)  # noqa: E731
    m = make_model([helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"])],
                   initializers={"x": x, "s": i64(start), "e": i64(end), "a": i64(0),
                                 "t": i64(step)}, outputs=["y"], opset=13)
    want = run_ort(m)["y"]
    same(run(m, fetch=["y"])["y"], want)
    # the gradient: dL/dx of L = sum(y * r) holds r at the positions taken, zeros elsewhere
    from tests.gradcheck import gradients

    r = np.arange(1.0, len(want) + 1)
    lm = make_model([helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"]),
                     helper.make_node("Mul", ["y", "r"], ["p"]),
                     helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)],
                    initializers={"x": x.astype(np.float64), "s": i64(start), "e": i64(end),
                                  "a": i64(0), "t": i64(step), "r": r}, outputs=["L"],
                    opset=13)
    grad = np.zeros(n)
    grad[list(range(*spec_slice(start, end, step, n).indices(n)))] = r
    np.testing.assert_array_equal(gradients(lm, ["x"])[0]["x"], grad)


_X23 = np.arange(6, dtype=np.float32).reshape(2, 3)


@pytest.mark.parametrize("op,opset,args,attrs,said", [
    ("Reshape", 14, [np.array([-1, -1])], {}, "more than one -1"),
    ("Reshape", 14, [np.array([-2, 3])], {}, "a size below -1"),
    ("Split", 18, [np.array([1, 1])], {"axis": 1}, "the sizes [1, 1] do not add up to the "
     "axis's 3 elements"),
    ("Split", 18, [np.array([4, -1])], {"axis": 1}, "do not add up"),
    ("Unsqueeze", 13, [np.array([5])], {}, "the axes [5] are out of range for an output of "
     "rank 3 (each must lie in [-3, 2])"),
    ("Unsqueeze", 13, [np.array([1, -3])], {}, "name an axis twice"),
    ("Flatten", 13, [], {"axis": 3}, "axis 3 is out of range for an input of rank 2"),
    ("ReduceSum", 13, [np.array([2])], {}, "axis 2 is out of range for an input of rank 2"),
    ("ReduceMax", 13, [], {"axes": [-3]}, "axis -3 is out of range"),
    ("ReduceMean", 18, [np.array([0, 4])], {}, "axis 4 is out of range"),
    ("Trilu", 14, [], {}, "needs at least 2 axes, got shape [3]"),  # (on _X23[0])
])
def test_axes_and_sizes_the_spec_forbids_are_refused(op, opset, args, attrs, said):
    """Out-of-range reduction axes were wrapped around (axes [3] of a rank-2 input reduced axis
    1), split sizes that miss the axis's length dropped its tail, a shape of two -1s took
    one, and Unsqueeze/Flatten axes out of range gave a result; onnxruntime refuses each."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    with pytest.raises(ModelError) as err:
        get_kernel(op, opset)(np, _X23[0] if op == "Trilu" else _X23, *args, **attrs)
    assert said in str(err.value), str(err.value)


def test_a_range_of_delta_0_is_refused():
    """It failed as a ZeroDivisionError (integers) or asked NumPy for an infinite count."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    for dt in (np.int64, np.float32):
        with pytest.raises(ModelError, match="Range: delta is 0"):
            get_kernel("Range", 11)(np, np.array(0, dt), np.array(5, dt), np.array(0, dt))


@pytest.mark.parametrize("mode", ["edge", "reflect", "wrap"])
@pytest.mark.parametrize("pads", [[1, 0, -4, 0], [2, 0, -4, 0], [3, 0, -5, 0], [1, 0, -3, 0]])
def test_a_pad_that_crops_more_than_the_axis_holds_is_refused_where_it_copies(mode, pads):
    """Edge, reflect and wrap copy from what the negative pads leave: where they remove more
    than the axis holds, or all of it with padding to make, the crop's bound went negative
    and wrapped around (a [3, 3] input with pads [1, 0, -4, 0] gave [3, 3], the spec's shape
    being [0, 3]); onnxruntime refuses these. Constant mode has its values either way."""
    from trainer.kernels import get_kernel

    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    with pytest.raises(ValueError, match=f"Pad: mode '{mode}' cannot pad axis 0"):
        get_kernel("Pad", 19)(np, x, np.array(pads), mode=mode)
    y = get_kernel("Pad", 19)(np, x, np.array(pads), np.array(7, np.float32))[0]
    assert y.shape == (3 + pads[0] + pads[2], 3) and (y == 7).all()
    assert get_kernel("Pad", 19)(np, x, np.array([-3, 0, 0, 0]), mode=mode)[0].shape == (0, 3)



@pytest.mark.parametrize("shape,axis", [((3, 0), 1), ((3, 0), 0), ((0, 3), 1), ((2, 0, 2), 1),
                                        ((2, 0, 2), 0), ((2, 3), -1)])
def test_unique_along_an_axis_of_empty_slices(shape, axis):
    """A [3, 0] input's Unique along axis 1 failed inside the kernel (a row length of -1
    cannot be inferred where a slice is empty); numpy.unique, which the spec follows, has
    an answer for each."""
    from trainer.kernels import get_kernel

    x = np.zeros(shape, F32)
    got = get_kernel("Unique", 11)(np, x, axis=axis)
    want = np.unique(x, axis=axis, return_index=True, return_inverse=True, return_counts=True)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_eye_like_and_reverse_sequence_refuse_what_the_spec_rules_out():
    """EyeLike of a [2, 2, 2] input gave a [2, 2] identity (a 1-D one an IndexError), and
    ReverseSequence read a negative length as 0 and failed on one beyond the time axis with
    an IndexError; onnxruntime refuses each (the spec: EyeLike's input is 2-D)."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    eye = get_kernel("EyeLike", 9)
    for shape in ((2, 2, 2), (3,)):
        with pytest.raises(ModelError, match=r"EyeLike: the input must be 2-D, got shape "):
            eye(np, np.zeros(shape, F32))
    np.testing.assert_array_equal(eye(np, np.zeros((2, 3), F32), k=1)[0], np.eye(2, 3, k=1))
    rev = get_kernel("ReverseSequence", 10)
    x = np.arange(12, dtype=F32).reshape(4, 3)  # [time 4, batch 3]
    for lens, said in (([-1, 2, 3], "sequence length -1 is out of range for a time axis of 4"),
                       ([5, 1, 0], "sequence length 5 is out of range for a time axis of 4"),
                       ([1, 2], "sequence_lens holds 2 lengths for a batch of 3")):
        with pytest.raises(ModelError, match=said):
            rev(np, x, np.array(lens, np.int64))
    y = rev(np, x, np.array([4, 0, 2], np.int64))[0]
    np.testing.assert_array_equal(y[:, 0], x[::-1, 0])
    np.testing.assert_array_equal(y[:, 1], x[:, 1])
    np.testing.assert_array_equal(y[:, 2], x[[1, 0, 2, 3], 2])
