"""FGVC test-time augmentation: the classification evaluator's `flip` option and the
`test_flip` knob (a 'flip/' entry beside the single crop). A tiny random DCAL, no training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from dca_jax import config_lib, data, distributed, evaluators, tasks
from dca_jax.data import preprocess
from dca_jax.evaluators import classification
from dca_jax.models import build_model


@pytest.fixture(scope='module')
def setup():
  """A tiny random DCAL with its kernels x 10 (at init scale it predicts one class for every
  image) and the synthetic test split: 20 images in batches of 8 (4 padded)."""
  config = tiny_config(test_flip=True, synthetic_num_test=20)
  model = build_model(config)
  variables = model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)), train=False)
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
def test_flip_accuracy_equals_an_independent_computation(setup, labels_from):
  """Scored against the data's labels, and against labels = the numpy flip-averaged SA+GLCA
  prediction (flip accuracy 1 exactly; the single crop's < 1: the mirror changes some
  predictions of this model, so an evaluator that does not flip fails)."""
  config, model, variables, inp, context = setup
  probs, labels = numpy_probs(setup)
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


def test_test_flip_adds_a_flip_entry_beside_the_single_crop(setup):
  config, _, variables, _, context = setup
  entries = tasks.get('fgvc').default_evals(config)
  assert entries['test'] == {'type': 'classification', 'split': 'test', 'prefix': ''}
  assert entries['flip']['flip'] and entries['flip']['prefix'] == 'flip/'
  assert 'flip' not in tasks.get('fgvc').default_evals(tiny_config())   # default: off
  results, _ = evaluators.Suite(context, eval_mode=True).run(variables)
  probs, labels = numpy_probs(setup)
  want = {flip: top1(probs[flip], labels) for flip in (False, True)}
  for metric in ('accuracy', 'accuracy_sa', 'accuracy_glca'):
    assert results[metric] == pytest.approx(want[False][metric], abs=1e-6)
    assert results['flip/' + metric] == pytest.approx(want[True][metric], abs=1e-6)
  line = tasks.get('fgvc').summary_line(results)
  assert f'SA+GLCA {results["accuracy"]:.4f}' in line
  assert f'flip-averaged SA+GLCA {results["flip/accuracy"]:.4f}' in line
  assert config_lib.best_metric(config) == 'accuracy'   # best: still the single crop


def test_test_flip_with_evals_that_never_flip_is_one_line():
  c = tiny_config(test_flip=True)
  c.evals = {'test': {'type': 'classification', 'prefix': ''}}
  with pytest.raises(config_lib.ConfigError, match='test_flip=True but no evaluator') as e:
    config_lib.validate(c)
  assert '\n' not in str(e.value)
  c.evals = {'test': {'type': 'classification', 'prefix': ''},
             'tta': {'type': 'classification', 'flip': True}}
  config_lib.validate(c)
  assert 'tta/accuracy' in evaluators.metric_names(c)
