#!/usr/bin/env bash
# Our train step against timm's on the same machine, in one run, steps alternating.
#
# Times timm's plain ViT step (`benchmarks/peer_timm.py`, in a venv with torch and timm) and ours
# (`benchmarks/step_serve.py`: dca_jax.train_step.build's step) for the same model, size, batch, classes, stochastic depth
# (0.1) and optimizer (AdamW, decay on kernels only), fp32, both pinned to the same cores with the
# same thread count. `benchmarks/peers.py` drives the processes in turn (order reversed every
# other round), so only one computes at a time and load from other jobs hits all alike. With
# PARTS=1 (default) each round also times the loss's forward, forward+backward and a 2048^2
# matmul in every peer (the first JAX peer's matmul = the JAX matmul peak of this run). One JSON
# line per run is appended to $RESULTS; the markdown summary (ratios to the first peer, GFLOP/s,
# % of the JAX matmul peak, CPU seconds, page faults, CPU model, load average) is printed.
#
#   bash benchmarks/run_cpu_peers.sh                          # ours SA-only (remat off) vs timm
#   PEERS="jax_sa timm jax_dcal" bash benchmarks/run_cpu_peers.sh   # + our DCAL step (remat on):
#                                                             # DCAL / SA-only in the same run
#   PEERS="jax_sa jax_dcal" PARTS=0 ROUNDS=6 bash benchmarks/run_cpu_peers.sh
#   TIMM_VENV=~/venvs/timm ALLOC=retain bash benchmarks/run_cpu_peers.sh
#
# Peers (the first is the reference of the ratios):
#   jax_sa            ours, SA only, remat off   (timm's step: the same model and work)
#   jax_sa_remat      ours, SA only, remat on
#   jax_sa_eigen      ours, SA only, remat off, dots on Eigen (DCA_JAX_CPU_DOTS=eigen)
#   jax_sa_ynnpack    the same with YNNPACK's dots (XLA's default; jax_sa is one of the two)
#   jax_dcal          ours, DCAL (GLCA M=1, PWCA T=12), remat on
#   jax_dcal_noremat  ours, DCAL, remat off
#   timm              timm's deit_tiny_patch16_224(img_size=448) step
#
# ALLOC: XLA:CPU allocates each execution's temporary buffer (~1 GiB for the SA step) with
# posix_memalign, which glibc serves with a fresh mmap every step, so every page of it faults and
# is zeroed again (~270k minor faults per step; docs/BENCHMARKS.md). Our processes tell glibc to
# keep freed memory themselves (dca_jax/host_malloc.py, as main.py does). ALLOC=default runs each
# peer as it ships; ALLOC=glibc turns ours off (glibc's defaults for all); ALLOC=retain gives every
# peer, timm too, the same settings by environment (one arena, no mmap, no trimming).
#
# Knobs: PEERS ("jax_sa timm"), ROUNDS (5), PARTS (1), BACKBONE/TIMM_MODEL (deit_tiny /
# deit_tiny_patch16_224), SIZE (448), BATCH (4), THREADS (nproc), CPUS (taskset list, default
# all), EXTRA (more --config.KEY=VALUE for our peers), ALLOC (default | glibc | retain), LABEL,
# RESULTS (benchmarks/results/cpu_peers.jsonl, appended), LOG (the peers' stderr), PYTHON (ours).
# The venv: $TIMM_VENV if set, else .venv-timm (git-ignored), created when missing with
# torch==2.14.1 torchvision==0.29.1 timm (PIP_ARGS are passed to pip, e.g. a CPU index URL).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
PEERS=${PEERS:-jax_sa timm}
ROUNDS=${ROUNDS:-5}
PARTS=${PARTS:-1}
BACKBONE=${BACKBONE:-deit_tiny}
TIMM_MODEL=${TIMM_MODEL:-deit_tiny_patch16_224}
SIZE=${SIZE:-448}
BATCH=${BATCH:-4}
THREADS=${THREADS:-$(nproc)}
CPUS=${CPUS:-0-$(( $(nproc) - 1 ))}
ALLOC=${ALLOC:-default}
RESULTS=${RESULTS:-benchmarks/results/cpu_peers.jsonl}
LOG=${LOG:-/tmp/run_cpu_peers.$$.log}

if [[ " $PEERS " == *" timm "* ]]; then
  VENV=${TIMM_VENV:-.venv-timm}
  if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import torch, timm' 2>/dev/null; then
    echo "# creating $VENV (torch==2.14.1 torchvision==0.29.1 timm)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q ${PIP_ARGS:-} torch==2.14.1 torchvision==0.29.1 timm numpy
  fi
fi

# Same threads for all: XLA's CPU client uses one intra-op thread per core it may run on
# (taskset), PyTorch gets torch.set_num_threads($THREADS) and OpenMP/MKL the same.
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
PIN="taskset -c $CPUS"
case $ALLOC in
  default) ;;   # as each ships: ours retains freed memory itself (dca_jax/host_malloc.py), timm not
  glibc) PIN="env DCA_JAX_MALLOC=default $PIN" ;;   # glibc's defaults for both
  retain) PIN="env MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=268435456 $PIN" ;;
  *) echo "unknown ALLOC $ALLOC (default | glibc | retain)" >&2; exit 2 ;;
esac
COMMON="--size $SIZE --batch $BATCH --num_classes 200 --drop_path 0.1"
# configs/cub.py with this backbone, size and batch; fp32, no accumulation; SA-only: no GLCA/PWCA
OURS="$PIN $PY -m benchmarks.step_serve --config configs/cub.py --config.backbone=$BACKBONE \
  --config.input_size=$SIZE --config.batch_size=$BATCH --config.num_classes=200 \
  --config.stochastic_depth_prob=0.1 --config.precision=fp32 --config.gradient_accumulation_steps=1"
SA="--config.num_glca_layers=0 --config.num_pwca_layers=0"
ON=--config.use_gradient_checkpointing=true OFF=--config.use_gradient_checkpointing=false

args=()
first_jax_sa=
for peer in $PEERS; do
  case $peer in
    jax_sa) cmd="$OURS $SA $OFF ${EXTRA:-}"; first_jax_sa=${first_jax_sa:-$peer} ;;
    jax_sa_remat) cmd="$OURS $SA $ON ${EXTRA:-}" ;;
    jax_sa_eigen|jax_sa_ynnpack)   # ours SA-only with the dots on one library (dca_jax/xla_cpu.py)
      cmd="env DCA_JAX_CPU_DOTS=${peer#jax_sa_} $OURS $SA $OFF ${EXTRA:-}" ;;
    jax_dcal) cmd="$OURS $ON ${EXTRA:-}" ;;
    jax_dcal_noremat) cmd="$OURS $OFF ${EXTRA:-}" ;;
    timm) cmd="$PIN $VENV/bin/python -m benchmarks.peer_timm --serve --model $TIMM_MODEL $COMMON --threads $THREADS" ;;
    *) echo "unknown peer $peer (jax_sa | jax_sa_remat | jax_sa_eigen | jax_sa_ynnpack | jax_dcal | jax_dcal_noremat | timm)" >&2; exit 2 ;;
  esac
  args+=(--peer "$peer=$cmd")
done
# timm runs the same model and work as our SA-only step without remat: count its FLOPs as ours
if [[ " $PEERS " == *" timm "* && -n "$first_jax_sa" ]]; then
  args+=(--same_flops "timm=$first_jax_sa")
fi
[[ "$PARTS" == 1 ]] && args+=(--parts)
label=${LABEL:-peers_$(echo $PEERS | tr ' ' '+')_alloc_$ALLOC}
echo "# $label: load $(cut -d' ' -f1-3 /proc/loadavg), peers' stderr in $LOG" >&2
$PY -m benchmarks.peers "${args[@]}" --rounds "$ROUNDS" --label "$label" --out "$RESULTS" --log "$LOG"
