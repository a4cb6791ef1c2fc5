"""Evaluators chosen in the config, the validation split, and `best` chosen on it."""

import json
import os

import numpy as np
import pytest

from conftest import tiny_config, tiny_reid_config
from dca_jax import config_lib, data, evaluators, tasks
from dca_jax.data import sources


# ------------------------------------------------------------------------------ the val split
def test_hold_out_is_stratified_fixed_and_keeps_one_per_class():
  labels = np.repeat(np.arange(5), [10, 7, 2, 1, 20])
  held = sources.hold_out(labels, 0.2)
  per_class = [int(held[labels == c].sum()) for c in range(5)]
  assert per_class == [2, 1, 1, 0, 4]  # round(0.2 n), >= 1, never a whole class (n = 1: none)
  np.testing.assert_array_equal(held, sources.hold_out(labels, 0.2))  # a fixed draw
  assert not sources.hold_out(labels, 0.0).any()


def test_val_split_is_disjoint_from_train_and_the_same_for_every_seed():
  inputs = [data.build_input(tiny_config(val_split=0.25, seed=seed, synthetic_num_train=40))
            for seed in (0, 1)]
  plain = data.build_input(tiny_config(synthetic_num_train=40))
  first = inputs[0]
  assert first.info.num_val == plain.info.num_train - first.info.num_train > 0
  assert first.info.num_val == inputs[1].info.num_val
  vals = []
  for inp in inputs:
    batches = list(inp.eval_iter(split='val', with_index=True))
    images = np.concatenate([b['image'][b['mask']] for b in batches])
    assert len(images) == inp.info.num_val  # each held-out image once, padding masked
    vals.append(images)
  np.testing.assert_array_equal(vals[0], vals[1])  # the seed does not move the split
  # no validation image is a train image
  train = first.source.images['train'].numpy().reshape(first.info.num_train, -1)
  held = first.source.images['val'].numpy().reshape(first.info.num_val, -1)
  assert not (held[:, None, :] == train[None, :, :]).all(-1).any()
  with pytest.raises(data.DataError, match="set config.val_split > 0"):
    next(plain.eval_iter(split='val'))


def test_val_split_is_refused_where_it_has_no_meaning():
  with pytest.raises(config_lib.ConfigError, match='held-out identities'):
    config_lib.validate(tiny_reid_config(val_split=0.2))
  with pytest.raises(data.DataError, match='val_split needs data_source=folder or synthetic'):
    data.build_input(tiny_config(dataset='cub', data_source='tfds', val_split=0.2,
                                 data_dir='/nonexistent', num_classes=200))


# ------------------------------------------------------------------------------ config.evals
def test_default_evals_and_best_metric_follow_the_task_and_the_val_split():
  assert config_lib.best_metric(tiny_config()) == 'accuracy'
  assert config_lib.best_metric(tiny_config(val_split=0.2)) == 'val/accuracy'
  assert config_lib.best_metric(tiny_reid_config()) == 'mAP'
  names = evaluators.metric_names(tiny_config(val_split=0.2))
  assert {'accuracy', 'val/accuracy', 'val/accuracy_sa'} <= names
  assert set(evaluators.entries(tiny_reid_config())) == {'test', 'attention'}
  assert tasks.get('reid').default_evals(tiny_reid_config())['test']['type'] == 'retrieval'


@pytest.mark.parametrize('evals,best,match', [
    ({'x': {'type': 'top5'}}, '', r"config.evals.x: evaluator type 'top5' is not one of"),
    ({'x': {'split': 'test'}}, '', 'config.evals.x needs a type'),
    ({}, 'val/accuracy', "config.best_metric='val/accuracy' is not scored by config.evals"),
])
def test_bad_evals_are_one_line(evals, best, match):
  c = tiny_config(best_metric=best)
  c.evals = evals
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(c)
  assert '\n' not in str(e.value)


@pytest.mark.xdist_group('val_run')
def test_best_checkpoint_is_chosen_on_the_validation_split(tmp_path):
  """Three evaluations; `best` is the step with the highest val/accuracy, whatever the test
  accuracy says, and eval.json carries both splits."""
  from dca_jax import checkpoint as ckpt_lib, evaluate, train  # pylint: disable=g-import-not-at-top
  config = tiny_config(val_split=0.25, synthetic_num_train=40, num_epochs=3, keep_checkpoints=1,
                       learning_rate=0.02, synthetic_num_test=19)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = {r['step']: r for r in records if 'eval/val/accuracy' in r}
  assert len(evals) == 3 and all('eval/accuracy' in r for r in evals.values())
  val = {step: r['eval/val/accuracy'] for step, r in evals.items()}
  ck = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    best = ck.best_step()
  finally:
    ck.close()
  assert val[best] == max(val.values())
  # the score the checkpoint was ranked by is the validation accuracy, not the test one
  with open(os.path.join(workdir, 'checkpoints', str(best), 'metrics', 'metrics')) as f:
    score = json.load(f)['score']
  assert evals[best]['eval/accuracy'] != val[best]  # (the run is chosen so that they differ)
  assert score == pytest.approx(val[best])
  result = evaluate.run_eval(config, workdir, 'best')
  assert result['val/accuracy'] == pytest.approx(val[best])
  assert {'accuracy', 'accuracy_sa', 'val/num_images'} <= set(result)
