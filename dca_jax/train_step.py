"""The train state and the train step: what one physical batch does to the weights.

`TrainState` and `create_train_state` (born sharded: shapes from eval_shape, values from a
jitted init, pretrained weights merged on the host), `train_step` (forward, backward,
optimizer/accumulation update, fp16 overflow handling) and `jit_train_step` (jitted for a mesh
with donated state). The train mode (train.py) runs it in its loop; the memory planner
(plan.py) compiles this same function for a target it does not have.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import dynamic_scale as dynamic_scale_lib

from dca_jax import config_lib
from dca_jax import distributed
from dca_jax import hub
from dca_jax import losses
from dca_jax import tasks
from dca_jax import weights
from dca_jax import xla_cpu
from dca_jax.data import preprocess
from dca_jax.models import dcal


@flax.struct.dataclass
class TrainState:
  step: jax.Array               # micro-steps taken (one physical batch each)
  params: Any
  batch_stats: Any              # running statistics of the Re-ID BN necks (None without them)
  opt_state: Any                # MultiSteps state: the accumulated gradient lives here
  loss_scale: Optional[dynamic_scale_lib.DynamicScale]  # fp16 only
  skipped: jax.Array            # fp16 steps dropped for non-finite gradients

  @property
  def variables(self) -> dict:
    """What `model.apply` needs at inference: the params and the necks' running statistics."""
    if self.batch_stats is None:
      return {'params': self.params}
    return {'params': self.params, 'batch_stats': self.batch_stats}


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def load_pretrained_params(config, params):
  """Pretrained backbone into `params` (host numpy); GLCA from the last SA block if asked.

  `config.pretrained_model` is a path, a Hub id or a known name (dca_jax/hub.py: fetched once,
  verified, cached) or 'none' (params returned as they are)."""
  resolved = hub.resolve(config.pretrained_model, backbone=config.backbone)
  if resolved is None:
    return params
  vit_config = dcal.vit.get_variant(config.backbone, config_lib.backbone_overrides(config))
  grid_hw = tuple(vit_config.grid_size(side) for side in config_lib.input_hw(config))
  params, report = weights.load_pretrained(
      resolved.path, params, vit_config,
      posemb_interpolation=config.posemb_interpolation, grid_hw=grid_hw)
  logging.info('pretrained weights: %s', report.summary())
  description = f'{resolved.describe()}; {len(report.loaded)} arrays loaded'
  glca_loaded = any(name.startswith('glca_block/') for name in report.loaded)  # from a run
  if config.glca_init_from_sa and 'glca_block' in params and not glca_loaded:
    params = dcal.glca_from_last_block(params, vit_config.depth)
    logging.info('GLCA block initialised from block_%d', vit_config.depth - 1)
    description += f', GLCA from block_{vit_config.depth - 1}'
  hub.record_loaded(config.pretrained_model, description)
  return params


def _init_fn(config, model, tx, precision: str):
  """rng -> a fresh TrainState (random init; no pretrained weights)."""
  shape = (1, *config_lib.input_hw(config), 3)

  def init(rng):
    variables = model.init({'params': rng}, jnp.zeros(shape, jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats'), opt_state=tx.init(params),
                      loss_scale=dynamic_scale_lib.DynamicScale() if precision == 'fp16' else None,
                      skipped=jnp.zeros((), jnp.int32))
  return init


def abstract_train_state(config, model, tx, mesh, *, precision: str) -> tuple[Any, Any]:
  """(shapes, shardings) of the train state on `mesh`, without computing it: what the train
  step is compiled for (here and by the memory planner, `plan.py`)."""
  abstract = jax.eval_shape(_init_fn(config, model, tx, precision), jax.random.key(0))
  shardings = jax.tree.map(
      lambda x: distributed.state_sharding(mesh, x.shape, config.fsdp), abstract)
  return abstract, shardings


def create_train_state(config, model, tx, mesh, *, precision: str, rng,
                       load_pretrained: bool = True) -> tuple[TrainState, Any]:
  """State born on the mesh (replicated, or FSDP-sharded): shapes from eval_shape, values from
  a jitted init. Returns (state, its shardings)."""
  _, shardings = abstract_train_state(config, model, tx, mesh, precision=precision)
  state = jax.jit(_init_fn(config, model, tx, precision), out_shardings=shardings)(rng)
  if config.pretrained_model and load_pretrained:
    params = load_pretrained_params(config, jax.device_get(state.params))
    state = state.replace(params=jax.device_put(params, shardings.params))
  return state, shardings


# ============================================================================ train step
def train_step(state: TrainState, batch, *, model, tx, config, dtype, base_rng,
               num_devices: int):
  """(state, batch) -> (state, metrics) for one physical batch over `num_devices`.

  PWCA partners, drop-path masks and random selections come from fold_in(base_rng, step), so
  a resumed run draws exactly what the uninterrupted one would.
  """
  step_rng = jax.random.fold_in(base_rng, state.step)
  partner_rng, dropout_rng, selection_rng = jax.random.split(step_rng, 3)
  images = preprocess.device_normalize(batch['image'], config, dtype)  # uint8 -> dtype
  task = tasks.get(config.task)
  partner = None
  if config.num_pwca_layers > 0:  # within each device's share, or over the global batch
    groups = num_devices if config.pwca_partners == 'per_device' else 1
    partner = task.partners(partner_rng, batch['label'], images.shape[0], groups)
  has_stats = state.batch_stats is not None
  loss_options = task.loss_options(config)

  def loss_fn(params):
    variables = {'params': params, **({'batch_stats': state.batch_stats} if has_stats else {})}
    out, new_variables = model.apply(
        variables, images, train=True, partner=partner,
        rngs={'dropout': dropout_rng, 'selection': selection_rng},
        mutable=['batch_stats'] if has_stats else [])
    loss, metrics = losses.dcal_loss(out, batch['label'], config.loss_weighting,
                                     label_smoothing=config.label_smoothing, **loss_options)
    return loss, (metrics, new_variables.get('batch_stats'))

  if state.loss_scale is not None:
    grad_fn = state.loss_scale.value_and_grad(loss_fn, has_aux=True)
    loss_scale, is_finite, (_, (metrics, batch_stats)), grads = grad_fn(state.params)
  else:
    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    loss_scale, is_finite = None, jnp.array(True)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(jnp.add, state.params, updates)
  if state.loss_scale is not None:
    # Overflow: keep params, statistics and optimizer (and accumulation) state; the scale was
    # lowered.
    keep = lambda new, old: jax.tree.map(functools.partial(jnp.where, is_finite), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    batch_stats = keep(batch_stats, state.batch_stats)
    metrics['loss_scale'] = loss_scale.scale
  skipped = state.skipped + (~is_finite).astype(jnp.int32)
  metrics.update(grad_norm=optax.tree.norm(grads), skipped_steps=skipped)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, loss_scale=loss_scale, skipped=skipped)
  return new_state, metrics


def make_train_step(model, tx, config, *, dtype, rng, num_devices: int = 1):
  """`train_step` with its static parts bound: (state, batch) -> (state, metrics)."""
  return functools.partial(train_step, model=model, tx=tx, config=config, dtype=dtype,
                           base_rng=rng, num_devices=num_devices)


def jit_train_step(model, tx, config, *, dtype, rng, mesh, shardings):
  """`train_step` jitted for `mesh` as training runs it: state in/out with its shardings and
  donated, the batch data-sharded, metrics replicated. The memory planner compiles this same
  function for a GPU target (`plan.py`)."""
  step = make_train_step(model, tx, config, dtype=dtype, rng=rng, num_devices=mesh.devices.size)
  return xla_cpu.jit(step, platform=mesh.devices.flat[0].platform,
                     in_shardings=(shardings, distributed.data_sharding(mesh)),
                     out_shardings=(shardings, distributed.replicated(mesh)), donate_argnums=(0,))
