"""Data-parallel training step: onnx-trainer (bucketed all-reduce, overlap on and off) against
PyTorch DistributedDataParallel, 1/2/4 ranks, the same model, batches and SGD.

    python bench/dp_bench.py [--np 1 2 4] [--transport shm tcp] [--cases widemlp64,resnet16]
                             [--batch-per-rank 64] [--steps 20] [--rounds 2] [--json out.json]

Weak scaling: every rank trains on `--batch-per-rank` samples per step (the global batch grows
with the ranks), one BLAS thread per rank. Each run is an `mpirun -np N` of this script's
--worker mode; a step's time is the slowest rank's, the table gives the median over the timed
steps (best median over --rounds). Ours: `Trainer.train_step` with `distributed.overlap` on
(buckets all-reduced while the backward runs) and off (one pass after it), over Open MPI's
shared memory or TCP (`--mca btl tcp,self`); "exposed" is the time a step waits for the
all-reduce after its backward (median over the steps, of the slowest rank). PyTorch: DDP
(25 MB buckets, overlapped) over gloo, which is TCP on every machine. Printed as markdown:
ms/step, samples/s, scaling efficiency (samples/s over N times one rank's) and ours / DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from comm_bench import TRANSPORTS, mpirun_prefix  # noqa: E402

from trainer.cli import at_least  # noqa: E402

WORK = Path(os.environ.get("ONNX_TRAINER_BENCH_DIR", "/tmp/onnx_trainer_dp_bench"))
LR = 0.01
BUCKET_MB = 25.0


# -- workers (one per rank, started by mpirun) -----------------------------------------------------
def _rank_world() -> tuple[int, int]:
    from trainer.comm import launched_rank, launched_world_size
    return launched_rank(), launched_world_size()


def ours(args, case: dict) -> tuple[list[float], float]:
    """Per-step seconds of this rank, and its median exposed communication per step (a
    median, as the step times are: a mean of one slow step's wait read as more than the
    median step itself)."""
    import io
    import statistics

    from trainer.config import config_from_dict
    from trainer.train import Trainer

    _, world = _rank_world()
    cfg = config_from_dict({
        "model": str(WORK / f"{case['name']}.onnx"), "output": str(WORK / "out.onnx"),
        "device": "cpu",
        "data": {"train": {"path": str(WORK / f"{case['name']}.npz"), "inputs": {"x": "x"},
                           "targets": {"label": "y"}},
                 "batch_size": args.batch_per_rank * world, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label",
                 "class_axis": 1},
        "optimizer": {"type": "sgd", "lr": LR}, "steps": 10 ** 6,
        "distributed": {"overlap": args.overlap == "on", "bucket_mb": BUCKET_MB},
        "log": {"every_steps": 10 ** 6}}, ROOT)
    t = Trainer(cfg, stream=io.StringIO())
    times, exposed = [], []
    for _ in range(args.warmup + args.steps):
        _, arrays, local_w, global_w, _ = t._next_micro_batch()
        before = t.times["communication"]
        t0 = time.perf_counter()
        t.train_step([(arrays, local_w, global_w)], LR)
        times.append(time.perf_counter() - t0)
        exposed.append(t.times["communication"] - before)
    return times[args.warmup:], statistics.median(exposed[args.warmup:])


def ddp(args, case: dict) -> tuple[list[float], float]:
    import models
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    rank, world = _rank_world()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                            world_size=world)
    net = models.make_model(models.CASES[case["name"]])
    model = DistributedDataParallel(net, bucket_cap_mb=BUCKET_MB)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with np.load(WORK / f"{case['name']}.npz", allow_pickle=False) as z:
        x_all, y_all = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    b, gb = args.batch_per_rank, args.batch_per_rank * world
    batches = len(x_all) // gb
    times = []
    for k in range(args.warmup + args.steps):
        lo = (k % batches) * gb + rank * b
        x, y = x_all[lo:lo + b], y_all[lo:lo + b]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    return times[args.warmup:], float("nan")


def worker(args) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    case = json.loads(args.case_json)
    times, exposed = (ours if args.system == "ours" else ddp)(args, case)
    every = comm.gather((times, exposed), root=0)
    if comm.rank == 0:
        slowest = [max(step) for step in zip(*[t for t, _ in every], strict=True)]
        print("RESULT " + json.dumps({"steps_s": slowest,
                                      "exposed_s": max(e for _, e in every)}), flush=True)


# -- the driver ------------------------------------------------------------------------------------
def prepare(names: list[str], batch: int, max_np: int) -> dict[str, dict]:
    """Export each case's model and write data for 4 global batches at the most ranks."""
    import models
    import numpy as np
    import onnx

    WORK.mkdir(parents=True, exist_ok=True)
    cases = {}
    for name in names:
        case, net, model = models.exported(name)
        onnx.save(model, WORK / f"{name}.onnx")
        rows = 4 * batch * max_np
        x, y = case.data(batches=-(-rows // case.batch))
        np.savez(WORK / f"{name}.npz", x=x[:rows], y=y[:rows])
        params = sum(p.numel() for p in net.parameters())
        cases[name] = {"name": name, "title": case.title, "params": params}
    return cases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(system: str, case: dict, np_: int, transport: str, overlap: str, args) -> dict:
    cmd = mpirun_prefix(np_, transport)
    cmd += [sys.executable, __file__, "--worker", "--system", system, "--overlap", overlap,
            "--case-json", json.dumps(case), "--batch-per-rank", str(args.batch_per_rank),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--port",
            str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    out = json.loads(lines[0][7:])
    steps = sorted(out["steps_s"])
    out["median_s"] = statistics.median(steps)
    out["p10_s"], out["p90_s"] = steps[len(steps) // 10], steps[(9 * len(steps)) // 10]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--np", type=at_least(1), nargs="+", default=[1, 2, 4])
    ap.add_argument("--transport", nargs="+", default=["shm", "tcp"], choices=list(TRANSPORTS))
    ap.add_argument("--cases", default="widemlp64,resnet16")
    ap.add_argument("--batch-per-rank", type=at_least(1), default=None,
                    help="samples per rank and step (default: the case's batch)")
    ap.add_argument("--steps", type=at_least(1), default=20)
    ap.add_argument("--warmup", type=at_least(0), default=3)
    ap.add_argument("--rounds", type=at_least(1), default=2)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--system", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--overlap", default="on", help=argparse.SUPPRESS)
    ap.add_argument("--case-json", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import models
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in models.CASES]
    if unknown:
        sys.exit(f"dp_bench: unknown case(s) {unknown} (known: {', '.join(models.CASES)})")
    results = {}
    for name in names:
        batch = args.batch_per_rank or models.CASES[name].batch
        sub = argparse.Namespace(**{**vars(args), "batch_per_rank": batch})
        case = prepare([name], batch, max(args.np))[name]
        rows = {}
        for r in range(args.rounds):
            for np_ in args.np:
                configs = [("ddp", "tcp", "on")] + [("ours", tr, ov) for tr in args.transport
                                                    for ov in ("on", "off")]
                if r % 2:
                    configs = configs[::-1]
                for system, tr, ov in configs:
                    if np_ == 1 and ov == "off":
                        continue  # (one rank: nothing to communicate, overlap or not)
                    out = run(system, case, np_, tr, ov, sub)
                    key = f"{system}/{tr}/{ov}/{np_}"
                    if key not in rows or out["median_s"] < rows[key]["median_s"]:
                        rows[key] = out
                    print(f"  {name} {key}: {out['median_s'] * 1e3:.2f} ms/step", file=sys.stderr,
                          flush=True)
        results[name] = {"case": case, "batch_per_rank": batch, "rows": rows}
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def report(results: dict, args) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; Python {platform.python_version()}, NumPy {np.__version__}, "
          f"torch {torch.__version__}, {MPI.Get_library_version().split(',')[0].strip()}; one "
          f"BLAS thread per rank; weak scaling, median ms/step of the slowest rank\n")
    for name, res in results.items():
        rows, b = res["rows"], res["batch_per_rank"]
        print(f"**{name}**: {res['case']['title']}; {res['case']['params'] * 4 / 2**20:.1f} MB of "
              f"float32 gradients, {b} samples per rank and step\n")
        base_ours = min((rows[k]["median_s"] for k in rows if k.startswith("ours/")
                         and k.endswith("/1")), default=None)
        base_ddp = rows.get("ddp/tcp/on/1", {}).get("median_s")
        print("| ranks | transport | ours overlap on ms | exposed comm ms | ours overlap off ms | "
              "overlap on / off | ours samples/s | ours efficiency | DDP (gloo) ms | DDP "
              "samples/s | DDP efficiency | ours / DDP |")
        print("|" + "---|" * 12)
        for np_ in args.np:
            ddp_row = rows.get(f"ddp/tcp/on/{np_}")
            for tr in args.transport:
                on = rows.get(f"ours/{tr}/on/{np_}")
                off = rows.get(f"ours/{tr}/off/{np_}") if np_ > 1 else on
                if on is None:
                    continue
                sps = np_ * b / on["median_s"]
                eff = sps / (np_ * b / base_ours) if base_ours else float("nan")
                cells = [str(np_), tr, f"{on['median_s'] * 1e3:.1f} [{on['p10_s'] * 1e3:.1f}-"
                         f"{on['p90_s'] * 1e3:.1f}]", f"{on['exposed_s'] * 1e3:.1f}",
                         f"{off['median_s'] * 1e3:.1f}" if np_ > 1 else "-",
                         f"{on['median_s'] / off['median_s']:.2f}" if np_ > 1 else "-",
                         f"{sps:.0f}", f"{eff:.2f}"]
                if ddp_row:
                    dsps = np_ * b / ddp_row["median_s"]
                    deff = dsps / (np_ * b / base_ddp) if base_ddp else float("nan")
                    cells += [f"{ddp_row['median_s'] * 1e3:.1f}", f"{dsps:.0f}", f"{deff:.2f}",
                              f"**{on['median_s'] / ddp_row['median_s']:.2f}**"]
                else:
                    cells += ["-"] * 4
                print("| " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
