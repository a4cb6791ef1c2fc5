"""Evaluators chosen in the config, the validation split, and `best` chosen on it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_reid_config

from dca_jax import checkpoint as ckpt_lib
from dca_jax import checks, config_lib, data, distributed, evaluators, tasks, train
from dca_jax.data import preprocess, sources
from dca_jax.evaluators import classification
from dca_jax.models import build_model


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
  checks.checked(tiny_reid_config(val_split=0.2))  # Re-ID: held-out identities (reid_val.py)
  with pytest.raises(data.DataError, match='val_split needs data_source=folder or synthetic'):
    data.build_input(tiny_config(dataset='cub', data_source='tfds', val_split=0.2,
                                 data_dir='/nonexistent', num_classes=200))


# ------------------------------------------------------------------------------ config.evals
def test_default_evals_and_best_metric_follow_the_task_and_the_val_split():
  assert evaluators.best_metric(tiny_config()) == 'accuracy'
  assert evaluators.best_metric(tiny_config(val_split=0.2)) == 'val/accuracy'
  assert evaluators.best_metric(tiny_reid_config()) == 'mAP'
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
    checks.checked(c)
  assert '\n' not in str(e.value)


@pytest.mark.slow
def test_best_checkpoint_is_chosen_on_the_validation_split(tmp_path):
  """Three evaluations; `best` is the step with the highest val/accuracy, whatever the test
  accuracy says, and eval.json carries both splits."""
  from dca_jax import evaluate  # pylint: disable=g-import-not-at-top
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


def test_evaluator_accuracies_equal_a_top1_from_the_model_outputs():
  """The Evaluator against a top-1 computed here from model.apply on the raw test images (the
  synthetic set's own arrays: resize_size = input_size makes the eval crop the image itself):
  21 images in batches of 8, so the last batch carries 3 padding rows that must count nowhere;
  SA+GLCA is the argmax of the sum of the two softmaxes. Weights random and large enough that
  SA, GLCA and SA+GLCA disagree on some images (else a swapped head would go unnoticed)."""
  from dca_jax import data, evaluators  # pylint: disable=g-import-not-at-top
  from dca_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from dca_jax.evaluators import classification  # pylint: disable=g-import-not-at-top
  config = tiny_config(resize_size=32, synthetic_num_test=21, eval_batch_size=8)
  model = build_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  rng = np.random.default_rng(0)  # 9, 7 and 6 of the 21 right for SA, GLCA and SA+GLCA
  params = jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32),
                        shapes['params'])
  mesh = distributed.make_mesh()
  evaluator = classification.Evaluator(evaluators.Context(
      config, model, data.build_input(config, with_train=False), mesh,
      distributed.replicated(mesh), jnp.float32))
  result = dict(evaluator.run({'params': params}))
  generated = synthetic.generate(4, config.synthetic_num_train, 21, 32, config.synthetic_seed,
                                 config.synthetic_distractors, config.synthetic_detail_size)
  out = jax.jit(model.apply)({'params': params},
                             preprocess.normalize(generated.test_images, config))
  softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(
      z - z.max(1, keepdims=True)).sum(1, keepdims=True)
  sa, glca = (np.asarray(out[f'{b}_logits'], np.float64) for b in ('sa', 'glca'))
  predictions = {'accuracy_sa': sa.argmax(1), 'accuracy_glca': glca.argmax(1),
                 'accuracy': (softmax(sa) + softmax(glca)).argmax(1)}
  hits = {k: predicted == generated.test_labels for k, predicted in predictions.items()}
  # the three heads score differently, so a swapped or missing head changes a figure
  assert len({h.sum() for h in hits.values()}) == 3, hits
  assert result['num_images'] == 21
  for key, hit in hits.items():
    assert result[key] == pytest.approx(hit.mean()), key


@pytest.fixture(scope='module')
def setup():
  """A tiny random DCAL with its kernels x 10 (at init scale it predicts one class for every
  image) and the synthetic test split: 20 images in batches of 8 (4 padded)."""
  config = tiny_config(test_flip=True, synthetic_num_test=20)
  model = build_model(config)
  variables = jax.jit(lambda x: model.init(jax.random.key(3), x, train=False))(
      jnp.zeros((1, 32, 32, 3)))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 10.0 if 'kernel' in jax.tree_util.keystr(path) else x,
      variables['params'])
  variables = {**variables, 'params': params}
  mesh = distributed.make_mesh()
  sharding = jax.tree.map(lambda x: distributed.replicated(mesh), variables)
  inp = data.build_input(config, with_train=False)
  context = evaluators.Context(config, model, inp, mesh, sharding, jnp.float32)
  return config, model, variables, inp, context


class Relabelled:
  """The eval input with other labels for its real images (in stream order)."""

  def __init__(self, inp, labels):
    self.inp, self.labels = inp, labels

  def eval_iter(self, **split):
    done = 0
    for batch in self.inp.eval_iter(**split):
      keep = np.asarray(batch['mask'], bool)
      label = batch['label'].copy()
      label[keep] = self.labels[done:done + keep.sum()]
      done += keep.sum()
      yield {**batch, 'label': label}


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope='module')
def numpy_probs(setup):
  """({flip: {metric: probabilities [n, C]}}, labels [n]) of the real test images, from
  model.apply on host-normalised images and their numpy mirrors; softmax and averages in
  float64 numpy."""
  config, model, variables, inp, _ = setup
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  views, labels = [[], []], []
  for batch in inp.eval_iter():
    keep = np.asarray(batch['mask'], bool)
    labels.append(batch['label'][keep])
    for k, view in enumerate((batch['image'][keep], batch['image'][keep][:, :, ::-1, :])):
      out = apply(variables, preprocess.normalize(view, config))   # [B, H, W, 3]: W mirrored
      sa, glca = _softmax(out['sa_logits']), _softmax(out['glca_logits'])
      views[k].append({'accuracy': (sa + glca) / 2, 'accuracy_sa': sa, 'accuracy_glca': glca})
  single, mirror = ({m: np.concatenate([p[m] for p in view]) for m in view[0]} for view in views)
  averaged = {m: (single[m] + mirror[m]) / 2 for m in single}
  return {False: single, True: averaged}, np.concatenate(labels)


def top1(probs, labels):
  return {metric: float(np.mean(p.argmax(-1) == labels)) for metric, p in probs.items()}


@pytest.mark.parametrize('labels_from', ['data', 'mirrored_prediction'])
def test_flip_accuracy_equals_an_independent_computation(setup, numpy_probs, labels_from):
  """Scored against the data's labels, and against labels = the numpy flip-averaged SA+GLCA
  prediction (flip accuracy 1 exactly; the single crop's < 1: the mirror changes some
  predictions of this model, so an evaluator that does not flip fails)."""
  config, model, variables, inp, context = setup
  probs, labels = numpy_probs
  if labels_from == 'mirrored_prediction':
    labels = probs[True]['accuracy'].argmax(-1)
    context = evaluators.Context(config, model, Relabelled(inp, labels), context.mesh,
                                 context.variables_sharding, context.dtype)
    assert top1(probs[False], labels)['accuracy'] < 1.0 == top1(probs[True], labels)['accuracy']
  for flip in (False, True):
    got = dict(classification.Evaluator(context, flip=flip).run(variables))
    assert got['num_images'] == 20
    for metric, value in top1(probs[flip], labels).items():
      assert got[metric] == pytest.approx(value, abs=1e-6), (flip, metric)


def test_test_flip_adds_a_flip_entry_beside_the_single_crop(setup, numpy_probs):
  config, _, variables, _, context = setup
  entries = tasks.get('fgvc').default_evals(config)
  assert entries['test'] == {'type': 'classification', 'split': 'test', 'prefix': ''}
  assert entries['flip']['flip'] and entries['flip']['prefix'] == 'flip/'
  assert 'flip' not in tasks.get('fgvc').default_evals(tiny_config())   # default: off
  results, _ = evaluators.Suite(context, eval_mode=True).run(variables)
  probs, labels = numpy_probs
  want = {flip: top1(probs[flip], labels) for flip in (False, True)}
  for metric in ('accuracy', 'accuracy_sa', 'accuracy_glca'):
    assert results[metric] == pytest.approx(want[False][metric], abs=1e-6)
    assert results['flip/' + metric] == pytest.approx(want[True][metric], abs=1e-6)
  line = tasks.get('fgvc').summary_line(results)
  assert f'SA+GLCA {results["accuracy"]:.4f}' in line
  assert f'flip-averaged SA+GLCA {results["flip/accuracy"]:.4f}' in line
  assert evaluators.best_metric(config) == 'accuracy'   # best: still the single crop


def test_test_flip_with_evals_that_never_flip_is_one_line():
  c = tiny_config(test_flip=True)
  c.evals = {'test': {'type': 'classification', 'prefix': ''}}
  with pytest.raises(config_lib.ConfigError, match='test_flip=True but no evaluator') as e:
    checks.checked(c)
  assert '\n' not in str(e.value)
  c.evals = {'test': {'type': 'classification', 'prefix': ''},
             'tta': {'type': 'classification', 'flip': True}}
  checks.checked(c)
  assert 'tta/accuracy' in evaluators.metric_names(c)
