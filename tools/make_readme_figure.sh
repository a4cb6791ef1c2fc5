#!/usr/bin/env bash
# Trains the embedded demo (configs/demo.py, synthetic data, CPU ok) and its SA-only baseline
# (the same budget with GLCA and PWCA off), draws 4 test images with `--mode visualize`, the two
# models side by side, and copies one figure to docs/images/demo_visualize.png.
#
#   tools/make_readme_figure.sh                          # about 4 minutes on 2 CPU cores
#   tools/make_readme_figure.sh --config.num_epochs=2    # extra flags go to every run
#
# Environment: WORKDIR (default runs/demo), BASELINE (default runs/demo_sa; training resumes in
# either if it holds a checkpoint), FIGURE (which test image, default test_00001.png), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${WORKDIR:-runs/demo}"
BASELINE="${BASELINE:-runs/demo_sa}"
FIGURE="${FIGURE:-test_00001.png}"
PYTHON="${PYTHON:-python}"

"$PYTHON" main.py --config configs/demo.py --workdir "$WORKDIR" "$@"
"$PYTHON" main.py --config configs/demo.py --workdir "$BASELINE" \
    --config.num_glca_layers=0 --config.num_pwca_layers=0 "$@"
"$PYTHON" main.py --config configs/demo.py --workdir "$WORKDIR" --mode visualize --num_images 4 \
    --compare_workdir "$BASELINE" "$@"

mkdir -p docs/images
cp "$WORKDIR/visualize/$FIGURE" docs/images/demo_visualize.png
echo "docs/images/demo_visualize.png <- $WORKDIR/visualize/$FIGURE"
