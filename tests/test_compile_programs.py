"""tools/compile_programs.py and dca_jax/programs.py on the CPU target (the CUDA and TPU
targets need their venvs: docs/MEMORY.md): every mode's program is there and compiles, identical
programs are compiled once, a failing program is a one-line row, a re-run skips what is done."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_config, tiny_reid_config

from dca_jax import checks, predict, programs
from dca_jax.plan import registry


def _rows(config, kinds=programs.KINDS):
  target = registry.targets([])[0]
  return list(programs.compile_all(checks.checked(config), target, kinds, log=lambda _: None))


def test_every_fgvc_program_compiles_and_the_flip_evaluator_is_its_own():
  rows = _rows(tiny_config())
  names = [(r['program'], r['variant']) for r in rows]
  assert [r for r in rows if not r['compiled']] == []
  assert ('train_step', 'fp32 remat=off attention=xla') in names
  assert ('train_step', 'fp32 remat=on attention=xla') in names
  assert ('eval:test', 'fp32 attention=xla flip=off') in names
  assert ('eval:flip', 'fp32 attention=xla flip=on') in names
  # the single crop and the pictures do not change with test_flip: compiled once
  assert sum(n == 'eval:test' for n, _ in names) == 1
  assert ('predict', f'fp32 attention=xla outputs={",".join(predict.Predictor.OUTPUTS)}') in names
  assert 'embed' not in {n for n, _ in names}   # a classifier has no retrieval feature
  for row in rows:
    assert row['temp_bytes'] >= 0 and row['argument_bytes'] > 0 and row['flops'] > 0, row


def test_failing_program_is_a_row_with_one_line():
  def lower():
    raise RuntimeError('RESOURCE_EXHAUSTED: out of memory\nwhile allocating 9 GiB')
  program = programs.Program('train', 'train_step', 'bf16', 4, lower)
  row = programs.compile_row(program, registry.targets([])[0], checks.checked(tiny_config()))
  assert not row['compiled']
  assert row['error'] == 'RuntimeError: RESOURCE_EXHAUSTED: out of memory'
  assert 'error: RuntimeError' in programs.format_row(row)


@pytest.mark.slow
def test_the_tool_compiles_reid_programs_and_the_export_then_resumes(tmp_path):
  out = tmp_path / 'rows.jsonl'
  command = [sys.executable, '-m', 'tools.compile_programs', '--config',
             'tests/tiny_config.py:reid', '--out', str(out)]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert {r['program'] for r in rows} == {'train_step', 'eval:test', 'eval:attention', 'predict',
                                          'embed', 'visualize', 'exported'}
  assert all(r['compiled'] for r in rows), [r for r in rows if not r['compiled']]
  exported = [r for r in rows if r['program'] == 'exported']
  assert exported[0]['variant'] == 'platforms=cpu,cuda,tpu'
  # the retrieval feature changes with the mirrored image: both compiled
  assert {r['variant'] for r in rows if r['program'] == 'eval:test'} == {
      'fp32 attention=xla flip=off', 'fp32 attention=xla flip=on'}
  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  assert len(out.read_text().splitlines()) == len(rows)   # nothing compiled twice
  table = subprocess.run([sys.executable, '-m', 'tools.compile_programs', '--render', str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert table.stdout.count('| tests/tiny_config.py:reid |') == len(rows)


def test_reid_visualize_asks_for_the_query_maps_only():
  config = checks.checked(tiny_reid_config())
  assert predict.mode_outputs(config, 'visualize') == predict.RANKING_OUTPUTS
  assert predict.mode_outputs(config, 'embed') == predict.EMBED_OUTPUTS
  assert predict.mode_outputs(checks.checked(tiny_config()), 'embed') == ()


def test_accelerator_venvs_script_takes_a_kind_and_a_folder(tmp_path):
  """tools/accelerator_venvs.sh: a usage line for a missing or unknown kind (exit 2) before it
  creates anything; the jax version it installs is the one requirements.txt names."""
  for args in ([], ['rocm', str(tmp_path / 'v')], ['cuda']):
    run = subprocess.run(['bash', 'tools/accelerator_venvs.sh', *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith('usage: '), run.stderr
  assert not (tmp_path / 'v').exists()
  pinned = subprocess.run(['sed', '-n', r's/^jax[>=]=\([0-9.]*\).*/\1/p', 'requirements.txt'],
                          cwd=ROOT, capture_output=True, text=True).stdout.strip()
  assert pinned and pinned.count('.') == 2, pinned
  with open(os.path.join(ROOT, 'tools', 'accelerator_venvs.sh')) as f:
    assert r"s/^jax[>=]=\([0-9.]*\).*/\1/p" in f.read()   # the script reads it the same way
