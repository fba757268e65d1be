"""Peak memory of fine-tuning a small Transformer language-model-style classifier, onnx-trainer
vs PyTorch eager: all of it trained, or its head alone (the encoder frozen).

The model: token embedding (vocabulary 8000, width 512) -> 4 nn.TransformerEncoderLayer (8
heads, FFN 2048) -> mean over the sequence -> Linear head (10 classes), about 17M parameters
(67 MiB), exported by torch.onnx (TorchScript) from one seed; PyTorch builds the same module
from the same seed. Adam, batch 16 of 64 tokens, a few steps, one thread. Each system runs in a
subprocess of its own, which forgets the peak of its imports (writing 5 to
/proc/self/clear_refs resets VmHWM) and reports its peak resident memory above its resident
memory after them: the memory the run itself took (ours: the set-up, the model's load and the
export included; PyTorch's: building the module). Usage:
    python bench/transformer_memory.py [--steps 4] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from frozen_memory import _PRELUDE, run  # noqa: E402 (the subprocess runner, its status reads)

_MODEL = r'''
import sys
import torch
VOCAB, WIDTH, HEADS, FFN, CLASSES = 8000, 512, 8, 2048, 10
class Net(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, WIDTH)
        self.enc = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(
            WIDTH, HEADS, FFN, dropout=0.0, batch_first=True) for _ in range(layers))
        self.head = torch.nn.Linear(WIDTH, CLASSES)
    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.enc:
            h = layer(h)
        return self.head(h.mean(1))
def build(layers):
    torch.manual_seed(0)
    return Net(layers)
'''

EXPORT = _MODEL + r'''
import warnings
layers, path = int(sys.argv[1]), sys.argv[2]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(build(layers).eval(), (torch.zeros(2, 64, dtype=torch.int64),), path,
                      dynamo=False, input_names=["ids"], output_names=["logits"],
                      dynamic_axes={"ids": {0: "N"}}, opset_version=17)
'''

OURS = _PRELUDE + r'''
import trainer.train, trainer.report, trainer.memory  # noqa: F401 (imports before the count)
from trainer.config import config_from_dict
from trainer.train import Trainer
raw, folder = json.loads(sys.argv[1]), sys.argv[2]
open("/proc/self/clear_refs", "w").write("5")
base = _status("VmRSS")
t = Trainer(config_from_dict(raw, folder))
setup = _status("VmHWM") - base
t.fit()
print(json.dumps({"peak_mib": _status("VmHWM") - base, "setup_mib": setup,
                  "estimate_mib": t.preflight.estimate.peak / 2**20}))
'''

TORCH = _PRELUDE + _MODEL + r'''
import numpy as np
torch.set_num_threads(1)
layers, data_path, frozen, steps, batch = sys.argv[1:6]
steps, batch = int(steps), int(batch)
data = np.load(data_path)
ids, y = torch.from_numpy(data["ids"]), torch.from_numpy(data["y"])
open("/proc/self/clear_refs", "w").write("5")
base = _status("VmRSS")
model = build(int(layers)).train()
if frozen == "1":
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))
setup = _status("VmHWM") - base
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
for s in range(steps):
    i = (s * batch) % len(ids)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(ids[i:i + batch]), y[i:i + batch]).backward()
    opt.step()
print(json.dumps({"peak_mib": _status("VmHWM") - base, "setup_mib": setup}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="transformer_memory_"))
    subprocess.run([sys.executable, "-c", EXPORT, str(args.layers), str(folder / "m.onnx")],
                   check=True)
    rng = np.random.default_rng(0)
    np.savez(folder / "d.npz", ids=rng.integers(0, 8000, (64, 64)),
             y=rng.integers(0, 10, 64))
    size = (folder / "m.onnx").stat().st_size / 2**20
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"NumPy {np.__version__}; {args.layers} layers, model file {size:.0f} MiB, Adam, "
          f"batch 16 x 64 tokens, {args.steps} steps")
    print("| case | ours MiB (set-up) | estimate MiB | PyTorch MiB | ours / PyTorch |")
    print("|---|---|---|---|---|")
    for name, frozen in (("head trained, encoder frozen", True), ("all trained", False)):
        raw = {"model": "m.onnx", "device": "cpu", "threads": 1, "steps": args.steps,
               "output": "out.onnx",
               "data": {"train": {"path": "d.npz", "inputs": {"ids": "ids"},
                                  "targets": {"label": "y"}}, "batch_size": 16},
               "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
               "optimizer": {"type": "adam", "lr": 1e-4}, "log": {"every_steps": 1000}}
        if frozen:
            raw["trainable"] = ["head.*"]
        ours = run(OURS, json.dumps(raw), str(folder))
        peer = run(TORCH, str(args.layers), str(folder / "d.npz"), "1" if frozen else "0",
                   str(args.steps), "16")
        print(f"| {name} | {ours['peak_mib']:.0f} ({ours['setup_mib']:.0f}) | "
              f"{ours['estimate_mib']:.0f} | {peer['peak_mib']:.0f} | "
              f"{ours['peak_mib'] / peer['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
