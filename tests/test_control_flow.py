"""Control flow (If, Loop, Scan, SequenceMap, FlexAttention), sequence and optional kernels, and
the executor's subgraph planning, against onnxruntime and the ONNX reference evaluator."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.opcases import run_ort, run_reference
from trainer.errors import ModelError, UnsupportedOpError
from trainer.executor import Executor, missing_kernels

# Ops this file tests beyond the node suite (read by the kernel-coverage test).
TESTED_OPS = {"If", "Loop", "Scan", "SequenceMap", "SequenceEmpty", "SequenceConstruct",
              "SequenceLength", "SequenceAt", "SequenceInsert", "SequenceErase",
              "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalHasElement",
              "OptionalGetElement", "FlexAttention"}

F32 = np.float32
_rng = np.random.default_rng(11)


# -- model builders ------------------------------------------------------------------------------
def T(dtype=F32, shape=None) -> onnx.TypeProto:
    return helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def S(dtype=F32, shape=None) -> onnx.TypeProto:
    return helper.make_sequence_type_proto(T(dtype, shape))


def O(tp: onnx.TypeProto) -> onnx.TypeProto:  # noqa: E743
    return helper.make_optional_type_proto(tp)


def _type_of(value) -> onnx.TypeProto:
    if isinstance(value, list):
        return S(value[0].dtype)
    return T(value.dtype, list(value.shape))


def graph(nodes, inputs, outputs, name="body", inits=None) -> onnx.GraphProto:
    """inputs/outputs: (name, TypeProto) pairs; inits: {name: array}."""
    return helper.make_graph(nodes, name, [helper.make_value_info(n, t) for n, t in inputs],
                             [helper.make_value_info(n, t) for n, t in outputs],
                             [numpy_helper.from_array(np.asarray(v), k)
                              for k, v in (inits or {}).items()])


def model(nodes, feeds: dict, outputs, *, opset=18, inits=None, preview=False
          ) -> onnx.ModelProto:
    """A checked model whose inputs are typed like `feeds`; outputs are (name, TypeProto)."""
    g = graph(nodes, [(k, _type_of(v)) for k, v in feeds.items()], outputs, "main", inits)
    imports = [helper.make_opsetid("", opset)]
    if preview:
        imports.append(helper.make_opsetid("ai.onnx.preview", 1))
    m = helper.make_model(g, opset_imports=imports)
    m.ir_version = min(m.ir_version, 10)
    inferred = {o.name: o.type for o in onnx.shape_inference.infer_shapes(m).graph.output}
    for o in m.graph.output:  # the checker wants a shape on top-level tensor outputs
        if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape"):
            t = inferred.get(o.name)
            if t is not None and t.tensor_type.HasField("shape"):
                o.type.tensor_type.shape.CopyFrom(t.tensor_type.shape)
            else:
                o.type.tensor_type.shape.dim.add().dim_param = "unknown"
    onnx.checker.check_model(m)
    return m


def const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.asarray(value), name + "_value"))


def ours(m: onnx.ModelProto, feeds: dict) -> dict:
    return Executor(m, np).run(feeds)


def same(got, want, rtol=1e-5, atol=1e-6, what="") -> None:
    if isinstance(want, list) or want is None:
        assert type(got) is type(want), f"{what}: {type(got).__name__} != {type(want).__name__}"
        if want is not None:
            assert len(got) == len(want), f"{what}: {len(got)} items, expected {len(want)}"
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                same(g, w, rtol, atol, f"{what}[{i}]")
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    if want.dtype == ml_dtypes.bfloat16:
        got, want = got.astype(F32), want.astype(F32)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


def check(m: onnx.ModelProto, feeds: dict, ref: str = "ort", **tol) -> dict:
    got = ours(m, feeds)
    want = run_ort(m, feeds) if ref == "ort" else run_reference(m, feeds)
    for name, w in want.items():
        same(got[name], w, what=name, **tol)
    return got


# -- If -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("flag", [True, False])
def test_if_branches_read_the_outer_scope(opset, flag):
    x, y = _rng.standard_normal((2, 3)).astype(F32), _rng.standard_normal(3).astype(F32)
    then_b = graph([helper.make_node("Add", ["x", "y"], ["t"])], [], [("t", T(F32))], "then")
    else_b = graph([helper.make_node("Mul", ["x", "k"], ["e"])], [], [("e", T(F32))], "else",
                   inits={"k": np.array(3, F32)})
    nodes = [helper.make_node("If", ["c"], ["out"], then_branch=then_b, else_branch=else_b)]
    m = model(nodes, {"c": np.array(flag), "x": x, "y": y}, [("out", T(F32))], opset=opset)
    got = check(m, {"c": np.array(flag), "x": x, "y": y})
    same(got["out"], x + y if flag else x * 3)


def test_if_with_sequence_and_optional_outputs():
    seq_then = graph([helper.make_node("SequenceConstruct", ["x", "x"], ["s"])], [],
                     [("s", S())], "then")
    seq_else = graph([helper.make_node("SequenceConstruct", ["x"], ["s2"])], [], [("s2", S())],
                     "else")
    x = _rng.standard_normal(4).astype(F32)
    nodes = [helper.make_node("If", ["c"], ["seq"], then_branch=seq_then, else_branch=seq_else),
             helper.make_node("SequenceLength", ["seq"], ["n"])]
    for flag, n in ((True, 2), (False, 1)):
        m = model(nodes, {"c": np.array([flag]), "x": x}, [("seq", S()), ("n", T(np.int64))])
        got = check(m, {"c": np.array([flag]), "x": x})
        assert int(got["n"]) == n

    opt_then = graph([helper.make_node("Optional", ["x"], ["o"])], [], [("o", O(T()))], "then")
    opt_else = graph([helper.make_node("Optional", [], ["o2"], type=T())], [], [("o2", O(T()))],
                     "else")
    nodes = [helper.make_node("If", ["c"], ["opt"], then_branch=opt_then, else_branch=opt_else),
             helper.make_node("OptionalHasElement", ["opt"], ["has"])]
    for flag in (True, False):
        m = model(nodes, {"c": np.array(flag), "x": x}, [("has", T(bool))])
        assert bool(check(m, {"c": np.array(flag), "x": x})["has"]) is flag


# -- Loop -----------------------------------------------------------------------------------------
def _loop_model(ins: list[str], opset: int) -> onnx.ModelProto:
    """acc += x[i] * w (w read from the outer scope) while acc < limit; scans acc."""
    body = graph(
        [helper.make_node("Gather", ["x", "i"], ["row"], axis=0),
         helper.make_node("Mul", ["row", "w"], ["inc"]),
         helper.make_node("Add", ["acc", "inc"], ["acc_out"]),
         helper.make_node("ReduceSum", ["acc_out"], ["total"], keepdims=0),
         helper.make_node("Less", ["total", "limit"], ["c_out"]),
         helper.make_node("Identity", ["acc_out"], ["scan"])],
        [("i", T(np.int64, [])), ("c", T(bool, [])), ("acc", T(F32, [1, 2]))],
        [("c_out", T(bool, [])), ("acc_out", T(F32, [1, 2])), ("scan", T(F32, [1, 2]))])
    nodes = [helper.make_node("Loop", ins + ["acc0"], ["acc_final", "scans"], body=body)]
    feeds = {"M": np.array(3, np.int64), "cond": np.array(True), "acc0": np.zeros((1, 2), F32),
             "x": np.ones((6, 2), F32), "w": np.ones(2, F32), "limit": np.array(1e9, F32)}
    return model(nodes, feeds, [("acc_final", T(F32)), ("scans", T(F32))], opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 16, 21])
@pytest.mark.parametrize("ins", [["M", "cond"], ["M", ""], ["", "cond"]])
@pytest.mark.parametrize("trips, start, limit", [(4, True, 1e9), (6, True, 5.0), (0, True, 1e9),
                                                 (5, False, 1e9)])
def test_loop_trip_count_and_condition(opset, ins, trips, start, limit):
    x = 1 + _rng.standard_normal((6, 2)).astype(F32) ** 2  # each row adds >= 2.5 to the total
    w = np.array([0.5, 2.0], F32)
    feeds = {"M": np.array(trips, np.int64), "cond": np.array(start), "acc0": np.zeros((1, 2), F32),
             "x": x, "w": w, "limit": np.array(limit, F32)}
    if ins == ["", "cond"] and limit > 100:  # a while loop needs the condition to end it
        feeds["limit"] = np.array(4.0, F32)
    got = check(_loop_model(ins, opset), feeds)
    assert got["scans"].dtype == F32 and got["scans"].shape[1:] == (1, 2)


def test_loop_without_trip_count_or_condition_ends_on_the_body_condition():
    feeds = {"M": np.array(0, np.int64), "cond": np.array(True), "acc0": np.zeros((1, 2), F32),
             "x": np.ones((6, 2), F32), "w": np.ones(2, F32), "limit": np.array(5.0, F32)}
    got = check(_loop_model(["", ""], 16), feeds)
    assert got["scans"].shape == (3, 1, 2)


def test_loop_carries_a_sequence_and_nests_an_if_reading_two_scopes_up():
    then_b = graph([helper.make_node("Add", ["v", "bias"], ["t"])], [], [("t", T(F32))], "then")
    else_b = graph([helper.make_node("Sub", ["v", "bias"], ["e"])], [], [("e", T(F32))], "else")
    body = graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["fi", "base"], ["v"]),
         const("two", np.array(2, np.int64)),
         helper.make_node("Mod", ["i", "two"], ["r"]),
         helper.make_node("Equal", ["r", "zero"], ["even"]),
         helper.make_node("If", ["even"], ["item"], then_branch=then_b, else_branch=else_b),
         helper.make_node("SequenceInsert", ["seq", "item"], ["seq_out"]),
         helper.make_node("Identity", ["c"], ["c_out"])],
        [("i", T(np.int64, [])), ("c", T(bool, [])), ("seq", S())],
        [("c_out", T(bool, [])), ("seq_out", S())])
    nodes = [helper.make_node("SequenceEmpty", [], ["empty"], dtype=TensorProto.FLOAT),
             helper.make_node("Loop", ["M", "", "empty"], ["seq"], body=body),
             helper.make_node("ConcatFromSequence", ["seq"], ["stacked"], axis=0, new_axis=1)]
    feeds = {"M": np.array(5, np.int64), "base": _rng.standard_normal(3).astype(F32),
             "bias": np.array([10.0], F32)}
    m = model(nodes, feeds, [("seq", S()), ("stacked", T(F32))], opset=16,
              inits={"zero": np.array(0, np.int64)})
    got = check(m, feeds)
    i = np.arange(5, dtype=F32)[:, None]
    same(got["stacked"], i * feeds["base"] + np.where(i % 2 == 0, 10, -10).astype(F32))


# -- Scan -----------------------------------------------------------------------------------------
def _scan_body(n_state: int = 1) -> onnx.GraphProto:
    """state += a * b; outputs (state, a - b, state)."""
    return graph([helper.make_node("Mul", ["a", "b"], ["ab"]),
                  helper.make_node("Add", ["s", "ab"], ["s_out"]),
                  helper.make_node("Sub", ["a", "b"], ["d"]),
                  helper.make_node("Identity", ["s_out"], ["s_copy"])],
                 [("s", T(F32, [3])), ("a", T(F32, [3])), ("b", T(F32, [3]))],
                 [("s_out", T(F32, [3])), ("d", T(F32, [3])), ("s_copy", T(F32, [3]))])


@pytest.mark.parametrize("with_lens", [False, True])
@pytest.mark.parametrize("directions", [[0, 0], [0, 1], [1, 1]])
def test_scan8_batched_with_sequence_lens_and_directions(with_lens, directions):
    feeds = {"lens": np.array([4, 2, 1], np.int64), "s0": np.zeros((3, 3), F32),
             "a": _rng.standard_normal((3, 4, 3)).astype(F32),
             "b": _rng.standard_normal((3, 4, 3)).astype(F32)}
    if not with_lens:
        del feeds["lens"]
    ins = ["lens" if with_lens else "", "s0", "a", "b"]
    nodes = [helper.make_node("Scan", ins, ["s", "d", "sc"], body=_scan_body(),
                              num_scan_inputs=2, directions=directions)]
    m = model(nodes, feeds, [("s", T(F32)), ("d", T(F32)), ("sc", T(F32))], opset=8)
    check(m, feeds)


@pytest.mark.parametrize("opset", [9, 11, 16, 21])
@pytest.mark.parametrize("in_axes, in_dirs, out_axes, out_dirs", [
    (None, None, None, None),
    ([1, 0], [0, 1], [1, 0], [1, 0]),
    ([-1, 0], [1, 0], [-1, 0], [0, 1]),
])
def test_scan_axes_and_directions(opset, in_axes, in_dirs, out_axes, out_dirs):
    if opset < 11 and any(a < 0 for a in (in_axes or []) + (out_axes or [])):
        pytest.skip("negative axes from opset 11")
    a = _rng.standard_normal((5, 3) if not in_axes or in_axes[0] == 0 else (3, 5)).astype(F32)
    feeds = {"s0": np.zeros(3, F32), "a": a, "b": _rng.standard_normal((5, 3)).astype(F32)}
    attrs = {k: v for k, v in (("scan_input_axes", in_axes), ("scan_input_directions", in_dirs),
                               ("scan_output_axes", out_axes),
                               ("scan_output_directions", out_dirs)) if v is not None}
    nodes = [helper.make_node("Scan", ["s0", "a", "b"], ["s", "d", "sc"], body=_scan_body(),
                              num_scan_inputs=2, **attrs)]
    m = model(nodes, feeds, [("s", T(F32)), ("d", T(F32)), ("sc", T(F32))], opset=opset)
    check(m, feeds)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=3), data=st.data())
def test_scan_cumulative_sum_matches_numpy(shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    reverse = data.draw(st.booleans())
    x = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    elem = [d for i, d in enumerate(shape) if i != axis % len(shape)]
    body = graph([helper.make_node("Add", ["s", "e"], ["s_out"]),
                  helper.make_node("Identity", ["s_out"], ["y"])],
                 [("s", T(np.float64, elem)), ("e", T(np.float64, elem))],
                 [("s_out", T(np.float64, elem)), ("y", T(np.float64, elem))])
    node = helper.make_node("Scan", ["s0", "x"], ["total", "ys"], body=body, num_scan_inputs=1,
                            scan_input_axes=[axis], scan_output_axes=[axis],
                            scan_input_directions=[int(reverse)],
                            scan_output_directions=[int(reverse)])
    feeds = {"s0": np.zeros(elem), "x": x}
    got = ours(model([node], feeds, [("total", T(np.float64)), ("ys", T(np.float64))]), feeds)
    flip = (lambda a: np.flip(a, axis)) if reverse else (lambda a: a)
    same(got["ys"], flip(np.cumsum(flip(x), axis=axis)))
    same(got["total"], x.sum(axis=axis))


# -- SequenceMap ---------------------------------------------------------------------------------
def test_sequence_map_with_tensor_input_outer_scope_and_two_outputs():
    body = graph([helper.make_node("Add", ["a", "t"], ["sum"]),
                  helper.make_node("Mul", ["sum", "outer"], ["prod"]),
                  helper.make_node("Shape", ["a"], ["shape"])],
                 [("a", T(F32)), ("t", T(F32))], [("prod", T(F32)), ("shape", T(np.int64))])
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=0),
             helper.make_node("SequenceMap", ["seq", "t"], ["out", "shapes"], body=body)]
    feeds = {"x": _rng.standard_normal((5, 3)).astype(F32), "split": np.array([2, 3], np.int64),
             "t": _rng.standard_normal(3).astype(F32), "outer": np.array(2.0, F32)}
    m = model(nodes, feeds, [("out", S()), ("shapes", S(np.int64))], opset=17)
    got = check(m, feeds)
    same(got["out"][1], (feeds["x"][2:] + feeds["t"]) * 2)


# -- sequences ------------------------------------------------------------------------------------
SEQ_OPS = [
    ("at_neg", [helper.make_node("SequenceAt", ["seq", "p"], ["y"])], {"p": np.array(-2)}, T),
    ("at_int32", [helper.make_node("SequenceAt", ["seq", "p"], ["y"])],
     {"p": np.array(1, np.int32)}, T),
    ("insert_back", [helper.make_node("SequenceInsert", ["seq", "x"], ["y"])], {}, S),
    ("insert_front", [helper.make_node("SequenceInsert", ["seq", "x", "p"], ["y"])],
     {"p": np.array(0)}, S),
    ("insert_neg", [helper.make_node("SequenceInsert", ["seq", "x", "p"], ["y"])],
     {"p": np.array(-1)}, S),
    ("insert_end", [helper.make_node("SequenceInsert", ["seq", "x", "p"], ["y"])],
     {"p": np.array(3)}, S),
    ("erase_last", [helper.make_node("SequenceErase", ["seq"], ["y"])], {}, S),
    ("erase_neg", [helper.make_node("SequenceErase", ["seq", "p"], ["y"])], {"p": np.array(-3)},
     S),
    ("length", [helper.make_node("SequenceLength", ["seq"], ["y"])], {}, None),
    ("concat", [helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=-1)], {}, T),
    ("stack_last", [helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=-1,
                                     new_axis=1)], {}, T),
    ("stack_first", [helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0,
                                      new_axis=1)], {}, T),
]


@pytest.mark.parametrize("dtype", [F32, np.int32, np.bool_])
@pytest.mark.parametrize("case", SEQ_OPS, ids=[c[0] for c in SEQ_OPS])
def test_sequence_ops(case, dtype):
    _, nodes, extra, out_type = case
    xs = [(_rng.standard_normal((2, 3)) * 3).astype(dtype) for _ in range(4)]
    feeds = {"a": xs[0], "b": xs[1], "c": xs[2], "x": xs[3], **extra}
    nodes = [helper.make_node("SequenceConstruct", ["a", "b", "c"], ["seq"]), *nodes]
    tp = T(np.int64) if out_type is None else out_type(dtype)
    check(model(nodes, feeds, [("y", tp)]), feeds)


@pytest.mark.parametrize("split, axis, keepdims", [
    (None, 0, 1), (None, 1, 0), (None, -1, 1), (np.array(2), 1, 1), (np.array(4), 0, 1),
    (np.array([1, 4, 0]), -2, 1), (np.array([3], np.int32), 0, 0)])
def test_split_to_sequence(split, axis, keepdims):
    feeds = {"x": _rng.standard_normal((5, 3)).astype(F32)}
    ins = ["x"]
    if split is not None:
        feeds["split"] = split
        ins.append("split")
    if split is not None and split.ndim == 1 and split.sum() != 5:
        feeds["x"] = _rng.standard_normal((int(split.sum()), 3)).astype(F32)
    nodes = [helper.make_node("SplitToSequence", ins, ["y"], axis=axis, keepdims=keepdims),
             helper.make_node("SequenceLength", ["y"], ["n"])]
    check(model(nodes, feeds, [("y", S()), ("n", T(np.int64))], opset=11), feeds)


def test_split_to_sequence_with_a_split_ignores_keepdims():
    # The spec ignores keepdims when `split` is given (onnxruntime fails on this case).
    feeds = {"x": _rng.standard_normal((5, 3)).astype(F32), "split": np.array(2)}
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["y"], axis=1, keepdims=0)]
    check(model(nodes, feeds, [("y", S())], opset=11), feeds, ref="reference")
    assert [a.shape for a in ours(model(nodes, feeds, [("y", S())]), feeds)["y"]] == [(5, 2),
                                                                                     (5, 1)]


def test_sequence_errors_name_the_node():
    nodes = [helper.make_node("SequenceConstruct", ["a"], ["seq"]),
             helper.make_node("SequenceAt", ["seq", "p"], ["y"], name="pick")]
    feeds = {"a": np.zeros(2, F32), "p": np.array(1)}
    with pytest.raises(ModelError, match="'pick'.*out of range"):
        ours(model(nodes, feeds, [("y", T())]), feeds)
    nodes = [helper.make_node("SequenceEmpty", [], ["seq"]),
             helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0, name="cat")]
    with pytest.raises(ModelError, match="'cat'.*empty sequence"):
        ours(model(nodes, {}, [("y", T())]), {})


# -- optionals ------------------------------------------------------------------------------------
def test_optionals():
    x = _rng.standard_normal(3).astype(F32)
    nodes = [helper.make_node("Optional", ["x"], ["ox"]),
             helper.make_node("Optional", [], ["empty"], type=T()),
             helper.make_node("OptionalHasElement", ["ox"], ["has_x"]),
             helper.make_node("OptionalHasElement", ["empty"], ["has_empty"]),
             helper.make_node("OptionalHasElement", ["x"], ["has_tensor"]),
             helper.make_node("OptionalGetElement", ["ox"], ["got"]),
             helper.make_node("OptionalGetElement", ["x"], ["got_tensor"]),
             helper.make_node("SequenceConstruct", ["x", "x"], ["seq"]),
             helper.make_node("Optional", ["seq"], ["oseq"]),
             helper.make_node("OptionalGetElement", ["oseq"], ["got_seq"])]
    outs = [("has_x", T(bool)), ("has_empty", T(bool)), ("has_tensor", T(bool)), ("got", T()),
            ("got_tensor", T()), ("got_seq", S())]
    got = check(model(nodes, {"x": x}, outs), {"x": x})
    assert [bool(got[k]) for k in ("has_x", "has_empty", "has_tensor")] == [True, False, True]
    nodes = [helper.make_node("OptionalHasElement", [], ["none"])]  # opset 18: input optional
    assert not bool(ours(model(nodes, {}, [("none", T(bool))]), {})["none"])
    nodes = [helper.make_node("Optional", [], ["e"], type=T()),
             helper.make_node("OptionalGetElement", ["e"], ["y"], name="get")]
    with pytest.raises(ModelError, match="'get'.*empty optional"):
        ours(model(nodes, {}, [("y", T())]), {})


def test_optional_graph_inputs_and_outputs():
    g = graph([helper.make_node("Identity", ["o"], ["p"]),
               helper.make_node("OptionalHasElement", ["o"], ["has"])],
              [("o", O(S()))], [("p", O(S())), ("has", T(bool))], "main")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    ex = Executor(m, np)
    seq = [np.ones(2, F32)]
    assert ex.run({"o": seq})["p"] is seq and bool(ex.run({"o": seq})["has"])
    out = ex.run({"o": None})
    assert out["p"] is None and not bool(out["has"])


# -- FlexAttention --------------------------------------------------------------------------------
def _flex(B=1, Hq=4, Hkv=2, L=3, S_=5, E=4, Ev=6, dtype=F32):
    return {"Q": _rng.random((B, Hq, L, E)).astype(dtype),
            "K": _rng.random((B, Hkv, S_, E)).astype(dtype),
            "V": _rng.random((B, Hkv, S_, Ev)).astype(dtype)}


@pytest.mark.parametrize("dtype, attrs", [
    (F32, {}), (F32, {"scale": 0.3}), (np.float64, {}), (np.float16, {}),
    (ml_dtypes.bfloat16, {}), (F32, {"softmax_precision": TensorProto.DOUBLE}),
    (np.float16, {"softmax_precision": TensorProto.FLOAT16}),
])
def test_flex_attention_dtypes_and_attributes(dtype, attrs):
    feeds = _flex(dtype=dtype)
    node = helper.make_node("FlexAttention", ["Q", "K", "V"], ["Y"], domain="ai.onnx.preview",
                            **attrs)
    m = model([node], feeds, [("Y", T(dtype))], opset=26, preview=True)
    low = np.dtype(dtype).itemsize == 2
    check(m, feeds, ref="reference", rtol=1e-2 if low else 1e-5, atol=1e-2 if low else 1e-6)


def test_flex_attention_mods_read_the_outer_scope():
    feeds = {**_flex(Hkv=4), "bias": _rng.standard_normal((3, 5)).astype(F32)}
    score_mod = graph([helper.make_node("Add", ["s", "bias"], ["s2"])], [("s", T())],
                      [("s2", T())], "score_mod")
    prob_mod = graph([helper.make_node("Mul", ["p", "half"], ["p2"])], [("p", T())],
                     [("p2", T())], "prob_mod", inits={"half": np.array(0.5, F32)})
    node = helper.make_node("FlexAttention", ["Q", "K", "V"], ["Y"], domain="ai.onnx.preview",
                            score_mod=score_mod, prob_mod=prob_mod)
    m = model([node], feeds, [("Y", T())], opset=26, preview=True)
    q, k, v = feeds["Q"], feeds["K"], feeds["V"]
    s = q @ k.transpose(0, 1, 3, 2) / 2.0 + feeds["bias"]
    p = np.exp(s - s.max(-1, keepdims=True))
    p = 0.5 * p / p.sum(-1, keepdims=True)
    same(ours(m, feeds)["Y"], (p @ v).astype(F32), rtol=1e-5, atol=1e-6)


# -- executor: subgraph planning -----------------------------------------------------------------
def test_missing_kernels_inside_subgraphs_are_named_by_path():
    inner = graph([helper.make_node("NoSuchOp", ["x"], ["y"], name="bad", domain="x.y")], [],
                  [("y", T())], "then")
    ok = graph([helper.make_node("Identity", ["x"], ["z"])], [], [("z", T())], "else")
    g = graph([helper.make_node("If", ["c"], ["out"], name="branch", then_branch=inner,
                                else_branch=ok)],
              [("c", T(bool, [])), ("x", T(F32, [2]))], [("out", T())], "main")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                            helper.make_opsetid("x.y", 1)])
    assert missing_kernels(m) == [("NoSuchOp", "branch/then_branch/bad")]
    with pytest.raises(UnsupportedOpError, match="branch/then_branch/bad"):
        Executor(m, np)


def test_outer_values_live_until_the_subgraph_node_and_errors_name_inner_nodes():
    body = graph([helper.make_node("Add", ["t", "s"], ["s_out"], name="inner_add"),
                  helper.make_node("Identity", ["c"], ["c_out"])],
                 [("i", T(np.int64, [])), ("c", T(bool, [])), ("s", T(F32, [2]))],
                 [("c_out", T(bool, [])), ("s_out", T(F32, [2]))])
    nodes = [helper.make_node("Neg", ["x"], ["t"], name="make_t"),  # read only by the body
             helper.make_node("Loop", ["M", "", "s0"], ["s"], name="loop", body=body)]
    feeds = {"x": np.ones(2, F32), "M": np.array(3, np.int64), "s0": np.zeros(2, F32)}
    ex = Executor(model(nodes, feeds, [("s", T())]), np)
    order = [step[4] for step in ex.steps]
    assert order == ["make_t", "loop"]
    assert "t" in ex.free_after[1] and "t" not in ex.free_after[0]
    for _ in range(2):  # planned once, run many
        same(ex.run(feeds)["s"], np.full(2, -3, F32))
    with pytest.raises(ModelError, match="'loop'.*'inner_add'"):
        ex.run({**feeds, "x": np.ones(3, F32)})
