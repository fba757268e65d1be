"""`onnx-trainer convert`: constant-built weights become initializers (checked against onnxruntime
and PyTorch's fan-in), a fixed batch axis becomes dynamic, and onnx's light_* models train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import ROOT
from trainer.convert import make_batch_dynamic, make_constants_trainable
from trainer.errors import ModelError

FILL = 0.02  # the value the light models' ConstantOfShape weights carry


def run_cli(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def cos(shape_name: str, out: str, dims, value=FILL, dtype=np.float32) -> tuple:
    """A ConstantOfShape node and the int64 initializer giving its shape."""
    init = numpy_helper.from_array(np.array(dims, np.int64), shape_name)
    node = helper.make_node("ConstantOfShape", [shape_name], [out], name=f"make_{out}",
                            value=numpy_helper.from_array(np.array([value], dtype)))
    return node, init


def make_model(nodes, inputs, outputs, inits=(), opset=17, ir=8) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    onnx.checker.check_model(m)
    return m


def vi(name, dims, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def cnn(ir: int = 8, names: bool = False) -> onnx.ModelProto:
    """Conv(W, B) -> BN(4 constants) -> channel affine (Unsqueeze -> Mul/Add) -> PRelu ->
    Flatten -> Gemm(reshaped W, transB) -> Gemm(W, transB=0) -> MatMul: every weight a
    ConstantOfShape, as in onnx's light_* models; one Reshape shape constant stays."""
    parts = [cos("w_shape", "conv_w", [16, 3, 3, 3]), cos("b_shape", "conv_b", [16]),
             cos("s_shape", "bn_s", [16]), cos("bb_shape", "bn_b", [16]),
             cos("m_shape", "bn_m", [16]), cos("v_shape", "bn_v", [16]),
             cos("as_shape", "aff_s", [16]), cos("ab_shape", "aff_b", [16]),
             cos("p_shape", "slope", [16, 1, 1]),
             cos("fc_shape", "fc_w4", [1, 1, 10, 1024]), cos("fcb_shape", "fc_b", [10]),
             cos("g2_shape", "g2_w", [10, 6]), cos("mm_shape", "mm_w", [6, 4])]
    nodes = [p[0] for p in parts]
    inits = [p[1] for p in parts] + [
        numpy_helper.from_array(np.array([10, 1024], np.int64), "fc_2d"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes12")]
    label = (lambda s: s) if names else (lambda s: "")
    nodes += [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name=label("conv1"),
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["n"],
                         name=label("bn1")),
        helper.make_node("Unsqueeze", ["aff_s", "axes12"], ["aff_s3"]),
        helper.make_node("Mul", ["n", "aff_s3"], ["ns"]),
        helper.make_node("Unsqueeze", ["aff_b", "axes12"], ["aff_b3"]),
        helper.make_node("Add", ["ns", "aff_b3"], ["na"]),
        helper.make_node("PRelu", ["na", "slope"], ["r"], name=label("act")),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Reshape", ["fc_w4", "fc_2d"], ["fc_w"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["h"], transB=1, name=label("fc")),
        helper.make_node("Gemm", ["h", "g2_w"], ["h2"], name=label("fc2")),
        helper.make_node("MatMul", ["h2", "mm_w"], ["y"], name=label("head"))]
    if ir < 4:
        inputs = [vi("x", [2, 3, 8, 8])] + [vi(t.name, list(t.dims), TensorProto.INT64)
                                           for t in inits]
    else:
        inputs = [vi("x", [2, 3, 8, 8])]
    return make_model(nodes, inputs, [vi("y", [2, 4])], inits, opset=13, ir=ir)


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def inits_of(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def torch_fan_in(shape) -> int:
    return torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))[0]


def with_fill(model: onnx.ModelProto, names, value=FILL) -> onnx.ModelProto:
    """Copy with the named initializers set to `value` (what their ConstantOfShape made)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in names:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.full(arr.shape, value, arr.dtype), t.name))
    return m


X = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)


# -- trainable constants ---------------------------------------------------------------------

def test_every_slot_becomes_an_initializer_and_the_graph_computes_the_same() -> None:
    model = cnn()
    out = make_constants_trainable(model)
    ops = [n.op_type for n in out.graph.node]
    assert "ConstantOfShape" not in ops and ops.count("Reshape") == 1
    got = inits_of(out)
    made = ["conv_w", "conv_b", "bn_s", "bn_b", "bn_m", "bn_v", "aff_s", "aff_b", "slope",
            "fc_w4", "fc_b", "g2_w", "mm_w"]
    assert set(made) <= set(got)
    assert "fc_2d" in got and "axes12" in got  # shape constants stay
    assert not any(name.endswith("_shape") for name in got)  # the dead shapes went
    # same wiring: with the old fill in place, onnxruntime gives the original outputs
    want = ort_run(model, {"x": X})[0]
    np.testing.assert_allclose(ort_run(with_fill(out, made), {"x": X})[0], want, rtol=1e-5)


def test_initial_values_per_slot() -> None:
    got = inits_of(make_constants_trainable(cnn()))
    for name in ("conv_b", "bn_b", "bn_m", "aff_b", "fc_b"):
        assert np.array_equal(got[name], np.zeros_like(got[name])), name
    for name in ("bn_s", "bn_v", "aff_s"):
        assert np.array_equal(got[name], np.ones_like(got[name])), name
    assert np.array_equal(got["slope"], np.full((16, 1, 1), 0.25, np.float32))  # torch's PReLU
    assert all(v.dtype == np.float32 for v in got.values() if v.dtype.kind == "f")


@pytest.mark.parametrize("shape, fan_in, attrs, op", [
    ((64, 32, 3, 3), torch_fan_in((64, 32, 3, 3)), {}, "Conv"),
    ((32, 64, 3, 3), torch_fan_in((32, 64, 3, 3)), {}, "ConvTranspose"),
    ((300, 200), torch_fan_in((300, 200)), {"transB": 1}, "Gemm"),  # torch Linear layout
    ((200, 300), 200, {}, "Gemm"),  # [in, out]: fan-in is the rows
    ((200, 300), 200, {}, "MatMul"),
])
def test_he_normal_std_from_fan_in(shape, fan_in, attrs, op) -> None:
    if op in ("Conv", "ConvTranspose"):
        c = shape[1] if op == "Conv" else shape[0]
        x, y = vi("x", [1, c, 8, 8]), vi("y", ["n", "c", "h", "w"])
    else:
        k = shape[1] if attrs.get("transB") else shape[0]
        x, y = vi("x", [4, k]), vi("y", ["n", "m"])
    node, init = cos("w_shape", "w", list(shape))
    m = make_model([node, helper.make_node(op, ["x", "w"], ["y"], **attrs)], [x], [y], [init])
    w = inits_of(make_constants_trainable(m, seed=3))["w"]
    assert w.shape == shape
    assert abs(w.mean()) < 4 * np.sqrt(2.0 / fan_in) / np.sqrt(w.size)
    np.testing.assert_allclose(w.std(), np.sqrt(2.0 / fan_in), rtol=0.03)  # kaiming_normal_


def test_seed_makes_it_deterministic() -> None:
    a = inits_of(make_constants_trainable(cnn(), seed=0))
    b = inits_of(make_constants_trainable(cnn(), seed=0))
    c = inits_of(make_constants_trainable(cnn(), seed=1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv_w"], c["conv_w"])
    assert np.array_equal(a["conv_b"], c["conv_b"])


def test_constant_nodes_keep_their_values_unless_reinit() -> None:
    w = np.random.default_rng(1).standard_normal((8, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
             helper.make_node("Constant", [], ["half"],
                              value=numpy_helper.from_array(np.array(0.5, np.float32))),
             helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Mul", ["c", "half"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3, 8, 8])], [vi("y", [2, 8, 6, 6])])
    kept = make_constants_trainable(m)
    assert np.array_equal(inits_of(kept)["w"], w)
    assert [n.op_type for n in kept.graph.node] == ["Constant", "Conv", "Mul"]  # scalar stays
    np.testing.assert_allclose(ort_run(kept, {"x": X})[0], ort_run(m, {"x": X})[0], rtol=1e-6)
    fresh = inits_of(make_constants_trainable(m, reinit=True))["w"]
    assert fresh.shape == w.shape and not np.allclose(fresh, w)


def test_the_converted_model_trains_every_weight_the_unconverted_one_trains() -> None:
    """A model whose weights are all Constant nodes trains each of them (graph.lift_weights).
    Converted, a MatMul's bias added after it (paddle2onnx's form) and a weight in no known
    slot stayed Constants, and with the model now holding initializers they no longer
    trained, in silence: the first is a bias slot now, the other is lifted as train lifts it."""
    import copy

    from trainer.convert import Report
    from trainer.graph import lift_weights

    rng = np.random.default_rng(2)
    w, b, s = (rng.standard_normal(shape).astype(np.float32) for shape in ((4, 3), (3,), (3,)))
    nodes = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(v))
             for n, v in (("W", w), ("B", b), ("S", s))]
    nodes += [helper.make_node("MatMul", ["x", "W"], ["h"]),
              helper.make_node("Add", ["h", "B"], ["hb"]),
              helper.make_node("Mul", ["hb", "S"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 3])])
    engine = sorted(lift_weights(copy.deepcopy(m)))
    report = Report()
    out = make_constants_trainable(m, reinit=True, report=report)
    assert sorted(inits_of(out)) == engine == ["B", "S", "W"]
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add", "Mul"]
    kinds = {name: slot.kind for name, slot, _, _ in report.converted}
    assert kinds == {"W": "linear weight", "B": "bias", "S": "constant weight"}
    assert (inits_of(out)["B"] == 0).all() and np.array_equal(inits_of(out)["S"], s)


def test_constants_that_are_not_weights_stay() -> None:
    # a runtime-shaped ConstantOfShape (from Shape) and a float constant added to another
    # constant fill no parameter slot
    shape_node, shape_init = cos("k_shape", "k", [4], value=2.0)
    nodes = [helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("ConstantOfShape", ["xs"], ["zeros"],
                              value=numpy_helper.from_array(np.array([0.0], np.float32))),
             helper.make_node("Add", ["x", "zeros"], ["a"]),
             shape_node, helper.make_node("Add", ["k", "one"], ["k1"]),
             helper.make_node("Add", ["a", "k1"], ["y"])]
    one = numpy_helper.from_array(np.ones(4, np.float32), "one")
    m = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], [shape_init, one])
    out = make_constants_trainable(m)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in m.graph.node]


def test_an_inputs_mean_and_scale_and_an_additive_mask_are_no_weights() -> None:
    """Float Constants added to or multiplied with an activation were taken for a channel
    affine whatever came before: an input normalization's mean and scale and a causal mask
    became trainable, and --reinit reset them (zeros for the mask: future tokens seen). Only
    a normalization's output (or its scaled output, for the shift) takes a channel affine."""
    def const(name, value):
        return helper.make_node("Constant", [], [name],
                                value=numpy_helper.from_array(np.asarray(value, np.float32)))
    mask = np.triu(np.full((3, 3), -1e9, np.float32), 1)
    nodes = [const("negmean", [-0.5, -0.4, -0.3]), const("invstd", [2.0, 2.5, 3.0]),
             const("mask", mask), const("g", [1.0, 1.0, 1.0]), const("b", [0.0, 0.0, 0.0]),
             helper.make_node("Add", ["x", "negmean"], ["xc"]),
             helper.make_node("Mul", ["xc", "invstd"], ["xn"]),
             helper.make_node("MatMul", ["xn", "W"], ["s"]),
             helper.make_node("Add", ["s", "mask"], ["sm"]),
             helper.make_node("InstanceNormalization", ["sm3", "one", "zero"], ["n"]),
             helper.make_node("Mul", ["n", "g"], ["ng"]),
             helper.make_node("Add", ["ng", "b"], ["y"])]
    nodes.insert(9, helper.make_node("Unsqueeze", ["sm", "ax"], ["sm3"]))
    inits = [numpy_helper.from_array(np.ones((3, 3), np.float32), "W"),
             numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.ones(3, np.float32), "one"),
             numpy_helper.from_array(np.zeros(3, np.float32), "zero")]
    m = make_model(nodes, [vi("x", [3, 3])], [vi("y", [1, 3, 3])], inits)
    out = make_constants_trainable(m, reinit=True)
    made = {t.name for t in out.graph.initializer} - {t.name for t in inits}
    assert made == {"g", "b"}


def test_names_after_the_consumer() -> None:
    model = cnn(names=True)
    out = make_constants_trainable(model, names="consumer")
    got = inits_of(out)
    for name in ("conv1.W", "conv1.B", "bn1.scale", "bn1.B", "bn1.mean", "bn1.var",
                 "act.slope", "fc.B", "fc.C", "fc2.B", "head.B"):
        assert name in got, sorted(got)
    assert got["conv1.W"].shape == (16, 3, 3, 3)
    made = [k for k in got if "." in k]
    np.testing.assert_allclose(ort_run(with_fill(out, made), {"x": X})[0],
                               ort_run(model, {"x": X})[0], rtol=1e-5)


def test_ir3_initializers_are_graph_inputs() -> None:
    out = make_constants_trainable(cnn(ir=3))
    onnx.checker.check_model(out)
    inputs = {i.name for i in out.graph.input}
    assert {t.name for t in out.graph.initializer} <= inputs
    assert "w_shape" not in inputs and "conv_w" in inputs
    assert ort_run(out, {"x": X})[0].shape == (2, 4)


# -- dynamic batch ---------------------------------------------------------------------------

def flatten_model(batch: int = 1) -> onnx.ModelProto:
    """Caffe2-style: Conv, then a Reshape to [batch, C*H*W] and a channel shuffle through
    Reshape/Transpose/Reshape with the batch spelled out, then Gemm and Softmax."""
    w = numpy_helper.from_array(
        np.random.default_rng(2).standard_normal((6, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(
        np.random.default_rng(3).standard_normal((5, 384)).astype(np.float32), "fc")
    shapes = [numpy_helper.from_array(np.array(s, np.int64), n) for n, s in [
        ("s5", [batch, 2, 3, 8, 8]), ("s4", [batch, 6, 8, 8]), ("flat", [batch, 384])]]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "s5"], ["g"]),
             helper.make_node("Transpose", ["g"], ["gt"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["gt", "s4"], ["sh"]),
             helper.make_node("Reshape", ["sh", "flat"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["z"], transB=1),
             helper.make_node("Softmax", ["z"], ["y"], axis=1)]
    return make_model(nodes, [vi("x", [batch, 3, 8, 8])], [vi("y", [batch, 5])],
                      [w, fc] + shapes)


def test_dynamic_batch_gives_each_sample_its_own_row() -> None:
    model = flatten_model()
    out = make_batch_dynamic(model)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.random.default_rng(4).standard_normal((3, 3, 8, 8)).astype(np.float32)
    got = ort_run(out, {"x": x})[0]
    want = np.concatenate([ort_run(model, {"x": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_dynamic_batch_follows_runtime_shapes() -> None:
    # PyTorch's flatten: Reshape(x, Concat(Shape(x)[0], -1)) already follows the batch
    minus1 = numpy_helper.from_array(np.array([-1], np.int64), "minus1")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"]),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["to"], axis=0),
             helper.make_node("Reshape", ["x", "to"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 48])], [minus1, zero, axes])
    out = make_batch_dynamic(m)
    x = np.arange(96, dtype=np.float32).reshape(2, 3, 4, 4)
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], x.reshape(2, 48))


def test_dynamic_batch_refuses_what_it_cannot_rewrite() -> None:
    # Expand to a shape that spells the batch: not rewritten, and it is caught
    nodes = [helper.make_node("Expand", ["x", "to"], ["y"])]
    to = numpy_helper.from_array(np.array([1, 4], np.int64), "to")
    m = make_model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])], [to])
    with pytest.raises(ModelError, match="dynamic-batch"):
        make_batch_dynamic(m)


# -- the command line ------------------------------------------------------------------------

def test_cli_prints_one_line_per_kind_and_a_total(tmp_path) -> None:
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(cnn(), src)
    proc = run_cli("convert", "--trainable-constants", str(src), "-o", str(dst), "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("conv weight") and " 1 tensor(s)" in ln and "He normal" in ln
               for ln in lines), lines
    assert any(ln.startswith("running var") for ln in lines)
    assert any(ln.startswith("total: 13 constant(s)") and "seed 5" in ln for ln in lines), lines
    # (the running statistics are not trained: the total said all were trainable)
    total = next(ln for ln in lines if ln.startswith("total:"))
    assert "; 2 of them, " in total and "BatchNormalization running statistics (updated by " \
        "the forward, not trained)" in total, total
    assert lines[-1] == f"wrote {dst}"
    saved = onnx.load(dst)
    assert np.array_equal(inits_of(saved)["conv_w"],
                          inits_of(make_constants_trainable(cnn(), seed=5))["conv_w"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.parametrize("args, words", [
    (["{src}", "-o", "{dst}"], "--trainable-constants"),
    (["--trainable-constants", "{tmp}/missing.onnx", "-o", "{dst}"], "not found"),
    (["--trainable-constants", "{plain}", "-o", "{dst}"], "nothing to convert"),
    # (options of --trainable-constants without it did nothing, in silence)
    (["{src}", "--dynamic-batch", "--reinit", "--seed", "7", "-o", "{dst}"],
     "--seed, --reinit apply to --trainable-constants"),
    (["{src}", "--dynamic-batch", "--names", "consumer", "-o", "{dst}"],
     "--names applies to --trainable-constants"),
    (["{tmp}/c.yaml", "--dynamic-batch", "-o", "{dst}"],
     "c.yaml is a config, not a model: convert takes MODEL.onnx"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, words) -> None:
    from trainer.cli import main

    src, plain, dst = tmp_path / "in.onnx", tmp_path / "plain.onnx", tmp_path / "out.onnx"
    onnx.save(cnn(), src)
    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])],
                         [vi("y", [2])]), plain)
    (tmp_path / "c.yaml").write_text("model: in.onnx\n")
    code = main(["convert", *[a.format(src=src, dst=dst, tmp=tmp_path, plain=plain)
                              for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err
    assert not dst.exists()


# -- onnx's light_* architectures: convert, then train through the CLI -----------------------

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# CPU seconds of convert + 2 training steps (one BLAS thread): squeezenet 3, shufflenet 5,
# inception_v1 6 | inception_v2 13, resnet50 15, alexnet 18, zfnet512 23, densenet121 29,
# vgg19 53 (7 GB peak); the default suite runs the three cheap ones.
FAST = ["squeezenet", "shufflenet", "inception_v1"]
SLOW = ["inception_v2", "resnet50", "bvlc_alexnet", "zfnet512", "densenet121", "vgg19"]


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_light_architecture_converts_and_trains(tmp_path, name) -> None:
    src, conv = LIGHT / f"light_{name}.onnx", tmp_path / "model.onnx"
    original = onnx.load(src)
    n_cos = sum(n.op_type == "ConstantOfShape" for n in original.graph.node)
    proc = run_cli("convert", "--trainable-constants", "--dynamic-batch", str(src), "-o",
                   str(conv))
    assert proc.returncode == 0, proc.stderr
    assert f"total: {n_cos} constant(s)" in proc.stdout, proc.stdout
    model = onnx.load(conv)
    assert not [n for n in model.graph.node if n.op_type == "ConstantOfShape"]
    inits = {t.name for t in model.graph.initializer}
    x_in = next(i for i in model.graph.input if i.name not in inits)
    out = model.graph.output[0]
    out_dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    assert x_in.type.tensor_type.shape.dim[0].dim_param == "N" and out_dims[1] == 1000

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, (2,) + (1,) * (len(out_dims) - 2))
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((2, 3, 224, 224)).astype(np.float32),
             y=labels)
    cfg = {"model": "model.onnx", "output": "out/model.onnx", "device": "cpu", "seed": 0,
           "data": {"train": {"path": "data.npz", "inputs": {x_in.name: "x"},
                              "targets": {"label": "y"}}, "batch_size": 2, "shuffle": False},
           "loss": {"type": "cross_entropy", "output": out.name, "target": "label",
                    "class_axis": 1},
           # Adam's step does not scale with the gradient, which is tiny for cross entropy
           # taken over the softmax these models end in
           "optimizer": {"type": "adam", "lr": 1.0e-5}, "steps": 2,
           "log": {"every_steps": 1, "metrics": "metrics.jsonl"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", str(tmp_path / "cfg.yaml"))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    assert losses[0] != losses[1], losses  # the same batch twice: the update changed the loss
    trained = onnx.load(tmp_path / "out" / "model.onnx")
    first = next(n.input[1] for n in original.graph.node if n.op_type == "Conv")
    before = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == first))
    after = numpy_helper.to_array(next(t for t in trained.graph.initializer if t.name == first))
    assert before.shape == after.shape and not np.array_equal(before, after)


def test_light_models_are_all_covered() -> None:
    found = sorted(p.stem.removeprefix("light_") for p in LIGHT.glob("light_*.onnx"))
    assert found == sorted(FAST + SLOW)
    assert os.path.isdir(LIGHT)


def test_a_batch_merged_into_a_reshape_is_refused(tmp_path):
    """[B, 5, 4] -> Reshape [B*5, 4] -> MatMul -> Reshape [B, 5, 3]: the batch axis reaches
    no output, so no rewrite follows it; convert reported success and wrote a model that
    still ran at batch 4 only."""
    from onnx import TensorProto, helper, numpy_helper

    from trainer.convert import convert_file
    from trainer.errors import ModelError

    b = 4
    inits = {"W": np.ones((4, 3), np.float32), "s1": np.array([b * 5, 4], np.int64),
             "s2": np.array([b, 5, 3], np.int64)}
    g = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s1"], ["x2"]),
         helper.make_node("MatMul", ["x2", "W"], ["y2"]),
         helper.make_node("Reshape", ["y2", "s2"], ["y3"]),
         helper.make_node("ReduceMean", ["y3"], ["logits"], axes=[1], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, 5, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [b, 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "m.onnx"))
    # (the node where the trail ends is named: the Reshape merging the batch into rows)
    with pytest.raises(ModelError, match="reaches no output .*convert cannot follow it past "
                                         r"'Reshape_0' \(Reshape\)"):
        convert_file(tmp_path / "m.onnx", tmp_path / "d.onnx", dynamic_batch=True)
    assert not (tmp_path / "d.onnx").exists()


def test_check_names_weights_built_by_constant_of_shape_and_the_conversion(tmp_path):
    """A Gemm weight made by ConstantOfShape (as onnx's light_* models build theirs) is a
    constant of the graph: `check` said "all trainable" and training left it zero, silently.
    `check` and `train` now name it and the conversion; the converted model trains it."""
    from onnx import TensorProto, helper, numpy_helper

    from trainer.convert import convert_file
    from trainer.report import model_report

    nodes = [helper.make_node("Constant", [], ["shp"], value=numpy_helper.from_array(
                 np.array([10, 64], np.int64))),
             helper.make_node("ConstantOfShape", ["shp"], ["W"], value=numpy_helper.from_array(
                 np.array([0.0], np.float32))),
             helper.make_node("Gemm", ["x", "W", "b"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [8, 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [8, 10])],
                          [numpy_helper.from_array(np.zeros(10, np.float32), "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    text = model_report(onnx.load(tmp_path / "m.onnx")).text()
    assert "ConstantOfShape (one repeated value" in text and "--trainable-constants" in text
    assert text.rstrip().endswith(": W") or ": W\n" in text
    convert_file(tmp_path / "m.onnx", tmp_path / "c.onnx", trainable_constants=True)
    report = model_report(onnx.load(tmp_path / "c.onnx"))
    assert "ConstantOfShape" not in report.text()
    assert sorted(p.name for p in report.params if p.role == "parameter") == ["W", "b"]


def test_the_command_check_advises_runs(tmp_path) -> None:
    """`check` advised `onnx-trainer convert --trainable-constants MODEL OUT`, which the parser
    refuses (-o is required): the command it prints runs as printed."""
    import re
    import shlex

    from trainer.cli import main
    from trainer.report import CONSTANT_WEIGHTS_HINT

    onnx.save(cnn(), str(tmp_path / "m.onnx"))
    command = re.search(r"`onnx-trainer ([^`]*)`", CONSTANT_WEIGHTS_HINT).group(1)
    args = [str(tmp_path / "m.onnx") if a == "MODEL" else str(tmp_path / "o.onnx")
            if a == "OUT" else a for a in shlex.split(command)]
    assert main(args) == 0 and (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("flat", [[-1, 8], [-1, 48]])
def test_dynamic_batch_tells_a_merged_batch_from_a_flattened_sample(flat) -> None:
    """[B, T, F] -> Reshape [-1, F] merges the batch into B * T; the [-1, F] was taken as
    keeping it, and the Reshape back to [B, T, F'] became [0, T, F'] (0 copies B * T): a model
    broken at every batch, written with exit 0 where shape inference could not see past a
    contrib op. [-1, T * F] keeps it and converts."""
    x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "s2"], ["y"])]
    inits = [numpy_helper.from_array(np.array(flat, np.int64), "s1"),
             numpy_helper.from_array(np.array([4, 6, 8], np.int64), "s2")]
    m = make_model(nodes, [vi("x", [4, 6, 8])], [vi("y", [4, 6, 8])], inits)
    if flat == [-1, 8]:
        with pytest.raises(ModelError, match="reaches no output"):
            make_batch_dynamic(m)
        return
    out = make_batch_dynamic(m)
    x5 = np.concatenate([x, x[:1]])
    np.testing.assert_array_equal(ort_run(out, {"x": x5})[0], np.maximum(x5, 0))


def test_dynamic_batch_follows_the_default_exporters_forms() -> None:
    """The default exporter writes a ReduceMean's axes as an input (opset 18) and allowzero=1
    on every view ([4, -1]): both were given up ("cannot follow it past ..."). Without a 0 in
    the shape allowzero changes nothing, so the batch becomes a 0 that copies it."""
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
             helper.make_node("Reshape", ["m", "s"], ["y"], allowzero=1)]
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([4, -1], np.int64), "s")]
    m = make_model(nodes, [vi("x", [4, 3, 2, 2])], [vi("y", [4, 3])], inits, opset=18)
    out = make_batch_dynamic(m)
    x7 = np.concatenate([x, x[:3]])
    np.testing.assert_allclose(ort_run(out, {"x": x7})[0], x7.mean((2, 3)), rtol=1e-6)


def test_dynamic_batch_reads_axes_the_exporter_computes_from_constants() -> None:
    """The default exporter with optimize=False writes a global average pool's axes as
    Reshape(Constant [-1, -2], shape): convert did not know them, lost the batch axis at the
    ReduceMean and refused torchvision's resnet18 (found by a vision sweep)."""
    w = numpy_helper.from_array(
        np.random.default_rng(2).standard_normal((6, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(
        np.random.default_rng(3).standard_normal((5, 6)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Constant", [], ["ax0"], value=numpy_helper.from_array(
                 np.array([-1, -2], np.int64))),
             helper.make_node("Constant", [], ["two"], value_ints=[2]),
             helper.make_node("Reshape", ["ax0", "two"], ["axes"]),
             helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=1),
             helper.make_node("Constant", [], ["b"], value_ints=[4]),
             helper.make_node("Constant", [], ["f"], value_ints=[6]),
             helper.make_node("Concat", ["b", "f"], ["flat"], axis=0),
             helper.make_node("Reshape", ["m", "flat"], ["v"], allowzero=1),
             helper.make_node("Gemm", ["v", "fc"], ["y"], transB=1)]
    model = make_model(nodes, [vi("x", [4, 3, 8, 8])], [vi("y", [4, 5])], [w, fc], opset=18)
    out = make_batch_dynamic(model)
    x = np.random.default_rng(4).standard_normal((7, 3, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(out.SerializeToString()).run(None, {"x": x})[0]
    c = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(
        numpy_helper.to_array(w)), padding=1)
    want = c.mean((2, 3)).numpy() @ numpy_helper.to_array(fc).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dynamic_batch_names_the_node_that_loses_the_batch_not_a_type_only_reader() -> None:
    """CastLike(0, x) reads x for its type only (the default exporter's zero Conv bias,
    Expand-ed to the weight's shape): the refusal named that Expand as where the batch was
    lost; it names the Reshape that merges the batch."""
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Shape", ["w"], ["ws"], start=0, end=1),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(
                 np.array(0.0, np.float32))),
             helper.make_node("CastLike", ["zero", "x"], ["z"]),
             helper.make_node("Expand", ["z", "ws"], ["bias"]),
             helper.make_node("Conv", ["x", "w", "bias"], ["c"]),
             helper.make_node("Constant", [], ["s"], value_ints=[8, 16]),
             helper.make_node("Reshape", ["c", "s"], ["r"], name="merge"),
             helper.make_node("Constant", [], ["s2"], value_ints=[4, 32]),
             helper.make_node("Reshape", ["r", "s2"], ["y"])]
    model = make_model(nodes, [vi("x", [4, 3, 4, 4])], [vi("y", [4, 32])], [w], opset=18)
    with pytest.raises(ModelError, match="cannot follow it past 'merge' \\(Reshape\\)"):
        make_batch_dynamic(model)


@pytest.mark.parametrize("op,attrs,keeps", [
    ("ReduceMean", {"axes": [-4]}, False), ("ReduceMean", {"axes": [-1, -2]}, True),
    ("Concat", {"axis": -4}, False), ("Concat", {"axis": -3}, True),
    ("Squeeze", {"axes": [-4]}, False), ("Unsqueeze", {"axes": [-5]}, False),
    ("Unsqueeze", {"axes": [-1]}, True)])
def test_dynamic_batch_reads_negative_axes_by_the_inputs_rank(op, attrs, keeps) -> None:
    """Axis -4 of a 4-D value is its batch axis (it counted as another axis)."""
    from trainer.convert import _carries_batch

    node = helper.make_node(op, ["x"], ["y"], **attrs)
    assert _carries_batch(node, {"x"}, {}, 2, {"x": (2, 3, 4, 5)})[0] == keeps


def test_check_names_constant_node_weights_of_a_model_with_initializers(tmp_path) -> None:
    """A float Constant node read as a product's weight in a model that keeps its other weights
    as initializers stays a constant (lift_weights leaves such models alone: their Constants
    are the exporter's own), which nothing said: `check` and `train` now name it with the
    conversion that makes it trainable (values kept), which then trains it. A Constant of one
    repeated value (a normalization's ones) and a bias are not named."""
    import io

    from trainer.cli import main
    from trainer.config import config_from_dict
    from trainer.report import exporter_hints
    from trainer.train import Trainer

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    const = helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(
        rng.standard_normal((16, 4)).astype(np.float32), "w2v"))
    ones = helper.make_node("Constant", [], ["w3"], value=numpy_helper.from_array(
        np.ones((4, 4), np.float32), "w3v"))
    bias = helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(
        rng.standard_normal(4).astype(np.float32), "bv"))
    nodes = [const, ones, bias, helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["p"]),
             helper.make_node("MatMul", ["p", "w3"], ["q"]),
             helper.make_node("Add", ["q", "b"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 4])], [w1])
    onnx.save(m, str(tmp_path / "m.onnx"))
    lines = [line for line in exporter_hints(m) if "Constant" in line]
    assert len(lines) == 1 and lines[0].endswith(": w2"), lines
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 8)).astype(np.float32),
             y=rng.integers(0, 4, 16))
    raw = {"model": "m.onnx", "output": "o.onnx", "device": "cpu", "steps": 1,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                              "targets": {"label": "y"}}, "batch_size": 8},
           "loss": {"type": "cross_entropy", "output": "y", "target": "label"},
           "optimizer": {"type": "sgd", "lr": 0.1}}
    out = io.StringIO()
    t = Trainer(config_from_dict(raw, tmp_path), stream=out)
    assert t.names == ["w1"] and lines[0] in out.getvalue()
    assert main(["convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m2.onnx"),
                 "--trainable-constants"]) == 0
    raw["model"] = "m2.onnx"
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    assert "w2" in t.names and not [line for line in exporter_hints(
        onnx.load(str(tmp_path / "m2.onnx"))) if "Constant" in line]
