"""Optimiser: decay mask, schedule, and gradient accumulation == the large batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_config
from dca_jax.models import build_model
from dca_jax import config_lib, distributed, optim, train


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


def test_schedule_scales_lr_by_effective_batch_and_warms_up():
  config = tiny_config(learning_rate=5e-4, batch_size=4, gradient_accumulation_steps=4,
                       warmup_epochs=1.0, num_epochs=10)
  assert config_lib.scaled_learning_rate(config) == 5e-4 * 16 / 512  # paper: 1.5625e-5
  sched = optim.learning_rate_schedule(config, steps_per_epoch=40)  # 10 updates/epoch
  lrs = np.array([sched(i) for i in range(100)])
  assert lrs[0] == 0.0 and np.isclose(lrs[10], 1.5625e-5)
  assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) <= 0)
  assert lrs[-1] < 0.01 * lrs[10]


def _run(config, images, labels, micro):
  """Runs `micro` train steps over equal slices of (images, labels); returns params after each."""
  model = build_model(config)
  tx = optim.make_optimizer(config, steps_per_epoch=micro)
  mesh = distributed.make_mesh()
  state, _ = train.create_train_state(config, model, tx, mesh, precision='fp32',
                                      rng=jax.random.key(0))
  step = jax.jit(train.make_train_step(model, tx, config, dtype=jnp.float32,
                                       rng=jax.random.key(1)),
                 compiler_options={'xla_backend_optimization_level': 0})  # compiles faster
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
  common = dict(num_pwca_layers=0, stochastic_depth_prob=0.0, max_steps=0, num_epochs=1)
  accum = _run(tiny_config(batch_size=4, gradient_accumulation_steps=4, **common), images, labels, 4)
  init, big = _run(tiny_config(batch_size=16, gradient_accumulation_steps=1, **common),
                   images, labels, 1)
  _, last_only = _run(tiny_config(batch_size=4, gradient_accumulation_steps=1, **common),
                      images[12:], labels[12:], 1)
  # Adam's first step moves each weight by about lr (sign-like), so compare updates at 1% of lr;
  # tiny float differences in near-zero gradients are amplified by Adam's normalisation.
  lr = config_lib.scaled_learning_rate(tiny_config(batch_size=16))
  diff = lambda x, y: max(float(jnp.abs(a - b).max()) for a, b in
                          zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  for partial in accum[1:4]:  # MultiSteps holds the params until the 4th micro-batch
    assert diff(partial, init) == 0.0
  assert diff(big, init) > 0.5 * lr          # the update is not trivially zero
  assert diff(last_only, big) > 0.1 * lr     # a wrong accumulation would be caught
  assert diff(accum[4], big) < 0.01 * lr


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
