#!/usr/bin/env bash
# A venv with jax's CUDA or TPU wheels, the same jax/jaxlib version as requirements.txt, for
# compiling on this host for a card it does not have (deviceless: `--mode plan`,
# `python -m tools.compile_programs`). Kept out of requirements.txt and the CPU tests.
#
#   bash tools/accelerator_venvs.sh cuda DIR    # jax[cuda12]==<requirements' jax> + requirements.txt
#   bash tools/accelerator_venvs.sh tpu DIR     # jax[tpu]==<requirements' jax> (libtpu) + requirements.txt
#
# Exit 1 with one line when the registry has no matching wheel; the last line names the venv's
# jax, jaxlib and plugin versions. Run it again on the same DIR: pip keeps what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-}; dir=${2:-}
if [[ "$kind" != cuda && "$kind" != tpu || -z "$dir" ]]; then
  echo "usage: bash tools/accelerator_venvs.sh cuda|tpu DIR" >&2; exit 2
fi
# requirements.txt names the jax it was tested with (jax>=X or jax==X): that version exactly.
version=$(sed -n 's/^jax[>=]=\([0-9.]*\).*/\1/p' requirements.txt)
if [[ -z "$version" ]]; then
  echo "error: requirements.txt names no jax version (jax>=X.Y.Z or jax==X.Y.Z)" >&2; exit 1
fi
extra=$([[ "$kind" == cuda ]] && echo cuda12 || echo tpu)
python3 -m venv "$dir"
pip=("$dir/bin/python" -m pip install -q --disable-pip-version-check)
if ! "${pip[@]}" "jax[$extra]==$version" 2> "$dir/pip_error.txt"; then
  echo "error: no jax[$extra]==$version for $("$dir/bin/python" -V) on this platform in the" \
       "package registry ($(grep -m1 -i 'error' "$dir/pip_error.txt" || tail -n1 "$dir/pip_error.txt"))" >&2
  exit 1
fi
# The project's other requirements, never another jax/jaxlib than the pinned one.
"${pip[@]}" -r requirements.txt -c <(printf 'jax==%s\njaxlib==%s\n' "$version" "$version")
"$dir/bin/python" -c "
import importlib.metadata as md
have = {d.metadata['Name'].lower(): d.version for d in md.distributions()}
print('$kind venv $dir:', ', '.join(f'{n}=={have[n]}' for n in
      ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'libtpu') if n in have))"
