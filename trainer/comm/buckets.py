"""Gradient buckets: contiguous slices of the flat gradient buffer, in the order the backward
produces the gradients; a bucket's async all-reduce starts as soon as its last tensor is ready.

Compression (compress='bf16'|'fp16', float32 gradients): each rank's values travel rounded to 16
bits (unit roundoff u = 2**-8 for bf16, 2**-11 for fp16), are summed in float32, and the sum is
rounded once more, so an element's error is at most u * (sum_r |g_r| + |sum_r g_r|) plus the
float32 sum's own rounding. fp16 also flushes magnitudes below 2**-24 to zero (absolute error up
to 2**-25 per rank) and overflows to inf above 65504 (the step then reports a non-finite
gradient); bf16 keeps float32's range.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from trainer.comm.base import check_compress


@dataclass(frozen=True)
class Bucket:
    index: int
    lo: int  # element range [lo, hi) of the flat buffer
    hi: int
    names: tuple[str, ...]  # in production order

    @property
    def label(self) -> str:
        return f"gradient bucket {self.index} (first tensor {self.names[0]})"


def plan_buckets(layout: list[tuple[str, int, int]], itemsize: int,
                 bucket_mb: float) -> list[Bucket]:
    """Group consecutive tensors of `layout` ((name, offset, size) in production order) into
    buckets of at least bucket_mb MiB (the last may be smaller; a larger tensor is a bucket of
    its own). Each bucket must be one contiguous slice of the flat buffer."""
    if not bucket_mb > 0:
        raise ValueError(f"internal error: bucket_mb must be positive, got {bucket_mb}")
    cap = bucket_mb * 2**20
    groups: list[list[tuple[str, int, int]]] = [[]]
    nbytes = 0
    for entry in layout:
        if groups[-1] and nbytes >= cap:
            groups.append([])
            nbytes = 0
        groups[-1].append(entry)
        nbytes += entry[2] * itemsize
    buckets = []
    for index, group in enumerate(g for g in groups if g):
        spans = sorted((off, off + size) for _, off, size in group)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            if start != end:
                names = ", ".join(n for n, _, _ in group[:4])
                raise ValueError("internal error: gradient bucket "
                                 f"{index} ({names} ...) is not contiguous in the flat buffer; "
                                 "lay gradients out in the order the backward produces them")
        buckets.append(Bucket(index, spans[0][0], spans[-1][1],
                              tuple(n for n, _, _ in group)))
    return buckets


class Buckets:
    """The gradient all-reduce of one training step, bucket by bucket.

    Per step: begin(sync) (sync=False on the micro-steps of an accumulation that must not
    communicate), ready(name) as each gradient becomes final in the flat buffer (it starts the
    bucket's all-reduce once its last tensor is ready; buckets start in index order on every
    rank, whatever the order of readiness), progress() now and then during compute (MPI moves
    data only when polled), wait_all() before the optimizer: it starts what has not started and
    waits for everything under the communicator's watchdog. Results are sums over ranks.
    overlap=False starts nothing before wait_all (the blocking path, for comparison).

    shards=(out, k) (ZeRO-1): rank r owns elements [r*k, (r+1)*k) of the flat buffer, and each
    bucket is reduce-scattered instead of all-reduced: the sum of the part of the bucket inside
    this rank's shard lands in out (k elements, the shard's gradient) and the rest of the flat
    buffer keeps this rank's own gradients. Half the traffic of an all-reduce."""

    def __init__(self, comm, flat, layout: list[tuple[str, int, int]], bucket_mb: float = 25.0,
                 compress: str | None = None, overlap: bool = True, shards=None):
        check_compress(compress, flat)
        if shards is not None and compress is not None:
            raise ValueError("internal error: sharded buckets are not compressed")
        self.comm, self.flat = comm, flat
        self.compress, self.overlap = compress, overlap
        self.buckets = plan_buckets(layout, np.dtype(flat.dtype).itemsize, bucket_mb)
        end = max((b.hi for b in self.buckets), default=0)
        if end > flat.size:
            raise ValueError(f"internal error: the layout ends at {end}, beyond the flat "
                             f"buffer's {flat.size} elements")
        self._bucket_of = {n: b.index for b in self.buckets for n in b.names}
        # ZeRO-1: per bucket, each rank's element count and this rank's part of `out`.
        self._parts: list[tuple[list[int], object]] = []
        if shards is not None:
            out, k = shards
            r = comm.rank
            for b in self.buckets:
                counts = [max(0, min(b.hi, (j + 1) * k) - max(b.lo, j * k))
                          for j in range(comm.size)]
                lo = max(b.lo - r * k, 0)
                self._parts.append((counts, out[lo:lo + counts[r]]))
        self._handles: list = []
        self._left: list[int] = []
        self._marked: set[str] = set()
        self._next = 0
        self.sync = False
        self.started_at: list[float | None] = []
        self.done_at: list[float | None] = []

    def __len__(self) -> int:
        return len(self.buckets)

    def begin(self, sync: bool = True) -> None:
        """Start a step (or micro-step); with sync=False nothing is communicated."""
        if any(h is not None and not self.comm.test(h) for h in self._handles):
            raise RuntimeError("internal error: Buckets.begin while all-reduces are in flight")
        n = len(self.buckets)
        self.sync = sync
        self._handles = [None] * n
        self._left = [len(b.names) for b in self.buckets]
        self._marked = set()
        self._next = 0
        self.started_at, self.done_at = [None] * n, [None] * n

    def ready(self, name: str) -> None:
        """Gradient `name` is final in the flat buffer (unknown names are ignored)."""
        if not self.sync or name in self._marked or name not in self._bucket_of:
            return
        self._marked.add(name)
        self._left[self._bucket_of[name]] -= 1
        if self.overlap:
            while self._next < len(self.buckets) and self._left[self._next] == 0:
                self._start(self._next)

    def progress(self) -> None:
        """Poll the all-reduces in flight (cheap; call between kernels)."""
        for i in range(self._next):
            if self.done_at[i] is None and self.comm.test(self._handles[i]):
                self.done_at[i] = time.perf_counter()

    def wait_all(self) -> None:
        """Complete every bucket's all-reduce (starting those not started yet)."""
        if not self.sync:
            return
        while self._next < len(self.buckets):
            self._start(self._next)
        for i, handle in enumerate(self._handles):
            if self.done_at[i] is None:
                self.comm.synchronize(handle)
                self.done_at[i] = time.perf_counter()
        self.sync = False

    def _start(self, i: int) -> None:
        b = self.buckets[i]
        self.started_at[i] = time.perf_counter()
        if not self._parts:
            self._handles[i] = self.comm.allreduce_async_(self.flat[b.lo:b.hi], label=b.label,
                                                          compress=self.compress)
        else:
            counts, part = self._parts[i]
            self._handles[i] = self.comm.reduce_scatter_async_(self.flat[b.lo:b.hi], part,
                                                               counts, label=b.label)
        self._next = i + 1
