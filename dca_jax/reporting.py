"""What the user sees: the start banner, the progress bar, device memory and the metric writers
(JSON lines, TensorBoard, wandb; the attention pictures of dca_jax/evaluators/attention.py go
to TensorBoard through `write_images`)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np

from dca_jax import config_lib
from dca_jax import hub
from dca_jax.data._tf import tensorflow


def run_length(config, steps_per_epoch: int) -> str:
  """What the run will do, in steps and epochs (max_steps, when set, decides)."""
  total = config_lib.total_steps(config, steps_per_epoch)
  epochs = total / steps_per_epoch
  epochs_text = f'{epochs:g}' if epochs >= 1 and float(epochs).is_integer() else f'{epochs:.2f}'
  why = f' (max_steps={config.max_steps})' if config.max_steps else ''
  plural = '' if epochs_text == '1' else 's'
  return (f'{steps_per_epoch} steps/epoch; this run: {total} steps = {epochs_text} epoch{plural}'
          f'{why}')


def banner(config, *, precision: str, num_params: int, steps_per_epoch: int,
           protocol: str = '') -> str:
  """The start banner, in the words of the PyTorch memory guide users know."""
  check = lambda on: '✓' if on else '✗'
  half = precision in ('bf16', 'fp16')
  prec_name = {'fp16': 'FP16, dynamic loss scaling', 'bf16': 'BF16', 'fp32': 'FP32'}[precision]
  remat = config.use_gradient_checkpointing
  lines = [
      f'{check(half)} Mixed precision training {"enabled" if half else "disabled"} ({prec_name})',
      f'{check(remat)} Gradient checkpointing '
      + ('enabled (trades compute for memory)' if remat else 'disabled')
      + (f', policy {config.remat_policy}' if remat else ''),
      f'Model initialized with {num_params / 1e6:.2f}M parameters ({config.backbone}, '
      f'DCAL L={config.num_sa_layers} M={config.num_glca_layers} T={config.num_pwca_layers}, '
      f'R={config.top_k_ratio:g})',
      hub.banner_line(config.pretrained_model),
      f'Physical batch size: {config.batch_size}'
      + (' (auto_batch: the memory plan\'s choice)' if config.auto_batch else ''),
      f'Gradient accumulation steps: {config.gradient_accumulation_steps}',
      f'Effective batch size: {config.batch_size * config.gradient_accumulation_steps}',
      f'Devices: {jax.device_count()} x {jax.devices()[0].device_kind} '
      f'({jax.process_count()} process{"es" if jax.process_count() > 1 else ""})',
      f'Input: {config.dataset} ({config.data_source}), {config.input_size}px, '
      f'{run_length(config, steps_per_epoch)}'
      + (f'; Re-ID protocol: {protocol}' if protocol else ''),
  ]
  return '\n'.join(lines)


class EpochProgress:
  """One tqdm bar per epoch (images, img/s, ETA) with the latest losses and weights after it."""
  SHOWN = ('loss', 'ce_sa', 'ce_glca', 'ce_pwca', 'triplet_sa', 'w_sa', 'w_glca', 'w_pwca', 'lr',
           'peak_mem_gb')

  def __init__(self, config, steps_per_epoch: int, enabled: bool = True):
    self.config, self.steps_per_epoch, self.enabled = config, steps_per_epoch, enabled
    self.bar = None

  def step(self, steps_done: int) -> None:
    """Called after each micro-step: opens the epoch's bar when needed and advances it."""
    if not self.enabled:
      return
    import tqdm  # pylint: disable=g-import-not-at-top
    batch = self.config.batch_size
    if self.bar is None or (steps_done - 1) % self.steps_per_epoch == 0:
      self.close()
      epoch = (steps_done - 1) // self.steps_per_epoch
      done_in_epoch = (steps_done - 1) % self.steps_per_epoch
      self.bar = tqdm.tqdm(total=self.steps_per_epoch * batch, initial=done_in_epoch * batch,
                           unit='img', desc=f'epoch {epoch + 1}/{self.config.num_epochs}',
                           leave=True, dynamic_ncols=True, mininterval=1.0)
    self.bar.update(batch)

  def show(self, metrics: dict) -> None:
    if self.bar is not None:
      self.bar.set_postfix({k: f'{float(metrics[k]):.3g}' for k in self.SHOWN if k in metrics},
                           refresh=False)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def device_memory() -> dict:
  """Bytes in use / peak on the first local device, where the backend reports them."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # CPU backends may not implement it.
    stats = {}
  out = {}
  if 'bytes_in_use' in stats:
    out['mem_gb'] = stats['bytes_in_use'] / 1e9
  if 'peak_bytes_in_use' in stats:
    out['peak_mem_gb'] = stats['peak_bytes_in_use'] / 1e9
  return out


class MetricWriter:
  """JSON lines in the workdir + TensorBoard, and wandb when a project is set. Process 0 only.

  TensorBoard event files go to `workdir/tensorboard` through flax's `SummaryWriter`; when it
  cannot start (its `tensorboard`/TensorFlow packages missing) one `warning:` line on stderr says
  so and the JSON lines go on alone. wandb requested but not installed is a user error.
  """

  def __init__(self, workdir: str, config=None, wandb_project: str = ''):
    self.active = jax.process_index() == 0
    self.tensorboard_dir = os.path.join(workdir, 'tensorboard')
    self._tb = None
    self._wandb = None
    if not self.active:
      return
    wandb = None
    if wandb_project:
      # Checked before any file is opened: a run that cannot log where asked does not start.
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ValueError('config.wandb_project is set but wandb is not installed: '
                         'pip install wandb') from e
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = _tensorboard_writer(self.tensorboard_dir)
    if wandb is not None:
      self._wandb = wandb.init(project=wandb_project, dir=workdir,
                               config=config.to_dict() if config is not None else None)

  @property
  def tensorboard(self) -> bool:
    """Whether event files are being written (on this process)."""
    return self._tb is not None

  def write(self, step: int, metrics: dict, prefix: str = '') -> None:
    """The scalar entries of `metrics` (numbers and 0-d arrays; text such as the dataset's
    version is left to eval.json)."""
    if not self.active:
      return
    scalars = {f'{prefix}{k}': float(v) for k, v in metrics.items()
               if isinstance(v, (int, float, np.number)) or np.ndim(v) == 0 and
               np.issubdtype(np.asarray(v).dtype, np.number)}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.scalar(k, v, int(step))
      self._tb.flush()  # once per call, not per scalar: a live TensorBoard sees each log step
    if self._wandb is not None:
      self._wandb.log(scalars, step=int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray], prefix: str = '') -> None:
    """TensorBoard images: tag -> uint8 [H, W, 3] or a stack [K, H, W, 3] (K shown per step)."""
    if not self.active or self._tb is None:
      return
    for tag, image in images.items():
      image = np.asarray(image)
      count = image.shape[0] if image.ndim == 4 else 1
      self._tb.image(f'{prefix}{tag}', image, int(step), max_outputs=count)
    self._tb.flush()

  def close(self) -> None:
    if not self.active:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _tensorboard_writer(logdir: str):
  """flax's TensorBoard `SummaryWriter` on `logdir`, or None after one line saying why not."""
  try:
    tensorflow()  # first: flax's writer imports TensorFlow, which must come in quietly
    from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    # The JSON lines still hold every metric: warn once, do not stop a training run for this.
    print(f'warning: TensorBoard logging is off ({e}); pip install -r requirements.txt to get '
          f'{logdir}', file=sys.stderr, flush=True)
    return None
  # auto_flush=False: `write` flushes once per log step instead of after every scalar.
  return tensorboard.SummaryWriter(logdir, auto_flush=False)
