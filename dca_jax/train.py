"""The `train` mode: a run built from its parts (`Trainer`) and the loop that trains it.

Read top to bottom: `Trainer` (data, model, mesh, state, the jitted step of train_step.py,
evaluators, checkpoints), the loop's helpers (pre-emption, logging) and `train_and_evaluate`
(the loop: step, log, evaluate, save, pre-empt).
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dca_jax import checkpoint as ckpt_lib
from dca_jax import checks
from dca_jax import config_lib
from dca_jax import data
from dca_jax import distributed
from dca_jax import evaluators
from dca_jax import hub
from dca_jax import lock as lock_lib
from dca_jax import optim
from dca_jax import plan
from dca_jax import reporting
from dca_jax import tasks
from dca_jax.errors import NonFiniteError  # noqa: F401  (train.NonFiniteError)
from dca_jax import train_step


# ============================================================================ a run
def _with_data_classes(config, info):
  """`config` with `num_classes` as the data has it (0: taken from the data, and then recorded
  in config.json and the checkpoint); a count that disagrees with the data is one line."""
  if not config.num_classes:
    config = copy.deepcopy(config)
    config.num_classes = info.num_classes
  elif info.num_classes != config.num_classes:
    counted = info.counted  # 'classes', 'train identities', ...: the data says what it counts
    if getattr(info, 'num_val_ids', 0):
      counted += f' ({info.num_val_ids} more held out by config.val_split)'
    raise ValueError(f'config.num_classes={config.num_classes} but the {config.dataset} data '
                     f'has {info.num_classes} {counted}: set --config.num_classes='
                     f'{info.num_classes}, or 0 to take it from the data')
  return config


class Trainer:
  """What a training run is built from: data, model, mesh, state, jitted step, checkpoints."""

  def __init__(self, config, workdir: str):
    """`config`: checked (dca_jax/checks.py), as train_and_evaluate passes it."""
    self.config, self.workdir = config, workdir
    distributed.check_batch_divisible(config.batch_size)
    distributed.check_batch_divisible(config.eval_batch_size, 'eval_batch_size')
    self.input = data.build_input(config, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    config = self.config = _with_data_classes(config, self.input.info)
    self.steps_per_epoch = self.input.steps_per_epoch
    self.total_steps = config_lib.total_steps(config, self.steps_per_epoch)
    self.mesh = distributed.make_mesh()
    self.batch_sharding = distributed.data_sharding(self.mesh)
    # The one factory of the step (train_step.build): the planner and benchmarks use it too.
    self.built = train_step.build(config, self.mesh, steps_per_epoch=self.steps_per_epoch)
    self.model, self.tx = self.built.model, self.built.tx
    self.dtype, self.precision = self.built.dtype, self.built.precision
    self.schedule = optim.learning_rate_schedule(config, self.steps_per_epoch)
    # One writer per workdir (process 0 holds the lock for all hosts), taken before the
    # checkpoint manager, which cleans up unfinished saves: those of a live run are not ours.
    self.lock = lock_lib.acquire(workdir, say=print) if jax.process_index() == 0 else None
    self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    # The newest intact checkpoint: damaged ones are named and moved aside (nothing deleted).
    self.resume_step = self.checkpointer.newest_intact_step(set_aside=True)
    if self.resume_step is not None and not hub.is_scratch(config.pretrained_model):
      print(f'Resuming {self.checkpointer.directory}/{self.resume_step}: pretrained_model '
            f'{config.pretrained_model} is not loaded nor fetched (the checkpoint holds the '
            'trained weights)', flush=True)
    self.state = self.built.init(load_pretrained=self.resume_step is None)
    self.shardings = self.built.shardings
    self.meta = ckpt_lib.model_meta(config, loss_scale=self.precision == 'fp16')
    self.train_step = self.built.step
    self.evals = evaluators.Suite(evaluators.Context(
        config, self.model, self.input, self.mesh, self.shardings.variables, self.dtype))
    self.best_metric = evaluators.best_metric(config)

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

  def due(self, steps_done: int, what: str) -> bool:
    """Whether the loop should `log`, `eval` or `save` after `steps_done` micro-steps: at the
    end, and at their frequencies (epochs; saves also every `save_every_steps`)."""
    config = self.config
    if steps_done == self.total_steps:
      return True
    if what == 'log':
      return is_time(steps_done, config.log_every_steps)
    epochs_done, epoch_end = divmod(steps_done, self.steps_per_epoch)
    if what == 'eval':
      return epoch_end == 0 and is_time(epochs_done, config.eval_frequency)
    return ((epoch_end == 0 and is_time(epochs_done, config.save_frequency))
            or is_time(steps_done, config.save_every_steps))

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
                           num_params=train_step.count_params(trainer.state.params),
                           pretrained=trainer.built.pretrained,
                           steps_per_epoch=trainer.steps_per_epoch,
                           protocol=trainer.input.info.protocol,
                           selection=evaluators.selection_warning(config)), flush=True)
    # no memory plan at start (auto_batch's plan chose remat itself): the precision rule only
    warnings = reporting.hardware_warnings(config, trainer.precision)
    partial = optim.partial_update_warning(config, trainer.steps_per_epoch)
    for line in warnings + ([partial] if partial else []):
      print(line, file=sys.stderr, flush=True)
  if trainer.resume_step is not None:
    trainer.resume_step = trainer.restore(trainer.resume_step)
    if chief:
      print(f'Resumed from {trainer.checkpointer.directory}/{trainer.resume_step}', flush=True)
  if chief:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  return int(jax.device_get(trainer.state.step))


def _evaluate(trainer: Trainer, writer: reporting.MetricWriter, steps_done: int,
              say) -> tuple[dict, float]:
  """The run's evaluators on the current weights: written, said (`say`: on its own line,
  between progress bars); (results, best score)."""
  trainer.check_finite(steps_done, 'before evaluating')
  result, pictures = trainer.evaluate(trainer.state.variables)
  writer.write(steps_done, result, prefix='eval/')
  writer.write_images(steps_done, pictures, prefix='eval/')
  say(f'step {steps_done}: test {tasks.get(trainer.config.task).summary_line(result)}')
  return result, float(result[trainer.best_metric])


def _loop(trainer: Trainer, start: int, chief: bool, began: float) -> dict:
  """Steps from `start` to the end (or a SIGTERM): log, evaluate and save when due; then the
  closing summary (`began`: when the run started, time.monotonic())."""
  config = trainer.config
  writer = reporting.MetricWriter(trainer.workdir, config, config.wandb_project)
  progress = reporting.EpochProgress(config, trainer.steps_per_epoch, enabled=chief)
  logger = _Logger(trainer, writer, start)
  preemption = Preemption()
  batches = trainer.input.train_iter(start_step=start)
  result, last_eval, stop, steps_done = {}, 0, False, start
  try:
    for step in range(start, trainer.total_steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = distributed.global_batch(next(batches), trainer.batch_sharding)
        trainer.state, metrics = trainer.train_step(trainer.state, batch)
      steps_done = step + 1
      progress.step(steps_done)
      if trainer.due(steps_done, 'log'):
        progress.show(logger(steps_done, metrics))
      score = None
      if trainer.due(steps_done, 'eval'):
        result, score = _evaluate(trainer, writer, steps_done, progress.write)
        last_eval = steps_done
      stop = preemption.agreed(steps_done, config.log_every_steps)
      if stop or trainer.due(steps_done, 'save'):
        trainer.save(score)
      if stop:
        progress.write(f'SIGTERM: saved step {steps_done}, exiting; run the same command to '
                       'resume.')
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
  if chief:
    print(_summary(trainer, writer, result, last_eval, steps_done, stop, began), flush=True)
  return result


def _summary(trainer: Trainer, writer: reporting.MetricWriter, result: dict, last_eval: int,
             steps_done: int, stopped: bool, began: float) -> str:
  """The closing summary: steps, time, the last and the best evaluation, where the files are."""
  task = tasks.get(trainer.config.task)
  last = f'last eval, step {last_eval}: {task.summary_line(result)}' if result else ''
  best_step = trainer.checkpointer.best_step()
  metrics_path = os.path.join(os.path.abspath(trainer.workdir), 'metrics.jsonl')
  score = reporting.best_evaluation(metrics_path, trainer.best_metric, best_step)
  best = (f'best {trainer.best_metric}: {score:.4f} at step {best_step} (--checkpoint best)'
          if score is not None else '')
  latest = trainer.checkpointer.latest_step()
  paths = {'checkpoints': f'{trainer.checkpointer.directory}'
                          + (f' (latest step {latest})' if latest is not None else ''),
           'metrics': metrics_path,
           'TensorBoard': (os.path.abspath(writer.tensorboard_dir) if writer.tensorboard
                           else 'off (not installed)')}
  return reporting.closing_summary(steps_done=steps_done, total_steps=trainer.total_steps,
                                   seconds=time.monotonic() - began, last=last, best=best,
                                   paths=paths, stopped=stopped)


def train_and_evaluate(config, workdir: str) -> dict:
  """The `train` mode: resumes from the latest checkpoint in `workdir` if there is one.
  Returns the last evaluation's results."""
  config = checks.checked(config)
  if config.auto_batch:  # the planner picks batch x accumulation and remat (plan.py)
    config = plan.apply_auto_batch(config)
  began = time.monotonic()
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
    start = _start(trainer, trainer.config, workdir, chief)  # num_classes from the data
  except BaseException:
    trainer.close()
    raise
  return _loop(trainer, start, chief, began)
