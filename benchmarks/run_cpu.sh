#!/usr/bin/env bash
# The reduced CPU table of docs/BENCHMARKS.md: the fp32 2048^2 matmul peak, then DeiT-T 448 px
# batch 4 and ViT-B/16 224 px batch 2, each DCAL and SA-only, remat on and off, fp32, no
# accumulation, STEPS timed steps after one warm-up step, one process per row. JSON lines go to
# $RESULTS (default benchmarks/results/cpu.jsonl, overwritten); the table is rendered into $DOC
# between the CPU-TABLE markers.
#
#   bash benchmarks/run_cpu.sh                                        # < 15 min on 2 idle cores
#   STEPS=3 ROWS="tiny_dcal_remat tiny_sa_remat" bash benchmarks/run_cpu.sh   # fewer steps, rows
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} PYTHONUNBUFFERED=1
STEPS=${STEPS:-5}
RESULTS=${RESULTS:-benchmarks/results/cpu.jsonl}
DOC=${DOC:-docs/BENCHMARKS.md}
PY=${PYTHON:-python3}
mkdir -p "$(dirname "$RESULTS")"
: > "$RESULTS"
T="$PY -m benchmarks.step_time --steps $STEPS --residuals --out $RESULTS"
FP32="--config.precision=fp32 --config.gradient_accumulation_steps=1"   # after --config
TINY="--config configs/cub.py"
VITB="--config configs/cub.py:vit_base --config.input_size=224 --config.batch_size=2"
SA="--config.num_glca_layers=0 --config.num_pwca_layers=0"
OFF="--config.use_gradient_checkpointing=false"
declare -A ROW=(
  [tiny_dcal_remat]="$TINY" [tiny_dcal_noremat]="$TINY $OFF"
  [tiny_sa_remat]="$TINY $SA" [tiny_sa_noremat]="$TINY $SA $OFF"
  [vitb_dcal_remat]="$VITB" [vitb_dcal_noremat]="$VITB $OFF"
  [vitb_sa_remat]="$VITB $SA" [vitb_sa_noremat]="$VITB $SA $OFF"
)
ROWS=${ROWS:-tiny_dcal_remat tiny_dcal_noremat tiny_sa_remat tiny_sa_noremat vitb_dcal_remat vitb_dcal_noremat vitb_sa_remat vitb_sa_noremat}

start=$(date +%s)
$PY -m benchmarks.matmul_peak --dtype fp32 --n 2048 --reps 10 --out "$RESULTS"
for name in $ROWS; do
  echo "# $name ($(( $(date +%s) - start )) s elapsed, load $(cut -d' ' -f1 /proc/loadavg))" >&2
  $T --label "$name" ${ROW[$name]} $FP32 || echo "# $name failed (JSON error line written)" >&2
done
elapsed=$(( $(date +%s) - start ))
HEADER="Machine: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(nproc) cores \
($(free -g | awk '/Mem:/{print $2}') GB RAM), jax $($PY -c 'import jax; print(jax.__version__)'), \
XLA CPU backend, fp32.
Run: \`bash benchmarks/run_cpu.sh\` (STEPS=${STEPS}; one process per row; $(date -u +%Y-%m-%dT%H:%MZ); \
${elapsed} s wall). Each row's own command is in the \`command\` field of \`${RESULTS}\`."
TABLE=$($PY -m benchmarks.render_table "$RESULTS") HEADER=$HEADER DOC=$DOC $PY - <<'PY'
import os
doc, begin, end = os.environ['DOC'], '<!-- BEGIN CPU-TABLE (benchmarks/run_cpu.sh) -->', '<!-- END CPU-TABLE -->'
text = open(doc).read()
block = f"{begin}\n{os.environ['HEADER']}\n\n{os.environ['TABLE']}\n{end}"
open(doc, 'w').write(text[:text.index(begin)] + block + text[text.index(end) + len(end):])
print(f'rendered into {doc}')
PY
