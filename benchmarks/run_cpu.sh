#!/usr/bin/env bash
# The reduced CPU benchmark table (< 15 min on a 2-core CPU when the machine is otherwise idle):
#   matmul peak (fp32, 2048^2) +
#   DeiT-Tiny 448 px batch 4 and ViT-B/16 224 px batch 2, each DCAL and SA-only, remat on and off,
#   fp32, accumulation 1, 5 timed steps after one warm-up step, one process per row.
# Writes JSON lines to $RESULTS (default benchmarks/results/cpu.jsonl, overwritten) and renders the
# table into docs/BENCHMARKS.md between the CPU-TABLE markers (the rest of the file is kept).
#
#   bash benchmarks/run_cpu.sh                 # full reduced table
#   STEPS=3 bash benchmarks/run_cpu.sh          # fewer timed steps
#   ROWS="tiny_dcal_remat tiny_sa_remat" bash benchmarks/run_cpu.sh   # a subset (names below)
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-5}
RESULTS=${RESULTS:-benchmarks/results/cpu.jsonl}
DOC=${DOC:-docs/BENCHMARKS.md}
mkdir -p "$(dirname "$RESULTS")"
: > "$RESULTS"
PY=${PYTHON:-python3}
T="$PY -m benchmarks.train_step --precision fp32 --accum 1 --steps $STEPS --residuals --out $RESULTS"

declare -A ROW=(
  [tiny_dcal_remat]="--backbone deit_tiny --size 448 --batch 4 --remat on"
  [tiny_dcal_noremat]="--backbone deit_tiny --size 448 --batch 4 --remat off"
  [tiny_sa_remat]="--backbone deit_tiny --size 448 --batch 4 --remat on --sa_only"
  [tiny_sa_noremat]="--backbone deit_tiny --size 448 --batch 4 --remat off --sa_only"
  [vitb_dcal_remat]="--backbone vit_base --size 224 --batch 2 --remat on"
  [vitb_dcal_noremat]="--backbone vit_base --size 224 --batch 2 --remat off"
  [vitb_sa_remat]="--backbone vit_base --size 224 --batch 2 --remat on --sa_only"
  [vitb_sa_noremat]="--backbone vit_base --size 224 --batch 2 --remat off --sa_only"
)
ORDER="tiny_dcal_remat tiny_dcal_noremat tiny_sa_remat tiny_sa_noremat vitb_dcal_remat vitb_dcal_noremat vitb_sa_remat vitb_sa_noremat"
ROWS=${ROWS:-$ORDER}

start=$(date +%s)
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
$PY -m benchmarks.train_step --matmul_peak --dtype fp32 --n 2048 --reps 10 --out "$RESULTS"
for name in $ROWS; do
  echo "# $name ($(( $(date +%s) - start )) s elapsed, load $(cut -d' ' -f1 /proc/loadavg))" >&2
  $T --label "$name" ${ROW[$name]} || echo "# $name failed (JSON error line written)" >&2
done
elapsed=$(( $(date +%s) - start ))
echo "# done in ${elapsed} s, load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# --- render into docs/BENCHMARKS.md ------------------------------------------------------------
CPU_MODEL=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
NCPU=$(nproc)
JAXV=$($PY -c 'import jax, jaxlib; print(jax.__version__, "/ jaxlib", jaxlib.__version__)')
TABLE=$($PY -m benchmarks.train_step --render "$RESULTS")
HEADER="Machine: ${CPU_MODEL}, ${NCPU} cores ($(free -g | awk '/Mem:/{print $2}') GB RAM), jax ${JAXV}, XLA CPU backend, fp32.
Run: \`bash benchmarks/run_cpu.sh\` (STEPS=${STEPS}; one process per row; $(date -u +%Y-%m-%dT%H:%MZ); ${elapsed} s wall).
Each row's own command is in the \`command\` field of \`${RESULTS}\`."
export TABLE HEADER DOC
$PY - <<'EOF'
import os
doc, begin, end = os.environ['DOC'], '<!-- BEGIN CPU-TABLE (benchmarks/run_cpu.sh) -->', '<!-- END CPU-TABLE -->'
block = f"{begin}\n{os.environ['HEADER']}\n\n{os.environ['TABLE']}\n{end}"
text = open(doc).read() if os.path.exists(doc) else '# Benchmarks\n\n'
if begin in text and end in text:
  text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
else:
  text = text.rstrip('\n') + '\n\n' + block + '\n'
open(doc, 'w').write(text)
print(f'rendered into {doc}')
EOF
