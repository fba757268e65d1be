"""GPU readiness: the same kernels and training steps on CuPy match NumPy (needs a CUDA GPU)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trainer.backend import cupy_or_none
from trainer.config import config_from_dict
from trainer.train import Trainer

cp = cupy_or_none()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(cp is None, reason="needs CuPy and a CUDA device")]


@pytest.mark.parametrize("optimizer", [{"type": "sgd", "lr": 0.1, "momentum": 0.9},
                                       {"type": "adamw", "lr": 3e-3}])
def test_mlp_training_matches_cpu(tmp_path, digits_config, optimizer):
    runs = {}
    for device in ("cpu", "gpu"):
        cfg = config_from_dict(digits_config(device=device, steps=20, optimizer=optimizer,
                                             output=str(tmp_path / f"{device}.onnx")), tmp_path)
        t = Trainer(cfg, stream=io.StringIO())
        result = t.fit()
        runs[device] = (t.trained_values(), [r["loss"] for r in t.history if "loss" in r],
                        result)
    (wc, lc, rc), (wg, lg, rg) = runs["cpu"], runs["gpu"]
    np.testing.assert_allclose(lg, lc, rtol=1e-4)
    for k in wc:
        np.testing.assert_allclose(wg[k], wc[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert abs(rg["eval_accuracy"] - rc["eval_accuracy"]) <= 0.01


def small_cnn() -> onnx.ModelProto:
    """Conv-BN-Relu-MaxPool-Conv-Relu-AveragePool-Flatten-Gemm on 1x16x16, built by hand."""
    rng = np.random.default_rng(0)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)
    inits = [init("c1.w", 6, 1, 5, 5), init("bn.s", 6), init("bn.b", 6), init("bn.m", 6),
             numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype(np.float32), "bn.v"),
             init("c2.w", 16, 6, 5, 5, scale=0.1), init("c2.b", 16),
             init("fc.w", 10, 64, scale=0.1), init("fc.b", 10)]
    nodes = [helper.make_node("Conv", ["x", "c1.w"], ["a"], pads=[2, 2, 2, 2]),
             helper.make_node("BatchNormalization", ["a", "bn.s", "bn.b", "bn.m", "bn.v"],
                              ["b"]),
             helper.make_node("Relu", ["b"], ["c"]),
             helper.make_node("MaxPool", ["c"], ["d"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["d", "c2.w", "c2.b"], ["e"]),
             helper.make_node("Relu", ["e"], ["f"]),
             helper.make_node("AveragePool", ["f"], ["g"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["g"], ["h"]),
             helper.make_node("Gemm", ["h", "fc.w", "fc.b"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_cnn_training_graph_matches_cpu():
    from trainer.autodiff import build_training_graph, training_info
    from trainer.executor import Executor

    model = small_cnn()
    tm = build_training_graph(model, {"type": "cross_entropy", "output": "logits",
                                      "target": "label"}, batch_size=8)
    info = training_info(tm)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    fetch = [info.loss] + list(info.gradients.values())
    ref = Executor(tm, np, fetch=fetch).run({"x": x, "label": y})
    out = Executor(tm, cp, fetch=fetch).run({"x": cp.asarray(x), "label": cp.asarray(y)})
    for k in fetch:
        np.testing.assert_allclose(cp.asnumpy(out[k]), ref[k], rtol=2e-3, atol=1e-5,
                                   err_msg=k)
