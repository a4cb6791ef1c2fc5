#!/usr/bin/env bash
# Where one block's time goes, ours (JAX) against PyTorch's (timm's parts), in one run: the two
# sides of benchmarks/block_parts.py alternate for ROUNDS rounds (order reversed every other
# round, so load from other jobs hits both alike), one JSON line per side and round appended to
# $RESULTS, then the table (medians over the rounds, per CPU model and ISA) is printed.
#
#   bash benchmarks/run_block_parts.sh                 # 3 rounds, all cores
#   DOTS=eigen bash benchmarks/run_block_parts.sh      # ours with Eigen's dots only (default: both)
#   ROUNDS=5 TIMM_VENV=~/venvs/timm bash benchmarks/run_block_parts.sh
#
# The venv: $TIMM_VENV if set, else .venv-timm (git-ignored), created when missing with
# torch==2.14.1 torchvision==0.29.1 timm (PIP_ARGS are passed to pip).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
PY=${PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
REPEATS=${REPEATS:-7}
RESULTS=${RESULTS:-benchmarks/results/block_parts.jsonl}
VENV=${TIMM_VENV:-.venv-timm}
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import torch, timm' 2>/dev/null; then
  echo "# creating $VENV (torch==2.14.1 torchvision==0.29.1 timm)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q ${PIP_ARGS:-} torch==2.14.1 torchvision==0.29.1 timm numpy
fi
export OMP_NUM_THREADS=${THREADS:-$(nproc)} MKL_NUM_THREADS=${THREADS:-$(nproc)}
tmp=$(mktemp)
# ours once per library XLA:CPU can run the dots with (DOTS; dca_jax/xla_cpu.py), then PyTorch
read -r -a sides <<< "$(for d in ${DOTS:-eigen ynnpack}; do printf 'jax:%s ' "$d"; done)torch"
for ((round = 0; round < ROUNDS; round++)); do
  order=("${sides[@]}")
  (( round % 2 )) && order=($(printf '%s\n' "${sides[@]}" | tac))
  for side in "${order[@]}"; do
    if [[ $side == torch ]]; then
      "$VENV/bin/python" -m benchmarks.block_parts --side torch --repeats "$REPEATS" --out "$tmp" >/dev/null
    else
      DCA_JAX_CPU_DOTS=${side#jax:} "$PY" -m benchmarks.block_parts --side jax --repeats "$REPEATS" \
        --out "$tmp" >/dev/null
    fi
  done
done
cat "$tmp" >> "$RESULTS"
$PY -m benchmarks.block_parts --render "$tmp"
rm -f "$tmp"
