"""Model selection says what it looked at (issue #43): the split `best` is chosen on, in the
start banner, in `--mode eval --checkpoint best` and in eval.json's `selected_on`."""

import json
import os

import pytest
from conftest import tiny_config, tiny_reid_config

from dca_jax import evaluate, evaluators, reporting, train

LINE = 'Best checkpoint: chosen by'


# ------------------------------------------------------------------------- the split, the line
@pytest.mark.parametrize('config,split,fix', [
    (tiny_config(), 'test', '--config.val_split=0.1'),
    (tiny_config(val_split=0.2), 'val', None),
    (tiny_config(val_split=0.2, best_metric='accuracy'), 'test', 'best_metric=val/accuracy'),
    (tiny_config(val_split=0.2, best_metric='val/accuracy_sa'), 'val', None),
    (tiny_reid_config(), 'test', '--config.val_split=0.1'),
    (tiny_reid_config(val_split=0.3), 'val', None),
])
def test_the_split_best_is_chosen_on_follows_the_best_metric(config, split, fix):
  assert evaluators.selected_on(config) == split
  warning = evaluators.selection_warning(config)
  if fix is None:
    assert warning == ''
  else:
    assert warning.startswith(LINE) and 'on the test split' in warning and fix in warning
    assert '\n' not in warning


def _banner(config) -> str:
  return reporting.banner(config, precision='fp32', num_params=1_000_000, steps_per_epoch=8,
                          selection=evaluators.selection_warning(config))


def test_the_banner_says_when_best_is_chosen_on_the_test_split():
  lines = _banner(tiny_config()).splitlines()
  assert sum(line.startswith(LINE) for line in lines) == 1
  assert LINE not in _banner(tiny_config(val_split=0.2))
  assert sum(line.startswith(LINE) for line in _banner(tiny_reid_config()).splitlines()) == 1


# ------------------------------------------------------------------------- trained runs, eval
def _eval(config, workdir: str, which: str, capsys) -> tuple[dict, str]:
  capsys.readouterr()
  result = evaluate.run_eval(config, workdir, which, output=f'eval_{which}.json')
  with open(os.path.join(workdir, f'eval_{which}.json')) as f:
    assert json.load(f)['selected_on'] == result['selected_on']
  assert result['measured_on']['checkpoint']['selected_on'] == result['selected_on']
  return result, capsys.readouterr().out


@pytest.mark.slow
def test_eval_records_best_chosen_on_the_test_split_and_latest_chosen_on_nothing(tmp_path,
                                                                                capsys):
  config = tiny_config(max_steps=2)  # one evaluation, at the end: best = latest = step 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  banner = capsys.readouterr().out
  assert sum(line.startswith(LINE) for line in banner.splitlines()) == 1
  result, out = _eval(config, workdir, 'best', capsys)
  assert result['selected_on'] == 'test'
  assert sum(line.startswith(LINE) for line in out.splitlines()) == 1
  result, out = _eval(config, workdir, 'latest', capsys)
  assert result['selected_on'] == 'none' and LINE not in out


@pytest.mark.slow
def test_eval_records_best_chosen_on_the_validation_split(tmp_path, capsys):
  config = tiny_config(val_split=0.25, synthetic_num_train=40, max_steps=2)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  assert LINE not in capsys.readouterr().out
  result, out = _eval(config, workdir, 'best', capsys)
  assert result['selected_on'] == 'val' and 'val/accuracy' in result and LINE not in out
  # the run's own config.json decides: an eval config without the val split does not relabel it
  result, _ = _eval(tiny_config(synthetic_num_train=40), workdir, 'best', capsys)
  assert result['selected_on'] == 'val'
