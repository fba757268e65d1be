"""onnxruntime's fused operators (trainer.contrib): each lowering computes what onnxruntime's own
kernel computes, and a BERT that onnxruntime's optimizers fused trains as PyTorch trains the
model it came from, its export keeping the fused nodes."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trainer.config import config_from_dict
from trainer.contrib import lower_contrib
from trainer.errors import ModelError
from trainer.executor import Executor
from trainer.graph import load_model
from trainer.report import model_report
from trainer.train import Trainer

ort = pytest.importorskip("onnxruntime")
MS = "com.microsoft"
B, S, D, H = 2, 5, 8, 2


def _f(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _model(node, inputs, inits, opset=14):
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int32): TensorProto.INT32,
             np.dtype(np.int64): TensorProto.INT64}
    outs = [o for o in node.output if o]
    g = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, types[v.dtype], list(v.shape))
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.INT32 if o == "mask_index"
                                       else TensorProto.FLOAT, None) for o in outs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset),
                                            helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    return m, outs


def _mask(*rows):
    return np.array(rows, np.int32)


# name -> (node, inputs, initializers)
CASES = {
    "Gelu": (helper.make_node("Gelu", ["x"], ["y"], domain=MS), {"x": _f(B, S, D)}, {}),
    "FastGelu": (helper.make_node("FastGelu", ["x", "b"], ["y"], domain=MS),
                 {"x": _f(B, S, D)}, {"b": _f(D, seed=1)}),
    "FastGelu-no-bias": (helper.make_node("FastGelu", ["x"], ["y"], domain=MS),
                         {"x": _f(B, S, D)}, {}),
    "BiasGelu": (helper.make_node("BiasGelu", ["x", "b"], ["y"], domain=MS),
                 {"x": _f(B, S, D)}, {"b": _f(D, seed=1)}),
    "QuickGelu": (helper.make_node("QuickGelu", ["x"], ["y"], domain=MS, alpha=1.5),
                  {"x": _f(B, S, D)}, {}),
    "BiasAdd": (helper.make_node("BiasAdd", ["x", "b", "s"], ["y"], domain=MS),
                {"x": _f(B, S, D), "s": _f(B, S, D, seed=2)}, {"b": _f(D, seed=1)}),
    "FusedMatMul-transB-alpha": (
        helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain=MS, transB=1, alpha=0.5),
        {"x": _f(B, S, D)}, {"w": _f(3, D, seed=1)}),
    "FusedMatMul-transA": (
        helper.make_node("FusedMatMul", ["x", "z"], ["y"], domain=MS, transA=1),
        {"x": _f(B, S, D), "z": _f(B, S, 3, seed=1)}, {}),
    "FusedGemm-LeakyRelu": (
        helper.make_node("FusedGemm", ["a", "w", "c"], ["y"], domain=MS, transB=1,
                         activation="LeakyRelu", activation_alpha=0.2),
        {"a": _f(4, D)}, {"w": _f(3, D, seed=1), "c": _f(3, seed=2)}),
    "FusedConv-Relu": (
        helper.make_node("FusedConv", ["x", "w", "b"], ["y"], domain=MS, activation="Relu",
                         pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        {"x": _f(2, 3, 6, 6)}, {"w": _f(4, 3, 3, 3, seed=1), "b": _f(4, seed=2)}),
    "SkipLayerNormalization": (
        helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b", "bias"],
                         ["y", "", "", "sum"], domain=MS, epsilon=1e-5),
        {"x": _f(B, S, D), "s": _f(B, S, D, seed=1)},
        {"g": _f(D, seed=2), "b": _f(D, seed=3), "bias": _f(D, seed=4)}),
    "SkipSimplifiedLayerNormalization": (
        helper.make_node("SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["y"],
                         domain=MS, epsilon=1e-5),
        {"x": _f(B, S, D), "s": _f(B, S, D, seed=1)}, {"g": _f(D, seed=2)}),
    "LayerNormalization-opset14": (
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], epsilon=1e-5),
        {"x": _f(B, S, D)}, {"g": _f(D, seed=1), "b": _f(D, seed=2)}),
    "SimplifiedLayerNormalization": (
        helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], epsilon=1e-5),
        {"x": _f(B, S, D)}, {"g": _f(D, seed=1)}),
    "Attention-raw-mask": (
        helper.make_node("Attention", ["x", "w", "b", "m"], ["y"], domain=MS, num_heads=H),
        {"x": _f(B, S, D), "m": _mask([1, 1, 1, 0, 0], [1, 1, 1, 1, 1])},
        {"w": _f(D, 3 * D, seed=1), "b": _f(3 * D, seed=2)}),
    "Attention-lengths": (
        helper.make_node("Attention", ["x", "w", "b", "m"], ["y"], domain=MS, num_heads=H),
        {"x": _f(B, S, D), "m": np.array([3, 5], np.int32)},
        {"w": _f(D, 3 * D, seed=1), "b": _f(3 * D, seed=2)}),
    "Attention-causal": (
        helper.make_node("Attention", ["x", "w", "b"], ["y"], domain=MS, num_heads=H,
                         unidirectional=1),
        {"x": _f(B, S, D)}, {"w": _f(D, 3 * D, seed=1), "b": _f(3 * D, seed=2)}),
    # (future keys are removed, not given mask_filter_value: a filter of -3, or a query whose
    # past keys are all padding, let them weigh)
    "Attention-causal-filter": (
        helper.make_node("Attention", ["x", "w", "b"], ["y"], domain=MS, num_heads=H,
                         unidirectional=1, mask_filter_value=-3.0),
        {"x": _f(B, S, D)}, {"w": _f(D, 3 * D, seed=1), "b": _f(3 * D, seed=2)}),
    "Attention-causal-left-padding": (
        helper.make_node("Attention", ["x", "w", "b", "m"], ["y"], domain=MS, num_heads=H,
                         unidirectional=1),
        {"x": _f(B, S, D), "m": _mask([0, 0, 1, 1, 1], [0, 1, 1, 1, 1])},
        {"w": _f(D, 3 * D, seed=1), "b": _f(3 * D, seed=2)}),
    "Attention-qkv-sizes-scale": (
        helper.make_node("Attention", ["x", "w", "b"], ["y"], domain=MS, num_heads=H,
                         qkv_hidden_sizes=[8, 8, 4], scale=0.3),
        {"x": _f(B, S, D)}, {"w": _f(D, 20, seed=1), "b": _f(20, seed=2)}),
    "MultiHeadAttention": (
        helper.make_node("MultiHeadAttention", ["q", "k", "v", "b", "m"], ["y"], domain=MS,
                         num_heads=H),
        {"q": _f(B, S, D), "k": _f(B, 4, D, seed=1), "v": _f(B, 4, D, seed=2),
         "m": _mask([1, 1, 1, 0], [1, 1, 1, 1])}, {"b": _f(3 * D, seed=3)}),
    "EmbedLayerNormalization": (
        helper.make_node("EmbedLayerNormalization",
                         ["ids", "seg", "we", "pe", "se", "g", "b", "m"],
                         ["y", "mask_index", "sum"], domain=MS, epsilon=1e-12),
        {"ids": np.array([[1, 4, 9, 2, 0], [3, 3, 7, 8, 5]], np.int32),
         "seg": np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.int32),
         "m": _mask([1, 1, 1, 0, 0], [1, 1, 1, 1, 1])},
        {"we": _f(10, D, seed=1), "pe": _f(7, D, seed=2), "se": _f(2, D, seed=3),
         "g": _f(D, seed=4), "b": _f(D, seed=5)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_lowered_fused_op_computes_what_onnxruntime_does(name):
    node, inputs, inits = CASES[name]
    model, outs = _model(node, inputs, inits)
    if name == "BiasAdd":  # (onnxruntime has BiasAdd on GPUs only)
        want = [inputs["x"] + inits["b"] + inputs["s"]]
    else:
        want = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(outs, inputs)
    lowered = lower_contrib(model)
    assert not [n for n in lowered.graph.node if n.domain == MS
                or n.op_type == "SimplifiedLayerNormalization"]
    for vi, w in zip(lowered.graph.output, want, strict=True):
        vi.CopyFrom(helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type,
                                                  list(w.shape)))
    onnx.checker.check_model(lowered, full_check=True)  # (a standard ONNX model)
    got = Executor(lowered, feeds=list(inputs), fetch=outs).run(inputs)
    for o, w in zip(outs, want, strict=True):
        np.testing.assert_allclose(np.asarray(got[o], np.float64), w, rtol=1e-5, atol=2e-6,
                                   err_msg=o)


def test_a_form_for_incremental_decoding_is_named_before_training(tmp_path):
    """An Attention reading a past key/value state is not lowered: `check` names the node and
    says why; training stops before it starts, with the same words."""
    node = helper.make_node("Attention", ["x", "w", "b", "", "past"], ["y", "present"],
                            domain=MS, num_heads=H)
    model, _ = _model(node, {"x": _f(B, S, D), "past": _f(2, B, H, 3, D // H)},
                      {"w": _f(D, 3 * D, seed=1), "b": _f(3 * D, seed=2)})
    with pytest.raises(ModelError, match="Attention node .*past/present"):
        lower_contrib(model)
    report = model_report(model)
    assert not report.ok and "past/present" in report.text()


# ---- a BERT as onnxruntime's optimizers leave it ------------------------------------------

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

T, VOCAB, CLASSES, N, BATCH, STEPS = 8, 30, 3, 12, 3, 4


class _Layer(nn.Module):
    """One encoder layer, written as Hugging Face's BERT computes it."""

    def __init__(self, d, h, f):
        super().__init__()
        self.h, self.dh = h, d // h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.dh).permute(0, 2, 1, 3)

    def forward(self, x, mask):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh) + mask
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        x = self.ln1(self.o(ctx.view(ctx.shape[0], ctx.shape[1], -1)) + x)
        return self.ln2(self.fc2(F.gelu(self.fc1(x))) + x)


class MiniBert(nn.Module):
    def __init__(self, d=16, h=2, f=32, layers=2):
        super().__init__()
        self.we, self.pe, self.te = nn.Embedding(VOCAB, d), nn.Embedding(T, d), nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList([_Layer(d, h, f) for _ in range(layers)])
        self.head = nn.Linear(d, CLASSES)
        self.register_buffer("pos", torch.arange(T).unsqueeze(0))

    def forward(self, ids, mask, types):
        x = self.ln(self.we(ids) + self.pe(self.pos[:, :ids.shape[1]]) + self.te(types))
        m = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, m)
        return self.head(x[:, 0])


INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def _data(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (N, T))
    mask = np.ones((N, T), np.int64)
    mask[::3, 5:] = 0  # (right padding)
    types = (np.arange(T) >= 4).astype(np.int64)[None].repeat(N, 0)
    y = rng.integers(0, CLASSES, N)
    np.savez(tmp_path / "data.npz", input_ids=ids, attention_mask=mask, token_type_ids=types,
             y=y)
    return ids, mask, types, y


def _train(tmp_path, model_file):
    cfg = config_from_dict({
        "model": model_file, "output": "out.onnx", "device": "cpu", "precision": "fp64",
        "data": {"train": {"path": "data.npz", "inputs": {k: k for k in INPUTS},
                           "targets": {"label": "y"}}, "batch_size": BATCH, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": 0.5}, "steps": STEPS, "log": {"every_steps": 1}},
        tmp_path)
    stream = io.StringIO()
    trainer = Trainer(cfg, stream=stream)
    trainer.fit()
    return [r["loss"] for r in trainer.history if "loss" in r], stream.getvalue()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(folder, PyTorch model): bert.onnx (TorchScript, opset 14) and its fusions by
    onnxruntime's transformer optimizer (bert_fused.onnx) and by an onnxruntime session at
    ORT_ENABLE_EXTENDED (bert_session.onnx)."""
    from onnxruntime.transformers.optimizer import optimize_model

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    model = MiniBert().eval()
    with torch.no_grad():  # (as a trained checkpoint: onnxruntime's optimizer stores equal
        for p in model.parameters():  # tensors once, a fresh model's LayerNorm ones among them)
            p.add_(0.05 * torch.randn_like(p))
    sample = (torch.randint(0, VOCAB, (2, T)), torch.ones(2, T, dtype=torch.long),
              torch.zeros(2, T, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, sample, str(folder / "bert.onnx"), dynamo=False,
                          input_names=INPUTS, output_names=["logits"], opset_version=14,
                          dynamic_axes={k: {0: "B"} for k in [*INPUTS, "logits"]})
    optimize_model(str(folder / "bert.onnx"), model_type="bert", num_heads=2, hidden_size=16,
                   opt_level=1).save_model_to_file(str(folder / "bert_fused.onnx"))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(folder / "bert_session.onnx")
    ort.InferenceSession(str(folder / "bert.onnx"), so, providers=["CPUExecutionProvider"])
    return folder, model


def _fused_ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node
            if n.domain == MS or n.op_type == "LayerNormalization"}


@pytest.mark.parametrize("fused", ["bert_fused.onnx", "bert_session.onnx"])
def test_a_bert_fused_by_onnxruntime_trains_like_pytorch(tmp_path, bert, fused):
    """The fused model trains as the model before fusion (same losses but for the float32
    constants each form keeps) and as PyTorch (SGD, float64; to the float32 constants of the
    export); the export keeps the fused nodes, and onnxruntime runs it to the trained PyTorch
    model's outputs."""
    import shutil

    folder, model = bert
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization",
            "BiasGelu"} <= _fused_ops(folder / "bert_fused.onnx")
    assert {"LayerNormalization", "FusedMatMul", "BiasGelu"} <= _fused_ops(
        folder / "bert_session.onnx")
    for f in ("bert.onnx", fused):
        shutil.copy(folder / f, tmp_path / f)
    ids, mask, types, y = _data(tmp_path)
    plain, _ = _train(tmp_path, "bert.onnx")
    losses, log = _train(tmp_path, fused)
    assert "train as the standard ONNX ops they stand for" in log
    # (the fused form keeps other float32 constants: 1/sqrt(8) for a division by sqrt(8))
    np.testing.assert_allclose(losses, plain, rtol=1e-7)
    ref = MiniBert().double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    want = []
    for k in range(STEPS):
        sl = slice(k * BATCH, (k + 1) * BATCH)
        loss = F.cross_entropy(ref(*(torch.from_numpy(a[sl]) for a in (ids, mask, types))),
                               torch.from_numpy(y[sl]))
        want.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert _fused_ops(tmp_path / "out.onnx") == _fused_ops(tmp_path / fused)
    assert len(out.graph.node) == len(onnx.load(str(tmp_path / fused)).graph.node)
    feeds = {"input_ids": ids[:3], "attention_mask": mask[:3], "token_type_ids": types[:3]}
    got = ort.InferenceSession(str(tmp_path / "out.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.no_grad():
        expected = ref.eval()(*(torch.from_numpy(feeds[k]) for k in INPUTS)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_check_lists_fused_nodes_as_lowered(bert):
    folder, _ = bert
    report = model_report(load_model(folder / "bert_fused.onnx"))
    rows = {r.op: r for r in report.nodes}
    assert rows["Attention"].forward and rows["Attention"].gradient == "lowered"
    assert report.ok
    trained = [p.name for p in report.params if p.role == "parameter"]
    assert "we.weight" in trained and any("qkv" in p for p in trained)
    # only the model's own tensors are listed, not the constants of the ops it lowers to
    own = {t.name for t in load_model(folder / "bert_fused.onnx").graph.initializer}
    assert {p.name for p in report.params} <= own


def test_a_batchnorm_that_onnxruntime_folded_is_warned_of(tmp_path):
    """A session's optimizer (from ORT_ENABLE_BASIC on) folds an eval-form BatchNormalization
    into the convolution before it: the layer would train without batch statistics, silently
    (13% from PyTorch's losses on a small CNN). Its weights' names (ConvBnFusion_W_...) say
    so: `check` and `train` warn."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 6, 6),), str(tmp_path / "cnn.onnx"),
                          dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
                          do_constant_folding=False)  # (eval form, BatchNormalization kept)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "cnn.onnx")).graph.node}
    assert "BatchNormalization" in ops
    assert not model_report(load_model(tmp_path / "cnn.onnx")).fused
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "cnn_ort.onnx")
    ort.InferenceSession(str(tmp_path / "cnn.onnx"), so, providers=["CPUExecutionProvider"])
    report = model_report(load_model(tmp_path / "cnn_ort.onnx"))
    assert len(report.fused) == 1 and "(onnxruntime)" in report.fused[0]
    assert "WARNING: BatchNormalization layers" in report.text()


def test_a_default_export_fused_by_onnxruntime_trains_as_its_graph_says(tmp_path):
    """A pre-norm encoder from the default exporter, fused by onnxruntime's transformer
    optimizer (two SkipLayerNormalization nodes): the parameter repair that runs again on the
    lowered model took a lowered LayerNormalization, which has no FX record, for a node the
    exporter made, and gave it the FFN's missing `enc.linear1.weight`; Trainer() ended in a
    KeyError. The fused nodes read norm1's weight and bias for norm2 and the final LayerNorm
    too (the optimizer stored the fresh model's equal tensors once, and the fused nodes keep no
    record of their layers), so it trains as PyTorch with those three LayerNorms tied."""
    from onnxruntime.transformers.optimizer import optimize_model

    from tests.test_user_models import Encoder, export

    torch.manual_seed(26)
    model = Encoder()
    model.head = nn.Linear(8, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(export(model, (6, 8), "dynamo"), str(tmp_path / "plain.onnx"))
        optimize_model(str(tmp_path / "plain.onnx"), model_type="bert", num_heads=2,
                       hidden_size=8).save_model_to_file(str(tmp_path / "fused.onnx"))
    assert "SkipLayerNormalization" in _fused_ops(tmp_path / "fused.onnx")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 6, 8)).astype(np.float32), rng.integers(0, 10, 16)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    t = Trainer(config_from_dict({
        "model": "fused.onnx", "output": "out.onnx", "device": "cpu", "precision": "fp64",
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                 "batch_size": 4, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "t"},
        "optimizer": {"type": "sgd", "lr": 0.5}, "steps": 4, "log": {"every_steps": 1}},
        tmp_path), stream=io.StringIO())
    t.fit()
    losses = [r["loss"] for r in t.history if "loss" in r]
    ref = model.double().train()
    for norm in (ref.enc.norm2, ref.ln):
        norm.weight, norm.bias = ref.enc.norm1.weight, ref.enc.norm1.bias
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    want = []
    for k in range(4):
        loss = F.cross_entropy(ref(torch.from_numpy(x[4 * k:4 * k + 4]).double()),
                               torch.from_numpy(y[4 * k:4 * k + 4]))
        want.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(losses, want, rtol=1e-5)
