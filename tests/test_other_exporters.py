"""Models as exporters other than PyTorch's write them: model-local ONNX functions
(onnxscript's @script functions, jax2onnx's @onnx_function blocks), inlined at load as
onnxruntime runs them, so the model trains like the same graph written without functions; the
one-element bias of a one-output layer under a name that is not PyTorch's (jax2onnx's
`const_3`, skl2onnx's `intercepts1`), trained as the framework trains it."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
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


def _trainer(tmp_path, x_input: str, output: str, loss: str, optimizer: dict, steps: int,
             batch: int = 3, target: str = "y", **over) -> Trainer:
    """A Trainer for m.onnx and d.npz (x, and `target`) in tmp_path: the batches in order, every
    step's loss logged."""
    train = {"path": "d.npz", "inputs": {x_input: "x"}, "targets": {"t": target}}
    return Trainer(config_from_dict({
        "model": "m.onnx", "output": "out.onnx", "device": "cpu", "steps": steps,
        "data": {"train": train, "batch_size": batch, "shuffle": False},
        "loss": {"type": loss, "output": output, "target": "t"}, "optimizer": optimizer,
        "log": {"every_steps": 1}, **over}, tmp_path), stream=io.StringIO())


def _train(tmp_path, model):
    onnx.save(model, str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((12, 4)).astype(np.float32),
             y=rng.integers(0, 3, 12))
    t = _trainer(tmp_path, "X", "Y", "cross_entropy", {"type": "adamw", "lr": 0.01}, 4)
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


def _one_output(kind: str) -> onnx.ModelProto:
    """y = x @ W + c with W [4, 1] and c of one element, as jax2onnx (Gemm, c [1]) and skl2onnx
    (MatMul then Add, c [1, 1]) write a layer with one output feature."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 1)).astype(np.float32)
    if kind == "gemm-transB":
        w = w.T.copy()
    inits = [numpy_helper.from_array(w, "const_0"),
             numpy_helper.from_array(np.full((1, 1) if kind == "matmul-add" else (1,), 0.3,
                                             np.float32), "const_1")]
    if kind == "matmul-add":
        nodes = [helper.make_node("MatMul", ["x", "const_0"], ["h"]),
                 helper.make_node("Add", ["h", "const_1"], ["y"])]
    else:
        nodes = [helper.make_node("Gemm", ["x", "const_0", "const_1"], ["y"],
                                  transB=int(kind == "gemm-transB"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                       ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["gemm", "gemm-transB", "matmul-add"])
def test_the_bias_of_a_one_output_layer_trains_whatever_its_name(tmp_path, kind):
    """It was left out as a one-element constant (an epsilon's rule): jax2onnx's Linear(16, 1)
    trained 3 of 4 tensors, 2.6e-2 from Flax's losses after 4 steps. Losses as PyTorch's
    Linear(4, 1) under SGD with MSE."""
    import torch

    model = _one_output(kind)
    onnx.save(model, str(tmp_path / "m.onnx"))
    report = model_report(load_model(tmp_path / "m.onnx"))
    assert sorted(p.name for p in report.params if p.role == "parameter") == \
        ["const_0", "const_1"]
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((12, 4)).astype(np.float32), rng.standard_normal((12, 1))
    np.savez(tmp_path / "d.npz", x=x, y=y.astype(np.float32))
    t = _trainer(tmp_path, "x", "y", "mse", {"type": "sgd", "lr": 0.1}, 4)
    t.fit()
    lin = torch.nn.Linear(4, 1)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w.T.copy() if kind != "gemm-transB" else w))
        lin.bias.fill_(0.3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    want = []
    for k in range(4):
        loss = torch.nn.functional.mse_loss(lin(torch.from_numpy(x[3 * k:3 * k + 3])),
                                            torch.from_numpy(y[3 * k:3 * k + 3]).float())
        want.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_allclose([r["loss"] for r in t.history if "loss" in r], want, rtol=1e-5)


def test_a_one_element_constant_elsewhere_stays_a_constant():
    """Added to a product of more than one column, or of rank 0 (jax2onnx's zero C of a Gemm
    without a bias): still the one-element rule's constant."""
    model = _one_output("matmul-add")
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.ones((4, 3), np.float32), "const_0"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                 ["N", 3]))
    assert [p.role for p in model_report(model).params if p.name == "const_1"] == ["constant"]
    model = _one_output("gemm")
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.array(0.0, np.float32),
                                                                "const_1"))
    assert [p.role for p in model_report(model).params if p.name == "const_1"] == ["constant"]


def test_cross_entropy_on_binary_probabilities_is_the_log_loss(tmp_path):
    """skl2onnx's binary MLPClassifier writes probabilities = Concat(1 - Sigmoid(z),
    Sigmoid(z)): cross entropy was softmax cross entropy over the probabilities themselves
    (0.692 where the log loss was 0.698, gradients 57% off). The loss is -mean log p[y], in
    training and in evaluation, with the gradient of float64 finite differences."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 1)).astype(np.float32).astype(np.float64)
    inits = [numpy_helper.from_array(w.astype(np.float32), "coefficient1"),
             numpy_helper.from_array(np.array([[0.2]], np.float32), "intercepts1"),
             numpy_helper.from_array(np.array(1.0, np.float32), "unity")]
    nodes = [helper.make_node("MatMul", ["x", "coefficient1"], ["m"]),
             helper.make_node("Add", ["m", "intercepts1"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["p1"]),
             helper.make_node("Sub", ["unity", "p1"], ["p0"]),
             helper.make_node("Concat", ["p0", "p1"], ["probabilities"], axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 4])], [helper.make_tensor_value_info(
            "probabilities", TensorProto.FLOAT, ["N", 2])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    x = rng.standard_normal((6, 4)).astype(np.float32).astype(np.float64)
    y = rng.integers(0, 2, 6)
    np.savez(tmp_path / "d.npz", x=x.astype(np.float32), y=y)
    t = _trainer(tmp_path, "x", "probabilities", "cross_entropy", {"type": "sgd", "lr": 0.5},
                 1, batch=6, precision="fp64")
    before = t.evaluate(t.train_arrays)["eval_loss"]

    def log_loss(w_, b_):
        p = 1 / (1 + np.exp(-(x @ w_ + np.float32(b_))))[:, 0]
        return -np.mean(np.log(np.where(y == 1, p, 1 - p)))
    assert before == pytest.approx(log_loss(w, 0.2), rel=1e-6)
    t.fit()
    assert [r["loss"] for r in t.history if "loss" in r][0] == pytest.approx(log_loss(w, 0.2),
                                                                            rel=1e-9)
    eps, grad = 1e-6, np.zeros(4)
    for i in range(4):
        d = np.zeros((4, 1))
        d[i] = eps
        grad[i] = (log_loss(w + d, 0.2) - log_loss(w - d, 0.2)) / (2 * eps)
    np.testing.assert_allclose(t.params["coefficient1"].reshape(-1), (w[:, 0] - 0.5 * grad),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("producer", ["jax2onnx", "pytorch"])
def test_the_running_variance_follows_the_exporting_framework(tmp_path, producer):
    """BatchNormalization's running variance moves toward the biased batch variance for the
    frameworks that do so (the ONNX specification's training mode, as onnx.reference computes
    it; Flax, Keras, Paddle), and toward the unbiased one for PyTorch's exports."""
    from onnx.reference import ReferenceEvaluator

    c = 4
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             [("s", np.ones(c)), ("b", np.zeros(c)), ("rm", np.zeros(c)), ("rv", np.ones(c))]]
    x_vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 2, 2])

    def bn(outputs, **kw):
        vis = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", c, 2, 2] if n == "y"
                                             else [c]) for n in outputs]
        g = helper.make_graph([helper.make_node("BatchNormalization", ["x", "s", "b", "rm", "rv"],
                                                outputs, momentum=0.9, epsilon=1e-5, **kw)],
                              "g", [x_vi], vis, inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)],
                                 producer_name=producer)
    onnx.save(bn(["y"]), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((3, c, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, t=np.zeros_like(x))
    t = _trainer(tmp_path, "x", "y", "mse", {"type": "sgd", "lr": 1e-3}, 1, target="t")
    out = onnx.load(t.fit()["output"])
    got = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}["rv"]
    n = x.size // c
    var = x.astype(np.float64).var(axis=(0, 2, 3))
    if producer == "pytorch":
        np.testing.assert_allclose(got, 0.9 + 0.1 * var * n / (n - 1), rtol=1e-6)
    else:
        spec = ReferenceEvaluator(bn(["y", "orm", "orv"], training_mode=1)).run(None, {"x": x})[2]
        np.testing.assert_allclose(got, spec, rtol=1e-6)
        np.testing.assert_allclose(got, 0.9 + 0.1 * var, rtol=1e-6)


def test_a_function_the_inliner_leaves_is_named(tmp_path):
    """jax2onnx's @onnx_function blocks import their own domain at another version than the
    model does, and onnx's inliner leaves their calls: refused at load, naming each call."""
    import onnx.inliner

    from trainer.errors import ModelError

    with_fn, _ = _models()
    fn = with_fn.functions[0]
    fn.opset_import.append(helper.make_opsetid("this", 23))  # (as jax2onnx writes it)
    onnx.save(with_fn, str(tmp_path / "m.onnx"))
    assert onnx.inliner.inline_local_functions(with_fn).functions  # (left by the inliner)
    with pytest.raises(ModelError, match=r"2 node\(s\) call functions .*dense \(this, node "
                                          r"'d1'\).*inlined"):
        load_model(tmp_path / "m.onnx")


def test_a_functions_attribute_default_is_kept_when_inlined():
    """onnxscript writes a Python default argument as the function's attribute default
    (`attribute_proto`), and a call without it takes it; onnx's inliner dropped it, so the body's
    `LeakyRelu(alpha=@alpha)` ran at LeakyRelu's own 0.01 instead of 0.1, in training and the
    export (found by an export sweep). As onnxruntime computes the model; in a called If branch
    and a function called by another too."""
    import onnxruntime as ort

    from trainer.executor import Executor
    from trainer.graph import inline_functions

    alpha = helper.make_attribute_ref("alpha", onnx.AttributeProto.FLOAT)
    leaky = helper.make_node("LeakyRelu", ["x"], ["y"])
    leaky.attribute.append(alpha)
    fn = helper.make_function("this", "act", ["x"], ["y"], [leaky],
                              opset_imports=[helper.make_opsetid("", 18)])
    fn.attribute_proto.append(helper.make_attribute("alpha", 0.1))
    outer = helper.make_function("this", "twice", ["x"], ["y"],
                                 [helper.make_node("act", ["x"], ["t"], domain="this"),
                                  helper.make_node("act", ["t"], ["y"], domain="this",
                                                   alpha=0.5)],
                                 opset_imports=[helper.make_opsetid("", 18),
                                                helper.make_opsetid("this", 1)])
    branch = helper.make_graph([helper.make_node("act", ["X"], ["b"], domain="this")], "then",
                               [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])])
    nodes = [helper.make_node("twice", ["X"], ["A"], domain="this"),
             helper.make_node("If", ["c"], ["B"], then_branch=branch, else_branch=branch),
             helper.make_node("Add", ["A", "B"], ["Y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                     [4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4])],
                          [numpy_helper.from_array(np.array(True), "c")])
    model = helper.make_model(g, functions=[fn, outer], opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("this", 1)])
    x = np.array([-2.0, -1.0, 0.5, 3.0], np.float32)
    want = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    np.testing.assert_allclose(want, np.where(x < 0, x * 0.05, x) + np.where(x < 0, x * 0.1, x),
                               rtol=1e-6)
    got = Executor(inline_functions(model), np).run({"X": x})["Y"]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_torchscript_one_element_parameters_are_warned_of():
    """A TorchScript export keeps a one-element nn.Parameter (a ReZero gate `alpha`, a learned
    temperature) under its own name, where the tensors it folds are `onnx::<op>_<n>`: the
    one-element rule leaves it out as a constant, and check and train now say so, with what
    trains it (they said nothing; found by an exporter sweep)."""
    from trainer.report import SCALAR_HINT, exporter_findings, warning_lines

    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "alpha"], ["a"]),
         helper.make_node("Mul", ["a", "onnx::Mul_7"], ["b"]),
         helper.make_node("Add", ["b", "fc.bias"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.array([0.5], np.float32), "alpha"),
         numpy_helper.from_array(np.array(2.0, np.float32), "onnx::Mul_7"),
         numpy_helper.from_array(np.array([0.0], np.float32), "fc.bias")])
    g.node.append(helper.make_node("Div", ["y", "val_12"], ["z"]))
    g.initializer.append(numpy_helper.from_array(np.array(8.0, np.float32), "val_12"))
    model = helper.make_model(g, producer_name="pytorch")
    # (val_<n>: a constant of the default exporter below opset 18, no parameter)
    assert f"WARNING: {SCALAR_HINT}: alpha" in warning_lines(*exporter_findings(model))
    model.producer_name = "tf2onnx"  # (other exporters' names say nothing of the kind)
    assert not any(SCALAR_HINT in w for w in warning_lines(*exporter_findings(model)))


def _frozen_run(tmp_path, frozen, steps, **arrays):
    """Train m.onnx in tmp_path with these `frozen` globs (SGD, batch 4) on `arrays` (the
    inputs by name, the label `y`); the finished Trainer."""
    np.savez(tmp_path / "d.npz", **arrays)
    raw = {"model": str(tmp_path / "m.onnx"), "output": str(tmp_path / "o.onnx"),
           "device": "cpu", "frozen": frozen, "steps": steps,
           "data": {"train": {"path": str(tmp_path / "d.npz"),
                              "inputs": {k: k for k in arrays if k != "y"},
                              "targets": {"label": "y"}}, "batch_size": 4},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
           "optimizer": {"type": "sgd", "lr": 0.5}}
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    t.fit()
    return t


def test_torchscript_folded_linear_weights_are_named_by_their_module(tmp_path):
    """TorchScript folds a Linear's weight on a 3-D input into its transpose,
    `onnx::MatMul_<n>`, with no record of the parameter: `frozen: ["0.*"]` froze layer 0's
    bias and trained its weight, in silence (found by a transformers sweep: BERT's
    layer-0 matrices trained under a frozen layer). The MatMul's module path names it."""
    import warnings

    import torch

    class Net(torch.nn.Module):  # (a called container: scoped '/seq/seq.0/MatMul')
        def __init__(self):
            super().__init__()
            self.seq = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
            self.out = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.seq(x))

    torch.manual_seed(0)
    m = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m.eval(), (torch.randn(2, 5, 4),), str(tmp_path / "m.onnx"),
                          dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}}, opset_version=17)
    model = onnx.load(tmp_path / "m.onnx")
    folded = sorted(t.name for t in model.graph.initializer if t.name.startswith("onnx::"))
    assert len(folded) == 2
    assert f"{folded[0]} = seq.0.weight, {folded[1]} = out.weight" in \
        model_report(model).text()
    rng = np.random.default_rng(0)
    t = _frozen_run(tmp_path, ["seq.0.*"], 3, x=rng.standard_normal((16, 5, 4)).astype(
        np.float32), y=rng.integers(0, 3, (16, 5)))
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = t.trained_values()
    assert sorted(t.names) == [folded[1], "out.bias"]
    assert not np.array_equal(after[folded[1]], before[folded[1]])


def test_a_torchscript_attentions_folded_projection_is_its_in_proj_weight():
    """A MultiheadAttention's packed projection, folded into `onnx::MatMul_<n>`, was named
    `att.weight`, no PyTorch parameter, and `att.in_proj_weight` refused (found by a CLI
    sweep): beside in_proj_bias it is the module's in_proj_weight."""
    import warnings

    import torch

    from trainer.autodiff.params import torchscript_folded_weights

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.att = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.h = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.h(self.att(x, x, x, need_weights=False)[0].mean(1))

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(2, 5, 16),), buf, dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}})
    model = onnx.load_from_string(buf.getvalue())
    assert list(torchscript_folded_weights(model).values()) == ["att.in_proj_weight"]


@pytest.mark.parametrize("kdim", [None, 6, "kv"])
@pytest.mark.parametrize("fresh", [True, False])
def test_a_torchscript_cross_attentions_projections_and_biases_are_its_parameters(
        tmp_path, kdim, fresh):
    """A MultiheadAttention over separate query, key and value exports as three MatMuls on
    folded slices of in_proj_weight (q/k/v_proj_weight where kdim differs) and three Adds of
    in_proj_bias's slices, `onnx::Add_<n>` (a fresh model's zero slices stored once with
    out_proj's zero bias): `frozen: ["att.*"]` froze the projections and trained the bias
    slices, in silence, and `frozen: ["att.in_proj_bias"]` matched nothing."""
    import warnings

    import torch

    from trainer.autodiff.params import repair_exported_model, torchscript_folded_weights

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            d = kdim if kdim != "kv" else None
            self.att = torch.nn.MultiheadAttention(8, 2, batch_first=True, kdim=d, vdim=d)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x, k, v):  # ("kv": a key that is the value, whose projection packs
            # k's and v's: two folded slices)
            return self.fc(self.att(x, k, k if kdim == "kv" else v, need_weights=False)[0]
                           .mean(1))

    torch.manual_seed(0)
    m = Net()
    if not fresh:
        with torch.no_grad():
            m.att.in_proj_bias.normal_()
            m.att.out_proj.bias.normal_()
    e = kdim if kdim == 6 else 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (key is value: at a fixed batch the exporter folds the packed projection's slices)
        n = 4 if kdim == "kv" else 2
        torch.onnx.export(m.eval(), (torch.randn(n, 3, 8), torch.randn(n, 5, e),
                                     torch.randn(n, 5, e)), str(tmp_path / "m.onnx"),
                          dynamo=False, input_names=["x", "k", "v"], output_names=["logits"],
                          dynamic_axes=None if kdim == "kv" else
                          {k: {0: "N"} for k in ("x", "k", "v")})
    model = load_model(tmp_path / "m.onnx")
    repair_exported_model(model)
    leaves = sorted(torchscript_folded_weights(model).values())
    weights = ["att.k_proj_weight", "att.q_proj_weight", "att.v_proj_weight"] if kdim == 6 \
        else ["att.in_proj_weight"] * (2 if kdim == "kv" else 3)
    assert leaves == ["att.in_proj_bias"] * (2 if kdim == "kv" else 3) + weights
    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((8, 3, 8)).astype(np.float32),
              "k": rng.standard_normal((8, 5, e)).astype(np.float32),
              "v": rng.standard_normal((8, 5, e)).astype(np.float32), "y": rng.integers(0, 3, 8)}
    if kdim == "kv":  # (not read: not an input of the model)
        del arrays["v"]
    assert sorted(_frozen_run(tmp_path, ["att.*"], 1, **arrays).names) == ["fc.bias",
                                                                         "fc.weight"]
    t = _frozen_run(tmp_path, ["att.in_proj_bias"], 1, **arrays)
    assert len(t.names) == (6 if kdim == "kv" else 7)
    assert not any(n.startswith("onnx::Add_") for n in t.names)
    assert "WARNING: tensors that TorchScript" not in model_report(model).text()


def test_a_tied_embedding_is_named_by_its_own_module_too(tmp_path):
    """A default export stores an embedding tied to the output projection under the
    projection's name (GPT-2's wte.weight as lm_head.weight): `frozen: ["emb.weight"]`
    matched nothing (found by a transformers sweep). The Gather's records name the
    Embedding, so either name selects the one tensor."""
    import warnings

    import torch

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.mid = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LM().eval(), (torch.zeros(2, 5, dtype=torch.long),), None,
                          dynamo=True, input_names=["ids"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("N")},)).save(
            str(tmp_path / "m.onnx"))
    model = onnx.load(tmp_path / "m.onnx")
    assert "head.weight = emb.weight" in model_report(model).text()
    rng = np.random.default_rng(0)
    t = _frozen_run(tmp_path, ["emb.weight"], 2, ids=rng.integers(0, 20, (16, 5)),
                    y=rng.integers(0, 20, (16, 5)))
    assert "head.weight" not in t.names and "mid.bias" in t.names
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "o.onnx")
             .graph.initializer}
    np.testing.assert_array_equal(after["head.weight"], before["head.weight"])
    assert not np.array_equal(after["mid.bias"], before["mid.bias"])


@pytest.mark.parametrize("head_first", [True, False])
def test_a_tied_output_projection_trains_like_pytorch_whichever_module_comes_first(tmp_path,
                                                                                  head_first):
    """RoBERTa's masked-LM head (`lm_head.decoder`, registered before the embeddings it is
    tied to, with a bias) on a 3-D input: the export keeps the one tensor under the
    embedding's name and folds the projection's transpose; the tie's Transpose node, repaired
    again when the training graph was built, was read as an exporter's node and given the
    missing `head.decoder.weight` of its own: training died with an internal KeyError, and
    `grad` wrote two untied tensors (found by a transformers sweep, XLMRobertaForMaskedLM)."""
    import warnings

    import torch

    V, D = 20, 8

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Linear(D, V)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if head_first:
                self.head = Head()
            self.emb = torch.nn.Embedding(V, D)
            if not head_first:
                self.head = Head()
            self.head.decoder.weight = self.emb.weight

        def forward(self, ids):
            return self.head.decoder(torch.tanh(self.emb(ids)))

    torch.manual_seed(0)
    model = LM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 5, dtype=torch.long),), None,
                          dynamo=True, input_names=["ids"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("N")},)).save(
            str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    ids, y = rng.integers(0, V, (8, 5)), rng.integers(0, V, (8, 5))
    np.savez(tmp_path / "d.npz", ids=ids, y=y)
    Trainer(config_from_dict({
        "model": "m.onnx", "output": "o.onnx", "device": "cpu", "steps": 2,
        "data": {"train": {"path": "d.npz", "inputs": {"ids": "ids"}, "targets": {"label": "y"}},
                 "batch_size": 4, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": 0.5}}, tmp_path), stream=io.StringIO()).fit()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for b in range(2):
        rows = slice(4 * b, 4 * b + 4)
        opt.zero_grad()
        logits = model(torch.from_numpy(ids[rows]))
        torch.nn.functional.cross_entropy(logits.reshape(-1, V),
                                          torch.from_numpy(y[rows]).reshape(-1)).backward()
        opt.step()
    after = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "o.onnx")
             .graph.initializer}
    want = {"emb.weight": model.emb.weight, "head.decoder.bias": model.head.decoder.bias}
    for name, value in want.items():
        got = after.get(name, after.get("head.decoder.weight")) if name == "emb.weight" \
            else after[name]
        np.testing.assert_allclose(got, value.detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("frozen", ["enc.embed.weight", "dec.embed.weight"])
def test_an_embedding_shared_by_two_modules_is_named_by_each(tmp_path, frozen):
    """BART's one table is its encoder's and its decoder's embed_tokens and its lm_head: the
    tied alias kept one embedding's name, so the other (`encoder.embed_tokens.weight`) matched
    nothing in `frozen` (found by a transformers sweep). Every embedding's name selects it."""
    import warnings

    import torch

    class Part(torch.nn.Module):
        def __init__(self, emb):
            super().__init__()
            self.embed = emb

        def forward(self, ids):
            return self.embed(ids)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            shared = torch.nn.Embedding(20, 8)
            self.enc, self.dec = Part(shared), Part(shared)
            self.mid = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 20, bias=False)
            self.head.weight = shared.weight

        def forward(self, ids, dids):
            return self.head(torch.tanh(self.mid(self.enc(ids))) + self.dec(dids))

    torch.manual_seed(0)
    n = torch.export.Dim("N")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LM().eval(), (torch.zeros(2, 5, dtype=torch.long),
                                        torch.zeros(2, 5, dtype=torch.long)), None,
                          dynamo=True, input_names=["ids", "dids"], output_names=["logits"],
                          dynamic_shapes=({0: n}, {0: n})).save(str(tmp_path / "m.onnx"))
    model = onnx.load(tmp_path / "m.onnx")
    assert "head.weight = enc.embed.weight = dec.embed.weight" in model_report(model).text()
    rng = np.random.default_rng(0)
    t = _frozen_run(tmp_path, [frozen], 1, ids=rng.integers(0, 20, (8, 5)),
                    dids=rng.integers(0, 20, (8, 5)), y=rng.integers(0, 20, (8, 5)))
    assert "head.weight" not in t.names and "mid.bias" in t.names


@pytest.mark.parametrize("scopes,path", [
    (["seq", "seq.0"], "seq.0"), (["bert", "encoder", "layer.0", "query"],
                                  "bert.encoder.layer.0.query"),
    (["emb2", "emb2.0"], "emb2.0"), (["transformer.blocks", "transformer.blocks.0"],
                                     "transformer.blocks.0"), (["emb"], "emb")])
def test_module_paths_from_name_scopes(scopes, path):
    """TorchScript scopes a called container's child by its full name under the container's
    (it read seq.seq.0, and a glob on seq.0 missed the weight); the default exporter scopes
    each level by its full path."""
    from trainer.autodiff.params import _scope_path

    assert _scope_path(scopes) == path


def test_torchscript_folded_buffers_are_warned_of(tmp_path):
    """A FrozenBatchNorm2d (its weight, bias and statistics buffers) exported by TorchScript
    with constant folding becomes onnx::Mul_<n> and onnx::Add_<n> tensors, which train as
    parameters where PyTorch trains none of them: 6.6e-3 off PyTorch's loss after 4 steps,
    in silence (found by a fine-tuning sweep). Without folding nothing is said."""
    import warnings

    import torch

    class FrozenBN(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            for k, v in (("weight", torch.rand(c) + 0.5), ("bias", torch.randn(c)),
                         ("running_mean", torch.randn(c)), ("running_var", torch.rand(c) + 1)):
                self.register_buffer(k, v)

        def forward(self, x):
            scale = self.weight * (self.running_var + 1e-5).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), FrozenBN(4), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 6 * 6, 3)).eval()
    from trainer.report import TORCHSCRIPT_FOLDED_HINT, exporter_hints

    for fold, warned in ((True, True), (False, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (torch.randn(2, 3, 8, 8),), str(tmp_path / "m.onnx"),
                              dynamo=False, do_constant_folding=fold, input_names=["x"],
                              output_names=["logits"])
        lines = exporter_hints(onnx.load(tmp_path / "m.onnx"))
        assert any(TORCHSCRIPT_FOLDED_HINT in w and "onnx::Mul_" in w for w in lines) == \
            warned, lines


def test_a_keras_batchnorm_that_tf2onnx_wrote_as_its_statistics_is_warned_of():
    """tf2onnx writes a Keras BatchNormalization as the Mul and Add of its inference
    statistics (`.../batch_normalization/batchnorm/mul_1`, `add_1`), which trained as a free
    affine layer, without batch statistics, silently (found by an other-exporters sweep; the
    same fold of PyTorch's, onnxruntime's, onnxsim's and onnxslim's was warned of)."""
    rng = np.random.default_rng(0)
    scope = "sequential_1/batch_normalization_1/batchnorm"
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="sequential_1/dense_1/MatMul"),
             helper.make_node("Mul", ["h", "scale"], ["m"], name=f"{scope}/mul_1"),
             helper.make_node("Add", ["m", "shift"], ["y"], name=f"{scope}/add_1")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.random(3).astype(np.float32) + 0.5, f"{scope}/mul:0"),
             numpy_helper.from_array(rng.random(3).astype(np.float32), f"{scope}/sub:0")]
    nodes[1].input[1], nodes[2].input[1] = inits[1].name, inits[2].name
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="tf2onnx")
    report = model_report(model)
    assert report.fused == ["batch_normalization_1 (tf2onnx)"]
    assert "WARNING: BatchNormalization layers" in report.text()
    model.producer_name = "other"
    assert not model_report(model).fused


def _keras_model(nodes, inits, out_shape, opset=13):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                             producer_name="tf2onnx")


def test_tf2onnx_exports_say_what_they_lost():
    """tf_keras's BatchNormalization folded into the convolution (weights `..._fused_bn`) was
    not warned of (Keras 3's naming alone was); the warning for tf2onnx's folds gave PyTorch's
    remedies; tf2onnx's BatchNormalization carries no momentum (ONNX's 0.9 then moves the
    running statistics ten times faster than Keras's default 0.99) and it drops all-zero
    biases (a fresh Keras layer trained without its bias): neither was said (found by a Keras
    sweep)."""
    rng = np.random.default_rng(0)

    def init(name, *shape, value=None):
        a = rng.standard_normal(shape) if value is None else np.full(shape, value)
        return numpy_helper.from_array(a.astype(np.float32), name)

    w = "sequential/conv2d/BiasAdd_weights_fused_bn"
    conv = helper.make_node("Conv", ["x", w, "sequential/conv2d/BiasAdd_bias_fused_bn"],
                            ["sequential/batch_normalization/FusedBatchNormV3:0"],
                            name="sequential/conv2d/BiasAdd")
    flat = helper.make_node("Flatten", ["sequential/batch_normalization/FusedBatchNormV3:0"],
                            ["f"])
    dense = helper.make_node("MatMul", ["f", "k"], ["y"], name="sequential/dense/MatMul")
    inits = [init(w, 2, 3, 1, 1), init("sequential/conv2d/BiasAdd_bias_fused_bn", 2),
             init("k", 32, 5)]
    model = _keras_model([conv, flat, dense], inits, ["N", 5])
    report = model_report(model)
    assert report.fused == ["batch_normalization (tf2onnx)"]
    text = report.text()
    assert "WARNING: BatchNormalization layers that tf2onnx wrote in inference form" in text
    assert "optimize=False" not in text  # (PyTorch's remedies)
    assert "WARNING: layers of a tf2onnx export without a bias" in text and \
        "sequential/dense/MatMul" in text
    biased = _keras_model([conv, flat, dense, helper.make_node("Add", ["y0", "b"], ["y"])],
                          [*inits, init("b", 5)], ["N", 5])
    biased.graph.node[2].output[0] = "y0"
    assert "without a bias" not in model_report(biased).text()
    # a BatchNormalization in its own form, without momentum
    bn = helper.make_node("BatchNormalization", ["x", "s", "o", "mean", "var"], ["h"],
                          name="sequential/batch_normalization/FusedBatchNormV3", epsilon=1e-3)
    pool = helper.make_node("GlobalAveragePool", ["h"], ["y"])
    stats = [init("s", 3), init("o", 3), init("mean", 3, value=0.0), init("var", 3, value=1.0)]
    text = model_report(_keras_model([bn, pool], stats, ["N", 3, 1, 1])).text()
    assert "WARNING: BatchNormalization layers that tf2onnx wrote without their momentum" \
        in text and "sequential/batch_normalization/FusedBatchNormV3" in text, text
    bn.attribute.extend([helper.make_attribute("momentum", 0.99)])
    assert "without their momentum" not in model_report(
        _keras_model([bn, pool], stats, ["N", 3, 1, 1])).text()
