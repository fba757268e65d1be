"""NCCL communicator (cupy.cuda.nccl): one GPU per rank, collectives on a dedicated CUDA stream
ordered after the compute stream by events, the unique id broadcast over MPI; the MPI watchdog
polls each collective's CUDA event and aborts NCCL on timeout. Host arrays go over MPI."""

from __future__ import annotations

import socket

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
)
from trainer.comm.mpi import MPIComm
from trainer.errors import TrainerError

# numpy dtype char -> NCCL data type name (cupy.cuda.nccl constants)
_NCCL_TYPES = {"b": "NCCL_INT8", "B": "NCCL_UINT8", "?": "NCCL_UINT8", "i": "NCCL_INT32",
               "I": "NCCL_UINT32", "l": "NCCL_INT64", "q": "NCCL_INT64", "L": "NCCL_UINT64",
               "Q": "NCCL_UINT64", "e": "NCCL_FLOAT16", "H": "NCCL_FLOAT16",
               "f": "NCCL_FLOAT32", "d": "NCCL_FLOAT64"}


def nccl_type(nccl, dtype) -> int:
    """The NCCL data type of a numpy dtype (uint16 travels as float16: bytes are only moved)."""
    name = _NCCL_TYPES.get(np.dtype(dtype).char)
    if name is None:
        raise ValueError(f"internal error: NCCL cannot move {np.dtype(dtype)} arrays")
    return getattr(nccl, name)


def uid_to_array(uid) -> np.ndarray:
    """NCCL's unique id (bytes since CuPy 14, a tuple of C chars before) as 128 uint8."""
    if isinstance(uid, (bytes, bytearray)):
        return np.frombuffer(bytes(uid), np.uint8).copy()
    return np.array([int(v) for v in uid], np.int64).astype(np.int8).view(np.uint8)


def make_nccl_comm(nccl, size: int, uid: np.ndarray, rank: int):
    """NcclCommunicator from the broadcast id, in the form the installed CuPy takes."""
    try:
        return nccl.NcclCommunicator(size, uid.tobytes(), rank)
    except TypeError:  # CuPy < 14 takes the id as a tuple of ints
        return nccl.NcclCommunicator(size, tuple(int(v) for v in uid.view(np.int8)), rank)


_BUS_ID_BYTES = 32


def gpu_identity(cupy) -> str:
    """The current GPU as the machine knows it, its PCI bus id: device numbers name different
    GPUs in processes whose CUDA_VISIBLE_DEVICES differ (one GPU per Slurm task, say)."""
    device = cupy.cuda.Device()
    try:
        return str(device.pci_bus_id)
    except Exception:  # noqa: BLE001 - a runtime without the query: its UUID, or unknown
        pass
    try:
        uuid = cupy.cuda.runtime.getDeviceProperties(device.id).get("uuid")
        return f"uuid {bytes(uuid).hex()}" if uuid else ""
    except Exception:  # noqa: BLE001 - unknown: no sharing is claimed (NCCL says its own)
        return ""


def shared_gpus(bus_ids: list[str]) -> dict[str, list[int]]:
    """The GPUs that several ranks of one node would drive (NCCL refuses two ranks on one
    GPU): bus id -> the node-local ranks on it, from each local rank's bus id in order."""
    users: dict[str, list[int]] = {}
    for local_rank, bus in enumerate(bus_ids):
        if bus:  # ('': not known)
            users.setdefault(bus, []).append(local_rank)
    return {bus: ranks for bus, ranks in users.items() if len(ranks) > 1}


def sharing_text(shared: dict[str, list[int]], host: str) -> str:
    """'local ranks 0 and 1 on HOST share GPU 0000:3B:00.0' (and the next GPUs so shared)."""
    parts = []
    for bus, ranks in shared.items():
        names = ", ".join(str(r) for r in ranks[:-1]) + f" and {ranks[-1]}"
        parts.append(f"local ranks {names} on {host} share GPU {bus}")
    return "; ".join(parts)


def node_gpu_sharing(mpi, cupy) -> dict[str, list[int]]:
    """shared_gpus over this node's ranks, each on its current GPU (a collective over the
    node's ranks)."""
    row = np.zeros(_BUS_ID_BYTES, np.uint8)
    raw = gpu_identity(cupy).encode()[:_BUS_ID_BYTES]
    row[:len(raw)] = np.frombuffer(raw, np.uint8)
    rows = mpi.node_gather(row)
    return shared_gpus([r.tobytes().rstrip(b"\0").decode(errors="replace") for r in rows])


def nccl_available() -> bool:
    try:
        from cupy.cuda import nccl
    except Exception:  # noqa: BLE001 - no CuPy, or a CuPy without NCCL
        return False
    return bool(getattr(nccl, "available", False))


class NCCLHandle:
    __slots__ = ("seq", "label", "event", "keep")

    def __init__(self, seq: int, label: str, event, keep):
        self.seq, self.label, self.event, self.keep = seq, label, event, keep


class NCCLComm:
    """Collectives over NCCL between the ranks of an MPIComm (which bootstraps and watches)."""

    def __init__(self, timeout_s: float = 300.0, mpi: MPIComm | None = None,
                 device: int | None = None):
        if not nccl_available():
            raise TrainerError("distributed.backend: nccl needs CuPy with NCCL (pip install "
                               "'onnx-trainer[gpu-cuda13]' or '[gpu-cuda12]' with NCCL); or set "
                               "distributed.backend: mpi")
        from trainer.backend import cupy_module

        cupy = cupy_module()
        nccl = cupy.cuda.nccl

        self.cupy, self.nccl = cupy, nccl
        self.mpi = mpi if mpi is not None else MPIComm(timeout_s)
        self.rank, self.size = self.mpi.rank, self.mpi.size
        if device is None:
            from trainer.backend import select_device
            self.device = select_device(cupy)  # (what get_xp chose: local rank % GPU count)
        else:
            self.device = int(device)
            cupy.cuda.Device(self.device).use()
        shared = node_gpu_sharing(self.mpi, cupy)
        problems = np.array([1.0 if shared else 0.0])
        self.mpi.allreduce_(problems, label="one GPU per rank")  # every rank stops, or none
        if problems[0]:
            count = cupy.cuda.runtime.getDeviceCount()
            where = (f"{sharing_text(shared, socket.gethostname())} (this rank sees {count} "
                     "GPU(s))" if shared else f"{int(problems[0])} rank(s) on other nodes share "
                     "a GPU (their error names them)")
            raise TrainerError(f"distributed.backend: nccl needs one GPU per rank, but {where}; "
                               "start at most as many ranks per node as it has GPUs (local rank "
                               "i takes GPU i % count of those it sees), or set "
                               "distributed.backend: mpi")
        uid = np.zeros(128, np.uint8)
        if self.rank == 0:
            uid[...] = uid_to_array(nccl.get_unique_id())
        self.mpi.bcast_(uid, label="NCCL unique id")
        self.comm = make_nccl_comm(nccl, self.size, uid, self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.watchdog = self.mpi.watchdog

    # -- the engine ----------------------------------------------------------------------------
    def _begin(self, label: str) -> int:
        seq = self.mpi.next_seq(label)
        # The comm stream starts after everything queued so far on the compute stream.
        self.stream.wait_event(self.cupy.cuda.get_current_stream().record())
        return seq

    def _end(self, seq: int, label: str, keep) -> NCCLHandle:
        return NCCLHandle(seq, label, self.stream.record(), keep)

    def test(self, handle) -> bool:
        if handle is None:
            return True
        if isinstance(handle, NCCLHandle):
            return bool(handle.event.done)
        return self.mpi.test(handle)

    def synchronize(self, handle) -> None:
        if handle is None:
            return
        if not isinstance(handle, NCCLHandle):
            self.mpi.synchronize(handle)
            return

        def done() -> bool:
            if handle.event.done:
                return True
            try:
                self.comm.check_async_error()
            except Exception as exc:  # noqa: BLE001 - NcclError: a peer or link failed
                raise CollectiveError(f"NCCL failed in collective #{handle.seq} "
                                        f"'{handle.label}' on rank {self.rank}: {exc}; "
                                        "ending the job") from None
            return False
        try:
            self.watchdog.wait(handle.seq, handle.label, done)
        except CollectiveError:
            self.comm.abort()  # stops this rank's NCCL kernels spinning on the GPU
            raise
        self.cupy.cuda.get_current_stream().wait_event(handle.event)

    def _ptr(self, a) -> int:
        return int(a.data.ptr)

    # -- collectives ---------------------------------------------------------------------------
    def allreduce_async_(self, buf, label: str = "allreduce", compress: str | None = None):
        if isinstance(buf, np.ndarray):
            return self.mpi.allreduce_async_(buf, label, compress)
        check_compress(compress, buf)
        nccl, cp = self.nccl, self.cupy
        seq = self._begin(label)
        s = self.stream.ptr
        flat = buf.reshape(-1)
        if compress is None or self.size == 1:
            if compress is not None:
                with self.stream:
                    decompress16(compress16(flat, compress), compress, flat)
            else:
                self.comm.allReduce(self._ptr(flat), self._ptr(flat), flat.size,
                                    nccl_type(nccl, flat.dtype), nccl.NCCL_SUM, s)
            return self._end(seq, label, (buf,))
        p, r = self.size, self.rank
        n, k = flat.size, padded_size(flat.size, p) // p
        half = nccl.NCCL_FLOAT16  # 16-bit payloads are only moved, never reduced by NCCL
        with self.stream:
            send = cp.zeros(p * k, np.uint16)
            send[:n] = compress16(flat, compress)
            rows = cp.empty((p, k), np.uint16)
            rows[r] = send[r * k:(r + 1) * k]
            nccl.groupStart()
            for j in range(p):
                if j != r:
                    self.comm.send(self._ptr(send[j * k:]), k, half, j, s)
                    self.comm.recv(self._ptr(rows[j]), k, half, j, s)
            nccl.groupEnd()
            shard = cp.empty(k, np.float32)
            mine = compress16(sum_compressed(rows, compress, shard), compress)
            gathered = cp.empty(p * k, np.uint16)
            self.comm.allGather(self._ptr(mine), self._ptr(gathered), k, half, s)
            decompress16(gathered[:n], compress, flat)
        return self._end(seq, label, (buf, send, rows, shard, mine, gathered))

    def allreduce_(self, buf, label: str = "allreduce", compress: str | None = None) -> None:
        self.synchronize(self.allreduce_async_(buf, label, compress))

    def bcast_(self, buf, root: int = 0, label: str = "broadcast") -> None:
        if isinstance(buf, np.ndarray):
            return self.mpi.bcast_(buf, root, label)
        seq = self._begin(label)
        flat = buf.reshape(-1)
        self.comm.bcast(self._ptr(flat), flat.size, nccl_type(self.nccl, flat.dtype), root,
                        self.stream.ptr)
        self.synchronize(self._end(seq, label, (buf,)))

    def barrier(self, label: str = "barrier") -> None:
        self.mpi.barrier(label)

    def reduce_scatter_(self, buf, out, label: str = "reduce-scatter") -> None:
        if isinstance(buf, np.ndarray):
            return self.mpi.reduce_scatter_(buf, out, label)
        k = check_shards(buf, out, self.size, "reduce_scatter_")
        seq = self._begin(label)
        self.comm.reduceScatter(self._ptr(buf), self._ptr(out), k,
                                nccl_type(self.nccl, buf.dtype), self.nccl.NCCL_SUM,
                                self.stream.ptr)
        self.synchronize(self._end(seq, label, (buf, out)))

    def reduce_scatter_async_(self, buf, out, counts, label: str = "reduce-scatter"):
        if isinstance(buf, np.ndarray):
            return self.mpi.reduce_scatter_async_(buf, out, counts, label)
        counts = check_counts(buf, out, counts, self.rank)
        nccl = self.nccl
        seq = self._begin(label)
        flat, dtype = buf.reshape(-1), nccl_type(nccl, buf.dtype)
        # Unequal parts (NCCL's reduceScatter takes equal ones): one reduce to each owner, in
        # one group so NCCL schedules them together.
        nccl.groupStart()
        lo = 0
        for j, c in enumerate(counts):
            if c:
                dst = out.reshape(-1) if j == self.rank else flat[lo:]
                self.comm.reduce(self._ptr(flat[lo:]), self._ptr(dst), c, dtype, nccl.NCCL_SUM,
                                 j, self.stream.ptr)
            lo += c
        nccl.groupEnd()
        return self._end(seq, label, (buf, out))

    def allgather_(self, part, out, label: str = "allgather") -> None:
        if isinstance(out, np.ndarray):
            return self.mpi.allgather_(part, out, label)
        k = check_shards(out, part, self.size, "allgather_")
        seq = self._begin(label)
        self.comm.allGather(self._ptr(part), self._ptr(out), k,
                            nccl_type(self.nccl, out.dtype), self.stream.ptr)
        self.synchronize(self._end(seq, label, (part, out)))

    def abort(self, code: int = 1) -> None:
        try:
            self.comm.abort()
        finally:
            self.mpi.abort(code)
