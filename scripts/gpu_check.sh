#!/usr/bin/env bash
# One-shot check for a lent GPU machine (installs nothing, < 8 minutes): the GPU-marked tests
# (every kernel table's ops, training graphs and whole runs on CuPy against NumPy / the CPU run,
# no synchronization inside a step, optimizers, the communicators on GPU arrays), then
# bench/gpu_bench.py (our step time and peak memory against PyTorch eager, and the ops where our
# step spends its time, each planned step synchronized; then, where time is
# left, ours with gpu.cuda_graph on the MLP and the GPT); a short table last.
# Run from anywhere: scripts/gpu_check.sh   (PYTHON=... picks the interpreter; logs in $LOGS)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOGS=${LOGS:-/tmp/onnx_trainer_gpu_check}
mkdir -p "$LOGS"
start=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import cupy, numpy, onnx
print(f"cupy {cupy.__version__}  numpy {numpy.__version__}  onnx {onnx.__version__}  "
      f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}  "
      f"GPUs {cupy.cuda.runtime.getDeviceCount()}")
PY

# 1. tests (estimated 3-5 minutes on an H200, most of it CuPy compiling kernels on first use;
#    never measured: no session has had a GPU yet)
timeout 330 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs tests/test_gpu.py \
    tests/test_comm.py 2>&1 | tee "$LOGS/pytest.log" | tail -n 60
tests_rc=${PIPESTATUS[0]}

# 2. the benchmark (stops starting new cases after --budget-s)
timeout 150 "$PY" bench/gpu_bench.py --budget-s 90 --profile 8 --json "$LOGS/bench.json" \
    > "$LOGS/bench.log" 2>&1
bench_rc=$?

# 3. where time is left (the whole check stays under 8 minutes): ours with gpu.cuda_graph
left=$((450 - ($(date +%s) - start)))
graph_rc=skipped
if [ "$left" -ge 60 ]; then
    timeout "$left" "$PY" bench/gpu_bench.py --cuda-graph --cases mlp,gpt50m \
        --budget-s $((left - 40)) --json "$LOGS/bench_graph.json" > "$LOGS/bench_graph.log" 2>&1
    graph_rc=$?
fi

echo
echo "== GPU check: $(($(date +%s) - start)) s; logs in $LOGS"
echo "tests: $(grep -E ' in [0-9.]+s' "$LOGS/pytest.log" | tail -n 1)  (rc $tests_rc)"
echo "bench: rc $bench_rc; with gpu.cuda_graph: rc $graph_rc"
sed -n '/^GPU training step/,$p' "$LOGS/bench.log"
[ "$bench_rc" -eq 0 ] || tail -n 20 "$LOGS/bench.log"
[ "$graph_rc" = skipped ] || sed -n '/^GPU training step/,$p' "$LOGS/bench_graph.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
