"""Run a command under mpirun, starting it again when the launcher itself failed to start.

Open MPI's launcher (PRRTE with its PMIx server) occasionally fails to start on a loaded machine
("The PMIx server's listener thread failed to start"), before any rank runs. That is a fault of
the machine the tests run on, not of the engine, so such a start is tried again (at most three
times). Any other failure, of a rank or of the job, is returned at once.
"""
from __future__ import annotations

import subprocess
import time

# Printed by the launcher when it could not start its own servers or daemons (no rank has run).
LAUNCHER_START_FAILURES = (
    "PMIx server's listener thread failed to start",
    "unable to reliably start one or more daemons",
)
ATTEMPTS = 3


def launcher_failed_to_start(proc: subprocess.CompletedProcess) -> bool:
    text = (proc.stdout or "") + (proc.stderr or "")
    return proc.returncode != 0 and any(s in text for s in LAUNCHER_START_FAILURES)


def run_mpi(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, ...) with launcher-start retries.
    `proc.seconds` is the wall time of the attempt returned."""
    for _ in range(ATTEMPTS):
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
        proc.seconds = time.monotonic() - start
        if not launcher_failed_to_start(proc):
            break
        time.sleep(1.0)
    return proc
