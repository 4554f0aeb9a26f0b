#!/bin/sh
# Train the EMNet enhancer. Defaults: the original release's training step on LOL-v1 our485 (README,
# "Training the enhancer": LPIPS on the [0, 1] images, no gradient clipping, lr stepped per epoch).
# Edit the variables below (or set them in the environment) and run: sh train_enhancer_script.sh
# Offline (no ImageNet AlexNet weights for LPIPS): LPIPS_LAMBDA=0 L1_LAMBDA=1 sh train_enhancer_script.sh
# Several GPUs: LAUNCH="torchrun --nproc_per_node 2" sh train_enhancer_script.sh
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON}
DATA_ROOT=${DATA_ROOT:-./datasets/LOL-v1}
TRAIN_DIR=${TRAIN_DIR:-$DATA_ROOT/our485}
VAL_DIR=${VAL_DIR:-}                  # empty: hold out --val_percent of TRAIN_DIR (never the test set)
ENV=${ENV:-enhancer_lolv1}
SAVE_DIR=${SAVE_DIR:-./log}
ARCH=${ARCH:-emnet_enhancer}
EMBED_DIM=${EMBED_DIM:-32}
NEPOCH=${NEPOCH:-800}
BATCH_SIZE=${BATCH_SIZE:-4}
TRAIN_PS=${TRAIN_PS:-128}
LR=${LR:-2e-4}
SSIM_LAMBDA=${SSIM_LAMBDA:-1}
LPIPS_LAMBDA=${LPIPS_LAMBDA:-1}
L1_LAMBDA=${L1_LAMBDA:-0}
LPIPS_INPUT_RANGE=${LPIPS_INPUT_RANGE:-01}   # 01 = the original's; -11 = rescaled to [-1, 1] (our correction)
GRAD_CLIP=${GRAD_CLIP:-0}             # 0 = no clipping, the original's; our budgeted GPU recipe: 1.0
LR_SCHEDULE=${LR_SCHEDULE:-}          # empty: per epoch as the original (per iteration with TIME_BUDGET); or iteration
AMP=${AMP:-none}                      # bf16 on recent GPUs
TIME_BUDGET=${TIME_BUDGET:-}          # minutes: the schedule (warm-up + cosine, per iteration) is fitted to them instead of NEPOCH
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}                      # more flags, e.g. "--resume" or "--max_iters 100"

[ -d "$TRAIN_DIR" ] || { echo "error: TRAIN_DIR=$TRAIN_DIR does not exist (DATA_ROOT=$DATA_ROOT); set DATA_ROOT to the LOL-v1 folder holding our485/, or TRAIN_DIR to a folder holding low/ and high/" >&2; exit 2; }

export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}

set -- --env "$ENV" --save_dir "$SAVE_DIR" --arch "$ARCH" --embed_dim "$EMBED_DIM" \
  --train_dir "$TRAIN_DIR" --nepoch "$NEPOCH" --batch_size "$BATCH_SIZE" --train_ps "$TRAIN_PS" \
  --lr_initial "$LR" --ssim_lambda "$SSIM_LAMBDA" --lpips_lambda "$LPIPS_LAMBDA" --l1_lambda "$L1_LAMBDA" \
  --lpips_input_range "$LPIPS_INPUT_RANGE" --grad_clip "$GRAD_CLIP" --amp "$AMP" --device "$DEVICE"
[ -n "$LR_SCHEDULE" ] && set -- "$@" --lr_schedule "$LR_SCHEDULE"
[ -n "$VAL_DIR" ] && set -- "$@" --val_dir "$VAL_DIR"
[ -n "$TIME_BUDGET" ] && set -- "$@" --time_budget "$TIME_BUDGET"
# shellcheck disable=SC2086
exec $LAUNCH train_enhancer.py "$@" $EXTRA
