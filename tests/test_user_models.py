"""Models as users export them, with both PyTorch exporters, trained with the default settings:
the trained tensors are PyTorch's parameters (no exporter constant moves), the per-step losses are
PyTorch's, and what `check` says matches."""

from __future__ import annotations

import fnmatch
import io
import math
import warnings

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from trainer.autodiff import build_training_graph, training_info  # noqa: E402
from trainer.config import config_from_dict  # noqa: E402
from trainer.errors import ModelError  # noqa: E402
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


class Encoder(nn.Module):
    """A pre-norm transformer encoder layer, a final LayerNorm and a head: freshly initialized,
    its three LayerNorms hold equal weights (ones) and biases (zeros), which the default
    exporter's optimizer stores once, and its attention output bias is zero, which the optimizer
    drops from the Gemm."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True,
                                              norm_first=True)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.ln(self.enc(x)).mean(1))


class EncoderStack(nn.Module):
    """nn.TransformerEncoder clones its layer: both layers start with equal weights, which the
    exporters store once (the default one: also their transposed, folded forms)."""

    def __init__(self, d: int = 8):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class BertInit(nn.Module):
    """Two encoder layers initialized as BERT does (every Linear bias zero, LayerNorms ones and
    zeros): the default exporter stores all those zeros and ones of one shape once."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(
            d, 2, 16, dropout=0.0, batch_first=True, activation="gelu") for _ in range(2)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x)[:, 0])


class Siamese(nn.Module):
    """One encoder applied to both halves of the input: its tensors are shared on purpose and
    must stay one parameter each."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 8))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.cat([self.enc(x[:, :4]), self.enc(x[:, 4:])], 1))


class ViewedParameter(nn.Module):
    """A parameter used as it is and through a view (`w[None]`, `g.view(1, -1, 1, 1)`): both
    exporters fold the view into a second initializer."""

    def __init__(self):
        super().__init__()
        self.c, self.g = nn.Conv2d(1, 4, 3, padding=1), nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.l, self.w = nn.Linear(4, 8), nn.Parameter(torch.randn(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c(x)) * self.g.view(1, -1, 1, 1)
        h = self.l(x.mean((2, 3)) * self.g)
        return self.fc(h * self.w + (h * self.w[None, :]).mean(1, keepdim=True))


class TwiceViewed(ViewedParameter):
    """One parameter viewed twice in one module (`g.view(1, -1, 1, 1)` in two places): the two
    folded views are equal, and stored once, as one parameter's should be."""

    def forward(self, x):
        x = F.relu(self.c(x))
        x = x * self.g.view(1, -1, 1, 1) + torch.tanh(x) * self.g.view(1, -1, 1, 1)
        return self.fc(self.l(x.mean((2, 3))) * self.w)


class ZeroBiasConv(nn.Module):
    """Convolutions and a Linear whose biases start at zero (a common initialization): the
    default exporter's optimizer drops zero biases from Conv and Gemm nodes."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        for m in (self.c1, self.c2, self.fc):
            nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.c2(F.relu(self.c1(x)))), 1))


class GroupNormNet(nn.Module):
    """GroupNorm (the default exporter decomposes it into InstanceNormalization over the groups
    with a scale of ones and a bias of zeros, then the module's affine) and InstanceNorm."""

    def __init__(self):
        super().__init__()
        self.c, self.gn = nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.c2, self.inn = nn.Conv2d(4, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = F.gelu(self.gn(self.c(x)))
        return self.fc(F.leaky_relu(self.inn(self.c2(x)), 0.1).mean((2, 3)))


class UNetGroupNorms(nn.Module):
    """Two fresh GroupNorms of one width (a diffusers UNet's resnet blocks): the default
    exporter folds each affine into [C, 1, 1] tensors (weight for the Mul, bias for the Add of
    its decomposition), and its optimizer stores the equal ones and zeros once."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.c2, self.n2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.silu(self.n1(self.c1(x)))
        return self.fc(F.silu(self.n2(self.c2(x))).mean((2, 3)))


class GroupNormNextToLayerNorm(nn.Module):
    """A fresh GroupNorm and a LayerNorm of its size, on [N, C] features and on [N, C, T]
    sequences: the default exporter's optimizer stores their equal ones and zeros once (the
    GroupNorm's affine on [N, C] has the LayerNorm's shape)."""

    def __init__(self):
        super().__init__()
        self.fc0, self.gn, self.ln = nn.Linear(8, 8), nn.GroupNorm(2, 8), nn.LayerNorm(8)
        self.gn3, self.ln3 = nn.GroupNorm(4, 8), nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):  # x: [N, 8, 8]
        h = self.ln(self.gn(self.fc0(x.mean(2))))
        s = self.ln3(self.gn3(x))  # [N, 8, 8]: GroupNorm over channels, LayerNorm over time
        return self.fc(F.gelu(h + s.mean(2)))


class OneSlopePReLU(nn.Module):
    """nn.PReLU() with its one slope: TorchScript's constant folding stores it as
    `onnx::PRelu_12` [1, 1, 1], a one-element tensor of no module's name, which was left out
    as a graph constant."""

    def __init__(self):
        super().__init__()
        self.c, self.act, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.PReLU(), nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.act(self.c(x)).mean((2, 3)))


class Conv1dBN(nn.Module):
    """Conv1d with BatchNorm1d, a strided dilated Conv1d and AvgPool1d over [N, T, C] input."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv1d(8, 8, 5, padding=2), nn.BatchNorm1d(8)
        self.c2, self.fc = nn.Conv1d(8, 8, 3, padding=2, dilation=2, stride=2), nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.c(x.transpose(1, 2))))
        return self.fc(F.avg_pool1d(self.c2(x), 2).mean(-1))


class MobileBlock(nn.Module):
    """MobileNetV2's inverted residual: 1x1 expansion, depthwise 3x3, 1x1 projection, ReLU6,
    BatchNorm everywhere, a strided stem and a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6())
        self.block = nn.Sequential(
            nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(F.adaptive_avg_pool2d(x + self.block(x), 1).flatten(1))


class UNetish(nn.Module):
    """Down (MaxPool), up (stride-2 ConvTranspose), a skip Concat, bilinear upsampling and a
    global max pool."""

    def __init__(self):
        super().__init__()
        self.d1, self.d2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.up, self.u1 = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv2d(8, 4, 3, padding=1)
        self.u2, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 5)

    def forward(self, x):
        a = F.relu(self.d1(x))
        b = F.relu(self.d2(F.max_pool2d(a, 2)))
        u = F.relu(self.u1(torch.cat([self.up(b), a], 1)))
        u = F.interpolate(u, scale_factor=2, mode="bilinear", align_corners=False)
        return self.fc(F.adaptive_max_pool2d(F.relu(self.u2(u)), 1).flatten(1))


class Activations(nn.Module):
    """PReLU, ELU, Softplus, Mish, LogSigmoid, clamp and rsqrt."""

    def __init__(self):
        super().__init__()
        self.l1, self.pr = nn.Linear(8, 16), nn.PReLU(16)
        self.l2, self.l3 = nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = self.pr(self.l1(x))
        h = F.elu(self.l2(h)) + F.softplus(h) + F.mish(h) - F.logsigmoid(h)
        return self.l3(torch.clamp(h, -3, 3) * torch.rsqrt(h * h + 1))


class ConvNeXtBlock(nn.Module):
    """A patchify stem, a depthwise 7x7, LayerNorm over channels-last, an inverted MLP with GELU,
    a layer-scale parameter and a residual."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, d, 2, stride=2), nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.ln, self.pw1, self.pw2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.gamma, self.head = nn.Parameter(torch.full((d,), 0.5)), nn.Linear(d, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.pw2(F.gelu(self.pw1(self.ln(self.dw(x).permute(0, 2, 3, 1))))) * self.gamma
        return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


class Rotary(nn.Module):
    """Rotary position embedding (Llama, Qwen, Mistral): cos/sin tables computed from a buffer
    of inverse frequencies, which constant folding turns into float initializers; PyTorch
    trains none of them."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.q, self.head = nn.Linear(d, d), nn.Linear(d, 5)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d),
                             persistent=False)

    def forward(self, x):
        freqs = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), self.inv_freq)
        emb = torch.cat([freqs, freqs], -1)
        h = self.q(x)
        h1, h2 = h.chunk(2, -1)
        h = h * emb.cos() + torch.cat([-h2, h1], -1) * emb.sin()
        return self.head(h.mean(1))


class TransposedLinear(nn.Linear):
    """A Linear computed as x @ W.T (Falcon's): the default exporter folds W.T into a tensor
    named after the FX op (`permute`), which trains as W."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class TiedTransposed(nn.Module):
    """Two Linears sharing one weight (the default exporter's signature names both, its graph
    only one) and a TransposedLinear head: every PyTorch parameter trains, and `check` flags
    none."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight
        self.head = TransposedLinear(8, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class ParentReadsChildWeight(nn.Module):
    """DETR's queries: the parent reads a child's parameter through a view
    (`self.query.weight.unsqueeze(0).repeat(n, 1, 1)`), which the default exporter's optimizer
    folds into a tensor named `val_N`."""

    def __init__(self):
        super().__init__()
        self.query, self.proj, self.head = nn.Embedding(5, 8), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        q = self.query.weight.unsqueeze(0).repeat(x.shape[0], 1, 1)
        return self.head((q + self.proj(x)[:, None, :]).mean(1))


class NormGainOffset(nn.Module):
    """`ln(h) * gain + off` with fresh gain (ones) and off (zeros), equal to the LayerNorm's own
    weight and bias: the default exporter's optimizer stores them once, the LayerNorm reading
    `gain` and `off`, which named neither of its parameters (both left out: losses 9e-3 off)."""

    def __init__(self):
        super().__init__()
        self.lin, self.ln, self.head = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 5)
        self.gain, self.off = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return self.head(self.ln(self.lin(x)) * self.gain + self.off)


MODELS = {"hand_norm_gelu": (HandNormGelu, (8,)), "layernorm_gelu": (LayerNormGelu, (8,)),
          "causal_attention": (CausalAttention, (6, 8)), "conv_bn": (ConvBN, (1, 6, 6)),
          "encoder": (Encoder, (6, 8)), "encoder_stack": (EncoderStack, (6, 8)),
          "bert_init": (BertInit, (6, 8)), "siamese": (Siamese, (8,)),
          "viewed_parameter": (ViewedParameter, (1, 6, 6)),
          "twice_viewed": (TwiceViewed, (1, 6, 6)),
          "parent_reads_child": (ParentReadsChildWeight, (8,)),
          "zero_bias_conv": (ZeroBiasConv, (1, 6, 6)),
          "group_norm": (GroupNormNet, (1, 6, 6)),
          "group_norm_next_to_layer_norm": (GroupNormNextToLayerNorm, (8, 8)),
          "one_slope_prelu": (OneSlopePReLU, (1, 6, 6)),
          "unet_group_norms": (UNetGroupNorms, (1, 6, 6)), "conv1d_bn": (Conv1dBN, (12, 8)),
          "mobile_block": (MobileBlock, (3, 12, 12)), "unet": (UNetish, (3, 8, 8)),
          "activations": (Activations, (8,)), "convnext_block": (ConvNeXtBlock, (3, 8, 8)),
          "rotary": (Rotary, (6, 8)), "tied_transposed": (TiedTransposed, (8,)),
          "norm_gain_offset": (NormGainOffset, (8,))}


def export(model: nn.Module, sample: tuple, exporter: str) -> onnx.ModelProto:
    """dynamo: torch.onnx.export's defaults (with optimize=False for BatchNorm models, which
    the optimizer folds into the Conv); torchscript: dynamo=False, in training form for
    BatchNorm models (its eval mode folds BatchNorm too)."""
    x = torch.randn((2,) + sample)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
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


def torch_losses(model: nn.Module, x: np.ndarray, y: np.ndarray, opt=None,
                 forward=None) -> list[float]:
    """PyTorch's per-step losses over the same batches (SGD at LR unless `opt` is given;
    `forward` in place of model(x))."""
    model.train()
    opt = opt or torch.optim.SGD(model.parameters(), lr=LR)
    forward = forward or model
    out = []
    for k in range(STEPS):
        j = k % (len(x) // BATCH)
        xb, yb = torch.from_numpy(x[j * BATCH:(j + 1) * BATCH]), torch.from_numpy(
            y[j * BATCH:(j + 1) * BATCH])
        loss = F.cross_entropy(forward(xb), yb)
        out.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def classifier_config(tmp_path, steps: int, **over):
    """model.onnx and data.npz (x, y) in tmp_path: cross entropy on `logits`, SGD at LR."""
    return config_from_dict({
        "model": "model.onnx", "output": "out.onnx", "device": "cpu",
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": BATCH},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": LR}, "steps": steps, **over}, tmp_path)

def random_batches(tmp_path, sample: tuple, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """64 random samples of shape `sample` and their labels, saved as data.npz in tmp_path."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, *sample)).astype(np.float32)
    y = rng.integers(0, classes, 64).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    return x, y


def trains_like_pytorch(tmp_path, model: nn.Module, state: dict, x: np.ndarray,
                        y: np.ndarray) -> Trainer:
    """Train model.onnx on data.npz (ordered_trainer) and assert its per-step losses are
    PyTorch's from `state` on the same batches; returns the trainer."""
    trainer = ordered_trainer(tmp_path)
    trainer.fit()
    model.load_state_dict(state)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)
    return trainer


def ordered_trainer(tmp_path, stream=None) -> Trainer:
    """A Trainer for model.onnx and data.npz in tmp_path: cross entropy, SGD at LR, STEPS steps
    over the batches in order (as torch_losses takes them), every step's loss logged."""
    cfg = classifier_config(tmp_path, STEPS, log={"every_steps": 1}, data={
        "train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
        "batch_size": BATCH, "shuffle": False})
    return Trainer(cfg, stream=stream if stream is not None else io.StringIO())


# TorchScript's eval-mode export stores two Linears sharing a weight as it stores cloned layers
# (an Identity of one tensor read in the same role), which train apart: documented, not tested.
CASES = [(m, e) for m in MODELS for e in ("dynamo", "torchscript")
         if (m, e) != ("tied_transposed", "torchscript")]


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
    # No one-element constant of the exported graph changed (a one-element parameter did).
    src = {t.name: onnx.numpy_helper.to_array(t) for t in load_model(tmp_path / "model.onnx")
           .graph.initializer}
    out = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(result["output"])
           .graph.initializer}
    for k, v in src.items():
        if v.size == 1 and k not in trainer.names:
            np.testing.assert_array_equal(out[k], v, err_msg=k)
    # `check` agrees: the same tensors are the default parameters.
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.ok and not report.folded  # (no parameter is flagged as folded away)
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


def test_check_lists_the_exporters_constants_with_reasons(capsys, tmp_path):
    from trainer.cli import main

    torch.manual_seed(0)
    proto = export(HandNormGelu(), (8,), "dynamo")
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    assert main(["check", str(path)]) == 0
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
    want = torch_losses(model, x, y, forward=model.logits)
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=2e-5)


class LoRALinear(nn.Module):
    """A frozen Linear plus a low-rank adapter whose up-projection starts at zero (LoRA)."""

    def __init__(self, n_in: int, n_out: int, rank: int = 2):
        super().__init__()
        self.base = nn.Linear(n_in, n_out).requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, n_in) * 0.1)
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b)


class LoRANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = LoRALinear(8, 16), LoRALinear(16, 16), LoRALinear(16, 16)
        self.head = nn.Linear(16, 5).requires_grad_(False)

    def forward(self, x):
        h = F.gelu(self.l3(F.gelu(self.l2(F.gelu(self.l1(x))))))
        return self.head(h.mean(1) if h.dim() == 3 else h)


@pytest.mark.parametrize("exporter,sample", [("dynamo", (8,)), ("torchscript", (8,)),
                                             ("dynamo", (6, 8))])
def test_lora_fine_tuning_trains_the_adapters_like_pytorch(tmp_path, exporter, sample):
    """LoRA: `trainable: ["*lora*"]` trains the adapters alone with AdamW to PyTorch's losses.
    The three zero up-projections are merged by both exporters (restored: each trains on its
    own); TorchScript without constant folding, which would fold the adapters into transposed
    copies named onnx::MatMul_* (README). On a sequence ([N, T, 8], as in a transformer) the
    default exporter stores each adapter as its transpose under a name of its own (`val_42`):
    the glob still finds it by the parameter it holds."""
    from trainer.autodiff.params import parameter_aliases

    torch.manual_seed(0)
    model = LoRANet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn((2,) + sample)
    if exporter == "dynamo":
        proto = torch.onnx.export(model.eval(), (x,), None, input_names=["x"],
                                  output_names=["logits"],
                                  dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    else:
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (x,), f, dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "N"}},
                              do_constant_folding=False)
        proto = onnx.load_from_string(f.getvalue())
    model.load_state_dict(state)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((64,) + sample).astype(np.float32), rng.integers(0, 5, 64)
    np.savez(tmp_path / "data.npz", x=xs, y=ys)
    cfg = config_from_dict({
        "model": "model.onnx", "output": "out.onnx", "device": "cpu", "trainable": ["*lora*"],
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": BATCH, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "adamw", "lr": 1e-2}, "steps": STEPS, "log": {"every_steps": 1}},
        tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    aliases = parameter_aliases(trainer.model)
    if len(sample) > 1:
        assert len(aliases) >= 6 and not any("lora" in n for n in trainer.names
                                             if n in aliases and "/" not in n)
    assert sorted(aliases.get(n, n) for n in trainer.names) == sorted(
        k for k, p in model.named_parameters() if p.requires_grad)
    result = trainer.fit()
    ours = [r["loss"] for r in trainer.history if "loss" in r]
    want = torch_losses(model, xs, ys, opt=torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2))
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=2e-5)
    out = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(result["output"])
           .graph.initializer}
    for k, p in model.named_parameters():
        if k in out:  # the trained adapters and the untouched base are PyTorch's
            np.testing.assert_allclose(out[k], p.detach().numpy(), rtol=1e-4, atol=1e-5,
                                       err_msg=k)


class LogitScale(nn.Module):
    """A learned temperature used only as exp(logit_scale) (CLIP): constant folding turns the
    expression of the parameter alone into a constant, so the parameter cannot train."""

    def __init__(self):
        super().__init__()
        self.l, self.logit_scale = nn.Linear(8, 5), nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.l(x) * self.logit_scale.exp()


def test_parameters_folded_into_constants_are_named_before_training(tmp_path):
    """The default exporter's folding leaves `logit_scale` out of the graph: `check` and the
    trainer say so (naming it and the fix) instead of training without it silently; with
    optimize=False it is an initializer and trains."""
    model = LogitScale()
    onnx.save(export(model, (8,), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.folded == ["logit_scale"]
    assert "WARNING" in report.text() and "logit_scale" in report.text() \
        and "optimize=False" in report.text()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((32, 8)).astype(np.float32),
             y=rng.integers(0, 5, 32))
    cfg = classifier_config(tmp_path, steps=1)
    stream = io.StringIO()
    Trainer(cfg, stream=stream)
    assert "WARNING" in stream.getvalue() and "logit_scale" in stream.getvalue()
    unfolded = torch.onnx.export(model.eval(), (torch.randn(2, 8),), None, input_names=["x"],
                                 output_names=["logits"], optimize=False,
                                 dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    onnx.save(unfolded, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert not report.folded and "logit_scale" in [p.name for p in report.params
                                                   if p.role == "parameter"]


def test_a_long_list_of_exporter_findings_is_cut_to_eight_names():
    """inception_v3 from an eval-mode TorchScript export has 94 BatchNorms folded into the
    convolutions before them: the warning names 8 and counts them."""
    from trainer.report import warning_lines

    fused = [f"the one after /b{i}/conv/Conv" for i in range(94)]
    (line,) = warning_lines([], fused, [])
    assert "/b7/conv" in line and "/b8/conv" not in line and line.endswith("... (94 in all)")


class OnePlusNorm(nn.Module):
    """Gemma's norm scale, x * (1 + weight): the default exporter's optimizer folds 1 + weight."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return x * (1.0 + self.weight)


class RotaryAttention(nn.Module):
    """Gemma3's attention: its q_norm (a child) folds, and it reads a cos table computed from
    an `inv_freq` buffer, which the exporter folds too."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.proj, self.q_norm, self.head = nn.Linear(d, d), OnePlusNorm(d), nn.Linear(d, 5)
        self.register_buffer("inv_freq", 1.0 / (100 ** (torch.arange(d) / d)), persistent=False)

    def forward(self, x):
        pos = torch.arange(x.shape[1], dtype=torch.float32)
        cos = torch.cos(pos[:, None] * self.inv_freq[None, :])
        return self.head((self.q_norm(self.proj(x)) * cos).mean(1))


def test_a_table_computed_from_buffers_stays_constant_next_to_a_childs_fold(tmp_path):
    """Gemma3 from the default exporter trained its rotary tables (computed from buffers) as
    parameters, 32 tensors where PyTorch has 28: a child module's parameter (q_norm's `1 +
    weight`) was folded, and every folded tensor read in the modules above it stayed
    trainable in case it was that expression. The child reads its folded expression itself,
    so the tables read in its parent are computed constants; only the fold is warned of."""
    torch.manual_seed(0)
    proto = export(RotaryAttention(), (6, 8), "dynamo")
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.folded == ["q_norm.weight"]
    rows = [p for p in report.params if p.shape == (6, 8)]
    assert len(rows) == 1 and rows[0].role == "constant" and "buffers" in rows[0].reason
    assert sum(p.role == "parameter" for p in report.params) == 5  # (4 + the folded 1 + w)


class ExpandedCausalMask(nn.Module):
    """T5's decoder: a causal mask of zeros and the dtype's minimum, expanded to the batch
    before it is added to the scores."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.qk, self.head = nn.Linear(d, 2 * d), nn.Linear(d, 5)
        self.bias = nn.Parameter(torch.zeros(3))  # (not used here: missing from the export)

    def forward(self, x):
        n, t, d = x.shape
        q, k = self.qk(x).chunk(2, -1)
        causal = torch.triu(torch.full((t, t), torch.finfo(torch.float32).min), 1)
        s = (q @ k.transpose(-1, -2))[:, None] + causal[None, None].expand(n, 1, -1, -1)
        return self.head((s.softmax(-1)[:, 0] @ x).mean(1))


def test_an_additive_mask_read_through_expand_is_a_constant(tmp_path):
    """T5 from the default exporter trained its folded causal mask (read by Expand, which the
    mask rule did not look through) as a parameter, where a parameter of the module was
    missing from the graph (and so any folded tensor there might have been its expression)."""
    proto = export(ExpandedCausalMask(), (6, 8), "dynamo")
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    rows = [p for p in report.params if len(p.shape) == 4]
    assert len(rows) == 1 and rows[0].role == "constant"
    assert sum(p.role == "parameter" for p in report.params) == 4


class SlicedCausalMask(nn.Module):
    """nanoGPT's pattern: a causal 0/-inf mask buffer at the longest length, sliced to the
    sequence's (`self.mask[:t, :t]`) before it is added to the scores."""

    def __init__(self, fill: float):
        super().__init__()
        self.qk, self.head = nn.Linear(8, 16), nn.Linear(8, 3)
        self.register_buffer("mask", torch.triu(torch.full((16, 16), fill), 1))

    def forward(self, x):
        t = x.shape[1]
        q, k = self.qk(x).chunk(2, -1)
        s = q @ k.transpose(-1, -2) + self.mask[:t, :t]
        return self.head((s.softmax(-1) @ x).mean(1))


@pytest.mark.parametrize("fill", [float("-inf"), -1e9])
def test_an_additive_mask_read_through_a_slice_is_a_constant(tmp_path, fill):
    """TorchScript keeps the buffer as an initializer read by Slice nodes: the mask rule
    looked at its direct readers only, so it trained as a parameter (64 values more than
    PyTorch trains, the losses 6e-4 off by step 5), silently."""
    proto = export(SlicedCausalMask(fill), (6, 8), "torchscript")
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    rows = [p for p in report.params if p.name == "mask"]
    assert len(rows) == 1 and rows[0].role == "constant", rows
    assert sum(p.role == "parameter" for p in report.params) == 4


class WeightNormConv(nn.Module):
    """HuBERT's positional convolution: weight_norm's parametrization, a zero bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1), dim=2)
        nn.init.zeros_(self.conv.bias)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.conv(x).mean(-1))


def test_a_folded_parametrization_is_warned_of(tmp_path):
    """weight_norm's g and v, folded by the default exporter's optimizer into the weight they
    make: their module (`conv.parametrizations.weight`) keeps no node, so they were taken for
    an unused module's and not warned of (HuBERT, UniSpeechSat, Wav2Vec2: trained as one
    weight, silently). They belong to the convolution, which has nodes: warned."""
    onnx.save(export(WeightNormConv().eval(), (4, 8), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.folded == ["conv.parametrizations.weight.original0",
                             "conv.parametrizations.weight.original1"]


class StandardizedConv(nn.Module):
    """HF BiT's weight standardization: batch_norm over the weight, viewed back."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Linear(4, 5)

    def forward(self, x):
        c = self.conv
        w = F.batch_norm(c.weight.reshape(1, c.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).view_as(c.weight)
        return self.head(torch.relu(F.conv2d(x, w, None, 1, 1)).mean((2, 3)))


def test_a_weight_stored_as_3d_transposes_trains_as_one(tmp_path):
    """TorchScript stores BiT's standardized weight twice, [1, 4, 27] and its transpose
    [1, 27, 4] (for the statistics): only 2-D transposes were tied, so the two trained apart
    (34 tensors for BiT's 25, 2.6e-2 from PyTorch in float64). Tied: PyTorch's losses."""
    torch.manual_seed(0)
    model = StandardizedConv()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = export(model, (3, 6, 6), "torchscript")
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert [kind for _, kind in report.tied.values()] == ["transpose:0,2,1"]
    assert sum(p.role == "parameter" for p in report.params) == 3
    x, y = random_batches(tmp_path, (3, 6, 6))
    trains_like_pytorch(tmp_path, model, state, x, y)


class BilinearHead(nn.Module):
    """nn.Bilinear: the default exporter folds its [5, 4, 4] weight into a [4, 20] view whose
    reshape read its inputs' static sizes."""

    def __init__(self):
        super().__init__()
        self.lin, self.bil = nn.Linear(4, 4), nn.Bilinear(4, 4, 5)

    def forward(self, x):
        return self.bil(torch.tanh(self.lin(x)), x)


def test_a_bilinear_weight_folded_into_a_view_is_named_by_its_parameter(tmp_path):
    """The optimizer records the Bilinear's inputs among the values its weight's view was folded
    from (their sizes fixed the reshape): that read as an expression of data, so the view was
    left without its name (`val_8`), and a glob for `bil.weight` matched nothing. The values the
    graph computes at run time are no part of a folded expression: the view is `bil.weight`."""
    torch.manual_seed(0)
    model = BilinearHead()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4)
    proto = torch.onnx.export(model.eval(), (x,), None, input_names=["x"],
                              output_names=["logits"], dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert {p.alias for p in report.params if p.role == "parameter"} >= {"bil.weight"}
    assert not report.folded
    x, y = random_batches(tmp_path, (4,))
    x = x[:, :4]
    view = next(p.name for p in report.params if p.alias == "bil.weight")
    frozen = Trainer(classifier_config(tmp_path, 3, frozen=["bil.weight"]),
                     stream=io.StringIO())
    assert view not in frozen.names and len(frozen.names) == 3
    trainer = ordered_trainer(tmp_path)
    trainer.fit()
    model.load_state_dict(state)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)


def test_a_folded_expression_ending_in_a_view_is_warned_not_trained_as_the_parameter(tmp_path):
    """The default exporter names BiT's standardized weight after its last op (`view_1`), which
    looked like a view of `conv.weight`: it trained as the standardized weight with no warning.
    The optimizer's record of what the tensor was folded from names `getitem` (the batch_norm),
    so it is an expression: `conv.weight` is warned of as folded, and no alias is claimed."""
    torch.manual_seed(0)
    proto = torch.onnx.export(StandardizedConv().eval(), (torch.randn(2, 3, 6, 6),), None,
                              input_names=["x"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.folded == ["conv.weight"]
    assert not [p for p in report.params if p.alias]
    assert "WARNING" in report.text() and "conv.weight" in report.text()


class TwoNorms(nn.Module):
    """Two fresh LayerNorms (weights all ones, biases all zeros): equal tensors."""

    def __init__(self):
        super().__init__()
        self.l1, self.n1 = nn.Linear(6, 8), nn.LayerNorm(8)
        self.l2, self.n2 = nn.Linear(8, 8), nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.n2(self.l2(torch.tanh(self.n1(self.l1(x))))))


def test_equal_tensors_a_tool_stored_once_are_warned_of(tmp_path):
    """The default exporter's optimizer stores a fresh model's equal LayerNorm weights once,
    and its records let the engine give each its own again. A later tool that drops the
    records (onnx's version converter, onnxsim, onnxoptimizer, onnxruntime's optimizers) left
    them shared, training as one tensor where PyTorch trains two, with no warning."""
    from onnx import version_converter

    torch.manual_seed(0)
    proto = export(TwoNorms(), (6,), "dynamo")
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert not report.shared and "equal values" not in report.text()
    onnx.save(version_converter.convert_version(proto, 21), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert any("read by 2 nodes" in s for s in report.shared)
    assert "WARNING: tensors of equal values" in report.text()
    random_batches(tmp_path, (6,))
    stream = io.StringIO()
    Trainer(classifier_config(tmp_path, steps=1), stream=stream)
    assert "WARNING: tensors of equal values" in stream.getvalue()


class SharedBlock(nn.Module):
    """One block used in two places on 3-D inputs (Zamba's shared transformer block): the
    optimizer folds its Linear's transpose once per use (64 x 64: too large to be stored once
    as equal tensors), and the weight itself is not in the file."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(64, 64, bias=False), nn.LayerNorm(64)
        self.mid, self.head = nn.Linear(64, 64), nn.Linear(64, 5)

    def block(self, x):
        return x + self.proj(self.norm(x))

    def forward(self, x):
        return self.head(self.block(torch.tanh(self.mid(self.block(x)))).mean(1))


def test_a_module_used_twice_trains_one_weight(tmp_path):
    """The two folded transposes held one parameter (the records said so for each) but
    trained apart: 8 tensors for PyTorch's 7, 4e-2 from PyTorch's losses, no warning. Tied
    as copies: PyTorch's tensors and losses; its LayerNorm, shared the same way in PyTorch,
    is not warned of as merged."""
    torch.manual_seed(0)
    model = SharedBlock()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    onnx.save(export(model, (4, 64), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert [kind for _, kind in report.tied.values()] == ["copy"]
    assert not report.shared and "WARNING" not in report.text()
    x, y = random_batches(tmp_path, (4, 64))
    trainer = ordered_trainer(tmp_path)
    assert len(trainer.names) == len(list(model.parameters()))
    trainer.fit()
    model.load_state_dict(state)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)
    out = onnx.load(str(tmp_path / "out.onnx"))
    copies = [numpy_helper.to_array(t) for t in out.graph.initializer if t.name in report.tied]
    sources = [numpy_helper.to_array(t) for t in out.graph.initializer
               if t.name in {s for s, _ in report.tied.values()}]
    np.testing.assert_array_equal(copies[0], sources[0])  # (exported from the one tensor)


class RoutedExpert(nn.Module):
    """One expert of a sparse mixture: the tokens it gets are picked by torch.nonzero."""

    def __init__(self):
        super().__init__()
        self.gate, self.expert = nn.Linear(4, 2, bias=False), nn.Linear(4, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        p = torch.softmax(self.gate(x), -1)
        sel = torch.nonzero(p[:, 0] > 0.5)[:, 0]
        h = self.expert(x[sel]) * p[sel, :1]
        return self.head(torch.zeros_like(x).index_add(0, sel, h))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_an_expert_routed_by_the_data_trains_like_pytorch(tmp_path, exporter):
    """The tokens an expert gets (torch.nonzero of the router's choice) number differently in
    every batch; the gradient graph held the sizes of its zero-input probe (a Reshape to 0
    rows: every sparse mixture of experts stopped at its first batch). Sizes that follow the
    data are now read at run time: PyTorch's losses over 20 batches of varying counts."""
    torch.manual_seed(0)
    model = RoutedExpert()
    with torch.no_grad():
        model.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    onnx.save(export(model, (4,), exporter), str(tmp_path / "model.onnx"))
    x, y = random_batches(tmp_path, (4,))
    counts = {int((x[i:i + BATCH, 0] > 0).sum()) for i in range(0, 64, BATCH)}
    assert len(counts) > 1  # (the test means something: the routed count varies)
    trains_like_pytorch(tmp_path, model, state, x, y)


class SplitExperts(nn.Module):
    """GraniteMoE's dispatch: tokens sorted by their expert and split by counts computed from
    the router's choices (no NonZero: a Split whose sizes are values)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 2, bias=False)
        self.e0, self.e1, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 5)

    def forward(self, x):
        g = self.gate(x)
        choice = (g[:, 0] > g[:, 1]).long()
        order = torch.sort(choice.float() * 100 + torch.arange(x.shape[0]) * 0.01).indices
        sizes = torch.stack([(choice == 0).sum(), (choice == 1).sum()]).tolist()
        a, b = x[order].split(sizes, dim=0)
        h = torch.cat([self.e0(a), self.e1(b)], 0)
        return self.head(torch.zeros_like(x).index_add(0, order, h))


def test_experts_split_by_computed_counts_train_like_pytorch(tmp_path):
    """A Split whose sizes are counted from the data, and the Concat after it: their gradients
    split by the probe's counts (13 rows against 24 in GraniteMoE). Read at run time now."""
    torch.manual_seed(0)
    model = SplitExperts()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    onnx.save(export(model, (4,), "dynamo"), str(tmp_path / "model.onnx"))
    x, y = random_batches(tmp_path, (4,))
    trains_like_pytorch(tmp_path, model, state, x, y)


class FirstRoutedToken(RoutedExpert):
    """A TorchScript trace of an expert loop (Hugging Face's Qwen2-MoE, Switch, NLLB-MoE): the
    trace keeps the loop over the experts it saw, each reading its hit by a fixed index
    (torch.nonzero(...)[0]). On all-zero inputs nothing is routed, so that index is out of
    range; on real batches something always is."""

    def forward(self, x):
        p = torch.softmax(self.gate(x), -1)
        first = torch.nonzero(p[:, 0] > 0.5)[0]
        h = self.expert(x[first]) * p[first, :1]
        return self.head(x + torch.zeros_like(x).index_add(0, first, h))


def test_the_graph_is_built_on_the_first_batch_not_on_zeros(tmp_path):
    """The training graph's shapes come from a run of the forward graph; it ran on zeros,
    where this model's trace fails (its Gather of the first routed token finds none: every
    TorchScript export of a Hugging Face sparse mixture stopped before training). It runs on
    the first batch of the data now: PyTorch's losses."""
    torch.manual_seed(1)  # (the export's random sample routes a token too)
    model = FirstRoutedToken()
    with torch.no_grad():
        model.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    onnx.save(export(model, (4,), "torchscript"), str(tmp_path / "model.onnx"))
    x, y = random_batches(tmp_path, (4,))
    x[::BATCH, 0] = np.abs(x[::BATCH, 0]) + 0.1  # (a token routed in every batch)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    trains_like_pytorch(tmp_path, model, state, x, y)


class TrimmedEncoder(nn.Module):
    """An attention block over a padded batch trimmed to its longest row first (as unpadding
    code does): a Slice whose end is computed from the data, then every size after it."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(20, 16), nn.LayerNorm(16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):  # x [N, 8]: token ids as floats, 0 = padding at the end
        ids = x.long()
        ids = ids[:, :(ids != 0).sum(1).max()]
        mask = (ids != 0).float()
        h = self.emb(ids)
        a = self.ln(h)
        s = self.q(a) @ self.k(a).transpose(1, 2) / 4.0 + (1 - mask[:, None, :]) * -1e4
        h = h + torch.softmax(s, -1) @ self.v(a)
        h = h + self.ff(self.ln(h))
        return self.head((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


def test_a_batch_trimmed_to_its_longest_row_trains_like_pytorch(tmp_path):
    """The Slice's gradient needed its end at build time ("must be a constant"), and the
    gradients after it (a Linear's on [N, L, D] rows, sums and means over L) held L from the
    build's run. The Slice's is computed at run time now (Range, the same Slice, a scatter
    into zeros), the others read L at run time: PyTorch's losses over batches of 3 to 8."""
    torch.manual_seed(0)
    model = TrimmedEncoder()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # (a sample of token ids, as export() draws normals)
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randint(1, 20, (2, 8)).float(),),
                          str(tmp_path / "model.onnx"), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "N"}})
    rng = np.random.default_rng(0)
    x = rng.integers(1, 20, (64, 8)).astype(np.float32)
    lengths = np.minimum(rng.integers(1, 9, 64), 3 + np.arange(64) // BATCH % 6)
    x[np.arange(8)[None, :] >= lengths[:, None]] = 0
    y = rng.integers(0, 5, 64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    assert len({int(lengths[i:i + BATCH].max()) for i in range(0, 64, BATCH)}) > 2
    trains_like_pytorch(tmp_path, model, state, x, y)


def test_a_failed_step_where_sizes_follow_the_data_names_those_nodes():
    """A step that still fails on such a path (a gradient holding a size from the build's run)
    names the NonZero nodes and what to export instead; other models add nothing."""
    from trainer.train import data_dependent_hint

    proto = export(RoutedExpert(), (4,), "dynamo")
    hint = data_dependent_hint(proto)
    assert "NonZero" in hint and "dense form" in hint
    assert data_dependent_hint(export(TwoNorms(), (6,), "dynamo")) == ""


class BufferMLPBias(nn.Module):
    """Swinv2's continuous position bias: an MLP applied to a fixed coordinate table (a buffer),
    its first Linear folded with the table by the optimizer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("coords", torch.linspace(-1, 1, 72).reshape(36, 2))
        # (the first Linear's output, 36 x 256, is over the optimizer's size limit for folding
        # further: only that Linear folds, as Swinv2's [1, 7, 7, 512])
        self.cpb = nn.Sequential(nn.Linear(2, 256), nn.ReLU(), nn.Linear(256, 1, bias=False))
        self.fc = nn.Linear(36, 5)

    def forward(self, x):
        return self.fc(x + self.cpb(self.coords).reshape(1, 36))


def test_a_linear_folded_with_a_buffer_is_warned_of(tmp_path):
    """The optimizer folds `Linear(coords)` into one [36, 256] tensor; the node reading it still
    names the Linear's weight in its FX record, so the weight passed for a transposed copy and
    trained as the product, silently. The optimizer's record says the tensor came from the
    weight and the buffer: the weight is warned of as folded."""
    torch.manual_seed(0)
    onnx.save(export(BufferMLPBias(), (36,), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert "cpb.0.weight" in report.folded
    assert "cpb.2.weight" not in report.folded


class TwoScales(nn.Module):
    """PoolFormer's block: two layer scales of one module, each read through a folded view
    (`scale.unsqueeze(-1).unsqueeze(-1)`)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.scale_1 = nn.Parameter(torch.rand(4) + 0.5)
        self.scale_2 = nn.Parameter(torch.rand(4) + 0.5)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = self.scale_1.unsqueeze(-1).unsqueeze(-1) * self.conv1(x)
        x = x + self.scale_2.unsqueeze(-1).unsqueeze(-1) * torch.tanh(self.conv2(x))
        return self.head(x.mean((2, 3)))


def test_two_folded_views_in_one_module_are_each_its_parameter(tmp_path):
    """Two parameters of one module folded into views: the module rule (one missing parameter,
    one view) could not pair them and warned both as folded, though they trained right. The
    optimizer's records name each view's parameter: no warning, each an alias, PyTorch's
    losses."""
    torch.manual_seed(0)
    model = TwoScales()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    onnx.save(export(model, (3, 6, 6), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert not report.folded and "WARNING" not in report.text()
    assert sorted(p.alias for p in report.params if p.alias) == ["scale_1", "scale_2"]
    x, y = random_batches(tmp_path, (3, 6, 6))
    trainer = ordered_trainer(tmp_path)
    assert sorted(int(np.prod(trainer.shapes[k])) for k in trainer.names) == \
        sorted(int(p.numel()) for p in model.parameters())
    trainer.fit()
    model.load_state_dict(state)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)


class FixedPositions(nn.Module):
    """Whisper's encoder: positions from an Embedding looked up by torch.arange, kept fixed
    (requires_grad=False), inside a submodule."""

    def __init__(self):
        super().__init__()
        self.proj, self.pos = nn.Linear(4, 8), nn.Embedding(5, 8)
        self.pos.requires_grad_(False)

    def forward(self, x):
        return self.proj(x) + self.pos(torch.arange(5))


class PositionsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = FixedPositions(), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def test_a_folded_embedding_slice_is_named_by_its_table(tmp_path):
    """The optimizer folds `self.pos(torch.arange(5))` into `embedding`, the table's rows; the
    Embedding keeps no node. It was an unnamed tensor: `frozen: [enc.pos.weight]`, as README
    says for Whisper's fixed positions, matched nothing. It is an alias of the table: the
    PyTorch name freezes it, no fold is warned of, and the losses are PyTorch's."""
    torch.manual_seed(0)
    model = PositionsModel()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    onnx.save(export(model, (5, 4), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert not report.folded
    assert [p.name for p in report.params if p.alias == "enc.pos.weight"] == ["embedding"]
    x, y = random_batches(tmp_path, (5, 4))
    _frozen_alias_trains_like_pytorch(tmp_path, model, state, x, y, "enc.pos.weight", "x",
                                      "embedding")


def _frozen_alias_trains_like_pytorch(tmp_path, model, state, x, y, frozen: str, feed: str,
                                      alias: str) -> None:
    """Train model.onnx with `frozen` (a glob reaching the folded tensor `alias`) on data.npz
    (x, y) in order, the data fed to input `feed`: `alias` is not trained, and the losses are
    PyTorch's from `state` with the frozen tensors' requires_grad off."""
    cfg = classifier_config(tmp_path, STEPS, log={"every_steps": 1}, frozen=[frozen],
                            data={"train": {"path": "data.npz", "inputs": {feed: "x"},
                                            "targets": {"label": "y"}},
                                  "batch_size": BATCH, "shuffle": False})
    trainer = Trainer(cfg, stream=io.StringIO())
    assert alias not in trainer.names
    trainer.fit()
    model.load_state_dict(state)
    for name, param in model.named_parameters():
        if fnmatch.fnmatch(name, frozen):
            param.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y, opt=opt), rtol=2e-4, atol=2e-5)


class UnsqueezedPositions(nn.Module):
    """BERT/GPT-style positions: an Embedding looked up by torch.arange, then given a batch
    axis (`[None]`), added to token embeddings."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(20, 8), nn.Embedding(6, 8), nn.Linear(8, 5)

    def forward(self, ids):
        return self.head((self.tok(ids) + self.pos(torch.arange(ids.shape[1]))[None]).mean(1))


def test_a_folded_lookup_under_a_view_is_named_by_its_table(tmp_path):
    """`self.pos(torch.arange(t))[None]` folds into a tensor named `unsqueeze` (the view's FX
    value, not `embedding`): it was a trained tensor of no parameter, so `frozen: [pos.weight]`
    was refused ("matches no float initializer") and `frozen: ["pos.*"]` silently trained
    it. It is an alias of the table: the glob freezes it, and the losses are PyTorch's."""
    torch.manual_seed(0)
    assert _lookup_alias_trains_like_pytorch(tmp_path, UnsqueezedPositions(), "pos.weight",
                                             "pos.*") == "unsqueeze"


def _lookup_alias_trains_like_pytorch(tmp_path, model: nn.Module, table: str,
                                      frozen: str) -> str:
    """Export `model` (token ids [N, 6] of 20 -> 5 logits) with the default exporter, its
    optimizer on: no fold is warned of, one tensor is an alias of `table`, and with `frozen`
    the run's losses are PyTorch's; returns that tensor's name."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 20, (2, 6))
    onnx.save(torch.onnx.export(model.eval(), (ids,), input_names=["ids"], output_names=["logits"],
                                dynamic_shapes={"ids": {0: torch.export.Dim("batch")}},
                                dynamo=True, verbose=False).model_proto,
              str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert not report.folded
    (alias,) = [p.name for p in report.params if p.alias == table]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 20, (64, 6)), rng.integers(0, 5, 64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    _frozen_alias_trains_like_pytorch(tmp_path, model, state, x, y, frozen, "ids", alias)
    return alias


class RotaryHalves(nn.Module):
    """RoFormer's attention: the sinusoidal table it is given split into its sin and cos
    halves (`chunk`), applied to the input."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)

    def forward(self, x, pos):
        sin, cos = pos.chunk(2, dim=-1)
        h = self.l(x)[:, None]
        return (h[..., :4] * cos - h[..., 4:] * sin).mean(1)


class RoformerPositions(nn.Module):
    """RoFormer's encoder: `self.embed_positions(arange(t))[None, None]` handed to a layer,
    which chunks it."""

    def __init__(self):
        super().__init__()
        self.tok, self.embed_positions = nn.Embedding(20, 8), nn.Embedding(6, 8)
        self.layer, self.head = RotaryHalves(), nn.Linear(4, 5)

    def forward(self, ids):
        pos = self.embed_positions(torch.arange(ids.shape[1]))[None, None]
        return self.head(self.layer(self.tok(ids), pos).mean(1))


def test_a_folded_lookup_that_a_split_of_no_module_reads_is_named_by_its_table(tmp_path):
    """The optimizer folds the lookup into `unsqueeze_*` and leaves the chunk a Split that
    records no module: the tensor was trained as one of no parameter, and `frozen:
    [embed_positions.weight]` (README, for RoFormer's fixed sinusoidal table) was refused
    ("matches no float initializer"). The optimizer's record of the fold names the table."""
    torch.manual_seed(0)
    _lookup_alias_trains_like_pytorch(tmp_path, RoformerPositions(), "embed_positions.weight",
                                      "embed_positions.weight")


class MaskToken(nn.Module):
    """A parameter that the exported forward does not use (DINOv2's `mask_token`, read only
    when the optional `bool_masked_pos` is given)."""

    def __init__(self):
        super().__init__()
        self.l, self.mask_token = nn.Linear(8, 5), nn.Parameter(torch.zeros(1, 8))
        self.register_buffer("scale", torch.linspace(1, 2, 5))

    def forward(self, x, masked=None):
        if masked is not None:
            x = torch.where(masked, self.mask_token, x)
        return self.l(x) * (2 * self.scale)  # (a constant the optimizer folds)


def test_a_parameter_the_export_does_not_use_is_not_called_folded(tmp_path):
    """The default exporter leaves an unused parameter out of the graph with its optimizer on
    or off. Without the optimizer nothing is folded (every initializer is one the signature
    names), so the missing parameter is an unused one: no warning (PyTorch gives it no
    gradient either). With the optimizer on, `check` cannot tell it from a folded one, and the
    warning says that an unused parameter needs nothing."""
    model = MaskToken().eval()
    unfolded = torch.onnx.export(model, (torch.randn(2, 8),), None, input_names=["x"],
                                 output_names=["logits"], optimize=False,
                                 dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    onnx.save(unfolded, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.ok and not report.folded and "WARNING" not in report.text()
    onnx.save(export(model, (8,), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.folded == ["mask_token"] and "does not use" in report.text()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_batchnorm_an_eval_export_folded_into_conv_is_named_before_training(tmp_path, exporter):
    """Exported in eval mode at the exporters' defaults, ConvBN's BatchNormalization layers are
    folded into the convolutions before them (the default exporter's optimizer; TorchScript's
    eval-mode export): `check` and `train` name them and say how to export instead, and the
    folded convolutions train under their own names (none is renamed after a BatchNorm
    tensor)."""
    model = ConvBN().eval()
    x = torch.randn(2, 1, 6, 6)
    if exporter == "dynamo":
        proto = torch.onnx.export(model, (x,), None, input_names=["x"], output_names=["logits"],
                                  dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    else:
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), f, dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "N"}})
        proto = onnx.load_from_string(f.getvalue())
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert len(report.fused) == 2
    if exporter == "dynamo":
        assert report.fused == ["bn", "bn2"]
    text = report.text()
    assert "WARNING" in text and "BatchNormalization" in text and "optimize=False" in text \
        and "TrainingMode.TRAINING" in text
    assert not any("bn" in name for name in report.untied)
    trained = [p.name for p in report.params if p.role == "parameter"]
    if exporter == "dynamo":  # (the folded shifts, zero and dropped, come back as biases)
        assert sorted(trained) == ["c.weight", "c.weight_bias", "c2.weight", "c2.weight_bias",
                                   "fc.bias", "fc.weight"]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((32, 1, 6, 6)).astype(np.float32),
             y=rng.integers(0, 5, 32))
    cfg = classifier_config(tmp_path, steps=2)
    stream = io.StringIO()
    trainer = Trainer(cfg, stream=stream)
    assert sorted(trainer.names) == sorted(trained)
    assert "WARNING" in stream.getvalue() and "BatchNormalization" in stream.getvalue()
    out = onnx.load(trainer.fit()["output"])
    shapes = {t.name: list(t.dims) for t in out.graph.initializer}
    assert all(shapes[t.name] == list(t.dims) for t in proto.graph.initializer)
    if exporter == "dynamo":
        assert shapes["c.weight"] == [4, 1, 3, 3] and not any("bn" in k for k in shapes)


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_a_weight_parametrization_folded_by_torchscript_is_named_not_called_batchnorm(tmp_path,
                                                                                     layer):
    """weight_norm's weight (g * v / |v|), folded by TorchScript's constant folding into one
    tensor (opset 14), keeps the module's own bias: `check` says the convolution (or, on a
    Linear, the Gemm: not warned of before) trains a computed weight, and does not call it a
    folded BatchNormalization."""
    wn = nn.utils.parametrizations.weight_norm
    model = nn.Sequential(wn(nn.Conv2d(1, 4, 3)), nn.Flatten(), nn.Linear(64, 5)).eval() \
        if layer == "conv" else nn.Sequential(nn.Flatten(), wn(nn.Linear(36, 5))).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 1, 6, 6),), f, dynamo=False, opset_version=14,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}})
    (tmp_path / "model.onnx").write_bytes(f.getvalue())
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert not report.fused and len(report.computed) == 1
    assert "weight_norm" in report.text() and "do_constant_folding=False" in report.text()


class ShiftedNormRotary(nn.Module):
    """Gemma's RMSNorm scales by (1 + weight), which the default exporter folds into a constant
    (the parameter is lost: warned), next to rotary tables folded from a buffer."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.zeros(d))
        self.rot = Rotary(d)

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.norm_weight)
        return self.rot(x)


def test_a_folded_parameter_expression_does_not_keep_buffer_tables_trainable(tmp_path):
    """The folded `1 + weight` leaves a parameter unaccounted for; the rotary tables, read
    only in another module, are still left out as computed constants, while the folded norm
    scale (read in the parameter's module) trains as it is, and the warning names the weight."""
    model = ShiftedNormRotary()
    onnx.save(export(model, (6, 8), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.folded == ["norm_weight"]
    trained = {p.name: p.shape for p in report.params if p.role == "parameter"}
    computed = [p for p in report.params if "computed from buffers" in p.reason]
    assert len(computed) == 2 and all(p.shape == (6, 8) for p in computed)  # cos, sin
    assert list(trained.values()).count((8,)) == 2  # the folded 1 + weight, rot.q.bias
    assert sorted(k for k in trained if k.startswith("rot.")) == [
        "rot.head.bias", "rot.head.weight", "rot.q.bias"] and len(trained) == 5  # + q.weight^T


class PaddedBag(nn.Module):
    """Token embeddings with a padding row (nn.Embedding(padding_idx=...), as every HF text
    model has), averaged over the sequence, and a head."""

    def __init__(self, pad: int):
        super().__init__()
        self.emb, self.head = nn.Embedding(12, 6, padding_idx=pad), nn.Linear(6, 5)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


@pytest.mark.parametrize("pad", [0, 11])
def test_embedding_padding_row_gets_no_gradient_as_in_pytorch(tmp_path, pad):
    """PyTorch never updates nn.Embedding's padding_idx row; the default exporter records
    padding_idx in the Gather's FX node, and the engine's Gather gradient leaves that row out:
    the same losses and the row unchanged, with the padding token in the data."""
    torch.manual_seed(5)
    model = PaddedBag(pad)
    with torch.no_grad():
        model.emb.weight[pad] = 0.5  # (a row of zeros would stay zero either way with SGD)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = torch.onnx.export(model.eval(), (torch.zeros(2, 7, dtype=torch.int64),), None,
                              input_names=["ids"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    model.load_state_dict(state)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 12, (64, 7)).astype(np.int64)
    assert (ids == pad).sum() > 20
    y = rng.integers(0, 5, 64).astype(np.int64)
    np.savez(tmp_path / "data.npz", ids=ids, y=y)
    cfg = config_from_dict({
        "model": "model.onnx", "output": "out.onnx", "device": "cpu",
        "data": {"train": {"path": "data.npz", "inputs": {"ids": "ids"},
                           "targets": {"label": "y"}}, "batch_size": BATCH, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": LR}, "steps": STEPS, "log": {"every_steps": 1}},
        tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    result = trainer.fit()
    ours = [r["loss"] for r in trainer.history if "loss" in r]
    np.testing.assert_allclose(ours, torch_losses(model, ids, y), rtol=2e-5, atol=2e-6)
    table = {t.name: onnx.numpy_helper.to_array(t)
             for t in onnx.load(result["output"]).graph.initializer}["emb.weight"]
    np.testing.assert_array_equal(table[pad], np.full(6, 0.5, np.float32))
    np.testing.assert_allclose(table, model.emb.weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_an_embedding_with_max_norm_is_warned_of(tmp_path):
    """nn.Embedding(max_norm) renormalizes its rows in place outside autograd; the default
    exporter writes that as graph ops (recorded as aten.embedding_renorm), which training goes
    through: losses leave PyTorch's (2e-4 in float64 over 4 steps), silently before."""
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(10, 6, max_norm=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(model.eval(), (torch.ones(2, 5, dtype=torch.int64),), None,
                                  input_names=["x"], output_names=["logits"],
                                  dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    report = model_report(proto)
    assert report.renorms == ["emb"]
    assert "WARNING: nn.Embedding(max_norm=...) renormalizes the rows" in report.text()
    assert model_report(export(nn.Linear(4, 5), (4,), "dynamo")).renorms == []


class BiLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(4, 6, batch_first=True, bidirectional=True), nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.lstm(x)[0].mean(1))


def test_globs_name_the_parameters_a_recurrent_layers_packed_tensors_hold(tmp_path):
    """The default exporter packs an LSTM's weights per kind into the ONNX LSTM's W, R and B,
    named val_N: `frozen: ["lstm.weight_hh*"]` matched nothing. The optimizer's records name
    the parameters each packed tensor holds; a glob naming any of them names it."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # (torch's own note on nn.LSTM's _flat_weights)
        warnings.simplefilter("ignore")
        onnx.save(export(BiLSTM(), (7, 4), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    packed = {p.name: p.alias for p in report.params if p.alias}
    assert sorted(packed.values()) == [
        "lstm.bias_hh_l0, lstm.bias_hh_l0_reverse, lstm.bias_ih_l0, lstm.bias_ih_l0_reverse",
        "lstm.weight_hh_l0, lstm.weight_hh_l0_reverse",
        "lstm.weight_ih_l0, lstm.weight_ih_l0_reverse"], packed
    assert "tensors that pack several PyTorch parameters" in report.text()
    x, y = random_batches(tmp_path, (7, 4))
    cfg = classifier_config(tmp_path, 2, frozen=["lstm.weight_hh*"])
    log = io.StringIO()
    t = Trainer(cfg, stream=log)
    hh = next(k for k, v in packed.items() if "weight_hh" in v)
    assert hh not in t.names and len(t.names) == 4
    assert "packed" not in log.getvalue()  # (the glob names both directions)
    # one direction alone: the whole tensor is frozen, and train says so
    log = io.StringIO()
    t = Trainer(classifier_config(tmp_path, 2, frozen=["lstm.weight_hh_l0"]), stream=log)
    assert hh not in t.names
    assert f"warning: frozen 'lstm.weight_hh_l0' names lstm.weight_hh_l0, which the export " \
        f"packed into one tensor '{hh}' with lstm.weight_hh_l0_reverse: it acts on all of " \
        "them" in log.getvalue()


class StackedRNN(nn.Module):
    """Two stacked layers with zero-initialized biases (a common init)."""

    def __init__(self, cls=nn.LSTM):
        super().__init__()
        self.rnn, self.head = cls(4, 6, num_layers=2, batch_first=True), nn.Linear(6, 5)
        for name, p in self.rnn.named_parameters():
            if "bias" in name:
                nn.init.zeros_(p)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_stacked_recurrent_layers_with_zero_biases_train_like_pytorch(tmp_path, cls):
    """The default exporter's optimizer stored both layers' zero B (bias_ih and bias_hh,
    packed) as one tensor, which trained as one (losses 6e-4 off PyTorch's; the warning
    about equal tensors advised training the exporter's own output, which this was). Each
    layer reads its own copy, named and aliased after its parameters; and a unidirectional
    layer's W and R, one parameter each, are aliased too, so globs name them."""
    torch.manual_seed(3)
    model = StackedRNN(cls)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(export(model, (7, 4), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    aliases = sorted(p.alias for p in report.params if p.alias)
    assert aliases == ["rnn.bias_hh_l0, rnn.bias_ih_l0", "rnn.bias_hh_l1, rnn.bias_ih_l1",
                       "rnn.weight_hh_l0", "rnn.weight_hh_l1", "rnn.weight_ih_l0",
                       "rnn.weight_ih_l1"], aliases
    assert "tensors of equal values" not in report.text()
    x, y = random_batches(tmp_path, (7, 4))
    log = io.StringIO()
    trainer = ordered_trainer(tmp_path, stream=log)
    assert len(trainer.names) == 8  # (PyTorch's 10, the biases packed per layer)
    assert "tensors of equal values" not in log.getvalue()
    trainer.fit()
    model.load_state_dict(state)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)
    # a glob naming one layer's input weights freezes that tensor alone
    t = Trainer(classifier_config(tmp_path, 2, frozen=["rnn.weight_ih_l1"]), stream=io.StringIO())
    w = next(p.name for p in report.params if p.alias == "rnn.weight_ih_l1")
    assert w not in t.names and len(t.names) == 7


class OutputScale(nn.Module):
    """A learned scale of the output, initialized to 1 (`logits * s`)."""

    def __init__(self):
        super().__init__()
        self.lin, self.s = nn.Linear(8, 5), nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.lin(x) * self.s


class HiddenScale(OutputScale):
    def forward(self, x):
        return torch.relu(self.lin(x) * self.s)


@pytest.mark.parametrize("cls", [OutputScale, HiddenScale], ids=["output", "hidden"])
def test_a_parameter_of_ones_multiplied_away_is_warned_of(tmp_path, cls):
    """The default exporter's optimizer removes a product by a fresh parameter of ones, and
    the parameter with it: nothing else was folded, so the check that warns of parameters the
    optimizer removed stayed silent and the run trained without it. The FX node of the product
    is gone from a graph whose nodes (or outputs) read it: warned, by name."""
    torch.manual_seed(0)
    proto = export(cls(), (8,), "dynamo")
    report = model_report(proto)
    assert report.folded == ["s"]
    assert "a product by a fresh parameter of ones" in report.text()
    # optimize=False keeps the product, and the parameter trains
    proto = torch.onnx.export(cls().eval(), (torch.randn(2, 8),), None, input_names=["x"],
                              output_names=["logits"], optimize=False).model_proto
    report = model_report(proto)
    assert report.folded == [] and "s" in [p.name for p in report.params
                                           if p.role == "parameter"]


class SelfDistances(nn.Module):
    """Pairwise distances of a batch's rows to each other (torch.cdist(h, h): zero on the
    diagonal), as metric-learning heads compute them."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 3), nn.Linear(3, 5)

    def forward(self, x):  # x [N, 6, 4]: six points per sample
        h = self.proj(x)
        return self.head(torch.cdist(h, h).mean(2) @ h / 6.0).mean(1)


def test_pairwise_distances_with_zeros_train_like_pytorch(tmp_path):
    """TorchScript writes torch.cdist as Pow(ReduceSum(Pow(d, 2)), 0.5): its gradient at a
    zero distance was 0.5 / sqrt(0) * 2 d = inf * 0, NaN at step 1; torch.cdist's is 0. The
    training graph computes that norm as ReduceL2 now, whose gradient is torch's. (The default
    exporter has no translation of cdist in torch 2.13.)"""
    torch.manual_seed(4)
    model = SelfDistances()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    onnx.save(export(model, (6, 4), "torchscript"), str(tmp_path / "model.onnx"))
    model.load_state_dict(state)
    x, y = random_batches(tmp_path, (6, 4))
    trains_like_pytorch(tmp_path, model, state, x, y)


class PaddedSumBag(nn.Module):
    """nn.EmbeddingBag(mode="sum", padding_idx=0): the default exporter writes a Loop over the
    bags whose body skips padding tokens in an If on the data and sums each bag's rows."""

    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(12, 6, mode="sum", padding_idx=0), nn.Linear(6, 5)

    def forward(self, ids):
        return self.head(self.bag(ids))


def test_a_bag_that_skips_padding_in_control_flow_trains_like_pytorch(tmp_path):
    """The lowering folded the Size of the If's output (a bag's list of kept tokens) from the
    probe's batch, all zeros: the training graph's forward summed other rows than the model's
    (loss 1.03 against 0.86 at step 1) and the bag's table was not trained. Shapes of control
    flow the data decides are read at run time now, in the forward and in the If's gradient:
    PyTorch's losses and table."""
    torch.manual_seed(2)
    model = PaddedSumBag()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(model.eval(), (torch.ones(2, 5, dtype=torch.int64),), None,
                                  input_names=["x"], output_names=["logits"],
                                  dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    assert any(n.op_type == "Loop" for n in proto.graph.node)
    model.load_state_dict(state)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 12, (64, 5)).astype(np.int64)
    ids[np.arange(5)[None, :] >= rng.integers(1, 6, 64)[:, None]] = 0  # (padding at the end)
    y = rng.integers(0, 5, 64).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=ids, y=y)
    trainer = trains_like_pytorch(tmp_path, model, state, ids, y)
    np.testing.assert_allclose(trainer.trained_values()["bag.weight"],
                               model.bag.weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_glob_for_names_that_constant_folding_removed_says_why(tmp_path):
    """TorchScript's constant folding stores LoRA adapters as transposes named onnx::MatMul_*:
    `trainable: ["*lora*"]` then matches nothing, and the error says why and how to export."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LoRANet().eval(), (torch.randn(2, 8),), f, dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}})
    (tmp_path / "model.onnx").write_bytes(f.getvalue())
    np.savez(tmp_path / "data.npz", x=np.zeros((16, 8), np.float32), y=np.zeros(16, np.int64))
    cfg = config_from_dict({
        "model": "model.onnx", "output": "out.onnx", "device": "cpu", "trainable": ["*lora*"],
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": BATCH},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": LR}, "steps": 1}, tmp_path)
    with pytest.raises(ModelError, match=r"trainable entry '\*lora\*' matches no float "
                       r"initializer.*onnx::MatMul_.*do_constant_folding=False"):
        Trainer(cfg, stream=io.StringIO())


def _opset9_gru(path):
    """x [N, 5, 3] -> GRU (opset 9, as PyTorch exported by default before 1.12) -> the mean of
    its outputs over time -> [N, 4]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    ws = {"W": (1, 12, 3), "R": (1, 12, 4), "B": (1, 24)}
    g = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
         helper.make_node("GRU", ["xt", "W", "R", "B"], ["y"], hidden_size=4),
         helper.make_node("Squeeze", ["y"], ["ys"], axes=[1]),
         helper.make_node("ReduceMean", ["ys"], ["out"], axes=[0], keepdims=0)], "gru9",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), k)
         for k, s in ws.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)]), str(path))


def test_an_opset_9_recurrent_model_trains_as_its_opset_11_conversion(tmp_path):
    """The recurrent gradient rules need opset 10: an opset-9 GRU (refused until now, "convert
    it with onnx.version_converter") trains through a converted copy of its training graph,
    exactly as the model converted by hand; `check` has no problem with it; the export keeps
    opset 9 and the model's own nodes."""
    from onnx import version_converter

    from trainer import report

    _opset9_gru(tmp_path / "m9.onnx")
    onnx.save(version_converter.convert_version(onnx.load(str(tmp_path / "m9.onnx")), 11),
              str(tmp_path / "m11.onnx"))
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 5, 3)).astype(np.float32),
             y=rng.standard_normal((16, 4)).astype(np.float32))
    runs = {}
    for name in ("m9", "m11"):
        raw = {"model": f"{name}.onnx", "output": f"{name}_out.onnx", "device": "cpu",
               "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                                  "targets": {"t": "y"}}, "batch_size": 8, "shuffle": False},
               "loss": {"type": "mse", "output": "out", "target": "t"},
               "optimizer": {"type": "adamw", "lr": 0.01}, "steps": 4, "log": {"every_steps": 1}}
        cfg = config_from_dict(raw, tmp_path)
        assert not report.preflight(cfg).problems
        log = io.StringIO()
        t = Trainer(cfg, stream=log)
        t.fit()
        runs[name] = ([r["loss"] for r in t.history if "loss" in r], t.trained_values(),
                      log.getvalue())
    np.testing.assert_array_equal(runs["m9"][0], runs["m11"][0])
    for k in ("W", "R", "B"):
        np.testing.assert_array_equal(runs["m9"][1][k], runs["m11"][1][k])
    assert "opset 9 to 11" in runs["m9"][2]
    out = onnx.load(str(tmp_path / "m9_out.onnx"))
    assert out.opset_import[0].version == 9 and [n.op_type for n in out.graph.node] == \
        ["Transpose", "GRU", "Squeeze", "ReduceMean"]


def test_a_one_element_parameter_named_as_a_module_parameter_is_trained(tmp_path):
    """A regression head (nn.Linear(hidden, 1): num_labels=1 rerankers, reward models) has a
    one-element bias. One-element tensors are left out as the exporters' constants (epsilons,
    scales) unless the export's signature says parameter; TorchScript keeps the module's name
    (`classifier.bias`) but writes no signature, so the bias stayed fixed and the run drifted
    from PyTorch's (4e-4 in 3 steps on optimum's BERT). A one-element tensor named like a
    module's weight or bias trains; an exporter's constant (`onnx::Mul_7`) still does not."""
    from trainer.autodiff import build_training_graph, training_info

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1))
    x = torch.randn(16, 4)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["score"],
                          dynamic_axes={"x": {0: "N"}}, dynamo=False)
    m = onnx.load(str(path))
    names = {t.name for t in m.graph.initializer}
    assert "0.bias" in names and [t.dims for t in m.graph.initializer if t.name == "0.bias"] \
        == [[1]]
    # an exporter constant of one element beside it: score * 0.5
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32),
                                                            "onnx::Mul_7"))
    m.graph.node.append(onnx.helper.make_node("Mul", ["score", "onnx::Mul_7"], ["half"]))
    m.graph.output.append(onnx.helper.make_tensor_value_info("half", 1, ["N", 1]))
    info = training_info(build_training_graph(m, {"type": "mse", "output": "half",
                                                  "target": "t"}, batch_size=2))
    assert set(info.gradients) == {"0.weight", "0.bias"}


class LayerScaleBlock(nn.Module):
    """LayerNorms and a layer-scale gamma that all start as ones (XCiT's, CaiT's): the default
    exporter's optimizer stores equal tensors once."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm3 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.gamma1 = nn.Parameter(torch.ones(8))

    def forward(self, x):
        x = x + self.gamma1 * self.fc(self.norm1(x))
        return x + self.norm3(x)


class LayerScaleBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(LayerScaleBlock(), LayerScaleBlock())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


def test_every_merged_parameter_is_given_back_in_one_repair(tmp_path):
    """Given back one pass at a time, some merged parameters were found only once others had
    been (an ambiguous match settled), and building the training graph, which repairs again,
    named parameters the trainer did not hold: timm's xcit_nano ended in an internal KeyError
    ('blocks.0.norm3.weight'). The repair now runs to a fixed point: the trainer trains
    PyTorch's 16 tensors, and a second repair finds nothing."""
    from trainer.autodiff.params import repair_exported_model

    torch.manual_seed(0)
    model = LayerScaleBlocks()
    proto = export(model, (8,), "dynamo")
    assert len(proto.graph.initializer) < 16  # (the exporter merged the equal ones)
    once = onnx.ModelProto()
    once.CopyFrom(proto)
    assert repair_exported_model(once) and repair_exported_model(once) == []
    onnx.save(proto, str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 8)).astype(np.float32),
             y=rng.integers(0, 3, 16))
    cfg = config_from_dict({
        "model": "m.onnx", "output": "o.onnx", "device": "cpu", "steps": 2,
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": 8},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "adamw", "lr": 1e-3}}, tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    trainer.fit()
    assert sorted(int(np.prod(trainer.shapes[k])) for k in trainer.names) == \
        sorted(int(p.numel()) for p in model.parameters())


class LayerScaleConvBlock(nn.Module):
    """A residual block that scales its branch by `gamma.reshape(1, -1, 1, 1)` in NCHW (timm's
    convnext): the reshape folds into a tensor named after the FX op (`view`, `view_1`)."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.conv, self.gamma = nn.Conv2d(d, d, 3, padding=1), nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        return x + torch.tanh(self.conv(x)).mul(self.gamma.reshape(1, -1, 1, 1))


class LayerScaleStage(nn.Module):
    """Three such blocks: the layer-scale parameters of a fresh model start equal (1e-6 in
    timm, 0.5 here), so the default exporter's optimizer stores their folded copies once."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, d, 3, padding=1)
        self.blocks = nn.Sequential(*(LayerScaleConvBlock(d) for _ in range(3)))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_equal_folded_views_of_separate_parameters_train_apart(tmp_path):
    """timm's convnext_atto from the default exporter trained 12 layer-scale gammas as 4
    tensors (each stage's folded views merged into one), with no warning. Each node's FX node
    names the folded value it read (`%view_1`): a node reading the merged `view` in its place
    gets its own copy under that name, which trains as its parameter; losses as PyTorch's."""
    torch.manual_seed(0)
    model = LayerScaleStage()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = export(model, (1, 6, 6), "dynamo")
    views = [t.name for t in proto.graph.initializer if t.name.startswith("view")]
    assert len(views) == 1  # (the exporter merged the three equal folded gammas)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    trained = sorted(p.name for p in report.params if p.role == "parameter")
    assert sorted(p.name for p in report.params if p.alias.endswith(".gamma")) == \
        ["view", "view_1", "view_2"] and "view_1" in report.untied
    assert len(trained) == len(list(model.parameters()))
    x, y = random_batches(tmp_path, (1, 6, 6))
    trainer = ordered_trainer(tmp_path)
    assert sorted(trainer.names) == trained
    trainer.fit()
    model.load_state_dict(state)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)


class WindowAttention(nn.Module):
    """Swin's window attention over T=4 tokens: a relative-position bias gathered from a
    learned table by a buffer of indices, plus the mask it is given."""

    def __init__(self, d: int = 8, t: int = 4, heads: int = 2):
        super().__init__()
        self.qkv, self.proj, self.t, self.h = nn.Linear(d, 3 * d), nn.Linear(d, d), t, heads
        self.table = nn.Parameter(torch.randn(2 * t - 1, heads) * 0.02)
        idx = torch.arange(t)[:, None] - torch.arange(t)[None, :] + t - 1
        self.register_buffer("index", idx.flatten())

    def forward(self, x, mask):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) * (d // self.h) ** -0.5
        s = s + self.table[self.index].view(t, t, self.h).permute(2, 0, 1).unsqueeze(0)
        s = s + mask.unsqueeze(0).unsqueeze(0)
        return self.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d))


class ShiftedWindowBlock(nn.Module):
    """A Swin block's shifted-window mask (0 where tokens share a window, -100 elsewhere) is a
    buffer of the block passed to its attention. The default exporter's constant folding
    turns the mask and the gathered bias into tensors named after the FX op (`unsqueeze`)."""

    def __init__(self, d: int = 8, t: int = 4):
        super().__init__()
        self.attn, self.head = WindowAttention(d, t), nn.Linear(d, 5)
        mask = torch.zeros(t, t)
        mask[: t // 2, t // 2:] = mask[t // 2:, : t // 2] = -100.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.head(self.attn(x, self.mask).mean(1))


def test_an_additive_attention_mask_folded_from_a_buffer_is_not_trained(tmp_path, monkeypatch):
    """timm's swin from the default exporter trained its shifted-window masks (values 0 and
    -100, folded from a buffer of the block into `unsqueeze_3`) as parameters: a node of the
    attention module, which holds a folded parameter (the gathered bias table), read it. A
    float tensor of zeros and one large negative fill is an additive mask: a constant, with
    its reason, in `check` and `train`; the gathered bias trains as the table's rows."""
    torch.manual_seed(0)
    model = ShiftedWindowBlock()
    proto = export(model, (4, 8), "dynamo")
    onnx.save(proto, str(tmp_path / "model.onnx"))
    masks = [t.name for t in proto.graph.initializer
             if set(np.unique(onnx.numpy_helper.to_array(t)).tolist()) == {0.0, -100.0}]
    assert len(masks) == 1
    report = model_report(load_model(tmp_path / "model.onnx"))
    rows = {p.name: p for p in report.params}
    # (a constant computed from buffers: the table is accounted for, a lookup; where it is
    # not, the mask rule leaves it out: the test after next)
    assert rows[masks[0]].role == "constant"
    # The gathered bias table[index] folds into one tensor named after its last op
    # (`unsqueeze`): a lookup of the table (test below), trained as its rows.
    bias = [t.name for t in proto.graph.initializer if t.name.startswith("unsqueeze")
            and tuple(t.dims) == (1, 2, 4, 4)]
    assert len(bias) == 1 and not report.folded
    assert f"'{bias[0]}' = attn.table (7 rows)" in report.text()
    assert [p.shape for p in report.params if p.name == "attn.table"] == [(7, 2)]
    # The pre-flight reads the model without its large tensors, but reads the candidates for
    # a mask (read only by Add or Where): its count is train's.
    from trainer import memory
    monkeypatch.setattr(memory, "LARGE", 4)
    light = model_report(memory.strip(memory.load_structure(tmp_path / "model.onnx")))
    assert [p.role for p in light.params] == [p.role for p in report.params]
    assert any(memory.is_stub(t) for t in memory.strip(load_model(tmp_path / "model.onnx"))
               .graph.initializer)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((32, 4, 8)).astype(np.float32),
             y=rng.integers(0, 5, 32))
    trainer = Trainer(classifier_config(tmp_path, steps=2), stream=io.StringIO())
    assert masks[0] not in trainer.names and "attn.table" in trainer.names
    out = onnx.load(trainer.fit()["output"])
    after = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(after[masks[0]], onnx.numpy_helper.to_array(
        next(t for t in proto.graph.initializer if t.name == masks[0])))


@pytest.mark.parametrize("heads", [2, 4])
def test_a_folded_lookup_of_a_table_trains_as_the_table(tmp_path, heads):
    """Swin's relative-position bias, `table[index]` by a buffer, folded by the default
    exporter's optimizer into one tensor: each entry trained apart, where PyTorch moves the
    entries of one table row together (torchvision's swin_t: 3.4e-3 from PyTorch's losses in
    3 steps, warned). Positions with equal values across the heads come from one row: the
    rows train as PyTorch's table, losses as PyTorch's, and the export holds the folded bias
    of the trained table."""
    torch.manual_seed(0)
    model = ShiftedWindowBlock()
    model.attn = WindowAttention(heads=heads)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = export(model, (4, 8), "dynamo")
    (bias,) = [t.name for t in proto.graph.initializer if t.name.startswith("unsqueeze")
               and tuple(t.dims) == (1, heads, 4, 4)
               and onnx.numpy_helper.to_array(t).min() > -100]  # (not the mask)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert not report.folded and "WARNING" not in report.text()
    assert [p.shape for p in report.params if p.role == "parameter" and p.name == "attn.table"] \
        == [(7, heads)]
    x, y = random_batches(tmp_path, (4, 8))
    stream = io.StringIO()
    trainer = ordered_trainer(tmp_path, stream)
    assert f"'{bias}' = attn.table (7 rows)" in stream.getvalue()
    result = trainer.fit()
    model.load_state_dict(state)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)
    out = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(result["output"])
           .graph.initializer}
    a = model.attn
    want = a.table[a.index].view(4, 4, heads).permute(2, 0, 1).unsqueeze(0).detach().numpy()
    np.testing.assert_allclose(out[bias], want, rtol=1e-5, atol=1e-6)
    assert "attn.table" not in out  # (the same graph, the same initializers)


def test_a_trained_lookup_table_is_not_held_as_a_value_not_trained(tmp_path):
    """A folded lookup's table (Swin's relative-position bias, 15 x 128: above the size held
    once) is trained, though the export writes the folded tensor in its place: it was also
    kept as a value not trained (Trainer.shared), a stale copy of its first values."""
    torch.manual_seed(0)
    model = ShiftedWindowBlock(d=128, t=8)
    model.attn = WindowAttention(d=128, t=8, heads=128)
    onnx.save(export(model, (8, 128), "dynamo"), str(tmp_path / "model.onnx"))
    random_batches(tmp_path, (8, 128))
    trainer = ordered_trainer(tmp_path)
    assert "attn.table" in trainer.names
    assert not set(trainer.shared) & set(trainer.names)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 6), heads=st.integers(1, 4), axis=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_a_lookup_is_recovered_from_its_values_in_any_layout(n, heads, axis, seed):
    """A relative-position lookup table[index] (index[i, j] = i - j + n - 1) in any layout,
    the heads' axis anywhere: grouping by values along the heads' axis recovers the table's
    rows, and expanding them gives the tensor back. One head is not grouped (equal single
    values do not tell a lookup from a structured table), nor are zeros."""
    from trainer.autodiff.lookups import Lookup, _pick

    rng = np.random.default_rng(seed)
    table = rng.standard_normal((2 * n - 1, heads)).astype(np.float32)
    index = np.arange(n)[:, None] - np.arange(n)[None, :] + n - 1
    a = np.moveaxis(table[index], -1, axis)
    if heads == 1:
        assert _pick(a) is None
        return
    ax, (rows, idx) = _pick(a)
    assert ax == axis and len(rows) == 2 * n - 1
    np.testing.assert_array_equal(Lookup("c", "t", idx, a.shape, ax).expand(rows), a)
    assert sorted(map(tuple, rows)) == sorted(map(tuple, table))
    assert _pick(np.zeros_like(a)) is None  # (nothing to group: a zero-initialized table)


def test_a_sinusoidal_position_table_is_not_a_lookup():
    """Whisper's positions [T, d], sin and cos of position x frequency: position 0's zeros and
    ones repeat, but no axis groups it (nothing to tie)."""
    from trainer.autodiff.lookups import _pick

    pos, freq = np.arange(8)[:, None], np.exp(-np.arange(4) / 4)[None, :]
    table = np.concatenate([np.sin(pos * freq), np.cos(pos * freq)], axis=1).astype(np.float32)
    assert _pick(table) is None and _pick(table[None]) is None


def test_a_folded_lookup_whose_values_do_not_group_is_warned(tmp_path):
    """A zero-initialized table folds into zeros: nothing tells its rows apart, so the
    tensor trains on its own, with the folded-parameter warning that names the table."""
    model = ShiftedWindowBlock()
    with torch.no_grad():
        model.attn.table.zero_()
    onnx.save(export(model, (4, 8), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.folded == ["attn.table"] and "table[index]" in report.text()
    assert "rows of PyTorch's table" not in report.text()
    rows = {p.name: p for p in report.params}
    masks = [name for name, p in rows.items() if p.shape == (1, 1, 4, 4)]
    assert len(masks) == 1 and rows[masks[0]].role == "constant" \
        and "mask" in rows[masks[0]].reason


def test_a_zero_shift_folded_batchnorm_keeps_its_bias(tmp_path):
    """The default exporter folds an eval-mode BatchNormalization into the Conv before it
    (weight and bias); a fresh BatchNorm's shift is zero, so the folded bias is zero and the
    optimizer drops it too: resnet18 trained 22 tensors where the same export of a trained
    model holds 42, and the shift did not train at all. The Conv gets back a zero bias under
    the name the fold gives it (`{weight}_bias`): training matches PyTorch training the
    folded model (torch.nn.utils.fusion.fuse_conv_bn_eval) step for step."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(0)
    model = ConvBN().eval()
    proto = torch.onnx.export(model, (torch.randn(2, 1, 6, 6),), None, input_names=["x"],
                              output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    assert [len(n.input) for n in proto.graph.node if n.op_type == "Conv"] == [2, 2]
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.fused == ["bn", "bn2"]  # (still warned: the weight trains folded)
    trained = sorted(p.name for p in report.params if p.role == "parameter")
    assert trained == ["c.weight", "c.weight_bias", "c2.weight", "c2.weight_bias",
                       "fc.bias", "fc.weight"]
    fused = nn.Module()
    fused.c, fused.c2 = fuse_conv_bn_eval(model.c, model.bn), fuse_conv_bn_eval(model.c2, model.bn2)
    fused.fc = model.fc
    for conv in (fused.c, fused.c2):  # (fuse_conv_bn_eval freezes a bias it makes from zeros)
        conv.bias.requires_grad_(True)

    def forward(x):
        x = F.relu(fused.c(x))
        return fused.fc(torch.flatten(F.relu(fused.c2(x)), 1))

    x, y = random_batches(tmp_path, (1, 6, 6))
    trainer = ordered_trainer(tmp_path)
    assert sorted(trainer.names) == trained
    trainer.fit()
    want = torch_losses(fused, x, y, opt=torch.optim.SGD(fused.parameters(), lr=LR),
                        forward=forward)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r], want,
                               rtol=2e-4, atol=2e-5)


def _tf2onnx_layernorm(w1, gamma, beta, w2, b2):
    """tf_keras's LayerNormalization as tf2onnx writes it: a BatchNormalization over the rows
    of a [1, N, D, 1] reshape whose mean and variance inputs the graph computes from the data
    (ReduceMean), with a scale of ones and a bias of zeros made by Expand, then gamma and beta."""
    from onnx import TensorProto, helper, numpy_helper
    f = helper.make_node
    nodes = [f("MatMul", ["x", "w1"], ["h"]),
             f("Reshape", ["h", "rows"], ["r"]),
             f("ReduceMean", ["r"], ["mean_k"], axes=[0, 2, 3], keepdims=1),
             f("Squeeze", ["mean_k", "sq_axes"], ["mean"]),
             f("Sub", ["r", "mean_k"], ["d"]), f("Mul", ["d", "d"], ["d2"]),
             f("ReduceMean", ["d2"], ["var"], axes=[0, 2, 3], keepdims=0),
             f("Shape", ["mean"], ["c"]),
             f("Expand", ["one", "c"], ["scale"]), f("Expand", ["zero", "c"], ["bias"]),
             f("BatchNormalization", ["r", "scale", "bias", "mean", "var"], ["y"],
               epsilon=1e-3),
             f("Shape", ["h"], ["hs"]), f("Reshape", ["y", "hs"], ["y2"]),
             f("Mul", ["y2", "gamma"], ["g"]), f("Add", ["g", "beta"], ["z"]),
             f("MatMul", ["z", "w2"], ["m"]), f("Add", ["m", "b2"], ["logits"])]
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w1": w1, "gamma": gamma, "beta": beta, "w2": w2, "b2": b2,
        "rows": np.array([1, -1, w1.shape[1], 1], np.int64),
        "sq_axes": np.array([0, 2, 3], np.int64), "one": np.array([1.0], np.float32),
        "zero": np.array([0.0], np.float32)}.items()]
    g = helper.make_graph(nodes, "tf2onnx_layernorm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_batchnorm_whose_statistics_the_graph_computes_trains_in_its_own_form(tmp_path):
    """tf2onnx writes tf_keras's LayerNormalization as a BatchNormalization whose mean and
    variance are computed from the data: there are no running statistics, the node is a
    function of its inputs. `train` refused it ("running statistic ... must be an initializer
    to be trained") while `check` passed; it trains now, as PyTorch's LayerNorm does."""
    torch.manual_seed(0)
    ln, fc1, fc2 = nn.LayerNorm(8, eps=1e-3), nn.Linear(6, 8, bias=False), nn.Linear(8, 5)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    arr = {k: v.detach().numpy().copy() for k, v in {
        "w1": fc1.weight.T, "gamma": ln.weight, "beta": ln.bias, "w2": fc2.weight.T,
        "b2": fc2.bias}.items()}
    onnx.save(_tf2onnx_layernorm(**arr), str(tmp_path / "model.onnx"))
    x, y = random_batches(tmp_path, (6,))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.ok and sorted(p.name for p in report.params if p.role == "parameter") == \
        ["b2", "beta", "gamma", "w1", "w2"]
    trainer = ordered_trainer(tmp_path)
    trainer.fit()
    model = nn.Sequential(fc1, ln, fc2)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)


def _tf2onnx_lstm(lstm: nn.LSTM, fc: nn.Linear, producer: str) -> onnx.ModelProto:
    """An LSTM classifier as tf2onnx writes a Keras LSTM: ONNX's LSTM with B = [the one Keras
    bias, zeros] (PyTorch's gate order i, f, g, o becomes ONNX's i, o, f, c)."""
    from onnx import TensorProto, helper, numpy_helper

    def gates(w):
        i, f, g, o = np.split(w.detach().numpy(), 4)
        return np.concatenate([i, o, f, g])
    h = lstm.hidden_size
    arr = {"W": gates(lstm.weight_ih_l0)[None], "R": gates(lstm.weight_hh_l0)[None],
           "B": np.concatenate([gates(lstm.bias_ih_l0), np.zeros(4 * h, np.float32)])[None],
           "V": fc.weight.detach().numpy().T.copy(), "c": fc.bias.detach().numpy().copy()}
    f = helper.make_node
    nodes = [f("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             f("LSTM", ["xt", "W", "R", "B"], ["", "yh"], hidden_size=h),
             f("Squeeze", ["yh", "zero_axis"], ["last"]),
             f("MatMul", ["last", "V"], ["m"]), f("Add", ["m", "c"], ["logits"])]
    inits = [numpy_helper.from_array(v, k) for k, v in arr.items()]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero_axis"))
    g = helper.make_graph(nodes, "lstm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)],
                             producer_name=producer)


@pytest.mark.parametrize("producer", ["tf2onnx", "pytorch"])
def test_a_keras_lstm_trains_its_one_bias(tmp_path, producer):
    """tf2onnx writes a Keras LSTM's one bias per gate as ONNX's input bias and zeros as the
    recurrent one; both are added, so they get equal gradients, and training both moved the
    bias at twice the learning rate (Keras's LSTM drifted 4.3e-3 in 4 steps). The zero half
    now stays zero: losses as PyTorch's LSTM with its recurrent bias frozen at zero. A
    PyTorch export (both biases real) trains both, as PyTorch does."""
    torch.manual_seed(0)
    lstm, fc = nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 3)
    with torch.no_grad():
        lstm.bias_hh_l0.zero_()
    lstm.bias_hh_l0.requires_grad_(producer != "tf2onnx")
    onnx.save(_tf2onnx_lstm(lstm, fc, producer), str(tmp_path / "model.onnx"))
    x, y = random_batches(tmp_path, (5, 4), classes=3)
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.single_bias == (["B"] if producer == "tf2onnx" else [])
    stream = io.StringIO()
    trainer = ordered_trainer(tmp_path, stream)
    assert ("stays zero" in stream.getvalue()) == (producer == "tf2onnx")
    out = onnx.load(trainer.fit()["output"])

    def forward(xb):
        return fc(lstm(xb)[0][:, -1])
    want = torch_losses(lstm, x, y, opt=torch.optim.SGD(
        [p for p in [*lstm.parameters(), *fc.parameters()] if p.requires_grad], lr=LR),
        forward=forward)
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r], want,
                               rtol=2e-4, atol=2e-5)
    b = next(onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name == "B")
    assert (b[0, 24:] == 0).all() == (producer == "tf2onnx")


class DetachedScale(nn.Module):
    """A branch scaled by a statistic of a detached value (RAFT detaches its flow between
    refinement steps): PyTorch passes no gradient back through `.detach()`."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        h = self.lin1(x)
        return self.lin2(h) * (1 + h.detach().pow(2).mean(-1, keepdim=True))


@pytest.mark.parametrize("optimize", [True, False])
def test_a_detached_value_passes_no_gradient_back(tmp_path, optimize):
    """ONNX has no op for `.detach()`: the default exporter writes an Identity (its FX node an
    aten.detach), which its optimizer removes. The engine backpropagated through it (torchvision's
    RAFT: the second step's gradients twice PyTorch's). From the export's records the training
    graph reads the value through a StopGradient node now: losses as PyTorch's, `check` and
    `train` say so, and the exported model keeps its own nodes."""
    torch.manual_seed(0)
    model = DetachedScale()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = torch.onnx.export(model.eval(), (torch.randn(2, 8),), None, input_names=["x"],
                              output_names=["logits"], optimize=optimize,
                              dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    model.load_state_dict(state)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.detached == ["linear"]
    x, y = random_batches(tmp_path, (8,))
    stream = io.StringIO()
    trainer = ordered_trainer(tmp_path, stream)
    assert ".detach()" in stream.getvalue()
    out = onnx.load(trainer.fit()["output"])
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in proto.graph.node]
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)


class DetachedTwice(nn.Module):
    """One node reading a value both detached and not: `h.detach() + h` (an Add of linear
    and linear) and DiCE's magic box `exp(h - h.detach())` (value 1, gradient dh)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.a, self.b = kind, nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        h = self.a(x)
        if self.kind == "sum":
            return self.b(h.detach() + h)
        return self.b(torch.exp(h - h.detach()) * h)


@pytest.mark.parametrize("kind", ["sum", "magic_box"])
def test_a_value_read_detached_and_not_by_one_node(tmp_path, kind):
    """The export's optimizer leaves Add(linear, linear) with FX args (%detach, %linear): the
    record was matched by name, which left no slot, and ignored: a.weight's gradient was twice
    PyTorch's (magic box: 0). The detached slot is found by the FX arguments' positions."""
    torch.manual_seed(0)
    model = DetachedTwice(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = torch.onnx.export(model.eval(), (torch.randn(2, 8),), None, input_names=["x"],
                              output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    model.load_state_dict(state)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    assert model_report(load_model(tmp_path / "model.onnx")).detached == ["linear"]
    x, y = random_batches(tmp_path, (8,))
    trainer = ordered_trainer(tmp_path)
    trainer.fit()
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)


class DetachedFeatures(nn.Module):
    """A frozen feature extractor by .detach(): only the head trains."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).detach())


def test_check_does_not_list_what_a_detach_cuts_off_as_trained():
    """`check` listed a.weight and a.bias among the tensors trained by default, which `train`
    (its graph cut at the detach) then left frozen."""
    torch.manual_seed(0)
    proto = torch.onnx.export(DetachedFeatures().eval(), (torch.randn(2, 8),), None,
                              input_names=["x"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    report = model_report(proto)
    assert sorted(p.name for p in report.params if p.role == "parameter") == ["b.bias",
                                                                              "b.weight"]
    assert "parameters trained by default: 2 tensors" in report.text()


@pytest.mark.parametrize("producer", ["tf2onnx", "pytorch"])
def test_keras_preprocessing_constants_are_not_trained(producer):
    """tf2onnx writes Keras's Rescaling and Normalization layers (EfficientNet starts with both)
    as a Mul and an Add that look like a scale and a bias; Keras never trains them, so a
    tensor in such a layer's scope of a tf2onnx export is left out, with its reason."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {"m/rescaling_1/Cast/x:0": np.float32(1 / 255),
             "m/normalization/sub/y:0": rng.standard_normal((1, 3)).astype(np.float32),
             "ConstantFolding/m/normalization/truediv_recip:0": np.ones((1, 3), np.float32),
             "m/dense/MatMul/ReadVariableOp:0": rng.standard_normal((3, 2)).astype(np.float32),
             "m/dense/BiasAdd/ReadVariableOp:0": np.zeros(2, np.float32)}
    f = helper.make_node
    g = helper.make_graph(
        [f("Mul", ["x", "m/rescaling_1/Cast/x:0"], ["r"]),
         f("Add", ["r", "m/normalization/sub/y:0"], ["c"]),
         f("Mul", ["c", "ConstantFolding/m/normalization/truediv_recip:0"], ["n"]),
         f("MatMul", ["n", "m/dense/MatMul/ReadVariableOp:0"], ["h"]),
         f("Add", ["h", "m/dense/BiasAdd/ReadVariableOp:0"], ["logits"])], "keras",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name=producer)
    rows = {p.name: p for p in model_report(model).params}
    trained = sorted(k for k, p in rows.items() if p.role == "parameter")
    dense = ["m/dense/BiasAdd/ReadVariableOp:0", "m/dense/MatMul/ReadVariableOp:0"]
    if producer == "tf2onnx":
        assert trained == dense
        assert "Keras" in rows["m/normalization/sub/y:0"].reason
    else:
        assert trained == sorted(dense + ["m/normalization/sub/y:0",
                                          "ConstantFolding/m/normalization/truediv_recip:0"])


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d (detection backbones, DETR): BatchNorm with fixed
    statistics and affine, all four tensors buffers."""

    def __init__(self, n: int):
        super().__init__()
        for k, v in (("weight", torch.rand(n) + 0.5), ("bias", torch.randn(n) * 0.1),
                     ("running_mean", torch.randn(n) * 0.1), ("running_var", torch.rand(n) + 0.5)):
            self.register_buffer(k, v)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1)
                                                     + 1e-5).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1)
                            - self.running_mean.reshape(1, -1, 1, 1) * scale)


class FrozenBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 8, 3, bias=False), FrozenBatchNorm2d(8), \
            nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_frozen_batchnorm_trains_none_of_its_buffers(tmp_path):
    """A TorchScript export in training form (no constant folding) keeps FrozenBatchNorm2d's
    four buffers as initializers named like parameters; without an export signature they were
    trained (DETR: 24 buffers; a running variance can go negative). Running statistics that
    feed no BatchNormalization mark the module: its four tensors are constants, and training
    is PyTorch's."""
    torch.manual_seed(0)
    model = FrozenBNNet()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.train(), (torch.randn(2, 1, 6, 6),), f, dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}}, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.TRAINING)
    (tmp_path / "model.onnx").write_bytes(f.getvalue())
    rows = {p.name: p for p in model_report(load_model(tmp_path / "model.onnx")).params}
    assert rows["bn.running_var"].role == rows["bn.weight"].role == "constant"
    assert "frozen BatchNorm" in rows["bn.weight"].reason
    x, y = random_batches(tmp_path, (1, 6, 6))
    trainer = ordered_trainer(tmp_path)
    assert sorted(trainer.names) == sorted(k for k, _ in model.named_parameters())
    trainer.fit()
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)


class TwoHeads(nn.Module):
    """A body with two heads, exported with one output (DETR's boxes without its classes, a
    BERT without its pooler): the other head's parameters are in the export's signature, and
    no node uses them."""

    def __init__(self):
        super().__init__()
        self.body, self.box, self.cls = nn.Linear(8, 8), nn.Linear(8, 5), nn.Linear(8, 3)

    def forward(self, x):
        return self.box(torch.tanh(self.body(x)))


@pytest.mark.parametrize("optimize", [True, False])
def test_a_head_the_exported_output_does_not_use_is_not_called_folded(optimize):
    """`check` warned that the unused head's parameters were folded into expressions by the
    optimizer, and told to export with optimize=False, even for that export: PyTorch gives
    them no gradient either, so there is nothing to warn about."""
    proto = torch.onnx.export(TwoHeads().eval(), (torch.randn(2, 8),), None,
                              input_names=["x"], output_names=["logits"], optimize=optimize,
                              dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    from trainer.autodiff.params import torch_signature

    assert torch_signature(proto)["cls.weight"] == "PARAMETER"
    report = model_report(proto)
    assert report.folded == [] and "WARNING" not in report.text()


def test_a_parameter_its_parent_reads_through_a_view_is_named_not_called_folded(tmp_path):
    """`check` warned that DETR's query embedding had been folded away, and `frozen:
    ["query.*"]` matched nothing, although the folded view trains exactly as the parameter:
    it is listed as the parameter's tensor now, and globs name it by PyTorch's name."""
    torch.manual_seed(0)
    model = ParentReadsChildWeight()
    onnx.save(export(model, (8,), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.folded == [] and "WARNING" not in report.text()
    held = [p for p in report.params if p.alias == "query.weight"]
    assert len(held) == 1 and held[0].shape == (1, 5, 8)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((32, 8)).astype(np.float32),
             y=rng.integers(0, 5, 32))
    trainer = Trainer(classifier_config(tmp_path, steps=1, frozen=["query.*"]),
                      stream=io.StringIO())
    assert held[0].name not in trainer.names and len(trainer.names) == 4


class MaskedPooling(nn.Module):
    """Wav2Vec2's masked mean pooling: `h[~mask] = 0.0`, a boolean-mask assignment that the
    default exporter writes as NonZero + ScatterND (as many updates as the mask selects)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 5)

    def forward(self, x):  # x [N, T, 5]: 4 features and a 0/1 validity flag
        mask = x[..., 4] > 0.5
        h = self.inp(x[..., :4])
        m = mask.unsqueeze(-1).repeat(1, 1, h.shape[2])
        h[~m] = 0.0
        return self.out(h.sum(1) / mask.sum(1, keepdim=True))


@pytest.mark.parametrize("optimize", [True, False])
def test_a_boolean_mask_assignment_trains_whatever_the_mask_selects(tmp_path, optimize):
    """The ScatterND gradient's zeros had the updates' length of the batch the graph was built
    from, so a batch whose mask selected another number of elements failed ("cannot reshape
    array of size 96 into shape (8,1)": Wav2Vec2 with an attention mask). They take the
    updates' shape at run time now: losses as PyTorch's."""
    torch.manual_seed(0)
    model = MaskedPooling()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6, 5)).astype(np.float32)
    x[..., 4] = 1.0
    for i in range(64):  # a different number of padded steps per sample
        x[i, 6 - (i % 4):, 4] = 0.0
    y = rng.integers(0, 5, 64).astype(np.int64)
    proto = torch.onnx.export(model.eval(), (torch.from_numpy(x[:2]),), None,
                              input_names=["x"], output_names=["logits"], optimize=optimize,
                              dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    model.load_state_dict(state)
    assert "ScatterND" in {n.op_type for n in proto.graph.node}
    onnx.save(proto, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    trainer = ordered_trainer(tmp_path)
    trainer.fit()
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r],
                               torch_losses(model, x, y), rtol=2e-4, atol=2e-5)


class NormsWithoutRecords(nn.Module):
    """GroupNorm without affine weights (the exporter writes ones and zeros for them) after a
    Linear (whose weight the exporter's optimizer stores transposed as a val_<n> too)."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(6, 8), nn.GroupNorm(2, 8, affine=False)

    def forward(self, x):
        return self.norm(self.fc(x).reshape(-1, 8, 1)).reshape(-1, 8)


def test_what_an_export_cannot_say_is_warned():
    """(1) BatchNorm(momentum=None), PyTorch's cumulative average, exports a momentum of 1.0
    (eval form) or 0.0 (training form, nothing tracked yet): training would keep or replace
    the running statistics, so `check` warns; (3) so for InstanceNorm with running statistics,
    which PyTorch trains on each instance's statistics. (2) The default exporter at opset 17
    converts its opset-18 model down and loses the records of which tensors are parameters:
    its ones and zeros (val_<n> of one repeated value) would train, and are named; a folded
    transpose of a weight (varied values) is not. At opset 18 nothing is said."""
    import contextlib

    from trainer.report import exporter_hints

    bn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU())
    x = torch.randn(4, 2, 6, 6)
    for training in (torch.onnx.TrainingMode.EVAL, torch.onnx.TrainingMode.TRAINING):
        buf = io.BytesIO()
        with contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(bn.train() if training == torch.onnx.TrainingMode.TRAINING
                              else bn.eval(), (x,), buf, dynamo=False, opset_version=17,
                              training=training, do_constant_folding=False)
        (line,) = exporter_hints(onnx.load_from_string(buf.getvalue()))
        assert "momentum=None" in line and "BatchNormalization" in line
    plain = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    buf = io.BytesIO()
    with contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(plain, (x,), buf, dynamo=False, opset_version=17,
                          do_constant_folding=False)
    assert exporter_hints(onnx.load_from_string(buf.getvalue())) == []
    # (3) InstanceNorm with running statistics: a BatchNormalization over tiled statistics
    inorm = nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True,
                                                                track_running_stats=True))
    buf = io.BytesIO()
    with contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(inorm.eval(), (x,), buf, dynamo=False, opset_version=13,
                          do_constant_folding=False)
    (line,) = exporter_hints(onnx.load_from_string(buf.getvalue()))
    assert "track_running_stats=False" in line

    lines = {}
    for opset in (17, 18):
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            model = torch.onnx.export(NormsWithoutRecords().eval(), (torch.randn(3, 6),),
                                      None, opset_version=opset).model_proto
        lines[opset] = exporter_hints(model)
        if opset == 17:
            consts = [t for t in model.graph.initializer if t.name.startswith("val_")]
    (line,) = lines[17]
    named = line.split("'frozen': ")[1].split(", ")
    values = {t.name: numpy_helper.to_array(t) for t in consts}
    assert named and all(values[n].size > 1 and (values[n] == values[n].flat[0]).all()
                         for n in named)
    assert any(v.size > 1 and not (v == v.flat[0]).all() for v in values.values())
    assert lines[18] == []


class AffineAndPlainNorms(nn.Module):
    """A LayerNorm with weights next to one without (`elementwise_affine=False`), and the same
    for InstanceNorm and GroupNorm: PyTorch's default exporter stores the plain layers' ones
    and zeros once, shared with the other layer's fresh weight and bias."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln1, self.fc2 = nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 8)
        self.ln2 = nn.LayerNorm(8, elementwise_affine=False)
        self.conv1, self.in1 = nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True)
        self.conv2, self.in2 = nn.Conv2d(4, 4, 3, padding=1), nn.InstanceNorm2d(4)
        self.gn1, self.gn2 = nn.GroupNorm(2, 4), nn.GroupNorm(2, 4, affine=False)
        self.head = nn.Linear(8 + 4, 5)

    def forward(self, x):
        h = torch.tanh(self.ln2(self.fc2(torch.tanh(self.ln1(self.fc1(x))))))
        img = x.reshape(-1, 1, 4, 4)
        c = torch.tanh(self.in2(self.conv2(torch.tanh(self.in1(self.conv1(img))))))
        c = self.gn2(torch.tanh(self.gn1(c)))
        return self.head(torch.cat([h, c.mean((2, 3))], 1))


def test_a_plain_norm_does_not_train_the_weight_the_export_shares_with_it(tmp_path):
    """The plain LayerNorm and InstanceNorm read the other layers' `ln1.weight`, `in1.weight`
    and `in1.bias` in the default export, the plain GroupNorm the [C, 1, 1] views of
    `gn1.weight` and `gn1.bias` (their FX nodes read no parameter: weight and bias None); they
    get their own fixed copy, and the run is PyTorch's (the shared tensors had
    trained through both layers: 1% off on ln1.weight, 18x on in1.bias after 4 steps)."""
    torch.manual_seed(0)
    model = AffineAndPlainNorms()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    onnx.save(torch.onnx.export(model, (torch.randn(2, 16),), input_names=["x"],
                                output_names=["logits"],
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                dynamo=True, verbose=False).model_proto,
              str(tmp_path / "model.onnx"))
    x, y = random_batches(tmp_path, (16,))
    trainer = trains_like_pytorch(tmp_path, model, state, x, y)
    got = trainer.trained_values()
    for k in ("ln1.weight", "in1.weight", "in1.bias"):  # (gn1's: views, the losses say)
        np.testing.assert_allclose(got[k], model.state_dict()[k].numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=k)


class FreqEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 8, scale_grad_by_freq=True), nn.Linear(8, 5)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


class FreqBag(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.emb = nn.EmbeddingBag(20, 8, mode=mode, scale_grad_by_freq=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, ids):
        return self.fc(self.emb(ids))


@pytest.mark.parametrize("make", [FreqEmbedding, lambda: FreqBag("sum"),
                                  lambda: FreqBag("mean")], ids=["embedding", "bag-sum",
                                                                 "bag-mean"])
def test_an_embedding_scaled_by_frequency_trains_as_pytorchs(tmp_path, make):
    """nn.Embedding(scale_grad_by_freq=True) divides each row's gradient by how often the
    batch looks it up; it trained as a plain embedding (losses 3e-3 off PyTorch's by step 3).
    The default exporter records the flag, the Gather's gradient honours it: the training
    graph's gradients are autograd's, on a batch that repeats some tokens. nn.EmbeddingBag's
    flag (its decomposition gathers the table's rows, then sums or averages each bag) was
    ignored, silently, until the table's Gather was marked too. (PyTorch 2.13's CPU
    embedding_bag divides by the wrong index's count where counts differ, pytorch#190063; its
    CUDA kernel and nn.Embedding divide each row by its own count: the reference for a bag is
    the unscaled gradient over each row's count. The exporter computes the bags in float32,
    through casts, hence the bags' tolerance.)"""
    from trainer.autodiff import build_training_graph, training_info
    from trainer.executor import Executor

    torch.manual_seed(0)
    net = make().double()
    proto = torch.onnx.export(net, (torch.zeros(2, 6, dtype=torch.int64),), None,
                              input_names=["ids"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    onnx.save(proto, str(tmp_path / "model.onnx"))
    ids = np.random.default_rng(0).integers(1, 20, (4, 6))
    ids[:, :3] = 7  # (token 7 twelve times, others once or a few times)
    labels = np.random.default_rng(1).integers(0, 5, 4)
    tm = build_training_graph(load_model(tmp_path / "model.onnx"),
                              {"type": "cross_entropy", "output": "logits", "target": "label"},
                              "all", batch_size=4)
    info = training_info(tm)
    got = Executor(tm, np).run({"ids": ids, "label": labels})
    bag = isinstance(net.emb, nn.EmbeddingBag)
    net.emb.scale_grad_by_freq = not bag
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(ids)),
                                             torch.from_numpy(labels))
    loss.backward()
    want = net.emb.weight.grad.numpy()
    if bag:
        want = want / np.maximum(np.bincount(ids.ravel(), minlength=20), 1)[:, None]
    np.testing.assert_allclose(got[info.gradients["emb.weight"]], want,
                               rtol=1e-6 if bag else 1e-10, atol=1e-7 if bag else 1e-14)


class FreshDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, tgt, src):
        return self.fc(self.layer(tgt, src).mean(1))


def test_a_fresh_decoder_layers_cross_attention_bias_is_restored(tmp_path):
    """A fresh nn.TransformerDecoderLayer: the default exporter's optimizer stores the
    cross-attention's in_proj_bias (zeros) as the self-attention's, read by a Split it
    records no FX node for; the bias was left out (48 values fewer than PyTorch trains, the
    losses 2e-3 off from the second step). The Split's readers are the cross-attention's:
    it reads the restored parameter."""
    torch.manual_seed(0)
    net = FreshDecoder().eval()
    dim = torch.export.Dim("N")
    proto = torch.onnx.export(net, (torch.zeros(2, 6, 16), torch.zeros(2, 6, 16)), None,
                              input_names=["tgt", "src"], output_names=["logits"],
                              dynamic_shapes=({0: dim}, {0: dim})).model_proto
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert "layer.multihead_attn.in_proj_bias" in report.untied
    assert "optimize=False" not in report.text()
    trained = sum(int(np.prod(p.shape)) for p in report.params if p.role == "parameter")
    assert trained == sum(p.numel() for p in net.parameters())


class OneSlope(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(8, 8), nn.PReLU(), nn.Linear(8, 5)

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


def test_a_one_slope_prelu_folded_to_a_view_trains(tmp_path):
    """nn.PReLU()'s one slope, folded by the default exporter into a [1, 1] view (val_N): it
    was left out as a one-element constant (117 values trained where PyTorch trains 118)."""
    torch.manual_seed(0)
    onnx.save(export(OneSlope(), (8,), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    trained = [p for p in report.params if p.role == "parameter"]
    assert sum(int(np.prod(p.shape)) if p.shape else 1 for p in trained) == 118
    assert any(p.alias == "act.weight" for p in trained)


class TwoCrossAttentions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a1 = nn.MultiheadAttention(8, 2, batch_first=True)
        self.a2 = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        q, m = x[:, :4], x[:, 4:]
        h = q + self.a1(q, m, m)[0]
        return self.head((h + self.a2(h, m, m)[0]).mean(1))


def test_each_cross_attention_gets_its_bias_from_a_shared_split(tmp_path):
    """Two fresh cross-attentions: the exporter's optimizer merges their zero in_proj_bias
    and also the two Splits of it (no FX record), read by both modules; the second one's
    bias was left out. Each module now reads its own copy of the Split."""
    torch.manual_seed(0)
    net = TwoCrossAttentions().eval()
    onnx.save(export(net, (10, 8), "dynamo"), str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert {"a1.in_proj_bias", "a2.in_proj_bias"} <= set(report.untied) | {
        p.name for p in report.params}
    trained = sum(int(np.prod(p.shape)) for p in report.params if p.role == "parameter")
    assert trained == sum(p.numel() for p in net.parameters())


class CornerResize(nn.Module):
    def __init__(self, **how):
        super().__init__()
        self.how = how

    def forward(self, x):
        return F.interpolate(x, mode="bilinear", align_corners=True, **self.how)


@pytest.mark.parametrize("exporter", ["dynamo", "dynamo-unoptimized", "torchscript",
                                      "torchscript-unfolded"])
def test_align_corners_resizes_by_fractional_scales_are_warned_of(exporter, tmp_path, capsys):
    """F.interpolate(scale_factor=(0.6, 0.5), align_corners=True) on 4x5 exports as a Resize
    by scales: ONNX maps the corners over the fractional length 2.4 (the spec, followed by the
    engine and onnx.reference), PyTorch and onnxruntime over the 2 rows they output (values up
    to 5.6 apart). `check` names such a Resize; size=... exports need nothing. The scales of
    an unoptimized or unfolded export (a Constant's value_floats, a Concat of Constants) were
    not read, and nothing was said."""
    x = torch.arange(20.0).reshape(1, 1, 4, 5)
    for how, warned in (({"scale_factor": (0.6, 0.5)}, True), ({"size": (2, 3)}, False),
                        ({"scale_factor": 2.0}, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter.startswith("dynamo"):
                proto = torch.onnx.export(CornerResize(**how), (x,), None,
                                          optimize=exporter == "dynamo").model_proto
            else:
                f = io.BytesIO()
                torch.onnx.export(CornerResize(**how), (x,), f, dynamo=False, opset_version=17,
                                  do_constant_folding=exporter == "torchscript")
                proto = onnx.load_from_string(f.getvalue())
        text = model_report(proto).text()
        assert ("align_corners and scales that are not whole numbers" in text) == warned, how
        # `grad` too: onnxruntime runs its graph, whose loss is then not its gradients' function
        from trainer.cli import main

        onnx.save(proto, str(tmp_path / "m.onnx"))
        main(["grad", str(tmp_path / "m.onnx"), "--output", proto.graph.output[0].name,
              "--loss", "mse", "-o", str(tmp_path / "t.onnx")])  # (nothing to train here)
        assert ("its gradients the spec's" in capsys.readouterr().out) == warned, how


class ParallelBlock(nn.Module):
    """GPT-NeoX's parallel residual: two LayerNorms of one input, x + a(ln1(x)) + m(ln2(x))."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.a, self.m = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.a(self.ln1(x)) + self.m(self.ln2(x))


class ParallelNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(6, 8), ParallelBlock(), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.block(self.inp(x)))


def test_two_equal_layer_norms_of_one_input_merged_by_the_optimizer_train_apart(tmp_path):
    """A fresh GPT-NeoX block's two LayerNorms read one input with equal ones and zeros: the
    default exporter's optimizer merges the second into the first, and its parameters leave
    the graph (24 tensors trained of PyTorch's 28; a filter meant for heads the export leaves
    out had even silenced the warning). The merge shows in the records: a node's FX node reads
    `%layer_norm_1`, which no node computes, where it reads the output of `%layer_norm`. That
    reader gets a copy of the LayerNorm again, with the second module's parameters: the
    losses are PyTorch's."""
    from trainer.autodiff.params import merged_computations

    torch.manual_seed(0)
    model = ParallelNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export(model, (6,), "dynamo")
    assert merged_computations(proto) == ["layer_norm_1"]
    assert sum(n.op_type == "LayerNormalization" for n in proto.graph.node) == 1
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    assert report.folded == [] and {"block.ln2.weight", "block.ln2.bias"} <= {
        p.name for p in report.params if p.role == "parameter"}
    assert "restored and trained separately: block.ln2.weight, block.ln2.bias" in report.text()
    x, y = random_batches(tmp_path, (6,))
    model.load_state_dict(state)
    trainer = trains_like_pytorch(tmp_path, model, state, x, y)
    assert len(trainer.names) == len(list(model.parameters()))


class SharedBatchNorm(nn.Module):
    """One BatchNorm2d applied twice (a shared block): two nodes read its running statistics."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), \
            nn.Linear(4, 5)

    def forward(self, x):
        h = self.bn(F.relu(self.bn(self.conv(x))))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_batchnorm_applied_twice_updates_its_statistics_twice(tmp_path, exporter):
    """PyTorch moves the running statistics at each use, the second from the first's result;
    the engine kept the last node's update alone (3e-2 off after one step), the trained
    parameters right."""
    torch.manual_seed(0)
    model = SharedBatchNorm()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.9, 1.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = export(model, (1, 6, 6), exporter)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    # (the TorchScript export traces in train mode: its forward moved the statistics it wrote)
    for t in proto.graph.initializer:
        if t.name in state and t.name.startswith("bn.running"):
            state[t.name] = torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
    x, y = random_batches(tmp_path, (1, 6, 6))
    trainer = trains_like_pytorch(tmp_path, model, state, x, y)
    model.load_state_dict(state)
    torch_losses(model, x, y)  # (the same steps again: the statistics they leave)
    got = {k: np.asarray(v) for k, v in trainer.state.items()}
    assert len(got) == 2
    for name in ("running_mean", "running_var"):
        key = next(k for k in got if k.endswith(name))
        np.testing.assert_allclose(got[key], getattr(model.bn, name).numpy(), rtol=1e-4,
                                   atol=1e-6, err_msg=key)


class LastStepLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(5, 8, batch_first=True), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def test_a_recurrent_layers_zero_initial_state_is_a_constant(tmp_path):
    """A fixed-batch default export writes nn.LSTM's h0 = c0 = zeros as one initializer
    [1, batch, hidden]: it trained as a parameter (a learned initial state per batch slot,
    which PyTorch does not have). A constant, named so, and the losses are PyTorch's."""
    torch.manual_seed(0)
    model = LastStepLSTM()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = torch.onnx.export(model.eval(), (torch.randn(BATCH, 4, 5),), None,
                              input_names=["x"], output_names=["logits"],
                              dynamo=True).model_proto
    onnx.save(proto, str(tmp_path / "model.onnx"))
    lstm = next(n for n in proto.graph.node if n.op_type == "LSTM")
    h0 = lstm.input[5]
    assert h0 in {t.name for t in proto.graph.initializer}
    report = model_report(load_model(tmp_path / "model.onnx"))
    row = next(p for p in report.params if p.name == h0)
    assert row.role != "parameter" and "initial state of zeros" in row.reason
    x, y = random_batches(tmp_path, (4, 5))
    trainer = trains_like_pytorch(tmp_path, model, state, x, y)
    assert h0 not in trainer.names


class LastStepRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.RNN(5, 8, batch_first=True), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def test_a_folded_first_step_from_a_zero_state_trains_its_bias(tmp_path):
    """A fixed-batch default export of nn.RNN folds step 0's `h0 @ W_hh + b_hh` (h0 zeros) into
    an initializer equal to b_hh broadcast [1, batch, hidden], which was called a computed
    constant: b_hh's gradient lacked step 0's term (4e-3 of 4.5e-2 in one case). Tied to b_hh
    as its broadcast: PyTorch's losses, and the export writes it from the trained b_hh."""
    torch.manual_seed(0)
    model = LastStepRNN()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = torch.onnx.export(model.eval(), (torch.randn(BATCH, 4, 5),), None,
                              input_names=["x"], output_names=["logits"],
                              dynamo=True).model_proto
    onnx.save(proto, str(tmp_path / "model.onnx"))
    report = model_report(load_model(tmp_path / "model.onnx"))
    (copy_name, (src, kind)), = report.tied.items()
    assert (src, kind) == ("rnn.bias_hh_l0", "expand")
    x, y = random_batches(tmp_path, (4, 5))
    trainer = trains_like_pytorch(tmp_path, model, state, x, y)
    out = {t.name: onnx.numpy_helper.to_array(t)
           for t in onnx.load(trainer.export(tmp_path / "exported.onnx")).graph.initializer}
    np.testing.assert_array_equal(out[copy_name],
                                  np.broadcast_to(out[src], out[copy_name].shape))
    np.testing.assert_allclose(out[src], model.rnn.bias_hh_l0.detach().numpy(), rtol=1e-4,
                               atol=1e-5)


class CrossAttention(nn.Module):
    """nn.MultiheadAttention as cross attention (`layers` of them): TorchScript reads each
    in_proj_bias through two Slices, its query part and its key and value part."""

    def __init__(self, layers=1):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.lat = nn.Parameter(torch.randn(3, 8) * 0.1)
        self.xattn = nn.ModuleList(nn.MultiheadAttention(8, 2, batch_first=True)
                                   for _ in range(layers))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        kv = self.inp(x)
        q = self.lat.unsqueeze(0).expand(x.shape[0], -1, -1)
        for a in self.xattn:
            q = a(q, kv, kv, need_weights=False)[0]
        return self.fc(q.mean(1))


@pytest.mark.parametrize("layers", [1, 2])
def test_one_bias_cut_into_parts_is_not_called_equal_tensors_stored_once(layers):
    """A cross attention's zero in_proj_bias, read by two Slices of its parts, was warned of as
    equal tensors of several layers stored once (it is one tensor in PyTorch too). (Two
    layers' biases, which TorchScript stores once, get their own tensors back.) Slices that
    overlap still read as equal tensors shared."""
    from onnx import helper, numpy_helper

    from trainer.autodiff.params import shared_constants

    torch.manual_seed(0)
    text = model_report(export(CrossAttention(layers), (4, 6), "torchscript")).text()
    assert "tensors of equal values that several nodes read" not in text, text

    def sliced(ranges):
        nodes, inits = [], [numpy_helper.from_array(np.zeros(6, np.float32), "b")]
        for k, (lo, hi) in enumerate(ranges):
            inits += [numpy_helper.from_array(np.array([v], np.int64), f"{n}{k}")
                      for n, v in (("s", lo), ("e", hi))]
            nodes += [helper.make_node("Slice", ["b", f"s{k}", f"e{k}"], [f"p{k}"]),
                      helper.make_node("Add", ["x", f"p{k}"], [f"y{k}"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [None, 3])],
                              [helper.make_tensor_value_info(f"y{k}", 1, [None, 3])
                               for k in range(len(ranges))], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        return shared_constants(m, ["b"])
    assert sliced([(0, 3), (3, 6)]) == []
    assert sliced([(0, 3), (0, 3)]) == ["b (all 0, read by 2 nodes)"]


@pytest.mark.parametrize("shared_weights", [False, True])
def test_a_bias_two_recurrent_layers_read_is_warned_of_as_stored_once(shared_weights):
    """tf2onnx stores equal constants once: two stacked Keras LSTMs of one size start with the
    same bias (0s, 1s on the forget gate), and both LSTM nodes read one tensor, which trained
    as one where Keras trains two, without a word (found by an other-exporters sweep; it holds
    two values, so the one-value test missed it). A layer used twice, reading its weights
    twice too, shares its bias on purpose: not warned of."""
    from onnx import helper, numpy_helper

    from trainer.autodiff.params import shared_constants

    rng = np.random.default_rng(0)
    H = 3
    bias = np.zeros((1, 8 * H), np.float32)
    bias[0, 2 * H:3 * H] = 1.0  # (ONNX gate order i, o, f, c: the forget gate's ones)
    inits = [numpy_helper.from_array(bias, "B")]
    for k in range(2):
        inits += [numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(np.float32),
                                          f"W{k}"),
                  numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(np.float32),
                                          f"R{k}")]
    w = ["W0", "W0"] if shared_weights else ["W0", "W1"]
    r = ["R0", "R0"] if shared_weights else ["R0", "R1"]
    nodes = [helper.make_node("LSTM", ["x", w[0], r[0], "B"], ["y0"], hidden_size=H),
             helper.make_node("Squeeze", ["y0", "one"], ["h0"]),
             helper.make_node("LSTM", ["h0", w[1], r[1], "B"], ["y1"], hidden_size=H)]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [5, 2, H])],
                          [helper.make_tensor_value_info("y1", 1, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    found = shared_constants(m, ["B"])
    assert found == ([] if shared_weights else
                     ["B (read by 2 LSTM layers, each with weights of its own)"])


class ScaledByItsExp(nn.Module):
    """A parameter read directly and through an expression: l(x) * s + s.exp()."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 5)
        self.s = nn.Parameter(torch.full((5,), 0.5))

    def forward(self, x):
        return self.l(x) * self.s + self.s.exp()


class ClampedByItsShift(nn.Module):
    """clamp(l(x), min=lo, max=lo + 0.8): `lo` kept as a view, `lo + 0.8` folded."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 5)
        self.lo = nn.Parameter(torch.linspace(-0.5, 0.1, 5))

    def forward(self, x):
        return torch.clamp(self.l(x), min=self.lo, max=self.lo + 0.8)


@pytest.mark.parametrize("cls,tensor", [(ScaledByItsExp, "exp (from s)"),
                                        (ClampedByItsShift, "val_3 (from lo)")])
def test_a_folded_expression_of_a_parameter_the_graph_also_reads_is_warned_of(cls, tensor):
    """The default exporter's optimizer folds `s.exp()` (or `lo + 0.8`) into a tensor of its
    own, recording that it came from `s`: `exp` was held constant as "a constant the exporter
    computed from buffers or constants (it holds no PyTorch parameter)", `val_3` trained as a
    fourth tensor, both without a word (found by a torch.nn layer sweep). Both train as
    tensors of their own, warned of."""
    from trainer.report import EXPRESSION_HINT

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(cls().eval(), (torch.randn(2, 8),), None, input_names=["x"],
                                  output_names=["logits"],
                                  dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
    report = model_report(proto)
    text = report.text()
    assert f"{EXPRESSION_HINT}: {tensor}" in text, text
    assert "holds no PyTorch parameter" not in text
    assert tensor.split()[0] in {p.name for p in report.params if p.role == "parameter"}


def test_the_optimizers_folded_from_record_is_read_without_pythons_parser():
    """The record is a Python list of names; ast.literal_eval read it, and CPython 3.11's
    parser is not thread-safe: a rank thread's read failed with "AST constructor recursion
    depth mismatch" in a two-rank test while another thread parsed (seen in CI)."""
    from trainer.autodiff.params import _string_list

    assert _string_list("['1.inv_freq', 'arange', \"cat\"]") == ["1.inv_freq", "arange", "cat"]
    assert _string_list("[]") == [] and _string_list("['a',]") == ["a"]
    assert _string_list("['it\\'s']") == ["it's"]
    for bad in ("['a' + 'b']", "[1, 2]", "x", "['a'"):
        assert _string_list(bad) is None, bad
