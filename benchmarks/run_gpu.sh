#!/usr/bin/env bash
# The seed-style GPU table: ViT-B/16 at 448 px (785 tokens), effective batch 16, in bf16 and fp16,
# the PyTorch memory guide's rows (Default 4x4 remat on, Conservative 2x8 remat on, Fast 8x2 remat
# off, Paper original 16x1 remat off) with peak device memory and images/s, the fused cuDNN
# attention on the PWCA stream (SA keeps explicit weights for the rollout), and SA-only baselines
# for the DCAL/SA cost ratio (paper: 3.8 h / 2.1 h = 1.8x). One process per row (robust to OOM:
# a failed row still writes a JSON line). Rows run in priority order under a wall-clock budget
# (BUDGET_S, default 450 s: the whole script stays under 8 min on one H100); rows that would not
# fit are recorded as skipped.
#
#   bash benchmarks/run_gpu.sh                  # any GPU box with jax[cuda], flax, optax, orbax
#   DRY_RUN=1 bash benchmarks/run_gpu.sh        # CPU smoke test: tiny backbone, 32 px, xla attn,
#                                                # 4 rows covering every code path (DRY_RUN_ALL=1: all)
#   ROWS="bf16_default bf16_sa_default" bash benchmarks/run_gpu.sh   # a subset (names below)
#
# Needs ml_collections (dca_jax.config_lib). Where pip has no network (the lent H100/H200
# machines), carry it as a wheel in .whl/ (git-ignored); it is installed first if present:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl ml_collections==1.1.0
# Results: $OUT/gpu.jsonl and $OUT/gpu_table.md when OUT is set, else benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
RESDIR=${OUT:-benchmarks/results}
mkdir -p "$RESDIR"
BUDGET_S=${BUDGET_S:-450}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-150}
# Room for the bigger rows: the allocator's pool may use 95% of the card, not the default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  MODEL="--backbone vit_base --override width=64 --override depth=2 --override num_heads=2 --override mlp_dim=128 --size 32"
  ATTN=xla            # cuDNN fused attention exists only on NVIDIA GPUs
  MATMUL_N=256
  RESULTS=$RESDIR/gpu_dryrun.jsonl
  TABLE_MD=$RESDIR/gpu_dryrun_table.md
else
  MODEL="--backbone vit_base --size 448"
  ATTN=${ATTN:-cudnn}
  MATMUL_N=8192
  RESULTS=$RESDIR/gpu.jsonl
  TABLE_MD=$RESDIR/gpu_table.md
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
fi
: > "$RESULTS"
T="$PY -m benchmarks.train_step $MODEL --steps 5 --warmup_cycles 1 --out $RESULTS"

declare -A ROW=(
  [bf16_default]="--precision bf16 --batch 4 --accum 4 --remat on --attention_impl $ATTN"
  [bf16_sa_default]="--precision bf16 --batch 4 --accum 4 --remat on --sa_only"
  [bf16_fast]="--precision bf16 --batch 8 --accum 2 --remat off --attention_impl $ATTN"
  [bf16_paper]="--precision bf16 --batch 16 --accum 1 --remat off --attention_impl $ATTN"
  [bf16_conservative]="--precision bf16 --batch 2 --accum 8 --remat on --attention_impl $ATTN"
  [bf16_sa_paper]="--precision bf16 --batch 16 --accum 1 --remat off --sa_only"
  [fp16_default]="--precision fp16 --batch 4 --accum 4 --remat on --attention_impl $ATTN"
  [fp16_fast]="--precision fp16 --batch 8 --accum 2 --remat off --attention_impl $ATTN"
  [fp16_paper]="--precision fp16 --batch 16 --accum 1 --remat off --attention_impl $ATTN"
  [fp16_conservative]="--precision fp16 --batch 2 --accum 8 --remat on --attention_impl $ATTN"
  [bf16_default_xla]="--precision bf16 --batch 4 --accum 4 --remat on --attention_impl xla"
)
# Priority order: what the budget cuts first is at the end.
ORDER="bf16_default bf16_sa_default bf16_fast bf16_paper bf16_conservative bf16_sa_paper fp16_default fp16_fast fp16_paper fp16_conservative bf16_default_xla"
if [[ "${DRY_RUN:-0}" == 1 && -z "${DRY_RUN_ALL:-}" ]]; then
  # one row per code path (remat on/off, SA-only, accumulation, bf16, fp16 loss scaling)
  ORDER="bf16_default bf16_sa_default bf16_fast fp16_default"
fi
ROWS=${ROWS:-$ORDER}

start=$(date +%s)
# The memory planner first (dca_jax/plan.py): on this card, for the seed's effective batch 16, the
# candidates compiled in order of preference until one fits, so its prediction stands beside the
# measured rows below (the table's 'predicted' columns: the plan's formula on each row's own
# compiled step, and the deviceless prediction committed in benchmarks/results/plan_gpu.jsonl).
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  PLAN_MODEL="--config.backbone_overrides.width=64 --config.backbone_overrides.depth=2 --config.num_sa_layers=2 --config.num_pwca_layers=2 --config.backbone_overrides.num_heads=2 --config.backbone_overrides.mlp_dim=128 --config.input_size=32 --config.resize_size=36 --config.attention_impl=xla"
else
  PLAN_MODEL="--config.attention_impl=$ATTN"
fi
timeout 300 $PY main.py --config configs/cub.py:vit_base --workdir "$RESDIR/plan" --mode plan \
    --config.plan_search=True --config.precision=bf16 $PLAN_MODEL 2>&1 | grep -v -i warning
$PY -m benchmarks.train_step --matmul_peak --dtype bf16 --n $MATMUL_N --reps 10 --out "$RESULTS"
$PY -m benchmarks.train_step --matmul_peak --dtype fp32 --n $MATMUL_N --reps 5 --out "$RESULTS"
for name in $ROWS; do
  left=$(( BUDGET_S - ($(date +%s) - start) ))
  label="$name"
  if (( left < 45 )); then
    echo "{\"kind\": \"error\", \"label\": \"$label\", \"error\": \"skipped: wall-clock budget BUDGET_S=$BUDGET_S spent\"}" >> "$RESULTS"
    echo "# $name skipped (budget)" >&2
    continue
  fi
  tmo=$(( left < ROW_TIMEOUT_S ? left : ROW_TIMEOUT_S ))
  echo "# $name (timeout ${tmo} s, $(( $(date +%s) - start )) s elapsed)" >&2
  timeout "$tmo" $T --label "$label" ${ROW[$name]}
  rc=$?
  if (( rc == 124 )); then
    echo "{\"kind\": \"error\", \"label\": \"$label\", \"error\": \"timed out after ${tmo} s\"}" >> "$RESULTS"
  fi
done
echo "# done in $(( $(date +%s) - start )) s" >&2
$PY -m benchmarks.train_step --render "$RESULTS" | tee "$TABLE_MD"
