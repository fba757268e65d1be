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


def get_communicator(backend: str = "auto") -> Communicator:
    """NullComm for a single process; MPIComm under mpirun or when backend asks for MPI."""
    if backend in ("mpi", "nccl") or launched_world_size() > 1:
        from trainer.comm.mpi import MPIComm
        comm = MPIComm()
        if comm.size > 1 or backend in ("mpi", "nccl"):
            return comm
    return NullComm()


__all__ = ["Communicator", "NullComm", "get_communicator", "launched_world_size"]
