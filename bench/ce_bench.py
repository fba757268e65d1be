"""Cross-entropy loss on CPU, forward + backward of the loss alone: onnx-trainer's planned
training graph (the loss nodes' kernel time) against torch.nn.functional.cross_entropy on the
same arrays, with and without label_smoothing and class weights.

The model is logits = x + b (b trained), so the graph's loss part is timed from the planned
executor's per-node timers (nodes named loss/...); torch times cross_entropy(...).backward()
on a leaf tensor. The best of --repeat runs after a warm-up (a shared machine's other work
only ever adds time), medians beside it in --json. Usage:
    python bench/ce_bench.py [--threads 1] [--repeat 7] [--shapes 512x32000,4096x1000]
        [--ignore 0.0] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = (("plain", 0.0, False), ("smoothing", 0.1, False), ("weights", 0.0, True),
         ("both", 0.1, True))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--shapes", default="512x32000,4096x1000", help="NxC,...")
    p.add_argument("--cases", default=",".join(c[0] for c in CASES))
    p.add_argument("--ignore", type=float, default=0.0,
                   help="share of labels set to ignore_index (-100)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _graph(n: int, c: int, eps: float, weights):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from trainer.autodiff import build_training_graph, training_info

    b = numpy_helper.from_array(np.zeros(c, np.float32), "b")
    g = helper.make_graph([helper.make_node("Add", ["x", "b"], ["logits"])], "ce",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, c])],
                          [b])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    tm = build_training_graph(model, {"type": "cross_entropy", "output": "logits",
                                      "target": "label", "label_smoothing": eps,
                                      "weight": None if weights is None else list(weights)})
    return tm, training_info(tm)


def ours(x, labels, eps: float, weights, repeat: int) -> dict:
    """Median ms of the loss nodes (forward + backward) and of the whole step; the fused
    nodes the plan holds."""
    import numpy as np

    from trainer.executor import Executor, build_plan

    n, c = x.shape
    tm, info = _graph(n, c, eps, weights)
    feeds_names = list(info.gradients) + [info.seed]  # (the seed fed, as a training run's)
    ex = Executor(tm, feeds=feeds_names, fetch=[info.loss] + list(info.gradients.values()))
    feeds = {"b": np.zeros(c, np.float32), info.seed: np.array(1.0, np.float32), "x": x,
             info.targets["label"]: labels}
    ex.run(feeds)
    ex.run(feeds)
    plan = next(p for p in ex._specialized.values() if p)
    per: list[float] = []
    timed = build_plan(ex, plan.record, timers=per)
    timed.run(feeds, np)
    loss_ms, step_ms = [], []
    mine = [i for i, (name, _, _) in enumerate(timed.labels) if name.startswith("loss")]
    for _ in range(repeat):
        before = list(per)
        t = time.perf_counter()
        timed.run(feeds, np)
        step_ms.append((time.perf_counter() - t) * 1e3)
        loss_ms.append(sum(per[i] - before[i] for i in mine) * 1e3)
    return {"loss_ms": min(loss_ms), "step_ms": min(step_ms),
            "loss_ms_median": statistics.median(loss_ms),
            "loss_nodes": len(mine),
            "fused": sorted({op for name, op, _ in timed.labels if name.startswith("loss")
                             and ("fused" in name or op.startswith("SoftmaxCrossEntropy"))})}


def torch_ms(x, labels, eps: float, weights, repeat: int) -> float:
    import torch

    xt = torch.from_numpy(x)
    lt = torch.from_numpy(labels)
    wt = None if weights is None else torch.from_numpy(weights)
    times = []
    for k in range(repeat + 1):
        z = xt.clone().requires_grad_()
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(z, lt, weight=wt, label_smoothing=eps).backward()
        if k:
            times.append((time.perf_counter() - t) * 1e3)
    return min(times), statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = str(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from trainer.kernels import compiled

    print(f"# {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"numpy {np.__version__}, torch {torch.__version__}; {compiled.status()}")
    print(f"{'shape':>11} {'case':>10} {'ours loss ms':>13} {'ours step ms':>13} "
          f"{'torch ms':>9} {'ours/torch':>10}  fused")
    rows = []
    rng = np.random.default_rng(0)
    wanted = args.cases.split(",")
    for shape in args.shapes.split(","):
        n, c = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((n, c)).astype(np.float32)
        labels = rng.integers(0, c, n)
        labels[rng.random(n) < args.ignore] = -100
        w = rng.uniform(0.1, 2.0, c).astype(np.float32)
        for name, eps, weighted in CASES:
            if name not in wanted:
                continue
            weights = w if weighted else None
            got = ours(x, labels, eps, weights, args.repeat)
            ref, ref_median = torch_ms(x, labels, eps, weights, args.repeat)
            row = {"shape": shape, "case": name, **got, "torch_ms": ref,
                   "torch_ms_median": ref_median}
            rows.append(row)
            print(f"{shape:>11} {name:>10} {got['loss_ms']:13.2f} {got['step_ms']:13.2f} "
                  f"{ref:9.2f} {got['loss_ms'] / ref:10.2f}  {','.join(got['fused']) or '-'}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
