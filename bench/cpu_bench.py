"""CPU training step, side by side: onnx-trainer, PyTorch eager, ONNX Runtime Training.

The models of bench/models.py (exported once to ONNX) run forward + backward + SGD update with
the same batches, threads and learning rate; each system runs in its own subprocess (its peak
RSS is its own), all of them up at once and taking turns (--slices), so that a noisy machine
slows every system alike (--separate: one after the other instead). Reports median ms/step and
spread (10th-90th percentile) over --steps steps after --warmup, the ratio to the faster peer,
GFLOP/s against a float32 GEMM timed in the same run, peak RSS, and our executor's node count
and dispatch cost per node. Usage:
    python bench/cpu_bench.py [--threads N] [--steps 30] [--cases mlp16,resnet16] [--json out]
ONNX Runtime Training (onnxruntime-training-cpu, pinned to old numpy/onnx) gets its own venv,
built on first use under /tmp; when that fails the row says "skipped: <reason>". The "numpy"
column (MLP cases) is the same step written by hand in NumPy: not a peer, the floor of an engine
that calls one NumPy function per operation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (the exported models and data; workers inherit the environment, so they find the same folder)
WORK = Path(os.environ.get("ONNX_TRAINER_BENCH_DIR", "/tmp/onnx_trainer_cpu_bench"))
ORT_VENV = Path("/tmp/onnx_trainer_ort_training_venv")
ORT_PACKAGES = ["onnxruntime-training-cpu==1.19.2", "numpy<2", "onnx==1.16.2"]
LR = 0.01
SYSTEMS = ("ours", "torch", "ort", "numpy")
PEERS = ("torch", "ort")  # "numpy": a hand-written NumPy step, the floor of per-op dispatch


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a worker: BLAS/OpenMP thread counts set before numpy is imported."""
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    env["PYTHONPATH"] = str(ROOT)
    return env


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which a worker would
    inherit from the driver)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summary(times: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) >= 2 else [ms[0]] * 9
    return {"median_ms": statistics.median(ms), "p10_ms": q[0], "p90_ms": q[-1],
            "steps": len(ms)}


# -- workers (each runs in its own process) ---------------------------------------------------
# A worker's setup returns (step, info): step() runs one training step on the next batch and
# returns its seconds; info() the facts reported with the times (peak RSS, versions, ...).
class Skip(Exception):
    """This system does not run this case (the reason is reported in its cell)."""


def setup_ours(args):
    import io

    import numpy as np

    from trainer.config import config_from_dict
    from trainer.kernels import compiled
    from trainer.train import Trainer

    case = json.loads(args.case_json)
    data = WORK / f"{case['name']}.npz"
    cfg = config_from_dict({
        "model": str(WORK / f"{case['name']}.onnx"), "output": str(WORK / "ours_out.onnx"),
        "device": "cpu",
        "data": {"train": {"path": str(data), "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": case["batch"], "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label",
                 "class_axis": 1},
        "optimizer": {"type": "sgd", "lr": LR}, "steps": 10 ** 6,
        "log": {"every_steps": 10 ** 6}}, ROOT)
    t = Trainer(cfg, stream=io.StringIO())

    def step() -> float:
        _, arrays, local_w, global_w, _ = t._next_micro_batch()
        t0 = time.perf_counter()
        t.train_step([(arrays, local_w, global_w)], LR)
        return time.perf_counter() - t0

    def info() -> dict:
        plan, feeds = t._last_feeds  # (the last step's feeds: data, parameters, state, seed)
        ex = plan.executor
        prof = ex.profile(feeds, repeat=max(5, args.steps // 3))
        by_op = sorted(prof["by_op"].items(), key=lambda kv: -kv[1][1])[:8]
        return {"rss_mb": peak_rss_mb(), "nodes": prof["nodes"],
                "graph_nodes": len(ex.steps), "run_ms": prof["run_s"] * 1e3,
                "kernel_ms": prof["kernel_s"] * 1e3,
                "dispatch_ns_per_node": prof["dispatch_s"] / prof["nodes"] * 1e9,
                "top_ops": [[op, n, s * 1e3] for op, (n, s) in by_op],
                "numpy": np.__version__, "compiled": compiled.status()}
    return step, info


def setup_torch(args):
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import models

    case = models.CASES[json.loads(args.case_json)["name"]]
    torch.set_num_threads(args.threads)
    net = models.make_model(case).train()
    d = np.load(WORK / f"{case.name}.npz", allow_pickle=False)
    xs, ys = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    b, count = case.batch, [0]

    def step() -> float:
        i = (count[0] * b) % (len(xs) - b + 1)
        count[0] += 1
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xs[i:i + b]), ys[i:i + b])
        loss.backward()
        opt.step()
        return time.perf_counter() - t0
    return step, lambda: {"rss_mb": peak_rss_mb(), "torch": torch.__version__}


def setup_numpy(args):
    """The MLP's training step written by hand in NumPy (the same math, float32, out= buffers,
    no framework): the floor of any engine that calls one NumPy function per operation."""
    import numpy as np

    name = json.loads(args.case_json)["name"]
    if not name.startswith("mlp"):
        raise Skip("written by hand for the MLP only")
    d = np.load(WORK / f"{name}.npz", allow_pickle=False)
    xs, ys = d["x"], d["y"].astype(np.int64)
    b, f32 = json.loads(args.case_json)["batch"], np.float32
    rng = np.random.default_rng(0)
    dims = [64, 128, 64, 10]
    ws = [(rng.standard_normal((o, i)) / np.sqrt(i)).astype(f32)
          for i, o in zip(dims, dims[1:], strict=False)]
    bs = [np.zeros(o, f32) for o in dims[1:]]
    hs = [np.empty((b, o), f32) for o in dims[1:]]
    rows, lr, inv = np.arange(b), f32(LR), f32(1.0 / b)

    def train(x, y):
        acts = [x]
        for k, (w, bias, h) in enumerate(zip(ws, bs, hs, strict=True)):
            np.matmul(acts[-1], w.T, out=h)
            h += bias
            if k < 2:
                np.maximum(h, f32(0), out=h)
            acts.append(h)
        z = acts[-1]
        lp = z - z.max(axis=1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
        loss = -lp[rows, y].sum() * inv
        dz = np.exp(lp)
        dz *= inv
        dz[rows, y] -= inv
        for k in (2, 1, 0):
            gw, gb = dz.T @ acts[k], dz.sum(axis=0)
            if k:
                dz = dz @ ws[k]
                dz = np.where(acts[k] > 0, dz, f32(0))
            ws[k] -= lr * gw
            bs[k] -= lr * gb
        return loss

    count = [0]

    def step() -> float:
        i = (count[0] * b) % (len(xs) - b + 1)
        count[0] += 1
        x, y = xs[i:i + b], ys[i:i + b]
        t0 = time.perf_counter()
        train(x, y)
        return time.perf_counter() - t0
    return step, lambda: {"rss_mb": peak_rss_mb(), "numpy": np.__version__}


def setup_ort(args):
    """ONNX Runtime Training on-device artifacts. Runs in its own venv (no torch there); the
    package's __init__ imports torch-only optimizers, so its submodules load without it."""
    import types

    import numpy as np
    import onnx
    import onnxruntime

    pkg = types.ModuleType("onnxruntime.training")
    pkg.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
    sys.modules["onnxruntime.training"] = pkg
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    case = json.loads(args.case_json)
    model = onnx.load(str(WORK / f"{case['name']}.onnx"))
    for k, n in enumerate(model.graph.node):  # ORT's LayerNorm gradient reads Mean, InvStdDev
        if n.op_type == "LayerNormalization" and len(n.output) == 1:
            n.output.extend([f"ort_ln{k}_mean", f"ort_ln{k}_inv_std"])
    d = np.load(WORK / f"{case['name']}.npz", allow_pickle=False)
    params = case["params"]
    frozen = [t.name for t in model.graph.initializer if t.name not in params]
    out = WORK / f"ort_{case['name']}"
    out.mkdir(exist_ok=True)
    artifacts.generate_artifacts(model, requires_grad=params, frozen_params=frozen,
                                 loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.SGD, artifact_directory=out)
    # The loss block declares labels as the logits' shape less its last dim; these logits have
    # the classes on axis 1, so the labels get the shape the data has.
    train_model = onnx.load(str(out / "training_model.onnx"))
    for vi in train_model.graph.input:
        if vi.name == "labels":
            vi.CopyFrom(onnx.helper.make_tensor_value_info(
                "labels", onnx.TensorProto.INT64, ["N"] + list(d["y"].shape[1:])))
    onnx.save(train_model, str(out / "training_model.onnx"))
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    state = CheckpointState.load_checkpoint(str(out / "checkpoint"))
    # No eval model: its BatchNormalization nodes (training_mode=0 with 3 outputs) fail to load.
    module = Module(str(out / "training_model.onnx"), state, None, session_options=so)
    opt = Optimizer(str(out / "optimizer_model.onnx"), module)
    opt.set_learning_rate(LR)
    module.train()
    xs, ys = d["x"], d["y"]
    b, count = case["batch"], [0]

    def step() -> float:
        i = (count[0] * b) % (len(xs) - b + 1)
        count[0] += 1
        x, y = np.ascontiguousarray(xs[i:i + b]), np.ascontiguousarray(ys[i:i + b])
        t0 = time.perf_counter()
        module(x, y)
        opt.step()
        module.lazy_reset_grad()
        return time.perf_counter() - t0
    return step, lambda: {"rss_mb": peak_rss_mb(), "onnxruntime": onnxruntime.__version__}


def worker_gemm(args) -> dict:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2 * 2048 ** 3 / best / 1e9}


SETUPS = {"ours": setup_ours, "torch": setup_torch, "ort": setup_ort, "numpy": setup_numpy}


def worker(args) -> None:
    """A worker process. Alone: warm-up, then the timed steps, one JSON line. Serving (the
    interleaved driver): one JSON line when set up ({"ready": true} or {"skipped": why}), then
    per stdin line "run N" a line {"times": [...]} and for "end" the info line."""
    if args.worker == "gemm":
        print(json.dumps(worker_gemm(args)))
        return
    try:
        step, info = SETUPS[args.worker](args)
    except Skip as why:
        print(json.dumps({"skipped": str(why)}), flush=True)
        return
    if not args.serve:
        for _ in range(args.warmup):
            step()
        print(json.dumps({"times": [step() for _ in range(args.steps)], **info()}))
        return
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "run":
            print(json.dumps({"times": [step() for _ in range(int(cmd[1]))]}), flush=True)
        elif cmd and cmd[0] == "end":
            print(json.dumps(info()), flush=True)
            return


# -- the driver ---------------------------------------------------------------------------------
def ort_python(log) -> tuple[str | None, str]:
    """The ORT Training venv's python, created on first use; (None, reason) when impossible."""
    py = ORT_VENV / "bin" / "python"
    if py.exists():
        return str(py), ""
    log(f"creating {ORT_VENV} for ONNX Runtime Training ({', '.join(ORT_PACKAGES)}) ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(ORT_VENV)], check=True,
                       capture_output=True, timeout=300)
        r = subprocess.run([str(ORT_VENV / "bin" / "pip"), "install", "-q", *ORT_PACKAGES],
                           capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot create its venv ({exc})"
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        subprocess.run(["rm", "-rf", str(ORT_VENV)], check=False)
        return None, f"pip install failed: {tail[:120]}"
    return str(py), ""


def prepare(names: list[str]) -> dict[str, dict]:
    """Export each case's model and write its data; returns the case descriptions."""
    import numpy as np
    import onnx

    sys.path.insert(0, str(ROOT / "bench"))
    import models

    WORK.mkdir(parents=True, exist_ok=True)
    cases = {}
    for name in names:
        case, net, model = models.exported(name)
        onnx.save(model, WORK / f"{name}.onnx")
        x, y = case.data(batches=8)
        np.savez(WORK / f"{name}.npz", x=x, y=y)
        inits = {t.name for t in model.graph.initializer}
        params = [n for n, _ in net.named_parameters() if n in inits]
        cases[name] = {"name": name, "title": case.title, "batch": case.batch,
                       "params": params, "flops": models.train_flops(net, case)}
    return cases


def run_worker(system: str, case: dict | None, args, python: str) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", system, "--threads",
           str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if case is not None:
        cmd += ["--case-json", json.dumps(case)]
    try:
        r = subprocess.run(cmd, env=thread_env(args.threads), capture_output=True, text=True,
                           timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"no result within {args.timeout} s"}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
        return {"skipped": tail[:400]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_interleaved(systems: list[str], skipped: dict, case: dict, args,
                    pythons: dict) -> dict[str, dict]:
    """Every system's worker up at once (each idle while another runs); warm-up, then
    args.steps timed steps per system in args.slices turns; each worker's info at the end."""
    import math
    import select
    import tempfile

    out: dict[str, dict] = {s: {"skipped": skipped[s]} for s in systems if s in skipped}
    procs: dict[str, tuple[subprocess.Popen, object]] = {}
    for s in systems:
        if s in skipped:
            continue
        cmd = [pythons[s], str(Path(__file__).resolve()), "--worker", s, "--serve",
               "--threads", str(args.threads), "--steps", str(args.steps),
               "--case-json", json.dumps(case)]
        err = tempfile.TemporaryFile(mode="w+")
        procs[s] = (subprocess.Popen(cmd, env=thread_env(args.threads), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=err, text=True), err)

    def ask(s: str, command: str | None) -> dict | None:
        """Send a command (None: none) and read the worker's one-line answer; None, with the
        system marked skipped, when it stops or does not answer within --timeout."""
        p, err = procs[s]
        try:
            if command is not None:
                p.stdin.write(command + "\n")
                p.stdin.flush()
            if select.select([p.stdout], [], [], args.timeout)[0]:
                line = p.stdout.readline()
                if line:
                    return json.loads(line)
            else:
                p.kill()
                out[s] = {"skipped": f"no answer within {args.timeout} s"}
                return None
        except (OSError, ValueError):
            pass
        err.seek(0)
        tail = (err.read().strip().splitlines() or ["the worker stopped"])[-1]
        out[s] = {"skipped": tail[:400]}
        return None

    live, steps = [], {}
    for s in procs:  # set up (one after the other), then warm up
        got = ask(s, None)
        if got is not None and "skipped" in got:
            out[s] = got
            continue
        warm = ask(s, f"run {max(1, args.warmup)}") if got is not None else None
        if warm is not None:  # at least --steps steps, and at least --min-seconds of them
            live.append(s)
            est = statistics.median(warm["times"])
            steps[s] = max(args.steps, min(100 * args.steps,
                                           math.ceil(args.min_seconds / max(est, 1e-9))))
    times: dict[str, list[float]] = {s: [] for s in live}
    slices = max(1, args.slices)
    turn = 0
    while any(len(times[s]) < steps[s] for s in live):
        for s in live[turn % len(live):] + live[:turn % len(live)]:
            n = min(math.ceil(steps[s] / slices), steps[s] - len(times[s]))
            if n and s not in out:
                got = ask(s, f"run {n}")
                if got is not None:
                    times[s] += got["times"]
        turn += 1
        live = [s for s in live if s not in out]
        if not live:
            break
    for s in live:
        info = ask(s, "end")
        if info is not None:
            out[s] = {"times": times[s], **info}
    for p, err in procs.values():
        try:
            p.stdin.close()
            p.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            p.kill()
        err.close()
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from trainer.cli import at_least

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=at_least(1), default=os.cpu_count() or 1)
    ap.add_argument("--steps", type=at_least(1), default=30)
    ap.add_argument("--warmup", type=at_least(0), default=5)
    ap.add_argument("--cases", default="mlp16,mlp256,lenet16,resnet16,gpt16")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--slices", type=at_least(1), default=10,
                    help="interleaved (the default): every system's worker stays up and the "
                         "timed steps run in this many slices, taking turns, so that all "
                         "systems share the machine's slow and fast moments")
    ap.add_argument("--min-seconds", type=float, default=2.0,
                    help="interleaved: time each system for at least this long (more than "
                         "--steps steps where a step is short)")
    ap.add_argument("--separate", action="store_true",
                    help="instead, one process per system and round, one after the other")
    ap.add_argument("--rounds", type=at_least(1), default=1,
                    help="with --separate: run every system this many times, alternating; "
                         "keep the best median")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--case-json", help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    names = args.cases.split(",")
    systems = [s for s in args.systems.split(",") if s]
    sys.path.insert(0, str(ROOT / "bench"))
    import models

    unknown = [n for n in names if n not in models.CASES]
    bad = [s for s in systems if s not in SYSTEMS]
    if unknown or bad:
        sys.exit(f"cpu_bench: unknown case(s) {unknown} (known: {', '.join(models.CASES)})"
                 if unknown else
                 f"cpu_bench: unknown system(s) {bad} (known: {', '.join(SYSTEMS)})")
    cases = prepare(names)
    pythons = {"ours": sys.executable, "torch": sys.executable, "numpy": sys.executable}
    skipped = {}
    if "ort" in systems:
        py, why = ort_python(log)
        if py is None:
            skipped["ort"] = why
        else:
            pythons["ort"] = py
    gemm = run_worker("gemm", None, args, sys.executable).get("gflops", float("nan"))
    results: dict[str, dict] = {}
    for name in names:
        row = results.setdefault(name, {"case": cases[name]})
        if not args.separate:
            log(f"{name}: {', '.join(systems)}, interleaved ...")
            for system, got in run_interleaved(systems, skipped, cases[name], args,
                                               pythons).items():
                if "times" in got:
                    got.update(summary(got.pop("times")))
                    got["gflops"] = cases[name]["flops"] / (got["median_ms"] * 1e-3) / 1e9
                row[system] = got
            continue
        for _ in range(args.rounds):
            for system in systems:
                if system in skipped:
                    row[system] = {"skipped": skipped[system]}
                    continue
                log(f"{name}: {system} ...")
                got = run_worker(system, cases[name], args, pythons[system])
                if "times" in got:
                    got.update(summary(got.pop("times")))
                    got["gflops"] = cases[name]["flops"] / (got["median_ms"] * 1e-3) / 1e9
                old = row.get(system)
                if old is None or "median_ms" not in old or (
                        "median_ms" in got and got["median_ms"] < old["median_ms"]):
                    row[system] = got
    report(results, systems, args, gemm)
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor()
                or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                "python": platform.python_version(), "gemm_gflops": gemm}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def report(results: dict, systems: list[str], args, gemm: float) -> None:
    versions = {}
    for row in results.values():
        for s in systems:
            for k in ("numpy", "torch", "onnxruntime", "compiled"):
                if k in row.get(s, {}):
                    versions[k] = row[s][k]
    print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} threads, python "
          f"{platform.python_version()}, "
          + ", ".join(v if k == "compiled" else f"{k} {v}" for k, v in versions.items())
          + f"; float32 GEMM 2048^3: {gemm:.0f} GFLOP/s")
    width = max([44] + [len(row["case"]["title"]) + 1 for row in results.values()])
    head = f"{'case':<{width}}" + "".join(f"{s + ' ms':>22}" for s in systems)
    print(head + f"{'ours/best peer':>16}")
    for row in results.values():
        line = f"{row['case']['title']:<{width}}"
        for s in systems:
            r = row.get(s, {})
            if "median_ms" in r:
                cell = f"{r['median_ms']:.3f} [{r['p10_ms']:.2f}-{r['p90_ms']:.2f}]"
            else:
                cell = "skipped"
            line += f"{cell:>22}"
        peers = [row[s]["median_ms"] for s in systems if s in PEERS
                 and "median_ms" in row.get(s, {})]
        ours = row.get("ours", {}).get("median_ms")
        line += f"{ours / min(peers):>16.2f}" if ours and peers else f"{'-':>16}"
        print(line)
    print("\nGFLOP/s (share of the GEMM) and peak RSS MB per system")
    for row in results.values():
        cells = []
        for s in systems:
            r = row.get(s, {})
            if "median_ms" in r:
                cells.append(f"{s} {r['gflops']:.1f} ({r['gflops'] / gemm:.0%}) "
                             f"{r['rss_mb']:.0f} MB")
            else:
                cells.append(f"{s} skipped: {r.get('skipped', '?')}")
        print(f"  {row['case']['name']:<10}" + "; ".join(cells))
    print("\nour executor: planned nodes (of the training graph's), dispatch ns/node, top ops")
    for row in results.values():
        r = row.get("ours", {})
        if "nodes" in r:
            ops = ", ".join(f"{op} x{n} {ms:.2f}ms" for op, n, ms in r["top_ops"][:5])
            print(f"  {row['case']['name']:<10}{r['nodes']} of {r['graph_nodes']} nodes, "
                  f"{r['dispatch_ns_per_node']:.0f} ns/node; {ops}")


if __name__ == "__main__":
    main()
