"""Gradient synchronization vs raw MPI.Allreduce of the same bytes (algorithm and bus bandwidth),
2 and 4 ranks, shared memory and TCP; an alpha-beta fit of ring all-reduce; overlap with compute.

    python bench/comm_bench.py [--np 2 4] [--transport shm tcp] [--sizes 1 4 16 64 100]
The script starts mpirun itself (its --worker mode is the MPI program) and prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from trainer.cli import above, at_least  # noqa: E402

TRANSPORTS = {"shm": [], "tcp": ["--mca", "btl", "tcp,self", "--mca", "pml", "ob1"]}
TENSOR_MB = 1.0  # gradients of this size each, bucketed like the engine does
BUCKET_MB = 25.0
FIT_MIN_MB = 16.0  # below, buffers fit in the caches and bandwidth is another regime


def worker(sizes: list[float], reps: int, overlap: bool, zero1: bool = False) -> None:
    from trainer.comm.buckets import Buckets
    from trainer.comm.mpi import MPIComm

    comm = MPIComm(timeout_s=600)
    MPI, world = comm.MPI, comm.comm
    p = comm.size
    rows = []
    for mb in sizes:
        n = int(mb * 2**20) // 4
        buf = np.ones(n, np.float32)
        per = int(TENSOR_MB * 2**20) // 4
        layout = [(f"t{i}", o, min(per, n - o)) for i, o in enumerate(range(0, n, per))]
        buckets = Buckets(comm, buf, layout[::-1], BUCKET_MB)

        def raw(buf=buf):
            world.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

        def blocking(buf=buf):
            comm.allreduce_(buf, label="bench")

        def bucketed(buckets=buckets, order=tuple(name for name, _, _ in layout[::-1])):
            buckets.begin()
            for name in order:
                buckets.ready(name)
            buckets.wait_all()

        methods = {"raw MPI.Allreduce": raw, "ours blocking": blocking,
                   "ours bucketed async": bucketed}
        times: dict[str, list[float]] = {k: [] for k in methods}
        count = max(5, min(4 * reps, int(reps * 8 / mb)))
        for f in methods.values():  # warm-up (connections, buffers)
            f()
        for _ in range(count):  # interleaved, so load changes hit every method alike
            for name, f in methods.items():
                world.Barrier()
                t0 = time.perf_counter()
                f()
                dt = time.perf_counter() - t0
                times[name].append(_slowest(comm, dt))
        for name, ts in times.items():
            rows.append({"mb": mb, "method": name, "s": min(ts), "median": statistics.median(ts),
                         "p": p, "reps": count,
                         "buckets": len(buckets) if "bucketed" in name else 1})
    result = {"rows": rows}
    if overlap:
        result["overlap"] = _overlap(comm)
    if zero1:
        result["zero1"] = _zero1(comm, max(sizes), reps)
    if comm.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def _slowest(comm, seconds: float) -> float:
    t = np.array([seconds])
    comm.comm.Allreduce(comm.MPI.IN_PLACE, t, op=comm.MPI.MAX)
    return float(t[0])


def _zero1(comm, mb: float, reps: int) -> dict:
    """One step's synchronization of `mb` MB of gradients in 25 MB buckets: DDP (all-reduce),
    ZeRO-1 as the engine does it (reduce-scatter into the shard, all-gather of the parameters)
    and ZeRO-1 over a full all-reduce (the engine's earlier form): best ms of each."""
    from trainer.comm.base import padded_size
    from trainer.comm.buckets import Buckets

    p, r = comm.size, comm.rank
    n = padded_size(int(mb * 2**20) // 4, p)
    k = n // p
    per = int(TENSOR_MB * 2**20) // 4
    layout = [(f"t{i}", o, min(per, n - o)) for i, o in enumerate(range(0, n, per))][::-1]
    grads, params, shard = np.ones(n, np.float32), np.ones(n, np.float32), np.ones(k, np.float32)
    ddp = Buckets(comm, grads, layout, BUCKET_MB)
    scatter = Buckets(comm, grads, layout, BUCKET_MB, shards=(shard, k))

    def step(bk, gather):
        bk.begin()
        for name, _, _ in layout:
            bk.ready(name)
        bk.wait_all()
        if gather:
            comm.allgather_(params[r * k:(r + 1) * k], params, label="parameter shards")

    methods = {"DDP all-reduce": lambda: step(ddp, False),
               "ZeRO-1 reduce-scatter + all-gather": lambda: step(scatter, True),
               "ZeRO-1 all-reduce + all-gather": lambda: step(ddp, True)}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for f in methods.values():
        f()
    for _ in range(max(5, reps)):
        for name, f in methods.items():
            comm.comm.Barrier()
            t0 = time.perf_counter()
            f()
            times[name].append(_slowest(comm, time.perf_counter() - t0))
    return {"mb": mb, **{m: min(ts) for m, ts in times.items()}}


def _overlap(comm) -> dict:
    """A synthetic backward: 16 matmul blocks each finishing a 1.5 MB gradient (24 MB), with
    progress() between blocks; step time with the all-reduce overlapped, not overlapped, and
    the compute alone."""
    from trainer.comm.buckets import Buckets

    blocks, per = 16, 3 * 2**18
    grads = np.ones(blocks * per, np.float32)
    layout = [(f"g{i}", i * per, per) for i in range(blocks)][::-1]
    a = np.random.default_rng(0).standard_normal((160, 160)).astype(np.float32)

    def backward(bk):
        for name, _, _ in layout:
            for _ in range(6):
                a @ a
                if bk is not None:
                    bk.progress()
            if bk is not None:
                bk.ready(name)

    out = {}
    for name, bucket_mb, overlap in (("compute only", None, None), ("overlap off", 6.0, False),
                                     ("overlap on", 6.0, True)):
        bk = None if bucket_mb is None else Buckets(comm, grads, layout, bucket_mb,
                                                    overlap=overlap)
        ts = []
        for _ in range(15):
            comm.comm.Barrier()
            t0 = time.perf_counter()
            if bk is not None:
                bk.begin()
            backward(bk)
            if bk is not None:
                bk.wait_all()
            ts.append(_slowest(comm, time.perf_counter() - t0))
        out[name] = min(ts[2:])
    return out


# -- the driver ------------------------------------------------------------------------------------
def mpirun_prefix(np_: int, transport: str) -> list[str]:
    """`mpirun ... -np N` over the transport, for a bench's worker command to follow."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("mpirun not found: pip install '.[mpi]'")
    cmd = [mpirun, "--oversubscribe", "-np", str(np_), *TRANSPORTS[transport]]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd


def run(np_: int, transport: str, args) -> dict:
    cmd = mpirun_prefix(np_, transport)
    cmd += [sys.executable, __file__, "--worker", "--reps", str(args.reps), "--sizes",
            *map(str, args.sizes)] + (["--overlap"] if args.overlap else []) + (
        ["--zero1"] if args.zero1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(lines[0][7:])


def fit_alpha_beta(points: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Least squares (relative error) of t = 2(p-1)/p * bytes / B + 2(p-1) * alpha over
    (p, bytes, seconds); returns (alpha seconds, B bytes/s)."""
    A = np.array([[2 * (p - 1) / p * b / t, 2 * (p - 1) / t] for p, b, t in points])
    ones = np.ones(len(points))
    (inv_b, alpha), *_ = np.linalg.lstsq(A, ones, rcond=None)
    if alpha < 0 or inv_b <= 0:  # latency lost in the noise: fit bandwidth alone
        inv_b, alpha = float(A[:, 0] @ ones / (A[:, 0] @ A[:, 0])), 0.0
    return float(alpha), float(1 / inv_b)


def ring_time(p: int, nbytes: float, alpha: float, bandwidth: float) -> float:
    return 2 * (p - 1) / p * nbytes / bandwidth + 2 * (p - 1) * alpha


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--np", type=at_least(2), nargs="+", default=[2, 4],
                    help="process counts (at least 2: an all-reduce needs a peer)")
    ap.add_argument("--transport", nargs="+", default=["shm", "tcp"], choices=list(TRANSPORTS))
    ap.add_argument("--sizes", type=above(0), nargs="+", default=[1, 4, 16, 64, 100])
    ap.add_argument("--reps", type=at_least(1), default=9)
    ap.add_argument("--overlap", action="store_true", help="also the synthetic overlap test")
    ap.add_argument("--zero1", action="store_true",
                    help="also one ZeRO-1 step's synchronization vs DDP's, on the largest size")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.sizes, args.reps, args.overlap, args.zero1)
        return

    import mpi4py
    print(f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, NumPy {np.__version__}, mpi4py {mpi4py.__version__}, "
          f"{_mpi_version()}; float32 buffers; methods interleaved, a repetition's time is the "
          "slowest rank's; ms and GB/s are the best repetition, ratios best (median).\n")
    print("| transport | ranks | MB | raw MPI.Allreduce ms | ours blocking ms | ours bucketed "
          "async ms | raw busbw GB/s | blocking busbw | bucketed busbw | blocking/raw "
          "busbw | bucketed/raw busbw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fits = {}
    overlaps = {}
    zero1s = {}
    for transport in args.transport:
        points = []
        for np_ in args.np:
            result = run(np_, transport, args)
            if "overlap" in result:
                overlaps[(transport, np_)] = result["overlap"]
            if "zero1" in result:
                zero1s[(transport, np_)] = result["zero1"]
            by = {(r["mb"], r["method"]): r for r in result["rows"]}
            for mb in args.sizes:
                nbytes = mb * 2**20
                names = ("raw MPI.Allreduce", "ours blocking", "ours bucketed async")
                t = {m: by[(mb, m)]["s"] for m in names}
                med = {m: by[(mb, m)]["median"] for m in names}
                bus = {m: nbytes / s * 2 * (np_ - 1) / np_ / 1e9 for m, s in t.items()}
                raw, blk, bkt = (t["raw MPI.Allreduce"], t["ours blocking"],
                                 t["ours bucketed async"])
                print(f"| {transport} | {np_} | {mb:g} | {raw * 1e3:.2f} | {blk * 1e3:.2f} | "
                      f"{bkt * 1e3:.2f} | {bus['raw MPI.Allreduce']:.2f} | "
                      f"{bus['ours blocking']:.2f} | {bus['ours bucketed async']:.2f} | "
                      f"{raw / blk:.2f} ({med[names[0]] / med[names[1]]:.2f}) | "
                      f"{raw / bkt:.2f} ({med[names[0]] / med[names[2]]:.2f}) |", flush=True)
                if mb >= FIT_MIN_MB:
                    points.append((np_, nbytes, blk))
        if points:  # (none when every size is below FIT_MIN_MB)
            fits[transport] = (fit_alpha_beta(points), points)
    if fits:
        print("\nAlpha-beta fit of ours blocking on buffers of at least "
              f"{FIT_MIN_MB:g} MB, t = 2(p-1)/p * bytes/B + 2(p-1) * alpha:\n")
        print("| transport | alpha us | B GB/s | worst relative error of the fit |")
        print("|---|---|---|---|")
    for transport, ((alpha, bw), points) in fits.items():
        worst = max(abs(ring_time(p, b, alpha, bw) - t) / t for p, b, t in points)
        print(f"| {transport} | {alpha * 1e6:.1f} | {bw / 1e9:.2f} | {worst:.0%} |")
    if overlaps:
        print("\nSynthetic backward (16 blocks of matmuls, 24 MB of gradients in 6 MB buckets), "
              "best step ms:\n")
        print("| transport | ranks | compute only | overlap off | overlap on | hidden |")
        print("|---|---|---|---|---|---|")
        for (transport, np_), o in overlaps.items():
            comm_ms = o["overlap off"] - o["compute only"]
            hidden = (o["overlap off"] - o["overlap on"]) / comm_ms if comm_ms > 0 else 0.0
            print(f"| {transport} | {np_} | {o['compute only'] * 1e3:.1f} | "
                  f"{o['overlap off'] * 1e3:.1f} | {o['overlap on'] * 1e3:.1f} | "
                  f"{hidden:.0%} |")


    if zero1s:
        print("\nOne step's gradient (and parameter) synchronization, best ms:\n")
        print("| transport | ranks | MB | DDP all-reduce | ZeRO-1 reduce-scatter + all-gather | "
              "ratio to DDP | ZeRO-1 all-reduce + all-gather | ratio to DDP |")
        print("|---|---|---|---|---|---|---|---|")
        for (transport, np_), z in zero1s.items():
            ddp = z["DDP all-reduce"]
            rs, ar = z["ZeRO-1 reduce-scatter + all-gather"], z["ZeRO-1 all-reduce + all-gather"]
            print(f"| {transport} | {np_} | {z['mb']:g} | {ddp * 1e3:.1f} | {rs * 1e3:.1f} | "
                  f"{rs / ddp:.2f} | {ar * 1e3:.1f} | {ar / ddp:.2f} |")


def _mpi_version() -> str:
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].replace("mpirun (", "").replace(")", "")
    except (OSError, IndexError):
        return "MPI ?"


if __name__ == "__main__":
    main()
