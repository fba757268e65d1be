"""PyTorch definitions of the CPU benchmark models (issue 11's table), their synthetic data, and
their ONNX export (TorchScript exporter, training form: BatchNorm uses batch statistics)."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """64-128-64-10 with ReLU."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class WideMLP(nn.Module):
    """1024-2048-2048-10 with ReLU: 6.3M parameters (25 MB of float32 gradients), a model whose
    gradient all-reduce is a large part of its step (the data-parallel benchmark)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(1024, 2048), nn.Linear(2048, 2048)
        self.fc3 = nn.Linear(2048, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNetBN(nn.Module):
    """LeNet-5 style on 1x28x28: (Conv5-BN-ReLU-MaxPool) x2, then 120-84-10."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(1, 6, 5, bias=False), nn.BatchNorm2d(6)     # 24x24 -> 12
        self.c2, self.bn2 = nn.Conv2d(6, 16, 5, bias=False), nn.BatchNorm2d(16)   # 8x8 -> 4
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.c2(x))), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.c2(F.relu(self.bn1(self.c1(x)))))
        return F.relu(y + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """CIFAR-style ResNet: stem 3x3 conv, 3 stages x 2 basic blocks (16/32/64 channels),
    global average pool, Linear 64-10."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        blocks, cin = [], 16
        for i, c in enumerate((16, 32, 64)):
            for j in range(2):
                blocks.append(BasicBlock(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Decoder(nn.Module):
    """Pre-LN causal transformer block: attention with MatMul/Softmax, exact GELU (Erf) MLP."""

    def __init__(self, d: int, heads: int, t: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("blocked", ~torch.tril(torch.ones(t, t, dtype=torch.bool)))

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        a = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
        a = a.masked_fill(self.blocked, float("-inf")).softmax(-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, t, d))
        hdn = self.fc1(self.ln2(x))
        return x + self.fc2(0.5 * hdn * (1.0 + torch.erf(hdn * (1.0 / math.sqrt(2.0)))))


class GPT(nn.Module):
    """Decoder-only LM: 2 layers, d=128, 4 heads, T=64, vocabulary 256. Logits are returned as
    [N, V, T] (class axis 1), the layout every system's cross entropy takes as it is."""

    def __init__(self, vocab: int = 256, d: int = 128, heads: int = 4, t: int = 64,
                 layers: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.Sequential(*(Decoder(d, heads, t) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("pos", torch.arange(t))

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(self.pos)
        return self.head(self.ln_f(self.blocks(x))).transpose(1, 2)


@dataclass(frozen=True)
class Case:
    """One benchmark row: a model, its batch and the shape of one sample and its label."""
    name: str
    title: str
    make: type
    batch: int
    sample: tuple[int, ...]
    label: tuple[int, ...] = ()
    classes: int = 10
    ids: bool = False  # integer token inputs (embedding lookups) instead of float features

    def data(self, batches: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """`batches` batches of random inputs and labels (x float32 or int64 ids, y int64)."""
        rng = np.random.default_rng(seed)
        n = self.batch * batches
        if self.ids:
            x = rng.integers(0, self.classes, (n,) + self.sample).astype(np.int64)
        else:
            x = rng.standard_normal((n,) + self.sample).astype(np.float32)
        return x, rng.integers(0, self.classes, (n,) + self.label).astype(np.int64)


CASES = {c.name: c for c in (
    Case("mlp16", "MLP 64-128-64-10, batch 16", MLP, 16, (64,)),
    Case("mlp256", "MLP 64-128-64-10, batch 256", MLP, 256, (64,)),
    Case("lenet16", "LeNet-style CNN+BN, 1x28x28, batch 16", LeNetBN, 16, (1, 28, 28)),
    Case("resnet16", "small ResNet 16/32/64, 3x32x32, batch 16", SmallResNet, 16, (3, 32, 32)),
    Case("widemlp64", "MLP 1024-2048-2048-10 (6.3M parameters), batch 64", WideMLP, 64, (1024,)),
    Case("gpt16", "GPT decoder 2x128, T=64, V=256, batch 16", GPT, 16, (64,), (64,), 256,
         ids=True),
)}


def make_model(case: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.make()


def exported(name: str) -> tuple[Case, nn.Module, onnx.ModelProto]:
    """A case by name, its PyTorch model (seed 0) and that model's ONNX export."""
    torch.set_num_threads(1)
    case = CASES[name]
    net = make_model(case)
    return case, net, export(net, case)


def export(model: nn.Module, case: Case) -> onnx.ModelProto:
    """Training-form export with a dynamic batch axis (opset 17: LayerNormalization)."""
    x = torch.from_numpy(case.data(1)[0][:2])
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.train(), (x,), f, dynamo=False, input_names=["x"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    return onnx.load_from_string(f.getvalue())


def train_flops(model: nn.Module, case: Case) -> float:
    """FLOPs of one forward+backward step (PyTorch's flop counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = (torch.from_numpy(a[:case.batch]) for a in case.data(1))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.train()(x), y).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())
