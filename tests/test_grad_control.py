"""Gradients through control flow, sequences and optionals: Scan, Loop, If, FlexAttention and
Optional rules against float64 central finite differences (and onnxruntime), and
`subgraph.lower` (static control flow and sequences as tensor nodes) before differentiation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.gradcheck import (
    ATOL,
    FROM_PRE,
    RTOL,
    Case,
    CaseTable,
    check_case,
    check_float32,
    finite_differences,
    gradients,
    ints,
    loss_model,
    normal,
    rule_tests,
)
from tests.opcases import make_model, run, run_ort, to_float32
from trainer.autodiff import build_training_graph, reverse, training_info
from trainer.autodiff.subgraph import lower, lower_model
from trainer.errors import ModelError
from trainer.executor import Executor

D = TensorProto.DOUBLE
I64 = TensorProto.INT64
B = TensorProto.BOOL


def vi(name: str, t: int = D, shape=None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, t, shape)


def graph(nodes, inputs, outputs, inits=()) -> onnx.GraphProto:
    return helper.make_graph(nodes, "body", inputs, outputs, list(inits))


def n(op: str, ins, outs, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, list(ins), list(outs), **attrs)


def const(name: str, value) -> onnx.NodeProto:
    return n("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(value), name))


def scalar(v, dtype=np.int64) -> np.ndarray:
    return np.array(v, dtype)


# -- bodies ------------------------------------------------------------------------------------
def rnn_body(extra: str | None = None) -> onnx.GraphProto:
    """(s [2,3], x [3]) -> (s' = sin(s * x) + s (* extra), y = s' * s')."""
    nodes = [n("Mul", ["s", "x"], ["t"]), n("Sin", ["t"], ["u"]), n("Add", ["u", "s"], ["v"])]
    if extra:
        nodes.append(n("Mul", ["v", extra], ["s_out"]))
    else:
        nodes.append(n("Identity", ["v"], ["s_out"]))
    nodes.append(n("Mul", ["s_out", "s_out"], ["y"]))
    return graph(nodes, [vi("s"), vi("x")], [vi("s_out"), vi("y")])


def two_input_body() -> onnx.GraphProto:
    """(s, a, b) -> (s' = s * a + cos(b), y = tanh(s'))."""
    return graph([n("Mul", ["s", "a"], ["m"]), n("Cos", ["b"], ["c"]),
                  n("Add", ["m", "c"], ["s_out"]), n("Tanh", ["s_out"], ["y"])],
                 [vi("s"), vi("a"), vi("b")], [vi("s_out"), vi("y")])


def loop_body(opset: int = 18) -> onnx.GraphProto:
    """(i, cond, s [2,3]) -> (cond, s' = sin(s) * (i + 1) + s, y = s' * 0.5)."""
    return graph([n("Identity", ["cond"], ["cond_out"]),
                  n("Cast", ["i"], ["fi"], to=D), const("one", 1.0), const("half", 0.5),
                  n("Add", ["fi", "one"], ["f"]), n("Sin", ["s"], ["sn"]),
                  n("Mul", ["sn", "f"], ["m"]), n("Add", ["m", "s"], ["s_out"]),
                  n("Mul", ["s_out", "half"], ["y"])],
                 [vi("i", I64, []), vi("cond", B, []), vi("s")],
                 [vi("cond_out", B, []), vi("s_out"), vi("y")])


def while_body() -> onnx.GraphProto:
    """A while loop on the iteration number: keeps going while i + 1 < 3."""
    return graph([const("three", scalar(3)), const("one_i", scalar(1)),
                  n("Add", ["i", "one_i"], ["next"]), n("Less", ["next", "three"], ["cond_out"]),
                  n("Tanh", ["s"], ["t"]), n("Add", ["t", "s"], ["s_out"])],
                 [vi("i", I64, []), vi("cond", B, []), vi("s")],
                 [vi("cond_out", B, []), vi("s_out")])


def slice_body(opset: int) -> onnx.GraphProto:
    """ONNX's loop11 body: y' = y + x[i:i+1] with x a body constant, scan output y'."""
    unsq = ([n("Unsqueeze", ["i", "zero"], ["start"]), n("Unsqueeze", ["end", "zero"], ["stop"])]
            if opset >= 13 else [n("Unsqueeze", ["i"], ["start"], axes=[0]),
                                 n("Unsqueeze", ["end"], ["stop"], axes=[0])])
    return graph([n("Identity", ["cond"], ["cond_out"]),
                  const("x", np.array([1.0, 2.0, 3.0, 4.0, 5.0])), const("one_i", scalar(1)),
                  const("zero", np.array([0], np.int64)), n("Add", ["i", "one_i"], ["end"]),
                  *unsq, n("Slice", ["x", "start", "stop"], ["sl"]),
                  n("Mul", ["y", "y"], ["yy"]), n("Add", ["yy", "sl"], ["y_out"]),
                  n("Identity", ["y_out"], ["scan"])],
                 [vi("i", I64, []), vi("cond", B, []), vi("y", D, [1])],
                 [vi("cond_out", B, []), vi("y_out", D, [1]), vi("scan", D, [1])])


def if_on_iteration_body() -> onnx.GraphProto:
    """(i, cond, s) -> s' = (i == 0 ? exp(s) : s * s), an If on the iteration number."""
    then = graph([n("Exp", ["s"], ["e"])], [], [vi("e")])
    other = graph([n("Mul", ["s", "s"], ["q"])], [], [vi("q")])
    return graph([n("Identity", ["cond"], ["cond_out"]), const("zero_i", scalar(0)),
                  n("Equal", ["i", "zero_i"], ["first"]),
                  n("If", ["first"], ["s_out"], then_branch=then, else_branch=other)],
                 [vi("i", I64, []), vi("cond", B, []), vi("s")],
                 [vi("cond_out", B, []), vi("s_out")])


def scan_in_loop_body() -> onnx.GraphProto:
    """A Loop body running a Scan over its state's rows."""
    inner = graph([n("Mul", ["acc", "row"], ["p"]), n("Sin", ["p"], ["acc_out"])],
                  [vi("acc", D, [2]), vi("row", D, [2])], [vi("acc_out", D, [2])])
    return graph([n("Identity", ["cond"], ["cond_out"]),
                  n("Scan", ["h", "s"], ["h_out"], body=inner, num_scan_inputs=1),
                  n("Add", ["s", "h_out"], ["s_out"])],
                 [vi("i", I64, []), vi("cond", B, []), vi("s"), vi("h")],
                 [vi("cond_out", B, []), vi("s_out"), vi("h_out")])


# -- cases the engine differentiates as it is ---------------------------------------------------
table = CaseTable()
add = table.add
CASES = table.cases

S, X = normal(2, 3), normal(4, 3)
add("Scan", "state+scan", [("S", S), ("X", X)], n_out=2, body=rnn_body(), num_scan_inputs=1)
for o in (9, 11, 16):
    add("Scan", f"state+scan-opset{o}", [("S", S), ("X", X)], n_out=2, body=rnn_body(),
        num_scan_inputs=1, opset=o)
add("Scan", "input-axis1", [("S", S), ("X", normal(3, 5))], n_out=2, body=rnn_body(),
    num_scan_inputs=1, scan_input_axes=[1])
add("Scan", "reverse-in-out", [("S", S), ("X", X)], n_out=2, body=rnn_body(),
    num_scan_inputs=1, scan_input_directions=[1], scan_output_directions=[1])
add("Scan", "output-axis1", [("S", S), ("X", X)], n_out=2, body=rnn_body(), num_scan_inputs=1,
    scan_output_axes=[1])
add("Scan", "output-axis-neg1", [("S", S), ("X", X)], n_out=2, body=rnn_body(),
    num_scan_inputs=1, scan_output_axes=[-1])
add("Scan", "only-final-state", [("S", S), ("X", X)], n_out=2, body=rnn_body(),
    num_scan_inputs=1, use=(0,))
add("Scan", "only-scan-output", [("S", S), ("X", X)], n_out=2, body=rnn_body(),
    num_scan_inputs=1, use=(1,))
add("Scan", "only-wrt-X", [("S", S), ("X", X)], n_out=2, body=rnn_body(), num_scan_inputs=1,
    wrt=["X"])
add("Scan", "two-scan-inputs", [("S", normal(2, 3)), ("A", normal(3, 4)), ("Bx", normal(4, 3))],
    n_out=2, body=two_input_body(), num_scan_inputs=2, scan_input_axes=[1, 0],
    scan_input_directions=[0, 1], scan_output_axes=[2], scan_output_directions=[1])
# A weight read from the outer scope that needs no gradient (held constant: not in wrt).
add("Scan", "outer-constant", [("S", S), ("X", X)], n_out=2, body=rnn_body(extra="W"),
    num_scan_inputs=1, extra={"W": normal(3)}, wrt=["S", "X"])
# Scan-8: batch axis 0, sequence axis 1, per-row lengths (padding with zeros past them).
S8, X8 = normal(2, 2, 3), normal(2, 4, 3)
add("Scan", "opset8", [("lens", None), ("S", S8), ("X", X8)], n_out=2, body=rnn_body(),
    num_scan_inputs=1, opset=8)
add("Scan", "opset8-lens-reverse", [("lens", ints(4, 2)), ("S", S8), ("X", X8)], n_out=2,
    body=rnn_body(), num_scan_inputs=1, directions=[1], opset=8)

Y0 = normal(2, 3)
TRUE = np.array(True)
add("Loop", "const-trips", [("M", scalar(3)), ("cond", TRUE), ("Y", Y0)], n_out=2,
    body=loop_body())
add("Loop", "no-cond", [("M", scalar(4)), ("cond", None), ("Y", Y0)], n_out=2,
    body=loop_body())
add("Loop", "only-state", [("M", scalar(3)), ("cond", TRUE), ("Y", Y0)], n_out=2,
    body=loop_body(), use=(0,))
add("Loop", "while-static-cond", [("M", None), ("cond", TRUE), ("Y", Y0)], body=while_body())
for o in (11, 13, 18):
    add("Loop", f"slice-by-iteration-opset{o}",
        [("M", scalar(5)), ("cond", TRUE), ("Y", np.array([-0.7]))], n_out=2,
        body=slice_body(o), opset=o)
add("Loop", "if-on-iteration", [("M", scalar(3)), ("cond", TRUE), ("Y", normal(2, 3) * 0.3)],
    body=if_on_iteration_body())
add("Loop", "scan-inside", [("M", scalar(2)), ("cond", TRUE), ("Y", normal(3, 2)),
                            ("H", normal(2))], n_out=2, body=scan_in_loop_body())
add("Loop", "zero-trips", [("M", scalar(0)), ("cond", TRUE), ("Y", Y0)], n_out=2,
    body=loop_body(), use=(0,))
add("Loop", "state-twice", [("M", scalar(2)), ("cond", TRUE), ("Y", Y0), ("Y", Y0)], n_out=2,
    body=graph([n("Identity", ["cond"], ["cond_out"]), n("Mul", ["a", "b"], ["a_out"]),
                n("Sin", ["b"], ["b_out"])],
               [vi("i", I64, []), vi("cond", B, []), vi("a"), vi("b")],
               [vi("cond_out", B, []), vi("a_out"), vi("b_out")]), use=(0,))
# Sequences inside a body are lowered in the rule's region (no engine support needed).
add("Loop", "sequences-in-body", [("M", scalar(2)), ("cond", TRUE), ("Y", Y0)],
    body=graph([n("Identity", ["cond"], ["cond_out"]),
                n("SplitToSequence", ["s"], ["rows"], axis=0, keepdims=0),
                const("zero_i", scalar(0)), const("one_i", scalar(1)),
                n("SequenceAt", ["rows", "zero_i"], ["r0"]),
                n("SequenceAt", ["rows", "one_i"], ["r1"]), n("Mul", ["r0", "r1"], ["m"]),
                n("Sin", ["r0"], ["sr"]), n("SequenceConstruct", ["m", "sr"], ["pair"]),
                n("ConcatFromSequence", ["pair"], ["s_out"], axis=0, new_axis=1)],
               [vi("i", I64, []), vi("cond", B, []), vi("s")],
               [vi("cond_out", B, []), vi("s_out")]))

add("OptionalGetElement", "of-Optional", [("opt", FROM_PRE)], extra={"X": normal(2, 3)},
    pre=[n("Optional", ["X"], ["opt"])])


test_rule_matches_finite_differences, test_rule_float32_training_graph = rule_tests(CASES)


# -- If, and outer-scope tensors that need gradients --------------------------------------------
def if_branches() -> dict:
    """then: sin(X * W); else: cos(X * X) (W unread there: its gradient is zero)."""
    return {"then_branch": graph([n("Mul", ["X", "W"], ["m"]), n("Sin", ["m"], ["t"])], [],
                                 [vi("t")]),
            "else_branch": graph([n("Mul", ["X", "X"], ["q"]), n("Cos", ["q"], ["e"])], [],
                                 [vi("e")])}


def outer_cases() -> CaseTable:
    """Subgraphs reading outer tensors that need gradients (implicit inputs)."""
    t = CaseTable()
    xw = {"X": normal(2, 3), "W": normal(2, 3)}
    t.add("If", "static-then", [("c", TRUE)], extra=xw, **if_branches())
    # (the branch taken does not read W: W is no parameter once the If is inlined)
    t.add("If", "static-else", [("c", np.array(False))], extra=xw, wrt=["X"], **if_branches())
    dynamic = [n("ReduceSum", ["X"], ["sx"], keepdims=0), n("Greater", ["sx", "zero"], ["c"])]
    for sign, label in ((1.0, "then"), (-1.0, "else")):
        x = np.abs(normal(2, 3)) * sign
        t.add("If", f"data-condition-{label}", [("c", FROM_PRE)], pre=dynamic,
              extra={"X": x, "W": normal(2, 3), "zero": np.array(0.0)}, wrt=["X", "W"],
              **if_branches())
    two = {"then_branch": graph([n("Mul", ["X", "W"], ["a"]), n("Sin", ["X"], ["b"])], [],
                                [vi("a"), vi("b")]),
           "else_branch": graph([n("Identity", ["W"], ["a2"]), n("Neg", ["X"], ["b2"])], [],
                                [vi("a2"), vi("b2")])}
    t.add("If", "two-outputs-one-used", [("c", TRUE)], extra=xw, n_out=2, use=(1,), wrt=["X"],
          **two)
    t.add("If", "passthrough-outer", [("c", np.array(False))], extra=xw, n_out=2, **two)
    # As exporters write `x if x is not None else ...`: the If reads an optional.
    t.add("If", "optional-pattern", [("has", FROM_PRE)], extra=xw, wrt=["X", "W"],
          pre=[n("Optional", ["X"], ["ox"]), n("OptionalHasElement", ["ox"], ["has"])],
          then_branch=graph([n("OptionalGetElement", ["ox"], ["x"]), n("Mul", ["x", "W"], ["t"])],
                            [], [vi("t")]),
          else_branch=graph([n("Identity", ["W"], ["e"])], [], [vi("e")]))
    t.add("Scan", "outer-weight", [("S", S), ("X", X)], n_out=2, body=rnn_body(extra="W"),
          num_scan_inputs=1, extra={"W": normal(3)})
    t.add("Loop", "outer-weight", [("M", scalar(3)), ("cond", TRUE), ("Y", Y0)], n_out=1,
          extra={"W": normal(2, 3)},
          body=graph([n("Identity", ["cond"], ["cond_out"]), n("Mul", ["s", "W"], ["m"]),
                      n("Sin", ["m"], ["s_out"])],
                     [vi("i", I64, []), vi("cond", B, []), vi("s")],
                     [vi("cond_out", B, []), vi("s_out")]))
    # An If inside a Loop body deciding on data: the If rule runs inside the Loop's region.
    then = graph([n("Sin", ["s"], ["a"])], [], [vi("a")])
    other = graph([n("Mul", ["s", "W"], ["b"])], [], [vi("b")])
    t.add("Loop", "data-if-inside", [("M", scalar(3)), ("cond", TRUE), ("Y", Y0)],
          extra={"W": normal(2, 3)},
          body=graph([n("Identity", ["cond"], ["cond_out"]),
                      n("ReduceSum", ["s"], ["ss"], keepdims=0), const("z", 0.0),
                      n("Greater", ["ss", "z"], ["pos"]),
                      n("If", ["pos"], ["s_out"], then_branch=then, else_branch=other)],
                     [vi("i", I64, []), vi("cond", B, []), vi("s")],
                     [vi("cond_out", B, []), vi("s_out")]))
    return t


OUTER = outer_cases().cases


@pytest.mark.parametrize("c", OUTER, ids=str)
def test_outer_scope_gradients(c: Case) -> None:
    check_case(c)


@pytest.mark.parametrize("c", OUTER, ids=str)
def test_outer_scope_gradients_float32(c: Case) -> None:
    check_float32(c)


# -- lowering: sequences and static control flow as tensor nodes ---------------------------------
def seq_vi(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_sequence_value_info(name, D, None)


def lowered_cases() -> CaseTable:
    t = CaseTable()
    x33 = {"X": normal(3, 3)}
    split_at = [n("SplitToSequence", ["X", "split"], ["seq"], axis=1),
                n("SequenceAt", ["seq", "pos0"], ["a"]), n("SequenceAt", ["seq", "posm1"], ["b"])]
    for o in (11, 18):
        t.add("Mul", f"SplitToSequence-SequenceAt-opset{o}", [("a", FROM_PRE), ("b", FROM_PRE)],
              pre=split_at, opset=o,
              extra={**x33, "split": ints(1, 2), "pos0": scalar(0), "posm1": scalar(-1)})
    t.add("Add", "SplitToSequence-keepdims0", [("a", FROM_PRE), ("b", FROM_PRE)],
          pre=[n("SplitToSequence", ["X"], ["seq"], axis=0, keepdims=0),
               n("SequenceAt", ["seq", "pos1"], ["a"]), n("SequenceAt", ["seq", "pos2"], ["b"])],
          extra={**x33, "pos1": scalar(1), "pos2": scalar(2)})
    t.add("Sin", "SplitToSequence-scalar-split", [("a", FROM_PRE)],
          pre=[n("SplitToSequence", ["X", "two"], ["seq"], axis=1),
               n("SequenceAt", ["seq", "pos2"], ["a"])],
          extra={"X": normal(2, 5), "two": scalar(2), "pos2": scalar(2)})
    ab = {"A": normal(2, 3), "Bx": normal(2, 3)}
    construct = [n("SequenceConstruct", ["A", "Bx", "A"], ["seq"])]
    for o in (11, 18):
        t.add("ConcatFromSequence", f"stack-axis1-opset{o}", [("seq", FROM_PRE)], pre=construct,
              extra=ab, axis=1, new_axis=1, opset=o)
    t.add("ConcatFromSequence", "stack-axis-neg1", [("seq", FROM_PRE)], pre=construct,
          extra=ab, axis=-1, new_axis=1)
    t.add("ConcatFromSequence", "concat-axis0", [("seq", FROM_PRE)], pre=construct, extra=ab,
          axis=0)
    t.add("ConcatFromSequence", "insert-erase", [("s4", FROM_PRE)],
          pre=[n("SequenceConstruct", ["A"], ["s1"]),
               n("SequenceInsert", ["s1", "Bx", "pos0"], ["s2"]), n("Sin", ["A"], ["sa"]),
               n("SequenceInsert", ["s2", "sa"], ["s3"]),
               n("SequenceErase", ["s3", "pos1"], ["s4"])],
          extra={**ab, "pos0": scalar(0), "pos1": scalar(1)}, axis=0)
    body = graph([n("Identity", ["cond"], ["cond_out"]), n("Cast", ["i"], ["fi"], to=D),
                  n("Mul", ["X", "fi"], ["m"]), n("Sin", ["m"], ["sm"]),
                  n("SequenceInsert", ["seq_in", "sm"], ["seq_out"])],
                 [vi("i", I64, []), vi("cond", B, []), seq_vi("seq_in")],
                 [vi("cond_out", B, []), seq_vi("seq_out")])
    t.add("ConcatFromSequence", "Loop-builds-sequence", [("final", FROM_PRE)],
          pre=[n("SequenceEmpty", [], ["empty"], dtype=D),
               n("Loop", ["M", "", "empty"], ["final"], body=body)],
          extra={"X": normal(2, 3), "M": scalar(3)}, axis=0, new_axis=1)
    rows = graph([n("Identity", ["cond"], ["cond_out"]), n("SequenceAt", ["seq", "i"], ["row"]),
                  n("Mul", ["acc", "row"], ["m"]), n("Sin", ["row"], ["sr"]),
                  n("Add", ["m", "sr"], ["acc_out"])],
                 [vi("i", I64, []), vi("cond", B, []), vi("acc")],
                 [vi("cond_out", B, []), vi("acc_out")])
    t.add("Loop", "over-sequence-length", [("M", FROM_PRE), ("", None), ("H", normal(3))],
          pre=[n("SplitToSequence", ["X"], ["seq"], axis=0, keepdims=0),
               n("SequenceLength", ["seq"], ["M"])], extra={"X": normal(4, 3)}, body=rows)
    mapped = graph([n("Sin", ["e"], ["s"]), n("Mul", ["s", "e"], ["o"])], [vi("e")], [vi("o")])
    t.add("ConcatFromSequence", "SequenceMap", [("mapped", FROM_PRE)],
          pre=[n("SplitToSequence", ["X"], ["seq"], axis=0),
               n("SequenceMap", ["seq"], ["mapped"], body=mapped)],
          extra={"X": normal(3, 2)}, axis=0)
    for c in outer_cases().cases:  # static control flow reading outer tensors: plain edges
        if "data-" not in c.id:
            t.cases.append(dataclasses.replace(c, id=f"{c.id}-lowered"))
    t.cases += [dataclasses.replace(c, id=f"{c.id}-lowered") for c in CASES
                if c.op in ("Loop", "Scan")]
    return t


LOWERED = lowered_cases().cases


def check_lowered(c: Case, float32: bool = False) -> None:
    """lower_model (what autodiff should run first), then the ordinary backward; the gradients
    against finite differences of the original model, and in onnxruntime."""
    model = loss_model(c)
    if float32:
        model = to_float32(model)
    low = lower_model(model, {}, {})
    left = {nd.op_type for nd in low.graph.node} & {"If", "Loop", "Scan", "SequenceAt",
                                                    "ConcatFromSequence", "SequenceMap"}
    assert not left, left
    wrt = c.params()
    grads, tm = gradients(low, wrt)
    info = training_info(tm)
    ort = run_ort(tm)
    tol = 1e-4 if float32 else 1e-6
    for p in wrt:
        np.testing.assert_allclose(ort[info.gradients[p]], grads[p], rtol=tol, atol=tol)
    if float32:
        return
    values = {k: a for k, a in [*c.inputs, *c.extra.items()] if k in wrt}
    fd = finite_differences(model, values)
    for p in wrt:
        np.testing.assert_allclose(grads[p], fd[p], rtol=RTOL, atol=ATOL, err_msg=f"d/d{p}")


@pytest.mark.parametrize("c", LOWERED, ids=str)
def test_lowered_matches_finite_differences(c: Case) -> None:
    check_lowered(c)


@pytest.mark.parametrize("c", LOWERED, ids=str)
def test_lowered_float32(c: Case) -> None:
    check_lowered(c, float32=True)


@pytest.mark.parametrize("c", LOWERED, ids=str)
def test_lowering_keeps_outputs(c: Case) -> None:
    model = loss_model(c)
    low, _, why = lower(model, {}, {})
    assert not why
    names = [o.name for o in model.graph.output]
    a, b = run(model, fetch=names), run(low, fetch=names)
    for k in names:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-12, atol=1e-12)
    onnx.checker.check_model(low)


def test_lowering_leaves_data_dependent_control() -> None:
    c = next(c for c in OUTER if c.id == "If-data-condition-then")
    low, _, why = lower(loss_model(c), {}, {})
    assert [nd.op_type for nd in low.graph.node].count("If") == 1
    assert any("condition is computed from data" in w for w in why.values()), why


# -- refusals ------------------------------------------------------------------------------------
def _loop_model(m_input: bool, body: onnx.GraphProto, y=Y0) -> onnx.ModelProto:
    nodes = [n("Loop", ["M" if m_input else "", "", "Y"], ["out"], body=body),
             n("ReduceSum", ["out"], ["L"], keepdims=0)]
    inputs = {"M": scalar(3)} if m_input else {}
    return make_model(nodes, inputs=inputs, initializers={"Y": y}, outputs=["L"])


def test_loop_trip_count_from_data_is_refused() -> None:
    body = graph([n("Identity", ["cond"], ["cond_out"]), n("Sin", ["s"], ["s_out"])],
                 [vi("i", I64, []), vi("cond", B, []), vi("s")],
                 [vi("cond_out", B, []), vi("s_out")])
    with pytest.raises(ModelError, match="trip count is computed from data"):
        build_training_graph(_loop_model(True, body), {"type": "output", "output": "L"},
                             ["Y"])


def test_loop_condition_from_data_is_refused() -> None:
    body = graph([n("Sin", ["s"], ["s_out"]), n("ReduceSum", ["s_out"], ["t"], keepdims=0),
                  const("lim", 0.5), n("Less", ["t", "lim"], ["cond_out"])],
                 [vi("i", I64, []), vi("cond", B, []), vi("s")],
                 [vi("cond_out", B, []), vi("s_out")])
    # (values whose first sum of sines is above 0.5: one trip. Below it, the loop never
    # ends, as in onnxruntime, and its probe hung; Y0's draw depends on which test modules
    # were collected before)
    with pytest.raises(ModelError, match="loop condition is computed from data"):
        build_training_graph(_loop_model(False, body, np.full((2, 3), 1.0)),
                             {"type": "output", "output": "L"}, ["Y"])


@pytest.mark.parametrize("case", ["trip count", "body condition", "shape", "constant",
                                  "carried counter"])
def test_check_names_a_loop_that_data_controls(case) -> None:
    """`check MODEL` (model_report) refuses the Loops that train refuses (above), and only
    those: a trip count from a shape or a constant unrolls, and so does a loop that counts with
    a value it carries up to a shape (the default exporter's nn.EmbeddingBag)."""
    from trainer.report import DATA_LOOP, model_report

    if case == "carried counter":
        body = graph([n("Add", ["k", "one"], ["k_out"]), n("Less", ["k_out", "nx"], ["cond_out"]),
                      n("Sin", ["s"], ["s_out"])],
                     [vi("i", I64, []), vi("cond", B, []), vi("k", I64, []), vi("s")],
                     [vi("cond_out", B, []), vi("k_out", I64, []), vi("s_out")])
        nodes = [const("one", np.int64(1)), const("k0", np.int64(0)), n("Size", ["X"], ["nx"]),
                 n("Less", ["k0", "nx"], ["c0"]),
                 n("Loop", ["", "c0", "k0", "Y"], ["k_end", "out"], body=body)]
    elif case == "body condition":
        body = graph([n("Sin", ["s"], ["s_out"]), n("ReduceSum", ["s_out"], ["t"], keepdims=0),
                      const("lim", 0.5), n("Less", ["t", "lim"], ["cond_out"])],
                     [vi("i", I64, []), vi("cond", B, []), vi("s")],
                     [vi("cond_out", B, []), vi("s_out")])
        nodes = [n("Loop", ["", "", "Y"], ["out"], body=body)]
    else:
        body = graph([const("lim", np.int64(2)), n("Less", ["i", "lim"], ["cond_out"]),
                      n("Sin", ["s"], ["s_out"])],
                     [vi("i", I64, []), vi("cond", B, []), vi("s")],
                     [vi("cond_out", B, []), vi("s_out")])
        count = {"trip count": [n("ReduceSum", ["X"], ["t"], keepdims=0),
                                n("Cast", ["t"], ["M"], to=I64)],
                 "shape": [n("Shape", ["X"], ["sh"]), n("ReduceMax", ["sh"], ["M"], keepdims=0)],
                 "constant": [const("M", np.int64(3))]}[case]
        nodes = count + [n("Loop", ["M", "", "Y"], ["out"], body=body)]
    nodes.append(n("ReduceSum", ["out"], ["L"], keepdims=0))
    # (Y: a first sum of sines above 0.5, so the body condition's loop ends; see above)
    model = make_model(nodes, inputs={"X": np.ones((2, 2))},
                       initializers={"Y": np.full((2, 3), 1.0)}, outputs=["L"])
    report = model_report(model)
    row = next(r for r in report.nodes if r.op == "Loop")
    refused = case in ("trip count", "body condition")
    assert (row.gradient == DATA_LOOP) == refused and report.ok != refused, report.text()
    if refused:
        assert "1 node(s) cannot be trained" in report.text()
        with pytest.raises(ModelError, match="computed from data"):
            build_training_graph(model, {"type": "output", "output": "L"}, ["Y"])


@pytest.mark.parametrize("flag", [True, False])
def test_check_leaves_out_the_weights_of_an_untaken_branch(flag) -> None:
    """An If on a constant condition trains its branch's weights alone (the lowering takes that
    branch), but `check MODEL` listed the other branch's weights as trained too; they are left
    out now, with the reason."""
    from trainer.report import model_report

    then = graph([n("Mul", ["X", "W1"], ["t"])], [], [vi("t")])
    other = graph([n("Mul", ["X", "W2"], ["e"])], [], [vi("e")])
    model = make_model([n("If", ["c"], ["y"], then_branch=then, else_branch=other),
                        n("ReduceSum", ["y"], ["L"], keepdims=0)],
                       inputs={"X": np.ones((2, 3))},
                       initializers={"W1": Y0, "W2": Y0 + 1, "c": np.array(flag)},
                       outputs=["L"])
    report = model_report(model)
    taken, untaken = ("W1", "W2") if flag else ("W2", "W1")
    assert [p.name for p in report.params if p.role == "parameter"] == [taken]
    row = next(p for p in report.params if p.name == untaken)
    assert "read only by the branch that If 'If_0' does not take" in row.reason, report.text()
    tm = build_training_graph(model, {"type": "output", "output": "L"}, "all")
    assert list(training_info(tm).gradients) == [taken]


def test_a_while_loop_on_float_constants_is_unrolled_and_differentiated() -> None:
    """tf2onnx writes a TF while loop (a Keras 3 GRU layer) as a Loop that starts on
    Less(0.0, 3.0) of two one-element float initializers, expands the same 0.0 into its first
    state, and stops on Less(Cast(i + 1), 3.0) in the body. Only integers decided control
    flow, so it was refused ("its condition is computed from data"); one-element float
    constants that training leaves alone decide it too now: the loop unrolls, and its gradients
    are the finite differences'. Listed in `trainable`, the 0.0 would change: refused again."""
    body = graph([n("Add", ["i", "one"], ["i1"]), n("Cast", ["i1"], ["fi"], to=D),
                  n("Less", ["fi", "lim"], ["cond_out"]), n("MatMul", ["h", "W"], ["hw"]),
                  n("Add", ["hw", "X"], ["a"]), n("Tanh", ["a"], ["h_out"])],
                 [vi("i", I64, []), vi("cond", B, []), vi("h")],
                 [vi("cond_out", B, []), vi("h_out")],
                 [onnx.numpy_helper.from_array(scalar(1), "one"),
                  onnx.numpy_helper.from_array(np.array(3.0), "lim")])
    nodes = [n("Less", ["zero", "three"], ["cond0"]),
             n("Expand", ["zero", "hshape"], ["h0"]),
             n("Loop", ["M", "cond0", "h0"], ["h_final"], body=body),
             n("Mul", ["h_final", "h_final"], ["sq"]), n("ReduceSum", ["sq"], ["L"], keepdims=0)]
    W = normal(3, 3)
    model = make_model(nodes, initializers={
        "X": normal(2, 3), "W": W, "zero": np.array(0.0), "three": np.array(3.0),
        "M": scalar(10), "hshape": np.array([2, 3], np.int64)}, outputs=["L"])
    grads, tm = gradients(model, ["W", "X"])
    assert "Loop" not in {nd.op_type for nd in tm.graph.node}
    fd = finite_differences(model, {"W": W, "X": next(
        onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "X")})
    for p in ("W", "X"):
        np.testing.assert_allclose(grads[p], fd[p], rtol=RTOL, atol=ATOL, err_msg=f"d/d{p}")
    with pytest.raises(ModelError, match="condition is computed from data"):
        build_training_graph(model, {"type": "output", "output": "L"}, ["W", "zero"])


def test_random_node_in_recomputed_body_is_refused() -> None:
    body = graph([n("Identity", ["cond"], ["cond_out"]), n("RandomNormalLike", ["s"], ["r"]),
                  n("Mul", ["s", "r"], ["s_out"])],
                 [vi("i", I64, []), vi("cond", B, []), vi("s")],
                 [vi("cond_out", B, []), vi("s_out")])
    nodes = [n("Loop", ["M", "", "Y"], ["out"], body=body),
             n("ReduceSum", ["out"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers={"Y": Y0, "M": scalar(2)}, outputs=["L"])
    loss = {"type": "output", "output": "L"}
    for m in (model, lower_model(model, {}, {})):
        try:
            tm = build_training_graph(m, loss, ["Y"])
        except ModelError as exc:  # the Loop rule would recompute (redraw) the samples
            assert "random" in str(exc) and m is model
            continue
        # differentiated as plain nodes: each iteration draws once, no recomputation
        ops = [nd.op_type for nd in tm.graph.node]
        assert "Loop" not in ops and ops.count("RandomNormalLike") == 2


def test_reverse_through_scan() -> None:
    c = CASES[0]
    model = loss_model(c)
    rm = reverse(model, ["S", "X"], ["L"])
    out = Executor(rm, np).run({"L_grad": np.array(1.0)})
    grads, _ = gradients(model, ["S", "X"])
    for p in ("S", "X"):
        np.testing.assert_allclose(out[f"{p}_grad"], grads[p], rtol=1e-12, atol=1e-12)


# -- FlexAttention ------------------------------------------------------------------------------
def flex_model(q, k, v, *, outer: dict | None = None, dtype=np.float64, **attrs):
    """L = sum(FlexAttention(Q, K, V) * R) with Q, K, V (and `outer`) as initializers."""
    r = np.random.default_rng(5).standard_normal((q.shape[0], q.shape[1], q.shape[2],
                                                  v.shape[3]))
    inits = {"Q": q, "K": k, "V": v, "R": r, **(outer or {})}
    inits = {name: a.astype(dtype) if a.dtype.kind == "f" else a for name, a in inits.items()}
    nodes = [helper.make_node("FlexAttention", ["Q", "K", "V"], ["Y"], domain="ai.onnx.preview",
                              **attrs),
             n("Mul", ["Y", "R"], ["p"]), n("ReduceSum", ["p"], ["L"], keepdims=0)]
    return make_model(nodes, initializers=inits, outputs=["L"], opset=23,
                      extra_opsets={"ai.onnx.preview": 1})


def mod(nodes, inits=()) -> onnx.GraphProto:
    return graph(nodes, [vi("scores")], [vi("out")], inits)


QKV = (normal(1, 2, 3, 4), normal(1, 2, 5, 4), normal(1, 2, 5, 3))
FLEX = {
    "plain": (QKV, {}, {}),
    "scale": (QKV, {"scale": 0.3}, {}),
    "gqa": ((normal(2, 4, 3, 2), normal(2, 2, 4, 2), normal(2, 2, 4, 3)), {}, {}),
    "score-mod-soft-cap": (QKV, {"score_mod": mod([
        const("cap", 2.0), n("Div", ["scores", "cap"], ["d"]), n("Tanh", ["d"], ["t"]),
        n("Mul", ["t", "cap"], ["out"])])}, {}),
    "score-mod-causal": (QKV, {"score_mod": mod([
        const("mask", np.tril(np.ones((3, 5), bool))), const("ninf", -np.inf),
        n("Where", ["mask", "scores", "ninf"], ["out"])])}, {}),
    "prob-mod": (QKV, {"prob_mod": mod([const("k", 0.7), n("Mul", ["scores", "k"], ["out"])])},
                 {}),
    "score-mod-outer-bias": (QKV, {"score_mod": mod([n("Add", ["scores", "bias"], ["out"])])},
                             {"bias": normal(3, 5)}),
}


@pytest.mark.parametrize("name", list(FLEX))
def test_flex_attention_matches_finite_differences(name: str) -> None:
    (q, k, v), attrs, outer = FLEX[name]
    model = flex_model(q, k, v, outer=outer, **attrs)
    wrt = ["Q", "K", "V", *outer]
    grads, tm = gradients(model, wrt)
    assert all(nd.domain in ("", "ai.onnx") for nd in tm.graph.node[1:]
               if nd.op_type != "FlexAttention")
    fd = finite_differences(model, {"Q": q, "K": k, "V": v, **outer})
    for p in wrt:
        np.testing.assert_allclose(grads[p], fd[p], rtol=RTOL, atol=ATOL, err_msg=f"d/d{p}")


def test_flex_attention_float32_and_precision() -> None:
    q, k, v = QKV
    g32, _ = gradients(flex_model(q, k, v, dtype=np.float32), ["Q", "K", "V"])
    g64, _ = gradients(flex_model(q, k, v, softmax_precision=D, dtype=np.float32),
                       ["Q", "K", "V"])
    ref, _ = gradients(flex_model(q, k, v), ["Q", "K", "V"])
    for p in "QKV":
        assert g32[p].dtype == np.float32 and g64[p].dtype == np.float32
        np.testing.assert_allclose(g32[p], ref[p], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g64[p], ref[p], rtol=1e-5, atol=1e-6)


EXTRA_TESTED = {"If", "FlexAttention", "Optional"}


def _bn_in_data_branch() -> onnx.ModelProto:
    """y = If(sum(x) > 0, BatchNormalization(x @ W), x @ W): a BatchNormalization inside a
    branch the data picks."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    then = helper.make_graph(
        [helper.make_node("BatchNormalization", ["h", "sc", "sh", "mu", "var"], ["y_then"],
                          name="bn_then")], "then", [],
        [helper.make_tensor_value_info("y_then", f, None)])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", f, None)])
    inits = {"W": rng.standard_normal((3, 4)), "sc": rng.uniform(0.5, 1.5, 4),
             "sh": rng.standard_normal(4), "mu": rng.standard_normal(4) * 0.1,
             "var": rng.uniform(0.5, 1.5, 4), "zero": np.zeros(())}
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["logits"], name="if", then_branch=then,
                          else_branch=other)], "g",
        [helper.make_tensor_value_info("x", f, ["N", 3])],
        [helper.make_tensor_value_info("logits", f, ["N", 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_a_batchnorm_in_a_branch_the_data_picks_is_refused_in_training_form() -> None:
    """Its branch was built in inference form, and its running statistics were trained by the
    optimizer as parameters: neither PyTorch's train mode nor its eval mode. Refused, naming
    the layer and the fix; kept in inference form as asked, its statistics are state, not
    trained."""
    m = _bn_in_data_branch()
    loss = {"type": "cross_entropy", "output": "logits", "target": "label"}
    with pytest.raises(ModelError, match=r"BatchNormalization 'bn_then' runs inside If 'if', "
                       r"whose branch .* depends on the data.*batchnorm: \['sc'\]"):
        build_training_graph(m, loss, batch_size=4)
    tm = build_training_graph(m, loss, batch_size=4, batchnorm=["sc"])
    assert sorted(training_info(tm).gradients) == ["W", "sc", "sh"]


@pytest.mark.parametrize("opset, attrs", [(6, {"is_test": 1}), (6, {"is_test": 0}), (7, {})])
def test_an_old_dropout_trains_with_its_mask_whatever_its_export_mode(opset, attrs) -> None:
    """Dropout-6's is_test=1 (an eval-mode export) made the training graph skip it, where
    BatchNormalization-6's is_test=1 trains on batch statistics as PyTorch's train mode does:
    dropped out in training, like every other export."""
    f = TensorProto.FLOAT
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("Dropout", ["h"], ["logits"], ratio=0.5, **attrs)], "g",
        [helper.make_tensor_value_info("x", f, ["N", 3]),
         helper.make_tensor_value_info("W", f, [3, 4])],  # (IR 3: initializers are inputs)
        [helper.make_tensor_value_info("logits", f, ["N", 4])],
        [numpy_helper.from_array(np.ones((3, 4), np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=3)
    tm = build_training_graph(m, {"type": "cross_entropy", "output": "logits",
                                  "target": "label"}, batch_size=4)
    assert "RandomUniformLike" in [n.op_type for n in tm.graph.node]


@pytest.mark.parametrize("data_condition", [True, False])
def test_a_dropout_in_a_branch_the_data_picks_is_warned_of(data_condition) -> None:
    """A Dropout inside an If whose condition the data computes runs in inference form there
    (nothing dropped out), silently; an If on a constant is inlined and drops out."""
    from trainer.report import model_report

    f = TensorProto.FLOAT
    then = helper.make_graph([helper.make_node("Dropout", ["h"], ["y_then"], name="drop_in",
                                               ratio=0.5)], "then", [],
                             [helper.make_tensor_value_info("y_then", f, None)])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", f, None)])
    cond = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"])] if data_condition else \
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True)))]
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), *cond,
         helper.make_node("If", ["c"], ["logits"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", f, ["N", 3])],
        [helper.make_tensor_value_info("logits", f, ["N", 4])],
        [numpy_helper.from_array(np.ones((3, 4), np.float32), "W"),
         numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    text = model_report(m).text()
    assert ("Dropout nodes inside If branches that the data picks" in text) == data_condition
