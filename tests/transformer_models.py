"""PyTorch models for the transformer parity tests (GPT decoder, BERT encoder, LSTM classifier;
the ResNet of torch_models), their export with both exporters, the forms in which the exporters
store torch's tensors, and a reference torch.optim training loop."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, T, D, HEADS, CLASSES, PAD = 50, 8, 32, 2, 5, 0
# The exported graphs hold their constants in float32, so the float64 references use constants
# that float32 represents exactly: head size 16 (scale 1/4) and a float32-rounded 1/sqrt(2).
SQRT_HALF = float(np.float32(math.sqrt(0.5)))


class Block(nn.Module):
    """Transformer block: multi-head self-attention written with MatMul/Softmax (mask applied
    by masked_fill; fused or separate Q/K/V projections), exact GELU MLP (F.gelu or written
    with erf), residual adds; pre-LN (GPT) or post-LN (BERT)."""

    def __init__(self, d: int = D, heads: int = HEADS, pre_ln: bool = True,
                 erf_gelu: bool = False, fused_qkv: bool = False):
        super().__init__()
        self.heads, self.pre_ln, self.erf_gelu = heads, pre_ln, erf_gelu
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # No bias on the keys: softmax ignores a per-query constant, so a key bias has an exact
        # zero gradient, which float32 AdamW (both engines) turns into lr-sized noise steps.
        if fused_qkv:  # one projection, split in three (no biases, as in LLaMA-style models)
            self.qkv = nn.Linear(d, 3 * d, bias=False)
        else:  # separate projections, no key bias (as in Whisper)
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attention(self, x, blocked):
        """`blocked` [.., T, T] (broadcast over heads): True where a query must not look."""
        b, t, d = x.shape
        h = self.heads
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).split(d, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        a = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        a = a.masked_fill(blocked, float("-inf")).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))

    def mlp(self, x):
        h = self.fc1(x)
        if self.erf_gelu:  # exact GELU written out: the exporters keep the Erf
            return self.fc2(0.5 * h * (1.0 + torch.erf(h * SQRT_HALF)))
        return self.fc2(F.gelu(h))  # exact GELU: the Gelu op at opset 20

    def forward(self, x, blocked):
        if self.pre_ln:
            x = x + self.attention(self.ln1(x), blocked)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attention(x, blocked))
        return self.ln2(x + self.mlp(x))


class GPT(nn.Module):
    """Decoder-only LM on token ids [N, T]: token + position embeddings, 2 pre-LN causal blocks
    (GELU through erf), final LayerNorm, output projection to [N, T, VOCAB] (tied to the token
    embedding or not)."""

    def __init__(self, tied: bool = False, d: int = D, layers: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, erf_gelu=True, fused_qkv=True) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, ids):
        t = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(t))
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        for blk in self.blocks:
            x = blk(x, causal)
        return self.head(self.ln_f(x))


class BERT(nn.Module):
    """Encoder classifier on token ids [N, T] padded with PAD: embeddings + LayerNorm, 2 post-LN
    blocks whose attention ignores padded keys (mask built from the ids), head on token 0."""

    def __init__(self, d: int = D, layers: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(T, d)
        self.ln = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(Block(d, pre_ln=False) for _ in range(layers))
        self.pool, self.cls = nn.Linear(d, d), nn.Linear(d, CLASSES)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.ln(self.wte(ids) + self.wpe(torch.arange(t)))
        padded = (ids == PAD)[:, None, None, :]  # [N, 1, 1, T]: keys that are padding
        for blk in self.blocks:
            x = blk(x, padded)
        return self.cls(torch.tanh(self.pool(x[:, 0])))


class LSTMClassifier(nn.Module):
    """nn.LSTM (batch_first) over [N, T, 6] features; Linear on the last hidden state."""

    def __init__(self, features: int = 6, hidden: int = 12):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.fc(h[-1])


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "resnet":
        from tests.torch_models import zoo_model
        return zoo_model("resnet", seed)
    model = {"gpt": lambda: GPT(tied=False), "gpt_tied": lambda: GPT(tied=True), "bert": BERT,
             "lstm": LSTMClassifier}[kind]()
    with torch.no_grad():  # non-trivial LayerNorm affine, so that its gradients are exercised
        g = torch.Generator().manual_seed(seed + 1)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(0.8 + 0.4 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def sample_input(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Model inputs: token ids (BERT rows padded with PAD after a random length >= 2), float
    sequences for the LSTM, images for the ResNet."""
    if kind in ("gpt", "gpt_tied"):
        return rng.integers(1, VOCAB, (n, T)).astype(np.int64)
    if kind == "bert":
        ids = rng.integers(1, VOCAB, (n, T)).astype(np.int64)
        lengths = rng.integers(2, T + 1, n)
        ids[np.arange(T)[None, :] >= lengths[:, None]] = PAD
        return ids
    if kind == "lstm":
        return rng.standard_normal((n, T, 6)).astype(np.float32)
    return rng.standard_normal((n, 3, 8, 8)).astype(np.float32)


def sample_target(kind: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels: next token for the GPT ([N, T]), a class per sample otherwise."""
    n = len(x)
    if kind in ("gpt", "gpt_tied"):
        return np.concatenate([x[:, 1:], rng.integers(1, VOCAB, (n, 1))], 1).astype(np.int64)
    return rng.integers(0, 10 if kind == "resnet" else CLASSES, n).astype(np.int64)


def export(model: nn.Module, x: np.ndarray, exporter: str, fold: bool = True) -> onnx.ModelProto:
    """dynamo: torch.onnx.export's defaults in eval mode; torchscript: dynamo=False in eval mode.
    fold=False (and always for the ResNet, whose BatchNorm would be folded into the Conv):
    without the dynamo optimizer / TorchScript constant folding, so that a weight MatMul reads
    transposed stays a Transpose node of the parameter instead of a folded copy."""
    xt = torch.from_numpy(x[:2])
    fold = fold and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            prog = torch.onnx.export(model, (xt,), None, input_names=["x"],
                                     output_names=["logits"], optimize=fold,
                                     dynamic_shapes=({0: torch.export.Dim("N")},))
            return prog.model_proto
        torch.onnx.export(model, (xt,), f, dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "N"}},
                          do_constant_folding=fold)
    return onnx.load_from_string(f.getvalue())


def train_torch(model: nn.Module, x: np.ndarray, y: np.ndarray, *, optimizer: dict, steps: int,
                batch: int, dtype) -> list[float]:
    """torch.optim in .train() mode on batches [bj, bj + b) in order (no shuffle, drop_last);
    cross entropy over the last axis (mean over every label). Trains `model` in place."""
    model.to(dtype).train()
    params = list(model.parameters())  # a tied weight once
    if optimizer["type"] == "sgd":
        opt = torch.optim.SGD(params, lr=optimizer["lr"])
    else:
        opt = torch.optim.AdamW(params, lr=optimizer["lr"],
                                weight_decay=optimizer["weight_decay"])
    xt = torch.from_numpy(x)
    xt = xt.to(dtype) if xt.is_floating_point() else xt
    yt = torch.from_numpy(y)
    per_epoch = len(x) // batch
    losses = []
    for k in range(steps):
        j = k % per_epoch
        logits = model(xt[j * batch:(j + 1) * batch])
        yb = yt[j * batch:(j + 1) * batch]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def _lstm_gates(w: torch.Tensor) -> torch.Tensor:
    """PyTorch's gate blocks (i, f, g, o) in ONNX's order (i, o, f, c)."""
    i, f, g, o = w.chunk(4, 0)
    return torch.cat([i, o, f, g], 0)


def reference_forms(model: nn.Module) -> dict[str, np.ndarray]:
    """The forms in which the exporters store the model's tensors, keyed by how they derive
    from torch's: `p` (a parameter or BatchNorm running statistic, a tied weight once), `p^T`
    (2-D weights that MatMul reads transposed) and the ONNX LSTM's W, R and B, `lstm:W0` for
    layer 0 (gates reordered, a direction axis, both biases in one tensor)."""
    out = {}
    state = dict(model.named_parameters())
    state.update({k: v for k, v in model.named_buffers() if not k.endswith("num_batches_tracked")})
    for k, v in state.items():
        v = v.detach()
        out[k] = v.numpy().copy()
        if v.ndim == 2:
            out[k + "^T"] = v.T.numpy().copy()
    for name, m in model.named_modules():
        if isinstance(m, nn.LSTM):
            for layer in range(m.num_layers):
                w = {s: getattr(m, f"{s}_l{layer}").detach()
                     for s in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
                out[f"{name}:W{layer}"] = _lstm_gates(w["weight_ih"])[None].numpy().copy()
                out[f"{name}:R{layer}"] = _lstm_gates(w["weight_hh"])[None].numpy().copy()
                out[f"{name}:B{layer}"] = torch.cat([_lstm_gates(w["bias_ih"]),
                                                     _lstm_gates(w["bias_hh"])])[None].numpy().copy()
    return out


def sources(form: str) -> list[str]:
    """The torch tensors (state_dict names) a key of reference_forms derives from."""
    if form.endswith("^T"):
        return [form[:-2]]
    if ":" in form:  # an LSTM tensor
        mod, rest = form.split(":")
        kind, layer = rest[0], rest[1:]
        return {"W": [f"{mod}.weight_ih_l{layer}"], "R": [f"{mod}.weight_hh_l{layer}"],
                "B": [f"{mod}.bias_ih_l{layer}", f"{mod}.bias_hh_l{layer}"]}[kind]
    return [form]
