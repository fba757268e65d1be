"""Communicators: null (one process), MPI (mpi4py); chosen from the environment and config."""

from __future__ import annotations

import os

from trainer.comm.base import Communicator
from trainer.comm.null import NullComm

_WORLD_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS",
               "SLURM_NTASKS")


def launched_world_size() -> int:
    """World size announced by mpirun/srun in the environment (1 when not launched)."""
    for var in _WORLD_VARS[:3]:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def launched_rank() -> int:
    """This process's rank as announced by mpirun/srun (0 when not launched)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def abort_world(code: int = 1) -> None:
    """End every process of an MPI job now (MPI_Abort), initializing MPI if it is not yet."""
    import sys

    sys.stderr.flush()
    sys.stdout.flush()
    try:
        from mpi4py import MPI
    except ImportError:  # without mpi4py there is no job to end beyond this process
        raise SystemExit(code) from None
    MPI.COMM_WORLD.Abort(code)


def get_communicator(backend: str = "auto") -> Communicator:
    """NullComm for a single process; MPIComm under mpirun or when backend asks for MPI."""
    if backend in ("mpi", "nccl") or launched_world_size() > 1:
        from trainer.comm.mpi import MPIComm
        comm = MPIComm()
        if comm.size > 1 or backend in ("mpi", "nccl"):
            return comm
    return NullComm()


__all__ = ["Communicator", "NullComm", "abort_world", "get_communicator", "launched_rank",
           "launched_world_size"]
