"""Communicators: the protocol on emulated, MPI and NCCL ranks; buckets equal one big all-reduce;
16-bit compression against torch's rounding; the watchdog ends stalled jobs naming the rank.

MPI cases run this file as a program under mpirun: `python tests/test_comm.py WORKER ...`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a program under mpirun
    sys.path.insert(0, str(ROOT))

from tests.mpi_run import run_mpi  # noqa: E402
from trainer.comm import get_communicator, launched_world_size  # noqa: E402
from trainer.comm.base import (  # noqa: E402
    CollectiveError,
    CollectiveTimeout,
    check_shards,
    compress16,
    decompress16,
    padded_size,
)
from trainer.comm.buckets import Buckets, plan_buckets  # noqa: E402
from trainer.comm.local import compressed_allreduce_reference, run_local  # noqa: E402
from trainer.comm.mpi import PinnedPool  # noqa: E402
from trainer.comm.nccl import make_nccl_comm, nccl_type, uid_to_array  # noqa: E402
from trainer.comm.null import NullComm  # noqa: E402
from trainer.comm.watchdog import Watchdog, ranks_text  # noqa: E402
from trainer.errors import TrainerError  # noqa: E402

UNIT = {"bf16": 2.0**-8, "fp16": 2.0**-11}  # unit roundoff of the 16-bit formats


# -- 16-bit compression ----------------------------------------------------------------------------
def _torch_round(x: np.ndarray, kind: str) -> np.ndarray:
    torch = pytest.importorskip("torch")
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16
    return torch.from_numpy(x).to(dtype).to(torch.float32).numpy()


def _specials() -> np.ndarray:
    rng = np.random.default_rng(0)
    ties = (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # halfway
    return np.concatenate([
        rng.standard_normal(5000).astype(np.float32) * np.float32(10.0)
        ** rng.integers(-30, 30, 5000).astype(np.float32),
        ties, -ties,
        np.array([0.0, -0.0, 1e-40, -1e-45, 3.4e38, -3.4e38, np.inf, -np.inf, 65504, 65520,
                  6e-8, 2e-8, 1.0, 1.00390625, 1.01171875], np.float32)])


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_compression_rounds_like_torch(kind):
    x = _specials()
    with np.errstate(over="ignore"):
        ours = decompress16(compress16(x, kind), kind)
    np.testing.assert_array_equal(ours, _torch_round(x, kind))
    nan = decompress16(compress16(np.array([np.nan, -np.nan], np.float32), kind), kind)
    assert np.isnan(nan).all()
    # Rounding is idempotent: a 16-bit value survives another trip unchanged.
    np.testing.assert_array_equal(decompress16(compress16(ours, kind), kind), ours)


def test_shards_and_padding():
    assert [padded_size(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 4, 4, 8, 8]
    assert check_shards(np.zeros(12), np.zeros(3), 4, "x") == 3
    with pytest.raises(ValueError, match="flat buffer of 4 x the shard"):
        check_shards(np.zeros(13), np.zeros(3), 4, "x")


# -- emulated ranks: the protocol's reference semantics --------------------------------------------
def _rank_values(world: int, n: int, seed: int = 0, dtype=np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(world)]


def _rank_order_sum(values: list[np.ndarray]) -> np.ndarray:
    total = values[0].copy()
    for v in values[1:]:
        total += v
    return total


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_local_ranks_follow_the_protocol(world):
    values = _rank_values(world, 37, dtype=np.float64)
    k = 5

    def job(comm):
        r = comm.rank
        out = {}
        a = values[r].copy()
        comm.allreduce_(a, label="sum")
        out["sum"] = a
        b = np.full(3, float(r))
        comm.bcast_(b, root=world - 1)
        out["bcast"] = b
        flat = np.arange(world * k, dtype=np.float64) * (r + 1)
        shard = np.empty(k)
        comm.reduce_scatter_(flat, shard)
        out["rs"] = shard
        gathered = np.zeros(world * k)
        gathered[r * k:(r + 1) * k] = r + 0.5
        comm.allgather_(gathered[r * k:(r + 1) * k], gathered)
        out["ag"] = gathered
        h = comm.allreduce_async_(values[r].copy())
        assert comm.test(h) in (True, False)
        comm.synchronize(h)
        comm.barrier()
        return out

    results = run_local(world, job)
    scale = world * (world + 1) / 2
    for r, res in enumerate(results):
        np.testing.assert_array_equal(res["sum"], _rank_order_sum(values))
        np.testing.assert_array_equal(res["bcast"], np.full(3, world - 1.0))
        np.testing.assert_array_equal(res["rs"], np.arange(r * k, (r + 1) * k) * scale)
        np.testing.assert_array_equal(res["ag"], np.repeat(np.arange(world) + 0.5, k))


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
@pytest.mark.parametrize("world", [1, 2, 5])
def test_compressed_allreduce_matches_torch_rounding_and_bound(kind, world):
    values = _rank_values(world, 1001, seed=3)
    got = run_local(world, lambda c: _allreduce_copy(c, values[c.rank], kind))
    # Independent reference: torch rounds each rank's values, float32 sums in rank order, the
    # sum is rounded again.
    expect = _torch_round(_rank_order_sum([_torch_round(v, kind) for v in values]), kind)
    for g in got:
        np.testing.assert_array_equal(g, expect)
    np.testing.assert_array_equal(compressed_allreduce_reference(values, kind), expect)
    exact = np.sum(np.array(values, np.float64), axis=0)
    bound = UNIT[kind] * (np.abs(values).astype(np.float64).sum(0) + np.abs(exact)) * 1.001
    assert (np.abs(got[0] - exact) <= bound + 1e-6).all()


def _allreduce_copy(comm, value, compress=None):
    a = value.copy()
    comm.allreduce_(a, label="x", compress=compress)
    return a


def test_compression_needs_float32():
    with pytest.raises(TrainerError, match="compresses float32 gradients"):
        NullComm().allreduce_(np.zeros(3), compress="bf16")
    with pytest.raises(TrainerError, match="'int8' is not one of bf16, fp16"):
        NullComm().allreduce_(np.zeros(3, np.float32), compress="int8")


def test_null_comm_is_the_identity():
    c = NullComm()
    a = np.arange(4.0)
    c.allreduce_(a)
    c.bcast_(a)
    assert c.test(c.allreduce_async_(a))
    out = np.empty(4)
    c.reduce_scatter_(a, out)
    c.allgather_(a, out)
    np.testing.assert_array_equal(out, np.arange(4.0))
    b = np.array([1.001], np.float32)
    c.allreduce_(b, compress="bf16")
    assert b[0] == np.float32(1.0)  # one rank of a compressed job rounds like the others


# -- buckets ---------------------------------------------------------------------------------------
def _layout(sizes: list[int], reverse: bool = False) -> list[tuple[str, int, int]]:
    """(name, offset, size) in production order; reverse: the backward produces the last
    parameter of the flat buffer first."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    entries = [(f"t{i}", int(o), int(s)) for i, (o, s) in enumerate(zip(offsets, sizes,
                                                                         strict=True))]
    return entries[::-1] if reverse else entries


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bucket_mb", [1e-6, 2e-3, 0.01, 100.0])
def test_bucket_plan_partitions_the_buffer(bucket_mb, reverse):
    sizes = [7, 300, 1, 0, 2000, 64, 64, 5000, 3]
    layout = _layout(sizes, reverse)
    buckets = plan_buckets(layout, 4, bucket_mb)
    assert [n for b in buckets for n in b.names] == [n for n, _, _ in layout]
    assert sum(b.hi - b.lo for b in buckets) == sum(sizes)
    cap = bucket_mb * 2**20
    for b in buckets[:-1]:
        assert (b.hi - b.lo) * 4 >= cap  # only the last bucket may be small
        assert b.label == f"gradient bucket {b.index} (first tensor {b.names[0]})"
    if bucket_mb == 100.0:
        assert len(buckets) == 1
    if bucket_mb == 1e-6:  # one tensor per bucket (an empty one joins the next)
        assert len(buckets) == sum(1 for s in sizes if s)


def test_bucket_plan_refuses_a_scattered_layout():
    layout = [("a", 0, 4), ("c", 8, 4), ("b", 4, 4)]
    with pytest.raises(ValueError, match="not contiguous"):
        plan_buckets(layout, 4, 20 / 2**20)  # bucket 0 would hold a and c, without b
    assert len(plan_buckets(layout, 4, 100.0)) == 1  # all three: contiguous again


@pytest.mark.parametrize("compress", [None, "bf16", "fp16"])
@pytest.mark.parametrize("world", [2, 3])
def test_buckets_equal_one_big_allreduce(world, compress):
    sizes = [7, 300, 1, 0, 2000, 64, 64, 5000, 3]
    n = sum(sizes)
    values = _rank_values(world, n + 2, seed=world)
    big = run_local(world, lambda c: _allreduce_copy(c, values[c.rank], compress))
    rng = np.random.default_rng(1)
    for bucket_mb in (1e-6, 2e-3, 100.0):
        for reverse in (False, True):
            layout = _layout(sizes, reverse)
            order = [name for name, _, _ in layout]
            scrambled = list(rng.permutation(order))

            def job(comm, layout=layout, bucket_mb=bucket_mb, ready=scrambled):
                flat = values[comm.rank].copy()
                bk = Buckets(comm, flat, layout, bucket_mb, compress=compress)
                bk.begin(sync=False)  # an accumulation micro-step: nothing moves
                for name in ready:
                    bk.ready(name)
                bk.wait_all()
                np.testing.assert_array_equal(flat, values[comm.rank])
                bk.begin()
                for i, name in enumerate(ready):
                    bk.ready(name)
                    if i % 3 == 0:
                        bk.progress()
                bk.wait_all()
                return flat

            for r, got in enumerate(run_local(world, job)):
                # bit-identical: every element is reduced exactly as in one big all-reduce
                np.testing.assert_array_equal(got[:n], big[0][:n])
                np.testing.assert_array_equal(got[n:], values[r][n:])  # outside the layout


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_buckets_reduce_scatter_each_ranks_shard(world):
    """ZeRO-1 buckets: every rank ends with the sum over ranks of exactly its shard (equal to
    one big all-reduce there, bit for bit) and its own values elsewhere; the buckets are
    reduce-scattered, never all-reduced."""
    sizes = [7, 300, 1, 0, 2000, 64, 64, 5000, 3]
    n = sum(sizes)
    k = padded_size(n, world) // world
    values = _rank_values(world, n, seed=world)
    big = _rank_order_sum(values)
    for bucket_mb in (1e-6, 2e-3, 100.0):
        for reverse in (False, True):
            layout = _layout(sizes, reverse)

            def job(comm, layout=layout, bucket_mb=bucket_mb):
                flat = values[comm.rank].copy()
                out = np.full(k, np.nan, np.float32)
                calls = []
                comm.allreduce_async_ = lambda *a, **kw: calls.append("allreduce")
                bk = Buckets(comm, flat, layout, bucket_mb, shards=(out, k))
                bk.begin()
                for name, _, _ in layout:
                    bk.ready(name)
                    bk.progress()
                bk.wait_all()
                assert calls == []
                return flat, out

            for r, (flat, out) in enumerate(run_local(world, job)):
                lo, hi = r * k, min(n, (r + 1) * k)
                np.testing.assert_array_equal(out[:hi - lo], big[lo:hi])
                assert np.isnan(out[hi - lo:]).all()  # the padding is never written
                np.testing.assert_array_equal(flat, values[r])


class _Recorder:
    """A one-rank communicator that records what starts, in order."""

    rank, size = 0, 1

    def __init__(self):
        self.started: list[tuple[str, int]] = []

    def allreduce_async_(self, buf, label="allreduce", compress=None):
        self.started.append((label, buf.size))
        return len(self.started)

    def test(self, handle):
        return True

    def synchronize(self, handle):
        pass


@pytest.mark.parametrize("overlap", [True, False])
def test_buckets_start_in_index_order_when_their_last_tensor_is_ready(overlap):
    comm = _Recorder()
    layout = _layout([4, 4, 4, 4])
    bk = Buckets(comm, np.zeros(18, np.float32), layout, bucket_mb=64 / 2**20,
                 overlap=overlap)
    assert [b.names for b in bk.buckets] == [("t0", "t1", "t2", "t3")]
    bk = Buckets(comm, np.zeros(18, np.float32), layout, bucket_mb=32 / 2**20, overlap=overlap)
    assert [b.names for b in bk.buckets] == [("t0", "t1"), ("t2", "t3")]
    bk.begin()
    bk.ready("t3")
    bk.ready("t2")  # bucket 1 complete, but bucket 0 must start first
    assert comm.started == []
    bk.ready("t0")
    bk.ready("t1")
    expect = [("gradient bucket 0 (first tensor t0)", 8),
              ("gradient bucket 1 (first tensor t2)", 8)]
    assert comm.started == (expect if overlap else [])
    bk.wait_all()
    assert comm.started == expect
    assert all(t is not None for t in bk.done_at)


# -- the watchdog without MPI ---------------------------------------------------------------------
def test_ranks_text():
    assert ranks_text([3]) == "rank 3"
    assert ranks_text([0, 1, 2, 5, 7, 8]) == "ranks 0-2, 5, 7-8"


def test_watchdog_times_out_and_names_the_collective():
    wd = Watchdog(None, 0, 1, timeout_s=0.3)
    wd.enter(0, "gradient bucket 3 (first tensor fc1.weight)")
    start = time.monotonic()
    with pytest.raises(CollectiveTimeout, match=r"collective #0 'gradient bucket 3 \(first "
                                                r"tensor fc1.weight\)' did not complete within "
                                                r"0.3 s"):
        wd.wait(0, "gradient bucket 3 (first tensor fc1.weight)", lambda: False)
    assert time.monotonic() - start < 5
    with pytest.raises(CollectiveError, match="did not complete"):  # broken: fails fast
        wd.enter(1, "next")


def test_watchdog_message_names_missing_and_lagging_ranks():
    wd = Watchdog(None, 0, 4, timeout_s=5)
    wd.enter(41, "loss")
    wd.enter(42, "gradient bucket 0 (first tensor w)")
    wd.last_seen = [-1, 42, 41, -1]
    msg = wd.message(42, "gradient bucket 0 (first tensor w)", present=[0, 1])
    assert "ranks 2-3 did not arrive" in msg
    assert "rank 2 is still in collective #41 'loss'" in msg
    assert "ranks 0-1 waited in it" in msg
    assert "distributed.timeout_s" in msg
    assert "every rank entered it" in wd.message(42, "x", present=[0, 1, 2, 3])


def test_pinned_pool_reuses_buffers_per_size():
    calls = []

    def alloc(nbytes):
        calls.append(nbytes)
        return bytearray(nbytes)
    pool = PinnedPool(alloc)
    a = pool.acquire(np.float32, (4, 2))
    b = pool.acquire(np.float32, (8,))  # the same size while a is in use: a second buffer
    assert a.shape == (4, 2) and b.dtype == np.float32 and calls == [32, 32]
    pool.release(a)
    c = pool.acquire(np.int64, (4,))
    assert calls == [32, 32] and np.shares_memory(c.view(np.uint8), a.view(np.uint8))


# -- backend choice and NCCL helpers (no GPU needed) -----------------------------------------------
def test_get_communicator_choices(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(get_communicator("auto"), NullComm)
    with pytest.raises(TrainerError, match="nccl is not available on the CPU"):
        get_communicator("nccl", device="cpu")
    with pytest.raises(TrainerError, match="'gloo' is not one of auto, mpi, nccl"):
        get_communicator("gloo")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    assert launched_world_size() == 16  # an srun step announces its size
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_world_size() == 4


def test_nccl_unique_id_survives_the_broadcast_in_both_cupy_forms():
    raw = bytes(range(256))[::2]  # 128 bytes, values above 127 included
    arr = uid_to_array(raw)
    assert arr.dtype == np.uint8 and arr.tobytes() == raw
    as_chars = tuple(int(v) for v in np.frombuffer(raw, np.int8))  # CuPy < 14: C chars
    np.testing.assert_array_equal(uid_to_array(as_chars), arr)

    made = []

    class New:  # CuPy >= 14 takes bytes
        def NcclCommunicator(self, n, uid, rank):
            if not isinstance(uid, bytes):
                raise TypeError("bytes expected")
            made.append(uid)
            return "comm"

    class Old:  # CuPy < 14 takes a tuple
        def NcclCommunicator(self, n, uid, rank):
            if not isinstance(uid, tuple):
                raise TypeError("tuple expected")
            made.append(uid)
            return "comm"
    assert make_nccl_comm(New(), 2, arr, 0) == make_nccl_comm(Old(), 2, arr, 1) == "comm"
    assert made == [raw, as_chars]


def test_ranks_that_share_a_gpu_are_named_by_its_bus_id():
    from trainer.comm.nccl import shared_gpus, sharing_text
    assert shared_gpus(["0000:18:00.0", "0000:19:00.0"]) == {}
    assert shared_gpus([]) == {}
    assert shared_gpus(["", ""]) == {}  # (GPUs the runtime could not name)
    shared = shared_gpus(["0000:18:00.0", "0000:19:00.0", "0000:18:00.0", "0000:18:00.0",
                          "0000:19:00.0", "0000:1A:00.0"])
    assert shared == {"0000:18:00.0": [0, 2, 3], "0000:19:00.0": [1, 4]}
    assert sharing_text(shared, "node7") == ("local ranks 0, 2 and 3 on node7 share GPU "
                                             "0000:18:00.0; local ranks 1 and 4 on node7 share "
                                             "GPU 0000:19:00.0")


def test_nccl_types():
    fake = types.SimpleNamespace(NCCL_FLOAT32=7, NCCL_FLOAT16=6, NCCL_FLOAT64=8, NCCL_INT64=4,
                                 NCCL_UINT8=1)
    assert nccl_type(fake, np.float32) == 7
    assert nccl_type(fake, np.uint16) == 6  # compressed payloads are moved as 16-bit words
    assert nccl_type(fake, np.int64) == 4
    with pytest.raises(ValueError, match="NCCL cannot move complex128"):
        nccl_type(fake, np.complex128)


# -- launch.sh: what it hands to mpirun / srun (fakes print their arguments) -----------------------
FAKE = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "mpirun (Open MPI) 5.0.0"; exit 0; fi
echo "$(basename "$0") $*"
"""


def _launch_args(tmp_path, *args: str, slurm: bool = False,
                 env_extra: dict | None = None) -> tuple[int, str, str]:
    fakes = tmp_path / "fakes"
    fakes.mkdir(exist_ok=True)
    for name in ("mpirun", "srun"):
        (fakes / name).write_text(FAKE)
        (fakes / name).chmod(0o755)
    (tmp_path / "x.yaml").write_text("model: m.onnx\n")
    (tmp_path / "prog.py").write_text("print(1)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fakes}:{os.environ['PATH']}", PYTHON=sys.executable)
    if slurm:
        env["SLURM_JOB_ID"] = "42"
    env.update(env_extra or {})
    proc = subprocess.run([str(ROOT / "launch.sh"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=30)
    return proc.returncode, proc.stdout.strip(), proc.stderr


def test_launch_passes_options_through(tmp_path):
    py = sys.executable
    rc, out, _ = _launch_args(tmp_path, "-np", "2", "--mca", "btl", "tcp,self", "x.yaml",
                              "--set", "steps=3")
    assert rc == 0
    assert out.endswith(f"-np 2 --mca btl tcp,self {py} -m trainer train x.yaml --set steps=3")
    assert out.startswith("mpirun ") and "--prefix" not in out
    # (an option's value ending in .yaml or .py is not the config: it was taken as it)
    rc, out, _ = _launch_args(tmp_path, "-np", "2", "-x", "CFG=a.yaml", "--mca",
                              "orte_tmpdir_base", "/tmp/y.py", "x.yaml")
    assert rc == 0 and out.endswith(
        f"-np 2 -x CFG=a.yaml --mca orte_tmpdir_base /tmp/y.py {py} -m trainer train x.yaml"), out


def test_launch_multi_node_uses_the_same_open_mpi_on_every_node(tmp_path):
    rc, out, _ = _launch_args(tmp_path, "-np", "64", "--hostfile", "hosts", "x.yaml")
    assert rc == 0 and "--hostfile hosts" in out
    assert f"--prefix {tmp_path.resolve()} " in out  # the installation that holds mpirun
    assert "--oversubscribe" not in out  # slots in the hostfile decide, not this machine's cores
    rc, out, _ = _launch_args(tmp_path, "-np", "2", "--host", "a,b", "--prefix", "/opt/ompi",
                              "x.yaml")
    assert out.count("--prefix") == 1 and "--prefix /opt/ompi" in out
    # (the forms with '=': a hostfile that was not seen as several nodes, a second --prefix)
    rc, out, _ = _launch_args(tmp_path, "-np", "4", "--hostfile=hosts", "x.yaml")
    assert rc == 0 and f"--prefix {tmp_path.resolve()} " in out
    rc, out, _ = _launch_args(tmp_path, "-np", "2", "--host=a,b", "--prefix=/opt/ompi", "x.yaml")
    assert out.count("--prefix") == 1 and "--prefix=/opt/ompi" in out


def test_launch_inside_slurm_uses_srun(tmp_path):
    rc, out, _ = _launch_args(tmp_path, "--mpi=pmix", "x.yaml", "--resume", slurm=True)
    assert rc == 0
    assert out == f"srun --mpi=pmix {sys.executable} -m trainer train x.yaml --resume"
    rc, out, _ = _launch_args(tmp_path, "-np", "4", "x.yaml", slurm=True)  # -np: mpirun
    assert out.startswith("mpirun ") and "-np 4" in out


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py")
def test_srun_tasks_that_mpi_sees_as_worlds_of_one_are_refused(tmp_path):
    """srun without Slurm's PMI (no --mpi=pmix where the cluster needs it): every task is an MPI
    world of one, and each trained the whole job alone, silently, writing the same output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    env.update(SLURM_JOB_ID="42", SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", str(ROOT / "configs" /
                                                                          "digits_mlp.yaml"),
                           "--set", f"output={tmp_path / 'm.onnx'}"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("onnx-trainer: rank 1: error: srun started 2 processes, but "
                                  "MPI sees this one as a world of one process"), proc.stderr
    assert "srun --mpi=pmix" in proc.stderr and "Sorry" not in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_launch_programs_and_selftest(tmp_path):
    rc, out, _ = _launch_args(tmp_path, "-np", "2", "prog.py", "--flag")
    assert out.endswith(f"-np 2 {sys.executable} prog.py --flag")
    rc, out, _ = _launch_args(tmp_path, "-np", "2", "--selftest", "--mb", "4")
    assert out.endswith(f"-np 2 {sys.executable} -m trainer.comm --mb 4")
    rc, _, err = _launch_args(tmp_path, "-np", "2", "missing.yaml")
    assert rc == 2 and "config not found: missing.yaml" in err
    rc, _, err = _launch_args(tmp_path, "-np", "2")
    assert rc == 2 and "launch.sh -np 4 configs/x.yaml" in err  # the usage


def test_launch_oversubscribes_by_the_cores_not_omp_num_threads(tmp_path):
    """GNU nproc follows OMP_NUM_THREADS: with it at 64, more ranks than cores got no
    --oversubscribe, and Open MPI refused "not enough slots"."""
    cores = len(os.sched_getaffinity(0))
    for env in ({}, {"OMP_NUM_THREADS": "64"}, {"OMP_THREAD_LIMIT": "64"}):
        rc, out, _ = _launch_args(tmp_path, "-np", str(cores + 1), "x.yaml", env_extra=env)
        assert rc == 0 and "--oversubscribe" in out, (env, out)
        rc, out, _ = _launch_args(tmp_path, "-np", str(cores), "x.yaml", env_extra=env)
        assert rc == 0 and "--oversubscribe" not in out, (env, out)


def test_launch_takes_the_process_count_written_with_an_equals_sign(tmp_path):
    """(--np=2 was passed through after the -np 1 launch.sh adds without a count: one rank)"""
    for arg in ("--np=2", "-np=2", "-n=2"):
        rc, out, _ = _launch_args(tmp_path, arg, "x.yaml")
        assert rc == 0 and "-np 2 " in out and "-np 1" not in out and "=2" not in out, out


@pytest.mark.parametrize("np_", ["abc", "0", "-1", "2x", ""])
def test_launch_refuses_a_process_count_that_is_no_number(tmp_path, np_):
    """(-np abc printed a shell error, then mpirun started a rank per core, exit status 0)"""
    rc, out, err = _launch_args(tmp_path, "-np", np_, "x.yaml")
    assert rc == 2 and out == "" and f"-np takes a positive whole number of processes, got " \
        f"'{np_}'" in err


# -- under mpirun ----------------------------------------------------------------------------------
MPIRUN = shutil.which("mpirun")
needs_mpi = [pytest.mark.mpi,
             pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed "
                                                       "(pip install '.[mpi]')")]


def _mpirun(world: int, *args: str, timeout: float = 120, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [MPIRUN, "--oversubscribe", "-np", str(world)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    proc = run_mpi(cmd + [sys.executable, str(Path(__file__)), *args], timeout=timeout, env=env,
                   cwd=ROOT)
    return proc, proc.seconds


@needs_mpi[0]
@needs_mpi[1]
@pytest.mark.parametrize("world", [2, 4])
def test_mpi_protocol_and_buckets(world):
    """All collectives (also on staged device arrays) and Buckets, under mpirun."""
    proc, _ = _mpirun(world, "protocol")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("protocol ok") == world


@needs_mpi[0]
@needs_mpi[1]
@pytest.mark.parametrize("how,world", [("stop", 4), ("sleep", 2), ("kill", 2)])
def test_a_stalled_or_dead_rank_ends_the_job(tmp_path, how, world):
    """Rank 1 stops answering (SIGSTOP itself, or sleeps outside any collective) or is
    SIGKILLed before collective #3: the job ends within 30 s; a stall is reported once, naming
    rank 1 and the collective's label."""
    pids = tmp_path / "pids"
    proc, took = _mpirun(world, "stall", how, str(pids), timeout=60)
    assert proc.returncode != 0
    assert took < 30, took
    if how != "kill":
        lines = [ln for ln in proc.stderr.splitlines() if "did not complete within" in ln]
        assert len(lines) == 1, proc.stderr[-3000:]
        assert "collective #3 'gradient bucket 1 (first tensor fc1.weight)'" in lines[0]
        assert "rank 1 did not arrive" in lines[0]
        assert "Traceback" not in proc.stderr
    # No rank outlives the job (a stopped one included).
    time.sleep(0.5)
    for pid in pids.read_text().split():
        state = _proc_state(int(pid))
        assert state in (None, "Z"), (pid, state)


@needs_mpi[0]
@needs_mpi[1]
def test_a_rank_that_never_starts_mpi_ends_the_job(tmp_path):
    """MPI_Init waits for every rank in C, holding Python's lock: a rank that never started
    left the others there forever, whatever distributed.timeout_s. After it, the waiting rank
    ends (saying where it waited) and the launcher ends the job."""
    pids = tmp_path / "pids"
    proc, took = _mpirun(2, "stall", "start", str(pids), timeout=60)
    assert proc.returncode != 0 and took < 30, took
    assert "Timeout (0:00:02)!" in proc.stderr, proc.stderr[-3000:]
    assert "_mpi_start_waits_for_every_rank" in proc.stderr
    time.sleep(0.5)
    for pid in pids.read_text().split():
        assert _proc_state(int(pid)) in (None, "Z"), pid


def _proc_state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next(ln.split()[1] for ln in text.splitlines() if ln.startswith("State:"))


# -- on a GPU --------------------------------------------------------------------------------------
def _cupy():
    from trainer.backend import cupy_or_none
    return cupy_or_none()


@pytest.mark.gpu
@pytest.mark.skipif(_cupy() is None, reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("backend", ["nccl", "mpi"])
def test_gpu_communicators_one_rank(backend):
    """In this process (an MPI singleton): the protocol on CuPy arrays, NCCL and staged MPI."""
    from trainer.comm.nccl import nccl_available
    if backend == "nccl" and not nccl_available():
        pytest.skip("CuPy has no NCCL")
    _check_protocol(get_communicator(backend, timeout_s=60, device="gpu"), _cupy())


@pytest.mark.gpu
@pytest.mark.skipif(_cupy() is None or MPIRUN is None, reason="needs CuPy, a GPU and mpirun")
@pytest.mark.parametrize("backend", ["mpi", "nccl"])
def test_gpu_communicators_under_mpirun(backend):
    """mpi: two ranks share the GPU (staged through pinned memory unless MPI is CUDA-aware);
    nccl: as many ranks as there are GPUs (at least 2)."""
    cp = _cupy()
    world = 2 if backend == "mpi" else cp.cuda.runtime.getDeviceCount()
    if world < 2:
        pytest.skip("NCCL between ranks needs 2 GPUs; this machine has 1")
    proc, _ = _mpirun(world, "gpu", backend, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("protocol ok") == world


# -- workers (run under mpirun) --------------------------------------------------------------------
class FakeDeviceArray:
    """A stand-in for a CuPy array (host memory behind get/set), to drive the staging path."""

    def __init__(self, a: np.ndarray):
        self.a = a
        self.dtype, self.shape, self.size = a.dtype, a.shape, a.size

    def get(self, out=None, stream=None, blocking=True):
        out[...] = self.a
        return out

    def set(self, arr, stream=None):
        self.a[...] = arr


class AsyncDeviceArray(FakeDeviceArray):
    """CuPy's set() from pinned memory: queued on the stream, read at its next synchronize."""

    pending: list = []

    def get(self, out=None, stream=None, blocking=True):
        AsyncDeviceArray.flush()  # (a blocking copy after the stream's work)
        return super().get(out)

    def set(self, arr, stream=None):
        AsyncDeviceArray.pending.append((self.a, arr))

    @staticmethod
    def flush():
        for target, source in AsyncDeviceArray.pending:
            target[...] = source
        AsyncDeviceArray.pending.clear()


AsyncDeviceArray.__module__ = "cupy._core.stand_in"  # (the staging path syncs CuPy's arrays)


def _check_protocol(comm, xp=np) -> None:
    """Every collective against references every rank computes for itself."""
    p, r = comm.size, comm.rank
    n = 1003
    values = _rank_values(p, n, seed=11)
    to_host = (lambda a: a.get()) if xp is not np else (lambda a: a)

    a = xp.array(values[r])
    comm.allreduce_(a, label="plain")
    exact = np.sum(np.array(values, np.float64), axis=0)
    np.testing.assert_allclose(to_host(a), exact, rtol=1e-5, atol=1e-5)
    _same_on_every_rank(comm, to_host(a))

    for kind in ("bf16", "fp16"):
        a = xp.array(values[r])
        comm.allreduce_(a, label=kind, compress=kind)
        np.testing.assert_array_equal(to_host(a), compressed_allreduce_reference(values, kind))

    # Many async collectives, compressed (two MPI steps) and plain, synchronized in an order
    # that differs between ranks: each must still get its own result.
    kinds = [None, "bf16", None, "fp16", "bf16", None]
    bufs = [xp.asarray(values[r] * (i + 1)) for i in range(len(kinds))]
    handles = [comm.allreduce_async_(b, label=f"async {i}", compress=k)
               for i, (b, k) in enumerate(zip(bufs, kinds, strict=True))]
    order = np.random.default_rng(r).permutation(len(handles))
    comm.test(handles[order[0]])
    for i in order:
        comm.synchronize(handles[i])
    for i, (b, k) in enumerate(zip(bufs, kinds, strict=True)):
        scaled = [v * (i + 1) for v in values]
        if k is None:
            np.testing.assert_allclose(to_host(b), exact * (i + 1), rtol=1e-5, atol=1e-4)
        else:
            np.testing.assert_array_equal(to_host(b), compressed_allreduce_reference(scaled, k))

    b = xp.full(5, float(r))
    comm.bcast_(b, root=p - 1)
    np.testing.assert_array_equal(to_host(b), np.full(5, p - 1.0))
    k = 6
    flat = xp.asarray(np.arange(p * k, dtype=np.float64) * (r + 1))
    shard = xp.empty(k)
    comm.reduce_scatter_(flat, shard)
    np.testing.assert_array_equal(to_host(shard), np.arange(r * k, (r + 1) * k) * p * (p + 1) / 2)
    counts = [(3 * j) % 5 for j in range(p)]  # unequal parts, rank 0's empty
    lo = sum(counts[:r])
    part = xp.full(counts[r], -1.0)
    h = comm.reduce_scatter_async_(xp.asarray(np.arange(sum(counts), dtype=np.float64) * (r + 1)),
                                   part, counts, label="uneven reduce-scatter")
    comm.synchronize(h)
    np.testing.assert_array_equal(to_host(part), np.arange(lo, lo + counts[r]) * p * (p + 1) / 2)
    out = xp.zeros(p * k)
    out[r * k:(r + 1) * k] = r
    comm.allgather_(out[r * k:(r + 1) * k], out)  # in place
    np.testing.assert_array_equal(to_host(out), np.repeat(np.arange(p, dtype=np.float64), k))
    out2 = xp.zeros(p * k)
    comm.allgather_(xp.full(k, r + 0.5), out2)
    np.testing.assert_array_equal(to_host(out2), np.repeat(np.arange(p) + 0.5, k))
    comm.barrier()


def _same_on_every_rank(comm, a: np.ndarray) -> None:
    everyone = np.zeros(comm.size * a.size, a.dtype)
    comm.allgather_(np.ascontiguousarray(a).reshape(-1), everyone)
    for row in everyone.reshape(comm.size, -1):
        np.testing.assert_array_equal(row, a.reshape(-1))


def _worker_protocol() -> None:
    from trainer.comm.mpi import MPIComm, cuda_aware_mpi

    comm = MPIComm(timeout_s=60)
    assert cuda_aware_mpi(comm.MPI) is False  # this Open MPI is built without CUDA
    _check_protocol(comm)

    # The staging path of device arrays, with host memory standing in for the GPU's.
    comm._cuda_aware = False
    comm.pinned = PinnedPool(bytearray)
    p, r = comm.size, comm.rank
    values = _rank_values(p, 257, seed=5)
    dev = FakeDeviceArray(values[r].copy())
    comm.allreduce_(dev, label="staged")
    np.testing.assert_allclose(dev.a, np.sum(values, axis=0), rtol=1e-5, atol=1e-5)
    dev = FakeDeviceArray(values[r].copy())
    comm.synchronize(comm.allreduce_async_(dev, label="staged bf16", compress="bf16"))
    np.testing.assert_array_equal(dev.a, compressed_allreduce_reference(values, "bf16"))
    out = FakeDeviceArray(np.zeros(257 // p))
    comm.reduce_scatter_(FakeDeviceArray(values[r][:257 // p * p].astype(np.float64)), out)
    part = np.sum(np.array(values, np.float64)[:, :257 // p * p], axis=0)
    np.testing.assert_allclose(out.a, part[r * (257 // p):(r + 1) * (257 // p)], rtol=1e-12)
    assert sum(len(v) for v in comm.pinned._free.values()) >= 2  # released for reuse
    # A staged buffer goes back to the pool once set() has read it: set is asynchronous on
    # CuPy's stream, and the next same-sized collective that does not copy in (a broadcast's
    # receiving rank) wrote the pooled buffer first (BatchNorm's running_mean received the
    # running_var broadcast after it; found by a distributed audit).
    import trainer.backend as backend

    stream = type("Stream", (), {"synchronize": lambda self: AsyncDeviceArray.flush()})()
    cuda = type("Cuda", (), {"get_current_stream": lambda self: stream})()
    real, backend.cupy_module = backend.cupy_module, lambda: type("CuPy", (), {"cuda": cuda})
    try:
        mean = AsyncDeviceArray(np.full(5, 0.5 if r == 0 else -1.0, np.float32))
        var = AsyncDeviceArray(np.full(5, 2.0 if r == 0 else -1.0, np.float32))
        comm.bcast_(mean, label="running_mean")
        comm.bcast_(var, label="running_var")
        AsyncDeviceArray.flush()
        np.testing.assert_array_equal(mean.a, 0.5)
        np.testing.assert_array_equal(var.a, 2.0)
    finally:
        backend.cupy_module = real

    # Buckets under MPI equal one big all-reduce: bit for bit with 2 ranks (a sum of two is
    # commutative), to float32 rounding with more (the ring's order depends on the slices).
    sizes = [7, 300, 1, 0, 2000, 64, 64, 5000, 3]
    total = sum(sizes)
    grads = _rank_values(p, total, seed=9)
    for compress in (None, "bf16"):
        big = grads[r].copy()
        comm.allreduce_(big, label="one big", compress=compress)
        for bucket_mb in (1e-6, 2e-3, 100.0):
            flat = grads[r].copy()
            bk = Buckets(comm, flat, _layout(sizes, reverse=True), bucket_mb, compress=compress)
            bk.begin()
            for name, _, _ in _layout(sizes, reverse=True):
                bk.ready(name)
                bk.progress()
            bk.wait_all()
            _same_on_every_rank(comm, flat)
            if compress is not None or p == 2:
                np.testing.assert_array_equal(flat, big)
            else:
                np.testing.assert_allclose(flat, big, rtol=1e-6, atol=1e-6)
    print(f"rank {r}: protocol ok", flush=True)


def _worker_stall(how: str, pidfile: str) -> None:
    from trainer.comm.mpi import MPIComm

    if how == "start":  # (rank 1 never starts MPI: its peers wait in MPI_Init)
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
        if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
            time.sleep(3600)
    comm = MPIComm(timeout_s=2)
    with open(pidfile, "a") as f:
        f.write(f"{os.getpid()}\n")
    a = np.ones(1000, np.float32)
    try:
        for step in range(3):
            comm.allreduce_(a, label="loss")
            if step == 1 and comm.rank == 1:
                if how == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                elif how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                else:
                    time.sleep(3600)
            h = comm.allreduce_async_(a, label=f"gradient bucket {step} (first tensor "
                                      "fc1.weight)")
            comm.synchronize(h)
    except TrainerError as exc:  # what the CLI does: one line, then end every rank
        if comm.rank != 0:
            time.sleep(1.0)
        print(f"onnx-trainer: error: {exc}", file=sys.stderr, flush=True)
        comm.abort(2)
    print("finished", flush=True)


def _worker_gpu(backend: str) -> None:
    cp = _cupy()
    comm = get_communicator(backend, timeout_s=60, device="gpu")
    if backend == "mpi":
        cp.cuda.Device(0).use()
    _check_protocol(comm, cp)
    print(f"rank {comm.rank}: protocol ok", flush=True)


if __name__ == "__main__":
    worker, *worker_args = sys.argv[1:]
    {"protocol": _worker_protocol, "stall": _worker_stall, "gpu": _worker_gpu}[worker](
        *worker_args)


def test_a_launcher_that_failed_to_start_is_started_again(tmp_path):
    """The test harness's run_mpi retries only a launcher-start failure, never a job's failure."""
    count = tmp_path / "count"
    fake = tmp_path / "fake_mpirun"
    fake.write_text(f"""#!/bin/sh
n=$(cat {count} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {count}
if [ "$1" = startfail ] && [ $n -lt 3 ]; then
  echo "The PMIx server's listener thread failed to start. We cannot" >&2; exit 1
fi
echo "ran $n"; exit ${{2:-0}}
""")
    fake.chmod(0o755)
    proc = run_mpi([str(fake), "startfail"], timeout=30)
    assert proc.returncode == 0 and proc.stdout == "ran 3\n"
    count.unlink()
    proc = run_mpi([str(fake), "job", "3"], timeout=30)  # a failing job is not run twice
    assert proc.returncode == 3 and count.read_text() == "1\n"


def test_selftest_over_nccl_moves_device_arrays(monkeypatch, capsys):
    """`--selftest --backend nccl` all-reduced NumPy arrays, which go over MPI, and printed the
    NCCL communicator's name beside MPI's bandwidth (found by a distributed audit): the
    arrays come from the communicator's CuPy."""
    import types

    import trainer.comm as comm_mod
    from trainer.comm.__main__ import main

    made = []
    fake_cupy = types.SimpleNamespace(
        full=lambda *a, **k: made.append("full") or np.full(*a, **k),
        ones=lambda *a, **k: made.append("ones") or np.ones(*a, **k))

    class FakeNCCL:
        cupy, size, rank = fake_cupy, 1, 0
        seen: list = []

        def allgather_(self, a, out, label=""):
            out[...] = a

        def allreduce_(self, a, label=""):
            FakeNCCL.seen.append(label)

        def barrier(self):
            pass

    monkeypatch.setattr(comm_mod, "get_communicator", lambda *a, **k: FakeNCCL())
    assert main(["--backend", "nccl", "--mb", "0.01"]) == 0
    assert made == ["full", "ones"] and "FakeNCCL" in capsys.readouterr().out
