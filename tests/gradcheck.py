"""Gradient-check machinery shared by the tests/test_grad_*.py files: one op per case, its
outputs y feeding L = sum(y * R) with R fixed random; gradients against float64 central finite
differences, and the training graph against onnxruntime (float64, and float32 as trained).

A test file builds its table with `table = CaseTable()`, `table.add(op, id, inputs, **attrs)`,
exposes it as a module-level `CASES = table.cases` (the coverage test reads it) and
parametrizes `check_case` / `check_float32` over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph as OrtInvalidGraph
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

from tests.opcases import away_from_zero, make_model, run, run_ort, to_float32
from trainer.autodiff import build_training_graph, training_info
from trainer.executor import Executor

F64 = np.float64
EPS = 1e-6
RTOL, ATOL = 1e-6, 1e-6
_rng = np.random.default_rng(1234)


def normal(*shape: int) -> np.ndarray:
    return np.asarray(_rng.standard_normal(shape))


def positive(*shape: int) -> np.ndarray:
    return np.asarray(_rng.uniform(0.5, 2.0, shape))


def nonzero(*shape: int) -> np.ndarray:
    return np.asarray(away_from_zero(_rng, shape))


def ints(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


FROM_PRE = np.zeros(0, np.int8)  # placeholder: the input is produced by the case's `pre` nodes


@dataclass
class Case:
    id: str
    op: str
    inputs: list[tuple[str, np.ndarray | None]]  # node inputs in order (None = absent)
    attrs: dict = field(default_factory=dict)
    wrt: list[str] | None = None  # default: every float64 input
    opset: int = 18
    n_out: int = 1
    use: tuple[int, ...] | None = None  # outputs feeding L (default: all float outputs)
    pre: list[onnx.NodeProto] = field(default_factory=list)  # nodes before the op
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # initializers only `pre` reads
    build: dict = field(default_factory=dict)  # build_training_graph keyword arguments

    def params(self) -> list[str]:
        if self.wrt is not None:
            return self.wrt
        floats = [n for n, a in [*self.inputs, *self.extra.items()]
                  if a is not None and a is not FROM_PRE and a.dtype == F64]
        return list(dict.fromkeys(floats))  # a tensor may feed several inputs

    def __str__(self) -> str:
        return self.id


def loss_model(c: Case) -> onnx.ModelProto:
    """Initializers -> op -> L = sum_i ReduceSum(y_i * R_i) over the used float outputs."""
    inits = {n: a for n, a in c.inputs if a is not None and a is not FROM_PRE}
    inits.update(c.extra)
    names = [n if a is not None else "" for n, a in c.inputs]
    while names and not names[-1]:
        names.pop()
    outs = [f"y{i}" for i in range(c.n_out)]
    nodes = [*c.pre, helper.make_node(c.op, names, outs, **c.attrs)]
    probe = run(make_model(nodes, initializers=inits, outputs=outs, opset=c.opset),
                fetch=outs)
    use = c.use if c.use is not None else tuple(
        i for i, o in enumerate(outs) if np.asarray(probe[o]).dtype == F64)
    terms = []
    rng = np.random.default_rng(0)
    for i in use:
        r = f"R{i}"
        inits[r] = rng.standard_normal(np.shape(probe[f"y{i}"]))
        nodes += [helper.make_node("Mul", [f"y{i}", r], [f"p{i}"]),
                  helper.make_node("ReduceSum", [f"p{i}"], [f"s{i}"], keepdims=0)]
        terms.append(f"s{i}")
    nodes.append(helper.make_node("Sum" if len(terms) > 1 else "Identity", terms, ["L"]))
    return make_model(nodes, initializers=inits, outputs=["L"], opset=c.opset)


def finite_differences(model: onnx.ModelProto, params: dict[str, np.ndarray]
                       ) -> dict[str, np.ndarray]:
    ex = Executor(model, np, feeds=list(params))
    base = {k: v.copy() for k, v in params.items()}
    out = {}
    for name, value in params.items():
        g = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            vals = []
            for sign in (1.0, -1.0):
                pert = value.copy()
                pert[idx] += sign * EPS
                vals.append(float(ex.run({**base, name: pert})["L"]))
            g[idx] = (vals[0] - vals[1]) / (2 * EPS)
        out[name] = g
    return out


def gradients(model: onnx.ModelProto, wrt: list[str], **build) -> tuple[dict, onnx.ModelProto]:
    tm = build_training_graph(model, {"type": "output", "output": "L"}, wrt, **build)
    info = training_info(tm)
    res = run(tm, fetch=[info.gradients[p] for p in wrt])
    return {p: res[info.gradients[p]] for p in wrt}, tm


def check_case(c: Case) -> None:
    model = loss_model(c)
    wrt = c.params()
    grads, tm = gradients(model, wrt, **c.build)
    values = {n: a for n, a in [*c.inputs, *c.extra.items()] if n in wrt}
    fd = finite_differences(model, values)
    for p in wrt:
        assert grads[p].shape == values[p].shape, (p, grads[p].shape, values[p].shape)
        assert grads[p].dtype == F64, (p, grads[p].dtype)
        np.testing.assert_allclose(grads[p], fd[p], rtol=RTOL, atol=ATOL, err_msg=f"d/d{p}")
    # The training graph is standard ONNX: onnxruntime computes the same gradients (it reads
    # float attributes as float32, hence rtol 1e-6). Where it has no float64 kernel (Conv,
    # AveragePool, ...), or the spec allows no float64 input (DequantizeLinear's scale), the
    # graph is converted to float32 and compared at float32 precision.
    info = training_info(tm)
    try:
        res, tol = run_ort(tm), 1e-6
    except (OrtNotImplemented, OrtInvalidGraph) as err:
        if isinstance(err, OrtInvalidGraph) and "tensor(double)" not in str(err):
            raise
        res, tol = run_ort(to_float32(tm)), 1e-4
    for p in wrt:
        np.testing.assert_allclose(res[info.gradients[p]], grads[p], rtol=tol, atol=tol,
                                   err_msg=f"onnxruntime d/d{p}")


def check_float32(c: Case) -> None:
    """Training runs in float32: the emitted nodes and constants must keep that dtype, so the
    graph runs in onnxruntime and agrees with the executor."""
    model = to_float32(loss_model(c))
    wrt = c.params()
    grads, tm = gradients(model, wrt, **c.build)
    res = run_ort(tm)
    for p, name in training_info(tm).gradients.items():
        assert grads[p].dtype == np.float32, (p, grads[p].dtype)
        np.testing.assert_allclose(res[name], grads[p], rtol=1e-4, atol=1e-4, err_msg=p)


class CaseTable:
    def __init__(self) -> None:
        self.cases: list[Case] = []

    def add(self, op: str, id: str, inputs, **kw) -> None:
        """A case `op-id`; keywords that are Case fields (wrt, opset, n_out, use, pre, extra,
        build) configure it, every other keyword is a node attribute."""
        known = set(Case.__dataclass_fields__)
        attrs = {k: v for k, v in kw.items() if k not in known}
        rest = {k: v for k, v in kw.items() if k in known}
        self.cases.append(Case(f"{op}-{id}", op, list(inputs), attrs, **rest))


def rule_tests(cases: list[Case]):
    """The two standard tests of a case table, for a test module to bind at module level:
    `test_rule_matches_finite_differences, test_rule_float32_training_graph = rule_tests(CASES)`.
    """
    import pytest

    @pytest.mark.parametrize("c", cases, ids=str)
    def test_rule_matches_finite_differences(c: Case) -> None:
        check_case(c)

    @pytest.mark.parametrize("c", cases, ids=str)
    def test_rule_float32_training_graph(c: Case) -> None:
        check_float32(c)

    return test_rule_matches_finite_differences, test_rule_float32_training_graph
