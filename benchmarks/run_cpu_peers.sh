#!/usr/bin/env bash
# Our train step against timm's on the same machine, in one run, steps alternating.
#
# Times timm's plain ViT step (`benchmarks/peer_timm.py`, in a venv with torch and timm) and ours
# (`benchmarks/train_step.py --serve`) for the same model, size, batch, classes, stochastic depth
# and optimizer (AdamW, decay on kernels only), fp32, both pinned to the same cores with the same
# thread count. `benchmarks/peers.py` drives the two processes in ABBA order, so only one
# computes at a time and load from other jobs hits both alike. With PARTS=1 (default) each round
# also times the loss's forward, forward+backward and a 2048^2 matmul in both (ours = the JAX
# matmul peak of this run). One JSON line per run goes to $RESULTS; the markdown summary (ratio,
# GFLOP/s, % of the JAX matmul peak, CPU model, load average) is printed.
#
#   bash benchmarks/run_cpu_peers.sh                       # SA-only, remat off (timm's step)
#   MODE=dcal bash benchmarks/run_cpu_peers.sh             # our DCAL step (remat on) vs timm
#   MODE="sa dcal" ROUNDS=6 bash benchmarks/run_cpu_peers.sh
#   TIMM_VENV=/work/venvs/torch bash benchmarks/run_cpu_peers.sh   # use an existing venv
#
# ALLOC=retain runs both peers with glibc malloc told to keep freed memory (one arena, no mmap,
# no trimming): XLA:CPU allocates each execution's temporary buffer (~1 GiB for this step) with
# posix_memalign, which glibc serves by a fresh mmap every step, so every page of it faults
# and is zeroed again (~270k minor faults per step; docs/BENCHMARKS.md). Default: ALLOC=default.
#
# Knobs: MODE (sa | sa_remat | dcal | dcal_noremat; several run one after the other), ROUNDS (5),
# PARTS (1), BACKBONE/TIMM_MODEL (deit_tiny / deit_tiny_patch16_224), SIZE (448), BATCH (4),
# THREADS (nproc), CPUS (taskset list, default all: 0-$((nproc-1))), EXTRA (more train_step.py
# flags for ours), LABEL, RESULTS (benchmarks/results/cpu_peers.jsonl, appended), PYTHON (ours).
# The venv: $TIMM_VENV if set, else .venv-timm (git-ignored), created when missing with
# torch==2.14.1 torchvision==0.29.1 timm (PIP_ARGS are passed to pip, e.g. a CPU index URL).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODE=${MODE:-sa}
ROUNDS=${ROUNDS:-5}
PARTS=${PARTS:-1}
BACKBONE=${BACKBONE:-deit_tiny}
TIMM_MODEL=${TIMM_MODEL:-deit_tiny_patch16_224}
SIZE=${SIZE:-448}
BATCH=${BATCH:-4}
THREADS=${THREADS:-$(nproc)}
CPUS=${CPUS:-0-$(( $(nproc) - 1 ))}
RESULTS=${RESULTS:-benchmarks/results/cpu_peers.jsonl}
LOG=${LOG:-/tmp/run_cpu_peers.$$.log}

VENV=${TIMM_VENV:-.venv-timm}
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import torch, timm' 2>/dev/null; then
  echo "# creating $VENV (torch==2.14.1 torchvision==0.29.1 timm)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q ${PIP_ARGS:-} torch==2.14.1 torchvision==0.29.1 timm numpy
fi

# Same threads for both: XLA's CPU client uses one intra-op thread per core it may run on
# (taskset), PyTorch gets torch.set_num_threads($THREADS) and OMP/MKL the same.
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
PIN="taskset -c $CPUS"
ALLOC=${ALLOC:-default}
case $ALLOC in
  default) ;;
  retain) PIN="env MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=268435456 $PIN" ;;
  *) echo "unknown ALLOC $ALLOC (default | retain)" >&2; exit 2 ;;
esac
COMMON="--size $SIZE --batch $BATCH --num_classes 200 --drop_path 0.1"
TIMM="$PIN $VENV/bin/python benchmarks/peer_timm.py --serve --model $TIMM_MODEL $COMMON --threads $THREADS"
[[ "$PARTS" == 1 ]] && PARTS_FLAG=--parts || PARTS_FLAG=

for mode in $MODE; do
  case $mode in
    sa) flags="--sa_only --remat off"; same=--flops_from_a ;;
    sa_remat) flags="--sa_only --remat on"; same= ;;   # remat recompute: XLA counts more
    dcal) flags="--remat on"; same= ;;
    dcal_noremat) flags="--remat off"; same= ;;
    *) echo "unknown MODE $mode (sa | sa_remat | dcal | dcal_noremat)" >&2; exit 2 ;;
  esac
  OURS="$PIN $PY benchmarks/train_step.py --serve --backbone $BACKBONE $COMMON --precision fp32 --accum 1 $flags ${EXTRA:-}"
  echo "# $mode: load $(cut -d' ' -f1-3 /proc/loadavg), peers' stderr in $LOG" >&2
  $PY benchmarks/peers.py --a "$OURS" --b "$TIMM" --a_name jax --b_name timm \
      --rounds "$ROUNDS" $PARTS_FLAG $same --label "${LABEL:-peers_${mode}_alloc_$ALLOC}" --out "$RESULTS" --log "$LOG"
done
