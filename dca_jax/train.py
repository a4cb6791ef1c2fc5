"""Train state, the jitted train step, and the training loop."""

from __future__ import annotations

import functools
import os
import signal
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
from dca_jax import losses
from dca_jax import optim
from dca_jax import reporting
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
  """Pretrained backbone into `params` (host numpy); GLCA from the last SA block if asked."""
  from dca_jax import weights  # pylint: disable=g-import-not-at-top
  vcfg = dcal.vit.get_variant(config.backbone, config_lib.backbone_overrides(config))
  params, report = weights.load_pretrained(
      config.pretrained_model, params, vcfg, posemb_interpolation=config.posemb_interpolation)
  logging.info('pretrained weights: %s', report.summary())
  if config.glca_init_from_sa and 'glca_block' in params:
    params = dict(params)
    params['glca_block'] = jax.tree.map(np.array, params[f'block_{vcfg.depth - 1}'])
    logging.info('GLCA block initialised from block_%d', vcfg.depth - 1)
  return params


def create_train_state(config, model, tx, mesh, *, precision: str, rng,
                       load_pretrained: bool = True) -> tuple[TrainState, Any]:
  """State born replicated on the mesh: shapes from eval_shape, values from a jitted init."""
  shape = (1, *config_lib.input_hw(config), 3)

  def init(rng):
    variables = model.init({'params': rng}, jnp.zeros(shape, jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats'), opt_state=tx.init(params),
                      loss_scale=dynamic_scale_lib.DynamicScale() if precision == 'fp16' else None,
                      skipped=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(
      lambda x: distributed.state_sharding(mesh, x.shape, config.fsdp), abstract)
  state = jax.jit(init, out_shardings=shardings)(rng)
  if config.pretrained_model and load_pretrained:
    params = load_pretrained_params(config, jax.device_get(state.params))
    state = state.replace(params=jax.device_put(params, shardings.params))
  return state, shardings


def make_train_step(model, tx, config, *, dtype, rng):
  """(state, batch) -> (state, metrics). PWCA partners and drop-path masks come from
  fold_in(rng, step), so a resumed run draws exactly what the uninterrupted one would."""
  use_pwca = config.num_pwca_layers > 0
  triplet_margin = config.triplet_margin if config.task == 'reid' else None

  def step_fn(state: TrainState, batch):
    step_rng = jax.random.fold_in(rng, state.step)
    partner_rng, dropout_rng, selection_rng = jax.random.split(step_rng, 3)
    images = batch['image'].astype(dtype)
    partner = dcal.derangement(partner_rng, images.shape[0]) if use_pwca else None
    has_stats = state.batch_stats is not None

    def loss_fn(params):
      variables = {'params': params}
      if has_stats:
        variables['batch_stats'] = state.batch_stats
      out, new_variables = model.apply(
          variables, images, train=True, partner=partner,
          rngs={'dropout': dropout_rng, 'selection': selection_rng},
          mutable=['batch_stats'] if has_stats else [])
      loss, metrics = losses.dcal_loss(out, batch['label'], config.loss_weighting,
                                       label_smoothing=config.label_smoothing,
                                       triplet_margin=triplet_margin)
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
      # Overflow: keep params, statistics and optimizer (and accumulation) state; the scale
      # was lowered.
      keep = lambda new, old: jax.tree.map(functools.partial(jnp.where, is_finite), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      batch_stats = keep(batch_stats, state.batch_stats)
      metrics['loss_scale'] = loss_scale.scale
    skipped = state.skipped + (~is_finite).astype(jnp.int32)
    metrics.update(grad_norm=optax.tree.norm(grads), skipped_steps=skipped)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, loss_scale=loss_scale, skipped=skipped)
    return new_state, metrics

  return step_fn


def make_eval_step(model, *, dtype):
  """Masked sums of correct predictions for SA, GLCA and SA+GLCA (padding counts nowhere)."""

  def eval_step(variables, batch):
    out = model.apply(variables, batch['image'].astype(dtype), train=False)
    mask = batch['mask'].astype(jnp.float32)
    label = batch['label']
    hit = lambda logits: jnp.sum((jnp.argmax(logits, -1) == label) * mask)
    sums = {'correct_sa': hit(out['sa_logits']), 'correct': hit(dcal.predict_probs(out)),
            'count': jnp.sum(mask)}
    if 'glca_logits' in out:
      sums['correct_glca'] = hit(out['glca_logits'])
    return sums

  return eval_step


class Trainer:
  """Everything the train and eval modes share: data, model, mesh, jitted steps, checkpoints."""

  def __init__(self, config, workdir: str, *, read_only: bool = False):
    from dca_jax import data  # pylint: disable=g-import-not-at-top  (TensorFlow: heavy import)
    config_lib.validate(config)
    self.config, self.workdir = config, workdir
    distributed.check_batch_divisible(config.batch_size)
    distributed.check_batch_divisible(config.eval_batch_size, 'eval_batch_size')
    self.dtype, self.precision = distributed.compute_dtype(config.precision)
    self.input = data.build_input(config, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    if self.input.info.num_classes != config.num_classes:
      raise ValueError(f'config.num_classes={config.num_classes} but the {config.dataset} data has '
                       f'{self.input.info.num_classes} classes')
    self.steps_per_epoch = self.input.steps_per_epoch
    self.total_steps = config.max_steps or int(config.num_epochs * self.steps_per_epoch)
    self.mesh = distributed.make_mesh()
    self.batch_sharding = distributed.data_sharding(self.mesh)
    self.model = dcal.build_model(config, dtype=self.dtype)
    self.tx = optim.make_optimizer(config, self.steps_per_epoch)
    self.schedule = optim.learning_rate_schedule(config, self.steps_per_epoch)
    rng = jax.random.key(config.seed)
    init_rng, self.step_rng = jax.random.split(rng)
    self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                              read_only=read_only)
    # Pretrained weights only seed a new run: a resume or an eval restores over them anyway.
    fresh = not read_only and self.checkpointer.latest_step() is None
    self.state, self.shardings = create_train_state(config, self.model, self.tx, self.mesh,
                                                    precision=self.precision, rng=init_rng,
                                                    load_pretrained=fresh)
    self.meta = ckpt_lib.model_meta(config, loss_scale=self.precision == 'fp16')
    replicated = distributed.replicated(self.mesh)
    self.train_step = jax.jit(
        make_train_step(self.model, self.tx, config, dtype=self.dtype, rng=self.step_rng),
        in_shardings=(self.shardings, self.batch_sharding),
        out_shardings=(self.shardings, replicated), donate_argnums=(0,))
    self.eval_step = jax.jit(make_eval_step(self.model, dtype=self.dtype),
                             in_shardings=(self.shardings.variables, self.batch_sharding),
                             out_shardings=replicated)

  def restore(self, step: int) -> None:
    abstract = ckpt_lib.abstract_like(self.state, self.shardings)
    self.state = self.checkpointer.restore(step, abstract, self.meta)

  def evaluate(self) -> dict:
    """Top-1 of SA, GLCA and SA+GLCA over the whole test split, each image counted once."""
    totals = None
    for batch in self.input.eval_iter():
      sums = self.eval_step(self.state.variables,
                            distributed.global_batch(batch, self.batch_sharding))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals['count'])
    result = {'accuracy': totals['correct'] / count, 'accuracy_sa': totals['correct_sa'] / count,
              'num_images': int(count)}
    if 'correct_glca' in totals:
      result['accuracy_glca'] = totals['correct_glca'] / count
    return {k: (v if k == 'num_images' else float(v)) for k, v in result.items()}

  def save(self, accuracy: Optional[float] = None, force: bool = False) -> None:
    self.checkpointer.save(int(jax.device_get(self.state.step)), self.state, self.meta,
                           accuracy=accuracy, force=force)


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def agreed(self, step: int, every: int) -> bool:
    """Whether any host was asked to stop. The save is collective, so with several hosts the
    flags are all-gathered, every `every` steps to keep the hot loop free of host syncs."""
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config, workdir: str) -> dict:
  """The `train` mode: resumes from the latest checkpoint in `workdir` if there is one."""
  import tqdm  # pylint: disable=g-import-not-at-top
  trainer = Trainer(config, workdir)
  cfg, chief = config, jax.process_index() == 0
  if chief:
    print(reporting.banner(cfg, precision=trainer.precision,
                           num_params=count_params(trainer.state.params),
                           steps_per_epoch=trainer.steps_per_epoch), flush=True)
  latest = trainer.checkpointer.latest_step()
  if latest is not None:
    trainer.restore(latest)  # refuses another model's checkpoint before anything is written
    if chief:
      print(f'Resumed from {trainer.checkpointer.directory}/{latest}', flush=True)
  if chief:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))
  writer = reporting.MetricWriter(workdir, cfg, cfg.wandb_project)
  attention_images = reporting.AttentionImages(trainer, num_images=4)  # on every process
  preemption = _Preemption()
  start = int(jax.device_get(trainer.state.step))
  spe = trainer.steps_per_epoch
  batches = trainer.input.train_iter(start_step=start)
  eval_result, bar, t_log, last_logged = {}, None, time.time(), start
  try:
    for step in range(start, trainer.total_steps):
      epoch = step // spe
      if chief and (bar is None or step % spe == 0):
        if bar is not None:
          bar.close()
        done_in_epoch = step % spe
        bar = tqdm.tqdm(total=spe * cfg.batch_size, initial=done_in_epoch * cfg.batch_size,
                        unit='img', desc=f'epoch {epoch + 1}/{cfg.num_epochs}', leave=True,
                        dynamic_ncols=True, mininterval=1.0)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = distributed.global_batch(next(batches), trainer.batch_sharding)
        trainer.state, metrics = trainer.train_step(trainer.state, batch)
      if bar is not None:
        bar.update(cfg.batch_size)
      done = step + 1
      if done % cfg.log_every_steps == 0 or done == trainer.total_steps:
        metrics = jax.device_get(metrics)
        now = time.time()
        metrics['images_per_sec'] = (done - last_logged) * cfg.batch_size / max(now - t_log, 1e-9)
        # the lr of the latest update (MultiSteps counts updates; fp16 skips do not count)
        updates = int(jax.device_get(trainer.state.opt_state.gradient_step))
        metrics['lr'] = float(trainer.schedule(max(updates - 1, 0)))
        metrics['epoch'] = done / spe
        metrics.update(reporting.device_memory())
        t_log, last_logged = now, done
        writer.write(done, metrics, prefix='train/')
        if bar is not None:
          bar.set_postfix({k: f'{float(metrics[k]):.3g}' for k in
                           ('loss', 'ce_sa', 'ce_glca', 'ce_pwca', 'w_sa', 'w_glca', 'w_pwca',
                            'lr', 'peak_mem_gb') if k in metrics}, refresh=False)
      end_of_epoch = done % spe == 0
      is_last = done == trainer.total_steps
      accuracy = None
      if is_last or (end_of_epoch and (done // spe) % cfg.eval_frequency == 0):
        eval_result = trainer.evaluate()
        accuracy = eval_result['accuracy']
        writer.write(done, eval_result, prefix='eval/')
        writer.write_images(done, attention_images(trainer.state.variables), prefix='eval/')
        if chief:
          print(f'\nstep {done}: test top-1 SA+GLCA {accuracy:.4f}, SA '
                f'{eval_result["accuracy_sa"]:.4f}'
                + (f', GLCA {eval_result["accuracy_glca"]:.4f}' if 'accuracy_glca' in eval_result
                   else '') + f' on {eval_result["num_images"]} images', flush=True)
      stop = preemption.agreed(done, cfg.log_every_steps)
      save_now = (is_last or stop
                  or (end_of_epoch and (done // spe) % cfg.save_frequency == 0)
                  or (cfg.save_every_steps and done % cfg.save_every_steps == 0))
      if save_now:
        trainer.save(accuracy=accuracy, force=True)
      if stop:
        if chief:
          print(f'\nSIGTERM: saved step {done}, exiting; run the same command to resume.')
        break
  finally:
    preemption.restore()
    if bar is not None:
      bar.close()
    trainer.checkpointer.close()
    writer.close()
  return eval_result
