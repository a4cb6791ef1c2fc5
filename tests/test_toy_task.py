"""A third task in one file: "counting" (how many squares an image holds, 0..3, a class per
count). Everything it adds is registered at run time: its dataset (`data.registry.register`,
a generated in-memory set), the task (`tasks.register`), a loss term (`losses.term`) and an
evaluator (`evaluators.register`). Then it runs as the built-in tasks do: the one validator,
`data.build_input`, one real step of the train-step factory, its evaluator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from dca_jax import (checks, data, distributed, evaluators, inference, losses, tasks,
                     train_step)
from dca_jax.data import registry, sources
from dca_jax.errors import ConfigError
from dca_jax.tasks import fgvc

COUNTS = 4          # 0..3 squares
SIDE, SQUARE = 32, 5


# ------------------------------------------------------------------------------ its dataset
def _render(rng, count: int) -> np.ndarray:
  """Dark noise with `count` bright squares, away from the borders the train crop cuts."""
  image = rng.integers(0, 60, (SIDE, SIDE, 3)).astype(np.uint8)
  cells = rng.permutation(9)[:count]  # one square per cell of a 3 x 3 grid: none overlap
  for cell in cells:
    y, x = 6 + 7 * (cell // 3), 6 + 7 * (cell % 3)
    image[y:y + SQUARE, x:x + SQUARE] = 230
  return image


def squares(spec, process_index, process_count, with_train):
  """The builder of the 'squares' set: (source, DataInfo) from the spec's synthetic sizes."""
  del process_index, process_count, with_train  # generated whole, deterministically
  rng = np.random.default_rng(spec.synthetic_seed)
  images, labels = {}, {}
  for split, size in (('train', spec.synthetic_num_train), ('test', spec.synthetic_num_test)):
    labels[split] = (np.arange(size) % COUNTS).astype(np.int32)
    images[split] = np.stack([_render(rng, int(count)) for count in labels[split]])
  source = sources.ArraySource(images, labels, spec.val_split)
  info = data.DataInfo(num_classes=COUNTS, class_names=[str(k) for k in range(COUNTS)],
                       num_train=source.num_train, num_test=source.num_test, counted='counts')
  return source, info


# ------------------------------------------------------------------------------ its loss term
def count_l1(outputs, branch, labels, options):
  """|expected count - count|: the softmax's mean over the counts against the label."""
  del options
  probs = jax.nn.softmax(outputs[f'{branch}_logits'].astype(jnp.float32), axis=-1)
  expected = probs @ jnp.arange(probs.shape[-1], dtype=jnp.float32)
  loss = jnp.mean(jnp.abs(expected - labels.astype(jnp.float32)))
  return loss, {f'count_l1_{branch}': loss}


# ------------------------------------------------------------------------------ its evaluator
class CountError:
  """Yields count_accuracy (the SA+GLCA prediction's), count_error (mean |predicted - true|
  count) and num_images over a split."""

  in_eval_mode = True
  METRICS = ('count_accuracy', 'count_error')

  def __init__(self, context, split: str = 'test'):
    self.context, self.split = context, split
    forward = inference.forward_fn(context.model, context.config, context.dtype, ('probs',))

    def step(variables, batch):
      guess = jnp.argmax(forward(variables, batch['image'])['probs'], axis=-1)
      mask = batch['mask'].astype(jnp.float32)
      return {'correct': jnp.sum((guess == batch['label']) * mask),
              'error': jnp.sum(jnp.abs(guess - batch['label']) * mask), 'count': jnp.sum(mask)}

    self._step = context.jit(step)

  def run(self, variables):
    totals = self.context.summed(self._step, variables, split=self.split)
    count = float(totals['count'])
    yield 'count_accuracy', float(totals['correct'] / count)
    yield 'count_error', float(totals['error'] / count)
    yield 'num_images', int(count)


# ------------------------------------------------------------------------------ the task
class Counting:
  """The task protocol of dca_jax/tasks/__init__.py, for counting."""

  METRIC = 'count_accuracy'
  PICTURES = 'classes'
  LOSS_TERMS = ('ce', 'count_l1')

  @staticmethod
  def datasets():
    return registry.names(task='counting')

  @staticmethod
  def configure(c):
    c.task, c.dataset, c.data_source, c.num_classes = 'counting', 'squares', 'synthetic', COUNTS

  @staticmethod
  def check(config):
    if config.num_classes not in (0, COUNTS):
      raise ConfigError(f'config.num_classes={config.num_classes}: counting has {COUNTS} counts')

  @staticmethod
  def default_evals(config):
    del config
    return {'test': {'type': 'count_error', 'prefix': ''}}

  @staticmethod
  def bnneck(config):
    del config
    return False

  partners = staticmethod(fgvc.partners)          # any other image of the batch
  batch_fits = staticmethod(fgvc.batch_fits)
  eval_transform = staticmethod(fgvc.eval_transform)   # its Input is the FGVC streams'
  export_transform = staticmethod(fgvc.export_transform)

  @staticmethod
  def loss_options(config):
    return {'terms': config.loss_terms or ','.join(Counting.LOSS_TERMS)}

  @staticmethod
  def summary_line(result):
    return (f'count accuracy {result["count_accuracy"]:.4f}, mean error '
            f'{result["count_error"]:.3f} squares on {result["num_images"]} images')

  @staticmethod
  def protocol(config, info):
    del config
    return {'counts': list(info.class_names)}

  @staticmethod
  def export_outputs(config):
    del config
    return ('probs',)


@pytest.fixture
def counting(monkeypatch):
  """The four registrations, on copies of the tables that the test's end puts back."""
  for module, table in ((registry, '_ENTRIES'), (tasks, '_REGISTERED'),
                        (evaluators, '_REGISTERED'), (losses, 'TERMS')):
    monkeypatch.setattr(module, table, dict(getattr(module, table)))
  registry.register('squares', task='counting', sources={'synthetic': squares},
                    input_class=data.Input, generated=True)
  tasks.register('counting', Counting)
  losses.term('count_l1')(count_l1)
  evaluators.register('count_error', CountError)
  config = tiny_config(synthetic_num_train=16, synthetic_num_test=8)   # the tiny model's sizes
  tasks.get('counting').configure(config)
  return config


def test_registering_checks_the_protocols(counting):
  with pytest.raises(ConfigError, match="task 'half' lacks datasets, configure"):
    tasks.register('half', type('Half', (), {'METRIC': 'x', 'PICTURES': 'classes'}))
  with pytest.raises(ConfigError, match="task 'counting' exists already"):
    tasks.register('counting', Counting)
  with pytest.raises(ConfigError, match="evaluator type 'count_error' exists already"):
    evaluators.register('count_error', CountError)
  with pytest.raises(ConfigError, match="loss term 'count_l1' exists already"):
    losses.term('count_l1')(count_l1)
  assert 'counting' in tasks.names() and 'count_error' in evaluators.types()
  with pytest.raises(ConfigError, match="is not a fgvc dataset.*task='counting'"):
    checks.checked(tiny_config(dataset='squares'))


def test_a_third_task_trains_a_step_and_evaluates(counting):
  config = checks.checked(counting)
  assert evaluators.best_metric(config) == 'count_accuracy'
  inp = data.build_input(config)
  assert (inp.info.num_classes, inp.info.counted, inp.steps_per_epoch) == (COUNTS, 'counts', 4)
  batch = next(inp.train_iter())
  assert batch['image'].shape == (4, 32, 32, 3) and set(batch['label'].tolist()) <= {0, 1, 2, 3}

  mesh = distributed.make_mesh()
  built = train_step.build(config, mesh)
  state = built.init(load_pretrained=False)
  state, metrics = built.step(state, distributed.global_batch(
      batch, distributed.data_sharding(mesh)))
  metrics = jax.device_get(metrics)
  for branch in ('sa', 'glca', 'pwca'):   # the toy term beside the CE, on every branch
    assert 0.0 <= float(metrics[f'count_l1_{branch}']) <= COUNTS - 1, metrics
    assert np.isfinite(float(metrics[f'ce_{branch}']))
  assert np.isfinite(float(metrics['loss'])) and int(state.step) == 1

  suite = evaluators.Suite(evaluators.Context(config, built.model, inp, mesh,
                                              built.shardings.variables, built.dtype))
  results, pictures = suite.run(state.variables)
  assert results['num_images'] == 8 and not pictures
  assert 0.0 <= results['count_accuracy'] <= 1.0 and 0.0 <= results['count_error'] <= COUNTS - 1
  assert Counting.summary_line(results).endswith('squares on 8 images')
