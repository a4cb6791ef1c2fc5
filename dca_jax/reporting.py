"""What the user sees: the start banner, metric writers (JSON lines, TensorBoard, wandb)."""

from __future__ import annotations

import json
import os
import time

import jax


def banner(config, *, precision: str, num_params: int, steps_per_epoch: int) -> str:
  """The start banner, in the words of the PyTorch memory guide users know."""
  check = lambda on: '✓' if on else '✗'
  half = precision in ('bf16', 'fp16')
  prec_name = {'fp16': 'FP16, dynamic loss scaling', 'bf16': 'BF16', 'fp32': 'FP32'}[precision]
  remat = config.use_gradient_checkpointing
  lines = [
      f'{check(half)} Mixed precision training {"enabled" if half else "disabled"} ({prec_name})',
      f'{check(remat)} Gradient checkpointing {"enabled (trades compute for memory)" if remat else "disabled"}'
      + (f', policy {config.remat_policy}' if remat else ''),
      f'Model initialized with {num_params / 1e6:.2f}M parameters ({config.backbone}, '
      f'DCAL L={config.num_sa_layers} M={config.num_glca_layers} T={config.num_pwca_layers}, '
      f'R={config.top_k_ratio:g})',
      f'Physical batch size: {config.batch_size}',
      f'Gradient accumulation steps: {config.gradient_accumulation_steps}',
      f'Effective batch size: {config.batch_size * config.gradient_accumulation_steps}',
      f'Devices: {jax.device_count()} x {jax.devices()[0].device_kind} '
      f'({jax.process_count()} process{"es" if jax.process_count() > 1 else ""})',
      f'Input: {config.dataset} ({config.data_source}), {config.input_size}px, '
      f'{steps_per_epoch} steps/epoch, {config.num_epochs} epochs',
  ]
  return '\n'.join(lines)


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
  """JSON lines in the workdir + TensorBoard, and wandb when a project is set. Process 0 only."""

  def __init__(self, workdir: str, config=None, wandb_project: str = ''):
    self.active = jax.process_index() == 0
    self._tb = None
    self._wandb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      from flax.metrics import tensorboard  # needs TensorFlow: optional for tools/benchmarks
      self._tb = tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      self._tb = None
    if wandb_project:
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ValueError('config.wandb_project is set but wandb is not installed: '
                         'pip install wandb') from e
      self._wandb = wandb.init(project=wandb_project, dir=workdir,
                               config=config.to_dict() if config is not None else None)

  def write(self, step: int, metrics: dict, prefix: str = '') -> None:
    if not self.active:
      return
    scalars = {f'{prefix}{k}': float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(scalars, step=int(step))

  def close(self) -> None:
    if not self.active:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
