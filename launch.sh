#!/usr/bin/env bash
# Run onnx-trainer on N processes, on this machine or across a cluster:
#   ./launch.sh -np 4 configs/x.yaml [--set key=value ...]      4 ranks on this machine
#   ./launch.sh -np 16 --hostfile hosts configs/x.yaml           mpirun over ssh, several nodes
#   ./launch.sh -np 8 --mca btl tcp,self configs/x.yaml          mpirun options pass through
#   ./launch.sh configs/x.yaml        (inside a Slurm allocation) srun starts one rank per task
#   ./launch.sh -np 2 --hostfile hosts --selftest                check the launch and the network
#   ./launch.sh -np 2 program.py [args]                          any Python program
# Options before the config (or program, or --selftest) go to mpirun (to srun inside a Slurm
# allocation when -np is not given); what follows it goes to `onnx-trainer train` (or the
# program). PYTHON picks the interpreter (default: python3 on PATH); it is resolved to an
# absolute path, which must exist on every node (a shared file system or the same image).
set -euo pipefail

usage() {  # (to stderr, status 2: a mistake in the arguments; --help: stdout, status 0)
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

mpi_args=()
target=""
np=""
np_given=""
multi_node=""
has_prefix=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -np|-n|--np|-c) [ $# -ge 2 ] || usage; np="$2"; np_given=1; mpi_args+=("$1" "$2"); shift 2 ;;
    -np=*|-n=*|--np=*|-c=*|--n=*) np="${1#*=}"; np_given=1; mpi_args+=("-np" "$np"); shift ;;
    --hostfile|-hostfile|--machinefile|-machinefile|--host|-host|-H)
      [ $# -ge 2 ] || usage; multi_node=1; mpi_args+=("$1" "$2"); shift 2 ;;
    --hostfile=*|-hostfile=*|--machinefile=*|-machinefile=*|--host=*|-host=*)
      multi_node=1; mpi_args+=("$1"); shift ;;
    --prefix|--prefix=*) has_prefix=1; mpi_args+=("$1"); shift ;;
    # options whose values may end in .yaml/.py, which are not the config or program
    -x) [ $# -ge 2 ] || usage; mpi_args+=("$1" "$2"); shift 2 ;;
    --mca|-mca|--gmca|-gmca|--prtemca|--pmixmca)
      [ $# -ge 3 ] || usage; mpi_args+=("$1" "$2" "$3"); shift 3 ;;
    --selftest) target="--selftest"; shift; break ;;
    *.yaml|*.yml|*.py) target="$1"; shift; break ;;
    *) mpi_args+=("$1"); shift ;;
  esac
done
[ -n "$target" ] || usage
if [ -n "$np_given" ] && { ! [[ "$np" =~ ^[0-9]+$ ]] || [ $((10#$np)) -eq 0 ]; }; then
  echo "$0: -np takes a positive whole number of processes, got '$np'" >&2; exit 2
fi
python_bin="$(command -v "${PYTHON:-python3}" || true)"
[ -n "$python_bin" ] || { echo "$0: python not found: ${PYTHON:-python3}" >&2; exit 2; }
case "$target" in
  --selftest) program=("$python_bin" -m trainer.comm "$@") ;;
  *.py) [ -f "$target" ] || { echo "$0: program not found: $target" >&2; exit 2; }
        program=("$python_bin" "$target" "$@") ;;
  *) [ -f "$target" ] || { echo "$0: config not found: $target" >&2; exit 2; }
     program=("$python_bin" -m trainer train "$target" "$@") ;;
esac

# Inside a Slurm allocation (sbatch/salloc) without -np: srun starts the tasks of the allocation
# and the MPI library takes ranks from Slurm's PMI (--mpi=pmix, set it if srun needs it).
if [ -z "$np" ] && [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null; then
  exec srun "${mpi_args[@]}" "${program[@]}"
fi
[ -n "$np" ] || mpi_args=(-np 1 "${mpi_args[@]}")
mpirun_bin="$(command -v mpirun || true)"
[ -n "$mpirun_bin" ] || { echo "$0: mpirun not found; pip install 'onnx-trainer[mpi]'" >&2; exit 2; }
extra=()
if "$mpirun_bin" --version 2>/dev/null | grep -qi "open mpi"; then
  # Containers often run as root, and may have fewer cores than ranks.
  if [ "$(id -u)" = 0 ]; then extra+=(--allow-run-as-root); fi
  # (the cores this process may run on: GNU nproc also follows OMP_NUM_THREADS)
  if [ -z "$multi_node" ] && [ -n "$np" ] && \
      [ "$np" -gt "$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)" ]; then
    extra+=(--oversubscribe)
  fi
  # Remote nodes start Open MPI's daemon from the same installation (a virtualenv's wheel is
  # not on a non-interactive ssh PATH); an explicit --prefix wins.
  if [ -n "$multi_node" ] && [ -z "$has_prefix" ]; then
    extra+=(--prefix "$(cd "$(dirname "$mpirun_bin")/.." && pwd)")
  fi
fi
exec "$mpirun_bin" "${extra[@]}" "${mpi_args[@]}" "${program[@]}"
