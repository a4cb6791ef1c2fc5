#!/usr/bin/env bash
# Our train step against timm's on one machine (docs/BENCHMARKS.md, "Ours vs timm"): the peers
# (benchmarks/step_serve.py: train_step.build's step; benchmarks/peer_timm.py: timm's, same model,
# size, batch, classes, drop path, AdamW, fp32) pinned to the same cores and thread count, driven
# in turn by benchmarks/peers.py; PARTS=1 also times the loss's forward, forward+backward and a
# 2048^2 matmul. One JSON line appended to $RESULTS, a markdown summary printed.
#
#   bash benchmarks/run_cpu_peers.sh                                # ours SA-only vs timm
#   PEERS="jax_sa timm jax_dcal" PARTS=0 ROUNDS=6 ALLOC=retain bash benchmarks/run_cpu_peers.sh
#
# Peers (the first is the ratios' reference): jax_sa (ours, SA only, remat off: timm's work),
# jax_sa_remat, jax_sa_eigen / jax_sa_ynnpack (dots on one library, DCA_JAX_CPU_DOTS), jax_dcal
# (DCAL, remat on), jax_dcal_noremat, timm. ALLOC: default (as each ships: ours keeps freed
# memory itself, dca_jax/host_malloc.py), glibc (glibc's defaults for all), retain (the same
# malloc settings for every peer, timm too, by environment). Knobs: PEERS, ROUNDS (5), PARTS (1),
# BACKBONE / TIMM_MODEL, SIZE (448), BATCH (4), THREADS (nproc), CPUS (taskset list), EXTRA (more
# --config.KEY=VALUE for ours), LABEL, RESULTS (benchmarks/results/cpu_peers.jsonl), LOG, PYTHON.
# The venv: $TIMM_VENV, else .venv-timm, made when missing (torch==2.14.1 torchvision==0.29.1 timm).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} PYTHONUNBUFFERED=1
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
