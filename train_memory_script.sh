#!/bin/sh
# Train EMNet's external memory on a frozen enhancer. Defaults: the setting chosen by the K-fold
# study (benchmarks/memory_study.py, README "Does the memory help?"): whole training images as
# entries, queried by all four encoder levels of the enhancer, top-1 read, the release's correction,
# abstaining on scenes it has not seen (ABSTAIN=scene; ABSTAIN=off corrects every image, the release).
# The published setting: ENTRIES=crops QUERY_ENCODER=enhancer MEM_SIZE=9000 NEPOCH=40 ABSTAIN=off sh train_memory_script.sh
# Edit the variables below (or set them in the environment) and run: sh train_memory_script.sh
PYTHON=${PYTHON:-python}
DATA_ROOT=${DATA_ROOT:-./datasets/LOL-v1}
TRAIN_DIR=${TRAIN_DIR:-$DATA_ROOT/our485}
VAL_DIR=${VAL_DIR:-}                  # empty: hold out --val_percent of TRAIN_DIR (never the test set)
PRETRAIN_WEIGHTS=${PRETRAIN_WEIGHTS:-./pre_trained_logs/enhancer/emnet_dim32_lolv1_h200_bf16.pth}
ENV=${ENV:-memory_lolv1}
SAVE_DIR=${SAVE_DIR:-./log}
QUERY_ENCODER=${QUERY_ENCODER:-enhancer_levels}  # enhancer (latent only); resnet18 = the original (ImageNet weights)
QUERY_WEIGHTS=${QUERY_WEIGHTS:-}           # torchvision resnet18 state_dict for resnet18
ENTRIES=${ENTRIES:-images}                 # crops = the release (one 128-px crop per pair and epoch)
MEM_SIZE=${MEM_SIZE:-1024}                 # slots; the release: 9000
TESTING_TOP_K=${TESTING_TOP_K:-1}          # slots read per query (stored in the memory for test.py)
STRENGTH=${STRENGTH:-release}              # release (softmax correction), a number, or auto (calibrated)
ABSTAIN=${ABSTAIN:-scene}                  # scene, score or both: leave images of unseen scenes uncorrected; off = the release
POOLING_SIZE=${POOLING_SIZE:-1}
THRES=${THRES:-1e-5}
BATCH_SIZE=${BATCH_SIZE:-128}
TRAIN_PS=${TRAIN_PS:-128}
NEPOCH=${NEPOCH:-1}                        # image entries: one pass writes them all; crops: 40
VAL_TIME=${VAL_TIME:-5}
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}                           # more flags, e.g. "--learn_query" or "--resume"

[ -d "$TRAIN_DIR" ] || { echo "error: TRAIN_DIR=$TRAIN_DIR does not exist (DATA_ROOT=$DATA_ROOT); set DATA_ROOT to the LOL-v1 folder holding our485/, or TRAIN_DIR to a folder holding low/ and high/" >&2; exit 2; }

export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}

set -- --env "$ENV" --save_dir "$SAVE_DIR" --pretrain_weights "$PRETRAIN_WEIGHTS" --train_dir "$TRAIN_DIR" \
  --query_encoder "$QUERY_ENCODER" --entries "$ENTRIES" --mem_size "$MEM_SIZE" --pooling_size "$POOLING_SIZE" \
  --thres "$THRES" --testing_top_k "$TESTING_TOP_K" --strength "$STRENGTH" --abstain "$ABSTAIN" \
  --batch_size "$BATCH_SIZE" --train_ps "$TRAIN_PS" --nepoch "$NEPOCH" --val_time "$VAL_TIME" --device "$DEVICE"
[ -n "$VAL_DIR" ] && set -- "$@" --val_dir "$VAL_DIR"
[ -n "$QUERY_WEIGHTS" ] && set -- "$@" --query_weights "$QUERY_WEIGHTS"
# shellcheck disable=SC2086
exec "$PYTHON" train_memory.py "$@" $EXTRA
