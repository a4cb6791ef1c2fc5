"""Optimiser: decay mask, schedule, and gradient accumulation == the large batch."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from dca_jax import config_lib, distributed, optim, train, train_step
from dca_jax.models import build_model


def _paths(tree, want):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path) for path, v in flat if bool(v) == want}


def test_decay_mask_excludes_bias_norm_posembed_cls_lossweights():
  config = tiny_config()
  model = build_model(config)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])
  mask = optim.decay_mask(params)
  no_decay, decay = _paths(mask, False), _paths(mask, True)
  assert 'loss_weights' in no_decay
  assert 'embed/pos_embed' in no_decay and 'embed/cls_token' in no_decay
  assert 'block_0/norm1/scale' in no_decay and 'block_0/attn/qkv/bias' in no_decay
  assert 'glca_norm/bias' in no_decay
  # every kernel decays, nothing else does
  assert decay == {p for p in decay | no_decay if p.endswith('kernel')}


def _reference_lr(c, warmup, total, peak, init, floor, prefix=True):
  """The lr of update c (0-based), written out: warm-up init -> peak over updates 1..W (as
  TransReID's scheduler runs epoch e at init + e·(peak - init)/W), then cosine from the peak at
  update W to the floor at update `total` (prefix), or timm's CosineLRScheduler without
  warmup_prefix (TransReID's, solver/cosine_lr.py): cosine over the whole run at c + 1."""
  if not prefix:  # timm's _get_lr(t) at t = c + 1
    t = c + 1
    if t < warmup:
      return init + (peak - init) * t / warmup
    return floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * t / total))
  if c < warmup:
    return init + (peak - init) * (c + 1) / warmup
  return floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * (c - warmup) / (total - warmup)))


@pytest.mark.parametrize('init,floor,prefix', [(0.0, 0.0, True),      # FGVC
                                               (0.01, 0.002, False)])  # Re-ID (TransReID's)
def test_schedule_scales_lr_by_effective_batch_warms_up_and_decays_to_its_floor(init, floor,
                                                                                prefix):
  config = tiny_config(learning_rate=5e-4, batch_size=4, gradient_accumulation_steps=4,
                       warmup_epochs=1.0, num_epochs=10, warmup_factor=init, min_lr_factor=floor,
                       warmup_prefix=prefix)
  peak = config_lib.scaled_learning_rate(config)
  assert peak == 5e-4 * 16 / 512  # paper: 1.5625e-5
  sched = optim.learning_rate_schedule(config, steps_per_epoch=40)  # 10 updates/epoch
  lrs = np.array([sched(c) for c in range(100)])
  want = [_reference_lr(c, 10, 100, peak, init * peak, floor * peak, prefix) for c in range(100)]
  np.testing.assert_allclose(lrs, want, rtol=1e-5, atol=1e-6 * peak)  # float32 near 0
  assert lrs[0] > 0  # the first update moves the weights, even from warmup_factor 0
  assert np.isclose(lrs[9], peak if prefix else want[9]) and np.isclose(float(sched(100)),
                                                                         floor * peak)
  if not prefix:  # the last update runs at the floor, as TransReID's last epoch
    assert np.isclose(lrs[99], floor * peak)


def test_a_run_that_is_not_whole_updates_warns_once_at_start(tmp_path, capsys):
  config = tiny_config(gradient_accumulation_steps=4, max_steps=10)
  assert optim.partial_update_warning(tiny_config(gradient_accumulation_steps=4, max_steps=12),
                                      5) is None
  line = optim.partial_update_warning(config, 5)
  assert 'the last 2 micro-batch(es)' in line and '(2 updates)' in line and 'max_steps=8' in line
  trainer = types.SimpleNamespace(
      precision='fp32', steps_per_epoch=5, resume_step=None,
      built=types.SimpleNamespace(pretrained=None),
      input=types.SimpleNamespace(info=types.SimpleNamespace(protocol='')),
      state=types.SimpleNamespace(params={'w': np.zeros(3)}, step=0))
  train._start(trainer, config, str(tmp_path), chief=True)
  err = capsys.readouterr().err
  assert [l for l in err.splitlines() if l.startswith('warning:')] == [line]


def _run(config, images, labels, micro):
  """Runs `micro` train steps over equal slices of (images, labels); returns params after each."""
  model = build_model(config)
  tx = optim.make_optimizer(config, steps_per_epoch=micro)
  mesh = distributed.make_mesh()
  state, _ = train_step.create_train_state(config, model, tx, mesh, precision='fp32',
                                      rng=jax.random.key(0))
  step = jax.jit(train_step.make_train_step(model, tx, config, dtype=jnp.float32,
                                       rng=jax.random.key(1)))
  history = [jax.device_get(state.params)]
  n = len(images) // micro
  for i in range(micro):
    state, _ = step(state, {'image': images[i * n:(i + 1) * n], 'label': labels[i * n:(i + 1) * n]})
    history.append(jax.device_get(state.params))
  return history


def test_four_microbatches_of_four_equal_one_batch_of_sixteen():
  # PWCA off: its partner is drawn within each physical batch, so it cannot match across sizes.
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 4, 16).astype(np.int32)
  # Plain SGD: the update is -lr x the gradient, so the comparison is of the gradients
  # themselves (Adam's m/sqrt(v) would amplify float noise in the gradients near its eps,
  # e.g. the key biases', whose gradient is 0 in exact arithmetic).
  common = dict(num_pwca_layers=0, stochastic_depth_prob=0.0, max_steps=0, num_epochs=1,
                optimizer='sgd', momentum=0.0, weight_decay=0.0)
  accumulating = tiny_config(batch_size=4, gradient_accumulation_steps=4, **common)
  accum = _run(accumulating, images, labels, 4)
  init, big = _run(tiny_config(batch_size=16, gradient_accumulation_steps=1, **common),
                   images, labels, 1)
  # the last micro-batch four times: the update of that batch alone (the same compiled step)
  last_only = _run(accumulating, np.concatenate([images[12:]] * 4),
                   np.concatenate([labels[12:]] * 4), 4)[4]
  diff = lambda x, y: max(float(jnp.abs(a - b).max()) for a, b in
                          zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  for partial in accum[1:4]:  # MultiSteps holds the params until the 4th micro-batch
    assert diff(partial, init) == 0.0
  moved = diff(big, init)
  assert moved > 1e-4                        # the update is not trivially zero
  assert diff(last_only, big) > 0.1 * moved  # a wrong accumulation would be caught
  assert diff(accum[4], big) < 1e-3 * moved


def _one_params():
  return {'loss_weights': jnp.array([0.0, 0.1, -0.2]), 'head': {'kernel': jnp.ones((2, 3)),
                                                               'bias': jnp.zeros(3)}}


def _updates(config, grads, steps=3):
  """Params after `steps` updates with the same gradient (1 micro-step per update)."""
  tx = optim.make_optimizer(config, steps_per_epoch=100)
  params = _one_params()
  state = tx.init(params)
  history = []
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(jnp.add, params, updates)
    history.append(params)
  return history


def test_loss_weights_learn_at_lr_times_the_multiplier():
  """Adam's step is lr·m̂/(√v̂+ε) whatever the gradient's scale: the multiplier scales the w_b
  steps, and nothing else."""
  grads = {'loss_weights': jnp.array([0.5, -1e-3, 2.0]),
           'head': {'kernel': jnp.full((2, 3), 0.3), 'bias': jnp.full(3, -0.1)}}
  base = dict(gradient_accumulation_steps=1, warmup_epochs=0.0, num_epochs=100,
              learning_rate=0.512, batch_size=1)  # lr 1e-3 at the start of the cosine
  one = _updates(tiny_config(loss_weights_lr_multiplier=1.0, **base), grads)
  ten = _updates(tiny_config(loss_weights_lr_multiplier=10.0, **base), grads)
  start = _one_params()['loss_weights']
  for a, b in zip(one, ten):
    np.testing.assert_allclose(b['loss_weights'] - start, 10 * (a['loss_weights'] - start),
                               rtol=1e-5)
    for k in ('kernel', 'bias'):
      np.testing.assert_array_equal(a['head'][k], b['head'][k])
  # numpy Adam's first step: -lr·g/(|g| + ε), no decay on the loss weights
  g = np.array([0.5, -1e-3, 2.0])
  np.testing.assert_allclose(one[0]['loss_weights'] - start, -1e-3 * g / (np.abs(g) + 1e-8),
                             rtol=1e-4)


def test_sgd_is_torch_sgd_with_l2_decay_on_kernels():
  """torch.optim.SGD(lr, momentum, weight_decay): d = g + wd·p; b = μ·b + d; p -= lr·b."""
  grads = {'loss_weights': jnp.array([0.5, 0.1, 2.0]),
           'head': {'kernel': jnp.full((2, 3), 0.3), 'bias': jnp.full(3, -0.1)}}
  config = tiny_config(optimizer='sgd', momentum=0.9, weight_decay=1e-2, learning_rate=0.512,
                       batch_size=1, gradient_accumulation_steps=1, warmup_epochs=0.0,
                       num_epochs=1000)
  history = _updates(config, grads)
  sched = optim.learning_rate_schedule(config, 100)
  for path in (('head', 'kernel'), ('head', 'bias'), ('loss_weights',)):
    p = np.asarray(functools.reduce(lambda t, k: t[k], path, _one_params()), np.float64)
    g = np.asarray(functools.reduce(lambda t, k: t[k], path, grads), np.float64)
    decay = 1e-2 if path[-1] == 'kernel' else 0.0
    buf = None
    for i, params in enumerate(history):
      d = g + decay * p
      buf = d if buf is None else 0.9 * buf + d
      p = p - float(sched(i)) * buf
      np.testing.assert_allclose(functools.reduce(lambda t, k: t[k], path, params), p,
                                 rtol=1e-5, atol=1e-7)


class _Theta(nn.Module):
  """A one-parameter 'model' for the train step: logits [θ, 0], so with label 1 the loss is
  log(1 + e^θ) and its gradient σ(θ), known in closed form. A non-finite image makes the loss
  NaN (an fp16 skip)."""

  @nn.compact
  def __call__(self, images, *, train=False, partner=None):
    del train, partner
    theta = self.param('theta', nn.initializers.constant(0.5), ())
    poison = 0.0 * jnp.mean(images.astype(jnp.float32), axis=(1, 2, 3))  # 0, or NaN
    logits = jnp.stack([theta + poison, jnp.zeros_like(poison)], axis=-1)
    return {'sa_logits': logits, 'loss_weights': self.param('loss_weights', nn.initializers.zeros,
                                                            (3,))}


def test_train_step_applies_and_logger_logs_the_lr_of_each_update_fp16_skips_not_counted():
  """Accumulation 2, 4 updates of warm-up then cosine, TransReID's start and floor; micro-step
  3 is an fp16 skip. Plain SGD on θ: each update moves θ by -lr·σ(θ). The schedule counts
  applied updates, so the skip does not advance it and the run (planned as 16 micro-steps =
  8 updates) ends one update short of the floor (docs/METHOD.md says so)."""
  config = tiny_config(precision='fp16', num_classes=2, num_pwca_layers=0, batch_size=2,
                       gradient_accumulation_steps=2, optimizer='sgd', momentum=0.0,
                       weight_decay=0.0, loss_weighting='sum', learning_rate=0.4,
                       lr_reference_batch=4, warmup_epochs=1.0, num_epochs=2,
                       warmup_factor=0.01, min_lr_factor=0.002, warmup_prefix=False)
  steps_per_epoch, warmup, total, peak = 8, 4, 8, 0.4  # micro-steps; updates; updates; lr
  model, tx = _Theta(), optim.make_optimizer(config, steps_per_epoch)
  state, _ = train_step.create_train_state(config, model, tx, distributed.make_mesh(),
                                      precision='fp16', rng=jax.random.key(0))
  step = jax.jit(train_step.make_train_step(model, tx, config, dtype=jnp.float16,
                                       rng=jax.random.key(1)))
  trainer = types.SimpleNamespace(config=config, steps_per_epoch=steps_per_epoch, state=state,
                                  schedule=optim.learning_rate_schedule(config, steps_per_epoch))
  logger = train._Logger(trainer, types.SimpleNamespace(write=lambda *a, **k: None), 0)
  good = {'image': np.zeros((2, 32, 32, 3), np.float32), 'label': np.ones(2, np.int32)}
  bad = dict(good, image=np.full((2, 32, 32, 3), np.inf, np.float32))
  theta, updates, logged = 0.5, 0, []
  for micro in range(2 * total):  # the planned run: 16 micro-steps
    trainer.state, metrics = step(trainer.state, bad if micro == 3 else good)
    applied = (micro + (micro > 3)) % 2 == 1 and micro != 3  # micro-steps 1, 4, 6, 8, ...
    if applied:
      lr = _reference_lr(updates, warmup, total, peak, 0.01 * peak, 0.002 * peak, prefix=False)
      theta -= lr * (1 / (1 + np.exp(-theta)))
      updates += 1
      logged.append((logger._record(micro + 1, metrics)['lr'], lr))
    np.testing.assert_allclose(float(trainer.state.params['theta']), theta, rtol=1e-5,
                               err_msg=f'micro-step {micro}')
  assert int(trainer.state.skipped) == 1 and updates == total - 1
  np.testing.assert_allclose(*zip(*logged), rtol=1e-5)
  assert logged[0][0] > 0 and logged[-1][0] > 0.002 * peak * 1.5  # ended short of the floor
