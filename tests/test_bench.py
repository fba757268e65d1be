"""bench/cpu_bench.py and bench/dp_bench.py end to end on a tiny case: the drivers run every
system they are given and report a median for each (behaviour only; the timings themselves are
not checked)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("mode", [[], ["--separate", "--rounds", "2"]])
def test_cpu_bench_runs_each_system_side_by_side(tmp_path, mode):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    env = dict(os.environ, ONNX_TRAINER_BENCH_DIR=str(tmp_path / "work"))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_bench.py"), "--threads", "1",
                        "--steps", "4", "--warmup", "1", "--cases", "mlp16", "--systems",
                        "ours,torch,numpy", "--slices", "2", "--min-seconds", "0",
                        "--json", str(out), *mode],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(out.read_text())["results"]["mlp16"]
    for system in ("ours", "torch", "numpy"):
        assert row[system]["median_ms"] > 0 and row[system]["steps"] == 4, row[system]
    assert row["ours"]["nodes"] > 0 and row["ours"]["rss_mb"] > 0
    assert "MLP 64-128-64-10, batch 16" in r.stdout and "ours/best peer" in r.stdout


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="mpirun not installed (pip install '.[mpi]')")
def test_dp_bench_runs_ours_and_ddp_at_each_rank_count(tmp_path):
    """bench/dp_bench.py: ours (overlap on and off) and PyTorch DDP under mpirun -np 1 and 2
    give a step time for every configuration and the scaling table."""
    pytest.importorskip("torch")
    out = tmp_path / "dp.json"
    env = dict(os.environ, ONNX_TRAINER_BENCH_DIR=str(tmp_path / "work"))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "dp_bench.py"), "--np", "1", "2",
                        "--transport", "shm", "--cases", "mlp16", "--steps", "3", "--warmup",
                        "1", "--rounds", "1", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["mlp16"]["rows"]
    assert set(rows) == {"ddp/tcp/on/1", "ours/shm/on/1", "ddp/tcp/on/2", "ours/shm/on/2",
                         "ours/shm/off/2"}
    for row in rows.values():
        assert len(row["steps_s"]) == 3 and row["median_s"] > 0, row
    assert "| 2 | shm |" in r.stdout and "ours / DDP" in r.stdout
