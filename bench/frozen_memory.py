"""Peak memory of fine-tuning a head on a frozen backbone, onnx-trainer vs PyTorch eager.

The model: x -> MatMul(2048x2048) -> Relu -> MatMul(2048x2048) -> Relu -> MatMul(2048x10), the
two 2048x2048 layers (32 MiB) frozen or trained, Adam, batch 16, a few steps, one thread,
with or without an evaluation set (ours: data.eval, evaluated at the end; PyTorch: a
`torch.no_grad()` pass over the same samples). Each system runs in a subprocess of its own,
which forgets the peak of its imports (writing 5 to /proc/self/clear_refs resets VmHWM) and
reports its peak resident memory above its resident memory after them: the memory the run
itself took, set-up included (ours: the export too). Usage:
    python bench/frozen_memory.py [--steps 4] [--width 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent

_PRELUDE = r'''
import json, sys
def _status(key):
    return [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(key)][0]
'''

OURS = _PRELUDE + r'''
import trainer.train, trainer.report, trainer.memory  # noqa: F401 (imports before the count)
from trainer.config import config_from_dict
from trainer.train import Trainer
raw, folder = json.loads(sys.argv[1]), sys.argv[2]
open("/proc/self/clear_refs", "w").write("5")
base = _status("VmRSS")
t = Trainer(config_from_dict(raw, folder))
t.fit()
print(json.dumps({"peak_mib": _status("VmHWM") - base,
                  "estimate_mib": t.preflight.estimate.peak / 2**20}))
'''

TORCH = _PRELUDE + r'''
import numpy as np, onnx, torch
from onnx import numpy_helper
torch.set_num_threads(1)
model_path, data_path, frozen, steps, batch, evaluate = sys.argv[1:7]
steps, batch = int(steps), int(batch)
open("/proc/self/clear_refs", "w").write("5")
base = _status("VmRSS")
w = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
     for t in onnx.load(model_path).graph.initializer}
params = {k: torch.nn.Parameter(v, requires_grad=not (frozen == "1" and k != "w3"))
          for k, v in w.items()}
del w
data = np.load(data_path)
x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
opt = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=1e-3)
def forward(xb):
    h = torch.relu(xb @ params["w1"])
    h = torch.relu(h @ params["w2"])
    return h @ params["w3"]
for s in range(steps):
    i = (s * batch) % len(x)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(forward(x[i:i + batch]), y[i:i + batch]).backward()
    opt.step()
if evaluate == "1":
    with torch.no_grad():
        for i in range(0, len(x), batch):
            forward(x[i:i + batch])
print(json.dumps({"peak_mib": _status("VmHWM") - base}))
'''


def write_files(folder: Path, width: int) -> None:
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * 0.02).astype(np.float32), name)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"]),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "w3"], ["logits"])]
    g = helper.make_graph(
        nodes, "backbone", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [weight("w1", width, width), weight("w2", width, width), weight("w3", width, 10)])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              folder / "m.onnx")
    np.savez(folder / "d.npz", x=rng.standard_normal((64, width)).astype(np.float32),
             y=rng.integers(0, 10, 64))


def run(code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=env, check=False)
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        raise SystemExit(f"a run failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--width", type=int, default=2048)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="frozen_memory_"))
    write_files(folder, args.width)
    mib = 2 * args.width * args.width * 4 / 2**20
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"NumPy {np.__version__}; backbone {mib:.0f} MiB, Adam, batch 16, {args.steps} steps")
    print("| case | ours MiB | estimate MiB | PyTorch MiB | ours / PyTorch |")
    print("|---|---|---|---|---|")
    for name, frozen, evaluate in (("frozen backbone", True, False),
                                   ("frozen backbone, eval set", True, True),
                                   ("all trained", False, False)):
        raw = {"model": "m.onnx", "device": "cpu", "threads": 1, "steps": args.steps,
               "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                                  "targets": {"label": "y"}}, "batch_size": 16},
               "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
               "optimizer": {"type": "adam", "lr": 1e-3}, "log": {"every_steps": 1000}}
        if frozen:
            raw["frozen"] = ["w1", "w2"]
        if evaluate:
            raw["data"]["eval"] = raw["data"]["train"]
        ours = run(OURS, json.dumps(raw), str(folder))
        peer = run(TORCH, str(folder / "m.onnx"), str(folder / "d.npz"), "1" if frozen else "0",
                   str(args.steps), "16", "1" if evaluate else "0")
        print(f"| {name} | {ours['peak_mib']:.0f} | {ours['estimate_mib']:.0f} | "
              f"{peer['peak_mib']:.0f} | {ours['peak_mib'] / peer['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
