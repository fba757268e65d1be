"""Data parallelism under mpirun: N processes give the weights of 1; failures end the job."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from tests.conftest import ROOT
from trainer.config import config_from_dict
from trainer.train import Trainer

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(shutil.which("mpirun") is None,
                                 reason="mpirun not installed (pip install '.[mpi]')")]


def _launch(np_: int, config, *extra, timeout=240):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(ROOT / "launch.sh"), "-np", str(np_), "--oversubscribe",
                           str(config), *extra], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


@pytest.mark.parametrize("world", [2, 4])
def test_n_processes_match_one(tmp_path, digits_config, world):
    raw = digits_config(precision="fp64", steps=12, output=str(tmp_path / f"np{world}.onnx"),
                        data__batch_size=32,
                        optimizer={"type": "adamw", "lr": 3e-3})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    single = Trainer(config_from_dict({**raw, "output": str(tmp_path / "one.onnx")}, tmp_path),
                     stream=io.StringIO())
    single.fit()
    proc = _launch(world, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints: one line per training step.
    assert proc.stdout.count("  lr ") == 12
    ours, ref = _weights(tmp_path / f"np{world}.onnx"), _weights(tmp_path / "one.onnx")
    for name, value in ref.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_batch_not_divisible_is_a_clear_error(tmp_path, digits_config):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(data__batch_size=30)))
    proc = _launch(4, path)
    assert proc.returncode != 0
    assert "must be divisible by the number of processes 4" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_killed_rank_ends_the_job(tmp_path, digits_config):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(steps=10**6, log={"every_steps": 1000})))
    env = {**os.environ, "PYTHON": sys.executable}
    # Rank 1 kills itself with SIGKILL a few seconds into training.
    script = (f'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then (sleep 4; kill -9 $$) & fi; '
              f'exec "{sys.executable}" -m trainer train "{path}"')
    start = time.monotonic()
    proc = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                           "bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)
    assert proc.returncode != 0
    assert time.monotonic() - start < 90
    assert not (tmp_path / "out" / "model.onnx").exists()
