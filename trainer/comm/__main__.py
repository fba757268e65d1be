"""Launch self-test (`./launch.sh -np N [--hostfile h] --selftest`, or `python -m trainer.comm`
under mpirun/srun): every rank's host, a checked all-reduce sum, and the bus bandwidth."""

from __future__ import annotations

import argparse
import socket
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.comm", description=__doc__)
    ap.add_argument("--mb", type=float, default=16.0, help="all-reduce size in MiB")
    ap.add_argument("--backend", default="mpi", choices=["auto", "mpi", "nccl"])
    ap.add_argument("--timeout", type=float, default=60.0, help="watchdog seconds")
    args = ap.parse_args(argv)
    from trainer.comm import get_communicator
    from trainer.errors import TrainerError

    try:
        comm = get_communicator(args.backend, args.timeout,
                                device="gpu" if args.backend == "nccl" else "cpu")
        p, r = comm.size, comm.rank
        name = np.zeros(64, np.uint8)
        raw = socket.gethostname().encode()[:64]
        name[:len(raw)] = np.frombuffer(raw, np.uint8)
        names = np.zeros(64 * p, np.uint8)
        comm.allgather_(name, names, label="host names")
        hosts: dict[str, list[int]] = {}
        for rank, row in enumerate(names.reshape(p, 64)):
            hosts.setdefault(row.tobytes().rstrip(b"\0").decode(errors="replace"), []).append(rank)
        # (NCCL moves device arrays: host ones would go over MPI, and the line below would
        # name NCCL for MPI's bandwidth)
        xp = getattr(comm, "cupy", None) or np
        check = xp.full(1000, r + 1.0)
        comm.allreduce_(check, label="checked sum")
        ok = bool((check == p * (p + 1) / 2).all())
        buf = xp.ones(int(args.mb * 2**20) // 4, np.float32)
        comm.allreduce_(buf, label="bandwidth warm-up")
        times = []
        for _ in range(5):
            comm.barrier()
            t0 = time.perf_counter()
            comm.allreduce_(buf, label="bandwidth")
            times.append(time.perf_counter() - t0)
        seconds = sorted(times)[len(times) // 2]
    except TrainerError as exc:
        print(f"onnx-trainer selftest: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if r == 0:
        where = "; ".join(f"{h}: {_ranks(rs)}" for h, rs in hosts.items())
        busbw = buf.nbytes / seconds * 2 * (p - 1) / p / 1e9 if p > 1 else float("nan")
        print(f"selftest {'ok' if ok else 'FAILED'}: {p} rank(s) on {len(hosts)} host(s) "
              f"({where}); {type(comm).__name__}; all-reduce of {args.mb:g} MiB in "
              f"{seconds * 1e3:.2f} ms, bus bandwidth {busbw:.2f} GB/s", flush=True)
    return 0 if ok else 1


def _ranks(ranks: list[int]) -> str:
    from trainer.comm.watchdog import ranks_text
    return ranks_text(ranks)


if __name__ == "__main__":
    sys.exit(main())
