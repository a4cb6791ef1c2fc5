"""The benchmarks measure the function that trains: the step they compile is the trainer's
(`dca_jax.train_step.build`, the same HLO) and their residual and breakdown figures come from the
step's own loss (`Built.loss`: the task's loss terms, the Re-ID necks)."""

import json
import os

import pytest
from conftest import ROOT, tiny_config, tiny_reid_config

from benchmarks import common, render_table, step_time
from dca_jax import checks, distributed, train_step
from tools import memory_table

CONFIGS = {'fgvc': tiny_config, 'reid': tiny_reid_config}


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def setup(request):
  return common.setup(CONFIGS[request.param]())


def test_the_benchmark_compiles_the_trainers_step(setup):
  trainer = train_step.build(checks.checked(setup.config.copy_and_resolve_references()),
                             distributed.make_mesh())
  assert step_time.lower(setup).as_text() == trainer.lower().as_text()


def test_residuals_and_the_breakdowns_loss_come_from_built_loss(setup):
  calls = []
  loss = setup.built.loss

  def spy(*args):
    calls.append(args)
    return loss(*args)
  setup.built.loss = spy
  try:
    measured = common.residual_bytes(setup)
    assert calls, 'the residual figure did not trace Built.loss'
    calls.clear()
    common.parts(setup)   # the breakdown's and the peers' forward and forward+backward
    assert len(calls) == 2, 'the fwd / fwdbwd parts did not trace Built.loss'
  finally:
    del setup.built.loss
  found = common.residuals(setup.built, setup.state.params, setup.state.batch_stats, setup.batch)
  assert measured['residual_bytes'] == sum(n for n, _, arg in found if not arg) > 0
  # the task's loss terms are in the figure: Re-ID's triplet, FGVC's cross-entropy alone
  triplet = any('batch_hard_triplet' in where for _, where, _ in found)
  assert triplet == (setup.config.task == 'reid')
  assert any('cross_entropy' in where for _, where, _ in found)


def test_render_table_puts_dcal_against_sa_only(tmp_path):
  row = dict(kind='train_step', label='x', backbone='deit_tiny', overrides={}, size=32,
             tokens=17, batch=4, accum=1, remat=False, remat_policy=None, precision='fp32',
             glca_M=1, pwca_T=2, attention_impl='xla', compile_s=1.0, step_s_median=0.3,
             step_s_min=0.2, step_s_max=0.4, images_per_s=13.3, xla_flops_per_image=2e9,
             xla_flops_per_step=8e9, achieved_flops_per_s=2.7e10, peak_rss_bytes=2**30)
  sa = dict(row, label='sa', glca_M=0, pwca_T=0, step_s_median=0.1, xla_flops_per_step=4e9)
  peak = dict(kind='matmul_peak', dtype='fp32', n=64, device='cpu', reps=3, flops_per_s=5.4e10,
              flops_per_s_best=6e10, load_start=1, load_end=1)
  path = tmp_path / 'rows.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in (peak, row, sa)) + '\n')
  text = render_table.render([str(path)])
  assert '| x | deit_tiny | 32 | 17 | 4 x 1 | off | fp32 | DCAL (M=1, T=2) |' in text
  assert '| 50% |' in text and '1.00 (RSS)' in text
  assert 'DCAL/SA step time **3.00x**, XLA FLOP ratio 2.00x' in text


def test_memory_md_shows_the_committed_rows():
  """docs/MEMORY.md's tables are tools/memory_table.py's rendering of the committed rows (GPU and
  TPU); the GPU rows whose implied time needs the card's spec file (not in the tree) aside."""
  doc = open(os.path.join(ROOT, 'docs', 'MEMORY.md')).read().splitlines()
  rendered = [line for name in ('plan_gpu', 'plan_tpu') for line in memory_table.render(
      os.path.join(ROOT, 'benchmarks', 'results', f'{name}.jsonl')).splitlines()]
  rows = [line for line in rendered if line.startswith('| ') and not line.endswith('|  |  |')]
  assert len(rows) > 40
  missing = [line for line in rows if line not in doc]
  assert not missing, missing
