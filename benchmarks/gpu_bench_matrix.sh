#!/bin/sh
# Training speed on a GPU, every setting in one command: crops drawn on the host or on the device,
# eager or compiled (default, reduce-overhead), and the batch sizes above the published 4 that a
# large GPU fills. One JSON line per setting in $OUT_DIR/bench_matrix.jsonl; a setting that fails
# or outruns STEP_LIMIT seconds is logged and skipped, so the rest still report.
#
#   OUT_DIR=$OUT sh benchmarks/gpu_bench_matrix.sh
set -u
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-./log/gpu_bench}
PRESET=${PRESET:-emnet_enhancer:32}
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-bf16}
STEPS=${STEPS:-30}
STEP_LIMIT=${STEP_LIMIT:-240}             # seconds for one setting, compilation included
BATCHES=${BATCHES:-16 32}                 # larger batches, crops on the device, eager
mkdir -p "$OUT_DIR"
: >"$OUT_DIR/bench_matrix.jsonl"

run() {  # $1: label; the rest: bench_train.py flags
  label=$1 && shift
  start=$(date +%s)
  # shellcheck disable=SC2086
  if timeout "$STEP_LIMIT" "$PYTHON" benchmarks/bench_train.py --device "$DEVICE" --amp "$AMP" --presets "$PRESET" \
      --steps "$STEPS" --json "$@" >"$OUT_DIR/last.out" 2>>"$OUT_DIR/bench_matrix.err"; then
    grep '^{' "$OUT_DIR/last.out" | sed "s/^{/{\"setting\": \"$label\", \"wall_s\": $(( $(date +%s) - start )), /" \
      >>"$OUT_DIR/bench_matrix.jsonl"
  else
    echo "{\"setting\": \"$label\", \"failed\": true, \"wall_s\": $(( $(date +%s) - start ))}" >>"$OUT_DIR/bench_matrix.jsonl"
  fi
  tail -1 "$OUT_DIR/bench_matrix.jsonl"
}

run b4_host --batch_size 4
run b4_device --batch_size 4 --data_on_device
for b in $BATCHES; do run "b${b}_device" --batch_size "$b" --data_on_device; done
run b4_device_compile_default --batch_size 4 --data_on_device --compile --compile_mode default
run b4_device_compile_reduce_overhead --batch_size 4 --data_on_device --compile --compile_mode reduce-overhead
rm -f "$OUT_DIR/last.out"
