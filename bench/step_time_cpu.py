"""Training-step time on CPU, onnx-trainer vs PyTorch eager, side by side in one process.

Same model (the digits MLP, and a LeNet-style CNN with BatchNorm), same batch, same optimizer
(SGD + momentum); reports the median step time of each and the ratio. Usage:
    python bench/step_time_cpu.py [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from trainer.cli import at_least  # noqa: E402
from trainer.config import config_from_dict  # noqa: E402
from trainer.train import Trainer  # noqa: E402


def cnn_model(path: Path) -> None:
    rng = np.random.default_rng(0)

    def init(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)
    inits = [init("c1.w", 8, 1, 5, 5), init("bn.s", 8), init("bn.b", 8), init("bn.m", 8),
             numpy_helper.from_array(np.ones(8, np.float32), "bn.v"),
             init("c2.w", 16, 8, 5, 5, scale=0.05), init("c2.b", 16),
             init("fc.w", 10, 256, scale=0.05), init("fc.b", 10)]
    nodes = [helper.make_node("Conv", ["x", "c1.w"], ["a"], pads=[2, 2, 2, 2]),
             helper.make_node("BatchNormalization", ["a", "bn.s", "bn.b", "bn.m", "bn.v"],
                              ["b"]),
             helper.make_node("Relu", ["b"], ["c"]),
             helper.make_node("MaxPool", ["c"], ["d"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["d", "c2.w", "c2.b"], ["e"], pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["e"], ["f"]),
             helper.make_node("MaxPool", ["f"], ["g"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["g"], ["h"]),
             helper.make_node("Gemm", ["h", "fc.w", "fc.b"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


class TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 5, padding=2, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 16, 5, padding=2)
        self.fc = torch.nn.Linear(256, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn(self.c1(x))), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def time_ours(model: Path, data: Path, steps: int, batch: int) -> list[float]:
    cfg = config_from_dict({
        "model": str(model), "output": "/tmp/bench_out.onnx", "device": "cpu",
        "data": {"train": {"path": str(data), "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": batch, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": 0.01, "momentum": 0.9}, "steps": steps,
        "log": {"every_steps": steps}}, ROOT)
    t = Trainer(cfg, stream=io.StringIO())
    times = []
    for _ in range(steps):
        _, arrays, local_w, global_w, _ = t._next_micro_batch()
        t0 = time.perf_counter()
        t.train_step([(arrays, local_w, global_w)], 0.01)
        times.append(time.perf_counter() - t0)
    return times


def time_torch(net, x, y, steps: int, batch: int) -> list[float]:
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    times = []
    for s in range(steps):
        i = (s * batch) % (len(x) - batch + 1)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xs[i:i + batch]), ys[i:i + batch])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=at_least(11), default=200,
                    help="timed steps (more than 10: the deciles need them)")
    ap.add_argument("--threads", type=at_least(1), default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path("/tmp/onnx_trainer_bench")
    tmp.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    digits = np.load(ROOT / "examples" / "digits.npz")
    np.savez(tmp / "digits.npz", x=digits["x_train"], y=digits["y_train"])
    np.savez(tmp / "img.npz", x=rng.normal(size=(512, 1, 16, 16)).astype(np.float32),
             y=rng.integers(0, 10, 512))
    cnn_model(tmp / "cnn.onnx")
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 10))
    print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
          f"python {platform.python_version()}  numpy {np.__version__}  torch "
          f"{torch.__version__}  torch threads {args.threads}")
    print(f"{'case':<18}{'ours ms':>9}{'torch ms':>10}{'ours/torch':>12}")
    cases = [("mlp b32", ROOT / "examples" / "digits_mlp.onnx", tmp / "digits.npz", mlp,
              digits["x_train"], digits["y_train"], 32),
             ("mlp b256", ROOT / "examples" / "digits_mlp.onnx", tmp / "digits.npz", mlp,
              digits["x_train"], digits["y_train"], 256),
             ("cnn+bn b64", tmp / "cnn.onnx", tmp / "img.npz", TorchCNN(),
              np.load(tmp / "img.npz")["x"], np.load(tmp / "img.npz")["y"], 64)]
    for name, model, data, net, x, y, batch in cases:
        ours = statistics.median(time_ours(model, data, args.steps, batch)[10:]) * 1e3
        ref = statistics.median(time_torch(net, x, y, args.steps, batch)[10:]) * 1e3
        print(f"{name:<18}{ours:>9.3f}{ref:>10.3f}{ours / ref:>12.2f}")


if __name__ == "__main__":
    main()
