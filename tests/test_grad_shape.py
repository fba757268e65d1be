"""Gradient rules of shape, indexing, scatter, linear-algebra and loss ops against float64 finite
differences (tests/gradcheck.py), at the opsets where the rules emit different nodes; indices
are constants (folded at build time) or computed at run time (the general path)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests.gradcheck import (
    FROM_PRE,
    Case,
    CaseTable,
    finite_differences,
    gradients,
    ints,
    loss_model,
    normal,
    positive,
    rule_tests,
)
from tests.opcases import distinct, make_model
from trainer.errors import ModelError

_rng = np.random.default_rng(2024)
table = CaseTable()
add = table.add
CASES = table.cases


def runtime(name: str, values, dtype=onnx.TensorProto.INT64) -> dict:
    """Case keywords that compute input `name` at run time, so the rule cannot read it at build
    time: a Cast of row 0 of a float initializer holding the values twice (a float tensor a
    gradient reaches, which training may change; a one-element float constant, which the
    default parameters leave out, folds at build time, as tf2onnx's loop conditions need)."""
    v = np.asarray(values, np.float64)
    return {"pre": [helper.make_node("Gather", [f"{name}_f", f"{name}_row"], [f"{name}_g"],
                                     axis=0),
                    helper.make_node("Cast", [f"{name}_g"], [name], to=dtype)],
            "extra": {f"{name}_f": np.stack([v, v]), f"{name}_row": np.array(0, np.int64)}}


def both(op: str, id: str, inputs, index: str, values, wrt, opsets=(18,), **kw) -> None:
    """The case with `index` as a constant and computed at run time, at each opset."""
    for o in opsets:
        add(op, f"{id}-const-opset{o}", [*inputs, (index, np.asarray(values, np.int64))],
            wrt=wrt, opset=o, **kw)
        add(op, f"{id}-runtime-opset{o}", [*inputs, (index, FROM_PRE)], wrt=wrt, opset=o,
            **runtime(index, values), **kw)


# -- gathers ---------------------------------------------------------------------------------
# Embedding lookups: duplicate and negative indices accumulate into the same rows. Opset 18
# scatters with reduction add, 13 sorts and sums runs, 9 multiplies by a one-hot matrix.
_emb = normal(5, 3)
for o in (18, 13, 9):
    idx = [[0, 2, 0], [4, 1, 2]] if o < 11 else [[0, 2, 0], [4, -1, 2]]
    both("Gather", "embedding-dups", [("W", _emb)], "idx", idx, ["W"], opsets=(o,))
both("Gather", "axis1", [("X", normal(2, 4, 3))], "idx", [3, -1, 0, 3], ["X"], opsets=(18, 13),
     axis=1)
both("Gather", "axis-1-scalar-index", [("X", normal(2, 3, 4))], "idx", -2, ["X"],
     opsets=(18, 13), axis=-1)
both("Gather", "axis2-2d-index", [("X", normal(2, 2, 5))], "idx", [[1, 4], [1, 0]], ["X"],
     opsets=(18, 13, 9), axis=2)
for o in (18, 13):
    add("Gather", f"int32-runtime-opset{o}", [("W", _emb), ("idx", FROM_PRE)], wrt=["W"],
        opset=o, **runtime("idx", [[3, -5], [3, 0]], onnx.TensorProto.INT32))
add("Gather", "unique-const-opset13", [("X", normal(4, 2)), ("idx", ints(3, 0, 1))],
    wrt=["X"], opset=13)

both("GatherElements", "axis0-dups", [("X", normal(3, 4))], "idx",
     [[0, 2, -1, 1], [0, 0, 1, 2]], ["X"], opsets=(18, 13))
both("GatherElements", "axis1-longer", [("X", normal(2, 4, 3))], "idx",
     _rng.integers(-4, 4, (2, 5, 3)), ["X"], opsets=(18, 13), axis=1)
both("GatherElements", "axis-1", [("X", normal(3, 3))], "idx", [[2, 2], [0, -3], [1, 0]],
     ["X"], opsets=(16,), axis=-1)

both("GatherND", "k1", [("X", normal(4, 3))], "idx", [[1], [-1], [1]], ["X"], opsets=(18, 13))
both("GatherND", "k2-elements", [("X", normal(3, 4))], "idx", [[[0, 1], [2, -1]], [[0, 1],
                                                                              [1, 1]]],
     ["X"], opsets=(18, 13))
both("GatherND", "batch1", [("X", normal(2, 3, 4))], "idx", [[[1], [1], [0]], [[2], [-1], [0]]],
     ["X"], opsets=(18, 13), batch_dims=1)
both("GatherND", "batch2-k1", [("X", normal(2, 2, 3, 2))], "idx",
     [[[2], [2]], [[0], [1]]], ["X"], opsets=(18,), batch_dims=2)


# -- scatters --------------------------------------------------------------------------------
def scatter_cases(op: str, id: str, data, idx, upd, opsets, **attrs) -> None:
    for o in opsets:
        for kind in ("const", "runtime"):
            kw = runtime("idx", idx) if kind == "runtime" else {}
            ins = [("D", data), ("idx", FROM_PRE if kind == "runtime"
                                 else np.asarray(idx, np.int64)), ("U", upd)]
            add(op, f"{id}-{kind}-opset{o}", ins, wrt=["D", "U"], opset=o, **kw, **attrs)


scatter_cases("ScatterElements", "none-axis0", normal(3, 3), [[1, 0, 2], [0, 2, 1]],
              normal(2, 3), (18, 11))
scatter_cases("ScatterElements", "none-axis1-neg", normal(3, 4), [[1, -1], [0, 3], [2, 0]],
              normal(3, 2), (13,), axis=1)
scatter_cases("ScatterElements", "add-dups", normal(3, 3), [[1, 1, 2], [1, 0, 2]],
              normal(2, 3), (16,), reduction="add")
# mul: zeros in the updates, alone and doubled at one position (prod excluding self)
_mul_upd = np.array([[0.0, 1.3, -0.7], [0.8, 0.0, 1.1], [0.0, -1.2, 0.9]])
scatter_cases("ScatterElements", "mul-dups-zeros", normal(3, 3), [[1, 1, 2], [1, 0, 2], [1, 0, 0]],
              _mul_upd, (16, 18), reduction="mul")
add("ScatterElements", "mul-only-updates", [("D", normal(2, 3)), ("idx", ints(1, 1, 0)
                                                                   .reshape(1, 3)),
                                              ("U", _mul_upd[:1])], wrt=["U"],
    reduction="mul", opset=16)
add("ScatterElements", "max-only-data", [("D", distinct(_rng, (2, 3))), ("idx", ints(1, 0, 1)
                                                                          .reshape(1, 3)),
                                         ("U", distinct(_rng, (1, 3)))], wrt=["D"],
    reduction="max")
for red in ("max", "min"):
    scatter_cases("ScatterElements", f"{red}-dups", distinct(_rng, (3, 4)),
                  [[0, 1, 2, 0], [0, 1, 0, 0], [2, 1, 0, 1]], distinct(_rng, (3, 4)), (18,),
                  reduction=red)

scatter_cases("ScatterND", "none-k1", normal(4, 2), [[2], [0], [-1]], normal(3, 2), (18, 11))
scatter_cases("ScatterND", "none-k2", normal(3, 3), [[0, 1], [2, -1], [1, 1]], normal(3), (13,))
scatter_cases("ScatterND", "add-dups", normal(3, 2), [[1], [1], [0]], normal(3, 2), (16,),
              reduction="add")
scatter_cases("ScatterND", "mul-dups-zeros", normal(3, 2), [[1, 0], [1, 0], [2, 1], [1, 0]],
              np.array([0.0, 1.4, -0.6, 0.0]), (18,), reduction="mul")
for red in ("max", "min"):
    scatter_cases("ScatterND", f"{red}-dups", distinct(_rng, (3, 3)), [[0], [2], [0]],
                  distinct(_rng, (3, 3)), (18,), reduction=red)

scatter_cases("Scatter", "axis0", normal(3, 3), [[1, 0, 2], [0, 2, 1]], normal(2, 3), (9, 10))
scatter_cases("Scatter", "axis1", normal(2, 4), [[3, 1], [0, 2]], normal(2, 2), (9,), axis=1)

for mode, wi, upd in (("linear", [1, 0], (2, 2, 3)), ("circular", [3, 1], (2, 3, 3)),
                      ("circular", [2, 0], (2, 4, 3))):
    add("TensorScatter", f"{mode}-{upd[1]}-write-indices",
        [("P", normal(2, 4, 3)), ("U", normal(*upd)), ("wi", ints(*wi))], opset=24, mode=mode)
    add("TensorScatter", f"{mode}-{upd[1]}-runtime-indices",
        [("P", normal(2, 4, 3)), ("U", normal(*upd)), ("wi", FROM_PRE)], opset=24, mode=mode,
        wrt=["P", "U"], **runtime("wi", wi))
add("TensorScatter", "no-indices-axis1", [("P", normal(2, 5, 2, 3)), ("U", normal(2, 3, 2, 3))],
    opset=24, axis=1)


# -- slicing and padding ---------------------------------------------------------------------
_x = normal(4, 5, 6)
for sid, (starts, ends, axes, steps) in {
    "basic": ([1, 0], [3, 4], [0, 2], None),
    "neg-starts-big-ends": ([-3, 2], [1000, -1], [1, 2], None),
    "step2": ([0], [6], [2], [2]),
    "step3-offset": ([1, 1], [6, 4], [2, 1], [3, 2]),
    "neg-step": ([-1], [-1000], [1], [-1]),
    "neg-step2-neg-axis": ([5, 3], [0, 0], [-1, 0], [-2, -1]),
    "mixed": ([0, 4, 1], [3, 0, 6], [0, 1, 2], [2, -3, 4]),
}.items():
    ins = [("X", _x), ("starts", ints(*starts)), ("ends", ints(*ends)), ("axes", ints(*axes))]
    if steps is not None:
        ins.append(("steps", ints(*steps)))
    add("Slice", f"{sid}-opset13", ins, opset=13)
    # starts and ends (and steps) computed at run time: a scatter along each axis in turn
    rt = [runtime("starts", starts), runtime("ends", ends)] + (
        [runtime("steps", steps)] if steps is not None else [])
    add("Slice", f"{sid}-runtime-opset13",
        [("X", _x), ("starts", FROM_PRE), ("ends", FROM_PRE), ("axes", ints(*axes))]
        + ([("steps", FROM_PRE)] if steps is not None else []), opset=13, wrt=["X"],
        pre=[n for r in rt for n in r["pre"]],
        extra={k: v for r in rt for k, v in r["extra"].items()})
add("Slice", "runtime-default-axes-opset11", [("X", normal(3, 4)), ("starts", FROM_PRE),
                                              ("ends", ints(3, 4))], opset=11, wrt=["X"],
    **runtime("starts", [1, -3]))
add("Slice", "runtime-empty", [("X", normal(3, 4)), ("starts", FROM_PRE), ("ends", ints(1)),
                              ("axes", ints(1))], wrt=["X"], **runtime("starts", [3]))
add("Slice", "default-axes-opset10", [("X", normal(3, 4)), ("starts", ints(1, -3)),
                                      ("ends", ints(3, 4))], opset=10)
add("Slice", "attrs-opset9", [("X", normal(3, 4))], opset=9, starts=[1, 1], ends=[2, 100],
    axes=[0, 1])
add("Slice", "empty", [("X", normal(3, 4)), ("starts", ints(3)), ("ends", ints(1)),
                      ("axes", ints(1))])
add("Slice", "attrs-default-axes-opset7", [("X", normal(3, 4))], opset=7, starts=[0, -2],
    ends=[2, 4])

_p = normal(3, 4)
for mode in ("constant", "reflect", "edge", "wrap"):
    o = 19 if mode == "wrap" else 18
    add("Pad", f"{mode}-both-axes", [("X", _p), ("pads", ints(1, 2, 2, 1)),
                                     ("value", normal() if mode == "constant" else None)],
        mode=mode, opset=o)
    add("Pad", f"{mode}-crop-and-pad", [("X", normal(4, 5)), ("pads", ints(-1, 2, 1, -2))],
        mode=mode, opset=o)
    # (an axis cropped before a later one grows: the cropped positions' zeros take the sizes
    # of the gradient at that point, the later axes still padded)
    add("Pad", f"{mode}-crop-then-grow", [("X", normal(4, 5)), ("pads", ints(-1, 1, 0, 0))],
        mode=mode, opset=o)
    add("Pad", f"{mode}-crop-middle-grow-last", [("X", normal(2, 4, 3)),
                                                 ("pads", ints(1, -1, 0, 0, 0, 2))],
        mode=mode, opset=o)
    add("Pad", f"{mode}-axes-input", [("X", normal(2, 3, 4)), ("pads", ints(2, 1, 1, 2)),
                                      ("value", None), ("axes", ints(-1, 1))], mode=mode, opset=o)
add("Pad", "wrap-twice", [("X", normal(2, 3)), ("pads", ints(0, 4, 0, 5))], mode="wrap",
    opset=19)
add("Pad", "edge-opset11", [("X", normal(2, 3)), ("pads", ints(1, 2, 2, 1))], mode="edge",
    opset=11)
add("Pad", "constant-value-[1]-opset13", [("X", normal(2, 3)), ("pads", ints(0, 1, 2, 0)),
                                          ("value", normal(1))], opset=13)
add("Pad", "only-value", [("X", normal(2, 3)), ("pads", ints(1, 1, 0, 1)), ("value", normal())],
    wrt=["value"])
add("Pad", "reflect-value-unused", [("X", normal(3, 3)), ("pads", ints(1, 0, 1, 2)),
                                    ("value", normal())], mode="reflect")
for mode in ("constant", "reflect", "edge"):
    add("Pad", f"{mode}-attrs-opset9", [("X", normal(3, 4))], opset=9, mode=mode,
        pads=[1, 0, 2, 2], value=0.5)

# -- tiles, blocks, masks, reversals, selections ---------------------------------------------
add("Tile", "2d", [("X", normal(2, 3)), ("reps", ints(3, 2))])
add("Tile", "partial-opset7", [("X", normal(2, 1, 3)), ("reps", ints(1, 4, 2))], opset=7)
add("Tile", "ones", [("X", normal(2, 3)), ("reps", ints(1, 1))])

for op, shape in (("DepthToSpace", (2, 8, 2, 3)), ("SpaceToDepth", (2, 2, 4, 6))):
    if op == "DepthToSpace":
        for mode in ("DCR", "CRD"):
            add(op, mode, [("X", normal(*shape))], blocksize=2, mode=mode)
    else:
        add(op, "default", [("X", normal(*shape))], blocksize=2)
    add(op, "opset7", [("X", normal(*shape))], blocksize=2, opset=7)

for upper in (0, 1):
    add("Trilu", f"upper{upper}", [("X", normal(2, 3, 4))], upper=upper)
    add("Trilu", f"upper{upper}-k", [("X", normal(4, 3)), ("k", ints(-1))], upper=upper)

add("ReverseSequence", "time0", [("X", normal(4, 3, 2)), ("lens", ints(4, 1, 3))])
add("ReverseSequence", "batch0", [("X", normal(2, 5)), ("lens", ints(2, 5))], batch_axis=0,
    time_axis=1)

_cond = np.array([True, False, True, True])
for axis in (0, 1, None):
    kw = {} if axis is None else {"axis": axis}
    x = normal(4, 4, 2)
    add("Compress", f"axis{axis}", [("X", x), ("c", _cond)], **kw)
    add("Compress", f"axis{axis}-runtime", [("X", x), ("c", FROM_PRE)], wrt=["X"],
        **runtime("c", _cond, onnx.TensorProto.BOOL), **kw)
add("Compress", "short-condition", [("X", normal(5, 2)), ("c", np.array([False, True]))],
    axis=0)
add("Compress", "short-runtime-opset11", [("X", normal(5, 2)), ("c", FROM_PRE)], axis=0,
    wrt=["X"], opset=11, **runtime("c", [True, False, True], onnx.TensorProto.BOOL))
add("Compress", "const-opset9", [("X", normal(3, 2)), ("c", _cond[:3])], axis=0, opset=9)

_t = distinct(_rng, (3, 5))
add("TopK", "largest", [("X", _t), ("k", ints(2))], n_out=2)
add("TopK", "smallest-axis0", [("X", _t), ("k", ints(2))], n_out=2, axis=0, largest=0)
add("TopK", "opset10", [("X", _t), ("k", ints(3))], n_out=2, opset=10)
add("TopK", "attr-opset8", [("X", distinct(_rng, (2, 3, 4)))], n_out=2, opset=8, k=2, axis=1)

# -- reshapes, joins and splits at old opsets ------------------------------------------------
add("Reshape", "opset7", [("X", normal(2, 3)), ("shape", ints(3, 2))], opset=7)
add("Reshape", "allowzero-opset14", [("X", normal(2, 3)), ("shape", ints(6, -1))], opset=14,
    allowzero=1)
add("Flatten", "opset7-axis0", [("X", normal(2, 3, 2))], opset=7, axis=0)
add("Flatten", "opset13-neg", [("X", normal(2, 3, 2))], opset=13, axis=-2)
add("Squeeze", "opset7", [("X", normal(1, 3, 1))], opset=7, axes=[0])
add("Squeeze", "opset21-input", [("X", normal(1, 3, 1)), ("axes", ints(-1))], opset=21)
add("Unsqueeze", "opset7", [("X", normal(3, 2))], opset=7, axes=[0, 3])
add("Unsqueeze", "opset21", [("X", normal(3, 2)), ("axes", ints(1))], opset=21)
add("Identity", "opset7", [("X", normal(2, 2))], opset=7)
add("Identity", "opset21", [("X", normal(2, 2))], opset=21)
add("Transpose", "opset7", [("X", normal(2, 3, 4))], opset=7, perm=[2, 0, 1])
add("Transpose", "0-d", [("X", normal())])  # (its gradient wrote perm=[]: a build error)
add("Expand", "opset8", [("X", normal(1, 3)), ("shape", ints(2, 1, 3))], opset=8)
add("Concat", "opset7", [("A", normal(2, 3)), ("B", normal(2, 1))], opset=7, axis=1)
add("Concat", "opset11-neg-axis", [("A", normal(2, 3)), ("B", normal(1, 3))], opset=11,
    axis=-2)
add("Split", "opset7-attr", [("X", normal(5, 2))], n_out=2, opset=7, split=[2, 3])
add("Split", "opset7-equal", [("X", normal(2, 6))], n_out=3, opset=7, axis=1)
add("Split", "opset18-uneven", [("X", normal(7, 2))], n_out=3, num_outputs=3)
add("Split", "opset13-unused-large", [("X", normal(6, 5)), ("split", ints(1, 5))], n_out=2,
    opset=13, use=(0,))


# -- linear algebra --------------------------------------------------------------------------
for eq, shapes in (("ij,jk->ik", [(2, 3), (3, 4)]), ("bij,bjk->bik", [(2, 2, 3), (2, 3, 2)]),
                   ("ij,kj", [(2, 3), (4, 3)]), ("i,i->", [(4,), (4,)]), ("i,j->ij", [(2,), (3,)]),
                   ("ij->", [(2, 3)]), ("ij->i", [(2, 3)]), ("ij->ji", [(2, 3)]),
                   ("ii->i", [(3, 3)]), ("ii->", [(3, 3)]), ("ii", [(3, 3)]),
                   ("iii->i", [(2, 2, 2)]), ("bii->bi", [(2, 3, 3)]), ("iji->j", [(3, 2, 3)]),
                   ("ij,jk,kl->il", [(2, 3), (3, 2), (2, 2)]),
                   ("...ij,...jk->...ik", [(2, 1, 3, 4), (1, 5, 4, 2)]),
                   ("...ii->...i", [(2, 3, 3)]), ("b...,b->...", [(2, 3, 2), (2,)]),
                   ("Ab,bC->AC", [(2, 3), (3, 2)]), ("ij,ij->ij", [(1, 3), (2, 3)]),
                   ("ik,ijk->j", [(2, 2), (2, 3, 2)]), ("i j , j -> i", [(2, 3), (3,)])):
    add("Einsum", eq.replace(" ", "_"), [(f"X{i}", normal(*sh)) for i, sh in enumerate(shapes)],
        equation=eq)
add("Einsum", "same-operand-twice", [("A", _sq := normal(3, 3)), ("A", _sq)],
    equation="ij,jk->ik")
add("Einsum", "only-second", [("A", normal(2, 3)), ("B", normal(3, 2))], equation="ij,jk->ik",
    wrt=["B"])

for shape in ((1, 1), (2, 2), (3, 3), (2, 3, 3), (2, 1, 4, 4)):
    add("Det", f"{list(shape)}", [("X", normal(*shape))])
_singular = normal(3, 3)
_singular[2] = _singular[0] + _singular[1]
add("Det", "singular", [("X", _singular)])

add("MatMul", "linear-4d-input", [("A", normal(2, 2, 3, 4)), ("B", normal(4, 5))])
add("MatMul", "linear-only-weight", [("A", normal(2, 3, 4)), ("B", normal(4, 2))], wrt=["B"])
add("MatMul", "linear-opset9", [("A", normal(2, 3, 4)), ("B", normal(4, 2))], opset=9)
add("MatMul", "batched-weight-opset9", [("A", normal(3, 4)), ("B", normal(2, 4, 2))], opset=9)
for ta, tb in ((0, 0), (1, 1)):
    a = normal(4, 3) if ta else normal(3, 4)
    b = normal(5, 4) if tb else normal(4, 5)
    for o in (7, 9):
        add("Gemm", f"tA{ta}tB{tb}-opset{o}", [("A", a), ("B", b), ("C", normal(3, 5))],
            transA=ta, transB=tb, alpha=0.5, beta=2.0, opset=o)


# -- losses ----------------------------------------------------------------------------------
_w5, _w3 = positive(5), positive(3)
for red in ("mean", "sum", "none"):
    add("SoftmaxCrossEntropyLoss", f"{red}-[N]-weights",
        [("S", normal(4, 5)), ("lab", ints(0, 3, 4, 3)), ("w", _w5)], n_out=2, wrt=["S"],
        reduction=red)
    add("SoftmaxCrossEntropyLoss", f"{red}-[N,d1,d2]-weights-ignore",
        [("S", normal(2, 3, 2, 2)), ("lab", ints(0, 1, 2, 1, 2, 2, 1, 0).reshape(2, 2, 2)),
         ("w", _w3)], n_out=2, wrt=["S"], reduction=red, ignore_index=1)
    add("SoftmaxCrossEntropyLoss", f"{red}-loss-only-output",
        [("S", normal(3, 4, 2)), ("lab", ints(0, 3, 2, 1, 1, 0).reshape(3, 2))],
        reduction=red, ignore_index=3)
    add("NegativeLogLikelihoodLoss", f"{red}-[N]-weights-ignore-negative",
        [("P", normal(4, 3)), ("lab", ints(0, -100, 2, 2)), ("w", _w3)], wrt=["P"],
        reduction=red, ignore_index=-100)
    add("NegativeLogLikelihoodLoss", f"{red}-[N,d]-weights",
        [("P", normal(3, 5, 2)), ("lab", ints(4, 0, 1, 1, 3, 2).reshape(3, 2)), ("w", _w5)],
        wrt=["P"], reduction=red)
add("SoftmaxCrossEntropyLoss", "loss-only-output-opset12",
    [("S", normal(3, 4, 2)), ("lab", ints(0, 3, 2, 1, 1, 0).reshape(3, 2))], opset=12)
add("SoftmaxCrossEntropyLoss", "loss-only-output-2d-opset12",
    [("S", normal(3, 4)), ("lab", ints(0, 3, 2))], opset=12, reduction="sum")
add("SoftmaxCrossEntropyLoss", "int32-labels-weights",
    [("S", normal(4, 3)), ("lab", np.array([2, 0, 1, 1], np.int32)), ("w", _w3)], n_out=2,
    wrt=["S"], ignore_index=0)
add("SoftmaxCrossEntropyLoss", "log-prob-only-weights",
    [("S", normal(3, 4)), ("lab", ints(0, 2, 3)), ("w", positive(4))], n_out=2, use=(1,),
    wrt=["S"])
add("SoftmaxCrossEntropyLoss", "weights-opset12",
    [("S", normal(3, 4, 2)), ("lab", ints(0, 3, 2, 1, 1, 0).reshape(3, 2)), ("w", positive(4))],
    n_out=2, wrt=["S"], opset=12, ignore_index=2)
add("NegativeLogLikelihoodLoss", "weights-ignore-opset12",
    [("P", normal(4, 3)), ("lab", ints(0, 1, 2, 2)), ("w", _w3)], wrt=["P"], opset=12,
    ignore_index=2)
add("NegativeLogLikelihoodLoss", "opset22", [("P", normal(4, 3)), ("lab", ints(0, 1, 2, 2))],
    opset=22)
# (negative pads that remove more than the axis holds eat into the other side's padding: the
# output has n + before + after elements, as the spec, shape inference and onnxruntime say;
# X reaches none of them)
add("Pad", "constant-crop-beyond-the-axis", [("X", normal(2, 3)), ("pads", ints(0, -4, 0, 5)),
                                             ("value", normal())], opset=18)
add("Pad", "constant-grow-then-crop-beyond", [("X", normal(2, 1)),
                                              ("pads", ints(1, 3, 0, -2)), ("value", normal())],
    opset=18)


# -- tests -----------------------------------------------------------------------------------
EXTRA_TESTED: set[str] = set()


def _grads_of(c: Case) -> dict[str, np.ndarray]:
    return gradients(loss_model(c), c.params())[0]


def test_cross_entropy_all_ignored_gives_zero_gradient() -> None:
    # The mean over no valid label is 0/0 (a NaN loss); PyTorch's gradient is 0, not NaN.
    for op, n_out in (("SoftmaxCrossEntropyLoss", 2), ("NegativeLogLikelihoodLoss", 1)):
        for w in (None, positive(4)):
            c = Case("all-ignored", op, [("X", normal(3, 4)), ("lab", ints(1, 1, 1)),
                                         ("w", w)], {"ignore_index": 1}, wrt=["X"],
                     n_out=n_out, use=(0,))
            np.testing.assert_array_equal(_grads_of(c)["X"], np.zeros((3, 4)))


def test_cross_entropy_matches_torch() -> None:
    # class weights + ignore_index + mean over [N, C, d]: torch.nn.functional.cross_entropy
    s, lab, w = normal(3, 4, 2), ints(0, 3, 2, -1, 1, 0).reshape(3, 2), positive(4)
    c = Case("sce-torch", "SoftmaxCrossEntropyLoss", [("S", s), ("lab", lab), ("w", w)],
             {"ignore_index": -1}, wrt=["S"], n_out=2, use=(0,))
    got = _grads_of(c)["S"]
    r = np.random.default_rng(0).standard_normal(())  # the loss's weight R in loss_model
    st = torch.tensor(s, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(st, torch.tensor(lab), torch.tensor(w),
                                             ignore_index=-1)
    (loss * float(r)).backward()
    np.testing.assert_allclose(got, st.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduce", ["amax", "amin"])
def test_scatter_max_ties_split_like_torch(reduce: str) -> None:
    # Ties between data and updates (and among updates) share the gradient evenly, as
    # torch.Tensor.scatter_reduce(..., include_self=True) does.
    data = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    idx = np.array([[0, 1, 0], [0, 1, 1], [1, 0, 1]], np.int64)
    upd = np.array([[1.0, 5.0, 3.0], [1.0, 5.0, 6.0], [4.0, 0.0, 6.0]])
    c = Case("ties", "ScatterElements", [("D", data), ("idx", idx), ("U", upd)],
             {"reduction": reduce[1:]}, wrt=["D", "U"])
    got = _grads_of(c)
    r = np.random.default_rng(0).standard_normal(data.shape)
    dt, ut = (torch.tensor(v, requires_grad=True) for v in (data, upd))
    out = dt.scatter_reduce(0, torch.tensor(idx), ut, reduce, include_self=True)
    (out * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(got["D"], dt.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(got["U"], ut.grad.numpy(), rtol=1e-12)


test_rule_matches_finite_differences, test_rule_float32_training_graph = rule_tests(CASES)


# Forms older than opset 7, which onnxruntime does not load: the executor against finite
# differences only.
_PRE7 = [
    Case("Slice-1", "Slice", [("X", normal(3, 4))], {"starts": [1], "ends": [3], "axes": [1]},
         opset=6),
    Case("Pad-2-edge", "Pad", [("X", normal(3, 4))], {"pads": [1, 0, 0, 2], "mode": "edge"},
         opset=6),
    Case("Tile-1", "Tile", [("X", normal(2, 3)), ("t", ints(2)), ("a", ints(1))], opset=5),
    Case("TopK-1", "TopK", [("X", distinct(_rng, (2, 5)))], {"k": 2}, opset=6, n_out=2),
    Case("Gemm-6", "Gemm", [("A", normal(2, 3)), ("B", normal(3, 4)), ("C", normal(2, 4))],
         {"alpha": 0.5, "transB": 0}, opset=6),
    Case("MatMul-1", "MatMul", [("A", normal(2, 3, 4)), ("B", normal(4, 2))], opset=6),
    Case("Gather-1", "Gather", [("X", normal(4, 2)), ("i", ints(1, 1, 3))], opset=6),
    Case("Split-2", "Split", [("X", normal(4, 2))], {"split": [1, 3]}, opset=6, n_out=2),
    Case("DepthToSpace-1", "DepthToSpace", [("X", normal(1, 8, 2, 2))], {"blocksize": 2},
         opset=6),
    # opsets 1-6 broadcast B through attributes: along `axis` (a bias per channel), or over
    # the last axes without it (every Gemm's C of that time): these were refused
    Case("Add-legacy-axis", "Add", [("A", normal(2, 3, 4)), ("B", normal(3))],
         {"broadcast": 1, "axis": 1}, opset=6),
    Case("Sub-legacy-axis", "Sub", [("A", normal(2, 3, 4, 2)), ("B", normal(3, 4))],
         {"broadcast": 1, "axis": 1}, opset=5),
    Case("Add-legacy-suffix", "Add", [("A", normal(2, 3, 4)), ("B", normal(3, 4))],
         {"broadcast": 1}, opset=6),
    Case("Mul-legacy-suffix", "Mul", [("A", normal(2, 3, 4)), ("B", normal(4))],
         {"broadcast": 1}, opset=6),
    Case("Div-legacy-last-axis", "Div", [("A", normal(2, 3)), ("B", positive(3))],
         {"broadcast": 1, "axis": 1}, opset=6),
    Case("Gemm-6-broadcast", "Gemm", [("A", normal(2, 3)), ("B", normal(4, 3)), ("C", normal(4))],
         {"broadcast": 1, "transB": 1}, opset=6),
    Case("Gemm-3-broadcast-scalar", "Gemm", [("A", normal(2, 3)), ("B", normal(3, 4)),
                                             ("C", normal(1))], {"broadcast": 1}, opset=3),
]


@pytest.mark.parametrize("c", _PRE7, ids=str)
def test_pre_opset7_forms(c: Case) -> None:
    model = loss_model(c)
    grads, _ = gradients(model, c.params())
    fd = finite_differences(model, {n: a for n, a in c.inputs if n in c.params()})
    for p in c.params():
        np.testing.assert_allclose(grads[p], fd[p], rtol=1e-6, atol=1e-6, err_msg=p)


def test_shape_inputs_computed_at_run_time_are_a_clear_error() -> None:
    c = Case("Slice-runtime-starts", "Slice", [("X", normal(3, 4)), ("starts", FROM_PRE),
                                               ("ends", ints(3))], wrt=["X"], opset=10,
             **runtime("starts", [1]))  # (from opset 11 a Range-based gradient: the table)
    with pytest.raises(ModelError, match="starts input must be a constant"):
        gradients(loss_model(c), ["X"])
    c = Case("Compress-runtime-opset9", "Compress", [("X", normal(3, 2)), ("c", FROM_PRE)],
             {"axis": 0}, wrt=["X"], opset=9,
             **runtime("c", [True, False, True], onnx.TensorProto.BOOL))
    with pytest.raises(ModelError, match="opset >= 11"):
        gradients(loss_model(c), ["X"])


@pytest.mark.parametrize("indices", ["constant", "runtime"])
def test_gather_padding_row_passes_no_gradient(indices):
    """A Gather marked with PADDING_KEY (nn.Embedding's padding_idx) sums no gradient into that
    row, and every other row gets the finite-difference gradient; the training graph is plain
    ONNX that onnxruntime runs to the same result."""
    from tests.opcases import run_ort
    from trainer.autodiff import training_info
    from trainer.autodiff.registry import PADDING_KEY

    w = _rng.standard_normal((6, 3))
    idx = [[0, 2, 5], [2, 2, 0]]
    kw = runtime("idx", idx) if indices == "runtime" else {}
    c = Case("Gather-padded", "Gather", [("W", w), ("idx", FROM_PRE if kw else
                                                     ints(*np.ravel(idx)).reshape(2, 3))],
             wrt=["W"], **kw)
    model = loss_model(c)
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "W")
    gather.metadata_props.add(key=PADDING_KEY, value="2")
    grads, tm = gradients(model, ["W"])
    want = finite_differences(model, {"W": w})["W"]
    assert np.abs(want[2]).max() > 0.1
    want[2] = 0
    np.testing.assert_allclose(grads["W"], want, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(run_ort(tm)[training_info(tm).gradients["W"]], grads["W"],
                               rtol=1e-6)


def _empty_case_model(nodes, inits, opset):
    """L = sum(y * R) over `nodes`' output y, at `opset` (R fixed random of y's shape)."""
    from tests.opcases import make_model, run

    y = np.asarray(run(make_model(nodes, initializers=inits, outputs=["y"], opset=opset),
                       fetch=["y"])["y"])
    R = np.random.default_rng(0).standard_normal(y.shape)
    nodes = list(nodes) + [helper.make_node("Mul", ["y", "R__"], ["p__"]),
                           helper.make_node("ReduceSum", ["p__"], ["L"], keepdims=0)]
    return make_model(nodes, initializers={**inits, "R__": R}, outputs=["L"], opset=opset)


_I64 = lambda v: np.array(v, np.int64)  # noqa: E731
EMPTY_CASES = {
    "unsqueeze_0x0": ([helper.make_node("Unsqueeze", ["x", "a"], ["y"])],
                      {"x": np.zeros((0, 0)), "a": _I64([0])}),
    "tile_0": ([helper.make_node("Tile", ["x", "a"], ["y"])], {"x": np.zeros(0), "a": _I64([2])}),
    "flatten_2x0x3": ([helper.make_node("Flatten", ["x"], ["y"], axis=2)],
                      {"x": np.zeros((2, 0, 3))}),
    "reducesum_3x0": ([helper.make_node("ReduceSum", ["x", "a"], ["y"], keepdims=0)],
                      {"x": np.zeros((3, 0)), "a": _I64([0])}),
    "slice_empty_then_tile": ([helper.make_node("Slice", ["x", "s", "e"], ["v"]),
                               helper.make_node("Tile", ["v", "a"], ["y"])],
                              {"x": np.arange(2.0), "s": _I64([0]), "e": _I64([0]),
                               "a": _I64([2])}),
    "matmul_k0_batched": ([helper.make_node("MatMul", ["x", "b"], ["y"])],
                          {"x": np.zeros((2, 1, 0)), "b": np.zeros((0, 2))}),
    # (a reshape of the incoming gradient itself to a shape with several 0s: before opset 14
    # its zeros of that shape, the gradient's dtype taken from its output's)
    "tile_0x0": ([helper.make_node("Tile", ["x", "a"], ["y"])],
                 {"x": np.zeros((0, 0)), "a": _I64([2, 2])}),
    # (GatherND with batch_dims over an empty batch: its rows per batch entry were a -1 of
    # an empty array, which NumPy cannot infer)
    "gather_nd_batch_0": ([helper.make_node("GatherND", ["x", "i"], ["y"], batch_dims=1)],
                          {"x": np.zeros((0, 4)), "i": np.zeros((0, 1), np.int64)}),
    "gather_elements_3x0": ([helper.make_node("GatherElements", ["x", "i"], ["y"], axis=0)],
                            {"x": np.zeros((2, 1, 0)), "i": np.zeros((3, 1, 0), np.int64)}),
}


@pytest.mark.parametrize("opset", [13, 14])
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_gradients_through_size_0_dimensions(case, opset):
    """Before opset 14 a 0 in Reshape's target copies the input's size (no allowzero): the
    backward's Reshapes to a shape with a 0 failed or gave a gradient of another shape
    ((1, 0) for an Unsqueeze of (0, 0)); a batched MatMul over K = 0 could not infer its -1
    rows. Zeros of each input's shape, as torch gives."""
    nodes, inits = EMPTY_CASES[case]
    m = _empty_case_model(nodes, inits, opset)
    wrt = [k for k, v in inits.items() if v.dtype == np.float64]
    got, _ = gradients(m, wrt)
    for k in wrt:
        assert got[k].shape == inits[k].shape, (k, got[k].shape)
        assert not got[k].any()


def test_a_batched_matmul_over_k_0_fed_at_run_time_is_zeros():
    """The planned batched MatMul (one GEMM over the stacked rows) could not infer its -1 rows
    where K is 0 and failed; zeros, as onnxruntime and NumPy give (Resize's gradient of an
    axis resized to length 0 reaches it). Fed, not constants: folding took the cases above."""
    from trainer.executor import Executor

    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.DOUBLE, [2, 1, 0]),
                           helper.make_tensor_value_info("b", TensorProto.DOUBLE, [0, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 1, 3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    y = Executor(model, np).run({"a": np.zeros((2, 1, 0)), "b": np.zeros((0, 3))})["y"]
    assert y.shape == (2, 1, 3) and not y.any()


@pytest.mark.parametrize("eq,shapes", [("ij->j", [(0, 3)]), ("ij->", [(0, 3)]),
                                       ("ij,ij->j", [(0, 3), (1, 3)])])
def test_einsum_gradient_of_a_label_of_size_0(eq, shapes):
    """A label of size 0 summed away or broadcast against size 1 took size 1 in the rule (a
    max over the inputs' sizes): the gradient of X [0, 3] had shape [1, 3]. (onnxruntime runs
    this training graph with the same error, in its own Expand handling, so the check is the
    engine's executor.)"""
    from trainer.autodiff import build_training_graph, training_info
    from trainer.executor import Executor

    names = [f"X{i}" for i in range(len(shapes))]
    values = {n: normal(*sh) for n, sh in zip(names, shapes, strict=True)}
    model = make_model([helper.make_node("Einsum", names, ["y"], equation=eq),
                        helper.make_node("ReduceSum", ["y"], ["L"], keepdims=0)],
                       initializers=values, outputs=["L"], opset=13)
    tm = build_training_graph(model, {"type": "output", "output": "L"}, names)
    grads = training_info(tm).gradients
    got = Executor(tm).run({})
    for n, v in values.items():
        assert got[grads[n]].shape == v.shape, (n, got[grads[n]].shape)
    if len(shapes) == 2:  # (X1's gradient: the sum over the empty rows, zeros)
        np.testing.assert_array_equal(got[grads["X1"]], np.zeros((1, 3)))
