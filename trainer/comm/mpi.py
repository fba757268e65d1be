"""MPI communicator over mpi4py: in-place Bcast/Allreduce on host or CUDA-aware buffers."""

from __future__ import annotations

import numpy as np

from trainer.errors import TrainerError


def _host(buf):
    """A NumPy view of buf, or None when buf lives on a GPU (CuPy)."""
    return buf if isinstance(buf, np.ndarray) else None


def _abort_on_uncaught_exception(MPI) -> None:
    """An exception that escapes on one rank (Python API use, a thread) ends the whole job
    instead of leaving the other ranks waiting in a collective; the CLI handles its own."""
    import sys
    import threading

    if getattr(sys.excepthook, "_onnx_trainer", False):
        return
    previous, previous_thread = sys.excepthook, threading.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)

    def thread_hook(args):
        previous_thread(args)
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)

    hook._onnx_trainer = True
    sys.excepthook, threading.excepthook = hook, thread_hook


class MPIComm:
    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise TrainerError("running under mpirun needs mpi4py: pip install "
                               "'onnx-trainer[mpi]'") from exc
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        if self.size > 1:
            _abort_on_uncaught_exception(MPI)

    def _buf(self, buf):
        host = _host(buf)
        if host is not None:
            if not (host.flags.c_contiguous and host.flags.writeable):
                raise ValueError("internal error: MPI buffers must be writable, contiguous "
                                 "arrays owned by the engine")
            return host, None
        # CuPy array: stage through host memory (a CUDA-aware MPI or NCCL path comes later).
        staged = buf.get()
        return staged, buf

    def bcast_(self, buf, root: int = 0) -> None:
        host, dev = self._buf(buf)
        self.comm.Bcast(host, root=root)
        if dev is not None:
            dev.set(host)

    def allreduce_(self, buf) -> None:
        host, dev = self._buf(buf)
        self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        if dev is not None:
            dev.set(host)

    def allreduce_async_(self, buf):
        host, dev = self._buf(buf)
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        return (request, host, dev)

    def synchronize(self, handle) -> None:
        request, host, dev = handle
        request.Wait()
        if dev is not None:
            dev.set(host)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)
