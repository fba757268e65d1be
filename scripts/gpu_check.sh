#!/usr/bin/env bash
# One-shot check for a lent GPU machine (installs nothing, < 8 minutes): the GPU-marked tests,
# then the digits demo on CPU and GPU side by side. Run from the repo root: scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY'
import cupy, numpy, onnx
print(f"cupy {cupy.__version__}  numpy {numpy.__version__}  onnx {onnx.__version__}")
PY
timeout 300 python -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_gpu.py
tests_rc=$?
python - <<'PY'
import io, time
from trainer.config import load_config
from trainer.train import Trainer
rows = []
for device in ("cpu", "gpu"):
    cfg = load_config("configs/digits_mlp.yaml",
                      [f"device={device}", f"output=/tmp/gpu_check_{device}.onnx",
                       "log.metrics=null"])
    t0 = time.perf_counter()
    result = Trainer(cfg, stream=io.StringIO()).fit()
    rows.append((device, time.perf_counter() - t0, result["eval_accuracy"]))
print(f"{'device':<8}{'wall s':>8}{'accuracy':>10}   (digits_mlp demo, 660 steps)")
for device, wall, acc in rows:
    print(f"{device:<8}{wall:>8.2f}{acc:>10.4f}")
PY
exit $tests_rc
