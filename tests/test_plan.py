"""The planned executor: specialized plans against the unplanned interpreter on training graphs,
each fused kernel against the nodes it replaces, the fast convolutions against PyTorch, graph
simplification, the memory plan, fetch_into and on_produced."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.opcases import make_model
from trainer.autodiff import build_training_graph, training_info
from trainer.errors import ModelError
from trainer.executor import WHERE_SELECT, Executor, plan_nodes
from trainer.kernels import fused, get_kernel, nn
from trainer.simplify import simplify

F32 = np.float32
OPSET = [helper.make_opsetid("", 18)]


def _init(rng, name, *shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(F32), name)


def cnn_model() -> onnx.ModelProto:
    """Conv-BN-Relu-MaxPool, a Conv with bias, a residual Add, a strided Conv plus a strided
    1x1 shortcut Conv (its weight gradient crops extra taps), Gemm: [N, 2, 8, 8]."""
    rng = np.random.default_rng(0)
    inits = [_init(rng, "w1", 4, 2, 3, 3), _init(rng, "s", 4), _init(rng, "b", 4),
             _init(rng, "m", 4), numpy_helper.from_array(np.ones(4, F32), "v"),
             _init(rng, "w2", 4, 4, 3, 3), _init(rng, "b2", 4), _init(rng, "fc", 5, 16),
             _init(rng, "fcb", 5), _init(rng, "w3", 4, 4, 1, 1)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2", "b2"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "p"], ["res"]),
             helper.make_node("Conv", ["res", "w2"], ["d"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["res", "w3"], ["sc"], strides=[2, 2]),
             helper.make_node("Add", ["d", "sc"], ["ds"]),
             helper.make_node("Flatten", ["ds"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "cnn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                          inits)
    return helper.make_model(g, opset_imports=OPSET)


def attention_model() -> onnx.ModelProto:
    """LayerNorm, MatMul on [N, T, D] with 2-D weights, Softmax, exact GELU through Erf, with the
    attention shape computed at run time (Shape/Gather/Concat/Reshape)."""
    rng = np.random.default_rng(1)
    d, t = 8, 4
    inits = [_init(rng, "wq", d, d), _init(rng, "wo", d, 5), _init(rng, "g", d),
             _init(rng, "bb", d),
             numpy_helper.from_array(np.array(1 / math.sqrt(2), F32), "isq2"),
             numpy_helper.from_array(np.array(1.0, F32), "one"),
             numpy_helper.from_array(np.array(0.5, F32), "half"),
             numpy_helper.from_array(np.array([0], np.int64), "i0"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1"),
             numpy_helper.from_array(np.array([d], np.int64), "dd")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "bb"], ["ln"], axis=-1),
             helper.make_node("MatMul", ["ln", "wq"], ["q"]),
             helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "qt"], ["att"]),
             helper.make_node("Softmax", ["att"], ["sm"], axis=-1),
             helper.make_node("MatMul", ["sm", "q"], ["ctx"]),
             helper.make_node("Shape", ["ctx"], ["shp"]),
             helper.make_node("Gather", ["shp", "i0"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "m1", "dd"], ["tgt"], axis=0),
             helper.make_node("Reshape", ["ctx", "tgt"], ["ctx2"]),
             helper.make_node("Identity", ["ctx2"], ["ctx3"]),
             helper.make_node("Mul", ["ctx3", "isq2"], ["u"]),
             helper.make_node("Erf", ["u"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["ctx3", "half"], ["h"]),
             helper.make_node("Mul", ["h", "e1"], ["gelu"]),
             helper.make_node("MatMul", ["gelu", "wo"], ["o"]),
             helper.make_node("Transpose", ["o"], ["logits"], perm=[0, 2, 1])]
    g = helper.make_graph(nodes, "att",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", t, d])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                          inits)
    return helper.make_model(g, opset_imports=OPSET)


def training_case(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, class_axis=1):
    tm = build_training_graph(model, {"type": "cross_entropy", "output": "logits",
                                      "target": "label", "class_axis": class_axis},
                              shapes={"x": x.shape})
    info = training_info(tm)
    feeds_names = list(info.gradients) + list(info.state)
    fetch = [info.loss] + list(info.gradients.values()) + list(info.state.values())
    inits = {t.name: numpy_helper.to_array(t) for t in tm.graph.initializer}
    feeds = {k: inits[k].copy() for k in feeds_names}
    feeds.update({"x": x, info.targets["label"]: y})
    return tm, feeds_names, fetch, feeds


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if b.size else 0.0


def planned(ex: Executor):
    plans = [p for p in ex._specialized.values() if p]
    assert plans, "no specialized plan was built"
    return plans[-1]


@pytest.mark.parametrize("kind", ["cnn", "attention"])
def test_planned_training_step_matches_the_interpreter(kind):
    rng = np.random.default_rng(5)
    if kind == "cnn":
        model, x = cnn_model(), rng.standard_normal((4, 2, 8, 8)).astype(F32)
        y = rng.integers(0, 5, 4)
        y[1] = -100  # an ignored label
        fusions = {"BatchNormTrain", "BatchNormTrainGrad", "SoftmaxCrossEntropyGrad",
                   "ConvWeightGrad"}
    else:
        model, x = attention_model(), rng.standard_normal((3, 4, 8)).astype(F32)
        y = rng.integers(0, 5, (3, 4))
        fusions = {"LayerNormGrad"}
    tm, names, fetch, feeds = training_case(model, x, y)
    ref = Executor(tm, feeds=names, fetch=fetch, optimize=False).run(feeds)
    ex = Executor(tm, feeds=names, fetch=fetch)
    first = ex.run(feeds)  # planned too (its shapes recorded by a dry unplanned run)
    kept = {k: v.copy() for k, v in first.items()}
    for _ in range(2):
        out = ex.run(feeds)
        for k in fetch:
            assert rel_diff(out[k], ref[k]) <= 2e-6, k
            np.testing.assert_array_equal(out[k], kept[k], err_msg=k)
    for k in fetch:  # results handed out earlier are not reused buffers
        np.testing.assert_array_equal(first[k], kept[k])
    plan = planned(ex)
    assert fusions <= {n.op for n in plan.nodes}
    assert not [n.name for n in plan.nodes if n.op == "Conv" and "/Grad/" in n.name]
    assert len(plan.steps) < len(tm.graph.node)


def test_the_first_run_of_a_shape_is_planned_and_leaves_the_random_stream_alone():
    """The dry run that records a new shape draws from a stream aside: after the same reseed,
    the first (planned) run and a later one draw the same Dropout mask and give the same
    bits, and the unplanned program draws that mask too."""
    ratio = numpy_helper.from_array(np.array(0.5, F32), "ratio")
    train = numpy_helper.from_array(np.array(True), "train")
    g = helper.make_graph(
        [helper.make_node("Dropout", ["x", "ratio", "train"], ["d", "mask"]),
         helper.make_node("Mul", ["d", "x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 32]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [64, 32])], [ratio, train])
    ex = Executor(helper.make_model(g, opset_imports=OPSET))
    x = np.random.default_rng(3).standard_normal((64, 32)).astype(F32)
    outs = []
    for run in (ex.run, ex.run, ex.run_unplanned):
        ex.rng.reseed(7, 0, 1)
        outs.append(run({"x": x}))
    assert any(ex._specialized.values())
    assert 0.3 < outs[0]["mask"].mean() < 0.7
    for later in outs[1:]:
        for k in ("y", "mask"):
            np.testing.assert_array_equal(later[k], outs[0][k], err_msg=k)


def test_profile_splits_a_run_into_kernels_and_dispatch():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((4, 2, 8, 8)).astype(F32), rng.integers(0, 5, 4)
    tm, names, fetch, feeds = training_case(cnn_model(), x, y)
    ex = Executor(tm, feeds=names, fetch=fetch)
    prof = ex.profile(feeds, repeat=3)
    assert prof["nodes"] == len(planned(ex).steps)
    assert sum(n for n, _ in prof["by_op"].values()) == prof["nodes"]
    assert prof["kernel_s"] > 0 and prof["run_s"] > 0
    assert 0 <= prof["dispatch_s"] < prof["run_s"] + prof["kernel_s"]


def test_graph_shape_arithmetic_folds_and_identities_go():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 8)).astype(F32)
    ex = Executor(attention_model())
    ref = Executor(attention_model(), optimize=False).run({"x": x})["logits"]
    ex.run({"x": x})
    out = ex.run({"x": x})["logits"]
    assert rel_diff(out, ref) <= 1e-6
    ops = [n.op for n in planned(ex).nodes]
    for gone in ("Shape", "Gather", "Concat", "Identity"):
        assert gone not in ops


def test_simplify_passes():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("Gemm", ["x", "wt"], ["y0"]),
             helper.make_node("Identity", ["y0"], ["y"]),
             helper.make_node("Neg", ["x"], ["dead"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      [2, 3]),
                                       helper.make_tensor_value_info("w", TensorProto.FLOAT,
                                                                     [4, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    ex = Executor(helper.make_model(g, opset_imports=OPSET))
    shapes = {"x": ((2, 3), np.dtype(F32)), "w": ((4, 3), np.dtype(F32)),
              "wt": ((3, 4), np.dtype(F32))}
    constants: dict = {}
    out, alias = simplify(plan_nodes(ex), constants, {"y"}, shapes)
    assert [n.op for n in out] == ["Gemm"] and out[0].inputs == ["x", "w"]
    assert out[0].attrs["transB"] == 1 and alias == {"y": "y0"}
    np.testing.assert_array_equal(constants["s"], [2, 3])
    x, w = rng.standard_normal((2, 3)).astype(F32), rng.standard_normal((4, 3)).astype(F32)
    ex.run({"x": x, "w": w})
    np.testing.assert_allclose(ex.run({"x": x, "w": w})["y"], x @ w.T, rtol=1e-6, atol=1e-6)
    # a constant's transpose is folded instead
    const = helper.make_graph(nodes[1:4], "c", [g.input[0]], list(g.output),
                              [numpy_helper.from_array(w, "w")])
    ex = Executor(helper.make_model(const, opset_imports=OPSET))
    ex.run({"x": x})
    assert [n.op for n in planned(ex).nodes] == ["Gemm"]
    # a transposed Gemm result (no C, read only by the Transpose) is the swapped Gemm
    for ta, tb in ((0, 0), (1, 0), (0, 1), (1, 1)):
        a = rng.standard_normal((3, 2) if ta else (2, 3)).astype(F32)
        b = rng.standard_normal((4, 3) if tb else (3, 4)).astype(F32)
        tn = [helper.make_node("Gemm", ["a", "b"], ["p"], transA=ta, transB=tb, alpha=0.5),
              helper.make_node("Transpose", ["p"], ["q"], perm=[1, 0])]
        tg = helper.make_graph(tn, "t", [helper.make_tensor_value_info(k, TensorProto.FLOAT,
                                                                       list(v.shape))
                                         for k, v in (("a", a), ("b", b))],
                               [helper.make_tensor_value_info("q", TensorProto.FLOAT, [4, 2])])
        ex = Executor(helper.make_model(tg, opset_imports=OPSET))
        ex.run({"a": a, "b": b})
        got = ex.run({"a": a, "b": b})["q"]
        assert [n.op for n in planned(ex).nodes] == ["Gemm"]
        want = 0.5 * ((a.T if ta else a) @ (b.T if tb else b)).T
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # a reduction whose only reader drops its kept axes is the reduction without them; a
    # Reshape that moves elements elsewhere, or a second reader, keeps both nodes
    a = rng.standard_normal((3, 4, 5)).astype(F32)
    for op, axes, target, folds in (("ReduceSum", [0], [4, 5], True),
                                    ("ReduceMean", [-1, 0], [4], True),
                                    ("ReduceSum", [1], [5, 3], False),
                                    ("ReduceSum", [2], [3, 4], "read twice")):
        rn = [helper.make_node("Constant", [], ["ax"],
                               value=numpy_helper.from_array(np.array(axes, np.int64))),
              helper.make_node("Constant", [], ["sh"],
                               value=numpy_helper.from_array(np.array(target, np.int64))),
              helper.make_node(op, ["a", "ax"], ["r"], keepdims=1),
              helper.make_node("Reshape", ["r", "sh"], ["q"])]
        outs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, target)]
        if folds == "read twice":
            rn.append(helper.make_node("Neg", ["r"], ["n"]))
            outs.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, None))
        rg = helper.make_graph(rn, "r", [helper.make_tensor_value_info("a", TensorProto.FLOAT,
                                                                       [3, 4, 5])], outs)
        ex = Executor(helper.make_model(rg, opset_imports=[helper.make_opsetid("", 18)]))
        ex.run({"a": a})
        got = ex.run({"a": a})["q"]
        ops = [n.op for n in planned(ex).nodes]
        assert ops == [op] if folds is True else "Reshape" in ops, (op, axes, ops)
        ref = (a.sum if op == "ReduceSum" else a.mean)(axis=tuple(axes), keepdims=True)
        np.testing.assert_allclose(got, ref.reshape(target), rtol=1e-6, atol=1e-6)


def test_fetch_into_and_on_produced():
    rng = np.random.default_rng(4)
    model, x = cnn_model(), rng.standard_normal((4, 2, 8, 8)).astype(F32)
    tm, names, fetch, feeds = training_case(model, x, rng.integers(0, 5, 4))
    ref = Executor(tm, feeds=names, fetch=fetch, optimize=False).run(feeds)
    grads = [k for k in fetch if k.endswith("_grad")]
    flat = np.zeros(sum(ref[k].size for k in grads), F32)
    into, o = {}, 0
    for k in grads:
        into[k] = flat[o:o + ref[k].size].reshape(ref[k].shape)
        o += ref[k].size
    seen: list[str] = []
    cbs = {k: (lambda v, k=k: seen.append((k, float(np.asarray(v).sum())))) for k in grads}
    ex = Executor(tm, feeds=names, fetch=fetch, fetch_into=into, on_produced=cbs)
    for run in range(3):
        flat[:] = np.nan
        seen.clear()
        out = ex.run(feeds)
        for k in grads:
            assert out[k] is into[k]
            assert rel_diff(into[k], ref[k]) <= 2e-6, (run, k)
        assert sorted(k for k, _ in seen) == sorted(grads)
        for k, total in seen:
            assert total == pytest.approx(float(ref[k].sum()), rel=1e-4, abs=1e-5)
    plan = planned(ex)
    direct = [n for n in plan.nodes if n.op == "ConvWeightGrad"]
    assert any(n.outputs[0] in into for n in direct)  # written by the kernel itself
    with pytest.raises(ModelError, match="not fetched"):
        Executor(tm, feeds=names, fetch=fetch, fetch_into={"x": x})


def test_errors_name_the_node_in_planned_runs():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      None),
                                       helper.make_tensor_value_info("w", TensorProto.FLOAT,
                                                                     None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    ex = Executor(helper.make_model(g, opset_imports=OPSET))
    a = np.ones((2, 3), F32)
    for _ in range(2):
        ex.run({"x": a, "w": a.T.copy()})
    with pytest.raises(ModelError, match="node 'mm' \\(MatMul\\) failed on input shapes"):
        ex.run({"x": a, "w": a})
    with pytest.raises(ModelError, match="node 'mm' \\(MatMul\\): input 'w' was not provided"):
        ex.run({"x": a})


def test_buffer_reuse_keeps_values_that_views_still_read():
    """u dies at the Add that also reads its transpose: the Add must not write over u."""
    nodes = [helper.make_node("MatMul", ["x", "x"], ["u"]),
             helper.make_node("Transpose", ["u"], ["ut"], perm=[1, 0]),
             helper.make_node("Add", ["u", "ut"], ["s"]),
             helper.make_node("Mul", ["s", "s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      [5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 5])])
    x = np.random.default_rng(12).standard_normal((5, 5)).astype(F32)
    u = x @ x
    want = (u + u.T) ** 2
    ex = Executor(helper.make_model(g, opset_imports=OPSET))
    for _ in range(3):
        np.testing.assert_allclose(ex.run({"x": x})["y"], want, rtol=1e-6)



@pytest.mark.parametrize("terms,coef", [("cab", 7), ("acb", 7), ("abc", 7), ("acc", 11)])
def test_a_sum_of_many_writes_over_a_dying_input_only_after_reading_it(terms, coef):
    """Sum adds its inputs pairwise into its output, and the plan may give the output the
    buffer of an input that dies there: here the Mul's (the Pads' values have no buffer of the
    plan). Wherever that input stands, and however often, it is read before an add writes over
    it (a gradient summed from three paths, as rotary embeddings make, came out wrong from the
    second step; tests/test_plan_fuzz.py found the repeated term)."""
    pads = numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "pads")
    k = numpy_helper.from_array(np.array(5.0, F32), "k")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["a"]),
             helper.make_node("Pad", ["x", "pads"], ["b"]),
             helper.make_node("Mul", ["a", "k"], ["c"]),
             helper.make_node("Sum", list(terms), ["s"]),
             helper.make_node("Neg", ["s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      [3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
                          [pads, k])
    x = np.random.default_rng(13).standard_normal((3, 4)).astype(F32)
    want = -coef * np.pad(x, [(0, 0), (1, 1)])
    ex = Executor(helper.make_model(g, opset_imports=OPSET))
    for _ in range(3):  # every run planned (the plan's buffers reused across runs)
        np.testing.assert_allclose(ex.run({"x": x})["y"], want, rtol=1e-6)


@pytest.mark.parametrize("reps", [1, WHERE_SELECT // 6 + 1])
@pytest.mark.parametrize("form, fill", [("zero-then", 0.0), ("zero-then-const", 0.0)] + [
    (form, fill) for form in ("fill-then", "fill-else") for fill in (-np.inf, -1e9, 3.5)])
def test_where_with_a_constant_branch_keeps_where_semantics(reps, form, fill):
    """Where(c, 0, x) and, with a constant condition (a causal mask), Where(c, fill, x) and
    Where(c, x, fill) run as products and sums in plans: the select's values, NaN and inf
    included, where the condition broadcasts over x."""
    mask = np.array([True, False, True, False, False, True])
    const = form != "zero-then"
    cond = "c" if const else "pos"
    branch = {"zero-then": ["zero", "x"], "zero-then-const": ["zero", "x"],
              "fill-then": ["fill", "x"], "fill-else": ["x", "fill"]}[form]
    nodes = [helper.make_node("Where", [cond] + branch, ["w"])]
    inits = [numpy_helper.from_array(np.array(0, F32), "zero"),
             numpy_helper.from_array(np.array(fill, F32), "fill")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [reps, 6])]
    if const:
        inits.append(numpy_helper.from_array(mask, "c"))
    else:
        nodes.insert(0, helper.make_node("Greater", ["y", "zero"], ["pos"]))
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [reps, 6]))
    g = helper.make_graph(nodes, "g", inputs,
                          [helper.make_tensor_value_info("w", TensorProto.FLOAT, [reps, 6])],
                          inits)
    ex = Executor(helper.make_model(g, opset_imports=OPSET))
    y = np.tile(np.where(mask, F32(1), F32(-1)), (reps, 1))
    for x in (np.array([-1, -2, 3, 4, -5, 6], F32), np.array([1, np.nan, 2, np.inf, 3, 4], F32),
              np.array([np.inf, 1, -np.inf, 2, 1, np.nan], F32)):
        x = np.tile(x, (reps, 1))
        for _ in range(2):
            got = ex.run({"x": x, "y": y} if not const else {"x": x})["w"]
            c = mask if const else y > 0
            a, b = [{"zero": F32(0), "fill": F32(fill), "x": x}[k] for k in branch]
            want = np.where(c, a, b)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    plan = planned(ex)
    assert [n.op for n in plan.nodes][-1] == "Where"


def test_nan_guard_passes_values_through_and_zeroes_nans():
    nodes = [helper.make_node("Softmax", ["x"], ["y"]),
             helper.make_node("IsNaN", ["y"], ["nan"]),
             helper.make_node("Where", ["nan", "zero", "y"], ["safe"]),
             helper.make_node("Mul", ["safe", "safe"], ["z"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      [3, 4])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 4])],
                          [numpy_helper.from_array(np.array(0, F32), "zero")])
    ex = Executor(helper.make_model(g, opset_imports=OPSET))
    ref = Executor(helper.make_model(g, opset_imports=OPSET), optimize=False)
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(F32)
    for row in (None, 1):  # a fully masked row: its softmax is NaN, guarded to zeros
        if row is not None:
            x[row] = -np.inf
        for _ in range(2):
            with np.errstate(invalid="ignore"):  # (-inf - -inf in the masked row)
                got, want = ex.run({"x": x})["z"], ref.run({"x": x})["z"]
            np.testing.assert_array_equal(got, want)
            assert np.isfinite(got).all()
    assert [n.op for n in planned(ex).nodes] == ["Softmax", "NanToZero", "Mul"]


def test_dropout_draws_the_same_numbers_planned():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Dropout", ["r", "ratio", "train"], ["d", "mask"]),
             helper.make_node("Mul", ["d", "d"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      [64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
                          [numpy_helper.from_array(np.array(0.5, F32), "ratio"),
                           numpy_helper.from_array(np.array(True), "train")])
    m = helper.make_model(g, opset_imports=OPSET)
    x = np.arange(64, dtype=F32)
    a, b = Executor(m, seed=3), Executor(m, seed=3, optimize=False)
    for step in range(3):
        a.rng.reseed(3, step)
        b.rng.reseed(3, step)
        np.testing.assert_array_equal(a.run({"x": x})["y"], b.run({"x": x})["y"])


# -- fused kernels against the nodes they replace -------------------------------------------
def _run_nodes(nodes, feeds, outputs, inits=()):
    vi = [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in feeds]
    g = helper.make_graph(nodes, "g", vi,
                          [helper.make_tensor_value_info(k, TensorProto.FLOAT, None)
                           for k in outputs], list(inits))
    out = Executor(helper.make_model(g, opset_imports=OPSET), optimize=False).run(feeds)
    return [out[k] for k in outputs]


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 2, 7), (3, 4, 2, 3, 2)])
def test_batchnorm_fused_forward_and_backward(shape, monkeypatch):
    """The fused kernels' NumPy code is the chain's operations, bit for bit (the compiled
    loops, which sum in float64, are compared with it in tests/test_compiled.py)."""
    monkeypatch.setenv("ONNX_TRAINER_COMPILED", "0")
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(shape) * 2 + 1).astype(F32)
    c = shape[1]
    cshape = (c,) + (1,) * (len(shape) - 2)
    s_b = (rng.standard_normal(cshape) + 1).astype(F32)
    b_b = rng.standard_normal(cshape).astype(F32)
    axes = (0,) + tuple(range(2, len(shape)))
    eps = F32(1e-5)
    ax = numpy_helper.from_array(np.array(axes, np.int64), "axes")
    e = numpy_helper.from_array(np.array(eps, F32), "eps")
    chain = [helper.make_node("ReduceMean", ["x", "axes"], ["mean"]),
             helper.make_node("Sub", ["x", "mean"], ["xc"]),
             helper.make_node("Mul", ["xc", "xc"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["var"]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["xc", "sd"], ["xhat"]),
             helper.make_node("Mul", ["xhat", "s_b"], ["scaled"]),
             helper.make_node("Add", ["scaled", "b_b"], ["y"])]
    names = list(fused.BN_VALUES)
    ref = _run_nodes(chain, {"x": x, "s_b": s_b, "b_b": b_b}, names, [ax, e])
    got = fused.bn_train_forward(np, x, s_b, b_b, axes=axes, eps=eps, want=tuple(names))
    for r, v in zip(ref, got, strict=True):
        np.testing.assert_array_equal(v, r)
    y, xhat, sd = fused.bn_train_forward(np, x, s_b, b_b, axes=axes, eps=eps,
                                         want=("y", "xhat", "sd"))
    np.testing.assert_array_equal(y, ref[-1])
    # backward against the chain's gradients (the autodiff's own nodes)
    dy = rng.standard_normal(shape).astype(F32)
    g = helper.make_graph(chain, "bn", [helper.make_tensor_value_info(k, TensorProto.FLOAT,
                                                                      list(v.shape))
                                        for k, v in (("x", x), ("s_b", s_b), ("b_b", b_b))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
                          [ax, e])
    from trainer.autodiff import reverse
    rm = reverse(helper.make_model(g, opset_imports=OPSET), ["x", "s_b", "b_b"], ["y"])
    want = Executor(rm, optimize=False).run({"x": x, "s_b": s_b, "b_b": b_b, "y_grad": dy})
    count = x.size // c
    dx, ds, db = fused.bn_train_backward(np, dy, xhat, sd, s_b, axes=axes, count=count,
                                         want_dx=True, want_ds=True, want_db=True,
                                         ds_shape=cshape, db_shape=cshape)
    assert rel_diff(dx, want["x_grad"]) <= 1e-6
    assert rel_diff(ds, want["s_b_grad"]) <= 1e-6
    assert rel_diff(db, want["b_b_grad"]) <= 1e-6


@pytest.mark.parametrize("ignore", ["some", "none", "all"])
@pytest.mark.parametrize("ignore_index", [-100, -2, 1])  # outside [-C, C) (a lookup that
def test_softmax_cross_entropy_fused_matches_the_loss_and_its_gradient(ignore, ignore_index,
                                                                      monkeypatch):
    # (the NumPy path's bits; the compiled loops' accuracy: tests/test_compiled.py)
    monkeypatch.setenv("ONNX_TRAINER_COMPILED", "0")
    rng = np.random.default_rng(7)  # raises finds it) or inside (an explicit comparison)
    scores = rng.standard_normal((6, 4)).astype(F32)
    labels = rng.choice([c for c in range(4) if c != ignore_index], 6)
    labels[{"some": [1, 4], "none": [], "all": slice(None)}[ignore]] = ignore_index
    sce = helper.make_node("SoftmaxCrossEntropyLoss", ["s", "l"], ["loss", "lp"],
                           ignore_index=ignore_index)
    g = helper.make_graph([sce], "g", [helper.make_tensor_value_info("s", TensorProto.FLOAT,
                                                                      [6, 4]),
                                       helper.make_tensor_value_info("l", TensorProto.INT64,
                                                                     [6])],
                          [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])])
    from trainer.autodiff import reverse
    m = helper.make_model(g, opset_imports=OPSET)
    seed = np.array(0.75, F32)
    want = Executor(reverse(m, ["s"], ["loss"]), optimize=False).run(
        {"s": scores, "l": labels, "loss_grad": seed})
    loss, lp = fused.softmax_cross_entropy_forward(np, scores, labels,
                                                   ignore_index=ignore_index)
    np.testing.assert_array_equal(loss, want["loss"])
    (ds,) = fused.softmax_cross_entropy_backward(np, lp, labels, seed, ignore_index=ignore_index)
    np.testing.assert_array_equal(ds, want["s_grad"])
    if ignore == "all":
        return
    t = torch.from_numpy(scores).requires_grad_()
    torch_labels = np.where(labels == ignore_index, -100, labels)  # (torch: no negative class)
    torch.nn.functional.cross_entropy(t, torch.from_numpy(torch_labels)).mul(0.75).backward()
    np.testing.assert_allclose(ds, t.grad.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_bound_host_forward_is_the_general_one_bit_for_bit(dtype,
                                                                                monkeypatch):
    """The per-shape forward of [N, C] host scores (labels that cannot equal ignore_index)
    against the general path it stands in for: same loss and log_prob bits, non-finite scores,
    negative labels and int32 labels included, and the same error for a label out of range.
    (The NumPy path's; the compiled loops' accuracy: tests/test_compiled.py.)"""
    monkeypatch.setenv("ONNX_TRAINER_COMPILED", "0")
    rng = np.random.default_rng(3)
    cases = []
    for k in range(300):
        n, c = int(rng.integers(1, 40)), int(rng.integers(1, 120))
        s = (rng.standard_normal((n, c)) * rng.choice([1.0, 40.0, 3e3])).astype(dtype)
        if k % 5 == 0:
            s[rng.integers(0, n), rng.integers(0, c)] = rng.choice([np.nan, np.inf, -np.inf])
        lab = rng.integers(-c, c, n).astype(np.int32 if k % 2 else np.int64)
        cases.append((s, lab, [None, -100, c + 1][k % 3]))
    with np.errstate(invalid="ignore"):  # (inf - inf: NaN rows, as in the general path)
        bound = [fused.softmax_cross_entropy_forward(np, s, lab, ignore_index=ii)
                 for s, lab, ii in cases]
    assert any(v is not None for v in fused._SCE_PLANS.values())  # (the bound form ran)
    monkeypatch.setattr(fused, "_sce_host_plan", lambda *a: None)
    with np.errstate(invalid="ignore"):
        for (s, lab, ii), (loss, lp) in zip(cases, bound, strict=True):
            want_loss, want_lp = fused.softmax_cross_entropy_forward(np, s, lab, ignore_index=ii)
            assert loss.dtype == want_loss.dtype == dtype and loss.shape == ()
            np.testing.assert_array_equal(loss, want_loss)
            np.testing.assert_array_equal(lp, want_lp)
    monkeypatch.undo()
    s, lab = cases[1][0], cases[1][1].copy()
    lab[0] = s.shape[1] + 3  # (out of range, and not ignore_index: both paths raise)
    with pytest.raises(IndexError):
        fused.softmax_cross_entropy_forward(np, s, lab, ignore_index=-100)


def test_layer_norm_fused_backward_matches_torch():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 5, 8)) * 3 + 1).astype(F32)
    s, b = rng.standard_normal(8).astype(F32), rng.standard_normal(8).astype(F32)
    dy = rng.standard_normal(x.shape).astype(F32)
    xt, st, bt = (torch.from_numpy(v).requires_grad_() for v in (x, s, b))
    torch.nn.functional.layer_norm(xt, (8,), st, bt, 1e-5).backward(torch.from_numpy(dy))
    dx, ds, db = fused.layer_norm_backward(np, dy, x, s, axes=(2,), eps=1e-5, want_dx=True,
                                           want_ds=True, want_db=True, ds_shape=(8,),
                                           db_shape=(8,))
    for got, ref in ((dx, xt), (ds, st), (db, bt)):
        assert rel_diff(got, ref.grad.numpy()) <= 2e-6


def test_fast_erf_is_correctly_rounded_but_near_ties():
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.standard_normal(20000) * 2, np.linspace(-6, 6, 200001),
                        np.geomspace(1e-37, 1, 2000), [0, -0.0, 1e-30, -1e-8, 1, -1, 0.999,
                                                       1.001, 3.9, 4.5, 10, np.inf,
                                                       -np.inf]]).astype(F32)
    exact = np.array([math.erf(float(v)) for v in x])
    (got,) = fused.erf_float32(np, x)
    assert got.dtype == F32
    ulp = np.spacing(np.abs(exact).astype(F32)).astype(np.float64)
    assert np.max(np.abs(got - exact) / ulp) <= 0.55
    assert np.isnan(fused.erf_float32(np, np.array([np.nan], F32))[0]).all()
    np.testing.assert_array_equal(get_kernel("Erf", 13)(np, x)[0], got)  # the kernel's too


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("kernel,stride,pad", [([3, 3], [2, 2], [1] * 4),
                                               ([2, 2], [2, 2], [0] * 4)],
                         ids=["overlapping", "tiled"])
def test_maxpool_gradient_is_fused_and_matches_the_nodes_and_torch(opset, kernel, stride, pad):
    """MaxPool's backward (a one-hot tap chain folded by a ConvTranspose before opset 16 when
    windows overlap, a ScatterElements otherwise) runs as one scatter-add of dY at the
    Indices; equal to the unfused nodes and to PyTorch, ties included."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 2, 9, 8)).astype(F32)
    x[0, 0, :3, :3] = 1.5  # a tie: the first maximal tap takes the gradient
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=kernel, strides=stride,
                              pads=pad),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    feat = 2 * math.prod((d + pad[0] + pad[2] - k) // s + 1
                         for d, k, s in zip((9, 8), kernel, stride, strict=True))
    w = rng.standard_normal((feat, 4)).astype(F32)
    g = helper.make_graph(nodes, "pool",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 9, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 4])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    from trainer.autodiff import reverse
    rm = reverse(model, ["x"], ["logits"])
    dl = rng.standard_normal((3, 4)).astype(F32)
    feeds = {"x": x, "logits_grad": dl}
    ref = Executor(rm, optimize=False).run(feeds)["x_grad"]
    ex = Executor(rm)
    ex.run(feeds)
    got = ex.run(feeds)["x_grad"]
    assert "MaxPoolGrad" in {n.op for n in planned(ex).nodes}
    assert rel_diff(got, ref) <= 1e-6
    xt = torch.from_numpy(x).requires_grad_()
    pt = torch.nn.functional.max_pool2d(xt, kernel, stride, pad[0])
    (pt.flatten(1) @ torch.from_numpy(w)).backward(torch.from_numpy(dl))
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-5, atol=1e-7)


# -- convolutions against PyTorch -------------------------------------------------------------
CONV_CASES = [  # (N, C, H, W, M, K, stride, pad, dilation, group)
    (2, 3, 9, 8, 4, 3, 1, 1, 1, 1), (2, 4, 9, 9, 6, 3, 2, 1, 1, 2), (1, 2, 7, 7, 2, 2, 1, 0, 2, 1),
    (3, 6, 6, 5, 3, 1, 2, 0, 1, 1), (2, 2, 5, 5, 8, 5, 1, 2, 1, 1),
    (2, 4, 7, 6, 6, 3, 1, 1, 2, 2), (2, 6, 8, 8, 4, 5, 1, 0, 1, 1),
    # 1x1 kernels: the pointwise path (stride 1 and 3), padded and grouped ones through im2col
    (2, 5, 4, 6, 7, 1, 1, 0, 1, 1), (3, 3, 7, 8, 4, 1, 3, 0, 1, 1), (2, 3, 4, 4, 5, 1, 1, 1, 1, 1),
    (2, 4, 5, 5, 6, 1, 1, 0, 1, 2)]


@pytest.mark.parametrize("chunk", [None, 1, 2], ids=["batch", "chunks1", "chunks2"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_forward_and_both_gradients_match_torch(case, chunk, monkeypatch):
    """Also over chunks of the batch (the host path of larger layers): `chunk` images'
    columns fit the chunk budget, so batches of 2 and 3 split evenly and unevenly."""
    n, c, h, w_, m, k, s, p, d, g = case
    if chunk is not None:
        out = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w_ + 2 * p - d * (k - 1) - 1) // s + 1
        monkeypatch.setattr(nn, "CONV_CHUNK_BYTES", chunk * c * k * k * out[0] * out[1] * 4)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((n, c, h, w_)).astype(F32)
    w = rng.standard_normal((m, c // g, k, k)).astype(F32)
    b = rng.standard_normal(m).astype(F32)
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    yt = torch.nn.functional.conv2d(xt, wt, torch.from_numpy(b), s, p, d, g)
    kw = dict(strides=[s, s], pads=[p] * 4, dilations=[d, d], group=g)
    (y,) = nn.Conv(np, x, w, b, **kw)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(y.shape).astype(F32)
    yt.backward(torch.from_numpy(dy))
    # dX as the backward graph computes it: ConvTranspose of dY, every method (rows: 2-D
    # stride 1 only; elsewhere it falls back to the cheapest that applies)
    extra = [(h + 2 * p - d * (k - 1) - 1) % s, (w_ + 2 * p - d * (k - 1) - 1) % s]
    geo = nn.conv_transpose_geometry(dy.shape, [k, k], [s, s], [d, d], [p] * 4, extra, None,
                                     "NOTSET")
    for method in ("conv", "fold", "rows", None):
        dx = nn.conv_transpose_into(np, dy, w, None, *geo, g, method=method)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    if g == 1:
        dw = nn.conv_weight_grad_into(np, x, dy, [k, k], [s, s], [d, d], [p] * 4, 1)
        np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-4)
        (dw2,) = fused.conv_weight_grad(np, x, dy, kernel_shape=[k, k], strides=[s, s],
                                        dilations=[d, d], pads=[p, p, 0, 0])
        np.testing.assert_allclose(dw2, dw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,pad", [([2, 2], [2, 2], [0] * 4),
                                               ([3, 3], [1, 2], [1] * 4)])
def test_pools_match_torch(kernel, stride, pad):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 7, 8)).astype(F32)
    y, idx = nn.MaxPool(np, x, kernel_shape=kernel, strides=stride, pads=pad)
    yt, it = torch.nn.functional.max_pool2d(torch.from_numpy(x), kernel, stride, pad[0],
                                            return_indices=True)
    np.testing.assert_array_equal(y, yt.numpy())
    plane = 7 * 8
    np.testing.assert_array_equal(idx % plane, it.numpy())
    (only,) = nn.MaxPool(np, x, kernel_shape=kernel, strides=stride, pads=pad, n_outputs=1)
    np.testing.assert_array_equal(only, y)
    x[0, 0, 0, 0] = np.nan  # NaNs take the argmax path, as before
    assert np.isnan(nn.MaxPool(np, x, kernel_shape=kernel, strides=stride, pads=pad)[0][0, 0,
                                                                                       0, 0])
    x = rng.standard_normal((2, 3, 7, 8)).astype(F32)
    (a,) = nn.AveragePool(np, x, kernel_shape=kernel, strides=stride, pads=pad,
                          count_include_pad=1)
    at = torch.nn.functional.avg_pool2d(torch.from_numpy(x), kernel, stride, pad[0],
                                        count_include_pad=True)
    np.testing.assert_allclose(a, at.numpy(), rtol=1e-6, atol=1e-6)


def test_reductions_with_an_axes_input_are_planned():
    # From opset 13 (ReduceSum) / 18 (ReduceMean) the axes are an int64 input: the reduction
    # still writes into its planned buffer (a float output of a float input).
    x = np.random.default_rng(0).standard_normal((4, 5, 6)).astype(F32)
    nodes = [helper.make_node("ReduceSum", ["x", "ax"], ["s"], keepdims=0),
             helper.make_node("ReduceMean", ["s", "ax2"], ["m"], keepdims=1),
             helper.make_node("Relu", ["m"], ["y"])]
    model = make_model(nodes, initializers={"ax": np.array([1], np.int64),
                                            "ax2": np.array([-1], np.int64)},
                       inputs={"x": x}, outputs=["y"], opset=18)
    ex = Executor(model, feeds=["x"])
    for _ in range(3):
        y = ex.run({"x": x})["y"]
        np.testing.assert_allclose(y, np.maximum(x.sum(1).mean(-1, keepdims=True), 0),
                                   rtol=1e-6)
    assert planned(ex).buffers == (4 * 6 + 4) * 4  # s and m in planned buffers


def test_recurrent_resize_and_ctc_training_graphs_are_planned():
    """Resize (YOLO's upsampling), LSTM (silero-vad) and the ctc loss's own ops have output
    shapes that follow from their inputs': their training graphs are planned (they ran
    unplanned: YOLOv8n's step 362 -> 293 ms, silero-vad's 6.6 -> 4.8 ms, a CRNN's 384 -> 353
    ms once planned), and give the interpreter's values."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], F32), "scales"),
             numpy_helper.from_array(np.array([-1, 8, 8], np.int64), "shape"),
             _init(rng, "W", 1, 24, 8), _init(rng, "R", 1, 24, 6), _init(rng, "B", 1, 48)]
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Reshape", ["up", "shape"], ["seq"]),
             helper.make_node("Transpose", ["seq"], ["tm"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["tm", "W", "R", "B"], ["y"], hidden_size=6),
             helper.make_node("Squeeze", ["y", "one"], ["ys"]),
             helper.make_node("ReduceMean", ["ys", "zero"], ["logits"], keepdims=0)]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "one"),
              numpy_helper.from_array(np.array([0], np.int64), "zero")]
    g = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 1, 4, 4])], [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["N", 6])], inits)
    x, y = rng.standard_normal((3, 1, 4, 4)).astype(F32), rng.integers(0, 6, 3)
    cases = [training_case(helper.make_model(g, opset_imports=OPSET), x, y)]
    import tempfile
    from pathlib import Path

    from tests.test_grad_ctc import _recognizer
    with tempfile.TemporaryDirectory() as d:
        _recognizer(Path(d) / "r.onnx", (rng.standard_normal((8, 5)) * 0.3).astype(F32),
                    np.zeros(5, F32))
        rec = onnx.load(str(Path(d) / "r.onnx"))
    tm = build_training_graph(rec, {"type": "ctc", "output": "probs", "target": "t"},
                              shapes={"x": (4, 10, 8)})
    info = training_info(tm)
    inits = {t.name: numpy_helper.to_array(t) for t in tm.graph.initializer}
    names = list(info.gradients)
    feeds = {k: inits[k].copy() for k in names}
    feeds.update({"x": rng.standard_normal((4, 10, 8)).astype(F32),
                  info.targets["t"]: np.array([[1, 2], [3, -1], [4, 4], [2, -1]])})
    cases.append((tm, names, [info.loss] + list(info.gradients.values()), feeds))
    for tm, names, fetch, feeds in cases:
        ref = Executor(tm, feeds=names, fetch=fetch, optimize=False).run(feeds)
        ex = Executor(tm, feeds=names, fetch=fetch)
        for _ in range(2):
            out = ex.run(feeds)
            for k in fetch:
                assert rel_diff(out[k], ref[k]) <= 2e-6, k
        ops = {n.op for n in planned(ex).nodes}
        assert ops & {"LSTM", "Resize", "CTCLoss"}, ops
