#!/bin/sh
# Evaluate EMNet on a LOL-style folder (low/ + high/): writes RESULT_DIR/ori, RESULT_DIR/mem, metrics,
# strips/ and index.html. Edit the variables below (or set them in the environment) and run: sh test_script.sh
# Default input: the synthetic demo set, created on first use (dataset/demo.py); with DATA_ROOT
# given, LOL-v1's eval15 under it:  DATA_ROOT=./datasets/LOL-v1 sh test_script.sh
PYTHON=${PYTHON:-python}
DATA_ROOT=${DATA_ROOT:-}                            # where LOL-v1 lives (see README, "Data"); given: input $DATA_ROOT/eval15
DEMO_DIR=./datasets/demo                            # made from scikit-image photos by dataset/demo.py
INPUT_DIR=${INPUT_DIR:-}                            # a LOL-style folder, a folder of photos or one image; wins over DATA_ROOT
WEIGHTS=${WEIGHTS:-./pre_trained_logs/enhancer/emnet_dim32_lolv1_h200_bf16.pth}  # bundled; or the published model_lolv1.pth
MEM_WEIGHTS=${MEM_WEIGHTS-./pre_trained_logs/memory/emnet_dim32_lolv1_levels_memory.pth}  # empty: ori only
QUERY_WEIGHTS=${QUERY_WEIGHTS:-}                    # resnet18 weights, for published memory files
TESTING_TOP_K=${TESTING_TOP_K:-}                    # empty: the read settings stored in the memory
ABSTAIN=${ABSTAIN:-stored}                          # off: the memory corrects every image (the release)
BORDER_MARGIN=${BORDER_MARGIN:-8}                   # reflected margin against a border frame; 0 = original code
RESULT_DIR=${RESULT_DIR:-}                          # empty: log_eval/<input>/<weights>+<memory> (test.py)
ARCH=${ARCH:-}                                      # empty: taken from the checkpoint
EMBED_DIM=${EMBED_DIM:-}                            # (published files: emnet_enhancer / 32)
DEVICE=${DEVICE:-auto}
AMP=${AMP:-none}                                    # bf16: faster on GPUs and bf16 CPUs, scores move slightly (README)

if [ -z "$INPUT_DIR" ] && [ -n "$DATA_ROOT" ]; then
  INPUT_DIR=$DATA_ROOT/eval15
  [ -d "$INPUT_DIR" ] || { echo "error: DATA_ROOT=$DATA_ROOT has no eval15/ folder; set DATA_ROOT to the LOL-v1 folder holding eval15/ and our485/, or INPUT_DIR to the folder to evaluate" >&2; exit 2; }
fi
INPUT_DIR=${INPUT_DIR:-$DEMO_DIR}

# glibc returns big tensors to the OS on every call, which makes PyTorch 2-3x slower on Linux CPUs.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}

case "$INPUT_DIR" in   # the demo set is created on first use
  ./datasets/demo|./datasets/demo/|datasets/demo|datasets/demo/)
    [ -d "$INPUT_DIR/low" ] || "$PYTHON" -m dataset.demo --out "$INPUT_DIR" || exit $? ;;
esac

set -- --input_dir "$INPUT_DIR" --weights "$WEIGHTS" --device "$DEVICE" --amp "$AMP" --pictures --border_margin "$BORDER_MARGIN"
[ -n "$RESULT_DIR" ] && set -- "$@" --result_dir "$RESULT_DIR"
[ -n "$ARCH" ] && set -- "$@" --arch "$ARCH"
[ -n "$EMBED_DIM" ] && set -- "$@" --embed_dim "$EMBED_DIM"
[ -n "$MEM_WEIGHTS" ] && set -- "$@" --mem_weights "$MEM_WEIGHTS"
[ -n "$MEM_WEIGHTS" ] && [ -n "$TESTING_TOP_K" ] && set -- "$@" --testing_top_k "$TESTING_TOP_K"
[ -n "$MEM_WEIGHTS" ] && set -- "$@" --abstain "$ABSTAIN"
[ -n "$QUERY_WEIGHTS" ] && set -- "$@" --query_weights "$QUERY_WEIGHTS"
exec "$PYTHON" test.py "$@"
