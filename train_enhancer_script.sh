#!/bin/sh
# Train the EMNet enhancer. Defaults: the published recipe on LOL-v1 our485 (docs/METHOD.md).
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
AMP=${AMP:-none}                      # bf16 on recent GPUs
TIME_BUDGET=${TIME_BUDGET:-}          # minutes: the schedule (warm-up + cosine) is fitted to them instead of NEPOCH
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}                      # more flags, e.g. "--resume" or "--max_iters 100"

export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}

set -- --env "$ENV" --save_dir "$SAVE_DIR" --arch "$ARCH" --embed_dim "$EMBED_DIM" \
  --train_dir "$TRAIN_DIR" --nepoch "$NEPOCH" --batch_size "$BATCH_SIZE" --train_ps "$TRAIN_PS" \
  --lr_initial "$LR" --ssim_lambda "$SSIM_LAMBDA" --lpips_lambda "$LPIPS_LAMBDA" --l1_lambda "$L1_LAMBDA" \
  --amp "$AMP" --device "$DEVICE"
[ -n "$VAL_DIR" ] && set -- "$@" --val_dir "$VAL_DIR"
[ -n "$TIME_BUDGET" ] && set -- "$@" --time_budget "$TIME_BUDGET"
# shellcheck disable=SC2086
exec $LAUNCH train_enhancer.py "$@" $EXTRA
