"""The communicator protocol (Horovod's vocabulary) and what every backend shares: the timeout
error, equal shards of a flat buffer, and 16-bit gradient compression with fp32 accumulation."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from trainer.errors import TrainerError

COMPRESSIONS = ("bf16", "fp16")


class CollectiveError(TrainerError):
    """A collective failed (a peer died, the network broke); the communicator is broken and the
    job must end (the CLI aborts every rank)."""


class CollectiveTimeout(CollectiveError):
    """A collective did not complete within distributed.timeout_s (the watchdog)."""


class BlockingAsync:
    """allreduce_async_/synchronize/test for communicators whose all-reduce completes at once
    (one process; ranks emulated in one process): the "async" call runs allreduce_."""

    def allreduce_async_(self, buf, label: str = "allreduce", compress: str | None = None):
        self.allreduce_(buf, label, compress)
        return None

    def reduce_scatter_async_(self, buf, out, counts, label: str = "reduce-scatter"):
        self.reduce_scatter_counts_(buf, out, counts, label)
        return None

    def synchronize(self, handle) -> None:
        return None

    def test(self, handle) -> bool:
        return True


class Communicator(Protocol):
    """In-place collectives on contiguous NumPy or CuPy arrays, identical on every backend.

    Every rank must call the collectives in the same order (async ones are ordered by their
    start). `label` names the collective in watchdog messages. Sums, never means: callers scale
    once. reduce_scatter_/allgather_ work on equal contiguous shards: buf.size == size * k,
    rank r owns buf[r*k:(r+1)*k] (see padded_size)."""

    rank: int
    size: int

    def allreduce_(self, buf, label: str = "allreduce", compress: str | None = None) -> None:
        """Sum buf over ranks in place. compress='bf16'|'fp16' (float32 buf): each rank's values
        travel rounded to 16 bits, are summed in float32, and the sum is rounded once more."""

    def allreduce_async_(self, buf, label: str = "allreduce",
                         compress: str | None = None) -> Any:
        """Start allreduce_; buf must stay alive and untouched until synchronize(handle)."""

    def synchronize(self, handle: Any) -> None:
        """Wait for an async collective (at most timeout_s, else CollectiveTimeout)."""

    def test(self, handle: Any) -> bool:
        """Progress an async collective without blocking; True once it is complete."""

    def bcast_(self, buf, root: int = 0, label: str = "broadcast") -> None:
        """Overwrite buf on every rank with root's buf."""

    def barrier(self, label: str = "barrier") -> None: ...

    def reduce_scatter_(self, buf, out, label: str = "reduce-scatter") -> None:
        """out (k elements) = sum over ranks of this rank's shard buf[rank*k:(rank+1)*k]."""

    def reduce_scatter_async_(self, buf, out, counts, label: str = "reduce-scatter") -> Any:
        """Start: buf (the same size on every rank) summed over ranks; rank r receives
        elements [sum(counts[:r]), sum(counts[:r + 1])) of the sum in out (counts[r] elements,
        possibly 0; out does not overlap buf). The ZeRO-1 gradient bucket: each rank gets the
        part of the bucket that falls in its shard. Finish with synchronize(handle)."""

    def allgather_(self, part, out, label: str = "allgather") -> None:
        """out[r*k:(r+1)*k] = rank r's part, on every rank (part may be that view of out)."""

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (used when one rank fails)."""


def padded_size(n: int, size: int) -> int:
    """The smallest multiple of size that holds n elements (flat buffers for ZeRO-1 shards)."""
    return -(-n // size) * size


def check_counts(buf, out, counts, rank: int) -> list[int]:
    """The per-rank counts of a reduce_scatter_async_: they cover buf, and out holds this
    rank's."""
    counts = [int(c) for c in counts]
    if sum(counts) != buf.size or out.size != counts[rank] or buf.dtype != out.dtype:
        raise ValueError(f"internal error: reduce_scatter_async_ counts {counts} do not split "
                         f"{buf.size} {buf.dtype} elements into this rank's {out.size} "
                         f"{out.dtype}")
    return counts


def check_shards(buf, out, size: int, what: str) -> int:
    """Shard length k of a reduce-scatter/allgather; buf.size must be size * out.size."""
    if buf.size != out.size * size or buf.dtype != out.dtype:
        raise ValueError(f"internal error: {what} needs a flat buffer of {size} x the shard "
                         f"({out.size} {out.dtype}), got {buf.size} {buf.dtype}")
    return out.size


def xp_of(buf):
    """The array module of buf (NumPy or CuPy) without importing CuPy for NumPy arrays."""
    if isinstance(buf, np.ndarray):
        return np
    from trainer.backend import cupy_module
    return cupy_module()


def check_compress(compress: str | None, buf) -> None:
    if compress is None:
        return
    if compress not in COMPRESSIONS:
        raise TrainerError(f"distributed.compress: '{compress}' is not one of "
                           f"{', '.join(COMPRESSIONS)} (or null)")
    if buf.dtype != np.float32:
        raise TrainerError(f"distributed.compress: {compress} compresses float32 gradients; "
                           f"these are {buf.dtype} (use compress: null)")


def compress16(x, kind: str):
    """float32 -> 16-bit payload as uint16 (round to nearest even; NaN stays NaN)."""
    xp = xp_of(x)
    if kind == "fp16":
        return x.astype(np.float16).view(np.uint16)
    bits = xp.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    # A NaN keeps its sign and becomes a quiet NaN (rounding could carry it into infinity).
    return xp.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40),
                    rounded >> np.uint32(16)).astype(np.uint16)


def decompress16(h, kind: str, out=None):
    """16-bit payload (uint16) -> float32, written into out when given."""
    xp = xp_of(h)
    if kind == "fp16":
        value = h.view(np.float16)
        if out is None:
            return value.astype(np.float32)
        out[...] = value
        return out
    value = (h.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if out is None:
        return value
    xp.copyto(out, value)
    return out


def sum_compressed(shards, kind: str, out):
    """out = float32 sum of the 16-bit shards (rows of a [p, k] uint16 array), in rank order,
    so every backend and the in-process emulation produce the same bits."""
    decompress16(shards[0], kind, out)
    for j in range(1, shards.shape[0]):
        out += decompress16(shards[j], kind)
    return out
