"""The communicator protocol (Horovod's vocabulary): in-place collectives on xp arrays."""

from __future__ import annotations

from typing import Any, Protocol


class Communicator(Protocol):
    rank: int
    size: int

    def bcast_(self, buf, root: int = 0) -> None:
        """Overwrite buf on every rank with root's buf."""

    def allreduce_(self, buf) -> None:
        """Sum buf over ranks, in place."""

    def allreduce_async_(self, buf) -> Any:
        """Start an in-place sum; buf must stay alive until synchronize(handle)."""

    def synchronize(self, handle: Any) -> None:
        """Wait for an allreduce_async_ to complete."""

    def barrier(self) -> None: ...

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (used when one rank fails)."""
