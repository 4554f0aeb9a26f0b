#!/bin/sh
# One GPU session in one command: training speed before and after, the published network trained
# within a time budget (our budgeted GPU recipe, which trained the bundled weights: (1 - SSIM) + L1,
# gradient norm clipped at 1.0, lr stepped per iteration, bf16), its eval15 scores, and the weights in
# float16 cut into pieces small enough to come back from a machine that returns files of at most
# 16 MiB. Every step was run first on a CPU with a tiny preset (tests/test_gpu_training_run.py).
#
#   PARTS=.gpu_data/our485 OUT_DIR=$OUT sh benchmarks/gpu_training_run.sh
#
# PARTS: folders made by `python -m dataset.pack_parts` (merged into DATA_DIR first), or empty if
# DATA_DIR already holds the training pairs. BEFORE_DIR: the code before the GPU loop's rework
# (`git archive bcc8944 | tar -x -C .gpu_data/before`): its loop runs BEFORE_ITERS iterations on
# the same data, for crops/s before and after. Back home: `cat weights.pth.part_* > weights.pth`.
set -eu
PYTHON=${PYTHON:-python}
PARTS=${PARTS:-}                          # part_NN folders to merge into DATA_DIR; empty: none
DATA_DIR=${DATA_DIR:-./datasets/LOL-v1/our485}
EVAL_DIR=${EVAL_DIR:-./datasets/LOL-v1/eval15}   # scored once, after training; skipped if absent
OUT_DIR=${OUT_DIR:-./log/gpu_run_out}       # what comes back: logs, scores, weight pieces
ENV=${ENV:-gpu_run}
SAVE_DIR=${SAVE_DIR:-./log}
ARCH=${ARCH:-emnet_enhancer}
EMBED_DIM=${EMBED_DIM:-32}
BATCH_SIZE=${BATCH_SIZE:-4}
TIME_BUDGET=${TIME_BUDGET:-5}             # minutes for the whole training run
VAL_TIME=${VAL_TIME:-10}                  # validate every N epochs: the curve of val PSNR against crops seen
AMP=${AMP:-bf16}
DEVICE=${DEVICE:-cuda}
BENCH_STEPS=${BENCH_STEPS:-20}
PIECE=${PIECE:-15m}                        # size of one returned piece of the weights (split -b)
BEFORE_DIR=${BEFORE_DIR:-}
BEFORE_ITERS=${BEFORE_ITERS:-120}

export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}
mkdir -p "$OUT_DIR" "$DATA_DIR/low" "$DATA_DIR/high"

# The training logs go back on any exit, so a step that fails on the one GPU lease still explains itself.
keep_logs() {
  if [ -f "$SAVE_DIR/before/train.log" ]; then cp "$SAVE_DIR/before/train.log" "$OUT_DIR/before_train.log"; fi
  for f in train.log options.yml; do
    if [ -f "$SAVE_DIR/$ENV/$f" ]; then cp "$SAVE_DIR/$ENV/$f" "$OUT_DIR/"; fi
  done
}
trap keep_logs EXIT
if [ -n "$PARTS" ]; then
  for part in "$PARTS"/part_*; do
    cp "$part"/low/* "$DATA_DIR/low/" && cp "$part"/high/* "$DATA_DIR/high/"
  done
fi
echo "training pairs: $(ls "$DATA_DIR/low" | wc -l) low, $(ls "$DATA_DIR/high" | wc -l) high" | tee "$OUT_DIR/run.txt"

# Speed of one training step: the model step alone (the old loop's benchmark), then with the crops
# drawn on the device as the new loop does.
: >"$OUT_DIR/bench_train.jsonl"
for crops in "" --data_on_device; do
  # shellcheck disable=SC2086
  "$PYTHON" benchmarks/bench_train.py --device "$DEVICE" --amp "$AMP" --presets "$ARCH:$EMBED_DIM" \
    --batch_size "$BATCH_SIZE" --steps "$BENCH_STEPS" --json $crops >>"$OUT_DIR/bench_train.jsonl"
done

if [ -n "$BEFORE_DIR" ]; then
  data=$(cd "$DATA_DIR" && pwd) && save=$(mkdir -p "$SAVE_DIR" && cd "$SAVE_DIR" && pwd)
  (cd "$BEFORE_DIR" && "$PYTHON" train_enhancer.py --env before --save_dir "$save" --arch "$ARCH" \
    --embed_dim "$EMBED_DIM" --train_dir "$data" --batch_size "$BATCH_SIZE" --train_ps 128 \
    --ssim_lambda 1 --lpips_lambda 0 --l1_lambda 1 --amp "$AMP" --device "$DEVICE" --train_workers 6 \
    --max_iters "$BEFORE_ITERS" --val_time 1000000 --checkpoint 1000000 --log_every 50)
fi

"$PYTHON" train_enhancer.py --env "$ENV" --save_dir "$SAVE_DIR" --arch "$ARCH" --embed_dim "$EMBED_DIM" \
  --train_dir "$DATA_DIR" --batch_size "$BATCH_SIZE" --train_ps 128 --time_budget "$TIME_BUDGET" \
  --ssim_lambda 1 --lpips_lambda 0 --l1_lambda 1 --grad_clip 1.0 --amp "$AMP" --data_on_device on \
  --device "$DEVICE" --val_time "$VAL_TIME" --log_every 200 --checkpoint 1000000

"$PYTHON" -c "import sys; from models.loading import export_half; export_half(sys.argv[1], sys.argv[2])" \
  "$SAVE_DIR/$ENV/models/model_best.pth" "$SAVE_DIR/$ENV/weights_fp16.pth"
split -b "$PIECE" -d "$SAVE_DIR/$ENV/weights_fp16.pth" "$OUT_DIR/weights.pth.part_"
sha256sum "$SAVE_DIR/$ENV/weights_fp16.pth" | tee -a "$OUT_DIR/run.txt"

if [ -d "$EVAL_DIR/low" ]; then
  "$PYTHON" test.py --input_dir "$EVAL_DIR" --weights "$SAVE_DIR/$ENV/weights_fp16.pth" --device "$DEVICE" \
    --result_dir "$SAVE_DIR/$ENV/eval" >"$OUT_DIR/eval.txt"
  cp "$SAVE_DIR/$ENV/eval/summary.json" "$OUT_DIR/eval_summary.json"
fi
