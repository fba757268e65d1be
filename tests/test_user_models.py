"""Models as users export them, with both PyTorch exporters, trained with the default settings:
the trained tensors are PyTorch's parameters (no exporter constant moves), the per-step losses are
PyTorch's, and what `check` says matches."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from trainer.autodiff import build_training_graph, training_info  # noqa: E402
from trainer.config import config_from_dict  # noqa: E402
from trainer.graph import load_model  # noqa: E402
from trainer.report import model_report  # noqa: E402
from trainer.train import Trainer  # noqa: E402

STEPS, BATCH, LR = 20, 16, 0.1


class HandNormGelu(nn.Module):
    """Linear -> hand-written LayerNorm ((h - mu) / sqrt(var + 1e-5) * g) -> tanh-GELU ->
    Linear: the exporters store its epsilon, exponents and GELU coefficients as constants."""

    def __init__(self):
        super().__init__()
        self.l1, self.g, self.l2 = nn.Linear(8, 16), nn.Parameter(torch.ones(16)), nn.Linear(16, 5)

    def forward(self, x):
        h = self.l1(x)
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5) * self.g
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        return self.l2(h)


class LayerNormGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.ln, self.l2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x):
        return self.l2(F.gelu(self.ln(self.l1(x))))


class CausalAttention(nn.Module):
    """One causal self-attention head over [N, T=6, d=8] with a 1/sqrt(d) scale, mean-pooled."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out, self.d = nn.Linear(d, 5), d

    def forward(self, x):
        t = x.shape[1]
        a = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(self.d)
        a = a.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        return self.out((a.softmax(-1) @ self.v(x)).mean(1))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.c(x)))
        return self.fc(torch.flatten(F.relu(self.bn2(self.c2(x))), 1))


MODELS = {"hand_norm_gelu": (HandNormGelu, (8,)), "layernorm_gelu": (LayerNormGelu, (8,)),
          "causal_attention": (CausalAttention, (6, 8)), "conv_bn": (ConvBN, (1, 6, 6))}


def export(model: nn.Module, sample: tuple, exporter: str) -> onnx.ModelProto:
    """dynamo: torch.onnx.export's defaults (with optimize=False for BatchNorm models, which
    the optimizer folds into the Conv); torchscript: dynamo=False, in training form for
    BatchNorm models (its eval mode folds BatchNorm too)."""
    x = torch.randn((2,) + sample)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if exporter == "dynamo":
        return torch.onnx.export(model.eval(), (x,), None, input_names=["x"],
                                 output_names=["logits"], optimize=not has_bn,
                                 dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.train(has_bn), (x,), f, dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "N"}},
                          training=(torch.onnx.TrainingMode.TRAINING if has_bn
                                    else torch.onnx.TrainingMode.EVAL),
                          do_constant_folding=not has_bn)
    return onnx.load_from_string(f.getvalue())


def torch_losses(model: nn.Module, x: np.ndarray, y: np.ndarray) -> list[float]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for k in range(STEPS):
        j = k % (len(x) // BATCH)
        xb, yb = torch.from_numpy(x[j * BATCH:(j + 1) * BATCH]), torch.from_numpy(
            y[j * BATCH:(j + 1) * BATCH])
        loss = F.cross_entropy(model(xb), yb)
        out.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


CASES = [(m, e) for m in MODELS for e in ("dynamo", "torchscript")]


@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{m}-{e}" for m, e in CASES])
def test_exported_model_trains_like_pytorch(tmp_path, name, exporter):
    cls, sample = MODELS[name]
    torch.manual_seed(3)
    model = cls()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = export(model, sample, exporter)
    model.load_state_dict(state)  # export does not train, but be explicit
    onnx.save(proto, str(tmp_path / "model.onnx"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64,) + sample).astype(np.float32)
    y = rng.integers(0, 5, 64).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)

    cfg = config_from_dict({
        "model": "model.onnx", "output": "out.onnx", "device": "cpu",
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": BATCH, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": LR}, "steps": STEPS, "log": {"every_steps": 1}},
        tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    # The trained tensors are PyTorch's parameters: same count and sizes.
    n_params = sorted(int(p.numel()) for p in model.parameters())
    assert sorted(int(np.prod(trainer.shapes[k])) for k in trainer.names) == n_params
    result = trainer.fit()
    ours = [r["loss"] for r in trainer.history if "loss" in r]
    want = torch_losses(model, x, y)
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=2e-5)
    # No one-element constant of the exported graph changed.
    src = {t.name: onnx.numpy_helper.to_array(t) for t in load_model(tmp_path / "model.onnx")
           .graph.initializer}
    out = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(result["output"])
           .graph.initializer}
    for k, v in src.items():
        if v.size == 1:
            np.testing.assert_array_equal(out[k], v, err_msg=k)
    # `check` agrees: the same tensors are the default parameters.
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.ok
    assert sorted(p.name for p in report.params if p.role == "parameter") == sorted(trainer.names)


def _threshold_model():
    """x[N,4] @ W -> h; mask = Greater(h, thr) (thr a float initializer); logits = Where(mask,
    h, 0) + OneHot(idx, depth, values) (values a float initializer, read only by OneHot)."""
    from onnx import TensorProto, helper, numpy_helper
    W = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Greater", ["h", "thr"], ["mask"]),
             helper.make_node("Where", ["mask", "h", "zero"], ["gated"]),
             helper.make_node("OneHot", ["idx", "depth", "values"], ["oh"]),
             helper.make_node("Add", ["gated", "oh"], ["logits"])]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.float32(0.1), "thr"),
         numpy_helper.from_array(np.float32(0.0), "zero"),
         numpy_helper.from_array(np.array([1], np.int64), "idx"),
         numpy_helper.from_array(np.array(3, np.int64), "depth"),
         numpy_helper.from_array(np.array([0.0, 0.5], np.float32), "values")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_initializer_read_only_by_non_differentiable_inputs_is_not_trained():
    model = _threshold_model()
    tm = build_training_graph(model, {"type": "cross_entropy", "output": "logits",
                                      "target": "label"}, batch_size=4)
    assert list(training_info(tm).gradients) == ["W"]
    report = model_report(model)
    why = {p.name: p.reason for p in report.params if p.role != "parameter"}
    assert "Greater input 1 (not differentiable)" in why["thr"]
    assert "OneHot input 2 (not differentiable)" in why["values"]
    with pytest.raises(Exception, match="cannot be trained"):
        build_training_graph(model, {"type": "cross_entropy", "output": "logits",
                                     "target": "label"}, ["values"], batch_size=4)


def test_check_lists_the_exporters_constants_with_reasons(capsys):
    from trainer.cli import main

    torch.manual_seed(0)
    proto = export(HandNormGelu(), (8,), "dynamo")
    path = __import__("tempfile").mkdtemp() + "/m.onnx"
    onnx.save(proto, path)
    assert main(["check", path]) == 0
    out = capsys.readouterr().out
    assert "parameters trained by default: 5 tensors" in out
    assert "one-element constant" in out


class ViewCNN(nn.Module):
    """A TorchScript-style CNN that flattens with x.view(x.size(0), -1): a Shape -> Gather ->
    Unsqueeze -> Concat -> Reshape path that carries no gradient."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(1, 3, 3), nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.c(x))
        return self.fc(x.view(x.size(0), -1))


def test_check_has_no_false_alarm_on_the_shape_path(tmp_path, capsys):
    from trainer.cli import main

    torch.manual_seed(0)
    proto = export(ViewCNN(), (1, 6, 6), "torchscript")
    ops = {n.op_type for n in proto.graph.node}
    assert {"Shape", "Gather", "Concat", "Reshape"} <= ops, ops
    onnx.save(proto, tmp_path / "m.onnx")
    assert main(["check", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "all trainable" in out and "MISSING" not in out


class SoftmaxHead(nn.Module):
    """A classifier that outputs probabilities (Softmax last), as many exported models do."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 5)

    def logits(self, x):
        return self.l2(torch.tanh(self.l1(x)))

    def forward(self, x):
        return torch.softmax(self.logits(x), dim=-1)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_cross_entropy_on_a_softmax_output_uses_its_logits(tmp_path, exporter):
    """loss.output names probabilities: the loss is cross entropy of the Softmax's input (as
    torch's F.cross_entropy on the logits), not a second softmax."""
    torch.manual_seed(4)
    model = SoftmaxHead()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    onnx.save(export(model, (8,), exporter), str(tmp_path / "model.onnx"))
    model.load_state_dict(state)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = rng.integers(0, 5, 64).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    cfg = config_from_dict({
        "model": "model.onnx", "output": "out.onnx", "device": "cpu",
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": BATCH, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": LR}, "steps": STEPS, "log": {"every_steps": 1}},
        tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    trainer.fit()
    ours = [r["loss"] for r in trainer.history if "loss" in r]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    want = []
    for k in range(STEPS):
        j = k % (len(x) // BATCH)
        loss = F.cross_entropy(model.logits(torch.from_numpy(x[j * BATCH:(j + 1) * BATCH])),
                               torch.from_numpy(y[j * BATCH:(j + 1) * BATCH]))
        want.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=2e-5)
