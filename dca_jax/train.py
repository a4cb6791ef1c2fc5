"""Training: the train state, the train step, and the loop of the `train` mode.

Read top to bottom: `TrainState` and `create_train_state` (born sharded: shapes from
eval_shape, values from a jitted init), `train_step` (one physical batch: forward, backward,
optimizer/accumulation update, fp16 overflow handling), `Trainer` (what a run is built from)
and `train_and_evaluate` (the loop: log, evaluate, save, pre-empt).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import dynamic_scale as dynamic_scale_lib

from dca_jax import checkpoint as ckpt_lib
from dca_jax import config_lib
from dca_jax import distributed
from dca_jax import evaluators
from dca_jax import lock as lock_lib
from dca_jax import losses
from dca_jax import optim
from dca_jax import reporting
from dca_jax import tasks
from dca_jax.data import preprocess
from dca_jax.models import build_model, dcal


# ============================================================================ state
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
  from dca_jax import hub, weights  # pylint: disable=g-import-not-at-top
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
  return jax.jit(step, in_shardings=(shardings, distributed.data_sharding(mesh)),
                 out_shardings=(shardings, distributed.replicated(mesh)), donate_argnums=(0,))


# ============================================================================ a run
class Trainer:
  """What a training run is built from: data, model, mesh, state, jitted step, checkpoints."""

  def __init__(self, config, workdir: str):
    from dca_jax import data  # pylint: disable=g-import-not-at-top  (TensorFlow: heavy import)
    config_lib.validate(config)
    self.config, self.workdir = config, workdir
    distributed.check_batch_divisible(config.batch_size)
    distributed.check_batch_divisible(config.eval_batch_size, 'eval_batch_size')
    if (config.num_pwca_layers and config.pwca_partners == 'per_device'
        and config.batch_size // jax.device_count() < 2):
      raise ValueError(f'PWCA pairs images within each device: config.batch_size='
                       f'{config.batch_size} over {jax.device_count()} devices leaves fewer than '
                       '2 per device; use a larger batch or --config.pwca_partners=global')
    self.dtype, self.precision = distributed.compute_dtype(config.precision)
    self.input = data.build_input(config, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    if self.input.info.num_classes != config.num_classes:
      raise ValueError(f'config.num_classes={config.num_classes} but the {config.dataset} data has '
                       f'{self.input.info.num_classes} classes')
    self.steps_per_epoch = self.input.steps_per_epoch
    self.total_steps = config_lib.total_steps(config, self.steps_per_epoch)
    self.mesh = distributed.make_mesh()
    self.batch_sharding = distributed.data_sharding(self.mesh)
    self.model = build_model(config, dtype=self.dtype)
    self.tx = optim.make_optimizer(config, self.steps_per_epoch)
    self.schedule = optim.learning_rate_schedule(config, self.steps_per_epoch)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    # One writer per workdir (process 0 holds the lock for all hosts), taken before the
    # checkpoint manager, which cleans up unfinished saves: those of a live run are not ours.
    self.lock = lock_lib.acquire(workdir, say=print) if jax.process_index() == 0 else None
    self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    # The newest intact checkpoint: damaged ones are named and moved aside (nothing deleted).
    self.resume_step = self.checkpointer.newest_intact_step(set_aside=True)
    from dca_jax import hub  # pylint: disable=g-import-not-at-top
    if self.resume_step is not None and not hub.is_scratch(config.pretrained_model):
      print(f'Resuming {self.checkpointer.directory}/{self.resume_step}: pretrained_model '
            f'{config.pretrained_model} is not loaded nor fetched (the checkpoint holds the '
            'trained weights)', flush=True)
      hub.record_loaded(config.pretrained_model, None)  # the banner says so too
    self.state, self.shardings = create_train_state(
        config, self.model, self.tx, self.mesh, precision=self.precision, rng=init_rng,
        load_pretrained=self.resume_step is None)
    self.meta = ckpt_lib.model_meta(config, loss_scale=self.precision == 'fp16')
    self.train_step = jit_train_step(self.model, self.tx, config, dtype=self.dtype,
                                     rng=step_rng, mesh=self.mesh, shardings=self.shardings)
    self.evals = evaluators.Suite(evaluators.Context(
        config, self.model, self.input, self.mesh, self.shardings.variables, self.dtype))
    self.best_metric = config_lib.best_metric(config)

  def evaluate(self, variables) -> tuple[dict, dict]:
    """(results, pictures) of the run's evaluators (`config.evals`) on `variables`."""
    return self.evals.run(variables)

  def restore(self, step: int) -> int:
    """Restores `step`, or if its files turn out unreadable (a step killed before it was
    sealed), the newest intact one before it. Returns the step restored."""
    abstract = ckpt_lib.abstract_like(self.state, self.shardings)
    while True:
      try:
        self.state = self.checkpointer.restore(step, abstract, self.meta)
        return step
      except ckpt_lib.DamagedCheckpointError as e:
        if jax.process_count() > 1:
          raise  # the hosts would have to agree on the fallback: one line, then a re-run
        print(self.checkpointer.report_damaged(step, e.reason, set_aside=True), flush=True)
        step = self.checkpointer.newest_intact_step(set_aside=True)
        if step is None:
          raise ckpt_lib.CheckpointError(
              f'no intact checkpoint is left in {self.checkpointer.directory} (the damaged ones '
              f'are in {os.path.join(os.path.abspath(self.workdir), ckpt_lib.DAMAGED_DIR)}); run '
              'the same command again to train from the start') from None

  def save(self, score: Optional[float] = None) -> None:
    step = int(jax.device_get(self.state.step))
    self.check_finite(step, 'before saving')  # never a checkpoint of non-finite weights
    self.checkpointer.save(step, self.state, self.meta, score=score, force=True)

  def check_finite(self, step: int, when: str) -> None:
    """Raises NonFiniteError if the params (or neck statistics) hold a NaN/inf. One reduction
    on the device and one scalar to the host: called only where the loop syncs anyway."""
    if not bool(_all_finite(self.state.variables)):
      raise NonFiniteError(self._diverged_line(step, f'the weights are not finite ({when})'))

  def check_metrics(self, step: int, metrics: dict, previous_log: int) -> None:
    """The finite-loss guard, on the metrics the logger already brought to the host. fp16:
    a non-finite loss is a skipped step (the weights are kept); only non-finite weights stop."""
    bad = {k: float(metrics[k]) for k in ('loss', 'grad_norm')
           if k in metrics and not np.isfinite(float(metrics[k]))}
    if not bad:
      return
    if self.state.loss_scale is not None:
      self.check_finite(step, 'fp16')
      return
    values = ', '.join(f'{k}={v}' for k, v in bad.items())
    raise NonFiniteError(self._diverged_line(
        step, f'{values} (finite at step {previous_log}, the log before)'
        if previous_log > 0 else values))

  def _diverged_line(self, step: int, what: str) -> str:
    last = self.checkpointer.latest_step()
    good = (f'the last good checkpoint is {self.checkpointer.directory}/{last} (a re-run resumes '
            'from it)' if last is not None else 'no checkpoint was saved before')
    return (f'training diverged at step {step}: {what}; stopped without saving; {good}; lower '
            '--config.learning_rate or set --config.max_grad_norm')

  def close(self) -> None:
    """Seals the last save (SaveError if it failed), then frees the workdir lock."""
    try:
      self.checkpointer.close()
    finally:
      if self.lock is not None:
        self.lock.release()


class NonFiniteError(RuntimeError):
  """The loss or the weights became NaN/inf (fp16's skipped steps excepted)."""


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# ============================================================================ the loop
def is_time(count: int, every: int) -> bool:
  """Whether `count` (steps or epochs done) is a multiple of `every` (0 = never)."""
  return every > 0 and count % every == 0


class Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def agreed(self, step: int, every: int) -> bool:
    """Whether any host was asked to stop. The save is collective, so with several hosts the
    flags are all-gathered, every `every` steps to keep the hot loop free of host syncs."""
    if jax.process_count() == 1:
      return self.requested
    if not is_time(step, every):
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class _Logger:
  """Turns the train step's metrics into log records every `log_every_steps` micro-steps."""

  def __init__(self, trainer: Trainer, writer: reporting.MetricWriter, start_step: int):
    self.trainer, self.writer = trainer, writer
    self.last_step, self.last_time = start_step, time.time()

  def __call__(self, steps_done: int, metrics) -> dict:
    """Writes the records, then stops the run if the loss is not finite (the check rides on
    this host transfer: the hot loop gains no sync)."""
    previous = self.last_step
    metrics = self._record(steps_done, metrics)
    self.trainer.check_metrics(steps_done, metrics, previous)
    return metrics

  def _record(self, steps_done: int, metrics) -> dict:
    metrics = jax.device_get(metrics)
    now = time.time()
    images = (steps_done - self.last_step) * self.trainer.config.batch_size
    metrics['images_per_sec'] = images / max(now - self.last_time, 1e-9)
    # the lr of the latest update (MultiSteps counts updates; fp16 skips do not count)
    updates = int(jax.device_get(self.trainer.state.opt_state.gradient_step))
    metrics['lr'] = float(self.trainer.schedule(max(updates - 1, 0)))
    metrics['epoch'] = steps_done / self.trainer.steps_per_epoch
    metrics.update(reporting.device_memory())
    self.last_step, self.last_time = steps_done, now
    self.writer.write(steps_done, metrics, prefix='train/')
    return metrics


def _start(trainer: Trainer, config, workdir: str, chief: bool) -> int:
  """The banner, the resume (which refuses another model's checkpoint before anything is
  written), then config.json. Returns the micro-step to start from."""
  if chief:
    print(reporting.banner(config, precision=trainer.precision,
                           num_params=count_params(trainer.state.params),
                           steps_per_epoch=trainer.steps_per_epoch), flush=True)
    partial = optim.partial_update_warning(config, trainer.steps_per_epoch)
    if partial:
      print(partial, file=sys.stderr, flush=True)
  if trainer.resume_step is not None:
    trainer.resume_step = trainer.restore(trainer.resume_step)
    if chief:
      print(f'Resumed from {trainer.checkpointer.directory}/{trainer.resume_step}', flush=True)
  if chief:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  return int(jax.device_get(trainer.state.step))


def train_and_evaluate(config, workdir: str) -> dict:
  """The `train` mode: resumes from the latest checkpoint in `workdir` if there is one."""
  chief = jax.process_index() == 0
  # Taken before the data and the model are built: a second writer is refused at once.
  lock = lock_lib.acquire(workdir, say=print) if chief else None
  try:
    trainer = Trainer(config, workdir)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  try:
    start = _start(trainer, config, workdir, chief)
  except BaseException:
    trainer.close()
    raise
  writer = reporting.MetricWriter(workdir, config, config.wandb_project)
  summary_line = tasks.get(config.task).summary_line
  progress = reporting.EpochProgress(config, trainer.steps_per_epoch, enabled=chief)
  logger = _Logger(trainer, writer, start)
  preemption = Preemption()
  batches = trainer.input.train_iter(start_step=start)
  result = {}
  try:
    for step in range(start, trainer.total_steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = distributed.global_batch(next(batches), trainer.batch_sharding)
        trainer.state, metrics = trainer.train_step(trainer.state, batch)
      steps_done = step + 1
      is_last = steps_done == trainer.total_steps
      epoch_end = steps_done % trainer.steps_per_epoch == 0
      epochs_done = steps_done // trainer.steps_per_epoch
      progress.step(steps_done)
      # --- log
      if is_time(steps_done, config.log_every_steps) or is_last:
        progress.show(logger(steps_done, metrics))
      # --- evaluate
      score = None
      if is_last or (epoch_end and is_time(epochs_done, config.eval_frequency)):
        trainer.check_finite(steps_done, 'before evaluating')
        result, pictures = trainer.evaluate(trainer.state.variables)
        score = float(result[trainer.best_metric])
        writer.write(steps_done, result, prefix='eval/')
        writer.write_images(steps_done, pictures, prefix='eval/')
        if chief:
          print(f'\nstep {steps_done}: test {summary_line(result)}', flush=True)
      # --- save, pre-empt
      stop = preemption.agreed(steps_done, config.log_every_steps)
      if (is_last or stop or (epoch_end and is_time(epochs_done, config.save_frequency))
          or is_time(steps_done, config.save_every_steps)):
        trainer.save(score)
      if stop:
        if chief:
          print(f'\nSIGTERM: saved step {steps_done}, exiting; run the same command to resume.')
        break
  finally:
    failing = sys.exc_info()[1] is not None  # then that error is the one line shown
    preemption.restore()
    progress.close()
    try:
      trainer.close()  # seals the last save: a failed one raises SaveError (one line) here
    finally:
      try:
        writer.close()
      except OSError:  # e.g. a full disk: the error already on its way says so
        if not failing:
          raise
  return result
