"""BatchNormalization layers that onnxoptimizer's fuse_bn_into_conv wrote as arithmetic on the
convolution's weights train as BatchNormalization layers again (trainer/unfuse.py): against
PyTorch's train-mode losses, weights and running statistics, from the same initial values."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trainer.config import config_from_dict
from trainer.graph import load_model
from trainer.report import model_report
from trainer.train import Trainer
from trainer.unfuse import unfuse_conv_batchnorms

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

BATCH, STEPS, LR = 4, 6, 0.1


def fuse_bn_into_conv(model: onnx.ModelProto, opset13: bool = True) -> onnx.ModelProto:
    """What onnxoptimizer's fuse_bn_into_conv writes (its source, onnxoptimizer/passes/
    fuse_bn_into_conv.h): for each eval-form BatchNormalization after a Conv, the Conv reads
    W * Unsqueeze(s / Sqrt(var + Cast(eps))) and (Cast(b) - mean) * (s / ...) + beta, with a
    bias of zeros made for a bias-less Conv; the layer's tensors stay initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    made = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    nodes, k = [], 0
    for n in g.node:
        if n.op_type != "BatchNormalization":
            nodes.append(n)
            continue
        conv = made[n.input[0]]
        k += 1
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        w_rank = len(inits[conv.input[1]].dims)
        new = [numpy_helper.from_array(np.array(eps, np.float32), f"eps{k}")]
        if len(conv.input) < 3:
            new.append(numpy_helper.from_array(np.zeros(inits[conv.input[1]].dims[0],
                                                        np.float32), f"zero_bias{k}"))
            conv.input.append(f"zero_bias{k}")
        axes = list(range(1, w_rank))
        if opset13:
            new.append(numpy_helper.from_array(np.array(axes, np.int64), f"axes{k}"))
        g.initializer.extend(new)
        s, beta, mean, var = n.input[1:5]
        p = f"f{k}_"
        nodes.remove(conv)
        nodes += [
            helper.make_node("Cast", [f"eps{k}"], [p + "eps"], to=TensorProto.FLOAT),
            helper.make_node("Add", [var, p + "eps"], [p + "ve"]),
            helper.make_node("Sqrt", [p + "ve"], [p + "sd"]),
            helper.make_node("Div", [s, p + "sd"], [p + "scale"]),
            (helper.make_node("Unsqueeze", [p + "scale", f"axes{k}"], [p + "u"]) if opset13
             else helper.make_node("Unsqueeze", [p + "scale"], [p + "u"], axes=axes)),
            helper.make_node("Mul", [conv.input[1], p + "u"], [p + "w"]),
            helper.make_node("Cast", [conv.input[2]], [p + "b0"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [p + "b0", mean], [p + "bm"]),
            helper.make_node("Mul", [p + "bm", p + "scale"], [p + "bs"]),
            helper.make_node("Add", [p + "bs", beta], [p + "b"]),
        ]
        fused = helper.make_node("Conv", [conv.input[0], p + "w", p + "b"], [n.output[0]],
                                 name=conv.name)
        fused.attribute.extend(conv.attribute)
        nodes.append(fused)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


class ConvBN(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 5, 3, bias=bias), nn.BatchNorm2d(5, eps=1e-3)
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        return self.head(torch.flatten(F.relu(self.b2(self.c2(h))), 1))


def _model(tmp_path, bias: bool, opset13: bool = True):
    """(PyTorch model in its initial state, fused.onnx written): a pretrained-looking model
    (running statistics not the fresh ones, so no two layers' statistics are equal)."""
    torch.manual_seed(0)
    model = ConvBN(bias)
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, 3, 8, 8),), f, dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          opset_version=17 if opset13 else 12,
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
                          do_constant_folding=False)  # (eval form, BatchNormalization kept)
    plain = onnx.load_from_string(f.getvalue())
    fused = fuse_bn_into_conv(plain, opset13)
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    return model.train(), plain, fused


def _data(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCH * STEPS, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, BATCH * STEPS)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    return x, y


def _train(tmp_path):
    cfg = config_from_dict({
        "model": "fused.onnx", "output": "out.onnx", "device": "cpu",
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"},
                           "targets": {"label": "y"}}, "batch_size": BATCH, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": LR}, "steps": STEPS, "log": {"every_steps": 1}},
        tmp_path)
    stream = io.StringIO()
    trainer = Trainer(cfg, stream=stream)
    trainer.fit()
    return trainer, stream.getvalue()


def _torch_losses(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for k in range(STEPS):
        xb = torch.from_numpy(x[k * BATCH:(k + 1) * BATCH])
        loss = F.cross_entropy(model(xb), torch.from_numpy(y[k * BATCH:(k + 1) * BATCH]))
        out.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


@pytest.mark.parametrize("bias,opset13", [(True, True), (False, True), (True, False)],
                         ids=["bias", "no-bias", "opset12"])
def test_the_fused_arithmetic_becomes_a_batchnormalization_again(tmp_path, bias, opset13):
    """The rewrite computes what the fused file does (onnxruntime on both), reads the same
    initializers, and leaves no node of the pattern."""
    _, _, fused = _model(tmp_path, bias, opset13)
    back, names = unfuse_conv_batchnorms(fused)
    assert len(names) == 2
    ops = [n.op_type for n in back.graph.node]
    assert ops.count("BatchNormalization") == 2 and "Sqrt" not in ops and "Div" not in ops
    onnx.checker.check_model(back)
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
           .run(None, {"x": x})[0] for m in (fused, back)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-6)
    convs = [n for n in back.graph.node if n.op_type == "Conv"]
    assert all(len(c.input) == (3 if bias else 2) for c in convs)  # (the pass's zeros dropped)
    assert unfuse_conv_batchnorms(back)[1] == []
    assert back is not fused and len(fused.graph.node) > len(back.graph.node)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_a_model_onnxoptimizer_fused_trains_like_pytorch(tmp_path, bias):
    """Before: the running mean and variance trained by gradient as parameters (12 tensors
    against PyTorch's 10 on a small CNN, losses 10% off), the layer without batch statistics.
    Now: PyTorch's train-mode losses, weights and running statistics; the export keeps the
    fused arithmetic, holding the trained values."""
    model, _, fused = _model(tmp_path, bias)
    x, y = _data(tmp_path)
    trainer, log = _train(tmp_path)
    assert "onnxoptimizer's fuse_bn_into_conv" in log
    assert len(trainer.names) == sum(1 for _ in model.parameters())
    want = _torch_losses(model, x, y)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r], want,
                               rtol=1e-4, atol=1e-5)
    out = load_model(tmp_path / "out.onnx")
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in fused.graph.node]
    got = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    sd = model.state_dict()
    for key in ("b1.running_mean", "b1.running_var", "b2.running_mean", "b2.running_var",
                "b1.weight", "b2.bias", "c1.weight", "c2.weight", "head.weight"):
        np.testing.assert_allclose(got[key], sd[key].numpy(), rtol=2e-4, atol=2e-5,
                                   err_msg=key)
    xb = x[:3]
    ours = ort.InferenceSession(str(tmp_path / "out.onnx"),
                                providers=["CPUExecutionProvider"]).run(None, {"x": xb})[0]
    with torch.no_grad():
        np.testing.assert_allclose(ours, model.eval()(torch.from_numpy(xb)).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_check_says_the_layers_train_as_batchnormalization(tmp_path):
    _, _, fused = _model(tmp_path, True)
    report = model_report(fused)
    text = report.text()
    assert "onnxoptimizer's fuse_bn_into_conv" in text and len(report.unfused) == 2
    left = {p.name: p.reason for p in report.params if p.role != "parameter"}
    assert {"b1.running_mean", "b1.running_var"} <= set(left)
    assert not report.fused  # (nothing warned: nothing is lost)
