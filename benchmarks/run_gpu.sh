#!/usr/bin/env bash
# The seed-style GPU table (docs/BENCHMARKS.md): ViT-B/16 at 448 px (785 tokens), effective
# batch 16, bf16 and fp16, the PyTorch memory guide's rows (Default 4x4 remat on, Conservative
# 2x8 remat on, Fast 8x2 remat off, Paper original 16x1 remat off) with cuDNN attention, SA-only
# baselines for the DCAL/SA cost ratio, and the memory planner's prediction first. One process
# per row (a failed row still writes a JSON line), in priority order under a wall-clock budget
# (BUDGET_S, default 300 s); rows past it are recorded as skipped. Then every other program the
# modes run (eval forwards, predict, embed, visualize, the exported module) compiled on the card
# (`tools.compile_programs`, beside the deviceless rows of benchmarks/results/programs.jsonl) and
# one checkpoint restored and evaluated (a 20-step demo run, then --mode eval): under 8 min.
#
#   bash benchmarks/run_gpu.sh                  # a GPU box with jax[cuda], flax, optax, orbax
#   DRY_RUN=1 bash benchmarks/run_gpu.sh        # on CPU: 2-block width-64 backbone at 32 px, xla
#                                               # attention, 4 rows, one per code path (DRY_RUN_ALL=1: all)
#   ROWS="bf16_default bf16_sa_default" bash benchmarks/run_gpu.sh   # a subset (names below)
#   bash benchmarks/run_tpu.sh                  # the TPU twin: bf16 rows, XLA attention
#
# Wheels in .whl/ (git-ignored; ml_collections where pip has no network) are installed into
# .whl/site first. Results: $OUT/gpu.jsonl and $OUT/gpu_table.md (OUT: default benchmarks/results;
# a dry run: gpu_dryrun.jsonl and gpu_dryrun_table.md, OUT default runs/gpu_dryrun).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target .whl/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}
fi
RESDIR=${OUT:-benchmarks/results}
[[ "${DRY_RUN:-0}" == 1 ]] && RESDIR=${OUT:-runs/gpu_dryrun}   # a smoke test's rows: not results
mkdir -p "$RESDIR"
BUDGET_S=${BUDGET_S:-300}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-150}
# Room for the bigger rows: the allocator's pool may use 95% of the card, not the default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
MODEL="--config configs/cub.py:vit_base"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  ATTN=xla MATMUL_N=256 NAME=gpu_dryrun   # cuDNN's fused attention exists only on NVIDIA GPUs
  TINY="--config.backbone_overrides.width=64 --config.backbone_overrides.depth=2 \
    --config.backbone_overrides.num_heads=2 --config.backbone_overrides.mlp_dim=128 \
    --config.num_sa_layers=2 --config.num_pwca_layers=2 --config.input_size=32 --config.resize_size=36"
elif [[ "${ACCELERATOR:-gpu}" == tpu ]]; then
  ATTN=xla MATMUL_N=8192 NAME=tpu TINY=   # no fused cuDNN attention and no fp16 units on a TPU
else
  ATTN=${ATTN:-cudnn} MATMUL_N=8192 NAME=gpu TINY=
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
fi
RESULTS=$RESDIR/$NAME.jsonl
: > "$RESULTS"
split() { echo "--config.batch_size=$1 --config.gradient_accumulation_steps=$2 --config.use_gradient_checkpointing=$3"; }
SA="--config.num_glca_layers=0 --config.num_pwca_layers=0 --config.attention_impl=xla"
declare -A ROW=(
  [bf16_default]="bf16 $(split 4 4 true)" [bf16_sa_default]="bf16 $(split 4 4 true) $SA"
  [bf16_fast]="bf16 $(split 8 2 false)" [bf16_paper]="bf16 $(split 16 1 false)"
  [bf16_conservative]="bf16 $(split 2 8 true)" [bf16_sa_paper]="bf16 $(split 16 1 false) $SA"
  [fp16_default]="fp16 $(split 4 4 true)" [fp16_fast]="fp16 $(split 8 2 false)"
  [fp16_paper]="fp16 $(split 16 1 false)" [fp16_conservative]="fp16 $(split 2 8 true)"
  [bf16_default_xla]="bf16 $(split 4 4 true) --config.attention_impl=xla"
)
# Priority order: what the budget cuts first is at the end.
ORDER="bf16_default bf16_sa_default bf16_fast bf16_paper bf16_conservative bf16_sa_paper fp16_default fp16_fast fp16_paper fp16_conservative bf16_default_xla"
[[ "$NAME" == tpu ]] && ORDER="bf16_default bf16_sa_default bf16_fast bf16_paper bf16_conservative bf16_sa_paper"
if [[ "${DRY_RUN:-0}" == 1 && -z "${DRY_RUN_ALL:-}" ]]; then
  ORDER="bf16_default bf16_sa_default bf16_fast fp16_default"   # remat, SA-only, accumulation, fp16
fi

start=$(date +%s)
# The planner on this card first: its pick for effective batch 16 stands beside the measured rows.
timeout 300 $PY main.py $MODEL --workdir "$RESDIR/plan" --mode plan --config.plan_search=True \
    --config.precision=bf16 --config.attention_impl=$ATTN $TINY 2>&1 | grep -v -i warning
$PY -m benchmarks.matmul_peak --dtype bf16 --n $MATMUL_N --reps 10 --out "$RESULTS"
$PY -m benchmarks.matmul_peak --dtype fp32 --n $MATMUL_N --reps 5 --out "$RESULTS"
for name in ${ROWS:-$ORDER}; do
  left=$(( BUDGET_S - ($(date +%s) - start) ))
  if (( left < 45 )); then
    echo "{\"kind\": \"error\", \"label\": \"$name\", \"error\": \"skipped: wall-clock budget BUDGET_S=$BUDGET_S spent\"}" >> "$RESULTS"
    continue
  fi
  tmo=$(( left < ROW_TIMEOUT_S ? left : ROW_TIMEOUT_S ))
  echo "# $name (timeout ${tmo} s, $(( $(date +%s) - start )) s elapsed)" >&2
  set -- ${ROW[$name]}
  timeout "$tmo" $PY -m benchmarks.step_time --steps 5 --warmup_cycles 1 --out "$RESULTS" \
      --label "$name" $MODEL $TINY --config.precision=$1 --config.attention_impl=$ATTN "${@:2}"
  if (( $? == 124 )); then
    echo "{\"kind\": \"error\", \"label\": \"$name\", \"error\": \"timed out after ${tmo} s\"}" >> "$RESULTS"
  fi
done
echo "# rows done in $(( $(date +%s) - start )) s" >&2
$PY -m benchmarks.render_table "$RESULTS" | tee "$RESDIR/${NAME}_table.md"
# Every other program of every mode, compiled on the card (the train step's rows are above).
timeout 90 $PY -m tools.compile_programs $MODEL $TINY --config.attention_impl=$ATTN \
    --kinds eval,predict,embed,visualize,export --out "$RESDIR/${NAME}_programs.jsonl"
# One checkpoint restored and evaluated on the card: a 20-step demo run, then --mode eval.
DEMO="$RESDIR/${NAME}_demo"; rm -rf "$DEMO"
timeout 45 $PY main.py --config configs/demo.py --workdir "$DEMO" --config.max_steps=20 | tail -n 3
timeout 30 $PY main.py --workdir "$DEMO" --mode eval | tail -n 2
echo "# done in $(( $(date +%s) - start )) s" >&2
