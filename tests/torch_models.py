"""PyTorch reference models for the trajectory parity tests, their ONNX export, and a reference
training loop (torch.optim + F.cross_entropy in `.train()` mode) to compare the engine against."""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear on [N, 20] inputs, 10 classes."""

    def __init__(self, d_in: int = 20, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet(nn.Module):
    """LeNet-style CNN on [N, 1, 16, 16]: Conv-BN-ReLU-MaxPool, Conv-ReLU-AvgPool, 2 Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        # No bias before BatchNorm (as usual): in train mode its gradient is exactly zero, so
        # SGD never moves it and AdamW would only amplify rounding noise into lr-sized steps.
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2, bias=False)   # 16x16
        self.bn = nn.BatchNorm2d(6)
        self.pool1 = nn.MaxPool2d(2)                 # 8x8
        self.conv2 = nn.Conv2d(6, 16, 5)             # 4x4
        self.pool2 = nn.AvgPool2d(2)                 # 2x2
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x):
        x = self.pool1(F.relu(self.bn(self.conv1(x))))
        x = self.pool2(F.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


SAMPLE_SHAPES = {"mlp": (20,), "cnn": (1, 16, 16)}


def make_model(kind: str, seed: int = 0) -> nn.Module:
    """A freshly initialized float32 model; BatchNorm gets non-trivial affine and running stats
    so that the running-statistics update and the affine gradients are really exercised."""
    torch.manual_seed(seed)
    model = MLP() if kind == "mlp" else LeNet()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
    return model


def export_onnx(model: nn.Module, kind: str) -> onnx.ModelProto:
    """The model in its default inference form, as torch.onnx.export (dynamo) writes it.

    optimize=False: with the default optimize=True the exporter folds eval-mode BatchNormalization
    into the preceding Conv, and there would be no BatchNormalization left to train.
    """
    x = torch.randn((2,) + SAMPLE_SHAPES[kind])
    program = torch.onnx.export(model.train(False), (x,), None, input_names=["x"],
                                output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("N")},), optimize=False,
                                verbose=False)
    return program.model_proto


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def torch_from_values(kind: str, values: dict[str, np.ndarray], dtype) -> nn.Module:
    """A model of `kind` holding exactly `values` (ONNX initializers, by torch name) in dtype."""
    model = make_model(kind).to(dtype)
    state = {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in values.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    return model


def train_torch(kind: str, values: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, *,
                optimizer: dict, steps: int, batch: int, dtype) -> tuple[list[float], nn.Module]:
    """Plain torch training in .train() mode; batch k holds samples [16j, 16j+16) of the data,
    j = k mod (full batches per epoch): no shuffle, drop_last, epochs wrap to sample 0."""
    model = torch_from_values(kind, values, dtype).train()
    params = list(model.parameters())
    if optimizer["type"] == "sgd":
        opt = torch.optim.SGD(params, lr=optimizer["lr"])
    else:
        opt = torch.optim.AdamW(params, lr=optimizer["lr"],
                                weight_decay=optimizer["weight_decay"])
    xt = torch.from_numpy(x).to(dtype)
    yt = torch.from_numpy(y).long()
    per_epoch = len(x) // batch
    losses = []
    for k in range(steps):
        j = k % per_epoch
        xb, yb = xt[j * batch:(j + 1) * batch], yt[j * batch:(j + 1) * batch]
        loss = F.cross_entropy(model(xb), yb)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses, model


class SmallResNet(nn.Module):
    """ResNet-style CNN on [N, 3, 8, 8]: stem Conv-BN-ReLU, a basic block, a downsampling block
    with a 1x1 Conv-BN shortcut, global average pool, Linear (residual Adds, 5 BatchNorms)."""

    def __init__(self, classes: int = 10, width: int = 4):
        super().__init__()
        w = width
        self.stem = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(w)
        self.a1 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.abn1 = nn.BatchNorm2d(w)
        self.a2 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.abn2 = nn.BatchNorm2d(w)
        self.b1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bbn1 = nn.BatchNorm2d(2 * w)
        self.b2 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False)
        self.bbn2 = nn.BatchNorm2d(2 * w)
        self.short = nn.Conv2d(w, 2 * w, 1, stride=2, bias=False)
        self.sbn = nn.BatchNorm2d(2 * w)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.abn2(self.a2(F.relu(self.abn1(self.a1(x))))))
        x = F.relu(self.sbn(self.short(x)) + self.bbn2(self.b2(F.relu(self.bbn1(self.b1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


class DropoutMLP(nn.Module):
    """Linear-ReLU-Dropout(0.25)-Linear on [N, 20] inputs, 10 classes."""

    def __init__(self, d_in: int = 20, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x))))


ZOO = {"mlp": (MLP, (20,)), "cnn": (LeNet, (1, 16, 16)), "resnet": (SmallResNet, (3, 8, 8)),
       "dropout_mlp": (DropoutMLP, (20,))}


def zoo_model(kind: str, seed: int = 0) -> nn.Module:
    """A fresh model of the zoo with non-trivial BatchNorm affine and running statistics."""
    torch.manual_seed(seed)
    model = ZOO[kind][0]()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
    return model


def export_form(model: nn.Module, sample_shape: tuple, form: str = "inference") -> onnx.ModelProto:
    """The model as users export it, with a dynamic batch axis.

    "inference": torch.onnx.export (dynamo) of the eval-mode model with optimize=False (so that
    BatchNormalization is not folded into the Conv): BN running statistics become training state.
    "training": the TorchScript exporter with TrainingMode.TRAINING: BatchNormalization with
    training_mode=1 and three outputs, Dropout with its mask output.
    """
    import io
    import warnings

    x = torch.randn((2,) + tuple(sample_shape))
    if form == "inference":
        program = torch.onnx.export(model.train(False), (x,), None, input_names=["x"],
                                    output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("N")},),
                                    optimize=False, verbose=False)
        return program.model_proto
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.train(), (x,), f, dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    return onnx.load_from_string(f.getvalue())
