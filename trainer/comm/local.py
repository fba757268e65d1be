"""N ranks emulated by N threads of one process (tests, references): the full communicator
protocol with exact, rank-ordered sums, so its results are what `mpirun -np N` must produce."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from trainer.comm.base import (
    BlockingAsync,
    CollectiveTimeout,
    check_compress,
    check_counts,
    check_shards,
    compress16,
    decompress16,
    padded_size,
    sum_compressed,
    xp_of,
)


class _Group:
    def __init__(self, size: int, timeout_s: float):
        self.size = size
        self.timeout_s = timeout_s
        self.barrier = threading.Barrier(size, timeout=timeout_s)
        self.slots: list = [None] * size


class LocalComm(BlockingAsync):
    """One emulated rank; collectives are completed at the call (handles are already done)."""

    def __init__(self, group: _Group, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def _exchange(self, buf, label: str) -> list:
        g = self.group
        from trainer.backend import to_host

        g.slots[self.rank] = np.array(to_host(buf), copy=True)
        try:
            g.barrier.wait()
            values = list(g.slots)
            g.barrier.wait()  # everyone has read before the slots are reused
        except threading.BrokenBarrierError:
            raise CollectiveTimeout(f"collective '{label}' did not complete within "
                                    f"{g.timeout_s:g} s on emulated rank {self.rank}") from None
        return values

    def allreduce_(self, buf, label: str = "allreduce", compress: str | None = None) -> None:
        check_compress(compress, buf)
        values = self._exchange(buf, label)
        if compress is None:
            total = values[0].copy()
            for v in values[1:]:
                total += v
            buf[...] = xp_of(buf).asarray(total)
            return
        reduced = compressed_allreduce_reference(values, compress)
        buf[...] = xp_of(buf).asarray(reduced.reshape(buf.shape))

    def bcast_(self, buf, root: int = 0, label: str = "broadcast") -> None:
        buf[...] = xp_of(buf).asarray(self._exchange(buf, label)[root])

    def barrier(self, label: str = "barrier") -> None:
        self._exchange(np.zeros(1), label)

    def reduce_scatter_(self, buf, out, label: str = "reduce-scatter") -> None:
        k = check_shards(buf, out, self.size, "reduce_scatter_")
        values = self._exchange(buf.reshape(-1), label)
        total = values[0][self.rank * k:(self.rank + 1) * k].copy()
        for v in values[1:]:
            total += v[self.rank * k:(self.rank + 1) * k]
        out.reshape(-1)[...] = xp_of(out).asarray(total)

    def reduce_scatter_counts_(self, buf, out, counts, label: str = "reduce-scatter") -> None:
        counts = check_counts(buf, out, counts, self.rank)
        values = self._exchange(buf.reshape(-1), label)
        lo = sum(counts[:self.rank])
        hi = lo + counts[self.rank]
        total = values[0][lo:hi].copy()
        for v in values[1:]:
            total += v[lo:hi]
        out.reshape(-1)[...] = xp_of(out).asarray(total)

    def allgather_(self, part, out, label: str = "allgather") -> None:
        check_shards(out, part, self.size, "allgather_")
        values = self._exchange(part.reshape(-1), label)
        out.reshape(-1)[...] = xp_of(out).asarray(np.concatenate(values))

    def abort(self, code: int = 1) -> None:
        self.group.barrier.abort()
        raise SystemExit(code)


def compressed_allreduce_reference(values: list[np.ndarray], kind: str) -> np.ndarray:
    """What every backend's compressed all-reduce returns for these per-rank float32 buffers:
    each rank's values rounded to 16 bits, summed in float32 in rank order per shard, the sum
    rounded to 16 bits once more (the shard owner sends it rounded)."""
    p = len(values)
    n = values[0].size
    k = padded_size(n, p) // p
    rows = np.zeros((p, p * k), np.uint16)
    for r, v in enumerate(values):
        rows[r, :n] = compress16(np.ascontiguousarray(v, np.float32).reshape(-1), kind)
    total = np.empty(p * k, np.float32)
    sum_compressed(rows, kind, total)
    return decompress16(compress16(total, kind), kind)[:n]


def run_local(world: int, fn: Callable[[LocalComm], object], timeout_s: float = 120.0) -> list:
    """Call fn(comm) on `world` threads, one emulated rank each; results in rank order. The
    first exception of any rank is raised here (the others are released)."""
    group = _Group(world, timeout_s)
    results: list = [None] * world
    errors: list = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(LocalComm(group, rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
