"""Optimiser: AdamW (decoupled decay) or SGD with momentum (L2 decay), decay masks, warm-up +
cosine, clipping, a learning-rate multiplier for the loss weights, MultiSteps accumulation."""

from __future__ import annotations

import re

import flax
import jax.numpy as jnp
import optax

from dca_jax import config_lib

# Parameters that get no weight decay: biases, norm scales, the position embedding, the CLS
# token and DCAL's loss weights (METHOD.md [decision]). Everything else (kernels) decays.
NO_DECAY_PATTERNS = (r'(^|/)bias$', r'(^|/)scale$', r'(^|/)pos_embed$', r'(^|/)cls_token$',
                     r'^loss_weights$')


def decay_mask(params):
  """A tree of bools: True where weight decay applies (regex over '/'-joined param paths)."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  mask = {path: not any(re.search(p, path) for p in NO_DECAY_PATTERNS) for path in flat}
  return flax.traverse_util.unflatten_dict(mask, sep='/')


def loss_weights_mask(params):
  """True only at the uncertainty loss weights (`loss_weights_lr_multiplier` applies there)."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  return flax.traverse_util.unflatten_dict({p: p == 'loss_weights' for p in flat}, sep='/')


def num_optimizer_steps(config, steps_per_epoch: int) -> int:
  """Updates over the whole run (micro-steps / accumulation)."""
  micro_steps = config_lib.total_steps(config, steps_per_epoch)
  return max(1, micro_steps // config.gradient_accumulation_steps)


def learning_rate_schedule(config, steps_per_epoch: int):
  """update index c (0-based) -> its learning rate, counted in optimizer updates (MultiSteps
  hands the inner optimizer the number of updates applied so far: micro-steps and fp16's
  skipped steps do not count).

  Warm-up over W updates: update c < W runs at init + (peak - init)·(c + 1)/W, with init =
  `warmup_factor` x peak, so the first update moves the weights even from init 0 (at c it
  would run at lr 0) and update W-1 reaches the peak, lr · effective_batch /
  lr_reference_batch, as TransReID's (timm's) scheduler runs epoch e at its warm-up value at e.
  Then cosine to floor = `min_lr_factor` x peak: `warmup_prefix` (timm's name) from the peak at
  update W to the floor at update `total`; else, as timm without it (TransReID), the cosine of
  the whole run, update c at its value at c + 1 (the warm-up overrides its start up to update
  W - 2, and the peak itself is never used), so the last update runs at the floor."""
  total = num_optimizer_steps(config, steps_per_epoch)
  warmup = int(config.warmup_epochs * steps_per_epoch / config.gradient_accumulation_steps)
  warmup = min(warmup, total - 1)
  peak = config_lib.scaled_learning_rate(config)
  curve = optax.warmup_cosine_decay_schedule(
      init_value=config.warmup_factor * peak, peak_value=peak, warmup_steps=warmup,
      decay_steps=total, end_value=config.min_lr_factor * peak)
  if config.warmup_prefix:
    return lambda count: curve(jnp.where(count < warmup, count + 1, count))
  floor = config.min_lr_factor * peak
  whole = lambda count: floor + 0.5 * (peak - floor) * (
      1 + jnp.cos(jnp.pi * jnp.minimum(count + 1, total) / total))
  # timm's _get_lr(t): warm-up while t < W, so t = W is already on the cosine
  return lambda count: jnp.where(count + 1 < warmup, curve(count + 1), whole(count))


def partial_update_warning(config, steps_per_epoch: int) -> str | None:
  """One line when the run's micro-steps are not a whole number of updates (MultiSteps would
  accumulate the last ones and never apply them), else None."""
  micro = config_lib.total_steps(config, steps_per_epoch)
  k = config.gradient_accumulation_steps
  if micro % k == 0:
    return None
  return (f'warning: the run is {micro} micro-steps, not a multiple of '
          f'gradient_accumulation_steps={k}: the last {micro % k} micro-batch(es) are '
          f'accumulated but never applied ({micro // k} updates); set --config.max_steps='
          f'{micro - micro % k} or {micro - micro % k + k} to say which you mean')


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(config, steps_per_epoch)
  parts = []
  if config.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(config.max_grad_norm))
  if config.optimizer == 'adamw':
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                             weight_decay=config.weight_decay, mask=decay_mask))
  else:  # sgd: L2 decay added to the gradient before momentum, as torch.optim.SGD does
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum))
  # Updates are linear in the learning rate (Adam's m/sqrt(v) ignores a gradient scale, so the
  # update itself is scaled): the w_b move at lr x multiplier, everything else at lr. Always in
  # the chain (stateless), so the optimizer state has one structure whatever the multiplier.
  parts.append(optax.masked(optax.scale(config.loss_weights_lr_multiplier), loss_weights_mask))
  tx = optax.chain(*parts)
  # MultiSteps averages `gradient_accumulation_steps` micro-batch gradients into one update, so
  # batch 4 x 4 gives the update of batch 16. (An fp16 step with non-finite gradients is undone
  # afterwards in the train step: params and this state, accumulation included, are kept.)
  return optax.MultiSteps(tx, every_k_schedule=config.gradient_accumulation_steps)
