#!/usr/bin/env bash
# Run onnx-trainer on N processes: ./launch.sh -np 4 configs/x.yaml [--hostfile h] [--set k=v ...]
# Options before the config go to mpirun (or srun inside a Slurm allocation when no -np is
# given); options after it go to `onnx-trainer train`. PYTHON picks the interpreter.
set -euo pipefail

usage() {
  echo "usage: $0 [-np N] [mpirun options...] CONFIG.yaml [--set key=value ...]" >&2
  exit 2
}

mpi_args=()
config=""
np=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage ;;
    -np|-n) np="$2"; mpi_args+=("$1" "$2"); shift 2 ;;
    *.yaml|*.yml) config="$1"; shift; break ;;
    *) mpi_args+=("$1"); shift ;;
  esac
done
[ -n "$config" ] || usage
[ -f "$config" ] || { echo "$0: config not found: $config" >&2; exit 2; }
python_bin="${PYTHON:-python3}"
train=("$python_bin" -m trainer train "$config" "$@")

if [ -z "$np" ] && [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null; then
  exec srun "${mpi_args[@]}" "${train[@]}"
fi
[ -n "$np" ] || mpi_args=(-np 1 "${mpi_args[@]}")
mpirun_bin="$(command -v mpirun || true)"
[ -n "$mpirun_bin" ] || { echo "$0: mpirun not found; pip install 'onnx-trainer[mpi]'" >&2; exit 2; }
extra=()
if "$mpirun_bin" --version 2>/dev/null | grep -qi "open mpi"; then
  # Containers often run as root, and may have fewer cores than ranks.
  [ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
  if [ -n "$np" ] && [ "$np" -gt "$(nproc)" ]; then extra+=(--oversubscribe); fi
fi
exec "$mpirun_bin" "${extra[@]}" "${mpi_args[@]}" "${train[@]}"
