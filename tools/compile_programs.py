"""Every program of every mode compiled for a GPU or TPU this host does not have.

The train step (each precision x remat x attention the target takes), every evaluator's eval
forward (mirrored images off and on), the predict / embed / visualize forwards and the exported
StableHLO module, each built by the function its mode jits (dca_jax/programs.py), compiled for
the target: one JSON row per program (compiled, or the compiler's error in one line; argument,
output and temporary bytes; FLOPs; compile seconds), appended to --out as it comes (a re-run
skips the rows there). The venvs: `bash tools/accelerator_venvs.sh cuda|tpu DIR`.

  JAX_PLATFORMS=cpu .venv-cuda/bin/python -m tools.compile_programs \\
      --config configs/cub.py:vit_base --target_config SPECS/h100_sxm.txtpb \\
      --out benchmarks/results/programs.jsonl
  JAX_PLATFORMS=cpu .venv-tpu/bin/python -m tools.compile_programs \\
      --config configs/market1501.py:vit_base --target_config tpu:v5e:2x2 --out ...
  python -m tools.compile_programs --render benchmarks/results/programs.jsonl   # markdown

--exported FILE compiles a `--mode export` model.stablehlo instead of exporting the config's
model (randomly initialised weights: the program's shapes are what matter) into a temporary
folder. --kinds limits the programs (train, eval, predict, embed, visualize, export).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags, logging

_CONFIG = flags.DEFINE_string('config', None, 'the experiment (configs/x.py[:arg]); '
                              '--config.KEY=VALUE overrides apply on top (as for main.py)')
_TARGETS = flags.DEFINE_list('target_config', [], 'GPU spec files and/or tpu:<topology>; none: '
                             'the attached devices')
_TOPOLOGY = flags.DEFINE_string('topology', '1x1x1', 'GPU specs: hosts x 1 x GPUs per host')
_KINDS = flags.DEFINE_list('kinds', ['train', 'eval', 'predict', 'embed', 'visualize', 'export'],
                           'which programs')
_EXPORTED = flags.DEFINE_string('exported', '', 'a model.stablehlo to compile (default: export '
                                'the config\'s model)')
_OUT = flags.DEFINE_string('out', '', 'append the rows to this JSON-lines file')
_RENDER = flags.DEFINE_string('render', '', 'print the rows of this file as markdown and exit')


def exported_file(config, folder: str) -> str:
  """The config's model exported as `--mode export` writes it (random weights) into `folder`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dca_jax import config_lib, export  # pylint: disable=g-import-not-at-top
  from dca_jax.models import build_model  # pylint: disable=g-import-not-at-top
  c = export.export_config(config)
  shape = (1, *config_lib.input_hw(c), 3)
  variables = jax.jit(lambda: build_model(c).init(jax.random.key(0), jnp.zeros(shape),
                                                  train=False))()
  export.export_model(c, variables, folder, ('stablehlo',))
  return os.path.join(folder, 'model.stablehlo')


def _done(path: str, label: str) -> set:
  """(program, variant, spec) of the rows already in `path` for this config."""
  if not path or not os.path.exists(path):
    return set()
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {(r['program'], r['variant'], r['spec']) for r in rows if r.get('config') == label}


def compile_target(config, label: str, target, kinds, out: str) -> list[dict]:
  from dca_jax import programs  # pylint: disable=g-import-not-at-top
  done = {(p, v) for p, v, spec in _done(out, label)
          if spec in (target.spec, os.path.basename(target.spec))}
  print(f'{label} on {target.name}:', flush=True)
  rows = list(programs.compile_all(config, target, [k for k in kinds if k != 'export'],
                                   done=done))
  if 'export' in kinds and not any(name == 'exported' for name, _ in done):
    with tempfile.TemporaryDirectory() as folder:
      path = _EXPORTED.value or exported_file(config, folder)
      program = programs.exported_program(path, target, int(config.eval_batch_size))
      rows.append(programs.compile_row(program, target, config))
      print(programs.format_row(rows[-1]), flush=True)
  for row in rows:
    row['config'] = label
    if out:
      with open(out, 'a') as f:
        f.write(json.dumps(row) + '\n')
  return rows


def render(path: str) -> str:
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  lines = ['| config | target | program | variant | batch | compiled | GiB (temp.) | TFLOP | '
           'compile s |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    memory = (f'{r["memory_gib"]:.2f} ({r["temp_bytes"] / 2**30:.2f})' if r['compiled']
              else r['error'][:90])
    flops = f'{r["flops"] / 1e12:.2f}' if r.get('flops', float('nan')) == r.get('flops') else ''
    lines.append(f'| {r["config"]} | {r["spec"]} | {r["program"]} | {r["variant"]} | '
                 f'{r["batch_size"]} | {"yes" if r["compiled"] else "no"} | {memory} | '
                 f'{flops if r["compiled"] else ""} | {r["compile_s"]:.0f} |')
  return '\n'.join(lines)


def main(argv):
  """argv: what absl left, the --config.KEY=VALUE overrides (dca_jax.config_files, as main.py)."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if _RENDER.value:
    print(render(_RENDER.value))
    return
  from dca_jax import config_files, errors  # pylint: disable=g-import-not-at-top
  overrides = argv[1:]
  label = ' '.join([_CONFIG.value or ''] + overrides)
  try:
    if _CONFIG.value is None:
      raise errors.ConfigError('--config is needed (configs/x.py[:arg])')
    config = config_files.prepare(config_files.load(_CONFIG.value, overrides)[0])
    from dca_jax.plan import registry  # pylint: disable=g-import-not-at-top
    for target in registry.targets(_TARGETS.value, _TOPOLOGY.value):
      compile_target(config, label, target, _KINDS.value, _OUT.value)
  except errors.ONE_LINE as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  from dca_jax import config_files  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=config_files.parse_known_flags)
