"""The train step: fp16 loss scaling (an overflowing step leaves no trace), the BN necks across
micro-steps, the loss weighting and label smoothing reaching the step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_leaves_equal, tiny_config, tiny_reid_config
from flax.training import dynamic_scale as dynamic_scale_lib

from dca_jax import distributed, optim, train_step
from dca_jax.data import preprocess
from dca_jax.models import build_model, dcal



def _scale(state, scale):
  # float32, not weak: the step's own output type, so the step compiles once
  return state.replace(loss_scale=dynamic_scale_lib.DynamicScale(
      scale=jnp.asarray(scale, jnp.float32)))


def test_fp16_overflow_skip_leaves_no_trace_and_bn_necks_follow_the_micro_steps():
  """Re-ID (BN necks), fp16, 2 micro-steps per update, SGD. An overflowing step keeps params,
  optimizer (accumulation included) and neck statistics bit for bit and halves the scale. Each
  later micro-step moves the necks' running statistics by its own batch (PyTorch's BatchNorm1d
  updates at every forward, accumulation or not); the params move only at the second. Loss
  scales 2^10 and 2^4 accumulate the same gradient (it is unscaled)."""
  config = tiny_reid_config(precision='fp16', gradient_accumulation_steps=2, optimizer='sgd')
  model = build_model(config, dtype=jnp.float16)
  tx = optim.make_optimizer(config, steps_per_epoch=8)
  state, _ = train_step.create_train_state(config, model, tx, distributed.make_mesh(),
                                      precision='fp16', rng=jax.random.key(0))
  step = jax.jit(train_step.make_train_step(model, tx, config, dtype=jnp.float16,
                                       rng=jax.random.key(1)))
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(2, dtype=np.int32), 4)  # P x K = 2 x 4
  batches = [{'image': rng.integers(0, 256, (8, 32, 16, 3), dtype=np.uint8), 'label': labels}
             for _ in range(2)]
  before = jax.device_get(state)
  on_mesh = jax.tree.map(lambda a: a.sharding, state)
  placed = lambda s: jax.device_put(s, on_mesh)  # the shardings the step compiled for
  # A scale this large makes the fp16 backward pass overflow.
  after, metrics = step(placed(_scale(state, 6e4 ** 3)), batches[0])
  after = jax.device_get(after)
  assert_leaves_equal((before.params, before.opt_state, before.batch_stats),
                (after.params, after.opt_state, after.batch_stats))
  assert float(after.loss_scale.scale) == pytest.approx(0.5 * 6e4 ** 3)
  assert int(after.skipped) == 1 and int(metrics['skipped_steps']) == 1

  # after the skip: two micro-steps from the kept state (bitwise the state before the overflow:
  # the skip can leave no trace there); the first only accumulates, the second updates
  s1, _ = step(placed(_scale(after, 2.0 ** 10)), batches[0])
  s2, m2 = step(s1, batches[1])
  s1, s2 = jax.device_get((s1, s2))
  assert int(m2['skipped_steps']) == 1
  assert_leaves_equal(s1.params, before.params)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s2.params),
                                                         jax.tree.leaves(before.params)))
  assert moved > 1e-4
  # the accumulated gradient is unscaled: the same micro-step under scale 2^4 accumulates it too
  other, _ = step(placed(_scale(after, 2.0 ** 4)), batches[0])
  accumulated = [np.asarray(g) for g in jax.tree.leaves(s1.opt_state.acc_grads)]
  largest = max(np.abs(g).max() for g in accumulated)
  assert largest > 1e-3
  for g, o in zip(accumulated, jax.tree.leaves(jax.device_get(other.opt_state.acc_grads))):
    np.testing.assert_allclose(o, g, rtol=1e-2, atol=1e-3 * largest)
  # the necks: running mean/var after each micro-step, from the branch features (fp16 forward
  # with the params of that micro-step) and BatchNorm1d's update rule
  normalize = lambda x: preprocess.device_normalize(x, config, jnp.float16)
  forward = jax.jit(lambda p, s, x: model.apply({'params': p, 'batch_stats': s}, normalize(x)))
  expected = jax.tree.map(np.asarray, before.batch_stats)
  for batch, got in zip(batches, (s1, s2)):
    out = forward(before.params, before.batch_stats, batch['image'])
    for head, branch in (('head', 'sa'), ('glca_head', 'glca')):
      feature = np.asarray(out[f'{branch}_feature'], np.float64)
      stats = expected[head]['bnneck']
      stats['mean'] = 0.9 * stats['mean'] + 0.1 * feature.mean(0)
      stats['var'] = 0.9 * stats['var'] + 0.1 * feature.var(0, ddof=1)
      for k in ('mean', 'var'):
        np.testing.assert_allclose(got.batch_stats[head]['bnneck'][k], stats[k], rtol=2e-3,
                                   atol=2e-3, err_msg=f'{head} {k}')


def test_loss_weighting_sum_and_label_smoothing_reach_the_train_step():
  """The step's loss is Σ_b CE_b with smoothed targets (1 - ε)·onehot + ε/C, recomputed here
  from the model's outputs for the step's own partners; the w_b get no gradient and stay."""
  config = tiny_config(loss_weighting='sum', label_smoothing=0.2)
  model = build_model(config)
  tx = optim.make_optimizer(config, steps_per_epoch=8)
  state, _ = train_step.create_train_state(config, model, tx, distributed.make_mesh(),
                                      precision='fp32', rng=jax.random.key(0))
  base = jax.random.key(1)
  step = jax.jit(train_step.make_train_step(model, tx, config, dtype=jnp.float32, rng=base))
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
           'label': np.array([0, 1, 2, 3], np.int32)}
  before = jax.device_get(state)
  new, metrics = step(state, batch)
  partner_rng, dropout_rng, selection_rng = jax.random.split(jax.random.fold_in(base, 0), 3)
  out = jax.jit(lambda p, x: model.apply(  # one compile, not one per primitive
      {'params': p}, preprocess.device_normalize(x, config), train=True,
      partner=dcal.derangement(partner_rng, 4),
      rngs={'dropout': dropout_rng, 'selection': selection_rng}))(before.params,
                                                                         batch['image'])
  target = 0.8 * np.eye(4)[batch['label']] + 0.2 / 4
  ce = {}
  for branch in ('sa', 'glca', 'pwca'):
    z = np.asarray(out[f'{branch}_logits'], np.float64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    ce[branch] = -(target * logp).sum(1).mean()
    assert float(metrics[f'ce_{branch}']) == pytest.approx(ce[branch], rel=1e-5)
  assert float(metrics['loss']) == pytest.approx(sum(ce.values()), rel=1e-5)
  np.testing.assert_array_equal(jax.device_get(new.params['loss_weights']),
                                before.params['loss_weights'])
