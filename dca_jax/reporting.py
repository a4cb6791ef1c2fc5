"""What the user sees: the start banner and its warnings, the progress bar, the closing summary,
device memory and the metric writers (JSON lines, TensorBoard, wandb; the attention pictures of
dca_jax/evaluators/attention.py go to TensorBoard through `write_images`).

Every console line fits `WIDTH` columns: a sentence longer than that is wrapped (`fit`), the
progress bar is drawn that wide, and only loss, images/s and the ETA ride on it (the other
metrics go to metrics.jsonl and TensorBoard)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import time
from typing import Mapping, Optional

import jax
import numpy as np

from dca_jax import config_lib
from dca_jax import hub
from dca_jax.data._tf import tensorflow

WIDTH = 100  # columns: the console lines of a run, the progress bar included


def fit(line: str, width: int = WIDTH) -> str:
  """`line` wrapped at spaces to `width` columns, continuation lines indented (paths and other
  long words are never split: a path stays copyable)."""
  return textwrap.fill(line, width, subsequent_indent='    ', break_long_words=False,
                       break_on_hyphens=False)


def duration(seconds: float) -> str:
  """H:MM:SS (with days in front past 24 h)."""
  seconds = max(0, int(round(seconds)))
  days, seconds = divmod(seconds, 86400)
  text = f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
  return f'{days}d {text}' if days else text


def run_length(config, steps_per_epoch: int) -> str:
  """What the run will do, in steps and epochs (max_steps, when set, decides)."""
  total = config_lib.total_steps(config, steps_per_epoch)
  epochs = total / steps_per_epoch
  epochs_text = f'{epochs:g}' if epochs >= 1 and float(epochs).is_integer() else f'{epochs:.2f}'
  why = f' (max_steps={config.max_steps})' if config.max_steps else ''
  plural = '' if epochs_text == '1' else 's'
  return (f'{steps_per_epoch} steps/epoch; this run: {total} steps = {epochs_text} epoch{plural}'
          f'{why}')


# ============================================================================ the banner
PRECISION_NAMES = {'fp16': 'FP16, dynamic loss scaling', 'bf16': 'BF16', 'fp32': 'off (FP32)'}


def banner(config, *, precision: str, num_params: int, steps_per_epoch: int,
           protocol: str = '', selection: str = '', pretrained: Optional[str] = None) -> str:
  """The start banner: the run's settings, stated neutrally, in the words of the PyTorch memory
  guide users know (what is wrong for the hardware: `hardware_warnings`); `selection`: the line
  saying `best` is chosen on the test split (evaluators.selection_warning), if it is;
  `pretrained`: what the init loaded, in words (None: nothing, e.g. a resumed run)."""
  remat = config.use_gradient_checkpointing
  lines = [
      f'Mixed precision training: {PRECISION_NAMES[precision]}',
      'Gradient checkpointing: '
      + (f'on, policy {config.remat_policy} (trades compute for memory)' if remat else 'off'),
      f'Model initialized with {num_params / 1e6:.2f}M parameters ({config.backbone}, '
      f'DCAL L={config.num_sa_layers} M={config.num_glca_layers} T={config.num_pwca_layers}, '
      f'R={config.top_k_ratio:g})',
      # one line whatever its length: the weights' provenance (file, revision, sha256)
      hub.banner_line(config.pretrained_model, pretrained),
      f'Physical batch size: {config.batch_size}'
      + (' (auto_batch: the memory plan\'s choice)' if config.auto_batch else ''),
      f'Gradient accumulation steps: {config.gradient_accumulation_steps}',
      f'Effective batch size: {config.batch_size * config.gradient_accumulation_steps}',
      f'Devices: {jax.device_count()} x {jax.devices()[0].device_kind} '
      f'({jax.process_count()} process{"es" if jax.process_count() > 1 else ""})',
      fit(f'Input: {config.dataset} ({config.data_source}), {config.input_size}px, '
          f'{run_length(config, steps_per_epoch)}'),
  ] + ([f'Re-ID protocol: {protocol}'] if protocol else []) + ([fit(selection)] if selection
                                                               else [])
  return '\n'.join(lines)


def has_fast_bf16(device) -> bool:
  """Whether `device` computes in BF16 faster than in FP32: TPUs, and NVIDIA GPUs from Ampere
  (compute capability 8.0) on. Other GPUs are not judged (False)."""
  if device.platform == 'tpu':
    return True
  if device.platform not in ('gpu', 'cuda'):
    return False
  try:
    return float(getattr(device, 'compute_capability', '') or 0) >= 8.0
  except ValueError:
    return False


def hardware_warnings(config, precision: str, device=None, fits: Optional[bool] = None) -> list:
  """`warning:` lines (one each, as every warning) for settings that are wrong for the
  hardware, none for those that are right (FP32 and no remat on a CPU). `fits`: whether the
  memory plan says the step fits without gradient checkpointing (None: no plan was made,
  nothing said about remat)."""
  device = device if device is not None else jax.devices()[0]
  warnings = []
  if precision == 'fp32' and has_fast_bf16(device):
    warnings.append(f'warning: fp32 on {device.device_kind}, which has fast BF16: '
                    '--config.precision=bf16 (or auto)')
  if fits is False and not config.use_gradient_checkpointing:
    warnings.append('warning: the memory plan says this step needs remat to fit: '
                    '--config.use_gradient_checkpointing=true')
  return warnings


# ============================================================================ progress
class EpochProgress:
  """One tqdm bar per epoch, `WIDTH` columns at most: images, images/s and the epoch's ETA from
  tqdm, then the latest loss and the whole run's ETA. Lines said during the run (evaluations,
  SIGTERM) go through `write`, on their own line between bars."""

  def __init__(self, config, steps_per_epoch: int, enabled: bool = True):
    self.config, self.steps_per_epoch, self.enabled = config, steps_per_epoch, enabled
    self.total_steps = config_lib.total_steps(config, steps_per_epoch)
    self.bar, self.steps_done = None, 0

  def step(self, steps_done: int) -> None:
    """Called after each micro-step: opens the epoch's bar when needed and advances it."""
    self.steps_done = steps_done
    if not self.enabled:
      return
    import tqdm  # pylint: disable=g-import-not-at-top
    batch = self.config.batch_size
    if self.bar is None or (steps_done - 1) % self.steps_per_epoch == 0:
      self.close()
      epoch = (steps_done - 1) // self.steps_per_epoch
      done_in_epoch = (steps_done - 1) % self.steps_per_epoch
      columns = shutil.get_terminal_size((WIDTH, 24)).columns
      self.bar = tqdm.tqdm(total=self.steps_per_epoch * batch, initial=done_in_epoch * batch,
                           unit='img', desc=f'epoch {epoch + 1}/{self.config.num_epochs}',
                           leave=True, ncols=min(WIDTH, columns), mininterval=1.0)
    self.bar.update(batch)

  def show(self, metrics: dict) -> None:
    """The loss and the run's ETA (from the images/s of the last log interval) on the bar."""
    if self.bar is None:
      return
    shown = {}
    if 'loss' in metrics:
      shown['loss'] = f'{float(metrics["loss"]):.3g}'
    speed = float(metrics.get('images_per_sec', 0.0))
    if speed > 0:
      images_left = (self.total_steps - self.steps_done) * self.config.batch_size
      shown['eta'] = duration(images_left / speed)
    self.bar.set_postfix(shown, refresh=False)

  def write(self, line: str) -> None:
    """`line` on its own line: the bar so far is closed first (the next step opens the rest of
    the epoch's), so the line never lands inside it."""
    self.close()
    if self.enabled:
      print(fit(line), flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def closing_summary(*, steps_done: int, total_steps: int, seconds: float, last: str,
                    best: str, paths: Mapping[str, str], stopped: bool = False) -> str:
  """What a training reached and where its files are, printed when it ends: `last` the last
  evaluation's line, `best` the best checkpoint's; `paths`: label -> file or folder."""
  how = 'stopped (SIGTERM)' if stopped else 'done'
  lines = [f'Training {how}: step {steps_done} of {total_steps}, {duration(seconds)} this run']
  lines += [fit(f'  {line}') for line in (last, best) if line]
  width = max(len(label) for label in paths) if paths else 0
  lines += [f'  {label + ":":<{width + 1}} {path}' for label, path in paths.items()]
  return '\n'.join(lines)


def best_evaluation(metrics_path: str, key: str, step: Optional[int]) -> Optional[float]:
  """The value of eval/`key` logged at `step` in metrics.jsonl (the score the best checkpoint
  was chosen by), None when it is not there."""
  if step is None or not os.path.isfile(metrics_path):
    return None
  value = None
  with open(metrics_path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill: the others still count
      if record.get('step') == step and f'eval/{key}' in record:
        value = float(record[f'eval/{key}'])
  return value


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
