"""The model families every training path is tested on (the lesson of a path tested on one
family only: mpirun on an MLP hid a crash for every other family). Each family is a small model
exported from PyTorch the way users export theirs, with its data; `zoo` (tests/conftest.py)
builds them once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

# name: (zoo kind, export form, extra config). BatchNormalization in inference form makes its
# running statistics training state (broadcast at start, exported from rank 0); the training form
# has BatchNormalization(training_mode=1) and Dropout with a mask output.
FAMILIES = {
    "bn_cnn_inference": ("cnn", "inference", {}),
    "resnet_inference": ("resnet", "inference", {}),
    "bn_cnn_training_form": ("cnn", "training", {}),
    "dropout_mlp": ("dropout_mlp", "training", {}),
    "mlp_frozen": ("mlp", "inference", {"frozen": ["fc1.*"]}),
    "qdq_mlp": ("qdq_mlp", "built", {}),  # fake quantization (QuantizeLinear/DequantizeLinear)
    # the BatchNorm CNN through onnxruntime's quantize_static (QDQ, float weights), its scales
    # learned too (kept positive after each update)
    "ort_qdq_cnn": ("cnn", "ort_qdq", {
        "trainable": ["all", "*_scale"],
        "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9,
                      "groups": [{"params": "*_scale", "lr": 1e-4}]}}),
    # a pre-norm transformer encoder layer through the default exporter with its optimizer: its
    # merged LayerNorm tensors and dropped attention bias are restored on every rank
    "encoder_dynamo": ("encoder", "dynamo", {}),
    # token ids through an nn.Embedding with a padding row into rotary attention, default
    # exporter: the padding row's gradient is left out and the folded cos/sin tables stay fixed
    # on every rank
    "token_rotary_dynamo": ("token_rotary", "dynamo", {}),
}


def build_zoo(tmp_path_factory) -> dict[str, Path]:
    """Per family: a directory with model.onnx (exported from PyTorch) and data.npz."""
    torch_models = pytest.importorskip("tests.torch_models")
    pytest.importorskip("onnxscript")
    out = {}
    for i, (name, (kind, form, _)) in enumerate(FAMILIES.items()):
        d = tmp_path_factory.mktemp(name)
        if kind == "qdq_mlp":
            from tests.test_grad_quant import qdq_mlp

            sample = (8,)
            onnx.save(qdq_mlp(np.random.default_rng(20 + i), classes=10)[0],
                      str(d / "model.onnx"))
        elif form == "ort_qdq":
            from tests.test_grad_quant import _quantize_static_qdq

            sample = torch_models.ZOO[kind][1]
            model = torch_models.zoo_model(kind, seed=20 + i)
            onnx.save(torch_models.export_form(model, sample, "inference"), str(d / "float.onnx"))
            calibration = np.random.default_rng(99).standard_normal((32,) + sample)
            _quantize_static_qdq(d / "float.onnx", d / "model.onnx",
                                 calibration.astype(np.float32))
        elif kind == "token_rotary":
            import torch

            from tests.test_user_models import Rotary

            torch.manual_seed(20 + i)
            emb, block = torch.nn.Embedding(16, 8, padding_idx=0), Rotary()
            block.head = torch.nn.Linear(8, 10)
            model = torch.nn.Sequential(emb, block).eval()
            proto = torch.onnx.export(model, (torch.zeros(2, 6, dtype=torch.int64),), None,
                                      input_names=["x"], output_names=["logits"],
                                      dynamic_shapes=({0: torch.export.Dim("N")},))
            onnx.save(proto.model_proto, str(d / "model.onnx"))
            rng = np.random.default_rng(i)
            np.savez(d / "data.npz", x=rng.integers(0, 16, (64, 6)).astype(np.int64),
                     y=rng.integers(0, 10, 64).astype(np.int64))
            out[name] = d
            continue
        elif form == "dynamo":
            import torch

            from tests.test_user_models import Encoder, export

            sample = (6, 8)
            torch.manual_seed(20 + i)
            model = Encoder()
            model.head = torch.nn.Linear(8, 10)
            onnx.save(export(model, sample, "dynamo"), str(d / "model.onnx"))
        else:
            sample = torch_models.ZOO[kind][1]
            model = torch_models.zoo_model(kind, seed=20 + i)
            onnx.save(torch_models.export_form(model, sample, form), str(d / "model.onnx"))
        rng = np.random.default_rng(i)
        n = 64
        x = rng.standard_normal((n,) + sample).astype(np.float32)
        np.savez(d / "data.npz", x=x, y=rng.integers(0, 10, n).astype(np.int64))
        out[name] = d
    return out


def family_config(d, name, **over):
    """The training config of a family's job (float64, 6 steps, momentum SGD), `over` on top."""
    raw = {"model": str(d / "model.onnx"), "output": str(d / "out.onnx"), "device": "cpu",
           "precision": "fp64",
           "data": {"train": {"path": str(d / "data.npz"), "inputs": {"x": "x"},
                              "targets": {"label": "y"}},
                    "batch_size": 16, "shuffle": True},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
           "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9}, "steps": 6,
           "log": {"every_steps": 1}, **FAMILIES[name][2]}
    raw.update(over)
    return raw


def family_training_graph(d, batchnorm: str = "train", batch: int = 8):
    """(the family's training graph for cross entropy at `batch` samples, its feeds: the first
    `batch` samples of its data)."""
    from trainer.autodiff import build_training_graph

    tm = build_training_graph(onnx.load(str(d / "model.onnx")),
                              {"type": "cross_entropy", "output": "logits", "target": "label",
                               "class_axis": -1}, "all", batch_size=batch, batchnorm=batchnorm)
    data = np.load(d / "data.npz")
    return tm, {"x": data["x"][:batch], "label": data["y"][:batch]}
