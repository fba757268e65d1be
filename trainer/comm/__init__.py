"""Communicators: null (one process), MPI (mpi4py), NCCL (cupy.cuda.nccl over an MPI bootstrap);
chosen from the environment and config. `python -m trainer.comm` checks a launch end to end."""

from __future__ import annotations

import os

from trainer.comm.base import CollectiveError, CollectiveTimeout, Communicator, padded_size
from trainer.comm.null import NullComm
from trainer.errors import TrainerError

# mpirun (Open MPI, MPICH/Hydra, PMIx) and srun announce the job in the environment.
_WORLD_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS",
               "SLURM_STEP_NUM_TASKS")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def _first_int(names: tuple[str, ...], default: int) -> int:
    for var in names:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return default


def launched_world_size() -> int:
    """World size announced by mpirun/srun in the environment (1 when not launched)."""
    size = _first_int(_WORLD_VARS[:3], 0)
    if size:
        return size
    if "SLURM_PROCID" in os.environ:  # a task of an srun step (not the batch script itself)
        return _first_int(_WORLD_VARS[4:], 1)
    return 1


def launched() -> bool:
    """Whether mpirun or srun started this process (a world of one included)."""
    return _first_int(_WORLD_VARS[:3], 0) > 0 or "SLURM_PROCID" in os.environ


def launched_rank() -> int:
    """This process's rank as announced by mpirun/srun (0 when not launched)."""
    return _first_int(_RANK_VARS, 0)


def launched_local_rank() -> int:
    """This process's rank among the ranks of its node (pick GPU local_rank % device count)."""
    return _first_int(_LOCAL_RANK_VARS, 0)


def abort_world(code: int = 1) -> None:
    """End every process of an MPI job now (MPI_Abort), initializing MPI if it is not yet."""
    import sys

    sys.stderr.flush()
    sys.stdout.flush()
    try:
        from mpi4py import MPI
    except ImportError:  # without mpi4py there is no job to end beyond this process
        raise SystemExit(code) from None
    if MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() == 1:
        raise SystemExit(code)  # (srun tasks without PMI: each is a world of its own)
    MPI.COMM_WORLD.Abort(code)


def get_communicator(backend: str = "auto", timeout_s: float = 300.0,
                     device: str = "cpu") -> Communicator:
    """The communicator for distributed.backend on `device` ('cpu' or 'gpu', the resolved one):
    auto is NCCL for GPU ranks when CuPy has NCCL and each rank of a node has its own GPU, else
    MPI under mpirun/srun, else NullComm; 'mpi' and 'nccl' insist (also on one rank)."""
    if backend not in ("auto", "mpi", "nccl"):
        raise TrainerError(f"distributed.backend: '{backend}' is not one of auto, mpi, nccl")
    if backend == "nccl" and device != "gpu":
        raise TrainerError("distributed.backend: nccl is not available on the CPU (NCCL moves GPU "
                           "memory); set device: gpu, or distributed.backend: mpi (or auto)")
    if backend == "auto" and launched_world_size() <= 1:
        return NullComm()
    from trainer.comm.mpi import MPIComm

    mpi = MPIComm(timeout_s)
    announced = launched_world_size()
    if mpi.size == 1 and announced > 1:
        how = ("srun started" if "SLURM_PROCID" in os.environ and not
               _first_int(_WORLD_VARS[:3], 0) else "the launcher announced")
        raise TrainerError(
            f"{how} {announced} processes, but MPI sees this one as a world of one process (each "
            "would train alone and write the same output): under srun, MPI needs Slurm's PMI "
            "(srun --mpi=pmix, or pmi2; `srun --mpi=list` names what the cluster has), or start "
            "the job with mpirun (launch.sh -np N)")
    if backend == "nccl":
        from trainer.comm.nccl import NCCLComm
        return NCCLComm(timeout_s, mpi=mpi)
    if backend == "auto" and mpi.size <= 1:
        return NullComm()
    if backend == "auto" and device == "gpu":
        import numpy as np

        from trainer.backend import cupy_module, select_device
        from trainer.comm.nccl import NCCLComm, nccl_available, node_gpu_sharing
        cupy = cupy_module()
        select_device(cupy)  # (what get_xp chose)
        # NCCL where it is there and no two ranks of a node share a GPU (collective: every rank)
        ok = not node_gpu_sharing(mpi, cupy) and nccl_available()
        votes = np.array([1.0 if ok else 0.0])
        mpi.allreduce_(votes, label="choose NCCL or MPI")  # every rank decides the same
        if votes[0] == mpi.size:
            return NCCLComm(timeout_s, mpi=mpi)
    return mpi


__all__ = ["CollectiveError", "CollectiveTimeout", "Communicator", "NullComm", "abort_world",
           "get_communicator", "launched_local_rank", "launched_rank", "launched_world_size",
           "padded_size"]
