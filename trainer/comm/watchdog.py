"""Collectives that cannot hang: wait with a deadline by polling, and on timeout name the ranks
that never arrived, learned from heartbeats that waiting ranks send on a duplicated communicator.

No thread: the waiting rank polls (MPI_Test or a CUDA event) in a loop. A rank that has waited
`announce_after` seconds tells every peer the sequence number of the newest collective it has
entered (one small Isend each; nothing is sent while collectives are fast). At the deadline each
waiting rank knows who announced that collective; the others are missing. The lowest waiting rank
raises CollectiveTimeout at once (the CLI prints it and aborts the job); the other waiting ranks
raise too if the job is still alive `report_grace` seconds later.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from trainer.comm.base import CollectiveError, CollectiveTimeout

_TAG = 7317


def ranks_text(ranks: list[int]) -> str:
    """'rank 3' or 'ranks 0-2, 5' (ranges keep messages short on large jobs)."""
    parts, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(parts)


class Watchdog:
    """Deadline waits for one communicator; `hb` is an MPI communicator reserved for heartbeats
    (None for a single rank)."""

    def __init__(self, hb, rank: int, size: int, timeout_s: float,
                 announce_after: float | None = None, report_grace: float = 10.0):
        if not timeout_s > 0:
            raise ValueError(f"internal error: timeout_s must be positive, got {timeout_s}")
        self.hb, self.rank, self.size = hb, rank, size
        self.timeout_s = float(timeout_s)
        self.announce_after = (min(1.0, self.timeout_s / 4) if announce_after is None
                               else announce_after)
        self.report_grace = report_grace
        self.last_seen = [-1] * size  # newest collective each peer announced having entered
        self.labels: dict[int, str] = {}  # recent sequence numbers -> labels
        self.entered = -1  # newest collective this rank has entered
        self.broken: str | None = None
        self._sends: list = []
        self._in = np.zeros(1, np.int64)

    def enter(self, seq: int, label: str) -> None:
        """Record that this rank starts collective `seq` (called in program order)."""
        if self.broken:
            raise CollectiveError(self.broken)
        self.entered = seq
        self.labels[seq] = label
        self.labels.pop(seq - 512, None)

    def wait(self, seq: int, label: str, done: Callable[[], bool]) -> None:
        """Return once done() is True; raise CollectiveTimeout after timeout_s of waiting."""
        if done():
            return
        start = time.monotonic()
        spin_until = start + self.announce_after
        while time.monotonic() < spin_until:  # fast collectives: pure polling, no sleep
            if done():
                return
        self._announce()
        deadline = start + self.timeout_s
        while not done():
            self._drain()
            if time.monotonic() >= deadline:
                self._expire(seq, label, done)
                return
            time.sleep(2e-4)

    # -- heartbeats ---------------------------------------------------------------------------
    def _announce(self) -> None:
        if self.hb is None:
            return
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        msg = np.array([self.entered], np.int64)
        for peer in range(self.size):
            if peer != self.rank:
                self._sends.append((self.hb.Isend(msg, dest=peer, tag=_TAG), msg))

    def _drain(self) -> None:
        if self.hb is None:
            return
        from mpi4py import MPI

        status = MPI.Status()
        while self.hb.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
            src = status.Get_source()
            self.hb.Recv(self._in, source=src, tag=_TAG)
            self.last_seen[src] = max(self.last_seen[src], int(self._in[0]))

    # -- timeout ------------------------------------------------------------------------------
    def _expire(self, seq: int, label: str, done: Callable[[], bool]) -> None:
        # Ranks that entered just before our deadline announce a little later: listen a bit.
        if self._listen(self.announce_after + 0.5, done):
            return
        present = [r for r in range(self.size) if r == self.rank or self.last_seen[r] >= seq]
        message = self.message(seq, label, present)
        self.broken = message
        if self.hb is None or self.rank == min(present):
            raise CollectiveTimeout(message)
        # Another waiting rank reports and ends the job; speak only if it could not.
        if self._listen(self.report_grace, done):
            self.broken = None
            return
        raise CollectiveTimeout(message)

    def _listen(self, seconds: float, done: Callable[[], bool]) -> bool:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if done():
                return True
            self._drain()
            time.sleep(2e-3)
        return False

    def message(self, seq: int, label: str, present: list[int]) -> str:
        missing = [r for r in range(self.size) if r not in present]
        head = (f"collective #{seq} '{label}' did not complete within {self.timeout_s:g} s "
                f"(rank {self.rank} waited)")
        if not missing:
            why = ("every rank entered it, so one probably died inside it or the network "
                   "between ranks failed")
        else:
            behind = [r for r in missing if self.last_seen[r] >= 0]
            why = (f"{ranks_text(missing)} did not arrive (stopped, hung, dead, or far slower "
                   "than the others)")
            for r in behind[:3]:
                s = self.last_seen[r]
                why += f"; rank {r} is still in collective #{s} '{self.labels.get(s, '?')}'"
            why += f"; {ranks_text(present)} waited in it"
        return (f"{head}: {why}. Ending the job; if a step legitimately takes longer, raise "
                "distributed.timeout_s")
