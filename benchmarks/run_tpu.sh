#!/usr/bin/env bash
# The card-day script on a Cloud TPU VM (jax[tpu]): run_gpu.sh's rows in bf16 with XLA attention
# (a TPU has no cuDNN and no fp16 units), the planner, every mode's programs compiled on the chip
# and one restore + eval. Results: $OUT/tpu.jsonl, tpu_table.md, tpu_programs.jsonl.
#
#   bash benchmarks/run_tpu.sh
exec env ACCELERATOR=tpu bash "$(dirname "$0")/run_gpu.sh" "$@"
