"""Models whose exporter stores every weight as a Constant node and writes dynamic axes as -1, as
paddle2onnx does (PaddleOCR's models have no initializer at all): the weights are lifted into
initializers and train by the same rules as any model's, the -1 axes read as symbolic ones, and
the export holds the trained weights, loadable by onnxruntime."""

from __future__ import annotations

import io
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from tests.families import family_config
from trainer.config import config_from_dict
from trainer.graph import lift_weights, load_model, subgraph_weights, unknown_dims_symbolic
from trainer.report import model_report
from trainer.train import Trainer


def paddle_style(src, dst) -> onnx.ModelProto:
    """The model at src with each initializer as a Constant node, and the batch axis of its
    inputs and outputs as -1."""
    m = onnx.load(str(src))
    g = m.graph
    consts = []
    for t in list(g.initializer):
        consts.append(helper.make_node("Constant", [], [t.name], value=t,
                                       name=f"const_{t.name}"))
    names = {t.name for t in g.initializer}
    del g.initializer[:]
    keep = [vi for vi in g.input if vi.name not in names]
    del g.input[:]
    g.input.extend(keep)
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    for vi in list(g.input) + list(g.output):
        vi.type.tensor_type.shape.dim[0].dim_value = -1
    onnx.save(m, str(dst))
    return m


@pytest.mark.parametrize("family", ["bn_cnn_training_form", "resnet_inference"])
def test_constant_node_weights_train_as_initializers(zoo, tmp_path, family):
    """The same job on the model as exported and on its Constant-node form: the same tensors
    trained (BatchNorm running statistics updated as state), the same losses and values, and
    the export holds them as initializers under the Constants' names, with the batch axis
    symbolic; onnxruntime computes with them what the initializer form's export computes."""
    d = tmp_path / "paddle"
    d.mkdir()
    shutil.copy(zoo[family] / "data.npz", d / "data.npz")
    m = paddle_style(zoo[family] / "model.onnx", d / "model.onnx")
    assert not m.graph.initializer
    runs = {}
    for which, folder in (("initializers", zoo[family]), ("constants", d)):
        raw = family_config(folder, family, output=str(tmp_path / f"{which}.onnx"))
        stream = io.StringIO()
        t = Trainer(config_from_dict(raw, tmp_path), stream=stream)
        t.fit()
        runs[which] = (t, [r["loss"] for r in t.history if "loss" in r], stream.getvalue())
    (ti, li, _), (tc, lc, log) = runs["initializers"], runs["constants"]
    assert "float tensor(s) the exporter stored in subgraphs or as Constant nodes are " \
        "initializers of the main graph here" in log
    assert sorted(tc.names) == sorted(ti.names) and sorted(tc.state) == sorted(ti.state)
    np.testing.assert_allclose(lc, li, rtol=1e-12)
    vi, vc = ti.trained_values(), tc.trained_values()
    assert set(vi) == set(vc)
    for k, v in vi.items():
        np.testing.assert_allclose(vc[k], v, rtol=1e-10, atol=1e-12, err_msg=k)
    out = onnx.load(str(tmp_path / "constants.onnx"))
    inits = {t.name for t in out.graph.initializer}
    assert set(vc) <= inits and not any(n.op_type == "Constant" and n.output[0] in inits
                                        for n in out.graph.node)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "unk_dim_0"
    x = np.load(zoo[family] / "data.npz")["x"][:5]
    got = ort.InferenceSession(str(tmp_path / "constants.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = ort.InferenceSession(str(tmp_path / "initializers.onnx"),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_check_lists_constant_node_weights_as_parameters(zoo, tmp_path):
    """`check` on the Constant-node form names the same parameters as on the model itself."""
    paddle_style(zoo["bn_cnn_training_form"] / "model.onnx", tmp_path / "m.onnx")
    want = model_report(load_model(zoo["bn_cnn_training_form"] / "model.onnx"))
    got = model_report(load_model(tmp_path / "m.onnx"))
    roles = {p.name: p.role for p in got.params}
    assert roles == {p.name: p.role for p in want.params}
    assert any(r == "parameter" for r in roles.values())


def test_only_float_constants_of_more_than_one_element_are_lifted():
    """Shape constants (int64), one-element floats (an exporter's epsilons) and Constants in a
    subgraph stay Constant nodes; before IR 4 a lifted tensor is also a graph input; a model
    with float or quantized (int8) weight initializers keeps its Constant nodes (its
    exporter's own constants, or data)."""
    f = onnx.TensorProto.FLOAT
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    eps = numpy_helper.from_array(np.float32(1e-5), "eps")
    shape = numpy_helper.from_array(np.array([2, 2], np.int64), "shape")
    inner = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
            np.ones((2, 2), np.float32), "k")),
         helper.make_node("Add", ["y", "k"], ["z"])], "then", [],
        [helper.make_tensor_value_info("z", f, [2, 2])])
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in (w, eps, shape)]
    nodes += [helper.make_node("MatMul", ["x", "w"], ["xw"]),
              helper.make_node("Add", ["xw", "eps"], ["y0"]),
              helper.make_node("Reshape", ["y0", "shape"], ["y"]),
              helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                  np.array(True), "c")),
              helper.make_node("If", ["c"], ["out"], then_branch=inner, else_branch=inner)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [-1, 2])],
                          [helper.make_tensor_value_info("out", f, [-1, 2])])
    for ir in (8, 3):
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)], ir_version=ir)
        assert lift_weights(m) == ["w"]
        assert [t.name for t in m.graph.initializer] == ["w"]
        assert [n.output[0] for n in m.graph.node if n.op_type == "Constant"] == \
            ["eps", "shape", "c"]
        assert ("w" in [vi.name for vi in m.graph.input]) == (ir < 4)
        assert unknown_dims_symbolic(m) == 2
        assert [d.dim_param for vi in (m.graph.input[0], m.graph.output[0])
                for d in vi.type.tensor_type.shape.dim[:1]] == ["unk_dim_0", "unk_dim_1"]
    for weight in (np.ones((2, 2), np.float32), np.ones((2, 2), np.int8)):  # (int8: quantized)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
        m.graph.initializer.append(numpy_helper.from_array(weight, "other"))
        assert lift_weights(m) == []
        assert len([n for n in m.graph.node if n.op_type == "Constant"]) == 4


def test_constants_written_as_float_lists_or_sparse_tensors_are_lifted(tmp_path):
    """A Constant node may hold its tensor as `value_floats` or `sparse_value`: those stayed
    Constant nodes, untrained (a bias of 8 values, a sparse weight), while `value` ones were
    lifted. Lifted alike, and trained: one SGD step against float64 arithmetic."""
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    W[0, 1] = W[2, 3] = 0.0
    nz = np.flatnonzero(W)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(W.reshape(-1)[nz], "W"),
                                       numpy_helper.from_array(nz.astype(np.int64), "i"), W.shape)
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["W"], sparse_value=sparse),
         helper.make_node("Constant", [], ["b"], value_floats=b.tolist()),
         helper.make_node("Constant", [], ["one"], value_floats=[1.0]),  # (stays a constant)
         helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["xb"]),
         helper.make_node("Mul", ["xb", "one"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, str(tmp_path / "model.onnx"))
    assert lift_weights(onnx.load(str(tmp_path / "model.onnx"))) == ["W", "b"]
    x = rng.standard_normal((6, 3)).astype(np.float32)
    t = rng.standard_normal((6, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, t=t)
    cfg = config_from_dict({
        "model": "model.onnx", "output": "out.onnx", "device": "cpu", "precision": "fp64",
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "t"}},
                 "batch_size": 6, "shuffle": False},
        "loss": {"type": "mse", "output": "y", "target": "t"},
        "optimizer": {"type": "sgd", "lr": 0.1}, "steps": 1}, tmp_path)
    out = Trainer(cfg, stream=io.StringIO()).fit()["output"]
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    x64, W64, b64 = x.astype(np.float64), W.astype(np.float64), b.astype(np.float64)
    e = x64 @ W64 + b64 - t
    np.testing.assert_allclose(got["W"], W64 - 0.1 * 2 * x64.T @ e / e.size, rtol=1e-6)
    np.testing.assert_allclose(got["b"], b64 - 0.1 * 2 * e.sum(0) / e.size, rtol=1e-6)
    ort.InferenceSession(out, providers=["CPUExecutionProvider"])


def _branchy(path, then_w: str, else_w: str, top: bool = False) -> None:
    """y = If(flag, x @ then_w, x @ else_w), each weight an initializer of its branch (or of
    the main graph with `top`), flag a constant true."""
    rng = np.random.default_rng(2)
    f = onnx.TensorProto.FLOAT
    wt = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), then_w)
    we = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), else_w)

    def branch(name, w):
        return helper.make_graph([helper.make_node("MatMul", ["x", w.name], [f"{name}_y"])],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", f,
                                                                          ["N", 3])],
                                 [] if top else [w])
    g = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", wt),
                          else_branch=branch("other", we))], "g",
        [helper.make_tensor_value_info("x", f, ["N", 4])],
        [helper.make_tensor_value_info("y", f, ["N", 3])],
        [numpy_helper.from_array(np.array(True), "flag")] + ([wt, we] if top else []))
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_weights_in_subgraphs_train_as_the_main_graphs(tmp_path):
    """Weights kept as initializers of an If's branches (spox's conversion of silero-vad keeps
    all of them there) are moved to the main graph and train as if they had been there: the
    same losses and values as the model with them at the top, the export holds them at the
    top and onnxruntime runs it. Two branches defining the same name keep theirs, and so does a
    model with weights in its main graph."""
    _branchy(tmp_path / "inner.onnx", "Wt", "We")
    _branchy(tmp_path / "top.onnx", "Wt", "We", top=True)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 4)).astype(np.float32),
             t=rng.standard_normal((32, 3)).astype(np.float32))
    runs = {}
    for name in ("inner", "top"):
        raw = {"model": f"{name}.onnx", "output": f"out_{name}.onnx", "device": "cpu",
               "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                                  "targets": {"t": "t"}}, "batch_size": 8},
               "loss": {"type": "mse", "output": "y", "target": "t"},
               "optimizer": {"type": "adamw", "lr": 0.01}, "steps": 5}
        t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
        t.fit()
        runs[name] = t
    assert runs["inner"].names == ["Wt"]  # (the branch taken)
    np.testing.assert_allclose(runs["inner"].trained_values()["Wt"],
                               runs["top"].trained_values()["Wt"], rtol=1e-6)
    out = onnx.load(str(tmp_path / "out_inner.onnx"))
    assert {t.name for t in out.graph.initializer} >= {"Wt", "We"}
    x = rng.standard_normal((3, 4)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "out_inner.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ runs["inner"].trained_values()["Wt"], rtol=1e-5)
    _branchy(tmp_path / "same.onnx", "W", "W")
    m = onnx.load(str(tmp_path / "same.onnx"))
    assert lift_weights(m) == [] and [t.name for t in m.graph.initializer] == ["flag"]
    # a model with weights in its main graph: its subgraphs' tensors are its own constants
    assert subgraph_weights(m) == ["W"]
    m = onnx.load(str(tmp_path / "inner.onnx"))
    m.graph.initializer.append(numpy_helper.from_array(np.ones((2, 2), np.float32), "main"))
    assert lift_weights(m) == []
    # ... and `check` and `train` say so (they were listed nowhere)
    assert "2 float tensor(s) inside subgraphs (If branches, Loop or Scan bodies) stay " \
        "constant, untrained: We, Wt" in model_report(m).text()
    m.graph.node[0].output[0] = "h"  # (y = If(...) @ main: the main graph's weight is read)
    m.graph.node.append(helper.make_node("MatMul", ["h", "top"], ["y"]))
    m.graph.initializer.append(numpy_helper.from_array(np.eye(3, dtype=np.float32), "top"))
    onnx.save(m, str(tmp_path / "mixed.onnx"))
    log = io.StringIO()
    t = Trainer(config_from_dict(dict(raw, model="mixed.onnx"), tmp_path), stream=log)
    assert t.names == ["top"]
    assert "stay constant, untrained: We, Wt" in log.getvalue()
