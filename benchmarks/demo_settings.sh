#!/usr/bin/env bash
# Does the CPU setting change the demo's table? Runs `make demo`'s run (the demo config, same
# .venv) once per setting named on the command line and compares each run's final F1 lines
# (`<strategy>: mean F1 by labels/category: ...`) with the first setting's.
#
#   benchmarks/demo_settings.sh [SETTING ...] [-- RUN_FLAGS ...]   (default: default isa_avx)
#
# RUN_FLAGS go to every run, e.g. -- "--config.strategies=('ours_linear',)" for a shorter check.
# Settings: default (this machine as it is); isa_avx (XLA_FLAGS=--xla_cpu_max_isa=AVX: XLA's
# CPU code generated without AVX2/FMA, as on an older CPU); one_core (taskset -c 0: XLA and
# BLAS on one core). Each demo takes about 13 minutes on the idle 2-core CPU; outputs go to
# $OUT (default runs/demo_settings/<setting>{,.log,.table}), provenance included.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo_settings}
settings=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do settings+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the --
run_flags=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(default isa_avx)
mkdir -p "$OUT"
for setting in "${settings[@]}"; do
  case "$setting" in
    default) prefix=(env) ;;
    isa_avx) prefix=(env "XLA_FLAGS=${XLA_FLAGS:-} --xla_cpu_max_isa=AVX") ;;
    one_core) prefix=(taskset -c 0) ;;
    *) echo "unknown setting $setting; expected default, isa_avx or one_core" >&2; exit 2 ;;
  esac
  rm -rf "${OUT:?}/$setting"
  start=$(date +%s)
  "${prefix[@]}" "$PY" -m rare_jax.run --config=experiments/configs/demo.py \
    --workdir="$OUT/$setting" ${run_flags[@]+"${run_flags[@]}"} >"$OUT/$setting.log" 2>&1
  grep "mean F1 by labels/category" "$OUT/$setting.log" >"$OUT/$setting.table"
  echo "$setting: $(($(date +%s) - start)) s"
  cat "$OUT/$setting.table"
done
first=${settings[0]}
status=0
for setting in "${settings[@]:1}"; do
  if diff "$OUT/$first.table" "$OUT/$setting.table"; then
    echo "$setting: the same table as $first"
  else
    echo "$setting: a different table from $first (above)"
    status=1
  fi
done
exit $status
