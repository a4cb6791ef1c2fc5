"""Optimiser: decay mask, schedule, and gradient accumulation == the large batch."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_config
from dca_jax import config_lib, distributed, optim, train
from dca_jax.models import dcal


def _paths(tree, want):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path) for path, v in flat if bool(v) == want}


def test_decay_mask_excludes_bias_norm_posembed_cls_lossweights():
  config = tiny_config()
  model = dcal.build_model(config)
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
  model = dcal.build_model(config)
  tx = optim.make_optimizer(config, steps_per_epoch=micro)
  mesh = distributed.make_mesh()
  state, _ = train.create_train_state(config, model, tx, mesh, precision='fp32',
                                      rng=jax.random.key(0))
  step = jax.jit(train.make_train_step(model, tx, config, dtype=jnp.float32,
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
