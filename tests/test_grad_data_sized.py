"""Gradient rules on values whose size follows the data (graph.data_sized): the rows of X that
a mask input picks (Compress), then one op, then a scalar loss. Each training graph is built on
one mask and run on masks that pick other numbers of rows, against float64 central finite
differences at each; a rule that held a size from the build's run fails here. (A sparse mixture
of experts routes its tokens this way; a batch trimmed to its longest row is sized alike.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.gradcheck import finite_differences
from tests.opcases import make_model
from trainer.autodiff import build_training_graph, training_info
from trainer.executor import Executor

_rng = np.random.default_rng(7)
ROWS = 5
MASKS = ([1.0, 1, 0, 0, 0], [1.0, 1, 1, 1, 1], [0.0, 1, 0, 0, 0], [1.0, 0, 1, 1, 0])
BUILT_ON = np.array([1.0, 0, 1, 1, 0])


def _case(op, inputs=(), attrs=None, x=(ROWS, 4, 6), extra=None, opset=18, pre=(), n_out=1,
          build=None):
    """rows -> op (its inputs, attributes, initializers; `pre` nodes before it) -> y; X's
    shape; build_training_graph's options."""
    return dict(op=op, inputs=list(inputs), attrs=attrs or {}, x=x, extra=extra or {},
                opset=opset, pre=list(pre), n_out=n_out, build=build or {})


_bn = {"g": _rng.standard_normal(4), "b": _rng.standard_normal(4),
       "mu": _rng.standard_normal(4), "var": _rng.uniform(0.5, 2, 4)}


SIZED = {
    "Relu": _case("Relu"),
    "Add-broadcast-row": _case("Add", ["rows", "b"], extra={"b": _rng.standard_normal((1, 4, 6))}),
    "Mul-broadcast-last": _case("Mul", ["rows", "w"], extra={"w": _rng.standard_normal(6)}),
    "Mul-both": _case("Mul", ["rows", "rows"]),
    "Div": _case("Div", ["rows", "d"], extra={"d": _rng.uniform(0.5, 2, (4, 1))}),
    "Pow": _case("Pow", ["rows", "two"], extra={"two": np.array(2.0)}),
    "Where": _case("Where", ["c", "rows", "zero"], extra={
        "c": _rng.random((1, 4, 6)) > 0.5, "zero": np.zeros(())}),
    "Expand": _case("Expand", ["rows", "shape"], x=(ROWS, 1, 6),
                    extra={"shape": np.array([1, 3, 6], np.int64)}),
    "Transpose": _case("Transpose", attrs={"perm": [2, 0, 1]}),
    "Flatten": _case("Flatten", attrs={"axis": 1}),
    "Reshape": _case("Reshape", ["rows", "shape"], extra={"shape": np.array([-1, 3, 8],
                                                                           np.int64)}),
    "Unsqueeze": _case("Unsqueeze", ["rows", "ax"], extra={"ax": np.array([1], np.int64)}),
    "MatMul-weight": _case("MatMul", ["rows", "w"], extra={"w": _rng.standard_normal((6, 3))}),
    "MatMul-batched": _case("MatMul", ["rows", "rowsT"], pre=[
        helper.make_node("Transpose", ["rows"], ["rowsT"], perm=[0, 2, 1])]),
    "MatMul-broadcast-left": _case("MatMul", ["a", "rows"], extra={
        "a": _rng.standard_normal((3, 4))}),
    "Gemm": _case("Gemm", ["rows", "w", "bias"], x=(ROWS, 6), attrs={"transB": 1},
                  extra={"w": _rng.standard_normal((3, 6)), "bias": _rng.standard_normal(3)}),
    "Softmax": _case("Softmax", attrs={"axis": -1}),
    "Softmax-axis0": _case("Softmax", attrs={"axis": 0}),
    "LogSoftmax": _case("LogSoftmax", attrs={"axis": 1}),
    "LayerNormalization": _case("LayerNormalization", ["rows", "g", "b"], attrs={"axis": -1},
                                extra={"g": _rng.standard_normal(6),
                                       "b": _rng.standard_normal(6)}),
    "LayerNormalization-axis1": _case("LayerNormalization", ["rows", "g"], attrs={"axis": 1},
                                      extra={"g": _rng.standard_normal((4, 6))}),
    "ReduceMax": _case("ReduceMax", ["rows", "ax"], attrs={"keepdims": 0},
                       extra={"ax": np.array([0], np.int64)}),
    "ReduceL2": _case("ReduceL2", ["rows", "ax"], extra={"ax": np.array([0, 2], np.int64)}),
    "ReduceLogSumExp": _case("ReduceLogSumExp", ["rows", "ax"], attrs={"keepdims": 0},
                             extra={"ax": np.array([1], np.int64)}),
    "CumSum": _case("CumSum", ["rows", "ax"], extra={"ax": np.array(0, np.int64)}),
    "Concat": _case("Concat", ["rows", "rows"], attrs={"axis": 0}),
    "Concat-axis2": _case("Concat", ["rows", "c"], attrs={"axis": 2}, pre=[
        helper.make_node("Sigmoid", ["rows"], ["c"])]),
    "Split": _case("Split", ["rows", "sizes"], attrs={"axis": 2}, n_out=2,
                   extra={"sizes": np.array([2, 4], np.int64)}),
    "Gather-axis1": _case("Gather", ["rows", "idx"], attrs={"axis": 1},
                          extra={"idx": np.array([3, 0, 3], np.int64)}),
    "Slice-columns": _case("Slice", ["rows", "s", "e", "ax"], extra={
        "s": np.array([1], np.int64), "e": np.array([5], np.int64),
        "ax": np.array([2], np.int64)}),
    "Slice-rows": _case("Slice", ["rows", "s", "e", "ax"], extra={
        "s": np.array([1], np.int64), "e": np.array([100], np.int64),
        "ax": np.array([0], np.int64)}),
    "Pad": _case("Pad", ["rows", "pads"], extra={"pads": np.array([0, 1, 0, 0, 2, 1],
                                                                  np.int64)}),
    "Tile": _case("Tile", ["rows", "reps"], extra={"reps": np.array([1, 2, 1], np.int64)}),
    "Conv1d": _case("Conv", ["rows", "k"], attrs={"pads": [1, 1]},
                    extra={"k": _rng.standard_normal((2, 4, 3))}),
    "MaxPool": _case("MaxPool", attrs={"kernel_shape": [2], "strides": [2]}),
    "AveragePool": _case("AveragePool", attrs={"kernel_shape": [3], "pads": [1, 1]}),
    "GlobalAveragePool": _case("GlobalAveragePool"),
    "InstanceNormalization": _case("InstanceNormalization", ["rows", "g", "b"], extra={
        "g": _rng.standard_normal(4), "b": _rng.standard_normal(4)}),
    # (batch statistics over the rows picked: the finite differences run the same form)
    "BatchNormalization-train": _case("BatchNormalization", ["rows", "g", "b", "mu", "var"],
                                      attrs={"training_mode": 1}, extra=_bn),
    "BatchNormalization-eval": _case("BatchNormalization", ["rows", "g", "b", "mu", "var"],
                                     extra=_bn, build={"batchnorm": "eval"}),
    "Einsum": _case("Einsum", ["rows", "w"], attrs={"equation": "ncl,cd->nld"},
                    extra={"w": _rng.standard_normal((4, 2))}),
}


def _model(c: dict) -> onnx.ModelProto:
    outs = [f"y{i}" for i in range(c["n_out"])]
    nodes = [helper.make_node("Greater", ["m", "zero0"], ["keep"]),
             helper.make_node("Compress", ["X", "keep"], ["rows"], axis=0), *c["pre"],
             helper.make_node(c["op"], c["inputs"] or ["rows"], outs, **c["attrs"])]
    terms = []
    for i, y in enumerate(outs):
        nodes += [helper.make_node("Tanh", [y], [f"t{i}"]),
                  helper.make_node("Mul", [f"t{i}", f"t{i}"], [f"s{i}"]),
                  helper.make_node("ReduceSum", [f"s{i}"], [f"l{i}"], keepdims=0)]
        terms.append(f"l{i}")
    nodes.append(helper.make_node("Sum", terms, ["L"]))
    x = _rng.standard_normal(c["x"])
    return make_model(nodes, inputs={"m": np.zeros(ROWS)},
                      initializers={"X": x, "zero0": np.zeros(()), **c["extra"]},
                      outputs=["L"], opset=c["opset"])


def _fixed_mask(model: onnx.ModelProto, m: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.input[:]
    out.graph.node.insert(0, helper.make_node("Constant", [], ["m"],
                                              value=numpy_helper.from_array(m)))
    return out


@pytest.mark.parametrize("name", list(SIZED))
def test_rule_reads_sizes_that_follow_the_data_at_run_time(name):
    model = _model(SIZED[name])
    x = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["X"]
    tm = build_training_graph(model, {"type": "output", "output": "L"}, ["X"],
                              example={"m": BUILT_ON}, **SIZED[name]["build"])
    grad = training_info(tm).gradients["X"]
    ex = Executor(tm, np)
    for mask in MASKS:
        m = np.array(mask)
        for _ in range(2):  # (the second run takes the specialized plan)
            got = ex.run({"m": m, "X": x})[grad]
        fd = finite_differences(_fixed_mask(model, m), {"X": x})["X"]
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-6, err_msg=str(mask))
