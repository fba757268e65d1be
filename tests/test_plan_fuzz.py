"""The memory plan on random graphs: values read by several nodes, views of views, Sums of
repeated and dying terms, outputs taken from the middle of the graph. Every planned run (the
second on) must give what NumPy computes op by op, for the first feeds and for new ones (a
buffer written over while a later node still reads it shows up as a wrong value); the same
graphs made training graphs must give the unplanned run's gradients. Longer run:
`FUZZ_LONG=1 pytest tests/test_plan_fuzz.py`."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from trainer.executor import Executor

F32 = np.float32
SHAPE = (3, 4)
LONG = bool(os.environ.get("FUZZ_LONG"))

# op -> (arity, NumPy reference); every op maps [3, 4] values to a [3, 4] value
UNARY = {"Neg": np.negative, "Tanh": np.tanh, "Relu": lambda a: np.maximum(a, 0),
         "Abs": np.abs, "Identity": lambda a: a}
BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply,
          "Max": np.maximum}
# composites made of several ONNX nodes, mostly views (no buffer of their own in the plan)
COMPOSITE = ("transpose2", "reshape2", "pad_slice", "matmul", "where", "softmax", "gemm",
             "expand_mul", "concat_first", "concat_second", "slice_step", "transpose_add",
             "where_zero", "layernorm", "squeeze2")


def _composite(kind: str, a: str, b: str, out: str, k: int) -> list:
    t = f"t{k}"
    if kind == "transpose2":
        return [helper.make_node("Transpose", [a], [t], perm=[1, 0]),
                helper.make_node("Transpose", [t], [out], perm=[1, 0])]
    if kind == "reshape2":
        return [helper.make_node("Reshape", [a, "flat"], [t]),
                helper.make_node("Reshape", [t, "shape"], [out])]
    if kind == "pad_slice":
        return [helper.make_node("Pad", [a, "pads"], [t]),
                helper.make_node("Slice", [t, "starts", "ends"], [out])]
    if kind == "matmul":
        return [helper.make_node("MatMul", [a, "W"], [out])]
    if kind == "where":
        return [helper.make_node("Greater", [a, b], [t]),
                helper.make_node("Where", [t, a, b], [out])]
    if kind == "softmax":
        return [helper.make_node("Softmax", [a], [out], axis=-1)]
    if kind == "gemm":
        return [helper.make_node("Gemm", [a, "W", b], [out], transB=1, beta=0.5)]
    if kind == "expand_mul":
        return [helper.make_node("ReduceSum", [b, "axis1"], [t], keepdims=1),
                helper.make_node("Expand", [t, "shape"], [f"{t}e"]),
                helper.make_node("Mul", [a, f"{t}e"], [out])]
    if kind in ("concat_first", "concat_second"):
        first = kind == "concat_first"
        return [helper.make_node("Concat", [a, b], [t], axis=1),
                helper.make_node("Split", [t], [out, f"{t}r"] if first else [f"{t}l", out],
                                 axis=1, num_outputs=2)]
    if kind == "slice_step":
        return [helper.make_node("Concat", [a, a], [t], axis=1),
                helper.make_node("Reshape", [t, "pairs"], [f"{t}p"]),
                helper.make_node("Slice", [f"{t}p", "zero1", "one1", "axis2"], [f"{t}s"]),
                helper.make_node("Reshape", [f"{t}s", "shape"], [out])]
    if kind == "transpose_add":
        return [helper.make_node("Transpose", [a], [t], perm=[1, 0]),
                helper.make_node("Transpose", [b], [f"{t}b"], perm=[1, 0]),
                helper.make_node("Add", [t, f"{t}b"], [f"{t}s"]),
                helper.make_node("Transpose", [f"{t}s"], [out], perm=[1, 0])]
    if kind == "where_zero":
        return [helper.make_node("Greater", [a, "zero"], [t]),
                helper.make_node("Where", [t, b, "zero"], [out])]
    if kind == "layernorm":
        return [helper.make_node("LayerNormalization", [a, "gamma", "beta"], [out], axis=-1)]
    return [helper.make_node("Unsqueeze", [a, "axis0"], [t]),
            helper.make_node("Squeeze", [t, "axis0"], [out])]


def _reference(kind: str, a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    if kind in ("transpose2", "reshape2", "pad_slice", "concat_first", "squeeze2"):
        return a
    if kind == "concat_second":
        return b
    if kind == "matmul":
        return a @ w
    if kind == "where":
        return np.where(a > b, a, b)
    if kind == "softmax":
        e = np.exp(a - a.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    if kind == "gemm":
        return a @ w.T + 0.5 * b
    if kind == "expand_mul":
        return a * b.sum(1, keepdims=True)
    if kind == "slice_step":  # the even columns of [a, a]: a's columns 0, 2, 0, 2
        return np.concatenate([a, a], 1)[:, ::2]
    if kind == "transpose_add":
        return a + b
    if kind == "where_zero":
        return np.where(a > 0, b, 0)
    if kind == "layernorm":
        mu = a.mean(-1, keepdims=True)
        var = ((a - mu) ** 2).mean(-1, keepdims=True)
        return (a - mu) / np.sqrt(var + 1e-5) * _GAMMA + _BETA
    raise AssertionError(kind)


@st.composite
def graphs(draw):
    """(nodes, reference program, outputs): 3-14 steps over the feeds x and y."""
    values = ["x", "y"]
    nodes, program = [], []
    for k in range(draw(st.integers(3, 14))):
        out = f"v{k}"
        pick = st.sampled_from(values)
        family = draw(st.sampled_from(["unary", "binary", "sum", "composite"]))
        if family == "unary":
            op = draw(st.sampled_from(sorted(UNARY)))
            a = draw(pick)
            nodes.append(helper.make_node(op, [a], [out]))
            program.append((out, UNARY[op], [a]))
        elif family == "binary":
            op = draw(st.sampled_from(sorted(BINARY)))
            a, b = draw(pick), draw(pick)
            nodes.append(helper.make_node(op, [a, b], [out]))
            program.append((out, BINARY[op], [a, b]))
        elif family == "sum":
            terms = draw(st.lists(pick, min_size=1, max_size=5))
            nodes.append(helper.make_node("Sum", terms, [out]))
            program.append((out, lambda *xs: np.sum(xs, axis=0), terms))
        else:
            kind = draw(st.sampled_from(COMPOSITE))
            a, b = draw(pick), draw(pick)
            nodes += _composite(kind, a, b, out, k)
            program.append((out, lambda p, q, w, kind=kind: _reference(kind, p, q, w),
                            [a, b, "W"]))
        values.append(out)
    made = values[2:]
    outputs = sorted(set(draw(st.lists(st.sampled_from(made), min_size=1, max_size=3))
                         + [made[-1]]))
    return nodes, program, outputs


_GAMMA = np.array([1.0, 0.5, -1.0, 2.0], F32)
_BETA = np.array([0.1, 0.0, -0.2, 0.3], F32)


def _constants(rng) -> dict[str, np.ndarray]:
    return {"W": (rng.standard_normal((4, 4)) * 0.5).astype(F32),
            "flat": np.array([12], np.int64), "shape": np.array(SHAPE, np.int64),
            "pads": np.array([0, 1, 0, 1], np.int64), "starts": np.array([0, 1], np.int64),
            "ends": np.array([3, 5], np.int64), "axis0": np.array([0], np.int64),
            "axis1": np.array([1], np.int64), "axis2": np.array([2], np.int64),
            "pairs": np.array([3, 4, 2], np.int64), "zero1": np.array([0], np.int64),
            "one1": np.array([1], np.int64), "zero": np.array(0, F32),
            "gamma": _GAMMA, "beta": _BETA}


@settings(max_examples=2000 if LONG else 150, derandomize=not LONG, deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_planned_runs_of_random_graphs_match_numpy(case):
    nodes, program, outputs = case
    rng = np.random.default_rng(0)
    consts = _constants(rng)
    g = helper.make_graph(
        nodes, "fuzz",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(SHAPE)) for n in ("x", "y")],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(SHAPE)) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    ex = Executor(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    for feeds_seed in (1, 1, 1, 2, 3):  # planned runs, the plan's buffers reused
        r = np.random.default_rng(feeds_seed)
        feeds = {n: r.standard_normal(SHAPE).astype(F32) for n in ("x", "y")}
        env = {**feeds, "W": consts["W"]}
        for out, fn, args in program:
            env[out] = np.asarray(fn(*[env[a] for a in args]), F32)
        got = ex.run(dict(feeds))
        scale = max(1.0, max(float(np.abs(v[np.isfinite(v)]).max(initial=0)) for v in env.values()))
        for o in outputs:  # (float32 sums in another order: error relative to the terms)
            np.testing.assert_allclose(got[o], env[o], rtol=1e-5, atol=1e-5 * scale, err_msg=o)


@settings(max_examples=2000 if LONG else 200, derandomize=not LONG, deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_planned_training_graphs_of_random_models_match_unplanned(case):
    """The same random graphs with x fed and the float initializers that reach the loss
    trained (y always), a loss summed over the outputs, and the backward the gradient rules
    build (Sums of gradients from shared
    values, the fused kernels' patterns): a planned run gives the gradients of the unplanned
    one, in float64 to 1e-9."""
    from trainer.autodiff import build_training_graph, training_info
    from trainer.graph import to_float64

    nodes, _, outputs = case
    rng = np.random.default_rng(0)
    consts = _constants(rng)
    consts["y"] = rng.standard_normal(SHAPE).astype(F32)
    terms = []
    for k, o in enumerate(outputs):
        consts[f"R{k}"] = rng.standard_normal(SHAPE).astype(F32)
        nodes = [*nodes, helper.make_node("Mul", [o, f"R{k}"], [f"p{k}"]),
                 helper.make_node("ReduceSum", [f"p{k}"], [f"s{k}"], keepdims=0)]
        terms.append(f"s{k}")
    nodes += [helper.make_node("Mul", ["x", "y"], ["xy"]),  # so that y always trains
              helper.make_node("ReduceSum", ["xy"], ["sxy"], keepdims=0),
              helper.make_node("Sum", [*terms, "sxy"], ["L"])]
    g = helper.make_graph(
        nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("L", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = to_float64(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    tm = build_training_graph(model, {"type": "output", "output": "L"})  # (y always: below)
    grads = list(training_info(tm).gradients.values())
    ex = Executor(tm, fetch=grads + ["L"])
    x = np.random.default_rng(1).standard_normal(SHAPE)
    first = ex.run_unplanned({"x": x})
    assert not ex._specialized
    for _ in range(2):
        again = ex.run({"x": x})
        assert any(ex._specialized.values())
        for name in grads + ["L"]:
            np.testing.assert_allclose(again[name], first[name], rtol=1e-9, atol=1e-9,
                                       err_msg=name)


IMAGE = (2, 3, 5, 5)
# 4-D ops that keep [2, 3, 5, 5]: convolutions, BatchNormalization (trained with batch
# statistics: the fused kernels' patterns), pools, and the elementwise ops above
IMAGE_OPS = ("conv", "conv_bias", "conv_1x1", "batchnorm", "maxpool", "avgpool", "relu",
             "add", "mul", "sum", "concat_conv")


def _image_node(kind: str, a: str, b: str, out: str, k: int) -> list:
    if kind == "conv":
        return [helper.make_node("Conv", [a, "K3"], [out], pads=[1, 1, 1, 1])]
    if kind == "conv_bias":
        return [helper.make_node("Conv", [a, "K3", "cb"], [out], pads=[1, 1, 1, 1])]
    if kind == "conv_1x1":
        return [helper.make_node("Conv", [a, "K1"], [out])]
    if kind == "batchnorm":
        return [helper.make_node("BatchNormalization", [a, f"bs{k}", f"bb{k}", "bm", "bv"],
                                 [out])]
    if kind == "maxpool":
        return [helper.make_node("MaxPool", [a], [out], kernel_shape=[3, 3],
                                 pads=[1, 1, 1, 1])]
    if kind == "avgpool":
        return [helper.make_node("AveragePool", [a], [out], kernel_shape=[3, 3],
                                 pads=[1, 1, 1, 1], count_include_pad=1)]
    if kind == "relu":
        return [helper.make_node("Relu", [a], [out])]
    if kind in ("add", "mul"):
        return [helper.make_node(kind.capitalize(), [a, b], [out])]
    if kind == "sum":
        return [helper.make_node("Sum", [a, b, a], [out])]
    return [helper.make_node("Concat", [a, b], [f"c{k}"], axis=1),
            helper.make_node("Conv", [f"c{k}", "K6"], [out], pads=[1, 1, 1, 1])]


@st.composite
def image_graphs(draw):
    values, nodes, norms = ["x"], [], []
    for k in range(draw(st.integers(2, 9))):
        kind = draw(st.sampled_from(IMAGE_OPS))
        a, b = draw(st.sampled_from(values)), draw(st.sampled_from(values))
        nodes += _image_node(kind, a, b, f"v{k}", k)
        if kind == "batchnorm":
            norms.append(k)
        values.append(f"v{k}")
    made = values[1:]
    outputs = sorted(set(draw(st.lists(st.sampled_from(made), min_size=1, max_size=2))
                         + [made[-1]]))
    return nodes, norms, outputs


@settings(max_examples=1000 if LONG else 60, derandomize=not LONG, deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_graphs())
def test_planned_training_graphs_of_random_cnns_match_unplanned(case):
    """Random CNN graphs (convolutions with and without bias, 1x1, on concatenations,
    BatchNormalization in training, max and average pools, residual sums), trained with a
    loss over their outputs: a planned run (fused BatchNorm, convolution and pooling kernels,
    the memory plan) gives the unplanned run's loss and gradients, in float64 to 1e-9."""
    from trainer.autodiff import build_training_graph, training_info
    from trainer.graph import to_float64

    nodes, norms, outputs = case
    rng = np.random.default_rng(0)
    inits = {"K3": rng.standard_normal((3, 3, 3, 3)) * 0.3, "K1": rng.standard_normal(
        (3, 3, 1, 1)), "K6": rng.standard_normal((3, 6, 3, 3)) * 0.2,
        "cb": rng.standard_normal(3), "bm": np.zeros(3), "bv": np.ones(3)}
    for k in norms:
        inits[f"bs{k}"], inits[f"bb{k}"] = 1 + 0.1 * rng.standard_normal(3), rng.standard_normal(3)
    terms = []
    for k, o in enumerate(outputs):
        inits[f"R{k}"] = rng.standard_normal(IMAGE)
        nodes = [*nodes, helper.make_node("Mul", [o, f"R{k}"], [f"p{k}"]),
                 helper.make_node("ReduceSum", [f"p{k}"], [f"s{k}"], keepdims=0)]
        terms.append(f"s{k}")
    nodes.append(helper.make_node("Sum", terms, ["L"]))
    g = helper.make_graph(
        nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(IMAGE))],
        [helper.make_tensor_value_info("L", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(v.astype(F32), k) for k, v in inits.items()])
    model = to_float64(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    tm = build_training_graph(model, {"type": "output", "output": "L"})
    info = training_info(tm)
    fetch = [*info.gradients.values(), "L"]
    ex = Executor(tm, fetch=fetch)
    x = np.random.default_rng(1).standard_normal(IMAGE)
    first = ex.run_unplanned({"x": x})
    assert not ex._specialized
    for _ in range(2):
        again = ex.run({"x": x})
        assert any(ex._specialized.values())
        for name in fetch:
            np.testing.assert_allclose(again[name], first[name], rtol=1e-9, atol=1e-9,
                                       err_msg=name)
