"""Model-local ONNX functions (onnxscript's @script functions, jax2onnx's @onnx_function
blocks): inlined at load, as onnxruntime runs them, so the model trains like the same graph
written without functions."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from trainer.config import config_from_dict
from trainer.graph import load_model
from trainer.report import model_report
from trainer.train import Trainer


def _models():
    """(with a local function `this.dense` called twice, the same graph written out)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (4, 5)), ("B1", (5,)), ("W2", (5, 3)), ("B2", (3,)))]
    body = [helper.make_node("MatMul", ["x", "w"], ["t"]),
            helper.make_node("Add", ["t", "b"], ["s"]), helper.make_node("Tanh", ["s"], ["y"])]
    fn = helper.make_function("this", "dense", ["x", "w", "b"], ["y"], body,
                              opset_imports=[helper.make_opsetid("", 18)])
    io_ = ([helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
           [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])])
    calls = [helper.make_node("dense", ["X", "W1", "B1"], ["H"], domain="this", name="d1"),
             helper.make_node("dense", ["H", "W2", "B2"], ["Y"], domain="this", name="d2")]
    with_fn = helper.make_model(helper.make_graph(calls, "g", *io_, inits), functions=[fn],
                                opset_imports=[helper.make_opsetid("", 18),
                                               helper.make_opsetid("this", 1)])
    plain = []
    for x, w, b, y in (("X", "W1", "B1", "H"), ("H", "W2", "B2", "Y")):
        plain += [helper.make_node("MatMul", [x, w], [y + "t"]),
                  helper.make_node("Add", [y + "t", b], [y + "s"]),
                  helper.make_node("Tanh", [y + "s"], [y])]
    written = helper.make_model(helper.make_graph(plain, "g", *io_, inits),
                                opset_imports=[helper.make_opsetid("", 18)])
    return with_fn, written


def _train(tmp_path, model):
    onnx.save(model, str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((12, 4)).astype(np.float32),
             y=rng.integers(0, 3, 12))
    cfg = config_from_dict({
        "model": "m.onnx", "output": "out.onnx", "device": "cpu", "steps": 4,
        "data": {"train": {"path": "d.npz", "inputs": {"X": "x"}, "targets": {"t": "y"}},
                 "batch_size": 3, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "Y", "target": "t"},
        "optimizer": {"type": "adamw", "lr": 0.01}, "log": {"every_steps": 1}}, tmp_path)
    t = Trainer(cfg, stream=io.StringIO())
    return t, t.fit()


def test_a_model_with_local_functions_trains_like_the_graph_written_out(tmp_path):
    """It was refused ("no forward kernel: dense"); onnxruntime runs it, and onnxscript and
    jax2onnx write such models."""
    with_fn, written = _models()
    onnx.checker.check_model(with_fn, full_check=True)
    onnx.save(with_fn, str(tmp_path / "fn.onnx"))
    report = model_report(load_model(tmp_path / "fn.onnx"))
    assert report.ok and sorted(p.name for p in report.params if p.role == "parameter") == \
        ["B1", "B2", "W1", "W2"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ta, ra = _train(tmp_path / "a", with_fn)
    tb, rb = _train(tmp_path / "b", written)
    assert [r["loss"] for r in ta.history if "loss" in r] == \
        [r["loss"] for r in tb.history if "loss" in r]
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    got = ort.InferenceSession(ra["output"]).run(None, {"X": x})[0]
    want = ort.InferenceSession(rb["output"]).run(None, {"X": x})[0]
    np.testing.assert_array_equal(got, want)
