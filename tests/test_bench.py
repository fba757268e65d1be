"""bench/cpu_bench.py end to end on a tiny case: both drivers run every system they are given
and report a median for each (behaviour only; the timings themselves are not checked)."""

from __future__ import annotations

import json
import os
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
