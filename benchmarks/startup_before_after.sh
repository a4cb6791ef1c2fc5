#!/bin/bash
# Start-up to the first result of --mode eval and --mode predict on the demo config, two
# checkouts side by side (e.g. before and after a change), each on a 20-step checkpoint trained
# by its own code; alternated, 3 rounds; one JSON line per run (seconds, load average).
#   benchmarks/startup_before_after.sh /path/to/old/checkout /path/to/new/checkout > out.jsonl
set -u
before=${1:?old checkout}; after=${2:?new checkout}
tmp=$(mktemp -d)
python - "$tmp/predict_me.png" <<'PY'
import sys
import numpy as np
from PIL import Image
Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(sys.argv[1])
PY
repo() { if [ "$1" = before ]; then echo "$before"; else echo "$after"; fi; }
for side in before after; do
  (cd "$(repo $side)" && python main.py --config configs/demo.py --workdir "$tmp/$side" \
     --config.max_steps=20 > "$tmp/$side.train.log" 2>&1)
done
for round in 1 2 3; do
  for side in before after; do
    for mode in eval predict; do
      extra=(); [ $mode = predict ] && extra=(--images "$tmp/predict_me.png")
      start=$(date +%s.%N)
      (cd "$(repo $side)" && python main.py --config configs/demo.py --workdir "$tmp/$side" \
         --mode $mode "${extra[@]}" > "$tmp/${side}_$mode.log" 2>&1)
      end=$(date +%s.%N)
      echo "{\"round\": $round, \"code\": \"$side\", \"mode\": \"$mode\", \"seconds\": $(echo "$end - $start" | bc), \"load\": $(cut -d' ' -f1 /proc/loadavg)}"
    done
  done
done
rm -rf "$tmp"
