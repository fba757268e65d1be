"""trainer.autodiff.reverse: the public reverse-mode API, against PyTorch autograd, onnxruntime,
and finite differences over the float cases of ONNX's node suite."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests import reverse_suite
from trainer.autodiff import reverse
from trainer.errors import ModelError
from trainer.executor import Executor

# Of all the float cases (the bar); of those with a finite-difference reference (the
# rest sit on a kink, a tie or a jump of the function at the case's input, where no derivative
# exists to compare with) the test asks 99%.
SUITE_BAR = 0.95


def _model():
    """h = tanh(x @ W + b); y1 = sum(h * h, axis 1); y2 = h * y1[:, None] (y1 is both an output
    and an input of a later node); u is an input that reaches nothing."""
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["pre"]),
             helper.make_node("Tanh", ["pre"], ["h"]),
             helper.make_node("Mul", ["h", "h"], ["hh"]),
             helper.make_node("ReduceSum", ["hh", "axes"], ["y1"], keepdims=0),
             helper.make_node("Unsqueeze", ["y1", "axes"], ["y1c"]),
             helper.make_node("Mul", ["h", "y1c"], ["y2"]),
             helper.make_node("Identity", ["u"], ["u_out"])]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 4]),
         helper.make_tensor_value_info("u", TensorProto.DOUBLE, [2])],
        [helper.make_tensor_value_info("y1", TensorProto.DOUBLE, ["N"]),
         helper.make_tensor_value_info("y2", TensorProto.DOUBLE, ["N", 3]),
         helper.make_tensor_value_info("u_out", TensorProto.DOUBLE, [2])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), W, b


def _torch_vjp(x, W, b, g1, g2):
    xt, Wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, W, b))
    h = torch.tanh(xt @ Wt + bt)
    y1 = (h * h).sum(1)
    y2 = h * y1[:, None]
    torch.autograd.backward([y1, y2], [torch.tensor(g1), torch.tensor(g2)])
    return {"x": xt.grad.numpy(), "W": Wt.grad.numpy(), "b": bt.grad.numpy()}


def test_reverse_matches_torch_autograd_and_onnxruntime():
    model, W, b = _model()
    rm = reverse(model, ["x", "W", "b", "u"], ["y1", "y2"], batch_size=5)
    onnx.checker.check_model(rm)
    names_in = [vi.name for vi in rm.graph.input]
    names_out = [vi.name for vi in rm.graph.output]
    assert names_in == ["x", "u", "y1_grad", "y2_grad"]
    assert names_out == ["y1", "y2", "u_out", "x_grad", "W_grad", "b_grad", "u_grad"]
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in rm.graph.input}
    assert shapes["y1_grad"] == [5] and shapes["y2_grad"] == [5, 3]
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((5, 4)), "u": rng.standard_normal(2),
             "y1_grad": rng.standard_normal(5), "y2_grad": rng.standard_normal((5, 3))}
    ours = Executor(rm, np).run(feeds)
    want = _torch_vjp(feeds["x"], W, b, feeds["y1_grad"], feeds["y2_grad"])
    for k, v in want.items():
        np.testing.assert_allclose(ours[f"{k}_grad"], v, rtol=1e-12, atol=1e-12, err_msg=k)
    np.testing.assert_array_equal(ours["u_grad"], np.zeros(2))  # u reaches neither output
    sess = ort.InferenceSession(rm.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip(names_out, sess.run(None, feeds), strict=True))
    for k in want:
        np.testing.assert_allclose(got[f"{k}_grad"], ours[f"{k}_grad"], rtol=1e-12)


def test_reverse_of_one_output_only():
    model, W, b = _model()
    rm = reverse(model, ["W"], ["y1"], batch_size=2)
    rng = np.random.default_rng(2)
    x, g1 = rng.standard_normal((2, 4)), rng.standard_normal(2)
    got = Executor(rm, np).run({"x": x, "u": np.zeros(2), "y1_grad": g1})["W_grad"]
    want = _torch_vjp(x, W, b, g1, np.zeros((2, 3)))["W"]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # (names as strings: iterated, they were their characters, "'y' is not an output")
    assert reverse(model, "W", "y1", batch_size=2) == rm


@pytest.mark.parametrize("wrt,of,match", [
    (["x"], ["h"], "not an output"),
    (["nowhere"], ["y1"], "neither a graph input nor an initializer"),
    (["axes"], ["y1"], "not a float tensor")])
def test_reverse_errors(wrt, of, match):
    model, _, _ = _model()
    with pytest.raises(ModelError, match=match):
        reverse(model, wrt, of, batch_size=2)


def test_reverse_needs_concrete_shapes():
    model, _, _ = _model()
    with pytest.raises(ModelError, match="symbolic batch dimension"):
        reverse(model, ["x"], ["y1"])


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (6, 2)], ids=str)
def test_batchnorm_in_training_form_matches_torch(shape):
    """BatchNormalization(training_mode=1), as models exported in training form have it:
    the gradient goes through the batch statistics (torch's batch_norm with training=True)."""
    rng = np.random.default_rng(5)
    c = shape[1]
    x, s, b = rng.standard_normal(shape), rng.standard_normal(c), rng.standard_normal(c)
    stats = [numpy_helper.from_array(rng.standard_normal(c), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c), "var")]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "mean", "var"],
                            ["y", "rm", "rv"], epsilon=1e-3, training_mode=1)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.DOUBLE, v)
                                        for n, v in (("x", shape), ("s", [c]), ("b", [c]))],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, shape)], stats)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    rm = reverse(model, ["x", "s", "b"], ["y"])
    dy = rng.standard_normal(shape)
    got = Executor(rm, np).run({"x": x, "s": s, "b": b, "y_grad": dy})
    xt, st, bt = (torch.tensor(a, requires_grad=True) for a in (x, s, b))
    torch.nn.functional.batch_norm(xt, None, None, st, bt, training=True, eps=1e-3).backward(
        torch.tensor(dy))
    for name, t in (("x", xt), ("s", st), ("b", bt)):
        np.testing.assert_allclose(got[f"{name}_grad"], t.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (6, 2)], ids=str)
def test_batchnorm_running_statistics_outputs_carry_gradients(shape):
    """The running-statistic outputs of training-mode BatchNormalization are functions of x
    (through the batch mean and biased variance) and of the input statistics."""
    rng = np.random.default_rng(6)
    c, mom = shape[1], 0.8
    vals = {"x": rng.standard_normal(shape), "s": rng.standard_normal(c),
            "b": rng.standard_normal(c), "mean": rng.standard_normal(c),
            "var": rng.uniform(0.5, 2, c)}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "mean", "var"],
                            ["y", "rm", "rv"], epsilon=1e-3, momentum=mom, training_mode=1)
    vi = helper.make_tensor_value_info
    g = helper.make_graph([node], "g", [vi(k, TensorProto.DOUBLE, v.shape)
                                        for k, v in vals.items()],
                          [vi("y", TensorProto.DOUBLE, shape), vi("rm", TensorProto.DOUBLE, [c]),
                           vi("rv", TensorProto.DOUBLE, [c])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    rm = reverse(model, list(vals), ["y", "rm", "rv"])
    adj = {"y": rng.standard_normal(shape), "rm": rng.standard_normal(c),
           "rv": rng.standard_normal(c)}
    got = Executor(rm, np).run({**vals, **{f"{k}_grad": v for k, v in adj.items()}})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in vals.items()}
    axes = [0, *range(2, len(shape))]
    y = torch.nn.functional.batch_norm(t["x"], None, None, t["s"], t["b"], training=True,
                                       eps=1e-3)
    r_mean = mom * t["mean"] + (1 - mom) * t["x"].mean(axes)
    r_var = mom * t["var"] + (1 - mom) * t["x"].var(axes, unbiased=False)
    total = sum((o * torch.tensor(adj[k])).sum() for k, o in (("y", y), ("rm", r_mean),
                                                               ("rv", r_var)))
    total.backward()
    for k, v in t.items():
        np.testing.assert_allclose(got[f"{k}_grad"], v.grad.numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=k)


def test_safe_softmax_over_a_fully_masked_row_has_finite_gradients():
    # Softmax of a row of -inf is NaN; Where puts 0 there (ONNX's Attention body does this).
    # The row's output does not depend on x, so its gradient is 0 and the others are finite.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4))
    bias = np.zeros((3, 4))
    bias[1] = -np.inf
    masked = np.array([[False], [True], [False]])
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Add", ["x", "bias"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("Where", ["masked", "zero", "p"], ["y"])]
    g = helper.make_graph(nodes, "g", [vi("x", TensorProto.DOUBLE, [3, 4])],
                          [vi("y", TensorProto.DOUBLE, [3, 4])],
                          [numpy_helper.from_array(bias, "bias"),
                           numpy_helper.from_array(masked, "masked"),
                           numpy_helper.from_array(np.array(0.0), "zero")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    dy = rng.standard_normal((3, 4))
    got = Executor(reverse(model, ["x"], ["y"]), np).run({"x": x, "y_grad": dy})["x_grad"]
    keep = [0, 2]
    xt = torch.tensor(x[keep], requires_grad=True)
    torch.softmax(xt, -1).backward(torch.tensor(dy[keep]))
    np.testing.assert_allclose(got[keep], xt.grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(got[1], np.zeros(4))


def test_onnx_node_suite_float_cases_agree_with_finite_differences():
    results = reverse_suite.run_all()
    passed, total, defined = reverse_suite.counts(results)
    print("\n" + reverse_suite.summary(results))
    assert total >= 1100, "the float cases were not collected"
    assert defined >= 0.95 * total, "too many cases without a finite-difference reference"
    assert passed / defined >= 0.995, reverse_suite.summary(results, verbose=True)
    assert passed / total >= SUITE_BAR, reverse_suite.summary(results, verbose=True)


def test_reverse_at_old_opsets():
    """Opset 8: an input that reaches no output gets zeros without ConstantOfShape (opset 9);
    opset 9: an LSTM is converted to opset 11 for its gradient rule, as training does, and its
    vector-Jacobian product agrees with onnxruntime's run of the result."""
    f = np.arange(6.0).reshape(2, 3)
    g = helper.make_graph(
        [helper.make_node("Floor", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    m.ir_version = 3
    r = reverse(m, ["x"], ["y"])
    out = Executor(r).run({"x": f, "y_grad": np.ones_like(f)})
    np.testing.assert_array_equal(out["x_grad"], np.zeros_like(f))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    got = ort.InferenceSession(r.SerializeToString(), so).run(["x_grad"], {
        "x": f, "y_grad": np.ones_like(f)})[0]
    np.testing.assert_array_equal(got, np.zeros_like(f))

    rng = np.random.default_rng(0)
    w = {k: (0.5 * rng.standard_normal(s)).astype(np.float32)
         for k, s in (("W", (1, 12, 4)), ("R", (1, 12, 3)), ("B", (1, 24)))}
    g = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Yh"], hidden_size=3)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 4])],
        [helper.make_tensor_value_info("Yh", TensorProto.FLOAT, [1, 2, 3])],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 7
    r = reverse(m, ["W"], ["Yh"])
    feeds = {"x": rng.standard_normal((3, 2, 4)).astype(np.float32),
             "Yh_grad": rng.standard_normal((1, 2, 3)).astype(np.float32)}
    ours = Executor(r).run(feeds)["W_grad"]
    theirs = ort.InferenceSession(r.SerializeToString(), so).run(["W_grad"], feeds)[0]
    assert ours.shape == (1, 12, 4) and np.abs(ours).max() > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
