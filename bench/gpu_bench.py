"""GPU training step on one GPU, side by side: ours (device: gpu) vs PyTorch eager (--compile: and
torch.compile) for an MLP, a ResNet-18-style CNN and a ~50M GPT decoder; ms, peak memory, TFLOP/s.
`--precision fp32 | tf32 | fp16 | bf16` sets both sides alike (tf32: allow_tf32; fp16:
torch.autocast with GradScaler against our `precision: fp16`; bf16: torch.autocast in bfloat16
against our `precision: bf16`); `--cuda-graph` runs ours with gpu.cuda_graph
(forward and backward as one captured graph); `--profile N` prints the N ops where our step
spends the most time. `--dry-run` runs tiny models on the CPU (ours through the CuPy
stand-in); see --help."""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from trainer.cli import at_least  # noqa: E402

LR = 0.01


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    batch: int
    sample: tuple[int, ...]   # one input sample's shape
    label: tuple[int, ...]    # one label's shape
    classes: int
    ids: bool                 # token ids (int64) instead of float features
    build: str                # how to make the torch model (see make_model)
    size: dict                # its hyper-parameters

    def data(self, batches: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """Random batches as bench/models.py makes them (seed 0)."""
        import models

        return models.Case.data(self, batches)


FULL = {
    "mlp": Case("mlp", "MLP 1024-4x4096-10, batch 512", 512, (1024,), (), 10, False, "mlp",
                {"d_in": 1024, "hidden": 4096, "layers": 4}),
    "resnet18": Case("resnet18", "ResNet-18 (CIFAR stem), 3x32x32, batch 256", 256, (3, 32, 32),
                     (), 10, False, "resnet", {"widths": (64, 128, 256, 512)}),
    "gpt50m": Case("gpt50m", "GPT 6x768, 12 heads, T=256, V=8192, batch 16", 16, (256,), (256,),
                   8192, True, "gpt", {"d": 768, "heads": 12, "layers": 6}),
}
TINY = {  # --dry-run: the same code paths at CPU-friendly sizes
    "mlp": Case("mlp", "MLP 64-4x128-10, batch 32 (dry run)", 32, (64,), (), 10, False, "mlp",
                {"d_in": 64, "hidden": 128, "layers": 4}),
    "resnet18": Case("resnet18", "ResNet-18 layout 8/16/32/64, 3x16x16, batch 4 (dry run)", 4,
                     (3, 16, 16), (), 10, False, "resnet", {"widths": (8, 16, 32, 64)}),
    "gpt50m": Case("gpt50m", "GPT 2x64, 4 heads, T=32, V=128, batch 4 (dry run)", 4, (32,),
                   (32,), 128, True, "gpt", {"d": 64, "heads": 4, "layers": 2}),
}


def make_model(case: Case):
    import models  # bench/models.py: BasicBlock, GPT
    import torch
    from torch import nn

    torch.manual_seed(0)
    s = case.size
    if case.build == "mlp":
        dims = [s["d_in"]] + [s["hidden"]] * s["layers"]
        layers: list = []
        for a, b in zip(dims, dims[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(dims[-1], case.classes))
    if case.build == "resnet":
        w = s["widths"]

        class ResNet18(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False),
                                          nn.BatchNorm2d(w[0]), nn.ReLU())
                blocks, cin = [], w[0]
                for i, c in enumerate(w):
                    for j in range(2):
                        blocks.append(models.BasicBlock(cin, c, 2 if (i and not j) else 1))
                        cin = c
                self.blocks = nn.Sequential(*blocks)
                self.fc = nn.Linear(w[-1], case.classes)

            def forward(self, x):
                return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))
        return ResNet18()
    return models.GPT(vocab=case.classes, d=s["d"], heads=s["heads"], t=case.sample[0],
                      layers=s["layers"])


def export(model, case: Case, path: Path) -> None:
    """bench/models.py's training-form export (TorchScript exporter, opset 17, dynamic batch)."""
    import models
    import onnx

    onnx.save(models.export(model, case), str(path))


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


# -- the systems ----------------------------------------------------------------------------------
def run_ours(case: Case, work: Path, steps: int, warmup: int, precision: str = "fp32",
             cuda_graph: bool = False, profile: int = 0) -> dict:
    from trainer.backend import PeakMemory, synchronize
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    x, y = case.data()
    np.savez(work / f"{case.name}.npz", x=x, y=y)
    cfg = config_from_dict({
        "model": str(work / f"{case.name}.onnx"), "output": str(work / "out.onnx"),
        "device": "gpu", "precision": precision,
        "data": {"train": {"path": str(work / f"{case.name}.npz"), "inputs": {"x": "x"},
                           "targets": {"label": "y"}},
                 "batch_size": case.batch, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label",
                 "class_axis": 1},
        "optimizer": {"type": "sgd", "lr": LR}, "steps": 10 ** 6,
        "gpu": {"cuda_graph": cuda_graph}, "log": {"every_steps": 10 ** 6}}, ROOT)
    t0 = time.perf_counter()
    t = Trainer(cfg, stream=io.StringIO())
    setup_s = time.perf_counter() - t0
    xp = t.xp

    def step():
        _, arrays, lw, gw, _ = t._next_micro_batch()
        t.train_step([(arrays, lw, gw)], LR)

    times = []
    for k in range(warmup + steps):
        synchronize(xp)
        t0 = time.perf_counter()
        step()
        synchronize(xp)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    with PeakMemory(xp) as mem:  # one more step, measured (the hook slows allocation)
        step()
    plan = next(iter(t.plans.values()))
    ex = plan.executor
    graph = None
    if cuda_graph:  # whether the timed steps were graph launches, or why not
        captured = any(isinstance(g, tuple) for g in ex._graphs.values())
        graph = ex.graph_off or (ex.graph_errors[0] if ex.graph_errors else
                                 "captured" if captured else "not captured (too few steps)")
    top = None
    if profile:  # where our step's time goes: each planned step synchronized, summed by op
        from trainer.train import node_times

        plan_, feeds = t._last_feeds
        nodes, _ = node_times(plan_.executor, feeds, 3, plan_.loss)
        by_op: dict[str, list] = {}
        for _, op, _, sec in nodes:
            entry = by_op.setdefault(op, [0, 0.0])
            entry[0] += 1
            entry[1] += sec * 1e3
        top = {"nodes_ms": sum(v[1] for v in by_op.values()),
               "ops": sorted(([op, n, ms] for op, (n, ms) in by_op.items()),
                             key=lambda r: -r[2])[:profile]}
    return {"ms": median_ms(times), "peak_mb": None if mem.peak is None else mem.peak / 2**20,
            "nodes": len(ex.steps), "setup_s": setup_s, "params": int(t.size),
            "graph": graph, "profile": top}


def run_torch(model, case: Case, device: str, steps: int, warmup: int,
              compiled: bool = False, precision: str = "fp32") -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    net = model.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    fwd = torch.compile(net) if compiled else net
    x, y = (torch.from_numpy(a).to(device) for a in case.data())
    b = case.batch
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None

    def step(k: int) -> None:
        i = (k % 3) * b
        with torch.autocast(device, dtype=half) if half else contextlib.nullcontext():
            logits = fwd(x[i:i + b])
        loss = F.cross_entropy(logits.float(), y[i:i + b])
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    flops = None
    if not compiled:
        with FlopCounterMode(display=False) as counter:
            step(0)
        flops = float(counter.get_total_flops())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for k in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        step(k)
        sync()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"ms": median_ms(times), "peak_mb": peak, "flops": flops}


def matmul_peak_tflops(xp, n: int) -> float:
    """float32 matmul throughput of this device (best of 5 n x n products)."""
    from trainer.backend import synchronize

    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    xp.matmul(a, a)
    best = math.inf
    for _ in range(5):
        synchronize(xp)
        t0 = time.perf_counter()
        xp.matmul(a, a)
        synchronize(xp)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


# -- the report -----------------------------------------------------------------------------------
def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def report(rows: list[dict], peak: float, device: str, compiled: bool,
           precision: str = "fp32") -> None:
    print(f"\nGPU training step, {precision}, SGD; float32 matmul peak {peak:.1f} TFLOP/s on "
          f"{device}")
    head = ["case", "ours ms", "torch ms", "speed", "ours MB", "torch MB", "mem",
            "ours TF/s", "torch TF/s", "ours %peak"]
    if compiled:
        head[3:3] = ["compile ms"]
    print(" | ".join(head))
    for r in rows:
        if "error" in r:
            print(f"{r['case']} | {r['error']}")
            continue
        o, t = r["ours"], r["torch"]
        flops = t.get("flops") or 0.0
        tf_o, tf_t = flops / (o["ms"] / 1e3) / 1e12, flops / (t["ms"] / 1e3) / 1e12
        speed = t["ms"] / o["ms"]
        mem = (o["peak_mb"] / t["peak_mb"]) if o["peak_mb"] and t["peak_mb"] else None
        cells = [r["case"], fmt(o["ms"]), fmt(t["ms"]), f"{speed:.2f}x", fmt(o["peak_mb"], ".0f"),
                 fmt(t["peak_mb"], ".0f"), fmt(mem, ".2f"), fmt(tf_o, ".2f"), fmt(tf_t, ".2f"),
                 fmt(100 * tf_o / peak if peak else None, ".0f")]
        if compiled:
            cells[3:3] = [fmt(r.get("compiled", {}).get("ms"))]
        print(" | ".join(cells))
    print("speed: torch ms / ours ms (>= 1: ours is as fast or faster); mem: ours / torch peak")
    graphs = [f"{r['case'].split(',')[0]}: {r['ours']['graph']}" for r in rows
              if "ours" in r and r["ours"].get("graph")]
    if graphs:
        print("ours with gpu.cuda_graph: " + "; ".join(graphs))
    for r in rows:
        top = r.get("ours", {}).get("profile")
        if top:
            print(f"ours, {r['case'].split(',')[0]}: planned steps synchronized one by one, "
                  f"{top['nodes_ms']:.2f} ms in all; by op: " + ", ".join(
                      f"{op} x{n} {ms:.2f}" for op, n, ms in top["ops"]))


class _Stopped(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog=(
        "speed = torch ms / our ms (>= 1: ours as fast or faster), median over --steps after "
        "--warmup; memory: peak bytes held by arrays (ours: a CuPy memory hook, torch: "
        "max_memory_allocated); TFLOP/s from PyTorch's flop counter against an 8192^3 float32 "
        "matmul timed in the same run (TF32 off there); --precision sets both sides alike"))
    ap.add_argument("--cases", default="mlp,resnet18,gpt50m")
    ap.add_argument("--steps", type=at_least(1), default=10)
    ap.add_argument("--warmup", type=at_least(0), default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default="fp32",
                    help="both sides: fp32; tf32 (TF32 matmuls and convolutions); fp16 "
                         "(autocast + GradScaler, ours precision: fp16); bf16 (autocast in "
                         "bfloat16, ours precision: bf16)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="ours with gpu.cuda_graph: true (the report says if it captured)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: tiny models; ours through the CuPy stand-in (tests/strictxp.py)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed steps, time our planned steps one by one "
                         "(synchronized) and print the N ops that take longest, per case")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="skip the remaining cases once this much time has passed")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    import torch

    from trainer import backend
    from trainer.errors import TrainerError

    if args.dry_run:
        from tests import strictxp
        backend._import_cupy = lambda: (strictxp, strictxp.x)
        args.steps, args.warmup = min(args.steps, 2), 1
    cases = TINY if args.dry_run else FULL
    try:
        xp = backend.get_xp("gpu")
    except TrainerError as exc:
        print(f"gpu_bench: error: {exc}", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda":  # the peak in float32; then both sides as --precision says
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    peak = matmul_peak_tflops(np if args.dry_run else xp, 256 if args.dry_run else 8192)
    if device == "cuda" and args.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = ("cpu (dry run: CuPy stand-in, torch on CPU)" if args.dry_run
            else backend.device_name(xp))
    work = Path(tempfile.mkdtemp(prefix="onnx_trainer_gpu_bench_"))
    rows, start = [], time.perf_counter()

    def stop(signum, frame):  # `timeout` sends SIGTERM: report what finished
        raise _Stopped()
    signal.signal(signal.SIGTERM, stop)
    keys = args.cases.split(",")
    unknown = [k for k in keys if k not in cases]
    if unknown:
        sys.exit(f"gpu_bench.py: error: unknown case(s) {', '.join(unknown)} "
                 f"(cases: {', '.join(cases)})")
    try:  # (the exported models are removed afterwards: a few hundred MB at full size)
        for n, key in enumerate(keys):
            case = cases[key]
            if time.perf_counter() - start > args.budget_s:
                rows.append({"case": case.title, "error": "skipped: time budget"})
                continue
            try:
                model = make_model(case)
                export(model, case, work / f"{case.name}.onnx")
                row = {"case": case.title,
                       "ours": run_ours(case, work, args.steps, args.warmup, args.precision,
                                        args.cuda_graph, args.profile),
                       "torch": run_torch(model, case, device, args.steps, args.warmup,
                                          precision=args.precision)}
                if args.compile:
                    try:
                        row["compiled"] = run_torch(make_model(case), case, device, args.steps,
                                                    args.warmup, compiled=True,
                                                    precision=args.precision)
                    except Exception as exc:  # noqa: BLE001 - torch.compile "where it works"
                        row["compiled"] = {"ms": None, "error": f"{type(exc).__name__}: {exc}"}
            except _Stopped:
                rows += [{"case": cases[k].title, "error": "skipped: stopped (time limit)"}
                         for k in keys[n:]]
                break
            except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
                row = {"case": case.title, "error": f"failed: {type(exc).__name__}: "
                                                     f"{str(exc).splitlines()[0][:160]}"}
            rows.append(row)
            if not args.dry_run:
                xp.get_default_memory_pool().free_all_blocks()
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, peak, name, args.compile, args.precision)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "matmul_tflops": peak, "rows": rows,
                                         "precision": args.precision,
                                         "cuda_graph": args.cuda_graph,
                                         "date": time.strftime("%Y-%m-%d"),
                                         "torch": torch.__version__,
                                         "cupy": getattr(xp, "__version__", None)}, indent=1))
    return 1 if any("error" in r and not r["error"].startswith("skipped") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
