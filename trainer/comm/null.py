"""The communicator of a single process: every collective is the identity (a compressed
all-reduce still rounds, as one rank of a compressed job would)."""

from __future__ import annotations

import sys

from trainer.comm.base import (
    BlockingAsync,
    check_compress,
    check_counts,
    check_shards,
    compress16,
    decompress16,
)


class NullComm(BlockingAsync):
    rank = 0
    size = 1

    def allreduce_(self, buf, label: str = "allreduce", compress: str | None = None) -> None:
        check_compress(compress, buf)
        if compress is not None:
            flat = buf.reshape(-1)
            decompress16(compress16(flat, compress), compress, flat)

    def bcast_(self, buf, root: int = 0, label: str = "broadcast") -> None:
        return None

    def barrier(self, label: str = "barrier") -> None:
        return None

    def reduce_scatter_(self, buf, out, label: str = "reduce-scatter") -> None:
        check_shards(buf, out, 1, "reduce_scatter_")
        out[...] = buf.reshape(out.shape)

    def reduce_scatter_counts_(self, buf, out, counts, label: str = "reduce-scatter") -> None:
        check_counts(buf, out, counts, 0)
        out[...] = buf.reshape(out.shape)

    def allgather_(self, part, out, label: str = "allgather") -> None:
        check_shards(out, part, 1, "allgather_")
        out[...] = part.reshape(out.shape)

    def abort(self, code: int = 1) -> None:
        sys.exit(code)
