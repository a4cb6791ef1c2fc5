#!/usr/bin/env bash
# Trains the embedded demo (configs/demo.py, synthetic data, CPU ok), draws 4 test images with
# `--mode visualize` and copies one figure to docs/images/demo_visualize.png.
#
#   tools/make_readme_figure.sh                          # the full demo (a few minutes on CPU)
#   tools/make_readme_figure.sh --config.num_epochs=2    # extra flags go to both runs
#
# Environment: WORKDIR (default runs/demo; training resumes there if it holds a checkpoint),
# FIGURE (which test image to copy, default test_00000.png), PYTHON (default python).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${WORKDIR:-runs/demo}"
FIGURE="${FIGURE:-test_00000.png}"
PYTHON="${PYTHON:-python}"

"$PYTHON" main.py --config configs/demo.py --workdir "$WORKDIR" "$@"
"$PYTHON" main.py --config configs/demo.py --workdir "$WORKDIR" --mode visualize --num_images 4 "$@"

mkdir -p docs/images
cp "$WORKDIR/visualize/$FIGURE" docs/images/demo_visualize.png
echo "docs/images/demo_visualize.png <- $WORKDIR/visualize/$FIGURE"
