"""An in-process stand-in for an N-rank job: N threads, one communicator each (tests only).

`run_ranks(world, fn)` calls fn(comm) on N threads and returns their results in rank order.
Collectives follow the communicator protocol of trainer/comm: they are exact (a sum in rank
order), so N emulated ranks are a reference for what `mpirun -np N` must produce.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np


class _Group:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: list = [None] * size


class ThreadComm:
    def __init__(self, group: _Group, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def _exchange(self, buf) -> list:
        g = self.group
        g.slots[self.rank] = np.array(buf, copy=True)
        g.barrier.wait()
        values = list(g.slots)
        g.barrier.wait()  # everyone has read before the slots are reused
        return values

    def bcast_(self, buf, root: int = 0) -> None:
        buf[...] = self._exchange(buf)[root]

    def allreduce_(self, buf) -> None:
        values = self._exchange(buf)
        total = values[0].copy()
        for v in values[1:]:
            total += v
        buf[...] = total

    def allreduce_async_(self, buf):
        self.allreduce_(buf)
        return None

    def synchronize(self, handle) -> None:
        return None

    def barrier(self) -> None:
        self.group.barrier.wait()

    def abort(self, code: int = 1) -> None:
        self.group.barrier.abort()
        raise SystemExit(code)


def run_ranks(world: int, fn: Callable[[ThreadComm], object]) -> list:
    group = _Group(world)
    results: list = [None] * world
    errors: list = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(group, rank))
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
