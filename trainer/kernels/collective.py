"""Collective kernels of the ai.onnx_trainer domain: AllReduce (sum over the ranks of a job), for
SyncBatchNorm's batch statistics. The training loop makes the job's communicator current
(`collectives(comm)`); outside it (shape probes, one process, evaluation) AllReduce is the
identity, which is its value in a one-process job."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from trainer.kernels import CUSTOM_DOMAIN, CUSTOM_SHAPES, kernel

_current = threading.local()  # thread-local: emulated ranks are threads of one process


@contextmanager
def collectives(comm):
    """Make `comm` the communicator of AllReduce nodes run in this thread."""
    previous = getattr(_current, "comm", None)
    _current.comm = comm
    try:
        yield
    finally:
        _current.comm = previous


@kernel("AllReduce", domain=CUSTOM_DOMAIN)
def AllReduce(xp, x):
    comm = getattr(_current, "comm", None)
    out = xp.array(x, copy=True, order="C")
    if comm is not None and comm.size > 1:
        comm.allreduce_(out, label="SyncBatchNorm statistics")
    return (out,)


AllReduce.collective = True  # never folded or dropped by the planner: every rank must call it
CUSTOM_SHAPES["AllReduce"] = lambda x: [x]
