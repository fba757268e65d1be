"""MPI communicator over mpi4py's buffer API: every collective is non-blocking, polled under the
watchdog; CuPy arrays go to a CUDA-aware MPI directly, else through pinned host buffers.

MPI moves a non-blocking collective's data only inside MPI calls. While collectives are in
flight, a progress thread calls MPI (an Iprobe on a communicator of its own) every half
millisecond, so a gradient bucket's all-reduce advances while the backward computes, also
during one long kernel (NumPy and CuPy release the GIL there). It needs MPI_THREAD_MULTIPLE;
ONNX_TRAINER_MPI_PROGRESS=0 turns it off (the engine then progresses collectives only when it
polls them, between the backward's gradients).

Multi-step collectives (compressed all-reduce: an all-to-all, then an all-gather) issue each
step on its own duplicated communicator, in the order the collectives were started, so ranks
whose steps complete in different orders still match.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import subprocess
import sys
import threading
import time
from collections import deque

import numpy as np

from trainer.comm.base import (
    CollectiveError,
    check_compress,
    check_counts,
    check_shards,
    compress16,
    decompress16,
    padded_size,
    sum_compressed,
    xp_of,
)
from trainer.comm.watchdog import Watchdog
from trainer.errors import TrainerError

_STEPS = 2  # the most MPI collectives one of our collectives issues


def import_mpi():
    """mpi4py's MPI module. Before MPI starts, Open MPI's non-blocking all-reduce is set to the
    ring algorithm (its default for in-place buffers is a binomial tree, ~2x slower on large
    buffers); an OMPI_MCA_coll_libnbc_iallreduce_algorithm already set by the user wins."""
    if "mpi4py.MPI" not in sys.modules:
        os.environ.setdefault("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1")
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise TrainerError("running on several processes needs mpi4py: pip install "
                           "'onnx-trainer[mpi]'") from exc
    return MPI


@contextlib.contextmanager
def _start_deadline(timeout_s: float):
    """MPI's start (MPI_Init's exchange with every rank, the first communicators' Dup) waits for
    every rank in C, holding Python's lock, where the collectives' watchdog cannot run: a rank
    that never starts (stopped, or lost) left the others waiting forever. Under a launcher,
    faulthandler's C thread ends this process after timeout_s, printing where it waited
    (_mpi_start_waits_for_every_rank, or the import of mpi4py.MPI); the launcher then ends the
    job."""
    import faulthandler

    from trainer.comm import launched_world_size

    armed = launched_world_size() > 1 and timeout_s > 0
    if armed:
        faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        yield
    finally:
        if armed:
            faulthandler.cancel_dump_traceback_later()


def _mpi_start_waits_for_every_rank(comm, steps: int):
    """(MPI, comm or COMM_WORLD, its `steps` duplicates, the watchdog's duplicate): MPI's start
    and collectives, which wait for every rank (the name is what a start past
    distributed.timeout_s prints)."""
    MPI = import_mpi()
    comm = comm if comm is not None else MPI.COMM_WORLD
    dups = [comm.Dup() for _ in range(steps)]
    return MPI, comm, dups, (comm.Dup() if comm.Get_size() > 1 else None)


def cuda_aware_mpi(MPI) -> bool:
    """Whether the MPI library can read and write CUDA device memory. ONNX_TRAINER_CUDA_AWARE_MPI
    (0/1) overrides; else Open MPI's MPIX_Query_cuda_support(), else its ompi_info parameter."""
    forced = os.environ.get("ONNX_TRAINER_CUDA_AWARE_MPI", "")
    if forced in ("0", "1"):
        return forced == "1"
    if "open mpi" not in MPI.Get_library_version().lower():
        return False
    for lib in _loaded_libmpi():
        try:
            query = ctypes.CDLL(lib).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return bool(query())
    try:
        out = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.endswith("built_with_cuda_support:value:true")
               for line in out.splitlines())


def _loaded_libmpi() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps
                           if "/libmpi.so" in line or "/libmpi_" in line})
    except OSError:
        return []


def _abort_on_uncaught_exception(MPI) -> None:
    """An exception that escapes on one rank (Python API use, a thread) ends the whole job
    instead of leaving the other ranks waiting in a collective; the CLI handles its own."""
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


class PinnedPool:
    """Page-locked host buffers for staging device arrays, allocated once per byte size and
    reused (one per collective in flight), so D2H/H2D copies run at full PCIe speed."""

    def __init__(self, alloc=None):
        self._alloc = alloc
        self._free: dict[int, list[np.ndarray]] = {}

    def acquire(self, dtype, shape) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        free = self._free.setdefault(nbytes, [])
        if free:
            raw = free.pop()
        else:
            if self._alloc is None:
                from trainer.backend import cupy_module
                self._alloc = cupy_module().cuda.alloc_pinned_memory
            raw = np.frombuffer(self._alloc(max(nbytes, 1)), np.uint8, nbytes)
        return raw.view(dtype).reshape(shape)

    def release(self, host: np.ndarray) -> None:
        raw = host.reshape(-1).view(np.uint8)
        self._free.setdefault(raw.size, []).append(raw)


class ProgressThread:
    """Calls MPI every `period_s` while collectives are in flight (idle otherwise): Open MPI
    advances non-blocking collectives in whichever thread enters it."""

    def __init__(self, comm, MPI, period_s: float = 5e-4):
        self.comm, self.MPI, self.period_s = comm, MPI, period_s
        self.in_flight = 0
        self.polls = 0
        self._busy = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mpi-progress", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # before mpi4py's own exit handler finalizes MPI

    def started(self) -> None:
        self.in_flight += 1
        self._busy.set()

    def finished(self) -> None:
        self.in_flight -= 1

    def stop(self) -> None:
        self._stop = True
        self._busy.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        MPI = self.MPI
        while not self._stop:
            self._busy.wait()
            self._busy.clear()
            while self.in_flight > 0 and not self._stop:  # (re-read after the clear)
                try:
                    self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
                except MPI.Exception:  # a broken job: the watchdog of the main thread reports
                    return
                self.polls += 1
                time.sleep(self.period_s)


class Handle:
    """An async collective: a generator of MPI steps, driven by MPIComm.test/synchronize."""

    __slots__ = ("seq", "label", "gen", "step", "request", "pending", "done", "finish")

    def __init__(self, seq: int, label: str, gen):
        self.seq, self.label, self.gen = seq, label, gen
        self.step = 0
        self.request = None
        self.pending = None  # the next step's issuing function, waiting for its turn
        self.done = False
        self.finish = None  # copies staged results back to the device

    def __repr__(self) -> str:
        return f"<collective #{self.seq} '{self.label}'{' done' if self.done else ''}>"


class MPIComm:
    """Collectives over MPI.COMM_WORLD (or `comm`) with a watchdog of timeout_s seconds."""

    def __init__(self, timeout_s: float = 300.0, comm=None, pinned_alloc=None):
        with _start_deadline(timeout_s):
            # (own communicators: collectives here never match the user's own MPI traffic)
            MPI, self.comm, self._steps, watched = _mpi_start_waits_for_every_rank(comm, _STEPS)
        self.MPI = MPI
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.watchdog = Watchdog(watched, self.rank, self.size, timeout_s)
        self._queues: list[deque] = [deque() for _ in range(_STEPS)]
        self._seq = 0
        self._cuda_aware: bool | None = None
        self._local: tuple[int, int] | None = None
        self.pinned = PinnedPool(pinned_alloc)
        self.progress: ProgressThread | None = None
        if self.size > 1:
            _abort_on_uncaught_exception(MPI)
            probe = self.comm.Dup()  # (collective: every rank, whatever its setting)
            if (MPI.Query_thread() == MPI.THREAD_MULTIPLE
                    and os.environ.get("ONNX_TRAINER_MPI_PROGRESS", "1") != "0"):
                self.progress = ProgressThread(probe, MPI)
            else:
                probe.Free()

    @property
    def cuda_aware(self) -> bool:
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware_mpi(self.MPI)
        return self._cuda_aware

    def next_seq(self, label: str) -> int:
        """Number the next collective (the same on every rank) and tell the watchdog."""
        seq = self._seq
        self._seq += 1
        self.watchdog.enter(seq, label)
        return seq

    def node_local(self) -> tuple[int, int]:
        """(rank among the ranks on this node, number of ranks on this node)."""
        if self._local is None:
            local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
            self._local = (local.Get_rank(), local.Get_size())
            local.Free()
        return self._local

    def node_gather(self, row: np.ndarray) -> np.ndarray:
        """Every rank of this node's `row` (a small host array, the same shape on each), in
        node-local rank order: a blocking collective for start-up checks."""
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            rows = np.empty((local.Get_size(),) + row.shape, row.dtype)
            local.Allgather(np.ascontiguousarray(row), rows)
        finally:
            local.Free()
        return rows

    # -- the engine -----------------------------------------------------------------------------
    def _start(self, label: str, make, arrays, steps: int = 1) -> Handle:
        """Start a collective: make(*host_arrays) is a generator that yields one function per MPI
        step (comm -> request) and finishes the work after the last; arrays are (array,
        copy_in, copy_out) triples, staged through pinned memory when on a device."""
        seq = self.next_seq(label)
        views, staged = [], []
        for arr, copy_in, copy_out in arrays:
            view, stage = self._stage(arr, copy_in, copy_out)
            views.append(view)
            if stage is not None:
                staged.append(stage)
        handle = Handle(seq, label, make(*views))
        if staged:
            handle.finish = lambda: [s() for s in staged]
        if self.progress is not None:
            self.progress.started()
        for k in range(1, steps):
            self._queues[k].append(handle)
        issue = next(handle.gen)
        handle.request = issue(self._steps[0])
        return handle

    def _stage(self, arr, copy_in: bool, copy_out: bool):
        if isinstance(arr, np.ndarray):
            if not (arr.flags.c_contiguous and arr.flags.writeable):
                raise ValueError("internal error: MPI buffers must be writable, contiguous "
                                 "arrays owned by the engine")
            return arr, None
        if self.cuda_aware:
            if not arr.flags.c_contiguous:  # (as a host array: MPI reads and writes it whole)
                raise ValueError("internal error: MPI buffers must be contiguous arrays owned "
                                 "by the engine")
            from trainer.backend import cupy_module
            cupy_module().cuda.get_current_stream().synchronize()  # the kernels that wrote arr
            return arr, None
        host = self.pinned.acquire(arr.dtype, arr.shape)
        if copy_in:
            arr.get(out=host)

        def back():
            if copy_out:
                arr.set(host)
                # (set from pinned memory is asynchronous on CuPy's current stream: the
                # buffer goes back to the pool, where the next collective may write it, only
                # once the copy has read it)
                if type(arr).__module__.startswith("cupy"):
                    from trainer.backend import cupy_module
                    cupy_module().cuda.get_current_stream().synchronize()
            self.pinned.release(host)
        return host, back

    def _advance(self, h: Handle) -> bool:
        while not h.done:
            if h.request is not None:
                if not h.request.Test():
                    return False
                h.request = None
            if h.pending is None:
                try:
                    h.pending = h.gen.send(None)
                except StopIteration:
                    h.done = True
                    if self.progress is not None:
                        self.progress.finished()
                    if h.finish is not None:
                        h.finish()
                    return True
                h.step += 1
            queue = self._queues[h.step]
            while queue[0] is not h:  # an earlier collective issues this step first
                if not self._advance(queue[0]) and queue[0] is not h:
                    return False
            queue.popleft()
            h.request, h.pending = h.pending(self._steps[h.step]), None
        return True

    def test(self, handle) -> bool:
        return handle is None or self._checked(handle)

    def synchronize(self, handle) -> None:
        if handle is not None:
            self.watchdog.wait(handle.seq, handle.label, lambda: self._checked(handle))

    def _checked(self, handle: Handle) -> bool:
        try:
            return self._advance(handle)
        except self.MPI.Exception as exc:  # a peer died or the network broke
            self.watchdog.broken = (f"collective #{handle.seq} '{handle.label}' failed on rank "
                                    f"{self.rank}: {exc.Get_error_string()}; ending the job")
            raise CollectiveError(self.watchdog.broken) from None

    def _run(self, handle) -> None:
        self.synchronize(handle)

    # -- collectives ----------------------------------------------------------------------------
    def allreduce_async_(self, buf, label: str = "allreduce", compress: str | None = None):
        check_compress(compress, buf)
        MPI = self.MPI
        if compress is None and self._reduces_itself(buf):
            return self._start(label, self._allreduce_in_parts, [(buf, True, True)], steps=2)
        if compress is None:
            def gen(b):
                yield lambda c: c.Iallreduce(MPI.IN_PLACE, b, op=MPI.SUM)
            return self._start(label, gen, [(buf, True, True)])
        p = self.size

        def compressed(b):
            xp = xp_of(b)
            flat = b.reshape(-1)
            n, k = flat.size, padded_size(flat.size, p) // p
            send = xp.zeros(p * k, np.uint16)
            send[:n] = compress16(flat, compress)
            rows = xp.empty((p, k), np.uint16)
            _device_ready(send)
            yield lambda c: c.Ialltoall(send, rows)
            shard = xp.empty(k, np.float32)
            mine = compress16(sum_compressed(rows, compress, shard), compress)
            gathered = xp.empty(p * k, np.uint16)
            _device_ready(mine)
            yield lambda c: c.Iallgather(mine, gathered)
            decompress16(gathered[:n], compress, flat)
        return self._start(label, compressed, [(buf, True, True)], steps=2)

    def _reduces_itself(self, buf) -> bool:
        """Whether the engine sums this buffer itself, MPI only moving its parts: a device
        array given to a CUDA-aware MPI directly. Open MPI's CUDA support covers the blocking
        reductions only (coll/accelerator wraps MPI_Allreduce, not MPI_Iallreduce, whose
        host-side sum would read device memory); moving bytes (all-to-all, all-gather,
        broadcast) is supported in every form."""
        return not isinstance(buf, np.ndarray) and self.cuda_aware

    def _allreduce_in_parts(self, b):
        """All-reduce as an all-to-all of the p parts, this rank's part summed in rank order
        on the device, and an all-gather of the sums: the bytes a ring all-reduce sends, and
        the same bits on every rank."""
        xp, p = xp_of(b), self.size
        flat = b.reshape(-1)
        n, k = flat.size, padded_size(flat.size, p) // p
        whole = n == p * k
        send = flat if whole else xp.zeros(p * k, flat.dtype)
        if not whole:
            send[:n] = flat
            _device_ready(send)
        rows = xp.empty((p, k), flat.dtype)
        yield lambda c: c.Ialltoall(send, rows)
        mine = rows[0].copy()
        for j in range(1, p):
            mine += rows[j]
        _device_ready(mine)
        out = send  # (the all-to-all has read it)
        yield lambda c: c.Iallgather(mine, out)
        if not whole:
            flat[...] = out[:n]

    def allreduce_(self, buf, label: str = "allreduce", compress: str | None = None) -> None:
        self._run(self.allreduce_async_(buf, label, compress))

    def bcast_(self, buf, root: int = 0, label: str = "broadcast") -> None:
        def gen(b):
            yield lambda c: c.Ibcast(b, root=root)
        self._run(self._start(label, gen, [(buf, self.rank == root, self.rank != root)]))

    def barrier(self, label: str = "barrier") -> None:
        def gen():
            yield lambda c: c.Ibarrier()
        self._run(self._start(label, gen, []))

    def reduce_scatter_(self, buf, out, label: str = "reduce-scatter") -> None:
        k = check_shards(buf, out, self.size, "reduce_scatter_")
        if self._reduces_itself(buf):
            self._run(self.reduce_scatter_async_(buf, out, [k] * self.size, label))
            return
        MPI = self.MPI

        def gen(b, o):
            yield lambda c: c.Ireduce_scatter_block(b, o, op=MPI.SUM)
        self._run(self._start(label, gen, [(buf, True, False), (out, False, True)]))

    def reduce_scatter_async_(self, buf, out, counts, label: str = "reduce-scatter"):
        # An all-to-all of the parts (each rank sends rank j its part: (p-1)/p of the buffer,
        # as a ring reduce-scatter does), then this rank sums the p copies of its part in rank
        # order. Open MPI's non-blocking MPI_Ireduce_scatter reduces at one rank and scatters:
        # ~2x slower on large buckets (bench/comm_bench.py --zero1).
        counts = check_counts(buf, out, counts, self.rank)
        p, mine = self.size, counts[self.rank]
        displs = [sum(counts[:j]) for j in range(p)]

        def gen(b, o):
            xp = xp_of(b)
            rows = xp.empty((p, mine), b.dtype)
            yield lambda c: c.Ialltoallv([b.reshape(-1), (counts, displs)],
                                         [rows, ([mine] * p, [j * mine for j in range(p)])])
            total = o.reshape(-1)
            xp.copyto(total, rows[0])
            for j in range(1, p):
                total += rows[j]
        return self._start(label, gen, [(buf, True, False), (out, False, True)])

    def allgather_(self, part, out, label: str = "allgather") -> None:
        k = check_shards(out, part, self.size, "allgather_")
        MPI = self.MPI
        in_place = _same_memory(part, out, self.rank * k)
        if in_place:
            def gen(o):
                yield lambda c: c.Iallgather(MPI.IN_PLACE, o)
            self._run(self._start(label, gen, [(out, True, True)]))
            return

        def gen2(pt, o):
            yield lambda c: c.Iallgather(pt, o)
        self._run(self._start(label, gen2, [(part, True, False), (out, False, True)]))

    def abort(self, code: int = 1) -> None:
        sys.stderr.flush()
        sys.stdout.flush()
        self.MPI.COMM_WORLD.Abort(code)


def _device_ready(a) -> None:
    """Wait for the kernels that wrote a device array before MPI reads it."""
    if not isinstance(a, np.ndarray):
        from trainer.backend import cupy_module
        cupy_module().cuda.get_current_stream().synchronize()


def _same_memory(part, out, offset: int) -> bool:
    """Whether part is out's shard at element `offset` (an in-place all-gather)."""
    def ptr(a):
        if isinstance(a, np.ndarray):
            return a.__array_interface__["data"][0]
        return int(a.data.ptr)
    return ptr(part) == ptr(out) + offset * out.dtype.itemsize
