"""The train state and the train step: what one physical batch does to the weights.

`build(config, mesh)` is the one way to put a step together: the model, the optimizer, the
abstract state and its shardings, the loss the step differentiates and the jitted step. The
train mode (train.py) runs `Built.step` in its loop, the memory planner (dca_jax/plan/) and the
program compiler compile it for targets they do not have, and the benchmarks time it and read
the residuals of `Built.loss` — so every figure describes the function that trains.

Underneath: `TrainState` (born sharded: shapes from eval_shape, values from a jitted init,
pretrained weights merged on the host), `loss_fn` (preprocessing, PWCA partners, forward and
`losses.dcal_loss` with the task's options), `train_step` (forward, backward,
optimizer/accumulation update, fp16 overflow handling) and `jit_train_step` (jitted for a mesh,
the state donated).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

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
from dca_jax import optim
from dca_jax import tasks
from dca_jax import weights
from dca_jax import xla_cpu
from dca_jax.data import preprocess
from dca_jax.errors import ConfigError
from dca_jax.models import build_model, dcal

DTYPES = distributed.DTYPES   # precision -> compute dtype (the benchmarks' flags list them)


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
  """`load_pretrained`'s params only."""
  return load_pretrained(config, params)[0]


def load_pretrained(config, params) -> tuple[Any, Optional[str]]:
  """Pretrained backbone into `params` (host numpy); GLCA from the last SA block if asked.
  Returns (params, what was loaded in words for the banner; None when nothing was).

  `config.pretrained_model` is a path, a Hub id or a known name (dca_jax/hub.py: fetched once,
  verified, cached) or 'none' (params returned as they are)."""
  resolved = hub.resolve(config.pretrained_model, backbone=config.backbone)
  if resolved is None:
    return params, None
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
  return params, description


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
  state, _ = _born(config, model, tx, precision, shardings, rng, load_pretrained)
  return state, shardings


def _born(config, model, tx, precision, shardings, rng, with_pretrained: bool):
  """(state on its shardings, what pretrained weights were loaded in words or None)."""
  state = jax.jit(_init_fn(config, model, tx, precision), out_shardings=shardings)(rng)
  description = None
  if config.pretrained_model and with_pretrained:
    params, description = load_pretrained(config, jax.device_get(state.params))
    state = state.replace(params=jax.device_put(params, shardings.params))
  return state, description


# ============================================================================ train step
def loss_fn(params, batch_stats, batch, rng, *, model, config, dtype, num_devices: int):
  """The loss the train step differentiates: (params, neck statistics or None, a uint8 batch,
  the step's rng) -> (loss, (metrics, updated neck statistics)).

  Preprocessing on the device, the task's PWCA partners (within each device's share, or over the
  global batch), the forward with drop-path and selection rngs, `losses.dcal_loss` with the
  task's terms and options. The one place the loss is written: the benchmarks' residual and
  breakdown figures read this same function.
  """
  partner_rng, dropout_rng, selection_rng = jax.random.split(rng, 3)
  images = preprocess.device_normalize(batch['image'], config, dtype)  # uint8 -> dtype
  task = tasks.get(config.task)
  partner = None
  if config.num_pwca_layers > 0:
    groups = num_devices if config.pwca_partners == 'per_device' else 1
    partner = task.partners(partner_rng, batch['label'], images.shape[0], groups)
  has_stats = batch_stats is not None
  variables = {'params': params, **({'batch_stats': batch_stats} if has_stats else {})}
  out, new_variables = model.apply(
      variables, images, train=True, partner=partner,
      rngs={'dropout': dropout_rng, 'selection': selection_rng},
      mutable=['batch_stats'] if has_stats else [])
  loss, metrics = losses.dcal_loss(out, batch['label'], config.loss_weighting,
                                   label_smoothing=config.label_smoothing,
                                   **task.loss_options(config))
  return loss, (metrics, new_variables.get('batch_stats'))


def train_step(state: TrainState, batch, *, model, tx, config, dtype, base_rng,
               num_devices: int):
  """(state, batch) -> (state, metrics) for one physical batch over `num_devices`.

  PWCA partners, drop-path masks and random selections come from fold_in(base_rng, step), so
  a resumed run draws exactly what the uninterrupted one would.
  """
  step_rng = jax.random.fold_in(base_rng, state.step)
  loss = functools.partial(loss_fn, batch_stats=state.batch_stats, batch=batch, rng=step_rng,
                           model=model, config=config, dtype=dtype, num_devices=num_devices)
  if state.loss_scale is not None:
    grad_fn = state.loss_scale.value_and_grad(loss, has_aux=True)
    loss_scale, is_finite, (_, (metrics, batch_stats)), grads = grad_fn(state.params)
  else:
    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
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


# ============================================================================ the factory
def pwca_batch_fits(config, batch_size: int, num_devices: int) -> bool:
  """Whether PWCA can pair images in a physical batch: per-device partners need >= 2 images on
  each device (the trainer refuses, the planner skips such a batch)."""
  return not (config.num_pwca_layers and config.pwca_partners == 'per_device'
              and batch_size // num_devices < 2)


@dataclasses.dataclass
class Built:
  """A train step put together for a config and a mesh (`build`)."""
  config: Any
  model: Any
  tx: optax.GradientTransformation
  mesh: Any
  dtype: Any
  precision: str                  # 'fp32' | 'bf16' | 'fp16' (the resolved one)
  abstract_state: TrainState      # ShapeDtypeStructs carrying their shardings
  shardings: TrainState
  init_rng: jax.Array
  step_rng: jax.Array
  step: Callable                  # jitted (state, batch) -> (state, metrics), the state donated
  pretrained: Optional[str] = None  # what `init` loaded, in words (None: nothing)

  def loss(self, params, batch_stats, batch, rng):
    """`loss_fn` of this step: (loss, (metrics, neck statistics))."""
    return loss_fn(params, batch_stats, batch, rng, model=self.model, config=self.config,
                   dtype=self.dtype, num_devices=self.mesh.devices.size)

  def init(self, *, load_pretrained: bool = True) -> TrainState:
    """The concrete state on the mesh; pretrained weights merged unless told not to (a resume)."""
    state, self.pretrained = _born(self.config, self.model, self.tx, self.precision,
                                   self.shardings, self.init_rng, load_pretrained)
    return state

  def abstract_batch(self, batch_size: Optional[int] = None) -> dict:
    """{'image': uint8, 'label': int32} ShapeDtypeStructs of a global batch, data-sharded."""
    b = batch_size or int(self.config.batch_size)
    h, w = config_lib.input_hw(self.config)
    sharding = distributed.data_sharding(self.mesh)
    return {'image': jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=sharding),
            'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding)}

  def lower(self):
    """The step lowered for the abstract state and batch (compile it for the mesh's devices)."""
    return self.step.lower(self.abstract_state, self.abstract_batch())


def build(config, mesh, *, precision: Optional[str] = None, steps_per_epoch: int = 1000,
          rng=None) -> Built:
  """The train step of `config` on `mesh`, as training runs it.

  precision: None resolves config.precision for the mesh's platform ('auto': bf16 on GPU/TPU,
  fp32 on CPU); the planner passes the one it resolved for its target. steps_per_epoch sets the
  schedule (it changes no shape). rng: the init and step keys come from it (default
  key(config.seed), split in two as training does).
  """
  if not config.num_classes:
    raise ConfigError('the train step holds the classifier: config.num_classes must be set (0 '
                      'takes the count from the data, which only training reads)')
  num_devices = mesh.devices.size
  if not pwca_batch_fits(config, int(config.batch_size), num_devices):
    raise ConfigError(f'PWCA pairs images within each device: config.batch_size='
                      f'{config.batch_size} over {num_devices} devices leaves fewer than 2 per '
                      'device; use a larger batch or --config.pwca_partners=global')
  if precision is None:
    dtype, precision = distributed.compute_dtype(config.precision, config.attention_impl)
  else:
    dtype = DTYPES[precision]
  model = build_model(config, dtype=dtype)
  tx = optim.make_optimizer(config, steps_per_epoch)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed) if rng is None else rng)
  abstract, shardings = abstract_train_state(config, model, tx, mesh, precision=precision)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  step = jit_train_step(model, tx, config, dtype=dtype, rng=step_rng, mesh=mesh,
                        shardings=shardings)
  return Built(config=config, model=model, tx=tx, mesh=mesh, dtype=dtype, precision=precision,
               abstract_state=abstract, shardings=shardings, init_rng=init_rng,
               step_rng=step_rng, step=step)
