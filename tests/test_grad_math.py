"""Gradient rules of elementwise math, activations, Clip/Max/Min/Mean/Mod, reductions, scans and
the softmax family: float64 finite differences and onnxruntime per case (tests/gradcheck.py),
PyTorch autograd at the non-differentiable points where a choice is made, and the opsets whose
gradient nodes differ (no Where before 9, no float Equal before 11, legacy broadcast before 7).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from tests.gradcheck import (
    ATOL,
    RTOL,
    Case,
    CaseTable,
    check_case,
    check_float32,
    finite_differences,
    gradients,
    ints,
    loss_model,
    nonzero,
    normal,
    positive,
)
from tests.opcases import distinct, make_model, to_float32
from trainer.autodiff import build_training_graph, training_info
from trainer.autodiff.registry import NO_GRADIENT
from trainer.errors import ModelError
from trainer.executor import Executor

_rng = np.random.default_rng(2024)


def uniform(lo: float, hi: float, *shape: int) -> np.ndarray:
    return _rng.uniform(lo, hi, shape)


def spread(*shape: int) -> np.ndarray:
    """Pairwise distinct values (no ties for max/min)."""
    return distinct(_rng, shape, spread=2.0)


def avoiding(points, *shape: int, scale: float = 2.0, gap: float = 0.15) -> np.ndarray:
    """Normal values at least `gap` away from each of `points` (kinks of the op)."""
    x = _rng.standard_normal(shape) * scale
    for p in points:
        near = np.abs(x - p) < gap
        x[near] = p + np.where(x[near] >= p, gap, -gap) * 2
    return x


table = CaseTable()
add = table.add
CASES = table.cases
# Cases onnxruntime cannot run in float64 though the op exists (type constraints narrower than
# the engine's: Celu before opset 28) or at all (SwiGLU, opsets before 7): finite differences
# only, and the float32 graph through onnxruntime where it has the op, else the executor.
NO_ORT64: set[str] = set()
NO_ORT: set[str] = set()

# -- unary math ---------------------------------------------------------------------------------
_MATH = {"Sin": normal, "Cos": normal, "Tan": lambda *s: uniform(-1.2, 1.2, *s),
         "Asin": lambda *s: uniform(-0.9, 0.9, *s), "Acos": lambda *s: uniform(-0.9, 0.9, *s),
         "Atan": normal, "Sinh": normal, "Cosh": normal, "Asinh": normal,
         "Acosh": lambda *s: uniform(1.2, 3.0, *s), "Atanh": lambda *s: uniform(-0.9, 0.9, *s),
         "Erf": normal}
for op, maker in _MATH.items():
    first = 7 if op in ("Sin", "Cos", "Tan", "Asin", "Acos", "Atan") else 9
    add(op, "[3,4]", [("X", maker(3, 4))])
    add(op, f"opset{first}", [("X", maker(2, 3))], opset=first)
add("Erf", "opset13", [("X", normal(2, 3))], opset=13)

# The first rules of the engine, at the opsets where their nodes differ: 7 (first NumPy
# broadcasting), 8 (no Where, no Sign), 13.
for op, maker in (("Sigmoid", normal), ("Tanh", normal), ("Exp", normal), ("Log", positive),
                  ("Sqrt", positive), ("Reciprocal", nonzero), ("Abs", nonzero),
                  ("Neg", normal), ("Identity", normal), ("Relu", nonzero),
                  ("LeakyRelu", nonzero)):
    for opset in (7, 8, 13):
        add(op, f"opset{opset}", [("X", maker(2, 3))], opset=opset)
add("LeakyRelu", "alpha-opset8", [("X", nonzero(2, 5))], alpha=0.3, opset=8)

add("Pow", "static-exponent2", [("A", normal(3, 4)), ("B", np.array(2.0))], wrt=["A"])
add("Pow", "static-exponent-vector", [("A", positive(3, 4)),
                                     ("B", np.array([0.0, 1.5, 3.0, -1.0]))], wrt=["A"])
add("Pow", "static-int-exponent", [("A", normal(2, 3)), ("B", ints(3))], opset=13)
# At A = 0 finite differences see integer exponents only (A - eps < 0); tests below compare
# the other cases with PyTorch.
add("Pow", "zero-base", [("A", np.array([[0.0, 0.5, 1.5], [0.0, 2.0, 0.7]])),
                         ("B", np.array([[2.0, 2.0, -0.5], [3.0, 0.0, 1.2]]))])
add("Pow", "zero-base-opset8", [("A", np.array([0.0, 0.5, 1.5, 0.0])),
                                ("B", np.array([2.0, 2.0, -0.5, 3.0]))], opset=8)
add("Pow", "zero-exponent", [("A", positive(2, 3)), ("B", np.array([0.0, 1.0, 2.5]))])

# -- activations --------------------------------------------------------------------------------
add("Elu", "default", [("X", nonzero(3, 4))])
add("Elu", "alpha-opset7", [("X", nonzero(3, 4))], alpha=0.5, opset=7)
add("Selu", "default", [("X", nonzero(3, 4))])
add("Selu", "custom-opset7", [("X", nonzero(3, 4))], alpha=1.3, gamma=0.9, opset=7)
for opset in (12, 22):
    add("Celu", f"default-opset{opset}", [("X", nonzero(3, 4))], opset=opset)
    add("Celu", f"alpha2-opset{opset}", [("X", nonzero(3, 4))], alpha=2.0, opset=opset)
    NO_ORT64 |= {f"Celu-default-opset{opset}", f"Celu-alpha2-opset{opset}"}
add("Gelu", "none", [("X", uniform(-4, 4, 3, 4))], opset=20)
add("Gelu", "tanh", [("X", uniform(-4, 4, 3, 4))], approximate="tanh", opset=20)
add("Gelu", "none-large", [("X", np.array([-12.0, -6.0, 6.0, 12.0]))], opset=20)
add("HardSigmoid", "default", [("X", avoiding((-2.5, 2.5), 3, 4))])
add("HardSigmoid", "alpha-beta-opset7", [("X", avoiding((-1.5, 3.5), 3, 4))], alpha=0.4,
    beta=0.6, opset=7)
add("HardSwish", "[3,4]", [("X", avoiding((-3.0, 3.0), 3, 4, scale=3.0))], opset=14)
add("HardSwish", "opset22", [("X", avoiding((-3.0, 3.0), 2, 5, scale=3.0))], opset=22)
add("Mish", "[3,4]", [("X", uniform(-5, 5, 3, 4))])
add("Softplus", "[3,4]", [("X", uniform(-5, 5, 3, 4))])
add("Softplus", "opset7", [("X", normal(2, 3))], opset=7)
add("Softsign", "[3,4]", [("X", nonzero(3, 4))])
add("Softsign", "opset7", [("X", nonzero(2, 3))], opset=7)
add("ThresholdedRelu", "default", [("X", avoiding((1.0,), 3, 4))], opset=10)
add("ThresholdedRelu", "alpha", [("X", avoiding((-0.5,), 3, 4))], alpha=-0.5)
add("Shrink", "default", [("X", avoiding((-0.5, 0.5), 3, 4))])
add("Shrink", "bias-lambd", [("X", avoiding((-1.2, 1.2), 3, 4))], bias=0.3, lambd=1.2)
add("Swish", "default", [("X", uniform(-5, 5, 3, 4))], opset=24)
add("Swish", "alpha", [("X", normal(3, 4))], alpha=0.7, opset=24)
add("SwiGLU", "default", [("A", uniform(-4, 4, 3, 4)), ("B", normal(3, 4))], opset=28)
add("SwiGLU", "alpha-only-B", [("A", normal(2, 5)), ("B", normal(2, 5))], alpha=1.7, opset=28,
    wrt=["B"])
add("SwiGLU", "alpha-only-A", [("A", normal(2, 5)), ("B", normal(2, 5))], alpha=0.6, opset=28,
    wrt=["A"])
NO_ORT |= {"SwiGLU-default", "SwiGLU-alpha-only-B", "SwiGLU-alpha-only-A"}

for sid, s_shape in (("same", (2, 3, 2, 2)), ("channel", (3, 1, 1)), ("scalar", (1,)),
                     ("trailing", (2,)), ("0-d", ())):
    add("PRelu", sid, [("X", nonzero(2, 3, 2, 2)), ("slope", normal(*s_shape))])
add("PRelu", "channel-opset7", [("X", nonzero(2, 3, 2, 2)), ("slope", normal(3, 1, 1))],
    opset=7)
add("PRelu", "only-slope-opset9", [("X", nonzero(2, 3, 4)), ("slope", normal(4))], opset=9,
    wrt=["slope"])
add("PRelu", "only-X", [("X", nonzero(3, 4)), ("slope", normal(4))], wrt=["X"])

# -- Clip, Max, Min, Mean, Mod ------------------------------------------------------------------
_x = avoiding((-0.5, 0.8), 3, 4, scale=1.0)
add("Clip", "opset13-both", [("X", _x), ("lo", np.array(-0.5)), ("hi", np.array(0.8))],
    opset=13)
add("Clip", "opset13-min", [("X", _x), ("lo", np.array(-0.5))], opset=13)
add("Clip", "opset13-max", [("X", _x), ("lo", None), ("hi", np.array(0.8))], opset=13)
add("Clip", "opset13-none", [("X", _x)], opset=13)
add("Clip", "min-above-max", [("X", _x), ("lo", np.array(0.8)), ("hi", np.array(-0.5))],
    opset=13)
add("Clip", "opset11-both", [("X", _x), ("lo", np.array(-0.5)), ("hi", np.array(0.8))],
    opset=11)
add("Clip", "opset12-only-X", [("X", _x), ("lo", np.array(-0.5)), ("hi", np.array(0.8))],
    opset=12, wrt=["X"])
add("Clip", "only-bounds", [("X", _x), ("lo", np.array(-0.5)), ("hi", np.array(0.8))],
    wrt=["lo", "hi"])
add("Clip", "opset7-attrs", [("X", _x)], min=-0.5, max=0.8, opset=7)
add("Clip", "opset10-max-attr", [("X", _x)], max=0.8, opset=10)
add("Clip", "opset9-min-attr", [("X", _x)], min=-0.5, opset=9)

for op in ("Max", "Min"):
    add(op, "[3,4]&[4]", [("A", spread(3, 4)), ("B", spread(4))])
    add(op, "three-broadcast", [("A", spread(2, 1, 4)), ("B", spread(3, 1)), ("C", spread(4))])
    add(op, "single", [("A", normal(2, 3))])
    add(op, "ties", [("A", np.array([[1.0, 2.0], [3.0, 4.0]])),
                     ("B", np.array([[1.0, 0.0], [5.0, 4.0]]))])
    same = spread(2, 3)
    add(op, "same-input", [("A", same), ("A", same)])
    add(op, "opset7", [("A", spread(2, 3)), ("B", spread(2, 3)), ("C", spread(2, 3))], opset=7)
    add(op, "opset8-broadcast", [("A", spread(3, 4)), ("B", spread(3, 1))], opset=8)
    add(op, "opset12", [("A", spread(3, 4)), ("B", spread(4))], opset=12)
    add(op, "only-second", [("A", spread(3, 4)), ("B", spread(1, 4))], wrt=["B"])
add("Mean", "[3,4]&[4]", [("A", normal(3, 4)), ("B", normal(4))])
add("Mean", "three-broadcast", [("A", normal(2, 1, 4)), ("B", normal(3, 1)), ("C", normal())])
add("Mean", "single", [("A", normal(2, 3))])
add("Mean", "opset7", [("A", normal(2, 3)), ("B", normal(2, 3))], opset=7)


def mod_operands(*shape: int) -> tuple[np.ndarray, np.ndarray]:
    """A = B * (n + f), f in (0.2, 0.8): A / B is never near an integer (the jumps)."""
    b = nonzero(*shape) * 2
    return b * (_rng.integers(-3, 4, shape) + _rng.uniform(0.2, 0.8, shape)), b


# Float Mod with fmod=0 (floor, Python's %) is valid from opset 28.
_a, _b = mod_operands(3, 4)
add("Mod", "fmod1", [("A", _a), ("B", _b)], fmod=1)
add("Mod", "fmod1-opset10", [("A", _a), ("B", _b)], fmod=1, opset=10)
add("Mod", "fmod0-opset28", [("A", _a), ("B", _b)], fmod=0, opset=28)
add("Mod", "broadcast-B", [("A", np.array([[2.5, -3.7, 5.2, 0.9], [7.1, -1.3, 2.2, -4.4]])),
                           ("B", np.array([0.8, 1.1, -2.0, 0.7]))], fmod=1)
add("Mod", "broadcast-A", [("A", np.array([2.3, -3.7, 5.2])),
                           ("B", np.array([[0.9], [1.9], [-2.1]]))], fmod=1)

# -- reductions ---------------------------------------------------------------------------------
_prod_x = normal(2, 3, 4)
_prod_x[0, 1, 2] = 0.0  # one zero in a slice
_prod_x[1, 0, 1] = _prod_x[1, 0, 3] = 0.0  # two zeros
_prod_x[1, 2, 0] = 0.0
_l2_x = normal(2, 3, 4)
_l2_x[1, 1, :] = 0.0  # a zero slice for axes [-1]
_max_x = spread(2, 3, 4)
_max_x[0, 1, 3] = _max_x[0, 1, 0] = _max_x[0, 1].max() + 0.5  # a tie along axes [-1]
REDUCE_INPUTS = {
    "ReduceMax": spread, "ReduceMin": spread, "ReduceProd": normal, "ReduceL1": nonzero,
    "ReduceL2": normal, "ReduceLogSum": positive, "ReduceLogSumExp": normal,
    "ReduceSumSquare": normal,
}
for op, maker in REDUCE_INPUTS.items():
    for axes, keep in (([1], 1), ([0, 2], 0), ([-1], 1), (None, 0), (None, 1), ([-3, 1], 0)):
        x = maker(2, 3, 4)
        ax = "all" if axes is None else "".join(map(str, axes))
        add(op, f"opset18-axes{ax}-keep{keep}",
            [("X", x), ("axes", None if axes is None else ints(*axes))], keepdims=keep)
        add(op, f"opset13-axes{ax}-keep{keep}", [("X", x)], opset=13, keepdims=keep,
            **({} if axes is None else {"axes": axes}))
    add(op, "opset18-noop", [("X", maker(2, 3))], noop_with_empty_axes=1)
    add(op, "opset18-noop-empty-input", [("X", maker(2, 3)), ("axes", ints())],
        noop_with_empty_axes=1)
    add(op, "opset18-empty-axes-all", [("X", maker(2, 3)), ("axes", ints())], keepdims=0)
    add(op, "opset11-axes1", [("X", maker(2, 3, 4))], opset=11, axes=[1], keepdims=0)
    add(op, "opset10-axes02", [("X", maker(2, 3, 4))], opset=10, axes=[0, 2])
    add(op, "opset7-axes-1-keep0", [("X", maker(2, 3, 4))], opset=7, axes=[-1], keepdims=0)
    add(op, "opset8-all", [("X", maker(3, 2))], opset=8, keepdims=0)
    add(op, "[1,3]-keep1", [("X", maker(1, 3)), ("axes", ints(0))])
# Every subset of axes of a rank-3 input, keepdims alternating.
for op, maker in REDUCE_INPUTS.items():
    for k, axes in enumerate(([0], [2], [0, 1], [1, 2], [0, 1, 2])):
        add(op, "subset" + "".join(map(str, axes)),
            [("X", maker(3, 2, 2)), ("axes", ints(*axes))], keepdims=k % 2)
add("ReduceProd", "zeros-opset18", [("X", _prod_x), ("axes", ints(-1))], keepdims=0)
for opset in (13, 8):
    add("ReduceProd", f"zeros-opset{opset}", [("X", _prod_x)], axes=[-1], keepdims=0,
        opset=opset)
add("ReduceProd", "zeros-axes01", [("X", _prod_x), ("axes", ints(0, 1))])
add("ReduceProd", "zeros-all", [("X", np.array([[1.5, 0.0], [2.0, -0.5]]))], keepdims=0)
add("ReduceL2", "zero-slice", [("X", _l2_x), ("axes", ints(-1))], keepdims=0)
add("ReduceL2", "zero-slice-opset8", [("X", _l2_x)], axes=[-1], opset=8)
add("ReduceMax", "tie", [("X", _max_x), ("axes", ints(-1))], keepdims=0)
add("ReduceMin", "tie-opset10", [("X", -_max_x)], axes=[2], opset=10)
for op in ("ReduceSum", "ReduceMean"):
    add(op, "opset18-noop-empty-input", [("X", normal(2, 3)), ("axes", ints())],
        noop_with_empty_axes=1)
    add(op, "opset9-axes02-keep0", [("X", normal(2, 3, 4))], opset=9, axes=[0, 2],
        keepdims=0)
    add(op, "[1,3]-axes0", [("X", normal(1, 3))], opset=11, axes=[0])

# -- scans --------------------------------------------------------------------------------------
for excl in (0, 1):
    for rev in (0, 1):
        for axis in (0, 1, -1):
            add("CumSum", f"axis{axis}-excl{excl}-rev{rev}",
                [("X", normal(2, 3, 4)), ("axis", np.array(axis))], exclusive=excl,
                reverse=rev, opset=14)
        add("CumSum", f"opset11-excl{excl}-rev{rev}", [("X", normal(3, 4)),
                                                       ("axis", ints(1))],
            exclusive=excl, reverse=rev, opset=11)
        cp = normal(3, 5)
        cp[0, 1] = 0.0  # one zero
        cp[1, 1] = cp[1, 3] = 0.0  # two zeros
        cp[2, 0] = cp[2, 4] = 0.0  # zeros at both ends
        add("CumProd", f"zeros-excl{excl}-rev{rev}", [("X", cp), ("axis", np.array(-1))],
            exclusive=excl, reverse=rev, opset=26)
        add("CumProd", f"axis0-excl{excl}-rev{rev}", [("X", normal(3, 2, 2)),
                                                      ("axis", ints(0))],
            exclusive=excl, reverse=rev, opset=26)

# -- softmax family at the opsets with 2-D coercion ----------------------------------------------
for op in ("Softmax", "LogSoftmax"):
    for opset in (7, 9, 12):
        for axis in (0, 1, 2, None):
            kw = {} if axis is None else {"axis": axis}
            add(op, f"opset{opset}-axis{axis}", [("X", normal(2, 3, 4))], opset=opset, **kw)
    add(op, "opset13-axis1", [("X", normal(2, 3, 4))], opset=13, axis=1)
    add(op, "opset11-axis-2", [("X", normal(2, 3, 4))], opset=11, axis=-2)

# Opset 6: binary nodes broadcast through the attribute; onnxruntime implements none of these
# opsets' arithmetic, so they are checked against finite differences only.
_OPSET6 = [
    ("Sigmoid", [("X", normal(2, 3))], {}), ("Tanh", [("X", normal(2, 3))], {}),
    ("Sqrt", [("X", positive(2, 3))], {}), ("Relu", [("X", nonzero(2, 3))], {}),
    ("LeakyRelu", [("X", nonzero(2, 3))], {"alpha": 0.2}), ("Abs", [("X", nonzero(2, 3))], {}),
    ("Elu", [("X", nonzero(2, 3))], {}), ("Selu", [("X", nonzero(2, 3))], {}),
    ("HardSigmoid", [("X", avoiding((-2.5, 2.5), 2, 3))], {}),
    ("Softsign", [("X", nonzero(2, 3))], {}),
    ("PRelu", [("X", nonzero(2, 3, 2)), ("slope", normal(3))], {}),
    ("PRelu", [("X", nonzero(2, 3)), ("slope", normal(1))], {}),
    ("Clip", [("X", _x)], {"min": -0.5, "max": 0.8}),
    ("Max", [("A", spread(2, 3)), ("B", spread(2, 3))], {}),
    ("Mean", [("A", normal(2, 3)), ("B", normal(2, 3))], {}),
    ("ReduceMax", [("X", spread(2, 3, 4))], {"axes": [1], "keepdims": 0}),
    ("ReduceProd", [("X", _prod_x)], {"axes": [2]}),
    ("ReduceL2", [("X", _l2_x)], {"axes": [2]}),
    ("ReduceL1", [("X", nonzero(2, 3, 4))], {"axes": [0, 2]}),
    ("ReduceLogSumExp", [("X", normal(2, 3))], {"axes": [0]}),
    ("ReduceSumSquare", [("X", normal(2, 3))], {"axes": [1], "keepdims": 0}),
    ("ReduceMean", [("X", normal(2, 3, 4))], {"axes": [1]}),
    ("Softmax", [("X", normal(2, 3, 4))], {}), ("LogSoftmax", [("X", normal(2, 3, 4))], {}),
]
for k, (op, inputs, attrs) in enumerate(_OPSET6):
    add(op, f"opset6-{k}", inputs, opset=6, **attrs)
    NO_ORT.add(f"{op}-opset6-{k}")

_ids = [c.id for c in CASES]
assert len(_ids) == len(set(_ids)), sorted({i for i in _ids if _ids.count(i) > 1})


# -- tests --------------------------------------------------------------------------------------
def _fd_only(c: Case) -> None:
    model = loss_model(c)
    wrt = c.params()
    grads, tm = gradients(model, wrt, **c.build)
    onnx.checker.check_model(tm)
    values = {n: a for n, a in [*c.inputs, *c.extra.items()] if n in wrt}
    fd = finite_differences(model, values)
    for p in wrt:
        assert grads[p].shape == values[p].shape, (p, grads[p].shape, values[p].shape)
        np.testing.assert_allclose(grads[p], fd[p], rtol=RTOL, atol=ATOL, err_msg=f"d/d{p}")


@pytest.mark.parametrize("c", CASES, ids=str)
def test_rule_matches_finite_differences(c: Case) -> None:
    if c.id in NO_ORT or c.id in NO_ORT64:
        _fd_only(c)
    else:
        check_case(c)


@pytest.mark.parametrize("c", CASES, ids=str)
def test_rule_float32_training_graph(c: Case) -> None:
    if c.id not in NO_ORT:
        check_float32(c)
        return
    # No onnxruntime: the float32 graph keeps float32 through the executor and agrees with
    # the float64 gradients.
    wrt = c.params()
    g64, _ = gradients(loss_model(c), wrt, **c.build)
    g32, _ = gradients(to_float32(loss_model(c)), wrt, **c.build)
    for p in wrt:
        assert g32[p].dtype == np.float32, (p, g32[p].dtype)
        np.testing.assert_allclose(g32[p], g64[p], rtol=1e-4, atol=1e-4, err_msg=p)


# -- PyTorch autograd where the derivative has kinks, ties or zeros -------------------------------
def _grads(op: str, inputs: list[tuple[str, np.ndarray | None]], attrs: dict, wrt: list[str],
           r: np.ndarray, opset: int = 18) -> dict[str, np.ndarray]:
    """Gradients of L = sum(op(inputs) * r) from the training graph."""
    inits = {n: a for n, a in inputs if a is not None}
    names = [n if a is not None else "" for n, a in inputs]
    nodes = [helper.make_node(op, names, ["y"], **attrs),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers={**inits, "R": r}, outputs=["L"], opset=opset)
    return gradients(model, wrt)[0]


def _torch_grads(fn, values: dict[str, np.ndarray], wrt: list[str], r: np.ndarray):
    ts = {k: torch.tensor(v, requires_grad=k in wrt) for k, v in values.items()}
    (fn(**ts) * torch.tensor(r)).sum().backward()
    return {k: ts[k].grad.numpy() for k in wrt}


_kink = np.array([[-3.0, -1.0, 0.0, 0.5], [1.0, 3.0, -0.5, 2.0]])
_T = torch.nn.functional
TORCH_CASES = {
    # op, inputs, attrs, torch function, opset
    "Relu-at-0": ("Relu", {"X": _kink}, {}, lambda X: torch.relu(X), 18),
    "Relu-at-0-opset8": ("Relu", {"X": _kink}, {}, lambda X: torch.relu(X), 8),
    "LeakyRelu-at-0": ("LeakyRelu", {"X": _kink}, {"alpha": 0.1},
                       lambda X: _T.leaky_relu(X, 0.1), 18),
    "Abs-at-0": ("Abs", {"X": _kink}, {}, lambda X: torch.abs(X), 18),
    "Abs-at-0-opset8": ("Abs", {"X": _kink}, {}, lambda X: torch.abs(X), 8),
    "Elu-at-0": ("Elu", {"X": _kink}, {"alpha": 0.7}, lambda X: _T.elu(X, 0.7), 18),
    # torch.selu with ONNX's (float32) constants: torch.elu scaled.
    "Selu-at-0": ("Selu", {"X": _kink}, {}, lambda X: _T.elu(X, 1.67326319217681884765625)
                  * 1.05070102214813232421875, 18),
    "Celu-at-0": ("Celu", {"X": _kink}, {"alpha": 2.0}, lambda X: _T.celu(X, 2.0), 12),
    "HardSigmoid-at-edges": ("HardSigmoid", {"X": _kink}, {"alpha": 0.25, "beta": 0.75},
                             lambda X: _T.hardsigmoid((X + 1) * 1.5), 18),
    "HardSwish-at-edges": ("HardSwish", {"X": _kink}, {}, lambda X: _T.hardswish(X), 14),
    "ThresholdedRelu-at-alpha": ("ThresholdedRelu", {"X": _kink}, {"alpha": 1.0},
                                 lambda X: _T.threshold(X, 1.0, 0.0), 18),
    "Shrink-at-lambd": ("Shrink", {"X": _kink}, {"lambd": 0.5, "bias": 0.5},
                        lambda X: _T.softshrink(X, 0.5), 18),
    "PRelu-at-0": ("PRelu", {"X": _kink, "slope": np.array([0.1, 0.2, 0.3, 0.4])}, {},
                   lambda X, slope: _T.prelu(X, slope), 18),
    "Clip-at-bounds": ("Clip", {"X": _kink, "lo": np.array(-1.0), "hi": np.array(1.0)}, {},
                       lambda X, lo, hi: torch.clamp(X, lo, hi), 13),
    "Clip-at-bounds-opset11": ("Clip", {"X": _kink, "lo": np.array(-1.0),
                                        "hi": np.array(1.0)}, {},
                               lambda X, lo, hi: torch.clamp(X, lo, hi), 11),
    "Clip-min-above-max": ("Clip", {"X": _kink, "lo": np.array(1.0), "hi": np.array(-1.0)},
                           {}, lambda X, lo, hi: torch.clamp(X, lo, hi), 13),
    "Clip-equal-bounds": ("Clip", {"X": _kink, "lo": np.array(0.5), "hi": np.array(0.5)}, {},
                          lambda X, lo, hi: torch.clamp(X, lo, hi), 13),
    "Max-3-way-tie": ("Max", {"A": _kink, "B": np.array([0.0, 3.0, 0.0, 2.0]),
                              "C": np.array([[0.0], [3.0]])}, {},
                      lambda A, B, C: torch.stack(torch.broadcast_tensors(A, B, C)).amax(0),
                      18),
    "Max-tie-opset8": ("Max", {"A": _kink, "B": _kink[::-1].copy()}, {},
                       lambda A, B: torch.maximum(A, B), 8),
    "Min-3-way-tie": ("Min", {"A": _kink, "B": np.array([0.0, 3.0, 0.0, 2.0]),
                              "C": np.array([[0.0], [3.0]])}, {},
                      lambda A, B, C: torch.stack(torch.broadcast_tensors(A, B, C)).amin(0),
                      18),
    "ReduceMax-3-way-tie": ("ReduceMax", {"X": np.array([[2.0, 1.0, 2.0, 2.0],
                                                         [0.0, 5.0, 5.0, -1.0]])},
                            {"axes": [1], "keepdims": 0}, lambda X: X.amax(1), 13),
    "ReduceMin-tie-all": ("ReduceMin", {"X": np.array([[2.0, -1.0], [-1.0, -1.0]])},
                          {"keepdims": 0}, lambda X: X.amin(), 18),
    "ReduceMax-tie-opset10": ("ReduceMax", {"X": np.array([[2.0, 1.0, 2.0, 2.0],
                                                           [0.0, 5.0, 5.0, -1.0]])},
                              {"axes": [0, 1]}, lambda X: X.amax((0, 1), keepdim=True), 10),
    "ReduceProd-zeros": ("ReduceProd", {"X": np.array([[2.0, 0.0, 3.0], [0.0, 0.0, 4.0],
                                                       [1.5, -2.0, 0.5]])},
                         {"axes": [1], "keepdims": 0}, lambda X: X.prod(1), 13),
    "ReduceProd-zeros-opset10": ("ReduceProd", {"X": np.array([[2.0, 0.0], [0.0, 0.0],
                                                               [1.5, -2.0]])},
                                 {"axes": [1]}, lambda X: X.prod(1, keepdim=True), 10),
    "ReduceL2-zero": ("ReduceL2", {"X": np.array([[0.0, 0.0, 0.0], [3.0, 0.0, -4.0]])},
                      {"axes": [1], "keepdims": 0},
                      lambda X: torch.linalg.vector_norm(X, dim=1), 13),
    "ReduceL2-zero-opset8": ("ReduceL2", {"X": np.array([[0.0, 0.0, 0.0], [3.0, 0.0, -4.0]])},
                             {"axes": [1], "keepdims": 0},
                             lambda X: torch.linalg.vector_norm(X, dim=1), 8),
    "ReduceL1-zero": ("ReduceL1", {"X": np.array([[0.0, 1.0, -2.0], [3.0, 0.0, -4.0]])},
                      {"axes": [1], "keepdims": 0},
                      lambda X: torch.linalg.vector_norm(X, 1, dim=1), 13),
    "ReduceLogSumExp-inf": ("ReduceLogSumExp", {"X": np.array([[-np.inf, 1.0, 2.0],
                                                               [3.0, 0.0, -4.0]])},
                            {"axes": [1], "keepdims": 0}, lambda X: X.logsumexp(1), 13),
    "CumProd-zeros": ("CumProd", {"X": np.array([[2.0, 0.0, 3.0, 0.0, 1.5],
                                                 [0.0, 1.0, 2.0, -1.0, 0.5]]),
                                  "axis": np.array(1)}, {},
                      lambda X, axis: X.cumprod(1), 26),
    "Pow-zero-base": ("Pow", {"A": np.array([0.0, 0.0, 0.0, 2.0]),
                              "B": np.array([0.0, 2.0, 0.5, 0.0])}, {},
                      lambda A, B: torch.pow(A, B), 18),
    "Pow-zero-base-opset8": ("Pow", {"A": np.array([0.0, 0.0, 0.0, 2.0]),
                                     "B": np.array([0.0, 2.0, 0.5, 0.0])}, {},
                             lambda A, B: torch.pow(A, B), 8),
    "Mod-fmod": ("Mod", {"A": np.array([5.5, -5.5, 7.25, -0.75]),
                         "B": np.array([2.0, 2.0, -1.5, 0.5])}, {"fmod": 1},
                 lambda A, B: torch.fmod(A, B), 18),
    "Mod-remainder": ("Mod", {"A": np.array([5.5, -5.5, 7.25, -0.75]),
                              "B": np.array([2.0, 2.0, -1.5, 0.5])}, {"fmod": 0},
                      lambda A, B: torch.remainder(A, B), 28),
}


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # 0 ** -0.5, as torch
@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_matches_torch_at_kinks(name: str) -> None:
    op, values, attrs, fn, opset = TORCH_CASES[name]
    wrt = [k for k, v in values.items() if v.dtype == np.float64]
    rng = np.random.default_rng(3)
    with torch.no_grad():
        y = fn(**{k: torch.tensor(v) for k, v in values.items()})
    r = rng.standard_normal(tuple(y.shape))
    ours = _grads(op, list(values.items()), attrs, wrt, r, opset)
    ref = _torch_grads(fn, values, wrt, r)
    for k in wrt:  # torch's hardsigmoid uses a float32 1/6, hence rtol 1e-7
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-7, atol=1e-12, err_msg=k)


def test_no_gradient_ops_are_declared() -> None:
    family = {"Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf", "Not", "And", "Or", "Xor",
              "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "BitwiseNot",
              "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitShift", "BitCast", "ArgMax",
              "ArgMin", "Hardmax"}
    assert family <= NO_GRADIENT, sorted(family - NO_GRADIENT)


def test_hardmax_carries_no_gradient() -> None:
    nodes = [helper.make_node("Hardmax", ["X"], ["h"]), helper.make_node("Mul", ["h", "X"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    x = normal(2, 3)
    model = make_model(nodes, initializers={"X": x}, outputs=["L"])
    # The product rule still flows through the Mul's second input; Hardmax adds nothing.
    grads, _ = gradients(model, ["X"])
    h = (x == x.max(axis=-1, keepdims=True)).astype(np.float64)
    np.testing.assert_allclose(grads["X"], h, rtol=0, atol=0)
    only = make_model([helper.make_node("Hardmax", ["X"], ["h"]),
                       helper.make_node("ReduceSum", ["h"], ["L"], keepdims=0)],
                      initializers={"X": x}, outputs=["L"])
    with pytest.raises(ModelError, match="differentiable"):
        build_training_graph(only, {"type": "output", "output": "L"}, ["X"])


def test_reduction_axes_computed_at_run_time_is_a_clear_error() -> None:
    nodes = [helper.make_node("ReduceMax", ["X", "ax"], ["y"], keepdims=0),
             helper.make_node("ReduceSum", ["y"], ["L"], keepdims=0)]
    model = make_model(nodes, inputs={"ax": ints(1)}, initializers={"X": normal(2, 3)},
                       outputs=["L"])
    with pytest.raises(ModelError, match="axes are computed at run time"):
        build_training_graph(model, {"type": "output", "output": "L"}, ["X"])


def test_node_count_does_not_grow_with_size() -> None:
    # Rules emit a fixed number of nodes whatever the tensor size.
    small = Case("s", "ReduceProd", [("X", normal(2, 3)), ("axes", ints(1))])
    large = Case("l", "ReduceProd", [("X", normal(40, 50)), ("axes", ints(1))])
    sizes = [len(gradients(loss_model(c), ["X"])[1].graph.node) for c in (small, large)]
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
@pytest.mark.parametrize("axes", [[0], [1], [0, 1]], ids=["rows", "columns", "all"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_a_reduction_of_rows_the_data_picks(op, axes, keepdims):
    """A reduction of a tensor whose rows the data picks (Compress by a mask input: its row
    count follows the data, graph.data_sized): the gradient's shapes, and ReduceMean's
    count, are read at run time. Built on one mask, run on masks picking other numbers of
    rows; float64 finite differences at each."""
    x = normal(5, 3)
    nodes = [helper.make_node("Greater", ["m", "zero"], ["keep"]),
             helper.make_node("Compress", ["X", "keep"], ["rows"], axis=0),
             helper.make_node(op, ["rows", "axes"], ["y"], keepdims=keepdims),
             helper.make_node("Tanh", ["y"], ["t"]),
             helper.make_node("Mul", ["t", "t"], ["t2"]),
             helper.make_node("ReduceSum", ["t2"], ["L"], keepdims=0)]
    model = make_model(nodes, inputs={"m": np.zeros(5)},
                       initializers={"X": x, "zero": np.zeros(()), "axes": ints(*axes)},
                       outputs=["L"])
    tm = build_training_graph(model, {"type": "output", "output": "L"}, ["X"],
                              example={"m": np.array([1.0, 0, 1, 1, 0])})
    grad = training_info(tm).gradients["X"]
    ex = Executor(tm, np)
    for mask in ([1.0, 1, 0, 0, 0], [1.0, 1, 1, 1, 1], [0.0, 1, 0, 0, 0], [1.0, 0, 1, 1, 0]):
        m = np.array(mask)
        for _ in range(2):  # (the second run takes the specialized plan)
            got = ex.run({"m": m, "X": x})[grad]
        fd = finite_differences(model_with_input(model, m), {"X": x})["X"]
        np.testing.assert_allclose(got, fd, rtol=RTOL, atol=ATOL, err_msg=str(mask))


def model_with_input(model: onnx.ModelProto, m: np.ndarray) -> onnx.ModelProto:
    """`model` with its input m fixed to a constant (for finite differences over X alone)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.input[:]
    out.graph.node.insert(0, helper.make_node("Constant", [], ["m"],
                                              value=onnx.numpy_helper.from_array(m)))
    return out
